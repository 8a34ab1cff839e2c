"""benchmarks/accuracy.py's own logic (issue 13): a folder of the user's photos, and ImageNet labels
read from synset-named files. The conversions it measures are the library's (tests/test_optimize.py);
what is checked here is which photos it takes and which label each gets, on real files written here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmarks_accuracy", REPO / "benchmarks" / "accuracy.py")
accuracy = sys.modules.setdefault("benchmarks_accuracy", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(accuracy)


def _synsets(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"n{v:08d}" for v in rng.choice(10**8, n, replace=False)]


def test_labels_are_the_sorted_synset_order_when_all_1000_are_named(tmp_path):
    ids = _synsets(1000)
    files = [tmp_path / f"{w}_{i}.JPEG" for i, w in enumerate(ids)]
    labels = accuracy.imagenet_labels(files[::-1])  # the order photos come in does not matter
    order = sorted(ids)
    assert [order[k] for k in labels] == ids[::-1]
    assert sorted(labels.tolist()) == list(range(1000))


def test_no_labels_when_a_synset_is_missing_or_a_name_is_not_one(tmp_path):
    ids = _synsets(1000)
    files = [tmp_path / f"{w}_x.JPEG" for w in ids]
    assert accuracy.imagenet_labels(files[:-1]) is None  # 999 classes: sorted order is not the index
    assert accuracy.imagenet_labels(files[:-1] + [tmp_path / "holiday.jpg"]) is None
    assert accuracy.imagenet_labels(files[:-1] + [tmp_path / "n123_short.jpg"]) is None


def test_photo_folder_takes_photos_only_and_shuffles_by_seed(tmp_path):
    for i in range(12):
        (tmp_path / f"p{i:02d}.{'JPEG' if i % 2 else 'png'}").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "sub").mkdir()
    a = accuracy.photo_files(tmp_path, seed=0, photos=str(tmp_path))
    b = accuracy.photo_files(tmp_path, seed=1, photos=str(tmp_path))
    assert sorted(f.name for f in a) == sorted(f"p{i:02d}.{'JPEG' if i % 2 else 'png'}" for i in range(12))
    assert sorted(a) == sorted(b) and a != b
    assert a == accuracy.photo_files(tmp_path, seed=0, photos=str(tmp_path))


@pytest.mark.parametrize("photos, says", [("no-such-folder", "neither one of stamps, commons, both nor a folder"),
                                          ("FOLDER", "3 photos, but --calib 100 takes them all")])
def test_bad_photo_folder_is_one_line_and_exit_2(tmp_path, photos, says):
    for i in range(3):
        (tmp_path / f"p{i}.jpg").write_bytes(b"x")
    arg = str(tmp_path) if photos == "FOLDER" else str(tmp_path / photos)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--photos", arg],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert says in r.stderr and "Traceback" not in r.stderr
