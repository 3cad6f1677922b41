"""Layer-by-layer calibration: feed calibration windows through the decoder one layer at a time, so a method can
quantize layer i using inputs produced by the already-quantized layers 0..i-1."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from pernode.progress import progress
from pernode.shrink.evaluate.perplexity import Forward


def progress_bar(description: str, disable: bool = False):
    return progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False, disable=disable)


class ChunkedForward:
    """A layer's forward over S windows of L tokens, `chunk_windows` windows at a time: the activations held at
    once (attention, the MLP's 2 x intermediate columns) are those of one chunk, not of all ~50k calibration
    tokens, which is ~1.5 GB less at that size and keeps each GEMM's operands nearer the cache. Same results as
    one `Forward` over all windows: the windows are independent sequences."""

    def __init__(self, model, num_seqs: int, seq_len: int, chunk_windows: int):
        if chunk_windows < 1:
            raise ValueError(f"chunk_windows={chunk_windows} is out of range: allowed >= 1")
        self.model, self.seq_len, self.chunk_windows, self.num_seqs = model, seq_len, chunk_windows, num_seqs
        self._forwards: dict[int, Forward] = {}  # windows in a chunk (the last may be short) -> its Forward

    def parts(self, x: torch.Tensor) -> list[tuple[Forward, slice]]:
        """(forward, row slice of x) per chunk."""
        out = []
        for first in range(0, self.num_seqs, self.chunk_windows):
            n = min(self.chunk_windows, self.num_seqs - first)
            if n not in self._forwards:
                self._forwards[n] = Forward.build(self.model, n, self.seq_len)
            out.append((self._forwards[n], slice(first * self.seq_len, (first + n) * self.seq_len)))
        return out

    def layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for fwd, rows in self.parts(x):
            out[rows] = fwd.layer(layer, x[rows])
        return out


def forward_parts(fwd, x: torch.Tensor) -> list[tuple[Forward, torch.Tensor]]:
    """(forward, inputs) per chunk of a ChunkedForward, or the one pair of a plain Forward."""
    if isinstance(fwd, ChunkedForward):
        return [(f, x[rows]) for f, rows in fwd.parts(x)]
    return [(fwd, x)]


@torch.no_grad()
def run_sequential(model, windows: torch.Tensor, process_layer: Callable, description: str = "quantizing",
                   quiet: bool = False, chunk_windows: int | None = None) -> None:
    """For each decoder layer: process_layer(index, layer, inputs, forward) may rewrite the layer; then the layer's
    (rewritten) outputs become the next layer's inputs. Inputs are [S*L, hidden] for windows [S, L]. With
    `chunk_windows`, `forward` is a ChunkedForward: a method's input hooks then run once per chunk."""
    num_seqs, seq_len = windows.shape
    fwd = (Forward.build(model, num_seqs, seq_len) if chunk_windows is None
           else ChunkedForward(model, num_seqs, seq_len, chunk_windows))
    x = model.embed_tokens(windows.flatten())
    with progress_bar(description, disable=quiet) as bar:
        task = bar.add_task(description, total=len(model.layers), info="")
        for i, layer in enumerate(model.layers):
            info = process_layer(i, layer, x, fwd)
            x = fwd.layer(layer, x)
            bar.update(task, advance=1, info=info or "")  # off a terminal the bar prints lines itself


@contextlib.contextmanager
def capture_inputs(modules: dict[str, torch.nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, input [T, in_features]) whenever one of `modules` runs, for the duration of the block."""
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, args[0].reshape(-1, args[0].shape[-1])))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
