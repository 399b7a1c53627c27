"""`flover run`'s four modes on a tiny random model: every request gets its tokens, and
requests enter no earlier than the arrival stream says."""

from __future__ import annotations

import json

import pytest

from flover.cli import main
from flover.run.context import RunContext, new_state
from flover.run.driver import measure_lone, run_workload
from flover.run.ini import load_config
from flover.run.workload import arrival_times, build_workload

BASE = ["model_specification.model_type=tiny_llama", "model_specification.data_type=fp32",
        "model_specification.device=cpu", "model_specification.max_seq_len=64",
        "model_specification.max_concurrency=2", "request.num_requests=5",
        "request.request_output_len=6", "runtime_hyperparameter.interval=10"]


@pytest.fixture(scope="module")
def model():
    ctx = RunContext.load(load_config(None, BASE))
    return ctx.model


def run(model, *overrides):
    cfg = load_config(None, [*BASE, *overrides])
    ctx = RunContext(cfg, model, None)
    items = build_workload(cfg, None, model.cfg.vocab_size)
    state = new_state(cfg, items)
    run_workload(ctx, items, state)
    return cfg, items, state


@pytest.mark.parametrize("mode", ["fused", "instances", "dynamic", "serial"])
def test_every_request_gets_its_fixed_number_of_tokens(model, mode):
    _, _, state = run(model, f"runtime_hyperparameter.mode={mode}")
    assert [(r.status, r.tokens) for r in state.records] == [("done", 6)] * 5


@pytest.mark.parametrize("mode", ["fused", "instances", "dynamic", "serial"])
def test_every_request_gets_its_random_number_of_tokens(model, mode):
    _, items, state = run(model, f"runtime_hyperparameter.mode={mode}",
                          "runtime_hyperparameter.use_mem_shuffle=1")
    assert [r.tokens for r in state.records] == [it.max_tokens for it in items]


@pytest.mark.parametrize("mode", ["fused", "instances", "dynamic", "serial"])
def test_no_request_starts_before_its_arrival(model, mode):
    _, _, state = run(model, f"runtime_hyperparameter.mode={mode}",
                      "runtime_hyperparameter.arrival=poisson", "runtime_hyperparameter.interval=20")
    assert [r.arrival for r in state.records] == arrival_times(5, 20, "poisson", seed=0)
    assert all(r.arrival <= r.admit <= r.first_token <= r.finish for r in state.records)


def test_fused_holds_at_most_max_concurrency_in_flight(model):
    _, _, state = run(model, "runtime_hyperparameter.interval=0")
    assert max(n for _, n in state.samples) == 2


def test_serial_runs_one_request_after_another(model):
    _, _, state = run(model, "runtime_hyperparameter.mode=serial",
                      "runtime_hyperparameter.interval=0")
    recs = state.records
    assert all(b.admit >= a.finish for a, b in zip(recs, recs[1:], strict=False))


def test_dynamic_batches_a_window_together_and_returns_it_together(model):
    _, _, state = run(model, "runtime_hyperparameter.mode=dynamic",
                      "runtime_hyperparameter.interval=0", "model_specification.max_concurrency=4")
    first, rest = state.records[:4], state.records[4]
    assert len({r.finish for r in first}) == 1 and rest.admit >= first[0].finish


def test_instances_run_each_request_as_its_own_forward_passes(model):
    _, _, state = run(model, "runtime_hyperparameter.mode=instances")
    assert state.iterations == 5 * 6  # one prefill and 5 decodes per request


def test_lone_request_generates_the_full_output_len(model):
    cfg = load_config(None, [*BASE, "runtime_hyperparameter.use_mem_shuffle=1"])
    items = build_workload(cfg, None, model.cfg.vocab_size)
    assert measure_lone(RunContext(cfg, model, None), items[0])["tokens"] == 6


def test_cli_run_writes_the_report_json_and_plot(tmp_path, capsys):
    ini = tmp_path / "run.ini"
    ini.write_text("[model_specification]\nmodel_type=tiny_llama\ndata_type=fp32\ndevice=cpu\n"
                   "max_seq_len=64\nmax_concurrency=2\n[request]\nnum_requests=3\n"
                   "request_output_len=4\n[runtime_hyperparameter]\ninterval=5\n")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["run", str(ini), "--no-live", "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert [r["output_tokens"] for r in data["requests"]] == [4, 4, 4]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "time to first token" in capsys.readouterr().out


def test_cli_run_reports_a_bad_key_and_exits_2(tmp_path, capsys):
    ini = tmp_path / "run.ini"
    ini.write_text("[request]\nrequest_output_length=4\n")
    assert main(["run", str(ini)]) == 2
    assert "unknown key 'request_output_length' in [request]" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["fused", "instances", "dynamic", "serial"])
@pytest.mark.parametrize("rows", ["model_specification.beam_width=2",
                                  "model_specification.per_batch_size=2"])
def test_requests_with_several_rows_run_in_every_mode(model, mode, rows):
    cfg, _, state = run(model, f"runtime_hyperparameter.mode={mode}", rows,
                        "runtime_hyperparameter.top_k=0")
    assert cfg.engine_config().max_concurrency == 2 * cfg.max_concurrency  # slots per request
    assert [r.status for r in state.records] == ["done"] * 5


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"]])
def test_batch_invariance_is_on_by_default_and_the_flag_turns_it_off(command):
    from flover.cli import build_parser

    assert build_parser().parse_args(command).batch_invariant is True
    assert build_parser().parse_args([*command, "--no-batch-invariant"]).batch_invariant is False
