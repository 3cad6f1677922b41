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


@torch.no_grad()
def run_sequential(model, windows: torch.Tensor, process_layer: Callable, description: str = "quantizing",
                   quiet: bool = False) -> None:
    """For each decoder layer: process_layer(index, layer, inputs, forward) may rewrite the layer; then the layer's
    (rewritten) outputs become the next layer's inputs. Inputs are [S*L, hidden] for windows [S, L]."""
    num_seqs, seq_len = windows.shape
    fwd = Forward.build(model, num_seqs, seq_len)
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
