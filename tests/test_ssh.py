"""edgeq.runners.ssh against a real OpenSSH server on loopback (tests/sshd_fixture.py).

The "device" is this machine reached through sshd as a separate user, running the real
device_bench.py with the real LiteRT interpreter. Runs go through runners.profile_model, as the CLI
calls it; tests/test_fleet.py runs it per device of a fleet.
"""

import _thread
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeq.errors import DeviceError, EdgeqError
from edgeq.remote import SshTarget, parse_target
from edgeq.runners import ProfileRequest, device_bench, profile_model
from edgeq.runners.ssh import SshSettings
from tests.sshd_fixture import StubProfile, host_outputs, sshd, tiny_int8_model  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PROFILE = SimpleNamespace(**vars(StubProfile()), reach="ssh")  # what the ssh runner reads, reached over ssh


def run_ssh(model, target, remote_python=None, profile=PROFILE, progress=None, **request):
    """runners.profile_model on the loopback board; `request`: ProfileRequest fields."""
    return profile_model(model, profile, ProfileRequest(**request, ssh=SshSettings(target, remote_python)),
                         progress)


def runs_dir(server) -> Path:
    return server.home / ".cache" / "edgeq" / "runs"


def leftover_runs(server) -> list:
    d = runs_dir(server)
    return sorted(d.iterdir()) if d.exists() else []


def ssh_keygen_fingerprint(pub: str) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", "-"], input=pub, capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def wait_for_pid_file(server, timeout=30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in leftover_runs(server):
            if (d / "pid").exists() and (d / "pid").read_text().strip():
                return d / "pid"
        time.sleep(0.05)
    raise AssertionError("the remote run never started")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("spec,host,user,port", [
    ("pi@pi.local", "pi.local", "pi", 22),
    ("pi@10.0.0.7:2222", "10.0.0.7", "pi", 2222),
    ("raspberrypi", "raspberrypi", None, 22),
    ("me@[fe80::1]:2200", "fe80::1", "me", 2200),
])
def test_parse_target(spec, host, user, port):
    t = parse_target(spec, connect_timeout=3.0)
    assert (t.host, t.user, t.port, t.connect_timeout) == (host, user, port, 3.0)


@pytest.mark.parametrize("bad", ["pi@", "pi@host:99999", "a b@host", "pi@host:port"])
def test_parse_target_rejects(bad):
    with pytest.raises(EdgeqError):
        parse_target(bad)


def test_profile_end_to_end(sshd, tiny_int8_model, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, size=(1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "in.npz", arr_0=x)
    out_file = tmp_path / "out.npz"
    messages = []
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    res = run_ssh(tiny_int8_model, target, sshd.device_python, runs=4, warmup=2, inputs=tmp_path / "in.npz",
                  save_outputs=out_file, progress=messages.append)
    assert res["schema"] == "edgeq.bench/1"
    assert res["runner"] == "ssh" and res["host"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert res["runtime"]["name"] == "ai-edge-litert" and res["runtime"]["version"] == "2.3.0"
    assert res["model_sha256"] == hashlib.sha256(tiny_int8_model.read_bytes()).hexdigest()
    assert res["runs"]["count"] == 4 and len(res["timings_ms"]) == 4 and res["warmup"]["count"] == 2
    assert res["input_source"] == "file" and res["threads"] == 1
    assert res["remote_python"] == sshd.device_python
    assert res["device"]["cpu_model"]  # read from the device's /proc/cpuinfo
    with open("/proc/cpuinfo") as f:  # the same machine: the features it lists that XNNPACK's kernels use
        flags = {w for line in f if line.split(":")[0].strip() in ("flags", "Features") for w in line.split(":", 1)[1].split()}
    assert res["device"]["cpu_features"] == [c for c in device_bench.CPU_FEATURES if c in flags]
    # governor/temperature come from the device's /sys when readable, else None
    for key, path in [("governor", "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
                      ("temperature_c", "/sys/class/thermal/thermal_zone0/temp")]:
        assert (res[key] is not None) == os.access(path, os.R_OK)
    assert "emulated" not in res
    # outputs came back and equal the host interpreter's on the same inputs
    got = np.load(out_file)["arr_0"]
    np.testing.assert_array_equal(got, host_outputs(tiny_int8_model, [x])[0])
    assert any(m.startswith("uploading tiny_int8.tflite") for m in messages)
    assert leftover_runs(sshd) == []


def test_samples_next_to_the_model_are_fed_on_the_board(sshd, tiny_int8_model, tmp_path):
    """The manifest's samples go to the board by default, cycled over the runs (input_source "samples")."""
    import json

    from edgeq.manifest import SCHEMA, manifest_path

    model = tmp_path / "m.tflite"
    model.write_bytes(tiny_int8_model.read_bytes())
    x = np.random.default_rng(2).integers(-128, 128, size=(3, 1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "m.samples.npz", arr_0=x)
    manifest_path(model).write_text(json.dumps({"schema": SCHEMA, "samples": {"file": "m.samples.npz"}}))
    res = run_ssh(model, sshd.target(sshd.known_hosts(tmp_path / "kh")), sshd.device_python, runs=2, warmup=0,
                  save_outputs=tmp_path / "out.npz")
    assert res["input_source"] == "samples" and res["input_samples"] == 3 and res["inputs_file"] == "m.samples.npz"
    last = (1 + 0 + 2 - 1) % 3  # first inference + warmup + runs, one sample each
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["arr_0"], host_outputs(model, [x[last]])[0])
    assert leftover_runs(sshd) == []


def test_ssh_profile_without_a_target_says_how_to_give_one(tiny_int8_model):
    with pytest.raises(EdgeqError, match="is reached over ssh: pass the board as --host"):
        run_ssh(tiny_int8_model, None)


def test_unknown_host_refused_then_trusted(sshd, tiny_int8_model, tmp_path):
    kh = tmp_path / "known_hosts"
    target = sshd.target(kh)
    with pytest.raises(DeviceError) as e:
        run_ssh(tiny_int8_model, target, sshd.device_python)
    msg = str(e.value)
    assert "--trust-new-host" in msg and ssh_keygen_fingerprint(sshd.host_pubkey) in msg
    assert not kh.exists()  # nothing recorded without consent

    res = run_ssh(tiny_int8_model, sshd.target(kh, trust_new_host=True), sshd.device_python)
    assert res["runs"]["count"] == PROFILE.bench.runs
    assert kh.read_text().split() == [f"[127.0.0.1]:{sshd.port}", *sshd.host_pubkey.split()]
    # now known: works without trusting again
    assert run_ssh(tiny_int8_model, target, sshd.device_python)["schema"] == "edgeq.bench/1"


def test_changed_host_key_refused_even_with_trust(sshd, tiny_int8_model, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other_pub = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other_pub}\n")
    for trust in (False, True):
        with pytest.raises(DeviceError) as e:
            run_ssh(tiny_int8_model, sshd.target(kh, trust_new_host=trust), sshd.device_python)
        msg = str(e.value)
        assert "HOST KEY CHANGED" in msg
        assert ssh_keygen_fingerprint(other_pub) in msg and ssh_keygen_fingerprint(sshd.host_pubkey) in msg
        assert e.value.exit_code == 3
    assert kh.read_text() == f"[127.0.0.1]:{sshd.port} {other_pub}\n"  # never rewritten


def test_wrong_key_refused(sshd, tiny_int8_model, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    target = SshTarget(host="127.0.0.1", port=sshd.port, user=sshd.user, identity=str(tmp_path / "k"),
                       known_hosts=str(sshd.known_hosts(tmp_path / "kh")))
    with pytest.raises(DeviceError, match=f"key authentication to {sshd.user}@127.0.0.1.* failed; pass --identity"):
        run_ssh(tiny_int8_model, target, sshd.device_python)


def test_connect_refused_and_timeout(tiny_int8_model, tmp_path):
    from tests.sshd_fixture import free_port

    target = SshTarget(host="127.0.0.1", port=free_port(), user="x", known_hosts=str(tmp_path / "kh"),
                       connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="cannot connect to x@127.0.0.1:.*runs sshd on port"):
        run_ssh(tiny_int8_model, target)
    assert time.monotonic() - t0 < 5


def test_hostile_names(sshd, tiny_int8_model, tmp_path):
    """Spaces, quotes, `;` and `$(...)` in file names reach the device as data, never as shell."""
    weird_dir = tmp_path / "dir with 'quotes' ; and $(touch PWNED)"
    weird_dir.mkdir()
    name = "m o\"d'el;touch PWNED;$(touch PWNED)`touch PWNED`.tflite"
    model = weird_dir / name
    model.write_bytes(tiny_int8_model.read_bytes())
    x = np.zeros((1, 8, 8, 3), np.int8)
    np.savez(weird_dir / "in; rm -rf ~.npz", arr_0=x)
    res = run_ssh(model, sshd.target(sshd.known_hosts(tmp_path / "kh")), sshd.device_python,
                  inputs=weird_dir / "in; rm -rf ~.npz", save_outputs=weird_dir / "out $(x).npz")
    assert res["model"] == name and res["input_source"] == "file"
    np.testing.assert_array_equal(np.load(weird_dir / "out $(x).npz")["arr_0"],
                                  host_outputs(tiny_int8_model, [x])[0])
    assert not list(sshd.home.rglob("PWNED")) and not Path("PWNED").exists()
    assert sshd.home.exists() and leftover_runs(sshd) == []


def test_no_runtime_says_how_flash_fixes_it(sshd, tiny_int8_model, tmp_path):
    # Debian's system python has neither numpy nor a TFLite runtime here
    with pytest.raises(DeviceError) as e:
        run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh")), "/usr/bin/python3")
    assert "--with-runtime" in str(e.value) and "edgeq flash" in str(e.value)
    assert leftover_runs(sshd) == []


def test_missing_remote_python(sshd, tiny_int8_model, tmp_path):
    with pytest.raises(DeviceError, match=f"'/no/such/python' was not found on {sshd.user}@127.0.0.1"):
        run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh")), "/no/such/python")
    assert leftover_runs(sshd) == []


def test_run_timeout_kills_and_cleans_up(sshd, tiny_int8_model, tmp_path):
    seen = {}

    def watch():
        seen["pid"] = int(wait_for_pid_file(sshd).read_text())

    t = threading.Thread(target=watch)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish within 3s; raise --timeout"):
        run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh"), run_timeout=3),
                sshd.device_python, runs=10**8)
    t.join()
    assert time.monotonic() - t0 < 15
    assert not alive(seen["pid"])  # the benchmark was stopped on the device
    assert leftover_runs(sshd) == []


def test_ctrl_c_mid_run_cleans_up(sshd, tiny_int8_model, tmp_path):
    seen = {}

    def interrupt():
        seen["pid"] = int(wait_for_pid_file(sshd).read_text())
        time.sleep(0.3)
        _thread.interrupt_main()  # what Ctrl-C does to the CLI

    t = threading.Thread(target=interrupt)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh")), sshd.device_python,
                runs=10**8)
    t.join()
    assert not alive(seen["pid"])
    assert leftover_runs(sshd) == []


def test_cleanup_after_an_interrupt_never_uses_the_old_connection(sshd, tmp_path):
    """A Ctrl-C inside paramiko's send path can leave the connection's send lock held
    (Transport._send_user_message takes it outside its try): every later send on it then waits
    forever. Here the lock is held by another thread, as the interrupt leaves it; Remote.cleanup,
    called while the interrupt unwinds, runs its command over a new connection and returns."""
    from edgeq.remote import Remote

    marker = Path(sshd.home) / f"cleanup-{os.getpid()}"
    marker.write_text("x")
    remote = Remote(sshd.target(sshd.known_hosts(tmp_path / "kh")))
    held = threading.Event()

    def hold():
        remote.client.get_transport().clear_to_send_lock.acquire()
        held.set()

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    done = threading.Event()

    def interrupted():  # in a thread of its own, so a cleanup that hangs fails the test instead
        try:
            try:
                raise KeyboardInterrupt
            finally:
                remote.cleanup(f"rm -f {marker}")
        except KeyboardInterrupt:
            done.set()

    threading.Thread(target=interrupted, daemon=True).start()
    try:
        assert done.wait(15) and not marker.exists()
    finally:
        remote.close()
        marker.unlink(missing_ok=True)


def test_a_run_interrupted_drops_its_connection_sending_nothing(sshd, tmp_path):
    """A Ctrl-C inside Remote.run used to close its channel on the way out: a message sent on the
    connection the interrupt may have broken (its send lock held, as in the test above), so the
    interrupt hung there before any cleanup ran. Now the connection is dropped, nothing sent."""
    from edgeq.remote import Remote

    remote = Remote(sshd.target(sshd.known_hosts(tmp_path / "kh")))
    held, done = threading.Event(), threading.Event()

    def hold():
        remote.client.get_transport().clear_to_send_lock.acquire()
        held.set()

    def ctrl_c(_line):  # the interrupt lands while run waits for the command
        threading.Thread(target=hold, daemon=True).start()
        assert held.wait(10)
        raise KeyboardInterrupt

    def interrupted():
        try:
            remote.run("echo started >&2; sleep 20", 60, on_stderr=ctrl_c)
        except KeyboardInterrupt:
            done.set()

    threading.Thread(target=interrupted, daemon=True).start()
    try:
        assert done.wait(15) and remote.client.get_transport() is None
    finally:
        remote.close()


def test_profile_interrupted_on_a_frozen_link(sshd, tmp_path):
    """Ctrl-C while `edgeq profile` uploads over a link gone silent: the upload closed its remote
    file on the way out, waiting 60 s for acks the frozen link never brings (flash's upload already
    dropped the connection). Now the same upload: out at once, and the run directory removed over
    a new connection."""
    from tests.sshd_fixture import LinkProxy, build_int8_model

    big = build_int8_model(tmp_path / "big.tflite", seed=7, classes=8192)
    proxy = LinkProxy(sshd.port)
    proxy.stall_after(1 << 20)
    argv = [sys.executable, "-c", "from edgeq.cli import main; main()", "profile", str(big), "--device", "rpi5",
            "--host", f"{sshd.user}@127.0.0.1:{proxy.port}", "--identity", str(sshd.client_key),
            "--known-hosts", str(sshd.known_hosts(tmp_path / "kh", proxy.port)),
            "--remote-python", sshd.device_python, "--connect-timeout", "40"]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proxy.stalled.wait(60), proc.communicate(timeout=60)
        time.sleep(2)  # the upload fills its socket's send buffer and waits there
        assert len(leftover_runs(sshd)) == 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and err.strip().splitlines()[-1] == "Error: interrupted"
    assert leftover_runs(sshd) == []


def test_disconnect_mid_run(sshd, tiny_int8_model, tmp_path):
    """Killing the sshd session mid-run (a dropped link) is a DeviceError, not a hang, and the
    benchmark and its run directory are removed over a new connection."""
    seen = {}

    def cut():
        seen["pid"] = int(wait_for_pid_file(sshd).read_text())
        for pid in sshd.session_pids():
            os.kill(pid, 9)

    t = threading.Thread(target=cut)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=f"connection to {sshd.user}@127.0.0.1:.* was lost") as e:
        run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh")), sshd.device_python,
                runs=10**8)
    t.join()
    assert e.value.exit_code == 3
    assert time.monotonic() - t0 < 30
    # the board is still reachable: the cleanup went over a new connection
    assert not alive(seen["pid"]) and leftover_runs(sshd) == []


def test_defaults_come_from_the_real_device_profile(sshd, tiny_int8_model, tmp_path):
    from edgeq.profiles import load_profile

    rpi5 = load_profile("rpi5")  # ai-edge-litert 2.3.0, 4 threads, 10 warmup + 50 runs
    res = run_ssh(tiny_int8_model, sshd.target(sshd.known_hosts(tmp_path / "kh")), sshd.device_python,
                  profile=rpi5)
    assert res["runtime"] == {"name": "ai-edge-litert", "version": rpi5.runtime.version}
    assert res["threads"] == rpi5.threads == 4 and res["delegate"] == "xnnpack"
    assert res["warmup"]["count"] == rpi5.bench.warmup and res["runs"]["count"] == rpi5.bench.runs
    assert len(res["timings_ms"]) == rpi5.bench.runs


@pytest.mark.parametrize("case", ["missing", "encrypted"])
def test_identity_problems_are_actionable(sshd, tiny_int8_model, tmp_path, case):
    key = tmp_path / "id"
    if case == "encrypted":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-pass", "-f", str(key)], check=True)
    target = SshTarget(host="127.0.0.1", port=sshd.port, user=sshd.user, identity=str(key),
                       known_hosts=str(sshd.known_hosts(tmp_path / "kh")))
    with pytest.raises(EdgeqError) as e:
        run_ssh(tiny_int8_model, target, sshd.device_python)
    want = "identity file not found" if case == "missing" else "passphrase-protected; load it into ssh-agent"
    assert want in str(e.value) and "s3cret" not in str(e.value)


def test_a_dropped_handshake_is_one_line(tiny_int8_model, tmp_path):
    """A port that closes the connection before the SSH banner (sshd's MaxStartups throttling,
    fail2ban, another service): paramiko's transport thread logged its traceback above edgeq's
    one-line error. The peer here is a real socket on loopback that accepts and closes."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def drop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=drop, daemon=True).start()
    try:
        p = subprocess.run([sys.executable, "-m", "edgeq.cli", "profile", str(tiny_int8_model), "--device", "rpi4",
                            "--host", f"pi@127.0.0.1:{port}", "--connect-timeout", "5", "--known-hosts",
                            str(tmp_path / "kh")], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, EDGEQ_PROGRESS="off"))
    finally:
        srv.close()
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "Exception (client)" not in p.stderr, p.stderr
    assert p.stderr.strip().startswith(f"Error: cannot connect to pi@127.0.0.1:{port}: "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
