"""sae.py: fused TopK against the dense path, estimator gradients, bf16 autocast (the file formats:
tests/test_sae_files.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sae import SAE, JumpReLUFn, rectangle
from training.sae_loss import (StepFn, to_jumprelu, clamp_threshold_, remove_gradient_parallel_to_decoder_directions,
                               set_decoder_norm_to_unit_norm, step)
from tests.tol import assert_close

D, M, K = 16, 64, 4


def rand_sae(arch="topk", k=K, apply_b_dec_to_input=True, seed=0, **kw):
    torch.manual_seed(seed)
    sae = SAE(D, M, arch, k=k, apply_b_dec_to_input=apply_b_dec_to_input, **kw)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    return sae


def x_in(*lead, seed=1, requires_grad=False):
    return torch.randn(*lead, D, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def grads_of(fn, sae, x, g):
    sae.zero_grad(set_to_none=True)
    x.grad = None
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------------------------
# Fused TopK against the dense path


@pytest.mark.parametrize("apply_b_dec,shift", [(True, 0.0), (False, 0.0), (True, -6.0)])
@pytest.mark.parametrize("frozen", [True, False])
def test_fused_topk_matches_dense_values_and_gradients(apply_b_dec, shift, frozen):
    sae = rand_sae(apply_b_dec_to_input=apply_b_dec).requires_grad_(not frozen)
    with torch.no_grad():
        sae.b_enc.add_(shift)  # shifted down: some of the k selected pre-activations are negative (ReLU'd to 0)
    if shift:
        assert (sae.encode_topk(x_in(3, 5))[0] == 0).any()
    x = x_in(3, 5, requires_grad=True)
    g = torch.randn(3, 5, D)
    y_f, gx_f, gp_f = grads_of(sae, sae, x, g)
    y_d, gx_d, gp_d = grads_of(lambda t: sae.decode(sae.encode(t)), sae, x, g)
    assert_close(y_f, y_d, 1e-5)
    assert_close(gx_f, gx_d, 1e-5)
    assert gp_f.keys() == gp_d.keys() == (set() if frozen else {"W_enc", "W_dec", "b_enc", "b_dec"})
    for name in gp_d:
        assert_close(gp_f[name], gp_d[name], 1e-5)
    assert gx_f.abs().sum() > 0


def test_topk_keeps_k_largest_then_relu_and_matches_numpy():
    sae = rand_sae()
    with torch.no_grad():
        sae.b_enc.sub_(3.0)  # most pre-activations negative: TopK-then-ReLU keeps fewer than k non-zeros
    x = x_in(40)
    xs = (x - sae.b_dec).detach().numpy()
    pre = xs @ sae.W_enc.detach().numpy() + sae.b_enc.detach().numpy()
    ref = np.zeros_like(pre)
    for n in range(len(pre)):
        top = np.argsort(-pre[n])[:K]
        ref[n, top] = np.maximum(pre[n, top], 0)
    z = sae.encode(x).detach().numpy()
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
    assert ((z > 0).sum(-1) < K).any() and ((z > 0).sum(-1) <= K).all()
    values, indices = sae.encode_topk(x)
    assert values.shape == indices.shape == (40, K) and (values >= 0).all()
    dense = torch.zeros(40, M).scatter(-1, indices, values)
    np.testing.assert_allclose(dense.detach().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_decode_sparse_matches_dense_decode_values_and_gradients():
    sae = rand_sae()
    idx = torch.stack([torch.randperm(M)[:K] for _ in range(6)]).view(2, 3, K)
    vals = torch.rand(2, 3, K, requires_grad=True)
    g = torch.randn(2, 3, D)
    y = sae.decode_sparse(vals, idx)
    (y * g).sum().backward()
    gv, gW, gb = vals.grad.clone(), sae.W_dec.grad.clone(), sae.b_dec.grad.clone()
    vals.grad = None
    sae.zero_grad()
    dense = torch.zeros(2, 3, M).scatter(-1, idx, vals)
    y2 = sae.decode(dense)
    (y2 * g).sum().backward()
    assert_close(y, y2, 1e-5)
    assert_close(gv, vals.grad, 1e-5)
    assert_close(gW, sae.W_dec.grad, 1e-5)
    torch.testing.assert_close(gb, sae.b_dec.grad)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor every aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(t, torch.Tensor)]
        return out


def test_fused_path_never_builds_a_dense_code_matrix():
    sae = rand_sae().requires_grad_(False)  # frozen, as in LoRA training
    x = x_in(8, requires_grad=True)
    counts = {}
    for name, fn in (("fused", sae), ("dense", lambda t: sae.decode(sae.encode(t)))):
        with OutputShapes() as fwd:
            y = fn(x)
        with OutputShapes() as bwd:
            y.sum().backward()
        counts[name] = (fwd.shapes.count((8, M)), bwd.shapes.count((8, M)))
        assert bwd.shapes.count((8, D)) >= 1  # the recorder does see the backward
    assert counts["fused"] == (1, 0), counts  # only the encoder's pre-activations, freed inside the encoder
    assert counts["dense"][0] >= 3 and counts["dense"][1] >= 2, counts  # codes, and their gradients, are dense


def test_spliced_into_model_fused_equals_dense():
    from model import ModelConfig, Transformer
    cfg = ModelConfig.from_name("tiny-llama3")
    model = Transformer(cfg).init_weights(0)
    torch.manual_seed(0)
    sae = SAE(cfg.d_model, 256, "topk", k=8, layer=1).requires_grad_(False)
    sae.check_d_in(cfg.d_model)
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for hook in (sae, lambda x: sae.decode(sae.encode(x)).to(x.dtype)):
        model.zero_grad()
        logits = model(idx, hooks={1: hook})
        logits.float().logsumexp(-1).sum().backward()
        outs.append((logits.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    assert outs[0][1].abs().sum() > 0  # gradient reached block 0 through the SAE


# ----------------------------------------------------------------------------------------------------------------------
# JumpReLU / BatchTopK training support


def test_jumprelu_and_step_gradients_are_the_rectangle_estimators():
    eps = 0.1
    thr = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5], requires_grad=True)
    # one token: far below, just below (inside window), just above (inside), far above, exactly the jump
    pre = torch.tensor([[0.0, 0.46875, 0.53125, 2.0, 0.5]], requires_grad=True)  # exact in binary
    z = JumpReLUFn.apply(pre, thr, eps)
    assert z.tolist() == [[0.0, 0.0, 0.53125, 2.0, 0.0]]
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    z.backward(g)
    assert pre.grad.tolist() == [[0.0, 0.0, 3.0, 4.0, 0.0]]  # H(pre - thr) * g
    in_window = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(thr.grad, -(0.5 / eps) * in_window * g[0])
    thr.grad, pre.grad = None, None
    s = StepFn.apply(pre, thr, eps)
    assert s.tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]]
    s.backward(g)
    torch.testing.assert_close(thr.grad, -(1 / eps) * in_window * g[0])
    assert pre.grad is None or (pre.grad == 0).all()
    assert rectangle(torch.tensor([-0.6, -0.4, 0.4, 0.6])).tolist() == [0, 1, 1, 0]


def test_jumprelu_threshold_gradient_sums_over_tokens_and_trains():
    sae = rand_sae("jumprelu")
    sae.bandwidth = 0.5
    x = x_in(32)
    pre = sae.pre_acts(x).detach()
    l0 = step(pre, sae.threshold, sae.bandwidth).sum()
    l0.backward()
    expected = -(1 / 0.5) * rectangle((pre - sae.threshold.detach()) / 0.5).sum(0)
    torch.testing.assert_close(sae.threshold.grad, expected)
    assert (sae.threshold.grad < 0).any()  # raising those thresholds would lower L0


def test_batchtopk_training_threshold_and_inference_conversion(tmp_path):
    sae = rand_sae("batchtopk", k=3)
    sae.threshold_lr = 0.5
    x = x_in(10)
    sae.train()
    z = sae.encode(x)
    assert (z > 0).sum() == 3 * 10  # k * batch over the whole batch, not k per token
    assert ((z > 0).sum(-1) != 3).any()
    pre = sae.pre_acts(x).relu().flatten()
    kth = pre.topk(30).values.min()
    torch.testing.assert_close(z.max(), pre.max())
    torch.testing.assert_close(sae.topk_threshold, 0.5 * kth)  # EMA from 0 with rate 0.5
    sae.eval()
    thr = sae.topk_threshold.item()
    p = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), p * (p > thr))
    jr = to_jumprelu(sae)
    assert jr.arch == "jumprelu" and jr.threshold.shape == (M,) and (jr.threshold == thr).all()
    torch.testing.assert_close(jr(x), sae(x))
    sae.save(tmp_path)
    again = SAE.from_pretrained(str(tmp_path))
    assert again.arch == "batchtopk" and again.k == 3 and again.topk_threshold.item() == pytest.approx(thr)
    torch.testing.assert_close(again(x), sae(x))


def test_decoder_unit_norm_and_parallel_gradient_removal():
    sae = rand_sae()
    set_decoder_norm_to_unit_norm(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
    sae(x_in(8)).pow(2).sum().backward()
    before = sae.W_dec.grad.clone()
    remove_gradient_parallel_to_decoder_directions(sae)
    radial = (sae.W_dec.grad * sae.W_dec).sum(1).abs().max()
    assert radial < 1e-5 * before.abs().max() and (before * sae.W_dec).sum(1).abs().max() > 1e-2 * before.abs().max()
    torch.testing.assert_close(sae.W_dec.grad, before - (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)


# ----------------------------------------------------------------------------------------------------------------------
# bf16 autocast and torch.compile


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_bf16_autocast_forward_and_backward(arch):
    sae = rand_sae(arch, k=K if arch != "jumprelu" else None).eval().requires_grad_(False)
    with torch.no_grad():  # pre-activations 0.5 apart and 0.25 from the thresholds: bf16 cannot change the choice
        sae.W_enc.mul_(0.01)
        sae.b_enc.copy_(torch.randperm(M, generator=torch.Generator().manual_seed(0)) * 0.5 - 25.25)
        if arch == "jumprelu":
            sae.threshold.fill_(2.0)
    x = x_in(4, 6, requires_grad=True)
    ref = sae(x).detach()
    assert 0 < (sae.encode(x) > 0).float().mean() < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sae(x)
        dense = sae.decode(sae.encode(x))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).norm() / ref.norm() < 1e-2
    assert (dense - ref).norm() / ref.norm() < 1e-2
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    xb = x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sae(xb).dtype == torch.bfloat16  # the residual stream's dtype is kept


def test_bf16_autocast_fused_matches_dense_on_random_weights():
    # fused and dense paths see the same fp32 pre-activations under autocast
    sae = rand_sae().requires_grad_(False)
    x = x_in(4, 6, requires_grad=True)
    g = torch.randn(4, 6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, gx_f, _ = grads_of(sae, sae, x, g)
        y_d, gx_d, _ = grads_of(lambda t: sae.decode(sae.encode(t)), sae, x, g)
    assert (y_f - y_d).norm() / y_d.norm() < 1e-2
    assert (gx_f - gx_d).norm() / gx_d.norm() < 1e-2


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_encoder_choice_is_fp32_under_bf16_autocast(arch):
    sae = rand_sae(arch, k=K if arch != "jumprelu" else None).eval().requires_grad_(False)
    x = x_in(2000)
    fp32 = sae.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = sae.encode(x)
        from_bf16 = sae.encode(x.bfloat16())  # the stream itself is bf16 under autocast
        if arch == "topk":
            values, indices = sae.encode_topk(x)
    assert torch.equal(same, fp32)  # the same input: bit for bit the fp32 encoder
    if arch == "topk":
        assert torch.equal(torch.zeros_like(fp32).scatter(-1, indices, values), fp32)
    # a bf16 input: the same latents wherever fp32 separates the choice by a clear margin
    pre = sae.pre_acts(x)
    cut = sae.threshold if arch == "jumprelu" else (
        pre.topk(K + 1, dim=-1).values[:, K - 1:].mean(-1, keepdim=True) if arch == "topk" else sae.topk_threshold)
    clear = (pre - cut).abs().min(-1).values > 0.02  # a bf16 input moves pre-activations by ~1e-3 here
    assert clear.float().mean() > 0.2
    assert torch.equal((from_bf16 != 0)[clear], (fp32 != 0)[clear])
    # what the fp32 region prevents: bf16 pre-activations change the choice somewhere in 2000 tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre_bf16 = F.linear(x - sae.b_dec, sae.W_enc.t(), sae.b_enc)
    if arch == "topk":
        assert (pre_bf16.topk(K, dim=-1).indices.sort(-1).values != pre.topk(K, dim=-1).indices.sort(-1).values).any()


def test_jumprelu_thresholds_stay_positive_while_training_and_round_trip(tmp_path):
    def train(clamp):
        sae = rand_sae("jumprelu", seed=2)
        sae.bandwidth = 1.0
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        x = x_in(64)
        for _ in range(100):  # minus L0: every threshold is pushed down, towards and past zero
            (-step(sae.pre_acts(x), sae.threshold, sae.bandwidth).sum(-1).mean()).backward()
            opt.step()
            opt.zero_grad()
            if clamp:
                clamp_threshold_(sae)
        return sae
    assert (train(clamp=False).threshold < 0).any()
    sae = train(clamp=True)
    assert (sae.threshold >= sae.min_threshold).all() and (sae.threshold == sae.min_threshold).any()
    x = x_in(6, 5)
    z = sae.encode(x)
    assert (z >= 0).all() and (z > 0).any()  # no negative codes
    sae.save(str(tmp_path))
    again = SAE.from_pretrained(str(tmp_path))
    assert torch.equal(again.threshold, sae.threshold)
    assert torch.equal(again(x), sae(x)) and torch.equal(again.encode(x), z)
    clamp_threshold_(rand_sae("topk"))  # other architectures: nothing to do


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_forward_has_no_graph_breaks(arch):
    sae = rand_sae(arch, k=K if arch != "jumprelu" else None).eval()
    x = x_in(2, 5, requires_grad=True)
    explanation = torch._dynamo.explain(sae)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count >= 1
