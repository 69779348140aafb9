"""The lab's live timeline in the terminal, and its drawing as SVG.

The timeline prints one row per step as soon as the step ends.  The SVG is
drawn from the JSON report alone, so a saved report can be drawn again.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from html import escape
from pathlib import Path
from typing import Any, TextIO

from userbound.lab.story import ALICE, BOB, USERS, Check
from userbound.policy import ACTION_RULES, Settings

COLUMNS = (("private", ALICE), ("private", BOB), ("public", ALICE), ("public", BOB))
FETCH_WIDTH = 60  # characters of a curl's result shown in the timeline; the report has all
ROW = "{:>5}  {:<30} {:<15} {:<15} {:>8} {:>8}   {:>8} {:>8}"


class Timeline:
    """Rows printed as the story goes on."""

    def __init__(
        self, out: TextIO, *, without_userbound: bool, command: str = "userbound lab"
    ) -> None:
        """command: the lab's command line that plays the story with userbound."""
        self.out = out
        self.without_userbound = without_userbound
        self.command = command

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def header(self, settings: Settings, source: str, interval_ms: int, window: float) -> None:
        values = [f"{rule.value} = {settings.action(rule).value}" for rule in ACTION_RULES]
        values += [
            f"reconnect_on_return = {str(settings.reconnect_on_return).lower()}",
            f"kill_switch = {str(settings.kill_switch).lower()}",
            f'scope = "{settings.scope}"',
        ]
        if settings.grace_period:
            values.append(f"grace_period = {settings.grace_period:g}")
        if settings.allow_users:
            values.append(f"allow_users = {sorted(settings.allow_users)}")
        if settings.allow_groups:
            values.append(f"allow_groups = {sorted(settings.allow_groups)}")

        lines = [
            f"alice (uid {ALICE}) owns the VPN tunnel; bob (uid {BOB}) shares the machine, and "
            f"his job probes the private server every {interval_ms} ms.",
            f"Policy ({source}): {'; '.join(values)}",
        ]
        if self.without_userbound:
            lines.append(
                "Without userbound: alice's VPN is a system-wide wireguard-go tunnel, as VPN "
                "clients set one up today. It stays up whatever happens; the checks are still "
                "the policy's."
            )
        lines.append(
            f"Packets are counted for {window:g} s after each step settles, at the private "
            "server (through the tunnel) and on the public side (outside it)."
        )
        for line in lines:
            self._print(textwrap.fill(line, 100, subsequent_indent="  "))
        self._print()
        self._print(
            ROW.format("time", "step", "seat0", "tunnel", "private", "server", "public", "side")
        )
        self._print(ROW.format("", "", "", "", "alice", "bob", "alice", "bob"))

    def step(
        self,
        title: str,
        seat: str,
        started: float,
        state: str,
        arrived: dict[str, dict[int, int]],
        checks: list[Check],
        fetches: list[Check],
    ) -> None:
        """Print a step's row, its curls, and why each failed check failed."""
        by_cell = {c.cell: c for c in checks if c.cell is not None}
        cells = []
        for place, uid in COLUMNS:
            check = by_cell.get((place, uid))
            count = arrived[place].get(uid, 0)
            if check is not None:
                cells.append(f"{_mark(check)} {count}")
            elif uid == ALICE and state == "-":
                cells.append("-")
            else:
                cells.append(str(count))
        state_check = next((c for c in checks if c.what == "tunnel state"), None)
        shown_state = f"{_mark(state_check)} {state}" if state_check else state
        self._print(ROW.format(f"{started:.1f}", title, seat, shown_state, *cells))
        for check in fetches:
            observed = check.observed
            if len(observed) > FETCH_WIDTH:
                observed = observed[: FETCH_WIDTH - 1] + "…"
            self._print(f"{'':>7}{_mark(check)} {check.what} → {observed}")
            if not check.held:
                self._print(f"{'':>9}{check.why}")
        for check in checks:
            if check.cell is None and check.what != "tunnel state":
                # Checks without a column get a line of their own, held or not.
                self._print(f"{'':>7}{_mark(check)} {check.what}: {check.observed}")
                if not check.held:
                    self._print(f"{'':>9}expected {check.expected}: {check.why}")
            elif not check.held:
                self._print(f"{'':>7}✗ {_failure(check)}")

    def summary(self, report: dict[str, Any]) -> None:
        self._print()
        bob = report["totals"]["private"].get("bob", 0)
        total = report["checks"]
        failed = len(report["failed"])
        if not failed:
            self._print(
                f"✓ All {total} expectations held under this policy; {bob} of bob's packets "
                "entered alice's tunnel."
            )
        elif self.without_userbound:
            self._print(
                f"✗ Without userbound, {failed} of {total} expectations failed: {bob} of bob's "
                "packets reached alice's private network through her tunnel."
            )
            self._print(f"  `{self.command}` plays the same story with userbound.")
        else:
            self._print(f"✗ {failed} of {total} expectations failed:")
            for check in report["failed"]:
                self._print(f"  ✗ {_failure_json(check)}")


def _mark(check: Check) -> str:
    return "✓" if check.held else "✗"


def _failure(check: Check) -> str:
    return _failure_json(check.to_json())


def _failure_json(check: dict[str, Any]) -> str:
    text = f"{check['what']}: expected {check['expected']}, got {check['observed']}"
    return f"{text}: {check['why']}" if check["why"] else text


# Drawing

COLOURS = {
    "alice": "#3465a4",
    "alice (locked)": "#9fb8dd",
    "bob": "#e07b18",
    "nobody": "#d3d7cf",
    "up": "#4e9a06",
    "connecting": "#8ae234",
    "suspended": "#edd400",
    "disconnected": "#cc0000",
    "removed": "#555753",
    "system-wide": "#75507b",
    "-": "#ffffff",
}
WIDTH = 960
LEFT = 150
RIGHT = 20
LANE = 26
CHART = 110


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Draw the report's timeline: seat0, the tunnel's state, and packets per user."""
    path.write_text(draw(report))


def draw(report: dict[str, Any]) -> str:
    steps = report["steps"]
    end = float(max(report["duration_s"], steps[-1]["ended"] if steps else 1.0))
    start = float(steps[0]["started"] if steps else 0.0)
    span = max(end - start, 0.1)
    plot_width = WIDTH - LEFT - RIGHT

    def x(moment: float) -> float:
        return LEFT + (min(max(moment, start), end) - start) / span * plot_width

    parts: list[str] = []
    top = 40
    mode = "with userbound" if report["mode"] == "userbound" else "without userbound"
    if report.get("logind") == "elogind":
        mode += " and real elogind"
    parts.append(
        f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">'
        f"userbound lab, {mode}: alice's tunnel on a shared machine</text>"
    )
    # Lanes: who is in front of seat0, and the tunnel's state.
    for row, (label, key, at) in enumerate(
        (("seat0", "seat0", "started"), ("tunnel", "state", "settled"))
    ):
        y = top + row * (LANE + 6)
        parts.append(_label(LEFT - 8, y + LANE / 2 + 4, label))
        for index, step in enumerate(steps):
            begin = step[at]
            finish = steps[index + 1][at] if index + 1 < len(steps) else end
            value = step[key]
            colour = COLOURS.get(value, "#babdb6")
            parts.append(
                f'<rect x="{x(begin):.1f}" y="{y}" width="{max(x(finish) - x(begin), 0.5):.1f}" '
                f'height="{LANE}" fill="{colour}" stroke="#ffffff"><title>{escape(value)}'
                "</title></rect>"
            )
            width = x(finish) - x(begin)
            label = value
            if width < _text_width(value) and value.endswith(" (locked)"):
                label = "locked"
            if width > _text_width(label):
                parts.append(
                    f'<text x="{x(begin) + 4:.1f}" y="{y + LANE / 2 + 4}" font-size="11">'
                    f"{escape(label)}</text>"
                )
    # Charts: packets per second of each user, at the private server and on the public side.
    rates = _rates(report["samples"])
    charts_top = top + 2 * (LANE + 6) + 14
    for row, (place, title) in enumerate(
        (("private", "private server"), ("public", "public side"))
    ):
        y0 = charts_top + row * (CHART + 24)
        peak = max([r[place].get(n, 0.0) for r in rates for n in USERS.values()] + [1.0])
        parts.append(_label(LEFT - 8, y0 + 12, title))
        parts.append(_label(LEFT - 8, y0 + 26, "packets/s", size=10))
        parts.append(_label(LEFT - 8, y0 + 40, f"max {peak:.0f}", size=10))
        parts.append(
            f'<rect x="{LEFT}" y="{y0}" width="{plot_width}" height="{CHART}" fill="none" '
            'stroke="#babdb6"/>'
        )
        for name, style in zip(USERS.values(), ("", ' stroke-dasharray="6,3"'), strict=True):
            # bob's line is dashed, so that it shows where both lie on zero.
            points = " ".join(
                f"{x(r['time']):.1f},{y0 + CHART - r[place].get(name, 0.0) / peak * CHART:.1f}"
                for r in rates
            )
            if points:
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="{COLOURS[name]}" '
                    f'stroke-width="2"{style}/>'
                )
        # Seconds since the start under each chart.
        for second in range(math.ceil(start), math.floor(end) + 1, 2):
            parts.append(
                f'<text x="{x(second):.1f}" y="{y0 + CHART + 12}" font-size="9" '
                f'text-anchor="middle">{second} s</text>'
            )
    bottom = charts_top + 2 * (CHART + 24) + 14
    # Step markers, numbered, with their titles below the charts.
    for number, step in enumerate(steps, 1):
        mark = x(step["started"])
        parts.append(
            f'<line x1="{mark:.1f}" y1="{top - 4}" x2="{mark:.1f}" y2="{bottom - 34}" '
            'stroke="#888a85" stroke-dasharray="3,3"/>'
        )
        parts.append(f'<text x="{mark + 2:.1f}" y="{top - 6}" font-size="10">{number}</text>')
        held = "✓" if step["held"] else "✗"
        parts.append(
            f'<text x="{LEFT}" y="{bottom + (number - 1) * 15}" font-size="12">'
            f"{number}. {held} {escape(step['title'])} ({step['started']:.1f} s)</text>"
        )
    # A key to the colours that appear.
    legend_y = bottom + len(steps) * 15 + 6
    shown = [*USERS.values()]
    shown += sorted({s["seat0"] for s in steps} - set(shown))
    shown += [state for state in COLOURS if any(s["state"] == state for s in steps)]
    legend_x = LEFT
    for name in dict.fromkeys(shown):
        if name not in COLOURS or name == "-":
            continue
        parts.append(
            f'<rect x="{legend_x}" y="{legend_y}" width="12" height="12" '
            f'fill="{COLOURS[name]}" stroke="#888a85"/>'
        )
        parts.append(
            f'<text x="{legend_x + 16}" y="{legend_y + 10}" font-size="12">{escape(name)}</text>'
        )
        legend_x += 16 + 7 * len(name) + 18
    height = legend_y + 30
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">\n'
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>\n{body}\n</svg>\n'
    )


def _text_width(text: str) -> float:
    """Return an estimate of the width of 11-pixel text, with a margin."""
    return 6.5 * len(text) + 6


def _label(x: float, y: float, text: str, size: int = 12) -> str:
    return f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="end">{escape(text)}</text>'


def _rates(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn cumulative counts into packets per second between consecutive samples."""
    rates = []
    for before, after in itertools.pairwise(samples):
        elapsed = after["time"] - before["time"]
        if elapsed <= 0:
            continue
        rates.append(
            {
                "time": after["time"],
                **{
                    place: {
                        name: (after[place].get(name, 0) - before[place].get(name, 0)) / elapsed
                        for name in USERS.values()
                    }
                    for place in ("private", "public")
                },
            }
        )
    return rates
