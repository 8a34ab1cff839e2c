"""Runtime tables: what one runtime build registers, from devices/runtimes/<name>-<version>.toml.

A table lists the max builtin op version the runtime registers ([op_versions], complete: an op not
listed is not registered) and, when measured, its int4 kernels ([int4]) and the kernels that cannot run
a precision the LiteRT quantizer writes at a version they are registered for ([kernels]). Profiles name their runtime
and get the table attached (profiles.py); see devices/README.md for the format.

Imports nothing heavy (stdlib only): `edgeq devices list` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .precision import INT4_PRECISIONS, Precision
from .toml_checks import Checker, display, read_toml

RUNTIMES_SUBDIR = "runtimes"

# The op that holds an int4-weight-only weight in the file: a DEQUANTIZE feeds the float kernel.
WEIGHT_ONLY_OP = "DEQUANTIZE"


class RuntimeName(StrEnum):
    AI_EDGE_LITERT = "ai-edge-litert"
    TFLITE_RUNTIME = "tflite-runtime"


@dataclass(frozen=True)
class Runtime:
    name: RuntimeName
    version: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Int4Kernel:
    """One op's int4 kernels in a runtime (runtime table [int4.ops]): the int4 precisions it runs
    correctly, measured; `note` says what happens with the others (crash, refusal, wrong output)."""
    op: str
    runs: frozenset[Precision]
    note: str = ""
    # Of `runs`, the precisions that are right only through the XNNPACK delegate (the builtin kernel
    # computes something else); a profile whose delegate is not xnnpack cannot use them.
    xnnpack_only: frozenset[Precision] = frozenset()


@dataclass(frozen=True)
class WrongKernel:
    """An op whose kernel in a runtime cannot run some precisions the LiteRT quantizer writes (runtime
    table [kernels.ops]): the quantizer keeps the float model's op version (int8 SQRT at v1), so the
    version table cannot see that the runtime's kernel at that version refuses the dtype or computes
    something else. Measured; `note` says what happens."""
    op: str
    wrong: frozenset[Precision]
    note: str


def runtime_table(runtime: Runtime, dirs: list[Path]) -> tuple:
    """(op versions, their source, int4 kernels, their source, wrong kernels, their source) for this
    runtime from <dir>/runtimes/<name>-<version>.toml, first dir wins, or ({}, "", {}, "", {}, "")."""
    fname = f"{runtime.name}-{runtime.version}.toml"
    for d in dirs:
        p = d / RUNTIMES_SUBDIR / fname
        if p.is_file():
            return _load_runtime_table(p, runtime)
    return {}, "", {}, "", {}, ""


def _op_entries(c: Checker, t: dict, section: str, form: str, required: set, optional: set):
    """(op name, its key, its table) of [<section>.ops], each an op name and a table of those keys."""
    c.keys(t, section, {"source", "ops"}, set())
    for name, entry in c.table(t, "ops", f"{section}.ops").items():
        key = f"{section}.ops.{name}"
        c.op_name(name, key)
        if not isinstance(entry, dict):
            raise c.fail(key, f"expected {form}")
        c.keys(entry, key, required, optional)
        yield name, key, entry


def _kernels_table(c: Checker, t: dict) -> tuple[dict[str, WrongKernel], str]:
    """[kernels]: source = "...", [kernels.ops] OP = { wrong = [precisions], note = "..." }."""
    out = {}
    for name, key, entry in _op_entries(c, t, "kernels", '{ wrong = ["int8", ...], note = "..." }',
                                        {"wrong", "note"}, set()):
        v = entry["wrong"]
        if not isinstance(v, list) or not v:
            raise c.fail(f"{key}.wrong", "expected a non-empty list of precisions")
        wrong = frozenset(c.enum({"p": p}, "p", f"{key}.wrong[{i}]", Precision, list(Precision))
                          for i, p in enumerate(v))
        out[name] = WrongKernel(name, wrong, c.str_(entry, "note", f"{key}.note"))
    return out, c.str_(t, "source", "kernels.source")


def _int4_table(c: Checker, t: dict) -> tuple[dict[str, Int4Kernel], str]:
    """[int4]: source = "...", [int4.ops] OP = { runs = [int4 precisions], note = "..." }. An op not
    listed has no int4 kernel in the runtime."""
    kernels = {}
    for name, key, entry in _op_entries(c, t, "int4", '{ runs = ["int4", ...], note = "..." }',
                                        {"runs"}, {"note", "xnnpack_only"}):
        lists = {}
        for k in ("runs", "xnnpack_only"):
            v = entry.get(k, [])
            if not isinstance(v, list):
                raise c.fail(f"{key}.{k}", "expected a list of int4 precisions (may be empty)")
            lists[k] = frozenset(c.enum({"p": p}, "p", f"{key}.{k}[{i}]", Precision,
                                        [p for p in Precision if p in INT4_PRECISIONS]) for i, p in enumerate(v))
        if not lists["xnnpack_only"] <= lists["runs"]:
            raise c.fail(f"{key}.xnnpack_only", "must be a subset of runs")
        kernels[name] = Int4Kernel(name, lists["runs"], c.str_(entry, "note", f"{key}.note") if "note" in entry else "",
                                   lists["xnnpack_only"])
    return kernels, c.str_(t, "source", "int4.source")


def _load_runtime_table(path: Path, runtime: Runtime) -> tuple:
    data = read_toml(path)
    c = Checker(path)
    c.schema_version(data)
    c.keys(data, "", {"schema_version", "runtime", "version", "source", "op_versions"}, {"int4", "kernels"})
    if data["runtime"] != str(runtime.name) or data["version"] != runtime.version:
        raise c.fail("runtime", f"table is for {data['runtime']} {data['version']}, file name says "
                     f"{runtime.label}; rename the file or fix runtime/version")
    versions = c.op_versions(c.table(data, "op_versions", "[op_versions]"), "[op_versions]")
    int4, int4_source = _int4_table(c, c.table(data, "int4", "[int4]")) if "int4" in data else ({}, "")
    wrong, wrong_source = (_kernels_table(c, c.table(data, "kernels", "[kernels]")) if "kernels" in data
                           else ({}, ""))
    return (versions, f"{display(path)}: {c.str_(data, 'source', 'source')}", int4,
            f"{display(path)}: {int4_source}" if int4_source else "", wrong,
            f"{display(path)}: {wrong_source}" if wrong_source else "")
