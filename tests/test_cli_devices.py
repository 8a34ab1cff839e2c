"""`edgeq profile` / `edgeq flash` as users type them, against the real OpenSSH server on loopback
(tests/sshd_fixture.py): the CLI wiring, exit codes and --json, on top of the runner tests."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgeq.cli import main
from tests.sshd_fixture import sshd, tiny_int8_model  # noqa: F401  (fixtures)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_profile_flash_rollback_over_ssh(sshd, tiny_int8_model, tmp_path):  # noqa: F811
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    host = f"{sshd.user}@127.0.0.1:{sshd.port}"
    common = ["--device", "rpi5", "--host", host, "--identity", sshd.client_key, "--known-hosts", kh]
    r = run("profile", tiny_int8_model, *common, "--remote-python", sshd.device_python, "--runs", 3,
            "--warmup", 1, "--json", "-o", tmp_path / "res.json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runner"] == "ssh" and doc["runs"]["count"] == 3 and doc["runtime"]["name"] == "ai-edge-litert"
    assert json.loads((tmp_path / "res.json").read_text()) == doc

    # Unknown host key: refused, exit 3 (device failure), one line naming the fix.
    r = run("profile", tiny_int8_model, "--device", "rpi5", "--host", host, "--identity", sshd.client_key,
            "--known-hosts", tmp_path / "empty_kh", "--remote-python", sshd.device_python)
    assert r.exit_code == 3 and "--trust-new-host" in r.output and "Traceback" not in r.output

    v1 = json.loads(run("flash", tiny_int8_model, *common, "--json").stdout)
    v2 = json.loads(run("flash", tiny_int8_model, *common, "--json").stdout)
    assert v2["previous"] == v1["version"] != v2["version"]
    back = run("flash", *common, "--rollback", "--json")
    assert back.exit_code == 0 and json.loads(back.stdout)["version"] == v1["version"]


def test_fleet_table_with_a_dead_host(sshd, tiny_int8_model, tmp_path):  # noqa: F811
    from tests.sshd_fixture import free_port
    kh = sshd.known_hosts(tmp_path / "known_hosts")
    (tmp_path / "fleet.toml").write_text(f"""
[defaults]
user = "{sshd.user}"
identity = "{sshd.client_key}"
known_hosts = "{kh}"
profile = "rpi5"

[devices.alive]
host = "127.0.0.1"
port = {sshd.port}

[devices.dead]
host = "127.0.0.1"
port = {free_port()}
""")
    r = run("profile", tiny_int8_model, "--fleet", tmp_path / "fleet.toml", "--remote-python",
            sshd.device_python, "--runs", 2, "--warmup", 0, "--connect-timeout", 3, "--json")
    assert r.exit_code == 3, r.output  # one device failed: device-failure exit code, others still ran
    doc = json.loads(r.stdout)
    status = {d["name"]: d["status"] for d in doc["devices"]}
    assert status == {"alive": "ok", "dead": "failed"}
    alive = next(d for d in doc["devices"] if d["name"] == "alive")
    assert alive["result"]["runs"]["count"] == 2
