"""edgeq.files: atomic writes on a disk that is really full (a small tmpfs, mounted as root like the
sshd fixture), checked outputs, sha256 helpers."""

import errno
import hashlib
import os

import pytest
from click.testing import CliRunner

from edgeq.errors import DiskFullError, EdgeqError, OutputExistsError
from edgeq.files import (atomic_write, atomic_write_json, check_output, disk_full_error, human_bytes,
                         sha256_bytes, sha256_file, write_all)
from tests.sshd_fixture import fill_disk, small_tmpfs


def test_atomic_write_replaces_whole_file(tmp_path):
    out = tmp_path / "m.tflite"
    out.write_bytes(b"old")
    atomic_write(out, b"new" * 1000)
    assert out.read_bytes() == b"new" * 1000 and os.listdir(tmp_path) == ["m.tflite"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    with small_tmpfs(tmp_path / "small", 64 << 10) as small:
        out = small / "model.tflite"
        out.write_bytes(b"previous model")
        with pytest.raises(DiskFullError) as e:
            atomic_write(out, os.urandom(256 << 10))
        msg = str(e.value)
        assert isinstance(e.value, EdgeqError) and e.value.exit_code == 1 and "\n" not in msg
        assert msg.startswith(f"{out}: no space left on the disk (256.0 KB to write, ")
        assert f"free in {small}); free some space there or write to another directory" in msg
        assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
        # no temp file, and the file that was there is untouched
        assert os.listdir(small) == ["model.tflite"] and out.read_bytes() == b"previous model"

        fill_disk(small)
        with pytest.raises(DiskFullError, match=r"model\.edgeq\.json: no space left on the disk \(9 bytes to write, "
                                                r"0 bytes free"):
            atomic_write(small / "model.edgeq.json", '{"a": 1}\n')
        assert sorted(os.listdir(small)) == [".filler", "model.tflite"]


def test_no_inode_left_is_a_full_disk_too(tmp_path):
    # tmpfs counts the root directory as one inode: 2 inodes leave room for exactly one file
    with small_tmpfs(tmp_path / "small", 1 << 20, options="nr_inodes=2") as small:
        (small / "a").write_bytes(b"1")
        with pytest.raises(DiskFullError, match="no space left on the disk"):
            atomic_write(small / "b", b"2")  # mkstemp itself fails: ENOSPC
        assert os.listdir(small) == ["a"]


def test_convert_onto_a_full_disk(tf, tmp_path):
    """`edgeq convert -o` into a full file system: exit 1, one line naming the output, no file."""
    from edgeq.cli import main
    from tests.conftest import build_tiny, save_keras

    model = save_keras(tf, build_tiny(tf, "dense"), tmp_path / "tiny.keras")
    with small_tmpfs(tmp_path / "small", 64 << 10) as small:
        fill_disk(small)
        r = CliRunner().invoke(main, ["convert", str(model), "-o", str(small / "tiny.tflite"),
                                      "--calib", "random", "--quiet"])
        assert r.exit_code == 1, r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith(f"Error: {small / 'tiny.tflite'}: no space left on the disk") and "Traceback" not in r.output
        assert os.listdir(small) == [".filler"]


def test_write_all_is_all_or_nothing_on_a_full_disk(tmp_path):
    """A model, its samples and its manifest are written together: when the last one finds the disk
    full, the first two keep their earlier content (convert --force deleted them, and left the earlier
    manifest describing a model that was gone)."""
    with small_tmpfs(tmp_path / "small", 64 << 10) as small:
        old = {n: n.encode() * 10 for n in ("m.tflite", "m.samples.npz", "m.edgeq.json")}
        for n, b in old.items():
            (small / n).write_bytes(b)
        with pytest.raises(DiskFullError, match=r"m\.edgeq\.json: no space left on the disk"):
            write_all([(small / "m.tflite", os.urandom(8 << 10)), (small / "m.samples.npz", os.urandom(8 << 10)),
                       (small / "m.edgeq.json", os.urandom(256 << 10))])
        assert sorted(os.listdir(small)) == sorted(old) and all((small / n).read_bytes() == b for n, b in old.items())


def test_write_all_puts_back_what_it_replaced_when_a_rename_fails(tmp_path):
    """The renames come last; one that fails (a directory where the manifest goes) puts the files renamed
    before it back as they were, and the error is one line."""
    (tmp_path / "m.tflite").write_bytes(b"old model")
    (tmp_path / "m.edgeq.json").mkdir()
    with pytest.raises(OutputExistsError, match=r"m\.edgeq\.json: cannot write there \(is a directory\); choose "):
        write_all([(tmp_path / "m.tflite", b"new model"), (tmp_path / "m.samples.npz", b"new samples"),
                   (tmp_path / "m.edgeq.json", "{}")])
    assert (tmp_path / "m.tflite").read_bytes() == b"old model"
    assert sorted(os.listdir(tmp_path)) == ["m.edgeq.json", "m.tflite"]  # no samples, no temp files


def _three(d, content):
    for n in ("m.tflite", "m.samples.npz", "m.edgeq.json"):
        (d / n).write_text(content)


def _contents(d):
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


def _new(d):
    return [(d / n, "new") for n in ("m.tflite", "m.samples.npz", "m.edgeq.json")]


def test_an_interrupt_right_after_a_rename_puts_everything_back(tmp_path, monkeypatch):
    """Without edgeq's signal handler (a library caller) a Ctrl-C raises at once: landing just after the
    second rename, before anything recorded it, it left the old model beside the new samples and a
    hidden backup file. The renamed paths are told by their temporary files being gone."""
    _three(tmp_path, "old")
    real, calls = os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_all(_new(tmp_path))
    monkeypatch.setattr(os, "replace", real)
    assert _contents(tmp_path) == {"m.edgeq.json": "old", "m.samples.npz": "old", "m.tflite": "old"}


def test_a_signal_during_the_renames_waits_for_them(tmp_path, monkeypatch):
    """Under the CLI's handler (interrupts.recording) a SIGINT that arrives during the renames is held:
    every file is the new one, then the command ends as interrupted. Blocking the signal in the main
    thread held nothing (numpy's threads took it)."""
    import signal

    from edgeq import interrupts

    _three(tmp_path, "old")
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("m.samples.npz"):
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with interrupts.recording():
        write_all(_new(tmp_path))
        assert interrupts.pending()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert _contents(tmp_path) == {"m.edgeq.json": "new", "m.samples.npz": "new", "m.tflite": "new"}


def test_without_hard_links_the_earlier_files_are_copied_and_put_back(tmp_path, monkeypatch):
    """FAT/exFAT (SD cards, USB sticks) have no hard links: the rollback took "no backup" for "was new"
    and deleted the earlier model. Now it is copied, and put back when a later rename fails."""
    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "m.tflite").write_text("old model")
    (tmp_path / "m.edgeq.json").mkdir()
    with pytest.raises(OutputExistsError, match="is a directory"):
        write_all([(tmp_path / "m.tflite", "new model"), (tmp_path / "m.edgeq.json", "{}")])
    assert (tmp_path / "m.tflite").read_text() == "old model"
    assert sorted(os.listdir(tmp_path)) == ["m.edgeq.json", "m.tflite"]


def test_a_read_only_file_system_is_one_line(tmp_path):
    """mkstemp's other errors (read-only, no permission, a name too long) were tracebacks."""
    with small_tmpfs(tmp_path / "ro", 64 << 10, options="ro") as ro:
        with pytest.raises(OutputExistsError, match=r"m\.tflite: cannot write there \(read-only file system\)"):
            atomic_write(ro / "m.tflite", b"x")
        # and convert, bench, report say so before any slow work
        with pytest.raises(OutputExistsError, match=r"m\.tflite: cannot write there \(no write access to "):
            check_output(ro / "m.tflite", [], force=False)
    with pytest.raises(OutputExistsError, match=r"cannot write there \(file name too long\)"):
        atomic_write(tmp_path / ("a" * 300 + ".tflite"), b"x")
    with pytest.raises(OutputExistsError, match=r"cannot write there \(file name too long\); choose a shorter"):
        check_output(tmp_path / ("a" * 240 + ".tflite"), [], force=False)
    # the kept earlier file's name is 4 bytes longer than the temporary one's: a 241-byte name passed
    with pytest.raises(OutputExistsError, match=r"file name too long"):
        check_output(tmp_path / ("a" * 234 + ".tflite"), [], force=False)
    check_output(tmp_path / ("a" * 230 + ".tflite"), [], force=False)


def test_convert_force_onto_a_full_disk_keeps_the_earlier_files(tf, tmp_path):
    """`edgeq convert --force` over an earlier conversion, the disk filling up part way through the three
    writes: the earlier model, samples and manifest stay, byte for byte (the model and samples were
    deleted and the earlier manifest left behind)."""
    import numpy as np

    from edgeq.cli import main
    from tests.conftest import build_tiny, save_keras

    model = save_keras(tf, build_tiny(tf, "conv"), tmp_path / "tiny.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 8, 8, 3)).astype(np.float32))
    args = ["convert", str(model), "--calib", str(tmp_path / "x.npy"), "--quiet", "--force", "-o"]
    with small_tmpfs(tmp_path / "small", 256 << 10) as small:
        assert CliRunner().invoke(main, [*args, str(small / "m.tflite")]).exit_code == 0
        before = {p.name: p.read_bytes() for p in small.iterdir()}
        assert sorted(before) == ["m.edgeq.json", "m.samples.npz", "m.tflite"]
        fill_disk(small, leave=len(before["m.tflite"]) + len(before["m.samples.npz"]) + (4 << 10))
        r = CliRunner().invoke(main, [*args, str(small / "m.tflite")])
        assert r.exit_code == 1 and "no space left on the disk" in r.output and "Traceback" not in r.output, r.output
        assert {p.name: p.read_bytes() for p in small.iterdir() if p.name != ".filler"} == before


def test_other_write_errors_are_not_disk_full(tmp_path):
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path / "x", 1) is None
    assert disk_full_error(ValueError("no"), tmp_path / "x", 1) is None
    quota = disk_full_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path / "x", 3 << 20)
    assert str(quota).startswith(f"{tmp_path / 'x'}: disk quota exceeded (3.0 MB to write, ")


@pytest.mark.parametrize("n,text", [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KB"),
                                    (int(2.5 * 2**20), "2.5 MB"), (3 * 2**30, "3.0 GB"), (5 * 2**40, "5.0 TB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_check_output_refuses_inputs_and_existing(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="refusing to overwrite the input"):
        check_output(model, [model], force=True)
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        check_output(model, [], force=False)
    with pytest.raises(OutputExistsError, match="output directory does not exist"):
        check_output(tmp_path / "no" / "out.tflite", [], force=False)
    check_output(model, [], force=True)


def test_sha256_helpers(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"abc")
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest() == sha256_file(tmp_path / "d" / "a")
    assert sha256_file(tmp_path / "d") == hashlib.sha256(b"a" + b"abc").hexdigest()
