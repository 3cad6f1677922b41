"""uvicorn's h11 protocol with a deadline for the request head (request line and headers).

uvicorn arms no timer while a connection's first request head is still arriving, so a client that trickles its
headers (slowloris) holds a socket forever, and many such clients exhaust the file descriptors before any of
them reaches the app's limits. The head must arrive within `head_timeout_s` of the connection opening, or of the
previous response on a kept-alive connection; otherwise the connection is closed. The body has its own deadline
(the guard's `body_read_timeout_s`).
"""
from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineH11Protocol(H11Protocol):
    head_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:  # the head is in
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next head gets the same deadline
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_head_deadline(head_timeout_s: float) -> type[HeadDeadlineH11Protocol]:
    """The protocol class to give `uvicorn.Config(http=...)`, with this deadline."""
    return _protocol_class(float(head_timeout_s))


@functools.lru_cache(maxsize=None)
def _protocol_class(head_timeout_s: float) -> type[HeadDeadlineH11Protocol]:
    return type("HeadDeadlineH11Protocol", (HeadDeadlineH11Protocol,), {"head_timeout_s": head_timeout_s})
