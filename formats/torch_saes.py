"""
SAE files written with torch.save, read into formats/sae_files.py's spec (its LOADERS call these): dictionary_learning's
`ae.pt` + `config.json` (saprmarks/dictionary_learning; SAEBench's SAEs and Karvonen's Qwen3 SAEs are published in it)
and Qwen Scope's `layerN.sae.pt` (Qwen3 / Qwen3.5 TopK SAEs, as SAELens' qwen_scope loader reads them). Each file is
read with weights_only: no pickled code runs.
"""
from __future__ import annotations

import os
import re

import torch

from formats import disk


def need(raw: dict, keys, source: str):
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing} (has {sorted(raw)})")


def fold_decoder_norm(spec: dict, norm: torch.Tensor):
    """Activations chosen on pre * |W_dec row| and decoded with unit rows == pre' = pre * norm, W_dec' = W_dec / norm
    (dictionary_learning's AutoEncoder.normalize_decoder; Llama Scope's and SAELens' decoder-norm rescaling). Dead
    latents (zero rows) keep norm 1: whatever they fire, they decode to nothing in both."""
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    spec["W_enc"], spec["b_enc"] = spec["W_enc"] * norm, spec["b_enc"] * norm
    spec["W_dec"] = spec["W_dec"] / norm[:, None]


def _read_torch(path: str) -> dict:
    """A torch.save'd dict of tensors, read without running any pickled code (weights_only)."""
    try:
        out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle: what torch raises varies by version
        raise ValueError(f"{path}: unreadable torch file ({str(e).strip().splitlines()[0][:160]})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(out).__name__}")
    return out


# dictionary_learning's classes (dictionary.py, trainers/*.py), by the `dict_class` its training.py writes to
# config.json's "trainer"; each encodes and decodes as
#   AutoEncoder             f = relu(encoder(x - bias)),                    x_hat = decoder(f) + bias
#   AutoEncoderNew          f = relu(encoder(x)),                           x_hat = decoder(f)        (decoder has a bias)
#   GatedAutoEncoder        e = encoder(x - decoder_bias); f = 1[e + gate_bias > 0] * relu(exp(r_mag) e + mag_bias),
#                                                                           x_hat = decoder(f) + decoder_bias
#   JumpReluAutoEncoder     p = x @ W_enc + b_enc; f = relu(p * (p > threshold)),  x_hat = f @ W_dec + b_dec
#   AutoEncoderTopK         f = TopK(relu(encoder(x - b_dec)), k),          x_hat = decoder(f) + b_dec
#   BatchTopKSAE            f = r * (r > threshold), r = relu(encoder(x - b_dec))   (inference: its global threshold)
#   MatryoshkaBatchTopKSAE  the same with W_enc (d, m) / W_dec (m, d) parameters, b_enc, b_dec
# Trained with normalize_activations, the final ae.pt already holds scale_biases(norm_factor) weights (training.py
# rescales the biases and thresholds before saving: ReLU, TopK and the thresholds are positively homogeneous), so it
# reads raw activations and config.json's norm_factor is only a record; a mid-training backup ({"ae": ..., "norm_factor":
# ...}) is rescaled here the same way.
_DL_BIASES = {"AutoEncoder": ("encoder.bias", "bias"), "AutoEncoderNew": ("encoder.bias", "decoder.bias"),
              "GatedAutoEncoder": ("decoder_bias", "mag_bias", "gate_bias"),
              "JumpReluAutoEncoder": ("b_dec", "b_enc", "threshold"), "AutoEncoderTopK": ("encoder.bias", "b_dec"),
              "BatchTopKSAE": ("encoder.bias", "b_dec"), "MatryoshkaBatchTopKSAE": ("b_enc", "b_dec")}


def load_dictionary_learning(folder: str) -> dict:
    """ae.pt + config.json as dictionary_learning's utils.load_dictionary (and SAEBench's custom_saes loaders) read
    them, converted to our layout (the formulas above); decoder rows of a ReLU AutoEncoder are normalised as its
    from_pretrained does (the reconstruction is unchanged)."""
    cfg = disk.read_json(os.path.join(folder, "config.json"), f"{folder}: no config.json")
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    cls = trainer.get("dict_class")
    if cls not in _DL_BIASES:
        raise ValueError(f"{folder}: unsupported dictionary_learning dict_class {cls!r} in config.json (supported: "
                         f"{', '.join(_DL_BIASES)})")
    raw = _read_torch(os.path.join(folder, "ae.pt"))
    norm_factor = None
    if isinstance(raw.get("ae"), dict):  # a backup written during training: weights still in normalised units
        raw, norm_factor = raw["ae"], raw.get("norm_factor")
    raw = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
    if norm_factor:  # what training.py's scale_biases(norm_factor) does before its final save
        for name in _DL_BIASES[cls]:
            if name in raw:
                raw[name] = raw[name] * norm_factor
        if cls.endswith(("TopK", "TopKSAE")) and "threshold" in raw and float(raw["threshold"]) >= 0:
            raw["threshold"] = raw["threshold"] * norm_factor
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    if sub is not None and "resid" not in str(sub):
        raise ValueError(f"{folder}: a dictionary on {sub!r}: only residual-stream dictionaries are supported")
    spec = dict(layer=layer, model_name=trainer.get("lm_name"),
                hook_name=f"blocks.{layer}.hook_resid_post" if layer is not None else None)
    linear = ("encoder.weight", "decoder.weight")
    if cls == "AutoEncoder":
        need(raw, (*linear, "encoder.bias", "bias"), folder)
        spec.update(arch="jumprelu", k=None, apply_b_dec_to_input=True, W_enc=raw["encoder.weight"].t(),
                    b_enc=raw["encoder.bias"], W_dec=raw["decoder.weight"].t(), b_dec=raw["bias"],
                    threshold=torch.zeros(raw["encoder.bias"].shape))
        fold_decoder_norm(spec, raw["decoder.weight"].norm(dim=0))
    elif cls == "AutoEncoderNew":
        need(raw, (*linear, "encoder.bias", "decoder.bias"), folder)
        spec.update(arch="jumprelu", k=None, apply_b_dec_to_input=False, W_enc=raw["encoder.weight"].t(),
                    b_enc=raw["encoder.bias"], W_dec=raw["decoder.weight"].t(), b_dec=raw["decoder.bias"],
                    threshold=torch.zeros(raw["encoder.bias"].shape))
    elif cls == "GatedAutoEncoder":
        # with the weight sharing of Rajamanoharan et al. (2024), the gate e + gate_bias > 0 is the magnitude's
        # pre-activation p = exp(r_mag) e + mag_bias above mag_bias - exp(r_mag) gate_bias: a JumpReLU SAE
        need(raw, (*linear, "decoder_bias", "r_mag", "gate_bias", "mag_bias"), folder)
        scale = raw["r_mag"].exp()
        spec.update(arch="jumprelu", k=None, apply_b_dec_to_input=True, W_enc=raw["encoder.weight"].t() * scale,
                    b_enc=raw["mag_bias"], W_dec=raw["decoder.weight"].t(), b_dec=raw["decoder_bias"],
                    threshold=(raw["mag_bias"] - scale * raw["gate_bias"]).clamp_min(0))
    elif cls == "JumpReluAutoEncoder":
        need(raw, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), folder)
        spec.update(arch="jumprelu", k=None, apply_b_dec_to_input=False, W_enc=raw["W_enc"], b_enc=raw["b_enc"],
                    W_dec=raw["W_dec"], b_dec=raw["b_dec"], threshold=raw["threshold"].clamp_min(0))
    else:  # the TopK family: k from config.json, as load_dictionary passes it, else the state dict's buffer
        k = trainer.get("k") if trainer.get("k") is not None else raw.get("k")
        k = int(k) if k is not None else None
        if cls == "MatryoshkaBatchTopKSAE":
            need(raw, ("W_enc", "b_enc", "W_dec", "b_dec"), folder)
            W_enc, b_enc, W_dec = raw["W_enc"], raw["b_enc"], raw["W_dec"]
        else:
            need(raw, (*linear, "encoder.bias", "b_dec"), folder)
            W_enc, b_enc, W_dec = raw["encoder.weight"].t(), raw["encoder.bias"], raw["decoder.weight"].t()
        spec.update(k=k, apply_b_dec_to_input=True, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=raw["b_dec"])
        if cls == "AutoEncoderTopK":  # its default encode is the per-token TopK (the threshold buffer is optional)
            spec["arch"] = "topk"
        else:
            threshold = raw.get("threshold")
            if threshold is None or float(threshold) < 0:
                raise ValueError(f"{folder}: a {cls} whose inference threshold was never set (threshold "
                                 f"{None if threshold is None else float(threshold)}); SAEBench refuses it too")
            spec.update(arch="batchtopk", topk_threshold=threshold.reshape(()))
    return spec


# Qwen Scope (Qwen/SAE-Res-{model}-W{width}K-L0_{k}, one layer{n}.sae.pt per layer; SAELens' qwen_scope loader and the
# Qwen Scope report): W_enc (d_sae, d_in), W_dec (d_in, d_sae), b_enc, b_dec; pre = x @ W_enc.T + b_enc (the input not
# shifted by b_dec), TopK then ReLU with k the repo name's L0, x_hat = f @ W_dec.T + b_dec; block n's output.
QWEN_SCOPE_SUFFIX = ".sae.pt"
_QWEN_SCOPE_REPO = re.compile(r"SAE-Res-(.+?)-W\d+K-L0_(\d+)")


def load_qwen_scope(path: str) -> dict:
    raw = _read_torch(path)
    need(raw, ("W_enc", "W_dec", "b_enc", "b_dec"), path)
    m = re.fullmatch(r"layer(\d+)\.sae\.pt", os.path.basename(path))
    repo = None
    for part in reversed(os.path.abspath(path).split(os.sep)):  # the repo's folder, or the hub cache's models--Qwen--...
        repo = _QWEN_SCOPE_REPO.search(part)
        if repo:
            break
    if repo is None:
        raise ValueError(f"{path}: k of a Qwen Scope SAE comes from its repo's name (SAE-Res-MODEL-WnK-L0_K): keep the "
                         f"file in a folder named like its repo")
    return dict(arch="topk", k=int(repo.group(2)), apply_b_dec_to_input=False, layer=int(m.group(1)) if m else None,
                model_name=f"Qwen/{repo.group(1)}",
                hook_name=f"blocks.{m.group(1)}.hook_resid_post" if m else None,
                W_enc=raw["W_enc"].t(), W_dec=raw["W_dec"].t(), b_enc=raw["b_enc"], b_dec=raw["b_dec"])
