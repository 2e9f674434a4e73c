"""adapt.py's settings. The defaults are the authors' run (train_lora.py in their code); without --model,
config/adapt_tiny.py replaces some of them for the flags not typed (embedded.fill_in)."""
from __future__ import annotations

from dataclasses import dataclass, field

from plumbing import common
from data import HELD_OUT_PARTS


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
    # positions, mean over sequences (the paper authors' train_lora.py: kl_div batchmean on one sequence, the scale
    # their clipping sees); token: mean over positions (train_e2e.py's default, Braun et al.'s e2e_sae recipe)
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


# What --resume may change: how long, how often, where and at what precision the run goes on. Every other setting
# defines what a step trains and must equal the checkpoint's (formats/run_folder.py).
MAY_CHANGE = frozenset({"max_tokens", "micro_batch", "autocast", "dtype", "fsdp", "compile", "kl_chunk", "eval_tokens",
                        "eval_split", "eval_interval", "log_interval", "ckpt_interval", "resume", "overwrite", "device",
                        "out"})
