"""
Benchmark one LoRA-adaptation training step: this codebase against the paper's stack (HF transformers + peft, SAE
spliced with a forward hook, full-vocabulary softmax KL), side by side, same model weights, same SAE, same batch.

    python tools/bench.py adapt                               # a ~40M-parameter Gemma-2-shaped model, 16k vocabulary
    python tools/bench.py adapt --model DIR --sae DIR --layer L --rank R --batch_size B --seq_len T --steps N
    for v in 16384 65536 262144; do python tools/bench.py adapt --vocab $v; done   # peak memory against the vocabulary
    python tools/bench.py sae                                 # SAE training: our loop against the paper's per-sequence loop
    python tools/bench.py adapt --shape gemma-2-2b --layer 12 --seq-len 1024 --batch-size 1 --kl-chunk 1024   # GPU: the paper's
    python tools/bench.py adapt --profile                     # where ours spends one step: phase x op family
    python tools/bench.py sae-module                          # the fused TopK SAE module against the dense one, and what
                                                        # its fp32 encoder costs against a bf16 one

Each configuration runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU: the process's
peak RSS) belongs to it alone, and with an empty compile cache. Reports tokens/s, MFU against the device's peak,
peak memory and the cold start: from starting the process to the end of its first step, compilation included.
Needs the test requirements (transformers, peft) for the reference: this is a dev tool, never imported by the
library.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable by path (python tools/X.py) as well as with -m

from config.adapt import AdaptConfig
from plumbing import common
from plumbing import distributed
from tools.step_profile import profiled  # --profile: where one step's time goes


@dataclass
class BenchConfig:
    """Benchmark an adaptation step: ours vs transformers + peft."""
    model: str | None = None  # HF model folder or hub id; none: a random model of the shape below
    sae: str | None = None  # SAE folder or hub path; none: a random TopK SAE
    layer: list[int] = field(default_factory=list)  # the SAE layer; none: what the SAE files say (3 for a random SAE)
    shape: str | None = None  # random model of a real model's shape (model.py's presets: gemma-2-2b, llama-3.2-1b,
    # ...; its own vocabulary); none: the small shape below
    shape_layers: int | None = None  # --shape: only its first N layers (the cold start against depth); none: all
    shape_vocab: int | None = None  # --shape: this vocabulary size instead of its own (a CPU's memory)
    family: str = "gemma2"  # random model: gemma2 | llama3
    d_model: int = 512  # random model: width
    n_layer: int = 8  # random model: depth
    vocab: int = 16384  # random model: vocabulary size
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 4  # sequences per step
    rank: int = 64  # LoRA rank on every layer
    expansion: int = 8  # random SAE: width = expansion x d_model
    sae_width: int | None = None  # random SAE: its width (Gemma Scope's 16k: 16384); none: expansion x d_model
    k: int = 32  # random SAE: active latents per token
    kl_chunk: int = AdaptConfig.kl_chunk  # tokens per lm_head + log-softmax chunk in ours (adapt.py --kl-chunk, its
    # default: one chunk for up to 2048 tokens, no lm_head recomputed in the backward)
    compile: bool = True  # bench.py adapt: also time ours compiled (adapt.py's default: each block and the KL chunk
    # its own graph, model.compile_blocks); false skips that row
    whole_model: bool = False  # bench.py adapt: also time ours with each pass compiled whole (all layers unrolled in
    # one graph), the comparison for the per-block compilation
    eager: bool = True  # bench.py adapt: also time ours uncompiled
    references: bool = True  # bench.py adapt: also time transformers + peft (matched precision, and fp32 as the paper)
    profile: bool = False  # bench.py adapt: instead of the comparison, profile ours (compiled unless --compile
    # false) and print where a step's time goes, by phase and op family
    compile_sae: bool = True  # bench.py sae: compile our forward to the layer, as train_sae.py does by default
    autocast: str = "auto"  # precision of ours and of the matched reference row: auto (bf16 where the hardware runs
    # it natively, else fp32) | bfloat16 | float32; the last reference row is always fp32, as the paper's code ran
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps before them (compilation happens here)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    only: str | None = None  # internal: run one configuration in this process and print its JSON

    def __post_init__(self):  # every value checked as it is parsed: one line naming the flag, as the scripts
        common.check_flags(
            self, positive=("d_model", "n_layer", "vocab", "seq_len", "batch_size", "rank", "expansion", "sae_width",
                            "k", "kl_chunk", "steps"), non_negative=("warmup",),
            choices=dict(family=("gemma2", "llama3"), autocast=("auto", *common.PRECISIONS)))


def model_config(b: BenchConfig):
    from model import ModelConfig
    if b.shape:
        c = ModelConfig.from_name(b.shape)
        c.n_layer = b.shape_layers or c.n_layer
        c.layer_types, c.vocab_size = c.layer_types[:c.n_layer], b.shape_vocab or c.vocab_size
        return c
    c = ModelConfig.from_name("tiny-gemma2" if b.family == "gemma2" else "tiny-llama3")
    c.d_model, c.n_layer, c.vocab_size = b.d_model, b.n_layer, b.vocab
    c.n_head, c.n_kv_head, c.head_dim, c.d_ff = max(1, b.d_model // 64), max(1, b.d_model // 128), 64, 4 * b.d_model
    gemma = b.family == "gemma2"
    c.query_pre_attn_scalar, c.sliding_window = (64, 4096) if gemma else (None, None)
    c.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(b.n_layer)] if gemma else None
    c.max_seq_len, c.bos_token_id = max(b.seq_len, 8192), 1
    c.__post_init__()
    return c


def check_shape(b: BenchConfig):
    """The flags that depend on the model's shape, before any work: one ValueError line each."""
    if b.model:
        from formats.checkpoint import read_config, resolve_model_dir
        from model import ModelConfig
        mc = ModelConfig.from_hf(read_config(resolve_model_dir(b.model)))
    else:
        mc = model_config(b)  # an unknown --shape: ModelConfig.from_name's line
    for layer in b.layer:
        if not 0 <= layer < mc.n_layer:
            raise ValueError(f"--layer {layer} is out of range: the model has layers 0..{mc.n_layer - 1}")
    if b.k > (b.sae_width or b.expansion * mc.d_model):
        raise ValueError(f"--k {b.k} is more than the SAE's {b.sae_width or b.expansion * mc.d_model} latents")


def bench_folder(b: BenchConfig) -> str:
    if b.model:  # a real model: the folder holds only the random SAE drawn for it, so it is named by the model
        import hashlib
        name = "model-" + hashlib.sha256(os.path.abspath(b.model).encode()).hexdigest()[:12]
    else:
        name = (f"{b.shape}-{b.shape_layers}-{b.shape_vocab}" if b.shape
                else f"{b.family}-{b.d_model}-{b.n_layer}-{b.vocab}")
    return os.path.join(tempfile.gettempdir(), f"lorasae-bench-{name}")


def build_inputs(b: BenchConfig, folder: str, device):
    """What --model and --sae do not name, drawn at random: the model and its SAE, or the SAE of the given model
    (drawn anew each run, so that it always fits the model and the --k / --expansion / --layer typed)."""
    if not b.model:
        build_files(b, folder, device)
    elif not b.sae:
        from formats.checkpoint import read_config
        from model import ModelConfig
        from sae import SAE
        d_model = ModelConfig.from_hf(read_config(paths(b, folder)[0])).d_model
        torch.manual_seed(0)
        SAE(d_model, b.sae_width or b.expansion * d_model, "topk", k=b.k,
            layer=(b.layer or [3])[0]).save(os.path.join(folder, "sae"))


def build_files(b: BenchConfig, folder: str, device: str | torch.device = "cpu"):
    """Random model in HF layout + a random TopK SAE in SAELens layout, shared by both stacks. The weights are drawn
    on `device`: Gemma-2-2B's 2.6B parameters take tens of seconds to draw on a CPU, a fraction of one on a GPU; and
    saved in the precision ours runs (bf16 under bf16 autocast: half the bytes to write and read; the fp32 row
    loads the same values)."""
    from model import Transformer
    from sae import SAE
    torch.manual_seed(0)
    mc = model_config(b)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, b.autocast))  # drawn in that precision: no fp32 copy of 2.6B weights
    try:
        with torch.device(device):
            model = Transformer(mc).init_weights(0)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(os.path.join(folder, "model"))
    del model
    sae = SAE(mc.d_model, b.sae_width or b.expansion * mc.d_model, "topk", k=b.k, layer=(b.layer or [3])[0])
    sae.save(os.path.join(folder, "sae"))


def run_ours(b: BenchConfig, folder: str, how: str, dev: torch.device) -> dict:
    """One adaptation step of ours, as adapt.py runs it: `how` is "blocks" (adapt.py's default, splice.compile_step),
    "whole" (each pass compiled as one graph, all layers unrolled) or "eager"."""
    import splice
    from formats.sae_files import load_saes
    from lora import adapter_parameters, apply_lora
    from model import Transformer, run_block
    # under bf16 autocast the frozen base weights are stored in bf16 (adapt.py --dtype bfloat16): no per-step casts
    model = Transformer.from_pretrained(paths(b, folder)[0], device=dev, dtype=getattr(torch, b.autocast))
    model.requires_grad_(False)
    saes = load_saes([paths(b, folder)[1]], b.layer or None, model, dev)
    apply_lora(model, b.rank, 32.0, 0.0, "all")
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as adapt.py
    original, spliced = splice.original_pass, splice.spliced_pass
    loss_fn = splice.compile_step(model, how != "eager")
    if how == "whole":
        model.run_block = run_block  # the blocks plain, inside the two passes compiled whole
        original, spliced = torch.compile(original), torch.compile(spliced)
    autocast_ctx = common.autocast(dev, b.autocast)
    idx = batch(b, model.cfg.vocab_size, dev)
    label = torch.profiler.record_function  # the phases of PHASES, for --profile (no cost otherwise)

    def step():
        with autocast_ctx:
            with label("original forward"), torch.no_grad(), splice.adapters_disabled(model):
                h_orig, _ = original(model, idx, saes[0][0], share_prefix=False)
            with label("spliced forward"):
                h = spliced(model, saes, idx, model.cfg.bos_token_id)
            with label("KL + CE forward"):
                kl, _, _ = splice.kl_and_ce(model, h_orig, h, idx, chunk=b.kl_chunk, loss_fn=loss_fn)
                loss = kl.mean()  # adapt.py --kl-reduction token
        with label("backward"):
            loss.backward()
        with label("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return profiled(step, b, dev) if b.profile else timed(step, b, dev)


def reference_setup(model_type: str, matched: bool, autocast: str) -> tuple[str, str]:
    """(weight dtype, attention) of a transformers row. The paper's code (train_lora.py:73-77) loads fp32 weights with
    eager attention; the matched row stores weights as ours does (bf16 under bf16 autocast) and takes sdpa, except on
    Gemma-2, whose attention soft-capping sdpa cannot do (transformers runs Gemma-2 eager)."""
    if not matched:
        return "float32", "eager"
    return ("bfloat16" if autocast == "bfloat16" else "float32"), ("eager" if model_type == "gemma2" else "sdpa")


def run_reference(b: BenchConfig, folder: str, matched: bool, dev: torch.device) -> float:
    """The paper's loop (matchten/LoRA-Models-for-SAEs utils.train_model): peft model, SAE in a forward hook on the
    decoder layer, base pass under disable_adapter, full softmax over the vocabulary, kl_div."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from formats.checkpoint import read_config
    from sae import SAE
    model_dir, sae_dir = paths(b, folder)
    dtype, attn = reference_setup(read_config(model_dir)["model_type"], matched, b.autocast)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn).to(dev)
    sae = SAE.from_pretrained(sae_dir, device=dev).requires_grad_(False)
    if b.layer:
        sae.layer = b.layer[0]
    peft_model = get_peft_model(model, LoraConfig(r=b.rank, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    state = {"on": True}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if not state["on"]:
            return output
        recon = sae.decode(sae.encode(h)).to(h.dtype)  # dense codes, as the reference SAE libraries do
        return (recon,) + tuple(output[1:]) if isinstance(output, tuple) else recon
    model.model.layers[sae.layer].register_forward_hook(hook)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    idx = batch(b, model.config.vocab_size, dev)
    autocast_ctx = common.autocast(dev, b.autocast if matched else "float32")

    def step():
        with autocast_ctx:
            with torch.no_grad(), peft_model.disable_adapter():
                state["on"] = False
                base_probs = F.softmax(peft_model(idx).logits.float(), dim=-1)
            state["on"] = True
            logp = F.log_softmax(peft_model(idx).logits.float(), dim=-1)
            loss = F.kl_div(logp, base_probs, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, b, dev)


def paths(b: BenchConfig, folder: str) -> tuple[str, str]:
    from formats.checkpoint import resolve_model_dir  # a hub id or GGUF file as the folder both stacks load
    model = resolve_model_dir(b.model) if b.model else os.path.join(folder, "model")
    return model, b.sae or os.path.join(folder, "sae")


def batch(b: BenchConfig, vocab: int, dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, vocab, (b.batch_size, b.seq_len), generator=g)
    idx[:, 0] = 2  # a BOS-like first token (not spliced by ours; the reference splices every position)
    return idx.to(dev)


def timed(step, b: BenchConfig, dev) -> dict:
    """{seconds: per timed step, first_step_end: the wall clock (time.time()) when the first step had finished: the
    end of the cold start, compilation included}."""
    t0 = time.perf_counter()
    first_step_end = None
    for i in range(b.warmup):  # the first step compiles: a run that times out says how far it got (stderr)
        print(f"warm-up step {i + 1} of {b.warmup} started at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
        step()
        if first_step_end is None:
            sync(dev)
            first_step_end = time.time()
    print(f"warm-up done in {time.perf_counter() - t0:.0f} s; timing {b.steps} steps", file=sys.stderr, flush=True)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(b.steps):
        step()
    sync(dev)
    return dict(seconds=(time.perf_counter() - t0) / b.steps, first_step_end=first_step_end or time.time())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


CONFIGS = {
    "ours (compiled)": ("ours", "blocks"),
    "ours (whole passes compiled)": ("ours", "whole"),
    "ours (eager)": ("ours", "eager"),
    "transformers + peft (same precision)": ("ref", True),
    "transformers + peft (fp32, as the paper's code)": ("ref", False),
}


def run_config(b: BenchConfig, name: str, timeout: float | None = None) -> dict:
    """One configuration in a fresh subprocess, so that its peak memory is its own, with an empty compile cache, so
    that its first step pays the whole cold start a user's first run does: {seconds, peak_gb, setup_s, cold_start_s:
    from starting the process to the end of its first step}, or {error}."""
    args = [sys.executable, os.path.abspath(__file__), "adapt"] + [
        f"--{k}={v}" for k, v in asdict(b).items() if k not in ("only", "layer") and v is not None]
    args += [f"--layer={layer}" for layer in b.layer]
    with tempfile.TemporaryDirectory(prefix="lorasae-bench-cache-") as cache:
        # inductor's and triton's caches in a new folder, and no FX graph / AOT autograd cache: nothing compiled
        # before (by an earlier configuration or run) is reused
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
               "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        t0 = time.time()
        try:
            proc = subprocess.run(args + [f"--only={name}"], capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:  # say where it was: its last progress line (timed() prints them)
            text = "\n".join(out.decode(errors="replace") if isinstance(out, bytes) else out
                             for out in (e.stderr, e.stdout) if out)
            said = [line for line in text.splitlines() if line.startswith("warm-up")][-1:]
            return dict(error=f"timed out after {timeout:.0f} s" + (f" ({said[0]})" if said else
                                                                    " (before its first step)"))
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["cold_start_s"] = r.pop("first_step_end") - t0
    return r


def step_flops(b: BenchConfig, folder: str):
    """(model config, FLOPs of one step): accounting.flops.adapt_step_flops for the step run_ours times (adapters on
    every layer, one micro batch), without the KL chunks' recomputation: the work both stacks do."""
    from accounting.flops import adapt_step_flops
    from formats.checkpoint import read_config
    from model import ModelConfig
    from sae import SAE
    mc = ModelConfig.from_hf(read_config(paths(b, folder)[0]))
    sae = SAE.from_pretrained(paths(b, folder)[1])
    saes = [(b.layer[0] if b.layer else sae.layer, sae)]
    return mc, b.batch_size * b.seq_len * adapt_step_flops(mc, saes, list(range(mc.n_layer)), b.rank, b.seq_len,
                                                    b.batch_size, None)


def wanted(b: BenchConfig, name: str) -> bool:
    """Whether the flags ask for this configuration (--compile, --whole-model, --eager, --references)."""
    return {"ours (compiled)": b.compile, "ours (whole passes compiled)": b.whole_model,
            "ours (eager)": b.eager}.get(name, b.references)


def bench_adapt(b: BenchConfig, dev):
    folder = bench_folder(b)
    if b.only is not None:  # child process: one configuration
        kind, how = CONFIGS[b.only]
        t0 = time.perf_counter()
        r = run_ours(b, folder, how, dev) if kind == "ours" else run_reference(b, folder, how, dev)
        # setup_s: loading, building and the warm-up steps (compilation for ours), everything but the timed steps
        setup = time.perf_counter() - t0 - b.steps * r["seconds"]
        print(json.dumps(dict(r, peak_gb=peak_memory_gb(dev), setup_s=setup)))
        return None
    build_inputs(b, folder, dev)
    if b.profile:  # in this process: the table is printed by profiled()
        return run_ours(b, folder, "blocks" if b.compile else "eager", dev)
    mc, flops = step_flops(b, folder)
    tokens = b.batch_size * b.seq_len
    peak = common.peak_flops(dev, b.autocast)
    print(f"device {dev} | {mc.model_type} d_model {mc.d_model} layers {mc.n_layer} vocab {mc.vocab_size} "
          f"({mc.n_params() / 1e6:.0f}M parameters) | batch {b.batch_size} x {b.seq_len} | LoRA rank {b.rank} on all "
          f"layers | {b.autocast} | {b.steps} timed steps after {b.warmup} warm-up")
    print(f"MFU against {peak / 1e12:.3g} TFLOP/s ({'measured 1024^3 matmul' if dev.type == 'cpu' else 'datasheet'}"
          f", {b.autocast}); LORASAE_PEAK_FLOPS overrides")
    print(f"{'configuration':50s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem GB':>12s} {'cold start s':>13s}")
    rows = {}
    for name in CONFIGS:
        if not wanted(b, name):
            continue
        r = run_config(b, name)
        if "error" in r:
            print(f"{name:50s} failed: {r['error']}")
            continue
        rows[name] = r
        tps = tokens / r["seconds"]
        r.update(tokens_per_s=tps, mfu=tps * flops / tokens / peak)
        print(f"{name:50s} {tps:10,.0f} {r['mfu']:7.1%} {r['peak_gb']:12.2f} {r['cold_start_s']:13.0f}", flush=True)
    ours = rows.get("ours (compiled)") or rows.get("ours (eager)")
    ref = rows.get("transformers + peft (same precision)")
    summary = dict(rows=rows)  # the last line: every row, and ours against the matched reference when both ran
    if ours and ref:
        summary.update(ours_tokens_per_s=tokens / ours["seconds"], reference_tokens_per_s=tokens / ref["seconds"],
                       ratio=ref["seconds"] / ours["seconds"], ours_peak_mb=ours["peak_gb"] * 1024,
                       reference_peak_mb=ref["peak_gb"] * 1024, ours_cold_start_s=ours["cold_start_s"])
    print(json.dumps(summary))
    failed = [name for name in CONFIGS if name not in rows and wanted(b, name)]
    if failed:  # a benchmark with a failed row is no result: a non-zero exit says so to scripts and CI
        raise SystemExit(f"bench.py: {len(failed)} of {len(failed) + len(rows)} configurations failed "
                         f"({', '.join(failed)}): their errors are printed above")
    return rows


def bench_sae(b: BenchConfig, dev):
    """SAE-training throughput: train_sae.py's loop (forward stops at the layer, --autocast, one SAE step per 4096
    tokens) against the paper's (full-model fp32 forward per 1024-token sequence, one SAE step per sequence)."""
    from model import Transformer, compile_blocks
    from sae import SAE
    from training.sae_loss import training_loss
    folder = bench_folder(b)
    build_inputs(b, folder, dev)
    L, results, seq_len = (b.layer or [3])[0], {}, 1024
    for name, seqs, amp_dtype, stop in ((f"ours: stop_at layer, {b.autocast}, 4096-token SAE batches", 4, b.autocast,
                                         True), ("paper: full fp32 forward, one 1024-token sequence per step", 1,
                                                 "float32", False)):
        # ours holds the frozen model in the activation precision (train_sae.py --dtype); the paper's ran it in fp32
        model = Transformer.from_pretrained(paths(b, folder)[0], device=dev, dtype=getattr(torch, amp_dtype))
        model.requires_grad_(False)
        d = model.cfg.d_model
        torch.manual_seed(0)
        sae = SAE(d, b.expansion * d, "topk", k=b.k, layer=L, device=dev)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        autocast_ctx = common.autocast(dev, amp_dtype)
        idx = torch.randint(3, model.cfg.vocab_size, (seqs, seq_len), device=dev)
        dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)

        # ours compiles the blocks as train_sae.py does (Gemma-2's attention becomes one flex_attention kernel)
        compile_blocks(model, stop and b.compile_sae)

        def step():
            with torch.no_grad(), autocast_ctx:
                if stop:
                    x = model(idx, stop_at=L)
                else:  # the whole model runs; the layer's output is captured by a hook
                    seen = {}
                    model(idx, hooks={L: lambda h: seen.setdefault("x", h)})
                    x = seen["x"]
            with autocast_ctx:
                loss, _, _ = training_loss(sae, x.reshape(-1, d).float(), dead, 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        sec = timed(step, b, dev)["seconds"]
        results[name] = seqs * seq_len / sec
        print(f"{name:60s} {results[name]:10,.0f} tokens/s")
    ours, paper = results.values()
    print(json.dumps(dict(ours_tokens_per_s=ours, paper_tokens_per_s=paper, ratio=ours / paper)))


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    what = argv.pop(0) if argv and argv[0] in ("adapt", "sae", "sae-module") else "adapt"
    if what == "sae-module":
        from tools.bench_sae_module import bench_sae_module
        return bench_sae_module(argv)
    b, _ = common.parse_args(BenchConfig, argv)
    check_shape(b)
    dev = distributed.setup(b.device).device
    b.autocast = common.resolve_autocast(dev, b.autocast)
    return bench_adapt(b, dev) if what == "adapt" else bench_sae(b, dev)


if __name__ == "__main__":
    common.cli(main)
