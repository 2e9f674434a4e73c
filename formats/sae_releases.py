"""
How each SAE release lays out its files, converted to our layout (sae.py's `SAE`): one reader per format, returning a
spec (tensors and settings, any input normalisation folded into the weights) that formats/sae_files.py checks and
builds an SAE from; and the names releases give layers and hook points.

    Gemma Scope   params.npz                                   load_gemma_scope
    Gemma Scope 2 params.safetensors (+ config.json)           load_gemma_scope_2  (Gemma-3; google/gemma-scope-2-*)
    SAELens       cfg.json + sae_weights.safetensors           load_saelens        (v6 and older configs)
    sparsify      cfg.json + sae.safetensors                   load_sparsify       (EleutherAI; the paper's own SAEs)
    Llama Scope   hyperparams.json + checkpoints/final.safetensors   load_llama_scope
(dictionary_learning's ae.pt and Qwen Scope's layerN.sae.pt: formats/torch_saes.py.)
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch

from formats.torch_saes import fold_decoder_norm as _fold_decoder_norm

# ----------------------------------------------------------------------------------------------------------------------
# Layers from names

_LAYER_NAMES = [
    re.compile(r"(?:\w+\.)*layers?[._](\d+)"),     # layers.12, model.layers.12 (sparsify), layer_12 (Gemma Scope)
    re.compile(r"layer_(\d+)_width_\w+"),          # Gemma Scope 2: layer_12_width_16k_l0_small
    re.compile(r"blocks\.(\d+)\.hook_resid_post"),  # a SAELens hook name as the folder name
    re.compile(r"(?:.*[-_])?L(\d+)R(?:[-_].*)?"),     # Llama Scope: L12R, Llama3_1-8B-Base-L12R-8x
]


def layer_from_hook(hook: str | None) -> int | None:
    """The block whose output the hook reads: blocks.L.hook_resid_post and (model.)layers.L are block L's output,
    blocks.L.hook_resid_pre is block L-1's. Other hooks of block L (mlp_out, attn) give L."""
    m = re.match(r"(?:\w+\.)*(?:blocks|layers)\.(\d+)(?:\.(\w+))?", hook or "")
    if not m:
        return None
    layer = int(m.group(1))
    if m.group(2) == "hook_resid_pre":
        return layer - 1 if layer > 0 else None
    return layer


# What the splice can replace (model.Block.forward's sites), by SAELens hook name. TransformerLens defines Gemma-2's
# hook_attn_out and hook_mlp_out after the sublayer's post-norm (TransformerBlock: ln1_post / ln2_post, then the
# hook); attn.hook_z is every head's output before W_O (o_proj's input, Gemma Scope 2's hf_hook_point_in
# model.layers.L.self_attn.o_proj.input; SAELens reshapes it to n_head * d_head for the SAE).
_SITES = [(re.compile(r"(?:\w+\.)*(?:blocks\.\d+\.hook_resid_(?:post|pre)|layers\.\d+(?:\.output)?)"), "resid"),
          (re.compile(r"blocks\.\d+\.attn\.hook_z"), "attn_z"),
          (re.compile(r"blocks\.\d+\.hook_attn_out"), "attn_out"),
          (re.compile(r"blocks\.\d+\.hook_mlp_out"), "mlp_out")]
SERVED = ("blocks.L.hook_resid_post (or hook_resid_pre), blocks.L.attn.hook_z, blocks.L.hook_attn_out, "
          "blocks.L.hook_mlp_out, and MLP transcoders (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out)")


def hook_site(hook: str | None) -> str | None:
    """Where an SAE reading `hook` is spliced: "resid" (the stream after a block; also when no hook is named, as for
    sparsify and hand-made folders), "attn_z", "attn_out" or "mlp_out" (inside block L: model.Block.forward), or
    None for a hook the splice cannot serve."""
    if hook is None:
        return "resid"
    return next((site for pattern, site in _SITES if pattern.fullmatch(hook)), None)


def layer_from_path(path: str) -> int | None:
    """The layer named by the deepest folder called like one (see _LAYER_NAMES), or None."""
    for part in reversed(os.path.abspath(path).split(os.sep)):
        for pattern in _LAYER_NAMES:
            m = pattern.fullmatch(part)
            if m:
                return int(m.group(1))
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Readers and format converters: each converter returns a spec in our layout (float32 where arithmetic was folded in;
# otherwise the file's dtype)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _check_cfg(cfg, path: str, shape: tuple[int, int], *, d_in=(), d_sae=(), k=None, flags=(), texts=()):
    """One ValueError line naming the file and the first key whose value is of the wrong type (null where a value is
    needed counts as missing and is left to the defaults), or contradicts the weights: `shape` is (d_in, d_sae) of
    W_enc; d_in / d_sae: the keys that state them (0 or null: not stated); k: the key path of TopK's k."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")

    def bad(key, value, what):
        raise ValueError(f"{path}: {key} is {json.dumps(value)}, {what}; restore the file or fix that value")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for keys, size, name in ((d_in, shape[0], "d_in"), (d_sae, shape[1], "d_sae")):
        for key in keys:
            v = cfg.get(key)
            if v is not None and not is_int(v):
                bad(key, v, "expected a whole number")
            if v and size and v != size:
                bad(key, v, f"but the weights have {name} {size} (W_enc is {shape[0]} x {shape[1]})")
    if k is not None:
        v, where = cfg, []
        for part in k:
            where.append(part)
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            bad(".".join(where), v, "expected a number of active latents (at least 1)")
        if v is not None and shape[1] and v > shape[1]:
            bad(".".join(where), v, f"larger than the number of latents of the weights (d_sae {shape[1]})")
    for key in flags:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            bad(key, cfg[key], "expected true or false")
    for key in texts:
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            bad(key, cfg[key], "expected a string")


def _shape(W) -> tuple[int, int]:
    """(rows, columns) of an encoder matrix; (0, 0) when there is none (its absence is reported by _need)."""
    return tuple(W.shape) if W is not None and W.dim() == 2 else (0, 0)


def _need(raw: dict, keys, source: str):
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing} (has {sorted(raw)})")


def load_gemma_scope(path: str) -> dict:
    """params.npz: W_enc (d, m), W_dec (m, d), b_enc, b_dec, threshold; z = (pre > threshold) * relu(pre); the input
    is not shifted by b_dec."""
    try:
        with np.load(path) as f:
            raw = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(f[k].copy()) for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt params.npz ({e})") from None
    if "threshold" not in raw:
        raise ValueError(f"{path}: JumpReLU SAE without a threshold tensor (has {sorted(raw)})")
    _need(raw, ("W_enc", "W_dec", "b_enc", "b_dec"), path)
    kind = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)", path)
    layer = layer_from_path(os.path.dirname(path))
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}[kind.group(3)] if kind else None
    return dict(arch="jumprelu", k=None, apply_b_dec_to_input=False, layer=layer,
                model_name=f"google/gemma-2-{kind.group(1)}{'-it' if kind.group(2) == 'it' else ''}" if kind else None,
                hook_name=f"blocks.{layer}.{hook}" if hook and layer is not None else None,
                W_enc=raw["W_enc"], W_dec=raw["W_dec"], b_enc=raw["b_enc"], b_dec=raw["b_dec"],
                threshold=raw["threshold"].clamp_min(0))  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))


# Gemma Scope 2's sites: the release folder (resid_post_all/, attn_out/, ...) or config.json's hf_hook_point_in
# (transformers module paths) -> the SAELens hook name
_GS2_SITES = [(re.compile(r"resid_post(_all)?"), re.compile(r"model\.layers\.\d+\.output"), "hook_resid_post"),
              (re.compile(r"attn_out(_all)?"), re.compile(r".*self_attn\.o_proj\.input"), "attn.hook_z"),
              (re.compile(r"mlp_out(_all)?"), re.compile(r".*post_feedforward_layernorm\.output"), "hook_mlp_out")]


def load_gemma_scope_2(folder: str) -> dict:
    """Gemma Scope 2 (Gemma-3), as SAELens' gemma_3 loader reads it: params.safetensors with w_enc (d, m), w_dec
    (m, d), b_enc, b_dec, threshold; config.json with architecture "jump_relu", model_name, hf_hook_point_in. The
    same JumpReLU as Gemma Scope: z = (pre > threshold) * relu(pre), pre = x @ w_enc + b_enc (the input not shifted
    by b_dec), x_hat = z @ w_dec + b_dec. Transcoders (transcoder_all/: hf_hook_point_out, maybe an
    affine_skip_connection) map block L's normalised MLP input (pre_feedforward_layernorm's output) to its MLP
    sublayer's output (post_feedforward_layernorm's); the splice replaces that sublayer with them. The release applies
    every matrix as x @ W, the skip too: its tutorial's JumpReLUSAE returns recon + x @ affine_skip_connection, and
    SAELens' loader stores W_skip = affine_skip_connection.T for its x @ W_skip.T, as here."""
    cfg_path = os.path.join(folder, "config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    raw = _read_safetensors(os.path.join(folder, "params.safetensors"))
    _check_cfg(cfg, cfg_path, _shape(raw.get("w_enc")),
               texts=("architecture", "model_name", "hf_hook_point_in", "hf_hook_point_out"))
    site = os.path.basename(os.path.dirname(os.path.abspath(folder)))
    transcoder = bool(cfg.get("hf_hook_point_out")) or "affine_skip_connection" in raw or site.startswith("transcoder")
    if site.startswith("clt") or raw.get("w_dec", torch.zeros(0, 0)).dim() != 2:
        raise ValueError(f"{folder}: a Gemma Scope 2 cross-layer transcoder (clt/): not supported; pass a resid_post "
                         f"SAE or a transcoder_all/ transcoder")
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(f"{folder}: unsupported Gemma Scope 2 architecture {cfg['architecture']!r} (only jump_relu)")
    _need(raw, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), folder)
    hook_in = cfg.get("hf_hook_point_in") or ""
    hook = next((h for by_site, by_hook, h in _GS2_SITES if by_hook.fullmatch(hook_in) or by_site.fullmatch(site)),
                None)
    layer = layer_from_hook(hook_in) if hook_in else layer_from_path(folder)
    if transcoder:  # SAELens' names for the MLP's normalised input and its output
        hook = "ln2.hook_normalized"
    model_name = cfg.get("model_name")
    if model_name:  # as SAELens: "gemma-v3-1b-pt" and the like name google/gemma-3-1b-pt
        model_name = ("" if "google" in model_name else "google/") + model_name.replace("-v3", "-3")
    else:
        kind = re.search(r"gemma-scope-2-(\d+[mb])-(pt|it)", os.path.abspath(folder))
        model_name = f"google/gemma-3-{kind.group(1)}-{kind.group(2)}" if kind else None
    return dict(arch="jumprelu", k=None, apply_b_dec_to_input=False, layer=layer, model_name=model_name,
                hook_name=f"blocks.{layer}.{hook}" if hook and layer is not None else None,
                W_enc=raw["w_enc"], W_dec=raw["w_dec"], b_enc=raw["b_enc"], b_dec=raw["b_dec"],
                threshold=raw["threshold"].clamp_min(0),  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))
                transcoder=transcoder, W_skip=raw["affine_skip_connection"].T.contiguous()
                if "affine_skip_connection" in raw else None)


def load_saelens(folder: str) -> dict:
    """cfg.json + sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec, threshold). v6 keeps hook names under
    `metadata`; older configs have `hook_point`, and TopK as activation_fn_str="topk" with activation_fn_kwargs.k."""
    cfg = _read_json(os.path.join(folder, "cfg.json"))
    raw = _read_safetensors(os.path.join(folder, "sae_weights.safetensors"))
    for key in ("metadata", "meta", "activation_fn_kwargs"):
        if isinstance(cfg, dict) and cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"{os.path.join(folder, 'cfg.json')}: {key} is {json.dumps(cfg[key])}, expected an "
                             f"object; restore the file or fix that value")
    _check_cfg(cfg, os.path.join(folder, "cfg.json"), _shape(raw.get("W_enc")), d_in=("d_in",),
               d_sae=("d_sae",), k=("k",) if isinstance(cfg, dict) and cfg.get("k") is not None else
               ("activation_fn_kwargs", "k"), flags=("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"),
               texts=("architecture", "activation_fn_str", "hook_name", "hook_point", "model_name"))
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    _check_cfg(meta, os.path.join(folder, "cfg.json") + " metadata", _shape(raw.get("W_enc")),
               texts=("hook_name", "model_name", "hook_name_out"))
    if meta.get("hook_layer", cfg.get("hook_layer")) is not None and not isinstance(
            meta.get("hook_layer", cfg.get("hook_layer")), int):
        raise ValueError(f"{os.path.join(folder, 'cfg.json')}: hook_layer is "
                         f"{json.dumps(meta.get('hook_layer', cfg.get('hook_layer')))}, expected a layer index")
    get = lambda *keys: next((d[k] for k in keys for d in (meta, cfg) if d.get(k) is not None), None)  # noqa: E731
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    k = cfg.get("k") if cfg.get("k") is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "standard":  # plain ReLU is JumpReLU with threshold 0; old TopK SAEs were "standard" + topk act
        arch = "topk" if act == "topk" else "jumprelu" if act == "relu" else arch
        if arch == "jumprelu":
            raw.setdefault("threshold", torch.zeros(raw["b_enc"].shape, dtype=raw["b_enc"].dtype))
    if arch not in ("topk", "batchtopk", "jumprelu"):  # what sae.SAE implements (sae.ARCHS)
        raise ValueError(f"{folder}: unsupported SAELens architecture {arch!r} (activation {act!r}); "
                         f"supported: topk, batchtopk, jumprelu, standard relu")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(f"{folder}: normalize_activations={norm!r} needs a scale that is not stored with the weights; "
                         f"fold it into W_enc / W_dec / b_dec first")
    if arch == "jumprelu" and "threshold" not in raw and "log_threshold" in raw:
        raw["threshold"] = raw.pop("log_threshold").exp()  # SAELens training checkpoints
    if arch == "jumprelu" and "threshold" not in raw:
        raise ValueError(f"{folder}: JumpReLU SAE without a threshold tensor (has {sorted(raw)})")
    _need(raw, ("W_enc", "W_dec", "b_enc", "b_dec"), folder)
    spec = dict(arch=arch, k=k, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                model_name=get("model_name"), hook_name=get("hook_name", "hook_point"),
                W_enc=raw["W_enc"], W_dec=raw["W_dec"], b_enc=raw["b_enc"], b_dec=raw["b_dec"],
                threshold=raw["threshold"].clamp_min(0) if arch == "jumprelu" else None,
                topk_threshold=raw.get("topk_threshold"), W_skip=raw.get("W_skip"),
                transcoder=get("hook_name_out") is not None)
    if get("hook_head_index") is not None:  # a single head's hook_z: the splice replaces all heads at once
        raise ValueError(f"{folder}: an SAE on head {get('hook_head_index')} of {spec['hook_name']} only: not "
                         f"supported; the splice serves {SERVED}")
    layer = layer_from_hook(spec["hook_name"])  # the hook name first: hook_layer is the block, also for resid_pre
    if layer is None and get("hook_layer", "hook_point_layer") is not None:
        layer = int(get("hook_layer", "hook_point_layer"))
    spec["layer"] = layer
    scale = raw.get("finetuning_scaling_factor", raw.get("scaling_factor"))
    if scale is not None:  # codes are multiplied by it before decoding: the same as scaling the decoder rows
        spec["W_dec"] = spec["W_dec"].float() * scale.float()[:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        spec.update({n: spec[n].float() for n in ("W_enc", "W_dec", "b_enc")})
        _fold_decoder_norm(spec, spec["W_dec"].norm(dim=1))
    return spec


def load_sparsify(folder: str) -> dict:
    """cfg.json + sae.safetensors: encoder.weight (m, d), encoder.bias, W_dec (m, d), b_dec. sparsify applies ReLU
    before TopK; after it is the same reconstruction (latents it keeps at 0 decode to nothing either way)."""
    cfg = _read_json(os.path.join(folder, "cfg.json"))
    raw = _read_safetensors(os.path.join(folder, "sae.safetensors"))
    _check_cfg(cfg, os.path.join(folder, "cfg.json"), _shape(raw.get("encoder.weight"))[::-1], d_in=("d_in",),
               d_sae=("num_latents",), k=("k",),
               flags=("transcode", "skip_connection"), texts=("activation",))
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in raw:
        raise ValueError(f"{folder}: a sparsify transcoder / skip-connection model, not a sparse autoencoder")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder}: unsupported sparsify activation {cfg['activation']!r} (only topk)")
    _need(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder)
    return dict(arch="topk", k=cfg.get("k"), apply_b_dec_to_input=True, layer=layer_from_path(folder),
                model_name=None, hook_name=None, W_enc=raw["encoder.weight"].t(), W_dec=raw["W_dec"],
                b_enc=raw["encoder.bias"], b_dec=raw["b_dec"])


def load_llama_scope(folder: str) -> dict:
    """hyperparams.json + checkpoints/final.safetensors (OpenMOSS lm-saes). Its arithmetic, folded into our layout:
        x' = x * c_in (- b_D if apply_decoder_bias_to_pre_encoder),  c = sqrt(d) / dataset_average_activation_norm
        h = x' @ encoder.weight.T + encoder.bias;  z = h * (h * n > t)   n = |decoder column| if
        sparsity_include_decoder_norm else 1, t = jump_relu_threshold (a scalar, in the normalised space)
        x_hat = (z @ decoder.weight.T + decoder.bias) / c_out"""
    hp = _read_json(os.path.join(folder, "hyperparams.json"))
    raw = _read_safetensors(os.path.join(folder, "checkpoints", "final.safetensors"))
    _check_cfg(hp, os.path.join(folder, "hyperparams.json"), _shape(raw.get("encoder.weight"))[::-1],
               d_in=("d_model",), d_sae=("d_sae",),
               flags=("use_glu_encoder", "use_decoder_bias", "apply_decoder_bias_to_pre_encoder",
                      "sparsity_include_decoder_norm"),
               texts=("hook_point_in", "hook_point_out", "act_fn", "norm_activation", "model_name"))
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise ValueError(f"{folder}: a transcoder ({hook_in} -> {hook_out}), not a sparse autoencoder")
    act = hp.get("act_fn", "jumprelu").lower()
    if act not in ("jumprelu", "relu") or hp.get("use_glu_encoder"):
        raise ValueError(f"{folder}: unsupported Llama Scope encoder (act_fn={act!r}, glu={hp.get('use_glu_encoder')})")
    _need(raw, ("encoder.weight", "encoder.bias", "decoder.weight"), folder)
    W_E, b_E, W_D = raw["encoder.weight"].float(), raw["encoder.bias"].float(), raw["decoder.weight"].float()
    d = W_E.shape[1]
    b_D = raw["decoder.bias"].float() if hp.get("use_decoder_bias", True) else torch.zeros(d)
    mode = hp.get("norm_activation", "dataset-wise")
    if mode == "dataset-wise":
        norms = hp.get("dataset_average_activation_norm") or {
            k.split(".", 1)[1]: v.item() for k, v in raw.items() if k.startswith("dataset_average_activation_norm.")}
        try:
            c_in, c_out = (math.sqrt(d) / norms[s] if s in norms else math.sqrt(d) / norms[h]
                           for s, h in (("in", hook_in), ("out", hook_out)))
        except (KeyError, TypeError):
            raise ValueError(f"{folder}: norm_activation=dataset-wise but no dataset_average_activation_norm") from None
    elif mode == "inference":
        c_in = c_out = 1.0
    else:
        raise ValueError(f"{folder}: norm_activation={mode!r} depends on each input and cannot be folded into weights")
    b_enc = b_E - W_E @ b_D if hp.get("apply_decoder_bias_to_pre_encoder", False) else b_E
    if "log_jumprelu_threshold" in raw:
        threshold = raw["log_jumprelu_threshold"].float().exp()
    elif act == "relu":
        threshold = torch.zeros(W_E.shape[0])
    elif "jump_relu_threshold" in hp:
        threshold = torch.full((W_E.shape[0],), float(hp["jump_relu_threshold"]))
    else:
        raise ValueError(f"{folder}: JumpReLU SAE without jump_relu_threshold in hyperparams.json")
    spec = dict(arch="jumprelu", k=None, apply_b_dec_to_input=False, layer=layer_from_hook(hook_in),
                model_name=hp.get("model_name"), hook_name=hook_in, W_enc=W_E.t() * c_in, b_enc=b_enc,
                W_dec=W_D.t() / c_out, b_dec=b_D / c_out, threshold=threshold,
                dtype=raw["encoder.weight"].dtype)
    if hp.get("sparsity_include_decoder_norm", True):
        _fold_decoder_norm(spec, W_D.norm(dim=0))
    return spec
