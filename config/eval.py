"""eval.py's settings: what to evaluate and how (the defaults: the paper's held-out budgets, Secs. 4-6); without --model,
config/eval_tiny.py replaces some of them for the flags not typed."""
from __future__ import annotations

from dataclasses import dataclass, field

from data import HELD_OUT_PARTS
from plumbing import common


@dataclass
class EvalConfig:
    """Evaluate model + SAE(s) + LoRA adapter(s): CE/KL table, per-token breakdown, distances, steering, benchmarks."""
    model: str | None = None  # HF folder or hub id; none: the embedded tiny pipeline
    sae: list[str] = field(default_factory=list)  # SAE folder or hub path; several are spliced together (Sec. 4.3);
    # residual-stream SAEs, SAEs on block L's attention heads (blocks.L.attn.hook_z), attention output
    # (hook_attn_out) or MLP output (hook_mlp_out), and MLP transcoders, each spliced where it reads (adapt.py's
    # --sae); steering and --saebench need a residual one first; none: as adapt.py chooses (Gemma Scope for
    # Gemma-2 2B/9B at --layer, the embedded SAE for the tiny model)
    layer: list[int] = field(default_factory=list)  # the SAE layer, one per --sae; none: what the SAE files say
    adapter: list[str] = field(default_factory=list)  # PEFT adapter folder; several give one row group each. One that
    # adapt.py trained around other SAEs than --sae: evaluated all the same, with a warning line
    tokenizer: str | None = None  # for steering texts and benchmarks; none: the model's own
    data: str | None = None  # token folder (data.prepare) whose val split is the held-out set
    eval_split: str = "test"  # the held-out part read: test (reported numbers) | validation (choices; data.py)
    out: str = "out/eval"  # eval.json, eval.md and the plots go here (eval.partial.json while it runs: the parts
    # done so far, kept if it fails); a new or empty folder
    overwrite: bool = False  # --out holds files: replace eval.json, eval.md and the plots there (the rest is kept)
    eval_tokens: int = 1_000_000  # held-out tokens (paper: 1M for the CE table, Sec. 4; 500k for distances, Sec. 6.2),
    # in whole windows rounded up to whole batches, as adapt.py; at least 1; more than the held-out split holds: all
    # of it, once (a log line says so)
    batch_size: int = 4  # sequences per forward
    seq_len: int = 1024  # tokens per sequence
    sae_positions: str = "auto"  # where the SAE is spliced: auto (per SAE source, as the authors: Gemma / Llama
    # Scope everywhere but BOS and EOS, sparsify-format TopK SAEs everywhere, SAELens files everywhere but BOS) | all |
    # no_bos | no_bos_eos
    skip_norm_above: float | None = None  # also leave alone the positions whose activation norm, where the SAE reads
    # it, is above this multiple of their window's median (the Qwen3 SAE card's rule is 10); none: off (adapt.py)
    distances: bool = True  # activation distances (Fig. 11); keeps the original streams of a batch: off saves memory
    steering_pos: str | None = None  # steering (Sec. 5.2): texts the latent should make likelier (jsonl or .json)
    steering_neg: list[str] = field(default_factory=list)  # steering: test negatives (jsonl, or the authors' .json
    # {"examples": [...]}), one file per dataset (their law, arabic, shakespeare, recipes)
    steering_neg_val: str | None = None  # steering: validation negatives for tuning alpha (jsonl or .json)
    latent: int | None = None  # steering: the SAE latent whose decoder row is the direction
    alphas: str = "0,1,2,4,8,16,32"  # steering: the grid alpha is tuned on
    alpha: float | None = None  # steering: a fixed alpha (no tuning)
    steering_splice: bool = False  # steering: steer the SAE reconstruction instead of the plain stream
    mmlu: str | None = None  # MMLU (Sec. 5.3): local .jsonl / .json / .parquet file or hub dataset id
    hellaswag: str | None = None  # HellaSwag: local file or hub dataset id
    truthfulqa: str | None = None  # TruthfulQA-MC1: local file or hub dataset id
    truthfulqa_preset: bool = True  # lm-eval's six-question QA prompt before each TruthfulQA question
    truthfulqa_gen: str | None = None  # TruthfulQA generation (Table 5's BLEU, ROUGE-1, ROUGE-2; truthfulqa.py): local
    # file or hub id (truthfulqa/truthful_qa), or "corpus": questions from --data's held-out documents (offline check)
    authors_splice: bool = False  # generation also as the authors ran it (labelled): the SAE on prompt tokens only
    gen_tokens: int = 256  # most tokens generated per answer or --generate prompt (lm-eval's max_gen_toks)
    generate: list[str] = field(default_factory=list)  # a prompt: print what each setting writes after it
    temperature: float = 0.0  # --generate: sampling temperature (0: greedy)
    top_k: int | None = None  # --generate: sample among the k likeliest tokens only
    seed: int = 0  # --generate: sampling seed
    bench_limit: int | None = None  # at most this many questions per benchmark
    bench_batch: int = 16  # sequences per forward (benchmarks and steering)
    plots: bool = True  # write PNG figures (needs matplotlib)
    saebench: bool = False  # SAEBench metrics (Sec. 5.1, Table 6) for the first SAE, base vs adapted (saebench.py)
    saebench_words: int | None = None  # --saebench absorption: at most this many of the vocabulary's letter-only tokens
    # (shuffled with SAEBench's seed); none: all, as SAEBench (a 49k BPE: ~47k words, hours on a CPU)
    autocast: str = "auto"  # activation precision: auto (bfloat16 where the hardware runs it natively, else
    # float32) | bfloat16 | float32
    dtype: str = "float32"  # storage of the model weights
    chunk: int = 2048  # tokens per lm_head + log-softmax chunk
    compile: bool = False  # torch.compile each block and the KL chunk for the CE table (splice.compile_step): a cold
    # start of tens of seconds, repaid on long evaluations; the benchmarks, steering and generation stay eager
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag
        common.check_flags(
            self, positive=("eval_tokens", "batch_size", "seq_len", "top_k", "bench_limit", "bench_batch", "chunk",
                            "saebench_words"),
            non_negative=("latent", "seed"),  # --gen-tokens and --temperature: generate.check_args
            choices=dict(autocast=("auto", *common.PRECISIONS), dtype=common.PRECISIONS,
                         sae_positions=("auto", "all", "no_bos", "no_bos_eos"), eval_split=HELD_OUT_PARTS))
