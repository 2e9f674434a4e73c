"""
Sparse autoencoders (TopK, BatchTopK, JumpReLU) in one layout; formats/sae_files.py loads every common release format
into it to identical numbers.

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


import torch
import torch.nn as nn
import torch.nn.functional as F

from formats.sae_releases import hook_site

ARCHS = ("topk", "batchtopk", "jumprelu")


# ----------------------------------------------------------------------------------------------------------------------
# Autograd functions


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The kernel K(u) = 1[-1/2 < u < 1/2] of the straight-through estimators in Rajamanoharan et al. (2024)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def threshold_grad(ctx, grad, scale):
    """sum over tokens of -(scale / eps) * K((pre - threshold) / eps) * grad: the pseudo-derivative w.r.t. threshold.
    scale is the threshold itself for JumpReLU's output (eq. 11) and 1 for the L0 penalty's step (eq. 12)."""
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
        return grad_pre, threshold_grad(ctx, grad, threshold) if ctx.needs_input_grad[1] else None, None


def fp32_region(x: torch.Tensor):
    """Autocast off for the encoder: its matmul runs on fp32 operands, as in an fp32 SAE without autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def jumprelu(pre, threshold, bandwidth: float = 1e-3):
    return JumpReLUFn.apply(pre, threshold, bandwidth)


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
        # where it came from (formats/sae_files.py sets them when it reads files): its folder, its release format, and
        # which positions it is spliced at by default (sae_files.AUTO_POSITIONS; splice.unspliced_tokens)
        self.path, self.source_format, self.positions = None, None, "no_bos"
        # a transcoder (formats/sae_releases.py: Gemma Scope 2's transcoder_all/) reads block `layer`'s normalised MLP input and
        # stands in for its MLP sublayer's output; W_skip (d_out, d_in), if any, is its affine skip, + x @ W_skip.T in
        # SAELens' layout (a Gemma Scope 2 file's affine_skip_connection, applied as x @ A, is read in as A.T)
        self.transcoder, self.W_skip = False, None
        self.bandwidth = 1e-3  # JumpReLU STE kernel width (Gemma Scope's value for unit-scale inputs)
        self.min_threshold = 1e-6  # JumpReLU: training/sae_loss.clamp_threshold_ keeps theta >= this (> 0, Sec. 3.3)
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
        if self.W_skip is not None:  # SAELens' SkipTranscoder: sae_out + x @ W_skip.T
            with fp32_region(x):
                out = out + F.linear(x.float(), self.W_skip.float())
        return out.to(x.dtype)

    def check_d_in(self, d_model: int, where: str = "", what: str = "residual stream has d_model"):
        if d_model != self.d_in:
            raise ValueError(f"{where + ': ' if where else ''}the SAE expects d_in={self.d_in} but the model's "
                             f"{what}={d_model} (SAE trained for another model?)")

    @property
    def site(self) -> str | None:
        """Where the splice puts it: "transcoder" (block `layer`'s MLP), "resid" (the stream after block `layer`),
        "attn_z" / "attn_out" / "mlp_out" (inside block `layer`, model.Block.forward), None: a hook it cannot serve."""
        return "transcoder" if self.transcoder else hook_site(self.hook_name)

    # -- files --------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_path: str, device=None, dtype=None) -> "SAE":
        """Gemma Scope (2), SAELens, sparsify, Llama Scope, dictionary_learning or Qwen Scope, from a local path or a hub
        path `owner/repo/sub/folder`, read, checked and converted by formats/sae_files.py. dtype None: the file's."""
        from formats.sae_files import load_sae  # formats/ builds SAEs from this module: imported here, not at the top
        return load_sae(path_or_hub_path, device=device, dtype=dtype)

    def save(self, folder: str):
        """SAELens v6 layout (cfg.json + sae_weights.safetensors), each file written to a temp name then renamed."""
        from formats.sae_files import save_saelens
        save_saelens(self, folder)
