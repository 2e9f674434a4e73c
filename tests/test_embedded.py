"""embedded.py and the command line: presets fill only what was not typed, the cache is reused, every flag is
documented, and bad input ends in one line with exit code 2 (as the user types the scripts, in a subprocess)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import adapt
import common
import embedded
import eval as ev
import train_e2e
import train_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["adapt.py", "train_sae.py", "train_e2e.py", "eval.py", "pretrain.py", "bench.py"]


def cli(*args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stub_pipeline(monkeypatch, tmp_path):
    """The embedded builders replaced by fixed paths: nothing is trained."""
    monkeypatch.setattr(embedded, "model", lambda: "MODEL")
    monkeypatch.setattr(embedded, "corpus", lambda: "CORPUS")
    monkeypatch.setattr(embedded, "sae", lambda layer=embedded.SAE_LAYER: f"SAE-L{layer}")
    for mod in (adapt, train_sae, train_e2e, ev):
        monkeypatch.setattr(mod, "run", lambda cfg: cfg)
    monkeypatch.chdir(tmp_path)


def test_presets_fill_only_untyped_flags(stub_pipeline):
    cfg = adapt.main([])
    assert (cfg.model, cfg.data, cfg.sae) == ("MODEL", "CORPUS", ["SAE-L2"])
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.kl_reduction) == (3e-3, 8, 256, "token")
    cfg = adapt.main(["--lr", "5e-5", "--batch-size", "1"])  # the paper's values, typed: kept
    assert (cfg.lr, cfg.batch_size, cfg.seq_len) == (5e-5, 1, 256)
    assert adapt.main(["--layer", "1"]).sae == ["SAE-L1"]  # the embedded SAE of that layer
    cfg = train_sae.main(["--k", "64"])
    assert (cfg.k, cfg.layer, cfg.max_tokens) == (64, [2], 4_000_000)
    assert train_e2e.main([]).layer == [2]
    cfg = adapt.main(["--model", "some/model", "--sae", "x", "--data", "d"])  # a real model: the paper's values
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.dropout, cfg.weight_decay) == (5e-5, 1, 1024, 0.1, 0.01)


def test_real_model_without_sae_uses_the_paper_sae_or_says_what_to_pass(stub_pipeline):
    cfg = adapt.main(["--model", "google/gemma-2-2b", "--layer", "12", "--data", "d"])
    assert cfg.sae == ["google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"]  # the paper's SAE
    with pytest.raises(ValueError, match="no --sae given and no --layer"):
        adapt.main(["--model", "google/gemma-2-2b", "--data", "d"])
    with pytest.raises(ValueError, match="no --sae given.*pass --sae"):
        adapt.main(["--model", "meta-llama/Llama-3.2-1B", "--layer", "8", "--data", "d"])


def test_cached_artefacts_are_not_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path))
    (tmp_path / "tiny-gemma2").mkdir()
    (tmp_path / "tiny-gemma2" / "model.safetensors").write_bytes(b"")
    (tmp_path / "sae-tiny-gemma2-L1").mkdir()
    (tmp_path / "sae-tiny-gemma2-L1" / "cfg.json").write_text("{}")
    monkeypatch.setattr(embedded, "corpus", lambda: "CORPUS")
    assert embedded.model() == str(tmp_path / "tiny-gemma2")
    assert embedded.sae(1) == str(tmp_path / "sae-tiny-gemma2-L1")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_flag(script):
    module = __import__(script[:-3])
    configs = [v for v in vars(module).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
               and v.__module__ == module.__name__]
    assert configs, script
    for config in configs:
        helps = common.field_help(config)
        missing = [f.name for f in dataclasses.fields(config) if not helps.get(f.name)]
        assert not missing, f"{script}: {config.__name__} fields without help: {missing}"
    proc = cli(script, "--help")
    assert proc.returncode == 0 and "(default:" in proc.stdout


def test_design_card_line_on_the_tiny_model_says_what_to_run():
    proc = cli("adapt.py", "--layer", "12", "--rank", "64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "embedded tiny model has 4 layers" in line and "--model google/gemma-2-2b --layer 12" in line


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    from tests.tiny import make_data, make_model, make_sae
    model, data, sae = make_model(tmp_path / "m"), make_data(tmp_path / "d"), make_sae(tmp_path / "s", layer=1)
    base = ["adapt.py", "--model", model, "--data", data, "--out", str(tmp_path / "o"), "--compile", "false",
            "--max-tokens", "256", "--seq-len", "32"]
    bad = (tmp_path / "ckpt").mkdir() or tmp_path / "ckpt"
    (bad / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    for args, expect in [((*base, "--sae", str(tmp_path / "nope")), "nope"),
                         ((*base, "--sae", sae, "--layer", "99"), "out of range"),
                         ((*base, "--sae", sae, "--rank", "0"), "rank must be"),
                         ((*base, "--sae", sae, "--out", str(bad), "--resume"), "unreadable checkpoint")]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("adapt.py: error:") and expect in proc.stderr, proc.stderr
    assert os.path.isfile(bad / "ckpt.pt")  # nothing lost
    proc = cli(*base, "--sae", str(tmp_path / "nope"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
