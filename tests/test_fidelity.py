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
