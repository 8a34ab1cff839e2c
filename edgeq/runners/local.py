"""Local runner: device_bench.py in a subprocess on this host (same script the Pi runs)."""

from __future__ import annotations

import subprocess
import sys
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
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"local benchmark timed out after {timeout_s:.0f} s; lower --runs") from None
    result = parse_bench_output(proc.stdout, "local runner", proc.stderr)
    result["runner"] = "local"
    return result
