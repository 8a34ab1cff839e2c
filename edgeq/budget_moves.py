"""Which ops the accuracy-budget loop may move out of the scheme's precision, and in what order.

Rounding a tensor to int8 is where the error enters, and a move only helps when it keeps a noisy
tensor unquantized: its producer and its consumers leave int8 together. One op alone buys nothing,
because its neighbour re-quantizes the same value (measured on all-MiniLM-L6-v2: moving every GELU,
or every SOFTMAX, or every MEAN alone left cosine at 0.7934 exactly). `static_moves` takes the
per-tensor rounding noise (layer_error.rounding_noise): weight-less ops joined by noisy tensors form
regions (tier 1: cheap to keep float), and each matmul with its neighbours forms a move of its own
(tier 2: hybrid where the target runs it, else float; these carry int8's speed). Tensors with no
noise of their own (RESHAPE, TRANSPOSE, ...: int8 kernels keep their input's scale) never justify
a move. `measured_moves` ranks single ops by measured damage (layer_error.layer_errors): for
schemes without static activations, and for int4 weights (what they lose is in the weights).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

# Matmul-like ops: where int8 buys its speed, so they leave it last (tier 2).
HEAVY_OPS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D",
                       "CONV_3D_TRANSPOSE", "BATCH_MATMUL"})
# Ops that move values without computing new ones: their int8 kernels keep the input's scale, so
# their outputs carry their input's rounding and no noise of their own.
PASS_THROUGH_OPS = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "STRIDED_SLICE", "SLICE",
                              "GATHER", "GATHER_ND", "CONCATENATION", "SPLIT", "SPLIT_V", "PACK", "UNPACK",
                              "PAD", "PADV2", "MAX_POOL_2D", "BROADCAST_TO", "TILE", "DEPTH_TO_SPACE",
                              "SPACE_TO_DEPTH", "REVERSE_V2"})
# Ops that blow up near zero. Float, they must get float inputs: an int8 variance rounded to 0
# feeds RSQRT a 0 and LayerNorm returns inf, where the int8 RSQRT clamps to its range (measured on
# MiniLM: cosine 0.79 -> -0.003 with RSQRT float and the variance int8).
SINGULAR_OPS = frozenset({"RSQRT", "SQRT", "DIV", "FLOOR_DIV", "LOG", "POW"})
# Ops that read only the shape of their input: never worth a move.
SHAPE_OPS = frozenset({"SHAPE", "RANK", "SIZE"})
# Per-channel relative rounding noise below this buys nothing measurable (1% noise on one tensor
# costs ~5e-5 cosine): such tensors never justify a move.
NOISE_FLOOR = 0.01


@dataclass(frozen=True)
class Move:
    """Ops that leave the scheme's precision together, and why."""

    ops: tuple[int, ...]  # op indices, subgraph 0
    noise: float  # sum of squared rounding noise of the tensors kept unquantized (or measured damage)
    tier: int  # 1: weight-less ops; 2: a matmul and its neighbours

    def describe(self, names: dict[int, str]) -> str:
        if len(self.ops) <= 3:
            return ", ".join(f"#{i} {names[i]}" for i in self.ops)
        counts = Counter(names[i] for i in self.ops).most_common(4)
        more = "" if len(counts) < 4 else ", ..."
        return f"{len(self.ops)} ops (" + ", ".join(f"{n} {op}" for op, n in counts[:3]) + more + ")"


class _Graph:
    def __init__(self, ops):
        self.ops = {op.index: op for op in ops}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for op in ops:
            for t in op.outputs:
                self.producer[t.name] = op.index
            for t in op.inputs:
                if not t.is_constant:
                    self.consumers.setdefault(t.name, []).append(op.index)

    def passes(self, i: int) -> bool:
        """Moves its first input's values (a GATHER from a constant table makes new ones)."""
        op = self.ops[i]
        return op.name in PASS_THROUGH_OPS and bool(op.inputs) and not op.inputs[0].is_constant

    def inputs(self, i: int) -> list[str]:
        return list(dict.fromkeys(t.name for t in self.ops[i].inputs if not t.is_constant))

    def source(self, tensor: str) -> tuple[str, list[int]]:
        """The tensor whose rounding `tensor` carries (up through pass-through producers), and those producers."""
        via: list[int] = []
        for _ in range(64):
            p = self.producer.get(tensor)
            if p is None or not self.passes(p) or not self.inputs(p):
                break
            via.append(p)
            tensor = self.inputs(p)[0]
        return tensor, via

    def reach(self, tensor: str, allowed: set[int]) -> tuple[set[int], set[int]]:
        """The ops in `allowed` that compute with `tensor` (down through pass-through ops), and the
        pass-through ops on the way to them."""
        ends: set[int] = set()
        via: set[int] = set()
        todo: list[tuple[str, tuple[int, ...]]] = [(tensor, ())]
        seen: set[str] = set()
        while todo:
            t, path = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in self.consumers.get(t, []):
                if c not in allowed:
                    continue
                if self.passes(c):
                    todo.extend((o.name, path + (c,)) for o in self.ops[c].outputs)
                else:
                    ends.add(c)
                    via.update(path)
        return ends, via


def static_moves(ops, candidates: set[int], noise: dict[str, float]) -> list[Move]:
    """Candidate moves from each tensor's rounding noise, each tier most noise first.

    A rounding point is a tensor produced by a computing op (or a model input) with noise above
    NOISE_FLOOR. Tier 1: for each one produced by a weight-less candidate, that producer and the
    weight-less candidates computing with it (through pass-through ops) must be float together;
    overlapping sets merge into regions. Tier 2: each matmul-like candidate, with the weight-less
    neighbours that keep its noisy output and inputs unquantized. A move that keeps no rounding
    point unquantized is left out: it buys nothing."""
    g = _Graph(ops)
    light = {i for i in candidates if g.ops[i].name not in HEAVY_OPS | SHAPE_OPS}
    parent = {i: i for i in light}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(members: set[int]) -> int:
        first, *rest = members
        for m in rest:
            parent[find(m)] = find(first)
        return first

    gain: list[tuple[int, float]] = []
    for t in set(g.producer) | set(g.consumers):
        p = g.producer.get(t)
        if noise.get(t, 0.0) <= NOISE_FLOOR or (p is not None and (p not in light or g.passes(p))):
            continue
        ends, via = g.reach(t, light)
        if ends:
            gain.append((join(ends | via | ({p} if p is not None else set())), noise[t] ** 2))
    for i in light:  # a float singular op gets float inputs, up through single-input ops
        if g.ops[i].name not in SINGULAR_OPS:
            continue
        todo, cur = g.inputs(i), i
        while todo:
            p = g.producer.get(todo.pop())
            if p is None or p not in light:
                continue
            join({cur, p})
            if len(g.inputs(p)) == 1:
                todo, cur = g.inputs(p), p
    regions: dict[int, list[int]] = {}
    for i in light:
        regions.setdefault(find(i), []).append(i)
    score: dict[int, float] = {}
    for member, v in gain:
        score[find(member)] = score.get(find(member), 0.0) + v
    tier1 = [Move(tuple(sorted(regions[root])), v, 1) for root, v in score.items()]

    tier2 = []
    for m in sorted(i for i in candidates if g.ops[i].name in HEAVY_OPS):
        unit, s = {m}, 0.0
        for t in g.ops[m].outputs:  # hybrid/float: the output leaves float; weight-less users keep it so
            ends, via = g.reach(t.name, light)
            if noise.get(t.name, 0.0) > NOISE_FLOOR and ends:
                unit |= ends | via
                s += noise[t.name] ** 2
        for t in g.inputs(m):  # ... and the input is not rounded statically if its producer is float too
            src, via = g.source(t)
            p = g.producer.get(src)
            if noise.get(src, 0.0) > NOISE_FLOOR and (p is None or p in light) and set(via) <= light:
                unit |= set(via) | ({p} if p is not None else set())
                s += noise[src] ** 2
        if s:
            tier2.append(Move(tuple(sorted(unit)), s, 2))
    return sorted(tier1, key=lambda mv: -mv.noise) + sorted(tier2, key=lambda mv: -mv.noise)


def measured_moves(errors, candidates: set[int]) -> list[Move]:
    """For schemes without static activations: each candidate op alone, most measured damage first."""
    moves = [Move((e.index,), e.damage, 2) for e in errors if e.index in candidates and e.damage > NOISE_FLOOR]
    return sorted(moves, key=lambda mv: -mv.noise)



def int4_moves(float_model: bytes, ops, candidates: dict[int, str], samples) -> list[Move]:
    """For int4 weights: each candidate op alone (index -> its int4 precision), most damage first.

    The damage is what its int4 weights would add to its own output on float inputs: per output
    channel, |x.(w - q(w))| / |x.w| with each input channel weighted by its measured mean square
    on `samples` (diagonal approximation; transformers' outlier channels make the weighting matter),
    q the quantizer's symmetric int4 rounding per channel or per block. Measuring it in the all-int4
    model instead (layer_errors) charges downstream layers with what they inherit: on a 3-FC MLP
    the output FC, whose int4 costs 0.04 cosine alone, measured under NOISE_FLOOR there."""
    from .layer_error import capture
    from .precision import INT4_BLOCK_SIZE, Precision
    from .tflite_ops import weight_tensor

    by_index = {op.index: op for op in ops}
    weights = {i: weight_tensor(by_index[i]) for i in candidates}
    inputs = {i: next((t.name for t in by_index[i].inputs if not t.is_constant and t.dtype.startswith("float")),
                      None) for i in candidates}
    values = capture(float_model, samples, {n for n in inputs.values() if n})
    consts = _constants(float_model, [w.index for w in weights.values() if w is not None])
    moves = []
    for i, precision in candidates.items():
        w = weights[i]
        if w is None or w.index not in consts:
            continue
        x = values.get(inputs[i]) if by_index[i].name != "EMBEDDING_LOOKUP" else None
        err = int4_weight_error(consts[w.index], INT4_BLOCK_SIZE[Precision(precision)],
                                None if x is None else (x ** 2).mean(axis=0))
        moves.append(Move((i,), err, 2))
    return sorted(moves, key=lambda mv: -mv.noise)


# Time the end-to-end measurement of single int4 moves may take (MiniLM's 37 layers: ~1.5-3 s each
# with GPTQ's cache); layers not measured by then keep int4_moves' order after the measured ones.
MEASURE_SECONDS = 240.0


def measured_int4_order(prior: list[Move], gain: Callable[[Move], float], extra: Callable[[Move], int],
                        seconds: float = MEASURE_SECONDS, advance: Callable[[int], None] = lambda n: None
                        ) -> tuple[list[Move], set[tuple[int, ...]]]:
    """int4 moves in the order that buys most accuracy per byte: each move alone measured end to end
    (`gain`: how much closer to the target it brings the result, in the target's metric; `extra`: the
    bytes it adds), best gain per byte first, then moves not measured within `seconds` (in `prior`'s
    order), then those that bought nothing. Each measured Move's `noise` is its gain; the ops of the
    measured moves come second.

    Why measured: on all-MiniLM-L6-v2 (int4-b128 with GPTQ) a layer's own int4 error ranks layers
    *against* what moving them buys end to end (Spearman -0.17; -0.34 after GPTQ): the last
    attention-output projection bought cosine +0.0041 alone, 3x any other layer, and ranked 32nd of
    37 by its own error. Late layers and the FFN count more than their own error says."""
    import time

    start, measured, rest = time.monotonic(), [], []
    for mv in prior:
        if time.monotonic() - start > seconds:
            rest.append(mv)
            continue
        measured.append(Move(mv.ops, gain(mv), mv.tier))
        advance(1)
    useful = sorted((mv for mv in measured if mv.noise > 0), key=lambda mv: -mv.noise / max(extra(mv), 1))
    useless = sorted((mv for mv in measured if mv.noise <= 0), key=lambda mv: -mv.noise)
    return useful + rest + useless, {mv.ops for mv in measured}


def int4_weight_error(w, block: int, in_power=None) -> float:
    """Mean over output channels (axis 0) of the relative error symmetric int4 rounding adds to the
    channel's output, each input channel (last axis) weighted by `in_power` (None: equally)."""
    import numpy as np

    w = np.asarray(w, np.float64)
    rows = w.reshape(w.shape[0], -1)
    groups = rows.reshape(rows.shape[0], -1, block) if block and rows.shape[1] % block == 0 else rows[:, None, :]
    scale = np.abs(groups).max(axis=2, keepdims=True) / 7.0
    q = np.clip(np.round(groups / np.where(scale == 0, 1.0, scale)), -8, 7) * scale
    e2, w2 = ((groups - q) ** 2).reshape(rows.shape), (groups ** 2).reshape(rows.shape)
    if in_power is not None and in_power.shape[0] == w.shape[-1]:
        weight = np.tile(in_power, rows.shape[1] // w.shape[-1])
        e2, w2 = e2 * weight, w2 * weight
    return float(np.minimum(np.sqrt(e2.sum(1) / np.maximum(w2.sum(1), 1e-30)), 1.0).mean())


def _constants(model: bytes, indices) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from .quiet import quiet_native

    with quiet_native():
        interp = Interpreter(model_content=model)
    out = {}
    for i in indices:
        try:
            out[i] = interp.get_tensor(i).copy()
        except ValueError:
            pass  # a tensor without readable data
    return out
