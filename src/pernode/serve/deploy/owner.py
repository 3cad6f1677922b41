"""The process that owns a fleet: deploy, serve until SIGINT or SIGTERM, then shut Serve and Ray down and wait
for every process a local Ray started to end.

`pernode fleet up` runs it in the foreground; `pernode fleet up --detach` runs this module in a session of its own,
`python -m pernode.serve.deploy.owner SPEC.json`, and `pernode fleet down` sends it SIGTERM. The API key is not in
SPEC.json: it comes in this process's environment (PERNODE_API_KEY), which no other user can read.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pernode import envs
from pernode.serve.deploy.lifecycle import connect, deploy, describe_fleet, replica_states, shutdown
from pernode.serve.deploy.processes import ProcessRecord, child_processes, wait_ended
from pernode.serve.deploy.replica import ROUTER_POLICY
from pernode.serve.deploy.spec import FleetSpec
from pernode.serve.deploy.state import read_private, write_state

log = logging.getLogger("pernode.fleet")

PR_SET_CHILD_SUBREAPER = 36  # prctl option (linux/prctl.h)
LIVENESS_CHECK_S = 5.0


def serve_until_signal(spec: FleetSpec, address: str | None = None, num_cpus: int | None = None,
                       startup_timeout_s: float = 600.0, record_state: bool = False) -> int:
    """Connect (or start a local Ray), deploy, serve until SIGINT/SIGTERM, then shut Serve and Ray down.
    With `record_state`, write the state file `pernode fleet down` reads once the fleet is up."""
    stop = threading.Event()
    before = child_processes()
    connect(address, num_cpus)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a logging handler of its own
        signal.signal(sig, lambda *_: stop.set())
    started: set[int] = set()
    try:
        deployment = deploy(spec, startup_timeout_s)
        started = child_processes() - before
        print(f"pernode fleet: {describe_fleet(spec, deployment)}", flush=True)
        print(f"pernode fleet: OpenAI API at {deployment.url}/v1 (Ray Serve's router; "
              f"`pernode plan --policy {ROUTER_POLICY}` models it)", flush=True)
        if record_state:
            records = [r for pid in sorted(started) if (r := ProcessRecord.of(pid)) is not None]
            write_state({"pid": os.getpid(), "owner": ProcessRecord.of(os.getpid()).to_dict(), "url": deployment.url,
                         "app_name": spec.app_name, "address": address,
                         "ray_processes": [r.to_dict() for r in records], "info": deployment.to_dict()})
        print("pernode fleet: serving until Ctrl-C or SIGTERM", flush=True)
        while not stop.wait(LIVENESS_CHECK_S):
            if not replica_states(spec.app_name):
                log.error("the Serve application %s is gone", spec.app_name)
                return 1
        print("pernode fleet: shutting down", flush=True)
        return 0
    finally:
        started |= child_processes() - before
        shutdown()
        wait_ended(started, timeout_s=20.0, reap=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m pernode.serve.deploy.owner SPEC.json`, SPEC.json holding {"spec", "num_cpus",
    "startup_timeout_s"} as `pernode fleet up --detach` writes it."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # Ray's grandchildren whose parent exits first come to us to be reaped
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    spec, cfg = load_owner_spec(Path(argv[0]))
    return serve_until_signal(spec, None, cfg.get("num_cpus"), cfg["startup_timeout_s"], record_state=True)


def load_owner_spec(path: Path) -> tuple[FleetSpec, dict]:
    """The spec `fleet up --detach` wrote (a private file of this user's), with the API key from this process's
    environment, which is then removed from it so that the local Ray's processes do not inherit it."""
    text = read_private(path)
    if text is None:
        raise ValueError(f"fleet spec {path} does not exist")
    cfg = json.loads(text)
    spec = FleetSpec.from_dict(cfg["spec"])
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, api_key=envs.take_api_key()))
    return spec, cfg


if __name__ == "__main__":
    sys.exit(main())
