"""pretrain.py's settings: embedded.PretrainRecipe (what decides the weights: the embedded tiny model's recipe, whose
hash names its cache folder) and what does not change them."""
from __future__ import annotations

from dataclasses import dataclass

from plumbing import common
from plumbing import embedded


@dataclass
class PretrainConfig(embedded.PretrainRecipe):
    """Pretrain a tiny Gemma-2 / Llama-3 architecture model from scratch (defaults: the embedded offline model)."""
    out: str = ""  # output folder; default <cache>/tiny-<family>-<hash of the recipe above> (embedded.model_dir)
    data: str = ""  # token dataset folder written by data.prepare; default: the embedded stdlib corpus
    stop_after: int = 0  # end this invocation after this step (checkpointed; --resume goes on); 0: run to max_steps
    eval_interval: int = 250  # steps between validation losses
    eval_batches: int = 25  # validation batches
    log_interval: int = 25  # steps between log lines
    ckpt_interval: int = 250  # steps between checkpoints (ckpt.pt)
    resume: bool = False  # continue from --out/ckpt.pt, with its settings; only --max-steps, --stop-after,
    # --autocast, --compile, the intervals, --eval-batches and --device may differ, and --lr may be lowered (after a
    # divergence). --data is compared by what its files hold, not by its path
    overwrite: bool = False  # replace the model in --out (its weights, config, tokenizer and state are deleted first)
    compile: bool = True  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(
            self, positive=("d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "sliding_window",
                            "seq_len", "batch_size", "grad_accum", "max_steps", "lr", "grad_clip", "eval_interval",
                            "eval_batches", "log_interval", "ckpt_interval"),
            non_negative=("weight_decay", "stop_after"), fractions=("min_lr_frac", "warmup_frac"),
            below_one=("beta1", "beta2"),
            choices=dict(family=("gemma2", "llama3"), autocast=("auto", *common.PRECISIONS)))


# What --resume may change: how long, how often, where and at what precision; every other setting (the recipe,
# the data) defines the model that is trained and must equal the checkpoint's (formats/run_folder.py).
MAY_CHANGE = frozenset({"max_steps", "stop_after", "autocast", "compile", "eval_interval", "eval_batches",
                        "log_interval", "ckpt_interval", "resume", "overwrite", "device", "out"})
