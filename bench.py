"""
Benchmark one LoRA-adaptation training step: this codebase against the paper's stack (HF transformers + peft, SAE
spliced with a forward hook, full-vocabulary softmax KL), side by side, same model weights, same SAE, same batch.

    python bench.py                                   # a small Gemma-2-shaped model on this machine
    python bench.py --family llama3 --d-model 2048 --n-layer 16 --vocab 128256 --seq-len 1024   # Llama-3.2-1B shape

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
    family: str = "gemma2"  # gemma2 | llama3
    d_model: int = 256
    n_layer: int = 6
    vocab: int = 16384
    seq_len: int = 256
    batch_size: int = 4
    rank: int = 64
    sae_layer: int = 2
    expansion: int = 8
    k: int = 32
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
    sae = SAE(b.d_model, b.expansion * b.d_model, "topk", k=b.k, layer=b.sae_layer)
    sae.save(os.path.join(folder, "sae"))


def run_ours(b: BenchConfig, folder: str, compile_: bool, dev: torch.device) -> float:
    import adapt
    from lora import adapter_parameters, apply_lora
    from model import Transformer
    # frozen base weights stored in bf16 (adapt.py --dtype bfloat16): no per-step fp32 -> bf16 weight casts
    model = Transformer.from_pretrained(os.path.join(folder, "model"), device=dev, dtype=torch.bfloat16)
    model.requires_grad_(False)
    saes = adapt.load_saes([os.path.join(folder, "sae")], None, model, dev)
    apply_lora(model, b.rank, 32.0, 0.0, "all")
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    passes = (torch.compile(adapt.base_pass), torch.compile(adapt.spliced_pass)) if compile_ else None
    amp = common.autocast(dev, "bfloat16")
    idx = torch.randint(2, b.vocab, (b.batch_size, b.seq_len), device=dev)
    idx[:, 0] = 1

    def step():
        with amp:
            hb, hs = adapt.final_streams(model, saes, idx, 1, False, False, passes)
            kl, _ = adapt.kl_and_ce(model, hb, hs, idx, 2048)
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
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"), attn_implementation="eager",
                                                 dtype=torch.float32).to(dev)
    sae = SAE.from_pretrained(os.path.join(folder, "sae"), device=dev).requires_grad_(False)
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
    model.model.layers[b.sae_layer].register_forward_hook(hook)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    idx = torch.randint(2, b.vocab, (b.batch_size, b.seq_len), device=dev)
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


def main(argv=None):
    b = common.parse_args(BenchConfig, argv)
    dev = common.setup(b.device).device
    folder = os.path.join(tempfile.gettempdir(), f"lorasae-bench-{b.family}-{b.d_model}-{b.n_layer}-{b.vocab}")
    if b.only is not None:  # child process: one configuration
        kind, flag = CONFIGS[b.only]
        sec = run_ours(b, folder, flag, dev) if kind == "ours" else run_reference(b, folder, flag, dev)
        print(json.dumps(dict(seconds=sec, peak_gb=peak_memory_gb(dev))))
        return
    build_files(b, folder)
    from model import ModelConfig  # noqa: F401  (shapes for the FLOP count)
    mc = model_config(b)
    tokens = b.batch_size * b.seq_len
    # forward of the base pass + forward and backward of the spliced pass (~3 forwards); SAE encoder fwd + bwd
    flops = tokens * (3 * mc.flops_per_token(b.seq_len) + 4 * b.d_model * b.expansion * b.d_model)
    peak = common.peak_flops(dev, "bfloat16")
    print(f"device {dev} | {b.family} d_model {b.d_model} layers {b.n_layer} vocab {b.vocab} | batch {b.batch_size} x "
          f"{b.seq_len} | LoRA rank {b.rank} on all layers | TopK SAE m {b.expansion * b.d_model} k {b.k} at layer "
          f"{b.sae_layer} | {b.steps} timed steps after {b.warmup} warm-up")
    print(f"{'configuration':50s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem GB':>12s}")
    rows = {}
    for name in CONFIGS:
        args = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={v}" for k, v in asdict(b).items()
                                              if k != "only"] + [f"--only={name}"]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:50s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[name] = r
        tps = tokens / r["seconds"]
        print(f"{name:50s} {tps:10,.0f} {tps * flops / tokens / peak:7.1%} {r['peak_gb']:12.2f}")
    return rows


if __name__ == "__main__":
    main()
