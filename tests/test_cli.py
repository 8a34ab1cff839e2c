"""The CLI through click's CliRunner: exit codes 0 ok / 1 user error / 2 usage / 3 device failure,
one-line errors without tracebacks, --json printing one document, and fast start-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from edgeq import __version__
from edgeq.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    assert run("--help").exit_code == 0


def test_help_does_not_import_tensorflow():
    code = ("import sys; from edgeq.cli import main\n"
            "try:\n main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_convert_json_and_exit_codes(tiny_dense, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((80, 8)).astype(np.float32))
    out = tmp_path / "o.tflite"
    r = run("convert", tiny_dense, "-o", out, "--calib", tmp_path / "x.npy", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["schema"] == "edgeq.manifest/1" and doc["fidelity"]["outputs"][0]["cosine"] > 0.99
    # Existing output: user error, exit 1, one line, no traceback.
    r = run("convert", tiny_dense, "-o", out, "--calib", tmp_path / "x.npy")
    assert r.exit_code == 1 and "--force" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    # Usage error (unknown choice): exit 2.
    assert run("convert", tiny_dense, "-o", out, "--scheme", "int2").exit_code == 2
    # Missing calibration for int8: exit 1 naming the fix.
    r = run("convert", tiny_dense, "-o", tmp_path / "p.tflite")
    assert r.exit_code == 1 and "--calib" in r.output and not (tmp_path / "p.tflite").exists()
    # NaN sample: exit 1, names the sample, no partial output.
    bad = np.ones((20, 8), np.float32)
    bad[7, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    r = run("convert", tiny_dense, "-o", tmp_path / "n.tflite", "--calib", tmp_path / "nan.npy")
    assert r.exit_code == 1 and "nan.npy[7]: contains NaN" in r.output
    assert not (tmp_path / "n.tflite").exists() and not (tmp_path / "n.edgeq.json").exists()


def test_all_int8_plan_prints_summary_without_empty_table(tiny_dense, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 8)).astype(np.float32))
    r = run("convert", tiny_dense, "-o", tmp_path / "o.tflite", "--calib", tmp_path / "x.npy",
            "--device", "coral-edgetpu")
    assert r.exit_code == 0, r.output
    assert "ops not int8" not in r.output
    summary = [line for line in r.output.splitlines() if line.startswith("plan: ")]
    assert len(summary) == 1 and "int8" in summary[0], r.output


def test_corrupt_model_exit_1(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"\x00" * 64)
    r = run("bench", tmp_path / "m.tflite")
    assert r.exit_code == 1 and "not a TFLite flatbuffer" in r.output and "Traceback" not in r.output


def test_bench_json(tiny_dense, tmp_path):
    from edgeq.sources import load_source
    (tmp_path / "f.tflite").write_bytes(load_source(tiny_dense).float_tflite)
    r = run("bench", tmp_path / "f.tflite", "--runs", 7, "--warmup", 1, "--json", "-o", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runs"]["count"] == 7 and json.loads((tmp_path / "r.json").read_text()) == doc


def test_device_failure_exit_3(tiny_dense, tmp_path):
    from edgeq.sources import load_source
    (tmp_path / "f.tflite").write_bytes(load_source(tiny_dense).float_tflite)
    r = run("bench", tmp_path / "f.tflite", "--runs", 1, "--delegate", tmp_path / "missing.so")
    assert r.exit_code == 3 and "cannot load delegate" in r.output
    # a phone's delegate name on this host is the user's mistake, not a device failure (it read exit 3)
    r = run("bench", tmp_path / "f.tflite", "--runs", 1, "--delegate", "gpu")
    assert r.exit_code == 1 and "delegate 'gpu' is neither xnnpack, none nor a delegate library path" in r.output
    np.save(tmp_path / "in.npy", np.zeros((1, 8), np.float32))
    r = run("bench", tmp_path / "f.tflite", "--runs", 1, "--inputs", tmp_path / "in.npy")
    assert r.exit_code == 1 and "is one array (.npy); pass an .npz with one array per input" in r.output


def test_devices_commands_json(tiny_dense, tmp_path):
    r = run("devices", "list", "--json")
    assert r.exit_code == 0
    ids = {p["id"] for p in json.loads(r.stdout)}
    assert {"rpi4", "rpi5", "rpi-zero2w", "android-cpu", "android-gpu", "android-nnapi", "android-qnn-htp",
            "coral-edgetpu", "host-x86_64"} <= ids
    r = run("devices", "show", "rpi4", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runtime"]["name"] == "tflite-runtime"
    r = run("devices", "show", "rpi3000")
    assert r.exit_code == 1 and "rpi3000" in r.output and "Traceback" not in r.output
    from edgeq.sources import load_source
    (tmp_path / "f.tflite").write_bytes(load_source(tiny_dense).float_tflite)
    r = run("devices", "check", tmp_path / "f.tflite", "--device", "host-x86_64", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] is True


def test_profile_needs_host_for_ssh_devices(tmp_path, tiny_dense):
    from edgeq.sources import load_source
    (tmp_path / "f.tflite").write_bytes(load_source(tiny_dense).float_tflite)
    r = run("profile", tmp_path / "f.tflite", "--device", "rpi4")
    assert r.exit_code == 2 and "--host" in r.output  # a usage mistake, visible in argv
    r = run("profile", tmp_path / "f.tflite", "--device", "host-x86_64", "--runs", 3, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runs"]["count"] == 3


def test_real_process_errors_are_one_line_and_json_is_one_document(tiny_dense, tmp_path):
    """As a user runs it (a subprocess, real file descriptors): converter chatter never leaks."""
    exe = [sys.executable, "-m", "edgeq.cli"]
    bad = np.ones((30, 8), np.float32)
    bad[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    p = subprocess.run(exe + ["convert", str(tiny_dense), "-o", str(tmp_path / "o.tflite"), "--calib",
                              str(tmp_path / "nan.npy")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "nan.npy[4]: contains NaN" in p.stderr
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).random((40, 8)).astype(np.float32))
    p = subprocess.run(exe + ["convert", str(tiny_dense), "-o", str(tmp_path / "o.tflite"), "--calib",
                              str(tmp_path / "ok.npy"), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["schema"] == "edgeq.manifest/1"
    assert "XNNPACK" not in p.stderr and "Saved artifact" not in p.stderr


def test_plain_progress_lines_for_logs(tiny_conv, tmp_path):
    """EDGEQ_PROGRESS=plain in a real process whose stderr is a pipe (a CI log, ssh without a
    terminal): a line as each step starts and ends, the level's own steps included (they run while
    converter chatter is silenced), and still no chatter; without it, nothing; a bad value is a
    one-line error."""
    exe = [sys.executable, "-m", "edgeq.cli", "convert", str(tiny_conv), "--calib", str(tmp_path / "x.npy"),
           "--calib-samples", "60", "--eval-samples", "30"]
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((90, 8, 8, 3)).astype(np.float32))
    env = dict(os.environ, EDGEQ_PROGRESS="plain")
    p = subprocess.run(exe + ["-o", str(tmp_path / "p.tflite")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "Loading calibration samples ..." in lines
    assert any(re.fullmatch(r"Loading calibration samples: done \(60/60, \d+\.\d s\)", x) for x in lines), lines
    start = lines.index("Optimizing accuracy (--optimize fast, 60 calibration samples) ...")
    end = next(i for i, x in enumerate(lines) if x.startswith("Optimizing accuracy (--optimize fast, 60 calibration "
                                                                  "samples): done ("))
    assert any(x.startswith("measuring activation ranges") for x in lines[start:end]), lines
    assert "Created TensorFlow Lite" not in p.stderr and "Traceback" not in p.stderr
    assert "activation ranges: " in p.stdout  # the summary stays on stdout
    js = subprocess.run(exe + ["-o", str(tmp_path / "j.tflite"), "--json"], capture_output=True, text=True, env=env)
    assert js.returncode == 0 and json.loads(js.stdout)["calibration"]["count"] == 60  # stdout: the JSON only
    assert "Loading calibration samples ..." in js.stderr.splitlines()  # plain asked for: lines on stderr
    quiet = subprocess.run(exe + ["-o", str(tmp_path / "q.tflite")], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "EDGEQ_PROGRESS"})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == [x for x in lines if x.startswith("warning: ")]  # warnings only
    bad = subprocess.run(exe + ["-o", str(tmp_path / "b.tflite")], capture_output=True, text=True,
                         env=dict(os.environ, EDGEQ_PROGRESS="loud"))
    assert bad.returncode == 1 and not (tmp_path / "b.tflite").exists()
    assert bad.stderr.strip() == "Error: EDGEQ_PROGRESS='loud': use one of auto, bar, plain, off"


def test_result_files_never_replace_inputs(tiny_dense, tmp_path):
    from edgeq.sources import load_source
    model = tmp_path / "f.tflite"
    model.write_bytes(load_source(tiny_dense).float_tflite)
    before = model.read_bytes()
    r = run("bench", model, "--runs", 1, "-o", model, "--force")
    assert r.exit_code == 1 and "refusing to overwrite the input" in r.output and model.read_bytes() == before
    (tmp_path / "r.json").write_text("keep")
    r = run("bench", model, "--runs", 1, "-o", tmp_path / "r.json")
    assert r.exit_code == 1 and "--force" in r.output and (tmp_path / "r.json").read_text() == "keep"
    r = run("bench", model, "--runs", 1, "-o", tmp_path / "missing" / "r.json")
    assert r.exit_code == 1 and "does not exist" in r.output
    # what bench and profile read beside the model by default: its manifest and kept samples
    for beside in ("f.edgeq.json", "f.samples.npz"):
        (tmp_path / beside).write_text("keep")
        for args in (["bench", model, "--runs", 1, "-o"],
                     ["profile", model, "--device", "host-x86_64", "--runs", 1, "--save-outputs"]):
            r = run(*args, tmp_path / beside, "--force")
            assert r.exit_code == 1 and f"refusing to overwrite the input {tmp_path / beside}" in r.output, r.output
            assert (tmp_path / beside).read_text() == "keep"


def test_option_combinations_are_usage_errors(tiny_dense, tmp_path):
    """Wrong combinations visible in argv alone: exit 2 before any work, the library's one-line reason."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 8)).astype(np.float32))
    out = tmp_path / "o.tflite"
    cases = [
        (["--scheme", "dynamic", "--calibration", "percentile"], "--calibration percentile selects activation ranges"),
        (["--scheme", "int8", "--io", "int16", "--calib", tmp_path / "x.npy"],
         "--io int16 does not go with --scheme int8; use one of float32, int8, uint8"),
        (["--io", "uint8", "--calibration", "mse"], "--io uint8 is not available with --calibration mse"),
        (["--max-drop", "0.01", "--scheme", "fp16"], "--max-drop works with --scheme int8/int16x8/dynamic"),
        (["--max-drop", "0.01", "--calib", tmp_path / "x.npy", "--eval-samples", "0"],
         "--max-drop needs held-out samples"),
        (["--scheme", "int16x8"], "--scheme int16x8 needs calibration data: pass --calib"),
        (["--scheme", "dynamic", "--optimize", "fast", "--calib", tmp_path / "x.npy"],
         "--optimize fast cannot run: --scheme dynamic"),
        (["--optimize", "best", "--calibration", "percentile", "--calib", tmp_path / "x.npy"],
         "--optimize best cannot run: --calibration percentile fixes the activation ranges"),
        (["--optimize", "fast", "--calib", "random"], "--optimize fast cannot run: no real calibration data"),
        (["--max-size", "12XB"], "--max-size '12XB': expected a size such as 12MB"),
        # nan passed click's ranges (no comparison is true of it): --max-drop nan ran the whole job to
        # "needs >= nan", inf wrote Infinity into the JSON, --std inf calibrated on all-zero images
        (["--max-drop", "nan", "--calib", tmp_path / "x.npy"], "'--max-drop': 'nan' is not a finite number"),
        (["--max-drop", "inf", "--calib", tmp_path / "x.npy"], "'--max-drop': 'inf' is not a finite number"),
        (["--percentile", "nan"], "'--percentile': 'nan' is not a finite number"),
        (["--calib", "random", "--std", "1,inf,1"], "--std: '1,inf,1': every value must be a finite number"),
        (["--calib", "random", "--mean", "nan"], "--mean: 'nan': every value must be a finite number"),
        (["--calibration", "mse", "--percentile", "90"], "--calibration mse has none: drop --percentile"),
        (["--scheme", "dynamic", "--mean", "127"], "prepare --calib data; pass --calib or drop them"),
        (["--calib", "random", "--std", "1e39"], "--std: '1e39': every value must be a finite number"),
    ]
    for args, reason in cases:
        r = run("convert", tiny_dense, "-o", out, *args)
        assert r.exit_code == 2 and reason in r.output and "Traceback" not in r.output, (args, r.output)
    assert not out.exists() and not (tmp_path / "o.edgeq.json").exists()
    # Not known from argv alone (the model's format decides the default scheme): a user error, exit 1.
    r = run("convert", tiny_dense, "-o", out, "--io", "uint8")
    assert r.exit_code == 1 and "needs calibration data" in r.output
    r = run("report", tmp_path / "x.npy")
    assert r.exit_code == 2 and "--output" in r.output
    # options that did nothing for this model or data were ignored silently: now refused (exit 1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(imgs / "a.png")
    (tmp_path / "t.txt").write_text("a sentence\n")
    for args, reason in (
            (["--calib", imgs, "--preprocess", "imagenet", "--mean", "127.5"],
             "--mean/--std replace --preprocess imagenet's normalisation; give one or the other"),
            (["--calib", tmp_path / "x.npy", "--tokenizer", imgs], "--tokenizer tokenizes .txt calibration "
                                                                       "data; x.npy is not text: drop it"),
            (["--calib", tmp_path / "x.npy", "--smoothquant", "0.5"],
             "--pooling/--smoothquant/--split-outliers shape Hugging Face encoders; drop them for a keras model"),
            (["--calib", tmp_path / "x.npy", "--split-outliers", "4"], "drop them for a keras model"),
            (["--calib", tmp_path / "x.npy", "--pooling", "cls"], "drop them for a keras model"),
            (["--calib", "random", "--tokenizer", imgs], "--calib random has none: drop them"),
            (["--calib", "random", "--preprocess", "imagenet"], "--calib random has none: drop them")):
        r = run("convert", tiny_dense, "-o", out, *args)
        assert r.exit_code == 1 and reason in r.output and "Traceback" not in r.output, (args, r.output)
    assert not out.exists()
    # timeouts are seconds above 0: nan waited forever on a stalled host, 0 and -5 failed oddly
    for value, reason in (("nan", "'nan' is not a finite number"), ("0", "0.0 is not in the range x>0"),
                          ("-5", "-5.0 is not in the range x>0")):
        for opt in ("--connect-timeout", "--timeout"):
            r = run("profile", out, "--device", "rpi4", "--host", "pi@127.0.0.1", opt, value)
            assert r.exit_code == 2 and f"'{opt}': {reason}" in r.output, (opt, value, r.output)


def test_plan_without_a_device_says_so(tiny_dense, tmp_path, capsys):
    """An accuracy-budget plan made without --device prints as such, never 'plan for None'."""
    from dataclasses import replace

    from edgeq.calibration import CalibrationConfig
    from edgeq.cli_output import print_convert
    from edgeq.convert import ConvertOptions, convert
    from edgeq.plan import plan_precision
    from edgeq.precision import Scheme
    from edgeq.tflite_model import read_model

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 8)).astype(np.float32))
    r = convert(tiny_dense, ConvertOptions(tmp_path / "o.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy"))))
    assert r.manifest["plan"] is None
    ops = list(read_model(r.source.float_tflite).ops)
    plan = plan_precision(ops, None, {0: ("float", "accuracy budget step 1")}, scheme=Scheme.INT8)
    capsys.readouterr()
    print_convert(replace(r, manifest={**r.manifest, "plan": plan.to_json()}))
    printed = capsys.readouterr().out
    assert "Precision plan (no device) (ops not int8)" in printed and "None" not in printed
    assert f"plan: {plan.summary()}" in printed and "accuracy budget step 1" in printed
    # The size line: a model this small grows with quantization's overhead, said as such
    # (it read "0.94x smaller than float").
    ratio = r.manifest["sizes"]["ratio"]
    assert ratio < 1 and f"{1 / ratio:.2f}x larger than float" in printed and "smaller" not in printed
    print_convert(replace(r, manifest={**r.manifest, "sizes": {**r.manifest["sizes"], "ratio": 3.6}}))
    assert "3.60x smaller than float" in capsys.readouterr().out


def test_plan_table_groups_ops_of_a_kind_kept_for_one_reason():
    """An int4 plan keeps hundreds of weightless ops float, each kind for one reason: one row per
    (op, precision, placement, reason) with its indices, in plan order; int8 and other ops stay out."""
    from edgeq.cli_output import plan_rows

    why = "no constant weight to store as int8, so float instead of hybrid"
    ops = [{"index": i, "op": "RESHAPE", "precision": "float", "placement": "cpu", "reason": why} for i in (3, 5, 8, 9)]
    ops += [{"index": 4, "op": "FULLY_CONNECTED", "precision": "int4-b128", "placement": "cpu", "reason": "default"},
            {"index": 6, "op": "FULLY_CONNECTED", "precision": "hybrid", "placement": "cpu", "reason": "--max-size"},
            {"index": 7, "op": "FULLY_CONNECTED", "precision": "int4-b128", "placement": "cpu", "reason": "default"},
            {"index": 1, "op": "ADD", "precision": "float", "placement": "cpu", "reason": why},
            {"index": 2, "op": "CONV_2D", "precision": "int8", "placement": "cpu", "reason": "default"},
            {"index": 0, "op": "QUANTIZE", "precision": "other", "placement": "cpu", "reason": ""}]
    assert plan_rows(ops) == [["1", "ADD", "float", "cpu", why],
                              ["3, 5, ... (4 ops)", "RESHAPE", "float", "cpu", why],
                              ["4, 7", "FULLY_CONNECTED", "int4-b128", "cpu", "default"],
                              ["6", "FULLY_CONNECTED", "hybrid", "cpu", "--max-size"]]


def test_convert_says_how_many_samples_calibrated_and_judged(tiny_dense, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 8)).astype(np.float32))
    r = run("convert", tiny_dense, "-o", tmp_path / "o.tflite", "--calib", tmp_path / "x.npy")
    assert r.exit_code == 0, r.output
    assert ("calibration: 40 samples; fidelity judged on 8 held-out samples by a twin calibrated on the other 32"
            in r.output)
    floor = [line for line in r.output.splitlines() if line.startswith("fidelity floor: ")]
    assert floor and "top1 >= 0.9: met as converted" in floor[0], r.output
    r = run("convert", tiny_dense, "-o", tmp_path / "p.tflite", "--calib", tmp_path / "x.npy", "--calib-samples", 30,
            "--eval-samples", 10, "--no-floor")
    assert r.exit_code == 0 and "calibration: 30 samples; fidelity judged on 10 held-out samples\n" in r.output
    assert "fidelity floor: not applied (--no-floor)" in r.output


def test_convert_floor_refusal_and_class_output(tf, tmp_path):
    """Below the floor with nothing the device lets move: exit 1, one line, no files; --no-floor writes."""
    from tests.conftest import build_tiny, save_keras
    base = build_tiny(tf, "ln")
    src = save_keras(tf, tf.keras.Model(base.inputs, {"embedding": base.outputs[0]}), tmp_path / "e.keras")
    x = np.random.default_rng(0).normal(size=(150, 16, 32)).astype(np.float32)
    x[:, :, 3] *= 40
    np.save(tmp_path / "x.npy", x)
    args = ["convert", src, "--calib", tmp_path / "x.npy", "--calib-samples", 100, "--device", "coral-edgetpu"]
    r = run(*args, "-o", tmp_path / "o.tflite")
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "fidelity floor not met, nothing written" in r.output and "--no-floor" in r.output
    assert not (tmp_path / "o.tflite").exists() and not (tmp_path / "o.edgeq.json").exists()
    r = run(*args, "-o", tmp_path / "n.tflite", "--no-floor", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["budget"] == {"floor": False, "applied": False, "why": "--no-floor"}
    r = run("convert", src, "-o", tmp_path / "c.tflite", "--calib", tmp_path / "x.npy", "--class-output", "scores")
    assert r.exit_code == 1 and "--class-output scores: the model has no such output; its outputs are embedding" \
        in r.output


def test_convert_prints_what_each_optimize_step_bought(tiny_conv, tmp_path):
    from edgeq.level_summary import dropped

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((90, 8, 8, 3)).astype(np.float32))
    r = run("convert", tiny_conv, "-o", tmp_path / "o.tflite", "--calib", tmp_path / "x.npy", "--calib-samples", 60,
            "--eval-samples", 30)
    assert r.exit_code == 0, r.output
    assert "--optimize fast: each step judged on 30 calibration samples (kl to float)" in r.output  # half of 60
    for part in ("activation ranges: ", "weights rounded the other way in ", "bias_correction", "optimize: fast in "):
        assert part in r.output
    m = json.loads((tmp_path / "o.edgeq.json").read_text())
    assert [s["step"] for s in m["optimize"]["steps"]] == ["ranges", "weight_rounding", "bias_correction"]  # no pair to equalize
    r = run("convert", tiny_conv, "-o", tmp_path / "n.tflite", "--calib", tmp_path / "x.npy", "--optimize", "none")
    assert r.exit_code == 0 and "optimize" not in r.output
    r = run("convert", tiny_conv, "-o", tmp_path / "d.tflite", "--calib", tmp_path / "x.npy", "--scheme", "dynamic")
    assert r.exit_code == 0 and "optimize: none (--scheme dynamic: the methods tune static int8" in r.output
    # The report shows the same level (issue 13: every method reported in the manifest and the report).
    r = run("report", tmp_path / "o.edgeq.json", tmp_path / "n.edgeq.json", tmp_path / "d.edgeq.json",
            "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "r.md").read_text()
    assert md.count("### Accuracy level") == 3
    assert "--optimize fast: each step judged on 30 calibration samples (kl to float)." in md
    for s in m["optimize"]["steps"]:
        verdict = "kept" if s["kept"] else (s.get("detail") or {}).get("verdict") or dropped(s, "kl")
        assert f"| {s['step']} | " in md and f" | {s['after']['kl']:.4f} | " in md, s["step"]
        assert any(line.startswith(f"| {s['step']} |") and f"| {verdict} |" in line for line in md.splitlines())
    assert "No accuracy level ran (--optimize none)." in md
    assert "optimize: none (--scheme dynamic: the methods tune static int8" in md
    assert (tmp_path / "r.html").read_text().count("Accuracy level") >= 3
    # Where the level chose the ranges the calibration row says so, not --calibration's default rule.
    chosen = m["optimize"]["steps"][0]["detail"]["chosen"]
    assert f"ranges={chosen} (measured, --optimize fast) |" in md and md.count("range_method=minmax") == 2


def test_convert_max_size_prints_what_it_tried(tf, tmp_path):
    from tests.conftest import build_int4_graph

    (tmp_path / "g.tflite").write_bytes(build_int4_graph(tf))
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(60, 8, 8, 16)).astype(np.float32))
    r = run("convert", tmp_path / "g.tflite", "-o", tmp_path / "o.tflite", "--calib", tmp_path / "x.npy",
            "--max-size", "40KB")  # int8 is 55 KB, int4-b32 31 KB
    assert r.exit_code == 0, r.output
    assert "--max-size 0.04 MB: schemes tried, most accurate first" in r.output
    assert "size goal: chose int4-b32" in r.output and (tmp_path / "o.tflite").stat().st_size <= 40_000
    r = run("convert", tmp_path / "g.tflite", "-o", tmp_path / "p.tflite", "--calib", tmp_path / "x.npy",
            "--max-size", "1KB")
    assert r.exit_code == 1 and "cannot be reached: the smallest plan tried (int4) is" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "p.tflite").exists()


def test_a_float16_file_is_also_compared_with_itself(tf, tmp_path, capsys):
    """A published .tflite stores its weights as float16: "3.88x smaller than float" (its float32
    form) read as against the file the user has, which was half that (BirdNET's metadata model).
    The size line names both; a float32 file only the first."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.cli_output import print_convert
    from edgeq.convert import ConvertOptions, convert
    from edgeq.quiet import quiet_native

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    model = tf.keras.Sequential([tf.keras.Input((64,)), L.Dense(256, activation="relu"), L.Dense(256, activation="relu"),
                                 L.Dense(10)])
    for name, fp16 in (("h.tflite", True), ("f.tflite", False)):
        with quiet_native():
            c = tf.lite.TFLiteConverter.from_keras_model(model)
            if fp16:
                c.optimizations = [tf.lite.Optimize.DEFAULT]
                c.target_spec.supported_types = [tf.float16]
            (tmp_path / name).write_bytes(c.convert())
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(60, 64)).astype(np.float32))
    calib = CalibrationConfig(str(tmp_path / "x.npy"))
    r = convert(tmp_path / "h.tflite", ConvertOptions(tmp_path / "hq.tflite", calib=calib))
    s = r.manifest["sizes"]
    assert s["source_bytes"] == (tmp_path / "h.tflite").stat().st_size < 0.6 * s["float_bytes"]
    capsys.readouterr()
    print_convert(r)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("wrote "))
    assert f"{s['ratio']:.2f}x smaller than float; {s['source_bytes'] / s['quantized_bytes']:.2f}x smaller than " \
           "the file given)" in line
    r = convert(tmp_path / "f.tflite", ConvertOptions(tmp_path / "fq.tflite", calib=calib))
    assert "source_bytes" not in r.manifest["sizes"]
    print_convert(r)
    assert "the file given" not in capsys.readouterr().out


def test_a_floor_met_within_sampling_error_says_so(capsys):
    """BirdNET with --class-output: "fidelity floor ... met" printed beside top-1 0.842 on 19 held-out
    clips, met by the agreement's upper confidence bound with no word of it. Now a line says so; a
    top-1 at or above the bound, or a cosine requirement, adds nothing."""
    from edgeq.accuracy_target import wilson_upper
    from edgeq.cli_output import print_budget

    req = {"output": "Identity", "kind": "class_scores", "metric": "top1", "bound": 0.9, "upper_confidence_bound": True}
    assert wilson_upper(16 / 19, 19) >= 0.9  # what made it met
    b = {"floor": True, "met": True, "loop": False, "metric": "top1", "requirements": [req],
         "steps": [{"step": 0, "value": 16 / 19, "values": {"Identity": 16 / 19}, "bytes": 1}]}
    print_budget(b)
    out = capsys.readouterr().out
    assert "Identity top1 0.842 is below 0.9, met within sampling error (its 95% upper confidence bound" in out
    print_budget({**b, "steps": [{"step": 0, "value": 0.95, "values": {"Identity": 0.95}, "bytes": 1}]})
    assert "sampling error" not in capsys.readouterr().out
    cos = {**req, "metric": "cosine", "bound": 0.95, "upper_confidence_bound": False}
    print_budget({**b, "requirements": [cos], "steps": [{"step": 0, "value": 0.96, "values": {"Identity": 0.96}}]})
    assert "sampling error" not in capsys.readouterr().out
