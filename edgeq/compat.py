"""Can this .tflite run on that device? Per-op answer from the device profile (no TensorFlow).

For every op: "ok" (runs at the target's scheme where the target runs it), "fallback" (runs, but
off the accelerator or at another precision, with the reason), or "unsupported" (the runtime
cannot run it at all: op not registered, op version newer than the runtime, unknown custom op).
Plus the model size against the device memory. Used by `edgeq devices check` and by convert
before writing (refuse unless --allow-incompatible).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import IncompatibleModelError
from .precision import INT4_PRECISIONS, RECIPE_PRECISION, Precision, slower_than_float_on_cpu
from .profiles import DeviceProfile, Fallback
from .tflite_model import BOUNDARY_OPS, read_model

# Default share of RAM a model file may take: the OS, the runtime, activations and the app need
# the rest. A rule of thumb, not a measurement; profiles can be copied with a different ram_mb.
MEMORY_BUDGET_FRACTION = 0.5
# Below this share of ops on an accelerator that sets no minimum of its own, convert warns: the model is
# mostly a CPU model there (EfficientNet-B0 from PyTorch: 0 % on the Edge TPU, its NCHW TRANSPOSE first).
LOW_COVERAGE = 0.5


class OpStatus(StrEnum):
    OK = "ok"
    FALLBACK = "fallback"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class OpCheck:
    index: int
    subgraph: int
    op: str
    version: int
    precision: Precision  # what the model computes: int8 | int16x8 | hybrid | float | other
    status: OpStatus
    placement: str  # "accelerator" | "cpu" | "-" (cannot run)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "subgraph": self.subgraph, "op": self.op, "version": self.version,
                "precision": str(self.precision), "status": str(self.status), "placement": self.placement,
                "reason": self.reason}


@dataclass(frozen=True)
class CompatReport:
    device: str
    runtime: str
    model: str
    size_bytes: int
    ram_mb: int
    memory_budget_bytes: int
    ops: tuple[OpCheck, ...]
    notes: tuple[str, ...]
    accelerator: str | None = None
    delegate_coverage: float | None = None  # fraction of non-boundary ops placed on the accelerator
    # what convert must say aloud, not only in the manifest: the accelerator takes too little of the model
    low_coverage: str = ""

    @property
    def unsupported(self) -> list[OpCheck]:
        return [o for o in self.ops if o.status is OpStatus.UNSUPPORTED]

    @property
    def fallbacks(self) -> list[OpCheck]:
        return [o for o in self.ops if o.status is OpStatus.FALLBACK]

    @property
    def fits_memory(self) -> bool:
        return self.size_bytes <= self.memory_budget_bytes

    @property
    def ok(self) -> bool:
        return not self.unsupported and self.fits_memory

    @property
    def summary(self) -> str:
        counts = {s: sum(1 for o in self.ops if o.status is s) for s in OpStatus}
        head = f"{self.device} ({self.runtime}): {'OK' if self.ok else 'NOT OK'}"
        parts = [f"{counts[OpStatus.OK]} ok, {counts[OpStatus.FALLBACK]} fallback, "
                 f"{counts[OpStatus.UNSUPPORTED]} unsupported of {len(self.ops)} ops"]
        if self.unsupported:
            first = self.unsupported[0].reason
            more = f" (+{len(self.unsupported) - 1} more)" if len(self.unsupported) > 1 else ""
            parts.append(f"cannot run: {first}{more}")
        if self.delegate_coverage is not None:
            parts.append(f"{self.delegate_coverage:.0%} on the {self.accelerator}")
        parts.append(f"model {_mb(self.size_bytes)} of {self.ram_mb} MB RAM"
                     + ("" if self.fits_memory else f" (over the {_mb(self.memory_budget_bytes)} budget)"))
        return f"{head} - " + "; ".join(parts)

    def describe(self) -> str:
        """Human-readable text for `edgeq devices check`: the summary, one line per op, the notes."""
        rows = [("#", "op", "ver", "precision", "status", "runs on", "reason")]
        rows += [(f"{o.subgraph}:{o.index}" if o.subgraph else str(o.index), o.op, f"v{o.version}", o.precision,
                  str(o.status), o.placement, o.reason) for o in self.ops]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = [self.summary, ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_incompatible(self, allow_incompatible: bool = False) -> None:
        """IncompatibleModelError with one actionable line, unless allowed or ok."""
        if self.ok or allow_incompatible:
            return
        if self.unsupported:
            what = ", ".join(o.reason for o in self.unsupported[:3])
            more = f" and {len(self.unsupported) - 3} more" if len(self.unsupported) > 3 else ""
            raise IncompatibleModelError(
                f"{self.model}: {len(self.unsupported)} op(s) cannot run on {self.device} ({what}{more}); "
                f"update the device runtime, pick a profile with a newer runtime, or pass --allow-incompatible")
        raise IncompatibleModelError(
            f"{self.model}: {_mb(self.size_bytes)} exceeds {self.device}'s budget of "
            f"{_mb(self.memory_budget_bytes)} ({MEMORY_BUDGET_FRACTION:.0%} of {self.ram_mb} MB RAM); "
            "use a smaller model or pass --allow-incompatible")

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "runtime": self.runtime, "model": self.model, "ok": self.ok,
                "summary": self.summary, "size_bytes": self.size_bytes, "ram_mb": self.ram_mb,
                "memory_budget_bytes": self.memory_budget_bytes, "fits_memory": self.fits_memory,
                "accelerator": self.accelerator, "delegate_coverage": self.delegate_coverage,
                "notes": list(self.notes), "ops": [o.to_json() for o in self.ops]}


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def check_model(model, profile: DeviceProfile, *, name: str | None = None) -> CompatReport:
    """Check a .tflite (path or bytes) against a device profile."""
    info = read_model(model)
    label = name or (str(model) if isinstance(model, (str, Path)) else "model")
    accel = profile.accelerator
    rt = profile.runtime.label
    notes: list[str] = []
    if not profile.op_versions_complete:
        notes.append(f"op versions not checked: no op-version table for {rt} "
                     "(add devices/runtimes/<runtime>-<version>.toml, see devices/README.md)")
    if not profile.int4_source and any(op.precision in INT4_PRECISIONS for op in info.ops):
        notes.append(f"int4 ops not checked: {rt} has no [int4] kernel table (add one to "
                     "devices/runtimes/<runtime>-<version>.toml, see devices/README.md)")

    checks: list[OpCheck] = []
    cut = False  # single-segment accelerator already left for the CPU
    for op in info.ops:
        precision = op.precision
        status, placement, reason = OpStatus.OK, "cpu", ""
        missing = _runtime_refuses(op, profile)
        if missing:
            status, placement, reason = OpStatus.UNSUPPORTED, "-", missing
        elif op.is_custom:
            placement = "accelerator" if accel is not None else "cpu"
            reason = f"custom op provided by {rt if accel is None else accel.name}"
        elif accel is not None:
            refused = accel.refuses(op.name, op.version)
            if refused is None and op.name == "QUANTIZE" and op.inputs and op.inputs[0].dtype.startswith("float"):
                refused = f"{accel.name} takes no float tensors: a float -> int8 QUANTIZE runs on the CPU"
            if refused is None and precision is not Precision.OTHER and precision not in accel.precisions:
                refused = f"{precision} op; {accel.name} runs {', '.join(accel.precisions)}"
            if refused is None and cut:
                refused = f"after the first op the {accel.name} does not take, the rest of the graph runs on the CPU"
            if refused:
                if accel.fallback is Fallback.NONE:
                    status, placement, reason = OpStatus.UNSUPPORTED, "-", f"{refused} and there is no CPU fallback"
                else:
                    status, reason = OpStatus.FALLBACK, f"runs on the CPU: {refused}"
                    if accel.single_segment and op.subgraph == 0 and not _is_io_boundary(op, info):
                        cut = True
            else:
                placement = "accelerator"
        if status is OpStatus.OK and not op.is_custom:
            where = f"the {accel.name}" if placement == "accelerator" else f"the CPU ({rt})"
            if not _matches_scheme(precision, profile.scheme):
                status, reason = OpStatus.FALLBACK, f"runs {precision} on {where}, not {profile.scheme}"
            else:  # an "other" op (an int8 -> int8 QUANTIZE, a SHAPE) has no precision to name
                reason = f"runs on {where}" if precision is Precision.OTHER else f"runs {precision} on {where}"
        checks.append(OpCheck(op.index, op.subgraph, op.name, op.version, precision, status, placement, reason))

    for prec in sorted({c.precision for c in checks if c.placement == "cpu"}, key=list(Precision).index):
        slow = slower_than_float_on_cpu(prec)
        if slow:
            notes.append(f"{sum(c.precision is prec and c.placement == 'cpu' for c in checks)} op(s) {slow}")

    coverage, low_coverage = None, ""
    if accel is not None:
        counted = [c for c in checks if c.op not in BOUNDARY_OPS and c.status is not OpStatus.UNSUPPORTED]
        if counted:
            coverage = sum(c.placement == "accelerator" for c in counted) / len(counted)
            first = next((c for c in counted if c.placement == "cpu" and "the rest of the graph" not in c.reason), None)
            where = f"; the first op it does not take: #{first.index} {first.op} ({first.reason})" if first else ""
            if accel.min_coverage is not None and coverage < accel.min_coverage:
                low_coverage = (f"only {coverage:.0%} of ops on the {accel.name} (profile asks "
                                f">= {accel.min_coverage:.0%}); the benchmark runner will refuse this model{where}")
                notes.append(low_coverage)
            elif coverage < LOW_COVERAGE:  # a profile without a minimum: 0 % on the Edge TPU read "graph splits"
                low_coverage = f"only {coverage:.0%} of ops on the {accel.name}: the rest run on the CPU{where}"
                notes.append(low_coverage)
            elif accel.single_segment and first is not None:  # a cut near the end is silent no more (HED)
                rest = sum(c.placement == "cpu" for c in counted) - 1
                low_coverage = (f"the {accel.name} graph stops at #{first.index} {first.op} ({first.reason}): it and "
                                f"the {rest} op(s) after it run on the CPU ({coverage:.0%} on the {accel.name})")
                notes.append(low_coverage)
        if profile.custom_ops and not any(op.is_custom for op in info.ops):
            notes.append(f"no {', '.join(profile.custom_ops)} in the model: not compiled for the {accel.name} yet; "
                         "placements show what its compiler would map, until then everything runs on the CPU")
        if accel.memory_mb is not None and info.size_bytes > accel.memory_mb * 2**20:
            notes.append(f"model {_mb(info.size_bytes)} > {accel.memory_mb:g} MB {accel.name} parameter memory: "
                         "weights that do not fit are streamed from host memory every inference")

    for io_name, tensors, want in (("input", info.inputs, profile.io.input),
                                   ("output", info.outputs, profile.io.output)):
        got = sorted({t.dtype for t in tensors})
        if got and got != [str(want)]:
            notes.append(f"target wants {want} {io_name}s; model has {', '.join(got)}")

    budget = int(profile.ram_mb * 2**20 * MEMORY_BUDGET_FRACTION)
    return CompatReport(profile.id, rt, label, info.size_bytes, profile.ram_mb, budget, tuple(checks),
                        tuple(notes), accel.name if accel else None, coverage, low_coverage)


def _matches_scheme(precision: Precision, scheme: Precision) -> bool:
    """The op computes what the scheme makes of it: fp16 models compute in float (float16 weights
    are dequantized), so float matches fp16."""
    return precision in (Precision.OTHER, scheme, RECIPE_PRECISION.get(scheme))


def missing_custom_ops(model, profile: DeviceProfile) -> list[str]:
    """The custom ops of `model` the profile's runtime does not provide (convert refuses them before any
    slow work: selfie segmentation's Convolution2DTransposeBias on rpi4 was named only after a floor
    refusal and a second full run with --no-floor)."""
    info = model if hasattr(model, "ops") else read_model(model)
    return sorted({op.name.split(":", 1)[1] for op in info.ops if op.is_custom} - set(profile.custom_ops))


def _runtime_refuses(op, profile: DeviceProfile) -> str | None:
    """Why the device runtime cannot run this op at all (None when it can, or when unknown)."""
    rt = profile.runtime.label
    if op.is_custom:
        code = op.name.split(":", 1)[1]
        if code in profile.custom_ops:
            return None
        return f"custom op '{code}' is not built into {rt}"
    if op.name.startswith("UNKNOWN_"):
        return f"{op.name}: builtin code unknown to this edgeq (model from a newer converter)"
    limit = profile.op_versions.get(op.name)
    if limit is None:
        return f"{op.name} is not registered in {rt}" if profile.op_versions_complete else None
    if op.version > limit:
        return f"{op.name} v{op.version} > {rt} max v{limit}"
    # The LiteRT quantizer keeps the float op's version (int8 SQRT at v1, int4 weights at v1), so the
    # version table cannot see what the kernel runs: the [kernels] and [int4] tables do.
    return profile.kernel_refuses(op.name, op.precision)


def _is_io_boundary(op, info) -> bool:
    """QUANTIZE of a model input / DEQUANTIZE of a model output: CPU-side conversions that do not
    cut a single-segment accelerator's graph."""
    if op.name not in BOUNDARY_OPS:
        return False
    ios = {t.index for t in info.inputs} | {t.index for t in info.outputs}
    return any(t.index in ios for t in (*op.inputs, *op.outputs))
