"""Cross-layer equalization (edgeq/equalize.py) on a tiny seeded depthwise-separable CNN.

The CNN (conftest.py's tiny_cnn, also used by the other accuracy-method tests) has MobileNet's trouble
built in: the first conv's output channels run at scales from 0.003 to 1 and the depthwise conv after
it undoes that, so the float function is ordinary while the per-tensor int8 grid between them starves
the small channels. Real parts: the TFLite converter, the LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np

from edgeq import tflite_edit as te
from tests.conftest import output_error, quantize_plain

def test_finds_the_depthwise_separable_pairs(tiny_cnn):
    from edgeq.equalize import find_pairs

    pairs = [(a.kind, b.kind, a.activation) for a, b, _ in find_pairs(te.load(tiny_cnn))]
    # conv->dw (ReLU6), dw->conv (ReLU6), conv->conv (linear), conv->dw (ReLU), dw->conv (ReLU6);
    # the last conv feeds MEAN, not a weight layer.
    assert pairs == [("CONV_2D", "DEPTHWISE_CONV_2D", "RELU6"), ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6"),
                     ("CONV_2D", "CONV_2D", "NONE"), ("CONV_2D", "DEPTHWISE_CONV_2D", "RELU"),
                     ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6")]


def test_equalization_is_exact_in_float_and_rewrites_the_weights(tiny_cnn, calib, held_out):
    from edgeq.equalize import equalization_error, equalize, find_pairs

    eq = equalize(tiny_cnn, calib)
    assert len(eq.pairs) == 5 and eq.skipped_relu6 == 0
    first = eq.pairs[0]
    assert first.first_output and first.scaled >= 6 and first.max_scale / first.min_scale > 10  # the 0.003..1 spread
    # Same function: float rounding on the calibration samples, and (ReLU6 margin) on others too.
    assert equalization_error(tiny_cnn, eq.model, calib) < 1e-5
    assert equalization_error(tiny_cnn, eq.model, held_out) < 1e-4
    # The file carries the new weights: the first conv's per-channel ranges are now far more even.
    before, after = te.load(tiny_cnn), te.load(eq.model)
    a, _, _ = find_pairs(before)[0]
    w0 = te.constant(before, before.subgraphs[0], a.weight)
    w1 = te.constant(after, after.subgraphs[0], a.weight)
    spread0 = np.abs(w0).reshape(8, -1).max(1)
    spread1 = np.abs(w1).reshape(8, -1).max(1)
    assert spread0.max() / spread0.min() > 100 and spread1.max() / spread1.min() < 0.1 * spread0.max() / spread0.min()


def test_equalization_lowers_int8_error(tiny_cnn, calib, held_out):
    from edgeq.equalize import equalize

    eq = equalize(tiny_cnn, calib)
    plain = output_error(tiny_cnn, quantize_plain(tiny_cnn, calib), held_out)
    equalized = output_error(tiny_cnn, quantize_plain(eq.model, calib), held_out)
    assert equalized < 0.7 * plain, (plain, equalized)


def test_relu6_channels_at_the_clip_keep_their_scale(tiny_cnn, calib):
    from edgeq.equalize import equalize

    # Inputs 20x larger drive the first conv's large channels into the ReLU6 clip.
    loud = [{"x": s["x"] * 20.0} for s in calib]
    eq = equalize(tiny_cnn, loud)
    assert eq.pairs[0].clipped >= 1
    from edgeq.equalize import equalization_error
    assert equalization_error(tiny_cnn, eq.model, loud) < 1e-5


def test_relu6_channels_that_may_reach_the_clip_keep_their_scale(tiny_cnn, calib):
    """Other data may drive a channel past its calibration maximum. A channel whose maximum times
    RELU6_MARGIN reaches 6 is left alone: scaled down, it would stop clipping where the original clips
    (the old rule did that to any channel short of 6: error 1e-2 on inputs 1.3x louder than
    calibration, now 3e-3). Every other channel stays under 6 / margin after scaling."""
    from edgeq.equalize import RELU6_MARGIN, channel_ranges, equalization_error, equalize, find_pairs

    loud = [{"x": s["x"] * 4.0} for s in calib]
    eq = equalize(tiny_cnn, loud[:8])
    assert sum(p.clipped for p in eq.pairs) >= 5
    assert equalization_error(tiny_cnn, eq.model, loud[:8]) < 1e-5
    tensors = [t for a, _, t in find_pairs(te.load(tiny_cnn)) if a.activation == "RELU6"]
    before, after = channel_ranges(tiny_cnn, loud[:8], tensors), channel_ranges(eq.model, loud[:8], tensors)
    checked = 0
    for t in tensors:
        near = before[t][1] * RELU6_MARGIN >= 6.0
        assert np.allclose(after[t][1][near], before[t][1][near], rtol=1e-5)  # s = 1
        assert np.all(after[t][1][~near] <= 6.0 / RELU6_MARGIN * (1 + 1e-5))
        checked += int(near.sum())
    assert checked >= 5
    louder = [{"x": s["x"] * 1.3} for s in loud]
    assert equalization_error(tiny_cnn, eq.model, louder) < 5e-3


def test_without_samples_relu6_pairs_are_left_alone(tiny_cnn, held_out):
    from edgeq.equalize import equalization_error, equalize

    eq = equalize(tiny_cnn)  # weights mode, data-free
    assert eq.skipped_relu6 == 3
    assert [p.activation for p in eq.pairs] == ["NONE", "RELU"]
    assert equalization_error(tiny_cnn, eq.model, held_out) < 1e-5


def test_mixed_mode_amplifies_the_tensors_into_depthwise_layers(tiny_cnn, calib, held_out):
    """MIXED amplifies the weak channels of a tensor that feeds a depthwise layer,
    whose per-channel weights absorb the inverse scale for free, and balances weight ranges for pairs
    into a conv (amplifying a 1x1 conv's input columns would coarsen its per-output-channel weight
    grid; measured worse on MobileNetV2, see docs/accuracy.md)."""
    from edgeq.equalize import EqualizeMode, channel_ranges, equalization_error, equalize, find_pairs

    mixed = equalize(tiny_cnn, calib, mode=EqualizeMode.MIXED)
    assert mixed.mode is EqualizeMode.MIXED and len(mixed.pairs) == 5
    into_dw = [p for p in mixed.pairs if p.second == "DEPTHWISE_CONV_2D"]
    # Activation rule: s = span_c / span, at most max_gain (16x) of amplification.
    assert len(into_dw) == 2 and all(p.min_scale == 1 / 16 and p.max_scale == 1.0 for p in into_dw)
    assert all(p.max_scale > 1.0 for p in mixed.pairs if p.second == "CONV_2D")  # weight rule: both ways
    assert equalization_error(tiny_cnn, mixed.model, calib) < 1e-5
    assert equalization_error(tiny_cnn, mixed.model, held_out) < 1e-4

    # The tensor between the first conv and the depthwise conv: its weakest channel spanned 0.0034 of
    # the strongest; now it spans 16 times that share of the tensor's one int8 grid.
    t = find_pairs(te.load(tiny_cnn))[0][2]

    def evenness(model: bytes) -> float:
        lo, hi = channel_ranges(model, calib, [t])[t]
        span = np.maximum(np.abs(lo), np.abs(hi))
        return float(span.min() / span.max())

    assert 15 * evenness(tiny_cnn) < evenness(mixed.model) < 17 * evenness(tiny_cnn)
    plain = output_error(tiny_cnn, quantize_plain(tiny_cnn, calib), held_out)
    assert output_error(tiny_cnn, quantize_plain(mixed.model, calib), held_out) < 0.75 * plain


def _record_channel_ranges(monkeypatch) -> list:
    """Wrap the real equalize.channel_ranges to record which tensors each call asks for."""
    import edgeq.equalize as eqm

    asked = []
    real = eqm.channel_ranges

    def recording(model, samples, tensors):
        asked.append(sorted(tensors))
        return real(model, samples, tensors)

    monkeypatch.setattr(eqm, "channel_ranges", recording)
    return asked


def test_channel_ranges_are_read_only_for_the_pairs_that_use_them(tiny_cnn, calib, monkeypatch):
    """Weights mode needs a tensor's channel maxima only behind a ReLU6 (the margin); reading the
    others costs a float run over the samples for nothing (ConvNeXt-T, no ReLU6 pair: 14 s). The
    real channel_ranges is wrapped to record what it is asked for."""
    import edgeq.equalize as eqm

    asked = _record_channel_ranges(monkeypatch)
    pairs = eqm.find_pairs(te.load(tiny_cnn))
    relu6 = sorted(t for first, _, t in pairs if first.activation == "RELU6")
    eq = eqm.equalize(tiny_cnn, calib)
    assert asked == [relu6] and 0 < len(relu6) < len(pairs) and len(eq.pairs) == 5
    asked.clear()
    mixed = eqm.equalize(tiny_cnn, calib, mode=eqm.EqualizeMode.MIXED)  # amplifying: every pair's ranges
    assert asked == [sorted(t for _, _, t in pairs)] and mixed.pairs
    # With no pair that needs them, no float run at all; the result is the same as without samples
    # for the non-ReLU6 pairs.
    asked.clear()
    monkeypatch.setattr(eqm, "find_pairs", lambda m: [p for p in pairs if p[0].activation != "RELU6"])
    only_relu = eqm.equalize(tiny_cnn, calib)
    assert asked == [] and len(only_relu.pairs) == len(pairs) - len(relu6)
    assert only_relu.model == eqm.equalize(tiny_cnn).model


def test_channel_ranges_read_in_the_statistics_pass_give_the_same_model(tiny_cnn, calib, monkeypatch):
    """The levels read equalization's channel ranges in their range-statistics pass over the same
    samples (one float run over them instead of two): the ranges are those channel_ranges measures,
    and equalize() given them runs no float pass of its own and writes the same model byte for byte.
    Only the tensors not given are measured."""
    import edgeq.equalize as eqm
    from edgeq.optimize import litert_session, uniform_recipe
    from edgeq.ranges import range_stats

    base = litert_session(uniform_recipe("int8"))(tiny_cnn, calib[:2]).base
    names = eqm.channel_tensors(tiny_cnn, eqm.EqualizeMode.MIXED)
    stats = range_stats(tiny_cnn, calib, base, channels=names)
    m = te.load(tiny_cnn)
    index = {te.tensor_name(t): i for i, t in enumerate(m.subgraphs[0].tensors)}
    measured = eqm.channel_ranges(tiny_cnn, calib, [index[n] for n in names])
    assert len(names) == 5 and sorted(stats.channels) == sorted(names)
    for n in names:
        lo, hi = stats.channels[n]
        assert lo.shape == hi.shape == (m.subgraphs[0].tensors[index[n]].shape[-1],)
        np.testing.assert_array_equal(lo, measured[index[n]][0])
        np.testing.assert_array_equal(hi, measured[index[n]][1])
    plain = eqm.equalize(tiny_cnn, calib, mode=eqm.EqualizeMode.MIXED)

    asked = _record_channel_ranges(monkeypatch)
    given = eqm.equalize(tiny_cnn, calib, mode=eqm.EqualizeMode.MIXED, known=stats.channels)
    assert asked == [] and given.model == plain.model and len(given.pairs) == len(plain.pairs) > 0
    some = {n: stats.channels[n] for n in names[:2]}
    part = eqm.equalize(tiny_cnn, calib, mode=eqm.EqualizeMode.MIXED, known=some)
    assert asked == [sorted(index[n] for n in names[2:])] and part.model == plain.model


def _bias_less_chain(tf) -> bytes:
    """conv3x3 (ReLU) -> conv1x1 (ReLU) -> conv1x1, no biases: the TFLite converter gives all three
    one shared zero bias tensor. The first conv's channels run at scales 0.003..1, undone by the next."""
    rng = np.random.default_rng(11)
    g = np.geomspace(3e-3, 1.0, 16).astype(np.float32)
    k1 = tf.constant((rng.normal(0, 0.3, (3, 3, 3, 16)) * g).astype(np.float32))
    k2 = tf.constant((rng.normal(0, 0.25, (1, 1, 16, 16)) / g[:, None]).astype(np.float32))
    k3 = tf.constant(rng.normal(0, 0.25, (1, 1, 16, 16)).astype(np.float32))

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME"))
            h = tf.nn.relu(tf.nn.conv2d(h, k2, 1, "SAME"))
            return {"y": tf.nn.conv2d(h, k3, 1, "SAME")}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def test_a_shared_zero_bias_does_not_stop_equalization(tf, calib, held_out):
    """A bias read by other ops used to refuse the pair; a zero one stays zero when divided by s, so
    the pairs are equalized (random-weight Keras ResNet50 had none: all 53 convs share one zero bias)."""
    from edgeq.equalize import equalization_error, equalize, find_pairs

    fm = _bias_less_chain(tf)
    m = te.load(fm)
    sg = m.subgraphs[0]
    biases = {int(op.inputs[2]) for op in sg.operators}
    assert len(biases) == 1 and not np.any(te.constant(m, sg, biases.pop()))  # one shared zero tensor
    assert len(find_pairs(m)) == 2
    eq = equalize(fm, calib)
    assert len(eq.pairs) == 2 and equalization_error(fm, eq.model, held_out) < 1e-5
    after = te.load(eq.model)
    sg2 = after.subgraphs[0]
    shared = {int(op.inputs[2]) for op in sg2.operators}
    assert len(shared) == 1 and not np.any(te.constant(after, sg2, shared.pop()))
    # int8 output error, measured: 0.55 -> 0.031.
    assert output_error(fm, quantize_plain(eq.model, calib), held_out) < 0.2 * output_error(fm, quantize_plain(fm, calib), held_out)


def _residual_stream(tf, mean_reads_stream: bool = False) -> bytes:
    """conv3x3 (ReLU6) -> conv1x1 p1 = P1; P1 -> conv1x1 (ReLU6) -> dw3x3 (ReLU6) -> conv1x1 p2 = P2;
    A = P1 + P2 -> conv1x1 (ReLU6) -> mean -> FC: one residual stream {P1, P2, A}, written by p1 and p2
    (linear), read by the expand conv and the conv after the sum. Its channels run at scales
    0.03..3 (MobileNetV2's 160-wide stream: 1.4..35). With `mean_reads_stream`, MEAN also reads A."""
    rng = np.random.default_rng(12)
    g = np.geomspace(0.03, 3.0, 16).astype(np.float32)

    def w(*shape, scale=0.3):
        return tf.constant(rng.normal(0, scale, shape).astype(np.float32))

    def c(a):
        return tf.constant(a.astype(np.float32))

    # the stream's channel c runs at scale g_c and its readers undo it: an ordinary float function
    k0, p1 = w(3, 3, 3, 16), c(rng.normal(0, 0.3, (1, 1, 16, 16)) * g)
    e1, d1 = c(rng.normal(0, 0.3, (1, 1, 16, 32)) / g[:, None]), w(3, 3, 32, 1, scale=0.4)
    p2 = c(rng.normal(0, 0.2, (1, 1, 32, 16)) * g)
    b1, b2 = (c(rng.normal(0, 0.1, 16) * g) for _ in range(2))
    k3, fc = c(rng.normal(0, 0.3, (1, 1, 16, 24)) / g[:, None]), w(24, 10)

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu6(tf.nn.conv2d(x, k0, 1, "SAME"))
            s1 = tf.nn.conv2d(h, p1, 1, "SAME") + b1
            h = tf.nn.relu6(tf.nn.conv2d(s1, e1, 1, "SAME"))
            h = tf.nn.relu6(tf.nn.depthwise_conv2d(h, d1, [1, 1, 1, 1], "SAME"))
            a = s1 + (tf.nn.conv2d(h, p2, 1, "SAME") + b2)
            h = tf.reduce_mean(tf.nn.relu6(tf.nn.conv2d(a, k3, 1, "SAME")), axis=[1, 2])
            if mean_reads_stream:
                h = tf.concat([h, tf.reduce_mean(a, axis=[1, 2])], axis=1)[:, :24]
            return {"y": tf.matmul(h, fc)}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def test_a_residual_stream_is_smoothed_exactly_and_lowers_int8_error(tf, calib, held_out):
    """The stream's channels get one scale everywhere (its producers' output channels and biases
    divided, its consumers' input channels multiplied), exact in float through the ADD, and the
    per-tensor int8 grid no longer starves its small channels."""
    from edgeq.equalize import STREAM_ALPHA, equalization_error, equalize, find_streams

    fm = _residual_stream(tf)
    m = te.load(fm)
    sg = m.subgraphs[0]
    (st,) = find_streams(m)
    assert len(st.tensors) == 3 and len(st.producers) == 2 and len(st.consumers) == 2
    assert {te.op_name(m, sg.operators[x.index]) for x in st.producers + st.consumers} == {"CONV_2D"}
    off = equalize(fm, calib, streams=None)
    on = equalize(fm, calib)
    assert not off.streams and len(on.streams) == 1 and on.streams[0].channels == 16
    assert equalization_error(fm, on.model, held_out) < 1e-5
    ratio = on.to_json()["streams"][0]["channel_range_ratio"]
    assert ratio[0] > 20 and ratio[1] < ratio[0] ** (1 - STREAM_ALPHA) * 1.5  # range moved into the weights
    # Read back: every producer's output channel c shrank by the factor its consumers' input channel grew.
    m2 = te.load(on.model)
    sg2 = m2.subgraphs[0]
    off_m = te.load(off.model)
    shrink = [te.constant(m2, sg2, p.weight).reshape(16, -1)[:, 0] / te.constant(off_m, off_m.subgraphs[0], p.weight)
              .reshape(16, -1)[:, 0] for p in st.producers]
    grow = [te.constant(m2, sg2, c.weight)[0, 0, 0] / te.constant(off_m, off_m.subgraphs[0], c.weight)[0, 0, 0]
            for c in st.consumers]
    np.testing.assert_allclose(shrink[0], shrink[1], rtol=1e-5)
    np.testing.assert_allclose(grow[0], grow[1], rtol=1e-5)
    np.testing.assert_allclose(shrink[0] * grow[0], 1.0, rtol=1e-5)
    assert shrink[0].max() / shrink[0].min() > 5
    before = output_error(fm, quantize_plain(off.model, calib), held_out)
    after = output_error(fm, quantize_plain(on.model, calib), held_out)
    assert after < 0.7 * before, (before, after)


def test_a_stream_read_by_another_op_is_left_alone(tf, calib, held_out):
    """MEAN reads the sum too: scaling its channels would change what MEAN gives the FC."""
    from edgeq.equalize import equalization_error, equalize, find_streams

    fm = _residual_stream(tf, mean_reads_stream=True)
    assert find_streams(te.load(fm)) == []
    eq = equalize(fm, calib)
    assert not eq.streams and equalization_error(fm, eq.model, held_out) < 1e-5

