"""
PEFT's on-disk format for the adapters of lora.py: adapter_config.json + adapter_model.safetensors, written so that
peft.PeftModel.from_pretrained loads them, and read back from ours or from peft's save_pretrained.

    save_adapter(model, "out/adapter", "google/gemma-2-2b")
    load_adapter(model, "out/adapter")      # applies LoRA as the config says when the model has none yet

Module paths are HF's (`model.layers.3.self_attn.q_proj`), so PEFT's tensor names are `base_model.model.` + path +
`.lora_A.weight` / `.lora_B.weight`: no rename table.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from formats import disk
from lora import LoRALinear, adapter_parameters, apply_lora, lora_modules

CONFIG_NAME, WEIGHTS_NAME, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def save_adapter(model: nn.Module, folder: str, base_model_name_or_path: str = ""):
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise ValueError("this model has no LoRA adapters to save (call apply_lora first)")
    m0 = next(iter(mods.values()))
    layers = sorted({int(n.split(".")[2]) for n in mods})  # names are model.layers.N.<sublayer>.<target>
    all_layers = len(layers) == len(model.model.layers)
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=m0.rank, lora_alpha=m0.alpha,
        lora_dropout=m0.dropout.p if isinstance(m0.dropout, nn.Dropout) else 0.0,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in mods}),
        layers_to_transform=None if all_layers else layers, layers_pattern=None if all_layers else "layers",
        base_model_name_or_path=base_model_name_or_path, bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None, rank_pattern={},
        alpha_pattern={}, revision=None)
    # FSDP2-sharded adapters (DTensors) are gathered first: every rank calls this, rank 0 writes
    named = _peft_names(mods)
    sharded = any(hasattr(p, "full_tensor") for p in named.values())
    tensors = {k: (p.full_tensor() if sharded else p).detach().cpu().contiguous() for k, p in named.items()}
    if sharded and torch.distributed.get_rank() != 0:
        return
    os.makedirs(folder, exist_ok=True)  # each file written under a temp name, then renamed: never half-written
    with disk.atomic_path(os.path.join(folder, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    disk.write_json(os.path.join(folder, CONFIG_NAME), config)


SAES_NAME = "lorasae_saes.json"  # beside PEFT's two files (PEFT reads only its own): the SAEs it was trained around


def sae_record(saes) -> list[dict]:
    """Which SAEs an adapter is trained around: path (resolved when local), layer, architecture and width of each
    (layer, SAE) pair, as formats.sae_files.load_saes returns them."""
    return [dict(path=_where(s.path or ""), layer=layer, arch=s.arch, d_sae=s.d_sae) for layer, s in saes]


def _where(path: str) -> str:
    return os.path.realpath(path) if path and os.path.exists(path) else path


def save_sae_record(folder: str, saes):
    disk.write_json(os.path.join(folder, SAES_NAME), dict(saes=sae_record(saes)))


def write_adapter(model: nn.Module, saes, folder: str, base_model_name_or_path: str, *, every_rank: bool = False):
    """The adapter in PEFT's files, with the record of the SAEs it is trained around beside them (eval.py says when it
    is given others), by rank 0; every_rank: every rank takes part (FSDP2: gathering the shards is a collective)."""
    import torch.distributed as dist
    master = not dist.is_initialized() or dist.get_rank() == 0
    if every_rank or master:
        save_adapter(model, folder, base_model_name_or_path)
    if master:
        save_sae_record(folder, saes)


def sae_mismatch(folder: str, saes) -> str | None:
    """A line saying how the SAEs in `saes` differ from those the adapter in `folder` was trained around (its
    SAES_NAME record); None when they are the same, or when the adapter has no record (made elsewhere, or older)."""
    path = os.path.join(folder, SAES_NAME)
    if not os.path.isfile(path):
        return None
    trained = disk.read_json(path, path).get("saes", [])
    now = sae_record(saes)
    key = lambda rec: sorted((r["layer"], r["path"]) for r in rec)  # noqa: E731
    if key(trained) == key(now):
        return None
    text = lambda rec: ", ".join(f"{r['path']} at layer {r['layer']}" for r in rec) or "none"  # noqa: E731
    return (f"--adapter {folder} was trained around {text(trained)}; this run splices {text(now)}: its SAE + LoRA "
            f"numbers are for SAEs it was not trained with")


def base_mismatch(folder: str, model: str | None) -> str | None:
    """A line saying that the adapter in `folder` records another base model (adapter_config.json's
    base_model_name_or_path) than `model`, the one it is applied to; None when they are the same: the same name, the
    same folder by any path, or two folders whose files hold the same model (run_folder.fingerprints). An adapter of
    the same shape trained on another model loads without error, and means nothing on this one."""
    recorded = disk.read_json(os.path.join(folder, CONFIG_NAME), folder).get("base_model_name_or_path")
    if not recorded or not model or str(recorded) == str(model):
        return None
    if os.path.exists(recorded) and os.path.exists(model):
        if os.path.realpath(recorded) == os.path.realpath(model):
            return None
        from formats import checkpoint, run_folder
        try:
            same = run_folder.fingerprints(checkpoint.model_files(checkpoint.resolve_model_dir(recorded))) == \
                run_folder.fingerprints(checkpoint.model_files(checkpoint.resolve_model_dir(model)))
        except (OSError, ValueError):
            same = False
        if same:
            return None
    return (f"--adapter {folder} was trained on {recorded} ({CONFIG_NAME}: base_model_name_or_path), not on "
            f"{model}: its numbers on this model mean little unless it is the same model")


def load_adapter(model: nn.Module, folder: str) -> list[nn.Parameter]:
    """Load an adapter saved by save_adapter or by peft's save_pretrained. Applies LoRA per adapter_config.json if the
    model has none yet; otherwise the existing adapters must match it. Returns the adapter parameters.
    Config problems are caught before the model is touched; a tensor mismatch is found after LoRA was applied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, fname)):
            raise FileNotFoundError(f"{folder}: no {fname} (is this a PEFT LoRA adapter folder?)")
    cfg = read_config(folder)
    r, alpha, targets = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    layers = cfg.get("layers_to_transform")
    mods = lora_modules(model)
    if not mods:
        apply_lora(model, r, alpha, cfg.get("lora_dropout") or 0.0, layers, targets)
        mods = lora_modules(model)
    m0 = next(iter(mods.values()))
    if any(m.merged for m in mods.values()):
        raise ValueError("adapters are merged into the weights: unmerge_all(model) before loading new ones")
    if (m0.rank, m0.alpha) != (r, alpha):
        raise ValueError(f"{folder}: adapter has r={r}, lora_alpha={alpha} but the model's adapters have "
                         f"r={m0.rank}, alpha={m0.alpha}")
    try:
        state = load_file(os.path.join(folder, WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder}: corrupt or truncated {WEIGHTS_NAME} ({e})") from None
    params = _peft_names(mods)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{folder}: adapter tensors do not match the model's adapters: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]} (adapter for another model?)")
    for k, p in params.items():
        if not state[k].is_floating_point():
            raise ValueError(f"{os.path.join(folder, WEIGHTS_NAME)}: tensor {k} is {state[k].dtype}, not a "
                             f"floating-point weight (a damaged or foreign file)")
        if state[k].shape != p.shape:
            raise ValueError(f"{folder}: tensor {k} has shape {tuple(state[k].shape)}, this model needs "
                             f"{tuple(p.shape)} (adapter for another model?)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return adapter_parameters(model)


def read_config(folder: str) -> dict:
    """adapter_config.json, checked (_check_peft_config): one line naming the file and the key."""
    cfg = disk.read_json(os.path.join(folder, CONFIG_NAME), f"{folder}: no {CONFIG_NAME}")
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)}: not a JSON object")
    _check_peft_config(cfg, folder)
    return cfg


def _peft_names(mods: dict[str, LoRALinear]) -> dict[str, nn.Parameter]:
    return {f"{PREFIX}{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}") for n, m in mods.items() for ab in "AB"}


def _check_peft_config(cfg: dict, folder: str):
    """Refuse, one line each, PEFT features whose forward this file does not implement."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{folder}: {CONFIG_NAME} lacks {key!r}")
    where = os.path.join(folder, CONFIG_NAME)
    if not isinstance(cfg["target_modules"], list) or not all(isinstance(t, str) for t in cfg["target_modules"]):
        raise ValueError(f"{where}: target_modules must be a list of names, got {cfg['target_modules']!r}")
    r, alpha, dropout, layers = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout"), cfg.get("layers_to_transform")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"{where}: r must be a whole number of at least 1, got {r!r}")
    if not (number(alpha) and alpha > 0):
        raise ValueError(f"{where}: lora_alpha must be a number above 0, got {alpha!r}")
    if dropout is not None and not (number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or isinstance(
            layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise ValueError(f"{where}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    for key, ok in [("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("lora_bias", False),
                    ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None),
                    ("layer_replication", None), ("layers_pattern", "layers")]:
        if cfg.get(key) not in (ok, None, [ok]):
            raise ValueError(f"{folder}: {key}={cfg[key]!r} in {CONFIG_NAME} is not supported")
