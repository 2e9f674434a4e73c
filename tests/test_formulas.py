"""The method's core formulas against references written plainly here: gap closed (Sec. 4.1), the reported CE / KL
(splice.py's docstring), the SAE training loss (Gao et al. 2024: TopK then ReLU, AuxK on the dead latents), LoRA
dropout on the adapter's input (PEFT), and gradients averaged over processes (what DDP does). Fast: the mutation
run (tests/MUTATION.md) uses these."""
import contextlib
import math
import os
import re
import tempfile

import pytest
import torch
import torch.nn.functional as F

from plumbing import distributed
import splice
from accounting.flops import head_flops, kl_flops
from evals import held_out
from formats import sae_files
from lora import LoRALinear, adapters_disabled, apply_lora, lora_modules
from model import ModelConfig, Transformer
from formats.sae_files import load_saes
from sae import SAE
from training.sae_loss import to_jumprelu, training_loss
from fixtures.tiny import BOS, EOS
from tests.need import need
from tests.tol import assert_close


# ----------------------------------------------------------------------------------------------------------------------
# Gap closed and the reported numbers


def test_gap_closed_is_the_papers_fraction():
    # Sec. 4.1 / Fig. 3: (CE_sae - CE_sae_lora) / (CE_sae - CE_base)
    assert held_out.gap_closed(2.0, 3.0, 2.25) == pytest.approx((3.0 - 2.25) / (3.0 - 2.0))  # 0.75
    assert held_out.gap_closed(2.0, 3.0, 3.5) == pytest.approx(-0.5)  # adapting made it worse
    assert held_out.gap_closed(1.0, 1.5, 1.0) == pytest.approx(1.0)
    assert math.isnan(held_out.gap_closed(2.0, 2.0, 1.0)) and math.isnan(held_out.gap_closed(2.0, 1.9, 1.0))


def tiny_adapted(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-llama3")
    cfg.init_std, cfg.bos_token_id, cfg.eos_token_id = 0.3, BOS, EOS
    model = Transformer(cfg).init_weights(seed)
    model.requires_grad_(False)
    apply_lora(model, 4, 8.0, 0.0, None)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.3)
    sae = SAE(64, 128, "topk", k=3, layer=1).eval().requires_grad_(False)
    return model.eval(), sae


def test_evaluate_reports_ce_kl_and_gap_closed_as_defined():
    model, sae = tiny_adapted()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 512, (2, 12), generator=g) for _ in range(2)] + [torch.randint(3, 512, (1, 7),
                                                                                             generator=g)]
    for b in batches:
        b[:, 0] = BOS
    res = held_out.evaluate(model, [(1, sae)], batches, (BOS,), chunk=5, autocast_ctx=contextlib.nullcontext())

    # by hand: full logits, the SAE after block 1 except at BOS, every position but each window's last
    def hook(idx):
        return {1: lambda x: torch.where((idx == BOS)[..., None], x, sae(x))}
    lp = {"base": [], "sae": [], "sae_lora": []}
    targets = []
    with torch.no_grad():
        for idx in batches:
            with adapters_disabled(model):
                lp["base"].append(F.log_softmax(model(idx)[:, :-1].double(), -1).reshape(-1, 512))
                lp["sae"].append(F.log_softmax(model(idx, hooks=hook(idx))[:, :-1].double(), -1).reshape(-1, 512))
            lp["sae_lora"].append(F.log_softmax(model(idx, hooks=hook(idx))[:, :-1].double(), -1).reshape(-1, 512))
            targets.append(idx[:, 1:].reshape(-1))
    t = torch.cat(targets)
    lp = {k: torch.cat(v) for k, v in lp.items()}
    ce = {k: -v.gather(1, t[:, None]).mean().item() for k, v in lp.items()}  # a mean over all positions
    kl = {k: (lp["base"].exp() * (lp["base"] - lp[k])).sum(-1).mean().item() for k in ("sae", "sae_lora")}
    assert res["positions"] == 2 * 2 * 11 + 6
    for k in ("base", "sae", "sae_lora"):
        assert res[f"ce_{k}"] == pytest.approx(ce[k], rel=1e-5)
    for k in ("sae", "sae_lora"):
        assert res[f"kl_{k}"] == pytest.approx(kl[k], rel=1e-4, abs=1e-6)
    assert abs(ce["sae"] - ce["sae_lora"]) > 1e-3  # the adapters change the numbers, so the gap is measurable
    assert res["gap_closed"] == pytest.approx((ce["sae"] - ce["sae_lora"]) / (ce["sae"] - ce["base"]), rel=1e-3)


def test_kl_and_ce_chunks_cover_every_position():
    # more predicted positions (2 x 79) than d_model (64), in chunks of 16: each position once, as in one chunk
    model, sae = tiny_adapted()
    idx = torch.randint(3, 512, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), adapters_disabled(model):
        h_orig = splice.spliced_pass(model, [], idx)
        h = splice.spliced_pass(model, [(1, sae)], idx)
        whole = splice.kl_and_ce(model, h_orig, h, idx, chunk=10 ** 6)
        parts = splice.kl_and_ce(model, h_orig, h, idx, chunk=16)
    assert whole[0].shape == (158,)
    for a, b in zip(parts, whole):
        assert_close(a, b, 1e-5)


def test_keep_none_splices_every_position():
    # train_sae.py passes the model's bos_token_id, which a config may leave None: nothing is kept then
    _, sae = tiny_adapted()
    idx = torch.tensor([[BOS, 5, 6]])
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        everywhere = sae(x)
        assert torch.equal(splice.splice_hooks([(1, sae)], idx, None)[1](x), everywhere)
        assert torch.equal(splice.splice_hooks([(1, sae)], idx, ())[1](x), everywhere)
        kept = splice.splice_hooks([(1, sae)], idx, BOS)[1](x)
    assert torch.equal(kept[0, 0], x[0, 0]) and torch.equal(kept[0, 1:], everywhere[0, 1:])


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_passes_and_their_observers_see_every_block(layer):
    # the two passes against the model run with plain hooks: the stream after every block (x before the splice, y
    # after), from the first block or from the SAE's with a shared prefix; an SAE at any layer, the last included
    model, sae = tiny_adapted()
    idx = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    ref_orig, ref_in, ref_out = {}, {}, {}

    def rec(store, i, f=None):
        def hook(x):
            store[i] = x
            y = f(x) if f is not None else x
            ref_out[i] = y
            return y
        return hook
    with torch.no_grad(), adapters_disabled(model):
        h_ref = model.blocks(model.embed(idx), hooks={i: rec(ref_orig, i) for i in range(4)})
        s_ref = model.blocks(model.embed(idx), hooks={i: rec(ref_in, i, sae if i == layer else None) for i in range(4)})
        for share in (False, True):
            seen_o, seen_s = {}, {}
            h, prefix = splice.original_pass(model, idx, layer, share_prefix=share,
                                             observe=lambda i, x, y: seen_o.__setitem__(i, (x, y)))
            assert torch.equal(h, h_ref) and (prefix is None) == (not share)
            assert sorted(seen_o) == list(range(layer + 1, 4))
            for i, (x, y) in seen_o.items():
                assert torch.equal(x, ref_orig[i]) and torch.equal(y, ref_orig[i])
            hs = splice.spliced_pass(model, [(layer, sae)], idx, prefix=prefix,
                                     observe=lambda i, x, y: seen_s.__setitem__(i, (x, y)))
            assert_close(hs, s_ref, 1e-6)
            assert sorted(seen_s) == list(range(layer if share else 0, 4))
            for i, (x, y) in seen_s.items():
                assert_close(x, ref_in[i], 1e-6)
                assert_close(y, ref_out[i], 1e-6)
            assert not torch.allclose(seen_s[layer][0], seen_s[layer][1])  # the SAE sits there


def test_load_saes_checks_and_sorts(tmp_path):
    from fixtures.tiny import make_sae
    model, _ = tiny_adapted()
    a, b = make_sae(tmp_path / "a", layer=2), make_sae(tmp_path / "b", layer=0, seed=1)
    saes = load_saes([a, b], None, model, "cpu")
    assert [layer for layer, _ in saes] == [0, 2]  # sorted by layer, each from its own files
    assert all(not p.requires_grad for _, s in saes for p in s.parameters()) and not saes[0][1].training
    assert [layer for layer, _ in load_saes([a, b], [3, 1], model, "cpu")] == [1, 3]
    assert load_saes([a], [0], model, "cpu")[0][0] == 0
    with pytest.raises(ValueError, match="--layer names 1 layers for 2 SAEs"):
        load_saes([a, b], [1], model, "cpu")
    with pytest.raises(ValueError, match=r"layer 4 is out of range: the model has layers 0\.\.3"):
        load_saes([a], [4], model, "cpu")
    with pytest.raises(ValueError, match="^two SAEs at the same layer: give each --sae its own --layer$"):
        load_saes([a, b], [1, 1], model, "cpu")
    assert [s.path for _, s in saes] == [b, a]  # which files each came from: the adapter's SAE record
    # an SAE on a hook the splice cannot replace is refused, naming the hooks it serves; one on the MLP's output is
    # spliced inside its block (site mlp_out)
    mid = SAE(64, 128, "topk", k=4, layer=1)
    mid.hook_name = "blocks.1.hook_resid_mid"
    mid.save(str(tmp_path / "mid"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'mid'))}: this SAE reads blocks.1.hook_resid_mid, "
                                         "which the splice cannot replace; it serves blocks.L.hook_resid_post"):
        load_saes([str(tmp_path / "mid")], None, model, "cpu")
    mlp = SAE(64, 128, "topk", k=4, layer=1)
    mlp.hook_name = "blocks.1.hook_mlp_out"
    mlp.save(str(tmp_path / "mlp"))
    assert load_saes([str(tmp_path / "mlp")], None, model, "cpu")[0][1].site == "mlp_out"
    with pytest.raises(ValueError, match=f"{tmp_path / 'c'}: .*d_in=32"):
        load_saes([make_sae(tmp_path / "c", d=32, m=64)], None, model, "cpu")
    nolayer = make_sae(tmp_path / "n", layer=None)
    with pytest.raises(ValueError, match="do not say which layer"):
        load_saes([nolayer], None, model, "cpu")


def test_unspliced_tokens_for_unknown_and_mixed_formats():
    _, sae = tiny_adapted()
    cfg = ModelConfig.from_name("tiny-llama3")
    cfg.bos_token_id, cfg.eos_token_id = BOS, EOS
    assert splice.unspliced_tokens([(1, SAE(64, 128, "topk", k=3))], cfg) == (BOS,)  # built in memory: no positions
    assert sae.positions == "no_bos"  # an SAE built in memory: no_bos, as train_sae.py trains
    assert splice.unspliced_tokens([(1, sae)], cfg) == (BOS,)
    sae.positions = sae_files.AUTO_POSITIONS["saelens"]
    assert splice.unspliced_tokens([(1, sae)], cfg) == (BOS,)
    other = SAE(64, 128, "topk", k=3)
    other.positions = sae_files.AUTO_POSITIONS["sparsify"]
    assert splice.unspliced_tokens([(1, sae), (2, other)], cfg) == (BOS,)  # kept if any SAE keeps it
    with pytest.raises(ValueError, match="expected auto, all, no_bos, no_bos_eos"):
        splice.unspliced_tokens([(1, sae)], cfg, "bos")


def test_kl_flops_recompute_exactly_when_kl_and_ce_checkpoints():
    # kl_and_ce checkpoints its chunks when the predicted positions, batch x (seq_len - 1), exceed one chunk
    cfg = ModelConfig.from_name("tiny-llama3")
    head = head_flops(cfg) * 8 / 9
    assert kl_flops(cfg, 2, 9, 16) == pytest.approx(3 * head)  # 16 positions, one chunk of 16
    assert kl_flops(cfg, 2, 9, 15) == pytest.approx(5 * head)  # two chunks: both heads run again
    assert kl_flops(cfg, 2, 9, None) == pytest.approx(3 * head)


# ----------------------------------------------------------------------------------------------------------------------
# The SAE training loss (train_sae.py), written out: Gao et al. 2024 Sec. 2.3 and A.2; openai/sparse_autoencoder and
# sparsify (the authors' SAE trainer) choose the AuxK latents among the DEAD ones


def reference_loss(sae, x, dead, scale, auxk_coef):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())  # TopK, then ReLU
    recon = z @ sae.W_dec + sae.b_dec
    err = x - recon
    loss = (err ** 2).sum(-1).mean() / scale
    n_dead = int(dead.sum())
    if auxk_coef > 0 and n_dead:
        k_aux = min(n_dead, x.shape[-1] // 2)
        aux_pre = torch.where(dead, pre, torch.tensor(-math.inf))  # only dead latents may be chosen
        a = aux_pre.topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, a.indices, a.values.relu())
        e = err.detach()
        aux = ((e - z_aux @ sae.W_dec) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean()
        loss = loss + auxk_coef * aux
    return loss, z


def sae_with_negative_codes(seed=0):
    torch.manual_seed(seed)
    sae = SAE(16, 64, "topk", k=6)
    with torch.no_grad():
        sae.b_enc.normal_(-2.0, 0.3)  # some of the top 6 pre-activations are negative: the ReLU matters
        sae.b_dec.normal_(0, 0.2)
    return sae


def test_topk_training_loss_value_and_gradient():
    sae = sae_with_negative_codes()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    loss, stats, fired = training_loss(sae, x, dead, 2.0, auxk_coef=1 / 32)
    ref, z = reference_loss(sae, x, dead, 2.0, 1 / 32)
    assert (z == 0).sum(-1).gt(58).any(), "some top-6 pre-activation must be negative for the test to bite"
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["l0"] == pytest.approx((z > 0).float().sum(-1).mean().item())
    recon = z @ sae.W_dec + sae.b_dec
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()  # the batch's fraction of variance unexplained
    assert stats["fvu"] == pytest.approx(fvu.item(), rel=1e-5) and "auxk" not in stats  # no dead latent: no AuxK
    assert fired.dtype == torch.bool and torch.equal(fired, (z > 0).any(0))  # a mask: train_sae indexes with it
    g = torch.autograd.grad(loss, [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    g_ref = torch.autograd.grad(ref, [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-5)


def test_auxk_uses_the_dead_latents():
    sae = sae_with_negative_codes(1)
    with torch.no_grad():
        sae.b_enc[:32] = 3.0  # the live half has the larger pre-activations: choosing among them is visibly wrong
        sae.b_enc[32:] = 1.0 + torch.rand(32)  # dead ones fire too, so how many of them AuxK takes (k_aux) matters
    x = torch.randn(32, 16)
    dead = torch.arange(64) >= 32
    loss, stats, _ = training_loss(sae, x, dead, 1.5, auxk_coef=0.5)
    ref, _ = reference_loss(sae, x, dead, 1.5, 0.5)
    no_aux, _ = reference_loss(sae, x, dead, 1.5, 0.0)
    assert ref.item() - no_aux.item() > 1e-3  # the AuxK term is there
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["auxk"] == pytest.approx((ref.item() - no_aux.item()) / 0.5, rel=1e-4)
    assert "auxk" not in training_loss(sae, x, dead, 1.5, auxk_coef=0.0)[1]
    small = 1e-3 * x  # an error variance far below 1: the normalisation is the variance itself
    small_loss, _, _ = training_loss(sae, small, dead, 1.5, auxk_coef=0.5)
    assert small_loss.item() == pytest.approx(reference_loss(sae, small, dead, 1.5, 0.5)[0].item(), rel=1e-5)
    # its gradient reaches only the dead latents' encoder columns beyond what the main loss gives
    g = torch.autograd.grad(loss, sae.W_enc)[0]
    g_main = torch.autograd.grad(reference_loss(sae, x, dead, 1.5, 0.0)[0], sae.W_enc)[0]
    assert torch.allclose(g[:, :32], g_main[:, :32], atol=1e-7) and not torch.allclose(g[:, 32:], g_main[:, 32:])
    # fewer dead latents than d_in / 2: every one of them is used
    few = torch.zeros(64, dtype=torch.bool)
    few[[3, 40, 41]] = True
    loss, _, _ = training_loss(sae, x, few, 1.5, auxk_coef=0.5)
    assert loss.item() == pytest.approx(reference_loss(sae, x, few, 1.5, 0.5)[0].item(), rel=1e-5)


def test_jumprelu_training_loss_is_mse_plus_l0():
    # Eq. 6: ||x - x_hat||^2 / scale + lambda * ||z||_0, with z = pre * 1[pre > theta]
    torch.manual_seed(0)
    sae = SAE(16, 64, "jumprelu")
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 0.5)
        sae.b_dec.normal_(0, 0.2)
    x = torch.randn(32, 16)
    loss, stats, fired = training_loss(sae, x, torch.zeros(64, dtype=torch.bool), 3.0, l0_coef=0.01)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = pre * (pre > sae.threshold)
    ref = ((x - z @ sae.W_dec - sae.b_dec) ** 2).sum(-1).mean() / 3.0 + 0.01 * (z != 0).float().sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.equal(fired, (z != 0).any(0))


def test_batchtopk_training_loss_keeps_the_batchs_largest():
    # Bussmann et al. 2024: the k x tokens largest ReLU'd pre-activations of the whole batch, not k per token
    torch.manual_seed(0)
    sae = SAE(16, 64, "batchtopk", k=3)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
    x = torch.randn(20, 16) * torch.linspace(0.2, 3, 20)[:, None]  # token norms differ: per-token counts differ
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    loss, stats, fired = training_loss(sae, x, dead, 2.0, auxk_coef=0.25)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre.relu().flatten()
    kept = flat.topk(3 * 20).indices
    z = torch.zeros_like(flat).scatter(0, kept, flat[kept]).view_as(pre)
    counts = (z > 0).sum(-1)
    assert counts.max() > 3 > counts.min()  # not 3 per token
    err = x - (z @ sae.W_dec + sae.b_dec)
    k_aux = min(24, 8)
    a = torch.where(dead, pre, torch.tensor(-math.inf)).topk(k_aux, dim=-1)
    e = err.detach()
    aux = ((e - torch.zeros_like(pre).scatter(-1, a.indices, a.values.relu()) @ sae.W_dec) ** 2).sum(-1).mean() / (
        (e - e.mean(0)) ** 2).sum(-1).mean()
    assert loss.item() == pytest.approx(((err ** 2).sum(-1).mean() / 2.0 + 0.25 * aux).item(), rel=1e-5)
    assert stats["l0"] == pytest.approx(counts.float().mean().item()) and torch.equal(fired, (z > 0).any(0))
    assert stats["fvu"] == pytest.approx(((err ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(), rel=1e-5)
    t1 = 0.01 * flat[kept].min().item()
    assert sae.topk_threshold.item() == pytest.approx(t1, rel=1e-5)  # EMA (rate 0.01) of the smallest kept, from 0
    x2 = 0.05 * x  # smaller activations: the smallest kept one is below 1
    training_loss(sae, x2, dead, 2.0, auxk_coef=0.25)
    flat2 = ((x2 - sae.b_dec) @ sae.W_enc + sae.b_enc).relu().flatten()
    smallest = flat2.topk(3 * 20).values.min().item()
    assert 0 < smallest < 1
    assert sae.topk_threshold.item() == pytest.approx(0.99 * t1 + 0.01 * smallest, rel=1e-5)


def rect(u):  # K(u) = 1[-1/2 < u < 1/2], Rajamanoharan et al. 2024
    return ((u > -0.5) & (u < 0.5)).float()


def test_jumprelu_threshold_gradient_is_the_papers_pseudo_derivative():
    # Rajamanoharan et al. 2024, eqs. 11-12: d z / d theta = -(theta / eps) K((pre - theta) / eps) and
    # d H(pre - theta) / d theta = -(1 / eps) K((pre - theta) / eps); the default L0 coefficient 1e-3
    torch.manual_seed(1)
    sae = SAE(8, 32, "jumprelu")
    sae.bandwidth = 0.5
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 0.6)
    x = torch.randn(40, 8)
    loss, stats, _ = training_loss(sae, x, torch.zeros(32, dtype=torch.bool), 2.0)
    g = torch.autograd.grad(loss, sae.threshold)[0]
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        th, eps, n = sae.threshold, 0.5, len(x)
        z = pre * (pre > th)
        recon = z @ sae.W_dec + sae.b_dec
        d_loss_d_z = 2 * (recon - x) @ sae.W_dec.T / (n * 2.0)
        k = rect((pre - th) / eps)
        expected = (d_loss_d_z * -(th / eps) * k).sum(0) + 1e-3 * (-(1 / eps) * k).sum(0) / n
        assert loss.item() == pytest.approx(((x - recon) ** 2).sum(-1).mean().item() / 2.0
                                            + 1e-3 * (z != 0).float().sum(-1).mean().item(), rel=1e-5)
    assert_close(g, expected, 1e-5)
    assert stats["l0"] == pytest.approx((z != 0).float().sum(-1).mean().item())


def test_kernel_and_default_bandwidth():
    from sae import jumprelu, rectangle
    from training.sae_loss import step
    assert rectangle(torch.tensor([-0.5, -0.49, 0.0, 0.49, 0.5])).tolist() == [0, 1, 1, 1, 0]  # an open interval
    assert SAE(4, 8, "jumprelu").bandwidth == 1e-3 and SAE(4, 8, "batchtopk", k=2).threshold_lr == 0.01
    th = torch.tensor([1.0], requires_grad=True)
    pre = torch.tensor([1.0004, 1.002])  # within eps / 2 = 5e-4 of theta, and outside
    g = torch.autograd.grad(jumprelu(pre, th).sum(), th)[0]
    assert g.item() == pytest.approx(-(1.0 / 1e-3))  # only the first, -(theta / eps)
    assert torch.autograd.grad(step(pre, th).sum(), th)[0].item() == pytest.approx(-1 / 1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA dropout: PEFT's lora.Linear computes W x + b + scale * B A dropout(x)


def test_lora_dropout_acts_on_the_adapter_input():
    torch.manual_seed(0)
    lin = LoRALinear(12, 10, bias=True, rank=3, alpha=6.0, dropout=0.5).train()
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(5, 12)
    torch.manual_seed(7)
    y = lin(x)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x), 0.5)  # the same draw: 0 or 1 / (1 - p) per input entry
    ref = x @ lin.weight.T + lin.bias + 2.0 * ((x * mask) @ lin.lora_A.T) @ lin.lora_B.T
    assert_close(y, ref, 1e-5)
    with torch.no_grad():  # eval: no dropout
        assert_close(lin.eval()(x), x @ lin.weight.T + lin.bias + 2.0 * (x @ lin.lora_A.T) @ lin.lora_B.T, 1e-5)


def test_lora_dropout_matches_peft_in_train_mode():
    peft = need("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("q_proj", torch.nn.Linear(12, 10))
    ours = LoRALinear.from_linear(base.q_proj, 3, 6.0, 0.3).train()
    with torch.no_grad():
        ours.lora_B.normal_()
    ref = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6.0, lora_dropout=0.3, target_modules=["q_proj"]))
    ref.train()
    layer = ref.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(6, 12)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = layer(x)
    assert_close(a, b, 1e-5)


def test_lora_hyperparameters_layers_and_init():
    from lora import resolve_layers
    for rank, alpha in ((1, 1), (1, 0.5), (2, 1.0)):  # rank 1 (Fig. 5) and alpha <= 1 are valid
        m = LoRALinear(6, 4, rank=rank, alpha=alpha)
        assert m.scale == alpha / rank
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(6, 4, rank=0)
    # PEFT's A init: kaiming_uniform_(a=sqrt(5)), uniform within +-1/sqrt(in_features)
    torch.manual_seed(0)
    a = LoRALinear(400, 4, rank=64).lora_A
    assert a.abs().max() <= 1 / 20 and a.abs().max() > 0.99 / 20
    assert resolve_layers("after:2", 4) == [3]
    with pytest.raises(ValueError, match=r"layer 4 is out of range \(this model has layers 0\.\.3\)"):
        resolve_layers("after:4", 4)
    with pytest.raises(ValueError, match=r"layer 7 is out of range \(this model has layers 0\.\.3\)"):
        resolve_layers([7], 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([True], 4)  # a bool is not a layer index
    model, _ = tiny_adapted()
    fresh = Transformer(model.cfg).init_weights(0)
    apply_lora(fresh, 4, targets="q_proj")  # one target as a string; alpha defaults to the paper's 32
    mods = lora_modules(fresh)
    assert len(mods) == 4 and all(n.endswith("q_proj") and m.alpha == 32 for n, m in mods.items())


# ----------------------------------------------------------------------------------------------------------------------
# Gradients averaged over processes


def _average_worker(rank, world, init):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]
        p[0].grad = torch.full((3, 2), float(rank + 1))
        p[1].grad = torch.arange(4.0) * (10 ** rank)
        distributed.all_reduce_grads(p)  # p[2] has no gradient: skipped
        assert torch.equal(p[0].grad, torch.full((3, 2), 1.5)), p[0].grad  # (1 + 2) / 2
        assert torch.equal(p[1].grad, torch.arange(4.0) * 5.5), p[1].grad  # (1 + 10) / 2
        assert p[2].grad is None
        t = torch.tensor([float(rank), 4.0 * rank])
        assert torch.equal(distributed.all_reduce_mean(t), torch.tensor([0.5, 2.0]))
        # the reported means: sums and counts over every process's positions (rank 0: 3 positions, rank 1: 5)
        ce_sum = torch.tensor(3.0 if rank == 0 else 10.0, dtype=torch.float64)
        res = held_out.position_means({"ce": ce_sum}, 3 + 2 * rank)
        assert res == {"ce": pytest.approx(13.0 / 8), "positions": 8}, res
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_processes():
    # DDP's rule: each rank's gradient of its own mean loss, averaged, is the gradient of the global mean loss
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_average_worker, args=(2, f"file://{os.path.join(tmp, 'rdv')}"), nprocs=2, join=True)


def test_sae_constructor_bounds_and_to_jumprelu_metadata():
    assert SAE(4, 8, "topk", k=1).k == 1 and SAE(4, 8, "topk", k=8).k == 8  # k from 1 to d_sae
    assert SAE(4, 8, "batchtopk", k=2.5).k == 2.5  # BatchTopK: a mean k per token, not an integer
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="k"):
            SAE(4, 8, "topk", k=bad)
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated' \\(expected one of topk, batchtopk, jumprelu\\)"):
        SAE(4, 8, "gated", k=2)
    assert SAE(4, 8, "jumprelu", k=3).k is None and SAE(4, 8, "jumprelu").min_threshold == 1e-6
    fresh = SAE(16, 32, "topk", k=4)  # Gao et al.'s init: unit-norm decoder rows, the encoder their transpose
    assert torch.allclose(fresh.W_dec.norm(dim=1), torch.ones(32)) and torch.equal(fresh.W_enc, fresh.W_dec.T)
    torch.manual_seed(0)
    b = SAE(4, 8, "batchtopk", k=2, layer=3, model_name="m", apply_b_dec_to_input=False, dtype=torch.float64)
    with torch.no_grad():
        b.topk_threshold.fill_(0.25)
    j = to_jumprelu(b)
    assert (j.arch, j.layer, j.model_name, j.apply_b_dec_to_input, j.W_dec.dtype) == ("jumprelu", 3, "m", False,
                                                                                     torch.float64)
    assert j.threshold.dtype == torch.float64 and torch.equal(j.threshold, torch.full((8,), 0.25, dtype=torch.float64))
    assert torch.equal(j.W_enc, b.W_enc) and torch.equal(j.b_dec, b.b_dec)
    # the bounds' messages name the bad value and the bound
    for arch, k, msg in [("topk", 0, "topk SAE needs k > 0, got k=0"),
                         ("batchtopk", None, "batchtopk SAE needs k > 0, got k=None"),
                         ("topk", 9, "k=9 is larger than the number of latents d_sae=8"),
                         ("topk", 2.5, "topk SAE needs an integer k, got 2.5")]:
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            SAE(4, 8, arch, k=k)


def test_encoder_input_skip_and_messages():
    # SAELens: the encoder reads x - b_dec only when apply_b_dec_to_input (Gemma Scope's SAEs: x itself), and a skip
    # transcoder (SkipTranscoder) adds x @ W_skip^T to the reconstruction; written out here
    torch.manual_seed(0)
    sae = SAE(4, 8, "jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.5)
    x = torch.randn(3, 4)
    pre = x @ sae.W_enc + sae.b_enc
    z = pre * (pre > sae.threshold)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), z)
        sae.W_skip = torch.nn.Parameter(torch.randn(4, 4))
        assert torch.allclose(sae(x), z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T, atol=1e-6)
    # the messages name what is wrong
    with pytest.raises(ValueError, match=r"^SAE input: the SAE expects d_in=4 but the model's residual stream has "
                                         r"d_model=5 \(SAE trained for another model\?\)$"):
        sae(torch.randn(2, 5))
    with pytest.raises(ValueError, match="^the SAE expects d_in=4 but"):
        sae.check_d_in(5)
    with pytest.raises(ValueError, match="^encode_topk needs a topk SAE, this one is jumprelu$"):
        sae.encode_topk(x)
    with pytest.raises(ValueError, match="^to_jumprelu converts a batchtopk SAE, this one is jumprelu$"):
        to_jumprelu(sae)
    # a fresh SAE of another dtype holds every tensor in it
    for arch in ("topk", "batchtopk", "jumprelu"):
        fresh = SAE(4, 8, arch, k=None if arch == "jumprelu" else 2, dtype=torch.float64)
        assert {t.dtype for t in (*fresh.parameters(), *fresh.buffers())} == {torch.float64}


def test_transcoder_training_loss_reconstructs_the_target():
    # a transcoder (Dunefsky et al. 2024) maps the MLP's input to its output: the MSE and the FVU are of the target
    # (the MLP output), not of the input it reads; written out on a TopK SAE with no dead latents
    torch.manual_seed(0)
    sae = SAE(4, 8, "topk", k=2, apply_b_dec_to_input=False)
    x, target = torch.randn(6, 4), torch.randn(6, 4) * 3
    loss, stats, _ = training_loss(sae, x, torch.zeros(8, dtype=torch.bool), 2.0, target=target)
    with torch.no_grad():
        err = ((target - sae(x)) ** 2).sum(-1).mean()
    assert loss.item() == pytest.approx(err.item() / 2.0, rel=1e-5)
    assert stats["fvu"] == pytest.approx((err / ((target - target.mean(0)) ** 2).sum(-1).mean()).item(), rel=1e-5)


def test_fresh_sae_defaults():
    # TopK unless told (Gao et al.'s SAE, the one train_sae.py trains by default); a JumpReLU SAE trained from scratch
    # starts at threshold 0.001, SAELens' jumprelu_init_threshold (with its bandwidth 0.001, which SAE.bandwidth is)
    assert SAE(4, 8, k=2).arch == "topk"
    j = SAE(4, 8, "jumprelu")
    assert torch.equal(j.threshold, torch.full((8,), 1e-3)) and j.bandwidth == 1e-3


def test_batchtopk_threshold_tracks_the_smallest_positive_kept_value():
    # SAELens' BatchTopKTrainingSAE.update_topk_threshold: EMA (rate topk_threshold_lr 0.01) of the smallest kept
    # activation that is > 0; a batch with no positive activation leaves it as it is. Here 2 tokens x k = 3 keep 6
    # values but only 4 are positive: 2 kept zeros, which must not pull the threshold to 0.
    sae = SAE(4, 8, "batchtopk", k=3)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([0.5, 0.2, -1, -1, -1, -1, -1, -1.0]))
    dead = torch.zeros(8, dtype=torch.bool)
    training_loss(sae, torch.randn(2, 4), dead, 1.0)
    assert sae.topk_threshold.item() == pytest.approx(0.01 * 0.2, rel=1e-6)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    training_loss(sae, torch.randn(2, 4), dead, 1.0)
    assert sae.topk_threshold.item() == pytest.approx(0.01 * 0.2, rel=1e-6)
