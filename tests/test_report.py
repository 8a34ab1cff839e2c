"""edgeq report: HTML + Markdown from manifests, bench and fleet results.

One bench result per precision is real: a seeded Keras model converted with the real TFLiteConverter
(float and int8) and timed by edgeq/runners/device_bench.py on this machine. The Pi/Android results
are built from seeded timings with device_bench's own summarize(), shaped exactly like what those
runners return. The HTML is rendered in real headless Chromium.
"""

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from edgeq.errors import EdgeqError, OutputExistsError
from edgeq.report import build_report, collect_inputs, fmt_ms, latency_figure
from edgeq.report.charts import budget_figure
from edgeq.report.inputs import Manifest
from edgeq.runners.device_bench import summarize

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "edgeq" / "runners" / "device_bench.py"


# ---------------------------------------------------------------- inputs

def _convert(tmp: Path):
    """Seeded 64→32→10 MLP, converted to float and int8 (int8 I/O) .tflite with the real converter."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential([tf.keras.Input((64,), name="x"),
                                 tf.keras.layers.Dense(32, activation="relu"),
                                 tf.keras.layers.Dense(10, activation="softmax")])
    calib = np.random.default_rng(0).random((50, 64), dtype=np.float32)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (tmp / "digits_float.tflite").write_bytes(conv.convert())
    model.save(tmp / "digits.keras")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (tmp / "digits_int8.tflite").write_bytes(conv.convert())
    return tmp / "digits_float.tflite", tmp / "digits_int8.tflite"


def _bench(model: Path) -> dict:
    p = subprocess.run([sys.executable, str(BENCH), str(model), "--runs", "30", "--warmup", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _ops(model: Path) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default XNNPACK delegate, so the ops are the model's, not one DELEGATE node.
    it = Interpreter(model_path=str(model),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    return [{"index": o["index"], "op": o["op_name"], "output": names.get(o["outputs"][0], "?")}
            for o in it._get_ops_details()]


def _synthetic(real: dict, model: Path, sha: str, median: float, seed: int, **extra) -> dict:
    """A remote result: seeded log-normal timings around `median`, summarised by device_bench."""
    t = (median * np.random.default_rng(seed).lognormal(0, 0.08, 60)).tolist()
    return {**real, "model": model.name, "model_sha256": sha, "model_bytes": model.stat().st_size,
            "timings_ms": t, "runs": summarize(t), "init_ms": 3.1, "first_inference_ms": median * 2,
            "runtime": {"name": "tflite-runtime", "version": "2.14.0"},
            "device": {"machine": "aarch64", "cpu_model": "Cortex-A72", "system": "Linux",
                       "release": "6.6.31+rpt-rpi-v8", "python": "3.11.2", "numpy": "1.24.2"}, **extra}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_in")
    fl, q = _convert(tmp)
    local_f, local_q = _bench(fl), _bench(q)
    ops = _ops(q)
    plan = [{**o, "subgraph": 0, "precision": "int8", "placement": "cpu", "reason": "profile default scheme",
             "source": "devices/rpi4.toml"} for o in ops]
    plan[-1] = {**plan[-1], "precision": "float", "reason": "budget: cosine drop < 0.01 needs it",
                "source": "--max-drop"}
    keras = tmp / "digits.keras"
    manifest = {
        "schema": "edgeq.manifest/1", "created": "2026-11-23T15:00:00Z", "edgeq_version": "0.1.0",
        "output": {"path": q.name, "sha256": _sha(q), "bytes": q.stat().st_size},
        # as edgeq convert writes it: a Keras source, and the hash of the float .tflite made from it
        "source": {"path": str(keras), "format": "keras", "sha256": _sha(keras), "float_bytes": fl.stat().st_size,
                   "float_sha256": _sha(fl)},
        "scheme": "int8", "device": "rpi4",
        "io": {"inputs": [{"name": "x", "dtype": "int8", "shape": [1, 64], "scale": 0.0039, "zero_point": -128}],
               "outputs": [{"name": "Identity", "dtype": "int8", "shape": [1, 10], "scale": 0.0039,
                            "zero_point": -128}]},
        "calibration": {"kind": "npy", "source": "digits.npy", "count": 50, "seed": 0, "calibrated": True,
                        "range_method": "minmax"},
        "plan": {"device": "rpi4", "scheme": "int8", "accelerator": None, "uniform": False,
                 "counts": {"int8": len(ops) - 1, "float": 1}, "summary": f"{len(ops)} ops: {len(ops) - 1} int8, 1 float",
                 "ops": plan},
        "op_summary": {"int8": len(ops) - 1, "float": 1, "hybrid": 0},
        "fidelity": {"samples": 100,
                     "outputs": [{"name": "Identity", "cosine": 0.9991, "rel_l2": 0.031, "max_abs": 0.02,
                                  "top1_agreement": 0.99}],
                     # no edgeq writer produces per_layer: here so a test can see the report ignores it
                     "per_layer": [{"tensor": f"dense_{i}/MatMul", "op": "FULLY_CONNECTED",
                                    "rmse": 0.004 * (i + 1), "scale": 0.02, "rmse_over_scale": 0.2 * (i + 1)}
                                   for i in range(4)]},
        "budget": {"max_drop": 0.01, "metric": "cosine", "met": True,
                   "steps": [{"step": 0, "moved": [], "value": 0.97, "drop": 0.03, "bytes": q.stat().st_size},
                             {"step": 1, "moved": ["#2 SOFTMAX -> float"], "value": 0.9991, "drop": 0.0009,
                              "bytes": q.stat().st_size + 200}], "refused": [], "final_drop": 0.0009},
        "sizes": {"float_bytes": fl.stat().st_size, "quantized_bytes": q.stat().st_size,
                  "ratio": round(fl.stat().st_size / q.stat().st_size, 2)},
        "versions": {"edgeq": "0.1.0", "tensorflow": "2.21.0", "ai-edge-litert": "2.3.0",
                     "litert-quantizer": "0.11.0", "numpy": np.__version__, "python": "3.11.7"},
    }
    pi = dict(runner="ssh", host="pi-a", governor="performance", temperature_c=51.2)
    pi_f = _synthetic(local_f, fl, _sha(fl), 4.0, 1, **pi)
    pi_q = _synthetic(local_q, q, _sha(q), 1.6, 2, **pi)
    android_q = _synthetic(local_q, q, _sha(q), 0.9, 3, runner="adb", host="emulator-5554",
                           delegate_coverage={"delegated": 2, "total": 3})
    fleet = {"schema": "edgeq.fleet/1", "model": q.name, "devices": [
        {"name": "pi-b", "host": "10.0.0.12", "profile": "rpi4", "status": "ok", "error": None,
         "result": _synthetic(local_q, q, _sha(q), 1.8, 4, runner="ssh", host="10.0.0.12")},
        {"name": "pi-c", "host": "10.0.0.13", "profile": "rpi4", "status": "failed",
         "error": "ssh: connection refused; is sshd running on 10.0.0.13?", "result": None}]}
    files = {"manifest": ("digits_int8.edgeq.json", manifest), "local_f": ("local_float.json", local_f),
             "local_q": ("local_int8.json", local_q), "pi_f": ("pi_float.json", pi_f),
             "pi_q": ("pi_int8.json", pi_q), "android_q": ("android_int8.json", android_q),
             "fleet": ("fleet.json", fleet)}
    paths = {}
    for key, (name, data) in files.items():
        (tmp / name).write_text(json.dumps(data))
        paths[key] = tmp / name
    return {"paths": paths, "data": {k: v[1] for k, v in files.items()}, "dir": tmp}


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report.html"
    res = build_report(list(inputs["paths"].values()), out, title="Digits: float vs int8")
    return res, out.read_text(), out.with_suffix(".md").read_text()


class _Tables(HTMLParser):
    """Collects every <table> as (headers, rows of cell text) and every <img> src/alt."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.imgs, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append(([], []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            (self.tables[-1][0] if tag == "th" else self.tables[-1][1][-1]).append(self._cell)
            self._cell = None

    def table(self, *headers):
        """Rows of the first table whose header row starts with `headers`."""
        for heads, rows in self.tables:
            if tuple(heads[:len(headers)]) == headers:
                return [r for r in rows if r]
        raise AssertionError(f"no table with headers {headers!r}")


# ---------------------------------------------------------------- content

def test_plan_table_lists_every_planned_op_and_escapes(inputs, report):
    _, page, md = report
    rows = _Tables(page).table("#")
    plan = inputs["data"]["manifest"]["plan"]["ops"]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (str(p["index"]), p["op"], p["output"], p["precision"], p["reason"]) for p in plan]
    assert "cosine drop &lt; 0.01 needs it" in page  # html-escaped in the page
    for p in plan:
        assert f"| {p['index']} | {p['op']} | {p['output']} | {p['precision']} |" in md


def test_speedup_and_size_are_float_over_int8_per_device(inputs, report):
    res, page, md = report
    d = inputs["data"]
    want = {"pi-a": d["pi_f"]["runs"]["median_ms"] / d["pi_q"]["runs"]["median_ms"],
            "local (x86_64)": d["local_f"]["runs"]["median_ms"] / d["local_q"]["runs"]["median_ms"]}
    assert {s.device: round(s.speedup, 9) for s in res.speedups} == {k: round(v, 9) for k, v in want.items()}
    assert 2.2 < want["pi-a"] < 2.8  # 4.0 ms vs 1.6 ms medians, seeded jitter
    rows = {r[0]: r for r in _Tables(page).table("device", "model", "precision", "float median ms")}
    for dev, ratio in want.items():
        assert rows[dev][5] == f"{ratio:.2f}×"
        assert f"{ratio:.2f}×" in md
    # Android and the fleet Pi ran int8 only: no float on those devices, so no speed-up row for them.
    assert "emulator-5554" not in rows and "pi-b" not in rows
    sizes = d["manifest"]["sizes"]
    size_row = _Tables(page).table("model")[0]
    assert size_row[4] == f"{sizes['float_bytes'] / sizes['quantized_bytes']:.2f}×"


def test_latency_chart_labels_every_median(inputs):
    runs = collect_inputs(list(inputs["paths"].values())).runs
    fig, labels = latency_figure([r for r in runs if not r.failed])
    drawn = [t.get_text() for t in fig.axes[0].texts]
    d = inputs["data"]
    expected = {("pi-a", "float"): d["pi_f"], ("pi-a", "int8"): d["pi_q"],
                ("emulator-5554", "int8"): d["android_q"], ("pi-b", "int8"): d["fleet"]["devices"][0]["result"],
                ("local (x86_64)", "float"): d["local_f"], ("local (x86_64)", "int8"): d["local_q"]}
    assert len(labels) == len(drawn) == 6
    for run, text in labels:
        assert text == f"median {fmt_ms(expected[(run.device, run.precision)]['runs']['median_ms'])} ms"
        assert text in drawn


def test_html_is_self_contained_and_images_decode(inputs, report):
    res, page, md = report
    for text in (page, md):
        assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|iframe|object)\b", page, re.I) and "url(" not in page
    imgs = _Tables(page).imgs
    # latency box plot, accuracy budget steps, size + speed-up
    assert len(imgs) == res.images == 3
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).convert("L")
        px = np.asarray(im, dtype=float)
        assert im.width > 500 and px.var() > 100, img["alt"]
    alt = next(i["alt"] for i in imgs if i["alt"].startswith("Latency"))
    assert f"pi-a int8: median {inputs['data']['pi_q']['runs']['median_ms']:.2f} ms" in alt  # 1.6 ms
    assert "data:image" not in md and "Chart in the HTML report" in md


def test_fidelity_fleet_and_versions_sections(inputs, report):
    res, page, md = report
    t = _Tables(page)
    assert t.table("output")[0] == ["Identity", "0.9991", "0.0310", "0.02", "0.990"]
    fleet = {r[0]: r for r in t.table("device", "host", "profile")}
    assert fleet["pi-b"][3] == "ok" and fleet["pi-b"][4] == "int8"
    assert fleet["pi-b"][5] == f"{inputs['data']['fleet']['devices'][0]['result']['runs']['median_ms']:.2f}"  # ~1.8
    assert fleet["pi-c"][3] == "failed" and "connection refused" in fleet["pi-c"][9]
    assert "1 of 2 devices ok" in page
    versions = {(r[0], r[1]) for r in t.table("component")}
    assert {("tensorflow", "2.21.0"), ("tflite-runtime", "2.14.0"), ("litert-quantizer", "0.11.0"),
            ("ai-edge-litert", inputs["data"]["local_q"]["runtime"]["version"])} <= versions
    assert "## Tool and runtime versions" in md and "### Precision plan" in md
    assert (res.manifests, res.runs, res.failed_runs, res.fleets) == (1, 6, 0, 1)


# ---------------------------------------------------------------- tolerance and errors

def test_minimal_inputs_show_na_and_failed_runs(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"schema": "edgeq.manifest/1", "plan": None,
                                                 "output": {"path": "<b>x</b>.tflite", "sha256": "ab"}}))
    (tmp_path / "b.json").write_text(json.dumps({"schema": "edgeq.bench/1", "model_sha256": "ab",
                                                 "timings_ms": [2.0, 3.0, 4.0]}))
    (tmp_path / "e.json").write_text(json.dumps({"schema": "edgeq.bench/1", "kind": "no-runtime",
                                                 "error": "no TFLite interpreter installed"}))
    res = build_report([tmp_path / n for n in ("m.json", "b.json", "e.json")], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "n/a" in page and "No precision plan recorded" in page
    assert (res.runs, res.failed_runs, res.images) == (1, 1, 1)
    run_row = _Tables(page).table("device", "precision", "runner · runtime")[0]
    assert run_row[1] == "n/a" and run_row[5] == "3.00"  # scheme unknown; median from timings
    assert "no TFLite interpreter installed" in page
    assert "&lt;b&gt;x&lt;/b&gt;.tflite" in page and "<b>x" not in page  # names are escaped
    md = (tmp_path / "r.md").read_text()
    assert "&lt;b>x&lt;/b>.tflite" in md and "<b>" not in md


def test_budget_table_and_chart_no_per_layer_error(inputs, report):
    _, page, md = report
    m = inputs["data"]["manifest"]
    steps = m["budget"]["steps"]
    size = [s["bytes"] for s in steps]  # a real model: its size varies by a few bytes
    assert _Tables(page).table("step", "ops moved", "cosine", "drop") == [
        ["0", "none", "0.9700", "0.0300", f"{size[0] / 1024:.1f} KiB"],
        ["1", "1: #2 SOFTMAX -> float", "0.9991", "0.0009", f"{size[1] / 1024:.1f} KiB"]]
    fig = budget_figure(Manifest(inputs["paths"]["manifest"], m))
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == [s["drop"] for s in steps]
    assert [b.get_facecolor() for b in ax.patches] == [to_rgba("#f58518"), to_rgba("#54a24b")]  # over, within
    # Under the floor a step can miss on an output of another bound while the charted one is within
    # the max drop: the bar follows the step's own verdict.
    missed = {**m, "budget": {**m["budget"], "steps": [steps[0], {**steps[1], "met": False}]}}
    colours = [b.get_facecolor() for b in budget_figure(Manifest(inputs["paths"]["manifest"], missed)).axes[0].patches]
    assert colours == [to_rgba("#f58518")] * 2
    assert list(ax.lines[0].get_ydata()) == [m["budget"]["max_drop"]] * 2
    assert [t.get_text() for t in ax.texts] == ["cosine 0.9700", "cosine 0.9991"]
    # A step's `moved` is its whole plan: the tick says how many ops it moves, not "+N".
    assert [t.get_text() for t in ax.get_xticklabels()] == ["step 0\n0 op(s) moved", "step 1\n1 op(s) moved"]
    alt = "Accuracy budget chart for digits_int8.tflite: cosine drop per step 0.0300 → 0.0009"
    assert alt in {i["alt"] for i in _Tables(page).imgs} and alt in md
    # No writer produces fidelity.per_layer (the fixture carries it anyway): nothing of it is shown.
    # Charts are inlined as base64 PNGs, whose letters can spell anything ("...hfrmseos..." failed a CI
    # run): only the words of the page count.
    for text in (re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", t) for t in (page, md)):
        assert "per-layer" not in text.lower() and "rmse" not in text.lower()


def test_fidelity_floor_titles_and_skipped_floor(inputs):
    """A floor run (budget.floor true, as convert writes without --max-drop) is titled "Fidelity floor";
    a floor that was not applied says why instead of an empty budget; a long plan is counted, not listed."""
    from edgeq.report.sections import _budget_section

    m = inputs["data"]["manifest"]
    moved = [f"#{i} ADD -> float" for i in range(10)]
    # the floor's drop as convert writes it, 1 - 0.98 (it read "max cosine drop 0.020000000000000018")
    floor = dict(m, budget={**m["budget"], "floor": True, "max_drop": 1 - 0.98,
                            "steps": [*m["budget"]["steps"], {"step": 2, "moved": moved, "value": 0.999, "drop": 0.001}]})
    sec = _budget_section(Manifest(inputs["paths"]["manifest"], floor))
    assert sec.title == "Fidelity floor" and sec.blocks[0][1].startswith("Fidelity floor: max cosine drop 0.02 — met")
    rows = next(b for b in sec.blocks if b[0] == "table")[2]
    assert rows[2][1] == "10: #0 ADD -> float; #1 ADD -> float; #2 ADD -> float; #3 ADD -> float; … 6 more"
    skipped = dict(m, budget={"floor": True, "applied": False, "why": "--no-floor"})
    sec = _budget_section(Manifest(inputs["paths"]["manifest"], skipped))
    assert sec.title == "Fidelity floor" and sec.blocks == (("p", "Fidelity floor not applied: --no-floor."),)
    assert _budget_section(Manifest(inputs["paths"]["manifest"], m)).title == "Accuracy budget"


def test_manifest_is_read_through_the_schema(tmp_path, inputs):
    """A plan is the object plan.Plan.to_json() writes; a bare list of ops (no edgeq ever wrote one)
    fails manifest.read_manifest: one line naming the file, nothing written."""
    m = inputs["data"]["manifest"]
    bad = tmp_path / "list_plan.edgeq.json"
    bad.write_text(json.dumps(dict(m, plan=m["plan"]["ops"][:2])))
    with pytest.raises(EdgeqError) as e:
        build_report([bad, inputs["paths"]["local_q"]], tmp_path / "r.html")
    msg = str(e.value)
    assert str(bad) in msg and "plan" in msg and "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == ["list_plan.edgeq.json"]


@pytest.mark.parametrize("content, fragment", [
    ('{"schema": "edgeq.manifest/9"}', "unknown schema 'edgeq.manifest/9'"),
    ('{"model": "a.tflite"}', 'no "schema" field'),
    ("TFL3\x00\x01", "not a JSON file"),
])
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, inputs, content, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "r.html"
    with pytest.raises(EdgeqError) as e:
        build_report([inputs["paths"]["manifest"], bad], out)
    msg = str(e.value)
    assert str(bad) in msg and fragment in msg and "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]  # no report, no temp file left behind


def test_refuses_to_overwrite_an_input_and_keeps_old_report_on_failure(tmp_path, inputs):
    src = tmp_path / "run.html"  # a bench result saved under an unlucky name
    shutil.copy(inputs["paths"]["local_q"], src)
    before = src.read_bytes()
    with pytest.raises(OutputExistsError, match="is one of the inputs"):
        build_report([src], src)
    assert src.read_bytes() == before
    with pytest.raises(EdgeqError, match="must end in .html"):
        build_report([src], tmp_path / "report.json")
    with pytest.raises(EdgeqError, match="no such file"):
        build_report([tmp_path / "missing.json"], tmp_path / "r.html")
    with pytest.raises(OutputExistsError, match="is one of the inputs"):
        build_report([src], src, force=True)  # not even with --force
    out = tmp_path / "r.html"
    out.write_text("old report")
    with pytest.raises(OutputExistsError, match="pass --force"):
        build_report([src], out)
    with pytest.raises(EdgeqError, match="no such file"):
        build_report([src, tmp_path / "missing.json"], out, force=True)
    assert out.read_text() == "old report"
    build_report([src], out, force=True)  # an earlier report (not an input) is replaced
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == ["r.html", "r.md", "run.html"]  # no temp files left


# ---------------------------------------------------------------- headless Chromium

def test_renders_in_headless_chromium(report, tmp_path):
    from tests.conftest import require_tool
    chromium = shutil.which("chromium-browser") or require_tool(
        "chromium", "apt-get install chromium fonts-dejavu-core fonts-liberation, or .ci/setup_chromium.sh")
    res, _, _ = report
    shot = tmp_path / "shot.png"
    p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--hide-scrollbars", "--window-size=1200,2000", res.html.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.exists(), f"chromium wrote no screenshot (exit {p.returncode}): {p.stderr[-2000:]}"
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    px = np.asarray(im)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 500  # text, tables and charts, not a blank page
    assert (px.min(axis=2) < 200).mean() > 0.03  # a real share of the page is ink, not background
    if os.environ.get("EDGEQ_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["EDGEQ_KEEP_SCREENSHOT"])


def test_import_is_light():
    """`edgeq --help` imports the CLI, which imports this module: no matplotlib/numpy until a report is built."""
    code = "import sys, edgeq.report; print(sorted(m for m in ('matplotlib', 'numpy', 'PIL') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_a_long_plan_is_one_row_per_op_kind_precision_and_reason():
    """MiniLM int8 has 1272 ops: one row each hid the few that were not int8. Past PLAN_OPS_LISTED
    ops the plan table has a row per (op, precision, reason, decider), naming its op indices."""
    from pathlib import Path

    from edgeq.report.inputs import Manifest
    from edgeq.report.sections import PLAN_OPS_LISTED, _plan_section

    ops = [{"index": i, "op": "FULLY_CONNECTED" if i % 2 else "ADD", "output": f"t{i}", "precision": "int8",
            "reason": "profile default scheme", "source": "profile"} for i in range(PLAN_OPS_LISTED + 20)]
    ops[7] = {**ops[7], "precision": "float", "reason": "budget: cosine drop < 0.01 needs it", "source": "budget"}
    m = Manifest(Path("m.edgeq.json"), {"plan": {"summary": "x", "ops": ops}})
    (kind, heads, rows), = [b for b in _plan_section(m).blocks if b[0] == "table"]
    assert heads[:4] == ("#", "op", "output tensor", "precision")
    assert rows == [("0, 2, ... (50 ops)", "ADD", "50 tensors", "int8", "profile default scheme", "profile"),
                    ("1, 3, ... (49 ops)", "FULLY_CONNECTED", "49 tensors", "int8", "profile default scheme", "profile"),
                    ("7", "FULLY_CONNECTED", "t7", "float", "budget: cosine drop < 0.01 needs it", "budget")]


def test_a_model_larger_than_its_float_source_is_said_larger():
    """A tiny model grows with quantization's overhead: its size ratio read "0.94× smaller"."""
    from pathlib import Path

    from edgeq.report.inputs import Manifest
    from edgeq.report.sections import _model_section

    m = Manifest(Path("m.edgeq.json"), {"output": {"path": "m.tflite", "bytes": 3400}, "source": {"float_bytes": 3200}})
    rows = dict(_model_section(m).blocks[0][2])
    assert rows["size ratio"] == "1.06× larger"


def test_level_and_plan_sections_read_what_the_manifest_says_and_survive_what_it_should_not():
    """The calibration row names the ranges of the last kept step that chose them (equalization
    measures them again on the equalized model); a level or a long plan edgeq did not write this
    way is shown as far as it can be, never a crash of the whole report."""
    from pathlib import Path

    from edgeq.report.inputs import Manifest
    from edgeq.report.sections import PLAN_OPS_LISTED, _level_section, _model_section, _plan_section

    def cal_row(optimize, calibration=None):
        m = Manifest(Path("m.edgeq.json"), {"calibration": calibration or {"kind": "npy", "range_method": "minmax"},
                                            "optimize": optimize})
        return dict(_model_section(m).blocks[0][2])["calibration"]

    def step(name, kept, **detail):
        return {"step": name, "kept": kept, "detail": detail, "before": {}, "after": {}, "seconds": 1}

    o = {"level": "fast", "ran": True, "objective": "kl", "judged_on_calibration_samples": 20, "seconds": 3,
         "steps": [step("ranges", True, chosen="mse"), step("equalize", True, ranges={"chosen": "minmax-ema"})]}
    assert cal_row(o) == "kind=npy, ranges=minmax-ema (measured, --optimize fast)"
    o["steps"][1]["kept"] = False
    assert cal_row(o) == "kind=npy, ranges=mse (measured, --optimize fast)"
    best = {**o, "level": "best", "steps": [*o["steps"], step("refine_ranges", True, tensors_refined=4)]}
    assert cal_row(best) == "kind=npy, ranges=mse, refined per tensor (measured, --optimize best)"
    assert cal_row({"level": "none", "ran": False, "why": "--optimize none"}) == "kind=npy, range_method=minmax"
    refit = {"kind": "npy", "range_method": "minmax", "judged_model_count": 30}  # recalibrated on every sample
    assert cal_row({**o, "superseded": "missed the fidelity floor"}, refit) == "kind=npy, range_method=minmax"

    odd = Manifest(Path("m.edgeq.json"), {"optimize": {"level": "fast", "ran": True, "steps": ["x"]}})
    assert _level_section(odd).blocks == (("p", "Recorded, but not in a form this report reads."),)
    ops = [{"index": str(i), "op": ["ADD"], "precision": "int8"} for i in range(PLAN_OPS_LISTED + 1)]
    (kind, heads, rows), = [b for b in _plan_section(Manifest(Path("m"), {"plan": {"ops": ops}})).blocks
                            if b[0] == "table"]
    assert len(rows) == 1 and rows[0][0] == f"0, 1, 2, ... ({PLAN_OPS_LISTED + 1} ops)" and rows[0][2] == f"{PLAN_OPS_LISTED + 1} tensors"


def test_the_calibration_row_says_how_pixels_became_inputs():
    from edgeq.report.sections import _calibration_fields

    cal = {"kind": "images", "count": 80, "pixels": {"preprocess": "symmetric", "mean": [127.5], "std": [127.5]}}
    assert _calibration_fields({}, cal) == ["kind=images", "count=80", "pixels=symmetric (x - 127.5) / 127.5"]
    cal["pixels"] = {"preprocess": "imagenet", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    assert _calibration_fields({}, cal)[-1] == ("pixels=imagenet (x - [123.675, 116.28, 103.53]) / "
                                                "[58.395, 57.12, 57.375]")
    cal["pixels"] = {"preprocess": "none: uint8 pixels as decoded"}
    assert _calibration_fields({}, cal)[-1] == "pixels=none: uint8 pixels as decoded"
