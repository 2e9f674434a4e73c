"""splice.py: the optimised objective (shared prefix, chunked KL, compiled passes) against Eq. 7 as written."""
import dataclasses

import pytest
import torch

import splice
from formats import sae_files
from lora import apply_lora
from model import Transformer
from lora import adapters_disabled
from formats.sae_files import load_saes
from splice import kl_and_ce, kl_reference, original_pass, splice_hooks, spliced_pass
from fixtures.tiny import BOS, identity_sae, make_model, make_sae
from tests.tol import close


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("splice")
    return dict(model=make_model(root / "model"), sae=make_sae(root / "sae", "topk", layer=1, k=2),
                sae2=make_sae(root / "sae2", "topk", layer=2, k=2, seed=1))


def idx_batch(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, 512, (B, T), generator=g)
    idx[:, 0] = BOS
    return idx


def final_streams(model, saes, idx, keep=(), *, share_prefix=False, passes=(original_pass, spliced_pass)):
    """The two passes as adapt.py's loop runs them: (original model's final stream, spliced model's)."""
    original, spliced = passes
    with torch.no_grad(), adapters_disabled(model):
        h_orig, prefix = original(model, idx, saes[0][0], share_prefix=share_prefix)
    return h_orig, spliced(model, saes, idx, keep, prefix=prefix)


def mean_kl(model, h_orig, h, idx, **kw):
    """Eq. 7 as adapt.py --kl-reduction token optimises it: the mean over the predicted positions."""
    kl, _, _ = kl_and_ce(model, h_orig, h, idx, **kw)
    assert kl.shape == (idx.shape[0] * (idx.shape[1] - 1),)  # one value per predicted position
    return kl.mean()


def adapted(files, layers=None):
    model = Transformer.from_pretrained(files["model"])
    params = apply_lora(model, 4, 8.0, layers=layers)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)
    return model, params


@pytest.mark.parametrize("share_prefix,chunk,n_saes", [(False, 4096, 1), (True, 7, 1), (True, 48, 2), (False, 5, 2)])
def test_optimised_objective_equals_eq7_reference_in_value_and_gradient(files, share_prefix, chunk, n_saes):
    # Eq. 7 as written (two full passes, full logits) against the path adapt.py trains with: shared prefix (adapters
    # after the first SAE only), chunked lm_head + log-softmax under activation checkpointing
    model, params = adapted(files, layers="after:1" if share_prefix else None)
    saes = load_saes([files["sae"], files["sae2"]][:n_saes], None, model, "cpu")
    idx = idx_batch()
    ref = kl_reference(model, saes, idx, BOS)
    g_ref = torch.autograd.grad(ref, params)
    kl = mean_kl(model, *final_streams(model, saes, idx, BOS, share_prefix=share_prefix), idx, chunk=chunk)
    g = torch.autograd.grad(kl, params)
    assert ref.item() > 1e-3
    assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-7)
    assert all(close(a, b, 1e-4) for a, b in zip(g, g_ref))  # on each gradient's scale: entries near 0 cancel


def test_sequence_loss_is_the_authors_batchmean_over_the_predicted_positions(files):
    # the authors' kl_div(..., reduction="batchmean") on one (1, T, V) sequence sums the KL over its positions; adapt.py
    # --kl-reduction sequence is that sum over the T - 1 positions that predict a token of the window
    model, params = adapted(files)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch(B=1, T=32)
    h_orig, h = final_streams(model, saes, idx, BOS)
    kl, _, _ = kl_and_ce(model, h_orig, h, idx, chunk=16)
    logp = torch.log_softmax(model.head(h[:, :-1]).float(), -1)
    with torch.no_grad():
        p_orig = torch.softmax(model.head(h_orig[:, :-1]).float(), -1)
    authors = torch.nn.functional.kl_div(logp, p_orig, reduction="batchmean")  # input (1, T - 1, V): divides by 1
    assert torch.allclose(kl.sum() / len(idx), authors, rtol=1e-5)


def test_ce_is_the_next_token_cross_entropy_of_either_model(files):
    # the CE at predicted position t is -log p(token t + 1): F.cross_entropy on the full logits, the last position
    # (whose next token lies outside the window) left out
    model, _ = adapted(files)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    h_orig, h = final_streams(model, saes, idx, BOS)
    with torch.no_grad():
        _, ce, ce_orig = kl_and_ce(model, h_orig, h, idx, chunk=7)
        spliced = model(idx, hooks=splice_hooks(saes, idx, BOS))
        with adapters_disabled(model):
            plain = model(idx)
    for got, logits in ((ce, spliced), (ce_orig, plain)):
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_identity_sae_gives_zero_kl(files):
    model = Transformer.from_pretrained(files["model"])
    apply_lora(model, 4, 8.0)
    idx = idx_batch()
    hb, hs = final_streams(model, [(1, identity_sae())], idx, ())
    kl = mean_kl(model, hb, hs, idx, chunk=16)
    assert abs(kl.item()) < 1e-6


def test_chunked_kl_equals_full_kl_values_and_grads(files):
    model = Transformer.from_pretrained(files["model"])
    params = apply_lora(model, 4, 8.0)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    hb, hs = final_streams(model, saes, idx, BOS)
    # reference: the whole (B, T - 1, V) distribution of the predicted positions at once
    logp = torch.log_softmax(model.head(hs[:, :-1]), -1)
    ref = torch.nn.functional.kl_div(logp, torch.log_softmax(model.head(hb[:, :-1]), -1), log_target=True,
                                     reduction="sum") / (idx.shape[0] * (idx.shape[1] - 1))
    g_ref = torch.autograd.grad(ref, params, retain_graph=True)
    for chunk in (7, 46, 4096):
        kl = mean_kl(model, hb, hs, idx, chunk=chunk)
        g = torch.autograd.grad(kl, params, retain_graph=True)
        assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-7)
        assert all(close(a, b, 1e-4) for a, b in zip(g, g_ref))


def test_shared_prefix_equals_two_full_passes(files):
    model = Transformer.from_pretrained(files["model"])
    params = apply_lora(model, 4, 8.0, layers="after:1")
    for p in params:
        p.data.normal_(0, 0.05)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    a = final_streams(model, saes, idx, BOS, share_prefix=True)
    b = final_streams(model, saes, idx, BOS)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_bos_keeps_original_activation_by_default(files):
    model = Transformer.from_pretrained(files["model"])
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    seen = {}
    hooks = splice_hooks(saes, idx, BOS)
    orig = model(idx, stop_at=1)
    spliced = hooks[1](orig)
    assert torch.equal(spliced[:, 0], orig[:, 0])
    assert not torch.allclose(spliced[:, 1:], orig[:, 1:])
    seen["all"] = splice_hooks(saes, idx, ())[1](orig)
    assert not torch.allclose(seen["all"][:, 0], orig[:, 0])


def test_compiled_passes_match_eager_and_keep_gradients(files):
    """adapt.py's compiled step (splice.compile_step: each block its own graph, the KL chunk another) equals the
    eager passes and Eq. 7 as written (kl_reference) in value and gradient; the blocks of a kind share one graph, so a
    second step compiles nothing and a model twice as deep compiles nothing more."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    model = Transformer.from_pretrained(files["model"])
    params = apply_lora(model, 4, 8.0)
    for p in params:
        p.data.normal_(0, 0.05)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    ref = kl_reference(model, saes, idx, BOS)
    g_ref = torch.autograd.grad(ref, params)
    rb, rs = final_streams(model, saes, idx, BOS)
    torch._dynamo.reset()
    counters.clear()
    loss_fn = splice.compile_step(model)
    for _ in range(2):
        hb, hs = final_streams(model, saes, idx, BOS)
        assert hs.requires_grad and not hb.requires_grad
        assert close(hb, rb, 2e-5) and close(hs, rs, 2e-5)
        kl = mean_kl(model, hb, hs, idx, chunk=16, loss_fn=loss_fn)
        g = torch.autograd.grad(kl, params)
        assert torch.allclose(kl, ref, rtol=1e-5, atol=1e-7) and all(close(a, b, 1e-4) for a, b in zip(g, g_ref))
    # tiny-llama3, 4 layers of one attention kind: the original pass (adapters off, no grad), the spliced pass from an
    # input without grad (block 0) and with it (blocks 1-3); the KL chunk, and again for the last, shorter chunk
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 5, graphs
    deeper = Transformer(dataclasses.replace(model.cfg, n_layer=8, layer_types=None))
    deeper.init_weights(1).requires_grad_(False)
    apply_lora(deeper, 4, 8.0)
    splice.compile_step(deeper)
    final_streams(deeper, saes, idx, BOS)[1].sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs


def test_fresh_adapter_reproduces_spliced_logits_and_base_pass_is_the_bare_model(files):
    bare = Transformer.from_pretrained(files["model"])
    model = Transformer.from_pretrained(files["model"])
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    with torch.no_grad():
        spliced_ref = bare.blocks(bare.embed(idx), hooks=splice_hooks(saes, idx, BOS))
        apply_lora(model, 8, 32.0)  # B = 0: the adapters change nothing yet
        hb, hs = final_streams(model, saes, idx, BOS)
        assert torch.equal(hs, spliced_ref)
        assert torch.equal(hb, bare.blocks(bare.embed(idx)))


def test_positions_spliced_per_sae_source_as_the_authors(files):
    # utils.get_sae_hook: hub SAEs (Gemma Scope, Llama Scope) skip BOS and EOS tokens, their TopK SAEs (sparsify
    # format) splice every position; SAELens files (train_sae.py's) skip BOS, as they are trained without it
    from model import ModelConfig
    cfg = ModelConfig.from_name("tiny-gemma2")
    cfg.bos_token_id, cfg.eos_token_id = 2, 1
    sae = load_saes([files["sae"]], None, Transformer.from_pretrained(files["model"]), "cpu")
    assert sae[0][1].source_format == "saelens" and splice.unspliced_tokens(sae, cfg) == (2,)
    for fmt, kept in (("gemma_scope", (1, 2)), ("llama_scope", (1, 2)), ("sparsify", ()), ("saelens", (2,))):
        sae[0][1].positions = sae_files.AUTO_POSITIONS[fmt]
        assert splice.unspliced_tokens(sae, cfg) == kept, fmt
    assert splice.unspliced_tokens(sae, cfg, "no_bos_eos") == (1, 2) and splice.unspliced_tokens(sae, cfg, "all") == ()
    cfg.eos_token_id = [1, 107]  # Gemma-2-it / Llama-3-instruct list several EOS ids
    assert splice.unspliced_tokens(sae, cfg, "no_bos_eos") == (1, 2, 107)
    with pytest.raises(ValueError, match="--sae-positions"):
        splice.unspliced_tokens(sae, cfg, "no_pad")
    idx = torch.tensor([[2, 5, 1, 7]])
    x = torch.randn(1, 4, 64)
    out = splice_hooks(sae, idx, (1, 2))[1](x)
    assert torch.equal(out[0, [0, 2]], x[0, [0, 2]]) and not torch.allclose(out[0, [1, 3]], x[0, [1, 3]])


def test_compiled_chunk_losses_equal_eq7_with_no_graph_break(files):
    """The whole KL chunk as one compiled function (adapt.py's default with --compile): equal to Eq. 7 as written in
    value and gradient, chunked (under activation checkpointing) or not, and traced as a single graph."""
    model, params = adapted(files)
    saes = load_saes([files["sae"]], None, model, "cpu")
    idx = idx_batch()
    ref = kl_reference(model, saes, idx, BOS)
    g_ref = torch.autograd.grad(ref, params)
    h_orig, h = final_streams(model, saes, idx, BOS)
    targets = idx[:, 1:].reshape(-1)[:16]
    explanation = torch._dynamo.explain(splice.chunk_losses)(model, h_orig.reshape(-1, 64)[:16],
                                                             h.reshape(-1, 64)[:16], targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(splice.chunk_losses)
    for chunk in (46, 16):  # one chunk; three chunks recomputed in the backward
        kl, ce, ce_orig = kl_and_ce(model, *final_streams(model, saes, idx, BOS), idx, chunk=chunk, loss_fn=compiled)
        g = torch.autograd.grad(kl.mean(), params)
        _, ce_eager, ce_orig_eager = kl_and_ce(model, *final_streams(model, saes, idx, BOS), idx, chunk=chunk)
        assert torch.allclose(kl.mean(), ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ce, ce_eager, rtol=1e-6) and torch.allclose(ce_orig, ce_orig_eager, rtol=1e-6)
        assert all(close(a, b, 1e-4) for a, b in zip(g, g_ref))
