"""Outlier groups for all-int8 BERT graphs: no int8 tensor mixes massive and normal values.

BERT-family encoders carry "massive activations" (a few hidden channels, mostly on [CLS], ~100x
the rest), and in an all-int8 graph each add + LayerNorm block would put them on one int8 scale
with everything else. Each such block here runs on [CLS] and on the other tokens apart, with the
hidden channels held as one tensor per magnitude tier; exact in float. Why, and what it measured
on all-MiniLM-L6-v2: docs/transformers.md ("Outlier grouping").

Needs torch (the [hf] extra); imported by hf.load_hf only when asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import IncompatibleModelError
from .torch_util import channel_absmax, table_lookup


def _tiers(amax: torch.Tensor, ratio: float) -> list[torch.Tensor]:
    """Channel indices by magnitude tier: max |x| up to ratio x the median channel's, up to ratio^2
    x, ...; empty tiers dropped. Each tier becomes one tensor with its own int8 scale."""
    rel = amax / amax.median().clamp(min=1e-12)
    tier = torch.clamp(torch.ceil(torch.log(rel.clamp(min=1.0)) / np.log(ratio)) - 1, min=0).long()
    return [torch.nonzero(tier == t).flatten() for t in range(int(tier.max()) + 1) if bool((tier == t).any())]


class GroupedLayerNorm(torch.nn.Module):
    """LayerNorm over a hidden vector held as one tensor per channel group."""

    def __init__(self, ln: torch.nn.LayerNorm, groups: list[torch.Tensor]):
        super().__init__()
        for g, idx in enumerate(groups):
            self.register_buffer(f"gamma_{g}", ln.weight.detach()[idx].clone())
            self.register_buffer(f"beta_{g}", ln.bias.detach()[idx].clone())
        hidden = sum(len(idx) for idx in groups)
        order = torch.empty(hidden, dtype=torch.long)
        order[torch.cat(groups)] = torch.arange(hidden)
        self.register_buffer("order", order)
        self.eps, self.inv_n = ln.eps, 1.0 / hidden

    def forward(self, *ys):
        mean = sum(y.sum(-1, keepdim=True) for y in ys) * self.inv_n
        ds = [y - mean for y in ys]
        r = torch.rsqrt(sum((d * d).sum(-1, keepdim=True) for d in ds) * self.inv_n + self.eps)
        out = torch.cat([d * r * getattr(self, f"gamma_{g}") + getattr(self, f"beta_{g}")
                         for g, d in enumerate(ds)], -1)
        return out.index_select(-1, self.order)


class GroupedAddNorm(torch.nn.Module):
    """LayerNorm(dense(pre(h)) + x), [CLS] and the other tokens apart, channels grouped."""

    def __init__(self, dense: torch.nn.Linear, ln: torch.nn.LayerNorm, groups: list[torch.Tensor], pre=None):
        super().__init__()
        self.pre = pre
        self.dense = torch.nn.ModuleList(torch.nn.Linear(dense.in_features, len(idx)) for idx in groups)
        with torch.no_grad():
            for g, (lin, idx) in enumerate(zip(self.dense, groups)):
                lin.weight.copy_(dense.weight[idx])
                lin.bias.copy_(dense.bias[idx])
                self.register_buffer(f"idx_{g}", idx)
        self.norm = GroupedLayerNorm(ln, groups)

    def _block(self, h, x):
        if self.pre is not None:
            h = self.pre(h)
        return self.norm(*(lin(h) + x.index_select(-1, getattr(self, f"idx_{g}")) for g, lin in enumerate(self.dense)))

    def forward(self, h, x):
        return torch.cat([self._block(h[:, :1], x[:, :1]), self._block(h[:, 1:], x[:, 1:])], 1)


class GroupedEmbeddings(torch.nn.Module):
    """BERT embeddings (word + token type + absolute position, LayerNorm) with channels grouped.

    Position 0 always holds [CLS] with token type 0 (checked on the tokenizer by the caller), so
    its output is a constant computed here in float; only positions 1.. are computed."""

    def __init__(self, emb, groups: list[torch.Tensor], cls_id: int):
        super().__init__()
        w, t = emb.word_embeddings.weight.detach(), emb.token_type_embeddings.weight.detach()
        p = emb.position_embeddings.weight.detach()
        # Tables as buffers read by table_lookup (GATHER, int8), not nn.Embedding (stays float).
        for g, idx in enumerate(groups):
            self.register_buffer(f"word_{g}", w[:, idx].clone())
            self.register_buffer(f"type_{g}", t[:, idx].clone())
            self.register_buffer(f"pos_{g}", p[1:, idx].clone())
        self.n_groups = len(groups)
        self.norm = GroupedLayerNorm(emb.LayerNorm, groups)
        with torch.no_grad():
            self.register_buffer("cls_out", emb.LayerNorm(w[cls_id] + t[0] + p[0]).reshape(1, 1, -1).clone())

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                past_key_values_length=0, **_):
        ids = input_ids[:, 1:]
        types = token_type_ids[:, 1:] if token_type_ids is not None else torch.zeros_like(ids)
        n = ids.shape[1]
        rest = self.norm(*(table_lookup(getattr(self, f"word_{g}"), ids)
                           + table_lookup(getattr(self, f"type_{g}"), types)
                           + getattr(self, f"pos_{g}")[:n] for g in range(self.n_groups)))
        return torch.cat([self.cls_out.expand(ids.shape[0], 1, -1), rest], 1)


class _Ffn(torch.nn.Module):
    def __init__(self, intermediate):
        super().__init__()
        self.dense, self.act = intermediate.dense, intermediate.intermediate_act_fn

    def forward(self, x):
        return self.act(self.dense(x))


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def group_outliers(model, batches: dict[str, np.ndarray], ratio: float = 2.0, cls_id: int | None = None) -> int:
    """Rewrite a BERT-layout model in place (see the module docstring); returns channels moved out
    of the normal tier, summed over blocks. Tiers grow by `ratio` in calibration max |x|.
    `cls_id`: the [CLS] id the tokenizer always puts at position 0, or None to leave the
    embeddings alone (also left alone unless they are BERT's absolute-position ones)."""
    layers = list(getattr(getattr(model, "encoder", None), "layer", []))
    if not layers or not all(hasattr(getattr(lay, "output", None), "LayerNorm")
                             and hasattr(getattr(getattr(lay, "attention", None), "output", None), "LayerNorm")
                             for lay in layers):
        raise IncompatibleModelError("outlier grouping supports BERT-layout encoders only")
    emb = getattr(model, "embeddings", None)
    group_emb = (cls_id is not None and type(emb).__name__ == "BertEmbeddings"
                 and getattr(model.config, "position_embedding_type", "absolute") == "absolute")
    # The LayerNorm input of each block, without [CLS] (it has its own group).
    owners = [lay.attention.output for lay in layers] + [lay.output for lay in layers] + ([emb] if group_emb else [])
    amax = channel_absmax(model, batches, [owner.LayerNorm for owner in owners], skip_first_token=True)

    grouped = 0
    with torch.no_grad():
        for i, layer in enumerate(layers):
            tiers = _tiers(amax[i], ratio)
            att = layer.attention
            att.output = GroupedAddNorm(att.output.dense, att.output.LayerNorm, tiers)
            grouped += sum(len(t) for t in tiers[1:])
            tiers = _tiers(amax[len(layers) + i], ratio)
            # BertLayer calls output(intermediate(x), x): the FFN moves inside, intermediate passes x on.
            layer.output = GroupedAddNorm(layer.output.dense, layer.output.LayerNorm, tiers,
                                          pre=_Ffn(layer.intermediate))
            layer.intermediate = _Identity()
            grouped += sum(len(t) for t in tiers[1:])
        if group_emb:
            tiers = _tiers(amax[len(owners) - 1], ratio)
            model.embeddings = GroupedEmbeddings(emb, tiers, cls_id)
            grouped += sum(len(t) for t in tiers[1:])
    return grouped
