"""A written model has run: load the quantized model in the target runtime with the target's
interpreter options, run it on held-out samples, compare with float, and report what the
delegate took.

The runtime is ai_edge_litert's Interpreter with the options a device profile implies: XNNPACK (the
default delegate of the CPU runtimes) for CPU profiles and the host, the profile's thread count.
Accelerator delegates (GPU, NNAPI, QNN, Edge TPU) cannot run here; their CPU fallback path is what
is checked. Ops XNNPACK does not take run on the builtin kernels, whose prepare step is stricter
(e.g. conv.cc's "zero_point != 0"), so every node is also prepared once without the delegate: on a
device whose XNNPACK is older, more nodes land there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import QuantizationError
from .quiet import quiet_native
from .fidelity import Fidelity, compare, fed_back, run_signature

DEFAULT_THREADS = 2
# Ops whose int8 kernel outside XNNPACK costs time. SOFTMAX is left out: XNNPACK has no int8 softmax,
# so every int8 classifier ends on the builtin one, which is cheap; warning about it would be noise.
_INT8_COMPUTE = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                           "BATCH_MATMUL", "ADD", "MUL", "SUB", "AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN",
                           "CONCATENATION", "PAD", "RESIZE_BILINEAR", "LOGISTIC", "TANH",
                           "HARD_SWISH", "LEAKY_RELU", "PRELU"})


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int = DEFAULT_THREADS
    xnnpack: bool = True  # the runtime's default delegate (TFLite/LiteRT CPU runtimes apply it)
    target: str = "this host"  # for messages: the profile id
    # the profile's runtime is not the one that runs here: said in the label ("ran under rpi4" read as if
    # tflite-runtime 2.14 had run the file; its kernels differ)
    stand_in: str = ""

    @property
    def label(self) -> str:
        return (f"{self.target} ({'XNNPACK' if self.xnnpack else 'builtin kernels'}, {self.threads} threads"
                + (f"; {self.stand_in}" if self.stand_in else "") + ")")


def runtime_options(profile=None) -> RuntimeOptions:
    """Interpreter options a device profile implies (None: this host, XNNPACK, 2 threads)."""
    if profile is None:
        return RuntimeOptions()
    delegate = str(profile.delegate)
    here = _litert_version()
    rt = profile.runtime
    stand_in = "" if (str(rt.name), rt.version) == ("ai-edge-litert", here) else \
        f"run by ai-edge-litert {here} here, not its {rt.label}"
    if profile.accelerator is not None:  # "ran under coral-edgetpu" read as a run on the Edge TPU
        cpu = f"every op on this host's CPU, not the {profile.accelerator.name}"
        stand_in = f"{cpu}; {stand_in}" if stand_in else cpu
    # Accelerator profiles: the ops the accelerator refuses run on the CPU runtime, with XNNPACK.
    return RuntimeOptions(threads=int(profile.threads), xnnpack=delegate != "none", target=profile.id,
                          stand_in=stand_in)


def _litert_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class Delegation:
    nodes: int  # nodes of the model's execution plan before delegation
    delegated: int  # nodes the delegate took
    partitions: int  # delegate kernels the graph was cut into
    builtin_ops: tuple[str, ...]  # names of the nodes left on the builtin kernels, in order

    @property
    def builtin_int8_compute(self) -> tuple[str, ...]:
        return tuple(n for n in self.builtin_ops if n in _INT8_COMPUTE)

    def summary(self) -> str:
        s = f"XNNPACK took {self.delegated}/{self.nodes} nodes in {self.partitions} partition(s)"
        if self.builtin_ops:
            counts: dict[str, int] = {}
            for n in self.builtin_ops:
                counts[n] = counts.get(n, 0) + 1
            s += "; builtin kernels ran " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())
        return s

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "delegated": self.delegated, "partitions": self.partitions,
                "builtin_ops": list(self.builtin_ops)}


@dataclass(frozen=True)
class RunCheck:
    options: RuntimeOptions
    samples: int
    delegation: Delegation | None  # None without XNNPACK
    fidelity: Fidelity | None  # None without a float reference
    outputs: dict[str, np.ndarray]

    def warnings(self) -> list[str]:
        out = []
        d = self.delegation
        if d is not None and d.builtin_int8_compute:
            out.append(f"{self.options.target}: {d.summary()} (int8 compute ops outside XNNPACK run slower and "
                       "cut the delegated graph)")
        return out

    def to_json(self) -> dict:
        return {"runtime": self.options.label, "samples": self.samples,
                "delegation": self.delegation.to_json() if self.delegation else None,
                "fidelity": self.fidelity.to_json() if self.fidelity else None}


def check_runs(model: bytes, samples: Sequence[dict[str, np.ndarray]], options: RuntimeOptions = RuntimeOptions(),
               reference: dict[str, np.ndarray] | None = None, signature_key: str = "serving_default") -> RunCheck:
    """Prepare and run `model` as the target would, on `samples` (keyed by signature input name).
    Raises QuantizationError, one line naming the op, when it cannot prepare or run, or when an
    output is not finite. `reference`: float outputs on the same samples (fidelity.run_model)."""
    if options.xnnpack:
        # Nodes the delegate refuses are prepared by the builtin kernels; preparing them all there
        # first also gives the kernel's own reason (XNNPACK only says "failed to delegate").
        # A custom op only XNNPACK implements (MediaPipe's Convolution2DTransposeBias) cannot be
        # prepared without it; the delegated run is then the whole check.
        _prepare(model, options, xnnpack=False, allow_unresolved_custom=True)
    interp = _prepare(model, options, xnnpack=options.xnnpack)
    delegation = delegation_of(interp) if options.xnnpack else None
    outputs = _run(interp, samples, signature_key, options)
    for name, y in outputs.items():
        if y.size and not np.all(np.isfinite(y)):
            raise QuantizationError(f"the quantized model ran under {options.label} but output {name!r} has "
                                    "NaN/inf values; try another --calibration method or --scheme dynamic")
    fid = compare(reference, outputs, not_class=fed_back(model)) if reference is not None and samples else None
    return RunCheck(options, len(samples), delegation, fid, outputs)


def _interpreter(model: bytes, options: RuntimeOptions, xnnpack: bool):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=model, num_threads=options.threads, experimental_op_resolver_type=resolver)


def _prepare(model: bytes, options: RuntimeOptions, xnnpack: bool, allow_unresolved_custom: bool = False):
    where = options.label if xnnpack else f"{options.target} (builtin kernels, for ops XNNPACK leaves)"
    try:
        with quiet_native():
            interp = _interpreter(model, options, xnnpack)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        if allow_unresolved_custom and "unresolved custom op" in str(e):
            return None
        raise run_error(str(e), where, "prepare") from None
    return interp


def _run(interp, samples, signature_key: str, options: RuntimeOptions) -> dict[str, np.ndarray]:
    keys = list(interp.get_signature_list())
    runner = interp.get_signature_runner(signature_key if signature_key in keys else keys[0])
    try:
        return run_signature(runner, samples)
    except (ValueError, RuntimeError) as e:
        raise run_error(str(e), options.label, "run") from None


_NODE = re.compile(r"Node number (\d+) \(([^)]+)\) failed to (prepare|invoke)")
_XNNPACK_NODE = re.compile(r"failed to delegate (\w+) node #(\d+)")
_UNRESOLVED = re.compile(r"(?:unresolved custom op|find op for builtin opcode)[:\s]*'?([\w:]+)'?(?: version '(\d+)')?",
                         re.IGNORECASE)


def run_error(text: str, where: str, stage: str) -> QuantizationError:
    """The interpreter's error text as one line: op index, op name, reason, what to try."""
    text = " ".join(text.split())
    m = _NODE.search(text)
    x = _XNNPACK_NODE.findall(text)
    if m and "XNNPACK" in m.group(2).upper() and x:  # the delegate kernel failed: name the node it built
        op, index = x[-1][0], int(x[-1][1])
        return QuantizationError(
            f"the quantized model cannot {m.group(3)} under {where}: op #{index} {op} failed: XNNPACK could "
            f"not build it from its quantization parameters; keep {op} float with a --device profile whose "
            "[ops] table says so, or try --scheme dynamic")
    if m:
        index, op, what = int(m.group(1)), m.group(2), m.group(3)
        reason = text[:m.start()].strip()
        # The kernel's own message precedes "Node number": keep its last sentence, without paths.
        reason = re.sub(r"\S*/(\w+\.cc):\d+", r"\1", reason.split("failed to delegate")[-1]).strip(" .#0123456789")
        reason = reason or "the kernel rejected its tensors"
        return QuantizationError(
            f"the quantized model cannot {what} under {where}: op #{index} {op} failed: {reason[:160]}; "
            f"keep {op} float with a --device profile whose [ops] table says so, or try --scheme dynamic")
    u = _UNRESOLVED.search(text)
    if u:
        op = u.group(1) + (f" v{u.group(2)}" if u.group(2) else "")
        return QuantizationError(f"the quantized model cannot {stage} under {where}: the runtime has no kernel for "
                                 f"{op}; keep that op float with a --device profile, or try --scheme dynamic")
    return QuantizationError(f"the quantized model cannot {stage} under {where}: {text[:200]}; "
                             "try --scheme dynamic or a --device profile that keeps the failing op float")


def delegation_of(interp) -> Delegation:
    """Which nodes the delegate took, from the interpreter's node list after delegation: each
    DELEGATE node replaced the nodes between its inputs and outputs (partitions are convex)."""
    ops = interp._get_ops_details()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    plain = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): o["index"] for o in plain for t in o["outputs"]}
    by_index = {o["index"]: o for o in plain}
    taken: set[int] = set()
    for d in delegates:
        stop = {int(t) for t in d["inputs"]}
        todo = [int(t) for t in d["outputs"]]
        seen: set[int] = set()
        while todo:
            t = todo.pop()
            if t in seen or t in stop:
                continue
            seen.add(t)
            p = producer.get(t)
            if p is None or p in taken:
                continue
            taken.add(p)
            todo.extend(int(x) for x in by_index[p]["inputs"] if int(x) >= 0)
    left = tuple(o["op_name"] for o in plain if o["index"] not in taken)
    return Delegation(len(plain), len(taken), len(delegates), left)
