"""
Train a TopK (default), BatchTopK or JumpReLU SAE on one layer's residual stream, or (--transcoder) a transcoder
from one layer's normalised MLP input to its MLP sublayer's output, which adapt.py splices in place of that MLP.

    python train_sae.py                                 # the embedded tiny model's SAE recipe (plumbing/embedded.py)
    python train_sae.py --transcoder                    # the same recipe, a TopK transcoder (out/transcoder-tiny)
    torchrun --nproc_per_node 8 train_sae.py --model google/gemma-2-2b --layer 12 --k 64 --data data/redpajama

Activations come from `model(idx, stop_at=layer)` under no_grad and bf16 autocast (the blocks above the layer are never
run), go into a shuffled buffer, and are consumed in large SAE batches. Gao et al.'s recipe: b_dec at the geometric
median, unit-norm decoder rows with the radial gradient removed, Adam at 2e-4 / sqrt(m / 2^14), AuxK for dead latents.
SAELens-format checkpoints at every 10% of training (ckpt_010 .. ckpt_100) feed the paper's loss-vs-compute frontier.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

import torch

from plumbing import common
from plumbing import distributed
from plumbing import embedded
from config.train_sae import MAY_CHANGE, TrainSAEConfig
from data import TokenLoader, check_data_matches, held_out_batches
from model import Transformer, compile_blocks
from plumbing.run import Run
from sae import SAE
from training.sae_loss import (clamp_threshold_, geometric_median, remove_gradient_parallel_to_decoder_directions,
                               set_decoder_norm_to_unit_norm, to_jumprelu, training_loss, update_since_fired)
from evals.held_out import evaluate


# ----------------------------------------------------------------------------------------------------------------------


class ActivationBuffer:
    """Residual-stream activations of `layer`, `size` tokens at a time, shuffled, handed out in SAE batches.

    Each refill starts from a recorded loader position and RNG state, so a checkpoint needs only those two and the
    position inside the buffer: on resume the same activations are recomputed and consumption continues exactly."""

    def __init__(self, model, loader, layer, size, include_bos, autocast_ctx, device, transcoder=False, seed=0):
        self.model, self.loader, self.layer, self.size = model, loader, layer, size
        # the blocks above the layer never run. A transcoder's: (MLP input, MLP output) side by side
        self.forward = (lambda idx: mlp_pairs(model, idx, layer)) if transcoder else \
            (lambda idx: model(idx, stop_at=layer))
        self.include_bos, self.autocast_ctx, self.device = include_bos, autocast_ctx, device
        # the shuffle's own stream: torch's default seed offset by --seed, so seed 0 keeps the permutations the
        # shipped SAE (shipped/README.md) was trained with and every other seed draws others
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(self.gen.initial_seed() + seed)
        self.acts, self.pos, self.fill_state = None, 0, None

    @torch.no_grad()
    def refill(self):
        self.fill_state = dict(loader=self.loader.state_dict(), gen=self.gen.get_state())
        chunks, n = [], 0
        while n < self.size:
            idx = self.loader.next_batch()
            with self.autocast_ctx:
                x = self.forward(idx)
            if not self.include_bos:
                x = x[idx != self.model.cfg.bos_token_id]
            x = x.reshape(-1, x.shape[-1]).float()
            chunks.append(x)
            n += x.shape[0]
        acts = torch.cat(chunks)[: self.size]
        self.acts = acts[torch.randperm(acts.shape[0], generator=self.gen).to(acts.device)]
        self.pos = 0

    def next(self, n: int) -> torch.Tensor:
        if self.acts is None or self.pos + n > self.acts.shape[0]:
            self.refill()
        batch = self.acts[self.pos:self.pos + n]
        self.pos += n
        return batch

    def state_dict(self):
        return dict(fill_state=self.fill_state, pos=self.pos)

    def load_state_dict(self, state):
        if state["fill_state"] is not None:
            self.loader.load_state_dict(state["fill_state"]["loader"])
            self.gen.set_state(state["fill_state"]["gen"])
            self.refill()
            self.pos = state["pos"]


def mlp_pairs(model, idx, layer):
    """(B, T, 2 d): block `layer`'s normalised MLP input and its MLP sublayer's output, concatenated."""
    seen = {}

    def hook(h, mlp_out):
        y = mlp_out(h)
        seen["xy"] = torch.cat([h, y], dim=-1)
        return y
    model(idx, hooks={("mlp", layer): hook}, stop_at=layer)
    return seen["xy"]


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    # -- config: the flags; without --model, config/train_sae_tiny.py (the embedded SAE's recipe) -------------------
    cfg, typed = common.parse_args(TrainSAEConfig, argv, epilog=embedded.preset_help("train_sae"))
    embedded.fill_in(cfg, typed, "train_sae")
    if cfg.transcoder and "out" not in typed:  # out/sae-tiny -> out/transcoder-tiny: never over an SAE's folder
        cfg.out = cfg.out.replace("sae", "transcoder")
    if cfg.recipe == "authors":  # their vendored trainer (es/trainer.py:100-127, 370-439; es/config.py)
        common.set_untyped(cfg, typed, dict(batch_tokens=cfg.seq_len, buffer_tokens=cfg.seq_len, model_batch=1,
                                            auxk_coef=0.0, include_bos=True, decay_frac=1.0,
                                            warmup_frac=min(1.0, 1000 / max(1, cfg.max_tokens // cfg.seq_len))),
                           "recipe")
        common.log_preset(cfg, "recipe", "train_sae.py: --recipe authors replaces these values (typed flags win):")
    if len(cfg.layer) != 1:
        raise ValueError(f"train_sae.py trains one SAE: give exactly one --layer (got {cfg.layer or 'none'})")
    layer = cfg.layer[0]
    with Run(cfg, outputs=("history.json", "cfg.json", "sae_weights.safetensors", "ckpt_[0-9][0-9][0-9]"),
             may_change=MAY_CHANGE, inputs=dict(model=cfg.model, data=cfg.data),
             one_step=(cfg.batch_tokens, "--batch-tokens")) as run:
        ddp = run.ddp
        torch.manual_seed(cfg.seed)  # same SAE init on every rank

        # -- frozen model, SAE, optimiser ---------------------------------------------------------------------------
        model = Transformer.from_pretrained(cfg.model, device=ddp.device, dtype=getattr(torch, cfg.dtype))
        model.requires_grad_(False)
        if not 0 <= layer < model.cfg.n_layer:
            raise ValueError(f"--layer {layer} is out of range: the model has layers 0..{model.cfg.n_layer - 1}")
        dm, m = model.cfg.d_model, cfg.expansion * model.cfg.d_model
        sae = SAE(dm, m, cfg.arch, k=None if cfg.arch == "jumprelu" else cfg.k, layer=layer, model_name=cfg.model,
                  device=ddp.device, apply_b_dec_to_input=not cfg.transcoder)  # b_dec lives in the output's space
        sae.bandwidth, sae.transcoder = cfg.bandwidth, cfg.transcoder
        peak_lr = cfg.lr or 2e-4 / math.sqrt(m / 2 ** 14)  # Gao et al.'s rule
        optimizer = torch.optim.Adam(sae.parameters(), lr=peak_lr, betas=(0.9, 0.999), eps=6.25e-10)
        cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
        autocast_ctx = common.autocast(ddp.device, cfg.autocast)

        # -- data: activations of the layer in a shuffled buffer -----------------------------------------------------
        check_data_matches(cfg.data, cfg.model)  # one line if the tokens were made by another tokenizer
        loader = TokenLoader(cfg.data, "train", cfg.model_batch, cfg.seq_len, ddp.rank, ddp.world_size, cfg.seed,
                             device=ddp.device)
        val = TokenLoader(cfg.data, cfg.eval_split, cfg.model_batch, cfg.seq_len, ddp.rank, ddp.world_size,
                          shuffle=False, device=ddp.device)
        val_batches = held_out_batches(val, cfg.eval_batches, f"--eval-batches {cfg.eval_batches}",
                                       "--model-batch or --seq-len")
        per_rank = cfg.batch_tokens // ddp.world_size  # the global SAE batch is split across ranks
        buffer = ActivationBuffer(model, loader, layer, max(cfg.buffer_tokens // ddp.world_size, per_rank),
                                  cfg.include_bos, autocast_ctx, ddp.device, transcoder=cfg.transcoder, seed=cfg.seed)
        split = (lambda xy: (xy[:, :dm], xy[:, dm:])) if cfg.transcoder else (lambda x: (x, None))  # input, target
        compile_blocks(model, cfg.compile)  # each block its own graph, shared by the blocks of its kind
        total_steps = max(1, cfg.max_tokens // cfg.batch_tokens)

        # -- resume, or b_dec at the geometric median --------------------------------------------------------------
        run.keep(sae=sae, optimizer=optimizer, buffer=buffer)  # what a checkpoint holds and --resume restores
        state = run.resume(("since_fired", "history", "scale"))
        if state:
            since_fired, step, history, scale = (state[k] for k in ("since_fired", "step", "history", "scale"))
        else:
            since_fired = torch.zeros(m, dtype=torch.long, device=ddp.device)  # tokens (global) since each fired
            step, history = 0, []
            # b_dec at the geometric median of a sample, and the loss scale; the sample is gathered from every rank so
            # that all ranks (and a single-process run over the same tokens) start identically
            sample = buffer.next(min(per_rank * 4, buffer.size))
            buffer.pos = 0
            sample = distributed.all_gather_cat(sample)
            inputs, sample = split(sample)
            sample = sample if cfg.transcoder else inputs  # b_dec and the scale: of what is reconstructed
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(sample))
            scale = (sample - sample.mean(0)).pow(2).sum(-1).mean().item()
            if cfg.transcoder:  # the tied init maps inputs to outputs of the input's size: start at the target's
                with torch.no_grad():
                    sae.W_enc.mul_(math.sqrt(scale / inputs.pow(2).sum(-1).mean().item()))
        sparsity = f"L0 coef {cfg.l0_coef}" if cfg.arch == "jumprelu" else f"k {cfg.k}"
        common.log(f"{'transcoder' if cfg.transcoder else 'SAE'} {cfg.arch} d_in {dm} d_sae {m} {sparsity} at layer "
                   f"{layer}; lr {peak_lr:.2e}; {total_steps} steps of {cfg.batch_tokens} tokens on "
                   f"{ddp.world_size} process(es)")
        advice = f"a lower --lr than {peak_lr:.3g}"

        def save_sae(folder):  # a BatchTopK SAE is used as the JumpReLU SAE its global threshold defines
            if ddp.master:
                (to_jumprelu(sae) if sae.arch == "batchtopk" else sae).save(folder)

        def held_out():  # ce_base, ce_sae and kl_sae as splice.py defines them (BOS keeps its activation, as trained)
            sae.eval()
            res = evaluate(model, [(layer, sae)], val_batches, model.cfg.bos_token_id, autocast_ctx=autocast_ctx)
            sae.train()
            return res

        # -- the loop ------------------------------------------------------------------------------------------------
        sae.train()
        checkpoints = {round(total_steps * p / 10): f"ckpt_{p * 10:03d}" for p in range(1, 11)}  # the frontier's
        while step < total_steps:
            t0 = time.time()
            x, target = split(buffer.next(per_rank))
            lr = common.lr_at(step, total_steps, peak_lr, cfg.warmup_frac, cfg.decay_frac, shape="linear")
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast_ctx:
                loss, stats, fired = training_loss(sae, x, since_fired >= cfg.dead_tokens, scale, l0_coef=cfg.l0_coef,
                                                   auxk_coef=cfg.auxk_coef, target=target)
            # the loss of the SAE after `step` updates, over every rank (one rank's NaN stops them all at this step)
            run.watch(step, loss)
            run.stop_if_diverged(step, {}, "SAE training diverged", advice)
            loss.backward()
            distributed.all_reduce_grads(sae.parameters())
            fired = distributed.all_reduce_mean(fired.float()) > 0
            remove_gradient_parallel_to_decoder_directions(sae)
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            set_decoder_norm_to_unit_norm(sae)
            clamp_threshold_(sae)
            update_since_fired(since_fired, fired, cfg.batch_tokens)
            step += 1
            run.tick(cfg.batch_tokens, time.time() - t0)

            if step % cfg.log_interval == 0 or step == total_steps:
                dead = (since_fired >= cfg.dead_tokens).float().mean().item()
                _, speed = run.speed((total_steps - step) * cfg.batch_tokens)
                common.log(f"step {step}/{total_steps} | FVU {stats['fvu']:.4f} | L0 {stats['l0']:.1f} | dead "
                           f"{dead:.1%} | {run.elapsed / 60:.1f} min | {speed}")
                history.append(dict(step=step, tokens=step * cfg.batch_tokens, time=run.elapsed, dead=dead, **stats))
            if step % cfg.eval_interval == 0 or step == total_steps:
                res = held_out()
                history.append(dict(step=step, tokens=step * cfg.batch_tokens, time=run.elapsed, **res))
                common.log(f"step {step} | val CE {res['ce_base']:.4f} original, {res['ce_sae']:.4f} with SAE | "
                           f"KL {res['kl_sae']:.4f}")
            if step in checkpoints:
                run.stop_if_diverged(step, sae.state_dict(), "SAE training diverged", advice)  # a checkpoint is finite
                run.save(since_fired=since_fired, scale=scale, step=step, history=history,
                         effective=dict(lr=peak_lr))
                save_sae(os.path.join(cfg.out, checkpoints[step]))

        # -- save ------------------------------------------------------------------------------------------------------
        save_sae(cfg.out)
        run.finish("history.json", dict(config=asdict(cfg), config_sources=common.sources(cfg), history=history))
        common.log(f"saved {cfg.out} (SAELens format) and checkpoints ckpt_010..ckpt_100")
    return dict(history=history, sae=sae)


if __name__ == "__main__":
    common.cli(main)
