"""`pernode fleet`: N replicas of pernode's engine as one Ray Serve deployment behind the OpenAI route.

`spec` says what to deploy, `replica` is the deployment each replica runs, `lifecycle` brings a fleet up and down
on Ray, `processes` finds what a local Ray started, `state` records a detached fleet, and `owner` is the process
that owns a fleet until a signal (`python -m pernode.serve.deploy.owner`; not imported here, so that `-m` runs it
cleanly). Ray itself is imported only where a fleet is deployed: it takes seconds to import.
"""
from pernode.serve.deploy.lifecycle import (Deployment, LocalFleet, connect, delete_application, deploy,
                                            describe_fleet, disconnect, free_port, replica_states, shutdown,
                                            wait_ready)
from pernode.serve.deploy.processes import child_processes, still_running, wait_ended
from pernode.serve.deploy.replica import (DEPLOYMENT_NAME, REPLICA_HEADER, ROUTER_POLICY, ReplicaResources,
                                          build_application)
from pernode.serve.deploy.spec import DEFAULT_APP_NAME, Autoscale, FleetSpec
from pernode.serve.deploy.state import LOG_FILE, SPEC_FILE, STATE_FILE, clear_state, read_state, write_state

__all__ = ["Autoscale", "DEFAULT_APP_NAME", "DEPLOYMENT_NAME", "Deployment", "FleetSpec", "LOG_FILE", "LocalFleet",
           "REPLICA_HEADER", "ROUTER_POLICY", "ReplicaResources", "SPEC_FILE", "STATE_FILE", "build_application",
           "child_processes", "clear_state", "connect", "delete_application", "deploy", "describe_fleet",
           "disconnect", "free_port", "read_state", "replica_states", "shutdown", "still_running", "wait_ended",
           "wait_ready", "write_state"]
