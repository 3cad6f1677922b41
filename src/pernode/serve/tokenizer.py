"""Text <-> token ids for a model: from GGUF metadata or an HF tokenizer.json, plus its chat template.

`IncrementalDetokenizer` streams text token by token at a constant cost per token (vLLM's prefix/read offsets).
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

if TYPE_CHECKING:
    from pernode.serve.models.gguf_file import GGUFFile

# Split regexes of llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp), as HF's original tokenizer.json spell them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "starcoder", "llama-bpe", "llama3", "qwen2", "deepseek-r1-qwen")

# Tokens that end an assistant turn in common chat templates; a model stops on them as on eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None]:
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None
    if pre in ("smollm", "starcoder"):
        # SmolLM/StarCoder were trained with every digit its own pre-token (their tokenizer.json: Digits + ByteLevel).
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), None
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(
            f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {', '.join(GGUF_PRE_TOKENIZERS)}. "
            "Use the model's HF folder (tokenizer.json) instead."
        )
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Qwen2's own tokenizer.json normalizes to NFC before splitting.
    return pre_tokenizer, normalizers.NFC() if split is _QWEN2_SPLIT else None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in; templates come from files, so sandboxed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model needs around it."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._added_ids = set(backend.get_added_tokens_decoder())

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: GGUFFile) -> Tokenizer:
        """Byte-level BPE (`tokenizer.ggml.model` gpt2) from GGUF metadata."""
        meta = source.metadata
        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{source.path}: tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE). "
                "For a SentencePiece model use its HF folder (tokenizer.json)."
            )
        tokens: list[str] = meta("tokenizer.ggml.tokens")
        token_types: list[int] = meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
        pre = meta("tokenizer.ggml.pre", "default")

        # A few files spell a token outside the byte alphabet (a llama.cpp mislabel); respell it in bytes as HF does.
        alphabet = set(_CHAR_TO_BYTE)
        spelled = [t if set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode()) for t in tokens]
        vocab = {token: index for index, token in enumerate(spelled)}
        backend = tokenizers.Tokenizer(models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
            ignore_merges=pre in ("llama-bpe", "llama3"),  # as Llama 3's tokenizer.json
        ))
        backend.pre_tokenizer, normalizer = _byte_level_pre_tokenizer(pre)
        if normalizer is not None:
            backend.normalizer = normalizer
        backend.decoder = decoders.ByteLevel()

        # Control tokens (<|im_start|>...) must match whole in text, as llama.cpp does; user-defined ones too.
        # A respelled (mislabelled) one is left out: adding its raw text would grow the vocabulary.
        def added(type_id: int, special: bool) -> list[AddedToken]:
            return [AddedToken(t, special=special, normalized=False)
                    for t, kind_id, s in zip(tokens, token_types, spelled) if kind_id == type_id and t == s]

        backend.add_special_tokens(added(_GGUF_TOKEN_TYPE_CONTROL, special=True))
        backend.add_tokens(added(_GGUF_TOKEN_TYPE_USER_DEFINED, special=False))

        def token_at(key: str) -> str | None:
            index = meta(f"tokenizer.ggml.{key}", None)
            return spelled[index] if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
        add_bos = bool(meta("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(meta("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
            backend.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, vocab[t]) for t in {bos, eos} if t is not None]
            )
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=token_at("unknown_token_id"),
                   pad_token=token_at("padding_token_id"), chat_template=meta("tokenizer.chat_template", None))

    @classmethod
    def from_hf_folder(cls, folder: str) -> Tokenizer:
        """tokenizer.json as is; special tokens and chat template from tokenizer_config.json / chat_template.jinja."""
        tokenizer_json = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise ValueError(
                f"{folder}: no tokenizer.json; save the tokenizer with a fast (tokenizers) backend, "
                "e.g. AutoTokenizer.from_pretrained(...).save_pretrained(folder)."
            )
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        config: dict = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_path = os.path.join(folder, "chat_template.jinja")  # transformers >= 4.43 saves it here
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        return cls(backend, bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")),
                   unk_token=_token_content(config.get("unk_token")),
                   pad_token=_token_content(config.get("pad_token")), chat_template=template)

    # -- ids --------------------------------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """eos, then the end-of-turn tokens the chat template writes (`<|im_end|>`, `<|eot_id|>`...)."""
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        for token in END_OF_TURN_TOKENS:
            token_id = self._id(token)
            if token_id is not None and token_id not in ids and self.chat_template and token in self.chat_template:
                ids.append(token_id)
        return ids

    # -- text -------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token text such as `<|im_start|>` always maps to its id; add_special_tokens adds bos/eos."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """One token's text for display (logprobs); a partial UTF-8 character shows as U+FFFD."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_to_bytes(self, token_id: int) -> bytes:
        """One token's exact bytes (OpenAI logprobs `bytes`), which may be part of a UTF-8 character."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token_id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        # Added tokens are stored as plain text, the rest of a byte-level vocabulary in GPT-2's byte alphabet.
        if self._byte_level and token_id not in self._added_ids and set(piece) <= _CHAR_TO_BYTE.keys():
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        return self.token_to_str(token_id).encode()

    # -- chat -------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Iterable[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt text for `messages` ([{"role", "content"}...]), as transformers renders it."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat_template (no tokenizer.chat_template in the GGUF, no chat_template in "
                "tokenizer_config.json or chat_template.jinja); send a plain prompt instead of messages."
            )
        if self._compiled_template is None:
            self._compiled_template = _chat_environment().from_string(self.chat_template)
        # As transformers: tools/documents defined (None), special tokens only where the tokenizer has them.
        special_tokens = {name: token for name, token in (
            ("bos_token", self.bos_token), ("eos_token", self.eos_token),
            ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if token is not None}
        context = {"tools": None, "documents": None, **special_tokens, **template_kwargs}
        return self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context
        )


# Tokens of prompt context decoded ahead of the output, so a tokenizer that drops a leading space in a
# decode (SentencePiece) still yields the right first delta. vLLM uses the same 5.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Streams a sequence's text: `push` returns only the new text, never half a UTF-8 character.

    Each push decodes two short windows, the tokens last emitted (prefix) and those plus the new tokens, and
    emits the difference (vLLM's prefix/read offsets); so the cost per token does not grow with sequence length.
    A decode ending in U+FFFD is an unfinished character: held back until its remaining bytes arrive.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # _ids = the prefix window (decode context, already emitted), then tokens not yet emitted.
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._deltas: list[str] = []

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text, new_text = self._decode_windows()
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            # An unfinished UTF-8 character, or only skipped special tokens: keep the window as it is.
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Text still held back at the end of a sequence (an unfinished character shows as U+FFFD)."""
        prefix_text, new_text = self._decode_windows()
        return self._emit(new_text[len(prefix_text):])

    def _decode_windows(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        return decode(self._ids[:self._read_offset], skip), decode(self._ids, skip)

    def _emit(self, delta: str) -> str:
        # The tokens just emitted become the next prefix window; older ones are never decoded again.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        if delta:
            self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""
