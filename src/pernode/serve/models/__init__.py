"""Model sources: GGUF files and Hugging Face folders, resolved to a config, a tokenizer and lazy weights."""
from pernode.serve.models.gguf_file import GGUFFile
from pernode.serve.models.hf_folder import HFFolder
from pernode.serve.models.registry import DEFAULT_MODEL, KNOWN_MODELS, ModelSource, hf_tensor_names, resolve_model

__all__ = ["DEFAULT_MODEL", "GGUFFile", "HFFolder", "KNOWN_MODELS", "ModelSource", "hf_tensor_names", "resolve_model"]
