"""Representative dataset generators: real samples, checked against the model's input signature.

A source yields samples as {input name: array with a leading batch dim of 1}. Sources stream:
images are decoded one at a time (their resized pixels kept up to PIXEL_CACHE_BYTES, so the many
passes of a conversion decode each photo once) and .npy files are memory-mapped, so memory does not
grow with the data set. Every sample is checked (shape, dtype kind, NaN/inf) and errors name the
sample.
"""

from __future__ import annotations

import enum
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .defaults import DEFAULT_CALIB_SAMPLES, DEFAULT_EVAL_SAMPLES
from .errors import CalibrationError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# A conversion passes over its photos about five times (pixel-scale check, the level's steps, the
# replay, fidelity): a phone's 12 MP JPEG takes ~0.1 s to decode, so 40 of them cost ~20 s decoded
# each time, more than the level itself. Resized pixels are kept (uint8: 150 KB a 224x224 photo)
# up to this many bytes; past it photos are decoded again as before.
PIXEL_CACHE_BYTES = 256 << 20


class Preprocess(str, enum.Enum):
    UNIT = "unit"  # [0, 1]
    SYMMETRIC = "symmetric"  # [-1, 1]
    IMAGENET = "imagenet"  # (x/255 - mean) / std per channel
    RAW = "raw"  # 0..255 as float


class Layout(str, enum.Enum):
    """Where an image input keeps its channels."""

    NCHW = "nchw"  # channels first: PyTorch models (torch.export / litert-torch keep it)
    NHWC = "nhwc"  # channels last: Keras / TFLite models


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """One model input, as its signature declares it (batch dim first, -1 = any)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class CalibrationConfig:
    source: str  # a path, or "random"
    samples: int = DEFAULT_CALIB_SAMPLES
    eval_samples: int = DEFAULT_EVAL_SAMPLES
    seed: int = 0
    preprocess: Preprocess | None = None  # images only; None = unit [0, 1]
    mean: tuple[float, ...] | None = None  # explicit mean/std on 0..255 pixels, instead of `preprocess`
    std: tuple[float, ...] | None = None
    tokenizer: str | None = None
    seq_len: int = 128
    layout: Layout | None = None  # images only; None = from the input shape (refused when ambiguous)

    def __post_init__(self):
        if self.preprocess is not None and (self.mean is not None or self.std is not None):  # the mean won, silently
            raise CalibrationError(f"--mean/--std replace --preprocess {Preprocess(self.preprocess).value}'s "
                                   "normalisation; give one or the other")


@dataclass
class CalibrationData:
    """Samples split into a calibration part and a held-out evaluation part (disjoint)."""

    kind: str  # images | npy | npz | text | random
    source: str
    calibrated: bool
    total: int
    calib_indices: list[int]
    eval_indices: list[int]
    _load: Callable[[int], dict[str, np.ndarray]] = field(repr=False)
    seed: int = 0
    layout: Layout | None = None  # images: the layout they were fed in
    # images: how pixels (0..255) became the model's input, e.g. {"preprocess": "symmetric", "mean": [127.5],
    # "std": [127.5]}: the int8 input's range follows from it, and a device app must feed the same
    pixels: dict | None = None

    def calibration(self) -> Iterator[dict[str, np.ndarray]]:
        for i in self.calib_indices:
            yield self._load(i)

    def evaluation(self) -> Iterator[dict[str, np.ndarray]]:
        for i in self.eval_indices:
            yield self._load(i)

    def describe(self) -> dict:
        """count: samples the written model was calibrated on; eval_count: held-out samples fidelity
        was judged on. With little data (convert's refit) the held-out samples calibrate the written
        model too, after judging a twin calibrated on the other `judged_model_count`."""
        out = {"kind": self.kind, "source": self.source, "count": len(self.calib_indices),
               "eval_count": len(self.eval_indices), "seed": self.seed, "calibrated": self.calibrated}
        reused = set(self.calib_indices) & set(self.eval_indices)
        if reused:
            out["judged_model_count"] = len(self.calib_indices) - len(reused)
        if self.layout is not None:
            out["layout"] = Layout(self.layout).value
        if self.pixels is not None:
            out["pixels"] = self.pixels
        return out


def _split(total: int, n_calib: int, n_eval: int, seed: int, what: str) -> tuple[list[int], list[int]]:
    if total == 0:
        raise CalibrationError(f"{what}: no samples found; point --calib at real data")
    order = np.random.default_rng(seed).permutation(total).tolist()
    if total >= n_calib + n_eval:
        return order[:n_calib], order[n_calib:n_calib + n_eval]
    # Too few for both: hold out a fifth (at least one sample when there are two or more) to judge a
    # model calibrated on the rest; convert then calibrates the written model on every sample, so
    # the split never costs the user calibration data (convert_policy.refit_data).
    n_ev = min(n_eval, max(1, total // 5)) if total > 1 else 0
    return order[:total - n_ev], order[total - n_ev:]


def _check(sample: dict[str, np.ndarray], specs: Sequence[InputSpec], label: str) -> dict[str, np.ndarray]:
    """Shape / dtype / finiteness check; returns arrays cast to the input dtype with batch 1."""
    out = {}
    for spec in specs:
        if spec.name not in sample:
            raise CalibrationError(f"{label}: no data for model input {spec.name!r}; "
                                   f"inputs are {', '.join(s.name for s in specs)}")
        x = np.asarray(sample[spec.name])
        want = tuple(spec.shape)
        # A first axis of 1 (or dynamic) is a batch, fed one sample at a time. A sample of exactly
        # the input's shape with another first axis is fed whole: the axis may be the model's own
        # (Silero VAD's sequence model takes 16 audio chunks as (16, 576)). Anything else is one
        # item of that axis, fed as batch 1 (a Keras model saved with batch_size=4 resizes to it;
        # an image folder has no other way to feed it).
        batched = bool(want) and want[0] in (1, -1, None)
        if batched or not _fits(want, x.shape):
            if x.ndim == len(want) - 1:
                x = x[None]
            if x.ndim != len(want) or x.shape[0] != 1 or not _fits(want[1:], x.shape[1:]):
                _check_layout(x.shape, spec, label)
                raise CalibrationError(f"{label}: shape {tuple(x.shape)} does not match input {spec.name!r} "
                                       f"{want}{' (batch 1)' if batched else ''}; reshape the data or fix --calib")
        target = np.dtype(spec.dtype)
        if target.kind == "f":
            if x.dtype.kind not in "fiub":
                raise CalibrationError(f"{label}: dtype {x.dtype} cannot feed float input {spec.name!r}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                bad = "NaN" if np.isnan(x).any() else "inf"
                raise CalibrationError(f"{label}: contains {bad}; clean the data before calibrating")
        elif target.kind in "iu":
            if x.dtype.kind not in "iu":
                raise CalibrationError(f"{label}: dtype {x.dtype} cannot feed integer input {spec.name!r} "
                                       f"({spec.dtype}); integer data (e.g. token ids) expected")
            info = np.iinfo(target)
            if x.size and (x.min() < info.min or x.max() > info.max):
                raise CalibrationError(f"{label}: values {x.min()}..{x.max()} overflow input {spec.name!r} "
                                       f"({spec.dtype}, {info.min}..{info.max})")
        elif target.kind == "b" and x.dtype.kind != "b":
            raise CalibrationError(f"{label}: dtype {x.dtype} cannot feed bool input {spec.name!r}")
        out[spec.name] = x.astype(target, copy=False)
    return out


def _fits(want: Sequence[int], got: Sequence[int]) -> bool:
    return len(want) == len(got) and all(w in (-1, None) or w == g for w, g in zip(want, got))


def _check_layout(got: tuple[int, ...], spec: InputSpec, label: str) -> None:
    """A 4-D sample that is the input's shape with the channels moved: say which layout it wants."""
    want = tuple(spec.shape)
    if len(got) != 4 or len(want) != 4 or got[0] != 1:
        return
    as_nchw, as_nhwc = (got[0], got[3], got[1], got[2]), (got[0], got[2], got[3], got[1])
    for moved, has, wants, axes in ((as_nchw, "NHWC", "NCHW (channels first)", "0, 3, 1, 2"),
                                    (as_nhwc, "NCHW", "NHWC (channels last)", "0, 2, 3, 1")):
        if _fits(want[1:], moved[1:]):
            raise CalibrationError(f"{label}: shape {tuple(got)} is {has}; input {spec.name!r} {want} wants "
                                   f"{wants}: transpose the data (a.transpose({axes}))")


def image_layout(shape: Sequence[int], forced: Layout | None = None, what: str = "the model input") -> Layout:
    """The layout of a 4-D image input (N,C,H,W or N,H,W,C with 1 or 3 channels). `forced`
    decides a shape that fits both; a forced layout that does not fit is refused, naming the one
    that does."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise CalibrationError(f"{what} has shape {shape}; images need a 4-D input (NCHW or NHWC)")
    fits = {Layout.NCHW: shape[1] in (1, 3), Layout.NHWC: shape[3] in (1, 3)}
    if forced is not None:
        forced = Layout(forced)
        if fits[forced]:
            return forced
        other = Layout.NHWC if forced is Layout.NCHW else Layout.NCHW
        wants = f"wants {other.name} images" if fits[other] else "has neither 1 nor 3 channels"
        raise CalibrationError(f"--layout {forced.value} does not fit {what} {shape}: the model {wants}; "
                               "drop --layout")
    if all(fits.values()):
        raise CalibrationError(f"{what} {shape} could be NCHW or NHWC; pass --layout nchw or --layout nhwc")
    if not any(fits.values()):
        raise CalibrationError(f"{what} {shape} has neither 1 nor 3 channels in NCHW or NHWC; "
                               "images need 1 (gray) or 3 (RGB)")
    return Layout.NCHW if fits[Layout.NCHW] else Layout.NHWC


def load_calibration(cfg: CalibrationConfig, specs: Sequence[InputSpec],
                     make_text_samples: Callable[[list[str]], list[dict]] | None = None) -> CalibrationData:
    """Open the calibration source named by `cfg.source` for a model with inputs `specs`."""
    if cfg.samples < 1 or cfg.eval_samples < 0:
        raise CalibrationError("--calib-samples must be >= 1 and --eval-samples >= 0")
    if cfg.source == "random":
        if cfg.mean is not None or cfg.std is not None or cfg.preprocess is not None or cfg.layout is not None \
                or cfg.tokenizer:  # they were ignored
            raise CalibrationError("--preprocess/--mean/--std/--layout/--tokenizer prepare real data; --calib random "
                                   "has none: drop them")
        return _random(cfg, specs)
    path = Path(cfg.source)
    if not path.is_dir() and (cfg.mean is not None or cfg.std is not None or cfg.preprocess is not None
                              or cfg.layout is not None):
        raise CalibrationError("--preprocess/--mean/--std/--layout apply to image directories only; scale "
                               "(and transpose) .npy/.npz data before saving it")
    if not path.exists():
        raise CalibrationError(f"{path}: calibration data not found; pass a directory of images, "
                               ".npy/.npz, a .txt file (with --tokenizer), or 'random'")
    if cfg.tokenizer and (path.is_dir() or path.suffix.lower() not in (".txt", ".text")):
        raise CalibrationError(f"--tokenizer tokenizes .txt calibration data; {path.name} is not text: drop it")
    if path.is_dir():
        return _images(path, cfg, specs)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy(path, cfg, specs)
    if suffix == ".npz":
        return _npz(path, cfg, specs)
    if suffix in (".txt", ".text"):
        return _text(path, cfg, specs, make_text_samples)
    if suffix in IMAGE_SUFFIXES:
        raise CalibrationError(f"{path}: a single image; pass the directory that holds the images")
    raise CalibrationError(f"{path}: unknown calibration format {suffix!r}; "
                           "expected an image directory, .npy, .npz or .txt")


def _random(cfg: CalibrationConfig, specs) -> CalibrationData:
    def load(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([cfg.seed, i])
        out = {}
        for s in specs:
            shape = [d if d > 0 else 1 for d in s.shape]  # a dynamic batch: 1
            dt = np.dtype(s.dtype)
            out[s.name] = (rng.integers(0, 2, shape) if dt.kind in "iub" else rng.random(shape)).astype(dt)
        return out

    n = cfg.samples + cfg.eval_samples
    calib, ev = list(range(cfg.samples)), list(range(cfg.samples, n))
    return CalibrationData("random", "random", False, n, calib, ev, load, cfg.seed)


def _images(path: Path, cfg: CalibrationConfig, specs) -> CalibrationData:
    # Hidden files and folders are not photos of the set: macOS's "._IMG_1.jpg" resource forks (not
    # images at all, left by copying from a Mac) and Jupyter's .ipynb_checkpoints copies.
    visible = [p for p in path.rglob("*") if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    files = sorted(p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = Counter(p.suffix.lower() for p in visible if p.suffix)
        found = f"; it holds {', '.join(f'{n} {ext}' for ext, n in others.most_common(3))} file(s): convert " \
                "them to JPEG or PNG (HEIC, TIFF and raw photos are not read)" if others else ""
        raise CalibrationError(f"{path}: no images (jpg/png/bmp/gif/webp) in this directory{found}")
    if len(specs) != 1 or len(specs[0].shape) not in (3, 4):
        raise CalibrationError(f"{path}: image calibration needs a model with one image input (NCHW, NHWC, "
                               f"or NHW for grayscale); this model has {[(s.name, s.shape) for s in specs]}")
    spec = specs[0]
    if len(spec.shape) == 3:  # grayscale without a channel axis (Keras MNIST models: Input((28, 28)))
        layout, (_, h, w), c = None, spec.shape, 1
    else:
        layout = image_layout(spec.shape, cfg.layout, f"input {spec.name!r}")
        if layout is Layout.NCHW:
            _, c, h, w = spec.shape
        else:
            _, h, w, c = spec.shape
    if h <= 0 or w <= 0:
        raise CalibrationError(f"{path}: the model input has a dynamic size {spec.shape}; pass --input-shape "
                               "or export it with a fixed height and width")
    kind = np.dtype(spec.dtype)
    if kind.kind in "iu" and kind != np.uint8:
        raise CalibrationError(f"{path}: input {spec.name!r} is {spec.dtype}; photos feed float or uint8 image "
                               "inputs: give .npy/.npz data of that dtype instead")
    if kind == np.uint8 and (cfg.mean is not None or cfg.std is not None
                             or cfg.preprocess not in (None, Preprocess.RAW)):
        raise CalibrationError(f"{path}: input {spec.name!r} takes uint8 pixels (0..255, scaled inside the "
                               "model): drop --preprocess/--mean/--std")
    mean, std = _norm(cfg, c)
    for what, v in (("--mean", cfg.mean), ("--std", cfg.std)):
        if v is not None and len(v) not in (1, c):
            raise CalibrationError(f"{what} has {len(v)} values; the model's images have {c} channel(s): "
                                   f"give 1 or {c}")
    calib, ev = _split(len(files), cfg.samples, cfg.eval_samples, cfg.seed, str(path))
    cache: dict[int, np.ndarray] = {}

    def pixels(i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if i in cache:
            return cache[i]
        f = files[i]
        try:
            with Image.open(f) as im:
                # (Not im.draft(): decoding a large JPEG at a reduced DCT scale is 5x faster, but its
                # pixels differ by ~0.2 of 255, and that flipped the zoo's hand-landmark model across
                # the fidelity floor: cosine 0.959 -> 0.934. Each photo is decoded once instead.)
                if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # a 16-bit PNG: convert() clips 0..65535 at 255
                    im = Image.fromarray(np.rint(np.asarray(im, np.float64).clip(0, 65535) / 257).astype(np.uint8))
                x = np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR))
        except Image.DecompressionBombError:  # Pillow's guard against a header claiming gigapixels
            raise CalibrationError(f"{f}: image too large to decode (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels); "
                                   "resize it or remove it from the folder") from None
        except (UnidentifiedImageError, OSError) as e:
            raise CalibrationError(f"{f}: cannot decode image ({e}); remove or replace it") from None
        if (len(cache) + 1) * x.nbytes <= PIXEL_CACHE_BYTES:
            cache[i] = x
        return x

    def load(i: int) -> dict[str, np.ndarray]:
        f = files[i]
        x = pixels(i).astype(np.float32).reshape((h, w) if layout is None else (h, w, c))
        if kind.kind == "f":
            x = (x - mean) / std
        else:  # uint8 pixels as decoded: the model scales them itself (e.g. a Keras Rescaling layer)
            x = x.astype(np.uint8)
        if layout is Layout.NCHW:
            x = np.ascontiguousarray(x.transpose(2, 0, 1))
        return _check({spec.name: x}, specs, str(f))

    if kind.kind == "f":
        how = ("mean/std" if cfg.mean is not None or cfg.std is not None
               else Preprocess(cfg.preprocess or Preprocess.UNIT).value)
        scaled = {"preprocess": how, "mean": np.atleast_1d(mean).astype(float).tolist(),
                  "std": np.atleast_1d(std).astype(float).tolist()}
    else:
        scaled = {"preprocess": "none: uint8 pixels as decoded"}
    return CalibrationData("images", str(path), True, len(files), calib, ev, load, cfg.seed, layout, scaled)


def _norm(cfg: CalibrationConfig, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """mean/std applied to 0..255 pixels."""
    if cfg.mean is not None or cfg.std is not None:
        mean = np.asarray(cfg.mean if cfg.mean is not None else (0.0,), np.float32)
        std = np.asarray(cfg.std if cfg.std is not None else (1.0,), np.float32)
        if np.any(std == 0):
            raise CalibrationError("--std must not contain 0")
        return mean, std
    p = Preprocess(cfg.preprocess or Preprocess.UNIT)
    if p is Preprocess.UNIT:
        return np.float32(0.0), np.float32(255.0)
    if p is Preprocess.SYMMETRIC:
        return np.float32(127.5), np.float32(127.5)
    if p is Preprocess.RAW:
        return np.float32(0.0), np.float32(1.0)
    mean = np.asarray(_IMAGENET_MEAN, np.float32) * 255
    std = np.asarray(_IMAGENET_STD, np.float32) * 255
    if channels == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return mean, std


def _open_npy(path: Path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:  # click reports a stray EOFError as its Ctrl-D "Aborted!", naming nothing
        raise CalibrationError(f"{path}: empty or truncated .npy; save it with numpy.save") from None
    except (ValueError, OSError) as e:
        raise CalibrationError(f"{path}: cannot read .npy ({e}); save it with numpy.save") from None


# What numpy raises on a damaged .npz: a truncated or bit-rotted zip, an empty file, object arrays.
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


def _npz_member(path: Path, z, key: str) -> np.ndarray:
    try:
        a = z[key]
    except _NPZ_ERRORS as e:
        why = "holds Python objects; save numeric arrays" if "allow_pickle" in str(e) else f"{e}"
        raise CalibrationError(f"{path}: cannot read its array {key!r} ({why}); save it with numpy.savez") from None
    if not isinstance(a, np.ndarray):  # a member that is not an .npy comes back as bytes
        raise CalibrationError(f"{path}: its member {key!r} is not a numpy array; save the data with numpy.savez")
    return a


def _npy(path: Path, cfg: CalibrationConfig, specs) -> CalibrationData:
    if len(specs) != 1:
        raise CalibrationError(f"{path}: the model has {len(specs)} inputs; use an .npz keyed by input name "
                               f"({', '.join(s.name for s in specs)})")
    arr = _open_npy(path)
    if hasattr(arr, "files"):  # an .npz under an .npy name
        raise CalibrationError(f"{path}: an .npz, not an .npy; name it .npz (arrays keyed by input name)")
    return _arrays(path, "npy", {specs[0].name: arr}, cfg, specs)


def _npz(path: Path, cfg: CalibrationConfig, specs) -> CalibrationData:
    try:
        z = np.load(path, allow_pickle=False)
    except EOFError:
        raise CalibrationError(f"{path}: empty file; save the data with numpy.savez") from None
    except _NPZ_ERRORS as e:
        raise CalibrationError(f"{path}: cannot read .npz ({e}); save it with numpy.savez") from None
    if not hasattr(z, "files"):  # an .npy under an .npz name
        raise CalibrationError(f"{path}: an .npy, not an .npz; name it .npy, or save arrays with numpy.savez")
    keys = list(z.files)
    if len(specs) == 1 and len(keys) == 1:
        arrays = {specs[0].name: _npz_member(path, z, keys[0])}
    else:
        missing = [s.name for s in specs if s.name not in keys]
        if missing:
            raise CalibrationError(f"{path}: no array for input(s) {', '.join(missing)}; "
                                   f"the .npz has {', '.join(keys) or 'nothing'} — key arrays by input name")
        arrays = {s.name: _npz_member(path, z, s.name) for s in specs}
    return _arrays(path, "npz", arrays, cfg, specs)


def _arrays(path: Path, kind: str, arrays: dict[str, np.ndarray], cfg, specs) -> CalibrationData:
    lengths = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise CalibrationError(f"{path}: arrays have different sample counts {lengths}; "
                               "the first axis must be the sample axis for every input")
    total = next(iter(lengths.values()))
    calib, ev = _split(total, cfg.samples, cfg.eval_samples, cfg.seed, str(path))

    def load(i: int) -> dict[str, np.ndarray]:
        return _check({k: np.array(a[i]) for k, a in arrays.items()}, specs, f"{path}[{i}]")

    return CalibrationData(kind, str(path), True, total, calib, ev, load, cfg.seed)


def text_lines(path: Path | str) -> list[str]:
    """Non-empty lines of a text calibration file, one sample each."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if ln]


def calibration_texts(cfg: CalibrationConfig) -> list[str] | None:
    """The calibration lines (held-out lines excluded) of a .txt source, else None. Same split as
    load_calibration, so source rewrites that need statistics never see the evaluation samples."""
    path = Path(cfg.source)
    if cfg.source == "random" or path.suffix.lower() not in (".txt", ".text") or not path.is_file():
        return None
    lines = text_lines(path)
    calib, _ = _split(len(lines), cfg.samples, cfg.eval_samples, cfg.seed, str(path))
    return [lines[i] for i in calib]


def _text(path: Path, cfg: CalibrationConfig, specs, make_text_samples) -> CalibrationData:
    lines = text_lines(path)
    if make_text_samples is None:
        if not cfg.tokenizer:
            raise CalibrationError(f"{path}: text calibration needs a tokenizer; pass --tokenizer DIR "
                                   "(a Hugging Face tokenizer directory)")
        tok = load_tokenizer(cfg.tokenizer)

        def make_text_samples(texts: list[str]) -> list[dict]:
            return [_map_tokens(t, specs) for t in tokenize(tok, texts, cfg.seq_len)]
    calib, ev = _split(len(lines), cfg.samples, cfg.eval_samples, cfg.seed, str(path))

    def load(i: int) -> dict[str, np.ndarray]:
        return _check(make_text_samples([lines[i]])[0], specs, f"{path}:{i + 1}")

    return CalibrationData("text", str(path), True, len(lines), calib, ev, load, cfg.seed)


def load_tokenizer(directory) -> object:
    """A Hugging Face tokenizer from a local directory (transformers only; never the hub)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CalibrationError("text calibration needs transformers; pip install 'edgeq[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{directory}: cannot load a tokenizer ({first_line(e)}); point at a directory "
                               "with tokenizer.json or vocab.txt") from None


def encode_texts(tokenizer, texts, seq_len: int) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask[, token_type_ids]}, each (N, seq_len) int64, padded/truncated."""
    if isinstance(texts, str) or not texts:
        raise CalibrationError("no calibration text: give at least one line of text")
    if seq_len < 2:
        raise CalibrationError(f"--seq-len must be at least 2 (got {seq_len})")
    # Fixed length: the converted graph has static shapes (1, seq_len).
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    out = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    if "token_type_ids" in tokenizer.model_input_names and "token_type_ids" not in out:
        out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


def tokenize(tokenizer, texts: list[str], seq_len: int) -> list[dict[str, np.ndarray]]:
    """One dict per text (batch dim 1), as encode_texts makes them."""
    enc = encode_texts(tokenizer, texts, seq_len)
    return [{k: v[i:i + 1] for k, v in enc.items()} for i in range(len(texts))]


_TOKEN_ROLES = ("input_ids", "attention_mask", "token_type_ids")


def _map_tokens(tokens: dict[str, np.ndarray], specs) -> dict[str, np.ndarray]:
    """Match tokenizer outputs to model inputs by name, else by the conventional order."""
    names = [s.name for s in specs]
    if all(n in tokens for n in names):
        return {n: tokens[n] for n in names}
    if len(specs) > len(_TOKEN_ROLES):
        raise CalibrationError(f"model has {len(specs)} inputs; a tokenizer gives at most {len(_TOKEN_ROLES)}")
    out = {}
    for spec, role in zip(specs, _TOKEN_ROLES):  # e.g. litert-torch names them args_0..2
        if role not in tokens:
            raise CalibrationError(f"the tokenizer gives no {role!r} for model input {spec.name!r}")
        out[spec.name] = tokens[role]
    return out
