"""
LoRA-adapt a frozen language model around frozen SAEs (the paper's method, Sec. 3.4).

    python adapt.py                                     # offline tiny pipeline: builds and caches everything
    torchrun adapt.py --model google/gemma-2-2b --layer 12 --rank 64 --data data/pile   # Gemma Scope 16k SAE

Only the adapters learn, to minimise Eq. 7, KL(p_orig || p_spliced) (splice.py), or with --objective ce Resa's answer
CE (answers.py). Settings: config/adapt.py (the authors' run; config/adapt_tiny.py without --model). Writes the adapter
(PEFT's format), a resumable ckpt.pt and results.json to --out (plumbing/run.py: the folder, checkpoint and results).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch

from plumbing import common
from plumbing import distributed
from plumbing import embedded
from answers import PairLoader, answer_step, evaluate_answers, read_pairs
from config.adapt import MAY_CHANGE, AdaptConfig
from data import TokenLoader, check_data_matches, eval_batches_for, held_out_batches
from formats.peft import write_adapter
from lora import adapter_parameters, adapters_disabled, apply_lora, layers_around_saes
from model import Transformer
from plumbing.run import Run, log_held_out
from formats.sae_files import load_saes
from accounting.flops import adapt_step_flops
from evals.held_out import evaluate
from splice import compile_step, kl_and_ce, original_pass, residual_only, spliced_pass, unspliced_tokens


def main(argv=None) -> dict:
    # -- config: the flags; without --model, config/adapt_tiny.py and the embedded model, SAE and corpus ---------------
    epilog = embedded.DEFAULT_SAES_HELP + embedded.preset_help("adapt")  # --help: the SAE defaults, the preset
    cfg, typed = common.parse_args(AdaptConfig, argv, epilog=epilog)
    embedded.fill_in(cfg, typed, "adapt")
    with Run(cfg, outputs=("adapter", "results.json"), may_change=MAY_CHANGE,
             inputs=dict(model=cfg.model, sae=cfg.sae, data=cfg.data), one_step=(
                 cfg.batch_size * cfg.seq_len, f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}")) as run:
        # -- setup: processes, batch split ----------------------------------------------------------------------------
        ddp, adapter_dir = run.ddp, os.path.join(cfg.out, "adapter")
        torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
        micro, accum = distributed.batch_split(cfg.batch_size, cfg.micro_batch, ddp.world_size)

        # -- model, SAEs, adapters ------------------------------------------------------------------------------------
        model = Transformer.from_pretrained(cfg.model, device=ddp.device, dtype=getattr(torch, cfg.dtype))
        model.requires_grad_(False)  # adapters are created in fp32 below, whatever the base weights' dtype
        saes = load_saes(cfg.sae, cfg.layer or None, model, ddp.device)
        lora_layers = layers_around_saes(cfg.lora_layers, saes, model.cfg.n_layer,
                                         allow_before_jumprelu=cfg.allow_before_jumprelu)
        params = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, lora_layers)
        if cfg.fsdp:
            distributed.shard_layers(model)
            params = adapter_parameters(model)  # now DTensors, each rank holding its shard
        common.seed_per_rank(cfg.seed, ddp.rank)  # dropout: a mask of its own for every sequence of the global batch
        # blocks 0..L are the same in both passes: run them once (an SAE inside block L changes block L itself)
        first_sae_layer = saes[0][0]  # load_saes sorts them by layer
        share_prefix = min(lora_layers) > first_sae_layer and residual_only(saes)
        unspliced_ids = unspliced_tokens(saes, model.cfg, cfg.sae_positions, cfg.skip_norm_above)  # SAE-free positions
        kinds = ", ".join(s.arch if s.site == "resid" else f"{s.site} {s.arch}" for _, s in saes)
        common.log(f"model {cfg.model}: {model.cfg.n_layer} layers, d_model {model.cfg.d_model}; SAEs at layers "
                   f"{[layer for layer, _ in saes]} ({kinds}); LoRA rank {cfg.rank} on layers {lora_layers[0]}.."
                   f"{lora_layers[-1]}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters")

        # -- data: training windows (or pairs), held-out windows ------------------------------------------------------
        check_data_matches(cfg.data, cfg.model)  # one line if the tokens were made by another tokenizer
        train = TokenLoader(cfg.data, "train", micro, cfg.seq_len, ddp.rank, ddp.world_size, cfg.seed,
                            device=ddp.device)
        held_out_parts = {part: held_out_batches(  # validation during training; --eval-split for the reported numbers
            TokenLoader(cfg.data, part, micro, cfg.seq_len, ddp.rank, ddp.world_size, shuffle=False,
                        device=ddp.device), eval_batches_for(cfg.eval_tokens, micro, cfg.seq_len, ddp.world_size),
            f"--eval-tokens {cfg.eval_tokens:,}", "--micro-batch or --seq-len")
            for part in dict.fromkeys(("validation", cfg.eval_split))}
        tokens_per_step, val_pairs, pad_id = cfg.batch_size * cfg.seq_len, [], 0
        if cfg.pairs:  # Resa's data: trained on with --objective ce, its held-out tenth evaluated with either objective
            train_pairs, val_pairs, pad_id = read_pairs(cfg.pairs, cfg.model, cfg.seq_len)
        if cfg.objective == "ce":  # a step is batch_size pairs: --max-tokens counts their tokens, on average
            train = PairLoader(train_pairs, micro, ddp.rank, ddp.world_size, cfg.seed, ddp.device, pad_id)
            tokens_per_step = max(1, round(cfg.batch_size * sum(len(i) for i, _ in train_pairs) / len(train_pairs)))
        total_steps = max(1, cfg.max_tokens // tokens_per_step)
        window = cfg.seq_len if cfg.objective == "kl" else "pair"
        common.log(f"plan: {total_steps:,} optimizer steps of {cfg.batch_size} x {window} tokens; held-out "
                   f"{len(held_out_parts['validation']) * micro * ddp.world_size} windows of {cfg.seq_len} a part; "
                   f"LoRA dropout {cfg.dropout} " + (f"for the first {cfg.dropout_steps} steps" if cfg.dropout_steps
                                                     else "on every step"))

        # -- optimiser, compile, resume -------------------------------------------------------------------------------
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
        loss_fn = compile_step(model, cfg.compile and not cfg.fsdp)  # each block its own graph, Eq. 7's chunk another
        cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
        autocast_ctx = common.autocast(ddp.device, cfg.autocast)
        run.keep(adapter=params, optimizer=optimizer, loader=train)  # what a checkpoint holds and --resume restores
        state = run.resume(("history",))
        step, history = (state["step"], state["history"]) if state else (0, [])

        def held_out(part="validation"):
            res = evaluate(model, saes, held_out_parts[part], unspliced_ids, chunk=cfg.kl_chunk,
                           autocast_ctx=autocast_ctx)
            if val_pairs:
                res.update(evaluate_answers(model, saes, val_pairs, unspliced_ids, micro=micro, chunk=cfg.kl_chunk,
                                            autocast_ctx=autocast_ctx, pad_id=pad_id))
            if part == "validation":
                history.append(dict(step=step, tokens=step * tokens_per_step, time=run.elapsed, **res))
            log_held_out(step, part, res, cfg.skip_norm_above)
            return res

        if step == 0:
            held_out()

        # -- the loop -------------------------------------------------------------------------------------------------
        flops_per_token = adapt_step_flops(model.cfg, saes, lora_layers, cfg.rank, cfg.seq_len, micro, None) \
            if cfg.objective == "kl" else None  # for MFU
        while step < total_steps:
            t0 = time.time()
            model.train(cfg.dropout_steps == 0 or step < cfg.dropout_steps)  # LoRA dropout on or off
            lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_frac, cfg.decay_frac, cfg.min_lr_frac, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum, kl_sum, ce_sum = 0.0, 0.0, 0.0  # stay on the device: no host sync per step
            for _ in range(accum):
                if cfg.objective == "ce":  # Resa's objective: the answer tokens' CE (no p_orig pass, so no KL)
                    kl, ce, loss = answer_step(model, saes, train.next_batch(), unspliced_ids, cfg.kl_chunk,
                                               autocast_ctx)
                else:
                    idx = train.next_batch()  # (micro, seq_len) token windows
                    with autocast_ctx:
                        with torch.no_grad(), adapters_disabled(model):  # p_orig: no SAE, no adapters
                            h_orig, prefix = original_pass(model, idx, first_sae_layer, share_prefix=share_prefix)
                        h = spliced_pass(model, saes, idx, unspliced_ids, prefix=prefix)  # p_spliced: adapters, SAEs
                        kl, ce, _ = kl_and_ce(model, h_orig, h, idx, chunk=cfg.kl_chunk, loss_fn=loss_fn)  # Eq. 7
                    loss = kl.sum() / (len(idx) if cfg.kl_reduction == "sequence" else len(kl))  # per sequence or token
                (loss / accum).backward()  # only the adapters require grad: the model and the SAEs stay frozen
                loss_sum = loss_sum + loss.detach() / accum
                kl_sum, ce_sum = kl_sum + kl.detach().mean() / accum, ce_sum + ce.detach().mean() / accum
            run.watch(step, loss_sum)  # the loss of the adapters after `step` updates, checked at the next sync
            if not cfg.fsdp:  # FSDP2 has reduce-scattered them already
                distributed.all_reduce_grads(params)  # a few MB of adapters: one flat all-reduce, no DDP wrapper
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.tick(tokens_per_step, time.time() - t0)

            if step % cfg.log_interval == 0 or step % cfg.ckpt_interval == 0 or step == total_steps:  # the host sync
                run.stop_if_diverged(step, params, f"training diverged (lr {lr:.2e})",
                                     f"a lower --lr than {cfg.lr:g} (or --autocast float32)",
                                     on_stop=lambda: write_adapter(model, saes, adapter_dir, cfg.model))
            if step % cfg.log_interval == 0 or step == total_steps:
                loss_log, kl_log, ce_log = map(float, (loss_sum, kl_sum, ce_sum))
                tps, speed = run.speed((total_steps - step) * tokens_per_step, flops_per_token)
                kl_text = f" | train KL {kl_log:.4f}" if cfg.objective == "kl" else ""  # ce: no p_orig pass, no KL
                common.log(f"step {step}/{total_steps} | loss {loss_log:.4f}{kl_text} | train CE with "
                           f"SAE + LoRA {ce_log:.4f} | lr {lr:.2e} | {speed}")
                history.append(dict(step=step, tokens=step * tokens_per_step, time=run.elapsed, lr=lr, loss=loss_log,
                                    train_kl=kl_log if kl_text else None, train_ce=ce_log, tokens_per_s=tps))
            if step % cfg.eval_interval == 0 or step == total_steps:
                held_out()
            if step % cfg.ckpt_interval == 0 or step == total_steps:  # every rank takes part (FSDP2's gathers)
                write_adapter(model, saes, adapter_dir, cfg.model, every_rank=cfg.fsdp)
                run.save(step=step, history=history)

        # -- results --------------------------------------------------------------------------------------------------
        final = next(h for h in reversed(history) if "ce_sae_lora" in h)
        if cfg.eval_split != "validation":  # the reported numbers: once, at the end, on tokens no choice has read
            final = held_out(cfg.eval_split)
        reported = ("ce_base", "ce_sae", "ce_sae_lora", "gap_closed", "kl_sae", "kl_sae_lora", "positions",
                    *(k for k in final if k.startswith(("answer_", "norm_skipped_"))))
        results = dict({k: final[k] for k in reported}, tokens_per_s=step * tokens_per_step / max(run.elapsed, 1e-9),
                       eval_split=cfg.eval_split, train_tokens=step * tokens_per_step, train_seconds=run.elapsed,
                       steps=step, sae_layers=[layer for layer, _ in saes], lora_layers=lora_layers,
                       config=asdict(cfg), config_sources=common.sources(cfg), history=history)
        run.finish("results.json", results)
        common.log("done: CE {ce_base:.4f} (original) / {ce_sae:.4f} (SAE) / {ce_sae_lora:.4f} (SAE + LoRA): "
                   "{gap_closed:.1%} of the gap closed; adapter in ".format(**results) + adapter_dir)
    return results


if __name__ == "__main__":
    common.cli(main)
