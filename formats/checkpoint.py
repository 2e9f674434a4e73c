"""
Hugging Face checkpoint files: a model folder or hub id resolved to local files (hub.py), safetensors headers read
without loading, and a streaming load that reads, casts and places one tensor at a time, so that a bf16 load of
fp32 files peaks at the bf16 size plus the largest tensor, not at the fp32 size; and the same layout written back. model.py's Transformer.from_pretrained / save_pretrained call them.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn as nn

from formats import disk
from formats import hub

_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def resolve_model_dir(path_or_repo_id: str) -> str:
    """A local folder as is; a GGUF file (or `smollm2`) as its cached conversion (formats/gguf.py); otherwise a hub
    id, read from the hub cache or downloaded: config.json, the safetensors weights and the tokenizer files only
    (Llama-3's original/tokenizer.model when there is no top-level one)."""
    path = str(path_or_repo_id)
    if os.path.isdir(path):
        return path
    from formats import gguf
    if gguf.is_gguf(path):  # llama.cpp's single file: converted once into this layout in the cache
        return gguf.model_dir(path)
    if not hub.is_hub_path(path, sub_folders=False):
        raise FileNotFoundError(f"{path}: no such model folder or .gguf file, and not a hub id like 'google/gemma-2-2b' "
                                f"nor an installed GGUF's short name ({', '.join(gguf.LOCAL_FILES)})")
    return hub.resolve(path, _choose_model_files)


def read_config(folder: str) -> dict:
    """A model folder's config.json (ModelConfig.from_hf reads it), its values checked (check_config)."""
    path = os.path.join(folder, "config.json")
    hf = disk.read_json(path, f"{folder}: no config.json (is this a Hugging Face model folder?)")
    check_config(hf, path)
    return hf


# The values config_from_hf reads, by type. Required: what has no default (Gemma-3's text config has
# GEMMA3_TEXT_DEFAULTS); null is allowed where transformers allows it (None: derived, or not used).
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COUNTS = _REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                       "query_pre_attn_scalar", "sliding_window_pattern")
_POSITIVE = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "initializer_range", "attn_logit_softcapping",
             "final_logit_softcapping")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_bidirectional_attention")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_config(hf, path: str):
    """One ValueError line naming the file and the first key whose value config_from_hf cannot use: missing where
    there is no default, null where one is needed, or of the wrong type (a number as a string, a float for a count,
    a count below 1, a non-finite or non-positive float)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a JSON object")
    if hf.get("model_type") == "gemma3":  # the language model's values: under text_config, over the defaults
        text = hf.get("text_config") if hf.get("text_config") is not None else {}
        if not isinstance(text, dict):
            raise ValueError(f"{path}: text_config is {text!r}, expected an object")
        hf = {**hf, **text}
    defaults = hf.get("model_type") in ("gemma3", "gemma3_text")

    def bad(key, what):
        raise ValueError(f"{path}: {key} is {json.dumps(hf[key]) if key in hf else 'missing'}, expected {what}; "
                         f"restore the file (the model's own config.json)")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key in _COUNTS:
        if key in _REQUIRED and not defaults and hf.get(key) is None:
            bad(key, "a whole number of at least 1")
        if hf.get(key) is not None and not (is_int(hf[key]) and hf[key] >= 1):
            bad(key, "a whole number of at least 1")
    for key in _POSITIVE:
        v = hf.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v > 0):
            bad(key, "a finite number above 0" + (" or null" if "softcapping" in key else ""))
    for key in _FLAGS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            bad(key, "true or false")
    for key in _TOKEN_IDS:
        v = hf.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(is_int(i) and i >= 0 for i in ids):
            bad(key, "a token id (a whole number), a list of them, or null")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            bad(key, "an object or null")
    if hf.get("layer_types") is not None and not (isinstance(hf["layer_types"], list) and all(
            isinstance(t, str) for t in hf["layer_types"])):
        bad("layer_types", "a list of layer type names")


def _choose_model_files(files: dict[str, int]) -> list[str]:
    if "config.json" not in files:
        raise FileNotFoundError("no config.json (not a Hugging Face model repo?)")
    weights = sorted(f for f in files if _WEIGHTS.fullmatch(f))
    if not weights:
        raise FileNotFoundError("no model.safetensors or model-*-of-*.safetensors shards (only .bin or .pth weights?)")
    if "model.safetensors.index.json" in files:
        weights.append("model.safetensors.index.json")
    extras = [f for f in TOKENIZER_FILES if f in files]
    if "tokenizer.model" not in files and "original/tokenizer.model" in files:
        extras.append("original/tokenizer.model")
    return ["config.json", *weights, *extras]


# ----------------------------------------------------------------------------------------------------------------------
# config.json <-> model.ModelConfig's fields

# transformers' Gemma3TextConfig defaults: the hub's multimodal checkpoints (gemma-3-4b and up) ship a text_config
# that names only what differs from them (tests/test_model.py checks them against transformers)
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
    attn_logit_softcapping=None)


def _rope_scaling(scaling: dict | None, hf: dict) -> dict | None:
    """Our rope_scaling from a config's (None for plain RoPE)."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return None
    if rope_type == "linear":  # Gemma-3 4B and up, global layers: positions divided by factor
        return {"rope_type": "linear", "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        out = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
        out["original_max_position_embeddings"] = scaling.get("original_max_position_embeddings",
                                                              hf.get("max_position_embeddings"))
        return {**out, "rope_type": "llama3"}
    raise ValueError(f"unsupported RoPE type {rope_type!r} (supported: default, linear, llama3)")


SUPPORTED = ("gemma2", "gemma3", "gemma3_text", "llama", "qwen2", "qwen3")


def config_from_hf(hf: dict) -> dict:
    """ModelConfig's fields from a hub config.json: Gemma-2, Llama, Gemma-3 (gemma3_text, and the text model inside
    a multimodal gemma3 checkpoint), Qwen2 / Qwen2.5 and Qwen3 (dense); old `rope_theta` / `rope_scaling` keys or
    the newer `rope_parameters`."""
    model_type = hf.get("model_type")
    if "moe" in str(model_type):
        raise ValueError(f"model_type {model_type!r} is a mixture-of-experts model: only dense models are supported "
                         f"({', '.join(SUPPORTED)})")
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration: its language model, under text_config
        text = hf.get("text_config") or {}
        shared = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings") if k in hf}
        hf, model_type = {**shared, **text, "model_type": "gemma3_text"}, "gemma3_text"
    if model_type == "gemma3_text":
        hf = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k.endswith("softcapping")}}
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true (an embedding model): only causal Gemma-3 is supported")
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json (supported: {', '.join(SUPPORTED)})")
    gemma, gemma3 = model_type.startswith("gemma"), model_type == "gemma3_text"
    qwen = model_type in ("qwen2", "qwen3")
    n_layer, n_head = hf["num_hidden_layers"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    local_theta = None
    if gemma3:  # two RoPEs: rope_theta (+ scaling) on global layers, rope_local_base_freq on sliding ones
        rope_global = rope.get("full_attention") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf["rope_theta"]}
        rope_local = rope.get("sliding_attention") or {"rope_theta": hf["rope_local_base_freq"]}
        if _rope_scaling(rope_local, hf) is not None:
            raise ValueError(f"unsupported RoPE scaling {rope_local} on Gemma-3's sliding layers")
        rope_theta, local_theta = rope_global["rope_theta"], float(rope_local["rope_theta"])
        rope_scaling = _rope_scaling(rope_global, hf)
    else:
        if rope and "rope_theta" not in rope and all(isinstance(v, dict) for v in rope.values()):
            rope = next(iter(rope.values()))  # nested per layer type: Gemma-2 uses one RoPE for all layers
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_scaling = _rope_scaling(hf.get("rope_scaling") or rope, hf)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported activation {act!r} in config.json")
    layer_types = hf.get("layer_types")
    if gemma and layer_types is None:  # every pattern-th layer is global: Gemma-2 alternates, Gemma-3 has 5:1
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)) if gemma3 else 2
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    window = hf.get("sliding_window") if gemma else None
    if qwen:  # Qwen2Config: a window only with use_sliding_window, on layers max_window_layers.. unless listed
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if layer_types is None:
            first = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                           for i in range(n_layer)]
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], n_layer=n_layer,
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_offset=gemma, sandwich_norms=gemma, embed_scale=gemma, qk_norm=gemma3 or model_type == "qwen3",
        mlp_act="gelu_tanh" if "gelu" in act else "silu", rope_theta=float(rope_theta), rope_scaling=rope_scaling,
        rope_local_theta=local_theta, query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
        attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_softcap=hf.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, layer_types=layer_types,
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        attention_bias=hf.get("attention_bias", False) and model_type != "qwen2", qkv_bias=model_type == "qwen2",
        mlp_bias=hf.get("mlp_bias", False), max_seq_len=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), model_type=model_type,
        init_std=hf.get("initializer_range", 0.02))


def config_to_hf(cfg) -> dict:
    """The config.json the hub would ship for a ModelConfig (old-style keys, which every transformers reads); a
    Gemma-3 is written as the text-only Gemma3ForCausalLM."""
    gemma, gemma3 = cfg.model_type in ("gemma2", "gemma3_text"), cfg.model_type == "gemma3_text"
    arch = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}.get(cfg.model_type, "LlamaForCausalLM")
    hf = {
        "architectures": [arch], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32",
    }
    if gemma:
        hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                  sliding_window=cfg.sliding_window or cfg.max_seq_len, layer_types=cfg.layer_types)
    else:
        hf.update(hidden_act="silu", mlp_bias=cfg.mlp_bias, rope_scaling=cfg.rope_scaling)
    if gemma3:
        hf.update(rope_scaling=cfg.rope_scaling, rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta)
    if cfg.model_type in ("qwen2", "qwen3"):
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  max_window_layers=sliding[0] if sliding else cfg.n_layer, layer_types=cfg.layer_types)
    return hf


# safetensors is read by hand, not through safe_open: safe_open maps the whole file, and every page read through the
# map counts towards the process's resident memory until the file is closed, so a 5 GB fp32 shard cast to bf16
# tensor by tensor would still peak at 5 GB plus the bf16 copy. Plain reads into one reused buffer peak at the
# largest tensor.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(path: str) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    """name -> (dtype, shape, first byte, end byte) in the file; ValueError for a corrupt or truncated file."""
    size = os.path.getsize(path)

    def corrupt(why):
        return ValueError(f"{path}: corrupt or truncated safetensors file ({why})")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise corrupt(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
    header.pop("__metadata__", None)
    out = {}
    for name, v in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for {name}: {v}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or 8 + n + end > size:
            raise corrupt(f"{name} needs bytes {begin}..{end} of the data, which has {size - 8 - n}")
        out[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
    return out


def checkpoint_tensors(folder: str) -> dict[str, tuple[str, torch.dtype, tuple, int, int]]:
    """Every tensor of a (sharded) checkpoint: name -> (shard path, dtype, shape, first byte, end byte)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: shard {shard} listed in the index is missing (partial download?)")
        out.update({k: (path, *v) for k, v in safetensors_header(path).items()})
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{folder}: tensors listed in the index are not in their shards: {missing[:5]}")
    return out


def model_files(folder: str) -> list[str]:
    """The files a model is read from: config.json and its safetensors weights (every shard)."""
    return [os.path.join(folder, "config.json"), *sorted({v[0] for v in checkpoint_tensors(folder).values()})]


# the language model of a multimodal Gemma-3 checkpoint: `language_model.model.*` as the hub ships it,
# `model.language_model.*` as transformers >= 4.52 saves it; the vision tower and projector are not read
_LANGUAGE_MODEL = (("language_model.model.", "model."), ("model.language_model.", "model."),
                   ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def language_model_tensors(entries: dict) -> dict:
    """entries renamed to a causal LM's names when they are a multimodal checkpoint's; otherwise as they are."""
    if not any(k.startswith(("language_model.", "model.language_model.")) for k in entries):
        return entries
    out = {}
    for name, v in entries.items():
        for old, new in _LANGUAGE_MODEL:
            if name.startswith(old):
                out[new + name[len(old):]] = v
                break
    return out


def _read_into(f, buf: torch.Tensor, path: str):
    view, got = memoryview(buf.numpy()), 0
    while got < len(view):  # a single read returns at most ~2 GB on Linux
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: corrupt or truncated safetensors file (ends inside a tensor)")
        got += n


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: str, dtype: torch.dtype | None = None, device=None):
    """Fill a (meta-device) model from a checkpoint folder, strictly: names and shapes are checked from the file
    headers before any weight is read. Then one tensor at a time is read, cast to dtype (None: the file's) and put on
    device, so the peak memory is the loaded model plus the largest tensor."""
    entries = language_model_tensors(checkpoint_tensors(folder))
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        entries.pop("lm_head.weight", None)  # some tied checkpoints also store the shared matrix as lm_head
    check_state_dict(model, {k: v[2] for k, v in entries.items()}, source=folder)
    expected = model.state_dict()
    for name, (path, file_dtype, *_) in entries.items():  # an integer tensor where a weight belongs: a foreign file
        if expected[name].is_floating_point() and not file_dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {name} is {file_dtype}, not a floating-point weight (a damaged or "
                             f"foreign checkpoint)")
    device = torch.device(device or "cpu")
    largest = max((end - begin for _, _, _, begin, end in entries.values()), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8) if dtype is not None or device.type != "cpu" else None
    state = {}
    for path in sorted({v[0] for v in entries.values()}):
        names = sorted((k for k, v in entries.items() if v[0] == path), key=lambda k: entries[k][3])
        with open(path, "rb", buffering=0) as f:
            for name in names:
                _, file_dtype, shape, begin, end = entries[name]
                f.seek(begin)
                target = dtype if dtype is not None and file_dtype.is_floating_point else file_dtype
                if scratch is None:  # kept as stored, on CPU: read straight into the final tensor
                    t = torch.empty(end - begin, dtype=torch.uint8)
                    _read_into(f, t, path)
                    state[name] = t.view(file_dtype).reshape(shape)
                else:
                    buf = scratch[:end - begin]
                    _read_into(f, buf, path)
                    t = buf.view(file_dtype).reshape(shape)
                    # .to() returns its input when nothing changes: copy, or the next read would overwrite it
                    state[name] = t.to(device, target, copy=True)
    model.load_state_dict(state, strict=True, assign=True)


def check_state_dict(model: nn.Module, state: dict, source: str):
    """One clear line per problem instead of load_state_dict's wall of text. state: name -> tensor or shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} (partial checkpoint?)")
    if unexpected:
        raise ValueError(f"{source}: checkpoint has unexpected tensors, e.g. {unexpected[:3]} (wrong config.json?)")
    for k, shape in expected.items():
        got = tuple(getattr(state[k], "shape", state[k]))
        if got != tuple(shape):
            raise ValueError(f"{source}: tensor {k} has shape {got}, config.json implies {tuple(shape)}")


def save_checkpoint(state: dict, folder: str, config: dict):
    """Write model.safetensors + config.json in HF layout, atomically (temp names, then rename); config.json's
    torch_dtype is the weights' own."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = {**config, "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    with disk.atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    disk.write_json(os.path.join(folder, "config.json"), config)
