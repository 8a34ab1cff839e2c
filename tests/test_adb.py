"""The adb runner: its parsers, flags and coverage checks on verbatim benchmark_model output (no
adb needed, always run), and end to end against the REAL adb client and server and a stand-in phone
(tests/adb_standin.py; these need Debian's adb: skipped locally without it, a failure under CI=true).

No Android phone can exist on CI, so the phone is the protocol-level stand-in described in
adb_standin.py, and the benchmark_model pushed to it is a stand-in script printing REAL
benchmark_model output from tests/data (see adb_standin.FAKE_BENCHMARK_MODEL). Everything on the
host side (adb client, adb server, sync/shell protocols, edgeq's runner) is the real thing.
"""

import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from adb_standin import DATA, AdbServer, StandInPhone, install_fake_benchmark_model
from tests.conftest import require_tool
from edgeq.errors import DeviceError, EdgeqError, ModelFormatError, ProfileError
from edgeq.files import sha256_file
from edgeq.runners import ProfileRequest, benchmark_log, profile_model, resolve
from edgeq.runners import adb as adbrun
from edgeq.runners.device_bench import summarize

ROOT = Path(__file__).resolve().parents[1]


def profile(delegate="nnapi", threshold=0.9, threads=3, warmup=2, runs=7):
    """A duck-typed device profile with only what the runner reads."""
    return SimpleNamespace(id="android-test", delegate=delegate, threads=threads, reach="adb",
                           bench=SimpleNamespace(warmup=warmup, runs=runs), min_delegate_coverage=threshold)


def samples():
    """{'Source 1': text, ...} of tests/data/benchmark_model_samples.txt (real logs, sources kept)."""
    parts = re.split(r"^## (Source \d+):.*$", (DATA / "benchmark_model_samples.txt").read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def not_executed_log():
    """Source 8 (NNAPI runs no node) and the statistics lines of Source 7 (same issue, user, phone)."""
    return samples()["Source 8"] + "\n" + samples()["Source 7"].split("\n", 2)[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tf):
    """A real .tflite (one dense layer, seeded weights) converted by TensorFlow (conftest's `tf`)."""
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((8, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def f(x):
        return tf.nn.relu(tf.matmul(x, w))

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path = tmp_path_factory.mktemp("model") / "tiny.tflite"
    path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="module")
def server():
    require_tool("adb", "apt-get install adb")
    srv = AdbServer()
    yield srv
    srv.close()


@pytest.fixture
def env(server, monkeypatch):
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(server.port))
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    return server


@pytest.fixture
def phone(env, tmp_path):
    p = StandInPhone(tmp_path / "phone")
    env.connect(p)
    yield p
    env.disconnect(p)
    p.close()


@pytest.fixture
def bench_bin(tmp_path):
    return install_fake_benchmark_model(tmp_path / "benchmark_model")


def opts(bench_bin, **kw):
    return adbrun.AdbOptions(benchmark_binary=str(bench_bin), timeout_s=60, **kw)


def run_adb(model, prof, adb_options, progress=None, **request):
    """runners.profile_model as the CLI calls it; `request`: ProfileRequest overrides."""
    return profile_model(model, prof, ProfileRequest(**request, adb=adb_options), progress)


def device_tree(phone):
    """What is left under /data/local/tmp/edgeq on the phone."""
    root = phone.host_path(adbrun.DEVICE_ROOT)
    return sorted(str(p.relative_to(root)) for p in root.iterdir()) if root.exists() else []


def set_mode(phone, mode):
    d = phone.host_path(adbrun.BIN_DIR)
    d.mkdir(parents=True, exist_ok=True)
    (d / "standin_mode").write_text(mode)


def test_push_run_parse_end_to_end(phone, tiny_model, bench_bin):
    steps = []
    r = run_adb(tiny_model, profile(), opts(bench_bin), progress=steps.append)
    # Numbers are benchmark_model's (Source 4 sample) converted to ms.
    assert r["schema"] == "edgeq.bench/1" and r["runner"] == "adb" and r["mode"] == "benchmark_model"
    assert r["runs"]["count"] == 520 and r["runs"]["mean_ms"] == pytest.approx(1.88574)
    assert r["init_ms"] == pytest.approx(66.002) and r["warmup"]["avg_ms"] == pytest.approx(637.079)
    assert r["delegate_coverage"]["delegated"] == 31 and r["delegate_coverage"]["ratio"] == 1.0
    assert r["delegate_coverage"]["threshold"] == 0.9
    assert r["device"]["model"] == "EdgeqStandIn" and r["device"]["abi"] == "arm64-v8a"
    assert r["device"]["sdk_int"] == 34 and r["serial"] == phone.serial
    assert r["model_sha256"] == sha256_file(tiny_model)
    assert r["model_bytes"] == tiny_model.stat().st_size
    assert r["benchmark_binary"]["reused"] is False
    # The binary got the profile's flags and the pushed model path.
    args = (phone.root / "benchmark_model.args").read_text().split()
    assert {"--num_threads=3", "--warmup_runs=2", "--num_runs=7", "--use_nnapi=true",
            "--min_secs=0", "--warmup_min_secs=0"} <= set(args)
    graph = [a for a in args if a.startswith("--graph=")][0]
    assert graph.endswith("/tiny.tflite") and "/data/local/tmp/edgeq/" in graph
    # Run directory removed; the binary stays, byte-identical, for the next run.
    assert device_tree(phone) == ["bin"]
    assert (phone.host_path(adbrun.BIN_DIR) / "benchmark_model").read_bytes() == bench_bin.read_bytes()
    assert any("pushed" in s for s in steps)


def test_binary_reused_when_checksum_matches(phone, tiny_model, bench_bin):
    run_adb(tiny_model, profile(), opts(bench_bin))
    first_syncs = phone.log.count("sync:")
    r = run_adb(tiny_model, profile(), opts(bench_bin))
    assert r["benchmark_binary"]["reused"] is True
    assert first_syncs == 2 and phone.log.count("sync:") == 3  # second run pushed the model only
    # A different binary is pushed again.
    bench_bin.write_text(bench_bin.read_text() + "\n# rebuilt\n")
    r = run_adb(tiny_model, profile(), opts(bench_bin))
    assert r["benchmark_binary"]["reused"] is False
    assert r["benchmark_binary"]["sha256"] == sha256_file(bench_bin)
    assert (phone.host_path(adbrun.BIN_DIR) / "benchmark_model").read_bytes() == bench_bin.read_bytes()


def test_no_device(tiny_model, bench_bin, monkeypatch):
    require_tool("adb", "apt-get install adb")
    srv = AdbServer()
    try:
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(srv.port))
        monkeypatch.delenv("ANDROID_SERIAL", raising=False)
        with pytest.raises(DeviceError, match="no Android device found") as e:
            run_adb(tiny_model, profile(), opts(bench_bin))
        assert e.value.exit_code == 3
    finally:
        srv.close()


def test_several_devices_then_serial(env, tmp_path, tiny_model, bench_bin, monkeypatch):
    a, b = StandInPhone(tmp_path / "a"), StandInPhone(tmp_path / "b")
    try:
        env.connect(a)
        env.connect(b)
        with pytest.raises(DeviceError, match="several Android devices") as e:
            run_adb(tiny_model, profile(), opts(bench_bin))
        assert a.serial in str(e.value) and b.serial in str(e.value) and "--serial" in str(e.value)
        monkeypatch.setenv("ANDROID_SERIAL", b.serial)
        r = run_adb(tiny_model, profile(), opts(bench_bin))
        assert r["serial"] == b.serial and (b.root / "benchmark_model.args").exists()
        assert not (a.root / "benchmark_model.args").exists()
        with pytest.raises(DeviceError, match="not attached"):
            run_adb(tiny_model, profile(), opts(bench_bin, serial="127.0.0.1:1"))
    finally:
        for p in (a, b):
            env.disconnect(p)
            p.close()


def test_unauthorized_device(env, tmp_path, tiny_model, bench_bin):
    p = StandInPhone(tmp_path / "locked", authorized=False)
    try:
        env.connect(p, state="unauthorized")
        with pytest.raises(DeviceError, match="accept the USB debugging prompt"):
            run_adb(tiny_model, profile(), opts(bench_bin))
    finally:
        env.disconnect(p)
        p.close()


def test_benchmark_crash_is_reported_and_cleaned_up(phone, tiny_model, bench_bin):
    set_mode(phone, "crash")
    with pytest.raises(DeviceError, match=r"crashed on the phone \(killed by signal 6\)") as e:
        run_adb(tiny_model, profile(), opts(bench_bin))
    assert "\n" not in str(e.value)
    assert device_tree(phone) == ["bin"]  # run dir removed on failure too


def test_coverage_below_threshold_lists_cpu_ops(phone, tiny_model, bench_bin):
    set_mode(phone, "low-coverage")
    with pytest.raises(DeviceError) as e:
        run_adb(tiny_model, profile(threshold=0.9), opts(bench_bin, op_profiling=True))
    msg = str(e.value)
    assert "12 of 31 nodes" in msg and "39% < 90%" in msg
    assert "ops left on the CPU: RESIZE_NEAREST_NEIGHBOR" in msg
    assert "--enable_op_profiling=true" in (phone.root / "benchmark_model.args").read_text()
    assert device_tree(phone) == ["bin"]
    with pytest.raises(DeviceError, match="rerun with op profiling on"):
        run_adb(tiny_model, profile(threshold=0.9), opts(bench_bin))


def test_coverage_reported_without_threshold(phone, tiny_model, bench_bin):
    set_mode(phone, "low-coverage")
    r = run_adb(tiny_model, profile(threshold=None), opts(bench_bin))
    assert r["delegate_coverage"]["ratio"] == pytest.approx(12 / 31)
    assert r["delegate_coverage"]["threshold"] is None


def test_app_mode_installs_once_and_compares_with_benchmark_model(phone, tiny_model, bench_bin, tmp_path):
    apk = tmp_path / "android_demo-debug.apk"  # stand-in APK: a zip, as an APK is
    with zipfile.ZipFile(apk, "w") as z:
        z.writestr("AndroidManifest.xml", "<manifest package='com.edgeq.demo'/>")
    o = opts(bench_bin, mode=adbrun.Mode.BOTH, app_apk=str(apk))
    r = run_adb(tiny_model, profile(delegate="gpu", threshold=None), o)
    app = r["app"]
    assert app["app"]["installed"] is True
    assert app["delegate"] == "gpu" and app["threads"] == 3 and app["warmup"]["count"] == 2
    assert app["model_sha256"] == sha256_file(tiny_model)  # the app read the pushed model
    d = r["app_vs_benchmark"]["runs.mean_ms"]
    assert d["benchmark_model"] == pytest.approx(1240.27) and d["app"] == pytest.approx(4.153)
    assert d["diff_ms"] == pytest.approx(4.153 - 1240.27)
    assert d["diff_pct"] == pytest.approx(100 * (4.153 - 1240.27) / 1240.27)
    assert set(r["app_vs_benchmark"]) == set(adbrun.COMPARED)
    assert device_tree(phone) == ["bin"]
    assert not list(phone.host_path(adbrun.APP_FILES).iterdir())  # result file removed
    r2 = run_adb(tiny_model, profile(delegate="gpu", threshold=None),
                                 opts(bench_bin, mode=adbrun.Mode.APP, app_apk=str(apk)))
    assert r2["app"]["installed"] is False and r2["runner"] == "adb" and r2["mode"] == "app"
    assert r2["runs"]["p95_ms"] == pytest.approx(4.5494)


def test_app_mode_without_app_installed(phone, tiny_model, bench_bin):
    with pytest.raises(DeviceError, match="android_demo is not installed.*--app PATH.apk"):
        run_adb(tiny_model, profile(), opts(bench_bin, mode=adbrun.Mode.APP))
    assert device_tree(phone) == []


def test_user_errors_before_touching_a_device(tmp_path, tiny_model, bench_bin):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="not a .tflite flatbuffer"):
        run_adb(bad, profile(), opts(bench_bin))
    with pytest.raises(DeviceError, match="apt-get install adb"):
        run_adb(tiny_model, profile(), opts(bench_bin, adb="/nonexistent/adb"))
    with pytest.raises(ProfileError, match="cannot select in benchmark_model yet"):
        resolve(tiny_model, profile(delegate="qnn"), ProfileRequest(), "adb")
    with pytest.raises(EdgeqError, match="cannot be selected on an Android phone; use one of cpu, gpu, nnapi"):
        resolve(tiny_model, profile(), ProfileRequest(delegate="libedgetpu.so.1"), "adb")
    with pytest.raises(EdgeqError, match="not supported on Android phones yet"):
        run_adb(tiny_model, profile(), opts(bench_bin, adb="/nonexistent/adb"), inputs=tmp_path / "in.npz")
    gpu = resolve(tiny_model, profile(delegate="gpu"), ProfileRequest(), "adb")
    assert adbrun.benchmark_flags(gpu, "/m.tflite")[-1] == "--use_gpu=true"


def test_flags_come_from_the_real_profiles_and_the_request_overrides_them(tiny_model):
    from edgeq.profiles import load_profile

    gpu = load_profile("android-gpu")
    flags = adbrun.benchmark_flags(resolve(tiny_model, gpu, ProfileRequest(), "adb"), "/m.tflite", op_profiling=True)
    assert flags == ["--graph=/m.tflite", "--num_threads=4", "--warmup_runs=10", "--num_runs=50",
                     "--warmup_min_secs=0", "--min_secs=0", "--use_gpu=true", "--enable_op_profiling=true"]
    # --threads/--warmup/--runs/--delegate reach benchmark_model as they reach device_bench
    o = resolve(tiny_model, gpu, ProfileRequest(threads=2, warmup=0, runs=9, delegate="CPU"), "adb")
    assert (o.threads, o.warmup, o.runs, o.delegate) == (2, 0, 9, "none")
    assert adbrun.benchmark_flags(o, "/m.tflite") == ["--graph=/m.tflite", "--num_threads=2", "--warmup_runs=0",
                                                     "--num_runs=9", "--warmup_min_secs=0", "--min_secs=0",
                                                     "--use_xnnpack=false"]
    extras = adbrun.app_extras(o, "/g.tflite", "r.json")
    assert dict(zip(extras[1::3], extras[2::3])) == {"model": "/g.tflite", "delegate": "none", "threads": "2",
                                                     "warmup": "0", "runs": "9", "seed": "0", "out": "r.json"}
    assert adbrun.min_coverage(gpu) == 0.9 and adbrun.min_coverage(load_profile("android-cpu")) is None
    with pytest.raises(ProfileError, match="external delegate"):
        resolve(tiny_model, load_profile("android-qnn-htp"), ProfileRequest(), "adb")


def test_not_executed_is_coverage_zero_against_the_profile_threshold():
    from edgeq.profiles import load_profile

    parsed = benchmark_log.parse(not_executed_log())
    cov, msg = adbrun.delegate_coverage(parsed, load_profile("android-nnapi"), "nnapi", False)
    assert cov["ratio"] == 0.0 and cov["threshold"] == 0.9
    assert msg.startswith("benchmark_model says the nnapi delegate runs no node")
    assert "every node ran on the CPU" in msg and "0% < 90% required by profile android-nnapi" in msg
    assert "nnapi-reference" not in msg  # this phone has a vendor driver (ipuadaptor) besides the reference
    only_ref = dict(parsed, nnapi_accelerators=["nnapi-reference"])
    assert "offers only nnapi-reference" in adbrun.delegate_coverage(only_ref, profile(), "nnapi", False)[1]
    # Without a threshold the zero is reported, not raised.
    assert adbrun.delegate_coverage(parsed, profile(threshold=None), "nnapi", False) == (dict(cov, threshold=None), None)
    # Partial with no node count: unknown, reported with its kernel count, never guessed into a pass/fail.
    cov, msg = adbrun.delegate_coverage(benchmark_log.parse(samples()["Source 7"]), profile(), "nnapi", False)
    assert msg is None and cov["ratio"] is None and cov["execution"] == "partial" and cov["kernels"] == 44


def test_app_coverage_contract():
    full = {"delegate_coverage": {"delegate": "gpu", "execution": "complete", "delegated": 31, "total": 31}}
    assert adbrun.app_coverage(full, profile("gpu"), "gpu", required=True)["ratio"] == 1.0
    none = {"delegate_coverage": {"delegate": "nnapi", "execution": "none", "delegated": 0, "total": 31}}
    with pytest.raises(DeviceError, match="the nnapi delegate covered 0% of the graph, every node ran on the CPU"):
        adbrun.app_coverage(none, profile("nnapi"), "nnapi", required=False)
    low = {"delegate_coverage": {"delegate": "gpu", "execution": "partial", "delegated": 10, "total": 40}}
    with pytest.raises(DeviceError, match="25% of the graph, 10 of 40 nodes ran on it"):
        adbrun.app_coverage(low, profile("gpu"), "gpu", required=True)
    with pytest.raises(DeviceError, match="did not report delegate coverage.*rebuild the app"):
        adbrun.app_coverage({}, profile("gpu"), "gpu", required=True)
    with pytest.raises(DeviceError, match=r"did not report delegate coverage \(.*: SecurityException: no log\)"):
        adbrun.app_coverage({"delegate_coverage": None, "delegate_coverage_error": "SecurityException: no log"},
                            profile("gpu"), "gpu", required=True)
    assert adbrun.app_coverage({}, profile("gpu"), "gpu", required=False) is None  # benchmark_model checked it
    assert adbrun.app_coverage({}, profile("xnnpack"), "xnnpack", required=True) is None


def test_real_profile_fails_on_low_coverage_before_leaving_anything(phone, tiny_model, bench_bin):
    from edgeq.profiles import load_profile

    set_mode(phone, "low-coverage")
    with pytest.raises(DeviceError, match="profile android-nnapi"):
        run_adb(tiny_model, load_profile("android-nnapi"), opts(bench_bin))
    with pytest.raises(ProfileError, match="external delegate"):
        run_adb(tiny_model, load_profile("android-qnn-htp"), opts(bench_bin))
    assert device_tree(phone) == ["bin"]


def test_delegate_that_runs_nothing_is_not_reported_as_a_delegate_result(phone, tiny_model, bench_bin):
    """The issue: NNAPI prints 'Created ... delegate' then runs no node; that must not pass as NNAPI."""
    from edgeq.profiles import load_profile

    set_mode(phone, "not-executed")
    with pytest.raises(DeviceError) as e:
        run_adb(tiny_model, load_profile("android-nnapi"), opts(bench_bin))
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert "nnapi delegate runs no node" in str(e.value) and "CPU timings, not nnapi ones" in str(e.value)
    assert device_tree(phone) == ["bin"]
    # The same log on a profile without a threshold: a result, with coverage 0 in it.
    r = run_adb(tiny_model, profile(threshold=None), opts(bench_bin))
    assert r["delegate_coverage"]["ratio"] == 0.0 and r["delegate_coverage"]["execution"] == "none"
    assert r["runs"]["mean_ms"] == pytest.approx(12.1676)


def test_request_overrides_reach_benchmark_model_and_the_app(phone, tiny_model, bench_bin, tmp_path):
    from edgeq.profiles import load_profile

    apk = tmp_path / "android_demo-debug.apk"
    with zipfile.ZipFile(apk, "w") as z:
        z.writestr("AndroidManifest.xml", "<manifest package='com.edgeq.demo'/>")
    set_mode(phone, "gpu-complete")
    r = run_adb(tiny_model, load_profile("android-gpu"), opts(bench_bin, mode=adbrun.Mode.BOTH, app_apk=str(apk)),
                threads=2, warmup=1, runs=5, delegate="gpu")
    args = (phone.root / "benchmark_model.args").read_text().split()
    assert {"--num_threads=2", "--warmup_runs=1", "--num_runs=5", "--use_gpu=true"} <= set(args)
    extras = json.loads((phone.root / "am.args").read_text().splitlines()[-1])
    assert (extras["threads"], extras["warmup"], extras["runs"], extras["delegate"]) == (2, 1, 5, "gpu")
    assert r["threads"] == 2 and r["delegate"] == "gpu"
    # Source 9: "completely executed" with no node count is full coverage; the app's report is kept too.
    assert r["delegate_coverage"]["ratio"] == 1.0 and r["delegate_coverage"]["execution"] == "complete"
    assert r["app"]["delegate_coverage"] == {"delegate": "gpu", "execution": "complete", "delegated": 31,
                                             "total": 31, "ratio": 1.0, "threshold": 0.9}
    assert r["runs"]["mean_ms"] == pytest.approx(119.375)


def test_app_mode_checks_the_coverage_the_app_reports(phone, tiny_model, bench_bin, tmp_path):
    apk = tmp_path / "android_demo-debug.apk"
    with zipfile.ZipFile(apk, "w") as z:
        z.writestr("AndroidManifest.xml", "<manifest package='com.edgeq.demo'/>")
    cov_file = phone.host_path(adbrun.BIN_DIR) / "standin_app_coverage"
    cov_file.parent.mkdir(parents=True, exist_ok=True)
    app = opts(bench_bin, mode=adbrun.Mode.APP, app_apk=str(apk))
    cov_file.write_text(json.dumps({"delegate": "nnapi", "execution": "none", "delegated": 0, "total": 31}))
    with pytest.raises(DeviceError, match="android_demo: the nnapi delegate covered 0%"):
        run_adb(tiny_model, profile("nnapi"), app)
    cov_file.write_text("null")  # an app build that does not report coverage
    with pytest.raises(DeviceError, match="did not report delegate coverage"):
        run_adb(tiny_model, profile("nnapi"), app)
    assert run_adb(tiny_model, profile("nnapi", threshold=None), app)["mode"] == "app"
    assert device_tree(phone) == ["bin"]


def test_elf_binary_for_the_wrong_abi_is_refused(tmp_path):
    elf = tmp_path / "benchmark_model"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (62).to_bytes(2, "little") + b"\0" * 44)
    with pytest.raises(DeviceError, match="built for x86_64 but the phone is arm64-v8a"):
        adbrun._check_elf_abi(elf, "arm64-v8a")
    adbrun._check_elf_abi(elf, "x86_64")  # matching ABI passes


def test_shared_app_result_example_parses_and_is_consistent():
    text = (DATA / "android_demo_result.json").read_text()
    r = adbrun.parse_app_result(text)
    assert r["device"]["android_release"] == "14" and r["delegate"] == "gpu"
    # The app computes stats the way device_bench does (population std, linear percentiles).
    stats = summarize(r["timings_ms"])
    for k, v in r["runs"].items():
        assert stats[k] == pytest.approx(v, abs=1e-4), k
    broken = json.loads(text)
    del broken["runs"]["p95_ms"]
    with pytest.raises(DeviceError, match=r"lacks runs\.p95_ms"):
        adbrun.parse_app_result(json.dumps(broken))
    with pytest.raises(DeviceError, match="failed on the phone: GPU delegate unavailable"):
        adbrun.parse_app_result(json.dumps({"schema": "edgeq.bench/1", "error": "GPU delegate unavailable"}))
    with pytest.raises(DeviceError, match="not JSON"):
        adbrun.parse_app_result("EDGEQ_RESULT {")


def test_android_demo_writes_every_field_the_parser_requires():
    src = (ROOT / "android_demo/app/src/main/java/com/edgeq/demo/MainActivity.kt").read_text()
    for key in adbrun.APP_REQUIRED + adbrun.APP_COVERAGE_FIELDS + ("delegate_coverage",):
        assert '"%s"' % key.split(".")[-1] in src, key
    assert '"edgeq.bench/1"' in src and "EDGEQ_RESULT" in src
    for extra in ("model", "delegate", "threads", "warmup", "runs", "seed", "out"):
        assert 'EXTRA_%s' % extra.upper() in src or '"%s"' % extra in src


def test_parser_module_stays_light():
    import subprocess
    import sys
    code = ("import sys, edgeq.runners.adb; "
            "print(sorted(m for m in ('tensorflow', 'numpy', 'paramiko') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stderr
    assert benchmark_log.SCHEMA == adbrun.SCHEMA
