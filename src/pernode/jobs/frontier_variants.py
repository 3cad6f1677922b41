"""Checkpoints for frontier variants that are not a quantization recipe: a structured-pruned model and a
distilled (or any other) student read from a folder. Each is a `MakeCheckpoint`: (base model, folder) -> path.

Structured pruning follows Minitron (Muralidharan et al., 2024, arXiv:2407.14679): channels ranked by activation
importance on calibration text, with an optional least-squares refit of the output projections.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.student_checkpoint import save_student
from pernode.shrink.evaluate.perplexity import calibration_windows
from pernode.shrink.structured import PruningPlan, measure_importance, prune_model
from pernode.shrink.structured.plan import non_embedding_params

CALIB_SEQ_LEN = 256  # as `pernode prune-structured`


def structured_pruned(spec: str, calib_windows: int = 8, refit_windows: int = 16) -> Callable[[str, str], str]:
    """A maker for `pernode prune-structured --structured SPEC --refit-windows N`'s checkpoint, written once under
    the frontier's folder and reused after."""
    plan = PruningPlan.parse(spec)

    def make(base_model: str, folder: str) -> str:
        path = os.path.join(folder, f"structured-{spec.replace('=', '').replace(',', '-')}")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        model, source = load_model(base_model)
        plan.target_config(model.config)  # shapes checked before any work
        windows = calibration_windows(source.tokenizer, CALIB_SEQ_LEN, max(calib_windows, refit_windows))
        pruned = prune_model(model, plan, measure_importance(model, windows[:calib_windows]),
                             refit_windows=windows[:refit_windows] if refit_windows else None)
        details = {"teacher": base_model, "plan": plan.to_dict(), "calib_windows": calib_windows,
                   "refit_windows": refit_windows,
                   "param_ratio": round(non_embedding_params(pruned.config) / non_embedding_params(model.config), 4)}
        save_student(pruned, source, path, details=details)
        with open(os.path.join(path, "prune.json"), "w", encoding="utf-8") as f:
            json.dump(details, f, indent=1)
        return path

    return make


def checkpoint_at(path: str, how_to_make: str) -> Callable[[str, str], str]:
    """A maker for a checkpoint that already exists elsewhere (a distilled student): `path`, absolute or under the
    frontier's folder; FileNotFoundError saying how to make it when it is not there."""

    def make(_base_model: str, folder: str) -> str:
        where = path if os.path.isabs(path) else os.path.join(folder, path)
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise FileNotFoundError(f"variant checkpoint {where!r} holds no config.json: {how_to_make}")
        return where

    return make
