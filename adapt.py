"""
LoRA-adapt a frozen language model around frozen SAEs (the paper's method, Sec. 3.4).

    python adapt.py                                            # offline tiny pipeline: builds and caches everything
    torchrun --nproc_per_node 8 adapt.py --model google/gemma-2-2b \
        --sae google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82 --rank 64 --data data/pile

The model and the SAE(s) stay frozen; only the adapters learn, to minimise Eq. 7, KL(p_orig || p_spliced): the
original model's next-token distribution against that of the adapted model with the SAE reconstruction spliced into
its residual stream. Writes the adapter in PEFT's format, a resumable checkpoint and results.json to --out.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from lora import adapter_parameters, adapters_disabled, apply_lora, lora_modules, resolve_layers, save_adapter
from model import Transformer, next_token_ce
from sae import SAE, splice_hooks


@dataclass
class AdaptConfig:
    """LoRA-adapt a model around frozen SAEs (paper Eq. 7)."""
    model: str | None = None  # HF folder or hub id; None = the embedded tiny model (built and cached on first run)
    sae: list[str] = field(default_factory=list)  # SAE folders / hub paths; several = Sec. 4.3; none = embedded SAE
    layer: str | None = None  # "12" or "10,20,30": SAE layers, overriding what the SAE files say
    data: str | None = None  # token dataset folder written by data.prepare; None = the embedded stdlib corpus
    out: str = "out/adapt"
    rank: int = 64  # paper: rank 64, alpha 32 on q,k,v,o,gate,up,down
    alpha: float = 32.0
    dropout: float = 0.0
    layers: str | None = None  # "all" | "after" | "3,4,5"; default all for TopK SAEs, after for JumpReLU
    allow_before_jumprelu: bool = False  # adapting layers that feed a JumpReLU SAE changes its sparsity
    splice_bos: bool = False  # BOS keeps its original activation by default (as Gemma Scope / SAELens evaluate)
    max_tokens: int = 15_000_000  # paper: 15M training tokens
    batch_size: int = 4  # sequences per process per micro-step
    grad_accum: int = 1
    seq_len: int = 1024
    lr: float = 5e-5  # the paper's code: AdamW at 5e-5, grad clip 1.0
    warmup_frac: float = 0.02
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    autocast: str = "bfloat16"  # activation precision; "float32" disables autocast
    dtype: str = "float32"  # storage of the frozen base weights ("bfloat16" halves memory); adapters stay fp32
    fsdp: bool = False  # FSDP2 under torchrun: each decoder layer sharded across ranks, for models too big for one
    compile: bool = True
    kl_chunk: int = 2048  # tokens per lm_head + log-softmax chunk: never two full (B, T, vocab) fp32 tensors
    eval_interval: int = 200  # steps
    eval_tokens: int = 1_000_000  # paper: 1M held-out tokens
    log_interval: int = 10
    ckpt_interval: int = 200
    resume: bool = False
    seed: int = 0
    device: str = "auto"


# What `python adapt.py` with no --model uses instead of the paper's values (sized for minutes on 2 CPU cores)
EMBEDDED = dict(seq_len=256, batch_size=8, max_tokens=1_000_000, lr=3e-3, eval_tokens=32_768, eval_interval=100,
                ckpt_interval=100, log_interval=10, kl_chunk=1024, out="out/adapt-tiny")


# ----------------------------------------------------------------------------------------------------------------------
# Splicing SAEs into the residual stream


def load_saes(paths: list[str], layer_spec: str | None, model: Transformer, device) -> list[tuple[int, SAE]]:
    """(layer, frozen SAE) pairs, sorted by layer; layer from --layer or the SAE's own metadata."""
    override = [int(s) for s in layer_spec.split(",")] if layer_spec else None
    if override is not None and len(override) != len(paths):
        raise ValueError(f"--layer names {len(override)} layers for {len(paths)} SAEs")
    saes = []
    for i, path in enumerate(paths):
        sae = SAE.from_pretrained(path, device=device)
        layer = override[i] if override is not None else sae.layer
        if layer is None:
            raise ValueError(f"{path}: the SAE files do not say which layer it reads; pass --layer")
        if not 0 <= layer < model.cfg.n_layer:
            raise ValueError(f"{path}: layer {layer} is out of range: the model has layers 0..{model.cfg.n_layer - 1}")
        sae.check_d_in(model.cfg.d_model, where=path)
        sae.requires_grad_(False).eval()
        saes.append((layer, sae))
    if len({layer for layer, _ in saes}) != len(saes):
        raise ValueError("two SAEs at the same layer")
    return sorted(saes, key=lambda p: p[0])


def choose_lora_layers(spec: str | None, saes, n_layer: int, allow_before_jumprelu: bool) -> list[int]:
    first = saes[0][0]
    jump = [layer for layer, s in saes if s.arch == "jumprelu"]
    spec = spec or ("after" if jump else "all")
    layers = resolve_layers(f"after:{first}" if spec == "after" else spec, n_layer)
    # a JumpReLU SAE at layer L reads the output of blocks 0..L: adapting them moves its inputs across the thresholds
    bad = [layer for layer in layers if jump and layer <= max(jump)]
    if bad and not allow_before_jumprelu:
        raise ValueError(f"LoRA layers {bad} feed a JumpReLU SAE (layer {max(jump)}) and would change its sparsity; "
                         f"use --layers after, or --allow-before-jumprelu to insist")
    return layers


# ----------------------------------------------------------------------------------------------------------------------
# The two passes and the chunked KL


def base_pass(model: Transformer, idx, first: int, share_prefix: bool):
    """The original model's final residual stream (the caller disables adapters and grad). With a shared prefix, also
    the stream after block `first`, which the spliced pass starts from."""
    x = model.embed(idx)
    if not share_prefix:
        return model.blocks(x), None
    x = model.blocks(x, 0, first)
    return model.blocks(x, first + 1), x


def spliced_pass(model: Transformer, saes, idx, prefix, bos_id, splice_bos: bool):
    """The adapted model's final residual stream with every SAE spliced in (from the shared prefix when given)."""
    hooks = splice_hooks(saes, idx, bos_id, splice_bos)
    if prefix is None:
        return model.blocks(model.embed(idx), hooks=hooks)
    first = saes[0][0]
    x = hooks.pop(first)(prefix)
    return model.blocks(x, first + 1, hooks=hooks) if first + 1 < model.cfg.n_layer else x


def final_streams(model: Transformer, saes, idx, bos_id, splice_bos, share_prefix: bool, passes=None):
    """Final residual streams of the original model (no grad, adapters off) and of the spliced, adapted model.

    When every adapter sits after the first SAE, blocks 0..L are identical in both passes: run them once.
    `passes` are compiled versions of (base_pass, spliced_pass): compiled apart, as a graph that mixes a no-grad
    region with the SAE's custom autograd function loses its gradients (torch 2.13)."""
    base, spliced = passes or (base_pass, spliced_pass)
    with torch.no_grad(), adapters_disabled(model):
        h_base, prefix = base(model, idx, saes[0][0], share_prefix)
    return h_base, spliced(model, saes, idx, prefix, bos_id, splice_bos)


def _chunk_losses(model: Transformer, h_spliced, h_base, targets):
    # Eq. 7: KL(p_orig || p_spliced) summed over the chunk's tokens; CE of the spliced model for the log
    with torch.no_grad():
        logp_base = F.log_softmax(model.head(h_base).float(), dim=-1)
    logp = F.log_softmax(model.head(h_spliced).float(), dim=-1)
    kl = F.kl_div(logp, logp_base, log_target=True, reduction="sum")
    with torch.no_grad():
        ce = F.nll_loss(logp, targets, ignore_index=-1, reduction="sum")
    return kl, ce


def kl_and_ce(model: Transformer, h_base, h_spliced, idx, chunk: int):
    """Mean KL per token (with grad) and mean next-token CE (no grad), lm_head + log-softmax one chunk at a time.

    With several chunks, each runs under activation checkpointing, so its (chunk, vocab) logits are recomputed in the
    backward instead of all chunks' logits being kept alive at once; a single chunk skips the recomputation."""
    d = h_base.shape[-1]
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1).reshape(-1)  # last position: none
    hb, hs = h_base.reshape(-1, d), h_spliced.reshape(-1, d)
    kl_sum, ce_sum = 0.0, 0.0
    recompute = hs.requires_grad and hb.shape[0] > chunk
    for s in range(0, hb.shape[0], chunk):
        args = (model, hs[s:s + chunk], hb[s:s + chunk], targets[s:s + chunk])
        kl, ce = checkpoint(_chunk_losses, *args, use_reentrant=False) if recompute else _chunk_losses(*args)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    return kl_sum / hb.shape[0], ce_sum / (targets >= 0).sum()


@torch.no_grad()
def evaluate(model: Transformer, saes, batches, bos_id, splice_bos, chunk: int, amp) -> dict:
    """On held-out tokens: CE of the original model, with the SAE(s), with SAE(s) + LoRA; mean KL to the original
    model's distribution for the last two (Eq. 7, the training objective); and the fraction of the CE gap closed.
    A model without adapters (e.g. to score an SAE checkpoint alone) skips the third pass: it equals the second."""
    keys = ("ce_base", "ce_sae", "ce_sae_lora", "kl_sae", "kl_sae_lora")
    sums = dict.fromkeys(keys, 0.0)
    n = 0
    adapted = bool(lora_modules(model))
    was_training = model.training
    model.eval()
    for idx in batches:
        with amp:
            with adapters_disabled(model):
                total, count = next_token_ce(model, idx, None, chunk)
                kl_sae, ce_sae = kl_and_ce(model, *final_streams(model, saes, idx, bos_id, splice_bos, False), idx,
                                           chunk)
            kl_lora, ce_lora = kl_and_ce(model, *final_streams(model, saes, idx, bos_id, splice_bos, False), idx,
                                         chunk) if adapted else (kl_sae, ce_sae)
        for key, value in zip(keys, (total / count, ce_sae, ce_lora, kl_sae, kl_lora)):
            sums[key] += float(value) * count
        n += count
    model.train(was_training)
    # all-reduce sums and the count together: the ratio is the mean over every process's tokens
    t = common.all_reduce_mean(torch.tensor([*sums.values(), n], dtype=torch.float64))
    return gap_closed(dict(zip(keys, (t[:-1] / t[-1]).tolist())))


def gap_closed(res: dict) -> dict:
    gap = res["ce_sae"] - res["ce_base"]
    res["gap_closed"] = (res["ce_sae"] - res["ce_sae_lora"]) / gap if gap > 0 else float("nan")
    return res


def lr_at(step: int, total: int, cfg: AdaptConfig) -> float:
    warmup = max(1, int(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_flops(model: Transformer, saes, seq_len: int, share_prefix: bool) -> float:
    """FLOPs per token of one training step, for MFU: base forward + spliced forward and backward-to-activations
    (frozen weights need no weight gradients, so a backward costs about one forward), plus the SAEs."""
    c = model.cfg
    per_token = c.flops_per_token(seq_len)
    frac = (c.n_layer - saes[0][0] - 1) / c.n_layer if share_prefix else 1.0
    sae_flops = sum(2 * 2 * s.d_in * s.d_sae for _, s in saes)  # encoder forward + its backward to the input
    return per_token * (1 + 2 * frac) + sae_flops


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2: for a model that does not fit one device, every decoder layer's weights (frozen base and adapters) are
# sharded across the ranks and all-gathered just in time for its forward and backward; gradients are reduce-scattered.
# Embeddings and the final norm stay whole on every rank: the tied lm_head reads them outside any module's forward.


def shard_layers(model: Transformer):
    from torch.distributed.fsdp import fully_shard
    if not torch.distributed.is_initialized():
        raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
    for layer in model.model.layers:
        fully_shard(layer)
        # every layer is its own FSDP root here (the embeddings stay outside), and FSDP2 keeps a root's weights
        # gathered after its forward; free them after each forward instead, or the model would end up whole
        layer.set_reshard_after_forward(True)


def optimizer_state(optimizer, params, load: dict | None = None):
    """Adam's state with whole tensors (under FSDP2 gathered from the shards, the same order on every rank), or that
    state loaded back, each rank keeping its shard."""
    if load is None:
        sd = optimizer.state_dict()
        sd["state"] = {i: {k: common.whole(v) if torch.is_tensor(v) else v for k, v in sd["state"][i].items()}
                       for i in sorted(sd["state"])}
        return sd
    for i, st in load["state"].items():  # moments have their parameter's shape; Adam's step count is a scalar
        st.update({k: common.shard_like(params[i], v) for k, v in st.items()
                   if torch.is_tensor(v) and v.shape == params[i].shape})
    optimizer.load_state_dict(load)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg = common.parse_args(AdaptConfig, argv)
    run = common.setup(cfg.device)
    log = print if run.master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank

    # -- the embedded default: tiny model, corpus and SAE built offline on first use --------------------------------
    if cfg.model is None:  # tiny-model hyperparameters, for each flag the user left at its paper default
        defaults = AdaptConfig()
        for key, value in EMBEDDED.items():
            if getattr(cfg, key) == getattr(defaults, key):
                setattr(cfg, key, value)
    if cfg.model is None or cfg.data is None or not cfg.sae:
        import data
        import pretrain
        import train_sae
        cache = data.default_cache_dir()
        if cfg.data is None:
            cfg.data = data.embedded_dataset(cache)[0]
        if cfg.model is None:
            cfg.model = pretrain.ensure_tiny_model(cache)
        if not cfg.sae:
            cfg.sae = [train_sae.ensure_tiny_sae(cfg.model, cfg.data, cache)]

    # -- model, SAEs, adapters ------------------------------------------------------------------------------------------
    model = Transformer.from_pretrained(cfg.model, device=run.device)
    if cfg.dtype != "float32":
        model.to(getattr(torch, cfg.dtype))  # before apply_lora: adapters are created in fp32 on a half base
    model.requires_grad_(False)
    saes = load_saes(cfg.sae, cfg.layer, model, run.device)
    lora_layers = choose_lora_layers(cfg.layers, saes, model.cfg.n_layer, cfg.allow_before_jumprelu)
    params = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, lora_layers)
    if cfg.fsdp:
        shard_layers(model)
        params = adapter_parameters(model)  # now DTensors, each rank holding its shard
    share_prefix = min(lora_layers) > saes[0][0]
    bos_id = model.cfg.bos_token_id
    n_train = sum(p.numel() for p in params)
    log(f"model {cfg.model}: {model.cfg.n_layer} layers, d_model {model.cfg.d_model}; "
        f"SAEs at layers {[layer for layer, _ in saes]} ({', '.join(s.arch for _, s in saes)}); "
        f"LoRA rank {cfg.rank} on layers {lora_layers[0]}..{lora_layers[-1]}: {n_train / 1e6:.2f}M parameters; "
        f"shared prefix: {share_prefix}")

    # -- data -----------------------------------------------------------------------------------------------------------
    from data import TokenLoader
    train = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, run.rank, run.world_size, cfg.seed,
                        device=run.device)
    val = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, run.rank, run.world_size, cfg.seed,
                      shuffle=False, device=run.device)
    n_val = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len * run.world_size))
    val_batches = [val.next_batch() for _ in range(n_val)]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * run.world_size
    total_steps = max(1, cfg.max_tokens // tokens_per_step)

    # -- optimiser, compile, resume ---------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    passes = (torch.compile(base_pass), torch.compile(spliced_pass)) if cfg.compile and not cfg.fsdp else None
    amp = common.autocast(run.device, cfg.autocast)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    step, history, elapsed = 0, [], 0.0
    if cfg.resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location=run.device, weights_only=False)
        for p, saved in zip(params, state["adapter"]):
            p.data.copy_(common.shard_like(p, saved))
        optimizer_state(optimizer, params, load=state["optimizer"])
        train.load_state_dict(state["loader"][run.rank] if isinstance(state["loader"], list) else state["loader"])
        torch.set_rng_state(state["rng"])
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        log(f"resumed from {ckpt_path} at step {step}")
    elif cfg.resume:
        log(f"--resume: no checkpoint at {ckpt_path}, starting fresh")

    def save_checkpoint():
        loaders = common.gather_objects(train.state_dict())
        adapter, optim = [common.whole(p) for p in params], optimizer_state(optimizer, params)  # collectives
        if cfg.fsdp or run.master:  # under FSDP2 every rank takes part in gathering the adapter; rank 0 writes it
            save_adapter(model, os.path.join(cfg.out, "adapter"), cfg.model)
        if run.master:
            common.atomic_torch_save(dict(adapter=adapter, optimizer=optim, loader=loaders, rng=torch.get_rng_state(),
                                          step=step, history=history, elapsed=elapsed, config=asdict(cfg)), ckpt_path)

    if step == 0:
        res = evaluate(model, saes, val_batches, bos_id, cfg.splice_bos, cfg.kl_chunk, amp)
        history.append(dict(step=0, tokens=0, time=0.0, **res))
        log(f"step 0 | val CE base {res['ce_base']:.4f} | with SAE {res['ce_sae']:.4f} | gap "
            f"{res['ce_sae'] - res['ce_base']:.4f} nats | KL {res['kl_sae']:.4f}")

    # -- the loop -------------------------------------------------------------------------------------------------------
    model.train()
    flops_step = step_flops(model, saes, cfg.seq_len, share_prefix) * tokens_per_step
    peak = common.peak_flops(run.device, cfg.autocast) * run.world_size
    window_tokens, window_time = 0, 0.0
    while step < total_steps:
        t_step = time.time()
        lr = lr_at(step, total_steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        kl_log, ce_log = 0.0, 0.0
        for _ in range(cfg.grad_accum):
            idx = train.next_batch()
            with amp:
                h_base, h_spliced = final_streams(model, saes, idx, bos_id, cfg.splice_bos, share_prefix, passes)
                kl, ce = kl_and_ce(model, h_base, h_spliced, idx, cfg.kl_chunk)
            (kl / cfg.grad_accum).backward()
            kl_log += kl.item() / cfg.grad_accum
            ce_log += ce.item() / cfg.grad_accum
        if not math.isfinite(kl_log):
            raise FloatingPointError(f"KL is {kl_log} at step {step} (lr {lr:.2e}); the last good checkpoint is "
                                     f"{ckpt_path}: lower --lr or use --autocast float32, then --resume")
        if not cfg.fsdp:  # FSDP2 has reduce-scattered them already
            common.all_reduce_grads(params)  # adapters are a few MB: one flat all-reduce instead of a DDP wrapper
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t_step
        elapsed += dt
        window_tokens, window_time = window_tokens + tokens_per_step, window_time + dt

        if step % cfg.log_interval == 0 or step == total_steps:
            tps = window_tokens / window_time
            eta = (total_steps - step) * window_time / (window_tokens / tokens_per_step)
            log(f"step {step}/{total_steps} | KL {kl_log:.4f} | train CE w/ SAE {ce_log:.4f} | lr {lr:.2e} | "
                f"{tps:,.0f} tok/s | MFU {tps * flops_step / tokens_per_step / peak:.1%} | ETA {eta / 60:.1f} min")
            history.append(dict(step=step, tokens=step * tokens_per_step, time=elapsed, kl=kl_log, train_ce=ce_log,
                                tokens_per_s=tps))
            window_tokens, window_time = 0, 0.0
        if step % cfg.eval_interval == 0 or step == total_steps:
            res = evaluate(model, saes, val_batches, bos_id, cfg.splice_bos, cfg.kl_chunk, amp)
            history.append(dict(step=step, tokens=step * tokens_per_step, time=elapsed, **res))
            log(f"step {step} | val CE base {res['ce_base']:.4f} | with SAE {res['ce_sae']:.4f} | with SAE + LoRA "
                f"{res['ce_sae_lora']:.4f} | gap closed {res['gap_closed']:.1%} | KL {res['kl_sae']:.4f} -> "
                f"{res['kl_sae_lora']:.4f}")
        if step % cfg.ckpt_interval == 0 or step == total_steps:
            save_checkpoint()

    # -- results --------------------------------------------------------------------------------------------------------
    final = next(h for h in reversed(history) if "ce_sae_lora" in h)
    results = dict(ce_base=final["ce_base"], ce_sae=final["ce_sae"], ce_sae_lora=final["ce_sae_lora"],
                   gap_closed=final["gap_closed"], kl_sae=final["kl_sae"], kl_sae_lora=final["kl_sae_lora"], tokens_per_s=step * tokens_per_step / max(elapsed, 1e-9),
                   train_tokens=step * tokens_per_step, train_seconds=elapsed, steps=step,
                   sae_layers=[layer for layer, _ in saes], lora_layers=lora_layers, config=asdict(cfg),
                   history=history)
    if run.master:
        tmp = os.path.join(cfg.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(cfg.out, "results.json"))
        log(f"done: CE {results['ce_base']:.4f} (original) / {results['ce_sae']:.4f} (SAE) / "
            f"{results['ce_sae_lora']:.4f} (SAE + LoRA): {results['gap_closed']:.1%} of the gap closed; "
            f"adapter in {os.path.join(cfg.out, 'adapter')}")
    common.teardown()
    return results


if __name__ == "__main__":
    main()
