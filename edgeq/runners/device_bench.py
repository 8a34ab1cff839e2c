#!/usr/bin/env python3
"""Device-side benchmark: standard library + numpy only, copied unchanged to devices.

Runs a .tflite model with whichever interpreter is installed (ai_edge_litert, else
tflite_runtime, else tensorflow.lite) and prints ONE JSON line (schema "edgeq.bench/1") with
the statistics TFLite's benchmark_model reports: init time, first inference, warmup average,
then count/min/max/mean/std/p5/median/p95 of the timed runs, plus peak memory.

Usage: python3 device_bench.py MODEL.tflite [--threads N] [--warmup W] [--runs R]
       [--delegate xnnpack|none|/path/lib.so] [--runtime auto|ai-edge-litert|tflite-runtime|tensorflow]
       [--inputs IN.npz] [--save-outputs OUT.npz] [--seed S]

Without --inputs, inputs are random but valid: token ids below the embedding table size, 0/1
masks (see make_inputs). --inputs holds one sample or a stack of N samples per input, cycled
over the runs; the reported outputs are those of the last run.

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


# CPU features that decide which int8/int4 matrix kernels XNNPACK picks (its gemm-config.c): without
# an int8 dot product (x86 VNNI/AMX, ARM dotprod/i8mm) int8 GEMMs multiply in 16 bits and quantized
# transformers run barely faster than float (measured on an AVX2-only host: int8 FC 1.2x, int4 1.5x).
CPU_FEATURES = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "amx_int8",
                "asimddp", "i8mm", "sve", "sve2", "bf16")


def cpu_features(cpuinfo=None):
    """Those of CPU_FEATURES the kernel lists (/proc/cpuinfo `flags` on x86, `Features` on ARM)."""
    try:
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
    except OSError:
        return []
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return [f for f in CPU_FEATURES if f in found]


# Ops whose output stays an index when an input index goes in (casts, reshapes, slicing, and the
# negative-index fix-up Keras emits: LESS/ADD/SELECT_V2), and the lookups an index ends in:
# op name -> position of the index operand, position of the table it indexes.
_LOOKUPS = {"GATHER": (1, 0), "GATHER_ND": (1, 0), "EMBEDDING_LOOKUP": (0, 1)}


def index_bounds(interp, np):
    """{input tensor index: exclusive upper bound} for integer model inputs that end up as lookup
    indices (token ids into an embedding table): the smallest first dimension of the tables they
    reach through integer-valued ops. Empty when the runtime cannot list its ops."""
    try:
        ops = [op for op in interp._get_ops_details() if op.get("op_name") != "DELEGATE"]
        shapes = {d["index"]: [int(v) for v in d["shape"]] for d in interp.get_tensor_details()}
        dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    except Exception:  # older runtimes lack _get_ops_details: callers fall back to 0/1
        return {}
    bounds = {}
    for d in interp.get_input_details():
        reached, todo = {int(d["index"])}, [int(d["index"])]
        while todo:
            t = todo.pop()
            for op in ops:
                ins = [int(i) for i in op["inputs"]]
                if t not in ins:
                    continue
                look = _LOOKUPS.get(op["op_name"])
                if look:
                    idx_pos, table_pos = look
                    if len(ins) > max(look) and ins[idx_pos] == t and shapes.get(ins[table_pos]):
                        table = shapes[ins[table_pos]]
                        k = shapes.get(t, [1])[-1] if op["op_name"] == "GATHER_ND" else 1
                        dim = min(table[:max(k, 1)]) if table else 0
                        if dim > 0:
                            bounds[d["index"]] = min(bounds.get(d["index"], dim), dim)
                    continue
                for o in op["outputs"]:
                    o = int(o)
                    if o not in reached and o in dtypes and dtypes[o].kind in "iu":
                        reached.add(o)
                        todo.append(o)
    return bounds


def make_inputs(details, rng, np, bounds=None):
    """Random inputs the model accepts. Quantized integer inputs carry real values: their full
    range. Plain integer inputs are indices or flags: ids below the table size when they feed a
    lookup (see index_bounds), else 0/1 (attention masks, token types); bool 0/1; floats [0, 1)."""
    bounds = bounds or {}
    out = []
    for d in details:
        shape = [max(int(s), 1) for s in d["shape"]]
        dt = np.dtype(d["dtype"])
        scale = (d.get("quantization") or (0.0, 0))[0]
        if dt.kind in "iu" and scale:
            info = np.iinfo(dt)
            lo, hi = max(int(info.min), -128), min(int(info.max), 255)
            out.append(rng.integers(lo, hi + 1, size=shape).astype(dt))
        elif dt.kind in "iu":
            out.append(rng.integers(0, bounds.get(d["index"], 2), size=shape).astype(dt))
        elif dt == np.bool_:
            out.append(rng.integers(0, 2, size=shape).astype(np.bool_))
        else:
            out.append(rng.random(size=shape).astype(dt))
    return out


def load_inputs(path, details, np):
    """Per input, a list of samples from an .npz (by input name, else arr_<i>): one sample of the
    input's shape, or a stack of N samples with shape [N, *input shape] (real samples kept next to
    the model), cycled over the runs. Float data for an integer input is quantized with that
    input's scale/zero point, as the model expects."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/BadZipFile for bad files
        _fail("usage", "cannot read inputs %s: %s" % (path, e), 2)
    if not hasattr(data, "files"):  # an .npy: `name in data` would search its values
        _fail("usage", "inputs %s is one array (.npy); pass an .npz with one array per input "
              "(numpy.savez(path, **{input_name: array}))" % path, 2)
    out = []
    for i, d in enumerate(details):
        key = d["name"] if d["name"] in data else "arr_%d" % i
        if key not in data:
            _fail("usage", "inputs file has no array for input %r (or arr_%d)" % (d["name"], i), 2)
        x = np.asarray(data[key])
        dt = np.dtype(d["dtype"])
        shape = [int(v) for v in d["shape"]]
        if x.ndim == len(shape) + 1 and list(x.shape[1:]) == shape and x.shape[0] >= 1:
            samples = list(x)
        elif x.size == int(np.prod(shape)):
            samples = [x]
        else:
            _fail("usage", "input %r needs shape %s (one sample) or [N, %s] (N samples), the file has %s"
                  % (d["name"], shape, ", ".join(str(v) for v in shape), list(x.shape)), 2)
        scale, zp = d.get("quantization", (0.0, 0))
        if x.dtype.kind == "f" and dt.kind in "iu":
            if not scale:
                _fail("usage", "float data for integer input %r, which has no quantization" % d["name"], 2)
            info = np.iinfo(dt)
            samples = [np.clip(np.round(s / scale + zp), info.min, info.max) for s in samples]
        out.append([np.asarray(s).astype(dt).reshape(shape) for s in samples])
    counts = sorted({len(s) for s in out})
    if len(counts) > 1:
        _fail("usage", "inputs file holds different sample counts per input (%s); give every input "
              "the same N" % ", ".join(map(str, counts)), 2)
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
        if "/" not in delegate and "." not in delegate:  # "gpu", "nnapi": a name, not a library path
            _fail("usage", "delegate %r is neither xnnpack, none nor a delegate library path (.so); "
                  "gpu and nnapi are for phones (edgeq profile --device an Android profile), edgetpu for a "
                  "board with a Coral (edgeq profile --device its profile)" % delegate, 2)
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
        samples = load_inputs(a.inputs, in_details, np)
        input_source = "file"
    else:
        samples = [[x] for x in make_inputs(in_details, rng, np, index_bounds(interp, np))]
        input_source = "random"
    n_samples = len(samples[0]) if samples else 1
    runs_done = [0]

    def run_once():
        k = runs_done[0] % n_samples  # several samples: each run takes the next one
        runs_done[0] += 1
        for d, xs in zip(in_details, samples):
            interp.set_tensor(d["index"], xs[k])
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
        "input_samples": n_samples,
        "outputs_sha256": h.hexdigest(),
        "device": {"machine": platform.machine(), "cpu_model": cpu_model(), "cpu_features": cpu_features(),
                   "system": platform.system(), "release": platform.release(),
                   "python": platform.python_version(), "numpy": np.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
