"""formats/sae_files.py's dictionary_learning (`ae.pt` + `config.json`) and Qwen Scope (`layerN.sae.pt`) readers, on
files written here in those layouts, against the references' own code: SAEBench's custom_saes loaders and SAE classes
(the sae-bench package, which reads dictionary_learning's files), dictionary_learning's encode / decode transcribed from
its dictionary.py and trainers/ where SAEBench has no class, and SAELens' Qwen Scope loader's arithmetic."""
import json
import os
import sys
import types

import pytest
import torch

from sae import SAE
from tests.need import need
from tests.test_sae import D, M, K, x_in
from tests.tol import assert_close

LM = "Qwen/Qwen3-1.7B"  # config.json's lm_name: SAEBench checks that its model_name is part of it


@pytest.fixture(scope="module")
def sb():
    """SAEBench's custom_saes modules. base_sae.py imports transformer_lens at its top for a type the loaders never
    use: stubbed when it is absent, and removed again afterwards."""
    need("sae_bench")
    added = []
    if "transformer_lens" not in sys.modules:
        try:
            import transformer_lens  # noqa: F401
        except ImportError:
            stub = types.ModuleType("transformer_lens")
            stub.HookedTransformer = type("HookedTransformer", (), {})
            sys.modules["transformer_lens"] = stub
            added.append("transformer_lens")
    import sae_bench.custom_saes.batch_topk_sae as batch_topk
    import sae_bench.custom_saes.gated_sae as gated
    import sae_bench.custom_saes.jumprelu_sae as jumprelu
    import sae_bench.custom_saes.relu_sae as relu
    import sae_bench.custom_saes.topk_sae as topk
    yield types.SimpleNamespace(relu=relu, gated=gated, jumprelu=jumprelu, topk=topk, batch_topk=batch_topk)
    for name in added:
        del sys.modules[name]


def unit_rows(w):  # SAEBench refuses decoders whose latent directions are not unit vectors
    return w / w.norm(dim=-1, keepdim=True)


def state_dict(cls, seed=0):
    """Random weights in the state-dict layout of dictionary_learning's `cls` (nn.Linear weights are (out, in))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    lin = {"encoder.weight": r(M, D), "decoder.weight": unit_rows(r(M, D)).t().contiguous()}
    if cls == "AutoEncoder":  # decoder columns left unnormalised: from_pretrained normalises them
        return {**lin, "decoder.weight": r(D, M) * 3, "encoder.bias": r(M), "bias": r(D)}
    if cls == "AutoEncoderNew":
        return {**lin, "encoder.bias": r(M), "decoder.bias": r(D)}
    if cls == "GatedAutoEncoder":
        return {"encoder.weight": lin["encoder.weight"], "decoder.weight": lin["decoder.weight"],
                "decoder_bias": r(D), "r_mag": r(M), "gate_bias": r(M), "mag_bias": r(M)}
    if cls == "JumpReluAutoEncoder":
        thr = torch.cat([-0.3 * torch.ones(4), torch.rand(M - 4, generator=g) * 0.8 + 0.1])  # a few below zero
        return {"W_enc": r(D, M), "b_enc": r(M), "W_dec": unit_rows(r(M, D)), "b_dec": r(D), "threshold": thr}
    top = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.4)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {**top, "W_enc": r(D, M), "b_enc": r(M), "W_dec": unit_rows(r(M, D)), "b_dec": r(D),
                "group_sizes": torch.tensor([M // 4, M - M // 4])}
    return {**lin, **top, "encoder.bias": r(M), "b_dec": r(D)}


TRAINER = {"AutoEncoder": "StandardTrainer", "AutoEncoderNew": "StandardTrainerAprilUpdate",
           "GatedAutoEncoder": "GatedSAETrainer", "JumpReluAutoEncoder": "JumpReluTrainer",
           "AutoEncoderTopK": "TopKTrainer", "BatchTopKSAE": "BatchTopKTrainer",
           "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer"}


def write(folder, cls, sd, layer=9, **trainer):
    """A run folder as dictionary_learning's training.py writes it: ae.pt (torch.save of the state dict) and
    config.json {"trainer": trainer.config, "buffer": ...}."""
    os.makedirs(folder, exist_ok=True)
    torch.save(sd, os.path.join(folder, "ae.pt"))
    config = {"trainer": {"trainer_class": TRAINER[cls], "dict_class": cls, "activation_dim": D, "dict_size": M,
                          "layer": layer, "lm_name": LM, "submodule_name": f"resid_post_layer_{layer}",
                          **({"k": K} if "TopK" in cls else {}), **trainer},
              "buffer": {"d_submodule": D, "ctx_len": 128}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def saebench_load(sb, monkeypatch, folder, cls):
    """The SAE that SAEBench's own loader builds from the folder (hf_hub_download pointed at it)."""
    loaders = {"AutoEncoder": (sb.relu, "load_dictionary_learning_relu_sae"),
               "GatedAutoEncoder": (sb.gated, "load_dictionary_learning_gated_sae"),
               "JumpReluAutoEncoder": (sb.jumprelu, "load_dictionary_learning_jump_relu_sae"),
               "AutoEncoderTopK": (sb.topk, "load_dictionary_learning_topk_sae"),
               "BatchTopKSAE": (sb.batch_topk, "load_dictionary_learning_batch_topk_sae"),
               "MatryoshkaBatchTopKSAE": (sb.batch_topk, "load_dictionary_learning_matryoshka_batch_topk_sae")}
    module, fn = loaders[cls]
    monkeypatch.setattr(module, "hf_hub_download", lambda repo_id, filename, **kw: os.path.join(folder, filename))
    return getattr(module, fn)("local", "ae.pt", "Qwen3-1.7B", torch.device("cpu"), torch.float32).eval()


@pytest.mark.parametrize("cls", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
                                 "BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_against_saebench(tmp_path, sb, monkeypatch, cls):
    folder = write(tmp_path / "resid_post_layer_9" / "trainer_0", cls, state_dict(cls))
    ref = saebench_load(sb, monkeypatch, folder, cls)
    ours = SAE.from_pretrained(folder)
    assert (ours.layer, ours.hook_name, ours.model_name) == (9, "blocks.9.hook_resid_post", LM)
    assert ours.arch == {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                         "MatryoshkaBatchTopKSAE": "batchtopk"}.get(cls, "jumprelu")
    x = x_in(64) * 2
    with torch.no_grad():
        f_ref = ref.encode(x)
        assert 0 < (f_ref > 0).float().mean() < 0.9  # the sparsity rule actually cuts
        assert_close(ours(x), ref(x), 1e-5)
        if cls == "AutoEncoderTopK":  # topk codes; the others: the same latents, scaled as SAEBench scales them
            assert (ours.encode(x) > 0).sum(-1).eq(K).all()
        if cls != "AutoEncoder":  # SAEBench normalises the ReLU SAE's decoder as we do; the rest keep their scale
            assert_close(ours.encode(x), f_ref, 1e-5)


def test_gated_gate_and_magnitude_both_bite(tmp_path):
    # the conversion of the gate to a threshold must be tested where the gate closes on a positive magnitude and
    # opens on a negative one; dictionary.py's GatedAutoEncoder.encode, transcribed
    sd = state_dict("GatedAutoEncoder")
    x = x_in(64) * 2
    e = (x - sd["decoder_bias"]) @ sd["encoder.weight"].t()
    gate = (e + sd["gate_bias"] > 0).float()
    mag = torch.relu(sd["r_mag"].exp() * e + sd["mag_bias"])
    assert ((gate == 0) & (mag > 0)).any() and ((gate == 1) & (mag == 0)).any()
    ours = SAE.from_pretrained(write(tmp_path / "g", "GatedAutoEncoder", sd))
    with torch.no_grad():
        assert_close(ours.encode(x), gate * mag, 1e-5)
        assert_close(ours(x), (gate * mag) @ sd["decoder.weight"].t() + sd["decoder_bias"], 1e-5)


def test_autoencoder_new(tmp_path):
    # dictionary.py's AutoEncoderNew (no SAEBench class): relu(encoder(x)), decoder(f) with the decoder's own bias
    sd = state_dict("AutoEncoderNew")
    ours = SAE.from_pretrained(write(tmp_path / "n", "AutoEncoderNew", sd))
    x = x_in(32)
    f = torch.relu(x @ sd["encoder.weight"].t() + sd["encoder.bias"])
    with torch.no_grad():
        assert_close(ours(x), f @ sd["decoder.weight"].t() + sd["decoder.bias"], 1e-5)


@pytest.mark.parametrize("cls", ["BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder"])
def test_recorded_normalisation(tmp_path, cls):
    # training.py with normalize_activations: the SAE trains on x / norm_factor, then scale_biases(norm_factor)
    # (transcribed below from the classes) before the final save. Both the final ae.pt and a mid-training backup
    # ({"ae": ..., "norm_factor": ...}, biases still unscaled) must give norm_factor * SAE_trained(x / norm_factor).
    nf = 7.5
    trained = state_dict(cls)
    final = dict(trained)
    for name in {"BatchTopKSAE": ("encoder.bias", "b_dec", "threshold"),
                 "JumpReluAutoEncoder": ("b_dec", "b_enc", "threshold"),
                 "GatedAutoEncoder": ("decoder_bias", "mag_bias", "gate_bias")}[cls]:
        final[name] = trained[name] * nf
    x = x_in(64) * 2 * nf  # raw activations, norm_factor times the scale the SAE trained on
    trained_sae = SAE.from_pretrained(write(tmp_path / "trained", cls, trained))
    with torch.no_grad():
        expected = nf * trained_sae(x / nf)
        for name, sd in (("final", final), ("backup", {"ae": trained, "norm_factor": nf, "step": 10})):
            ours = SAE.from_pretrained(write(tmp_path / name, cls, sd, norm_factor=nf))
            assert_close(ours(x), expected, 1e-5)
        assert not torch.allclose(trained_sae(x), expected, atol=1e-2)  # the rescaling matters


def test_dictionary_learning_refusals(tmp_path):
    sd = state_dict("BatchTopKSAE")
    with pytest.raises(ValueError, match="inference threshold was never set"):
        SAE.from_pretrained(write(tmp_path / "a", "BatchTopKSAE", {**sd, "threshold": torch.tensor(-1.0)}))
    folder = write(tmp_path / "b", "AutoEncoder", state_dict("AutoEncoder"))
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["trainer"]["dict_class"] = "IdentityDict"
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported dictionary_learning dict_class 'IdentityDict'") as e:
        SAE.from_pretrained(folder)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="only residual-stream dictionaries"):
        SAE.from_pretrained(write(tmp_path / "c", "AutoEncoder", state_dict("AutoEncoder"), submodule_name="attn_out_9"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ae.pt").write_bytes(b"not a torch file")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(ValueError, match="unreadable torch file"):
        SAE.from_pretrained(str(tmp_path / "d"))


# ----------------------------------------------------------------------------------------------------------------------
# Qwen Scope


def qwen_scope_file(root, layer=5, k=K, seed=0):
    """layer{n}.sae.pt in a folder named like its hub repo, with the tensors in Qwen Scope's own orientation."""
    g = torch.Generator().manual_seed(seed)
    folder = root / f"SAE-Res-Qwen3-1.7B-Base-W32K-L0_{k}"
    folder.mkdir(parents=True, exist_ok=True)
    raw = dict(W_enc=torch.randn(M, D, generator=g), W_dec=torch.randn(D, M, generator=g),
               b_enc=torch.randn(M, generator=g), b_dec=torch.randn(D, generator=g))
    torch.save(raw, folder / f"layer{layer}.sae.pt")
    return folder / f"layer{layer}.sae.pt", raw


def test_qwen_scope(tmp_path):
    path, raw = qwen_scope_file(tmp_path)
    sae = SAE.from_pretrained(str(path))
    assert (sae.arch, sae.k, sae.layer, sae.hook_name, sae.model_name, sae.apply_b_dec_to_input) == (
        "topk", K, 5, "blocks.5.hook_resid_post", "Qwen/Qwen3-1.7B-Base", False)
    # SAELens' qwen_scope loader and its test: pre = x @ W_enc.T + b_enc, TopK then ReLU, x_hat = f @ W_dec.T + b_dec
    x = x_in(3, 7)
    pre = x @ raw["W_enc"].T + raw["b_enc"]
    vals, idx = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    with torch.no_grad():
        assert_close(sae.encode(x), f, 1e-5)
        assert_close(sae(x), f @ raw["W_dec"].T + raw["b_dec"], 1e-5)


def test_qwen_scope_from_the_hub_cache(tmp_path, monkeypatch):
    # the hub layout: models--Qwen--SAE-Res-...-L0_K/snapshots/<commit>/layerN.sae.pt, found offline by its hub path
    from huggingface_hub import constants
    snap = tmp_path / "models--Qwen--SAE-Res-Qwen3-1.7B-Base-W32K-L0_8" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    path, raw = qwen_scope_file(tmp_path / "made", layer=3, k=8)
    os.replace(path, snap / "layer3.sae.pt")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sae = SAE.from_pretrained("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_8/layer3.sae.pt")
    assert (sae.k, sae.layer) == (8, 3)
    with pytest.raises(FileNotFoundError, match="no file layer4.sae.pt; it holds layer3.sae.pt"):
        SAE.from_pretrained("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_8/layer4.sae.pt")


def test_qwen_scope_needs_its_repo_name(tmp_path):
    path, _ = qwen_scope_file(tmp_path)
    os.replace(path, tmp_path / "layer5.sae.pt")
    with pytest.raises(ValueError, match="k of a Qwen Scope SAE comes from its repo's name"):
        SAE.from_pretrained(str(tmp_path / "layer5.sae.pt"))
