"""`pernode fleet` handles its key, its state and other people's processes as a careful server does: the state lives
in a private folder in 0600 files, the API key never reaches the disk, `fleet down` signals only processes that are
still the ones it recorded and belong to this user, a local Ray is token-authenticated, and the readiness probe
sends the fleet's key. No Ray cluster is started here (the one real-Ray test is in test_fleet_ray.py)."""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pernode import envs
from pernode.cli.fleet import run_down, write_owner_spec
from pernode.config import EngineConfig
from pernode.serve.deploy import (FleetSpec, ProcessRecord, local_ray_options, probe_models, read_state,
                                  signal_recorded, spec_file, state_file, warn_if_exposed, write_state)
from pernode.serve.deploy.owner import load_owner_spec
from pernode.serve.server.options import ServerSettings

KEY = "sk-very-secret-fleet-key"
DOWN_ARGS = argparse.Namespace(address=None, app_name=None)


@pytest.fixture
def private_state(monkeypatch, tmp_path):
    """The default state location, under a runtime folder of the test's own."""
    monkeypatch.delenv("PERNODE_FLEET_STATE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    return tmp_path / "run" / "pernode"


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    # Popen returns after fork; /proc/<pid>/cmdline is empty until the child has exec'd `sleep`.
    deadline = time.monotonic() + 10
    while b"sleep" not in Path(f"/proc/{p.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_lives_in_a_private_folder(monkeypatch, tmp_path, private_state):
    assert state_file().parent == private_state
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert envs.fleet_state_path().parent == tmp_path / "home" / ".cache" / "pernode" / "fleet"
    assert not str(envs.fleet_state_path()).startswith("/tmp/pernode-fleet")


def test_detached_spec_keeps_the_key_off_disk(monkeypatch, private_state):
    spec = FleetSpec(EngineConfig(model="m"), ServerSettings(api_key=KEY), port=8123)
    old_umask = os.umask(0)  # the modes come from os.open, not from a friendly umask
    try:
        env = write_owner_spec(spec, num_cpus=2, startup_timeout_s=5.0)
        write_state({"url": "http://127.0.0.1:8123"})
    finally:
        os.umask(old_umask)
    assert env["PERNODE_API_KEY"] == KEY  # the owner gets the key in its (private) environment
    assert mode(private_state) == 0o700
    for f in private_state.iterdir():
        assert mode(f) == 0o600, f
        assert KEY not in f.read_text(), f"the API key was written to {f}"
    monkeypatch.setenv("PERNODE_API_KEY", KEY)
    loaded, cfg = load_owner_spec(spec_file())
    assert loaded == spec and cfg["num_cpus"] == 2
    assert "PERNODE_API_KEY" not in os.environ  # taken: the local Ray's processes do not inherit it


def test_state_file_others_may_write_is_refused(private_state):
    write_state({"url": "u"})
    assert read_state() == {"url": "u"}
    os.chmod(state_file(), 0o666)
    with pytest.raises(ValueError, match=r"writable by group or others \(mode 0666\)"):
        read_state()
    os.chmod(state_file(), 0o600)
    if os.getuid() == 0:
        os.chown(state_file(), 65534, -1)
        with pytest.raises(ValueError, match="owned by uid 65534, not by you"):
            read_state()
    state_file().unlink()
    os.symlink("/etc/hostname", state_file())
    with pytest.raises(ValueError, match="cannot be opened safely"):
        read_state()
    os.chmod(private_state, 0o777)
    with pytest.raises(ValueError, match=r"state folder .* is writable by others \(mode 0777\)"):
        write_state({})


def test_down_does_not_kill_a_process_with_another_start_time(private_state, sleeper):
    record = ProcessRecord.of(sleeper.pid)
    assert record.uid == os.getuid() and "sleep 60" in record.cmdline
    reused = dataclasses.replace(record, start_time=record.start_time + 1)  # the pid, now another process
    write_state({"pid": sleeper.pid, "owner": reused.to_dict(), "ray_processes": [reused.to_dict()], "url": "u"})
    assert run_down(DOWN_ARGS, timeout_s=0.5) == 0
    assert sleeper.poll() is None, "fleet down signalled a process it did not start"
    assert "is now another process" in signal_recorded(reused, 15)
    # the very process it recorded: SIGTERM
    write_state({"pid": sleeper.pid, "owner": record.to_dict(), "ray_processes": [], "url": "u"})
    assert run_down(DOWN_ARGS, timeout_s=5.0) == 0
    assert sleeper.wait(5) == -15


def test_down_refuses_a_bare_pid(private_state, sleeper, capsys):
    write_state({"pid": sleeper.pid, "ray_processes": [sleeper.pid], "url": "u"})  # no start time to check
    assert run_down(DOWN_ARGS, timeout_s=0.5) == 1
    assert sleeper.poll() is None
    assert "without its start time" in capsys.readouterr().err
    with pytest.raises(ValueError, match="start_time"):
        ProcessRecord.from_dict({"pid": sleeper.pid})


@pytest.mark.skipif(os.getuid() != 0, reason="starting another user's process needs root")
def test_another_users_process_is_not_signalled():
    p = subprocess.Popen(["sleep", "60"], user=65534)
    try:
        record = ProcessRecord.of(p.pid)
        forged = dataclasses.replace(record, uid=os.getuid())  # a state file claiming it is ours
        assert "belongs to uid 65534" in signal_recorded(forged, 15)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_local_ray_is_private():
    kwargs, env = local_ray_options(num_cpus=2)
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 2  # never another user's cluster
    assert kwargs["include_dashboard"] is False and kwargs["dashboard_host"] == "127.0.0.1"
    assert env["RAY_AUTH_MODE"] == "token"
    token = env["RAY_AUTH_TOKEN"]
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, as Ray makes its own
    assert local_ray_options()[1]["RAY_AUTH_TOKEN"] != token  # fresh for every Ray


def test_proxy_exposed_without_key_warns(caplog):
    engine = EngineConfig(model="m")
    with caplog.at_level(logging.WARNING, logger="pernode.fleet"):
        assert warn_if_exposed(FleetSpec(engine, host="0.0.0.0")) is True
    assert "without an API key" in caplog.text
    assert FleetSpec(engine).host == "127.0.0.1"  # loopback unless asked
    assert not warn_if_exposed(FleetSpec(engine))
    assert not warn_if_exposed(FleetSpec(engine, host="::1"))
    assert not warn_if_exposed(FleetSpec(engine, ServerSettings(api_key=KEY), host="0.0.0.0"))


class _KeyedModels(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        ok = self.path == "/v1/models" and self.headers.get("Authorization") == f"Bearer {KEY}"
        body = json.dumps({"data": []} if ok else {"error": {"code": "invalid_api_key"}}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_readiness_probe_sends_the_fleet_key():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeyedModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert probe_models(url) == "HTTP 401"
        assert probe_models(url, KEY) is None  # a keyed fleet becomes ready instead of timing out
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
