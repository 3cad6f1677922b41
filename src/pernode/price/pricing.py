"""On-demand prices per node-hour for a few common instances, each with its source and date.

A "node" is what one replica runs on: one accelerator (an 8-GPU instance's price is divided by 8) or one small CPU
instance. Cloud prices change often and differ by region; every figure here is a dated starting point, and a figure
the user passes (price_per_node_hour) always wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class InstancePrice:
    name: str
    per_node_hour_usd: float
    node: str  # what one node is: "1 x H100 80GB (1/8 of the instance)"
    instance_hour_usd: float
    nodes_per_instance: int
    source: str
    as_of: str
    note: str = ""


def _per_gpu(name: str, instance_hour_usd: float, gpus: int, node: str, source: str, as_of: str,
             note: str = "") -> InstancePrice:
    return InstancePrice(name, instance_hour_usd / gpus, node, instance_hour_usd, gpus, source, as_of, note)


PRICES: dict[str, InstancePrice] = {p.name: p for p in [
    _per_gpu("aws-p5.48xlarge", 98.32, 8, "1 x NVIDIA H100 80GB (1/8 of the instance)",
             "AWS EC2 On-Demand, Linux, us-east-1, https://aws.amazon.com/ec2/pricing/on-demand/ "
             "(launch list price, reported by nextplatform.com 2023-07-27)", "2023-07",
             "AWS announced cuts of up to 45% to P5 on-demand prices in June 2025; check the live price"),
    _per_gpu("aws-p5.48xlarge-capacity-block", 39.33, 8, "1 x NVIDIA H100 80GB (1/8 of the instance)",
             "AWS EC2 Capacity Blocks for ML, us-east-1, https://aws.amazon.com/ec2/capacityblocks/pricing/",
             "2024-12", "reserved block rate (rates listed until 2025-01-01), not on-demand"),
    _per_gpu("aws-h200-capacity-block", 43.26, 8, "1 x NVIDIA H200 141GB (1/8 of the instance)",
             "AWS EC2 Capacity Blocks for ML, 8 x H200 instance, us-east-2, "
             "https://aws.amazon.com/ec2/capacityblocks/pricing/", "2024-12",
             "reserved block rate (rates listed until 2025-01-01), not on-demand"),
    InstancePrice("aws-c7i.large", 0.08925, "2 vCPU, 4 GiB (the whole instance)", 0.08925, 1,
                  "AWS EC2 On-Demand, Linux, us-east-1, https://aws.amazon.com/ec2/pricing/on-demand/", "2024-06",
                  "recalled list price, not re-checked against the live sheet"),
    InstancePrice("gcp-g2-standard-4", 0.70683, "1 x NVIDIA L4 24GB, 4 vCPU (the whole instance)", 0.70683, 1,
                  "Google Compute Engine GPU VM pricing, us-central1, "
                  "https://cloud.google.com/compute/vm-instance-pricing", "2024-06",
                  "recalled list price, not re-checked against the live sheet"),
    _per_gpu("azure-nd96isr-mi300x-v5", 48.00, 8, "1 x AMD MI300X 192GB (1/8 of the VM)",
             "Azure Linux VM pay-as-you-go, East US, "
             "https://azure.microsoft.com/pricing/details/virtual-machines/linux/", "2024-09",
             "approximate; Azure lists this VM by quote in some regions, check the live price"),
]}


@dataclass(frozen=True)
class Price:
    """The price a plan uses, and where it came from."""

    per_node_hour_usd: float
    source: str
    instance: str | None = None

    def to_dict(self) -> dict:
        return {"per_node_hour_usd": self.per_node_hour_usd, "source": self.source, "instance": self.instance}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Price":
        try:
            return cls(float(d["per_node_hour_usd"]), str(d["source"]), d.get("instance"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"price={d!r}: expected per_node_hour_usd and source ({e})") from None


def resolve_price(price_per_node_hour: float | None = None, instance: str | None = None) -> Price:
    """The user's figure if given, else the table's entry for `instance`."""
    if price_per_node_hour is not None:
        if (isinstance(price_per_node_hour, bool) or not isinstance(price_per_node_hour, (int, float))
                or not math.isfinite(price_per_node_hour) or price_per_node_hour <= 0):
            raise ValueError(f"price_per_node_hour={price_per_node_hour!r}: must be a finite price in USD > 0")
        src = "user-supplied"
        if instance is not None:
            src += f" (overrides the table's figure for {instance})"
        return Price(float(price_per_node_hour), src, instance)
    if instance is None:
        raise ValueError(f"price_per_node_hour=None, instance=None: no price; give a USD figure per node-hour, or an "
                         f"instance from the table: one of {', '.join(sorted(PRICES))}")
    if instance not in PRICES:
        raise ValueError(f"instance={instance!r}: not in the price table; known: {', '.join(PRICES)}; "
                         f"or give price_per_node_hour")
    p = PRICES[instance]
    src = f"{p.name}: {p.node}, ${p.instance_hour_usd:g}/h / {p.nodes_per_instance}; {p.source}; as of {p.as_of}"
    if p.note:
        src += f"; {p.note}"
    return Price(p.per_node_hour_usd, src, instance)
