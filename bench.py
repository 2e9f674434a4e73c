"""
Benchmark one LoRA-adaptation training step: this codebase against the paper's stack (HF transformers + peft, SAE
spliced with a forward hook, full-vocabulary softmax KL), side by side, same model weights, same SAE, same batch.

    python bench.py adapt                               # a ~40M-parameter Gemma-2-shaped model, 16k vocabulary
    python bench.py adapt --model DIR --sae DIR --layer L --rank R --batch_size B --seq_len T --steps N
    for v in 16384 65536 262144; do python bench.py adapt --vocab $v; done   # peak memory against the vocabulary
    python bench.py sae                                 # SAE training: our loop against the paper's per-sequence loop
    python bench.py adapt --shape gemma-2-2b --layer 12 --seq-len 1024 --batch-size 1 --kl-chunk 1024   # GPU: the paper's
    python bench.py adapt --profile                     # where ours spends one step: phase x op family
    python bench.py sae-module                          # the fused TopK SAE module against the dense one, and what
                                                        # its fp32 encoder costs against a bf16 one

Each configuration runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU: the process's
peak RSS) belongs to it alone. Reports tokens/s, MFU against the device's peak and peak memory. Needs the test
requirements (transformers, peft) for the reference: this is a dev tool, never imported by the library.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

import common


@dataclass
class BenchConfig:
    """Benchmark an adaptation step: ours vs transformers + peft."""
    model: str | None = None  # HF model folder or hub id; none: a random model of the shape below
    sae: str | None = None  # SAE folder or hub path; none: a random TopK SAE
    layer: list[int] = field(default_factory=list)  # the SAE layer; none: what the SAE files say (3 for a random SAE)
    shape: str | None = None  # random model of a real model's shape (model.py's presets: gemma-2-2b, llama-3.2-1b,
    # ...; its own vocabulary); none: the small shape below
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
    kl_chunk: int = 256  # tokens per lm_head + log-softmax chunk in ours (adapt.py --kl-chunk)
    compile: bool = True  # bench.py adapt: also time ours compiled (adapt.py's default); false skips that row
    compile_loss: bool = True  # bench.py adapt, compiled row: also compile the KL chunk (adapt.py does)
    profile: bool = False  # bench.py adapt: instead of the comparison, profile ours (compiled unless --compile
    # false) and print where a step's time goes, by phase and op family
    compile_sae: bool = True  # bench.py sae: compile our forward to the layer, as train_sae.py does by default
    autocast: str = "auto"  # precision of ours and of the matched reference row: auto (bf16 where the hardware runs
    # it natively, else fp32) | bfloat16 | float32; the last reference row is always fp32, as the paper's code ran
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps before them (compilation happens here)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    only: str | None = None  # internal: run one configuration in this process and print its JSON


def model_config(b: BenchConfig):
    from model import ModelConfig
    if b.shape:
        return ModelConfig.from_name(b.shape)
    c = ModelConfig.from_name("tiny-gemma2" if b.family == "gemma2" else "tiny-llama3")
    c.d_model, c.n_layer, c.vocab_size = b.d_model, b.n_layer, b.vocab
    c.n_head, c.n_kv_head, c.head_dim, c.d_ff = max(1, b.d_model // 64), max(1, b.d_model // 128), 64, 4 * b.d_model
    gemma = b.family == "gemma2"
    c.query_pre_attn_scalar, c.sliding_window = (64, 4096) if gemma else (None, None)
    c.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(b.n_layer)] if gemma else None
    c.max_seq_len, c.bos_token_id = max(b.seq_len, 8192), 1
    c.__post_init__()
    return c


def bench_folder(b: BenchConfig) -> str:
    name = b.shape or f"{b.family}-{b.d_model}-{b.n_layer}-{b.vocab}"
    return os.path.join(tempfile.gettempdir(), f"lorasae-bench-{name}")


def build_files(b: BenchConfig, folder: str):
    """Random model in HF layout + a random TopK SAE in SAELens layout, shared by both stacks."""
    from model import Transformer
    from sae import SAE
    torch.manual_seed(0)
    mc = model_config(b)
    Transformer(mc).init_weights(0).save_pretrained(os.path.join(folder, "model"))
    sae = SAE(mc.d_model, b.sae_width or b.expansion * mc.d_model, "topk", k=b.k, layer=(b.layer or [3])[0])
    sae.save(os.path.join(folder, "sae"))


def run_ours(b: BenchConfig, folder: str, compile_: bool, dev: torch.device) -> float:
    import splice
    from lora import adapter_parameters, apply_lora
    from model import Transformer
    # under bf16 autocast the frozen base weights are stored in bf16 (adapt.py --dtype bfloat16): no per-step casts
    model = Transformer.from_pretrained(paths(b, folder)[0], device=dev, dtype=getattr(torch, b.autocast))
    model.requires_grad_(False)
    saes = splice.load_saes([paths(b, folder)[1]], b.layer or None, model, dev)
    apply_lora(model, b.rank, 32.0, 0.0, "all")
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    passes = (splice.original_pass, splice.spliced_pass)
    original, spliced = (torch.compile(p) for p in passes) if compile_ else passes
    amp = common.autocast(dev, b.autocast)
    idx = batch(b, model.cfg.vocab_size, dev)
    losses = torch.compile(splice.chunk_losses) if compile_ and b.compile_loss else None
    label = torch.profiler.record_function  # the phases of PHASES, for --profile (no cost otherwise)

    def step():
        with amp:
            with label("original forward"), torch.no_grad(), splice.adapters_disabled(model):
                h_orig, _ = original(model, idx, saes[0][0], share_prefix=False)
            with label("spliced forward"):
                h = spliced(model, saes, idx, model.cfg.bos_token_id)
            with label("KL + CE forward"):
                kl, _, _ = splice.kl_and_ce(model, h_orig, h, idx, chunk=b.kl_chunk, losses=losses)
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

    from checkpoint import read_config
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
    amp = common.autocast(dev, b.autocast if matched else "float32")

    def step():
        with amp:
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
    from checkpoint import resolve_model_dir  # a hub id or GGUF file as the folder both stacks load
    model = resolve_model_dir(b.model) if b.model else os.path.join(folder, "model")
    return model, b.sae or os.path.join(folder, "sae")


def batch(b: BenchConfig, vocab: int, dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, vocab, (b.batch_size, b.seq_len), generator=g)
    idx[:, 0] = 2  # a BOS-like first token (not spliced by ours; the reference splices every position)
    return idx.to(dev)


def timed(step, b: BenchConfig, dev) -> float:
    for _ in range(b.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(b.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / b.steps


PHASES = ("original forward", "spliced forward", "KL + CE forward", "backward", "optimizer")
FAMILIES = (  # op-name patterns -> family, first match wins
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn", "mkl_linear", "embedding_bag", "baddbmm")),
    ("attention", ("flex_attention", "scaled_dot_product", "flash", "efficient_attention", "sdpa")),
    ("vocabulary softmax / KL", ("softmax", "log_softmax", "logsumexp", "kl_div", "nll_loss", "tanh", "exp", "log")),
    ("top-k / gather", ("topk", "gather", "scatter", "index")),
    ("compiled fused kernels", ("compiled", "cpp_fused", "triton", "graph_", "inductor")),
    ("copies / casts", ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "fill_", "zero_")),
)
OTHER = "other elementwise / bookkeeping"


def family(name: str) -> str:
    n = name.lower().removeprefix("aten::")
    for fam, keys in FAMILIES:
        if any(n == k or n.startswith(k + "_") or (len(k) > 5 and k in n) for k in keys):
            return fam
    return OTHER


def profiled(step, b: BenchConfig, dev) -> float:
    """Run the steps under torch.profiler; print the self time of every op by (phase, op family); return s/step."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(b.warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(b.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / b.steps
    table, total, other = {}, 0.0, {}
    for e in prof.events():
        if e.name in PHASES or e.name.startswith("ProfilerStep"):
            continue
        t = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        if t <= 0:
            continue
        phase, p = "(outside the phases)", e.cpu_parent
        while p is not None:
            if p.name in PHASES:
                phase = p.name
                break
            p = p.cpu_parent
        key = (phase, family(e.name))
        table[key] = table.get(key, 0.0) + t / 1e6 / b.steps
        total += t / 1e6 / b.steps
        if key[1] == OTHER:
            other[e.name] = other.get(e.name, 0.0) + t / 1e6 / b.steps
    fams = [f for f, _ in FAMILIES] + [OTHER]
    phases = [p for p in PHASES + ("(outside the phases)",) if any(k[0] == p for k in table)]
    print(f"\nwhere one step's {'GPU' if dev.type == 'cuda' else 'CPU'} time goes (ms per step, self time of each op; "
          f"{wall * 1e3:.0f} ms wall per step under the profiler)")
    print("| phase | " + " | ".join(fams) + " | total |")
    print("|---" * (len(fams) + 2) + "|")
    for ph in phases + ["all"]:
        cells = [sum(v for (p, f), v in table.items() if f == fam and (ph == "all" or p == ph)) for fam in fams]
        print(f"| {ph} | " + " | ".join(f"{c * 1e3:.0f}" for c in cells) + f" | {sum(cells) * 1e3:.0f} |")
    share = {fam: sum(v for (p, f), v in table.items() if f == fam) / max(total, 1e-12) for fam in fams}
    print("share of the time: " + ", ".join(f"{fam} {x:.0%}" for fam, x in share.items() if x >= 0.005))
    print("largest in 'other': " + ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in
                                             sorted(other.items(), key=lambda kv: -kv[1])[:8]))
    return wall


def peak_memory_gb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


CONFIGS = {
    "ours (compiled)": ("ours", True),
    "ours (eager)": ("ours", False),
    "transformers + peft (same precision)": ("ref", True),
    "transformers + peft (fp32, as the paper's code)": ("ref", False),
}


def run_config(b: BenchConfig, name: str, timeout: float | None = None) -> dict:
    """One configuration in a fresh subprocess, so its peak memory is its own: {seconds, peak_gb}, or {error}."""
    args = [sys.executable, os.path.abspath(__file__), "adapt"] + [
        f"--{k}={v}" for k, v in asdict(b).items() if k not in ("only", "layer") and v is not None]
    args += [f"--layer={layer}" for layer in b.layer]
    try:
        proc = subprocess.run(args + [f"--only={name}"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_flops(b: BenchConfig, folder: str):
    """(model config, FLOPs of one step): adapt.step_flops for the step run_ours times (adapters on every layer, one
    micro batch), without the KL chunks' recomputation: the work both stacks do."""
    import adapt
    from checkpoint import read_config
    from model import ModelConfig
    from sae import SAE
    mc = ModelConfig.from_hf(read_config(paths(b, folder)[0]))
    sae = SAE.from_pretrained(paths(b, folder)[1])
    saes = [(b.layer[0] if b.layer else sae.layer, sae)]
    return mc, b.batch_size * b.seq_len * adapt.step_flops(mc, saes, list(range(mc.n_layer)), b.rank, b.seq_len,
                                                           b.batch_size, None)


def bench_adapt(b: BenchConfig, dev):
    folder = bench_folder(b)
    if b.only is not None:  # child process: one configuration
        kind, flag = CONFIGS[b.only]
        sec = run_ours(b, folder, flag, dev) if kind == "ours" else run_reference(b, folder, flag, dev)
        print(json.dumps(dict(seconds=sec, peak_gb=peak_memory_gb(dev))))
        return None
    if not b.model:
        build_files(b, folder)
    if b.profile:  # in this process: the table is printed by profiled()
        return run_ours(b, folder, b.compile, dev)
    mc, flops = step_flops(b, folder)
    tokens = b.batch_size * b.seq_len
    peak = common.peak_flops(dev, b.autocast)
    print(f"device {dev} | {mc.model_type} d_model {mc.d_model} layers {mc.n_layer} vocab {mc.vocab_size} "
          f"({mc.n_params() / 1e6:.0f}M parameters) | batch {b.batch_size} x {b.seq_len} | LoRA rank {b.rank} on all "
          f"layers | {b.autocast} | {b.steps} timed steps after {b.warmup} warm-up")
    print(f"MFU against {peak / 1e12:.3g} TFLOP/s ({'measured 1024^3 matmul' if dev.type == 'cpu' else 'datasheet'}"
          f", {b.autocast}); LORASAE_PEAK_FLOPS overrides")
    print(f"{'configuration':50s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem GB':>12s}")
    rows = {}
    for name in CONFIGS:
        if name == "ours (compiled)" and not b.compile:
            continue
        r = run_config(b, name)
        if "error" in r:
            print(f"{name:50s} failed: {r['error']}")
            continue
        rows[name] = r
        tps = tokens / r["seconds"]
        print(f"{name:50s} {tps:10,.0f} {tps * flops / tokens / peak:7.1%} {r['peak_gb']:12.2f}")
    ours = rows.get("ours (compiled)") or rows.get("ours (eager)")
    ref = rows.get("transformers + peft (same precision)")
    if ours and ref:
        print(json.dumps(dict(ours_tokens_per_s=tokens / ours["seconds"], reference_tokens_per_s=tokens / ref["seconds"],
                              ratio=ref["seconds"] / ours["seconds"], ours_peak_mb=ours["peak_gb"] * 1024,
                              reference_peak_mb=ref["peak_gb"] * 1024)))
    return rows


def bench_sae(b: BenchConfig, dev):
    """SAE-training throughput: train_sae.py's loop (forward stops at the layer, --autocast, one SAE step per 4096
    tokens) against the paper's (full-model fp32 forward per 1024-token sequence, one SAE step per sequence)."""
    from model import Transformer
    from sae import SAE, training_loss
    folder = bench_folder(b)
    if not b.model:
        build_files(b, folder)
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
        amp = common.autocast(dev, amp_dtype)
        idx = torch.randint(3, model.cfg.vocab_size, (seqs, seq_len), device=dev)
        dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)

        # ours compiles the forward as train_sae.py does (Gemma-2's attention becomes one flex_attention kernel)
        ours_forward = torch.compile(lambda idx: model(idx, stop_at=L)) if stop and b.compile_sae else None

        def step():
            with torch.no_grad(), amp:
                if stop:
                    x = ours_forward(idx) if ours_forward else model(idx, stop_at=L)
                else:  # the whole model runs; the layer's output is captured by a hook
                    seen = {}
                    model(idx, hooks={L: lambda h: seen.setdefault("x", h)})
                    x = seen["x"]
            with amp:
                loss, _, _ = training_loss(sae, x.reshape(-1, d).float(), dead, 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        sec = timed(step, b, dev)
        results[name] = seqs * seq_len / sec
        print(f"{name:60s} {results[name]:10,.0f} tokens/s")
    ours, paper = results.values()
    print(json.dumps(dict(ours_tokens_per_s=ours, paper_tokens_per_s=paper, ratio=ours / paper)))


# ----------------------------------------------------------------------------------------------------------------------
# bench.py sae-module: a frozen TopK SAE in the residual stream, forward + backward to its input (what LoRA training
# through the SAE costs), fused sparse path against the dense one, each (width, path) in a fresh subprocess. peak MB:
# extra memory at the step's peak (CPU: VmHWM reset through /proc/self/clear_refs; CUDA: max_memory_allocated); saved
# MB: the distinct tensors autograd keeps for the backward, the SAE's parameters not counted.


@dataclass
class SAEModuleConfig:
    """Fused vs dense TopK SAE: frozen forward + backward to the input."""
    tokens: int = 2048  # tokens per step
    d_in: int = 2304  # residual width (Gemma-2-2B's)
    k: int = 64  # active latents per token
    widths: list[int] = field(default_factory=lambda: [16384, 65536])  # SAE widths to measure
    iters: int = 1  # timed steps per configuration
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast: str = "bfloat16"  # activation precision around the forward: auto | bfloat16 | float32
    paths: list[str] = field(default_factory=lambda: ["fused", "dense", "fused-bf16-encoder"])  # fused: sae(x), the
    # encoder in fp32 as always; dense: decode(encode(x)); fused-bf16-encoder: sae(x) with the encoder matmul left to
    # autocast (bf16 operands): what keeping the SAE maths in fp32 costs
    threads: int = 0  # torch.set_num_threads; 0 keeps the default
    child: str = ""  # internal: "width,path" runs one configuration and prints one JSON line


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def sae_module_one(cfg: SAEModuleConfig, width: int, path: str) -> dict:
    import contextlib

    import sae as sae_module
    from sae import SAE
    if path == "fused-bf16-encoder":  # for this measurement only: the encoder's matmul follows autocast
        sae_module.fp32_region = lambda x: contextlib.nullcontext()
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, width, "topk", k=cfg.k, device=device).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(cfg.tokens, cfg.d_in, device=device, requires_grad=True)
    grad_out = torch.randn(cfg.tokens, cfg.d_in, device=device)
    params = {p.untyped_storage().data_ptr() for p in sae.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step(measure_saved=False):
        with common.autocast(device, cfg.autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure_saved else \
                    contextlib.nullcontext():
                y = sae.decode(sae.encode(x)) if path == "dense" else sae(x)
        y.backward(grad_out)
        x.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()  # step 1: memory (it also warms up)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = rss_kb("VmRSS") * 1024
    step(measure_saved=True)
    sync()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kb("VmHWM") * 1024
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        step()
    sync()
    dt = (time.perf_counter() - t0) / cfg.iters
    return dict(width=width, path=path, step_s=dt, tokens_per_s=cfg.tokens / dt, peak_mb=(peak - before) / 2**20,
                saved_mb=sum(saved.values()) / 2**20)


def bench_sae_module(argv):
    cfg, _ = common.parse_args(SAEModuleConfig, argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.autocast = common.resolve_autocast(torch.device(cfg.device), cfg.autocast)
    if cfg.child:
        width, path = cfg.child.split(",")
        print(json.dumps(sae_module_one(cfg, int(width), path)))
        return
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"frozen TopK SAE, forward + backward to the input: tokens {cfg.tokens}, d_in {cfg.d_in}, k {cfg.k}, "
          f"{cfg.autocast} autocast, {dev}, torch {torch.__version__}")
    rows = []
    for width in cfg.widths:
        for path in cfg.paths:
            argv = [f"--{k}={v}" for k, v in asdict(cfg).items() if k not in ("widths", "paths", "child")]
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "sae-module", *argv,
                                  f"--child={width},{path}"], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"width {width} {path} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  ran width {width:>6} {path:<5}: {rows[-1]['step_s']:.2f} s/step", flush=True)
    print("\n| d_sae  | path  | tokens/s | s/step | peak MB | saved MB |")
    print("|--------|-------|---------:|-------:|--------:|---------:|")
    for r in rows:
        print(f"| {r['width']:<6} | {r['path']:<5} | {r['tokens_per_s']:>8.0f} | {r['step_s']:>6.3f} "
              f"| {r['peak_mb']:>7.0f} | {r['saved_mb']:>8.1f} |")
    print()
    for width in cfg.widths:
        r = {x["path"]: x for x in rows if x["width"] == width}
        f, d, b = r.get("fused"), r.get("dense"), r.get("fused-bf16-encoder")
        if f and d:
            print(f"d_sae {width}: fused is {f['tokens_per_s'] / d['tokens_per_s']:.1f}x faster, peak memory "
                  f"{d['peak_mb'] / max(f['peak_mb'], 1e-9):.1f}x smaller, saved tensors "
                  f"{d['saved_mb'] / max(f['saved_mb'], 1e-9):.1f}x smaller")
        if f and b:
            print(f"d_sae {width}: a step with the fp32 encoder takes {f['step_s'] / b['step_s']:.2f}x the time of one "
                  f"with a bf16 encoder under {cfg.autocast} autocast ({f['step_s']:.3f} vs {b['step_s']:.3f} s)")


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    what = argv.pop(0) if argv and argv[0] in ("adapt", "sae", "sae-module") else "adapt"
    if what == "sae-module":
        return bench_sae_module(argv)
    b, _ = common.parse_args(BenchConfig, argv)
    dev = common.setup(b.device).device
    b.autocast = common.resolve_autocast(dev, b.autocast)
    return bench_adapt(b, dev) if what == "adapt" else bench_sae(b, dev)


if __name__ == "__main__":
    common.cli(main)
