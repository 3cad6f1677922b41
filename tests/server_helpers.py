"""Helpers the server tests share."""
from __future__ import annotations

import time


def slow_steps(monkeypatch, engine, delay_s=0.01):
    """Each engine step takes at least delay_s, so requests stay in flight long enough to act on them."""
    real = engine.runner.execute

    def slow(batch):
        time.sleep(delay_s)
        return real(batch)

    monkeypatch.setattr(engine.runner, "execute", slow)
