"""
Pretrain a tiny Gemma-2 (or Llama-3) architecture model from scratch, so the whole pipeline runs offline.

    python pretrain.py                                  # embedded default: stdlib corpus -> cache/tiny-gemma2-<hash>
    python pretrain.py --family llama3 --max-steps 500
    torchrun --nproc_per_node 2 pretrain.py             # DDP (gloo on CPU, nccl on CUDA)
    python pretrain.py --resume                         # continue from cache/tiny-gemma2-<hash>/ckpt.pt

The output folder is laid out like a hub checkpoint (config.json, model.safetensors, tokenizer.model), so every
other script - and transformers - loads it exactly as it would load google/gemma-2-2b.

The default: 3.0M parameters, 1000 steps of 16 x 256 tokens = 4.1M tokens; its validation loss and time are in
pretrain.json in the output folder and in experiments/README.md.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plumbing import common
from plumbing import distributed
from plumbing import embedded
from config.pretrain import MAY_CHANGE, PretrainConfig
from data import TokenLoader, load_meta
from formats import disk, stdlib_corpus
from formats.tokenizer import load_tokenizer
from model import ModelConfig, Transformer
from plumbing.run import Run


def model_config(cfg: PretrainConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int | None) -> ModelConfig:
    """Built field by field: Gemma-2 gets (1 + w) norms, sandwich norms, sqrt(d) embedding scale, GeGLU, soft-caps
    and alternating sliding/global attention; Llama-3 the plain pre-norm SwiGLU block with its RoPE base."""
    common_kw = dict(vocab_size=vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim, max_seq_len=cfg.seq_len,
                     tie_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if cfg.family == "gemma2":
        return ModelConfig(**common_kw, norm_offset=True, sandwich_norms=True, embed_scale=True, mlp_act="gelu_tanh",
                           query_pre_attn_scalar=cfg.head_dim, attn_softcap=50.0, final_softcap=30.0,
                           sliding_window=cfg.sliding_window,
                           layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(cfg.n_layer)], model_type="gemma2")
    if cfg.family == "llama3":
        return ModelConfig(**common_kw, norm_eps=1e-5, mlp_act="silu", rope_theta=500000.0, model_type="llama")
    raise ValueError(f"unknown family {cfg.family!r} (expected gemma2 or llama3)")


def lm_loss(model, x: torch.Tensor, autocast: str) -> torch.Tensor:
    """Next-token cross entropy; logits in fp32 for the log-softmax whatever the autocast dtype."""
    with common.autocast(x.device, autocast):
        logits = model(x)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, data_dir: str, cfg: PretrainConfig, ddp: distributed.Dist, micro: int) -> float:
    """Mean loss on the same val windows every time (sequential order, each rank its own block)."""
    loader = TokenLoader(data_dir, "val", micro, cfg.seq_len, ddp.rank, ddp.world_size, shuffle=False,
                         device=ddp.device)
    n = max(1, min(cfg.eval_batches, loader.per_rank // micro))
    model.eval()
    loss = torch.stack([lm_loss(model, loader.next_batch(), cfg.autocast) for _ in range(n)]).mean()
    model.train()
    return (distributed.all_reduce_mean(loss) if ddp.world_size > 1 else loss).item()


def main(argv=None) -> dict:
    # -- config: the flags (the defaults are the embedded model's recipe) ---------------------------------------------
    cfg, _ = common.parse_args(PretrainConfig, argv)
    out = cfg.out or embedded.model_dir(cfg)  # the defaults: the very folder the embedded pipeline uses
    with Run(cfg, out=out, outputs=("model.safetensors", "config.json", "tokenizer.model", "original",
                                    "pretrain.json"), may_change=MAY_CHANGE, inputs=dict(data=cfg.data or None)) as run:
        ddp = run.ddp
        cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
        micro, _ = distributed.batch_split(cfg.batch_size, None, ddp.world_size * cfg.grad_accum)  # per process
        # -- data ----------------------------------------------------------------------------------------------------
        if cfg.data:
            data_dir = cfg.data
        else:  # build the embedded corpus once (rank 0), the others wait and then read the cache
            if ddp.master:
                stdlib_corpus.corpus_and_tokenizer()
            _barrier(ddp)
            data_dir = stdlib_corpus.corpus_and_tokenizer()[0]
        meta = load_meta(data_dir)
        tok = load_tokenizer(meta["tokenizer"])
        loader = TokenLoader(data_dir, "train", micro, cfg.seq_len, ddp.rank, ddp.world_size, seed=cfg.seed,
                             device=ddp.device)
        # -- model and optimiser -------------------------------------------------------------------------------------
        mcfg = model_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
        raw = Transformer(mcfg).init_weights(cfg.seed).to(ddp.device)
        decay = [p for n, p in raw.named_parameters() if p.dim() >= 2]  # matrices and embeddings; norms not decayed
        no_decay = [p for n, p in raw.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), fused=ddp.device.type == "cuda")
        run.given["data"] = data_dir  # what --resume compares: the corpus it read, by content
        run.keep(model=raw, optimizer=optimizer, loader=loader)  # what a checkpoint holds and --resume restores
        state = run.resume(("history",), required=True)
        step, history = (state["step"], state["history"]) if state else (0, [])
        model = torch.compile(raw) if cfg.compile else raw
        if ddp.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        common.log(f"pretrain {cfg.family}: {mcfg.n_params() / 1e6:.2f}M parameters ({mcfg.n_params(False) / 1e6:.2f}M "
                   f"without embeddings), {tokens_per_step} tokens/step, {cfg.max_steps} steps, data {data_dir} "
                   f"({meta['train_tokens']:,} train tokens; unigram entropy {meta['unigram_entropy']:.3f} nats), "
                   f"{ddp.world_size} process(es) on {ddp.device}")
        advice = f"a lower --lr than {cfg.lr:g}"

        # -- the loop ------------------------------------------------------------------------------------------------
        cpu0 = time.process_time()  # CPU seconds of this process: a steadier clock than wall time on a shared machine
        last_step = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
        val = None
        while step < last_step:
            t0 = time.time()
            lr = common.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_frac, 1.0, cfg.min_lr_frac, "cosine")
            for g in optimizer.param_groups:
                g["lr"] = lr
            for i in range(cfg.grad_accum):
                x = loader.next_batch()
                sync = i == cfg.grad_accum - 1 or ddp.world_size == 1
                with model.no_sync() if not sync else contextlib.nullcontext():
                    loss = lm_loss(model, x, cfg.autocast) / cfg.grad_accum
                    loss.backward()
            run.watch(step, loss)  # the loss of the model after `step` updates
            run.stop_if_diverged(step, {}, "pretraining diverged", advice)
            gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.tick(tokens_per_step, time.time() - t0)
            if step % cfg.log_interval == 0 or step == last_step:
                _, speed = run.speed((last_step - step) * tokens_per_step)
                common.log(f"step {step:5d}/{last_step} | loss {loss.item() * cfg.grad_accum:.3f} | lr {lr:.2e} | grad "
                           f"norm {gnorm.item():.2f} | {run.elapsed:.0f}s ({time.process_time() - cpu0:.0f}s cpu) | "
                           f"{speed}")
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val = evaluate(model, data_dir, cfg, ddp, micro)
                history.append({"step": step, "val_loss": val, "elapsed_s": run.elapsed})
                common.log(f"step {step:5d} | val loss {val:.3f}")
            if step % cfg.ckpt_interval == 0 or step == last_step:
                run.stop_if_diverged(step, raw.state_dict(), "pretraining diverged", advice)  # a checkpoint is finite
                run.save(step=step, history=history)
        if val is None and step == cfg.max_steps:  # resumed a finished run
            val = evaluate(model, data_dir, cfg, ddp, micro)

        # -- save in Hugging Face layout -----------------------------------------------------------------------------
        result = {"family": cfg.family, "steps": step, "val_loss": val, "tokens": step * tokens_per_step,
                  "wall_s": run.elapsed, "cpu_s_this_run": time.process_time() - cpu0,
                  "unigram_entropy": meta["unigram_entropy"], "n_params": mcfg.n_params(), "history": history,
                  "config": asdict(cfg), "data": data_dir, "device": str(ddp.device), "world_size": ddp.world_size}
        if ddp.master and step == cfg.max_steps:
            raw.save_pretrained(out)
            dest = os.path.join(out, "tokenizer.model" if tok.kind == "sentencepiece" else "original/tokenizer.model")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with disk.atomic_path(dest) as tmp:
                shutil.copyfile(tok.path, tmp)
            run.finish("pretrain.json", result)
            common.log(f"pretrain: saved {out} (val loss {val:.3f} after {result['tokens']:,} tokens, "
                       f"{result['wall_s']:.0f}s)")
        _barrier(ddp)
    return result


def _barrier(ddp: distributed.Dist):
    if ddp.world_size > 1:
        dist.barrier()


if __name__ == "__main__":
    common.cli(main)
