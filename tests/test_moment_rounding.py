"""Output-aware weight rounding (edgeq/moment_rounding.py) on the tiny seeded CNN and on hand-made
quadratics.

Checks the search (never worse than round-to-nearest on its objective, the exact optimum where
nearest rounding is not), that the int8 model's output error falls on other samples, and that the
written file carries the changed int8 weights (each at most one level away, scales, biases, ops and
dtypes unchanged), also when carried over to another quantization of the same float model. Real
TFLite converter, LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeq import tflite_edit as te
from tests.conftest import output_error, quantize_plain


def test_the_search_finds_what_nearest_rounding_misses():
    from edgeq.moment_rounding import search

    # Two strongly correlated inputs, two weights that nearest rounding both moves down by 0.4 levels:
    # their errors add up; one weight rounded up instead (+0.6) nearly cancels the other (-0.4).
    m = np.array([[1.0, 0.99], [0.99, 1.0]])
    w = np.array([[10.4], [20.4]])
    q, before, after = search(w, np.array([1.0]), m)
    assert q[:, 0].tolist() in ([10.0, 21.0], [11.0, 20.0])
    assert before == pytest.approx(0.4 ** 2 * (2 + 2 * 0.99))
    assert after == pytest.approx(0.6 ** 2 + 0.4 ** 2 - 2 * 0.99 * 0.6 * 0.4)
    assert after < 0.1 * before


def _filters(rng, k: int, channels: int):
    """Weights [k, channels] and one moment matrix per channel from correlated "pixels"."""
    w = rng.normal(0, 20, (k, channels))
    x = rng.normal(0, 1, (400, channels, 1)) + 0.5 * rng.normal(0, 1, (400, channels, k))
    return w, np.einsum("nck,ncl->ckl", x, x) / 400, rng.uniform(0.5, 2.0, channels)


def _cost(q, w, scale, m):
    e = (q - w / scale) * scale
    return e @ m @ e


def test_the_search_is_exact_on_3x3_filters():
    from edgeq.moment_rounding import search

    rng = np.random.default_rng(3)
    w, moments, scale = _filters(rng, 9, 12)  # a 3x3 depthwise layer: nine weights per channel
    q, before, after = search(w / scale, scale, moments)
    bits = np.array(list(itertools.product((0, 1), repeat=9)), float)
    for c in range(12):
        every = np.floor(w[:, c] / scale[c])[None] + bits  # all 2^9 floor/ceil choices
        best = min(_cost(levels, w[:, c], scale[c], moments[c]) for levels in every)
        assert _cost(q[:, c], w[:, c], scale[c], moments[c]) == pytest.approx(best)
        assert np.all(np.abs(q[:, c] - w[:, c] / scale[c]) < 1)  # floor or ceil only
    assert after < 0.8 * before


def test_the_search_on_larger_filters_never_ends_above_nearest():
    from edgeq.moment_rounding import search

    rng = np.random.default_rng(4)
    w, moments, scale = _filters(rng, 25, 16)  # a 5x5 depthwise layer: local search
    q, before, after = search(w / scale, scale, moments)
    nearest = np.round(w / scale)
    for c in range(16):
        assert _cost(q[:, c], w[:, c], scale[c], moments[c]) <= _cost(nearest[:, c], w[:, c], scale[c], moments[c])
    assert np.all(np.abs(q - w / scale) < 1)
    assert after < 0.8 * before


@pytest.fixture(scope="module")
def rounded(tiny_cnn, calib):
    from edgeq.moment_rounding import round_weights

    q = quantize_plain(tiny_cnn, calib)
    steps = []
    return q, round_weights(q, tiny_cnn, calib, on_step=steps.append), steps


def _float_with_weights_of(float_model: bytes, quant_model: bytes) -> bytes:
    """The float model with each weight layer's weights replaced by quant_model's int8 weights,
    dequantized: activations stay float, so its error is the weights' share of the int8 error."""
    from edgeq.weight_layers import weight_layers

    fm, qm = te.load(float_model), te.load(quant_model)
    fsg = fm.subgraphs[0]
    by_output = {te.tensor_name(fsg.tensors[op.outputs[0]]): op for op in fsg.operators}
    for lay in weight_layers(quant_model, float_model):
        op = by_output[lay.name]
        te.set_constant(fm, fsg, int(op.inputs[1]), lay.dequantize(lay.quantized_weight(qm)), new_buffer=True)
    return te.pack(fm)


def test_rounding_lowers_the_output_error_on_other_samples(tiny_cnn, calib, held_out, rounded):
    q, result, steps = rounded
    # The weights' share of the int8 error (activations float), on samples the search never saw ...
    near = output_error(tiny_cnn, _float_with_weights_of(tiny_cnn, q), held_out)
    searched = output_error(tiny_cnn, _float_with_weights_of(tiny_cnn, result.model), held_out)
    assert searched < 0.8 * near
    # ... and the int8 model's whole error, where activation rounding is most of it.
    assert output_error(tiny_cnn, result.model, held_out) < output_error(tiny_cnn, q, held_out)
    assert all(lay.error_searched <= lay.error_nearest for lay in result.layers)
    assert any(lay.error_searched < 0.8 * lay.error_nearest for lay in result.layers)
    # The classifier FC sees one row per sample: 48 rows for 24 weights per channel is enough here;
    # every layer of the tiny CNN is searched and each is named in the progress.
    assert result.skipped == 0 and len(result.layers) == 7
    assert any("layer 7/7" in s for s in steps)


def test_the_file_carries_the_rounded_int8_weights(tiny_cnn, rounded):
    from edgeq.tflite_model import read_model
    from edgeq.weight_layers import weight_layers

    q, result, _ = rounded
    qm, rm = te.load(q), te.load(result.model)
    layers = weight_layers(q, tiny_cnn)
    flipped = 0
    for lay, rep in zip(layers, result.layers):
        a, b = lay.quantized_weight(qm), lay.quantized_weight(rm)
        assert b.dtype == np.int8 and np.abs(b).max() <= 127
        assert int((a != b).sum()) == rep.flipped
        assert np.all(np.abs(a.astype(int) - b.astype(int)) <= 1)  # the other neighbour of the float value
        flipped += rep.flipped
        assert np.array_equal(te.qparams(qm.subgraphs[0].tensors[lay.weight])[0],
                              te.qparams(rm.subgraphs[0].tensors[lay.weight])[0])
        if lay.bias is not None:
            assert np.array_equal(te.constant(qm, qm.subgraphs[0], lay.bias), te.constant(rm, rm.subgraphs[0], lay.bias))
    assert flipped == result.to_json()["weights_flipped"] > 0
    assert [(o.name, o.precision) for o in read_model(q).ops] == [(o.name, o.precision) for o in read_model(result.model).ops]
    assert abs(len(result.model) - len(q)) < 0.01 * len(q)


def test_the_rounding_carries_over_to_other_activation_ranges(tiny_cnn, calib, rounded):
    from edgeq.moment_rounding import apply_levels
    from edgeq.weight_layers import weight_layers

    _, result, _ = rounded
    # Another quantization of the same float model (ranges from 4 samples, not 48): its weights are
    # the same nearest-rounded int8, so the same rounding applies and gives the same weights.
    other = quantize_plain(tiny_cnn, calib[:4])
    carried = apply_levels(other, result.levels)
    cm, rm = te.load(carried), te.load(result.model)
    for lay in weight_layers(other, tiny_cnn):
        assert np.array_equal(lay.quantized_weight(cm), lay.quantized_weight(rm))
    assert apply_levels(other, {}) is other


def test_needs_samples(tiny_cnn, rounded):
    from edgeq.errors import QuantizationError
    from edgeq.moment_rounding import round_weights

    with pytest.raises(QuantizationError, match="calibration samples"):
        round_weights(rounded[0], tiny_cnn, [])


def test_the_budget_runs_out_on_the_costliest_layers(tiny_cnn, calib, rounded):
    """With no time or no work for the search every layer keeps nearest rounding and says so; the
    order is cheapest first, so a short budget spends itself on the small filters. The budget is
    work, not time: a partial search is the same on every run, whatever the machine's load."""
    from edgeq.moment_rounding import round_weights

    q, full, _ = rounded
    for none in (round_weights(q, tiny_cnn, calib, seconds=0.0), round_weights(q, tiny_cnn, calib, work=0)):
        assert none.layers == () and none.skipped == 7 and none.model == q and none.levels == {}
    assert 0 < full.work < 2.5e9 and full.skipped == 0
    half = [round_weights(q, tiny_cnn, calib, work=full.work / 2) for _ in range(2)]
    assert 1 < len(half[0].layers) < len(full.layers) and half[0].skipped == 7 - len(half[0].layers)
    assert half[0].model == half[1].model and half[0].work == half[1].work >= full.work / 2
    # The layers it reached are searched as in the full run, but the one the work ran out in (fewer
    # sweeps: never worse than nearest rounding).
    by_op = {r.op_index: r for r in full.layers}
    differ = [r for r in half[0].layers if r != by_op[r.op_index]]
    assert len(differ) <= 1 and all(r.error_searched <= r.error_nearest for r in differ)
    # In graph order in the report, whatever order they were searched in.
    assert [r.op_index for r in full.layers] == sorted(r.op_index for r in full.layers)


# --- Sequential fit: each layer to the int8 model's own inputs (Sequential) ------------------------------

def _objective(q, w, scale, m, lin):
    e = (q - w / scale) * scale
    return e @ m @ e + 2 * e @ lin


def test_the_exact_search_keeps_the_int8_limits():
    """A weight past +-127 / scale has one level left (the clip): the search tries only the choices
    that exist and still finds the best of them."""
    from edgeq.moment_rounding import search

    rng = np.random.default_rng(8)
    w, moments, scale = _filters(rng, 9, 6)
    w[0] = 127.4 * scale  # ceil would be 128
    w[1, :3] = -127.6 * scale[:3]  # floor would be -128
    q, _, _ = search(w / scale, scale, moments)
    assert q.max() <= 127 and q.min() >= -127
    bits = np.array(list(itertools.product((0, 1), repeat=9)), float)
    for c in range(6):
        lo = np.clip(np.floor(w[:, c] / scale[c]), -127, 127)
        every = [lv for lv in lo[None] + bits if lv.max() <= 127]
        best = min(_cost(levels, w[:, c], scale[c], moments[c]) for levels in every)
        assert _cost(q[:, c], w[:, c], scale[c], moments[c]) == pytest.approx(best)


def test_depthwise_moments_match_a_per_channel_product():
    from edgeq.moment_rounding import _channel_gram

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(2, 300, 9, 40)).astype(np.float32)
    want = np.einsum("rkc,rlc->ckl", a.astype(np.float64), b.astype(np.float64))
    assert np.allclose(_channel_gram(a, b), want, rtol=1e-4, atol=1e-3)
    sym = _channel_gram(a, a)
    assert np.allclose(sym, np.einsum("rkc,rlc->ckl", a.astype(np.float64), a.astype(np.float64)), rtol=1e-4, atol=1e-3)
    assert np.array_equal(sym, sym.transpose(0, 2, 1))


def test_the_search_with_a_linear_term_is_exact_on_3x3_filters_and_never_above_nearest():
    from edgeq.moment_rounding import search

    rng = np.random.default_rng(5)
    w, moments, scale = _filters(rng, 9, 10)
    lin = rng.normal(0, 0.5, (9, 10))  # a cross term: the optimum is no longer near round-to-nearest
    q, before, after = search(w / scale, scale, moments, linear=lin)
    bits = np.array(list(itertools.product((0, 1), repeat=9)), float)
    nearest = np.round(w / scale)
    for c in range(10):
        every = np.floor(w[:, c] / scale[c])[None] + bits
        best = min(_objective(levels, w[:, c], scale[c], moments[c], lin[:, c]) for levels in every)
        assert _objective(q[:, c], w[:, c], scale[c], moments[c], lin[:, c]) == pytest.approx(best)
    assert before == pytest.approx(sum(_objective(nearest[:, c], w[:, c], scale[c], moments[c], lin[:, c])
                                       for c in range(10)))
    # The term moves the choice: without it the search picks other levels.
    assert not np.array_equal(q, search(w / scale, scale, moments)[0])
    w, moments, scale = _filters(rng, 25, 8)  # local search: never above nearest on its objective
    lin = rng.normal(0, 0.5, (25, 8))
    q, before, after = search(w / scale, scale, moments, linear=lin)
    nearest = np.round(w / scale)
    for c in range(8):
        assert (_objective(q[:, c], w[:, c], scale[c], moments[c], lin[:, c])
                <= _objective(nearest[:, c], w[:, c], scale[c], moments[c], lin[:, c]) + 1e-9)
    assert after < before


@pytest.fixture(scope="module")
def sequential(tiny_cnn, calib):
    from edgeq.moment_rounding import Sequential, round_weights

    q = quantize_plain(tiny_cnn, calib)
    steps = []
    return q, round_weights(q, tiny_cnn, calib, on_step=steps.append, sequential=Sequential(samples=16)), steps


def test_sequential_fit_lowers_the_int8_models_error_below_the_float_input_fit(tiny_cnn, calib, held_out,
                                                                               rounded, sequential):
    """Fitted to the int8 model's own inputs, layer after layer, the rounding also takes up the
    activation rounding upstream: the int8 model's error on samples neither fit saw falls below the
    float-input fit's (activation rounding is most of a tiny CNN's int8 error)."""
    q, result, steps = sequential
    plain = rounded[1]
    err_q, err_plain, err_seq = (output_error(tiny_cnn, m, held_out) for m in (q, plain.model, result.model))
    assert err_seq < err_plain < err_q
    seq = [r for r in result.layers if r.sequential]
    # The convolutions and the FC of the tiny CNN are fitted sequentially, but the classifier FC (16
    # sequential samples give one row each, fewer than its 24 weights a channel): float inputs.
    assert len(seq) == 6 and len(result.layers) == 7 and result.skipped == 0
    # The error of W_q x_q - W x against that of the float weights on x_q: lower after the search,
    # and below the float weights' own somewhere (the rounding takes up the inputs' rounding).
    assert all(r.error_searched <= r.error_nearest for r in seq)
    assert any(r.error_searched < 0 for r in seq)
    assert any("on the int8 model's inputs" in s for s in steps)
    assert result.to_json()["per_layer"][0]["sequential"] is True and result.to_json()["layers_sequential"] == 6


def test_the_sequential_file_carries_the_weights_and_is_the_same_each_run(tiny_cnn, calib, sequential):
    from edgeq.moment_rounding import Sequential, round_weights
    from edgeq.weight_layers import weight_layers

    q, result, _ = sequential
    qm, rm = te.load(q), te.load(result.model)
    changed = 0
    for lay in weight_layers(q, tiny_cnn):
        a, b = lay.quantized_weight(qm), lay.quantized_weight(rm)
        assert np.all(np.abs(a.astype(int) - b.astype(int)) <= 1)
        changed += int((a != b).sum())
        name = te.tensor_name(rm.subgraphs[0].tensors[lay.weight])
        if name in result.levels:
            assert np.array_equal(result.levels[name][0], b)
    assert changed == sum(r.flipped for r in result.layers) > 0
    again = round_weights(q, tiny_cnn, calib, sequential=Sequential(samples=16))
    assert again.model == result.model


def test_the_sequential_work_takes_the_first_layers_in_graph_order(tiny_cnn, calib, sequential):
    """The work is the int8 runs' multiply-adds: two runs' worth fits exactly the first two layers;
    the others are fitted to float inputs as without it. No work: the plain fit."""
    from edgeq.moment_rounding import Sequential, _macs, round_weights
    from edgeq.weight_layers import weight_layers

    q, full, _ = sequential
    run = _macs(weight_layers(q, tiny_cnn), te.load(q)) * 16
    two = round_weights(q, tiny_cnn, calib, sequential=Sequential(samples=16, work=2.5 * run))
    in_order = sorted(full.layers, key=lambda r: r.op_index)
    assert [r.op_index for r in two.layers if r.sequential] == [r.op_index for r in in_order[:2]]
    assert len(two.layers) == 7 and two.skipped == 0
    assert [r for r in two.layers if r.sequential] == [r for r in in_order[:2]]  # the same first two fits
    none = round_weights(q, tiny_cnn, calib, sequential=Sequential(samples=16, work=0))
    assert not any(r.sequential for r in none.layers)


def test_the_sequential_moments_pair_the_same_rows_of_both_inputs(tiny_cnn, calib, monkeypatch):
    """_PairedMoments draws a random subset of output positions where a map has more than
    SEQUENTIAL_ROWS: the int8 input's and the float input's rows must be the same positions, or the
    cross term E[x_q x^T] is noise. With the same map on both sides C equals M exactly; with a
    shifted one it does not; and the draws differ from one sample to the next."""
    import edgeq.moment_rounding as mr
    from edgeq.weight_layers import weight_layers

    monkeypatch.setattr(mr, "SEQUENTIAL_ROWS", 8)  # the tiny CNN's maps have 256 positions
    q = quantize_plain(tiny_cnn, calib)
    lay = min(weight_layers(q, tiny_cnn), key=lambda lay: lay.op_index)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 16, 16, lay.float_weight.shape[-1])).astype(np.float32)
    pm = mr._PairedMoments(lay, np.random.default_rng(1))
    pm.add_pair(x, x)
    pm.add_pair(x, x)
    assert pm.rows == 16 and np.array_equal(pm.m, pm.c)
    one = mr._PairedMoments(lay, np.random.default_rng(1))
    one.add_pair(x, x)
    assert not np.allclose(2 * one.m, pm.m)  # the second sample drew other rows
    shifted = mr._PairedMoments(lay, np.random.default_rng(1))
    shifted.add_pair(x, x + 0.5)
    assert not np.allclose(shifted.m, shifted.c)
    with pytest.raises(ValueError, match="samples >= 1"):
        mr.Sequential(samples=0)


def test_a_sequential_layers_fit_does_not_depend_on_how_many_others_the_work_reaches(tiny_cnn, calib,
                                                                                  monkeypatch):
    """Row subsets are drawn at random where maps are large; a sequential layer draws its own (seeded
    by its op), so the first two layers' fits are the same whether the work reaches two layers or
    all of them, and whatever the float-input layers drew before."""
    import edgeq.moment_rounding as mr
    from edgeq.weight_layers import weight_layers

    monkeypatch.setattr(mr, "SEQUENTIAL_ROWS", 8)  # the tiny CNN's maps have 256 positions: draw
    monkeypatch.setattr(mr._Moments.__init__, "__defaults__", (8,))  # and so do the float-input fits
    q = quantize_plain(tiny_cnn, calib)
    run = mr._macs(weight_layers(q, tiny_cnn), te.load(q)) * 16
    full = mr.round_weights(q, tiny_cnn, calib, sequential=mr.Sequential(samples=16))
    two = mr.round_weights(q, tiny_cnn, calib, sequential=mr.Sequential(samples=16, work=2.5 * run))
    first = sorted((r for r in full.layers if r.sequential), key=lambda r: r.op_index)[:2]
    assert [r for r in two.layers if r.sequential] == first and first[0].flipped > 0


def test_the_cut_models_give_the_same_rounding_as_the_whole_ones(tiny_cnn, calib, monkeypatch, sequential):
    """The sequential part runs the int8 and float models cut after the layer inputs it reads
    (tflite_edit.prefix), writing each fitted layer into the cut int8 model: the result is the
    whole models' byte for byte, so every write a later layer depends on landed."""
    import edgeq.moment_rounding as mr

    q, result, _ = sequential
    assert sum(r.sequential for r in result.layers) >= 3 and sum(r.flipped for r in result.layers if r.sequential)
    monkeypatch.setattr(mr.te, "prefix", lambda *a, **k: None)  # no cut: the whole models
    whole = mr.round_weights(q, tiny_cnn, calib, sequential=mr.Sequential(samples=16))
    assert whole.model == result.model


def test_depthwise_multiplier_outputs_share_their_input_channels_moments():
    """A depthwise layer with a channel multiplier (torchcrepe's first layer: 1 input, 128 outputs,
    512 taps) took 106 s computing the same k x k matrix for every output a sample; the moments are
    now taken per input channel, and kept so: repeated for its outputs, torchcrepe-full's (1024 outputs)
    took 2 GB a copy. They equal the per-output computation (output c reads input c // multiplier),
    for M and for the sequential fit's linear term, and search() reads them per output channel: the
    same rounding as from the repeated matrices, by exhaustive search (small k) and by sweeps."""
    import edgeq.moment_rounding as mr
    from edgeq.weight_layers import WeightLayer

    rng = np.random.default_rng(0)
    cin, mult, k = 2, 3, 5
    w = rng.normal(size=(1, k, 1, cin * mult)).astype(np.float32)
    lay = WeightLayer(0, "DEPTHWISE_CONV_2D", "dw", 0, 1, None, 2, 0, w, None, np.ones(cin * mult, np.float32),
                      0.1, 0, multiplier=mult)
    xs = [rng.normal(size=(1, 12, 1, cin)).astype(np.float32) for _ in range(3)]
    mo, pm = mr._Moments(lay, np.random.default_rng(1)), mr._PairedMoments(lay, np.random.default_rng(1))
    for x in xs:
        mo.add(x)
        pm.add_pair(x, x + 0.1)
    want = np.zeros((cin * mult, k, k))
    cross = np.zeros((cin * mult, k, k))
    rows = 0
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    for x in xs:
        p = mr._patches(lay, x, mr.ROWS_PER_SAMPLE, r1).reshape(-1, k, cin)
        state = r2.bit_generator.state
        pq = mr._patches(lay, x, mr.SEQUENTIAL_ROWS, r2).reshape(-1, k, cin)
        r2.bit_generator.state = state
        pf = mr._patches(lay, x + 0.1, mr.SEQUENTIAL_ROWS, r2).reshape(-1, k, cin)
        for c in range(cin * mult):
            a, b = p[:, :, c // mult].astype(np.float64), pq[:, :, c // mult].astype(np.float64)
            want[c] += a.T @ a
            cross[c] += b.T @ (b - pf[:, :, c // mult])
        rows += len(p)
    owners = np.arange(cin * mult) // mult
    assert mo.m.shape == (cin, k, k) and mo.matrix().shape == (cin, k, k)  # one matrix per input channel
    ridge = mr.RIDGE * np.einsum("ckk->ck", want / rows).mean(-1)[:, None, None] * np.eye(k)
    assert np.allclose(mo.matrix()[owners], want / rows + (ridge if rows < 4 * k else 0), rtol=1e-5)
    wm = w.reshape(k, cin * mult).astype(np.float64)
    assert np.allclose(pm.linear(wm), np.einsum("ckl,lc->kc", cross / rows, wm), rtol=1e-4, atol=1e-6)

    for fan_in in (k, mr.EXACT_FAN_IN + 8):  # exhaustive, then sweeps
        a = rng.normal(size=(cin, 200, fan_in))
        grouped = np.einsum("grk,grl->gkl", a, a) / 200 + 0.1 * np.eye(fan_in)
        w_over_s = rng.normal(scale=20, size=(fan_in, cin * mult))
        scale = rng.uniform(0.01, 0.1, cin * mult)
        lin = rng.normal(scale=0.01, size=(fan_in, cin * mult))
        got, want_q = mr.search(w_over_s, scale, grouped, linear=lin), mr.search(w_over_s, scale, grouped[owners],
                                                                                 linear=lin)
        np.testing.assert_array_equal(got[0], want_q[0])
        assert np.allclose(got[1:], want_q[1:]) and got[2] < got[1]  # and the search found something


def _sweep_row_by_row(w_over_s, scale, m, sweeps=8):
    """search()'s local search as first written: every move updates the whole gradient at once."""
    lo = np.clip(np.floor(w_over_s), -127, 127)
    hi = np.clip(lo + 1, -127, 127)
    q = np.clip(np.round(w_over_s), -127, 127)
    g = m @ ((q - w_over_s) * scale)
    diag = np.diag(m)[:, None]

    def gains(at):
        d = -np.sign(g[at])
        step = d * scale
        return d, step, (q[at] + d >= lo[at]) & (q[at] + d <= hi[at]) & (2 * step * g[at] + step * step * diag[at] < 0)

    for _ in range(sweeps):
        rows = np.flatnonzero(gains(slice(None))[2].any(axis=1))  # the rows a sweep visits
        if not len(rows):
            break
        for i in rows:
            d, step, go = gains(i)
            q[i, go] += d[go]
            g += np.outer(m[:, i], np.where(go, step, 0.0))
    return q


def test_the_blocked_sweep_makes_the_row_by_row_sweeps_moves():
    """A 1x1 convolution's search (moments shared by the channels, fan-in past the exact search)
    updates the gradient a block of rows at a time (_sweep_blocks): the same moves as updating all
    of it after every row, on correlated inputs where moves interact."""
    from edgeq.moment_rounding import BLOCK_ROWS, search

    rng = np.random.default_rng(11)
    k, channels = 3 * BLOCK_ROWS + 7, 48
    x = rng.normal(size=(4000, k)) @ rng.normal(size=(k, k)) * 0.2  # correlated inputs
    m = x.T @ x / len(x)
    w = rng.normal(0, 0.05, (k, channels))
    scale = np.abs(w).max(axis=0) / 127
    q, before, after = search(w / scale, scale, m)
    reference = _sweep_row_by_row(w / scale, scale, m)
    assert (reference != np.round(w / scale)).sum() > 100  # the sweeps moved many weights
    np.testing.assert_array_equal(q, reference)
    assert after < before
