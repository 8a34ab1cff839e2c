"""tflite_edit: buffers stored after the flatbuffer survive load -> edit -> pack.

The LiteRT quantizer writes a model's buffers after the flatbuffer (buffer.offset/size into the file)
once its large buffers pass 256 KB; a model with a 640x512 FULLY_CONNECTED gets written that way for
real here. Real TFLite converter, LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from edgeq.errors import ModelFormatError
from edgeq.fidelity import run_model
from tests.conftest import quantize_plain

SEED = 3


def _samples(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 64)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def wide_int8(tf):
    """(float model, its int8 model with offset buffers, held-out samples)."""
    rng = np.random.default_rng(SEED)
    w1 = tf.constant(rng.normal(0, 0.2, (64, 640)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.05, (640, 512)).astype(np.float32))

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)}

    m = M()
    f = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()
    return f, quantize_plain(f, _samples(16, SEED)), _samples(8, SEED + 1)


def _offset_buffers(model: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every buffer stored after the flatbuffer, read without tflite_edit."""
    m = te.schema().ModelT.InitFromPackedBuf(bytearray(model), 0)
    return [(int(b.offset), int(b.size)) for b in m.buffers if b.offset and b.offset > 1]


def _weights(model) -> list[np.ndarray]:
    """The FULLY_CONNECTED weights of a model (bytes, or a ModelT as it stands)."""
    m = te.load(model) if isinstance(model, bytes) else model
    sg = m.subgraphs[0]
    return [te.constant(m, sg, int(op.inputs[1])) for op in sg.operators if te.op_name(m, op) == "FULLY_CONNECTED"]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return len(wa) == len(wb) == 2 and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def test_the_quantizer_really_writes_offset_buffers(wide_int8):
    _, q, _ = wide_int8
    offsets = _offset_buffers(q)
    # The premise of the tests below: the 640x512 int8 weight (327,680 bytes) lies after the flatbuffer.
    assert any(size == 640 * 512 for _, size in offsets), offsets
    assert all(off + size <= len(q) for off, size in offsets)


def test_load_reads_offset_buffers_and_pack_keeps_them(wide_int8):
    _, q, held = wide_int8
    w = _weights(q)
    assert [a.shape for a in w] == [(640, 64), (512, 640)] and all(a.dtype == np.int8 for a in w)
    assert np.abs(w[1].astype(np.int32)).max() == 127  # real symmetric per-channel data, not zeros
    repacked = te.pack(te.load(q))
    assert _offset_buffers(repacked) == []  # inline now
    assert _same_weights(q, repacked)
    assert abs(len(repacked) - len(q)) < 4096  # the same bytes, only not after the flatbuffer
    before, after = run_model(q, held)["y"], run_model(repacked, held)["y"]
    assert np.array_equal(before, after)
    with pytest.raises(ModelFormatError, match=r"lies past its end .* truncated"):
        te.load(q[:-1000])


def test_an_edit_of_an_offset_buffer_is_what_runs(wide_int8):
    """Zeroing the second FC's weights of channel 0 zeroes output 0 and nothing else."""
    _, q, held = wide_int8
    m = te.load(q)
    sg = m.subgraphs[0]
    fc = [op for op in sg.operators if te.op_name(m, op) == "FULLY_CONNECTED"][1]
    w = te.constant(m, sg, int(fc.inputs[1])).copy()
    w[0] = 0
    te.set_constant(m, sg, int(fc.inputs[1]), w, new_buffer=te.buffer_shared(m, sg.tensors[int(fc.inputs[1])].buffer))
    edited = te.pack(m)
    before, after = run_model(q, held)["y"], run_model(edited, held)["y"]
    assert np.abs(before[..., 0]).max() > 0.01 and np.abs(after[..., 0]).max() < 1e-6
    assert np.array_equal(before[..., 1:], after[..., 1:])


def test_pack_stores_buffers_after_the_flatbuffer_past_the_inline_limit(wide_int8, monkeypatch):
    """What a model over 2 GB needs, at a limit lowered to 100 kB: the 327 kB weight goes after the
    flatbuffer again, 16-byte aligned, and the interpreter runs the file as before."""
    _, q, held = wide_int8
    m = te.load(q)
    monkeypatch.setattr(te, "INLINE_LIMIT", 100_000)
    external = te.pack(m)
    offsets = _offset_buffers(external)
    assert any(size == 640 * 512 for _, size in offsets)
    assert all(off % 16 == 0 and off + size <= len(external) for off, size in offsets)
    assert _same_weights(q, external)
    assert np.array_equal(run_model(q, held)["y"], run_model(external, held)["y"])
    # pack left the ModelT as it was: still editable, and inline once under the limit again.
    assert _same_weights(q, m)
    monkeypatch.setattr(te, "INLINE_LIMIT", 2**31 - 2**27)
    assert _offset_buffers(te.pack(m)) == []


def test_signature_added_to_a_model_with_offset_buffers(wide_int8):
    """signature.ensure_signature repacks through tflite_edit: a model without a SignatureDef whose
    weights lie after the flatbuffer gets one and still computes the same (before, its repack
    dropped the offset buffers and the weights read as garbage)."""
    from edgeq.signature import ensure_signature, signature_specs

    _, q, held = wide_int8
    assert _offset_buffers(q)
    m = te.load(q)
    m.signatureDefs = []
    unsigned = te.pack(m)
    signed, added = ensure_signature(unsigned)
    assert added and _same_weights(signed, q)
    (spec,), _ = signature_specs(signed)  # the added signature names tensors, not the original keys
    want = run_model(q, held)
    got = run_model(signed, [{spec.name: s["x"]} for s in held])
    assert len(want) == len(got) == 1
    assert np.array_equal(next(iter(want.values())), next(iter(got.values())))


def test_overwrite_buffer_writes_in_place_only_what_fits(tiny_cnn):
    """Sequential weight rounding rewrites one layer's weights at a time: in the packed bytes, without
    a load/pack of the whole model; a value of another size is refused and nothing is written."""
    m = te.load(tiny_cnn)
    sg = m.subgraphs[0]
    i = next(i for i, t in enumerate(sg.tensors) if te.constant(m, sg, i) is not None
             and te.constant(m, sg, i).dtype == np.float32 and te.constant(m, sg, i).size > 8)
    old = te.constant(m, sg, i)
    buf = bytearray(tiny_cnn)
    new = (old + 1.0).astype(np.float32)
    assert te.overwrite_buffer(buf, sg.tensors[i].buffer, new)
    nm = te.load(bytes(buf))
    assert np.array_equal(te.constant(nm, nm.subgraphs[0], i), new)
    assert len(buf) == len(tiny_cnn)
    before = bytes(buf)
    assert not te.overwrite_buffer(buf, sg.tensors[i].buffer, new[:-1])
    assert not te.overwrite_buffer(buf, 10 ** 6, new)
    assert bytes(buf) == before


def test_overwrite_buffer_writes_an_offset_buffer_in_place(wide_int8):
    """A model with buffers after the flatbuffer (the quantizer's layout for big weights, a model
    over 2 GB's only layout): the in-place write lands at the buffer's offset, the file's layout
    and length stay, and the interpreter runs the new weights (channel 0 zeroed -> output 0 zero)."""
    _, q, held = wide_int8
    m = te.load(q)
    sg = m.subgraphs[0]
    fc = [op for op in sg.operators if te.op_name(m, op) == "FULLY_CONNECTED"][1]
    t = int(fc.inputs[1])
    buffer = sg.tensors[t].buffer
    assert any(size == 640 * 512 for _, size in _offset_buffers(q))  # the premise: an offset buffer
    w = te.constant(m, sg, t).copy()
    w[0] = 0
    buf = bytearray(q)
    assert te.overwrite_buffer(buf, buffer, w)
    assert len(buf) == len(q) and _offset_buffers(bytes(buf)) == _offset_buffers(q)
    assert np.array_equal(_weights(bytes(buf))[1], w)
    before, after = run_model(q, held)["y"], run_model(bytes(buf), held)["y"]
    assert np.abs(before[..., 0]).max() > 0.01 and np.abs(after[..., 0]).max() < 1e-6
    assert np.array_equal(before[..., 1:], after[..., 1:])
    assert not te.overwrite_buffer(buf, buffer, w[:-1])


def test_prefix_runs_only_what_the_wanted_tensors_need_and_takes_weight_writes(tiny_cnn, calib):
    """Sequential weight rounding runs the int8 model cut after the layer inputs it reads: the cut
    model gives those tensors bit for bit, holds fewer ops and fewer bytes, and a weight written
    into it in place (overwrite_buffer, same buffer index) changes what follows that layer exactly
    as in the whole model."""
    from edgeq.weight_layers import capture, weight_layers

    q = quantize_plain(tiny_cnn, calib[:16])
    lays = sorted(weight_layers(q, tiny_cnn), key=lambda lay: lay.op_index)
    m = te.load(q)
    sg = m.subgraphs[0]
    wanted = [lays[1].input, lays[2].input]
    cut = te.prefix(m, wanted)
    cm = te.load(cut)
    assert len(cm.subgraphs[0].operators) == len(te.ancestors(sg, wanted)) < len(sg.operators)
    assert len(cut) < len(q) and te.pack(m) == te.pack(te.load(q))  # `m` is kept as it was

    def values(model):
        out = {}
        capture(bytes(model), calib[:4], wanted, lambda i, t, v: out.setdefault((i, t), v.copy()))
        return out

    whole, part = values(q), values(cut)
    assert whole.keys() == part.keys() and all(np.array_equal(whole[k], part[k]) for k in whole)
    # The first layer's weights flipped in sign, in both: the second layer's input moves, the same way.
    w = lays[0].quantized_weight(m)
    flipped = np.clip(-w.astype(np.int16), -127, 127).astype(np.int8)
    buf = sg.tensors[lays[0].weight].buffer
    q2, cut2 = bytearray(q), bytearray(cut)
    assert te.overwrite_buffer(q2, buf, flipped) and te.overwrite_buffer(cut2, buf, flipped)
    whole2, part2 = values(q2), values(cut2)
    assert not np.array_equal(whole2[(0, wanted[0])], whole[(0, wanted[0])])
    assert all(np.array_equal(whole2[k], part2[k]) for k in whole2)
    # The last layer's weights are not needed to reach its input: emptied in the cut model.
    assert lays[-1].op_index not in te.ancestors(sg, wanted)
    assert not te.overwrite_buffer(bytearray(cut), sg.tensors[lays[-1].weight].buffer,
                                   lays[-1].quantized_weight(m))
