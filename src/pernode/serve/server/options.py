"""The server's own settings (light: no FastAPI or torch imports here)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pernode.records import check_range, known_fields
from pernode.serve.sampling.params import MAX_LOGPROBS


@dataclass
class ServerSettings:
    """What `pernode serve` adds to the engine's own configuration."""

    served_model_name: str | None = None  # default: the model's name
    api_key: str | None = None  # every route but /health and /metrics needs `Authorization: Bearer KEY` when set
    max_n: int = 8
    max_logprobs: int = 20
    max_stop: int = 8  # stop strings per request
    max_stop_len: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_seqs_per_request: int = 256  # prompts x n of one request (vLLM's default max_num_seqs)
    max_body_bytes: int = 1 << 20
    max_queued_requests: int = 256  # engine sequences (prompts x n) waiting, beyond which new requests get 429
    max_concurrent_requests: int = 512  # HTTP requests in flight (body, tokenizing, queued, running, streaming)
    body_read_timeout_s: float = 30.0  # a late body gets 408; a late request head, its connection closed
    allowed_origins: tuple[str, ...] = ()  # cross-site browser Origins allowed (CORS); "*" for any
    allowed_hosts: tuple[str, ...] = ()  # Host headers allowed on loopback besides localhost/127.0.0.1/[::1]; "*"
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.allowed_origins = tuple(self.allowed_origins or ())
        self.allowed_hosts = tuple(self.allowed_hosts or ())
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
        check_range("max_stop_len", self.max_stop_len, 1)
        check_range("max_stop_token_ids", self.max_stop_token_ids, 0)
        check_range("max_seqs_per_request", self.max_seqs_per_request, 1)
        check_range("max_body_bytes", self.max_body_bytes, 1)
        check_range("max_queued_requests", self.max_queued_requests, 1)
        check_range("max_concurrent_requests", self.max_concurrent_requests, 1)
        if not (isinstance(self.body_read_timeout_s, (int, float)) and not isinstance(self.body_read_timeout_s, bool)
                and self.body_read_timeout_s > 0):
            raise ValueError(f"body_read_timeout_s={self.body_read_timeout_s!r} is out of range: allowed > 0")
        check_range("shutdown_timeout_s", self.shutdown_timeout_s, 0, integer=False)
        for name in ("allowed_origins", "allowed_hosts"):
            values = getattr(self, name)
            bad = [v for v in values if not isinstance(v, str) or not v.strip()]
            if bad:
                raise ValueError(f"{name}={list(values)!r} is invalid: allowed non-empty strings")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key='' is invalid: give a non-empty key, or none for an open server")


def read_api_key_file(path: str | Path) -> str:
    """The key in `path`, read once and stripped; ValueError naming api_key_file if unreadable or empty."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ValueError(f"api_key_file={str(path)!r} cannot be read ({why}): give a readable file holding the "
                         f"key") from None
    if not key:
        raise ValueError(f"api_key_file={str(path)!r} is empty: the file must hold the key")
    return key
