"""A student written as a plain Hugging Face folder the engine serves like any model: config.json,
model.safetensors (fp32, HF names), the teacher's tokenizer files, and DATA.md / distill.json beside them."""
from __future__ import annotations

import json
import os
import shutil

from safetensors.torch import save_file

from pernode.shrink.checkpoint import TOKENIZER_FILES, _hf_config_json


def write_tokenizer_files(source, folder: str) -> None:
    """The teacher's tokenizer, unchanged: copied from an HF folder, or rebuilt from a GGUF's metadata."""
    if source.format == "hf":
        for name in TOKENIZER_FILES:
            if name != "generation_config.json" and os.path.isfile(os.path.join(source.path, name)):
                shutil.copy(os.path.join(source.path, name), os.path.join(folder, name))
        return
    tok = source.tokenizer
    tok.backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}, f)


def save_student(model, source, folder: str, details: dict | None = None, data_note: str | None = None) -> str:
    """Write `folder` (created if needed); `details` go to distill.json, `data_note` to DATA.md."""
    os.makedirs(folder, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = _hf_config_json(model.config)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    write_tokenizer_files(source, folder)
    if details is not None:
        with open(os.path.join(folder, "distill.json"), "w", encoding="utf-8") as f:
            json.dump(details, f, indent=1)
    if data_note is not None:
        with open(os.path.join(folder, "DATA.md"), "w", encoding="utf-8") as f:
            f.write(data_note)
    return folder


def data_note(provenance: dict) -> str:
    """DATA.md: where every training token came from, and what was held out."""
    lines = ["# Training data of this checkpoint", "",
             "All text is offline: it ships with Python itself or with the installed packages named below; nothing was "
             "downloaded at run time.", ""]
    for source, info in provenance.items():
        if isinstance(info, dict):
            lines.append(f"- **{source}**: " + "; ".join(f"{k}: {v}" for k, v in info.items()))
        else:
            lines.append(f"- **{source}**: {info}")
    return "\n".join(lines) + "\n"
