"""Strict reading of the devices/ TOML files (device profiles and runtime tables).

Every problem is one ProfileError line, '<file>: <key>: <problem>; <fix>', so a typo in a
hand-written profile points at itself. Imports nothing heavy (stdlib only).
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from .errors import ProfileError
from .tflite_ops import BUILTIN_OP_SET, suggest

SCHEMA_VERSION = 1  # of profiles and runtime tables alike


def display(path: Path) -> str:
    """The path as the user most likely typed it (relative to the working directory when inside it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{display(path)}: invalid TOML ({e}); fix the syntax") from None
    except UnicodeDecodeError as e:  # Latin-1 "Büro", or UTF-16 from Notepad: TOML is UTF-8
        raise ProfileError(f"{display(path)}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                           "save the file as UTF-8") from None
    except OSError as e:
        raise ProfileError(f"{display(path)}: cannot read ({e.strerror}); check permissions") from None


class Checker:
    """Reads typed values out of parsed TOML, failing with '<file>: <key>: <problem>; <fix>'."""

    def __init__(self, path: Path):
        self.where = display(path)

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: {key}: {problem}")

    def schema_version(self, data: dict, fix: str = "") -> None:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise self.fail("schema_version", f"expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}{fix}")

    def keys(self, table: dict, key: str, required: set[str], optional: set[str]) -> None:
        prefix = f"{key}." if key else ""
        for k in table:
            if k not in required and k not in optional:
                allowed = sorted(required | optional)
                close = difflib.get_close_matches(k, allowed, n=1)
                hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(allowed)}"
                raise self.fail(f"{prefix}{k}", f"unknown key; {hint}")
        for k in sorted(required):
            if k not in table:
                raise self.fail(f"{prefix}{k}", "missing required key; see devices/README.md")

    def str_(self, table: dict, k: str, key: str, default: str | None = None) -> str:
        v = table.get(k, default)
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"expected a non-empty string, got {v!r}")
        return v

    def int_(self, table: dict, k: str, key: str, minimum: int) -> int:
        v = table.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {v!r}")
        return v

    def num(self, table: dict, k: str, key: str, lo: float, hi: float) -> float:
        v = table.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
            raise self.fail(key, f"expected a number in ({lo}, {hi}], got {v!r}")
        return float(v)

    def enum(self, table: dict, k: str, key: str, enum_cls, allowed=None):
        v = table.get(k)
        allowed = tuple(allowed or enum_cls)
        if v not in [str(a) for a in allowed]:
            raise self.fail(key, f"bad value {v!r}; expected one of {', '.join(str(a) for a in allowed)}")
        return enum_cls(v)

    def bool_(self, table: dict, k: str, key: str, default: bool) -> bool:
        v = table.get(k, default)
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true or false, got {v!r}")
        return v

    def table(self, table: dict, k: str, key: str) -> dict:
        v = table.get(k)
        if not isinstance(v, dict):
            raise self.fail(key, f"expected a table, got {type(v).__name__}")
        return v

    def str_list(self, table: dict, k: str, key: str) -> list[str]:
        v = table.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise self.fail(key, "expected a list of non-empty strings")
        return v

    def op_name(self, name: str, key: str) -> str:
        if name not in BUILTIN_OP_SET:
            close = suggest(name)
            hint = (f"did you mean {close}?" if close
                    else "use a TFLite builtin op name (BuiltinOperator), e.g. FULLY_CONNECTED")
            raise self.fail(key, f"unknown TFLite op; {hint}")
        return name

    def op_versions(self, table: dict, key: str) -> dict[str, int]:
        out = {}
        for name in table:
            self.op_name(name, f"{key}.{name}")
            out[name] = self.int_(table, name, f"{key}.{name}", 1)
        return out
