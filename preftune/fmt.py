"""Numbers as people read them: the one place that turns a value into the text a person sees (the plan,
the report, the artifacts, the terminal). Templates reach it through the Jinja filters that
preftune/templating.py registers (`num`, `usd`, `rate`, `duration`); Python code calls it directly.

A float is shown with the precision it carries, never its repr (0.6640313809568231 → "0.664"), and a
small value keeps its significant digits instead of rounding to zero (a rate of 0.031/s → "0.031/s",
not "0.0"). Missing values (None, NaN) are an en dash.
"""

from __future__ import annotations

import math

MISSING = "–"


def missing(value: object) -> bool:
    """No value: None, NaN, or something that is not a number at all (e.g. a Jinja Undefined)."""
    if value is None or isinstance(value, bool):
        return value is None
    if not isinstance(value, int | float):
        return True
    return value != value  # NaN != NaN


def number(value: float | int | None, sig: int = 3, decimals: int | None = None) -> str:
    """`value` for a person: integers with thousands separators; floats to `sig` significant digits
    (trailing zeros dropped), or to `decimals` fixed places when given — unless that would print a
    non-zero value as zero, where its significant digits are shown instead (0.031 at 1 place → 0.03)."""
    if missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if decimals is not None:
        text = f"{value:,.{decimals}f}"
        if value == 0 or float(text.replace(",", "")) != 0:
            return text
        sig = min(sig, 2)  # a value below the fixed precision: its first digits say how small it is
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= sig - 1:  # 1234.5 at 3 digits: the integer part already carries them
        return f"{round(value):,}"
    places = sig - 1 - magnitude
    text = f"{value:,.{places}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def rate(value: float | None, unit: str = "/s", sig: int = 2) -> str:
    """A rate with the precision it carries: 3.14159 → "3.1/s", 0.0312 → "0.031/s", 1234.5 → "1,234/s"."""
    return MISSING if missing(value) else f"{number(value, sig=sig)}{unit}"


def usd(value: float | None) -> str:
    """Dollars: cents from a cent up, four places below it (token prices), "$0.00" for nothing."""
    if missing(value):
        return MISSING
    return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.4f}"


def duration(seconds: float | None) -> str:
    """A time span a person reads at a glance: "8 s", "2 min 05 s", "1 h 03 min"."""
    if missing(seconds):
        return MISSING
    s = max(0, round(seconds))
    if s < 60:
        return f"{number(seconds, sig=2)} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def percent(share: float | None) -> str:
    """A share of 1 as a whole percent ("42%"); a non-zero share under 1% keeps a digit ("0.4%")."""
    if missing(share):
        return MISSING
    return f"{number(100 * share, sig=1, decimals=0)}%"


def progress(done: int, total: int, what: str, elapsed_s: float) -> str:
    """One progress line: counts, rate and time left ("118/160 prompts paired, 3.1/s, ~14 s left")."""
    text = f"{done:,}/{total:,} {what}"
    if done <= 0 or elapsed_s <= 0:
        return text
    per_s = done / elapsed_s
    text += f", {rate(per_s)}"
    if done < total:
        text += f", ~{duration((total - done) / per_s)} left"
    return text


def cell(value: object) -> object:
    """A table cell for a person: floats formatted, everything else as it is (None → "–")."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return number(value)
    return value
