"""train_sae.py's settings: the defaults are Gao et al.'s TopK recipe (--recipe authors: the paper authors' trainer);
without --model, config/train_sae_tiny.py (the embedded SAE's recipe) replaces some of them for the flags not typed."""
from __future__ import annotations

from dataclasses import dataclass, field

from plumbing import common
from data import HELD_OUT_PARTS


@dataclass
class TrainSAEConfig:
    """Train a TopK, BatchTopK or JumpReLU SAE on one layer's residual stream (Gao et al.'s recipe)."""
    model: str | None = None  # HF folder or hub id; none: the embedded tiny model
    data: str | None = None  # token folder (data.prepare); none: the embedded corpus in the model's own tokens
    # (the paper's data: python data.py --source redpajama-v2 --out DIR --tokenizer MODEL --max-tokens N)
    out: str = "out/sae"  # the SAE (SAELens format), ckpt_010..ckpt_100, ckpt.pt and history.json go here
    layer: list[int] = field(default_factory=list)  # the residual stream after this block (one layer; required)
    recipe: str = "gao"  # gao: Gao et al.'s (the defaults below) | authors: the paper authors' trainer (one
    # unshuffled sequence per step, all positions, AuxK off, 1000 warmup steps then linear decay), for flags not typed
    arch: str = "topk"  # topk | batchtopk | jumprelu
    transcoder: bool = False  # train a transcoder instead: block L's normalised MLP input -> its MLP sublayer's
    # output (spliced, it replaces that MLP; saved with SAELens' hook_name / hook_name_out for the two points)
    k: int = 64  # TopK / BatchTopK: active latents per token (paper: 64)
    expansion: int = 8  # SAE width = expansion x d_model (paper: 8)
    l0_coef: float = 1e-3  # JumpReLU: weight of the L0 penalty (paper Eq. 6)
    bandwidth: float = 1e-3  # JumpReLU: straight-through kernel width, relative to the activation scale
    max_tokens: int = 200_000_000  # training tokens
    batch_tokens: int = 4096  # tokens per SAE step, over all processes (Gao et al.: thousands, not one sequence)
    buffer_tokens: int = 262_144  # shuffle buffer of activations, refilled when consumed
    model_batch: int = 8  # sequences per process per forward of the frozen model when filling the buffer
    seq_len: int = 1024  # tokens per sequence
    lr: float | None = None  # Adam learning rate; none: Gao et al.'s 2e-4 / sqrt(d_sae / 2^14)
    warmup_frac: float = 0.01  # fraction of the steps warming up linearly
    decay_frac: float = 0.2  # fraction of the steps decaying linearly to zero at the end
    auxk_coef: float = 1 / 32  # TopK: weight of the AuxK loss that revives dead latents (Gao et al.: 1/32)
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    grad_clip: float = 1.0  # gradient norm clip
    include_bos: bool = False  # train on BOS activations too (their norm dwarfs the rest: excluded by default)
    autocast: str = "auto"  # activation precision: auto (bfloat16 where the hardware runs it natively, else
    # float32) | bfloat16 | float32
    dtype: str = "float32"  # storage of the frozen weights (bfloat16 skips the per-step weight casts)
    compile: bool = True  # torch.compile the frozen forward up to the layer, a block at a time
    log_interval: int = 50  # steps between log lines
    eval_interval: int = 500  # steps between validation CE-with-SAE measurements
    eval_batches: int = 4  # validation batches of model_batch sequences; at most
    # what the held-out split holds (capped, with a log line)
    eval_split: str = "validation"  # the held-out part these evaluations read: validation (they steer the run: when
    # to stop, which lr) | test; an SAE's reported CE comes from adapt.py's or eval.py's test part (data.py)
    resume: bool = False  # continue from --out/ckpt.pt, with its settings; only --max-tokens, --autocast, --dtype,
    # --compile, --log-interval, --eval-interval, --eval-batches and --device may differ, and --lr may be lowered
    # (after a divergence). --model and --data are compared by what their files hold, not by their paths
    overwrite: bool = False  # replace the run in --out (its SAE, checkpoints, ckpt.pt and history.json are deleted)
    seed: int = 0  # SAE initialisation and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(
            self, positive=("k", "expansion", "bandwidth", "max_tokens", "batch_tokens", "buffer_tokens", "model_batch",
                            "seq_len", "lr", "grad_clip", "log_interval", "eval_interval",
                            "eval_batches"),
            non_negative=("dead_tokens", "l0_coef", "auxk_coef"), fractions=("warmup_frac", "decay_frac"),
            choices=dict(recipe=("gao", "authors"), arch=("topk", "batchtopk", "jumprelu"),
                         autocast=("auto", *common.PRECISIONS), dtype=common.PRECISIONS,
                         eval_split=HELD_OUT_PARTS))


# What --resume may change: how long, how often, where and at what precision; every other setting defines the SAE
# that is trained and must equal the checkpoint's (formats/run_folder.py).
MAY_CHANGE = frozenset({"max_tokens", "autocast", "dtype", "compile", "log_interval", "eval_interval", "eval_batches",
                        "resume", "overwrite", "device", "out"})
