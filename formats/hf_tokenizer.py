"""
A Hugging Face `tokenizer.json` of byte-level BPE (Qwen2 / Qwen2.5 / Qwen3, GPT-2 style), read into the spec that
formats/gguf.py's `bpe_encoding` turns into a tiktoken encoding, so data.py encodes with it as with a GGUF file's BPE:

    spec = tokenizer_spec("path/to/model/tokenizer.json")   # {"model": "gpt2", "tokens", "token_type", "merges", ...}

Supported is what these models ship: model BPE without byte fallback or dropout, an NFC normaliser or none, and a
pre-tokenizer that is ByteLevel with GPT-2's split or a Split on a pattern formats/gguf.py knows followed by ByteLevel
without its own split. Anything else is one error line. Added tokens (Qwen's <|endoftext|>, <|im_start|>, <think>,
...) become specials, which formats/tokenizer.py encodes as plain text in a corpus. BOS / EOS / padding ids
come from the model's config.json beside the file (Qwen has no BOS token of its own: its config names
<|endoftext|>), else from tokenizer_config.json.
"""
from __future__ import annotations

import json
import os

from formats import disk
from formats.gguf import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN

_CONTROL, _USER_DEFINED = 3, 4  # gguf.py's token types for special and other added tokens
_PRE = {QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama3", GPT2_PATTERN: "gpt2"}


def tokenizer_spec(path: str) -> dict:
    tj = disk.read_json(path, f"{path}: no such file")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        raise ValueError(f"{path}: only byte-level BPE tokenizers are supported (this one: {model.get('type')!r}"
                         f"{', byte fallback' if model.get('byte_fallback') else ''})")
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{path}: unsupported normalizer {norm.get('type')!r} (supported: none, NFC)")
    pre = _pre_tokenizer(tj.get("pre_tokenizer"), path)
    vocab = dict(model.get("vocab") or {})
    types = {}
    for t in tj.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        types[t["id"]] = _CONTROL if t.get("special") else _USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [f"<unused_{i}>" for i in range(n)]  # an id no entry names cannot be produced: a placeholder
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    spec = dict(model="gpt2", pre=pre, tokens=tokens, merges=merges, nfc=norm is not None,
                token_type=[types.get(i, 1) for i in range(n)], **_special_ids(os.path.dirname(path), vocab))
    return spec


def _pre_tokenizer(pre: dict | None, path: str) -> str:
    """The split pattern's name in gguf.PRE_PATTERNS (or "gpt2", its default)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space") and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert"):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _PRE:
            return _PRE[pattern]
        raise ValueError(f"{path}: unknown pre-tokenizer split pattern {str(pattern)[:60]!r} (known: Qwen2's, Llama-3's, "
                         f"GPT-2's)")
    raise ValueError(f"{path}: unsupported pre-tokenizer {kinds} (supported: ByteLevel, or Split + ByteLevel)")


def _special_ids(folder: str, vocab: dict) -> dict:
    out = {}
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            c = json.load(f)
        out = {k: c.get(h) for k, h in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                         ("padding_token_id", "pad_token_id"))}
        if isinstance(out["eos_token_id"], list):
            out["eos_token_id"] = out["eos_token_id"][0]
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc, encoding="utf-8") as f:
            t = json.load(f)
        for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token")):
            tok = t.get(name)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if out.get(key) is None and tok in vocab:
                out[key] = vocab[tok]
    if out.get("bos_token_id") is None and out.get("eos_token_id") is not None:
        out["bos_token_id"] = out["eos_token_id"]  # Qwen: no BOS; documents are joined by <|endoftext|> alone
    return out
