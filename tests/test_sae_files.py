"""formats/sae_files.py: every release format against its own reference arithmetic, the SAELens save round trip,
one-line errors, layers from folder and hook names, the known-SAE table."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from formats.sae_files import sae_from_spec
from sae import SAE
from tests.test_sae import D, M, K, rand_sae, x_in  # the shared helpers
from tests.tol import assert_close


# ----------------------------------------------------------------------------------------------------------------------
# File formats, each against its own reference arithmetic (computed here with numpy / plain torch)


def gemma_scope_params(seed=0):
    rng = np.random.default_rng(seed)
    return dict(W_enc=rng.normal(0, 0.5, (D, M)).astype(np.float32),
                W_dec=rng.normal(0, 0.5, (M, D)).astype(np.float32),
                b_enc=rng.normal(0, 0.5, M).astype(np.float32), b_dec=rng.normal(0, 0.5, D).astype(np.float32),
                threshold=np.r_[-0.5 * np.ones(8), rng.uniform(0.2, 1.0, M - 8)].astype(np.float32))  # a few < 0


def gemma_scope_reference(p, x):
    pre = x @ p["W_enc"] + p["b_enc"]  # no b_dec subtraction at the input
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    return acts @ p["W_dec"] + p["b_dec"], acts


def test_gemma_scope_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    p = gemma_scope_params()
    np.savez(folder / "params.npz", **p)
    x = x_in(20).numpy()
    ref, acts = gemma_scope_reference(p, x)
    assert 0 < (acts > 0).mean() < 0.9  # the threshold actually cuts
    pre = x @ p["W_enc"] + p["b_enc"]
    assert ((pre < 0) & (pre > p["threshold"])).any()  # the ReLU in Gemma Scope's arithmetic matters too
    for path in (folder, folder / "params.npz"):
        sae = SAE.from_pretrained(str(path))
        assert (sae.arch, sae.apply_b_dec_to_input, sae.layer) == ("jumprelu", False, 12)
        assert sae.model_name == "google/gemma-2-2b" and sae.hook_name == "blocks.12.hook_resid_post"
        np.testing.assert_allclose(sae(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).detach().numpy(), acts, rtol=1e-5, atol=1e-5)


def saelens_tensors(seed=0, threshold=False):
    g = torch.Generator().manual_seed(seed)
    t = dict(W_enc=torch.randn(D, M, generator=g) * 0.5, W_dec=torch.randn(M, D, generator=g) * 0.5,
             b_enc=torch.randn(M, generator=g) * 0.5, b_dec=torch.randn(D, generator=g) * 0.5)
    if threshold:
        t["threshold"] = torch.rand(M, generator=g) * 0.8 + 0.1
    return t


def saelens_reference(t, x, arch, k=None, apply_b_dec=True, rescale=False):
    W_enc, W_dec = t["W_enc"], t["W_dec"]
    sae_in = x - t["b_dec"] * apply_b_dec
    hidden_pre = sae_in @ W_enc + t["b_enc"]
    if rescale:  # v6 TopK: select on pre * |decoder row|, decode with unit rows
        norm = W_dec.norm(dim=-1)
        hidden_pre, W_dec = hidden_pre * norm, W_dec / norm[:, None]
    if arch == "topk":
        top = torch.topk(hidden_pre, k=k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())
    elif arch == "jumprelu":
        acts = hidden_pre.relu() * (hidden_pre > t["threshold"])
    else:
        acts = hidden_pre.relu()
    return acts @ W_dec + t["b_dec"]


def write_saelens(folder, cfg, tensors):
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


V6_META = dict(model_name="gemma-2-2b", hook_name="blocks.5.hook_resid_post", hook_head_index=None,
               sae_lens_version="6.5.0", sae_lens_training_version="6.5.0")


@pytest.mark.parametrize("arch,rescale", [("topk", False), ("topk", True), ("jumprelu", False)])
def test_saelens_v6(tmp_path, arch, rescale):
    t = saelens_tensors(threshold=arch == "jumprelu")
    cfg = dict(architecture=arch, d_in=D, d_sae=M, dtype="float32", device="cpu", apply_b_dec_to_input=True,
               normalize_activations="none", reshape_activations="none", metadata=V6_META)
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=rescale)
    write_saelens(tmp_path, cfg, t)
    sae = SAE.from_pretrained(str(tmp_path))
    assert (sae.arch, sae.layer, sae.model_name) == (arch, 5, "gemma-2-2b")
    x = x_in(4, 9)
    assert_close(sae(x), saelens_reference(t, x, arch, K, rescale=rescale), 1e-5)


@pytest.mark.parametrize("act", ["topk", "relu"])
def test_saelens_pre_v6(tmp_path, act):
    t = saelens_tensors(seed=3)
    cfg = dict(d_in=D, d_sae=M, dtype="torch.float32", device="cpu", model_name="gpt2-small",
               hook_point="blocks.2.hook_resid_pre", hook_point_layer=2, hook_point_head_index=None,
               activation_fn_str=act, activation_fn_kwargs={"k": K} if act == "topk" else {},
               apply_b_dec_to_input=False, normalize_activations=False, finetuning_scaling_factor=False,
               sae_lens_training_version="3.13.0")
    write_saelens(tmp_path, cfg, t)
    sae = SAE.from_pretrained(str(tmp_path))
    # block 2's input is block 1's output: spliced after block 1 (model(idx, hooks={sae.layer: sae}))
    assert sae.layer == 1 and sae.hook_name == "blocks.2.hook_resid_pre" and sae.model_name == "gpt2-small"
    assert sae.arch == ("topk" if act == "topk" else "jumprelu") and not sae.apply_b_dec_to_input
    x = x_in(11)
    ref = saelens_reference(t, x, "topk" if act == "topk" else "relu", K, apply_b_dec=False)
    assert_close(sae(x), ref, 1e-5)


def test_sparsify(tmp_path):
    folder = tmp_path / "layers.7"
    folder.mkdir()
    g = torch.Generator().manual_seed(5)
    t = {"encoder.weight": torch.randn(M, D, generator=g) * 0.5, "encoder.bias": torch.randn(M, generator=g) * 0.5,
         "W_dec": torch.randn(M, D, generator=g) * 0.5, "b_dec": torch.randn(D, generator=g) * 0.5}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(dict(expansion_factor=M // D, normalize_decoder=True, num_latents=M,
                                                     k=K, multi_topk=False, skip_connection=False, d_in=D)))
    sae = SAE.from_pretrained(str(folder))
    assert (sae.arch, sae.k, sae.layer, sae.apply_b_dec_to_input) == ("topk", K, 7, True)
    x = x_in(13)
    # sparsify: ReLU first, then top-k, then a sum of the chosen decoder rows
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    top_acts, top_idx = pre.topk(K, sorted=False)
    ref = (top_acts[..., None] * t["W_dec"][top_idx]).sum(-2) + t["b_dec"]
    assert_close(sae(x), ref, 1e-5)


@pytest.mark.parametrize("pre_encoder_bias,weights_dtype", [(False, torch.float32), (True, torch.float32),
                                                            (False, torch.bfloat16)])
def test_llama_scope(tmp_path, pre_encoder_bias, weights_dtype):
    hp = {"hook_point_in": "blocks.9.hook_resid_post", "hook_point_out": "blocks.9.hook_resid_post",
          "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": pre_encoder_bias, "expansion_factor": M // D,
          "d_model": D, "d_sae": M, "act_fn": "jumprelu", "jump_relu_threshold": 0.6, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 7.5, "out": 7.5}, "sparsity_include_decoder_norm": True,
          "use_glu_encoder": False, "top_k": 50, "dtype": "torch.bfloat16"}
    g = torch.Generator().manual_seed(6)
    w = {"encoder.weight": torch.randn(M, D, generator=g) * 0.5, "encoder.bias": torch.randn(M, generator=g) * 0.5,
         # decoder columns far from unit norm, so that leaving out the decoder norm would change which latents fire
         "decoder.weight": torch.randn(D, M, generator=g) * torch.rand(M, generator=g) * 2,
         "decoder.bias": torch.randn(D, generator=g) * 0.5}
    w = {k: v.to(weights_dtype) for k, v in w.items()}
    (tmp_path / "checkpoints").mkdir()
    save_file(w, str(tmp_path / "checkpoints" / "final.safetensors"))
    (tmp_path / "hyperparams.json").write_text(json.dumps(hp))
    sae = SAE.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert (sae.arch, sae.layer, sae.hook_name) == ("jumprelu", 9, "blocks.9.hook_resid_post")
    x = x_in(30) * 3
    # lm-saes arithmetic, step by step
    W_E, b_E, W_D, b_D = (w[k].float() for k in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"))
    c = math.sqrt(D) / 7.5
    xn = x * c
    if pre_encoder_bias:
        xn = xn - b_D
    h = xn @ W_E.T + b_E
    fired = h * W_D.norm(dim=0) > 0.6
    ref = ((h * fired) @ W_D.T + b_D) / c
    assert 0 < fired.float().mean() < 0.9
    assert (fired != (h > 0.6)).any()  # the decoder norm matters for this test's weights
    assert_close(sae(x), ref, 1e-4)
    assert SAE.from_pretrained(str(tmp_path)).W_enc.dtype == weights_dtype  # dtype None keeps the file's


# ----------------------------------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_save_load_round_trip(tmp_path, arch):
    sae = rand_sae(arch, k=K if arch == "topk" else None, layer=3, model_name="google/gemma-2-2b")
    sae.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]  # no temp files left
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (arch, D, M, True)
    assert cfg["normalize_activations"] == "none" and cfg.get("k") == (K if arch == "topk" else None)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "google/gemma-2-2b"
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, M) and w["W_dec"].shape == (M, D) and ("threshold" in w) == (arch == "jumprelu")
    again = SAE.from_pretrained(str(tmp_path))
    assert (again.arch, again.k, again.layer, again.model_name) == (arch, sae.k, 3, "google/gemma-2-2b")
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(again, name)), name
    x = x_in(6)
    torch.testing.assert_close(again(x), sae(x), rtol=0, atol=0)
    # and SAELens' own arithmetic agrees with what we wrote
    ref = saelens_reference({k: v.detach() for k, v in sae.named_parameters()}, x, arch, K)
    assert_close(sae(x), ref, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_error_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown SAE format; looked for params.npz.*cfg.json.*hyperparams.json"):
        SAE.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        SAE.from_pretrained(str(tmp_path / "missing"))


def test_error_d_in_mismatch():
    sae = rand_sae()
    with pytest.raises(ValueError, match=f"d_in={D}.*d_model=32"):
        sae.check_d_in(32, "layer 3")
    with pytest.raises(ValueError, match=f"d_in={D}.*d_model=8"):
        sae(torch.randn(2, 8))


def test_error_nan_weights(tmp_path):
    t = saelens_tensors()
    t["W_dec"][3, 2] = float("nan")
    write_saelens(tmp_path, dict(architecture="topk", d_in=D, d_sae=M, k=K, metadata=V6_META), t)
    with pytest.raises(ValueError, match="W_dec contains NaN or inf"):
        SAE.from_pretrained(str(tmp_path))


def test_error_k_larger_than_width(tmp_path):
    with pytest.raises(ValueError, match=f"k={M + 1} is larger than .*d_sae={M}"):
        SAE(D, M, "topk", k=M + 1)
    write_saelens(tmp_path, dict(architecture="topk", d_in=D, d_sae=M, k=M + 1, metadata=V6_META), saelens_tensors())
    with pytest.raises(ValueError, match="larger than the number of latents"):
        SAE.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="needs k > 0"):
        SAE(D, M, "topk")


def test_error_missing_threshold(tmp_path):
    p = gemma_scope_params()
    del p["threshold"]
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(ValueError, match="JumpReLU SAE without a threshold"):
        SAE.from_pretrained(str(tmp_path))
    write_saelens(tmp_path / "lens", dict(architecture="jumprelu", d_in=D, d_sae=M, metadata=V6_META),
                  saelens_tensors())
    with pytest.raises(ValueError, match="JumpReLU SAE without a threshold"):
        SAE.from_pretrained(str(tmp_path / "lens"))


def test_error_shape_mismatch_names_the_tensor(tmp_path):
    t = saelens_tensors()
    t["b_enc"] = torch.zeros(M + 1)
    write_saelens(tmp_path, dict(architecture="topk", d_in=D, d_sae=M, k=K, metadata=V6_META), t)
    with pytest.raises(ValueError, match=r"b_enc has shape \(65,\), expected \(64,\)"):
        SAE.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Layers from names, known SAEs


@pytest.mark.parametrize("name,layer", [
    ("layers.12", 12), ("model.layers.12", 12), ("gpt_neox.layers.3", 3), ("layer_12", 12),
    ("blocks.12.hook_resid_post", 12), ("L12R", 12), ("Llama3_1-8B-Base-L15R-8x", 15),
    ("layers.12.mlp", None), ("width_16k", None), ("average_l0_82", None), ("L0_64", None), ("expansion_8", None),
])
def test_layer_from_folder_names(tmp_path, name, layer):
    from formats.sae_releases import layer_from_path
    assert layer_from_path(str(tmp_path / name)) == layer
    # the deepest folder that names a layer wins (the paper's SAEs: .../expansion_8_L0_64/model.layers.12)
    assert layer_from_path(str(tmp_path / "layer_3" / "expansion_8_L0_64" / name)) == (3 if layer is None else layer)


@pytest.mark.parametrize("hook,layer", [("blocks.7.hook_resid_post", 7), ("blocks.7.hook_resid_pre", 6),
                                        ("blocks.0.hook_resid_pre", None), ("model.layers.7", 7),
                                        ("blocks.7.hook_mlp_out", 7), ("hook_embed", None), (None, None)])
def test_layer_from_hook_names(hook, layer):
    from formats.sae_releases import layer_from_hook
    assert layer_from_hook(hook) == layer


def test_sparsify_saved_as_model_layers_gets_its_layer(tmp_path):
    folder = tmp_path / "expansion_8_L0_64" / "model.layers.12"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"encoder.weight": torch.randn(M, D, generator=g), "encoder.bias": torch.zeros(M),
               "W_dec": torch.randn(M, D, generator=g), "b_dec": torch.zeros(D)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(dict(k=K, num_latents=M, d_in=D)))
    assert SAE.from_pretrained(str(folder)).layer == 12


def test_default_sae_table():
    from formats.sae_files import GEMMA_SCOPE_RES_16K, default_sae, known_saes
    assert default_sae("google/gemma-2-2b", 12) == "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    # the folders the paper's scripts use for Gemma-2-2B at layers 6, 9, 15, 18 (width 16k)
    for layer, l0 in ((6, 70), (9, 73), (15, 78), (18, 74)):
        assert default_sae("google/gemma-2-2b", layer).endswith(f"layer_{layer}/width_16k/average_l0_{l0}")
    assert default_sae("google/gemma-2-9b", 20) == "google/gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_68"
    assert [len(v[1]) for v in GEMMA_SCOPE_RES_16K.values()] == [26, 42]  # one per layer of each model
    assert default_sae("google/gemma-2-2b", 26) is None and default_sae("meta-llama/Llama-3.2-1B", 3) is None
    assert len(known_saes()) == 3  # Gemma Scope for two models, Gemma Scope 2 for every Gemma-3 (one line)


def test_from_spec_checks_and_carries_every_field():
    # the readers' common record (sae_files.read_sae) into an SAE: every field written here goes onto the SAE, every
    # bad shape or non-finite tensor is one line naming the source, and nothing is left at its random init
    import re
    gen = torch.Generator().manual_seed(0)

    def spec(**over):
        base = dict(arch="jumprelu", apply_b_dec_to_input=False, W_enc=torch.randn(4, 8, generator=gen),
                    W_dec=torch.randn(8, 4, generator=gen), b_enc=torch.randn(8, generator=gen),
                    b_dec=torch.randn(4, generator=gen), threshold=torch.rand(8, generator=gen))
        return {**base, **over}
    s = spec(layer=3, model_name="m", hook_name="blocks.3.ln2.hook_normalized", transcoder=True,
             W_skip=torch.randn(4, 4, generator=gen), format="gemma_scope_2", positions="all", source="here")
    sae = sae_from_spec(s)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip"):
        assert torch.equal(getattr(sae, name), s[name]) and isinstance(getattr(sae, name), torch.nn.Parameter), name
    assert (sae.layer, sae.model_name, sae.hook_name, sae.transcoder, sae.source_format, sae.positions) == \
        (3, "m", "blocks.3.ln2.hook_normalized", True, "gemma_scope_2", "all")
    plain = sae_from_spec(spec())
    assert plain.transcoder is False and plain.W_skip is None and plain.positions == "no_bos"
    assert plain.source_format is None and plain.layer is None
    for dtype in ("torch.float64", "float64", torch.float64):  # as a flag, as cfg.json spells it, as a dtype
        assert {p.dtype for p in sae_from_spec(spec(), dtype=dtype).parameters()} == {torch.float64}
    assert sae_from_spec(spec(dtype=torch.float64)).W_dec.dtype == torch.float64  # the record's own dtype
    b = sae_from_spec(spec(arch="batchtopk", k=2, threshold=None))  # no topk_threshold recorded: 0
    assert b.topk_threshold.shape == () and b.topk_threshold.item() == 0.0
    assert sae_from_spec(spec(arch="batchtopk", k=2, topk_threshold=torch.tensor([0.5]))).topk_threshold.item() == 0.5
    for over, msg in [
            (dict(W_enc=torch.randn(4)), "SAE: W_enc and W_dec must be matrices, got (4,), "),
            (dict(W_dec=torch.randn(8)), "SAE: W_enc and W_dec must be matrices, got (4, 8), (8,)"),
            (dict(b_dec=torch.randn(3), source="f"), "f: b_dec has shape (3,), expected (4,) for d_in=4, d_sae=8"),
            (dict(W_dec=torch.randn(8, 3)), "SAE: W_dec has shape (8, 3), expected (8, 4)"),
            (dict(b_enc=torch.randn(7)), "SAE: b_enc has shape (7,), expected (8,)"),
            (dict(threshold=torch.rand(7)), "SAE: threshold has shape (7,), expected (8,)"),
            (dict(W_skip=torch.randn(4, 3)), "SAE: W_skip has shape (4, 3), expected (4, 4)"),
            (dict(b_enc=torch.full((8,), math.nan)), "SAE: b_enc contains NaN or inf values"),
            (dict(arch="batchtopk", k=2, topk_threshold=torch.tensor(math.inf)), "SAE: topk_threshold contains NaN"),
            (dict(arch="topk", k=9), "SAE: k=9 is larger than the number of latents d_sae=8")]:
        with pytest.raises(ValueError, match="^" + re.escape(msg)):
            sae_from_spec(spec(**over))
