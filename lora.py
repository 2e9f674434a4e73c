"""
LoRA adapters (Hu et al. 2021) on the frozen language model (formats/peft.py saves and loads them in PEFT's format).

The paper (Sec. 3) freezes the LM and the SAE spliced into it and trains only low-rank updates W + (alpha/r) B A on
the attention and MLP projections, to minimise KL(p_orig || p_spliced):

    params = apply_lora(model, rank=64, alpha=32, layers="after:12")   # JumpReLU SAEs at layer 12: later layers only
    with adapters_disabled(model): base_logits = model(idx)              # p_orig: the untouched model
    logits = model(idx, hooks={12: sae})                                 # p_spliced with adapters

Module paths are HF's (`model.layers.3.self_attn.q_proj`), so PEFT's tensor names (formats/peft.py) are just `base_model.model.` +
path + `.lora_A.weight` / `.lora_B.weight`: no rename table.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. A subclass (not a wrapper) so the frozen weight keeps its HF name."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, device=None, dtype=None, adapter_dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_hparams(rank, alpha, dropout)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(device=device, dtype=adapter_dtype or dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.register_buffer("unmerged_weight", None, persistent=False)  # the exact base weight while merged
        self.merged, self.enabled = False, True
        self.reset_lora()

    def reset_lora(self):
        # PEFT's defaults: A as nn.Linear would init it, B zero, so a fresh adapter leaves the model unchanged
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Adapt `linear`, sharing its weight and bias (no copy). Half-precision bases get fp32 adapters, as PEFT does,
        so the optimizer updates small low-rank factors in full precision."""
        w = linear.weight
        adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        with torch.device("meta"):  # skip initialising a throwaway base weight
            m = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, dropout)
        m.weight, m.bias = linear.weight, linear.bias
        m.lora_A, m.lora_B = (nn.Parameter(torch.empty_like(p, device=w.device, dtype=adapter_dtype))
                              for p in (m.lora_A, m.lora_B))
        m.reset_lora()
        return m.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled or self.merged:
            return y
        # two skinny matmuls instead of materialising B @ A (r << d); inputs cast to the adapter dtype (a no-op under
        # autocast, which casts again) and the update cast back, so bf16 bases with fp32 adapters work either way
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scale * h).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold scale * B A into the weight for zero-overhead evaluation. The base weight is kept aside (one extra copy
        per adapted matrix while merged) so that unmerge() restores it bit for bit, also in bf16."""
        if self.merged:
            return
        if not self.enabled:
            raise ValueError("cannot merge a disabled adapter (leave adapters_disabled first)")
        self.unmerged_weight = self.weight.data
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        self.weight.data = (self.weight.float() + delta).to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.data, self.unmerged_weight = self.unmerged_weight, None
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"

def _check_hparams(rank, alpha, dropout):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def resolve_layers(spec, n_layer: int) -> list[int]:
    """None/"all" -> every layer; "after:L" -> L+1..last; 3 or "3" -> [3]; [2, 3] or "2,3" -> [2, 3]."""
    if spec is None or spec == "all":
        return list(range(n_layer))
    if isinstance(spec, str) and spec.startswith("after:"):  # the paper's choice for JumpReLU SAEs spliced at L
        L = _parse_int(spec[len("after:"):], spec)
        if not 0 <= L < n_layer:
            raise ValueError(f"layers {spec!r}: layer {L} is out of range (this model has layers 0..{n_layer - 1})")
        if L == n_layer - 1:
            raise ValueError(f"layers {spec!r}: no layer comes after the last one ({L}), nothing to adapt")
        return list(range(L + 1, n_layer))
    if isinstance(spec, str):
        spec = [_parse_int(s, spec) for s in spec.split(",")]
    elif isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"layers {spec!r}: expected 'all', 'after:L', a layer index or a non-empty list of them")
    for L in spec:
        if isinstance(L, bool) or not isinstance(L, int) or not 0 <= L < n_layer:
            raise ValueError(f"layers {spec!r}: layer {L!r} is out of range (this model has layers 0..{n_layer - 1})")
    return sorted(set(spec))


def layers_around_saes(spec: str | None, saes, n_layer: int, *, allow_before_jumprelu: bool = False) -> list[int]:
    """The layers to adapt around SAEs [(layer, sae), ...]: `spec` as resolve_layers reads it, "after" for the layers
    after the first SAE; None picks the paper's default: all layers for TopK SAEs, after the SAE for JumpReLU."""
    jump = [layer for layer, s in saes if s.arch == "jumprelu"]
    spec = spec or ("after" if jump else "all")
    layers = resolve_layers(f"after:{saes[0][0]}" if spec == "after" else spec, n_layer)
    # Sec. 4.2: a JumpReLU SAE at layer L reads the output of blocks 0..L; adapting those moves its inputs across the
    # thresholds and changes its sparsity
    bad = [layer for layer in layers if jump and layer <= max(jump)]
    if bad and not allow_before_jumprelu:
        raise ValueError(f"LoRA layers {bad} feed a JumpReLU SAE (layer {max(jump)}) and would change its sparsity; "
                         f"use --lora-layers after, or --allow-before-jumprelu to insist")
    return layers


def _parse_int(s: str, spec) -> int:
    try:
        return int(s.strip())
    except ValueError:
        raise ValueError(f"layers {spec!r}: {s.strip()!r} is not a layer index "
                         "(expected 'all', 'after:L', '3' or '3,4')") from None


def apply_lora(model: nn.Module, rank: int, alpha: float = 32, dropout: float = 0.0, layers=None,
               targets=TARGETS) -> list[nn.Parameter]:
    """Swap the `targets` linears of the chosen `layers` for LoRALinear in place, freeze everything else, and return
    the adapter parameters (the only ones the optimizer should see)."""
    _check_hparams(rank, alpha, dropout)
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters (apply_lora once; load_adapter reuses them)")
    blocks = model.model.layers
    known = sorted({n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)})
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets}; this model's linears are {known}")
    for i in resolve_layers(layers, len(blocks)):
        for name, m in list(blocks[i].named_modules()):
            parent, _, leaf = name.rpartition(".")
            if leaf in targets and isinstance(m, nn.Linear):
                setattr(blocks[i].get_submodule(parent), leaf, LoRALinear.from_linear(m, rank, alpha, dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    params = adapter_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@contextmanager
def _adapters_set(model: nn.Module, enabled: bool, merged_advice: str):
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise ValueError(f"adapters are merged into the weights: unmerge_all(model) {merged_advice}")
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = enabled
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def adapters_disabled(model: nn.Module):
    """The base model inside the block (the paper's p_orig), whatever the adapters hold."""
    return _adapters_set(model, False, "before a base pass")


def adapters_enabled(model: nn.Module):
    """The adapted model as adapt.py trains and evaluates it: every adapter on, beside its weight (W x + scale B A x),
    not merged. In fp32 the same model as merged(model) to float precision; under bf16 autocast not: a merged weight
    is cast to bf16 as one matrix, W + scale B A, which rounds the update onto the bf16 grid of W (its parts below
    half a bf16 step of W are lost), while the training forward keeps the update's own bf16 precision. eval.py's
    adapted settings use this, so that its numbers are adapt.py's."""
    return _adapters_set(model, True, "first")


def merge_all(model: nn.Module):
    """Fold every adapter into its weight (evaluation only: training a merged model leaves the adapters unused)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_all(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


@contextmanager
def merged(model: nn.Module):
    """with merged(model): evaluate(model)  -- exact base weights again on exit."""
    merge_all(model)
    try:
        yield model
    finally:
        unmerge_all(model)
