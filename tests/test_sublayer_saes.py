"""SAEs inside a block: on every attention head's output before o_proj (SAELens' blocks.L.attn.hook_z: Gemma Scope's
`att`, Gemma Scope 2's attn_out_all/), on the attention output (hook_attn_out) and on the MLP output (hook_mlp_out:
Gemma Scope's `mlp`, Gemma Scope 2's mlp_out_all/). The reference is transformers' model with the SAE applied at the
release's own hook point: Gemma Scope 2's config.json hf_hook_point_in (model.layers.L.self_attn.o_proj.input,
model.layers.L.post_feedforward_layernorm.output), and TransformerLens' definitions for SAELens' names (Gemma-2's
hook_attn_out / hook_mlp_out after ln1_post / ln2_post, i.e. post_attention_layernorm / post_feedforward_layernorm;
Llama's: o_proj's and the MLP's outputs); the SAE is written as SAELens' JumpReLU / TopK formula."""
import numpy as np
import pytest
import torch

from lora import layers_around_saes
from model import ModelConfig, Transformer
from formats.sae_files import load_saes
from sae import SAE
from splice import splice_hooks
from fixtures.hf_refs import TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA3, make_hf_checkpoint, rel_err
from tests.test_gemma_scope_2 import release_files, saelens_jumprelu
from tests.test_hub import cache, put  # noqa: F401 (fixture)

# head_dim 8: n_head * head_dim = 32, not d_model 64, so an attn.hook_z SAE has a width of its own
HUBS = {"gemma2": {**TINY_GEMMA2, "head_dim": 8}, "gemma3": {**TINY_GEMMA3, "head_dim": 8}, "llama3": TINY_LLAMA3}
HEADS = 32


def hf_splice(ref, family, layer, site, fn, unspliced_at):
    """A hook on transformers' block `layer` that replaces the activation at `site` by fn(activation), except where
    unspliced_at (B, T, 1) is True."""
    block = ref.model.layers[layer]

    def sub(o):
        return fn(o) if unspliced_at is None else torch.where(unspliced_at, o, fn(o))
    if site == "attn_z":  # o_proj's input: Gemma Scope 2's hf_hook_point_in for attn_out_all
        return block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (sub(args[0]),))
    if family == "llama3":  # no post-norms: the sublayer's output is o_proj's / the MLP's own
        module = {"attn_out": block.self_attn.o_proj, "mlp_out": block.mlp}[site]
    else:
        module = {"attn_out": block.post_attention_layernorm, "mlp_out": block.post_feedforward_layernorm}[site]
    return module.register_forward_hook(lambda m, i, o: sub(o))


def spliced_pair(ref, model, family, saes, site_of, idx, bos):
    """(ours, transformers') logits for each choice of kept positions, and transformers' logits without the SAE."""
    with torch.no_grad():
        plain = ref(idx).logits
        out = []
        for keep in ((), (bos,)):
            unspliced_at = (idx == bos)[..., None] if keep else None
            handles = [hf_splice(ref, family, layer, site_of[layer], fn, unspliced_at) for layer, fn in saes_fns(saes)]
            want = ref(idx).logits
            for h in handles:
                h.remove()
            out.append((model(idx, hooks=splice_hooks(saes, idx, keep)), want))
    return out, plain


def saes_fns(saes):
    return [(layer, lambda x, s=sae: s(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)) for layer, sae in saes]


def tokens(bos, seed=0):
    idx = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))
    idx[:, 0] = bos
    idx[1, 9] = bos  # a kept position mid-window too
    return idx


@pytest.mark.parametrize("folder,hook,site,d", [
    ("attn_out_all", "model.layers.2.self_attn.o_proj.input", "attn_z", HEADS),
    ("mlp_out_all", "model.layers.2.post_feedforward_layernorm.output", "mlp_out", 64)])
def test_gemma_scope_2_attn_and_mlp_sae_splice_equals_transformers_at_its_hook_point(tmp_path, folder, hook, site, d):
    ref = make_hf_checkpoint(tmp_path / "m", HUBS["gemma3"])
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    files, params = release_files(tmp_path, 2, site=folder, hook=hook, d=d)
    path = str(next(iter(files.values())).parent)
    [(layer, sae)] = load_saes([path], None, model, "cpu")
    assert (layer, sae.site) == (2, site)
    x = torch.randn(5, d)
    with torch.no_grad():
        assert rel_err(sae(x), saelens_jumprelu(params, x)[1]) < 1e-6
    pairs, plain = spliced_pair(ref, model, "gemma3", [(2, sae)], {2: site}, tokens(2), 2)
    for got, want in pairs:
        assert rel_err(want, plain) > 1e-2  # the reconstruction is not the activation
        assert rel_err(got, want) < 1e-5
    # adapters: for this JumpReLU SAE inside block 2, block 2 feeds it: the layers after it only (as a residual SAE)
    assert layers_around_saes(None, [(2, sae)], 6) == [3, 4, 5]
    with pytest.raises(ValueError, match=r"LoRA layers \[0, 1, 2\] feed a JumpReLU SAE"):
        layers_around_saes("all", [(2, sae)], 6)


@pytest.mark.parametrize("kind,site,d", [("att", "attn_z", HEADS), ("mlp", "mlp_out", 64)])
def test_gemma_scope_att_and_mlp_saes_on_gemma2_from_the_hub_cache(cache, tmp_path, kind, site, d):  # noqa: F811
    """Gemma Scope's google/gemma-scope-2b-pt-{att,mlp}/layer_L/width_16k/average_l0_N/params.npz, offline: SAELens
    names their hooks blocks.L.attn.hook_z (d_in n_head * head_dim) and blocks.L.hook_mlp_out (get_gemma_2_config_
    from_hf)."""
    ref = make_hf_checkpoint(tmp_path / "m", HUBS["gemma2"])
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    g = torch.Generator().manual_seed(1)
    w = {k: torch.randn(*s, generator=g) * 0.3 for k, s in
         (("W_enc", (d, 96)), ("W_dec", (96, d)), ("b_enc", (96,)), ("b_dec", (d,)), ("threshold", (96,)))}
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in w.items()})
    repo, sub = f"google/gemma-scope-2b-pt-{kind}", "layer_1/width_16k/average_l0_50"
    put(cache, repo, {f"{sub}/params.npz": tmp_path / "params.npz"})
    [(layer, sae)] = load_saes([f"{repo}/{sub}"], None, model, "cpu")
    assert (layer, sae.site, sae.positions) == (1, site, "no_bos_eos")
    assert sae.hook_name == f"blocks.1.{'attn.hook_z' if kind == 'att' else 'hook_mlp_out'}"
    jump = {"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
            "threshold": w["threshold"]}
    fns = [(1, lambda x: saelens_jumprelu(jump, x)[1])]
    with torch.no_grad():
        plain = ref(tokens(2)).logits
        for keep in ((), (2,)):
            idx = tokens(2)
            unspliced_at = (idx == 2)[..., None] if keep else None
            handles = [hf_splice(ref, "gemma2", 1, site, fn, unspliced_at) for _, fn in fns]
            want = ref(idx).logits
            for h in handles:
                h.remove()
            got = model(idx, hooks=splice_hooks([(1, sae)], idx, keep))
            assert rel_err(want, plain) > 1e-2 and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family,site", [("gemma3", "attn_out"), ("llama3", "attn_out"), ("llama3", "mlp_out")])
def test_saelens_attn_out_and_mlp_out_saes_read_transformer_lens_hook_points(tmp_path, family, site):
    """SAELens-format TopK SAEs on blocks.1.hook_attn_out / hook_mlp_out: Gemma's after the sublayer's post-norm,
    Llama's (no post-norm) o_proj's and the MLP's own outputs."""
    ref = make_hf_checkpoint(tmp_path / "m", HUBS[family])
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    torch.manual_seed(0)
    sae = SAE(64, 256, "topk", k=8, layer=1)
    sae.hook_name = f"blocks.1.hook_{site}"
    sae.save(str(tmp_path / "sae"))
    [(layer, loaded)] = load_saes([str(tmp_path / "sae")], None, model, "cpu")
    assert (layer, loaded.site) == (1, site)
    bos = model.cfg.bos_token_id
    pairs, plain = spliced_pair(ref, model, family, [(1, loaded)], {1: site}, tokens(bos), bos)
    for got, want in pairs:
        assert rel_err(want, plain) > 1e-2 and rel_err(got, want) < 1e-5


def test_hooks_the_splice_cannot_serve_are_one_line_naming_what_it_serves(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-gemma3"))
    sae = SAE(64, 128, "topk", k=4, layer=1)
    sae.hook_name = "blocks.1.hook_resid_mid"
    sae.save(str(tmp_path / "mid"))
    with pytest.raises(ValueError, match=r"reads blocks.1.hook_resid_mid, which the splice cannot replace; it serves "
                                         r"blocks.L.hook_resid_post .*attn.hook_z.*hook_attn_out.*hook_mlp_out") as e:
        load_saes([str(tmp_path / "mid")], None, model, "cpu")
    assert "\n" not in str(e.value)
    sae.hook_name = "blocks.1.attn.hook_z"
    sae.save(str(tmp_path / "wide"))  # 64 wide; this model's heads are 4 x 16 = 64 too: accepted
    assert load_saes([str(tmp_path / "wide")], None, model, "cpu")[0][1].site == "attn_z"
    narrow = Transformer(ModelConfig(**{**ModelConfig.from_name("tiny-gemma3").__dict__, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"d_in=64 but the model's attention heads' output \(attn.hook_z\) has "
                                         r"n_head \* head_dim=32"):
        load_saes([str(tmp_path / "wide")], None, narrow, "cpu")
    import json
    cfg = json.load(open(tmp_path / "wide" / "cfg.json"))
    cfg["metadata"]["hook_head_index"] = 3
    json.dump(cfg, open(tmp_path / "wide" / "cfg.json", "w"))
    with pytest.raises(ValueError, match=r"an SAE on head 3 of blocks.1.attn.hook_z only: not supported"):
        SAE.from_pretrained(str(tmp_path / "wide"))


def test_generation_with_saes_inside_blocks_equals_the_full_spliced_forward(tmp_path):
    """evals/generate.py's cached decoding runs model.Block.forward with the cached attention: an attn.hook_z SAE at
    block 1, an MLP-output SAE at block 2 and a transcoder at block 4 give the same text as the full forward with the
    same hooks at every step (tests/test_generate.py's recomputation), and not the text without them."""
    from evals.generate import generate
    from evals.multiple_choice import hooks_for
    from tests.test_generate import HUBS as GEN_HUBS, NEW, check_margins, prompts, recompute
    make_hf_checkpoint(tmp_path / "m", {**GEN_HUBS["gemma3"], "head_dim": 8})
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    torch.manual_seed(0)
    saes = []
    for layer, hook, d in ((1, "attn.hook_z", HEADS), (2, "hook_mlp_out", 64), (4, None, 64)):
        sae = SAE(d, 4 * d, "topk", k=8, layer=layer, apply_b_dec_to_input=hook is not None)
        sae.hook_name, sae.transcoder = hook and f"blocks.{layer}.{hook}", hook is None
        saes.append((layer, sae.eval()))
    assert [s.site for _, s in saes] == ["attn_z", "mlp_out", "transcoder"]
    ps, keep = prompts(model, seed=6), (model.cfg.bos_token_id,)
    plain, _ = recompute(model, ps, lambda idx, n: {})
    want, logits = recompute(model, ps, lambda idx, n: splice_hooks(saes, idx, keep))
    check_margins(logits, want)
    assert want != plain
    assert generate(model, ps, NEW, eos=(), hooks_for=hooks_for(saes, keep)) == want
