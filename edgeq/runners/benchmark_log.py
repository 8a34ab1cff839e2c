"""Parse the text TFLite's `benchmark_model` prints into the edgeq.bench/1 statistics.

benchmark_model reports microseconds through C++ streams (default precision 6, so large
values look like ``1.24027e+06``); lines may carry an ``INFO: `` level prefix and, when read
from ``adb logcat``, a logcat prefix. Everything is converted to milliseconds here.

Only the standard library: this module is imported by `edgeq profile` and must stay light.
"""

import re

from ..errors import DeviceError

SCHEMA = "edgeq.bench/1"

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# logcat "threadtime" (11-23 10:00:00.000  1234  1234 I tflite  : msg) and "brief" (I/tflite( 123): msg).
_LOGCAT = re.compile(r"^\s*(?:\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+[VDIWEF]\s+[^:]*?\s*:\s?"
                     r"|[VDIWEF]/[^(:]*(?:\(\s*\d+\))?\s*:\s?)")
_LEVEL = re.compile(r"^\s*(?:INFO|WARNING|ERROR|VERBOSE|DEBUG):\s?")
_KV = re.compile(r"(\w+)=(%s)" % _NUM)
_TIMINGS = re.compile(r"Inference timings in us: Init: (%s), First inference: (%s), "
                      r"Warmup \(avg\): (%s), Inference \(avg\): (%s)" % ((_NUM,) * 4))
_MEM_DELTA = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) "
                        r"\(MB\): init=(%s) overall=(%s)" % (_NUM, _NUM))
_MEM_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: (%s)" % _NUM)
_REPLACING = re.compile(r"Replacing (\d+) (?:out of (\d+) )?node\(s\) with delegate \(([^)]*)\) node"
                        r"(?:, yielding (\d+) partitions)?")
# The statement benchmark_model prints per delegate after applying it (benchmark_tflite_model.cc):
# completely / partially (w/ N delegate kernels) / not executed. Only the last says "no node at all"
# reliably: a Replacing line may still have claimed nodes the delegate then failed to prepare.
_APPLIED = re.compile(r"Explicitly applied (\S+) delegate, and the model graph will be (completely|partially) "
                      r"executed by the delegate(?: w/ (\d+) delegate kernels)?")
_NOT_APPLIED = re.compile(r"Though (\S+) delegate is explicitly applied, the model (?:graph )?will not be "
                          r"executed by the delegate")
_NNAPI_ACCELERATORS = re.compile(r"NNAPI accelerators available: \[([^\]]*)\]")
_VERSION = re.compile(r"(?:Tensorflow|TensorFlow|LiteRT) Version\s*:\s*(\S+)")
# One row of an op-profiling "Run Order" table; node types may contain spaces ("Vx Delegate").
_OP_ROW = re.compile(r"^\s*(?P<type>\S.*?)\s+(?P<first>%s)\s+(?P<avg>%s)\s+(?P<pct>%s)%%\s+(?P<cdf>%s)%%"
                     r"\s+(?P<mem>%s)\s+(?P<times>\d+)\s*(?P<name>.*?)\s*$" % ((_NUM,) * 5))


def strip_prefix(line):
    """The message part of a line: without a logcat prefix and without an ``INFO: `` level tag."""
    return _LEVEL.sub("", _LOGCAT.sub("", line, count=1), count=1)


def _ms(us):
    return float(us) / 1000.0


def _stats(kv):
    """A `count= first= curr= min= max= avg= std= [p5= median= p95=]` line, in ms."""
    out = {"count": int(float(kv["count"]))}
    for key, name in (("min", "min_ms"), ("max", "max_ms"), ("avg", "mean_ms"), ("std", "std_ms"),
                      ("p5", "p5_ms"), ("median", "median_ms"), ("p95", "p95_ms")):
        out[name] = _ms(kv[key]) if key in kv else None
    return out


def parse_op_profile(text):
    """Rows of the first Run Order table after 'Operator-wise Profiling Info for Regular Benchmark Runs'.

    Only the regular-runs table counts: the initialization table lists ModifyGraphWithDelegate etc.
    """
    rows, state = [], "before"
    for line in text.splitlines():
        msg = strip_prefix(line)
        if state == "before":
            if "Operator-wise Profiling Info for Regular Benchmark Runs" in msg:
                state = "section"
        elif state == "section":
            if "Run Order" in msg:
                state = "header"
        elif state == "header":
            if "[node type]" in msg:
                state = "rows"
        else:
            m = _OP_ROW.match(msg)
            if not m:
                break
            rows.append({"node_type": m["type"], "first_ms": float(m["first"]), "avg_ms": float(m["avg"]),
                         "pct": float(m["pct"]), "cdf_pct": float(m["cdf"]), "mem_kb": float(m["mem"]),
                         "times_called": int(m["times"]), "name": m["name"]})
    return rows


def is_delegate_node(node_type):
    """True for the fused node a delegate puts in the graph (TfLiteGpuDelegateV2, Vx Delegate, ...)."""
    return "delegate" in node_type.lower()


def parse(text):
    """Parse benchmark_model output into an edgeq.bench/1 dict (times in ms, memory in MB).

    Raises DeviceError when the text holds no timing statistics (the run failed or was cut off);
    the message quotes the tool's last ERROR line when there is one.
    """
    lines = text.splitlines()
    msgs = [strip_prefix(line) for line in lines]
    count_lines, errors, delegations = [], [], []
    timings = mem_delta = peak = version = accelerators = None
    statements = []
    for msg in msgs:
        if re.search(r"(?:^|\s)count=\d", msg):
            count_lines.append(dict(_KV.findall(msg)))
        if m := _TIMINGS.search(msg):
            timings = [_ms(v) for v in m.groups()]
        if m := _MEM_DELTA.search(msg):
            mem_delta = (float(m[1]), float(m[2]))
        if m := _MEM_PEAK.search(msg):
            peak = float(m[1])
        if m := _REPLACING.search(msg):
            delegations.append({"delegated": int(m[1]), "total": int(m[2]) if m[2] else None,
                                "delegate": m[3], "partitions": int(m[4]) if m[4] else None})
        if version is None and (m := _VERSION.search(msg)):
            version = m[1]
        if m := _APPLIED.search(msg):
            statements.append({"delegate": m[1], "execution": "complete" if m[2] == "completely" else "partial",
                               "kernels": int(m[3]) if m[3] else None})
        if m := _NOT_APPLIED.search(msg):
            statements.append({"delegate": m[1], "execution": "none", "kernels": 0})
        if m := _NNAPI_ACCELERATORS.search(msg):
            accelerators = [a.strip() for a in m[1].split(",") if a.strip()]
    for line in lines:
        if re.match(r"^\s*(?:ERROR:|.*\bE\s+tflite\s*:)", line):
            errors.append(strip_prefix(line).strip())
    if timings is None and not count_lines:
        hint = ("; last error: %s" % errors[-1]) if errors else ""
        raise DeviceError("benchmark_model printed no timing statistics (run failed or output cut off)%s; "
                          "check the model runs with this delegate, or rerun with op profiling off" % hint)

    # The first count= line is the warmup phase when there are two; the last one is the timed runs.
    if count_lines and "min" in count_lines[-1]:
        runs = _stats(count_lines[-1])
    else:  # older or cut logs: only the summary line survived
        runs = dict.fromkeys(("count", "min_ms", "max_ms", "mean_ms", "std_ms", "p5_ms", "median_ms", "p95_ms"))
    warm_kv = count_lines[0] if len(count_lines) >= 2 else None
    result = {
        "schema": SCHEMA,
        "runtime": {"name": "benchmark_model", "version": version},
        "init_ms": timings[0] if timings else None,
        "first_inference_ms": timings[1] if timings else None,
        "warmup": {"count": int(float(warm_kv["count"])) if warm_kv else None,
                   "avg_ms": timings[2] if timings else (_ms(warm_kv["avg"]) if warm_kv and "avg" in warm_kv
                                                         else None)},
        "runs": runs,
        "memory_mb": {"init_delta": mem_delta[0] if mem_delta else None,
                      "overall_delta": mem_delta[1] if mem_delta else None,
                      "peak_rss": peak},
        "delegations": delegations,
        "delegate_statements": statements,
        "nnapi_accelerators": accelerators,
        "delegate_coverage": coverage(delegations),
        "op_profile": parse_op_profile(text),
        "errors": errors,
    }
    if runs["mean_ms"] is None and timings:
        runs["mean_ms"] = timings[3]
    return result


def coverage(delegations, delegate=None):
    """Sum 'Replacing N out of M node(s)' lines for one delegate (name substring), or the last one seen.

    Returns {delegated, total, delegate, ratio} or None when no delegate took any node.
    Several lines for the same delegate are separate subgraphs, so they add up.
    """
    if delegate:
        picked = [d for d in delegations if delegate.lower() in d["delegate"].lower()]
    else:
        picked = [d for d in delegations if d["delegate"] == delegations[-1]["delegate"]] if delegations else []
    if not picked:
        return None
    delegated = sum(d["delegated"] for d in picked)
    total = None if any(d["total"] is None for d in picked) else sum(d["total"] for d in picked)
    return {"delegated": delegated, "total": total, "delegate": picked[-1]["delegate"],
            "ratio": (delegated / total) if total else None}


def delegate_coverage(parsed, names):
    """Coverage of one delegate in a parsed log, from its Replacing lines and the statement
    benchmark_model prints after applying it. `names` are lower-case substrings of its names in
    the log (("nnapi",) matches TfLiteNnapiDelegate and NNAPI).

    Returns {delegated, total, delegate, ratio, execution, kernels} or None when the log says
    nothing about this delegate. execution is "complete", "partial", "none" or None (no statement):
    "none" is coverage 0 whatever a Replacing line claimed; "complete" without a Replacing line is
    ratio 1.0 with the node counts unknown; "partial" without one is ratio None (unknown).
    """
    cov = None
    for name in names:
        cov = cov or coverage(parsed["delegations"], name)
    said = [st for st in parsed.get("delegate_statements") or []
            if any(n in st["delegate"].lower() for n in names)]
    statement = said[-1] if said else None
    if cov is None and statement is None:
        return None
    cov = dict(cov or {"delegated": None, "total": None, "delegate": statement["delegate"], "ratio": None})
    execution = statement["execution"] if statement else None
    if execution == "none":
        cov.update(delegated=0, ratio=0.0)
    elif execution == "complete" and cov["ratio"] is None:
        cov.update(ratio=1.0, delegated=cov["total"])
    cov.update(execution=execution, kernels=statement["kernels"] if statement else None)
    return cov


def cpu_ops(op_profile):
    """Node types that ran on the CPU (every profiled node that is not a delegate kernel), in run order."""
    seen = []
    for row in op_profile:
        if not is_delegate_node(row["node_type"]) and row["node_type"] not in seen:
            seen.append(row["node_type"])
    return seen
