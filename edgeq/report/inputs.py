"""The report's inputs: load manifests and bench/fleet results, tie each result to what it ran.

Files are told apart by their "schema" field (strict: anything else is an error naming the file).
Manifests are read and checked by `manifest.read_manifest`; bench and fleet results are taken as
they are, every field optional, because their writers evolve independently.

A bench result whose model_sha256 equals a manifest's output.sha256 ran that manifest's precision
(its "scheme"); one equal to source.sha256 or source.float_sha256 ran the float baseline of that
model. Speed-up is float median / converted median on the same device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import EdgeqError
from ..manifest import read_manifest
from .fields import NA, as_list, get, nonempty_str, num


class InputKind(str, Enum):
    MANIFEST = "edgeq.manifest/1"
    BENCH = "edgeq.bench/1"
    FLEET = "edgeq.fleet/1"


class RunRole(str, Enum):
    CONVERTED = "converted"  # matches a manifest's output: precision = its scheme
    FLOAT = "float"  # matches a manifest's source: the float baseline
    UNMATCHED = "unmatched"  # labelled by file name


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict

    @property
    def name(self) -> str:
        return Path(str(get(self.data, "output", "path") or self.path.name)).name

    @property
    def model(self) -> str:
        """The source model's file stem: what the user thinks of as "the model"."""
        src = get(self.data, "source", "path")
        return Path(str(src)).stem if src else Path(self.name).stem

    @property
    def scheme(self) -> str:
        return str(self.data.get("scheme") or NA)

    @property
    def output_sha(self) -> str | None:
        return nonempty_str(get(self.data, "output", "sha256"))

    @property
    def float_shas(self) -> set[str]:
        """Hashes of the float model: the source itself if it was a .tflite, and the float .tflite
        edgeq made from it (source.float_sha256), which `edgeq bench` can time as the baseline."""
        return {h for h in (nonempty_str(get(self.data, "source", k)) for k in ("sha256", "float_sha256")) if h}

    @property
    def sizes(self) -> tuple[float | None, float | None]:
        """(float bytes, quantized bytes), from "sizes" with output/source as fallback."""
        f = num(get(self.data, "sizes", "float_bytes")) or num(get(self.data, "source", "float_bytes"))
        q = num(get(self.data, "sizes", "quantized_bytes")) or num(get(self.data, "output", "bytes"))
        return f, q


@dataclass(frozen=True)
class Run:
    """One benchmark result (standalone, or a fleet entry's result) tied to what it ran."""

    path: Path
    data: dict
    device: str
    precision: str
    model: str
    role: RunRole
    manifest: Manifest | None

    @property
    def failed(self) -> bool:
        return "error" in self.data

    @property
    def timings(self) -> list[float]:
        return [v for v in (num(t) for t in as_list(self.data.get("timings_ms"))) if v is not None]

    @property
    def median(self) -> float | None:
        m = num(get(self.data, "runs", "median_ms"))
        if m is None and self.timings:
            import numpy as np

            m = float(np.median(self.timings))
        return m


@dataclass(frozen=True)
class SpeedUp:
    model: str
    precision: str
    device: str
    float_median_ms: float
    quant_median_ms: float
    speedup: float


@dataclass(frozen=True)
class Inputs:
    manifests: list[Manifest]
    runs: list[Run]
    fleets: list[tuple[Path, dict]]


def load_input(path: Path) -> tuple[InputKind, dict]:
    """Read one input file; raise EdgeqError naming it if it is not an edgeq JSON we know."""
    expected = ", ".join(k.value for k in InputKind)
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise EdgeqError(f"{path}: no such file; pass manifests (*.edgeq.json) and bench/fleet "
                         f"results saved with --json") from None
    except OSError as e:
        raise EdgeqError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeqError(f"{path}: not a JSON file; pass the .edgeq.json manifest or a result saved "
                         f"with --json, not the model itself") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise EdgeqError(f"{path}: JSON has no \"schema\" field; edgeq report reads {expected}")
    try:
        kind = InputKind(data["schema"])
    except ValueError:
        raise EdgeqError(f"{path}: unknown schema {data['schema']!r}; edgeq report reads {expected} "
                         f"(upgrade edgeq if the file is newer)") from None
    if kind is InputKind.MANIFEST:  # the manifest's owner checks its sections (one-line EdgeqError)
        data = read_manifest(path)
    return kind, data


def _device_label(b: dict, fleet_name: str | None = None) -> str:
    if fleet_name:
        label = fleet_name
    elif b.get("host"):
        label = str(b["host"])
    elif b.get("serial"):  # adb: the phone's model name reads better than its serial alone
        model = get(b, "device", "model")
        label = f"{model} ({b['serial']})" if model else str(b["serial"])
    else:
        runner = str(b.get("runner") or "local")
        machine = get(b, "device", "machine")
        label = f"{runner} ({machine})" if machine else runner
    return label + (" [emulated]" if b.get("emulated") else "")


def collect_inputs(inputs: list[Path]) -> Inputs:
    """Load every input and tie each bench result to the manifest whose model it ran."""
    manifests: list[Manifest] = []
    benches: list[tuple[Path, dict, str | None]] = []  # (file, result, fleet device name)
    fleets: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    for p in map(Path, inputs):
        if p.resolve() in seen:  # the same file twice would double its runs
            continue
        seen.add(p.resolve())
        kind, data = load_input(p)
        if kind is InputKind.MANIFEST:
            manifests.append(Manifest(p, data))
        elif kind is InputKind.BENCH:
            benches.append((p, data, None))
        else:
            fleets.append((p, data))
            for dev in as_list(data.get("devices")):
                if isinstance(dev, dict) and isinstance(dev.get("result"), dict):
                    benches.append((p, dev["result"], str(dev.get("name") or dev.get("host") or NA)))

    by_output = {m.output_sha: m for m in manifests if m.output_sha}
    by_source = {h: m for m in manifests for h in m.float_shas}
    many_models = len({m.model for m in manifests}) > 1
    runs: list[Run] = []
    labels: dict[tuple[str, str], int] = {}
    for path, b, fleet_name in benches:
        sha = nonempty_str(b.get("model_sha256"))
        if sha in by_output:
            m, role, prec = by_output[sha], RunRole.CONVERTED, by_output[sha].scheme
        elif sha in by_source:
            m, role, prec = by_source[sha], RunRole.FLOAT, "float"
        else:
            m, role, prec = None, RunRole.UNMATCHED, str(b.get("model") or path.name)
        model = m.model if m else Path(str(b.get("model") or path.name)).stem
        if many_models and m:
            prec = f"{model} · {prec}"
        device = _device_label(b, fleet_name)
        n = labels[(device, prec)] = labels.get((device, prec), 0) + 1
        if n > 1:  # keep repeated runs apart in charts and tables
            prec = f"{prec} #{n}"
        runs.append(Run(path, b, device, prec, model, role, m))
    return Inputs(manifests, runs, fleets)


def speedups(manifests: list[Manifest], runs: list[Run]) -> list[SpeedUp]:
    """Float median / converted median for each manifest on each device that ran both.

    When a cell was benched more than once, the first result given wins (input order)."""
    out = []
    for m in manifests:
        for r in runs:
            if r.manifest is not m or r.role is not RunRole.CONVERTED or r.failed or r.median is None:
                continue
            base = next((f for f in runs if f.role is RunRole.FLOAT and not f.failed and f.median
                         and f.device == r.device and f.data.get("model_sha256") in m.float_shas), None)
            if base is not None and r.median > 0:
                if any(s.device == r.device and s.model == m.name for s in out):
                    continue
                out.append(SpeedUp(m.name, m.scheme, r.device, base.median, r.median, base.median / r.median))
    return out
