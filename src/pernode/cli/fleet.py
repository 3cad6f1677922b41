"""`pernode fleet up | down | validate | rescore`: engine replicas on Ray Serve behind one OpenAI route."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.cli.serve import add_server_arguments, settings_from_args
from pernode.jobs.fleet_from_plan import fleet_spec_for_plan
from pernode.jobs.validate import (ANCHOR_SECONDS, DEFAULT_DURATION_S, MIN_ANCHOR_REQUESTS, FleetPlacement,
                                   ValidateConfig, run_rescore, run_validate)
from pernode.price.planner import Plan
from pernode.serve.deploy import (DEFAULT_APP_NAME, Autoscale, Deployment, FleetSpec, ProcessRecord, clear_state,
                                  connect, delete_application, deploy, describe_fleet, disconnect, log_file,
                                  open_private_log, read_state, shutdown, signal_recorded, spec_file, state_file,
                                  wait_records_ended, write_private, write_state)
from pernode.serve.deploy.owner import serve_until_signal

OWNER_MODULE = "pernode.serve.deploy.owner"  # `python -m` this: the process that owns a detached local fleet


def add_parsers(sub) -> None:
    p = sub.add_parser("fleet", help="engine replicas on Ray Serve behind one OpenAI route: up, down, validate, rescore")
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
    p.set_defaults(func=run_validate_command)
    p = fleet_sub.add_parser("rescore", help="predict a recorded validation run again from another profile")
    p.add_argument("report", help="a `pernode fleet validate --profile ... --out` JSON")
    p.add_argument("--profile", required=True, help="the profile to predict the run's exact requests from")
    p.add_argument("--plan", default=None, help="default: the plan the validation ran")
    p.add_argument("--interval-seeds", type=int, default=5)
    p.add_argument("--serving-path-from-probe", action="store_true",
                   help="use the serving path the run's idle probe measured through the fleet (Ray Serve's proxy) "
                        "instead of the profile's")
    p.add_argument("--mixed-steps", action="store_true",
                   help="scale mixed decode + prompt steps by the profile's measured mixed[] points")
    p.add_argument("--out", default=None, help="write the rescored report here")
    p.set_defaults(func=lambda a: run_rescore(a.report, a.profile, a.plan, a.out, a.interval_seeds,
                                              a.serving_path_from_probe, a.mixed_steps))


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet")
    g.add_argument("--replicas", type=int, default=None, help="replicas (default: the plan's, else 1)")
    g.add_argument("--plan", default=None, help="plan.json from `pernode plan --out`: its replicas (unless "
                                                "--replicas) and its max batch per replica as --max-num-seqs")
    g.add_argument("--autoscale", default=None,
                   help="MIN,MAX,TARGET_ONGOING_REQUESTS for Ray Serve autoscaling, or 'plan' (needs --plan)")
    g.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="Ray num_cpus of each replica; fractions allowed (default: cluster CPUs / replicas)")
    g.add_argument("--threads-per-replica", type=int, default=None,
                   help="torch threads in each replica (default: its CPUs rounded down, at least 1)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="Ray's cap of requests in one replica (default: --max-num-seqs + --max-queued-requests)")
    g.add_argument("--cpuset", dest="cpusets", action="append", default=None, metavar="CPUS",
                   help="cores of one replica (0, 2-3, ...); once per replica, so that each gets its own "
                        "(local Ray; threads default to its core count)")
    g.add_argument("--address", default=None,
                   help="a running Ray cluster (ray://host:10001, host:6379 or 'auto'); default: start Ray here")
    g.add_argument("--app-name", default=DEFAULT_APP_NAME, help="Ray Serve application name (default %(default)s)")


def spec_from_args(args: argparse.Namespace) -> FleetSpec:
    engine, settings = engine_config_from_args(args), settings_from_args(args)
    placement = dict(num_cpus_per_replica=args.num_cpus_per_replica, threads_per_replica=args.threads_per_replica,
                     max_ongoing_requests=args.max_ongoing_requests, host=args.host, port=args.port,
                     app_name=args.app_name, cpusets=tuple(args.cpusets) if args.cpusets else None)
    if args.autoscale == "plan" and not args.plan:
        raise ValueError("--autoscale plan needs --plan plan.json")
    autoscale = Autoscale.parse(args.autoscale) if args.autoscale not in (None, "plan") else None
    if args.plan:
        return fleet_spec_for_plan(Plan.load(args.plan), engine, settings, replicas=args.replicas,
                                   autoscale=autoscale, autoscale_to_plan=args.autoscale == "plan", **placement)
    return FleetSpec(engine, settings, replicas=1 if args.replicas is None else args.replicas, autoscale=autoscale,
                     **placement)


def run_up(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.detach and not args.address:
        return _up_detached(spec, args.num_cpus, args.startup_timeout)
    if args.detach:  # a cluster that outlives us: deploy, record, disconnect
        connect(args.address)
        try:
            deployment = deploy(spec, args.startup_timeout)
        finally:
            disconnect()
        write_state({"address": args.address, "url": deployment.url, "app_name": spec.app_name,
                     "info": deployment.to_dict()})
        print(f"pernode fleet: {describe_fleet(spec, deployment)}\npernode fleet: OpenAI API at {deployment.url}/v1; "
              f"detached, stop it with `pernode fleet down`", flush=True)
        return 0
    return serve_until_signal(spec, args.address, args.num_cpus, args.startup_timeout)


def write_owner_spec(spec: FleetSpec, num_cpus: int | None, startup_timeout_s: float) -> dict[str, str]:
    """Write the owner's spec file (0600, in the private state folder) without the API key, and return the
    environment to start the owner with: the key goes there (PERNODE_API_KEY), never to disk."""
    d = spec.to_dict()
    d["settings"]["api_key"] = None
    write_private(spec_file(), json.dumps({"spec": d, "num_cpus": num_cpus, "startup_timeout_s": startup_timeout_s}))
    env = dict(os.environ)
    env.pop("PERNODE_API_KEY", None)
    if spec.settings.api_key:
        env["PERNODE_API_KEY"] = spec.settings.api_key
    return env


def _up_detached(spec: FleetSpec, num_cpus: int | None, startup_timeout_s: float) -> int:
    """Run `python -m pernode.serve.deploy.owner SPEC` in a session of its own: it owns the local Ray and ends it
    on SIGTERM (`fleet down`). Never `ray stop`, which ends every Ray on the machine, other users' too."""
    old = read_state()
    if old.get("owner") and ProcessRecord.from_dict(old["owner"]).mismatch() is None:
        raise ValueError(f"a detached fleet already runs (pid {old['owner']['pid']}, {old.get('url')}); "
                         f"`pernode fleet down` first")
    state_file().unlink(missing_ok=True)
    env = write_owner_spec(spec, num_cpus, startup_timeout_s)
    log_path = log_file()
    with open_private_log(log_path) as out:
        child = subprocess.Popen([sys.executable, "-m", OWNER_MODULE, str(spec_file())], stdout=out, env=env,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + startup_timeout_s + 60
    while time.monotonic() < deadline:
        state = read_state()
        if state:
            deployment = Deployment.from_dict(state["info"])
            print(f"pernode fleet: {describe_fleet(spec, deployment)}\npernode fleet: OpenAI API at "
                  f"{state['url']}/v1; detached (pid {child.pid}, log {log_path}); stop it with "
                  f"`pernode fleet down`", flush=True)
            return 0
        if child.poll() is not None:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"the detached fleet exited ({child.returncode}) before it was ready; its log "
                               f"{log_path} ends:\n{tail}")
        time.sleep(0.5)
    child.terminate()
    raise RuntimeError(f"the detached fleet was not ready in {startup_timeout_s:.0f} s; see {log_path}")


def run_down(args: argparse.Namespace, timeout_s: float = 60.0) -> int:
    state = read_state()  # refuses a state file another user owns or may write
    if state.get("pid") and not state.get("owner") and not args.address:
        print(f"pernode fleet down: {state_file()} names pid {state['pid']} without its start time (an older "
              f"pernode wrote it); not signalling a process it cannot verify: stop it yourself, then remove the file",
              file=sys.stderr)
        return 1
    if state.get("owner") and not args.address:  # the local fleet `up --detach` started: its owner shuts it down
        return _stop_owned_fleet(state, timeout_s)
    address = args.address or state.get("address")
    if not address:
        print(f"pernode fleet down: no detached fleet recorded in {state_file()}; pass --address", file=sys.stderr)
        return 1
    connect(address)
    if args.app_name:  # one application; Serve and the cluster stay up
        delete_application(args.app_name)
        disconnect()
        print(f"pernode fleet down: deleted the Serve application {args.app_name} on {address}")
    else:
        shutdown()
        print(f"pernode fleet down: Serve stopped on {address} (the Ray cluster keeps running)")
    if state.get("address") == address:
        clear_state()
    return 0


def _stop_owned_fleet(state: dict, timeout_s: float) -> int:
    """SIGTERM the owner, wait, then SIGKILL what is left of what it started; each signal only to a process that
    still has its recorded start time and belongs to this user (a reused pid is someone else's process)."""
    owner = ProcessRecord.from_dict(state["owner"])
    rays = [ProcessRecord.from_dict(d) for d in state.get("ray_processes", [])]
    refused = signal_recorded(owner, signal.SIGTERM)
    if refused and "has ended" not in refused:
        print(f"pernode fleet down: not signalling the recorded owner: {refused}", file=sys.stderr)
    left = wait_records_ended([owner, *rays], timeout_s)
    killed = [r for r in left if signal_recorded(r, signal.SIGKILL) is None]  # the owner did not finish in time
    clear_state()
    print(f"pernode fleet down: stopped the fleet at {state.get('url')} and its local Ray"
          + (f" (killed {len(killed)} processes that did not stop in {timeout_s:.0f} s)" if killed else ""))
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
    p.add_argument("--input-len", default=None, help="N or LO:HI; default: the plan's workload")
    p.add_argument("--output-len", default=None, help="N or LO:HI; default: the plan's workload")
    p.add_argument("--burstiness", type=float, default=None, help="default: the plan's")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per step in the same-trace simulation (default: the engine's "
                        "--max-num-batched-tokens, 512 on CPU)")
    p.add_argument("--out", default=None, help="write predicted, measured and errors as JSON here")
    p.add_argument("--bench-out", default=None, help="also write the full bench serve result here")
    p.add_argument("--interval-seeds", type=int, default=5,
                   help="simulated runs of the measured size behind each predicted range (default 5)")
    p.add_argument("--anchor-s", type=float, default=ANCHOR_SECONDS,
                   help=f"seconds of the workload's arrivals sent just before the run, unscored, to time the node's "
                        f"speed against the profile: the anchored prediction (default {ANCHOR_SECONDS:g}, and at "
                        f"least {MIN_ANCHOR_REQUESTS} requests; 0: none)")
    g = p.add_argument_group("fleet (when not --base-url)")
    g.add_argument("--port", type=int, default=None, help="Serve's HTTP port (default: a free one)")
    g.add_argument("--num-cpus-per-replica", type=float, default=None)
    g.add_argument("--threads-per-replica", type=int, default=None)
    g.add_argument("--max-ongoing-requests", type=int, default=None)
    g.add_argument("--cpuset", dest="cpusets", action="append", default=None, metavar="CPUS",
                   help="cores of one replica, once per replica (e.g. --cpuset 0 --cpuset 1)")
    g.add_argument("--client-cpuset", default=None, metavar="CPUS",
                   help="cores for this command (the load generator) and the Ray processes that are not replicas")
    add_engine_arguments(p)


def validate_config_from_args(args: argparse.Namespace) -> ValidateConfig:
    placement = FleetPlacement(port=args.port, num_cpus_per_replica=args.num_cpus_per_replica,
                               threads_per_replica=args.threads_per_replica,
                               max_ongoing_requests=args.max_ongoing_requests,
                               cpusets=tuple(args.cpusets) if args.cpusets else None,
                               client_cpuset=args.client_cpuset)
    return ValidateConfig(plan_path=args.plan, profile_path=args.profile, base_url=args.base_url,
                          num_prompts=args.num_prompts, seed=args.seed, input_len=args.input_len,
                          output_len=args.output_len, burstiness=args.burstiness, token_budget=args.token_budget,
                          out=args.out, bench_out=args.bench_out, placement=placement,
                          interval_seeds=args.interval_seeds, anchor_s=args.anchor_s)


def run_validate_command(args: argparse.Namespace) -> int:
    return run_validate(validate_config_from_args(args), engine_config_from_args(args))
