"""A built wheel is a complete install: the device profiles and runtime tables ship inside it.

The wheel is built from a copy of the sources (a stale build/ in the checkout cannot help), installed
with --no-deps into a fresh venv outside the tree, and run from a neutral folder. That venv gets no
package index and only click besides the wheel: `edgeq devices list/show` imports nothing else
outside the standard library (checked with `python -X importtime`), which also keeps them instant.
The editable install (`pip install -e .`) is checked the same way against the checkout's devices/.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import missing_part

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEVICES = REPO / "devices"
PROFILE_IDS = sorted(p.stem for p in DEVICES.glob("*.toml"))
RUNTIME_TABLES = sorted(p.name for p in (DEVICES / "runtimes").glob("*.toml"))
WARNING = re.compile(r"\b\w*(Warning|Deprecat)\w*\b")


def _pip(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                       capture_output=True, text=True, cwd=cwd, timeout=600)
    assert p.returncode == 0, f"pip {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """What `git clone` gives for building: pyproject, README, the package and devices/."""
    if int(importlib.metadata.version("setuptools").split(".")[0]) < 77:
        missing_part("setuptools>=77 is needed to build edgeq (pip install 'setuptools>=77'; "
                     "`make .venv/.edgeq-core` installs it)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("edgeq", "devices"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _fresh_venv(root: Path) -> tuple[Path, Path]:
    """A venv without pip and without edgeq; click (the one non-stdlib import) comes from this
    test's environment through a .pth naming a folder that holds nothing else."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python3*/site-packages")).resolve()
    deps = root / "deps"
    deps.mkdir()
    import click
    (deps / "click").symlink_to(Path(click.__file__).resolve().parent)
    (site / "edgeq-test-deps.pth").write_text(f"{deps}\n")
    return venv, site


def _edgeq(venv: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGEQ_DEVICES_DIR")}
    p = subprocess.run([str(venv / "bin" / "edgeq"), *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    missing = re.search(r"No module named '([^']+)'", p.stderr)
    assert not missing, (f"`edgeq {' '.join(args)}` imports {missing[1]}: keep `edgeq devices` free of "
                         "heavy imports (import inside the function that needs it)")
    assert p.returncode == 0, f"edgeq {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}"
    return p


def _check_profiles(venv: Path, cwd: Path, shipped: Path):
    """devices list/show from `cwd` find every profile and the runtime tables under `shipped`."""
    listed = json.loads(_edgeq(venv, cwd, "devices", "list", "--json").stdout)
    assert sorted(p["id"] for p in listed) == PROFILE_IDS
    assert all(Path(p["path"]).resolve().parent == shipped for p in listed), [p["path"] for p in listed]

    rpi4 = json.loads(_edgeq(venv, cwd, "devices", "show", "rpi4", "--json").stdout)
    spec = tomllib.loads((DEVICES / "rpi4.toml").read_text())["runtime"]
    table_file = DEVICES / "runtimes" / f"{spec['name']}-{spec['version']}.toml"
    table = tomllib.loads(table_file.read_text())["op_versions"]
    assert rpi4["op_versions"] == table and len(table) > 100
    assert rpi4["op_versions_complete"] is True
    assert rpi4["op_versions_source"].startswith(str(shipped / "runtimes" / table_file.name) + ":")


def test_wheel_ships_profiles_and_runtime_tables(source, tmp_path):
    dist = tmp_path / "dist"
    log = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source),
               cwd=tmp_path)
    # setuptools deprecations (license table, packages it would ignore, ...) stay fixed
    assert not [ln for ln in log.splitlines() if WARNING.search(ln)], log[-3000:]
    (whl,) = dist.glob("edgeq-*.whl")

    names = set(zipfile.ZipFile(whl).namelist())
    shipped = {f"edgeq/devices/{i}.toml" for i in PROFILE_IDS} | {
        f"edgeq/devices/runtimes/{n}" for n in RUNTIME_TABLES}
    assert len(PROFILE_IDS) >= 9 and len(RUNTIME_TABLES) >= 2
    assert shipped <= names, sorted(shipped - names)
    modules = {p.relative_to(source).as_posix() for p in (source / "edgeq").rglob("*.py")}
    assert modules <= names, f"not in the wheel (add the subpackage to pyproject.toml): {sorted(modules - names)}"
    assert not [n for n in names if n.startswith("devices/")], "devices/ must live inside the package"

    venv, site = _fresh_venv(tmp_path)
    _pip("--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(whl))
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import edgeq; print(edgeq.__file__)"],
                           capture_output=True, text=True, cwd=neutral, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(site), where  # the wheel, not the checkout
    _check_profiles(venv, neutral, site / "edgeq" / "devices")


def test_editable_install_reads_the_checkouts_devices(source, tmp_path):
    # `pip install -e .` runs setuptools' PEP 660 hook, then installs the wheel it builds; the hook
    # is called here directly so the fresh venv needs no build backend of its own.
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; "
                            "print(b.build_editable(sys.argv[1]))", str(dist)],
                           capture_output=True, text=True, cwd=source, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    whl = dist / build.stdout.strip().splitlines()[-1]
    venv, _ = _fresh_venv(tmp_path)
    _pip("--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(whl))
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    _check_profiles(venv, neutral, (source / "devices").resolve())
