"""GET /metrics: the server's Prometheus metrics, under vLLM's names where they fit.

Dashboards and autoscalers written for vLLM read `vllm:*` metrics with a `model_name` label,
so flover exports those names (and its own under `flover:*`). Each app has its own
`CollectorRegistry`, not prometheus_client's global one, so that several apps in one process
(the tests) do not register the same names twice.

Two sources, so that the engine thread never waits on a scrape and a scrape never waits on
the engine:

- gauges and the engine's own counters (iterations, shuffle moves and bytes, failed batches)
  are read from `AsyncEngine.stats()`, the snapshot the engine thread refreshes, at scrape
  time (`_SnapshotCollector`); the engine's counters only grow, so they are exported as
  counters as they are;
- per-request counters and histograms are observed once per request, when it ends, by
  `ServerMetrics.observe`, which the engine thread calls through `AsyncEngine.on_finished`
  with the request's head row (its times are the engine's `time.perf_counter()` stamps).

Time per output token: vLLM's `vllm:time_per_output_token_seconds` (now
`vllm:inter_token_latency_seconds`) observes every gap between two tokens; the engine keeps no
per-token times, only the first token's and the finish time, so flover exports the per-request
mean under vLLM's name for that, `vllm:request_time_per_output_token_seconds`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import FastAPI

    from flover.engine.sequence import Request
    from flover.server.async_engine import AsyncEngine

FINISHED_REASONS = ("stop", "length", "abort", "error")
# vLLM's buckets, so that the same dashboards' quantiles mean the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine stats() keys exported as counters: (stats key, metric name without _total, help)
_ENGINE_COUNTERS = (
    ("iterations", "flover:iterations", "Engine iterations (fused steps) run."),
    ("shuffle_moves", "flover:shuffle_moves", "KV slot moves made by the memory shuffle."),
    ("shuffle_bytes", "flover:shuffle_bytes", "Bytes of KV cache copied by the memory shuffle."),
    ("failed_batches", "flover:failed_batches", "Iterations whose shared forward pass failed."),
)
_PAGED_COUNTERS = (  # kv_layout="pages" only
    ("num_preemptions", "vllm:num_preemptions", "Requests preempted when the KV block pool ran "
     "out (their blocks freed, their tokens recomputed on resume)."),
    ("prefill_tokens_saved", "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache "
     "(not computed)."),
)


class _SnapshotCollector(Collector):
    """Gauges and the engine's counters, read from the engine's stats snapshot per scrape."""

    def __init__(self, aeng: AsyncEngine, model_name: str) -> None:
        self.aeng, self.model_name = aeng, model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.aeng.stats()  # never blocks: the engine thread's last snapshot
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        yield gauge("vllm:num_requests_running", "Rows (requests, or samples and beams of one) "
                    "holding a KV slot.", stats["in_flight"])
        yield gauge("vllm:num_requests_waiting", "Rows waiting for a KV slot (including those "
                    "not yet taken by the engine thread).", self.aeng.waiting())
        slots = stats["max_concurrency"]
        if "kv_blocks" in stats:  # pages: the share of the block pool in use, as vLLM's
            yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (blocks held "
                        "by requests / blocks in the pool; 1 means full).",
                        stats["kv_blocks_used"] / stats["kv_blocks"])
        else:
            yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV slots in use (slots used / "
                        "max_concurrency; 1 means full).",
                        stats["slots_used"] / slots if slots else 0.0)
        for key, name, doc in _ENGINE_COUNTERS + (_PAGED_COUNTERS if "kv_blocks" in stats else ()):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, stats[key])
            yield c


class ServerMetrics:
    """One app's metrics: its registry, and the per-request observations."""

    def __init__(self, aeng: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = reg = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated by finished requests (all their rows).",
            labels, registry=reg).labels(model_name)
        success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                          ["model_name", "finished_reason"], registry=reg)
        # every reason present from the start: a rate() over a series that appears late is wrong
        self.success = {r: success.labels(model_name, r) for r in FINISHED_REASONS}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, labels, registry=reg, buckets=buckets).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "From arrival at the engine to the first generated token.", TTFT_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: (finish - first token) / (output tokens - 1), for "
                              "requests of 2 tokens or more.", TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "From arrival at the engine to the request's end.", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "From arrival at the engine to getting a KV slot.", REQUEST_LATENCY_BUCKETS)
        reg.register(_SnapshotCollector(aeng, model_name))

    def observe(self, head: Request, reason: str | None) -> None:
        """A request has ended (engine thread): count its tokens and reason, observe its times.

        Called once per request with its head row; the rows of n samples or beams share its
        prompt, so the prompt counts once, as in the API's usage. Kept to a few lock-protected
        increments: it runs between iterations."""
        rows = head.rows
        self.prompt_tokens.inc(len(head.prompt_ids))
        out_tokens = sum(len(r.output_ids) for r in rows)
        self.generation_tokens.inc(out_tokens)
        counter = self.success.get(reason or "abort")
        if counter is not None:
            counter.inc()
        arrival = head.arrival_time
        finish = max((r.finish_time for r in rows if r.finish_time is not None), default=None)
        if finish is not None:
            self.e2e.observe(max(0.0, finish - arrival))
        if head.admit_time is not None:
            self.queue.observe(max(0.0, head.admit_time - arrival))
        first = head.first_token_time
        if first is not None:
            self.ttft.observe(max(0.0, first - arrival))
            n = len(head.output_ids)
            if n > 1 and head.finish_time is not None:
                self.tpot.observe(max(0.0, head.finish_time - first) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def install_metrics(app: FastAPI, aeng: AsyncEngine, model_name: str) -> ServerMetrics:
    """Add GET /metrics to the app and hook the engine thread's finished requests to it.

    /metrics is not behind --api-key (as in vLLM): scrapers rarely carry the API's key."""
    from fastapi.responses import Response

    metrics = ServerMetrics(aeng, model_name)
    aeng.on_finished = metrics.observe

    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", get_metrics, methods=["GET"], include_in_schema=False)
    app.state.metrics = metrics
    return metrics
