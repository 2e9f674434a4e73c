"""
Export an adapted model as a plain Hugging Face folder: the LoRA adapters merged into their base weights in fp32,
written with config.json, model.safetensors and the base model's tokenizer files, so that transformers'
AutoModelForCausalLM (and any tool built on it) loads the adapted model with no PEFT and no code of ours:

    python tools/export.py --model google/gemma-3-1b-pt --adapter out/adapt/adapter --out out/gemma-3-1b-adapted
    python tools/export.py                          # the embedded tiny model + python adapt.py's out/adapt-tiny/adapter

Use it alone (the SAE-free model: the adapters' change to the base model, Sec. 5.3's "LoRA only" setting), or beside
the SAE it was trained around (--sae writes each one into sae/ in SAELens' layout, for the tools that splice it).
The merge is W + (alpha / r) B A (Eq. 1) computed in fp32 whatever --dtype stores: peft's merge_and_unload in bf16
rounds every delta into bf16 weights before adding (peft issue 1388); here the bf16 rounding, if asked for, happens
once, on the merged sum.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable by path (python tools/export.py) as well as with -m

from plumbing import common  # noqa: E402
from plumbing import embedded  # noqa: E402
from formats import checkpoint, disk  # noqa: E402
from formats import run_folder  # noqa: E402
from formats.peft import base_mismatch, load_adapter  # noqa: E402
from lora import merge_all  # noqa: E402
from model import Transformer  # noqa: E402
from sae import SAE  # noqa: E402


@dataclass
class ExportConfig:
    """Merge a LoRA adapter into its base model and write the result as a Hugging Face model folder."""
    model: str | None = None  # HF folder or hub id of the base model; none: the embedded tiny model
    adapter: str | None = None  # the PEFT adapter folder adapt.py wrote (--out/adapter); none with no --model:
    # out/adapt-tiny/adapter (python adapt.py's)
    out: str = "out/export"  # the HF folder written: config.json, model.safetensors, tokenizer files; a new or empty
    # folder, never the base model's own
    overwrite: bool = False  # --out holds files: replace what export writes there (the rest is kept)
    dtype: str = "float32"  # storage of the merged weights: float32 (exact) | bfloat16 (rounded once, after the
    # fp32 merge)
    sae: list[str] = field(default_factory=list)  # SAEs to write beside the model into --out/sae/layer_L (SAELens
    # layout), e.g. the one the adapter was trained around


def export(model: Transformer, folder: str, tokenizer_from: str | None = None, dtype: torch.dtype = torch.float32,
           saes: list[SAE] = ()):
    """Write model (adapters merged in fp32, then cast to dtype) as an HF folder; the adapters are unmerged again
    afterwards. tokenizer_from: a model folder whose tokenizer files are copied."""
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if any(p.dtype != torch.float32 for n, p in model.named_parameters() if n not in lora):
        raise ValueError("load the base model in float32 before merging (the merge is exact only in fp32)")
    merge_all(model)
    try:
        state = {k: v.to(dtype) for k, v in model.state_dict().items() if ".lora_" not in k}
        checkpoint.save_checkpoint(state, folder, model.cfg.to_hf())
    finally:
        for m in model.modules():
            if getattr(m, "merged", False):
                m.unmerge()
    if tokenizer_from is not None:
        for name in checkpoint.TOKENIZER_FILES + ("original/tokenizer.model",):
            src = os.path.join(tokenizer_from, *name.split("/"))
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
                with disk.atomic_path(os.path.join(folder, name)) as tmp:
                    shutil.copyfile(src, tmp)
    for i, sae in enumerate(saes):
        sae.save(os.path.join(folder, "sae", f"layer_{sae.layer}" if sae.layer is not None else f"sae_{i}"))


OUTPUTS = ("config.json", "model.safetensors", *checkpoint.TOKENIZER_FILES, "original", "sae")  # what it writes


def main(argv=None) -> str:
    cfg, _ = common.parse_args(ExportConfig, argv)
    if cfg.model is None:
        cfg.model = embedded.model()
        if cfg.adapter is None and os.path.isfile("out/adapt-tiny/adapter/adapter_config.json"):
            cfg.adapter = "out/adapt-tiny/adapter"
    if cfg.adapter is None:
        raise ValueError("no --adapter: pass the adapter folder adapt.py wrote (its --out, then /adapter)")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype!r}: expected float32 or bfloat16")
    folder = checkpoint.resolve_model_dir(cfg.model)
    with run_folder.claim(cfg.out, overwrite=cfg.overwrite, outputs=OUTPUTS, inputs=[folder, cfg.adapter, *cfg.sae]):
        model = Transformer.from_pretrained(folder, dtype=torch.float32)
        load_adapter(model, cfg.adapter)
        other = base_mismatch(cfg.adapter, cfg.model)
        if other:
            common.log(f"export.py: warning: {other}")
        saes = [SAE.from_pretrained(p) for p in cfg.sae]
        export(model, cfg.out, tokenizer_from=folder, dtype=getattr(torch, cfg.dtype), saes=saes)
    common.log(f"export.py: {cfg.model} + {cfg.adapter} merged in fp32, written as {cfg.dtype} to {cfg.out} "
               f"(AutoModelForCausalLM.from_pretrained({cfg.out!r}) loads it)")
    return cfg.out


if __name__ == "__main__":
    common.cli(main)
