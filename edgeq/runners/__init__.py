"""Runners ship a model and `device_bench.py` somewhere, run it, and return its edgeq.bench/1 JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeviceError, EdgeqError

DEVICE_BENCH = Path(__file__).with_name("device_bench.py")


@dataclass(frozen=True)
class BenchOptions:
    threads: int = 1
    warmup: int = 5
    runs: int = 50
    delegate: str = "xnnpack"
    runtime: str = "auto"
    inputs: Path | None = None  # .npz of inputs; default random per input dtype
    seed: int = 0

    def args(self) -> list[str]:
        a = ["--threads", str(self.threads), "--warmup", str(self.warmup), "--runs", str(self.runs),
             "--delegate", self.delegate, "--runtime", self.runtime, "--seed", str(self.seed)]
        return a


def parse_bench_output(stdout: str, where: str, stderr: str = "") -> dict:
    """The last JSON line device_bench printed. Its error becomes an EdgeqError (bad arguments or
    inputs: exit 1) or a DeviceError (runtime, model load, invoke: exit 3)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" in result:
                cls = EdgeqError if result.get("kind") == "usage" else DeviceError
                raise cls(f"{where}: {result['error']}")
            return result
    tail = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["(no output)"])[-1]
    raise DeviceError(f"{where}: the device runner printed no result; last output: {tail[-300:]}")
