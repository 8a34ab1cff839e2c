"""edgeq demo (edgeq/demo.py): the main job on the embedded default, end to end with the real
converter, quantizer and interpreter, and on a disk that fills up (a small tmpfs, as root)."""

import json
import os

from click.testing import CliRunner

from edgeq.cli import main
from tests.sshd_fixture import fill_disk, small_tmpfs


def test_demo_converts_and_measures(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--runs", "5", "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    acc = js["accuracy"]
    assert acc["test_samples"] > 300 and acc["float"] > 0.9 and acc["float"] - acc["int8"] < 0.03, acc
    assert js["manifest"]["sizes"]["ratio"] > 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "digits_cnn.keras", "digits_float.tflite", "digits_int8.edgeq.json", "digits_int8.samples.npz",
        "digits_int8.tflite", "digits_test.npy", "digits_train.npy"]


def test_demo_on_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path):
    """Keras saved the model in place: a full disk gave a traceback and left a truncated
    digits_cnn.keras. Now one line, and the folder holds nothing half-written."""
    with small_tmpfs(tmp_path / "small", 256 << 10) as small:
        fill_disk(small, leave=16 << 10)
        r = CliRunner().invoke(main, ["demo", "--out", str(small / "d"), "--runs", "1", "--quiet"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.startswith(f"Error: {small / 'd' / 'digits_cnn.keras'}: no space left on the disk"), r.output
        assert os.listdir(small / "d") == []
