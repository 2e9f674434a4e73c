"""
What only SAE training uses (train_sae.py; train_e2e.py shares the last two): the training loss, normalised MSE plus
AuxK for TopK / BatchTopK (Gao et al. 2024, Sec. 2.3 and A.2) or plus the L0 penalty for JumpReLU (Rajamanoharan et
al. 2024, Eq. 6 of the paper) with its straight-through estimator; the b_dec initialisation (geometric median); the
dead-latent accounting; the projections after each optimizer step (unit-norm decoder rows, JumpReLU's threshold).
sae.py holds the SAE a reader splices.
"""
from __future__ import annotations

import torch

from sae import SAE, threshold_grad


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
        return None, threshold_grad(ctx, grad, 1.0) if ctx.needs_input_grad[1] else None, None


def step(pre, threshold, bandwidth: float = 1e-3):
    """Per-latent L0 indicator; step(pre, thr, eps).sum(-1).mean() is the JumpReLU sparsity penalty (paper eq. 6)."""
    return StepFn.apply(pre, threshold, bandwidth)


def training_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor, scale: float, *, l0_coef: float = 1e-3,
                  auxk_coef: float = 1 / 32, target: torch.Tensor | None = None):
    """Reconstruction loss plus AuxK (TopK/BatchTopK) or the L0 penalty (JumpReLU, Eq. 6). Returns (loss, stats, fired).
    target: what the decoder should reproduce, when not x (a transcoder: the MLP's output from its input x).

    The MSE is divided by a fixed `scale` (the activations' variance, measured once at the start) rather than by each
    batch's own variance: the loss then decomposes over tokens, so a DDP run with the same global batch computes
    exactly the single-process gradient."""
    pre = sae.pre_acts(x)
    if sae.arch == "topk":  # sparse decode: k rows of W_dec per token instead of a dense (tokens, m) @ (m, d)
        values, indices = pre.topk(sae.k, dim=-1, sorted=False)
        values = values.relu()
        recon = sae.decode_sparse(values, indices)
        l0 = (values > 0).float().sum(-1).mean()
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
        fired[indices[values > 0]] = True
    else:
        z = sae._batch_topk(pre) if sae.arch == "batchtopk" else sae.encode(x)
        recon, l0, fired = sae.decode(z), (z != 0).float().sum(-1).mean(), (z != 0).any(0)
    y = x if target is None else target
    err = y - recon
    mse = err.pow(2).sum(-1).mean()
    loss = mse / scale  # normalised MSE: the loss scale does not depend on the activation norm
    with torch.no_grad():
        fvu = (mse / (y - y.mean(0)).pow(2).sum(-1).mean()).item()  # the batch's own fraction of variance unexplained
    stats = dict(fvu=fvu, l0=l0.item())
    if sae.arch == "jumprelu":
        l0 = step(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
        loss = loss + l0_coef * l0
    elif auxk_coef > 0 and bool(dead.any()):
        # AuxK (Gao et al.): the k_aux most active dead latents reconstruct the residual error; their gradient
        # revives them. Normalised by the error's own variance, as in the reference implementation.
        k_aux = min(int(dead.sum()), x.shape[-1] // 2)
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        v, i = aux_pre.topk(k_aux, dim=-1, sorted=False)
        aux_recon = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ sae.W_dec
        e = err.detach()
        aux = (e - aux_recon).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        loss = loss + auxk_coef * torch.nan_to_num(aux, nan=0.0)
        stats["auxk"] = aux.item()
    return loss, stats, fired


def update_since_fired(since_fired: torch.Tensor, fired: torch.Tensor, n_tokens: int):
    """Dead-latent accounting: tokens since each latent last fired; a latent firing in this batch restarts at 0."""
    since_fired += n_tokens
    since_fired[fired] = 0


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the b_dec initialisation of Gao et al. (robust to the outliers a mean would chase)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * y.norm().clamp_min(1.0):
            return y_new
        y = y_new
    return y


# ----------------------------------------------------------------------------------------------------------------------
# Around each optimizer step (SAELens' names)


@torch.no_grad()
def set_decoder_norm_to_unit_norm(sae: SAE):
    """Every decoder row back to unit norm (Gao et al.; SAELens' method of this name), after each optimizer step."""
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True) + torch.finfo(sae.W_dec.dtype).eps)


@torch.no_grad()
def remove_gradient_parallel_to_decoder_directions(sae: SAE):
    """Project out the radial part of each decoder row's gradient, so that Adam steps stay near the unit sphere."""
    if sae.W_dec.grad is None:
        return
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1, keepdim=True)
    sae.W_dec.grad.sub_(parallel * sae.W_dec)


@torch.no_grad()
def clamp_threshold_(sae: SAE):
    """Project JumpReLU thresholds back to >= min_threshold; call after every optimizer step.

    JumpReLU needs theta > 0 (paper Sec. 3.3): below zero, negative pre-activations pass as negative codes. Adam
    moves a parameter by about lr per step whatever its gradient, so a threshold smaller than lr that the
    reconstruction pushes down crosses zero in one step. A projection keeps the threshold itself as the parameter,
    which Adam moves by ~lr in threshold units; SAELens' exp(log_threshold) instead moves by ~threshold * lr, so
    small thresholds freeze (SAELens issue #494, fixed by parameterising the threshold directly in PR #718)."""
    if sae.arch == "jumprelu":
        sae.threshold.clamp_(min=sae.min_threshold)


def to_jumprelu(sae: SAE) -> SAE:
    """A BatchTopK SAE at inference is a JumpReLU SAE whose threshold is the running threshold, for every latent: what
    train_sae.py saves, so that the file is read as a JumpReLU SAE everywhere (Bussmann et al. 2024)."""
    if sae.arch != "batchtopk":
        raise ValueError(f"to_jumprelu converts a batchtopk SAE, this one is {sae.arch}")
    out = SAE(sae.d_in, sae.d_sae, "jumprelu", apply_b_dec_to_input=sae.apply_b_dec_to_input, layer=sae.layer,
              model_name=sae.model_name, device="meta", dtype=sae.W_dec.dtype)
    out._assign(sae.W_enc.detach().clone(), sae.W_dec.detach().clone(), sae.b_enc.detach().clone(),
                sae.b_dec.detach().clone(), sae.topk_threshold.detach().expand(sae.d_sae).to(sae.W_dec.dtype))
    out.hook_name, out.bandwidth, out.min_threshold = sae.hook_name, sae.bandwidth, sae.min_threshold
    return out
