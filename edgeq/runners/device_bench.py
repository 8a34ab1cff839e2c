#!/usr/bin/env python3
"""Device-side benchmark: standard library + numpy only, copied unchanged to devices.

Runs a .tflite model with whichever interpreter is installed (ai_edge_litert, else
tflite_runtime, else tensorflow.lite) and prints ONE JSON line (schema "edgeq.bench/1") with
the statistics TFLite's benchmark_model reports: init time, first inference, warmup average,
then count/min/max/mean/std/p5/median/p95 of the timed runs, plus peak memory.

Usage: python3 device_bench.py MODEL.tflite [--threads N] [--warmup W] [--runs R]
       [--delegate xnnpack|none|/path/lib.so] [--runtime auto|ai-edge-litert|tflite-runtime|tensorflow]
       [--inputs IN.npz] [--save-outputs OUT.npz] [--seed S]

Exit codes: 0 ok, 2 bad arguments, 4 no interpreter installed, 5 model failed to load/run.
Errors are printed as one JSON line {"error": ..., "kind": ...} on stdout too, so callers on the
other end of ssh/adb can always parse the result.
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time

SCHEMA = "edgeq.bench/1"
RUNTIMES = ("ai-edge-litert", "tflite-runtime", "tensorflow")


def _first(e):
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _fail(kind, message, code):
    print(json.dumps({"schema": SCHEMA, "error": message, "kind": kind}))
    sys.stdout.flush()
    sys.exit(code)


def load_runtime(name="auto"):
    """Return (Interpreter class, load_delegate, runtime name, version, builtin-only resolver)."""
    order = RUNTIMES if name == "auto" else (name,)
    errors = []
    for rt in order:
        try:
            if rt == "ai-edge-litert":
                from ai_edge_litert import interpreter as mod
                from importlib.metadata import version
                ver = version("ai-edge-litert")
            elif rt == "tflite-runtime":
                from tflite_runtime import interpreter as mod
                ver = getattr(__import__("tflite_runtime"), "__version__", "unknown")
            elif rt == "tensorflow":
                import tensorflow as tf
                mod = tf.lite
                ver = tf.__version__
            else:
                _fail("usage", "unknown runtime %r; use one of auto, %s" % (rt, ", ".join(RUNTIMES)), 2)
            resolver = getattr(getattr(mod, "experimental", mod), "OpResolverType", None)
            if resolver is None:
                resolver = getattr(mod, "OpResolverType", None)
            return mod.Interpreter, getattr(mod, "load_delegate", None), rt, ver, resolver
        except ImportError as e:  # try the next one
            errors.append("%s: %s" % (rt, e))
    _fail("no-runtime",
          "no TFLite interpreter installed (%s); install ai-edge-litert or tflite-runtime "
          "(edgeq flash can install one)" % "; ".join(errors), 4)


def rss_mb():
    """(current RSS, peak RSS) in MB from /proc, falling back to getrusage."""
    cur = peak = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024.0
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return cur if cur is not None else peak, peak


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip().lower()
                if key in ("model name", "hardware", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(details, rng, np):
    """Random inputs that respect each input's dtype (full range for integer types)."""
    out = []
    for d in details:
        shape = [max(int(s), 1) for s in d["shape"]]
        dt = np.dtype(d["dtype"])
        if dt.kind in "iu":
            info = np.iinfo(dt)
            lo, hi = max(int(info.min), -128), min(int(info.max), 255)
            out.append(rng.integers(lo, hi + 1, size=shape).astype(dt))
        elif dt == np.bool_:
            out.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        else:
            out.append(rng.random(size=shape).astype(dt))
    return out


def load_inputs(path, details, np):
    """One array per input from an .npz (by input name, else arr_<i>); float data for an integer
    input is quantized with that input's scale/zero point, as the model expects."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/BadZipFile for bad files
        _fail("usage", "cannot read inputs %s: %s" % (path, e), 2)
    out = []
    for i, d in enumerate(details):
        key = d["name"] if d["name"] in data else "arr_%d" % i
        if key not in data:
            _fail("usage", "inputs file has no array for input %r (or arr_%d)" % (d["name"], i), 2)
        x = np.asarray(data[key])
        dt = np.dtype(d["dtype"])
        if x.size != int(np.prod(d["shape"])):
            _fail("usage", "input %r needs shape %s (one sample), the file has %s"
                  % (d["name"], [int(v) for v in d["shape"]], list(x.shape)), 2)
        scale, zp = d.get("quantization", (0.0, 0))
        if x.dtype.kind == "f" and dt.kind in "iu":
            if not scale:
                _fail("usage", "float data for integer input %r, which has no quantization" % d["name"], 2)
            info = np.iinfo(dt)
            x = np.clip(np.round(x / scale + zp), info.min, info.max)
        out.append(x.astype(dt).reshape(d["shape"]))
    return out


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def summarize(times_ms):
    """count/min/max/mean/std/p5/median/p95 as benchmark_model reports them (ms)."""
    n = len(times_ms)
    if n == 0:
        return {"count": 0}
    s = sorted(times_ms)
    mean = sum(s) / n
    std = (sum((t - mean) ** 2 for t in s) / n) ** 0.5
    return {"count": n, "min_ms": s[0], "max_ms": s[-1], "mean_ms": mean, "std_ms": std,
            "p5_ms": percentile(s, 5), "median_ms": percentile(s, 50), "p95_ms": percentile(s, 95)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--delegate", default="xnnpack")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--inputs", help=".npz with one array per input (by name or arr_0..)")
    p.add_argument("--save-outputs", help="write the last outputs to this .npz")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads < 1 or a.warmup < 0 or a.runs < 1:
        _fail("usage", "--threads and --runs must be >= 1, --warmup >= 0", 2)
    try:
        import numpy as np
    except ImportError:
        _fail("no-runtime", "numpy is not installed on this device; pip install numpy", 4)

    rss_start, _ = rss_mb()
    Interpreter, load_delegate, rt_name, rt_version, resolver = load_runtime(a.runtime)
    try:
        with open(a.model, "rb") as f:
            model_bytes = f.read()
    except OSError as e:
        _fail("model", "cannot read model %s: %s" % (a.model, e), 5)

    kwargs = {"model_content": model_bytes, "num_threads": a.threads}
    delegate = a.delegate
    if delegate == "none":
        if resolver is None:
            _fail("usage", "this runtime cannot disable the default XNNPACK delegate", 2)
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    elif delegate not in ("xnnpack", "cpu"):
        if load_delegate is None:
            _fail("usage", "this runtime cannot load external delegates", 2)
        try:
            kwargs["experimental_delegates"] = [load_delegate(delegate)]
        except Exception as e:  # delegate libraries raise ValueError/OSError/RuntimeError
            _fail("delegate", "cannot load delegate %s: %s" % (delegate, e), 5)

    t0 = time.perf_counter()
    try:
        interp = Interpreter(**kwargs)
        interp.allocate_tensors()
    except Exception as e:  # the interpreter raises ValueError/RuntimeError for bad models
        _fail("model", "interpreter could not load the model: %s" % _first(e), 5)
    init_ms = (time.perf_counter() - t0) * 1000.0
    rss_init, _ = rss_mb()

    in_details = interp.get_input_details()
    out_details = interp.get_output_details()
    rng = np.random.default_rng(a.seed)
    if a.inputs:
        inputs = load_inputs(a.inputs, in_details, np)
        input_source = "file"
    else:
        inputs = make_inputs(in_details, rng, np)
        input_source = "random"

    def run_once():
        for d, x in zip(in_details, inputs):
            interp.set_tensor(d["index"], x)
        t = time.perf_counter()
        interp.invoke()
        return (time.perf_counter() - t) * 1000.0

    try:
        first_ms = run_once()
        warm = [run_once() for _ in range(a.warmup)]
        timed = [run_once() for _ in range(a.runs)]
    except Exception as e:  # invoke failures are runtime errors on the device
        _fail("invoke", "inference failed: %s" % _first(e), 5)

    outputs = [interp.get_tensor(d["index"]) for d in out_details]
    h = hashlib.sha256()
    for o in outputs:
        h.update(np.ascontiguousarray(o).tobytes())
    if a.save_outputs:
        np.savez(a.save_outputs, **{"arr_%d" % i: o for i, o in enumerate(outputs)})
    rss_end, rss_peak = rss_mb()

    result = {
        "schema": SCHEMA,
        "model": os.path.basename(a.model),
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "model_bytes": len(model_bytes),
        "runtime": {"name": rt_name, "version": rt_version},
        "threads": a.threads,
        "delegate": delegate,
        "init_ms": init_ms,
        "first_inference_ms": first_ms,
        "warmup": {"count": len(warm), "avg_ms": (sum(warm) / len(warm)) if warm else None},
        "runs": summarize(timed),
        "timings_ms": timed,
        "memory_mb": {"init_delta": rss_init - rss_start, "overall_delta": rss_end - rss_start,
                      "peak_rss": rss_peak},
        "inputs": [{"name": d["name"], "shape": [int(s) for s in d["shape"]],
                    "dtype": np.dtype(d["dtype"]).name} for d in in_details],
        "input_source": input_source,
        "outputs_sha256": h.hexdigest(),
        "device": {"machine": platform.machine(), "cpu_model": cpu_model(),
                   "system": platform.system(), "release": platform.release(),
                   "python": platform.python_version(), "numpy": np.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
