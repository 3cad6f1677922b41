"""Where an EAGLE head's draft step goes at batch 1: the proposer's whole step (`_head_logits`: the head's layer
and the token logits) and its parts, timed alone on the served model (GGUF weights native, bf16), 1 thread.

    nice -n 10 python benchmarks/eagle_step.py --heads full=/work/artifacts/b12/eagle_head3,fr8k=/work/artifacts/b12/eagle_head3_fr8k
"""
from __future__ import annotations

import argparse
import time

import torch

from pernode.config import DEFAULT_MODEL
from pernode.serve.engine.spec_decode.eagle_proposer import EagleProposer
from pernode.serve.models.fp32_logits import sampled_logits
from pernode.serve.models.loader import build_model
from pernode.serve.models.registry import resolve_model


def ms(fn, calls: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - started) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--heads", required=True, help="NAME=PATH,... EAGLE head folders")
    p.add_argument("--context", type=int, default=100, help="tokens already in the head's K/V")
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    with open("/proc/loadavg") as f:
        print("load average:", " ".join(f.read().split()[:3]))
    model = build_model(resolve_model(args.model), "cpu", torch.bfloat16, 1024, "native")
    bf16 = dict(dtype=torch.bfloat16)
    feature, hidden = torch.randn(1, 576, **bf16), torch.randn(1, 576, **bf16)
    with torch.inference_mode():
        print(f"served lm_head (fp32 logits) {ms(lambda: sampled_logits(model.norm, model.lm_head, hidden), args.calls):.2f} ms")
        for item in args.heads.split(","):
            name, path = item.split("=", 1)
            proposer = EagleProposer(path, model, torch.device("cpu"), torch.bfloat16)
            h = proposer.head
            past = (torch.randn(1, h.num_kv_heads, args.context, h.head_dim, **bf16),
                    torch.randn(1, h.num_kv_heads, args.context, h.head_dim, **bf16))
            emb = model.embed_tokens(torch.tensor([[5]]))
            step = ms(lambda: proposer._head_logits(feature, [5], [args.context], past), args.calls)
            layer = ms(lambda: h.layer_output(feature[None], emb, torch.tensor([args.context]), model.rotary.cos,
                                              model.rotary.sin, past), args.calls)
            print(f"{name}: whole step {step:.2f} ms, head layer {layer:.2f} ms"
                  + (f", reduced head {ms(lambda: proposer.reduced_head(hidden), args.calls):.2f} ms"
                     if proposer.reduced_head is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
