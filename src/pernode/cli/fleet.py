"""`pernode fleet up | down | validate`: engine replicas on Ray Serve behind one OpenAI route."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.cli.serve import add_server_arguments, settings_from_args
from pernode.jobs.validate import DEFAULT_DURATION_S, run_validate
from pernode.serve.deploy.ray_fleet import (DEFAULT_APP_NAME, STATE_FILE, Autoscale, FleetSpec, _plan_replicas,
                                            connect, deploy, load_plan, serve_until_signal, shutdown, spec_to_json,
                                            still_running)


def add_parsers(sub) -> None:
    p = sub.add_parser("fleet", help="engine replicas on Ray Serve behind one OpenAI route: up, down, validate")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True)
    p = fleet_sub.add_parser("up", help="deploy N replicas on Ray Serve (local Ray, or --address); Ctrl-C stops")
    add_server_arguments(p)
    add_engine_arguments(p)
    add_fleet_arguments(p)
    p.add_argument("--detach", action="store_true", help="leave the fleet running; `pernode fleet down` stops it")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every replica")
    p.set_defaults(func=run_up)
    p = fleet_sub.add_parser("down", help="stop a detached fleet: Serve, and the local Ray `up --detach` started")
    p.add_argument("--address", default=None, help="the Ray cluster (default: the one `up --detach` recorded)")
    p.add_argument("--app-name", default=None, help="delete only this Serve application")
    p.set_defaults(func=run_down)
    p = fleet_sub.add_parser("validate", help="run a plan's workload on a fleet: predicted vs measured latencies")
    add_validate_arguments(p)
    p.set_defaults(func=lambda args: run_validate(args, engine_config_from_args(args)))


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet")
    g.add_argument("--replicas", type=int, default=None, help="replicas (default: the plan's, else 1)")
    g.add_argument("--plan", default=None, help="plan.json from `pernode plan --out`: its replicas and max batch "
                                                "(--max-num-seqs) unless given")
    g.add_argument("--autoscale", default=None,
                   help="MIN,MAX,TARGET_ONGOING_REQUESTS for Ray Serve autoscaling, or 'plan' (needs --plan)")
    g.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="Ray num_cpus of each replica; fractions allowed (default: cluster CPUs / replicas)")
    g.add_argument("--threads-per-replica", type=int, default=None,
                   help="torch threads in each replica (default: its CPUs rounded down, at least 1)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="Ray's cap of requests in one replica (default: --max-num-seqs + --max-queued-requests)")
    g.add_argument("--address", default=None,
                   help="a running Ray cluster (ray://host:10001, host:6379 or 'auto'); default: start Ray here")
    g.add_argument("--app-name", default=DEFAULT_APP_NAME, help="Ray Serve application name (default %(default)s)")


def spec_from_args(args: argparse.Namespace, plan: dict | None = None) -> FleetSpec:
    plan = plan if plan is not None else (load_plan(args.plan) if getattr(args, "plan", None) else None)
    engine = engine_config_from_args(args)
    replicas = args.replicas
    if plan is not None:
        engine = dataclasses.replace(engine, max_num_seqs=int(plan["max_batch_per_replica"]["batch_size"]))
        replicas = replicas or _plan_replicas(plan)
    autoscale = None
    if args.autoscale == "plan":
        if plan is None:
            raise ValueError("--autoscale plan needs --plan plan.json")
        autoscale = Autoscale.from_plan(plan)
    elif args.autoscale:
        autoscale = Autoscale.parse(args.autoscale)
    return FleetSpec(engine=engine, settings=settings_from_args(args), replicas=replicas or 1, autoscale=autoscale,
                     num_cpus_per_replica=args.num_cpus_per_replica, threads_per_replica=args.threads_per_replica,
                     max_ongoing_requests=args.max_ongoing_requests, host=args.host, port=args.port,
                     app_name=args.app_name)


def run_up(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.detach and not args.address:
        return _up_detached(spec, args)
    if args.detach:  # a cluster that outlives us: deploy, record, disconnect
        connect(args.address)
        try:
            info = deploy(spec, args.startup_timeout)
        finally:
            import ray  # lazy, as above

            ray.shutdown()  # disconnects only: Serve's controller is a detached actor and keeps the replicas up
        STATE_FILE.write_text(json.dumps({"address": args.address, "url": info["url"], "app_name": spec.app_name,
                                          "info": info}) + "\n")
        print(f"pernode fleet: {_describe(spec, info)}\npernode fleet: OpenAI API at {info['url']}/v1; detached, "
              f"stop it with `pernode fleet down`", flush=True)
        return 0
    return serve_until_signal(spec, None, args.num_cpus, args.startup_timeout)


def _up_detached(spec: FleetSpec, args: argparse.Namespace) -> int:
    """Run `python -m pernode.serve.deploy.ray_fleet SPEC` in a session of its own: it owns the local Ray and ends it on
    SIGTERM (`fleet down`). Never `ray stop`, which ends every Ray on the machine, other users' too."""
    if STATE_FILE.exists():
        old = json.loads(STATE_FILE.read_text())
        if old.get("pid") and still_running([old["pid"]]):
            raise ValueError(f"a detached fleet already runs (pid {old['pid']}, {old.get('url')}); "
                             f"`pernode fleet down` first")
        STATE_FILE.unlink()
    spec_file = STATE_FILE.with_suffix(".spec.json")
    log_file = STATE_FILE.with_suffix(".log")
    spec_file.write_text(json.dumps({"spec": spec_to_json(spec), "num_cpus": args.num_cpus,
                                     "startup_timeout_s": args.startup_timeout}))
    with open(log_file, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "pernode.serve.deploy.ray_fleet", str(spec_file)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    deadline = time.monotonic() + args.startup_timeout + 60
    while time.monotonic() < deadline:
        if STATE_FILE.exists():
            state = json.loads(STATE_FILE.read_text())
            print(f"pernode fleet: {_describe(spec, state['info'])}\npernode fleet: OpenAI API at {state['url']}/v1; "
                  f"detached (pid {child.pid}, log {log_file}); stop it with `pernode fleet down`", flush=True)
            return 0
        if child.poll() is not None:
            tail = log_file.read_text()[-2000:]
            raise RuntimeError(f"the detached fleet exited ({child.returncode}) before it was ready; its log "
                               f"{log_file} ends:\n{tail}")
        time.sleep(0.5)
    child.terminate()
    raise RuntimeError(f"the detached fleet was not ready in {args.startup_timeout:.0f} s; see {log_file}")


def _describe(spec: FleetSpec, info: dict) -> str:
    size = (f"autoscaling {spec.autoscale.min_replicas}..{spec.autoscale.max_replicas} replicas at "
            f"{spec.autoscale.target_ongoing_requests:g} ongoing requests each" if spec.autoscale
            else f"{spec.replicas} replicas")
    return (f"{size} of {spec.engine.model} (max_num_seqs {spec.engine.max_num_seqs}), "
            f"{info['num_cpus_per_replica']:g} CPUs and {info['threads_per_replica']} torch threads each on "
            f"{info['cluster_cpus']:g} cluster CPUs; up in {info['startup_s']:.1f} s")


def run_down(args: argparse.Namespace, timeout_s: float = 60.0) -> int:
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    if state.get("pid") and not args.address:  # the local fleet `up --detach` started: its owner shuts it down
        pid = state["pid"]
        if still_running([pid]):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while still_running([pid, *state.get("ray_processes", [])]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = still_running([pid, *state.get("ray_processes", [])])
        for p in left:  # the owner did not finish in time: end what it started, by pid
            os.kill(p, signal.SIGKILL)
        STATE_FILE.unlink(missing_ok=True)
        STATE_FILE.with_suffix(".spec.json").unlink(missing_ok=True)
        print(f"pernode fleet down: stopped the fleet at {state.get('url')} and its local Ray"
              + (f" (killed {len(left)} processes that did not stop in {timeout_s:.0f} s)" if left else ""))
        return 0
    address = args.address or state.get("address")
    if not address:
        print(f"pernode fleet down: no detached fleet recorded in {STATE_FILE}; pass --address", file=sys.stderr)
        return 1
    import ray  # lazy: Ray takes seconds to import, and only this branch needs it
    from ray import serve

    connect(address)
    if args.app_name:  # one application; Serve and the cluster stay up
        serve.delete(args.app_name)
        ray.shutdown()
        print(f"pernode fleet down: deleted the Serve application {args.app_name} on {address}")
    else:
        shutdown()
        print(f"pernode fleet down: Serve stopped on {address} (the Ray cluster keeps running)")
    if state.get("address") == address:
        STATE_FILE.unlink(missing_ok=True)
    return 0


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="plan.json from `pernode plan --out`")
    p.add_argument("--profile", default=None,
                   help="the profile the plan was made from: also simulate the exact requests sent")
    p.add_argument("--base-url", default=None,
                   help="use a running fleet (e.g. from `pernode fleet up --plan plan.json --detach`) instead of "
                        "bringing one up")
    p.add_argument("--num-prompts", type=int, default=None,
                   help=f"requests to send (default: {DEFAULT_DURATION_S:.0f} s of arrivals, at least 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default 0)")
    p.add_argument("--input-len", default=None, help="N or LO:HI; default: read from the plan's workload")
    p.add_argument("--output-len", default=None, help="N or LO:HI; default: read from the plan's workload")
    p.add_argument("--burstiness", type=float, default=None, help="default: the plan's")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per step in the same-trace simulation (default: the engine's "
                        "--max-num-batched-tokens, 512 on CPU)")
    p.add_argument("--out", default=None, help="write predicted, measured and errors as JSON here")
    p.add_argument("--bench-out", default=None, help="also write the full bench serve result here")
    g = p.add_argument_group("fleet (when not --base-url)")
    g.add_argument("--port", type=int, default=None, help="Serve's HTTP port (default: a free one)")
    g.add_argument("--num-cpus-per-replica", type=float, default=None)
    g.add_argument("--threads-per-replica", type=int, default=None)
    g.add_argument("--max-ongoing-requests", type=int, default=None)
    add_engine_arguments(p)
