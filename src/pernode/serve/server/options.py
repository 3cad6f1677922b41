"""The server's own settings (light: no FastAPI or torch imports here)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pernode.records import check_range, known_fields
from pernode.serve.sampling.params import MAX_LOGPROBS


@dataclass
class ServerSettings:
    """What `pernode serve` adds to the engine's own configuration."""

    served_model_name: str | None = None  # default: the model's name
    api_key: str | None = None  # /v1 routes need `Authorization: Bearer KEY` when set
    max_n: int = 8
    max_logprobs: int = 20
    max_stop: int = 8
    max_body_bytes: int = 1 << 20
    max_queued_requests: int = 256
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServerSettings:
        return cls(**known_fields(cls, d, "server settings"))

    def validate(self) -> None:
        """ValueError naming the first setting out of range (`max_n=0 is out of range: allowed >= 1`)."""
        check_range("max_n", self.max_n, 1)
        check_range("max_logprobs", self.max_logprobs, 0, MAX_LOGPROBS)
        check_range("max_stop", self.max_stop, 0)
        check_range("max_body_bytes", self.max_body_bytes, 1)
        check_range("max_queued_requests", self.max_queued_requests, 1)
        check_range("shutdown_timeout_s", self.shutdown_timeout_s, 0, integer=False)
