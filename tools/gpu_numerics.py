"""
Part 1 of gpu_check.py: the numerics on a device, each against a reference that is not the code under test:
transformers' models, Eq. 7 written plainly (splice.kl_reference), the unfused attention, the dense SAE. The same
comparisons as the tests (tests/test_model.py, test_splice.py, test_sae.py), run on the device given, at the shapes
that matter there. Each check returns [(what, relative error, tolerance), ...] and a dict of details; part_numerics at
the end runs them all.
"""
from __future__ import annotations

import os

import torch
import torch._dynamo

from plumbing import common
import splice
from lora import adapters_disabled, apply_lora
from config.models import PRESETS
from model import Attention, ModelConfig, Transformer, flex_fits, rope_cos_sin
from formats.sae_files import load_saes
from sae import SAE
from fixtures.hf_refs import TINY_GEMMA2, TINY_LLAMA3, make_hf_checkpoint
from fixtures.tiny import BOS, make_model, make_sae


def rel(a, b) -> float:
    """|a - b| / |b| over all elements, in float64: the error of a against the reference b."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_files(folder: str, family: str) -> tuple[str, str]:
    """A random tiny model (fixtures/tiny.py) and a random TopK SAE at its layer 1, made once under folder."""
    folder = os.path.join(folder, f"tiny-{family}")
    if not os.path.isdir(folder):
        make_model(os.path.join(folder, "model"), family=family)
        make_sae(os.path.join(folder, "sae"), "topk", layer=1, k=4)
    return os.path.join(folder, "model"), os.path.join(folder, "sae")


# Sequences are longer than the tiny Gemma-2's window (8), so the compiled attention is flex_attention on a GPU. Quick
# mode: 64 tokens, as tracing the CPU's no-grad flex path (whole 128-token blocks only) costs seconds there.
T_QUICK = 64


def tokens(dev, B: int, T: int, vocab: int = 512):
    idx = torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = BOS
    return idx.to(dev)


def vs_transformers(dev, folder: str, family: str, precision: str):
    """Logits and hidden states against transformers' eager model on a tiny random checkpoint whose window (8) is
    shorter than the sequence and whose soft-caps saturate (tests/test_model.py, on this device)."""
    from transformers import AutoModelForCausalLM  # test-only: imported here, where it is used
    folder = os.path.join(folder, f"hf-{family}")
    if not os.path.isdir(folder):
        make_hf_checkpoint(folder, TINY_GEMMA2 if family == "gemma2" else TINY_LLAMA3)
    hf = lambda dtype: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        folder, attn_implementation="eager", dtype=dtype).to(dev).eval()
    idx = tokens(dev, 2, 64)
    with torch.no_grad():
        ref = hf(torch.float32)(idx, output_hidden_states=True)
        if precision == "float32":
            ours = Transformer.from_pretrained(folder, device=dev)
            hidden = max(rel(ours(idx, stop_at=i), ref.hidden_states[i + 1]) for i in range(ours.cfg.n_layer - 1))
            return [("logits", rel(ours(idx), ref.logits), 1e-4), ("hidden states", hidden, 1e-4)]
        # bf16: ours as adapt.py runs it (bf16 weights, bf16 autocast) and transformers in bf16, both against fp32
        ours = Transformer.from_pretrained(folder, dtype=torch.bfloat16, device=dev)
        with common.autocast(dev, "bfloat16"):
            low = ours(idx)
        theirs = rel(hf(torch.bfloat16)(idx).logits, ref.logits)
    return [("logits vs fp32 (tolerance: twice transformers' own bf16 error)", rel(low, ref.logits),
             max(2 * theirs, 1e-3))], dict(transformers_bf16_error=theirs)


def compiled_vs_reference(dev, folder: str, family: str, share_prefix: bool, quick: bool, backend: str = "inductor"):
    """adapt.py's objective, compiled (splice.compile_step; two chunks under activation checkpointing), against
    Eq. 7 written plainly (splice.kl_reference), in value and in the adapters' gradient (tests/test_splice.py)."""
    model_dir, sae_dir = tiny_files(folder, family)
    model = Transformer.from_pretrained(model_dir, device=dev)
    params = apply_lora(model, 4, 8.0, layers="after:1" if share_prefix else None)
    torch.manual_seed(0)
    for w in params:
        w.data.normal_(0, 0.05)
    saes = load_saes([sae_dir], None, model, dev)
    idx = tokens(dev, 2, T_QUICK if quick else 128)
    ref = splice.kl_reference(model, saes, idx, BOS)
    g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(ref, params)])
    loss_fn = splice.compile_step(model, backend=backend)  # each block its own graph, the KL chunk another
    with torch.no_grad(), adapters_disabled(model):  # as adapt.py's loop: p_orig without adapters or SAE
        h_orig, prefix = splice.original_pass(model, idx, saes[0][0], share_prefix=share_prefix)
    h = splice.spliced_pass(model, saes, idx, BOS, prefix=prefix)
    kl = splice.kl_and_ce(model, h_orig, h, idx, chunk=128, loss_fn=loss_fn)[0].mean()  # Eq. 7, mean per position
    g = torch.cat([g.flatten() for g in torch.autograd.grad(kl, params)])
    return [("KL", rel(kl, ref), 1e-4), ("adapter gradients", rel(g, g_ref), 1e-3)], dict(kl=ref.item(),
                                                                                          backend=backend)


def flex_vs_math(dev, dtype: str, quick: bool):
    """Gemma-2-2B's attention (8 heads over 4 key/value heads, head_dim 256, soft-cap 50) on a sliding layer: the fused
    flex_attention kernel that compiled training runs against the plain masked softmax. The CPU has no flex backward:
    forward only there. bf16: as close to fp32 as the math path in bf16."""
    T, window = (128, 32) if quick else (1024, 256)  # CPU flex: whole 128-token blocks only (model.py)
    cfg = ModelConfig(**{**PRESETS["gemma-2-2b"], "n_layer": 2, "sliding_window": window,
                         "layer_types": ["sliding_attention", "full_attention"]})
    attn = Attention(cfg, 0).to(dev)
    grad = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.n_head, T, cfg.head_dim, generator=g) * 4  # scores of sd 4, the largest ~20: where
    # the cap (50 tanh(s / 50)) bends them by several percent
    k, v = (torch.randn(1, cfg.n_kv_head, T, cfg.head_dim, generator=g) for _ in range(2))
    go = torch.randn(1, cfg.n_head, T, cfg.head_dim, generator=g).to(dev)
    flex = torch.compile(attn._flex_attention, fullgraph=True)

    def run(fn, dt):
        x = [t.to(dev, getattr(torch, dt)).requires_grad_(grad) for t in (q, k, v)]
        y = fn(*x, T)
        return [y] + (list(torch.autograd.grad(y, x, go.to(y.dtype))) if grad else [])
    ref = run(attn._capped_attention, "float32")
    got = run(flex, dtype)
    names = ["output", "grad q", "grad k", "grad v"][:len(ref)]
    if dtype == "float32":
        out = [(n, rel(a, b), 1e-4 if n == "output" else 1e-3) for n, a, b in zip(names, got, ref)]
        return out, dict(tokens=T, window=window, backward=grad, flex_fits=flex_fits(dev, 256, True) if grad else None)
    math_low = run(attn._capped_attention, dtype)
    errs = {n: rel(b, r) for n, b, r in zip(names, math_low, ref)}
    return [(f"{n} vs fp32 (tolerance: twice the bf16 math path's error)", rel(a, r), max(2 * errs[n], 1e-3))
            for n, a, r in zip(names, got, ref)], dict(math_bf16_errors=errs, backward=grad)


def graph_breaks(dev, folder: str, quick: bool, families=("gemma2", "llama3")):
    """torch._dynamo.explain on every function adapt.py compiles, on this device and in its grad mode (the model's
    blocks run inside both passes), and on Gemma-2-2B's attention layer."""
    out, reasons = [], {}
    for family in families:
        model_dir, sae_dir = tiny_files(folder, family)
        model = Transformer.from_pretrained(model_dir, device=dev)
        apply_lora(model, 4, 8.0)
        saes = load_saes([sae_dir], None, model, dev)
        idx = tokens(dev, 2, T_QUICK if quick else 128)
        h = model.blocks(model.embed(idx))
        with torch.no_grad(), adapters_disabled(model):
            base = torch._dynamo.explain(splice.original_pass)(model, idx, 1, share_prefix=True)
        for name, e in ((f"{family} original_pass (no grad)", base),
                        (f"{family} spliced_pass", torch._dynamo.explain(splice.spliced_pass)(model, saes, idx, BOS)),
                        (f"{family} chunk_losses", torch._dynamo.explain(splice.chunk_losses)(
                            model, h.detach()[0], h[0], idx[0]))):
            out.append((name, e.graph_break_count, 0))
            if e.graph_break_count:
                reasons[name] = [str(r.reason)[:200] for r in e.break_reasons[:3]]
    # Gemma-2-2B's attention layer (head_dim 256) in training: on a GPU the compiled path asks the device whether
    # flex_attention's backward fits (model.flex_fits) while tracing
    cfg = ModelConfig(**{**PRESETS["gemma-2-2b"], "n_layer": 1, "sliding_window": 64,
                         "layer_types": ["sliding_attention"]})
    attn, T = Attention(cfg, 0).to(dev), 128
    cos, sin = rope_cos_sin(cfg, T, dev, torch.float32)
    e = torch._dynamo.explain(attn)(torch.randn(1, T, cfg.d_model, device=dev, requires_grad=True), cos, sin)
    out.append(("gemma-2-2b attention layer (head_dim 256)", e.graph_break_count, 0))
    if e.graph_break_count:
        reasons["gemma-2-2b attention layer"] = [str(r.reason)[:200] for r in e.break_reasons[:3]]
    return out, dict(break_reasons=reasons)


def fused_vs_dense(dev, dtype: str, quick: bool):
    """The fused TopK SAE (sparse encoder output, embedding_bag decoder, sparse backward) against decode(encode(x)),
    forward and backward to the input, at Gemma Scope's 16k width on Gemma-2-2B's stream (tests/test_sae.py)."""
    n, d, m, k = (256, 64, 512, 8) if quick else (2048, 2304, 16384, 64)
    torch.manual_seed(0)
    sae = SAE(d, m, "topk", k=k, device=dev).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(n, d, device=dev)
    go = torch.randn(n, d, device=dev)

    def run(fn):
        xi = x.clone().requires_grad_(True)
        with common.autocast(dev, dtype):
            y = fn(xi)
        return y, torch.autograd.grad(y, xi, go.to(y.dtype))[0]
    (y_f, g_f), (y_d, g_d) = run(sae), run(lambda t: sae.decode(sae.encode(t)))
    tol = 1e-5 if dtype == "float32" else 1e-2
    return [("output", rel(y_f, y_d), tol), ("input gradient", rel(g_f, g_d), tol)], dict(tokens=n, d_sae=m, k=k)


# ----------------------------------------------------------------------------------------------------------------------
# The part


def part_numerics(p):
    """Part 1 of gpu_check.py (p: its Part): every check below on p.dev, each recorded on its own."""
    try:
        import transformers  # noqa: F401  (test-only; the library never imports it)
    except ModuleNotFoundError:
        transformers = None
    # on a CPU inductor's C++ builds take minutes: quick mode traces the same graphs with dynamo and runs them as
    # traced (the eager backend); flex_attention is compiled by inductor in every mode
    backend = "eager" if p.quick and p.dev.type == "cpu" else "inductor"
    p.put(ran="tiny Gemma-2 / Llama-3 checkpoints (fixtures/hf_refs.py), tiny adapted models (fixtures/tiny.py), "
              f"Gemma-2-2B attention shapes, a TopK SAE; torch.compile backend {backend}"
              + ("; transformers not installed: no comparison with it" if transformers is None else ""),
          transformers_present=transformers is not None)
    # the cheap checks first: a part stopped at its deadline keeps theirs
    if transformers is not None:
        for family in ("gemma2", "llama3"):
            for precision in ("float32", "bfloat16"):
                p.check(f"model vs transformers: {family} {precision}",
                        lambda: vs_transformers(p.dev, p.tmp, family, precision))
    for dtype in ("float32", "bfloat16"):
        p.check(f"fused TopK SAE vs dense: {dtype}", lambda: fused_vs_dense(p.dev, dtype, p.quick))
    p.check("graph breaks", lambda: graph_breaks(p.dev, p.tmp, p.quick, ("gemma2", "llama3")[:1 if p.quick else 2]))
    for family, share in (("llama3", False), ("gemma2", True))[p.quick:]:
        p.check(f"compiled passes + KL chunk vs kl_reference: {family}" + (", shared prefix" if share else ""),
                lambda: compiled_vs_reference(p.dev, p.tmp, family, share, p.quick, backend))
    for dtype in ("float32", "bfloat16")[:1 if p.quick else 2]:
        p.check(f"flex_attention vs math path, head_dim 256: {dtype}", lambda: flex_vs_math(p.dev, dtype, p.quick))
    checks = p.rec["checks"]
    p.put(summary=f"{sum(c['ok'] for c in checks.values())} of {len(checks)} checks pass")
    fail_if_any(p)


def fail_if_any(p):
    bad = [f"{name}: {c.get('error') or c['errors']}" for name, c in p.rec.get("checks", {}).items() if not c["ok"]]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(p.rec['checks'])} checks failed: " + "; ".join(bad))
