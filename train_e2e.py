"""
End-to-end SAEs (Braun et al. 2024), the paper's baseline (Sec. 3.2): the SAE is spliced into the frozen model and
trained to minimise KL(p_orig || p_spliced) through every later layer, instead of its reconstruction error.

    python train_e2e.py --model cache/tiny-gemma2 --layer 2 --k 16
    torchrun --nproc_per_node 8 train_e2e.py --model meta-llama/Llama-3.2-1B --layer 12 --k 64 --data data/redpajama

Same TopK activation and k as the TopK baseline (as in the paper), same decoder-norm handling and learning-rate rule
as train_sae.py, the chunked KL of adapt.py. `--ds-coef > 0` adds Braun et al.'s downstream reconstruction terms
(e2e+ds): the spliced model's residual stream after each later block should also match the original's.
Every step is one backward pass through the model: the log counts them, for the loss-vs-compute comparison.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import common
from adapt import kl_and_ce
from model import Transformer, next_token_ce
from sae import SAE, splice_hooks
from train_sae import geometric_median, lr_at


@dataclass
class E2EConfig:
    """Train an end-to-end (KL) TopK SAE through the frozen model."""
    model: str | None = None  # HF folder or hub id; None = the embedded tiny model
    data: str | None = None  # token dataset folder; None = the embedded stdlib corpus
    out: str = "out/e2e"
    layer: int = 12
    k: int = 64
    expansion: int = 8
    ds_coef: float = 0.0  # > 0: e2e+ds, downstream reconstruction MSE (normalised per layer) weighted by this
    max_tokens: int = 50_000_000
    batch_size: int = 4  # sequences per process per step
    seq_len: int = 1024
    lr: float | None = None  # None: Gao et al.'s 2e-4 / sqrt(m / 2^14), as the paper used for e2e too
    warmup_frac: float = 0.01
    decay_frac: float = 0.2
    grad_clip: float = 1.0
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    splice_bos: bool = False  # BOS keeps its original activation by default, as in adapt.py
    autocast: str = "bfloat16"
    compile: bool = True  # the no-grad original pass (flex_attention for Gemma-2 on CPU); the spliced pass stays eager
    kl_chunk: int = 2048
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 8
    resume: bool = False
    seed: int = 0
    device: str = "auto"


def original_pass(model: Transformer, idx, layer: int, ds: bool):
    """The original model's stream after block `layer` (shared by both passes) and its final stream; for e2e+ds also
    every later block's output. The caller disables grad."""
    x = model.blocks(model.embed(idx), 0, layer)
    base_acts = {}
    later = range(layer + 1, model.cfg.n_layer - 1) if ds else range(0)
    return x, model.blocks(x, layer + 1, hooks={i: _keep(base_acts, i) for i in later}), base_acts


def spliced_pass(model: Transformer, sae: SAE, idx, layer: int, splice_bos: bool, ds: bool, original=None):
    """Original and spliced final residual streams (and, for e2e+ds, every later block's output in both passes).
    The prefix up to `layer` is shared: it is the same computation in both passes. Returns the latent indices that
    fired, for dead-latent accounting. `original`: a compiled original_pass."""
    with torch.no_grad():
        x, h_base, base_acts = (original or original_pass)(model, idx, layer, ds)
    sp_acts = {}
    hook = splice_hooks([(layer, sae)], idx, model.cfg.bos_token_id, splice_bos)[layer]
    with torch.no_grad():  # which latents fire, for dead-latent accounting (one extra encoder matmul, no grad)
        fired_idx = sae.encode_topk(x)[1]
    h_sp = model.blocks(hook(x), layer + 1, hooks={i: _keep(sp_acts, i) for i in base_acts})  # the same layers
    return h_base, h_sp, base_acts, sp_acts, fired_idx


def _keep(store: dict, i: int):
    def hook(x):
        store[i] = x
        return x
    return hook


def main(argv=None) -> dict:
    cfg = common.parse_args(E2EConfig, argv)
    run = common.setup(cfg.device)
    log = print if run.master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    if cfg.model is None or cfg.data is None:
        import data
        import pretrain
        cache = data.default_cache_dir()
        cfg.data = cfg.data or data.embedded_dataset(cache)[0]
        cfg.model = cfg.model or pretrain.ensure_tiny_model(cache)

    model = Transformer.from_pretrained(cfg.model, device=run.device).requires_grad_(False)
    if not 0 <= cfg.layer < model.cfg.n_layer - 1:
        raise ValueError(f"--layer {cfg.layer} is out of range: an e2e SAE needs a later layer to train through; "
                         f"this model has layers 0..{model.cfg.n_layer - 1}")
    d, m = model.cfg.d_model, cfg.expansion * model.cfg.d_model
    sae = SAE(d, m, "topk", k=cfg.k, layer=cfg.layer, model_name=cfg.model, device=run.device)
    lr = cfg.lr or 2e-4 / math.sqrt(m / 2 ** 14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
    amp = common.autocast(run.device, cfg.autocast)

    from data import TokenLoader
    loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, run.rank, run.world_size, cfg.seed,
                         device=run.device)
    val = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, run.rank, run.world_size, cfg.seed,
                      shuffle=False, device=run.device)
    val_batches = [val.next_batch() for _ in range(cfg.eval_batches)]
    tokens_per_step = cfg.batch_size * cfg.seq_len * run.world_size
    total_steps = max(1, cfg.max_tokens // tokens_per_step)
    since_fired = torch.zeros(m, dtype=torch.long, device=run.device)
    state_path, csv_path = os.path.join(cfg.out, "state.pt"), os.path.join(cfg.out, "log.csv")
    step, elapsed, rows = 0, 0.0, []

    if cfg.resume and os.path.isfile(state_path):
        st = torch.load(state_path, map_location=run.device, weights_only=False)
        sae.load_state_dict(st["sae"])
        optimizer.load_state_dict(st["optimizer"])
        loader.load_state_dict(st["loader"][run.rank])
        since_fired, step, elapsed, rows = st["since_fired"], st["step"], st["elapsed"], st["rows"]
        log(f"resumed from {state_path} at step {step}")
    else:  # b_dec at the geometric median of the layer's activations (from every rank), as for the TopK baseline
        with torch.no_grad(), amp:
            sample = model(val_batches[0], stop_at=cfg.layer)[:, 1:].reshape(-1, d).float()
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(common.all_gather_cat(sample)))
    log(f"e2e{'+ds' if cfg.ds_coef else ''} TopK SAE d_in {d} d_sae {m} k {cfg.k} at layer {cfg.layer}; lr {lr:.2e}; "
        f"{total_steps} steps of {tokens_per_step} tokens")

    def save_state():
        loaders = common.gather_objects(loader.state_dict())
        if run.master:
            common.atomic_torch_save(dict(sae=sae.state_dict(), optimizer=optimizer.state_dict(), loader=loaders,
                                          since_fired=since_fired, step=step, elapsed=elapsed, rows=rows,
                                          config=asdict(cfg)), state_path)
            tmp = csv_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                fields = sorted({k for r in rows for k in r})
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, csv_path)

    def validation_ce():
        sae.eval()
        total, n = 0.0, 0
        with torch.no_grad(), amp:
            for idx in val_batches:
                s, c = next_token_ce(model, idx, splice_hooks([(cfg.layer, sae)], idx, model.cfg.bos_token_id,
                                                              cfg.splice_bos))
                total, n = total + s, n + c
        sae.train()
        t = common.all_reduce_mean(torch.tensor([total, n], dtype=torch.float64))
        return (t[0] / t[1]).item()

    checkpoints = {round(total_steps * p / 10): f"ckpt_{p * 10:03d}" for p in range(1, 11)}
    original = torch.compile(original_pass) if cfg.compile else None
    sae.train()
    while step < total_steps:
        t0 = time.time()
        cur_lr = lr_at(step, total_steps, lr, cfg)
        for g in optimizer.param_groups:
            g["lr"] = cur_lr
        idx = loader.next_batch()
        with amp:
            h_base, h_sp, base_acts, sp_acts, fired_idx = spliced_pass(model, sae, idx, cfg.layer, cfg.splice_bos,
                                                                        cfg.ds_coef > 0, original)
            kl, ce = kl_and_ce(model, h_base, h_sp, idx, cfg.kl_chunk)
            loss = kl
            if cfg.ds_coef > 0:  # Braun et al.'s e2e+ds: downstream streams should match too (normalised MSE)
                ds = sum(((sp_acts[i].float() - base_acts[i].float()).pow(2).sum(-1).mean()
                          / base_acts[i].float().pow(2).sum(-1).mean()) for i in base_acts) / max(1, len(base_acts))
                loss = loss + cfg.ds_coef * ds
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; last good state: {state_path} "
                                     f"(lower --lr, then --resume)")
        loss.backward()
        common.all_reduce_grads(sae.parameters())
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(m, device=run.device)
        fired[fired_idx.reshape(-1)] = 1.0
        fired = common.all_reduce_mean(fired) > 0
        since_fired += tokens_per_step
        since_fired[fired] = 0
        step += 1
        elapsed += time.time() - t0

        if step % cfg.log_interval == 0 or step == total_steps:
            dead = (since_fired >= cfg.dead_tokens).float().mean().item()
            log(f"step {step}/{total_steps} | KL {kl.item():.4f} | train CE w/ SAE {ce.item():.4f} | lr {cur_lr:.2e} | "
                f"{tokens_per_step * step / max(elapsed, 1e-9):,.0f} tok/s")
            rows.append(dict(step=step, tokens=step * tokens_per_step, seconds=elapsed, backward_passes=step,
                             kl=kl.item(), train_ce=ce.item(), l0=float(cfg.k), dead=dead))
        if step % cfg.eval_interval == 0 or step == total_steps:
            ce_val = validation_ce()
            rows.append(dict(step=step, tokens=step * tokens_per_step, seconds=elapsed, backward_passes=step,
                             val_ce_sae=ce_val))
            log(f"step {step} | val CE with SAE {ce_val:.4f} | {elapsed / 60:.1f} min")
        if step in checkpoints:
            if run.master:
                sae.save(os.path.join(cfg.out, checkpoints[step]))
            save_state()

    if run.master:
        sae.save(cfg.out)
        log(f"saved {cfg.out} (SAELens format), log.csv and checkpoints ckpt_010..ckpt_100")
    common.teardown()
    return dict(rows=rows, sae=sae)


if __name__ == "__main__":
    main()
