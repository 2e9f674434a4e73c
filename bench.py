"""
Benchmark one LoRA-adaptation training step: this codebase against the paper's stack (HF transformers + peft, SAE
spliced with a forward hook, full-vocabulary softmax KL), side by side, same model weights, same SAE, same batch.

    python bench.py adapt                               # a ~40M-parameter Gemma-2-shaped model, 16k vocabulary
    python bench.py adapt --model DIR --sae DIR --layer L --rank R --batch_size B --seq_len T --steps N
    python bench.py adapt --vocab-sweep 16384,65536,262144   # peak memory against the vocabulary size
    python bench.py sae                                 # SAE training: our loop against the paper's per-sequence loop

Each configuration runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU: the process's
peak RSS) belongs to it alone. Reports tokens/s, MFU against the device's peak and peak memory. Needs the test
requirements (transformers, peft) for the reference: this is a dev tool, never imported by the library.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import common


@dataclass
class BenchConfig:
    """Benchmark an adaptation step: ours vs transformers + peft."""
    model: str | None = None  # an HF folder; None: a random model of the shape below
    sae: str | None = None  # an SAE folder; None: a random TopK SAE
    layer: int = 3  # SAE layer (for a random SAE)
    family: str = "gemma2"  # gemma2 | llama3
    d_model: int = 512
    n_layer: int = 8
    vocab: int = 16384
    vocab_sweep: str | None = None  # e.g. "16384,65536,262144": peak memory per vocabulary size
    seq_len: int = 256
    batch_size: int = 4
    rank: int = 64
    expansion: int = 8
    k: int = 32
    kl_chunk: int = 256  # tokens per lm_head + log-softmax chunk in ours (adapt.py --kl-chunk)
    compile_sae: bool = True  # bench.py sae: compile our forward to the layer, as train_sae.py does by default
    steps: int = 5
    warmup: int = 2
    device: str = "auto"
    only: str | None = None  # internal: run one configuration and print its JSON


def model_config(b: BenchConfig):
    from model import ModelConfig
    name = "tiny-gemma2" if b.family == "gemma2" else "tiny-llama3"
    c = ModelConfig.from_name(name)
    c.d_model, c.n_layer, c.vocab_size = b.d_model, b.n_layer, b.vocab
    c.n_head, c.n_kv_head, c.head_dim, c.d_ff = max(1, b.d_model // 64), max(1, b.d_model // 128), 64, 4 * b.d_model
    c.query_pre_attn_scalar = 64 if b.family == "gemma2" else None
    c.sliding_window = 4096 if b.family == "gemma2" else None
    c.layer_types = (["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(b.n_layer)]
                     if b.family == "gemma2" else None)
    c.max_seq_len, c.bos_token_id = max(b.seq_len, 8192), 1
    c.__post_init__()
    return c


def build_files(b: BenchConfig, folder: str):
    """Random model in HF layout + a random TopK SAE in SAELens layout, shared by both stacks."""
    from model import Transformer
    from sae import SAE
    torch.manual_seed(0)
    Transformer(model_config(b)).init_weights(0).save_pretrained(os.path.join(folder, "model"))
    sae = SAE(b.d_model, b.expansion * b.d_model, "topk", k=b.k, layer=b.layer)
    sae.save(os.path.join(folder, "sae"))


def run_ours(b: BenchConfig, folder: str, compile_: bool, dev: torch.device) -> float:
    import adapt
    from lora import adapter_parameters, apply_lora
    from model import Transformer
    # frozen base weights stored in bf16 (adapt.py --dtype bfloat16): no per-step fp32 -> bf16 weight casts
    model = Transformer.from_pretrained(paths(b, folder)[0], device=dev, dtype=torch.bfloat16)
    model.requires_grad_(False)
    saes = adapt.load_saes([paths(b, folder)[1]], b.layer if b.sae else None, model, dev)
    apply_lora(model, b.rank, 32.0, 0.0, "all")
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    passes = (torch.compile(adapt.base_pass), torch.compile(adapt.spliced_pass)) if compile_ else None
    amp = common.autocast(dev, "bfloat16")
    idx = batch(b, model.cfg.vocab_size, dev)

    def step():
        with amp:
            hb, hs = adapt.final_streams(model, saes, idx, model.cfg.bos_token_id, False, False, passes)
            kl, _ = adapt.kl_and_ce(model, hb, hs, idx, b.kl_chunk)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, b, dev)


def run_reference(b: BenchConfig, folder: str, bf16: bool, dev: torch.device) -> float:
    """The paper's loop (matchten/LoRA-Models-for-SAEs utils.train_model): peft model, SAE in a forward hook on the
    decoder layer, base pass under disable_adapter, full softmax over the vocabulary, kl_div."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sae import SAE
    model_dir, sae_dir = paths(b, folder)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)  # its default attention
    sae = SAE.from_pretrained(sae_dir, device=dev).requires_grad_(False)
    if b.sae:
        sae.layer = b.layer
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
    amp = common.autocast(dev, "bfloat16" if bf16 else "float32")

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
    return b.model or os.path.join(folder, "model"), b.sae or os.path.join(folder, "sae")


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


def peak_memory_gb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


CONFIGS = {
    "ours (bf16 autocast, compiled)": ("ours", True),
    "ours (bf16 autocast, eager)": ("ours", False),
    "transformers + peft (bf16 autocast)": ("ref", True),
    "transformers + peft (fp32, as the paper's code)": ("ref", False),
}


def run_config(b: BenchConfig, name: str) -> dict | None:
    """One configuration in a fresh subprocess, so its peak memory is its own."""
    args = [sys.executable, __file__, "adapt"] + [f"--{k}={v}" for k, v in asdict(b).items()
                                                   if k not in ("only", "vocab_sweep") and v is not None]
    proc = subprocess.run(args + [f"--only={name}"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name:50s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_adapt(b: BenchConfig, dev):
    folder = os.path.join(tempfile.gettempdir(), f"lorasae-bench-{b.family}-{b.d_model}-{b.n_layer}-{b.vocab}")
    if b.only is not None:  # child process: one configuration
        kind, flag = CONFIGS[b.only]
        sec = run_ours(b, folder, flag, dev) if kind == "ours" else run_reference(b, folder, flag, dev)
        print(json.dumps(dict(seconds=sec, peak_gb=peak_memory_gb(dev))))
        return None
    if b.vocab_sweep:  # peak memory against the vocabulary size: ours (chunked KL) vs the full-softmax reference
        print(f"{'vocab':>8s} {'ours peak GB':>13s} {'reference peak GB':>18s} {'ours tok/s':>11s} {'ref tok/s':>10s}")
        for v in (int(x) for x in b.vocab_sweep.split(",")):
            sub = BenchConfig(**{**asdict(b), "vocab": v, "vocab_sweep": None, "steps": 1, "warmup": 1})
            build_files(sub, os.path.join(tempfile.gettempdir(), f"lorasae-bench-{b.family}-{b.d_model}-"
                                                               f"{b.n_layer}-{v}"))
            ours = run_config(sub, "ours (bf16 autocast, eager)")
            ref = run_config(sub, "transformers + peft (bf16 autocast)")
            tok = sub.batch_size * sub.seq_len
            print(f"{v:8d} {ours['peak_gb'] if ours else float('nan'):13.2f} "
                  f"{ref['peak_gb'] if ref else float('nan'):18.2f} "
                  f"{tok / ours['seconds'] if ours else 0:11,.0f} {tok / ref['seconds'] if ref else 0:10,.0f}")
        return None
    if not b.model:
        build_files(b, folder)
    from model import ModelConfig
    with open(os.path.join(paths(b, folder)[0], "config.json")) as f:
        mc = ModelConfig.from_hf(json.load(f))
    m = b.expansion * mc.d_model
    tokens = b.batch_size * b.seq_len
    # forward of the base pass + forward and backward of the spliced pass (~3 forwards); SAE encoder fwd + bwd
    flops = tokens * (3 * mc.flops_per_token(b.seq_len) + 4 * mc.d_model * m)
    peak = common.peak_flops(dev, "bfloat16")
    print(f"device {dev} | {mc.model_type} d_model {mc.d_model} layers {mc.n_layer} vocab {mc.vocab_size} "
          f"({mc.n_params() / 1e6:.0f}M parameters) | batch {b.batch_size} x {b.seq_len} | LoRA rank {b.rank} on all "
          f"layers | {b.steps} timed steps after {b.warmup} warm-up")
    print(f"{'configuration':50s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem GB':>12s}")
    rows = {}
    for name in CONFIGS:
        r = run_config(b, name)
        if r is None:
            continue
        rows[name] = r
        tps = tokens / r["seconds"]
        print(f"{name:50s} {tps:10,.0f} {tps * flops / tokens / peak:7.1%} {r['peak_gb']:12.2f}")
    ours = rows.get("ours (bf16 autocast, compiled)") or rows.get("ours (bf16 autocast, eager)")
    ref = rows.get("transformers + peft (bf16 autocast)")
    if ours and ref:
        print(json.dumps(dict(ours_tokens_per_s=tokens / ours["seconds"], reference_tokens_per_s=tokens / ref["seconds"],
                              ratio=ref["seconds"] / ours["seconds"], ours_peak_mb=ours["peak_gb"] * 1024,
                              reference_peak_mb=ref["peak_gb"] * 1024)))
    return rows


def bench_sae(b: BenchConfig, dev):
    """SAE-training throughput: train_sae.py's loop (forward stops at the layer, bf16, one SAE step per 4096 tokens)
    against the paper's (full-model fp32 forward per 1024-token sequence, one SAE step per sequence)."""
    import train_sae
    from model import Transformer
    from sae import SAE
    folder = os.path.join(tempfile.gettempdir(), f"lorasae-bench-{b.family}-{b.d_model}-{b.n_layer}-{b.vocab}")
    if not b.model:
        build_files(b, folder)
    L, cfg = b.layer, train_sae.TrainSAEConfig()
    results = {}
    for name, seqs, amp_dtype, stop, seq_len in (("ours: stop_at layer, bf16, 4096-token SAE batches", 4, "bfloat16",
                                                  True, 1024),
                                                 ("paper: full fp32 forward, one 1024-token sequence per step", 1,
                                                  "float32", False, 1024)):
        # ours holds the frozen model in bf16 (train_sae.py --dtype bfloat16); the paper's ran it in fp32
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
                loss, _, _ = train_sae.sae_losses(sae, x.reshape(-1, d).float(), dead, 1.0, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad()
        sec = timed(step, b, dev)
        results[name] = seqs * seq_len / sec
        print(f"{name:60s} {results[name]:10,.0f} tokens/s")
    ours, paper = results.values()
    print(json.dumps(dict(ours_tokens_per_s=ours, paper_tokens_per_s=paper, ratio=ours / paper)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    what = argv.pop(0) if argv and argv[0] in ("adapt", "sae") else "adapt"
    b = common.parse_args(BenchConfig, argv)
    dev = common.setup(b.device).device
    return bench_adapt(b, dev) if what == "adapt" else bench_sae(b, dev)


if __name__ == "__main__":
    main()
