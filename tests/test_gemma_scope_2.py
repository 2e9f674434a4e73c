"""Gemma Scope 2 (Gemma-3's SAEs, google/gemma-scope-2-*) in the hub's layout, made locally: a folder per SAE with
params.safetensors (w_enc, w_dec, b_enc, b_dec, threshold) and config.json (architecture, model_name,
hf_hook_point_in), as SAELens' gemma_3 loader reads them (sae_lens/loading/pretrained_sae_loaders.py,
get_gemma_3_config_from_hf / gemma_3_sae_huggingface_loader); offline from an HF cache and online from a fake hub."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from plumbing.embedded import default_saes
from sae import SAE
from formats.sae_files import default_sae
from tests.test_hub import ROOT, cache, fake_hub, put, sp_file, tiny_model_repo  # noqa: F401 (fixtures)
from tests.tol import assert_close

REPO = "google/gemma-scope-2-1b-pt"
D, M = 64, 128  # the tiny Gemma-3's d_model


def release_files(tmp_path, layer, site="resid_post_all", hook=None, d=D, m=M, seed=0, config=True, skip=False):
    """{path in the repo: local file} of one Gemma Scope 2 folder; thresholds partly negative, as trained ones can
    be near 0 (relu(pre) * (pre > t) must still hold)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    name = f"layer_{layer}_width_16k_l0_small" + ("_affine" if skip else "")
    src = tmp_path / "src" / site / name
    src.mkdir(parents=True)
    params = {"w_enc": r(d, m), "w_dec": r(m, d), "b_enc": r(m), "b_dec": r(d), "threshold": r(m) * 0.5}
    if skip:
        params["affine_skip_connection"] = r(d, d)
    save_file(params, str(src / "params.safetensors"))
    files = {f"{site}/{name}/params.safetensors": src / "params.safetensors"}
    if config:
        raw = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
               "hf_hook_point_in": hook or f"model.layers.{layer}.output", "width": m, "l0": "small"}
        if skip:
            raw.update(hf_hook_point_in=f"model.layers.{layer}.pre_feedforward_layernorm.output",
                       hf_hook_point_out=f"model.layers.{layer}.post_feedforward_layernorm.output",
                       affine_connection=True)
        (src / "config.json").write_text(json.dumps(raw))
        files[f"{site}/{name}/config.json"] = src / "config.json"
    return files, params


def saelens_jumprelu(params, x):
    """SAELens' JumpReLUSAE with apply_b_dec_to_input=False (what gemma_3_sae_huggingface_loader configures):
    hidden_pre = x @ W_enc + b_enc; feature_acts = relu(hidden_pre) * (hidden_pre > threshold);
    sae_out = feature_acts @ W_dec + b_dec."""
    pre = x @ params["w_enc"] + params["b_enc"]
    acts = torch.relu(pre) * (pre > params["threshold"])
    return acts, acts @ params["w_dec"] + params["b_dec"]


def test_resid_post_sae_from_the_cache_offline_matches_saelens_maths(cache, tmp_path):
    files, params = release_files(tmp_path, 7)
    neighbours, _ = release_files(tmp_path, 7, site="transcoder_all", skip=True, seed=1)
    put(cache, REPO, {**files, **neighbours})
    sae = SAE.from_pretrained(f"{REPO}/resid_post_all/layer_7_width_16k_l0_small")
    assert (sae.arch, sae.layer, sae.hook_name, sae.model_name) == (
        "jumprelu", 7, "blocks.7.hook_resid_post", "google/gemma-3-1b-pt")
    assert sae.source_format == "gemma_scope_2" and not sae.apply_b_dec_to_input
    x = torch.randn(5, 3, D) * 2
    acts, recon = saelens_jumprelu(params, x)
    assert (acts > 0).any() and (acts == 0).any() and (params["threshold"] < 0).any()
    with torch.no_grad():
        assert_close(sae.encode(x), acts, 1e-6)
        assert_close(sae(x), recon, 1e-6)


def test_site_and_layer_from_the_folder_without_config_json(cache, tmp_path):
    files, params = release_files(tmp_path, 3, config=False)
    put(cache, REPO, files)
    sae = SAE.from_pretrained(f"{REPO}/resid_post_all/layer_3_width_16k_l0_small")
    assert (sae.layer, sae.hook_name, sae.model_name) == (3, "blocks.3.hook_resid_post", "google/gemma-3-1b-pt")


def test_online_downloads_only_the_folders_two_files(cache, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files, _ = release_files(tmp_path, 12)
    others, _ = release_files(tmp_path, 13)
    fake_hub(monkeypatch, {REPO: {**files, **others, "README.md": b""}}, cache)
    sae = SAE.from_pretrained(f"{REPO}/resid_post_all/layer_12_width_16k_l0_small")
    assert sae.layer == 12
    assert sorted(monkeypatch.fetched) == sorted((REPO, f) for f in files)


def test_cross_layer_transcoders_are_refused_in_one_line_mlp_out_saes_load(cache, tmp_path):
    from formats.sae_files import load_saes
    from model import ModelConfig, Transformer
    clt, _ = release_files(tmp_path, 2, site="clt", seed=3)
    mlp, _ = release_files(tmp_path, 2, site="mlp_out_all",
                           hook="model.layers.2.post_feedforward_layernorm.output", seed=2)
    put(cache, REPO, {**clt, **mlp})
    with pytest.raises(ValueError, match="cross-layer transcoder .*not supported") as e:
        SAE.from_pretrained(f"{REPO}/clt/layer_2_width_16k_l0_small")
    assert "\n" not in str(e.value)
    path = f"{REPO}/mlp_out_all/layer_2_width_16k_l0_small"
    assert SAE.from_pretrained(path).hook_name == "blocks.2.hook_mlp_out"
    model = Transformer(ModelConfig.from_name("tiny-gemma3"))
    assert load_saes([path], None, model, "cpu")[0][1].site == "mlp_out"  # spliced: tests/test_sublayer_saes.py


# ----------------------------------------------------------------------------------------------------------------------
# Transcoders: block L's MLP sublayer replaced by the transcoder of its normalised input


def release_forward(params, x):
    """The release's own definition of its SAEs and transcoders: the forward of the JumpReLUSAE class in Google's
    Gemma Scope 2 tutorial, as written there (input_acts = x; every matrix applied as x @ W, the skip too):
        pre_acts = input_acts @ w_enc + b_enc; acts = mask * relu(pre_acts), mask = (pre_acts > threshold)
        recon = acts @ w_dec + b_dec; forward: recon + x @ affine_skip_connection (folders named _affine)"""
    pre_acts = x @ params["w_enc"] + params["b_enc"]
    mask = (pre_acts > params["threshold"])
    acts = mask * torch.nn.functional.relu(pre_acts)
    recon = acts @ params["w_dec"] + params["b_dec"]
    if "affine_skip_connection" in params:
        return recon + x @ params["affine_skip_connection"]
    return recon


@pytest.mark.parametrize("skip", [True, False], ids=["affine", "plain"])
def test_transcoder_loads_with_its_affine_skip_as_the_release_defines_it(cache, tmp_path, skip):
    files, params = release_files(tmp_path, 2, site="transcoder_all", skip=skip)
    put(cache, REPO, files)
    tc = SAE.from_pretrained(f"{REPO}/transcoder_all/layer_2_width_16k_l0_small" + ("_affine" if skip else ""))
    assert tc.transcoder and tc.layer == 2 and tc.hook_name == "blocks.2.ln2.hook_normalized"
    assert (tc.W_skip is not None) == skip
    x = torch.randn(7, D)
    with torch.no_grad():
        assert_close(tc(x), release_forward(params, x), 1e-6)
        if skip:  # the skip term is not negligible in this fixture, nor the orientation of its matrix
            assert (tc(x) - saelens_jumprelu(params, x)[1]).norm() > 0.1 * tc(x).norm()
            transposed = {**params, "affine_skip_connection": params["affine_skip_connection"].T}
            assert (tc(x) - release_forward(transposed, x)).norm() > 0.1 * tc(x).norm()


def hf_with_transcoder(ref, layer, params, unspliced_at=None):
    """transformers' model with Gemma Scope 2's definition of a transcoder at `layer`: hf_hook_point_in
    (pre_feedforward_layernorm's output) in, hf_hook_point_out (post_feedforward_layernorm's output) replaced by its
    reconstruction; unspliced_at (B, T, 1) keeps the original output there."""
    block, seen = ref.model.layers[layer], {}
    handles = [block.pre_feedforward_layernorm.register_forward_hook(lambda m, i, o: seen.update(h=o)),
               block.post_feedforward_layernorm.register_forward_hook(
                   lambda m, i, o: release_forward(params, seen["h"]) if unspliced_at is None
                   else torch.where(unspliced_at, o, release_forward(params, seen["h"])))]
    return handles


def test_spliced_transcoder_equals_transformers_with_gemma_scope_2_hook_points(tmp_path):
    from splice import splice_hooks
    from model import Transformer
    from fixtures.hf_refs import TINY_GEMMA3, make_hf_checkpoint, rel_err
    ref = make_hf_checkpoint(tmp_path / "m", TINY_GEMMA3)
    model = Transformer.from_pretrained(str(tmp_path / "m"))
    files, params = release_files(tmp_path, 2, site="transcoder_all", skip=True)
    tc = SAE.from_pretrained(str(files["transcoder_all/layer_2_width_16k_l0_small_affine/params.safetensors"].parent))
    idx = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = 2  # BOS
    with torch.no_grad():
        plain = ref(idx).logits
        for keep in ((), (2,)):
            unspliced_at = (idx == 2)[..., None] if keep else None
            handles = hf_with_transcoder(ref, 2, params, unspliced_at)
            want = ref(idx).logits
            for h in handles:
                h.remove()
            got = model(idx, hooks=splice_hooks([(2, tc)], idx, keep))
            assert rel_err(want, plain) > 1e-2  # the transcoder is not the MLP
            assert rel_err(got, want) < 1e-5, keep


def test_eq7_with_a_transcoder_equals_the_plain_replacement_in_value_and_gradient(tmp_path):
    """adapt.py's path (original_pass, spliced_pass through splice_hooks' MLP hook, chunked kl_and_ce) against Eq. 7
    written plainly with block 2's MLP sublayer overridden by the transcoder (no hooks), LoRA on every layer."""
    from lora import adapters_disabled, apply_lora, lora_modules
    from model import ModelConfig, Transformer
    from splice import kl_and_ce, original_pass, spliced_pass
    import torch.nn.functional as F
    model = Transformer(ModelConfig.from_name("tiny-gemma3")).init_weights(0).requires_grad_(False)
    params = apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    files, _ = release_files(tmp_path, 2, site="transcoder_all", skip=True)
    tc = SAE.from_pretrained(str(files["transcoder_all/layer_2_width_16k_l0_small_affine/params.safetensors"].parent))
    tc.requires_grad_(False)
    idx = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = 2
    with torch.no_grad(), adapters_disabled(model):
        logp_orig = F.log_softmax(model(idx)[:, :-1], dim=-1)
    block = model.model.layers[2]
    block.mlp_out = lambda h: torch.where((idx == 2)[..., None], type(block).mlp_out(block, h), tc(h))
    logp = F.log_softmax(model(idx)[:, :-1], dim=-1)
    del block.mlp_out
    ref = (logp_orig.exp() * (logp_orig - logp)).sum(-1).mean()
    g_ref = torch.autograd.grad(ref, params)
    with torch.no_grad(), adapters_disabled(model):
        h_orig, prefix = original_pass(model, idx, 2, share_prefix=False)
    h = spliced_pass(model, [(2, tc)], idx, (2,), prefix=prefix)
    kl = kl_and_ce(model, h_orig, h, idx, chunk=16)[0].mean()
    g = torch.autograd.grad(kl, params)
    assert ref.item() > 1e-3
    assert_close(kl, ref, 1e-5)
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-4)


def test_adapt_around_a_gemma_scope_2_transcoder_offline(tmp_path, sp_file):  # noqa: F811
    """python adapt.py --sae .../transcoder_all/layer_1_..._affine: LoRA on the layers after it only (its JumpReLU
    reads block 1's MLP input), the held-out table for the spliced transcoder."""
    root = tmp_path / "hf" / "hub"
    _, files = tiny_model_repo(tmp_path, "gemma3", sp_file)
    put(root, "google/gemma-3-1b-pt", files)
    tc_files, _ = release_files(tmp_path, 1, site="transcoder_all", skip=True)
    put(root, REPO, tc_files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1",
           "LORASAE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "adapt.py", "--model", "google/gemma-3-1b-pt", "--sae",
           f"{REPO}/transcoder_all/layer_1_width_16k_l0_small_affine", "--max-tokens", "512", "--seq-len", "32",
           "--eval-tokens", "256", "--compile", "false", "--rank", "4", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "o" / "results.json"))
    assert res["sae_layers"] == [1] and res["lora_layers"] == [2, 3, 4, 5]
    proc = subprocess.run([*cmd[:-1], str(tmp_path / "o2"), "--lora-layers", "all"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "feed a JumpReLU SAE" in proc.stderr, proc.stderr


def test_default_sae_per_gemma3_size_and_layer():
    assert default_sae("google/gemma-3-1b-pt", 12) == f"{REPO}/resid_post_all/layer_12_width_16k_l0_small"
    assert default_sae("google/gemma-3-27b-it", 61) == \
        "google/gemma-scope-2-27b-it/resid_post_all/layer_61_width_16k_l0_small"
    assert default_sae("google/gemma-3-270m-pt", 18) is None and default_sae("google/gemma-3-2b-pt", 1) is None
    assert default_sae("google/gemma-2-2b", 12).endswith("layer_12/width_16k/average_l0_82")  # Gemma Scope kept
    with pytest.raises(ValueError, match=r"google/gemma-3-\{270m,1b,4b,12b,27b\}-\{pt,it\} with --layer L"):
        default_saes("google/gemma-3-1b-pt", [])


def test_adapt_gemma3_with_its_default_gemma_scope_2_sae_offline(tmp_path, sp_file):  # noqa: F811
    """python adapt.py --model google/gemma-3-1b-pt --layer 1 on a cluster node: the model (here the tiny Gemma-3
    under that id) and Gemma Scope 2's default SAE come from a filled cache with HF_HUB_OFFLINE=1."""
    root = tmp_path / "hf" / "hub"
    _, files = tiny_model_repo(tmp_path, "gemma3", sp_file)
    put(root, "google/gemma-3-1b-pt", files)
    sae_files, _ = release_files(tmp_path, 1)
    put(root, REPO, sae_files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1",
           "LORASAE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "adapt.py", "--model", "google/gemma-3-1b-pt", "--layer", "1", "--max-tokens", "512",
           "--seq-len", "32", "--eval-tokens", "256", "--compile", "false", "--rank", "4", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "o" / "results.json"))
    assert res["config"]["sae"] == [f"{REPO}/resid_post_all/layer_1_width_16k_l0_small"]
    assert res["sae_layers"] == [1] and res["lora_layers"] == [2, 3, 4, 5]  # JumpReLU: only the layers after it
