"""
Sparse autoencoders (TopK, BatchTopK, JumpReLU) in one layout, loading every common release format to identical numbers.

    sae = SAE.from_pretrained("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")   # or a local folder
    x_hat = sae(x)                                    # (..., d_in) -> (..., d_in) reconstruction
    logits = model(idx, hooks={sae.layer: sae})       # spliced into the residual stream (model.py)

Every format is converted at load time to one layout, with any input normalisation folded into the weights, so the
forward pass is always the same few lines:

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      W_enc (d_in, d_sae), b_enc (d_sae)
    z   = TopK-then-ReLU(pre)  |  pre * (pre > threshold)          (k per token; threshold (d_sae) for JumpReLU)
    x_hat = z @ W_dec + b_dec                                      W_dec (d_sae, d_in), b_dec (d_in)

Precision: the encoder (pre-activations, the TopK choice, the JumpReLU threshold test) always runs in fp32, autocast
or not, whatever the storage dtype: the choice of latents is discontinuous, and bf16 pre-activations (8 bits of
mantissa) flip near-ties that fp32 separates. SAELens evaluates in the SAE's dtype (fp32 for Gemma Scope), and the
authors' hooks call such an SAE on the bf16 stream without autocast (utils.py get_sae_hook; run_benchmarks.py casts
the stream to fp32 explicitly). The decoder is continuous in its inputs: it runs in the SAE's dtype (TopK, a sum of k
rows) or under autocast (the dense path), and its output is rounded to the stream's dtype anyway.

TopK never builds the dense (tokens x d_sae) code matrix in `forward`: the encoder returns (values, indices) of the k
kept latents and the decoder sums k rows of W_dec per token (F.embedding_bag). The backward to the input is sparse too
(k columns of W_enc per token): with a TopK SAE the paper trains adapters on the layers before the frozen SAE too, so
every step backpropagates through it (Sec. 3.4; the TopK SAE is eqs. 4-5, JumpReLU Sec. 3.3).
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("topk", "batchtopk", "jumprelu")


# ----------------------------------------------------------------------------------------------------------------------
# Autograd functions


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The kernel K(u) = 1[-1/2 < u < 1/2] of the straight-through estimators in Rajamanoharan et al. (2024)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _threshold_grad(ctx, grad, scale):
    """sum over tokens of -(scale / eps) * K((pre - threshold) / eps) * grad: the pseudo-derivative w.r.t. threshold."""
    pre, threshold = ctx.saved_tensors
    g = -(scale / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad
    return g.sum_to_size(threshold.shape).to(threshold.dtype)


class JumpReLUFn(torch.autograd.Function):
    """z = pre * H(pre - threshold). d z / d pre = H(pre - threshold) (exact away from the jump); the threshold gets
    -(threshold / eps) K((pre - threshold) / eps) (Rajamanoharan et al. 2024, eq. 11). The threshold is a parameter
    itself, not its log."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold) if ctx.needs_input_grad[0] else None
        return grad_pre, _threshold_grad(ctx, grad, threshold) if ctx.needs_input_grad[1] else None, None


class StepFn(torch.autograd.Function):
    """H(pre - threshold), the L0 of the JumpReLU sparsity penalty. Only the threshold gets a gradient,
    -(1 / eps) K((pre - threshold) / eps) (eq. 12); the pre-activations get none, as in the paper."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        return None, _threshold_grad(ctx, grad, 1.0) if ctx.needs_input_grad[1] else None, None


def fp32_region(x: torch.Tensor):
    """Autocast off for the encoder: its matmul runs on fp32 operands, as in an fp32 SAE without autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def jumprelu(pre, threshold, bandwidth: float = 1e-3):
    return JumpReLUFn.apply(pre, threshold, bandwidth)


def step(pre, threshold, bandwidth: float = 1e-3):
    """Per-latent L0 indicator; step(pre, thr, eps).sum(-1).mean() is the JumpReLU sparsity penalty (paper eq. 6)."""
    return StepFn.apply(pre, threshold, bandwidth)


class TopKEncoder(torch.autograd.Function):
    """(values, indices) = top-k of x @ W_enc + b_enc per row, values through ReLU; x is (N, d_in).

    Saves only (N, k) values and indices (plus x when weight gradients are wanted), never the (N, d_sae)
    pre-activations. The input gradient gathers the k selected columns of W_enc per token with embedding_bag:
    grad_x[n] = sum_j g[n, j] * W_enc[:, idx[n, j]]. Weight gradients (only when W_enc / b_enc require grad, e.g.
    train_e2e.py) use a dense fallback: the (N, d_sae) gradient is scattered and multiplied, as the dense path would.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k: int):
        with fp32_region(x):  # fp32 pre-activations and choice (module docstring); no-op casts for fp32 weights
            pre = F.linear(x.float(), W_enc.t().float(), b_enc.float())
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.relu()  # TopK then ReLU, SAELens' order
        ctx.mark_non_differentiable(indices)
        want_weights = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(values, indices, W_enc, x if want_weights else None)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        values, indices, W_enc, x = ctx.saved_tensors
        g = (grad_values * (values > 0)).to(W_enc.dtype)  # ReLU's derivative; unselected latents get nothing
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # W_enc is stored as the transpose of a contiguous (d_sae, d_in) matrix (see SAE._assign), so its columns
            # are contiguous rows here; .contiguous() is a no-op then and a one-off copy otherwise.
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), mode="sum", per_sample_weights=g)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dense = torch.zeros(g.shape[0], W_enc.shape[1], dtype=g.dtype, device=g.device).scatter_(1, indices, g)
            grad_W = x.to(dense.dtype).t() @ dense if ctx.needs_input_grad[1] else None
            grad_b = dense.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, None


# ----------------------------------------------------------------------------------------------------------------------
# The SAE


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, arch: str = "topk", k: int | float | None = None,
                 apply_b_dec_to_input: bool = True, layer: int | None = None, model_name: str | None = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown SAE architecture {arch!r} (expected one of {', '.join(ARCHS)})")
        if arch in ("topk", "batchtopk"):
            if k is None or not k > 0:
                raise ValueError(f"{arch} SAE needs k > 0, got k={k!r}")
            if k > d_sae:
                raise ValueError(f"k={k} is larger than the number of latents d_sae={d_sae}")
            if arch == "topk" and int(k) != k:
                raise ValueError(f"topk SAE needs an integer k, got {k!r}")
        self.d_in, self.d_sae, self.arch = d_in, d_sae, arch
        self.k = (int(k) if arch == "topk" else float(k)) if k is not None and arch != "jumprelu" else None
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.layer, self.model_name, self.hook_name = layer, model_name, None
        self.bandwidth = 1e-3  # JumpReLU STE kernel width (Gemma Scope's value for unit-scale inputs)
        self.min_threshold = 1e-6  # JumpReLU: clamp_threshold_ keeps thresholds at least this (theta > 0, Sec. 3.3)
        self.threshold_lr = 0.01  # BatchTopK: EMA rate of the running threshold (SAELens' topk_threshold_lr)
        kw = dict(device=device, dtype=dtype)
        # Tied initialisation with unit-norm decoder rows (Gao et al. 2024); from_pretrained overwrites all of it.
        W_dec = torch.randn(d_sae, d_in, **kw)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) if W_dec.device.type != "meta" else W_dec
        self._assign(W_enc=W_dec.t(), W_dec=W_dec.clone(), b_enc=torch.zeros(d_sae, **kw),
                     b_dec=torch.zeros(d_in, **kw), threshold=torch.full((d_sae,), 1e-3, **kw))
        if arch == "batchtopk":
            self.register_buffer("topk_threshold", torch.zeros((), **kw))

    def _assign(self, W_enc, W_dec, b_enc, b_dec, threshold=None):
        # W_enc (d_in, d_sae) is stored as the transpose of a contiguous (d_sae, d_in) matrix: the encoder is then an
        # ordinary F.linear, and the sparse backward reads the k selected columns as contiguous rows.
        self.W_enc = nn.Parameter(W_enc.t().contiguous().t())
        self.W_dec = nn.Parameter(W_dec.contiguous())
        self.b_enc = nn.Parameter(b_enc.contiguous())
        self.b_dec = nn.Parameter(b_dec.contiguous())
        if self.arch == "jumprelu":
            self.threshold = nn.Parameter(threshold.contiguous())

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, layer={self.layer}"

    # -- the forward pass ---------------------------------------------------------------------------------------------

    def _encoder_input(self, x):
        x = x.float()
        return x - self.b_dec.float() if self.apply_b_dec_to_input else x

    def pre_acts(self, x):
        """fp32 pre-activations, autocast or not (see the module docstring)."""
        with fp32_region(x):
            return F.linear(self._encoder_input(x), self.W_enc.t().float(), self.b_enc.float())

    def encode(self, x):
        """Dense codes (..., d_sae). For TopK this is the reference path (scatter); forward() never calls it."""
        pre = self.pre_acts(x)
        if self.arch == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if self.arch == "jumprelu":
            return jumprelu(pre, self.threshold, self.bandwidth)
        if self.training:
            return self._batch_topk(pre)
        return jumprelu(pre, self.topk_threshold, self.bandwidth)  # BatchTopK inference: one global threshold

    def _batch_topk(self, pre):
        """BatchTopK (Bussmann et al. 2024): keep the k * n_tokens largest activations of the whole batch, and track the
        smallest kept one with an EMA: that threshold replaces the batch-level selection at inference."""
        acts = pre.relu()
        flat = acts.flatten()
        n_keep = min(int(self.k * (flat.numel() // self.d_sae)), flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        with torch.no_grad():  # no host sync: a batch with no positive activation leaves the threshold as it is
            smallest = torch.where(values > 0, values, torch.inf).min().to(self.topk_threshold.dtype)
            ema = (1 - self.threshold_lr) * self.topk_threshold + self.threshold_lr * smallest
            self.topk_threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.topk_threshold))
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)

    def encode_topk(self, x):
        """(values, indices), each (..., k): the fused sparse encoder (TopK then ReLU)."""
        if self.arch != "topk":
            raise ValueError(f"encode_topk needs a topk SAE, this one is {self.arch}")
        x_in = self._encoder_input(x)
        lead = x_in.shape[:-1]
        values, indices = TopKEncoder.apply(x_in.reshape(-1, self.d_in), self.W_enc, self.b_enc, self.k)
        return values.view(*lead, self.k), indices.view(*lead, self.k)

    def decode(self, z):
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, values, indices):
        """sum_j values[..., j] * W_dec[indices[..., j]] + b_dec without a dense code matrix."""
        k = indices.shape[-1]
        out = F.embedding_bag(indices.reshape(-1, k), self.W_dec, mode="sum",
                              per_sample_weights=values.reshape(-1, k).to(self.W_dec.dtype))
        return out.view(*indices.shape[:-1], self.d_in) + self.b_dec

    def forward(self, x):
        """Reconstruction, in x's dtype (a drop-in replacement for the residual stream it is spliced into)."""
        if not torch.compiler.is_compiling():
            self.check_d_in(x.shape[-1], "SAE input")
        if self.arch == "topk":
            out = self.decode_sparse(*self.encode_topk(x))
        else:
            out = self.decode(self.encode(x))
        return out.to(x.dtype)

    def check_d_in(self, d_model: int, where: str = ""):
        if d_model != self.d_in:
            raise ValueError(f"{where + ': ' if where else ''}the SAE expects d_in={self.d_in} but the model's "
                             f"residual stream has d_model={d_model} (SAE trained for another model?)")

    # -- training support ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """Project out the radial part of each decoder row's gradient, so that Adam steps stay near the unit sphere."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def clamp_threshold_(self):
        """Project JumpReLU thresholds back to >= min_threshold; call after every optimizer step.

        JumpReLU needs theta > 0 (paper Sec. 3.3): below zero, negative pre-activations pass as negative codes. Adam
        moves a parameter by about lr per step whatever its gradient, so a threshold smaller than lr that the
        reconstruction pushes down crosses zero in one step. A projection keeps the threshold itself as the parameter,
        which Adam moves by ~lr in threshold units; SAELens' exp(log_threshold) instead moves by ~threshold * lr, so
        small thresholds freeze (SAELens issue #494, fixed by parameterising the threshold directly in PR #718)."""
        if self.arch == "jumprelu":
            self.threshold.clamp_(min=self.min_threshold)

    def to_jumprelu(self) -> "SAE":
        """A BatchTopK SAE at inference is a JumpReLU SAE whose threshold is the running threshold, for every latent."""
        if self.arch != "batchtopk":
            raise ValueError(f"to_jumprelu converts a batchtopk SAE, this one is {self.arch}")
        out = SAE(self.d_in, self.d_sae, "jumprelu", apply_b_dec_to_input=self.apply_b_dec_to_input, layer=self.layer,
                  model_name=self.model_name, device="meta", dtype=self.W_dec.dtype)
        out._assign(self.W_enc.detach().clone(), self.W_dec.detach().clone(), self.b_enc.detach().clone(),
                    self.b_dec.detach().clone(), self.topk_threshold.detach().expand(self.d_sae).to(self.W_dec.dtype))
        out.hook_name, out.bandwidth, out.min_threshold = self.hook_name, self.bandwidth, self.min_threshold
        return out

    # -- files --------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_path: str, device=None, dtype=None) -> "SAE":
        """Gemma Scope, SAELens (v6 and older), sparsify or Llama Scope, from a local path or a hub path
        `owner/repo/sub/folder`. dtype None keeps the file's dtype."""
        fmt, path = _detect(_resolve(path_or_hub_path))
        spec = LOADERS[fmt](path)
        return _build(spec, source=path, device=device, dtype=dtype)

    def save(self, folder: str):
        """SAELens v6 layout (cfg.json + sae_weights.safetensors), each file written to a temp name then renamed."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        tensors = {n: getattr(self, n).detach().contiguous().cpu() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if self.arch == "jumprelu":
            tensors["threshold"] = self.threshold.detach().contiguous().cpu()
        if self.arch == "batchtopk":
            tensors["topk_threshold"] = self.topk_threshold.detach().cpu()
        hook = self.hook_name or (f"blocks.{self.layer}.hook_resid_post" if self.layer is not None else None)
        cfg = dict(architecture=self.arch, d_in=self.d_in, d_sae=self.d_sae,
                   dtype=str(self.W_dec.dtype).removeprefix("torch."), device="cpu",
                   apply_b_dec_to_input=self.apply_b_dec_to_input, normalize_activations="none",
                   reshape_activations="none",
                   # SAELens reads a config as v6 only if it names a version >= 6; this is the layout version we write
                   metadata=dict(model_name=self.model_name, hook_name=hook, hook_layer=self.layer,
                                 hook_head_index=None, sae_lens_version="6.0.0", sae_lens_training_version="6.0.0"))
        if self.k is not None:
            cfg["k"] = self.k
        tmp = os.path.join(folder, f"sae_weights.safetensors.tmp{os.getpid()}")  # temp names, then rename: a crash
        save_file(tensors, tmp, {"format": "pt"})                                 # never leaves a truncated file
        os.replace(tmp, os.path.join(folder, "sae_weights.safetensors"))
        with open(tmp := os.path.join(folder, f"cfg.json.tmp{os.getpid()}"), "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(folder, "cfg.json"))


# ----------------------------------------------------------------------------------------------------------------------
# Finding the files


FORMATS = [  # (name, files that identify it) in the order they are tried
    ("gemma_scope", ("params.npz",)),
    ("saelens", ("cfg.json", "sae_weights.safetensors")),
    ("sparsify", ("cfg.json", "sae.safetensors")),
    ("llama_scope", ("hyperparams.json", "checkpoints/final.safetensors")),
]
LOOKED_FOR = ("params.npz (Gemma Scope), cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors "
              "(sparsify), hyperparams.json + checkpoints/final.safetensors (Llama Scope)")


def _resolve(path: str) -> str:
    """A local file or folder as is; otherwise `owner/repo[/sub/folder]` downloaded from the hub."""
    if os.path.exists(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") < 1:
        raise FileNotFoundError(f"{path}: no such file or folder (and not a hub path like "
                                f"'google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82')")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    parts = path.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    for _, files in FORMATS:
        try:
            first = [hf_hub_download(repo_id, f, subfolder=sub) for f in files][0]
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(f"{path}: not a local path, and the hub file is not cached or reachable ({e})")
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"{path}: not a local path, and hub repository {repo_id} is not found or not "
                                    f"accessible ({type(e).__name__})") from None
        except EntryNotFoundError:
            continue
        return os.path.dirname(first)
    raise ValueError(f"{path}: unknown SAE format on the hub; looked for {LOOKED_FOR}")


def _detect(path: str) -> tuple[str, str]:
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return "gemma_scope", path
        path = os.path.dirname(path) or "."
    for name, files in FORMATS:
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return name, os.path.join(path, files[0]) if name == "gemma_scope" else path
    raise ValueError(f"{path}: unknown SAE format; looked for {LOOKED_FOR}")


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


def _need(raw: dict, keys, source: str):
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing} (has {sorted(raw)})")


def _layer_from_hook(hook: str | None) -> int | None:
    m = re.match(r"(?:blocks|layers)\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def _layer_from_path(path: str) -> int | None:
    """The deepest folder named like `layer_12` (Gemma Scope) or `layers.12` (sparsify)."""
    for part in reversed(os.path.abspath(path).split(os.sep)):
        m = re.fullmatch(r"layers?[._](\d+)", part)
        if m:
            return int(m.group(1))
    return None


def _fold_decoder_norm(spec: dict, norm: torch.Tensor):
    """Activations chosen on pre * |W_dec row| and decoded with unit rows == pre' = pre * norm, W_dec' = W_dec / norm.
    Dead latents (zero rows) keep norm 1: whatever they fire, they decode to nothing in both."""
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    spec["W_enc"], spec["b_enc"] = spec["W_enc"] * norm, spec["b_enc"] * norm
    spec["W_dec"] = spec["W_dec"] / norm[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# Format loaders: each returns a spec in our layout (float32 where arithmetic was folded in; otherwise the file's dtype)


def _load_gemma_scope(path: str) -> dict:
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
    layer = _layer_from_path(os.path.dirname(path))
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}[kind.group(3)] if kind else None
    return dict(arch="jumprelu", k=None, apply_b_dec_to_input=False, layer=layer,
                model_name=f"google/gemma-2-{kind.group(1)}{'-it' if kind.group(2) == 'it' else ''}" if kind else None,
                hook_name=f"blocks.{layer}.{hook}" if hook and layer is not None else None,
                W_enc=raw["W_enc"], W_dec=raw["W_dec"], b_enc=raw["b_enc"], b_dec=raw["b_dec"],
                threshold=raw["threshold"].clamp_min(0))  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))


def _load_saelens(folder: str) -> dict:
    """cfg.json + sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec, threshold). v6 keeps hook names under
    `metadata`; older configs have `hook_point`, and TopK as activation_fn_str="topk" with activation_fn_kwargs.k."""
    cfg = _read_json(os.path.join(folder, "cfg.json"))
    raw = _read_safetensors(os.path.join(folder, "sae_weights.safetensors"))
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    get = lambda *keys: next((d[k] for k in keys for d in (meta, cfg) if d.get(k) is not None), None)  # noqa: E731
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    k = cfg.get("k") if cfg.get("k") is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "standard":  # plain ReLU is JumpReLU with threshold 0; old TopK SAEs were "standard" + topk act
        arch = "topk" if act == "topk" else "jumprelu" if act == "relu" else arch
        if arch == "jumprelu":
            raw.setdefault("threshold", torch.zeros(raw["b_enc"].shape, dtype=raw["b_enc"].dtype))
    if arch not in ARCHS:
        raise ValueError(f"{folder}: unsupported SAELens architecture {arch!r} (activation {act!r}); "
                         f"supported: {', '.join(ARCHS)}, standard relu")
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
                topk_threshold=raw.get("topk_threshold"))
    layer = get("hook_layer", "hook_point_layer")
    spec["layer"] = int(layer) if layer is not None else _layer_from_hook(spec["hook_name"])
    scale = raw.get("finetuning_scaling_factor", raw.get("scaling_factor"))
    if scale is not None:  # codes are multiplied by it before decoding: the same as scaling the decoder rows
        spec["W_dec"] = spec["W_dec"].float() * scale.float()[:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        spec.update({n: spec[n].float() for n in ("W_enc", "W_dec", "b_enc")})
        _fold_decoder_norm(spec, spec["W_dec"].norm(dim=1))
    return spec


def _load_sparsify(folder: str) -> dict:
    """cfg.json + sae.safetensors: encoder.weight (m, d), encoder.bias, W_dec (m, d), b_dec. sparsify applies ReLU
    before TopK; after it is the same reconstruction (latents it keeps at 0 decode to nothing either way)."""
    cfg = _read_json(os.path.join(folder, "cfg.json"))
    raw = _read_safetensors(os.path.join(folder, "sae.safetensors"))
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in raw:
        raise ValueError(f"{folder}: a sparsify transcoder / skip-connection model, not a sparse autoencoder")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder}: unsupported sparsify activation {cfg['activation']!r} (only topk)")
    _need(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder)
    return dict(arch="topk", k=cfg.get("k"), apply_b_dec_to_input=True, layer=_layer_from_path(folder),
                model_name=None, hook_name=None, W_enc=raw["encoder.weight"].t(), W_dec=raw["W_dec"],
                b_enc=raw["encoder.bias"], b_dec=raw["b_dec"])


def _load_llama_scope(folder: str) -> dict:
    """hyperparams.json + checkpoints/final.safetensors (OpenMOSS lm-saes). Its arithmetic, folded into our layout:
        x' = x * c_in (- b_D if apply_decoder_bias_to_pre_encoder),  c = sqrt(d) / dataset_average_activation_norm
        h = x' @ encoder.weight.T + encoder.bias;  z = h * (h * n > t)   n = |decoder column| if
        sparsity_include_decoder_norm else 1, t = jump_relu_threshold (a scalar, in the normalised space)
        x_hat = (z @ decoder.weight.T + decoder.bias) / c_out"""
    hp = _read_json(os.path.join(folder, "hyperparams.json"))
    raw = _read_safetensors(os.path.join(folder, "checkpoints", "final.safetensors"))
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
    spec = dict(arch="jumprelu", k=None, apply_b_dec_to_input=False, layer=_layer_from_hook(hook_in),
                model_name=hp.get("model_name"), hook_name=hook_in, W_enc=W_E.t() * c_in, b_enc=b_enc,
                W_dec=W_D.t() / c_out, b_dec=b_D / c_out, threshold=threshold,
                dtype=raw["encoder.weight"].dtype)
    if hp.get("sparsity_include_decoder_norm", True):
        _fold_decoder_norm(spec, W_D.norm(dim=0))
    return spec


LOADERS = {"gemma_scope": _load_gemma_scope, "saelens": _load_saelens, "sparsify": _load_sparsify,
           "llama_scope": _load_llama_scope}


def _build(spec: dict, source: str, device, dtype) -> SAE:
    """Check shapes and values once, then put the tensors into an SAE (no random init for the real sizes)."""
    W_enc, W_dec = spec["W_enc"], spec["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2:
        raise ValueError(f"{source}: W_enc and W_dec must be matrices, got {tuple(W_enc.shape)}, {tuple(W_dec.shape)}")
    d_in, d_sae = W_enc.shape
    shapes = dict(W_enc=(d_in, d_sae), W_dec=(d_sae, d_in), b_enc=(d_sae,), b_dec=(d_in,), threshold=(d_sae,))
    for name, shape in shapes.items():
        t = spec.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape} for d_in={d_in}, "
                             f"d_sae={d_sae}")
    for name in (*shapes, "topk_threshold"):
        t = spec.get(name)
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{source}: {name} contains NaN or inf values (corrupt or diverged SAE)")
    dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    dtype = dtype or spec.get("dtype") or W_dec.dtype
    try:
        sae = SAE(d_in, d_sae, spec["arch"], k=spec.get("k"), apply_b_dec_to_input=spec["apply_b_dec_to_input"],
                  layer=spec.get("layer"), model_name=spec.get("model_name"), device="meta", dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    cast = lambda t: t.to(device=device or "cpu", dtype=dtype) if t is not None else None  # noqa: E731
    sae._assign(*(cast(spec.get(n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")))
    if sae.arch == "batchtopk":
        sae.topk_threshold = cast(spec["topk_threshold"] if spec.get("topk_threshold") is not None
                                  else torch.zeros(())).reshape(())
    sae.hook_name = spec.get("hook_name")
    return sae.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Splicing into a model


def splice_hooks(saes: list[tuple[int, "SAE"]], idx: torch.Tensor, bos_id: int | None, splice_bos: bool = False):
    """hooks for model(..., hooks=...): the stream after block L becomes SAE_L(stream); BOS rows optionally kept."""
    keep = (idx == bos_id)[..., None] if (bos_id is not None and not splice_bos) else None

    def make(sae):
        def hook(x):
            recon = sae(x.reshape(-1, x.shape[-1])).view_as(x).to(x.dtype)
            return recon if keep is None else torch.where(keep, x, recon)
        return hook
    return {layer: make(sae) for layer, sae in saes}
