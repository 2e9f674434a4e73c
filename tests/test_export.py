"""tools/export.py: the adapters merged in fp32 into an HF folder that transformers loads, alone, to the logits of our model
with its adapters, and that peft's PeftModel on the original base gives too (the reference for "the same model")."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools.export import export, main
from formats.peft import save_adapter
from lora import apply_lora, lora_modules
from model import Transformer
from sae import SAE
from fixtures.hf_refs import TINY_GEMMA3, TINY_LLAMA3, make_hf_checkpoint, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adapted(folder, layers=(2, 3)):
    """Our model from folder with random, non-zero adapters on some layers."""
    model = Transformer.from_pretrained(str(folder))
    apply_lora(model, rank=4, alpha=8, layers=list(layers))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("hub", [TINY_GEMMA3, TINY_LLAMA3], ids=["gemma3", "llama3"])
def test_export_loads_in_transformers_to_our_adapted_logits(tmp_path, hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = tmp_path / "base"
    make_hf_checkpoint(base, hub)
    (base / "tokenizer.model").write_bytes(b"tokenizer")
    model = adapted(base)
    save_adapter(model, str(tmp_path / "adapter"), str(base))
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
    assert main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"tokenizer"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ref = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    with torch.no_grad():
        plain = ref(idx).logits
        peft = PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()(idx).logits
        got = exported(idx).logits
    assert rel_err(ours, plain) > 1e-2  # the adapters change the model
    assert rel_err(got, ours) < 1e-5 and rel_err(got, peft) < 1e-5
    with torch.no_grad():  # unmerged again: the model still trains and evaluates with its adapters
        assert not any(m.merged for m in lora_modules(model).values()) and torch.equal(model(idx), ours)


def test_bf16_export_rounds_once_after_the_fp32_merge(tmp_path):
    from transformers import AutoModelForCausalLM
    make_hf_checkpoint(tmp_path / "base", TINY_GEMMA3)
    model = adapted(tmp_path / "base")
    export(model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", attn_implementation="eager").eval()
    assert exported.dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    merged = {}
    for name, m in lora_modules(model).items():  # Eq. 1 written plainly, in fp32, then one rounding
        merged[name] = (m.weight.float() + m.alpha / m.rank * m.lora_B.float() @ m.lora_A.float()).bfloat16()
    state = dict(exported.named_parameters())
    for name, w in merged.items():
        assert torch.equal(state[name + ".weight"], w), name


def test_export_writes_the_sae_beside_the_model(tmp_path):
    make_hf_checkpoint(tmp_path / "base", TINY_GEMMA3)
    model = adapted(tmp_path / "base")
    sae = SAE(64, 128, "jumprelu", layer=1)
    export(model, str(tmp_path / "out"), saes=[sae])
    again = SAE.from_pretrained(str(tmp_path / "out" / "sae" / "layer_1"))
    assert again.layer == 1 and torch.equal(again.W_dec, sae.W_dec)


def test_export_cli_bad_input_is_one_line(tmp_path):
    make_hf_checkpoint(tmp_path / "base", TINY_GEMMA3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, msg in (([], "no --adapter"), (["--adapter", str(tmp_path / "nope")], "no adapter_config.json"),
                       (["--adapter", str(tmp_path), "--dtype", "float16"], "--dtype 'float16'")):
        proc = subprocess.run([sys.executable, "tools/export.py", "--model", str(tmp_path / "base"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("export.py: error: ") and msg in proc.stderr, proc.stderr
