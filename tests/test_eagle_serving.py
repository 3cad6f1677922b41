"""The EAGLE head's serving form (serve/engine/spec_decode/eagle_serving.py): int8 projections within rounding of
the float head, a token subset of a quantized lm_head equal to those columns of the whole layer's logits, and the
draft tokens over that subset in training (DraftTokens) and in the acceptance count."""
import torch

from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.engine.spec_decode.eagle_serving import install_int8_projections, int8_linear, lm_head_rows
from pernode.serve.models.loader import load_model
from pernode.shrink.distill.eagle_training import DraftTokens, teacher_forced_acceptance
from pernode.shrink.training_forward import hidden_states
from test_spec_decode import target  # noqa: F401  (the module fixture: a tiny random model)


def test_int8_projections_stay_within_rounding_of_the_float_head(target):  # noqa: F811
    model, _ = load_model(target)
    head = EagleHead.from_target(model, -1, seed=0)
    with torch.no_grad():
        head.fc.weight.add_(0.05 * torch.randn(head.fc.weight.shape, generator=torch.Generator().manual_seed(1)))
        head.fc.bias.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
        ids = torch.randint(1000, 49152, (1, 10), generator=torch.Generator().manual_seed(3))
        feats, emb = hidden_states(model, ids)[:, :-1], model.embed_tokens(ids[:, 1:])
        args = (torch.arange(9), model.rotary.cos, model.rotary.sin, model.norm.weight)
        reference, _ = head(feats, emb, *args)
        install_int8_projections(head)
        served, _ = head(feats, emb, *args)
    assert set(head.serving) == {"fc", "qkv", "o", "gate_up", "down"}
    error = (served - reference).norm() / reference.norm()
    assert 0 < error < 0.02  # int8 in 32-value groups: rounded, not equal, and close


def test_subset_of_a_quantized_lm_head_is_those_columns():
    g = torch.Generator().manual_seed(4)
    full = int8_linear(torch.randn(300, 64, generator=g))
    ids = torch.tensor([0, 7, 8, 150, 299])
    rows = lm_head_rows(full, ids)
    x = torch.randn(1, 64, generator=g)
    torch.testing.assert_close(rows(x), full(x)[:, ids], atol=1e-6, rtol=1e-6)
    assert rows.qweight.dtype == torch.int8 and rows.out_features == 5


def test_draft_tokens_and_subset_acceptance(target):  # noqa: F811
    model, _ = load_model(target)
    tokens = DraftTokens.of(model.lm_head.weight, [5, 3, 9])
    assert tokens.rows.shape == (3, model.lm_head.weight.shape[1])
    assert tokens.column[3].item() == 1 and tokens.column[4].item() == -100
    head = EagleHead.from_target(model, -1, seed=0)
    seqs = torch.randint(1000, 49152, (2, 20), generator=torch.Generator().manual_seed(5)).tolist()
    whole = teacher_forced_acceptance(head, model, seqs, [2, 2], k=2)
    # a subset holding none of the sequences' tokens can never draft one of them
    none = teacher_forced_acceptance(head, model, seqs, [2, 2], k=2, draft_ids=[1, 2])
    assert none["top1_agreement"] == 0 and none["positions"] == whole["positions"]
    every = teacher_forced_acceptance(head, model, seqs, [2, 2], k=2, draft_ids=list(range(49152)))
    assert every == whole
