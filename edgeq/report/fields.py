"""Tolerant field access and cell formatting: every input field but the schema may be missing or of
the wrong type, and then shows as "n/a" instead of failing the report."""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"


def get(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def nonempty_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def as_list(v: Any) -> list:
    return v if isinstance(v, list) else []


def num(v: Any) -> float | None:
    """A finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt_num(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    n = num(v)
    if n is None:
        return NA if v is None or isinstance(v, (int, float)) else str(v)
    return format(n, spec) + suffix


def fmt_ms(v: Any) -> str:
    """Milliseconds with useful precision from 3 µs (tiny models on a desktop) to seconds."""
    n = num(v)
    if n is None:
        return NA
    return f"{n:.0f}" if n >= 100 else f"{n:.2f}" if n >= 1 else f"{n:.3g}"


def fmt_bytes(v: Any) -> str:
    n = num(v)
    if n is None:
        return NA
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1048576:,.2f} MiB"


def text(v: Any) -> str:
    """Any value as cell text: missing -> n/a, an empty list -> an em dash, a list -> joined."""
    if v is None or v == "":
        return NA
    if isinstance(v, (list, tuple)):
        return ", ".join(text(x) for x in v) if v else "—"
    return str(v)
