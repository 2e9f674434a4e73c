"""train_e2e.py's settings: Braun et al.'s e2e SAE with the TopK baseline's k and learning-rate rule (--recipe authors:
the paper authors' e2e runs); without --model, config/train_e2e_tiny.py replaces some of them for the flags not typed."""
from __future__ import annotations

from dataclasses import dataclass, field

from plumbing import common
from data import HELD_OUT_PARTS


@dataclass
class E2EConfig:
    """Train an end-to-end TopK SAE through the frozen model: minimise KL(p_orig || p_spliced) (Braun et al. 2024)."""
    model: str | None = None  # HF folder or hub id; none: the embedded tiny model
    data: str | None = None  # token folder (data.prepare); none: the embedded corpus in the model's own tokens
    # (the paper's data: python data.py --source redpajama-v2 --out DIR --tokenizer MODEL --max-tokens N)
    out: str = "out/e2e"  # the SAE (SAELens format), ckpt_010..ckpt_100, ckpt.pt and log.csv go here
    layer: list[int] = field(default_factory=list)  # the residual stream after this block (one layer; required)
    k: int = 64  # active latents per token, as the TopK baseline (paper: 64)
    expansion: int = 8  # SAE width = expansion x d_model (paper: 8)
    recipe: str = "gao"  # gao: the defaults below | authors: the paper authors' e2e runs (one sequence per step, KL
    # summed over it, all positions, 1000 warmup steps then linear decay), for flags not typed
    ds_coef: float = 0.0  # > 0: e2e+ds, downstream reconstruction MSE (normalised per layer) weighted by this
    init: str | None = None  # a trained TopK SAE (folder or hub path) to fine-tune on KL instead of a fresh one
    # (Karvonen 2025's short KL fine-tune of an MSE-trained SAE); its width and k replace --expansion and --k
    mse_coef: float = 0.0  # > 0: add this x the SAE layer's reconstruction MSE over the stream's variance (the
    # KL + MSE mix of Karvonen 2025's fine-tune; Braun et al.'s e2e uses KL alone)
    max_tokens: int = 50_000_000  # training tokens
    batch_size: int = 4  # sequences per optimizer step, over all processes
    seq_len: int = 1024  # tokens per sequence
    lr: float | None = None  # Adam learning rate; none: Gao et al.'s 2e-4 / sqrt(d_sae / 2^14), as the paper's e2e
    warmup_frac: float = 0.01  # fraction of the steps warming up linearly
    decay_frac: float = 0.2  # fraction of the steps decaying linearly to zero at the end
    grad_clip: float = 1.0  # gradient norm clip
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    sae_positions: str = "no_bos"  # where the SAE is spliced: no_bos (BOS keeps its activation, as train_sae.py
    # excludes it) | all (the authors' e2e runs) | no_bos_eos
    skip_norm_above: float | None = None  # also leave alone the positions whose activation norm, where the SAE reads
    # it, is above this multiple of their window's median (the Qwen3 SAE card's rule is 10); none: off (adapt.py)
    autocast: str = "auto"  # activation precision: auto (bfloat16 where the hardware runs it natively, else
    # float32) | bfloat16 | float32
    compile: bool = True  # torch.compile each block and the KL chunk (splice.compile_step)
    kl_chunk: int = 2048  # tokens per lm_head + log-softmax chunk
    kl_reduction: str = "token"  # the training loss: token: Eq. 7's mean over predicted positions (e2e_sae's, Braun et
    # al.'s code; adapt.py's default, sequence, is the paper authors' train_lora.py) | sequence: summed over each
    # sequence's, mean over sequences (the paper authors' e2e runs: --recipe authors)
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 200  # steps between validation CE-with-SAE measurements
    eval_batches: int = 8  # validation batches of batch_size sequences (over all processes); at most
    # what the held-out split holds (capped, with a log line)
    eval_split: str = "validation"  # the held-out part these evaluations read: validation (they steer the run: when
    # to stop, which lr) | test; an SAE's reported CE comes from adapt.py's or eval.py's test part (data.py)
    resume: bool = False  # continue from --out/ckpt.pt, with its settings; only --max-tokens, --autocast, --compile,
    # --kl-chunk, --log-interval, --eval-interval, --eval-batches and --device may differ, and --lr may be lowered
    # (after a divergence). --model, --data and --init are compared by what their files hold, not by their paths
    overwrite: bool = False  # replace the run in --out (its SAE, checkpoints, ckpt.pt and log.csv are deleted)
    seed: int = 0  # SAE initialisation and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(
            self, positive=("k", "expansion", "max_tokens", "batch_size", "seq_len", "lr", "grad_clip",
                            "kl_chunk", "log_interval", "eval_interval", "eval_batches"),
            non_negative=("dead_tokens", "ds_coef", "mse_coef"), fractions=("warmup_frac", "decay_frac"),
            choices=dict(recipe=("gao", "authors"), kl_reduction=("sequence", "token"),
                         sae_positions=("all", "no_bos", "no_bos_eos"), autocast=("auto", *common.PRECISIONS),
                         eval_split=HELD_OUT_PARTS))


# What --resume may change: how long, how often, where and at what precision; every other setting defines the SAE
# that is trained and must equal the checkpoint's (formats/run_folder.py).
MAY_CHANGE = frozenset({"max_tokens", "autocast", "compile", "kl_chunk", "log_interval", "eval_interval",
                        "eval_batches", "resume", "overwrite", "device", "out"})
