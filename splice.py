"""
The paper's objective in one place: splice SAEs into the residual stream, compare the spliced model's next-token
distribution with the original's (Eq. 7), and measure how much of the CE gap an adapter closes.

Read `kl_reference` first: Eq. 7 as written, two full forward passes and full logits. Everything after it computes the
same numbers with less work: the blocks before the first SAE run once for both passes when no adapter sits there
(`share_prefix`), and the vocabulary projection runs a chunk of tokens at a time so that no (tokens, vocab) fp32
tensor of a 256k vocabulary is ever whole (tests/test_splice.py checks value and gradient against the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from lora import adapters_disabled, lora_modules
from model import Hook, Transformer
from sae import SAE


# Which positions get the SAE. The authors (utils.get_sae_hook) splice hub SAEs (Gemma Scope, Llama Scope) everywhere
# but at BOS and EOS tokens, and their own TopK SAEs (sparsify format) everywhere; SAELens-format SAEs (what
# train_sae.py writes, trained without BOS) everywhere but BOS. BOS activations have outlier norms that most SAEs
# never saw in training.
POSITIONS = {"all": (), "no_bos": ("bos",), "no_bos_eos": ("bos", "eos")}
AUTO_POSITIONS = {"gemma_scope": "no_bos_eos", "llama_scope": "no_bos_eos", "sparsify": "all", "saelens": "no_bos"}


def kept_tokens(saes, model_cfg, positions: str = "auto") -> tuple[int, ...]:
    """The token ids whose positions keep their original activation. "auto" chooses per SAE file format as above
    (with SAEs of several formats, a position is kept if any of them keeps it)."""
    if positions == "auto":
        chosen = {AUTO_POSITIONS.get(getattr(s, "source_format", None), "no_bos") for _, s in saes}
        positions = next((p for p in ("no_bos_eos", "no_bos", "all") if p in chosen), "no_bos")
    if positions not in POSITIONS:
        raise ValueError(f"--sae-positions {positions!r}: expected auto, {', '.join(POSITIONS)}")
    ids = {"bos": [model_cfg.bos_token_id], "eos": model_cfg.eos_token_id if isinstance(model_cfg.eos_token_id, list)
           else [model_cfg.eos_token_id]}
    return tuple(sorted({i for name in POSITIONS[positions] for i in ids[name] if i is not None}))


def splice_hooks(saes: list[tuple[int, SAE]], idx: torch.Tensor, keep=()):
    """Hooks for model(..., hooks=...): the stream after block L becomes SAE_L(stream), except at positions holding a
    token of `keep` (an id or a tuple of ids, see kept_tokens), which keep their original activation."""
    keep = (keep,) if isinstance(keep, int) else tuple(k for k in (keep or ()) if k is not None)
    if keep:
        keep = torch.isin(idx, torch.tensor(keep, device=idx.device))[..., None]
    else:
        keep = None

    def make(sae):
        def hook(x):
            recon = sae(x.reshape(-1, x.shape[-1])).view_as(x).to(x.dtype)
            return recon if keep is None else torch.where(keep, x, recon)
        return hook
    return {layer: make(sae) for layer, sae in saes}


def kl_reference(model: Transformer, saes, idx, keep=()) -> torch.Tensor:
    """Eq. 7: KL(p_orig || p_spliced), mean over every predicted token, gradients to the adapters only."""
    with torch.no_grad(), adapters_disabled(model):
        logp_orig = F.log_softmax(model(idx).float(), dim=-1)  # the original model: no SAE, no adapters
    logp = F.log_softmax(model(idx, hooks=splice_hooks(saes, idx, keep)).float(), dim=-1)
    return (logp_orig.exp() * (logp_orig - logp)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------------
# The two passes, as the training loops run them


def original_pass(model: Transformer, idx, first: int, *, share_prefix: bool, watch=None):
    """The original model's final residual stream (the caller turns adapters and grad off) and, with a shared prefix,
    the stream after block `first`, from which the spliced pass continues. watch(layer, x, x), if given, sees the
    stream after every block after `first`."""
    hooks = {} if watch is None else {i: _watcher(watch, i) for i in range(first + 1, model.cfg.n_layer)}
    x = model.embed(idx)
    if not share_prefix:
        return model.blocks(x, hooks=hooks), None
    x = model.blocks(x, 0, first)
    return model.blocks(x, first + 1, hooks=hooks), x


def _watcher(watch, layer):
    def hook(x):
        watch(layer, x, x)
        return x
    return hook


def spliced_pass(model: Transformer, saes, idx, keep=(), *, prefix=None, watch=None):
    """The (adapted) model's final residual stream with every SAE spliced in, from the shared prefix when given.
    watch(layer, x_in, x_out), if given, sees the stream after every block it runs: x_in before the splice, x_out
    after (the same tensor where no SAE sits)."""
    hooks = splice_hooks(saes, idx, keep)
    start = 0 if prefix is None else saes[0][0]
    if watch is not None:
        def wrap(layer, splice):
            def hook(x):
                y = splice(x) if splice is not None else x
                watch(layer, x, y)
                return y
            return hook
        hooks = {layer: wrap(layer, hooks.get(layer)) for layer in range(start, model.cfg.n_layer)}
    if prefix is None:
        return model.blocks(model.embed(idx), hooks=hooks)
    x = hooks.pop(start)(prefix)
    return model.blocks(x, start + 1, hooks=hooks) if start + 1 < model.cfg.n_layer else x


def final_streams(model: Transformer, saes, idx, keep=(), *, share_prefix: bool = False,
                  passes=None):
    """(original, spliced) final residual streams. `passes` are compiled (original_pass, spliced_pass): compiled
    apart, as one graph mixing a no-grad region with the SAE's custom autograd function loses its gradients."""
    original, spliced = passes or (original_pass, spliced_pass)
    with torch.no_grad(), adapters_disabled(model):
        h_orig, prefix = original(model, idx, saes[0][0], share_prefix=share_prefix)
    return h_orig, spliced(model, saes, idx, keep, prefix=prefix)


# ----------------------------------------------------------------------------------------------------------------------
# Eq. 7 a chunk of tokens at a time


def chunk_losses(model: Transformer, h_orig, h, targets):
    """Eq. 7 on one chunk: KL(p_orig || p_spliced) summed over its tokens, and the spliced model's summed CE (no
    grad). torch.compile(chunk_losses) fuses norm, soft-cap, both log-softmaxes, KL and CE into a few kernels, with
    no extra (chunk, vocab) fp32 copies; kl_and_ce takes it as `losses`."""
    with torch.no_grad():
        logp_orig = F.log_softmax(model.head(h_orig).float(), dim=-1)
    logp = F.log_softmax(model.head(h).float(), dim=-1)
    kl = F.kl_div(logp, logp_orig, log_target=True, reduction="sum")
    with torch.no_grad():
        ce = F.nll_loss(logp, targets, ignore_index=-1, reduction="sum")
    return kl, ce


def kl_and_ce(model: Transformer, h_orig, h, idx, *, chunk: int, reduction: str = "token", losses=None):
    """KL(p_orig || p_spliced) with grad, and the spliced model's mean next-token CE (no grad).

    reduction "token": the KL's mean over tokens; "sequence": summed over each sequence's tokens, mean over sequences
    (the authors' kl_div(batchmean) on one sequence per step: the gradient scale that their clipping at 1.0 sees).
    With several chunks each runs under activation checkpointing, so its (chunk, vocab) logits are recomputed in the
    backward instead of all chunks' logits being kept alive at once; a single chunk skips the recomputation.
    `losses`: chunk_losses or a compiled copy of it."""
    losses = losses or chunk_losses
    d = h_orig.shape[-1]
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1).reshape(-1)  # last position: none
    ho, hs = h_orig.reshape(-1, d), h.reshape(-1, d)
    kl_sum, ce_sum = 0.0, 0.0
    recompute = hs.requires_grad and ho.shape[0] > chunk
    for s in range(0, ho.shape[0], chunk):
        args = (model, ho[s:s + chunk], hs[s:s + chunk], targets[s:s + chunk])
        kl, ce = checkpoint(losses, *args, use_reentrant=False) if recompute else losses(*args)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    if reduction not in ("token", "sequence"):
        raise ValueError(f"unknown KL reduction {reduction!r} (expected token or sequence)")
    kl = kl_sum / (ho.shape[0] if reduction == "token" else idx.shape[0])
    return kl, ce_sum / (targets >= 0).sum()


# ----------------------------------------------------------------------------------------------------------------------
# Held-out evaluation


@torch.no_grad()
def next_token_ce(model: Transformer, idx: torch.Tensor, hooks: dict[int, Hook] | None = None,
                  chunk: int = 2048) -> tuple[float, int]:
    """Summed next-token cross-entropy and the token count. The vocabulary projection runs `chunk` tokens at a time,
    so a 256k vocabulary never materialises a full (B, T, vocab) fp32 logits tensor."""
    h = model.blocks(model.embed(idx), hooks=hooks)
    h, targets = h[:, :-1].reshape(-1, h.shape[-1]), idx[:, 1:].reshape(-1)
    total = sum(F.cross_entropy(model.head(h[s:s + chunk]).float(), targets[s:s + chunk], reduction="sum")
                for s in range(0, h.shape[0], chunk))
    return float(total), targets.numel()  # one host sync per batch, not one per chunk


@torch.no_grad()
def evaluate(model: Transformer, saes, batches, keep=(), *, chunk: int, amp) -> dict:
    """On held-out tokens: CE of the original model, with the SAE(s), with SAE(s) + LoRA; mean KL per token to the
    original model for the last two; and the fraction of the CE gap closed. A model without adapters (an SAE
    checkpoint scored alone) skips the third pass: it equals the second."""
    keys = ("ce_base", "ce_sae", "ce_sae_lora", "kl_sae", "kl_sae_lora")
    sums, n = dict.fromkeys(keys, 0.0), 0
    adapted, was_training = bool(lora_modules(model)), model.training
    model.eval()
    for idx in batches:
        with amp:
            with adapters_disabled(model):
                total, count = next_token_ce(model, idx, None, chunk)
                kl_sae, ce_sae = kl_and_ce(model, *final_streams(model, saes, idx, keep),
                                           idx, chunk=chunk)
            kl_lora, ce_lora = kl_and_ce(model, *final_streams(model, saes, idx, keep),
                                         idx, chunk=chunk) if adapted else (kl_sae, ce_sae)
        for key, value in zip(keys, (total / count, ce_sae, ce_lora, kl_sae, kl_lora)):
            sums[key] += float(value) * count
        n += count
    model.train(was_training)
    # all-reduce sums and the count together: the ratio is the mean over every process's tokens
    t = common.all_reduce_mean(torch.tensor([*sums.values(), n], dtype=torch.float64))
    return gap_closed(dict(zip(keys, (t[:-1] / t[-1]).tolist())))


def gap_closed(res: dict) -> dict:
    """The paper's headline number: (CE_sae - CE_sae_lora) / (CE_sae - CE_original)."""
    gap = res["ce_sae"] - res["ce_base"]
    res["gap_closed"] = (res["ce_sae"] - res["ce_sae_lora"]) / gap if gap > 0 else float("nan")
    return res


# ----------------------------------------------------------------------------------------------------------------------
# Which SAEs sit where


def load_saes(paths: list[str], layers: list[int] | None, model: Transformer, device) -> list[tuple[int, SAE]]:
    """(layer, frozen SAE) pairs sorted by layer; each layer from `layers` or else from the SAE's own files."""
    if layers is not None and len(layers) != len(paths):
        raise ValueError(f"--layer names {len(layers)} layers for {len(paths)} SAEs: give one per --sae")
    saes = []
    for i, path in enumerate(paths):
        sae = SAE.from_pretrained(path, device=device)
        layer = layers[i] if layers is not None else sae.layer
        if layer is None:
            raise ValueError(f"{path}: the SAE files do not say which layer it reads; pass --layer")
        if not 0 <= layer < model.cfg.n_layer:
            raise ValueError(f"{path}: layer {layer} is out of range: the model has layers 0..{model.cfg.n_layer - 1}")
        sae.check_d_in(model.cfg.d_model, where=path)
        sae.requires_grad_(False).eval()
        saes.append((layer, sae))
    if len({layer for layer, _ in saes}) != len(saes):
        raise ValueError("two SAEs at the same layer: give each --sae its own --layer")
    return sorted(saes, key=lambda p: p[0])
