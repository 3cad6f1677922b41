"""The engine on its own thread, fed by the server's async handlers.

`LLMEngine` is not thread-safe, so one thread owns it: it takes add/abort commands from a queue, steps while any
request is unfinished, and sleeps on a condition when idle. Outputs reach each HTTP request's asyncio queue via
`loop.call_soon_threadsafe`, one callback per step. Handlers tokenize before submitting (off the event loop), and
detokenization happens inside `step`, so neither blocks the event loop. The thread carries the OS name
`pernode-engine` (`top -H`, /proc/PID/task/TID/comm), which is how `pernode profile --serving-path` tells the
engine's CPU time from the serving threads' in the same process.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from pernode.serve.engine.llm_engine import EngineStats, LLMEngine
from pernode.serve.engine.outputs import RequestOutput
from pernode.serve.engine.step_clock import StepClock
from pernode.serve.sampling.params import SamplingParams

log = logging.getLogger("pernode.serve.server")

ENGINE_THREAD_NAME = "pernode-engine"  # the OS name of the engine's thread (at most 15 bytes)
_PR_SET_NAME = 15  # prctl option (linux/prctl.h): name the calling thread


def _name_this_os_thread(name: str) -> None:
    """Give the calling thread `name` at the OS level (Python's thread names stay inside Python before 3.14)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the name is only a convenience
        pass


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float | None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass
class EngineFailure:
    """In place of an output: the engine refused the request (400) or failed while running it (500)."""

    message: str
    status: int


class QueueFull(Exception):
    pass


class EngineUnavailable(Exception):
    pass


class ResponseStream:
    """The outputs of one HTTP request's engine requests (one per prompt), in the order the engine made them."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self._engine = engine
        self.request_ids = request_ids
        self.queue: asyncio.Queue[tuple[int, RequestOutput | EngineFailure]] = asyncio.Queue()
        self.unfinished = set(range(len(request_ids)))
        self._aborted = False

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def next(self) -> tuple[int, RequestOutput | EngineFailure]:
        """(prompt index, its next output or failure)."""
        index, item = await self.queue.get()
        if isinstance(item, EngineFailure) or item.finished:
            self.unfinished.discard(index)
        return index, item

    def abort(self) -> None:
        """Abort what is still unfinished (client gone, or a sibling failed), freeing its KV blocks; once."""
        if self.unfinished and not self._aborted:
            self._aborted = True
            self._engine.abort([self.request_ids[i] for i in self.unfinished])


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 256, metrics=None):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics  # ServerMetrics or None
        self.stats: EngineStats = engine.stats()
        self.step_clock = StepClock()  # the engine thread's steps: wall and CPU seconds (/metrics)
        self.dead_reason: str | None = None  # set when the engine loop stopped on an exception
        self.accepting = True
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._num_queued_adds = 0  # sequences (prompts x n) submitted but not yet taken into the engine
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[ResponseStream, int]] = {}  # touched on the event loop thread only
        self._idle = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="pernode-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread (requests still running are dropped; drain first to finish them)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    @property
    def num_in_flight(self) -> int:
        """Engine requests submitted whose final output has not yet reached their handler."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: still in the command queue, or waiting in the engine's scheduler."""
        with self._cond:
            return self._num_queued_adds + self.stats.num_waiting

    async def wait_idle(self, timeout_s: float | None) -> bool:
        """Wait until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    # ---- from the handlers (event loop thread) ----------------------------------------------------------
    def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
               arrival_s: float | None = None) -> ResponseStream:
        """Queue one engine request per prompt; raises EngineUnavailable (shutting down, engine dead) or
        QueueFull (the request's sequences, prompts x n, do not fit under max_queued_requests waiting
        sequences). The whole request is admitted or none of it: one check, under the lock, before any add."""
        if self.dead:
            raise EngineUnavailable(f"the engine stopped ({self.dead_reason}); restart the server")
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down and takes no new requests")
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        seqs = len(prompts) * params.n
        with self._cond:
            waiting = self._num_queued_adds + self.stats.num_waiting
            if waiting + seqs > self.max_queued_requests:
                raise QueueFull(f"{waiting} sequences are waiting and this request adds {seqs} more, over the most "
                                f"this server queues (max_queued_requests={self.max_queued_requests}); retry later")
            for rid, prompt in zip(ids, prompts):
                self._commands.append(_Add(rid, prompt, dataclasses.replace(params), arrival_s))
            self._num_queued_adds += seqs
            self._cond.notify()
        stream = ResponseStream(self, ids)
        for i, rid in enumerate(ids):
            self._streams[rid] = (stream, i)
        self._idle.clear()
        return stream

    def abort(self, request_ids: list[str]) -> None:
        if not request_ids or self.dead:
            return
        with self._cond:
            self._commands.extend(_Abort(rid) for rid in request_ids)
            self._cond.notify()

    def abort_all(self) -> None:
        self.abort(list(self._streams))

    # ---- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        _name_this_os_thread(ENGINE_THREAD_NAME)
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished_requests()  # the next step, if any, starts an idle engine
                with self._cond:
                    while not (self._commands or self._stop or engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stop:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                rejected: list[tuple[str, str]] = []
                num_adds = 0
                for command in commands:
                    if isinstance(command, _Add):
                        num_adds += command.params.n
                        try:
                            engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                               arrival_s=command.arrival_s)
                        except ValueError as exc:  # handlers validate first; this is the last line of defence
                            rejected.append((command.request_id, str(exc)))
                    else:
                        engine.abort_request(command.request_id)
                outputs = (self.step_clock.run(engine.step, engine.last_step_shape, from_idle=idle)
                           if engine.has_unfinished_requests() else [])
                now = time.monotonic()
                stats = engine.stats()
                with self._cond:
                    self._num_queued_adds -= num_adds
                    self.stats = stats
                if self.metrics is not None:
                    self.metrics.observe_step(outputs, now)
                if outputs or rejected:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, rejected)
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death, then stop
            log.exception("the engine loop died; failing every request in flight")
            reason = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self.dead_reason = reason
                self._num_queued_adds = 0
            try:
                self._loop.call_soon_threadsafe(self._fail_all, f"the engine failed ({reason}) and stopped")
            except RuntimeError:  # the event loop is already closed: nobody is waiting
                pass

    # ---- back on the event loop -------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], rejected: list[tuple[str, str]]) -> None:
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, index = entry
            item: RequestOutput | EngineFailure = out
            if out.error is not None:
                item = EngineFailure(f"the engine failed while running this request ({out.error})", 500)
            stream.queue.put_nowait((index, item))
            if out.finished or out.error is not None:
                del self._streams[out.request_id]
        for rid, message in rejected:
            entry = self._streams.pop(rid, None)
            if entry is not None:
                entry[0].queue.put_nowait((entry[1], EngineFailure(message, 400)))
        if not self._streams:
            self._idle.set()

    def _fail_all(self, message: str) -> None:
        for stream, index in self._streams.values():
            stream.queue.put_nowait((index, EngineFailure(message, 500)))
        self._streams.clear()
        self._idle.set()
