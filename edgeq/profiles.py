"""Device profiles: one strictly validated TOML file per target (see devices/README.md).

A profile says what a target can run: its runtime and the op versions that runtime registers,
its delegate/accelerator and which ops and precisions that takes, the default quantization
scheme and per-op precision policy (each with a reason and a source), and how edgeq reaches it.

Imports nothing heavy (stdlib only): `edgeq devices list` must stay instant.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ProfileError
from .precision import INT4_PRECISIONS, POLICY_PRECISIONS, PROFILE_IO_TYPES, IoType, Precision
# Runtime, RuntimeName, Int4Kernel and WEIGHT_ONLY_OP are part of a profile: importable from here too.
from .runtime_tables import WEIGHT_ONLY_OP, Int4Kernel, Runtime, RuntimeName, WrongKernel, runtime_table
from .toml_checks import SCHEMA_VERSION, Checker, read_toml

ENV_VAR = "EDGEQ_DEVICES_DIR"
_HERE = Path(__file__).resolve().parent
# The shipped profiles: an installed wheel carries them as edgeq/devices/ (pyproject.toml maps the
# top-level devices/ there at build time); a checkout or editable install reads that devices/ itself.
BUILTIN_DIR = next((d for d in (_HERE / "devices", _HERE.parent / "devices") if d.is_dir()), _HERE / "devices")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Kind(StrEnum):
    RASPBERRY_PI = "raspberry-pi"
    ANDROID = "android"
    EDGETPU = "edgetpu"
    HOST = "host"
    SBC = "sbc"  # any other single-board computer


class Abi(StrEnum):
    AARCH64 = "aarch64"
    ARMV7L = "armv7l"
    X86_64 = "x86_64"


class Delegate(StrEnum):
    XNNPACK = "xnnpack"
    GPU = "gpu"
    NNAPI = "nnapi"
    QNN = "qnn"
    EDGETPU = "edgetpu"
    NONE = "none"


# Delegates that hand ops to separate hardware; these profiles need an [accelerator] table.
ACCELERATOR_DELEGATES = frozenset({Delegate.GPU, Delegate.NNAPI, Delegate.QNN, Delegate.EDGETPU})


class Reach(StrEnum):
    SSH = "ssh"
    ADB = "adb"
    LOCAL = "local"


class Fallback(StrEnum):
    CPU = "cpu"  # ops the accelerator does not take run on the CPU (the graph splits)
    NONE = "none"  # no CPU fallback: such a model cannot run


@dataclass(frozen=True)
class IoTypes:
    input: IoType
    output: IoType


@dataclass(frozen=True)
class BenchDefaults:
    warmup: int
    runs: int


@dataclass(frozen=True)
class OpPolicy:
    op: str
    precision: Precision
    reason: str
    source: str


@dataclass(frozen=True)
class Accelerator:
    name: str
    precisions: tuple[Precision, ...]  # what it computes natively
    fallback: Fallback
    fallback_precision: Precision  # precision planned for ops it does not take
    supported_ops: frozenset[str]
    op_versions: Mapping[str, int]  # max op version it takes (ops not listed: any version)
    source: str
    min_coverage: float | None = None  # the adb runner fails below this delegated-node fraction
    memory_mb: float | None = None  # on-chip parameter memory (Edge TPU SRAM)
    # The Edge TPU compiler maps the graph only up to the first op it cannot take; that op and
    # everything after it run on the CPU.
    single_segment: bool = False

    def refuses(self, op: str, version: int) -> str | None:
        """Why the accelerator will not take this op (None when it does)."""
        if op not in self.supported_ops:
            return f"{self.name} does not support {op}"
        limit = self.op_versions.get(op)
        if limit is not None and version > limit:
            return f"{op} v{version} > {self.name} max v{limit}"
        return None


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    kind: Kind
    abi: Abi
    ram_mb: int
    runtime: Runtime
    delegate: Delegate
    threads: int
    io: IoTypes
    scheme: Precision
    reach: Reach
    bench: BenchDefaults
    path: Path
    soc: str = ""
    os: str = ""
    sources: tuple[str, ...] = ()
    notes: str = ""
    android_sdk: int | None = None
    ops: Mapping[str, OpPolicy] = field(default_factory=lambda: MappingProxyType({}))
    # Max builtin op versions the runtime registers (runtime table + profile overrides). When
    # op_versions_complete, an op missing here is not registered at all.
    op_versions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    op_versions_complete: bool = False
    op_versions_source: str = ""
    custom_ops: tuple[str, ...] = ()  # custom ops the runtime/delegate provides
    accelerator: Accelerator | None = None
    # int4 kernels of the runtime (its table's [int4]); int4_source empty: not known, not checked.
    int4_ops: Mapping[str, Int4Kernel] = field(default_factory=lambda: MappingProxyType({}))
    int4_source: str = ""
    # kernels of the runtime that cannot run a precision at the version the quantizer writes ([kernels])
    wrong_kernels: Mapping[str, WrongKernel] = field(default_factory=lambda: MappingProxyType({}))
    wrong_kernels_source: str = ""

    def kernel_refuses(self, op: str, precision: Precision) -> str | None:
        """Why the runtime's kernel cannot run `op` at `precision` although its version is registered
        (runtime table [kernels]; int4 through int4_refuses), or None."""
        kernel = self.wrong_kernels.get(op)
        if kernel is None or Precision(precision) not in kernel.wrong:
            return self.int4_refuses(op, precision)
        return f"{self.runtime.label}'s {op} kernel cannot run {precision} ({kernel.note})"

    def int4_refuses(self, op: str, precision: Precision) -> str | None:
        """Why the runtime cannot run `op` at this int4 precision (None: it can, the precision is not
        int4, or the runtime's int4 support is not known)."""
        if precision not in INT4_PRECISIONS or not self.int4_source:
            return None
        where = WEIGHT_ONLY_OP if precision is Precision.INT4_WEIGHT_ONLY else op
        kernel = self.int4_ops.get(where)
        if kernel is not None and precision in kernel.xnnpack_only and self.delegate is not Delegate.XNNPACK:
            return (f"{self.runtime.label} runs {precision} {op} correctly only through XNNPACK and "
                    f"{self.id} uses delegate {self.delegate} ({kernel.note})")
        if kernel is not None and precision in kernel.runs:
            return None
        what = f"{where} of int4 weights" if where != op else op
        why = f" ({kernel.note})" if kernel is not None and kernel.note else ""
        return f"{self.runtime.label} has no {precision} kernel for {what}{why}"

    def can_run(self, precision: Precision) -> bool:
        """True when the target computes `precision` where it runs the scheme (no graph split)."""
        if self.accelerator is None:
            return True  # the CPU runtimes run every precision edgeq plans
        return precision in self.accelerator.precisions

    def describe(self) -> str:
        """Human-readable text for `edgeq devices show`."""
        lines = [f"{self.id}: {self.name}",
                 f"  kind {self.kind}, abi {self.abi}, {self.ram_mb} MB RAM"
                 + (f", Android API {self.android_sdk}" if self.android_sdk else "")]
        if self.soc:
            lines.append(f"  soc: {self.soc}")
        if self.os:
            lines.append(f"  os: {self.os}")
        lines += [f"  runtime: {self.runtime.label} ({self.runtime.source})",
                  f"  delegate {self.delegate}, {self.threads} threads, scheme {self.scheme}, "
                  f"io {self.io.input} -> {self.io.output}, reached over {self.reach}, "
                  f"bench {self.bench.warmup} warmup + {self.bench.runs} runs"]
        a = self.accelerator
        if a is not None:
            extra = [f"falls back to the CPU at {a.fallback_precision}" if a.fallback is Fallback.CPU
                     else "no CPU fallback"]
            if a.single_segment:
                extra.append("one segment: ops after the first CPU op stay on the CPU")
            if a.memory_mb is not None:
                extra.append(f"{a.memory_mb:g} MB parameter memory")
            if a.min_coverage is not None:
                extra.append(f"needs >= {a.min_coverage:.0%} of ops delegated")
            lines += [f"  accelerator: {a.name}, runs {', '.join(a.precisions)}; {len(a.supported_ops)} ops; "
                      + "; ".join(extra), f"    source: {a.source}"]
        if self.op_versions_source:
            lines.append(f"  op versions: {len(self.op_versions)} ops "
                         f"({'complete' if self.op_versions_complete else 'partial'}) from {self.op_versions_source}")
        else:
            lines.append(f"  op versions: not known for {self.runtime.label} (not checked)")
        if self.int4_source:
            runs = "; ".join(f"{k.op} {', '.join(sorted(k.runs))}" for k in self.int4_ops.values() if k.runs)
            lines.append(f"  int4 kernels: {runs or 'none'} (from {self.int4_source})")
        if self.wrong_kernels:
            wrong = "; ".join(f"{k.op} {', '.join(sorted(k.wrong))}" for k in self.wrong_kernels.values())
            lines.append(f"  kernels that cannot run what the quantizer writes: {wrong} "
                         f"(from {self.wrong_kernels_source})")
        else:
            lines.append(f"  int4 kernels: not known for {self.runtime.label} (not checked)")
        if self.ops:
            lines.append("  per-op policy:")
            lines += [f"    {p.op} -> {p.precision}: {p.reason} [{p.source}]" for p in self.ops.values()]
        if self.custom_ops:
            lines.append(f"  custom ops provided: {', '.join(self.custom_ops)}")
        if self.sources:
            lines.append("  sources:")
            lines += [f"    - {s}" for s in self.sources]
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        lines.append(f"  file: {self.path}")
        return "\n".join(lines)

    def summary_row(self) -> dict[str, str]:
        """One row for `edgeq devices list`."""
        return {"id": self.id, "name": self.name, "kind": str(self.kind), "abi": str(self.abi),
                "runtime": self.runtime.label, "delegate": str(self.delegate),
                "scheme": str(self.scheme), "ram": f"{self.ram_mb} MB", "reach": str(self.reach)}

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "name": self.name, "kind": str(self.kind), "abi": str(self.abi),
            "soc": self.soc, "os": self.os, "ram_mb": self.ram_mb,
            "runtime": {"name": str(self.runtime.name), "version": self.runtime.version,
                        "source": self.runtime.source},
            "delegate": str(self.delegate), "threads": self.threads,
            "io": {"input": str(self.io.input), "output": str(self.io.output)},
            "scheme": str(self.scheme), "reach": str(self.reach),
            "bench": {"warmup": self.bench.warmup, "runs": self.bench.runs},
            "ops": {k: {"precision": str(p.precision), "reason": p.reason, "source": p.source}
                    for k, p in sorted(self.ops.items())},
            "op_versions": dict(sorted(self.op_versions.items())),
            "op_versions_complete": self.op_versions_complete,
            "op_versions_source": self.op_versions_source,
            "custom_ops": list(self.custom_ops), "sources": list(self.sources),
            "path": str(self.path),
            "int4": {"source": self.int4_source,
                     "ops": {k: {"runs": sorted(v.runs), "xnnpack_only": sorted(v.xnnpack_only), "note": v.note}
                             for k, v in sorted(self.int4_ops.items())}},
            "wrong_kernels": {"source": self.wrong_kernels_source,
                              "ops": {k: {"wrong": sorted(v.wrong), "note": v.note}
                                      for k, v in sorted(self.wrong_kernels.items())}},
        }
        if self.android_sdk is not None:
            d["android_sdk"] = self.android_sdk
        if self.notes:
            d["notes"] = self.notes
        if self.accelerator is not None:
            a = self.accelerator
            d["accelerator"] = {
                "name": a.name, "precisions": [str(p) for p in a.precisions],
                "fallback": str(a.fallback), "fallback_precision": str(a.fallback_precision),
                "supported_ops": sorted(a.supported_ops), "op_versions": dict(sorted(a.op_versions.items())),
                "min_coverage": a.min_coverage, "memory_mb": a.memory_mb, "single_segment": a.single_segment,
                "source": a.source}
        return d


# --------------------------------------------------------------------------------------------
# Search path


def profile_dirs(devices_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched, first wins: --devices-dir, then $EDGEQ_DEVICES_DIR (os.pathsep-
    separated), then the shipped profiles (BUILTIN_DIR: the checkout's devices/, or their copy
    inside an installed wheel). A user profile with a built-in id shadows the built-in one."""
    dirs: list[Path] = []
    if devices_dir is not None:
        d = Path(devices_dir)
        if not d.is_dir():
            raise ProfileError(f"{d}: --devices-dir is not a directory; pass a folder of <id>.toml profiles")
        dirs.append(d)
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            d = Path(part.strip())
            if not d.is_dir():
                raise ProfileError(f"{d}: {ENV_VAR} names a missing directory; fix or unset {ENV_VAR}")
            dirs.append(d)
    if BUILTIN_DIR.is_dir():
        dirs.append(BUILTIN_DIR)
    return dirs


def _profile_files(dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def list_profiles(devices_dir: str | os.PathLike | None = None) -> list[DeviceProfile]:
    """Every profile on the search path, validated, sorted by id. One bad file fails the listing
    (strict on purpose: a typo must not silently drop a device)."""
    dirs = profile_dirs(devices_dir)
    return [_load_file(p, dirs) for _, p in sorted(_profile_files(dirs).items())]


def load_profile(id_or_path: str | os.PathLike, devices_dir: str | os.PathLike | None = None) -> DeviceProfile:
    """Load a profile by id (searched on the path) or by a path to a .toml file."""
    dirs = profile_dirs(devices_dir)
    text = str(id_or_path)
    as_path = Path(text)
    if text.endswith(".toml") or os.sep in text:
        if not as_path.is_file():
            raise ProfileError(f"{as_path}: no such profile file; check the path")
        # Runtime tables next to the file come first (a user's own devices/ folder).
        return _load_file(as_path, [as_path.parent, *dirs])
    files = _profile_files(dirs)
    if text not in files:
        close = difflib.get_close_matches(text, list(files), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ProfileError(f"unknown device '{text}'; {hint}run 'edgeq devices list' for ids, "
                           f"or add {text}.toml to --devices-dir/{ENV_VAR} (see devices/README.md)")
    return _load_file(files[text], dirs)


# --------------------------------------------------------------------------------------------
# Strict validation


_TOP_REQUIRED = {"schema_version", "id", "name", "kind", "abi", "ram_mb", "runtime", "delegate",
                 "threads", "io", "scheme", "reach", "bench"}
_TOP_OPTIONAL = {"soc", "os", "sources", "notes", "android_sdk", "ops", "op_versions", "custom_ops",
                 "accelerator"}


def _load_file(path: Path, dirs: list[Path]) -> DeviceProfile:
    data = read_toml(path)
    c = Checker(path)
    c.schema_version(data, f"; this edgeq reads schema_version = {SCHEMA_VERSION} profiles")
    c.keys(data, "", _TOP_REQUIRED, _TOP_OPTIONAL)

    pid = c.str_(data, "id", "id")
    if pid != path.stem:
        raise c.fail("id", f"'{pid}' does not match the file name; rename the file to {pid}.toml "
                     f"or set id = \"{path.stem}\"")
    if not _ID_RE.match(pid):
        raise c.fail("id", f"'{pid}' must be lowercase letters, digits, '.', '-' or '_'")

    rt = c.table(data, "runtime", "runtime")
    c.keys(rt, "runtime", {"name", "version", "source"}, set())
    runtime = Runtime(c.enum(rt, "name", "runtime.name", RuntimeName),
                      c.str_(rt, "version", "runtime.version"), c.str_(rt, "source", "runtime.source"))

    io = c.table(data, "io", "io")
    c.keys(io, "io", {"input", "output"}, set())
    bench = c.table(data, "bench", "bench")
    c.keys(bench, "bench", {"warmup", "runs"}, set())

    scheme = c.enum(data, "scheme", "scheme", Precision, POLICY_PRECISIONS)
    delegate = c.enum(data, "delegate", "delegate", Delegate)

    accel = None
    if "accelerator" in data:
        accel = _accelerator(c, c.table(data, "accelerator", "accelerator"))
    if (delegate in ACCELERATOR_DELEGATES) != (accel is not None):
        need = "needs an [accelerator] table" if accel is None else "must not have an [accelerator] table"
        raise c.fail("accelerator", f"delegate = \"{delegate}\" {need}; see devices/README.md")
    if accel is not None and scheme not in accel.precisions:
        raise c.fail("scheme", f"{scheme} is not among [accelerator].precisions ({', '.join(accel.precisions)}); "
                     "the default scheme must run on the accelerator")

    ops: dict[str, OpPolicy] = {}
    for name, entry in c.table(data, "ops", "[ops]").items() if "ops" in data else ():
        key = f"[ops].{name}"
        c.op_name(name, key)
        if not isinstance(entry, dict):
            raise c.fail(key, "expected { precision = ..., reason = ..., source = ... }")
        c.keys(entry, key, {"precision", "reason", "source"}, set())
        prec = c.enum(entry, "precision", f"{key}.precision", Precision, POLICY_PRECISIONS)
        if accel is not None and accel.fallback is Fallback.NONE and prec not in accel.precisions:
            raise c.fail(f"{key}.precision", f"{accel.name} cannot run {prec} and has no CPU fallback; "
                         f"use one of {', '.join(accel.precisions)}")
        ops[name] = OpPolicy(name, prec, c.str_(entry, "reason", f"{key}.reason"),
                             c.str_(entry, "source", f"{key}.source"))

    overrides = c.op_versions(c.table(data, "op_versions", "[op_versions]"), "[op_versions]") \
        if "op_versions" in data else {}
    table, table_source, int4_ops, int4_source, wrong_kernels, wrong_source = runtime_table(runtime, dirs)
    versions = {**table, **overrides}
    if table_source and overrides:
        table_source += "; overridden in the profile: " + ", ".join(sorted(overrides))
    elif overrides:
        table_source = f"profile [op_versions] (partial; no table for {runtime.label})"

    sdk = None
    if "android_sdk" in data:
        sdk = c.int_(data, "android_sdk", "android_sdk", 21)

    return DeviceProfile(
        id=pid, name=c.str_(data, "name", "name"),
        kind=c.enum(data, "kind", "kind", Kind), abi=c.enum(data, "abi", "abi", Abi),
        ram_mb=c.int_(data, "ram_mb", "ram_mb", 1), runtime=runtime, delegate=delegate,
        threads=c.int_(data, "threads", "threads", 1),
        io=IoTypes(c.enum(io, "input", "io.input", IoType, PROFILE_IO_TYPES),
                   c.enum(io, "output", "io.output", IoType, PROFILE_IO_TYPES)),
        scheme=scheme, reach=c.enum(data, "reach", "reach", Reach),
        bench=BenchDefaults(c.int_(bench, "warmup", "bench.warmup", 0), c.int_(bench, "runs", "bench.runs", 1)),
        path=path.resolve(),
        soc=c.str_(data, "soc", "soc") if "soc" in data else "",
        os=c.str_(data, "os", "os") if "os" in data else "",
        sources=tuple(c.str_list(data, "sources", "sources")),
        notes=c.str_(data, "notes", "notes") if "notes" in data else "",
        android_sdk=sdk, ops=MappingProxyType(ops), op_versions=MappingProxyType(versions),
        op_versions_complete=bool(table), op_versions_source=table_source,
        custom_ops=tuple(c.str_list(data, "custom_ops", "custom_ops")), accelerator=accel,
        int4_ops=MappingProxyType(int4_ops), int4_source=int4_source,
        wrong_kernels=MappingProxyType(wrong_kernels), wrong_kernels_source=wrong_source)


def _accelerator(c: Checker, a: dict) -> Accelerator:
    c.keys(a, "accelerator", {"name", "precisions", "fallback", "fallback_precision", "supported_ops", "source"},
           {"op_versions", "min_coverage", "memory_mb", "single_segment"})
    precs = []
    for i, p in enumerate(a.get("precisions") if isinstance(a.get("precisions"), list) else [None]):
        precs.append(c.enum({"p": p}, "p", f"accelerator.precisions[{i}]", Precision, POLICY_PRECISIONS))
    ops = c.str_list(a, "supported_ops", "accelerator.supported_ops")
    if not ops:
        raise c.fail("accelerator.supported_ops", "empty; list the TFLite ops the accelerator takes")
    for name in ops:
        c.op_name(name, f"accelerator.supported_ops.{name}")
    versions = c.op_versions(c.table(a, "op_versions", "accelerator.op_versions"), "accelerator.op_versions") \
        if "op_versions" in a else {}
    for name in versions:
        if name not in ops:
            raise c.fail(f"accelerator.op_versions.{name}",
                         "op is not in supported_ops; add it there or drop this line")
    return Accelerator(
        name=c.str_(a, "name", "accelerator.name"), precisions=tuple(precs),
        fallback=c.enum(a, "fallback", "accelerator.fallback", Fallback),
        fallback_precision=c.enum(a, "fallback_precision", "accelerator.fallback_precision", Precision,
                                  POLICY_PRECISIONS),
        supported_ops=frozenset(ops), op_versions=MappingProxyType(versions),
        source=c.str_(a, "source", "accelerator.source"),
        min_coverage=c.num(a, "min_coverage", "accelerator.min_coverage", 0.0, 1.0) if "min_coverage" in a else None,
        memory_mb=c.num(a, "memory_mb", "accelerator.memory_mb", 0.0, 1e9) if "memory_mb" in a else None,
        single_segment=c.bool_(a, "single_segment", "accelerator.single_segment", False))

