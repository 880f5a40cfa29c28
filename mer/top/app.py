"""`mer top`'s dashboard: a textual app that polls a service's public endpoints every
`interval` seconds (in a thread, so the screen never waits on the network) and draws the
`View` that `mer.top.monitor` makes of them.

Panels: requests and tokens/s (with a sparkline), latency percentiles over the window, the
expert cache as a heatmap of hit rate per layer (and per expert where the model has few),
the disk (GB/s with a sparkline, bytes per token, read-ahead precision and waste), memory
(KV cache, arena) and the actors (a restart is highlighted for a while). While nothing
answers, or the key is refused, one screen says so and polling goes on. Keys: q quits,
p pauses polling, r resets the windows.
"""

from __future__ import annotations

import asyncio

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Sparkline, Static

from mer.top.monitor import (
    RESTART_HIGHLIGHT_S,
    Monitor,
    ServiceUnavailable,
    Unauthorized,
    View,
    fetch,
    fmt_share,
    section_lines,
)

# hit rate -> colour, from all misses (red) to all hits (green)
_HEAT = ["#d7263d", "#f46036", "#f4a236", "#e2d96b", "#9bc53d", "#3bb273"]


def _heat(rate: float | None) -> str:
    if rate is None:
        return "#444444"
    return _HEAT[min(int(rate * len(_HEAT)), len(_HEAT) - 1)]


def heatmap(v: View) -> Text:
    """Hit rate per layer as coloured cells (and per expert, a row per layer, where known)."""
    text = Text()
    text.append(f"hit rate {fmt_share(v.hit_rate)} over {v.window_s:.0f} s\n")
    if not v.layer_hit_rate:
        text.append("no lookups yet")
        return text
    if v.expert_hit_rate:
        width = 1 + max(max(e) for e in v.expert_hit_rate.values())
        text.append("    " + "".join(f"{'E' + str(e):>5}" for e in range(width)) + "  layer\n")
        for layer, experts in v.expert_hit_rate.items():
            text.append(f"L{layer:<3}")
            for rate in (experts.get(e) for e in range(width)):
                text.append(f"{fmt_share(rate):>5}", style=f"black on {_heat(rate)}")
            text.append(f"  {fmt_share(v.layer_hit_rate.get(layer))}\n")
    else:
        for layer, rate in v.layer_hit_rate.items():
            text.append(f"L{layer:<3}{fmt_share(rate):>5} ", style=f"black on {_heat(rate)}")
            if layer % 8 == 7:
                text.append("\n")
    text.append("\nhit rate: ")
    for n, colour in enumerate(_HEAT):
        text.append(f" {n * 100 // len(_HEAT)}%+ ", style=f"black on {colour}")
    text.append(" ", style="")
    text.append("  -  ", style="white on #444444")
    text.append(" no lookups")
    return text


class TopApp(App):
    """The dashboard (module docstring)."""

    TITLE = "mer top"
    CSS = """
    Screen { layout: vertical; }
    #title { height: 1; background: $primary; color: $text; padding: 0 1; }
    #waiting { height: 1fr; content-align: center middle; text-style: bold; display: none; }
    #main { height: 1fr; }
    .panel { border: round $primary-lighten-2; padding: 0 1; height: auto; }
    .row { height: auto; }
    .row > .panel { width: 1fr; }
    Sparkline { height: 2; margin: 0 0 0 0; }
    #actors-panel { height: 1fr; }
    .restarted { background: $error 40%; }
    """
    BINDINGS = [("q", "quit", "Quit"), ("p", "pause", "Pause"), ("r", "reset", "Reset windows")]

    def __init__(
        self, url: str, api_key: str | None = None, interval: float = 1.0, span_s: float = 60.0
    ) -> None:
        super().__init__()
        self.url, self.api_key, self.interval = url.rstrip("/"), api_key, interval
        self.monitor = Monitor(self.url, span_s=span_s)
        self.view: View | None = None  # the last one drawn
        self.problem: str | None = None  # what the waiting screen says
        self.paused = False
        self.polls = 0

    def compose(self) -> ComposeResult:
        yield Static(f"mer top  {self.url}", id="title")
        yield Static(f"waiting for the service at {self.url}", id="waiting")
        with Vertical(id="main"):
            with Horizontal(classes="row"):
                with Vertical(classes="panel", id="requests-panel"):
                    yield Static(id="requests")
                    yield Sparkline([], id="tps")
                yield Static(id="latency", classes="panel")
            yield Static(id="cache", classes="panel")
            with Horizontal(classes="row"):
                with Vertical(classes="panel", id="disk-panel"):
                    yield Static(id="disk")
                    yield Sparkline([], id="gbps")
                yield Static(id="memory", classes="panel")
            yield Static(id="actors", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        for pid, title in (
            ("requests-panel", "requests"),
            ("latency", "latency"),
            ("cache", "expert cache"),
            ("disk-panel", "disk"),
            ("memory", "memory"),
            ("actors", "actors"),
        ):
            self.query_one(f"#{pid}").border_title = title
        self.set_interval(self.interval, self.poll)
        self.call_later(self.poll)

    async def poll(self) -> None:
        if self.paused:
            return
        try:
            sample = await asyncio.to_thread(fetch, self.url, self.api_key, max(self.interval, 2))
        except (ServiceUnavailable, Unauthorized) as err:
            self.show_problem(str(err))
            return
        self.polls += 1
        self.problem = None
        self.draw(self.monitor.add(sample))

    def show_problem(self, message: str) -> None:
        self.problem = message
        waiting = self.query_one("#waiting", Static)
        waiting.update(f"{message}\n\nretrying every {self.interval:g} s; q quits")
        waiting.display = True
        self.query_one("#main").display = False

    def draw(self, v: View) -> None:
        self.view = v
        self.query_one("#waiting").display = False
        self.query_one("#main").display = True
        lines = section_lines(v)
        paused = "  [paused]" if self.paused else ""
        self.query_one("#title", Static).update(lines["service"][0] + paused)
        self.query_one("#requests", Static).update("\n".join(lines["requests"]))
        self.query_one("#tps", Sparkline).data = v.tps_history or [0.0]
        self.query_one("#latency", Static).update("\n".join(lines["latency"]))
        cache = self.query_one("#cache", Static)
        cache.update(heatmap(v) if v.streamed else "\n".join(lines["expert cache"]))
        self.query_one("#disk", Static).update("\n".join(lines["disk"]))
        self.query_one("#gbps", Sparkline).data = v.gbps_history or [0.0]
        self.query_one("#memory", Static).update("\n".join(lines["memory"]))
        actors = Text()
        for n, line in enumerate(lines["actors"]):
            row = v.actors[n - 1] if n else None
            hot = (
                row is not None
                and row.restarted_ago_s is not None
                and row.restarted_ago_s < RESTART_HIGHLIGHT_S
            )
            actors.append(line + "\n", style="bold white on dark_red" if hot else "")
        self.query_one("#actors", Static).update(actors)

    def action_pause(self) -> None:
        self.paused = not self.paused
        if self.view is not None:
            self.draw(self.view)

    def action_reset(self) -> None:
        self.monitor.reset()

    def panel_text(self, name: str) -> str:
        """The plain text a panel shows now (`#requests`, `#cache`, ...; for tests)."""
        content = self.query_one(f"#{name}", Static).content
        return content.plain if isinstance(content, Text) else str(content)
