"""A size goal instead of a scheme (`--max-size 12MB`, issue 16): the most accurate candidate that fits.

The caller gives the candidates (default precision + per-op plan, e.g. int8 -> int4-b32 -> int4-b64 -> ...,
then mixes the budget loop builds) and a function that quantizes one and measures it; this module
only orders, stops, and says what it found. Stdlib only: the CLI parses sizes with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from .errors import QuantizationError

C = TypeVar("C")

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'12MB' / '12.5 MiB' / '900KB' / '4096' -> bytes (MB = 10^6, MiB = 2^20, as download sizes are shown)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise QuantizationError(f"--max-size {text!r}: expected a size such as 12MB, 800KB or 12.5MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def human_size(n: int) -> str:
    """Bytes as a person reads a download size: 12.95 MB, 58.3 KB, 900 B (MB = 10^6, as parse_size)."""
    if n >= 1000**2:
        return f"{n / 1000**2:.2f} MB"
    return f"{n / 1000:.1f} KB" if n >= 1000 else f"{n} B"


# After the 8-bit scheme, int4 weights from the most accurate (small blocks, more scales) to the
# smallest file (one scale per output channel). Dynamic int4: activations quantized at run time.
# int4-b64 is there for its rate: MiniLM's FCs at b64 instead of b128 bought +0.0016 cosine for
# 166 KB, more per byte than the 8-bit layers (+0.007 for 1.14 MB), at 2.65x float speed (b128 2.82x).
INT4_LADDER = ("int4-b32", "int4-b64", "int4-b128", "int4")


def size_candidates(scheme, io, *, fixed: bool):
    """The schemes --max-size tries, most accurate first: `scheme` alone when the user or a device
    profile fixed it (`fixed`), else `scheme` then the int4 ladder (those that can produce `io`)."""
    from .precision import SCHEME_IO, Scheme

    if fixed:
        return [scheme]
    return [scheme] + [s for s in map(Scheme, INT4_LADDER) if s is not scheme and io in SCHEME_IO[s]]


@dataclass(frozen=True)
class Measured(Generic[C]):
    candidate: C
    label: str
    size_bytes: int
    fidelity: float  # higher is better (cosine, top-1 agreement)
    model: bytes


@dataclass(frozen=True)
class SizeChoice(Generic[C]):
    chosen: Measured[C]
    tried: tuple[Measured[C], ...]  # in the order tried, the chosen one last

    def report(self) -> list[str]:
        """One line per candidate tried: label, size, fidelity, verdict."""
        return [f"{m.label}: {m.size_bytes / 1e6:.2f} MB, fidelity {m.fidelity:.4f}"
                + (" <- chosen" if m is self.chosen else "") for m in self.tried]


def choose_for_size(candidates: Sequence[tuple[str, C]], max_bytes: int,
                    measure: Callable[[C], tuple[bytes, float]], *, min_fidelity: float | None = None) -> SizeChoice[C]:
    """The first candidate (most accurate first) whose file fits `max_bytes` and, with
    `min_fidelity`, keeps it. QuantizationError naming the smallest size reached (and its fidelity)
    when none does."""
    if not candidates:
        raise ValueError("choose_for_size needs at least one candidate")
    tried: list[Measured[C]] = []
    for label, cand in candidates:
        model, fid = measure(cand)
        m = Measured(cand, label, len(model), fid, model)
        tried.append(m)
        if m.size_bytes <= max_bytes and (min_fidelity is None or fid >= min_fidelity):
            return SizeChoice(m, tuple(tried))
    fits = [m for m in tried if m.size_bytes <= max_bytes]
    smallest = min(tried, key=lambda m: m.size_bytes)
    if fits:  # fits, but below the fidelity floor
        best = max(fits, key=lambda m: m.fidelity)
        raise QuantizationError(
            f"--max-size {max_bytes / 1e6:.2f} MB: the plans that fit lose too much ({best.label}: fidelity "
            f"{best.fidelity:.4f} < {min_fidelity}); raise --max-size or lower the fidelity floor")
    raise QuantizationError(
        f"--max-size {max_bytes / 1e6:.2f} MB cannot be reached: the smallest plan tried ({smallest.label}) is "
        f"{smallest.size_bytes / 1e6:.2f} MB at fidelity {smallest.fidelity:.4f}; raise --max-size")


def spend_room(extra_bytes: Sequence[tuple[C, int]], room: int) -> list[C]:
    """Of (move, bytes it adds) in the order moves are wanted (most damaging layer first), those
    that fit in `room` bytes, taken greedily in that order (a move too big is skipped, smaller ones
    after it may still fit)."""
    chosen, used = [], 0
    for move, extra in extra_bytes:
        if used + extra <= room:
            chosen.append(move)
            used += extra
    return chosen
