"""model.py against transformers' Gemma2ForCausalLM / Gemma3ForCausalLM / Gemma3ForConditionalGeneration /
LlamaForCausalLM on tiny random checkpoints."""
import json
import os

import pytest
import torch

from model import ModelConfig, Transformer
from fixtures.hf_refs import TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA3, make_hf_checkpoint, rel_err

T = 24  # longer than the tiny Gemmas' sliding window (8)


def tokens(B=2, T=T, vocab=512, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hub,shard,hub_style", [
    (TINY_GEMMA2, False, True), (TINY_GEMMA2, True, False),
    (TINY_LLAMA3, False, True), (TINY_LLAMA3, True, False),
    (TINY_GEMMA3, False, True), (TINY_GEMMA3, True, False),
    # gemma-3-1b / 270m style: no RoPE scaling, layer_types written out, a final soft-cap
    ({**TINY_GEMMA3, "rope_scaling": None, "sliding_window_pattern": None, "final_logit_softcapping": 3.0,
      "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
                      "sliding_attention", "sliding_attention"]}, False, True),
    ({**TINY_LLAMA3, "tie_word_embeddings": True, "num_key_value_heads": 1}, False, True),
])
def test_logits_and_hidden_states_match_transformers(tmp_path, hub, shard, hub_style):
    ref = make_hf_checkpoint(tmp_path, hub, shard=shard, hub_style_config=hub_style)
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert_matches_hf(Transformer.from_pretrained(str(tmp_path)), ref, tokens())


def assert_matches_hf(ours, ref, idx):
    """Our logits and every hidden state equal transformers' for the same checkpoint, to fp32 rounding."""
    with torch.no_grad():
        out = ref(idx, output_hidden_states=True)
        assert rel_err(ours(idx), out.logits) < 1e-4
        for layer in range(ours.cfg.n_layer - 1):  # the last hidden state HF reports is after the final norm
            assert rel_err(ours(idx, stop_at=layer), out.hidden_states[layer + 1]) < 1e-4


def test_softcaps_and_window_actually_bite(tmp_path):
    # the parity test above would be vacuous if the caps never saturate or the window never masks anything
    make_hf_checkpoint(tmp_path, TINY_GEMMA2)
    model = Transformer.from_pretrained(str(tmp_path))
    idx = tokens()
    with torch.no_grad():
        logits = model(idx)
        assert logits.abs().max() > 0.5 * TINY_GEMMA2["final_logit_softcapping"]
        base = logits.clone()
        model.cfg.sliding_window = 10_000
        for layer in model.model.layers:
            layer.self_attn.window = None if layer.self_attn.window is None else 10_000
        assert rel_err(model(idx), base) > 1e-3
        model.cfg.attn_softcap = None
        assert rel_err(model(idx), base) > 1e-3


def test_hooks_and_stop_at(tmp_path):
    make_hf_checkpoint(tmp_path, TINY_LLAMA3)
    model = Transformer.from_pretrained(str(tmp_path))
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
        assert torch.equal(model(idx, hooks={1: lambda x: x}), base)
        edited = model(idx, hooks={1: lambda x: x * 0.5, 2: lambda x: x + 1.0})
        assert rel_err(edited, base) > 1e-3
        seen = {}
        model(idx, hooks={2: lambda x: seen.setdefault("x", x)})
        assert torch.equal(seen["x"], model(idx, stop_at=2))
        # the pieces compose to the whole
        x = model.blocks(model.embed(idx), 0, 1)
        assert torch.equal(model.head(model.blocks(x, 2)), base)


def test_bf16_autocast_close_to_fp32(tmp_path):
    make_hf_checkpoint(tmp_path, TINY_GEMMA2)
    model = Transformer.from_pretrained(str(tmp_path))
    idx = tokens()
    with torch.no_grad():
        ref = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) < 0.05


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-llama3"])
def test_compile_has_no_graph_breaks(name):
    import torch._dynamo
    model = Transformer(ModelConfig.from_name(name)).init_weights(0)
    explanation = torch._dynamo.explain(model)(tokens(), hooks={1: lambda x: x * 2.0})
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_presets_have_the_published_sizes():
    assert abs(ModelConfig.from_name("gemma-2-2b").n_params() / 1e9 - 2.61) < 0.01
    assert abs(ModelConfig.from_name("llama-3.2-1b").n_params() / 1e9 - 1.24) < 0.01
    assert abs(ModelConfig.from_name("gemma-3-1b").n_params() / 1e9 - 1.00) < 0.01
    assert abs(ModelConfig.from_name("llama-3.1-8b").n_params() / 1e9 - 8.03) < 0.01
    with pytest.raises(ValueError, match="unknown model name"):
        ModelConfig.from_name("gpt-5")


def test_rope_parameters_form_is_read():
    new = {k: v for k, v in TINY_LLAMA3.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": 500000.0, **TINY_LLAMA3["rope_scaling"]}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(TINY_LLAMA3)


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    model = Transformer(ModelConfig.from_name("tiny-gemma2")).init_weights(0)
    model.save_pretrained(str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    idx = tokens()
    with torch.no_grad():
        assert rel_err(model(idx), ref(idx).logits) < 1e-4
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(idx), model(idx))


# -- bad input: one clear error each ------------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_checkpoint(tmp_path, TINY_LLAMA3)
    return tmp_path


def test_error_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA3))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_error_partial_and_corrupt_checkpoints(tmp_path):
    make_hf_checkpoint(tmp_path, TINY_LLAMA3, shard=True)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    os.remove(tmp_path / shards[-1])
    with pytest.raises(FileNotFoundError, match="missing"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / shards[-1]).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Transformer.from_pretrained(str(tmp_path))


def test_error_missing_tensor_and_shape_mismatch(llama_dir):
    from safetensors.torch import load_file, save_file
    path = llama_dir / "model.safetensors"
    state = load_file(path)
    w = state.pop("model.layers.2.mlp.up_proj.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        Transformer.from_pretrained(str(llama_dir))
    state["model.layers.2.mlp.up_proj.weight"] = w[:, :10].contiguous()
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.up_proj.weight has shape \(128, 10\)"):
        Transformer.from_pretrained(str(llama_dir))


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA3, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        Transformer.from_pretrained(str(tmp_path))


def test_error_bad_layer_and_token():
    model = Transformer(ModelConfig.from_name("tiny-llama3")).init_weights(0)
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        model(tokens(), hooks={4: lambda x: x})
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        model(tokens(), stop_at=-1)
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 512]]))


@pytest.mark.parametrize("T", [40, 128, 256])
def test_compiled_inference_uses_flex_and_matches_eager(T):
    # under torch.compile + no_grad, Gemma-2's capped, windowed attention runs as flex_attention (on CPU only for
    # whole 128-token blocks: other lengths hit a wrong CPU flex kernel in torch 2.13 and keep the math path)
    model = Transformer(ModelConfig.from_name("tiny-gemma2")).init_weights(0).eval()
    idx = tokens(T=T)
    with torch.no_grad():
        ref = model(idx)
        out = torch.compile(model)(idx)
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Streaming load: peak memory

MEASURE = """
import json, sys, torch
from model import Transformer

def status(key):  # kB -> MB, from the kernel's own accounting
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

# warm up on a tiny checkpoint first: the code paths' first use (library pages, allocator arenas) is not the load's
Transformer.from_pretrained(sys.argv[1] + "/tiny", dtype=torch.bfloat16)
try:  # reset the high-water mark to the current RSS, so the imports' transient peak does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS:")
model = Transformer.from_pretrained(sys.argv[1] + "/big", dtype=torch.bfloat16)
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(json.dumps({"increase_mb": status("VmHWM:") - before, "rss_increase_mb": status("VmRSS:") - before}))
"""

WRITE = """
import json, os, sys, torch
from safetensors.torch import save_file
from model import ModelConfig, Transformer
cfg = ModelConfig(vocab_size=8192, d_model=1024, d_ff=4096, n_layer=5, n_head=16, n_kv_head=16, head_dim=64,
                  tie_embeddings=False)
with torch.device("meta"):
    names = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
Transformer(ModelConfig.from_name("tiny-llama3")).save_pretrained(os.path.join(sys.argv[1], "tiny"))
out = os.path.join(sys.argv[1], "big")
os.makedirs(out)
half = sorted(names)[:len(names) // 2]
weight_map = {}
for i, part in enumerate((half, sorted(set(names) - set(half)))):  # two shards, written one at a time
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({k: torch.full(names[k], 0.01) for k in part}, os.path.join(out, shard), {"format": "pt"})
    weight_map.update({k: shard for k in part})
json.dump({"weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
json.dump(cfg.to_hf(), open(os.path.join(out, "config.json"), "w"))
print(json.dumps({"params": sum(s.numel() for s in names.values()), "largest": max(s.numel() for s in names.values())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from /proc")
def test_bf16_load_of_fp32_shards_peaks_at_final_size_plus_largest_tensor(tmp_path):
    """~100M fp32 parameters (400 MB) in 2 shards loaded as bf16: peak memory grows by about the bf16 size plus one
    fp32 tensor, never by the fp32 checkpoint's size."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda code: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True,
        check=True, timeout=300).stdout)
    sizes = run(WRITE)
    bf16_mb, fp32_mb = sizes["params"] * 2 / 2**20, sizes["params"] * 4 / 2**20
    largest_mb = sizes["largest"] * 4 / 2**20
    got = run(MEASURE)
    assert got["rss_increase_mb"] > 0.9 * bf16_mb  # the model is really there
    assert got["increase_mb"] < bf16_mb + largest_mb + 40, (got, bf16_mb, largest_mb, fp32_mb)


def test_flex_attention_falls_back_where_its_backward_does_not_fit(recwarn):
    """Gemma-2's head_dim 256 backward needs ~160 KB of shared memory per block (pytorch issues 133254, 198224): an
    RTX 4090 / sm_120 (99 KB) gets the math path with a warning (Python's once-per-place rule), an H100 (227 KB) the kernel."""
    from model import flex_fits
    cuda = torch.device("cuda")
    assert flex_fits(cuda, 256, True, smem=227 * 1024) and flex_fits(cuda, 256, False, smem=99 * 1024)
    assert flex_fits(cuda, 128, True, smem=99 * 1024)  # smaller heads fit
    assert not recwarn.list
    with pytest.warns(UserWarning, match="head_dim 256 does not fit this GPU's 99 KB"):
        assert not flex_fits(cuda, 256, True, smem=99 * 1024)


# ----------------------------------------------------------------------------------------------------------------------
# Gemma-3: what the parity tests above rest on, the language model of the multimodal checkpoints, config defaults


def test_gemma3_features_actually_bite(tmp_path):
    # the parity test would be vacuous if QK-norm, the local RoPE base, the linear scaling or the window did nothing
    make_hf_checkpoint(tmp_path, TINY_GEMMA3)
    model = Transformer.from_pretrained(str(tmp_path))
    assert model.cfg.layer_types.count("sliding_attention") == 4 and model.cfg.qk_norm
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
        for change in (dict(rope_local_theta=20_000.0), dict(rope_scaling=None), dict(sliding_window=10_000)):
            saved = {k: getattr(model.cfg, k) for k in change}
            for k, v in change.items():
                setattr(model.cfg, k, v)
            for layer in model.model.layers:
                layer.self_attn.window = model.cfg.sliding_window if layer.self_attn.window else None
            assert rel_err(model(idx), base) > 1e-3, change
            for k, v in saved.items():
                setattr(model.cfg, k, v)
        for layer in model.model.layers:
            layer.self_attn.window = model.cfg.sliding_window if layer.self_attn.window else None
        assert torch.equal(model(idx), base)
        model.cfg.qk_norm = False
        assert rel_err(model(idx), base) > 1e-3


def tiny_multimodal(text: dict) -> dict:
    """A Gemma3ForConditionalGeneration config.json around a tiny text model (a 1-layer SigLIP, 4 image tokens)."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    # as gemma-3-4b's: the token ids only at the top level
    text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype", "eos_token_id", "bos_token_id",
                                                       "pad_token_id")}
    return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text,
                vision_config=vision, mm_tokens_per_image=4, image_token_index=511, boi_token_index=509,
                eoi_token_index=510, eos_token_id=[1, 106], tie_word_embeddings=True, torch_dtype="float32")


@pytest.mark.parametrize("layout", ["hub", "transformers-4.5x"])
def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path, layout):
    """Gemma-3 4B and up ship as Gemma3ForConditionalGeneration: our text model reads its language model's tensors
    (`language_model.model.*` as the hub ships them and transformers 5 writes them, `model.language_model.*` as
    transformers 4.52-4.57 wrote them) and gives the multimodal model's logits and hidden states on text."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    hub = tiny_multimodal(TINY_GEMMA3)
    torch.manual_seed(0)
    kw = {k: v for k, v in hub.items() if k not in ("model_type", "architectures", "torch_dtype")}
    ref = Gemma3ForConditionalGeneration(Gemma3Config(**kw)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    assert any(k.startswith("language_model.model.") for k in state) and any("vision_tower" in k for k in state)
    if layout != "hub":
        state = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.",
                                                                                      "model.vision_tower.")
                 .replace("language_model.lm_head.", "lm_head."): v for k, v in state.items()}
        save_file(state, path, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hub))
    ours = Transformer.from_pretrained(str(tmp_path))
    assert ours.cfg.model_type == "gemma3_text" and ours.cfg.eos_token_id == [1, 106]
    idx = tokens(vocab=500)
    with torch.no_grad():
        out = ref(input_ids=idx, output_hidden_states=True)
        assert rel_err(ours(idx), out.logits) < 1e-4
        assert rel_err(ours(idx, stop_at=2), out.hidden_states[3]) < 1e-4


def test_gemma3_text_config_defaults_are_transformers():
    """A multimodal text_config names only what differs from Gemma3TextConfig's defaults (gemma-3-4b's lists five
    keys): ours fill the rest as transformers does."""
    from transformers import Gemma3TextConfig
    from formats.checkpoint import GEMMA3_TEXT_DEFAULTS
    hf = Gemma3TextConfig().to_dict()
    ref = ModelConfig.from_hf({**hf, "model_type": "gemma3_text"})
    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    ours = ModelConfig.from_hf({"model_type": "gemma3", "text_config": text})
    want = Gemma3TextConfig(**{k: v for k, v in text.items() if k != "model_type"}).to_dict()
    assert ours == ModelConfig.from_hf({**want, "model_type": "gemma3_text"})
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 8.0} and ours.rope_local_theta == 10_000.0
    assert ours.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert ModelConfig.from_hf({"model_type": "gemma3_text"}) == ref
    assert {k: hf[k] for k in GEMMA3_TEXT_DEFAULTS if k in hf} == \
        {k: v for k, v in GEMMA3_TEXT_DEFAULTS.items() if k in hf}
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({"model_type": "gemma3_text", "use_bidirectional_attention": True})


def test_gemma3_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    model = Transformer(ModelConfig.from_name("tiny-gemma3")).init_weights(0)
    model.save_pretrained(str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    idx = tokens()
    with torch.no_grad():
        assert rel_err(model(idx), ref(idx).logits) < 1e-4
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(idx), model(idx))
