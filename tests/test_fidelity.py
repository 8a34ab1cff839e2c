"""Fidelity: output kinds (what gets top-1), cosine for short outputs, and real models compared."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.fidelity import OutputKind, compare, looks_like_class_scores, output_kind


def _rows(n, c, seed=0):
    return np.random.default_rng(seed).normal(size=(n, c)).astype(np.float32)


def test_output_kinds_from_values_names_and_the_users_word():
    probs = np.exp(_rows(20, 7))
    probs /= probs.sum(axis=1, keepdims=True)
    assert output_kind("output_0", probs) is OutputKind.CLASS_SCORES
    # 1000 ImageNet logits: heuristically class scores (top-1 shown), certain only when declared.
    logits = _rows(20, 1000)
    assert looks_like_class_scores("logits", logits)
    assert output_kind("logits", logits) is OutputKind.MAYBE_CLASS_SCORES
    assert output_kind("logits", logits, declared_class_scores=True) is OutputKind.CLASS_SCORES
    assert output_kind("Identity", _rows(20, 1001)) is OutputKind.MAYBE_CLASS_SCORES
    # Names that say what the vector is.
    assert output_kind("embedding", _rows(20, 384)) is OutputKind.EMBEDDING
    assert output_kind("pooler_output", _rows(20, 768)) is OutputKind.EMBEDDING
    assert output_kind("output_iris", _rows(20, 15)) is OutputKind.OTHER
    assert output_kind("landmarks", _rows(20, 63)) is OutputKind.OTHER
    # Too many columns for classes, or not one vector per sample.
    assert output_kind("Identity", _rows(20, 5000)) is OutputKind.OTHER
    maps = np.random.default_rng(0).random((20, 8, 8, 3), dtype=np.float32)
    assert output_kind("Identity", maps) is OutputKind.OTHER
    assert output_kind("Identity", maps, declared_class_scores=True) is OutputKind.OTHER
    # (batch, 1, 1, classes) is still one vector per sample.
    assert output_kind("scores", _rows(20, 10).reshape(20, 1, 1, 10), True) is OutputKind.CLASS_SCORES


def test_top1_for_a_1000_class_output_and_for_declared_outputs():
    ref = _rows(50, 1000)
    cand = ref.copy()
    flip = np.arange(50) < 5  # five samples lose their top class
    top = ref.argmax(axis=1)
    cand[flip, top[flip]] = ref.min() - 1
    fid = compare({"logits": ref}, {"out": cand})
    o = fid.outputs[0]
    assert o.kind is OutputKind.MAYBE_CLASS_SCORES and o.top1_agreement == pytest.approx(0.9)
    assert fid.samples == 50 and fid.output("logits") is o
    # An embedding-named output gets no top-1 unless the user says it is class scores.
    emb = compare({"embedding": ref}, {"x": cand}).outputs[0]
    assert emb.kind is OutputKind.EMBEDDING and emb.top1_agreement is None
    declared = compare({"embedding": ref}, {"x": cand}, class_outputs={"embedding"}).outputs[0]
    assert declared.kind is OutputKind.CLASS_SCORES and declared.top1_agreement == pytest.approx(0.9)
    assert declared.to_json()["kind"] == "class_scores"


def test_short_outputs_are_compared_as_one_vector():
    """A per-sample cosine of one number is its sign: a flag output off by 1% would read 1.0 or -1."""
    ref = np.linspace(0.1, 1.0, 30, dtype=np.float32).reshape(30, 1)
    cand = ref * 1.01
    cand[0] = -0.001  # one small value crosses zero
    o = compare({"flag": ref}, {"flag": cand}).outputs[0]
    per_sample = np.mean(np.sign(ref[:, 0]) * np.sign(cand[:, 0]))
    assert per_sample < 0.94  # what a per-sample cosine would have said
    assert o.cosine > 0.999 and o.top1_agreement is None
    # Long outputs keep the per-sample mean.
    ref = _rows(10, 64)
    cand = ref.copy()
    cand[0] = -cand[0]
    assert compare({"e": ref}, {"e": cand}).outputs[0].cosine == pytest.approx(0.8, abs=1e-6)


def test_a_short_output_on_an_offset_over_samples_is_capped_by_its_relative_error():
    """SSR-Net's age (one value a photo, 39 +- 5.5) came out of int8 at 0.56x float's and read cosine
    0.9995 over the samples: a cosine cannot see a scale error. On an offset (3x the spread or more)
    a short output's cosine is capped at 1 - rel_l2^2 / 2, below the floor there. A faithful age, and
    a face flag at -8 +- 1.5 with int8-sized noise on it, keep their cosine; outputs near 0 too."""
    from edgeq.fidelity import OFFSET_RATIO

    rng = np.random.default_rng(0)
    age = 39.0 + 5.5 * rng.normal(size=(40, 1))
    (o,) = compare({"Identity": age}, {"Identity": 0.56 * age}).outputs
    assert o.plain_cosine > 0.99 and o.cosine == pytest.approx(1 - o.rel_l2 ** 2 / 2) and o.cosine < 0.92
    assert o.capped_by_rel_l2 and o.offset == pytest.approx(39, abs=2)
    assert "a cosine cannot see a scale error" in o.notes()[0]
    assert o.to_json()["capped_by_rel_l2"] is True and "cosine_around_mean" not in o.to_json()
    (o,) = compare({"Identity": age}, {"Identity": age + rng.normal(scale=0.3, size=age.shape)}).outputs
    assert o.cosine > 0.999 and not o.capped_by_rel_l2 and o.notes() == []
    flag = -8.0 + 1.5 * rng.normal(size=(40, 1))
    (o,) = compare({"flag": flag}, {"flag": flag + rng.normal(scale=0.5, size=flag.shape)}).outputs
    assert o.cosine > 0.99
    low = np.abs(0.01 * rng.normal(size=(40, 2)))
    assert np.median(np.abs(low.mean(axis=0)) / low.std(axis=0)) < OFFSET_RATIO
    (o,) = compare({"flag": low}, {"flag": low * 0.5}).outputs
    assert o.offset is None and o.cosine > 0.999 and not o.capped_by_rel_l2


def test_an_output_on_a_shared_offset_is_judged_around_floats_mean():
    """BirdNET's 6522 sigmoid logits sit near -15 (6.5x their spread): its int8 output read cosine
    0.990 with top-1 agreement 5 %. An output stuck at the offset reads high plainly and near 0
    around float's mean; a faithful one stays high either way; small offsets keep the plain cosine."""
    from edgeq.fidelity import OFFSET_RATIO

    rng = np.random.default_rng(0)
    ref = -15.0 + rng.normal(size=(20, 600))  # offset 15x the spread
    stuck = np.full_like(ref, -15.0) + rng.normal(scale=0.05, size=ref.shape)
    faithful = ref + rng.normal(scale=0.05, size=ref.shape)
    (o,) = compare({"Identity": ref}, {"Identity": stuck}).outputs
    assert o.plain_cosine > 0.99 and abs(o.cosine) < 0.1 and o.offset == pytest.approx(-15, abs=0.1)
    assert "taken around float's mean" in o.notes()[0] and o.to_json()["cosine_around_mean"] is True
    (o,) = compare({"Identity": ref}, {"Identity": faithful}).outputs
    assert o.cosine > 0.99 and o.offset is not None
    # A spread of half the offset: a stuck output already reads low plainly (0.45); left as it is.
    small = 0.5 + rng.normal(size=(20, 600))
    (o,) = compare({"y": small}, {"y": np.full_like(small, 0.5)}).outputs
    assert o.offset is None and o.plain_cosine is None and o.cosine < 0.6 and OFFSET_RATIO > 0.5
    # Constant within each sample (no spread to judge around): the plain cosine.
    const = np.repeat(rng.uniform(1, 2, size=(20, 1)), 600, axis=1)
    (o,) = compare({"y": const}, {"y": const + 1e-3}).outputs
    assert o.offset is None and o.cosine > 0.999


def test_exact_zeros_match_a_float_output_that_is_zero():
    """openWakeWord's hey_mycroft scores 3e-8 on audio without the word; int8 outputs exact zeros.
    Cosine read 0.0000 and the floor refused a faithful model; now 1, with a note that the data never
    made the output respond. A float output of 1e-3 against zeros is still a miss."""
    ref = np.abs(np.random.default_rng(0).normal(scale=3e-8, size=(19, 1)))
    (o,) = compare({"39": ref}, {"39": np.zeros_like(ref)}).outputs
    assert o.cosine == 1.0 and o.max_abs < 1e-6
    assert o.notes() == [f"output 39 is 0 on every held-out sample (float's largest value {ref.max():.1g}): "
                         "fidelity cannot show how the int8 model treats it; calibrate and judge on data where "
                         "it responds (a detector's positive examples)"]
    (o,) = compare({"39": ref + 1e-3}, {"39": np.zeros_like(ref)}).outputs
    assert o.cosine == 0.0 and o.notes() == []


def test_an_output_the_samples_barely_make_respond_says_so():
    """FaceRes's descriptor on photos without faces: 1 of 1024 float values non-zero, cosine 0.46.
    Its numbers say more about the data than about the int8 model, and the note says so; an output
    that responds (a ReLU output with a third of its values 0) gets no such note."""
    rng = np.random.default_rng(0)
    ref = np.maximum(rng.normal(size=(20, 1024)) - 2.9, 0)  # ~0.2 % of values above 0
    (o,) = compare({"descriptor": ref}, {"descriptor": ref + rng.normal(scale=0.05, size=ref.shape)}).outputs
    assert o.silent and o.reference_zero_share == (ref == 0).mean() > 0.99
    assert o.to_json()["reference_zero_share"] == round((ref == 0).mean(), 4)
    assert o.notes() == [f"output descriptor: on these samples float's descriptor is 0 in "
                         f"{(ref == 0).mean():.1%} of its values: the data barely makes it respond, so calibrate "
                         "and judge on the inputs the model is made for (faces for a face model, a detector's "
                         "positive examples)"]
    relu = np.maximum(rng.normal(size=(20, 1024)) + 0.4, 0)
    (o,) = compare({"y": relu}, {"y": relu}).outputs
    assert 0.2 < o.reference_zero_share < 0.5 and not o.silent and o.notes() == []
    assert "reference_zero_share" not in o.to_json()
    # Class probabilities: a confident softmax is mostly ~0, which says nothing about the data.
    probs = np.zeros((20, 1000))
    probs[np.arange(20), rng.integers(0, 1000, 20)] = 1.0
    (o,) = compare({"probs": probs}, {"probs": probs}).outputs
    assert o.kind == "class_scores" and o.reference_zero_share > 0.99 and not o.silent


def test_an_l2_normalised_vector_is_an_embedding_whatever_its_name(tf):
    """efficientword-net's wake-word model ends in L2_NORMALIZATION, output "Identity": judged as
    class scores, its level compared softmax KLs that read 0.0000 at every step and its floor was
    0.95, not an embedding's. Unit-norm rows are an embedding (a softmax's rows sum to 1 instead), and
    the level judges it by rel. L2."""
    from edgeq.optimize import judges_class_scores

    x = _rows(20, 128)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert output_kind("Identity", unit) is OutputKind.EMBEDDING
    assert output_kind("Identity", x) is OutputKind.MAYBE_CLASS_SCORES
    assert not judges_class_scores({"Identity": unit}) and judges_class_scores({"Identity": x})
    onehot = np.eye(10, dtype=np.float32)[np.arange(20) % 10]  # probabilities too: still class scores
    assert output_kind("Identity", onehot) is OutputKind.CLASS_SCORES
    # the real op: a Keras model ending in an L2 normalisation, its float .tflite output
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16,))
    out = tf.keras.layers.UnitNormalization()(tf.keras.layers.Dense(32)(inp))
    y = tf.keras.Model(inp, out)(x[:, :16]).numpy()
    assert output_kind("Identity", y) is OutputKind.EMBEDDING


def test_a_state_the_model_takes_back_is_never_class_scores(tf):
    """A streaming voice detector (PyPI akiki: CNN + GRU) outputs its speech probability and its
    128-value GRU state, which the caller feeds back as the second input. The state was "maybe class
    scores": reported with "top-1 agree 0.58", and as the model's only vector output it made the level
    choose ranges by a softmax KL over it. An output of an input's exact shape and dtype is fed back
    (or a reconstruction), never class scores, whatever its values."""
    from edgeq.fidelity import fed_back, fidelity, run_model
    from edgeq.optimize import judges_class_scores
    from edgeq.signature import ensure_signature

    tf.keras.utils.set_random_seed(0)
    x, h = tf.keras.Input((24,), name="audio"), tf.keras.Input((16,), name="state")
    z = tf.keras.layers.Concatenate()([tf.keras.layers.Dense(16, activation="relu")(x), h])
    state = tf.keras.layers.Dense(16, activation="tanh", name="new_state")(z)
    prob = tf.keras.layers.Dense(1, activation="sigmoid", name="speech")(state)
    model = tf.keras.Model([x, h], [prob, state])
    flt, _ = ensure_signature(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    rng = np.random.default_rng(0)
    samples = [{"audio": rng.normal(size=(1, 24)).astype(np.float32),
                "state": rng.uniform(-1, 1, (1, 16)).astype(np.float32)} for _ in range(12)]
    ref = run_model(flt, samples)
    names = list(ref)
    state_name = next(n for n in names if ref[n].shape[1:] == (16,))
    assert fed_back(flt) == {state_name}
    assert output_kind(state_name, ref[state_name]) is OutputKind.MAYBE_CLASS_SCORES  # its values alone
    assert not judges_class_scores(ref, not_class=fed_back(flt)) and judges_class_scores(ref)
    fid = fidelity(flt, flt, samples, ref)
    row = next(o for o in fid.outputs if o.name == state_name)
    assert row.kind is OutputKind.OTHER and row.top1_agreement is None
    from edgeq.verify import check_runs  # the manifest's verification block judges it the same way
    run = check_runs(flt, samples, reference=ref)
    assert next(o for o in run.fidelity.outputs if o.name == state_name).top1_agreement is None

    # One input of the same shape is no state: 8 features in, 8 class logits out stays a classifier.
    inp = tf.keras.Input((8,), name="features")
    clf = tf.keras.Model(inp, tf.keras.layers.Dense(8, name="logits")(tf.keras.layers.Dense(16, activation="relu")(inp)))
    flt2, _ = ensure_signature(tf.lite.TFLiteConverter.from_keras_model(clf).convert())
    assert fed_back(flt2) == frozenset()
    # Probabilities stay class scores even where the shapes match an input.
    probs = np.full((4, 16), 1 / 16, np.float32)
    assert output_kind(state_name, probs, not_class=True) is OutputKind.CLASS_SCORES


def test_an_output_joined_from_parts_of_very_different_size_is_judged_per_part():
    """A detector's [boxes in pixels, scores in 0..1] output: noise that wipes out the scores leaves
    the whole output's cosine at ~1 (the boxes carry it). Each part is reported, the note names the
    weak one, and a cosine floor judges the output by its worst part (accuracy_target)."""
    from edgeq.accuracy_target import default_floor

    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (10, 4, 50)), rng.uniform(0, 0.5, (10, 3, 50))], axis=1)
    cand = ref + np.concatenate([rng.normal(0, 1.0, (10, 4, 50)), rng.normal(0, 0.5, (10, 3, 50))], axis=1)
    parts = {"out": ((1, ((0, 4), (4, 7))),)}
    fid = compare({"out": ref}, {"out": cand}, parts=parts)
    o = fid.output("out")
    assert o.cosine > 0.999 and [(p.start, p.stop) for p in o.parts] == [(0, 4), (4, 7)]
    assert o.parts[0].cosine > 0.999 and o.parts[1].cosine < 0.8 and o.worst_part is o.parts[1]
    assert o.to_json()["parts"][1]["stop"] == 7 and o.parts[1].reference_max_abs <= 0.5
    assert any("[4:7]" in n and "joins parts" in n for n in fid.notes())
    floor = default_floor(fid)
    assert not floor.met(fid) and "out[4:7] (axis 1) cosine" in floor.reached(fid)
    # Without the parts (or with parts of one size) the whole output is all there is.
    assert compare({"out": ref}, {"out": cand}).output("out").parts == ()
    same = np.concatenate([ref[:, :4], ref[:, :3]], axis=1)
    assert compare({"out": same}, {"out": same + 1}, parts=parts).output("out").parts == ()
    assert default_floor(fid).met(compare({"out": ref}, {"out": ref + 1e-4}, parts=parts))


def test_join_parts_reads_the_concatenation_that_writes_an_output(tf):
    from edgeq.fidelity import join_parts
    from edgeq.sources.keras import load_keras
    from tests.conftest import save_keras
    import tempfile
    from pathlib import Path

    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8,), batch_size=1)
    joined = L.Concatenate()([L.Dense(4)(inp), L.Dense(3)(inp) * 0.01])
    model = tf.keras.Model(inp, [joined, L.Dense(2)(inp)])
    with tempfile.TemporaryDirectory() as d:
        fm = load_keras(save_keras(tf, model, Path(d) / "m.keras")).float_tflite
    parts = join_parts(fm)
    assert list(parts.values()) == [((1, ((0, 4), (4, 7))),)]


def test_join_parts_finds_a_heads_columns_behind_its_layout_ops(tf):
    """A YOLO head joins its columns [boxes in pixels, scores] per level, then reshapes, joins the
    levels on the anchor axis and transposes (YOLOX in ddddocr: [1, 6, anchors] levels, then
    [1, anchors, 6]): the output's writer is a TRANSPOSE, and the join its writer makes (the levels)
    has parts of one size. join_parts follows each axis back through the layout ops, and the column
    join, whose boxes are 100x the scores, is what the output is judged by, part by part: noise on
    the scores that the whole output's error cannot see is the parted error."""
    from edgeq.fidelity import first_uneven, join_parts, run_model
    from edgeq.range_search import PartedReference, compare_outputs, judge_reference
    from edgeq.signature import signature_runner
    from edgeq.sources.keras import load_keras
    from tests.conftest import save_keras
    import tempfile
    from pathlib import Path

    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16, 16, 3), batch_size=1)
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    levels = []
    for stride in (2, 4):
        f = L.Conv2D(8, 3, strides=stride, padding="same", activation="relu")(x)
        cols = L.Concatenate()([L.Conv2D(4, 1, activation="sigmoid")(f) * 100.0,
                                L.Conv2D(2, 1, activation="sigmoid")(f)])
        levels.append(L.Reshape((6, -1))(L.Permute((3, 1, 2))(cols)))  # [1, 6, anchors], as exported
    head = tf.keras.Model(inp, L.Permute((2, 1))(L.Concatenate(axis=2)(levels)))  # [1, anchors, 6]
    with tempfile.TemporaryDirectory() as d:
        fm = load_keras(save_keras(tf, head, Path(d) / "m.keras")).float_tflite
    (joins,) = join_parts(fm).values()
    assert dict(joins) == {1: ((0, 64), (64, 80)), 2: ((0, 4), (4, 6))}  # levels, columns
    name = next(iter(signature_runner(fm).get_input_details()))
    feed = [{name: np.random.default_rng(i).random((1, 16, 16, 3), np.float32)} for i in range(6)]
    ref = run_model(fm, feed)
    (r,) = ref.values()
    axis, bounds, _ = first_uneven(r, joins)
    assert (axis, bounds) == (2, ((0, 4), (4, 6)))
    judged = judge_reference(fm, feed)
    assert isinstance(judged, PartedReference) and [v.shape[-1] for v in judged.values()] == [4, 2]
    noisy = r.copy()
    noisy[..., 4:] += np.random.default_rng(9).normal(0, 0.05, noisy[..., 4:].shape)
    whole = compare_outputs(ref, {"y": noisy})
    parted = compare_outputs(judged, {k: noisy[..., a:b] for k, (a, b) in zip(judged, bounds)})
    assert parted.rel_l2 > 0.05 > 10 * whole.rel_l2
    o = compare(ref, {"y": noisy}, parts=join_parts(fm)).outputs[0]
    assert o.cosine > 0.9999 > 0.999 > o.worst_part.cosine and (o.worst_part.start, o.worst_part.stop) == (4, 6)


def test_outputs_are_stacked_as_they_come_whatever_their_shapes():
    """run_signature writes each sample's outputs into one array (no list held beside it). Samples
    whose batch differs from the first one's are concatenated as np.concatenate does; outputs that
    cannot be stacked on axis 0 fail as they did with it."""
    from edgeq.fidelity import _Stack

    rng = np.random.default_rng(3)

    def stacked(ys):
        s = _Stack(len(ys))
        for y in ys:
            s.add(y)
        return s.result()

    same = [rng.normal(size=(1, 5, 4)).astype(np.float32) for _ in range(6)]
    np.testing.assert_array_equal(stacked(same), np.concatenate(same))
    batches = [rng.normal(size=(b, 5)).astype(np.float32) for b in (1, 2, 1, 3, 1)]
    np.testing.assert_array_equal(stacked(batches), np.concatenate(batches))
    assert stacked(batches).shape == (8, 5)
    with pytest.raises(ValueError):
        stacked(same[:2] + [rng.normal(size=(1, 7, 4)).astype(np.float32)])


@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: the offset rule's cosine around the mean
def test_large_outputs_are_compared_a_block_of_samples_at_a_time(monkeypatch, offset):
    """compare() and the levels' judge (range_search.compare_outputs) take float64 copies of a block
    of samples at a time (fidelity.BLOCK_BYTES): with blocks of 3 samples they give what one block of
    all 10 gives, every metric, so a heatmap model's outputs no longer need gigabytes of copies."""
    import edgeq.fidelity as fidelity
    from edgeq.range_search import compare_outputs

    rng = np.random.default_rng(5)
    ref = {"heat": (rng.normal(size=(10, 20, 20, 4)) + offset).astype(np.float32)}
    cand = {"heat": (ref["heat"] + rng.normal(0, 0.05, ref["heat"].shape)).astype(np.float32)}
    cand["heat"][3] = rng.normal(size=ref["heat"][3].shape) + offset  # one sample far off
    whole_fid, whole_score = fidelity.compare(ref, cand), compare_outputs(ref, cand)
    monkeypatch.setattr(fidelity, "BLOCK_BYTES", 3 * 8 * 20 * 20 * 4)
    assert len(fidelity.row_blocks(10, 20 * 20 * 4)) == 4
    blocked_fid, blocked_score = fidelity.compare(ref, cand), compare_outputs(ref, cand)
    a, b = whole_fid.outputs[0], blocked_fid.outputs[0]
    assert (a.offset is None) == (offset == 0.0) and (b.offset is None) == (offset == 0.0)
    for field in ("cosine", "rel_l2", "max_abs", "top1_agreement", "offset", "plain_cosine", "reference_max_abs"):
        want = getattr(a, field)
        assert getattr(b, field) == (None if want is None else pytest.approx(want, rel=1e-12)), field
    assert blocked_score.cosine == pytest.approx(whole_score.cosine, rel=1e-12)
    assert blocked_score.rel_l2 == pytest.approx(whole_score.rel_l2, rel=1e-12)
    assert blocked_score.top1 == whole_score.top1 and a.cosine < 0.99


def test_a_model_that_cannot_take_one_item_of_its_first_axis_says_what_shape_to_give(tf):
    """An input of (16, 6) whose first axis is the model's own (Silero VAD's 16 audio chunks; here a
    reshape to [1, 96] follows): .npy rows of (6,) are fed as one item, batch 1, which is right for a
    Keras batch_size but not here. LiteRT's refusal names the whole shape to give."""
    from edgeq.fidelity import ModelRunError, run_model

    w = np.random.default_rng(0).normal(0, 0.3, (96, 4)).astype(np.float32)

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([16, 6], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(tf.reshape(tf.nn.relu(x), [1, 96]), w)}

    m = M()
    model = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()
    whole = np.ones((16, 6), np.float32)
    assert run_model(model, [{"x": whole}])["y"].shape == (1, 4)  # the whole shape runs
    with pytest.raises(ModelRunError, match=r"sample 1: .*input 'x' is \(16, 6\) and the samples were fed as "
                                            r"\(1, 6\); .* give samples of its whole shape \(16, 6\)"):
        run_model(model, [{"x": whole[:1]}])


def test_a_float_model_that_outputs_nan_on_the_data_is_refused_for_what_it_is(tf, tmp_path):
    """A log front end fed digital silence (a real wake-word model, zero-padded clips): the float model
    itself outputs -inf/NaN, every cosine read 0, and the floor told the user to try --scheme dynamic.
    The refusal now names the float model's output (and for held-out samples the count and the first
    one); nothing written."""
    from click.testing import CliRunner

    from edgeq.cli import main

    w = np.random.default_rng(0).normal(0, 0.3, (8, 3)).astype(np.float32)

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(tf.math.log(x) * tf.math.log(x), w)}

    m = M()
    (tmp_path / "log.tflite").write_bytes(
        tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert())
    rows = np.random.default_rng(1).uniform(0.1, 2.0, (40, 8)).astype(np.float32)
    rows[::4] = 0.0  # silence: a quarter of the clips, as in the real case
    np.save(tmp_path / "clips.npy", rows)
    out = tmp_path / "q.tflite"
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "log.tflite"), "-o", str(out), "--calib",
                                  str(tmp_path / "clips.npy"), "--quiet"])
    assert r.exit_code == 1 and not out.exists()
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "the float model itself outputs NaN on calibration samples (output 'y')" in r.output
    # --optimize none never runs the float model on the calibration samples: the held-out ones tell
    rows[1::4] = 0.0  # silence in every held-out draw of this split too
    np.save(tmp_path / "clips.npy", rows)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "log.tflite"), "-o", str(out), "--calib",
                                  str(tmp_path / "clips.npy"), "--quiet", "--optimize", "none"])
    assert r.exit_code == 1 and not out.exists() and "Traceback" not in r.output
    assert "the float model itself outputs NaN on" in r.output and "held-out samples (output 'y'; first clips.npy[" in r.output


def test_an_output_the_runner_cannot_read_is_a_run_error(tf):
    """A plan with the TANH float before a graph output another op also reads (a budget-loop probe of
    PyPI akiki's voice detector: its GRU state): LiteRT's signature runner under XNNPACK raised
    "ValueError: Tensor data is null", a traceback out of the budget loop. It is a ModelRunError now,
    one line, like a kernel refusing the input."""
    from edgeq.fidelity import ModelRunError, run_model
    from edgeq.litert_quant import OpPrecision, quantize_per_op
    from edgeq.signature import ensure_signature
    from edgeq.tflite_model import read_model

    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((8,), name="x")
    y = tf.keras.layers.Dense(8, activation="tanh", name="state")(x)
    m = tf.keras.Model(x, [tf.keras.layers.Dense(1, name="p")(y * 2.0), y])
    flt, _ = ensure_signature(tf.lite.TFLiteConverter.from_keras_model(m).convert())
    tanh = next(o for o in read_model(flt).ops if o.name == "TANH")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(16)]
    q = quantize_per_op(flt, "int8", [OpPrecision(tanh.name, tanh.outputs[0].name, "float")], samples)
    with pytest.raises(ModelRunError, match=r"LiteRT could not run the model on sample 1: Tensor data is null"):
        run_model(q, samples[:2])
