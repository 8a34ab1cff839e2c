"""edgeq.fleet: inventory parsing, bounded concurrency, and a real fleet against loopback sshd where
one device is dead (nothing listens on its port) and one has a changed host key.
"""

import io
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgeq.errors import EdgeqError
from edgeq.flash import FlashOptions, flash
from edgeq.fleet import FleetDevice, Inventory, load_inventory, run_fleet
from edgeq.remote import SshTarget
from edgeq.runners import ProfileRequest, run_reach
from edgeq.runners.ssh import SshSettings
from tests.sshd_fixture import StubProfile, free_port, sshd, tiny_int8_model  # noqa: F401


def render(table) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=250, color_system=None).print(table)
    return buf.getvalue()


def test_load_inventory(tmp_path):
    (tmp_path / "keys").mkdir()
    inv = tmp_path / "fleet.toml"
    inv.write_text("""
[defaults]
user = "pi"
profile = "rpi4"
identity = "keys/id_ed25519"
connect_timeout = 5

[devices.kitchen]
host = "192.168.1.20"

[devices."garage pi"]
host = "garage.local"
port = 2222
user = "admin"
profile = "rpi5"
""")
    # as the CLI passes them: unset options are None, set ones are the lowest layer
    got = load_inventory(inv, trust_new_host=True, identity=None, known_hosts="cli_kh",
                         connect_timeout=10.0, run_timeout=99.0)
    assert [d.name for d in got.devices] == ["kitchen", "garage pi"]
    k, g = got.devices
    assert (k.target.host, k.target.user, k.target.port, k.profile) == ("192.168.1.20", "pi", 22, "rpi4")
    assert (g.target.host, g.target.user, g.target.port, g.profile) == ("garage.local", "admin", 2222, "rpi5")
    assert k.target.identity == str(tmp_path / "keys" / "id_ed25519")
    assert k.target.connect_timeout == 5 and k.target.trust_new_host and g.target.trust_new_host
    assert k.target.run_timeout == 99.0 and k.target.known_hosts == str(Path("cli_kh").resolve())


@pytest.mark.parametrize("text,msg", [
    ("[devices.a]\nprofile='rpi4'\n", "device 'a' has no host"),
    ("[devices.a]\nhost='x'\n", "device 'a' has no profile"),
    ("[devices.a]\nhost='x'\nprofile='rpi4'\npassword='hunter2'\n", r"unknown key\(s\) \['password'\]"),
    ("[devices.a]\nhost='x'\nprofile='rpi4'\nport=70000\n", "port 70000; use 1-65535"),
    ("[devices.a\nhost='x'\n", "not valid TOML"),
    ("[defaults]\nuser='pi'\n", "lists no devices"),
    # wrong types were tracebacks (host = 5, profile = ["rpi4"]) or odd errors (port = true: "port True")
    ("[devices.a]\nhost=5\nprofile='rpi4'\n", r"device 'a': host must be a string such as host = \"pi@10\.0\.0\.5\", got 5"),
    ("[devices.a]\nhost='x'\nprofile=['rpi4']\n", r"profile must be a string such as profile = \"rpi4\", got \['rpi4'\]"),
    ("[devices.a]\nhost='x'\nprofile='rpi4'\nport=true\n", "port must be a whole number such as port = 22, got True"),
    ("[defaults]\nconnect_timeout='5'\n[devices.a]\nhost='x'\nprofile='rpi4'\n",
     "connect_timeout must be a number of seconds above 0 such as connect_timeout = 10, got '5'"),
    ("[devices.a]\nhost='x'\nprofile='rpi4'\nrun_timeout=-1\n", "run_timeout must be a number of seconds above 0"),
    ("[devices.a]\nhost='x'\nprofile='rpi4'\nidentity=5\n", "identity must be a string such as identity = "),
    ("[defaults]\nknown_hosts=['a']\n[devices.a]\nhost='x'\nprofile='rpi4'\n", "known_hosts must be a string"),
])
def test_load_inventory_errors(tmp_path, text, msg):
    (tmp_path / "f.toml").write_text(text)
    with pytest.raises(EdgeqError, match=msg):
        load_inventory(tmp_path / "f.toml")


def test_missing_inventory(tmp_path):
    with pytest.raises(EdgeqError, match="inventory not found"):
        load_inventory(tmp_path / "nope.toml")


def test_parallelism_is_bounded_and_order_kept():
    devices = tuple(FleetDevice(f"d{i}", SshTarget(host=f"h{i}"), "rpi4") for i in range(7))
    lock, running, peak = threading.Lock(), [0], [0]

    def work(dev):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.15)
        with lock:
            running[0] -= 1
        if dev.name == "d3":
            raise EdgeqError("d3 is broken; fix d3")
        if dev.name == "d5":
            raise ZeroDivisionError("oops")
        return {"n": int(dev.name[1:])}

    res = run_fleet(Inventory("x", devices), work, max_parallel=3)
    assert peak[0] == 3
    assert [o.name for o in res.outcomes] == [d.name for d in devices]
    assert [o.status for o in res.outcomes] == ["ok"] * 3 + ["failed", "ok", "crashed", "ok"]
    assert res.outcomes[3].error == "d3 is broken; fix d3" and res.outcomes[5].error == "ZeroDivisionError: oops"
    assert [o.result["n"] for o in res.outcomes if o.result] == [0, 1, 2, 4, 6]
    assert not res.ok and res.exit_code == 1


def _fleet_file(tmp_path, sshd, bad_kh):
    sshd.known_hosts(tmp_path / "known_hosts")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    bad_kh.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")  # the "device" was swapped
    inv = tmp_path / "fleet.toml"
    inv.write_text(f"""
[defaults]
user = "{sshd.user}"
profile = "rpi4"
identity = "{sshd.client_key}"
known_hosts = "known_hosts"
connect_timeout = 3

[devices.pi-a]
host = "127.0.0.1"
port = {sshd.port}

[devices.dead]
host = "127.0.0.1"
port = {free_port()}

[devices.pi-b]
host = "127.0.0.1"
port = {sshd.port}

[devices.impostor]
host = "127.0.0.1"
port = {sshd.port}
known_hosts = "{bad_kh}"
""")
    return load_inventory(inv)


def test_fleet_profile_with_dead_host(sshd, tiny_int8_model, tmp_path):
    inv = _fleet_file(tmp_path, sshd, tmp_path / "bad_kh")
    profile = StubProfile()
    messages = []

    def job(dev):
        request = ProfileRequest(runs=5, ssh=SshSettings(dev.target, remote_python=sshd.device_python))
        return run_reach(tiny_int8_model, profile, request, "ssh")

    res = run_fleet(inv, job, max_parallel=2, progress=messages.append)
    status = {o.name: o.status for o in res.outcomes}
    assert status == {"pi-a": "ok", "dead": "failed", "pi-b": "ok", "impostor": "failed"}
    by = {o.name: o for o in res.outcomes}
    assert "cannot connect" in by["dead"].error and by["dead"].exit_code == 3
    assert "HOST KEY CHANGED" in by["impostor"].error
    assert by["pi-a"].result["runs"]["count"] == 5 and by["pi-b"].result["runner"] == "ssh"
    assert res.exit_code == 3 and not res.ok
    data = json.loads(json.dumps(res.to_dict()))
    assert data["summary"] == {"devices": 4, "ok": 2, "failed": 2}
    text = render(res.table())
    for name in ("pi-a", "dead", "pi-b", "impostor", "median ms", "cannot connect", "ai-edge-litert 2.3.0"):
        assert name in text
    assert "dead: failed" in " ".join(messages)


def test_fleet_flash_with_dead_host(sshd, tiny_int8_model, tmp_path):
    inv = _fleet_file(tmp_path, sshd, tmp_path / "bad_kh")
    res = run_fleet(inv, lambda dev: flash(tiny_int8_model, StubProfile(), dev.target,
                                           FlashOptions(slot="fleet-test")).to_dict(), max_parallel=4)
    ok = [o for o in res.outcomes if o.status == "ok"]
    assert [o.name for o in ok] == ["pi-a", "pi-b"]
    assert all(o.result["action"] == "flash" for o in ok)
    versions = {o.result["version"] for o in ok}
    assert len(versions) == 2  # both went to the same loopback device: two releases, one current
    current = sshd.home / ".local/share/edgeq/fleet-test/current"
    assert current.resolve().name in versions
    assert "version" in render(res.table())
