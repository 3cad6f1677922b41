"""benchmarks/draft_payoff.py: the acceptance a draft would need for a speed-up at measured step costs."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "draft_payoff.py")
_spec = importlib.util.spec_from_file_location("draft_payoff", _PATH)
payoff = importlib.util.module_from_spec(_spec)
sys.modules["draft_payoff"] = payoff  # its dataclass looks its module up
_spec.loader.exec_module(payoff)


def test_expected_length_follows_the_geometric_series():
    assert payoff.expected_length(0.0, 4) == 1.0
    assert payoff.expected_length(1.0, 4) == 5.0
    assert payoff.expected_length(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("k, draft, verify", [(1, 0.1, 1.1), (2, 0.2, 1.3), (4, 0.05, 1.2)])
def test_needed_acceptance_gives_the_target_speedup(k, draft, verify):
    a = payoff.acceptance_needed(1.3, k, draft, verify)
    assert 0.0 < a < 1.0
    assert payoff.expected_length(a, k) / (k * draft + verify) == pytest.approx(1.3, rel=1e-9)
    assert payoff.acceptance_needed(1.5, k, draft, verify) is None or payoff.acceptance_needed(1.5, k, draft, verify) > a


def test_unreachable_when_even_full_acceptance_falls_short():
    # k = 1 with a verify step of 1.34x and a draft of 0.33x: 2 tokens per 1.67 plain steps, 1.2x at best
    assert payoff.acceptance_needed(1.3, 1, 0.33, 1.34) is None
    assert payoff.acceptance_needed(1.1, 1, 0.33, 1.34) is not None
