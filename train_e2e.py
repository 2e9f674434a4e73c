"""
End-to-end SAEs (Braun et al. 2024), the paper's baseline (Sec. 3.2): the SAE is spliced into the frozen model and
trained to minimise KL(p_orig || p_spliced) through every later layer, instead of its reconstruction error.

    python train_e2e.py --model out/cache/tiny-gemma2-<hash> --layer 2 --k 16
    torchrun --nproc_per_node 8 train_e2e.py --model meta-llama/Llama-3.2-1B --layer 12 --k 64 --data data/redpajama

Same TopK activation and k as the TopK baseline (as in the paper), same decoder-norm handling and learning-rate rule
as train_sae.py, the chunked KL of adapt.py. `--ds-coef > 0` adds Braun et al.'s downstream reconstruction terms
(e2e+ds): the spliced model's residual stream after each later block should also match the original's.
`--init SAE` starts from a trained TopK SAE instead of a fresh one: Karvonen 2025's short KL fine-tune of an MSE-trained
SAE (arXiv 2503.17272; `--mse-coef` adds its MSE term), the baseline against which LoRA is "similar, non-additive".
Every step is one backward pass through the model: the log counts them, for the loss-vs-compute comparison.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time

import torch

from plumbing import common
from plumbing import distributed
from plumbing import embedded
from config.train_e2e import MAY_CHANGE, E2EConfig
from data import TokenLoader, check_data_matches, held_out_batches
from formats import disk
from model import Transformer
from plumbing.run import Run
from formats.sae_files import load_saes
from sae import SAE
from training.sae_loss import (geometric_median, remove_gradient_parallel_to_decoder_directions,
                               set_decoder_norm_to_unit_norm, update_since_fired)
from evals.held_out import evaluate
from splice import compile_step, kl_and_ce, original_pass, spliced_pass, unspliced_tokens


def main(argv=None) -> dict:
    # -- config: the flags; without --model, config/train_e2e_tiny.py -----------------------------------------------
    cfg, typed = common.parse_args(E2EConfig, argv, epilog=embedded.preset_help("train_e2e"))
    embedded.fill_in(cfg, typed, "train_e2e")
    if cfg.recipe == "authors":  # their trainer with e2e=True (es/trainer.py:333-399)
        common.set_untyped(cfg, typed, dict(batch_size=1, kl_reduction="sequence", sae_positions="all",
                                            decay_frac=1.0,
                                            warmup_frac=min(1.0, 1000 / max(1, cfg.max_tokens // cfg.seq_len))),
                           "recipe")
        common.log_preset(cfg, "recipe", "train_e2e.py: --recipe authors replaces these values (typed flags win):")
    if len(cfg.layer) != 1:
        raise ValueError(f"train_e2e.py trains one SAE: give exactly one --layer (got {cfg.layer or 'none'})")
    layer = cfg.layer[0]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    with Run(cfg, outputs=("log.csv", "cfg.json", "sae_weights.safetensors", "ckpt_[0-9][0-9][0-9]"),
             may_change=MAY_CHANGE | ({"k", "expansion"} if cfg.init else set()),  # --init's own
             inputs=dict(model=cfg.model, data=cfg.data, init=cfg.init),
             one_step=(tokens_per_step, f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}")) as run:
        # -- setup, frozen model, SAE ------------------------------------------------------------------------------
        ddp = run.ddp
        micro, _ = distributed.batch_split(cfg.batch_size, None, ddp.world_size)  # sequences per process
        torch.manual_seed(cfg.seed)
        model = Transformer.from_pretrained(cfg.model, device=ddp.device).requires_grad_(False)
        if not 0 <= layer < model.cfg.n_layer - 1:
            raise ValueError(f"--layer {layer} is out of range: an e2e SAE needs a later layer to train through; "
                             f"this model has layers 0..{model.cfg.n_layer - 1}")
        dm = model.cfg.d_model
        if cfg.init:  # fine-tune a trained SAE: it sets the width and k
            sae = load_saes([cfg.init], [layer], model, ddp.device)[0][1].requires_grad_(True)
            if sae.arch != "topk" or sae.site != "resid":
                raise ValueError(f"--init {cfg.init}: a {sae.arch} SAE at site {sae.site}; train_e2e.py fine-tunes "
                                 f"TopK SAEs of the residual stream")
            cfg.k, cfg.expansion = sae.k, sae.d_sae // dm
            sae.model_name = cfg.model
        else:
            sae = SAE(dm, cfg.expansion * dm, "topk", k=cfg.k, layer=layer, model_name=cfg.model, device=ddp.device)
        m = sae.d_sae
        peak_lr = cfg.lr or 2e-4 / math.sqrt(m / 2 ** 14)  # Gao et al.'s rule
        optimizer = torch.optim.Adam(sae.parameters(), lr=peak_lr, eps=6.25e-10)
        cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
        autocast_ctx = common.autocast(ddp.device, cfg.autocast)
        unspliced_ids = unspliced_tokens([(layer, sae)], model.cfg, cfg.sae_positions, cfg.skip_norm_above)  # left unspliced

        # -- data ----------------------------------------------------------------------------------------------------
        check_data_matches(cfg.data, cfg.model)  # one line if the tokens were made by another tokenizer
        loader = TokenLoader(cfg.data, "train", micro, cfg.seq_len, ddp.rank, ddp.world_size, cfg.seed,
                             device=ddp.device)
        val = TokenLoader(cfg.data, cfg.eval_split, micro, cfg.seq_len, ddp.rank, ddp.world_size, shuffle=False,
                          device=ddp.device)
        val_batches = held_out_batches(val, cfg.eval_batches, f"--eval-batches {cfg.eval_batches}",
                                       "--batch-size or --seq-len")
        total_steps = max(1, cfg.max_tokens // tokens_per_step)
        csv_path = os.path.join(cfg.out, "log.csv")

        # -- resume, or b_dec at the geometric median ----------------------------------------------------------------
        run.keep(sae=sae, optimizer=optimizer, loader=loader)  # what a checkpoint holds and --resume restores
        state = run.resume(("since_fired", "rows"))
        if state:
            since_fired, step, rows = state["since_fired"], state["step"], state["rows"]
        else:
            since_fired, step, rows = torch.zeros(m, dtype=torch.long, device=ddp.device), 0, []
            if not cfg.init:  # b_dec at the geometric median of the layer's activations (every rank's), as TopK SAEs
                with torch.no_grad(), autocast_ctx:
                    sample = model(val_batches[0], stop_at=layer)[:, 1:].reshape(-1, dm).float()
                with torch.no_grad():
                    sae.b_dec.copy_(geometric_median(distributed.all_gather_cat(sample)))
        common.log(f"e2e{'+ds' if cfg.ds_coef else ''}{'+mse' if cfg.mse_coef else ''} TopK SAE d_in {dm} d_sae {m} "
                   f"k {cfg.k} at layer {layer}{', fine-tuning ' + cfg.init if cfg.init else ''}; "
                   f"lr {peak_lr:.2e}; {total_steps} steps of {tokens_per_step} tokens")
        advice = f"a lower --lr than {peak_lr:.3g}"

        def save():
            run.stop_if_diverged(step, sae.state_dict(), "e2e training diverged", advice)  # a checkpoint is finite
            run.save(since_fired=since_fired, step=step, rows=rows, effective=dict(lr=peak_lr))
            if ddp.master:
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=sorted({k for r in rows for k in r}))
                writer.writeheader()
                writer.writerows(rows)
                disk.write_text(csv_path, text.getvalue())

        def held_out():  # ce_base, ce_sae and kl_sae as splice.py defines them
            sae.eval()
            res = evaluate(model, [(layer, sae)], val_batches, unspliced_ids, chunk=cfg.kl_chunk, autocast_ctx=autocast_ctx)
            sae.train()
            return res

        # -- the loop ------------------------------------------------------------------------------------------------
        checkpoints = {round(total_steps * p / 10): f"ckpt_{p * 10:03d}" for p in range(1, 11)}
        loss_fn = compile_step(model, cfg.compile)  # each block its own graph, the KL chunk another
        later = range(layer + 1, model.cfg.n_layer - 1) if cfg.ds_coef > 0 else range(0)  # e2e+ds: these must match
        watched = set(later) | ({layer} if cfg.mse_coef > 0 else set())  # + the SAE's own input and output for the MSE
        sae.train()
        while step < total_steps:
            t0 = time.time()
            lr = common.lr_at(step, total_steps, peak_lr, cfg.warmup_frac, cfg.decay_frac, shape="linear")
            for g in optimizer.param_groups:
                g["lr"] = lr
            idx = loader.next_batch()
            acts = {"orig": {}, "spliced": {}}  # e2e+ds: the later blocks' outputs of both passes; the SAE's input

            def record(which):
                if not watched:
                    return None
                return lambda i, x, y: acts[which].__setitem__(i, (x, y)) if i in watched else None
            with autocast_ctx:
                with torch.no_grad():  # the prefix up to the layer is the same in both passes: run it once
                    h_orig, prefix = original_pass(model, idx, layer, share_prefix=True, observe=record("orig"))
                    values, indices = sae.encode_topk(prefix)  # which latents fire, for the dead-latent accounting
                h = spliced_pass(model, [(layer, sae)], idx, unspliced_ids, prefix=prefix,
                                 observe=record("spliced"))
                kl, ce, _ = kl_and_ce(model, h_orig, h, idx, chunk=cfg.kl_chunk, loss_fn=loss_fn)  # Eq. 7 per position
                loss = kl.sum() / (len(idx) if cfg.kl_reduction == "sequence" else len(kl))
                if later:  # Braun et al.'s e2e+ds: downstream streams should match too (normalised MSE)
                    o, s = acts["orig"], acts["spliced"]
                    loss = loss + cfg.ds_coef * sum((s[i][1].float() - o[i][1].float()).pow(2).sum(-1).mean()
                                                    / o[i][1].float().pow(2).sum(-1).mean() for i in later) / len(later)
                if cfg.mse_coef > 0:  # Karvonen 2025: KL + MSE; the MSE over the stream's variance, so FVU-scaled
                    x, x_hat = (t.float() for t in acts["spliced"][layer])
                    mse = (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean((0, 1))).pow(2).sum(-1).mean()
                    loss = loss + cfg.mse_coef * mse
            # the loss of the SAE after `step` updates, over every rank (one rank's NaN stops them all at this step)
            run.watch(step, loss)
            run.stop_if_diverged(step, {}, "e2e training diverged", advice)
            loss.backward()
            distributed.all_reduce_grads(sae.parameters())
            remove_gradient_parallel_to_decoder_directions(sae)
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            set_decoder_norm_to_unit_norm(sae)
            fired = torch.zeros(m, device=ddp.device)
            fired[indices[values > 0]] = 1.0
            update_since_fired(since_fired, distributed.all_reduce_mean(fired) > 0, tokens_per_step)
            step += 1
            run.tick(tokens_per_step, time.time() - t0)

            if step % cfg.log_interval == 0 or step == total_steps:
                dead = (since_fired >= cfg.dead_tokens).float().mean().item()
                train_kl, train_ce = kl.mean().item(), ce.mean().item()
                _, speed = run.speed((total_steps - step) * tokens_per_step)
                common.log(f"step {step}/{total_steps} | loss {loss.item():.4f} | train KL {train_kl:.4f} | train CE "
                           f"with SAE {train_ce:.4f} | lr {lr:.2e} | {speed}")
                rows.append(dict(step=step, tokens=step * tokens_per_step, seconds=run.elapsed, backward_passes=step,
                                 loss=loss.item(), train_kl=train_kl, train_ce=train_ce,
                                 l0=(values > 0).float().sum(-1).mean().item(), dead=dead))
            if step % cfg.eval_interval == 0 or step == total_steps:
                res = held_out()
                rows.append(dict(step=step, tokens=step * tokens_per_step, seconds=run.elapsed, backward_passes=step,
                                 **res))
                common.log(f"step {step} | val CE {res['ce_base']:.4f} original, {res['ce_sae']:.4f} with SAE | KL "
                           f"{res['kl_sae']:.4f} | {run.elapsed / 60:.1f} min")
            if step in checkpoints:
                save()  # first: it checks the weights are finite
                if ddp.master:
                    sae.save(os.path.join(cfg.out, checkpoints[step]))

        if ddp.master:
            sae.save(cfg.out)
        run.finish()
        common.log(f"saved {cfg.out} (SAELens format), log.csv and checkpoints ckpt_010..ckpt_100")
    return dict(rows=rows, sae=sae)


if __name__ == "__main__":
    common.cli(main)
