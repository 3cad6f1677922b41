"""What a fleet deploys: the engine and server of every replica, how many replicas, and each one's share of CPUs."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from pernode.config import EngineConfig
from pernode.serve.deploy.cpuset import check_cpusets
from pernode.serve.server.options import ServerSettings

log = logging.getLogger("pernode.fleet")

DEFAULT_APP_NAME = "pernode"


@dataclass(frozen=True)
class Autoscale:
    """Ray Serve's autoscaling_config: replicas between min and max, aiming at target ongoing requests each."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float

    def __post_init__(self) -> None:
        # "max_replicas N", not "max_replicas=N": the CLI would name `pernode plan --max-replicas` for the latter
        if self.max_replicas < 1:
            raise ValueError(f"autoscale max_replicas {self.max_replicas}: allowed >= 1")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas}: allowed 0 <= min_replicas <= max_replicas "
                             f"({self.max_replicas})")
        if not (math.isfinite(self.target_ongoing_requests) and self.target_ongoing_requests > 0):
            raise ValueError(f"target_ongoing_requests={self.target_ongoing_requests!r}: allowed > 0 requests "
                             f"per replica")

    @classmethod
    def parse(cls, text: str) -> Autoscale:
        """'MIN,MAX,TARGET', e.g. '1,4,8'."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            if len(parts) != 3:
                raise ValueError
            lo, hi, target = int(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"autoscale={text!r}: expected MIN,MAX,TARGET_ONGOING_REQUESTS, e.g. 1,4,8") from None
        return cls(lo, hi, target)

    @classmethod
    def for_load(cls, replicas: int, rate_rps: float, e2e_p50_s: float | None, max_batch: int) -> Autoscale:
        """Keep `replicas` as the floor, allow twice as many, and aim at the requests one replica holds at
        `rate_rps` (Little's law: rate x mean time in system / replicas, the median E2E standing in for the mean),
        at most `max_batch`. Above that rate the ongoing count rises past the target and Ray adds replicas."""
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: allowed >= 1")
        per_replica = rate_rps * e2e_p50_s / replicas if e2e_p50_s else None
        target = max(1.0, round(per_replica, 1)) if per_replica else float(max_batch)
        return cls(replicas, 2 * replicas, min(target, float(max_batch)))

    def to_config(self) -> dict:
        """Ray Serve's autoscaling_config."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests}

    @classmethod
    def from_config(cls, d: dict) -> Autoscale:
        return cls(int(d["min_replicas"]), int(d["max_replicas"]), float(d["target_ongoing_requests"]))


@dataclass(frozen=True)
class FleetSpec:
    """What to deploy: the engine of every replica, the server in front of it, and how many and how big."""

    engine: EngineConfig
    settings: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    replicas: int = 1
    autoscale: Autoscale | None = None
    num_cpus_per_replica: float | None = None  # default: the cluster's CPUs / the most replicas
    threads_per_replica: int | None = None  # default: num_cpus_per_replica rounded down, at least 1
    max_ongoing_requests: int | None = None  # default: max_num_seqs + max_queued_requests
    # One Linux CPU list per replica ("0", "2-3"): each replica pins itself to its own (cpuset.py); then its
    # num_cpus and torch threads default to its core count. A local Ray only: replicas claim them on one node.
    cpusets: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = DEFAULT_APP_NAME

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: allowed >= 1")
        if self.num_cpus_per_replica is not None and not self.num_cpus_per_replica > 0:
            raise ValueError(f"num_cpus_per_replica={self.num_cpus_per_replica}: allowed > 0 (fractions such as "
                             f"0.5 are fine)")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica={self.threads_per_replica}: allowed >= 1")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests}: allowed >= 1")
        if self.cpusets is not None:
            object.__setattr__(self, "cpusets", tuple(str(c) for c in self.cpusets))
            if self.autoscale is not None:
                raise ValueError("cpusets: pinning needs a fixed number of replicas; drop --autoscale or --cpuset")
            check_cpusets(self.cpusets, self.replicas)

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale else self.replicas

    @property
    def replica_max_ongoing_requests(self) -> int:
        """Ray's cap on one replica: by default the engine's batch plus its waiting room, so that Ray's router
        holds nothing back in a queue of its own (the planner's replicas queue in their engines)."""
        return self.max_ongoing_requests or self.engine.max_num_seqs + self.settings.max_queued_requests

    def resources(self, cluster_cpus: float, node_cpus: float | None = None) -> tuple[float, int]:
        """(num_cpus, torch threads) per replica: the cluster's CPUs shared out so replicas never oversubscribe,
        and no replica asks for more than the largest node has."""
        cpus = self.num_cpus_per_replica
        cores = min(len(c) for c in check_cpusets(self.cpusets, self.replicas)) if self.cpusets else None
        if cpus is None and cores is not None:
            cpus = float(cores)
        if cpus is None:
            share = cluster_cpus / self.max_replicas
            cpus = max(0.01, math.floor(min(share, node_cpus or share) * 100) / 100)
        if cpus * self.max_replicas > cluster_cpus + 1e-9:
            log.warning("%d replicas x %g CPUs ask for more than the cluster's %g CPUs: Ray will leave some "
                        "pending", self.max_replicas, cpus, cluster_cpus)
        threads = self.threads_per_replica or cores or max(1, int(cpus))
        return cpus, threads

    def describe(self) -> str:
        size = (f"autoscaling {self.autoscale.min_replicas}..{self.autoscale.max_replicas} replicas at "
                f"{self.autoscale.target_ongoing_requests:g} ongoing requests each" if self.autoscale
                else f"{self.replicas} replicas")
        return f"{size} of {self.engine.model} (max_num_seqs {self.engine.max_num_seqs})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FleetSpec:
        d = dict(d)
        d["engine"] = EngineConfig(**d["engine"])
        d["settings"] = ServerSettings(**d["settings"])
        d["autoscale"] = Autoscale(**d["autoscale"]) if d.get("autoscale") else None
        return cls(**d)
