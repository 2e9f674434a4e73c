"""
LoRA-adapt a frozen language model around frozen SAEs (the paper's method, Sec. 3.4).

    python adapt.py                                     # offline tiny pipeline: builds and caches everything
    torchrun adapt.py --model google/gemma-2-2b --layer 12 --rank 64 --data data/pile   # Gemma Scope 16k SAE

The model and the SAE(s) stay frozen; only the adapters learn, to minimise Eq. 7, KL(p_orig || p_spliced): the
original model's next-token distribution against that of the adapted model with the SAE reconstruction spliced into
its residual stream (splice.py defines it, and every number reported here); or, with --objective ce, Resa's: the
cross-entropy of the spliced, adapted model on the answers of prompt / answer pairs (answers.py). The defaults are the
authors' run
(train_lora.py in their code). Without --model the tiny model's preset (embedded.py) replaces many of them: the first
lines of the log list which, and results.json records where each value came from (config_sources: typed, preset or
default). Writes the adapter in PEFT's format, a resumable ckpt.pt and results.json to --out.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

import common
from formats import disk
import embedded
from answers import PairLoader, answer_losses, evaluate_answers, load_pairs, split_pairs
from data import HELD_OUT_PARTS, TokenLoader, check_data_matches, eval_batches_for, held_out_batches
from formats.tokenizer import load_tokenizer
from formats import run_folder
from formats.peft import save_adapter, save_sae_record
from lora import adapter_parameters, adapters_disabled, apply_lora, layers_around_saes
from model import Transformer
from sae import load_saes
from accounting.flops import adapt_step_flops
from evals.held_out import evaluate
from splice import compile_step, kl_and_ce, original_pass, residual_only, spliced_pass, unspliced_tokens


@dataclass
class AdaptConfig:
    """LoRA-adapt a frozen model around frozen SAEs: minimise KL(p_orig || p_spliced), the paper's Eq. 7."""
    model: str | None = None  # HF folder or hub id; none: the embedded tiny model (built on first run)
    sae: list[str] = field(default_factory=list)  # SAE folder or hub path; several are spliced together (Sec. 4.3);
    # an SAE on block L's attention heads (blocks.L.attn.hook_z: Gemma Scope's att, Gemma Scope 2's attn_out_all/),
    # attention output (hook_attn_out) or MLP output (hook_mlp_out: Gemma Scope's mlp, Gemma Scope 2's mlp_out_all/)
    # replaces that activation inside block L; a transcoder (Gemma Scope 2's transcoder_all/) replaces its layer's MLP
    # with its reconstruction from the MLP's input, affine skip included; none: Gemma Scope's canonical 16k residual SAE at --layer for Gemma-2 2B/9B, Gemma
    # Scope 2's resid_post_all 16k small-L0 SAE for Gemma-3, the embedded SAE for the tiny model
    layer: list[int] = field(default_factory=list)  # the SAE layer, one per --sae; none: what the SAE files say
    data: str | None = None  # token folder (data.prepare); none: the embedded corpus in the model's own tokens
    # (the paper's data: python data.py --source redpajama-v2 --out DIR --tokenizer MODEL --max-tokens N)
    out: str = "out/adapt"  # the adapter (PEFT format), ckpt.pt and results.json go here
    objective: str = "kl"  # kl: Eq. 7, KL(p_orig || p_spliced) on --data's windows (the paper) | ce: Resa's
    # SAE-Tuning, the next-token cross-entropy of the spliced, adapted model on the answer tokens of --pairs, the
    # prompt masked (answers.py); the held-out evaluation on --data's windows is the same for both
    pairs: str | None = None  # JSONL file, one {"prompt": ..., "answer": ...} per line: --objective ce trains on it;
    # with either objective its last tenth is held out, and answer CE / accuracy are reported on it
    rank: int = 64  # LoRA rank (paper: 64)
    alpha: float = 32.0  # LoRA alpha (paper: 32)
    dropout: float = 0.1  # LoRA dropout (authors' code: 0.1), on for every step unless --dropout-steps
    dropout_steps: int = 0  # train with dropout for this many steps only, then without; 0: every step. The authors'
    # loop turns it off for good at its first in-loop evaluation (their evaluate() calls model.eval() and training
    # never calls train() again): --dropout-steps 1000 is their run (one evaluation every 1000 sequences)
    lora_layers: str | None = None  # all | after | 3,4,5: layers to adapt; none: all for TopK SAEs, the layers
    # after the SAE for JumpReLU SAEs and JumpReLU transcoders (paper Sec. 4.2: adapting the layers that feed it would
    # change its sparsity; an SAE on block L's attention or MLP output, or a transcoder at L, is fed by block L's
    # earlier parts, so block L counts as feeding it: "after" is L+1.., as for a residual SAE after block L)
    allow_before_jumprelu: bool = False  # adapt layers that feed a JumpReLU SAE, although that changes its sparsity
    sae_positions: str = "auto"  # where the SAE is spliced: auto (per SAE source, as the authors: Gemma / Llama
    # Scope everywhere but BOS and EOS, sparsify-format TopK SAEs everywhere, SAELens files everywhere but BOS) | all |
    # no_bos | no_bos_eos
    skip_norm_above: float | None = None  # also leave alone the positions whose activation norm, where the SAE reads
    # it, is above this multiple of their window's median (attention sinks; the Qwen3 SAE card's rule is 10), in
    # training and every evaluation; the held-out evaluation reports how many; none: off
    max_tokens: int = 15_360_000  # training tokens (paper: "15M"; authors' code: 15,000 sequences of 1024)
    batch_size: int = 1  # sequences per optimizer step, over all processes (authors' code: 1)
    micro_batch: int | None = None  # sequences per process per forward; none: batch_size / processes. Smaller
    # values accumulate gradients over several forwards: the step stays the same
    seq_len: int = 1024  # tokens per sequence (paper: 1024)
    lr: float = 5e-5  # AdamW learning rate (authors' code: 5e-5)
    schedule: str = "linear"  # shape of the decay when decay_frac > 0: linear | cosine
    warmup_frac: float = 0.0  # fraction of the steps warming up linearly (authors' code: none, a constant rate)
    decay_frac: float = 0.0  # fraction of the steps decaying at the end (authors' code: none)
    min_lr_frac: float = 0.0  # the decay ends at lr x this
    weight_decay: float = 0.01  # AdamW weight decay (authors' code: torch's default, 0.01)
    grad_clip: float = 1.0  # gradient norm clip (authors' code: 1.0)
    kl_reduction: str = "sequence"  # the training loss: sequence: Eq. 7 summed over each sequence's predicted
    # positions, mean over sequences (the authors' kl_div batchmean on one sequence, the scale their clipping sees);
    # token: mean over positions
    autocast: str = "auto"  # activation precision: auto (bfloat16 where the hardware runs it natively, else
    # float32) | bfloat16 | float32
    dtype: str = "float32"  # storage of the frozen weights (bfloat16 halves memory); adapters stay float32
    fsdp: bool = False  # under torchrun: shard every decoder layer across the processes (models too big for one)
    compile: bool = True  # torch.compile each block and the KL chunk (splice.compile_step)
    kl_chunk: int = 2048  # tokens per lm_head + log-softmax chunk: never a whole (tokens, vocab) fp32 tensor
    eval_tokens: int = 1_000_000  # held-out tokens for the CE / KL table, in whole windows rounded up to whole batches
    # (paper: 1M; the authors' utils.py rounds up too: 977 windows of 1024); at least 1; more than the held-out split
    # holds: all of it, once (a log line says so), as eval.py
    eval_interval: int = 200  # steps between held-out evaluations (on the validation part: what choices read)
    eval_split: str = "test"  # the held-out part of the final, reported numbers: test | validation (to choose a
    # setting on); the evaluations during training always read validation (data.held_out_part)
    log_interval: int = 10  # steps between log lines
    ckpt_interval: int = 200  # steps between checkpoints (ckpt.pt and the adapter)
    resume: bool = False  # continue from --out/ckpt.pt, with the checkpoint's settings; only --max-tokens,
    # --micro-batch, --autocast, --dtype, --fsdp, --compile, --kl-chunk, --eval-tokens, --eval-split, the intervals and
    # --device may differ, and --lr may be lowered (after a divergence). --model, --sae and --data are compared by what
    # their files hold, not by their paths
    overwrite: bool = False  # replace the run in --out (its ckpt.pt, adapter and results.json are deleted first)
    seed: int = 0  # adapter initialisation, data order and dropout masks (one stream per rank)
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(
            self, positive=("rank", "alpha", "max_tokens", "batch_size", "micro_batch", "seq_len", "lr", "grad_clip",
                            "kl_chunk", "eval_tokens", "eval_interval", "log_interval", "ckpt_interval"),
            non_negative=("dropout_steps", "weight_decay"), fractions=("warmup_frac", "decay_frac", "min_lr_frac"),
            below_one=("dropout",),
            choices=dict(schedule=("linear", "cosine"), kl_reduction=("sequence", "token"),
                         autocast=("auto", *common.PRECISIONS), dtype=common.PRECISIONS, objective=("kl", "ce"),
                         sae_positions=("auto", "all", "no_bos", "no_bos_eos"), eval_split=HELD_OUT_PARTS))
        if self.objective == "ce" and not self.pairs:
            raise ValueError("--objective ce trains on prompt / answer pairs: pass --pairs FILE.jsonl")


# Without --model: the tiny model's preset (embedded.fill applies it to the flags not typed), sized for a first result
# in minutes on 2 CPU cores in fp32; lr 3e-3 beat 1e-3 and 6e-3 (experiments/README.md)
TINY = dict(seq_len=256, batch_size=8, max_tokens=700_000, lr=3e-3, weight_decay=0.0, dropout=0.0, warmup_frac=0.02,
            decay_frac=1.0, min_lr_frac=0.1, schedule="cosine", kl_reduction="token", eval_tokens=32_768,
            eval_interval=100, ckpt_interval=100, log_interval=10, kl_chunk=1024, out="out/adapt-tiny")


def main(argv=None) -> dict:
    t0 = time.time()
    epilog = embedded.DEFAULT_SAES_HELP + embedded.preset_help("adapt", TINY)  # --help: the SAE defaults, the preset
    cfg, typed = common.parse_args(AdaptConfig, argv, epilog=epilog)
    results = run(embedded.fill(cfg, typed, "adapt", TINY))
    common.log(f"adapt.py: {time.time() - t0:.0f}s in all")
    return results


# What --resume may change: how long, how often, where and at what precision the run goes on. Every other setting
# defines what a step trains and must equal the checkpoint's (formats/run_folder.py).
MAY_CHANGE = frozenset({"max_tokens", "micro_batch", "autocast", "dtype", "fsdp", "compile", "kl_chunk", "eval_tokens",
                        "eval_split", "eval_interval", "log_interval", "ckpt_interval", "resume", "overwrite", "device",
                        "out"})
OUTPUTS = ("ckpt.pt", "ckpt.prev.pt", "adapter", "results.json")  # what a run writes to --out (--overwrite deletes
# these); ckpt.prev.pt: the checkpoint before ckpt.pt, kept while the run goes (run_folder.save_checkpoint)


def run(cfg: AdaptConfig, ddp: common.Dist | None = None) -> dict:
    """The run of cfg, with --out locked and checked first (formats/run_folder.py)."""
    common.check_one_step(cfg.max_tokens, cfg.batch_size * cfg.seq_len, f"--batch-size {cfg.batch_size} x --seq-len "
                                                                         f"{cfg.seq_len}")
    with run_folder.claim(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, checkpoint="ckpt.pt", outputs=OUTPUTS,
                          config=asdict(cfg), may_change=MAY_CHANGE, inputs=[cfg.model, *cfg.sae, cfg.data],
                          by_content=("model", "sae", "data"), may_lower=("lr",)):
        return _run(cfg, ddp)


def _run(cfg: AdaptConfig, ddp: common.Dist | None = None) -> dict:
    # -- setup --------------------------------------------------------------------------------------------------------
    own = ddp is None  # a caller that passes ddp (the embedded pipeline: one process) keeps its setup
    ddp = ddp or common.setup(cfg.device)
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    micro, accum = common.batch_split(cfg.batch_size, cfg.micro_batch, ddp.world_size)
    if cfg.kl_reduction not in ("sequence", "token"):
        raise ValueError(f"--kl-reduction {cfg.kl_reduction!r}: expected sequence or token")

    # -- model, SAEs, adapters ----------------------------------------------------------------------------------------
    model = Transformer.from_pretrained(cfg.model, device=ddp.device, dtype=getattr(torch, cfg.dtype))
    model.requires_grad_(False)  # adapters are created in fp32 below, whatever the base weights' dtype
    saes = load_saes(cfg.sae, cfg.layer or None, model, ddp.device)
    lora_layers = layers_around_saes(cfg.lora_layers, saes, model.cfg.n_layer,
                                     allow_before_jumprelu=cfg.allow_before_jumprelu)
    params = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, lora_layers)
    if cfg.fsdp:
        common.shard_layers(model)
        params = adapter_parameters(model)  # now DTensors, each rank holding its shard
    common.seed_per_rank(cfg.seed, ddp.rank)  # dropout: a mask of its own for every sequence of the global batch
    # blocks 0..L are the same in both passes: run them once (an SAE inside block L changes block L itself)
    first_sae_layer = saes[0][0]  # load_saes sorts them by layer
    share_prefix = min(lora_layers) > first_sae_layer and residual_only(saes)
    unspliced_ids = unspliced_tokens(saes, model.cfg, cfg.sae_positions, cfg.skip_norm_above)  # SAE-free positions
    kinds = ", ".join(("" if s.site == "resid" else s.site + " ") + s.arch for _, s in saes)
    common.log(f"model {cfg.model}: {model.cfg.n_layer} layers, d_model {model.cfg.d_model}; SAEs at layers "
               f"{[layer for layer, _ in saes]} ({kinds}); LoRA rank {cfg.rank} on "
               f"layers {lora_layers[0]}..{lora_layers[-1]}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters")

    # -- data ----------------------------------------------------------------------------------------------------------
    check_data_matches(cfg.data, cfg.model)  # one line if the tokens were made by another tokenizer
    train = TokenLoader(cfg.data, "train", micro, cfg.seq_len, ddp.rank, ddp.world_size, cfg.seed, device=ddp.device)
    held_out_parts = {}  # validation during training; --eval-split for the final, reported numbers
    for part in dict.fromkeys(("validation", cfg.eval_split)):
        loader = TokenLoader(cfg.data, part, micro, cfg.seq_len, ddp.rank, ddp.world_size, shuffle=False,
                             device=ddp.device)
        held_out_parts[part] = held_out_batches(
            loader, eval_batches_for(cfg.eval_tokens, micro, cfg.seq_len, ddp.world_size),
            f"--eval-tokens {cfg.eval_tokens:,}", "--micro-batch or --seq-len")
    val_batches = held_out_parts["validation"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    val_pairs, pad_id = [], 0
    if cfg.pairs:  # Resa's data: trained on with --objective ce, its held-out tenth evaluated with either objective
        tok = load_tokenizer(cfg.model)
        pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
        train_pairs, val_pairs = split_pairs(load_pairs(cfg.pairs, tok, cfg.seq_len))
        common.log(f"pairs {cfg.pairs}: {len(train_pairs)} for training, {len(val_pairs)} held out")
    if cfg.objective == "ce":  # a step is batch_size pairs: --max-tokens counts their tokens, on average
        train = PairLoader(train_pairs, micro, ddp.rank, ddp.world_size, cfg.seed, ddp.device, pad_id)
        tokens_per_step = max(1, round(cfg.batch_size * sum(len(ids) for ids, _ in train_pairs) / len(train_pairs)))
    total_steps = max(1, cfg.max_tokens // tokens_per_step)
    common.log(f"plan: {total_steps:,} optimizer steps of {cfg.batch_size} x "
               f"{cfg.seq_len if cfg.objective == 'kl' else 'pair'} tokens; held-out "
               f"{len(val_batches) * micro * ddp.world_size} windows of {cfg.seq_len} a part; LoRA dropout {cfg.dropout} "
               f"{f'for the first {cfg.dropout_steps} steps' if cfg.dropout_steps else 'on every step'}")

    # -- optimiser, compile, resume ------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    loss_fn = compile_step(model, cfg.compile and not cfg.fsdp)  # each block its own graph, Eq. 7's chunk another
    cfg.autocast = common.resolve_autocast(ddp.device, cfg.autocast)  # auto: what this hardware runs fast
    autocast_ctx = common.autocast(ddp.device, cfg.autocast)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    step, history, elapsed = 0, [], 0.0
    built_from = run_folder.inputs_of(model=cfg.model, sae=cfg.sae, data=cfg.data)  # what --resume compares
    if cfg.resume and os.path.isfile(ckpt_path):
        state = disk.torch_load(ckpt_path, ddp.device,
                                keys=("adapter", "optimizer", "loader", "rng", "step", "history", "elapsed"))
        run_folder.check_inputs(state.get("inputs"), built_from, ckpt_path)
        run_folder.check_tensors(state["adapter"], params, ckpt_path)
        for p, saved in zip(params, state["adapter"]):
            p.data.copy_(common.shard_like(p, saved))
        common.optimizer_state(optimizer, params, load=state["optimizer"])
        train.load_state_dict(state["loader"][ddp.rank])
        common.set_rng_state(state["rng"], ddp.rank)  # the dropout stream of this rank, where its step left it
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        common.log(f"resumed from {ckpt_path} at step {step}")
    elif cfg.resume:
        common.log(f"--resume: no checkpoint at {ckpt_path}, starting fresh")

    def save_checkpoint():  # every rank takes part in the gathers; rank 0 writes
        loaders, rngs = common.gather_objects(train.state_dict()), common.gather_objects(common.rng_state())
        adapter, optim = [common.whole(p) for p in params], common.optimizer_state(optimizer, params)
        if cfg.fsdp or ddp.master:
            save_adapter(model, os.path.join(cfg.out, "adapter"), cfg.model)
        if ddp.master:  # beside PEFT's files: the SAEs it is trained around (eval.py says when it is given others)
            save_sae_record(os.path.join(cfg.out, "adapter"), saes)
        if ddp.master:
            run_folder.save_checkpoint(dict(adapter=adapter, optimizer=optim, loader=loaders, rng=rngs, step=step,
                                            history=history, elapsed=elapsed, config=asdict(cfg),
                                            inputs=built_from), ckpt_path)

    def held_out(part="validation"):
        res = evaluate(model, saes, held_out_parts[part], unspliced_ids, chunk=cfg.kl_chunk, autocast_ctx=autocast_ctx)
        if val_pairs:
            res.update(evaluate_answers(model, saes, val_pairs, unspliced_ids, micro=micro, chunk=cfg.kl_chunk,
                                        autocast_ctx=autocast_ctx, pad_id=pad_id))
        if part == "validation":
            history.append(dict(step=step, tokens=step * tokens_per_step, time=elapsed, **res))
        common.log(f"step {step} | {part} CE original {res['ce_base']:.4f} | with SAE {res['ce_sae']:.4f} | with SAE + "
                   f"LoRA {res['ce_sae_lora']:.4f} | gap closed {res['gap_closed']:.1%} | KL {res['kl_sae']:.4f} -> "
                   f"{res['kl_sae_lora']:.4f}")
        if cfg.skip_norm_above is not None:
            common.log(f"step {step} | norm rule (> {cfg.skip_norm_above:g} x median): SAE left out at "
                       f"{res['norm_skipped_sae']:,} / {res.get('norm_skipped_sae_lora', 0):,} of {res['positions']:,} "
                       f"{part} positions (SAE / SAE + LoRA)")
        if val_pairs:
            common.log(f"step {step} | held-out answers: CE original {res['answer_ce_base']:.4f} | with SAE "
                       f"{res['answer_ce_sae']:.4f} | with SAE + LoRA {res['answer_ce_sae_lora']:.4f} | exact "
                       f"{res['answer_acc_base']:.1%} / {res['answer_acc_sae']:.1%} / {res['answer_acc_sae_lora']:.1%}")
        return res

    if step == 0:
        held_out()

    # -- the loop ------------------------------------------------------------------------------------------------------
    mfu_per_token = (adapt_step_flops(model.cfg, saes, lora_layers, cfg.rank, cfg.seq_len, micro, None)
                     / common.peak_flops(ddp.device, cfg.autocast)) if cfg.objective == "kl" else math.nan
    tokens_since_log, seconds_since_log = 0, 0.0
    first_bad = torch.full((), -1, device=ddp.device)  # the first step whose loss is not finite, kept on the device
    while step < total_steps:
        t0 = time.time()
        model.train(cfg.dropout_steps == 0 or step < cfg.dropout_steps)  # LoRA dropout on or off (--dropout-steps)
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_frac, cfg.decay_frac, cfg.min_lr_frac, cfg.schedule)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum, kl_sum, ce_sum = 0.0, 0.0, 0.0  # stay on the device: no host sync per step
        for _ in range(accum):
            if cfg.objective == "ce":  # Resa's objective: the answer tokens' CE, mean over the micro-batch's
                idx, mask = train.next_batch()
                with autocast_ctx:
                    h = spliced_pass(model, saes, idx, unspliced_ids)
                    ce, _ = answer_losses(model, h, idx, mask, chunk=cfg.kl_chunk)
                loss = ce.mean()
                (loss / accum).backward()
                loss_sum, kl_sum, ce_sum = loss_sum + loss.detach() / accum, math.nan, ce_sum + loss.detach() / accum
                continue
            idx = train.next_batch()  # (micro, seq_len) token windows
            with autocast_ctx:
                with torch.no_grad(), adapters_disabled(model):  # p_orig: the original model, no SAE, no adapters
                    h_orig, prefix = original_pass(model, idx, first_sae_layer, share_prefix=share_prefix)
                h = spliced_pass(model, saes, idx, unspliced_ids, prefix=prefix)  # p_spliced: adapters on, SAEs in
                kl, ce, _ = kl_and_ce(model, h_orig, h, idx, chunk=cfg.kl_chunk, loss_fn=loss_fn)  # Eq. 7 per position
            loss = kl.sum() / (len(idx) if cfg.kl_reduction == "sequence" else len(kl))  # per sequence or position
            (loss / accum).backward()  # only the adapters require grad: the model and the SAEs stay frozen
            loss_sum = loss_sum + loss.detach() / accum
            kl_sum, ce_sum = kl_sum + kl.detach().mean() / accum, ce_sum + ce.mean() / accum
        # the loss of the adapters after `step` updates: a non-finite one marks that state bad (read at the next sync)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step, first_bad)
        if not cfg.fsdp:  # FSDP2 has reduce-scattered them already
            common.all_reduce_grads(params)  # adapters are a few MB: one flat all-reduce instead of a DDP wrapper
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed += time.time() - t0
        tokens_since_log += tokens_per_step
        seconds_since_log += time.time() - t0

        if step % cfg.log_interval == 0 or step % cfg.ckpt_interval == 0 or step == total_steps:
            # the only host sync of a step; the adapters' own values are checked too: a checkpoint holds finite ones.
            # Over every rank: the earliest bad step, and whether any shard of any adapter is not finite
            finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                                  for p in params]).all()
            health = common.all_reduce_min(torch.stack([torch.where(first_bad >= 0, first_bad, total_steps + 1),
                                                        finite.long()]))
            loss_log, kl_log, ce_log, bad, finite = map(float, (loss_sum, kl_sum, ce_sum, *health))
            if bad <= total_steps or not finite:
                bad_step, what = (int(bad), "the loss") if bad <= total_steps else (step, "an adapter weight")
                err = run_folder.diverged(ckpt_path, bad_step, f"training diverged: {what} is not finite (lr {lr:.2e})",
                                          f"a lower --lr than {cfg.lr:g} (or --autocast float32)", master=ddp.master)
                if ddp.master and not cfg.fsdp and os.path.isfile(ckpt_path):  # adapter/: the checkpoint's state
                    for p, saved in zip(params, disk.torch_load(ckpt_path, ddp.device)["adapter"]):
                        p.data.copy_(saved)
                    save_adapter(model, os.path.join(cfg.out, "adapter"), cfg.model)
                raise err
        if step % cfg.log_interval == 0 or step == total_steps:
            tps = tokens_since_log / seconds_since_log
            common.log(f"step {step}/{total_steps} | loss {loss_log:.4f} | train KL {kl_log:.4f} | train CE with SAE "
                       f"+ LoRA {ce_log:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | MFU {tps * mfu_per_token:.1%} | "
                       f"ETA {(total_steps - step) * tokens_per_step / tps / 60:.1f} min")
            history.append(dict(step=step, tokens=step * tokens_per_step, time=elapsed, lr=lr, loss=loss_log,
                                train_kl=kl_log, train_ce=ce_log, tokens_per_s=tps))
            tokens_since_log, seconds_since_log = 0, 0.0
        if step % cfg.eval_interval == 0 or step == total_steps:
            held_out()
        if step % cfg.ckpt_interval == 0 or step == total_steps:
            save_checkpoint()

    # -- results -------------------------------------------------------------------------------------------------------
    final = next(h for h in reversed(history) if "ce_sae_lora" in h)
    if cfg.eval_split != "validation":  # the reported numbers: once, at the end, on tokens no choice has read
        final = held_out(cfg.eval_split)
    reported = ("ce_base", "ce_sae", "ce_sae_lora", "gap_closed", "kl_sae", "kl_sae_lora", "positions",
                *(k for k in final if k.startswith(("answer_", "norm_skipped_"))))
    results = dict({k: final[k] for k in reported}, tokens_per_s=step * tokens_per_step / max(elapsed, 1e-9),
                   eval_split=cfg.eval_split, train_tokens=step * tokens_per_step, train_seconds=elapsed, steps=step,
                   sae_layers=[layer for layer, _ in saes], lora_layers=lora_layers, config=asdict(cfg),
                   config_sources=common.sources(cfg), history=history)
    if ddp.master:
        disk.write_json(os.path.join(cfg.out, "results.json"), disk.jsonable(results))  # NaN: null
        run_folder.finish(ckpt_path)
    common.log(f"done: CE {results['ce_base']:.4f} (original) / {results['ce_sae']:.4f} (SAE) / "
               f"{results['ce_sae_lora']:.4f} (SAE + LoRA): {results['gap_closed']:.1%} of the gap closed; "
               f"adapter in {os.path.join(cfg.out, 'adapter')}")
    if own:
        common.teardown()
    return results


if __name__ == "__main__":
    common.cli(main)
