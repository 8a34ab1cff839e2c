"""Hugging Face encoders (BERT, MiniLM, DistilBERT, ...) as a model source: PyTorch -> LiteRT.

transformers 5 has no TensorFlow classes, so the path is: load the local directory with
transformers (PyTorch), wrap it so the graph ends in the pooled embedding (or, for a text or token
classifier, in the head its config names: `logits`), convert with
litert-torch (which gives a .tflite WITH a SignatureDef, as litert-quantizer needs), and
build calibration samples with the directory's own tokenizer.

Needs the [hf] extra (torch, transformers, litert-torch); imported lazily so the CLI stays fast.
No hub access ever: everything is loaded from the directory (HF_HUB_OFFLINE is forced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..calibration import encode_texts, load_tokenizer
from ..errors import CalibrationError, IncompatibleModelError, ModelFormatError
from ..signature import signature_runner
from .torch_util import channel_absmax, litert_convert, require_modules, table_lookup

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Encoder-only families whose AutoModel takes (input_ids, attention_mask[, token_type_ids]) and
# returns last_hidden_state. Decoders/seq2seq are out of scope for this source.
ENCODER_TYPES = frozenset({
    "bert", "distilbert", "roberta", "xlm-roberta", "electra", "mpnet", "albert", "camembert",
})
# SmoothQuant and the outlier grouping rewrite BERT's module layout (LayerNorm -> Linear pairs, BertOutput).
BERT_LAYOUT_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})


# Task heads converted with the model (config.json "architectures"): the head's logits are the output.
HEADS = {"ForSequenceClassification": "AutoModelForSequenceClassification",
         "ForTokenClassification": "AutoModelForTokenClassification"}


def task_head(cfg: dict) -> tuple[str | None, str | None]:
    """(architecture, the transformers Auto class for its head or None) from config.json; (None, None)
    for a bare encoder (BertModel) or a config that names none."""
    arch = next(iter(cfg.get("architectures") or []), None)
    if not isinstance(arch, str) or "For" not in arch:
        return None, None
    return arch, next((auto for suffix, auto in HEADS.items() if arch.endswith(suffix)), None)


class Pooling(str, Enum):
    """What the converted model outputs."""

    MEAN = "mean"  # "embedding": mask-weighted mean of the last hidden state (sentence-transformers)
    CLS = "cls"  # "embedding": the first token's hidden state
    NONE = "none"  # "last_hidden_state": (1, seq_len, hidden)


@dataclass(frozen=True)
class HfOptions:
    seq_len: int = 128
    # None: the classification head config.json names (its logits), else MEAN. Given for a classifier,
    # the encoder's output is converted without the head (and a note says so).
    pooling: Pooling | None = None
    # SmoothQuant migration strength (0..1); None = off. Needs calibration texts in load_hf.
    smoothquant_alpha: float | None = None
    # Additive attention-mask value for padding. transformers uses float32 min (-3.4e38), which
    # makes any int8/int16 range over the mask add useless; -30 hides padding just as well
    # (exp(-30) ~ 1e-13) and keeps the scores' range quantizable. None = transformers' own mask.
    mask_value: float | None = -30.0
    # Move Linear output channels whose calibration max |y| exceeds this many times the median
    # channel's into a separate small Linear (see split_outlier_channels); None = off.
    split_outliers: float | None = None
    # For all-int8 graphs: keep the [CLS] token and each magnitude tier of channels (tiers grow by
    # this factor) in their own tensors through every residual add + LayerNorm (see hf_grouping);
    # None = off. Adds GATHER/CONCATENATION ops, so only worth it when every op is int8.
    group_outliers: float | None = None


@dataclass(frozen=True)
class FloatModel:
    tflite: bytes  # float .tflite with SignatureDef "serving_default"
    input_names: tuple[str, ...]  # signature input names, in signature order
    output_names: tuple[str, ...]
    make_samples: Callable[[list[str]], list[dict[str, np.ndarray]]] | None
    description: str
    notes: tuple[str, ...] = ()  # what the user should know (convert shows them as warnings)
    class_outputs: tuple[str, ...] = ()  # outputs that are class scores (a sequence classifier's logits)


def is_hf_dir(path) -> bool:
    """True for a local directory holding a transformers config, weights and a tokenizer."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    has_weights = any((p / w).is_file() for w in WEIGHT_FILES)
    has_tokenizer = (p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file()
    return has_weights and has_tokenizer


def _require_hf():
    """Import the [hf] extra or explain how to get it."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub; the directory must be complete
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    require_modules("Hugging Face models", ("litert_torch", "torch", "transformers"))


def _load_tokenizer(tokenizer_dir):
    _require_hf()
    try:
        return load_tokenizer(tokenizer_dir)
    except CalibrationError as e:
        raise ModelFormatError(str(e)) from None


_encode = encode_texts


def tokenize(tokenizer_dir, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Tokenize texts to fixed length: {input_ids, attention_mask[, token_type_ids]}, each (N, seq_len) int64."""
    return _encode(_load_tokenizer(tokenizer_dir), texts, seq_len)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}/config.json is unreadable ({e}); re-export the model") from None


def _wrap(model, pooling: Pooling | None, input_names: tuple[str, ...], mask_value: float | None):
    """A torch module with explicitly named tensor inputs, so the SignatureDef gets real names.
    pooling None: `model` has a task head, whose logits are the output."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # The 0/1 mask becomes float by table lookup (GATHER) rather than CAST: a GATHER has an
            # int8 kernel, so an all-int8 graph keeps no float op here.
            self.register_buffer("mask_add", torch.tensor([mask_value or 0.0, 0.0]))
            self.register_buffer("mask_mul", torch.tensor([0.0, 1.0]))

        def _run(self, input_ids, attention_mask, token_type_ids=None):
            mask = attention_mask
            if mask_value is not None:
                # A 4-D float mask is added to the attention scores as is (no -inf fill).
                mask = table_lookup(self.mask_add, attention_mask)[:, None, None, :]
            kw = {"input_ids": input_ids, "attention_mask": mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            if pooling is None:
                return {"logits": self.model(**kw).logits}
            h = self.model(**kw).last_hidden_state
            if pooling is Pooling.NONE:
                return {"last_hidden_state": h}
            if pooling is Pooling.CLS:
                return {"embedding": h[:, 0]}
            m = table_lookup(self.mask_mul, attention_mask).unsqueeze(-1)
            return {"embedding": (h * m).sum(1) / m.sum(1).clamp(min=1e-9)}

    if "token_type_ids" in input_names:
        class WithTypes(Encoder):
            def forward(self, input_ids, attention_mask, token_type_ids):
                return self._run(input_ids, attention_mask, token_type_ids)
        return WithTypes().eval()

    class NoTypes(Encoder):
        def forward(self, input_ids, attention_mask):
            return self._run(input_ids, attention_mask)
    return NoTypes().eval()


def smooth_bert(model, batches: dict[str, np.ndarray], alpha: float) -> int:
    """SmoothQuant (Xiao et al. 2023) on a BERT-layout model, in place; returns Linears smoothed.

    Transformer activations have a few huge channels, so one per-tensor int8 scale wastes most
    levels on them. For each LayerNorm -> Linear pair, channel j of the Linear's input is divided
    by s_j and the Linear's input column j multiplied by s_j (exactly equivalent in float), with
    s_j = max|x_j|^alpha / max|W_j|^(1-alpha): activation range moves into the weights, which are
    quantized per output channel and absorb it far better.

    BERT is post-LN: each LayerNorm output is also the residual, so the 1/s cannot be folded into
    the LayerNorm weights as in pre-LN decoders (nor into GELU). It becomes an explicit
    per-channel MUL in front of the Linears (cheap, elementwise); the quantized Linear then sees
    the flattened input. This helps plans where that MUL runs in float (int8 Linears, float
    elsewhere); in an integer-only graph the MUL's own int8 input keeps the outliers.
    """
    import torch

    enc = model.encoder if hasattr(model, "encoder") else None
    if enc is None or not hasattr(enc, "layer"):
        raise IncompatibleModelError("SmoothQuant supports BERT-layout encoders only; drop --smoothquant")

    class Smoothed(torch.nn.Module):
        def __init__(self, inv_scale, linear):
            super().__init__()
            self.register_buffer("inv_scale", inv_scale)
            self.linear = linear

        def forward(self, x):
            return self.linear(x * self.inv_scale)

    # Groups of Linears that read the same input: (owner, attribute names). The FFN-down input
    # (GELU output, long positive tail) is the one that hurts int8 most on MiniLM.
    groups = []
    for layer in enc.layer:
        groups.append((layer.attention.self, ("query", "key", "value")))
        groups.append((layer.attention.output, ("dense",)))
        groups.append((layer.intermediate, ("dense",)))
        groups.append((layer.output, ("dense",)))

    amax = channel_absmax(model, batches, [getattr(owner, names[0]) for owner, names in groups])

    n = 0
    with torch.no_grad():
        for i, (owner, names) in enumerate(groups):
            linears = [getattr(owner, a) for a in names]
            x = amax[i].clamp(min=1e-5)
            w = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).clamp(min=1e-5)
            s = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
            for a, lin in zip(names, linears):
                lin.weight.mul_(s)  # weight is (out, in): scale input columns
                setattr(owner, a, Smoothed(1.0 / s, lin))
                n += 1
    return n


def explicit_layernorms(model) -> int:
    """Replace each torch LayerNorm with the same math in elementwise ops; returns how many.

    The converter lowers nn.LayerNorm's variance to SQUARED_DIFFERENCE, which the LiteRT
    quantizer cannot run in int16: an int16 plan then keeps 13 float ops wrapped in
    DEQUANTIZE/QUANTIZE. Written as (x - mean)^2 via MUL, every op has an int16 kernel and the
    graph is integer-only. Float results are identical up to rounding.
    """
    import torch

    class ExplicitLayerNorm(torch.nn.Module):
        def __init__(self, ln):
            super().__init__()
            self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

        def forward(self, x):
            d = x - x.mean(-1, keepdim=True)
            return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias

    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine and len(mod.normalized_shape) == 1]
    for name, ln in found:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, ExplicitLayerNorm(ln))
    return len(found)


def split_outlier_channels(model, batches: dict[str, np.ndarray], ratio: float = 8.0) -> int:
    """Give outlier output channels of the encoder's Linears their own tensor; returns channels moved.

    BERT-family encoders put "massive activations" on a few channels of a few tokens (in
    MiniLM, the [CLS] token's FFN-down output reaches ~190 where 99.9% of values are below 1.5).
    One per-tensor int8 scale over such a tensor rounds every normal value to a level or two.
    Clipping hurts too: those values matter. Instead the Linear y = Wx + b is rewritten exactly as
    y = W'x + b' + P(W_o x + b_o): W' has the outlier rows zeroed, W_o holds only those rows and the
    constant 0/1 matrix P puts them back. Each piece then gets its own quantization scale.
    """
    import torch

    class SplitLinear(torch.nn.Module):
        def __init__(self, lin, idx):
            super().__init__()
            w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
            self.main = torch.nn.Linear(lin.in_features, lin.out_features)
            self.outlier = torch.nn.Linear(lin.in_features, len(idx))
            with torch.no_grad():
                self.outlier.weight.copy_(w[idx])
                self.outlier.bias.copy_(b[idx])
                w[idx] = 0.0
                b[idx] = 0.0
                self.main.weight.copy_(w)
                self.main.bias.copy_(b)
            place = torch.zeros(len(idx), lin.out_features)
            place[torch.arange(len(idx)), torch.as_tensor(idx)] = 1.0
            self.register_buffer("place", place)

        def forward(self, x):
            return self.main(x) + self.outlier(x) @ self.place

    # Every biased Linear of the encoder stack (BERT "encoder.", DistilBERT "transformer."); the
    # pooler is not in the converted graph.
    from .hf_grouping import GroupedAddNorm

    grouped = tuple(name + "." for name, mod in model.named_modules() if isinstance(mod, GroupedAddNorm))
    linears = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and mod.bias is not None and not name.startswith("pooler")
               and not name.startswith(grouped)]  # grouped blocks already separate their outliers
    outputs = channel_absmax(model, batches, [lin for _, lin in linears], of="output")
    amax = {name: a for (name, _), a in zip(linears, outputs)}

    moved = 0
    for name, lin in linears:
        a = amax[name]
        idx = torch.nonzero(a > ratio * a.median()).flatten().tolist()
        if not idx:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, SplitLinear(lin, idx))
        moved += len(idx)
    return moved


def load_hf(path, options: HfOptions = HfOptions(), calib_texts: Sequence[str] | None = None) -> FloatModel:
    """Convert a local Hugging Face encoder directory to a float .tflite with a SignatureDef.

    calib_texts are needed only for SmoothQuant / outlier-split statistics.
    """
    path = Path(path)
    if not is_hf_dir(path):
        raise ModelFormatError(_not_hf_dir(path))
    cfg = _read_config(path)
    mtype = cfg.get("model_type", "?")
    if mtype not in ENCODER_TYPES:
        raise IncompatibleModelError(
            f"model_type {mtype!r} is not a supported encoder; supported: {', '.join(sorted(ENCODER_TYPES))}"
        )
    if options.pooling is not None and not isinstance(options.pooling, Pooling):
        options = dataclasses.replace(options, pooling=Pooling(options.pooling))
    arch, head = task_head(cfg)
    notes = []
    if arch and head and options.pooling is not None:
        notes.append(f"--pooling {options.pooling.value}: the encoder's output is converted; {arch}'s classification "
                     "head is not in the written model (leave --pooling out to keep it)")
        head = None
    elif arch and not head:
        notes.append(f"config.json names {arch}: edgeq converts its encoder only (heads it converts: "
                     f"{', '.join('*' + h for h in HEADS)}); that head is not in the written model")
    if head is None and options.pooling is None:
        options = dataclasses.replace(options, pooling=Pooling.MEAN)
    if options.group_outliers is not None and options.smoothquant_alpha is not None:
        raise IncompatibleModelError("outlier grouping and SmoothQuant rewrite the same Linears; use one of them")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and options.seq_len > max_pos:
        raise CalibrationError(f"--seq-len {options.seq_len} exceeds the model's maximum of {max_pos}")

    _require_hf()
    import torch
    import transformers

    tok = _load_tokenizer(path)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a "Loading weights" progress bar
            model = getattr(transformers, head or "AutoModel").from_pretrained(str(path)).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"cannot load weights from {path} ({str(e).splitlines()[0]})") from None
    encoder = model.base_model  # the rewrites below work on the encoder's layout (the model itself without a head)

    example = _encode(tok, ["edgeq example"], options.seq_len)
    names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in example)

    desc = f"{cfg.get('_name_or_path') or path.name} ({mtype}, seq_len {options.seq_len}, " + (
        f"{arch} head, {model.config.num_labels} labels" if head else f"pooling {options.pooling.value}")
    if options.smoothquant_alpha is not None:
        if mtype not in BERT_LAYOUT_TYPES:
            raise IncompatibleModelError(f"SmoothQuant is not implemented for {mtype}; drop --smoothquant")
        if not calib_texts:
            raise CalibrationError("SmoothQuant needs calibration text (--calib sentences.txt)")
        if not 0.0 <= options.smoothquant_alpha <= 1.0:
            raise CalibrationError(f"SmoothQuant alpha must be in [0, 1] (got {options.smoothquant_alpha})")
        n = smooth_bert(encoder, _encode(tok, list(calib_texts)[:256], options.seq_len),
                        options.smoothquant_alpha)
        desc += f", SmoothQuant alpha {options.smoothquant_alpha} on {n} Linears"
    if options.group_outliers is not None:
        if not options.group_outliers > 1.0:
            raise CalibrationError(f"the outlier grouping factor must be above 1 (got {options.group_outliers})")
        if mtype not in BERT_LAYOUT_TYPES:
            raise IncompatibleModelError(f"outlier grouping is not implemented for {mtype}; use --scheme dynamic "
                                         "or a profile with float fallback")
        if not calib_texts:
            raise CalibrationError("outlier grouping needs calibration text (--calib sentences.txt)")
        from .hf_grouping import group_outliers

        batch = _encode(tok, list(calib_texts)[:256], options.seq_len)
        first = np.unique(batch["input_ids"][:, 0])
        cls_id = int(first[0]) if len(first) == 1 and first[0] == tok.cls_token_id else None
        n = group_outliers(encoder, batch, options.group_outliers, cls_id)
        desc += f", [CLS] and {n} outlier channels grouped for int8"
    if options.split_outliers is not None:
        if not calib_texts:
            raise CalibrationError("outlier splitting needs calibration text (--calib sentences.txt)")
        n = split_outlier_channels(encoder, _encode(tok, list(calib_texts)[:256], options.seq_len),
                                   options.split_outliers)
        desc += f", {n} outlier channels split out"
    desc += ")"

    explicit_layernorms(encoder)  # after the rewrites above: their hooks saw the original modules
    wrapper = _wrap(model, None if head else options.pooling, names, options.mask_value)
    # The graph is built for batch 1 and int32 ids (LiteRT has no int64 I/O by default).
    kwargs = {n: torch.from_numpy(example[n][:1].astype(np.int32)) for n in names}
    tflite = litert_convert(wrapper, kwargs=kwargs, what=path.name,
                            hint="try another --pooling/--seq-len or report the model")

    runner = signature_runner(tflite)
    in_details, out_details = runner.get_input_details(), runner.get_output_details()
    input_names, output_names = tuple(in_details), tuple(out_details)
    dtypes = {n: in_details[n]["dtype"] for n in input_names}
    seq_len = options.seq_len

    def make_samples(texts: list[str]) -> list[dict[str, np.ndarray]]:
        enc = _encode(tok, texts, seq_len)
        return [{n: enc[n][i:i + 1].astype(dtypes[n]) for n in input_names} for i in range(len(texts))]

    # one label per text: its logits are class scores (top-1); a multi-label head's are independent sigmoids
    single = head == HEADS["ForSequenceClassification"] and cfg.get("problem_type") != "multi_label_classification"
    classes = ("logits",) if single else ()
    return FloatModel(tflite, input_names, output_names, make_samples, desc, tuple(notes), classes)


def _not_hf_dir(path: Path) -> str:
    """Why a directory is not one load_hf reads, and what to do."""
    if (path / "config.json").is_file():
        other = [w for w in ("tf_model.h5", "flax_model.msgpack") if (path / w).is_file()]
        if other and not any((path / w).is_file() for w in WEIGHT_FILES):
            return (f"{path} holds {other[0]} but no PyTorch weights ({' or '.join(WEIGHT_FILES)}); edgeq reads "
                    "Hugging Face models through PyTorch (transformers 5 has no TensorFlow or Flax classes): save "
                    "PyTorch weights with transformers 4 (from_pretrained(dir, from_tf=True).save_pretrained(dir))")
    return (f"{path} is not a Hugging Face model directory; it needs config.json, "
            f"{' or '.join(WEIGHT_FILES)} and a tokenizer (tokenizer.json or vocab.txt)")
