"""Run one operation (profile, flash, rollback) on many devices from a TOML inventory.

Inventory format (relative identity/known_hosts paths are relative to the inventory file):

    [defaults]                  # optional; applies to every device unless it sets its own
    user = "pi"
    profile = "rpi4"
    identity = "~/.ssh/id_ed25519"

    [devices.kitchen]
    host = "192.168.1.20"

    [devices.garage]
    host = "garage.local"
    port = 2222
    profile = "rpi5"

Devices run concurrently (bounded); a failing device never stops the others. The result keeps
the inventory order and gives each device a status, a table and a JSON form.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EdgeqError
from .remote import SshTarget

FLEET_SCHEMA = "edgeq.fleet/1"
_TARGET_KEYS = {"host", "user", "port", "identity", "known_hosts", "connect_timeout", "run_timeout"}
_KEYS = _TARGET_KEYS | {"profile"}


@dataclass(frozen=True)
class FleetDevice:
    name: str
    target: SshTarget
    profile: str  # device profile id, e.g. "rpi4"


@dataclass(frozen=True)
class Inventory:
    path: str
    devices: tuple[FleetDevice, ...]


def load_inventory(path, **cli) -> Inventory:
    """Read an inventory file. `cli` holds command-line SshTarget settings (identity, known_hosts,
    connect_timeout, run_timeout, trust_new_host); None values are ignored. They are the lowest
    layer: [defaults] overrides them and each [devices.NAME] overrides both."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise EdgeqError(f"inventory not found: {p}; pass an existing TOML file to --fleet") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeqError(f"inventory {p} is not valid TOML: {e}") from None
    unknown_top = set(data) - {"defaults", "devices"}
    if unknown_top:
        raise EdgeqError(f"inventory {p}: unknown table(s) {sorted(unknown_top)}; use [defaults] and "
                         f"[devices.NAME]")
    defaults = data.get("defaults", {})
    devices = data.get("devices", {})
    if not isinstance(devices, dict) or not devices:
        raise EdgeqError(f"inventory {p} lists no devices; add a [devices.NAME] table with host = \"...\"")
    out = []
    for name, entry in [("defaults", defaults)] + list(devices.items()):
        if not isinstance(entry, dict):
            raise EdgeqError(f"inventory {p}: {name} must be a table")
        bad = set(entry) - _KEYS
        if bad:
            raise EdgeqError(f"inventory {p}: [{name}] has unknown key(s) {sorted(bad)}; "
                             f"allowed: {', '.join(sorted(_KEYS))}")
    base = {k: v for k, v in cli.items() if v is not None}
    bad_cli = set(base) - (_TARGET_KEYS | {"trust_new_host"})
    if bad_cli:
        raise TypeError(f"load_inventory() got unexpected settings {sorted(bad_cli)}")
    for key in ("identity", "known_hosts"):  # command-line paths are relative to the cwd
        if key in base:
            base[key] = str(Path(base[key]).expanduser().resolve())
    for name, entry in devices.items():
        file_kw = {**defaults, **entry}
        _check_types(p, name, file_kw)  # before the paths are resolved (identity = 5 was a traceback there)
        for key in ("identity", "known_hosts"):  # file paths are relative to the inventory
            if key in file_kw:
                file_kw[key] = str((p.parent / Path(file_kw[key]).expanduser()).resolve())
        merged = {**base, **file_kw}
        if "host" not in entry:
            raise EdgeqError(f"inventory {p}: device {name!r} has no host; add host = \"...\"")
        if "profile" not in merged:
            raise EdgeqError(f"inventory {p}: device {name!r} has no profile; add profile = \"rpi4\" "
                             f"(or set it under [defaults])")
        kw = {k: v for k, v in merged.items() if k in _TARGET_KEYS or k == "trust_new_host"}
        port = kw.get("port", 22)
        if not 0 < port < 65536:
            raise EdgeqError(f"inventory {p}: device {name!r} has port {port!r}; use 1-65535")
        try:
            target = SshTarget(**kw)
        except TypeError as e:
            raise EdgeqError(f"inventory {p}: device {name!r}: {e}") from None
        out.append(FleetDevice(name, target, merged["profile"]))
    return Inventory(str(p), tuple(out))


# What each inventory value must be, and an example for the message (a TOML 5 or ["rpi4"] was a traceback).
_TYPES = {"host": (str, '"pi@10.0.0.5"'), "user": (str, '"pi"'), "identity": (str, '"~/.ssh/id_ed25519"'),
          "known_hosts": (str, '"~/.ssh/known_hosts"'), "profile": (str, '"rpi4"'), "port": (int, "22"),
          "connect_timeout": (float, "10"), "run_timeout": (float, "600"), "trust_new_host": (bool, "true")}


def _check_types(path: Path, name: str, values: dict) -> None:
    import math

    for key, v in values.items():
        want, example = _TYPES[key]
        if want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            what = "a number of seconds above 0"
        else:
            ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))  # true is no port
            what = {str: "a string", int: "a whole number", bool: "true or false"}[want]
        if not ok:
            raise EdgeqError(f"inventory {path}: device {name!r}: {key} must be {what} such as {key} = {example}, "
                             f"got {v!r}")


@dataclass(frozen=True)
class DeviceOutcome:
    name: str
    host: str
    profile: str
    status: str  # "ok" | "failed" (an EdgeqError: expected, actionable) | "crashed" (a bug)
    result: dict | None
    error: str | None
    exit_code: int
    seconds: float


@dataclass(frozen=True)
class FleetResult:
    outcomes: tuple[DeviceOutcome, ...]

    @property
    def ok(self) -> bool:
        return all(o.status == "ok" for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when every device succeeded, else the highest per-device code (3 = device failure)."""
        return max((o.exit_code for o in self.outcomes), default=0)

    def to_dict(self) -> dict:
        return {"schema": FLEET_SCHEMA,
                "summary": {"devices": len(self.outcomes),
                            "ok": sum(o.status == "ok" for o in self.outcomes),
                            "failed": sum(o.status != "ok" for o in self.outcomes)},
                "devices": [dataclasses.asdict(o) for o in self.outcomes]}

    def table(self):
        """One row per device, side by side (profile or flash columns as fitting), then each failed
        device's full error below the table, where it has the width to be read."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        results = [o.result or {} for o in self.outcomes]
        is_profile = any("runs" in r for r in results)
        is_flash = any("version" in r for r in results)
        t = Table(title="edgeq fleet")
        t.add_column("device", no_wrap=True)
        t.add_column("profile", no_wrap=True)
        t.add_column("status", no_wrap=True)
        if is_profile:
            for col in ("runtime", "median ms", "p95 ms", "init ms", "peak MB", "cpu"):
                t.add_column(col, justify="right" if "ms" in col or "MB" in col else "left")
        if is_flash:
            t.add_column("version")
            t.add_column("previous")
        for o, r in zip(self.outcomes, results):
            row = [f"{o.name}\n[dim]{o.host}[/dim]", o.profile,
                   "ok" if o.status == "ok" else f"[red]{o.status}[/red]"]
            if is_profile:
                runs, rt = r.get("runs", {}), r.get("runtime", {})
                row += [f"{rt.get('name', '')} {rt.get('version', '')}".strip(), _ms(runs.get("median_ms")),
                        _ms(runs.get("p95_ms")), _ms(r.get("init_ms")),
                        _ms(r.get("memory_mb", {}).get("peak_rss")),
                        (r.get("device", {}).get("cpu_model") or "") + (" (emulated)" if r.get("emulated") else "")]
            if is_flash:
                row += [r.get("version") or "", r.get("previous") or ""]
            t.add_row(*row)
        errors = [Text(f"{o.name}: {o.error}", style="red") for o in self.outcomes if o.error]
        return Group(t, *errors)


def _ms(v) -> str:
    return "" if v is None else f"{v:.2f}"


def run_fleet(inventory: Inventory, fn: Callable[[FleetDevice], dict], max_parallel: int = 4,
              progress: Callable[[str], None] | None = None) -> FleetResult:
    """Call fn(device) for every device, at most max_parallel at a time; collect every outcome."""
    if max_parallel < 1:
        raise EdgeqError("--parallel must be at least 1")
    say = progress or (lambda msg: None)

    def one(dev: FleetDevice) -> DeviceOutcome:
        t0 = time.monotonic()
        say(f"{dev.name}: started")
        try:
            result = fn(dev)
            status, error, code = "ok", None, 0
        except EdgeqError as e:
            result, status, error, code = None, "failed", str(e), e.exit_code
        except Exception as e:  # noqa: BLE001 - one device's bug must not stop the fleet
            result, status, error, code = None, "crashed", f"{type(e).__name__}: {e}", 1
        say(f"{dev.name}: {status}" + (f" ({error})" if error else ""))
        return DeviceOutcome(dev.name, dev.target.label, dev.profile, status, result, error, code,
                             round(time.monotonic() - t0, 3))

    pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="edgeq-fleet")
    try:
        futures = [pool.submit(one, dev) for dev in inventory.devices]
        return FleetResult(tuple(f.result() for f in futures))
    finally:
        # On Ctrl-C, devices not started yet are dropped; running ones finish their own cleanup.
        pool.shutdown(wait=True, cancel_futures=True)
