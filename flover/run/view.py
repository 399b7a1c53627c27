"""What the terminal shows while a run goes: a live view, or a plain progress bar.

`LiveView` redraws a few times a second from the run's `RunState`: a header (time, tokens/s,
slots used, shuffle moves), the in-flight requests over iterations as a histogram (the
original Flover's view), a line per request with its progress and the tail of its text,
and the latest arrivals and finishes. `PlainProgress` is for --no-live or when the output
is not a terminal: a progress bar, or one line per finished request.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from rich.console import Console
from rich.console import Group as Stack
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from flover.run.timeline import Record, RunState

BLOCKS = " ▁▂▃▄▅▆▇█"
STATUS_STYLE = {"pending": "dim", "waiting": "yellow", "running": "cyan", "done": "green"}


def histogram(values: list[int], width: int, height: int, top: int) -> list[str]:
    """Vertical bars, one column per value (or per bucket of values when there are more
    values than columns, each the bucket's maximum), `height` rows of 1/8 blocks."""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step): max(int((i + 1) * step), int(i * step) + 1)])
                  for i in range(width)]
    top = max(top, 1)
    units = [round(v / top * height * 8) for v in values]
    rows = []
    for row in range(height - 1, -1, -1):
        base = row * 8
        rows.append("".join(BLOCKS[min(8, max(0, u - base))] for u in units))
    return rows


@contextmanager
def status(console: Console, text: str):
    """A spinner on a terminal, a plain line elsewhere."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        console.print(text)
        yield


class LiveView:
    def __init__(self, state: RunState, console: Console) -> None:
        self.state, self.console = state, console
        self.live = Live(console=console, refresh_per_second=4, get_renderable=self.render,
                         transient=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.refresh()
        self.live.__exit__(*exc)

    def render(self):
        width = max(40, self.console.size.width - 4)
        # fit the terminal: 1 header line, the histogram in a panel, the table, 4 events
        room = self.console.size.height - 1 - 2 - 1 - 4 - 2
        height = min(8, max(3, room - len(self.state.records)))
        return Stack(self._header(), self._histogram(width, height),
                     self._requests(width, max(4, room - height)), self._events())

    def _header(self) -> Text:
        s, now = self.state, self.state.now()
        tps = s.generated / now if now > 0 else 0.0
        t = Text()
        t.append(" flover run ", style="bold white on blue")
        t.append(f" {s.mode} ", style="bold")
        t.append(f" {now:5.1f} s  ")
        t.append(f"{s.finished}/{len(s.records)} done  ", style="green")
        t.append(f"{tps:.1f} tok/s  ", style="bold")
        t.append(f"slots {s.slots_used}/{s.max_concurrency}  it {s.iterations}")
        if s.mode == "fused":
            t.append(f"  moves {s.shuffle_moves}")
        return t

    def _histogram(self, width: int, height: int) -> Panel:
        s = self.state
        with s.lock:
            values = [n for _, n in s.samples]
        top = max([s.max_concurrency if s.mode != "instances" else 1, *values])
        height = min(height, max(3, top))
        label_w = len(str(top)) + 1
        rows = histogram(values, width - label_w - 4, height, top)
        text = Text()
        for i, row in enumerate(rows):
            label = str(top) if i == 0 else ("0" if i == height - 1 else "")
            text.append(label.rjust(label_w - 1) + " ", style="dim")
            text.append(row + ("\n" if i < height - 1 else ""), style="cyan")
        unit = "iteration" if s.mode != "instances" else "forward pass (any instance)"
        title = f"requests in flight per {unit}"
        if len(values) > width - label_w - 4:
            title += f" (all {len(values)}, bucketed)"
        return Panel(text, title=title, title_align="left", border_style="blue", padding=(0, 1))

    def _rows(self, limit: int) -> list[Record]:
        recs = self.state.records
        if len(recs) <= limit:
            return recs
        active = [r for r in recs if r.status in ("running", "waiting")]
        done = sorted((r for r in recs if r.status == "done"), key=lambda r: r.finish)
        return sorted((active + done[-max(0, limit - len(active)):])[:limit],
                      key=lambda r: r.arrival)

    def _requests(self, width: int, limit: int) -> Table:
        t = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
        t.add_column("req", style="bold", no_wrap=True)
        t.add_column("state", no_wrap=True)
        t.add_column("progress", no_wrap=True)
        t.add_column("tokens", justify="right", no_wrap=True)
        t.add_column("latency", justify="right", no_wrap=True)
        t.add_column("output", no_wrap=True, overflow="ellipsis", ratio=1)
        bar_w = 16
        now = self.state.now()
        for r in self._rows(limit):
            frac = r.tokens / r.max_tokens if r.max_tokens else 0.0
            fill = round(frac * bar_w)
            bar = Text("━" * fill, style="green" if r.status == "done" else "cyan")
            bar.append("━" * (bar_w - fill), style="grey23")
            if r.status == "done":
                lat = f"{r.latency:.2f} s"
            elif r.status in ("waiting", "running"):
                lat = f"{now - r.arrival:.2f} s…"
            else:
                lat = ""
            tail = " ".join(r.text.split())  # a finished answer from its start, a live one's end
            if r.status != "done" and len(tail) > width // 2:
                tail = "…" + tail[-(width // 2):]
            t.add_row(r.request_id, Text(r.status, style=STATUS_STYLE[r.status]), bar,
                      f"{r.tokens}/{r.max_tokens}", lat, Text(tail, style="dim italic"))
        return t

    def _events(self) -> Text:
        with self.state.lock:
            events = list(self.state.events)[-4:]
        t = Text()
        for i, (ts, msg) in enumerate(events):
            style = "green" if "finished" in msg else "yellow" if "arrived" in msg else ""
            t.append(f"  {ts:6.2f} s  ", style="dim")
            t.append(msg + ("\n" if i < len(events) - 1 else ""), style=style)
        return t


class PlainProgress:
    """A progress bar on a terminal; elsewhere a line per finished request."""

    def __init__(self, state: RunState, console: Console) -> None:
        self.state, self.console = state, console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._progress = None
        if console.is_terminal:
            self._progress = Progress(TextColumn("flover run"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("requests"), TimeElapsedColumn(), console=console)
            self._task = self._progress.add_task("run", total=len(state.records))
        self._printed: set[str] = set()

    def __enter__(self) -> PlainProgress:
        if self._progress:
            self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._tick()
        if self._progress:
            self._progress.stop()

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._tick()

    def _tick(self) -> None:
        s = self.state
        if self._progress:
            self._progress.update(self._task, completed=s.finished)
            return
        done = sorted((r for r in s.records if r.status == "done"
                       and r.request_id not in self._printed), key=lambda r: r.finish)
        for r in done:
            self._printed.add(r.request_id)
            self.console.print(f"[{len(self._printed):>3}/{len(s.records)}] {r.request_id} "
                               f"finished: {r.tokens} tokens, latency {r.latency:.2f} s",
                               highlight=False)
