"""`pernode fleet`: N replicas of pernode's engine as one Ray Serve deployment behind the OpenAI route.

`spec` says what to deploy, `replica` is the deployment each replica runs, `lifecycle` brings a fleet up and down
on Ray, `processes` finds what a local Ray started, `state` records a detached fleet, and `owner` is the process
that owns a fleet until a signal (`python -m pernode.serve.deploy.owner`; not imported here, so that `-m` runs it
cleanly). Ray itself is imported only where a fleet is deployed: it takes seconds to import.
"""
from pernode.serve.deploy.lifecycle import (Deployment, LocalFleet, connect, delete_application, deploy,
                                            describe_fleet, disconnect, free_port, local_ray_options, probe_models,
                                            replica_states, shutdown, wait_ready, warn_if_exposed)
from pernode.serve.deploy.processes import (ProcessRecord, child_processes, records_running, signal_recorded,
                                            still_running, wait_ended, wait_records_ended)
from pernode.serve.deploy.replica import (DEPLOYMENT_NAME, REPLICA_HEADER, ROUTER_POLICY, ReplicaResources,
                                          build_application)
from pernode.serve.deploy.spec import DEFAULT_APP_NAME, Autoscale, FleetSpec
from pernode.serve.deploy.state import (clear_state, log_file, open_private_log, read_private, read_state, spec_file,
                                        state_file, write_private, write_state)

__all__ = ["Autoscale", "DEFAULT_APP_NAME", "DEPLOYMENT_NAME", "Deployment", "FleetSpec", "LocalFleet",
           "ProcessRecord", "REPLICA_HEADER", "ROUTER_POLICY", "ReplicaResources", "build_application",
           "child_processes", "clear_state", "connect", "delete_application", "deploy", "describe_fleet",
           "disconnect", "free_port", "local_ray_options", "log_file", "open_private_log", "probe_models",
           "read_private", "read_state", "records_running", "replica_states", "shutdown", "signal_recorded",
           "spec_file", "state_file", "still_running", "wait_ended", "wait_ready", "wait_records_ended",
           "warn_if_exposed", "write_private", "write_state"]
