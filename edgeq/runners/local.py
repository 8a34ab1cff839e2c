"""Local runner: device_bench.py in a subprocess on this host (same script the Pi runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import DeviceError
from ..tflite_model import read_model
from . import DEVICE_BENCH, BenchOptions, parse_bench_output


def bench_local(model: Path | str, opts: BenchOptions = BenchOptions(), *, python: str | None = None,
                timeout_s: float = 600) -> dict:
    model = Path(model)
    read_model(model)  # a one-line error for a missing/corrupt file before spawning anything
    cmd = [python or sys.executable, str(DEVICE_BENCH), str(model), *opts.args()]
    if opts.inputs:
        cmd += ["--inputs", str(opts.inputs)]
    tmp = None
    if opts.save_outputs:  # written beside the target and renamed on success: never half a file
        dest = Path(opts.save_outputs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".edgeq-", suffix=".npz", dir=dest.parent)
        os.close(fd)
        cmd += ["--save-outputs", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"local benchmark timed out after {timeout_s:.0f} s; lower --runs") from None
        result = parse_bench_output(proc.stdout, "local runner", proc.stderr)
        if tmp:
            os.replace(tmp, opts.save_outputs)
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    result["runner"] = "local"
    return result


def run(model: Path, profile, opts: BenchOptions, request, progress=None) -> dict:
    """The registry entry for reach "local" (runners.profile_model)."""
    if progress:
        progress(f"benchmarking {model.name} on this host ({opts.threads} threads, {opts.runs} runs)")
    return bench_local(model, opts)
