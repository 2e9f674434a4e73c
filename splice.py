"""
The paper's objective in one place: splice SAEs into the residual stream and compare the spliced model's next-token
distribution with the original's, KL(p_orig || p_spliced) (Eq. 7), a chunk of positions at a time.

Read `kl_reference` first: Eq. 7 as written, two full forward passes and full logits. Everything after it computes the
same numbers with less work: the blocks before the first SAE run once for both passes when no adapter sits there
(`share_prefix`), and the vocabulary projection runs a chunk of positions at a time so that no (positions, vocab) fp32
tensor of a 256k vocabulary is ever whole (tests/test_splice.py checks value and gradient against the reference).

Which positions count (the objective here and every reported number, evals/held_out.py, use the same ones):

- A window of T tokens has T - 1 predicted positions: position t predicts token t + 1; the last position's next token
  lies outside the window. Positions the SAE does not replace (BOS, see unspliced_tokens) still count: the paper's L_SAE
  is the cross-entropy of the whole spliced model on held-out tokens (Sec. 4), and their predictions read spliced
  positions before them.
- The training objective, `loss` in the training logs: Eq. 7 summed over the predicted positions of a batch, divided
  by its windows (--kl-reduction sequence: the authors' kl_div(batchmean) on one window per step, the gradient scale
  their clipping at 1.0 sees) or by its positions (token). `train_kl` and `train_ce` are KL and CE as
  evals/held_out.py defines them, on the training batch. The authors' loss also counts each window's last position;
  here the objective and the reported numbers cover the same positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora import adapters_disabled
from model import Transformer, compile_blocks
from sae import SAE


def kl_reference(model: Transformer, saes, idx, unspliced_ids=()) -> torch.Tensor:
    """Eq. 7 as written: KL(p_orig || p_spliced), the mean over the predicted positions (all but each window's last),
    gradients to the adapters only."""
    with torch.no_grad(), adapters_disabled(model):
        logp_orig = F.log_softmax(model(idx)[:, :-1].float(), dim=-1)  # the original model: no SAE, no adapters
    logp = F.log_softmax(model(idx, hooks=splice_hooks(saes, idx, unspliced_ids))[:, :-1].float(), dim=-1)
    return (logp_orig.exp() * (logp_orig - logp)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Which positions get the SAE

# BOS (and EOS) activations have outlier norms that most SAEs never saw in training; which tokens an SAE skips
# depends on how it was trained, so each SAE carries its own choice (`sae.positions`, "auto" below).
POSITIONS = {"all": (), "no_bos": ("bos",), "no_bos_eos": ("bos", "eos")}


class Unspliced(tuple):
    """unspliced_tokens' answer: the token ids whose positions keep their activation and, in `norm_above`, the norm rule
    (None: off). Every caller hands it on to splice_hooks as it is, so training and every evaluation apply both."""
    norm_above: float | None = None


def unspliced_tokens(saes, model_cfg, positions: str = "auto", norm_above: float | None = None) -> Unspliced:
    """The token ids whose positions keep their original activation. "auto" takes each SAE's own `positions` (set by
    where its files come from: formats/sae_files.AUTO_POSITIONS); with several SAEs, a position is kept if any of
    them keeps it. norm_above: also keep every position whose activation norm, where the SAE reads it, is above
    norm_above x the median norm of its window (attention sinks beyond BOS: the Qwen3 SAE card drops activations
    above 10x the median norm before encoding)."""
    if positions == "auto":
        chosen = {s.positions for _, s in saes}
        positions = next((p for p in ("no_bos_eos", "no_bos", "all") if p in chosen), "no_bos")
    if positions not in POSITIONS:
        raise ValueError(f"--sae-positions {positions!r}: expected auto, {', '.join(POSITIONS)}")
    ids = {"bos": [model_cfg.bos_token_id], "eos": model_cfg.eos_token_id if isinstance(model_cfg.eos_token_id, list)
           else [model_cfg.eos_token_id]}
    if norm_above is not None and not norm_above > 0:
        raise ValueError(f"--skip-norm-above {norm_above}: expected a multiple of the median norm > 0 (e.g. 10)")
    unspliced = Unspliced(sorted({i for name in POSITIONS[positions] for i in ids[name] if i is not None}))
    unspliced.norm_above = norm_above
    return unspliced


def splice_hooks(saes: list[tuple[int, SAE]], idx: torch.Tensor, unspliced_ids=(), skipped: list | None = None):
    """Hooks for model(..., hooks=...): the activation each SAE reads becomes its reconstruction, except at positions
    holding a token of `unspliced_ids` (a tuple from unspliced_tokens, or one id), which keep their original
    activation. Where, by `sae.site`: the stream after block L (resid), or inside block L (model.Block.forward): every
    head's output before o_proj (attn_z), the attention or MLP sublayer's output (attn_out, mlp_out), or the MLP
    sublayer as a whole, which a transcoder computes from its normalised input (transcoder); the rest of the block
    runs unchanged. unspliced_ids.norm_above (an Unspliced from unspliced_tokens): positions whose input to the SAE
    has a norm above that multiple of its window's median keep theirs too; `skipped`, a list, receives each hook's
    (B, T) mask of them (evals/held_out.evaluate counts them). In a KV-cached generation step (one new position) the
    median is that position's own norm: nothing is skipped there."""
    norm_above = getattr(unspliced_ids, "norm_above", None)
    ids = (unspliced_ids,) if isinstance(unspliced_ids, int) else tuple(i for i in unspliced_ids or () if i is not None)
    unspliced_at = torch.isin(idx, torch.tensor(ids, device=idx.device))[..., None] if ids else None  # (B, T, 1)

    def kept_positions(x):  # (B, T, 1): True where the activation stays the original one; None: nowhere
        if norm_above is None:
            return unspliced_at
        norms = x.float().norm(dim=-1)
        high = norms > norm_above * norms.median(dim=-1, keepdim=True).values
        if skipped is not None:
            skipped.append(high)
        return high[..., None] if unspliced_at is None else unspliced_at | high[..., None]

    def splice(sae):  # the activation x becomes the SAE's reconstruction of it
        def hook(x):
            recon = sae(x.reshape(-1, x.shape[-1])).view_as(x).to(x.dtype)
            kept = kept_positions(x)
            return recon if kept is None else torch.where(kept, x, recon)
        return hook

    def splice_transcoder(tc):  # the MLP sublayer's output from its normalised input h (model.Block's "mlp" site)
        def hook(h, mlp_out):
            out = tc(h.reshape(-1, h.shape[-1])).view_as(h).to(h.dtype)
            kept = kept_positions(h)
            return out if kept is None else torch.where(kept, mlp_out(h), out)
        return hook
    return {hook_key(layer, sae): splice_transcoder(sae) if sae.transcoder else splice(sae) for layer, sae in saes}


def hook_key(layer: int, sae) -> int | tuple[str, int]:
    """The key of model(hooks=...) where `sae` at `layer` is spliced: L, or (site, L) inside block L."""
    site = sae.site
    return layer if site == "resid" else ("mlp" if site == "transcoder" else site, layer)


def residual_only(saes) -> bool:
    """Whether every SAE reads the stream between blocks: only then are blocks 0..L (L the first SAE's) the same in
    the spliced pass as in the original one, and can be shared (an SAE inside block L changes block L itself)."""
    return all(s.site == "resid" for _, s in saes)


# ----------------------------------------------------------------------------------------------------------------------
# The two passes, as the training loops run them


def original_pass(model: Transformer, idx, first_sae_layer: int, *, share_prefix: bool, observe=None):
    """The final residual stream of the model as it is (the caller runs this under torch.no_grad() and
    adapters_disabled(model): the original model) and, with a shared prefix, `prefix`: the residual stream after block
    first_sae_layer (blocks 0..L run once for both passes), from which the spliced pass continues. observe(layer, x,
    x), if given, sees the stream after every block after first_sae_layer (train_e2e.py's downstream terms). The caller's context stays outside: compiled together with the
    grad-free region, the SAE's custom autograd function in the spliced pass would lose its gradients."""
    after = range(first_sae_layer + 1, model.cfg.n_layer)
    hooks = {} if observe is None else {i: _observer(observe, i) for i in after}
    x = model.embed(idx)
    if not share_prefix:
        return model.blocks(x, hooks=hooks), None
    prefix = model.blocks(x, 0, first_sae_layer)  # blocks 0..L, both ends included
    return model.blocks(prefix, first_sae_layer + 1, hooks=hooks), prefix


def _observer(observe, layer):
    def hook(x):
        observe(layer, x, x)
        return x
    return hook


def spliced_pass(model: Transformer, saes, idx, unspliced_ids=(), *, prefix=None, observe=None, skipped=None):
    """The (adapted) model's final residual stream with every SAE spliced in, from `prefix` when given (the residual
    stream after block L, the first SAE's layer, from original_pass; only with residual_only(saes): an SAE inside
    block L changes block L, which the prefix holds).
    observe(layer, x_in, x_out), if given, sees the stream after every block it runs: x_in before the splice, x_out
    after (the same tensor where no SAE sits); train_e2e.py's downstream terms and eval.py's distances read it.
    skipped: see splice_hooks."""
    hooks = splice_hooks(saes, idx, unspliced_ids, skipped)
    start = 0 if prefix is None else saes[0][0]
    if observe is not None:
        def wrap(layer, splice):
            def hook(x):
                y = splice(x) if splice is not None else x
                observe(layer, x, y)
                return y
            return hook
        hooks = {**{k: v for k, v in hooks.items() if not isinstance(k, int)},  # the hooks inside blocks
                 **{layer: wrap(layer, hooks.get(layer)) for layer in range(start, model.cfg.n_layer)}}
    if prefix is None:
        return model.blocks(model.embed(idx), hooks=hooks)
    x = hooks.pop(start)(prefix)  # the first SAE on the shared stream; the blocks after it run with the other hooks
    return model.blocks(x, start + 1, hooks=hooks) if start + 1 < model.cfg.n_layer else x


# ----------------------------------------------------------------------------------------------------------------------
# Eq. 7 a chunk of positions at a time


def chunk_losses(model: Transformer, h_orig, h, targets):
    """Per position of one chunk: KL(p_orig || p) with grad, and the CE of p and of p_orig (no grad).
    torch.compile(chunk_losses) fuses norm, soft-cap, both log-softmaxes, KL and CE into a few kernels, with no extra
    (chunk, vocab) fp32 copies; kl_and_ce takes it as `loss_fn`."""
    with torch.no_grad():
        logp_orig = F.log_softmax(model.head(h_orig).float(), dim=-1)
        ce_orig = F.nll_loss(logp_orig, targets, reduction="none")
    logp = F.log_softmax(model.head(h).float(), dim=-1)
    kl = F.kl_div(logp, logp_orig, log_target=True, reduction="none").sum(-1)
    with torch.no_grad():
        ce = F.nll_loss(logp, targets, reduction="none")
    return kl, ce, ce_orig


def compile_step(model: Transformer, enable: bool = True, backend: str = "inductor"):
    """torch.compile for the training scripts: each block its own graph, shared by the blocks of its kind
    (model.compile_blocks: the cold start stays nearly flat in depth), and Eq. 7's chunk as one more; returns the
    chunk_losses that kl_and_ce takes, compiled when `enable`."""
    compile_blocks(model, enable, backend)
    return torch.compile(chunk_losses, backend=backend) if enable else chunk_losses


def kl_and_ce(model: Transformer, h_orig, h, idx, *, chunk: int, loss_fn=None):
    """KL(p_orig || p) (with grad where h has it), the CE of p and the CE of p_orig at every predicted position of
    the final streams h_orig (original model) and h (B, T, d): three (B * (T - 1),) fp32 tensors, still on the device.

    With several chunks each runs under activation checkpointing when h needs gradients, so its (chunk, vocab) logits
    are recomputed in the backward instead of all chunks' logits being kept alive at once; a single chunk skips the
    recomputation. `loss_fn`: chunk_losses or a compiled copy of it."""
    loss_fn = loss_fn or chunk_losses
    d_model = h_orig.shape[-1]
    ho, hs = h_orig[:, :-1].reshape(-1, d_model), h[:, :-1].reshape(-1, d_model)  # the predicted positions
    targets = idx[:, 1:].reshape(-1)
    recompute = hs.requires_grad and ho.shape[0] > chunk
    parts = []
    for s in range(0, ho.shape[0], chunk):
        args = (model, ho[s:s + chunk], hs[s:s + chunk], targets[s:s + chunk])
        parts.append(checkpoint(loss_fn, *args, use_reentrant=False) if recompute else loss_fn(*args))
    kl, ce, ce_orig = (torch.cat(p) for p in zip(*parts))
    return kl, ce, ce_orig
