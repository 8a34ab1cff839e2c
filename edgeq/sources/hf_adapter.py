"""Hugging Face model directories, through `sources/hf.py` (PyTorch -> LiteRT, the [hf] extra)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from ..signature import signature_specs
from ..quiet import quiet_native
from ..files import sha256_file
from . import SourceModel


def load_hf_source(path: Path, *, seq_len: int = 128, pooling: str | None = None, split_outliers: float | None = None,
                   smoothquant: float | None = None, group_outliers: float | None = None,
                   calib_texts: list[str] | None = None, **_) -> SourceModel:
    """`calib_texts` (the calibration lines, never the held-out ones) feed the outlier-split and
    SmoothQuant statistics; both rewrites are exact in float and only change what int8 sees."""
    try:
        from . import hf
    except ImportError as e:
        raise ModelFormatError(f"{path}: Hugging Face models need the [hf] extra "
                               f"(pip install 'edgeq[hf]'): {e}") from None
    # litert-torch reports its passes on stdout; --json promises stdout to edgeq.
    with quiet_native():
        opts = hf.HfOptions(seq_len=seq_len, pooling=hf.Pooling(pooling) if pooling else None,
                            smoothquant_alpha=smoothquant,
                            split_outliers=split_outliers or None, group_outliers=group_outliers)
        needs_texts = any(x is not None for x in (opts.smoothquant_alpha, opts.split_outliers, group_outliers))
        float_model = hf.load_hf(path, opts, calib_texts=calib_texts if needs_texts else None)
    ins, outs = signature_specs(float_model.tflite)
    return SourceModel("hf", path, sha256_file(path), float_model.tflite, ins, outs, None,
                       float_model.make_samples, notes=float_model.notes, description=float_model.description,
                       class_outputs=float_model.class_outputs)
