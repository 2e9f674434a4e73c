"""The training-FLOPs formulas (accounting/flops.py: the model, the SAE, LoRA, Eq. 7, a step of train_sae.py,
train_e2e.py and adapt.py) against
torch.utils.flop_counter.FlopCounterMode, which counts the matmuls that actually run (2 FLOPs per multiply-add, the
formulas' convention; elementwise work is left out by both).

Two things FlopCounterMode does not count as the formulas do, handled here explicitly:
- attention: torch's formulas for bmm and sdpa count the whole (T, T) score matrix, the causal mask notwithstanding;
  the formulas count the causal half (fused kernels skip the masked blocks), so the measured count is the formula's
  plus one more copy of its attention term (ATTN below);
- F.embedding_bag (the TopK SAE's sparse decoder and sparse backward) and the CPU sdpa kernel have no formula in
  torch: MAPPING gives them one, 2 FLOPs per (bag entry, feature) and torch's own sdpa formulas.
- sdpa's fused backward recomputes the scores, a matmul the formulas leave out (Kaplan et al.'s convention): counted
  where Llama's attention runs through it. Gemma-2's soft-capped attention runs as plain matmuls on CPU.
Agreement is exact: both sides are integer counts of the same matmuls."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import adapt
import train_e2e
import train_sae
from accounting.flops import (adapt_step_flops, block_flops, e2e_step_flops, forward_flops, head_flops, kl_flops,
                              lora_flops, sae_run_flops, sae_splice_flops, sae_training_flops)
from lora import apply_lora
from model import ModelConfig, Transformer
from sae import SAE
from splice import kl_and_ce
from training.sae_loss import training_loss
from fixtures.tiny import BOS, make_data, make_model, make_sae

aten = torch.ops.aten


def _bag(weight, indices, *args, out_shape=None, **kwargs):  # weight (rows, d), indices (bags, k)
    return 2 * math.prod(indices) * weight[1]


def _bag_grad(grad, indices, *args, out_shape=None, **kwargs):  # the weight's gradient: grad (bags, d)
    return 2 * math.prod(indices) * grad[1]


def _bag_weights_grad(grad, weight, indices, *args, out_shape=None, **kwargs):  # per_sample_weights' gradient
    return 2 * math.prod(indices) * weight[1]


def _sdpa(q, k, v, *args, out_shape=None, **kwargs):  # torch's own sdpa formula, for its CPU kernel
    return sdpa_flop_count(q, k, v)


def _sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad, q, k, v)


MAPPING = {aten._embedding_bag: _bag, aten._embedding_bag_forward_only: _bag, aten._embedding_bag_backward: _bag_grad,
           aten._embedding_bag_per_sample_weights_backward: _bag_weights_grad,
           aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


def measure(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        fn()
    return counter.get_total_flops()


def ATTN(cfg: ModelConfig, T: int, layers: int) -> float:
    """The formulas' forward attention term of `layers` blocks per token: the causal half FlopCounterMode doubles."""
    return layers * 2 * cfg.n_head * cfg.head_dim * T


def idx_batch(B, T, vocab=512, seed=0):
    idx = torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    idx[:, 0] = BOS
    return idx


@pytest.mark.parametrize("family", ["gemma2", "llama3"])  # Gemma-2: soft-capped math attention; Llama: sdpa
def test_model_forward_partial_forward_and_backward(family):
    cfg = ModelConfig.from_name(f"tiny-{family}")
    model = Transformer(cfg).init_weights(0).requires_grad_(False)
    B, T, n = 2, 24, cfg.n_layer
    idx = idx_batch(B, T)
    assert measure(lambda: model(idx)) == B * T * (forward_flops(cfg, T) + ATTN(cfg, T, n))
    assert measure(lambda: model(idx, stop_at=1)) == B * T * (forward_flops(cfg, T, stop_at=1) + ATTN(cfg, T, 2))
    x = model.embed(idx).requires_grad_()  # frozen weights: the backward reaches the activations only
    loss = model.head(model.blocks(x)).sum()
    bwd = n * block_flops(cfg, T, backward=True) + head_flops(cfg)
    # the backward's 4 attention matmuls, whole; sdpa's fused backward also recomputes the scores (a fifth one)
    assert measure(loss.backward) == B * T * (bwd + (3 if family == "llama3" else 2) * ATTN(cfg, T, n))
    assert block_flops(cfg, T, backward=True, input_grad=False) < block_flops(cfg, T, backward=True)


@pytest.mark.parametrize("arch,auxk", [("topk", False), ("topk", True), ("batchtopk", True), ("jumprelu", False)])
def test_sae_training_step(arch, auxk):
    d, m, k, N = 32, 128, 4, 64
    torch.manual_seed(0)
    sae = SAE(d, m, arch, k=None if arch == "jumprelu" else k)
    x = torch.randn(N, d)
    dead = torch.ones(m, dtype=torch.bool) if auxk else torch.zeros(m, dtype=torch.bool)

    def step():
        loss, stats, _ = training_loss(sae, x, dead, 1.0)
        loss.backward()
        assert ("auxk" in stats) == auxk
    assert measure(step) == N * sae_training_flops(d, m, arch, None if arch == "jumprelu" else k, auxk=auxk)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
@pytest.mark.parametrize("grad", ["none", "input", "weights"])
def test_spliced_sae_forward_and_backward(arch, grad):
    d, m, k, N = 32, 128, 4, 64
    torch.manual_seed(0)
    sae = SAE(d, m, arch, k=None if arch == "jumprelu" else k).requires_grad_(grad == "weights")
    x = torch.randn(N, d, requires_grad=grad == "input")
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        y = sae(x)
        if grad != "none":
            y.pow(2).sum().backward()
    want = sae_splice_flops(d, m, arch, None if arch == "jumprelu" else k, grad_input=grad == "input",
                            grad_weights=grad == "weights")
    assert counter.get_total_flops() == N * want


@pytest.mark.parametrize("chunk", [None, 16])  # one chunk, and activation-checkpointed chunks (recomputed heads)
def test_kl_heads(chunk):
    cfg = ModelConfig.from_name("tiny-llama3")
    model = Transformer(cfg).init_weights(0).requires_grad_(False)
    B, T = 2, 12
    h_orig, h = torch.randn(B, T, cfg.d_model), torch.randn(B, T, cfg.d_model, requires_grad=True)

    def step():
        kl, _, _ = kl_and_ce(model, h_orig, h, idx_batch(B, T), chunk=chunk or B * T)
        kl.sum().backward()
    assert measure(step) == B * T * kl_flops(cfg, B, T, chunk)
    assert kl_flops(cfg, B, T, 16) > kl_flops(cfg, B, T, None) == kl_flops(cfg, B, T, B * T)  # one chunk: no recompute


def test_lora_matmuls():
    """The adapters alone: the base linears' cost subtracted as model.py counts it (frozen, input gradients)."""
    cfg = ModelConfig.from_name("tiny-gemma2")
    model = Transformer(cfg).init_weights(0)
    layers, rank, B, T = [1, 3], 4, 2, 8
    apply_lora(model, rank, 8.0, 0.0, layers)
    idx = idx_batch(B, T)

    def step():  # the stream carries a gradient from block 1 on; blocks 1..3 run their backward
        model(idx).sum().backward()
    base = (forward_flops(cfg, T) + ATTN(cfg, T, cfg.n_layer) + 2 * block_flops(cfg, T, backward=True)
            + block_flops(cfg, T, backward=True, input_grad=False) + 3 * 2 * ATTN(cfg, T, 1) + head_flops(cfg))
    assert measure(step) == B * T * (base + lora_flops(cfg, rank, layers))


# ----------------------------------------------------------------------------------------------------------------------
# One training step of each script's real loop: a run of n + 1 steps less a run of n steps, everything else (setup,
# held-out evaluations) identical between the two


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops")
    return dict(model=make_model(root / "model", "gemma2"), data=make_data(root / "data", n_train=20_000, n_val=4_000),
                sae=make_sae(root / "sae", "topk", layer=1, k=4), jump=make_sae(root / "jump", "jumprelu", layer=1))


def steps_apart(main, argv, tokens: tuple[int, int], tmp_path) -> int:
    counts = [measure(lambda: main([*argv, "--max-tokens", str(t), "--out", str(tmp_path / str(t))])) for t in tokens]
    return counts[1] - counts[0]


@pytest.mark.parametrize("dead_tokens", [0, 10 ** 9])  # AuxK on every step (all latents start dead), and never
def test_train_sae_steps(files, tmp_path, dead_tokens):
    argv = ["--model", files["model"], "--data", files["data"], "--layer", "1", "--k", "4", "--expansion", "2",
            "--batch-tokens", "256", "--buffer-tokens", "512", "--seq-len", "32", "--model-batch", "4",
            "--eval-interval", "1000", "--eval-batches", "1", "--autocast", "float32", "--compile", "false",
            "--dead-tokens", str(dead_tokens)]
    measured = steps_apart(train_sae.main, argv, (256, 768), tmp_path)  # 1 step (1 fill), 3 steps (2 fills)
    mcfg = Transformer.from_pretrained(files["model"]).cfg
    on = dead_tokens == 0
    run = lambda steps, auxk_steps: sae_run_flops(mcfg, 1, 2 * mcfg.d_model, "topk", 4, steps, auxk_steps,
                                                  batch_tokens=256, buffer_tokens=512, model_batch=4, seq_len=32,
                                                  include_bos=False)
    want = run(3, 3 * on) - run(1, on)
    # 4 windows of 31 activations each per batch: 5 batches fill 512; their attention at T = 32, blocks 0..1
    assert measured == want + 5 * 4 * 32 * ATTN(mcfg, 32, 2)


def test_train_e2e_step(files, tmp_path):
    argv = ["--model", files["model"], "--data", files["data"], "--layer", "1", "--k", "4", "--expansion", "2",
            "--batch-size", "2", "--seq-len", "32", "--kl-chunk", "40", "--eval-interval", "1000", "--eval-batches",
            "1", "--autocast", "float32", "--compile", "false"]
    measured = steps_apart(train_e2e.main, argv, (64, 128), tmp_path)
    mcfg = Transformer.from_pretrained(files["model"]).cfg
    n, after = mcfg.n_layer, mcfg.n_layer - 2  # forward: every block twice from layer 1 on; backward: the blocks after
    step = e2e_step_flops(mcfg, 1, 2 * mcfg.d_model, 4, 2, 32, 40)  # layer 1, 2x latents, k 4, 2 x 32 tokens, chunk 40
    assert measured == 64 * (step + ATTN(mcfg, 32, n + after) + 2 * ATTN(mcfg, 32, after))


@pytest.mark.parametrize("sae,lora_layers,chunk", [("sae", "all", 40), ("sae", "after", 1000), ("jump", None, 40)])
def test_adapt_step(files, tmp_path, monkeypatch, sae, lora_layers, chunk):
    monkeypatch.setenv("LORASAE_PEAK_FLOPS", "1e12")  # else the first run alone times a matmul for its MFU
    argv = ["--model", files["model"], "--data", files["data"], "--sae", files[sae], "--seq-len", "32",
            "--batch-size", "2", "--eval-tokens", "64", "--eval-interval", "1000", "--rank", "4", "--kl-chunk",
            str(chunk), "--compile", "false", "--autocast", "float32", "--dropout", "0.1",
            *(["--lora-layers", lora_layers] if lora_layers else [])]
    measured = steps_apart(adapt.main, argv, (64, 128), tmp_path)
    model = Transformer.from_pretrained(files["model"])
    saes = [(1, SAE.from_pretrained(files[sae]))]
    layers = list(range(4)) if lora_layers == "all" else [2, 3]
    n, spliced = 4, 4 if lora_layers == "all" else 2
    want = adapt_step_flops(model.cfg, saes, layers, 4, 32, 2, chunk)
    assert measured == 64 * (want + ATTN(model.cfg, 32, n + spliced) + 2 * ATTN(model.cfg, 32, len(layers)))
    assert adapt_step_flops(model.cfg, saes, layers, 4, 32, 2, None) <= want  # MFU's count: no recomputation
