"""`edgeq report`: turn manifests and bench/fleet results into one HTML page and a Markdown summary.

Inputs are JSON files told apart by their "schema" field (strict: anything else is an error naming
the file); inside them every field except the schema is optional and shows as "n/a" when missing,
because the writers of those files evolve independently.

The HTML is self-contained: inline CSS, charts as base64 PNG data URIs, no scripts, no URLs, so it
opens offline and can be mailed or attached to CI. The Markdown beside it (same stem, .md) carries the
same tables but no images, so it pastes cleanly into a PR or issue; the charts live in the HTML only.

Bench results are tied to manifests by hash: a result whose model_sha256 equals a manifest's
output.sha256 is that manifest's precision (its "scheme"); one equal to a manifest's source.sha256 is
the float baseline of that model. Speed-up is float median / quantized median on the same device.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EdgeqError, OutputExistsError

NA = "n/a"
MAX_LAYER_BARS = 30  # the worst layers; a 300-bar chart is unreadable
MAX_MD_LAYERS = 10


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
        return Path(str(_get(self.data, "output", "path") or self.path.name)).name

    @property
    def model(self) -> str:
        """The source model's file stem: what the user thinks of as "the model"."""
        src = _get(self.data, "source", "path")
        return Path(str(src)).stem if src else Path(self.name).stem

    @property
    def scheme(self) -> str:
        return str(self.data.get("scheme") or NA)

    @property
    def output_sha(self) -> str | None:
        return _str(_get(self.data, "output", "sha256"))

    @property
    def source_sha(self) -> str | None:
        return _str(_get(self.data, "source", "sha256"))

    @property
    def float_shas(self) -> set[str]:
        """Hashes of the float model: the source itself if it was a .tflite, and the float .tflite
        edgeq made from it (source.float_sha256), which `edgeq bench` can time as the baseline."""
        return {h for h in (self.source_sha, _str(_get(self.data, "source", "float_sha256"))) if h}

    @property
    def sizes(self) -> tuple[float | None, float | None]:
        """(float bytes, quantized bytes), from "sizes" with output/source as fallback."""
        f = _num(_get(self.data, "sizes", "float_bytes")) or _num(_get(self.data, "source", "float_bytes"))
        q = _num(_get(self.data, "sizes", "quantized_bytes")) or _num(_get(self.data, "output", "bytes"))
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
        return [v for v in (_num(t) for t in _list(self.data.get("timings_ms"))) if v is not None]

    @property
    def median(self) -> float | None:
        m = _num(_get(self.data, "runs", "median_ms"))
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
class ReportResult:
    html: Path
    markdown: Path
    manifests: int
    runs: int
    failed_runs: int
    fleets: int
    images: int
    speedups: tuple[SpeedUp, ...]

    def to_json(self) -> dict:
        return {"schema": "edgeq.report/1", "html": str(self.html), "markdown": str(self.markdown),
                "manifests": self.manifests, "runs": self.runs, "failed_runs": self.failed_runs,
                "fleets": self.fleets, "images": self.images,
                "speedups": [s.__dict__ for s in self.speedups]}


# ---------------------------------------------------------------- tolerant field access

def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    n = _num(v)
    if n is None:
        return NA if v is None or isinstance(v, (int, float)) else str(v)
    return format(n, spec) + suffix


def fmt_ms(v: Any) -> str:
    """Milliseconds with useful precision from 3 µs (tiny models on a desktop) to seconds."""
    n = _num(v)
    if n is None:
        return NA
    return f"{n:.0f}" if n >= 100 else f"{n:.2f}" if n >= 1 else f"{n:.3g}"


def _bytes(v: Any) -> str:
    n = _num(v)
    if n is None:
        return NA
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1048576:,.2f} MiB"


def _s(v: Any) -> str:
    if v is None or v == "":
        return NA
    if isinstance(v, (list, tuple)):
        return ", ".join(_s(x) for x in v) if v else "—"
    return str(v)


# ---------------------------------------------------------------- loading

def load_input(path: Path) -> tuple[InputKind, dict]:
    """Read one input file; raise EdgeqError naming it if it is not an edgeq JSON we know."""
    expected = ", ".join(k.value for k in InputKind)
    try:
        text = Path(path).read_bytes().decode("utf-8")
        data = json.loads(text)
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
        return InputKind(data["schema"]), data
    except ValueError:
        raise EdgeqError(f"{path}: unknown schema {data['schema']!r}; edgeq report reads {expected} "
                         f"(upgrade edgeq if the file is newer)") from None


def _device_label(b: dict, fleet_name: str | None = None) -> str:
    if fleet_name:
        label = fleet_name
    elif b.get("host"):
        label = str(b["host"])
    elif b.get("serial"):  # adb: the phone's model name reads better than its serial alone
        model = _get(b, "device", "model")
        label = f"{model} ({b['serial']})" if model else str(b["serial"])
    else:
        runner = str(b.get("runner") or "local")
        machine = _get(b, "device", "machine")
        label = f"{runner} ({machine})" if machine else runner
    return label + (" [emulated]" if b.get("emulated") else "")


def collect_inputs(inputs: list[Path]) -> tuple[list[Manifest], list[Run], list[tuple[Path, dict]]]:
    """Load every input and tie each bench result to the manifest whose model it ran."""
    manifests: list[Manifest] = []
    benches: list[tuple[Path, dict, str | None]] = []  # (file, result, fleet device name)
    fleets: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    for p in inputs:
        if Path(p).resolve() in seen:  # the same file twice would double its runs
            continue
        seen.add(Path(p).resolve())
        kind, data = load_input(Path(p))
        if kind is InputKind.MANIFEST:
            manifests.append(Manifest(Path(p), data))
        elif kind is InputKind.BENCH:
            benches.append((Path(p), data, None))
        else:
            fleets.append((Path(p), data))
            for dev in _list(data.get("devices")):
                if isinstance(dev, dict) and isinstance(dev.get("result"), dict):
                    benches.append((Path(p), dev["result"], str(dev.get("name") or dev.get("host") or NA)))

    by_output = {m.output_sha: m for m in manifests if m.output_sha}
    by_source = {h: m for m in manifests for h in m.float_shas}
    many_models = len({m.model for m in manifests}) > 1
    runs: list[Run] = []
    labels: dict[tuple[str, str], int] = {}
    for path, b, fleet_name in benches:
        sha = _str(b.get("model_sha256"))
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
    return manifests, runs, fleets


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


# ---------------------------------------------------------------- charts (matplotlib, lazily)

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no tool URL inside the file
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _color_for(precision: str, order: list[str]) -> str:
    """Float grey; converted precisions orange, green, ... in sorted order, the same in every report."""
    if precision.split(" #")[0].endswith("float"):
        return "#8c8c8c"
    converted = [p for p in order if not p.split(" #")[0].endswith("float")]
    return PALETTE[(converted.index(precision) + 1) % len(PALETTE)]


def latency_figure(runs: list[Run]):
    """Horizontal box plot of each run's timed inferences, median written beside each box.

    Returns (figure or None, [(run, median label)] in drawing order, top to bottom). Results without timings_ms are drawn from their
    summary (box = p5..p95, whiskers = min..max) so they still appear."""
    import numpy as np
    from matplotlib import cbook

    runs = [r for r in runs if not r.failed and (r.timings or r.median is not None)]
    runs.sort(key=lambda r: (r.device, r.role is not RunRole.FLOAT, r.precision))
    stats = []
    for r in runs:
        if r.timings:
            s = cbook.boxplot_stats(np.asarray(r.timings))[0]
        else:
            g = lambda k: _num(_get(r.data, "runs", k))  # noqa: E731
            med = r.median
            s = {"med": med, "q1": g("p5_ms") or med, "q3": g("p95_ms") or med,
                 "whislo": g("min_ms") or med, "whishi": g("max_ms") or med, "fliers": []}
        s["med"] = r.median  # the median the device reported is the one we print
        s["label"] = f"{r.device}\n{r.precision}"
        stats.append(s)
    precs = sorted({r.precision for r in runs})
    fig = _figure(9.5, 0.9 + 0.62 * max(len(runs), 1))
    ax = fig.add_subplot()
    texts: list[tuple[Run, str]] = []
    if not stats:
        return None, texts
    y = np.arange(1, len(stats) + 1)
    bp = ax.bxp(stats, positions=y, orientation="horizontal", widths=0.55, patch_artist=True,
                showfliers=True, flierprops={"markersize": 2, "alpha": 0.4},
                medianprops={"color": "black", "linewidth": 1.6})
    rng = np.random.default_rng(0)  # jitter only; fixed so the picture is reproducible
    hi = max(max(s["whishi"], max(s["fliers"], default=0)) for s in stats)
    for yi, r, s, box in zip(y, runs, stats, bp["boxes"]):
        color = _color_for(r.precision, precs)
        box.set_facecolor(color)
        box.set_alpha(0.75)
        if r.timings:
            ax.scatter(r.timings, yi + rng.uniform(-0.18, 0.18, len(r.timings)), s=3, color="black",
                       alpha=0.25, linewidths=0, zorder=3)
        label = f"median {fmt_ms(s['med'])} ms"
        texts.append((r, label))
        ax.annotate(label, (max(s["whishi"], max(s["fliers"], default=0)), yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=9, fontweight="bold")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(facecolor=_color_for(p, precs), alpha=0.75, label=p) for p in precs],
               loc="outside upper right", ncols=min(len(precs), 4), fontsize=9, frameon=False)
    ax.invert_yaxis()  # first device at the top, like the tables
    lo = min(min(s["whislo"], min(s["fliers"], default=s["whislo"])) for s in stats)
    if lo > 0 and hi / lo > 20:  # a desktop and a Pi on one linear axis squash the fast boxes flat
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 4)
    else:
        ax.set_xlim(0, (hi * 1.3) or 1.0)
    ax.set_xlabel("inference latency (ms), timed runs")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Latency per device and precision", loc="left", fontsize=12)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, texts


def layer_error_figure(m: Manifest):
    """Bar chart of per-layer error (rmse / quantization scale when known, else rmse), worst first."""
    rows = [r for r in _list(_get(m.data, "fidelity", "per_layer")) if isinstance(r, dict)]
    key = "rmse_over_scale" if any(_num(r.get("rmse_over_scale")) is not None for r in rows) else "rmse"
    rows = [r for r in rows if _num(r.get(key)) is not None]
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: -_num(r[key]))[:MAX_LAYER_BARS]
    names = [(str(r.get("tensor") or NA))[-42:] for r in rows]
    vals = [_num(r[key]) for r in rows]
    fig = _figure(9.5, 0.9 + 0.3 * len(rows))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    top = max(vals) or 1.0
    ax.barh(y, vals, color=PALETTE[0], height=0.7)
    for yi, v in zip(y, vals):
        ax.annotate(f"{v:.3g}", (v, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("RMSE / output scale (LSBs)" if key == "rmse_over_scale" else "RMSE vs float")
    ax.set_title(f"Per-layer error, {m.name} (worst {len(rows)})", loc="left", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def speed_size_figure(manifests: list[Manifest], sps: list[SpeedUp]):
    """Left: model size float vs converted. Right: speed-up per device (× over float)."""
    sized = [(m, *m.sizes) for m in manifests if all(v for v in m.sizes)]
    if not sized and not sps:
        return None
    fig = _figure(9.5, 0.9 + 0.45 * max(len(sized), len(sps), 3))
    panels = fig.subplots(1, 2 if sized and sps else 1, squeeze=False)[0]
    if sized:
        ax = panels[0]
        y = list(range(len(sized)))
        fb = [f / 1024 for _, f, _ in sized]
        qb = [q / 1024 for _, _, q in sized]
        ax.barh([v - 0.2 for v in y], fb, height=0.38, color="#8c8c8c", label="float")
        ax.barh([v + 0.2 for v in y], qb, height=0.38, color=PALETTE[1], label="converted")
        for yi, (m, f, q) in zip(y, sized):
            ax.annotate(f"{f / q:.2f}× smaller", (q / 1024, yi + 0.2), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8, fontweight="bold")
        ax.set_yticks(y, [m.name for m, _, _ in sized], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(fb + qb) * 1.45)
        ax.set_xlabel("model size (KiB)")
        ax.legend(fontsize=8, loc="lower right", frameon=False)
        ax.set_title("Size", loc="left", fontsize=12)
    if sps:
        ax = panels[-1]
        y = list(range(len(sps)))
        vals = [s.speedup for s in sps]
        ax.barh(y, vals, height=0.6, color=[PALETTE[2] if v >= 1 else PALETTE[3] for v in vals])
        for yi, v in zip(y, vals):
            ax.annotate(f"{v:.2f}×", (v, yi), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=9, fontweight="bold")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(y, [f"{s.device}\n{s.model}" for s in sps], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(vals + [1.0]) * 1.3)
        ax.set_xlabel("speed-up over float (median latency ratio)")
        ax.set_title("Speed-up", loc="left", fontsize=12)
    for ax in panels:
        ax.grid(axis="x", alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig


# ---------------------------------------------------------------- document model
# Sections are built once as (heading, blocks) and rendered to both HTML and Markdown, so the two
# outputs cannot drift apart. A block is ("p", text) | ("table", headers, rows) | ("img", b64, alt).


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple
    level: int = 2


def _kv(rows: list[tuple[str, Any]]):
    return ("table", ("field", "value"), [(k, _s(v)) for k, v in rows])


def _io_row(t: dict) -> str:
    q = ""
    if t.get("scale") is not None:
        q = f" scale={_fmt(t.get('scale'), '.4g')} zp={_s(t.get('zero_point'))}"
    shape = t.get("shape")
    shape_s = "×".join(str(x) for x in shape) if isinstance(shape, list) else _s(shape)
    return f"{_s(t.get('name'))}: {_s(t.get('dtype'))} [{shape_s}]{q}"


def _manifest_sections(m: Manifest) -> list[Section]:
    d = m.data
    cal = d.get("calibration") if isinstance(d.get("calibration"), dict) else {}
    f, q = m.sizes
    info = [
        ("manifest", m.path.name), ("created", d.get("created")),
        ("output", _get(d, "output", "path")), ("output size", _bytes(_get(d, "output", "bytes"))),
        ("output sha256", str(_get(d, "output", "sha256") or NA)[:16]),
        ("source", _get(d, "source", "path")), ("source format", _get(d, "source", "format")),
        ("float size", _bytes(f)), ("scheme", d.get("scheme")), ("device profile", d.get("device")),
        ("size ratio", f"{f / q:.2f}× smaller" if f and q else NA),
        ("calibration", ", ".join(f"{k}={_s(cal.get(k))}" for k in
                                  ("kind", "source", "count", "seed", "range_method") if k in cal) or NA),
        ("inputs", "; ".join(_io_row(t) for t in _list(_get(d, "io", "inputs")) if isinstance(t, dict)) or NA),
        ("outputs", "; ".join(_io_row(t) for t in _list(_get(d, "io", "outputs")) if isinstance(t, dict)) or NA),
    ]
    summ = d.get("op_summary")
    if isinstance(summ, dict):
        info.append(("ops by precision", ", ".join(f"{k}: {_s(v)}" for k, v in summ.items())))
    warns = [str(w) for w in _list(d.get("warnings"))]
    out = [Section(f"Model: {m.name} ({m.scheme})",
                   (_kv(info),) + tuple(("p", f"Warning: {w}") for w in warns))]

    plan_d = d.get("plan") if isinstance(d.get("plan"), dict) else {}  # edgeq convert: {"ops": [...], ...}
    plan = [r for r in _list(plan_d.get("ops") if plan_d else d.get("plan")) if isinstance(r, dict)]
    if plan:
        heads = ("#", "op", "output tensor", "precision", "reason", "decided by")
        placed = bool(plan_d.get("accelerator"))  # CPU vs accelerator only matters when there is one
        rows = [(_s(r.get("index")), _s(r.get("op")), _s(r.get("output")), _s(r.get("precision")),
                 _s(r.get("reason")), _s(r.get("source"))) + ((_s(r.get("placement")),) if placed else ())
                for r in plan]
        blocks = [("table", heads + (("placement",) if placed else ()), rows)]
        if plan_d.get("summary"):
            blocks.insert(0, ("p", f"{plan_d['summary']}" + (f" (target: {_s(plan_d.get('device'))}, "
                                                             f"accelerator {plan_d['accelerator']})" if placed else "")))
    else:
        blocks = [("p", "No precision plan recorded (the converter applied one scheme to every op).")]
    out.append(Section("Precision plan", tuple(blocks), 3))

    budget = d.get("budget")
    if isinstance(budget, dict):
        steps = [s for s in _list(budget.get("steps")) if isinstance(s, dict)]
        met = {"True": "met", "False": "NOT met"}.get(str(budget.get("met")), NA)
        final = budget.get("final_drop")
        blocks = [("p", f"Budget: max {_s(budget.get('metric'))} drop {_s(budget.get('max_drop'))} — {met}"
                        + (f" (final drop {_fmt(final, '.4f')})." if _num(final) is not None else "."))]
        metric = _s(budget.get("metric"))
        if steps:
            blocks.append(("table", ("step", "moved", metric, "drop", "size"),
                           [(_s(s.get("step")), _s(s.get("moved")),
                             _fmt(next((s[k] for k in ("value", metric, "cosine") if k in s), None), ".4f"),
                             _fmt(s.get("drop"), ".4f"), _bytes(s.get("bytes"))) for s in steps]))
        refused = [str(x) for x in _list(budget.get("refused"))]
        if refused:
            blocks.append(("p", "Could not move (device constraints): " + "; ".join(refused)))
        out.append(Section("Accuracy budget", tuple(blocks), 3))

    fid = d.get("fidelity") if isinstance(d.get("fidelity"), dict) else {}
    blocks = []
    outs = [o for o in _list(fid.get("outputs")) if isinstance(o, dict)]
    if outs:
        blocks.append(("p", f"Compared with the float model on {_s(fid.get('samples'))} samples."))
        blocks.append(("table", ("output", "cosine", "rel. L2", "max abs", "top-1 agreement"),
                       [(_s(o.get("name")), _fmt(o.get("cosine"), ".4f"), _fmt(o.get("rel_l2"), ".4f"),
                         _fmt(o.get("max_abs"), ".4g"), _fmt(o.get("top1_agreement"), ".3f")) for o in outs]))
    else:
        blocks.append(("p", "No fidelity measured (convert with calibration data to get it)."))
    fig = layer_error_figure(m)
    if fig is not None:
        layers = sorted((r for r in _list(fid.get("per_layer")) if isinstance(r, dict)),
                        key=lambda r: -(_num(r.get("rmse_over_scale")) or _num(r.get("rmse")) or 0))
        blocks.append(("img", _png(fig), f"Per-layer error bar chart for {m.name}"))
        blocks.append(("table", ("tensor", "op", "rmse", "scale", "rmse / scale"),
                       [(_s(r.get("tensor")), _s(r.get("op")), _fmt(r.get("rmse"), ".4g"),
                         _fmt(r.get("scale"), ".4g"), _fmt(r.get("rmse_over_scale"), ".3f"))
                        for r in layers[:MAX_MD_LAYERS]], "md-only"))
    out.append(Section("Fidelity", tuple(blocks), 3))
    return out


def _run_row(r: Run) -> tuple:
    d = r.data
    cov = d.get("delegate_coverage")
    cov_s = f" ({_s(cov.get('delegated'))}/{_s(cov.get('total'))} ops)" if isinstance(cov, dict) else ""
    rt = _get(d, "runtime", "name")
    rt_s = f"{rt} {_s(_get(d, 'runtime', 'version'))}" if rt else NA
    extra = []
    if d.get("governor"):
        extra.append(str(d["governor"]))
    if _num(d.get("temperature_c")) is not None:
        extra.append(f"{d['temperature_c']:.0f} °C")
    return (r.device, r.precision, f"{_s(d.get('runner') or 'local')} · {rt_s}",
            f"{_s(d.get('threads'))} · {_s(d.get('delegate'))}{cov_s}",
            _s(_get(d, "runs", "count")), fmt_ms(r.median), fmt_ms(_get(d, "runs", "p95_ms")),
            f"{fmt_ms(_get(d, 'runs', 'mean_ms'))} ± {fmt_ms(_get(d, 'runs', 'std_ms'))}",
            _fmt(d.get("init_ms"), ".1f"), _fmt(_get(d, "memory_mb", "peak_rss"), ".1f"),
            ", ".join(extra) or NA)


RUN_HEADERS = ("device", "precision", "runner · runtime", "threads · delegate",
               "runs", "median ms", "p95 ms", "mean ± std ms", "init ms", "peak RSS MB", "governor, temp.")


def _latency_sections(manifests, runs: list[Run], sps: list[SpeedUp]) -> list[Section]:
    ok = [r for r in runs if not r.failed]
    out = []
    blocks: list = []
    if ok:
        fig, labels = latency_figure(ok)
        if fig is not None:  # the alt text repeats the drawn medians for screen readers and tests
            alt = "Latency box plot; " + "; ".join(f"{r.device} {r.precision}: {t}" for r, t in labels)
            blocks.append(("img", _png(fig), alt))
        blocks.append(("table", RUN_HEADERS, [_run_row(r) for r in ok]))
    else:
        blocks.append(("p", "No benchmark results given (add edgeq bench/profile --json output)."))
    out.append(Section("Latency", tuple(blocks)))

    blocks = []
    fig = speed_size_figure(manifests, sps)
    if fig is not None:
        blocks.append(("img", _png(fig), "Size and speed-up chart"))
    sized = [m for m in manifests if all(m.sizes)]
    if sized:
        blocks.append(("table", ("model", "scheme", "float size", "converted size", "size ratio"),
                       [(m.name, m.scheme, _bytes(m.sizes[0]), _bytes(m.sizes[1]),
                         f"{m.sizes[0] / m.sizes[1]:.2f}×") for m in sized]))
    if sps:
        blocks.append(("table", ("device", "model", "precision", "float median ms", "converted median ms",
                                 "speed-up"),
                       [(s.device, s.model, s.precision, fmt_ms(s.float_median_ms),
                         fmt_ms(s.quant_median_ms), f"{s.speedup:.2f}×") for s in sps]))
    else:
        blocks.append(("p", "No speed-up: it needs the float model benched on the same device as a "
                            "converted one (bench the float .tflite that the manifest names as source)."))
    out.append(Section("Speed-up and size (float vs converted)", tuple(blocks)))
    return out


def _fleet_sections(fleets, runs: list[Run]) -> list[Section]:
    out = []
    for path, f in fleets:
        rows = []
        for dev in _list(f.get("devices")):
            if not isinstance(dev, dict):
                continue
            res = dev.get("result") if isinstance(dev.get("result"), dict) else {}
            run = next((r for r in runs if r.data is res), None)
            err = dev.get("error") or res.get("error")
            rows.append((_s(dev.get("name")), _s(dev.get("host")), _s(dev.get("profile")),
                         _s(dev.get("status")), run.precision if run else NA,
                         fmt_ms(_get(res, "runs", "median_ms")), fmt_ms(_get(res, "runs", "p95_ms")),
                         _s(_get(res, "device", "cpu_model")),
                         f"{_s(_get(res, 'runtime', 'name'))} {_s(_get(res, 'runtime', 'version'))}"
                         if res.get("runtime") else NA, _s(err) if err else "—"))
        ok = sum(1 for r in rows if r[3] == "ok")
        model = f.get("model") or next((r.data.get("model") for r in runs if r.path == path
                                        and r.data.get("model")), None) or path.name
        blocks = (("p", f"{path.name}: model {_s(model)}, {ok} of {len(rows)} devices ok."),
                  ("table", ("device", "host", "profile", "status", "precision", "median ms", "p95 ms",
                             "CPU", "runtime", "error"), rows))
        out.append(Section(f"Fleet: {_s(model)}", blocks))
    return out


def _failed_section(runs: list[Run]) -> list[Section]:
    bad = [r for r in runs if r.failed]
    if not bad:
        return []
    return [Section("Failed runs", (("table", ("device", "file", "kind", "error"),
                                     [(r.device, r.path.name, _s(r.data.get("kind")), _s(r.data.get("error")))
                                      for r in bad]),))]


def _versions_section(manifests, runs: list[Run]) -> Section:
    seen: dict[tuple[str, str], list[str]] = {}

    def add(comp, ver, where):
        if comp and ver:
            seen.setdefault((str(comp), str(ver)), [])
            if where not in seen[(str(comp), str(ver))]:
                seen[(str(comp), str(ver))].append(where)

    add("edgeq (this report)", __version__, "report")
    for m in manifests:
        v = m.data.get("versions")
        for comp, ver in (v.items() if isinstance(v, dict) else []):
            add(comp, ver, f"convert: {m.name}")
        add("edgeq", m.data.get("edgeq_version"), f"convert: {m.name}")
    for r in runs:
        if r.failed:
            continue
        add(_get(r.data, "runtime", "name"), _get(r.data, "runtime", "version"), r.device)
        for k in ("python", "numpy"):
            add(f"{k} (device)", _get(r.data, "device", k), r.device)
        dev = r.data.get("device") if isinstance(r.data.get("device"), dict) else {}
        if dev.get("system"):
            rel = dev.get("release") or dev.get("android_release")
            add("os (device)", f"{dev.get('system')} {_s(rel)} {_s(dev.get('machine'))}", r.device)
    rows = [(c, v, ", ".join(w)) for (c, v), w in sorted(seen.items())]
    return Section("Tool and runtime versions", (("table", ("component", "version", "where"), rows),))


# ---------------------------------------------------------------- rendering

CSS = """
body{font:15px/1.45 "DejaVu Sans","Liberation Sans",Helvetica,Arial,sans-serif;color:#1d2330;
 background:#f4f6f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #4c78a8}h3{font-size:16px;margin:22px 0 8px;color:#33415c}
.sub{color:#5c667a;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 6px}
.card{flex:1 1 160px;background:#eef3fa;border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:22px;color:#1f4e89}.card span{font-size:12px;color:#5c667a}
table{border-collapse:collapse;width:100%;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d9dee7;padding:4px 7px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#e6ebf3;white-space:nowrap}.tw{overflow-x:auto}tr:nth-child(even) td{background:#f8f9fb}
img{max-width:100%;height:auto;display:block;margin:10px 0;border:1px solid #e3e6ec;border-radius:6px}
.model{border-left:4px solid #f58518;padding-left:14px;margin-top:10px}
footer{margin-top:36px;color:#8a93a3;font-size:12px}
"""


def _html_block(b) -> str:
    e = html.escape
    if b[0] == "p":
        return f"<p>{e(b[1])}</p>"
    if b[0] == "img":
        return f'<img src="data:image/png;base64,{b[1]}" alt="{e(b[2])}">'
    if len(b) > 3 and b[3] == "md-only":  # the chart shows it in HTML
        return ""
    head = "".join(f"<th>{e(h)}</th>" for h in b[1])
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
    return f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _md_text(v: Any) -> str:
    # Markdown renderers pass raw HTML through, and names/reasons come from input files
    return str(v).replace("<", "&lt;")


def _md_cell(v: Any) -> str:
    return _md_text(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(b) -> str:
    if b[0] == "p":
        return _md_text(b[1])
    if b[0] == "img":
        return f"*Chart in the HTML report: {_md_text(b[2])}.*"
    lines = ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
    return "\n".join(lines)


def _cards(manifests, runs, sps) -> list[tuple[str, str]]:
    cards = [(str(len(manifests)), "converted models"),
             (str(len({r.device for r in runs if not r.failed})), "devices benched")]
    if sps:
        best = max(sps, key=lambda s: s.speedup)
        cards.append((f"{best.speedup:.2f}×", f"best speed-up ({best.device}, {best.precision})"))
    sized = [m.sizes[0] / m.sizes[1] for m in manifests if all(m.sizes)]
    if sized:
        cards.append((f"{max(sized):.2f}×", "smaller than float"))
    fids = [_num(o.get("cosine")) for m in manifests
            for o in _list(_get(m.data, "fidelity", "outputs")) if isinstance(o, dict)]
    if [c for c in fids if c is not None]:
        cards.append((f"{min(c for c in fids if c is not None):.4f}", "worst output cosine"))
    return cards


def _atomic_write(path: Path, text: str) -> Path:
    """Write to a temp file beside `path`; the caller os.replace()s it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(tmp)


def build_report(inputs: list[Path], out_html: Path, *, title: str | None = None,
                 force: bool = False) -> ReportResult:
    """Write OUT.html (self-contained) and OUT.md (same stem) from manifests and run results.

    An existing report is replaced only with `force`; an input file never is."""
    out_html = Path(out_html)
    out_md = out_html.with_suffix(".md")
    if not inputs:
        raise EdgeqError("no inputs; pass manifests (*.edgeq.json) and bench/fleet results (--json)")
    if out_html.suffix.lower() not in (".html", ".htm"):
        raise EdgeqError(f"{out_html}: the report must end in .html (the Markdown summary goes beside it)")
    if not out_html.parent.is_dir():
        raise EdgeqError(f"{out_html.parent}: directory does not exist; create it or choose another -o")
    ins = {Path(p).resolve() for p in inputs}
    for o in (out_html, out_md):
        if o.resolve() in ins:
            raise OutputExistsError(f"{o}: is one of the inputs; choose another -o")
        if o.exists() and not force:
            raise OutputExistsError(f"{o} exists; pass --force to overwrite it or choose another -o")

    manifests, runs, fleets = collect_inputs([Path(p) for p in inputs])
    sps = speedups(manifests, runs)
    sections: list[Section] = []
    for m in manifests:
        sections += _manifest_sections(m)
    sections += _latency_sections(manifests, runs, sps)
    sections += _fleet_sections(fleets, runs)
    sections += _failed_section(runs)
    sections.append(_versions_section(manifests, runs))

    models = sorted({m.name for m in manifests} or {_s(r.data.get("model")) for r in runs})
    title = title or f"edgeq report: {', '.join(models) or 'benchmarks'}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = (f"Generated {now} by edgeq {__version__} from {len(ins)} input file(s): "
           f"{len(manifests)} manifest(s), {len(runs)} run(s), {len(fleets)} fleet result(s).")
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><main><h1>{e(title)}</h1><p class=\"sub\">{e(sub)}</p>",
             '<div class="cards">' + "".join(f"<div class=\"card\"><b>{e(v)}</b><span>{e(k)}</span></div>"
                                            for v, k in _cards(manifests, runs, sps)) + "</div>"]
    md = [f"# {_md_text(title)}", "", sub, ""]
    md += [f"- **{v}** {_md_text(k)}" for v, k in _cards(manifests, runs, sps)] + [""]
    in_model = False
    for s in sections:
        if s.level == 2 and in_model:
            parts.append("</div>")
            in_model = False
        if s.title.startswith("Model: "):
            parts.append('<div class="model">')
            in_model = True
        parts.append(f"<h{s.level}>{e(s.title)}</h{s.level}>")
        parts += [_html_block(b) for b in s.blocks]
        md += ["#" * s.level + " " + _md_text(s.title), ""]
        md += [x for b in s.blocks for x in (_md_block(b), "")]
    if in_model:
        parts.append("</div>")
    parts.append(f"<footer>{e(sub)}</footer></main></body></html>")
    images = sum(1 for s in sections for b in s.blocks if b[0] == "img")

    tmp_html = _atomic_write(out_html, "\n".join(parts))
    try:
        tmp_md = _atomic_write(out_md, "\n".join(md).rstrip() + "\n")
    except BaseException:
        tmp_html.unlink(missing_ok=True)
        raise
    os.replace(tmp_html, out_html)
    os.replace(tmp_md, out_md)
    return ReportResult(out_html, out_md, len(manifests), sum(not r.failed for r in runs),
                        sum(r.failed for r in runs), len(fleets), images, tuple(sps))
