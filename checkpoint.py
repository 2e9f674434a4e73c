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

import common
import hub

_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
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
        raise FileNotFoundError(f"{path}: no such model folder (and not a hub id like 'google/gemma-2-2b')")
    return hub.resolve(path, _choose_model_files)


def read_config(folder: str) -> dict:
    """A model folder's config.json (ModelConfig.from_hf reads it)."""
    return common.read_json(os.path.join(folder, "config.json"),
                            f"{folder}: no config.json (is this a Hugging Face model folder?)")


def _choose_model_files(files: dict[str, int]) -> list[str]:
    if "config.json" not in files:
        raise FileNotFoundError("no config.json (not a Hugging Face model repo?)")
    weights = sorted(f for f in files if _WEIGHTS.fullmatch(f))
    if not weights:
        raise FileNotFoundError("no model.safetensors or model-*-of-*.safetensors shards (only .bin or .pth weights?)")
    if "model.safetensors.index.json" in files:
        weights.append("model.safetensors.index.json")
    extras = [f for f in _TOKENIZER_FILES if f in files]
    if "tokenizer.model" not in files and "original/tokenizer.model" in files:
        extras.append("original/tokenizer.model")
    return ["config.json", *weights, *extras]


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
    entries = checkpoint_tensors(folder)
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        entries.pop("lm_head.weight", None)  # some tied checkpoints also store the shared matrix as lm_head
    check_state_dict(model, {k: v[2] for k, v in entries.items()}, source=folder)
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
    with common.atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    common.write_json(os.path.join(folder, "config.json"), config)
