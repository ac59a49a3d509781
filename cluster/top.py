"""`stagecoach top`: a live terminal view of a serving pipeline, drawn from its /v1/stats."""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import urllib.error
import urllib.request
from collections import deque

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"


def fetch(url: str, api_key: str | None, timeout: float = 3.0) -> dict:
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/stats", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def sparkline(values) -> str:
    values = list(values)
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def _ms(latency: dict | None, key: str) -> str:
    return "-" if not latency else f"{latency[key]:.2f}"


def render(stats: dict | None, url: str, error: str | None, history: deque) -> Group:
    if stats is None:
        return Group(Panel(Text(f"cannot reach {url}: {error}\nretrying …", style="bold red"), title="stagecoach top"))
    footer = Text("latencies in ms · q quits", style="dim")
    return Group(
        Panel(_header(stats, history), title="stagecoach top"),
        _stage_table(stats["stages"]),
        _rebalance_line(stats.get("rebalance"), stats["engine"]),
        footer,
    )


def _header(stats: dict, history: deque) -> Table:
    """The whole pipeline: model, state, requests, throughput and latencies, utilisation, KV cache, prefix cache."""
    t, lat, eng = stats["throughput"], stats["latency"], stats["engine"]
    state = "draining" if stats["draining"] else ("ready" if stats["ready"] else "not ready")
    header = Table.grid(padding=(0, 3))
    for _ in range(4):
        header.add_column()
    header.add_row(
        f"[bold]{stats['model']}[/]",
        f"stages {len(stats['stages'])}",
        f"state [{'green' if state == 'ready' else 'red'}]{state}[/]",
        f"requests running {eng.get('running', 0)} waiting {eng.get('waiting', 0)}",
    )
    header.add_row(
        f"in {t['input_tokens_per_s']:.1f} tok/s",
        f"out {t['output_tokens_per_s']:.1f} tok/s",
        f"TTFT p50/p99 {_ms(lat['ttft_ms'], 'p50')}/{_ms(lat['ttft_ms'], 'p99')} ms",
        f"ITL p50/p99 {_ms(lat['itl_ms'], 'p50')}/{_ms(lat['itl_ms'], 'p99')} ms",
    )
    header.add_row(
        f"utilisation {stats['pipeline_utilisation']:.2f}",
        f"KV {eng.get('kv_blocks_used', 0)}/{eng.get('kv_blocks_total', 0)} blocks",
        f"in flight {eng.get('inflight', 0)}/{eng.get('max_inflight', 0)}",
        f"out tok/s {sparkline(history)}",
    )
    header.add_row(_prefix_cache(eng.get("prefix_cache")), _speculative(eng.get("speculative")), "", "")
    return header


def _stage_table(stages: list[dict]) -> Table:
    """A row per stage: where it runs, its layers and memory, its times, and its state."""
    table = Table(expand=True)
    for col in (
        "stage",
        "node",
        "device",
        "layers",
        "weights GB",
        "KV use",
        "compute p50",
        "compute p99",
        "queue p50",
        "hop p50",
        "hop p99",
        "mb/s",
        "errors",
        "state",
    ):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col) if col in ("stage", "state") else None)
    for s in stages:
        bad = s["state"] != "ready"
        table.add_row(
            str(s["index"]),
            (s["node_id"] or "-")[:8],
            s["device"],
            f"{s['layers'][0]}-{s['layers'][1]}",
            f"{s['weight_bytes'] / 1e9:.2f}",
            f"{s['kv_blocks_used']}/{s['kv_blocks_total']}",
            _ms(s["compute_ms"], "p50"),
            _ms(s["compute_ms"], "p99"),
            _ms(s["queue_ms"], "p50"),
            _ms(s["hop_ms"], "p50"),
            _ms(s["hop_ms"], "p99"),
            f"{s['microbatches_per_s']:.1f}",
            str(s["errors"]),
            Text(s["state"], style="bold red" if bad else "green"),
            style="red" if bad else None,
        )
    return table


def _prefix_cache(cache: dict | None) -> str:
    """The prefix cache: hit rate (prompt tokens reused over prompt tokens) and blocks cached, or off."""
    if not cache or not cache.get("enabled"):
        return "prefix cache off"
    return f"prefix hits {100 * cache['hit_rate']:.0f} % ({cache['cached_blocks']} blocks)"


def _speculative(spec: dict | None) -> str:
    """Speculative decoding: drafts accepted and tokens per verify pass, or off."""
    if not spec or spec.get("method", "off") == "off":
        return "speculation off"
    return (
        f"{spec['method']}: accepted {100 * spec['acceptance_rate']:.0f} %, {spec['tokens_per_pass']:.2f} tokens/pass"
    )


def _rebalance_line(proposal: dict | None, eng: dict) -> Text:
    """The planner's proposal for the measured stage speeds (and the mode: off, suggest, auto), the last rebalance and its
    pause, and the microbatches failed while the stages stayed up."""
    failed = f" · microbatches failed {eng.get('microbatch_failures', 0)}, requests ended {eng.get('requests_failed', {}).get('stage_error', 0)}"
    if proposal is None:
        return Text(f"rebalance: measuring stage speeds{failed}", style="dim")
    mode = proposal.get("mode", "suggest")
    history = proposal.get("history") or []
    last = ""
    if history:
        h = history[-1]
        last = f" · last {h['trigger']}: {','.join(map(str, h['from']))} → {','.join(map(str, h['to']))} {h['outcome'].split(':')[0]}, paused {h['pause_s']:.2f} s"
    if proposal.get("applying"):
        return Text(f"rebalance ({mode}): moving layers now{last}{failed}", style="bold yellow")
    split = ",".join(map(str, proposal["layers"]))
    if "proposed" not in proposal:
        return Text(f"rebalance ({mode}): layers {split}, measuring stage speeds{last}{failed}", style="dim")
    if proposal["proposed"] == proposal["layers"]:
        return Text(f"rebalance ({mode}): layers {split} are balanced for the measured speeds{last}{failed}")
    return Text(
        f"rebalance ({mode}) proposed: layers {split} → {','.join(map(str, proposal['proposed']))}, predicted "
        f"{100 * proposal['predicted_gain']:+.0f} % ({proposal['layers_moved']} layers move){last}{failed}",
        style="yellow",
    )


def _watch_for_q(stop: threading.Event) -> None:
    """Reads single keys from the terminal (cbreak mode) until 'q' or stop."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                stop.set()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(url: str, interval: float = 1.0, once: bool = False, api_key: str | None = None) -> int:
    console = Console()
    history: deque = deque(maxlen=40)

    def frame() -> tuple[Group, bool]:
        try:
            stats = fetch(url, api_key)
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            return render(None, url, str(getattr(e, "reason", e)), history), False
        history.append(stats["throughput"]["output_tokens_per_s"])
        return render(stats, url, None, history), True

    if once:
        view, ok = frame()
        console.print(view)
        return 0 if ok else 1
    from rich.live import Live

    stop = threading.Event()
    if sys.stdin.isatty():
        threading.Thread(target=_watch_for_q, args=(stop,), daemon=True).start()
    with Live(frame()[0], console=console, screen=False, auto_refresh=False) as live:
        while not stop.wait(interval):
            live.update(frame()[0], refresh=True)
    return 0
