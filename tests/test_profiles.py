"""Device profiles: the shipped targets load, strict validation names file and key, search path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.errors import ProfileError
from edgeq.precision import Precision
from edgeq.profiles import BUILTIN_DIR, ENV_VAR, Delegate, RuntimeName, list_profiles, load_profile
from edgeq.tflite_ops import BUILTIN_OPS, suggest

SHIPPED = {"rpi4", "rpi5", "rpi-zero2w", "android-cpu", "android-gpu", "android-nnapi",
           "android-qnn-htp", "coral-edgetpu", "host-x86_64"}

# A minimal valid profile; each validation case edits one thing in it.
BASE = """\
schema_version = 1
id = "{id}"
name = "Test board"
kind = "sbc"
abi = "aarch64"
ram_mb = 2048
threads = 4
delegate = "xnnpack"
scheme = "int8"
reach = "ssh"

[runtime]
name = "tflite-runtime"
version = "2.14.0"
source = "test"

[io]
input = "int8"
output = "int8"

[bench]
warmup = 1
runs = 3
"""

ACCEL = """
[accelerator]
name = "Test NPU"
precisions = ["int8"]
fallback = "cpu"
fallback_precision = "int8"
supported_ops = ["CONV_2D"]
source = "test"
"""


def write(dirpath: Path, stem: str, text: str) -> Path:
    p = dirpath / f"{stem}.toml"
    p.write_text(text)
    return p


def test_shipped_profiles_load_with_sources():
    profiles = {p.id: p for p in list_profiles()}
    assert SHIPPED <= set(profiles)
    for p in profiles.values():
        assert p.path.parent == BUILTIN_DIR
        assert p.runtime.source.strip()
        assert p.sources or p.kind == "host", p.id
        for pol in p.ops.values():
            assert pol.reason and pol.source
        if p.accelerator is not None:
            assert p.delegate in (Delegate.GPU, Delegate.NNAPI, Delegate.QNN, Delegate.EDGETPU)
            assert p.scheme in p.accelerator.precisions
            assert p.accelerator.source


def test_runtime_tables_attach_to_profiles():
    rpi4 = load_profile("rpi4")
    assert rpi4.runtime.name is RuntimeName.TFLITE_RUNTIME and rpi4.runtime.version == "2.14.0"
    assert rpi4.op_versions_complete
    # Measured from the tflite-runtime 2.14.0 wheel: FULLY_CONNECTED v11+ is refused.
    assert rpi4.op_versions["FULLY_CONNECTED"] == 10
    assert "STABLEHLO_ADD" not in rpi4.op_versions
    assert "tflite-runtime-2.14.0.toml" in rpi4.op_versions_source
    host = load_profile("host-x86_64")
    assert host.op_versions["FULLY_CONNECTED"] > rpi4.op_versions["FULLY_CONNECTED"]
    # No table measured for the Edge TPU's tflite-runtime 2.5: versions stay unchecked.
    coral = load_profile("coral-edgetpu")
    assert not coral.op_versions_complete and coral.op_versions == {}
    assert coral.accelerator.precisions == (Precision.INT8,)
    assert coral.accelerator.single_segment


def test_builtin_op_tuple_matches_the_schema():
    from ai_edge_litert import schema_py_generated as schema
    enum = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    assert BUILTIN_OPS == tuple(enum[i] for i in range(len(enum)))
    assert suggest("FULLY_CONECTED") == "FULLY_CONNECTED"
    assert suggest("conv2d") == "CONV_2D"


def test_valid_minimal_profile_loads(tmp_path):
    p = load_profile(write(tmp_path, "board", BASE.format(id="board")))
    assert (p.id, p.ram_mb, p.threads, p.bench.runs) == ("board", 2048, 4, 3)
    assert p.ops == {} and p.accelerator is None
    # The runtime table is found in the built-in dir even for a profile elsewhere.
    assert p.op_versions["FULLY_CONNECTED"] == 10


def _replace(old, new):
    return lambda t: t.replace(old, new, 1)


def _append(extra):
    return lambda t: t + extra


CASES = [
    ("unknown top-level key", _append('colour = "red"\n'),
     "colour: unknown key; allowed: "),
    ("unknown key typo", _replace('ram_mb = 2048', 'ram_mbs = 2048'),
     "ram_mbs: unknown key; did you mean ram_mb?"),
    ("unknown nested key", _replace('source = "test"', 'source = "test"\nflavour = "x"'),
     "runtime.flavour: unknown key"),
    ("op typo in [ops]", _append('\n[ops]\nFULLY_CONECTED = { precision = "hybrid", reason = "r", source = "s" }\n'),
     "[ops].FULLY_CONECTED: unknown TFLite op; did you mean FULLY_CONNECTED?"),
    ("op typo in [op_versions]", _append('\n[op_versions]\nCONV2D = 3\n'),
     "[op_versions].CONV2D: unknown TFLite op; did you mean CONV_2D?"),
    ("not an op at all", _append('\n[op_versions]\nBANANA = 3\n'),
     "[op_versions].BANANA: unknown TFLite op; use a TFLite builtin op name"),
    ("bad kind", _replace('kind = "sbc"', 'kind = "phone"'),
     "kind: bad value 'phone'; expected one of raspberry-pi, android, edgetpu, host, sbc"),
    ("bad delegate", _replace('delegate = "xnnpack"', 'delegate = "cuda"'),
     "delegate: bad value 'cuda'; expected one of xnnpack, gpu, nnapi, qnn, edgetpu, none"),
    ("bad runtime name", _replace('name = "tflite-runtime"', 'name = "tflite"'),
     "runtime.name: bad value 'tflite'"),
    ("bad precision", _append('\n[ops]\nSOFTMAX = { precision = "int3", reason = "r", source = "s" }\n'),
     "[ops].SOFTMAX.precision: bad value 'int3'; expected one of int8, int16x8, hybrid, float, fp16, int4, "
     "int4-b32, int4-b64, int4-b128, int4-b256, int4x8, int4-weight-only"),
    ("scheme cannot be other", _replace('scheme = "int8"', 'scheme = "other"'),
     "scheme: bad value 'other'"),
    # int16 is a convert --io choice (int16x8), not one a profile names.
    ("profile io subset", _replace('input = "int8"', 'input = "int16"'),
     "io.input: bad value 'int16'; expected one of int8, uint8, float32"),
    ("missing reason", _append('\n[ops]\nSOFTMAX = { precision = "float", source = "s" }\n'),
     "[ops].SOFTMAX.reason: missing required key"),
    ("missing source", _append('\n[ops]\nSOFTMAX = { precision = "float", reason = "r" }\n'),
     "[ops].SOFTMAX.source: missing required key"),
    ("empty reason", _append('\n[ops]\nSOFTMAX = { precision = "float", reason = " ", source = "s" }\n'),
     "[ops].SOFTMAX.reason: expected a non-empty string"),
    ("wrong schema_version", _replace("schema_version = 1", "schema_version = 2"),
     "schema_version: expected 1, got 2"),
    ("missing required key", _replace("ram_mb = 2048\n", ""),
     "ram_mb: missing required key"),
    ("bool is not an int", _replace("threads = 4", "threads = true"),
     "threads: expected an integer >= 1, got True"),
    ("zero runs", _replace("runs = 3", "runs = 0"),
     "bench.runs: expected an integer >= 1, got 0"),
    ("delegate without accelerator", _replace('delegate = "xnnpack"', 'delegate = "edgetpu"'),
     'accelerator: delegate = "edgetpu" needs an [accelerator] table'),
    ("accelerator on a CPU delegate", _append(ACCEL),
     'accelerator: delegate = "xnnpack" must not have an [accelerator] table'),
    ("scheme the accelerator cannot run",
     lambda t: t.replace('delegate = "xnnpack"', 'delegate = "qnn"').replace('scheme = "int8"', 'scheme = "fp16"')
     + ACCEL,
     "scheme: fp16 is not among [accelerator].precisions (int8)"),
    ("typo in supported_ops", lambda t: t.replace('delegate = "xnnpack"', 'delegate = "qnn"')
     + ACCEL.replace('"CONV_2D"', '"CONV_2DD"'),
     "accelerator.supported_ops.CONV_2DD: unknown TFLite op; did you mean CONV_2D?"),
    ("unknown accelerator key", lambda t: t.replace('delegate = "xnnpack"', 'delegate = "qnn"')
     + ACCEL + "speed = 9\n", "accelerator.speed: unknown key"),
    ("no CPU fallback for a float policy", lambda t: t.replace('delegate = "xnnpack"', 'delegate = "qnn"')
     + ACCEL.replace('fallback = "cpu"', 'fallback = "none"')
     + '\n[ops]\nSOFTMAX = { precision = "float", reason = "r", source = "s" }\n',
     "[ops].SOFTMAX.precision: Test NPU cannot run float and has no CPU fallback"),
    ("invalid TOML", _append("ram_mb = = 3\n"), "invalid TOML"),
]


@pytest.mark.parametrize("label,edit,expected", CASES, ids=[c[0] for c in CASES])
def test_validation_errors_name_file_and_key(tmp_path, monkeypatch, label, edit, expected):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "board", edit(BASE.format(id="board")))
    with pytest.raises(ProfileError) as e:
        load_profile("board", devices_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith("board.toml: "), msg
    assert expected in msg
    assert "\n" not in msg  # one line, no traceback-ish dumps


def test_op_typo_message_is_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "devices").mkdir()
    write(tmp_path / "devices", "rpi4", BASE.format(id="rpi4")
          + '\n[ops]\nFULLY_CONECTED = { precision = "hybrid", reason = "r", source = "s" }\n')
    with pytest.raises(ProfileError) as e:
        load_profile("rpi4", devices_dir=tmp_path / "devices")
    assert str(e.value) == "devices/rpi4.toml: [ops].FULLY_CONECTED: unknown TFLite op; did you mean FULLY_CONNECTED?"


def test_id_must_equal_file_stem(tmp_path):
    write(tmp_path, "board", BASE.format(id="other-board"))
    with pytest.raises(ProfileError, match=r"id: 'other-board' does not match the file name; rename the file"):
        load_profile(tmp_path / "board.toml")


def test_listing_is_strict_about_any_bad_file(tmp_path):
    write(tmp_path, "good", BASE.format(id="good"))
    write(tmp_path, "bad", BASE.format(id="bad").replace('kind = "sbc"', 'kind = "toaster"'))
    with pytest.raises(ProfileError, match=r"bad\.toml: kind: bad value 'toaster'"):
        list_profiles(tmp_path)


def test_devices_dir_argument_adds_and_shadows(tmp_path):
    write(tmp_path, "my-board", BASE.format(id="my-board"))
    write(tmp_path, "rpi4", BASE.format(id="rpi4").replace("ram_mb = 2048", "ram_mb = 8192"))
    ids = [p.id for p in list_profiles(tmp_path)]
    assert ids == sorted(ids) and "my-board" in ids and SHIPPED <= set(ids)
    assert ids.count("rpi4") == 1
    assert load_profile("rpi4", devices_dir=tmp_path).ram_mb == 8192  # the user's copy wins
    assert load_profile("rpi4").ram_mb == 4096  # the built-in is untouched
    assert load_profile("my-board", devices_dir=tmp_path).name == "Test board"


def test_env_var_adds_a_directory(tmp_path, monkeypatch):
    write(tmp_path, "env-board", BASE.format(id="env-board"))
    with pytest.raises(ProfileError, match="unknown device 'env-board'"):
        load_profile("env-board")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert load_profile("env-board").id == "env-board"
    assert "env-board" in [p.id for p in list_profiles()]
    # An explicit --devices-dir comes before the environment variable.
    other = tmp_path / "other"
    other.mkdir()
    write(other, "env-board", BASE.format(id="env-board").replace("threads = 4", "threads = 2"))
    assert load_profile("env-board", devices_dir=other).threads == 2
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ProfileError, match=f"missing directory; fix or unset {ENV_VAR}"):
        list_profiles()


def test_missing_devices_dir_argument(tmp_path):
    with pytest.raises(ProfileError, match="--devices-dir is not a directory"):
        list_profiles(tmp_path / "nope")


def test_unknown_id_suggests_a_close_one():
    with pytest.raises(ProfileError, match=r"unknown device 'rpi44'; did you mean rpi4\? run 'edgeq devices list'"):
        load_profile("rpi44")


def test_user_runtime_table_is_used_and_validated(tmp_path):
    runtimes = tmp_path / "runtimes"
    runtimes.mkdir()
    text = BASE.format(id="new-rt").replace('version = "2.14.0"', 'version = "9.9.9"')
    write(tmp_path, "new-rt", text)
    assert not load_profile("new-rt", devices_dir=tmp_path).op_versions_complete
    table = ('schema_version = 1\nruntime = "tflite-runtime"\nversion = "9.9.9"\nsource = "measured"\n'
             '[op_versions]\nFULLY_CONNECTED = 13\nCONV_2D = 8\n')
    (runtimes / "tflite-runtime-9.9.9.toml").write_text(table)
    p = load_profile("new-rt", devices_dir=tmp_path)
    assert p.op_versions_complete and dict(p.op_versions) == {"FULLY_CONNECTED": 13, "CONV_2D": 8}
    (runtimes / "tflite-runtime-9.9.9.toml").write_text(table.replace("CONV_2D", "CONV_2DD"))
    with pytest.raises(ProfileError,
                       match=r"tflite-runtime-9\.9\.9\.toml: \[op_versions\]\.CONV_2DD: unknown TFLite op"):
        load_profile("new-rt", devices_dir=tmp_path)


def test_profile_op_versions_override_the_table(tmp_path):
    write(tmp_path, "patched", BASE.format(id="patched") + "\n[op_versions]\nFULLY_CONNECTED = 12\n")
    p = load_profile("patched", devices_dir=tmp_path)
    assert p.op_versions["FULLY_CONNECTED"] == 12 and p.op_versions["CONV_2D"] == 7
    assert "overridden in the profile: FULLY_CONNECTED" in p.op_versions_source


def test_to_json_is_plain_data():
    import json
    d = json.loads(json.dumps(load_profile("android-nnapi").to_json()))
    assert d["accelerator"]["op_versions"]["FULLY_CONNECTED"] == 5
    assert d["ops"]["DIV"]["precision"] == "float"
    assert d["android_sdk"] == 30


def test_describe_shows_the_facts_and_their_sources():
    text = load_profile("coral-edgetpu").describe()
    assert text.splitlines()[0] == "coral-edgetpu: Coral Dev Board (NXP i.MX 8M + Edge TPU, 1 GB)"
    assert "accelerator: Edge TPU, runs int8; 29 ops; falls back to the CPU at int8" in text
    assert "op versions: not known for tflite-runtime 2.5.0.post1 (not checked)" in text
    text = load_profile("android-nnapi").describe()
    assert "    DIV -> float: NNAPI maps DIV for float32 input only" in text
    assert "op versions: 172 ops (complete) from " in text and "runtimes/ai-edge-litert-2.3.0.toml" in text


def test_listing_does_not_import_tensorflow_or_numpy():
    code = ("import sys, edgeq.profiles as p; ps = p.list_profiles(); assert len(ps) >= 9; "
            "bad = [m for m in ('tensorflow', 'numpy', 'ai_edge_litert') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=60)


def test_runtime_int4_tables():
    """The measured [int4] tables: LiteRT 2.3 runs int4 FC/CONV_2D/EMBEDDING_LOOKUP (blockwise FC only
    through XNNPACK); tflite-runtime 2.14 (rpi4) runs only dynamic int4 FC and int4x8 CONV_2D."""
    host, rpi4 = load_profile("host-x86_64"), load_profile("rpi4")
    assert Precision.INT4_B32 in host.int4_ops["EMBEDDING_LOOKUP"].runs
    assert host.int4_ops["FULLY_CONNECTED"].xnnpack_only == {
        Precision.INT4_B32, Precision.INT4_B64, Precision.INT4_B128, Precision.INT4_B256}
    assert host.int4_refuses("FULLY_CONNECTED", Precision.INT4_B64) is None
    assert host.int4_refuses("FULLY_CONNECTED", Precision.HYBRID) is None  # not int4: not this table's business
    assert host.int4_refuses("DEPTHWISE_CONV_2D", Precision.INT4) == "ai-edge-litert 2.3.0 has no int4 kernel for DEPTHWISE_CONV_2D"
    assert rpi4.int4_ops["FULLY_CONNECTED"].runs == {Precision.INT4}
    assert rpi4.int4_ops["EMBEDDING_LOOKUP"].runs == frozenset()
    assert "outputs NaN" in rpi4.int4_refuses("CONV_2D", Precision.INT4)
    assert rpi4.int4_refuses("FULLY_CONNECTED", Precision.INT4_WEIGHT_ONLY).startswith(
        "tflite-runtime 2.14.0 has no int4-weight-only kernel for DEQUANTIZE of int4 weights")
    # A delegate other than XNNPACK cannot use the xnnpack_only rows.
    gpu = load_profile("android-gpu")
    assert "correctly only through XNNPACK" in gpu.int4_refuses("FULLY_CONNECTED", Precision.INT4_B32)
    assert gpu.int4_refuses("FULLY_CONNECTED", Precision.INT4) is None
    assert "int4 kernels: FULLY_CONNECTED int4; CONV_2D int4x8 (from " in rpi4.describe()
    # No [int4] table (the Edge TPU's runtime): unknown, nothing refused.
    coral = load_profile("coral-edgetpu")
    assert coral.int4_source == "" and coral.int4_refuses("FULLY_CONNECTED", Precision.INT4) is None
    assert "int4 kernels: not known for tflite-runtime 2.5.0.post1" in coral.describe()


@pytest.mark.parametrize("int4,expected", [
    ('[int4]\nsource = "m"\n[int4.ops]\nFULLY_CONNECTED = { runs = ["int8"] }\n',
     "int4.ops.FULLY_CONNECTED.runs[0]: bad value 'int8'; expected one of int4, int4-b32"),
    ('[int4]\nsource = "m"\n[int4.ops]\nFULLY_CONECTED = { runs = ["int4"] }\n',
     "int4.ops.FULLY_CONECTED: unknown TFLite op; did you mean FULLY_CONNECTED?"),
    ('[int4]\nsource = "m"\n[int4.ops]\nFULLY_CONNECTED = { runs = ["int4"], xnnpack_only = ["int4-b32"] }\n',
     "int4.ops.FULLY_CONNECTED.xnnpack_only: must be a subset of runs"),
    ('[int4]\n[int4.ops]\nCONV_2D = { runs = [] }\n', "int4.source: missing required key"),
    ('[int4]\nsource = "m"\n[int4.ops]\nCONV_2D = { run = [] }\n', "int4.ops.CONV_2D.run: unknown key; did you mean runs?"),
    # [kernels]: what the runtime's kernel cannot run at the version the quantizer writes
    ('[kernels]\nsource = "m"\n[kernels.ops]\nSQRTT = { wrong = ["int8"], note = "n" }\n',
     "kernels.ops.SQRTT: unknown TFLite op; did you mean SQRT?"),
    ('[kernels]\nsource = "m"\n[kernels.ops]\nSQRT = { wrong = ["int9"], note = "n" }\n',
     "kernels.ops.SQRT.wrong[0]: bad value 'int9'"),
    ('[kernels]\nsource = "m"\n[kernels.ops]\nSQRT = { wrong = [], note = "n" }\n',
     "kernels.ops.SQRT.wrong: expected a non-empty list of precisions"),
    ('[kernels]\nsource = "m"\n[kernels.ops]\nSQRT = { wrong = ["int8"] }\n', "kernels.ops.SQRT.note: missing required key"),
])
def test_runtime_int4_table_is_validated(tmp_path, int4, expected):
    runtimes = tmp_path / "runtimes"
    runtimes.mkdir()
    write(tmp_path, "new-rt", BASE.format(id="new-rt").replace('version = "2.14.0"', 'version = "9.9.9"'))
    table = 'schema_version = 1\nruntime = "tflite-runtime"\nversion = "9.9.9"\nsource = "measured"\n[op_versions]\nCONV_2D = 8\n'
    (runtimes / "tflite-runtime-9.9.9.toml").write_text(table + int4)
    with pytest.raises(ProfileError) as e:
        load_profile("new-rt", devices_dir=tmp_path)
    assert expected in str(e.value) and "tflite-runtime-9.9.9.toml" in str(e.value)
    (runtimes / "tflite-runtime-9.9.9.toml").write_text(
        table + '[int4]\nsource = "m"\n[int4.ops]\nCONV_2D = { runs = ["int4x8"], note = "n" }\n')
    p = load_profile("new-rt", devices_dir=tmp_path)
    assert p.int4_ops["CONV_2D"].runs == {Precision.INT4X8} and p.int4_source.endswith(": m")
    (runtimes / "tflite-runtime-9.9.9.toml").write_text(
        table + '[kernels]\nsource = "m"\n[kernels.ops]\nCONV_2D = { wrong = ["hybrid"], note = "zeros" }\n')
    p = load_profile("new-rt", devices_dir=tmp_path)
    assert p.kernel_refuses("CONV_2D", Precision.HYBRID) == "tflite-runtime 9.9.9's CONV_2D kernel cannot run hybrid (zeros)"
    assert p.kernel_refuses("CONV_2D", Precision.INT8) is None


@pytest.mark.parametrize("encoding,byte", [("latin-1", "0xfc"), ("utf-16", "0xff")])
def test_a_profile_not_in_utf8_is_named(tmp_path, monkeypatch, encoding, byte):
    """A profile saved as Latin-1 ("Büro") or as UTF-16 (Notepad) was a UnicodeDecodeError traceback, in
    `devices list` too."""
    monkeypatch.chdir(tmp_path)
    text = BASE.format(id="board").replace('name = ', 'name = "Pi im Büro" #', 1)
    (tmp_path / "board.toml").write_bytes(text.encode(encoding))
    for call in (lambda: load_profile("board", devices_dir=tmp_path), lambda: list_profiles(tmp_path)):
        with pytest.raises(ProfileError) as e:
            call()
        assert str(e.value).startswith(f"board.toml: not UTF-8 text (byte {byte} at offset "), str(e.value)
        assert str(e.value).endswith("save the file as UTF-8")
