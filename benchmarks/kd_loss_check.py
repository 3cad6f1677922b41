"""How faithful is the KD loss on a top-k teacher cache? On a few training windows, the teacher's full logits
beside its top-k: the teacher mass inside the top-k at each temperature, and for an untrained student the forward
and reverse KL computed exactly, with the top-k renormalised, and with the top-k plus a rest-of-vocabulary bucket,
with each approximate gradient's cosine to the exact one.

    PYTHONPATH=src .venv/bin/python benchmarks/kd_loss_check.py --windows 4 --seq-len 128 --top-k 64
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.data import distillation_text, pack_windows
from pernode.shrink.distill.losses import Divergence, TeacherTopK, soft_target_kl
from pernode.shrink.distill.student import StudentSpec, build_student
from pernode.shrink.training_forward import logits as forward_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--keep-layers", type=int, default=8)
    args = p.parse_args()
    teacher, source = load_model(args.teacher)
    text = distillation_text(args.windows * args.seq_len * 4, heldout_chars=0)
    docs = [source.tokenizer.encode(t, add_special_tokens=False) for t in text.train]
    windows = pack_windows(docs, args.seq_len, source.tokenizer.eos_token_id)[:args.windows]
    with torch.no_grad():
        full = forward_logits(teacher, windows).float()
        student, layers = build_student(teacher, StudentSpec(keep_layers=args.keep_layers))
        s = forward_logits(student, windows).float()
    labels = windows[:, 1:].reshape(-1)
    print(f"teacher CE {F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels):.3f}, "
          f"student (layers {layers}) CE {F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), labels):.3f}")
    s.requires_grad_(True)
    for t in (1.0, 2.0):
        mass = F.softmax(full / t, -1).topk(args.top_k, -1).values.sum(-1)
        print(f"T={t}: teacher mass in its top-{args.top_k}: mean {mass.mean():.3f}, min {mass.min():.3f}")
        for div in Divergence:
            exact_t = TeacherTopK.from_logits(full, full.shape[-1], t)
            rest_t = TeacherTopK.from_logits(full, args.top_k, t)
            renorm_t = TeacherTopK(rest_t.values, rest_t.indices)
            row = []
            g_exact = None
            for name, top in (("exact", exact_t), ("renormalised", renorm_t), ("rest bucket", rest_t)):
                loss = soft_target_kl(s, top, t, div)
                grad = torch.autograd.grad(loss, s)[0].flatten()
                g_exact = grad if g_exact is None else g_exact
                row.append(f"{name} {loss.item():.3f} (cos {F.cosine_similarity(grad, g_exact, 0).item():.3f})")
            print(f"  {div.value}: " + ", ".join(row))


if __name__ == "__main__":
    main()
