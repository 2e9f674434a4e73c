"""train_e2e.py: an end-to-end SAE trained through the frozen (tiny, trained) model."""
import os
import subprocess
import sys

import pytest
import torch

import train_e2e
from splice import original_pass, spliced_pass
from sae import SAE
from tests.tiny import make_data, make_trained_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_data(root / "data")
    return dict(model=make_trained_model(root / "model", data), data=data)


def with_layer(argv, layer):
    return [layer if i and argv[i - 1] == "--layer" else a for i, a in enumerate(argv)]


def args(files, out, *extra):
    return ["--model", files["model"], "--data", files["data"], "--out", str(out), "--layer", "1", "--k", "4",
            "--expansion", "4", "--max-tokens", "6144", "--batch-size", "8", "--seq-len", "32", "--eval-interval",
            "6", "--eval-batches", "2", "--log-interval", "6", "--lr", "3e-3", "--autocast", "float32", "--compile", "false", *extra]


def test_short_run_lowers_validation_ce_with_sae(files, tmp_path):
    out = train_e2e.main(args(files, tmp_path))
    held_out = [r for r in out["rows"] if "ce_sae" in r]  # splice.evaluate's numbers, as adapt.py reports them
    ce = [r["ce_sae"] for r in held_out]
    assert ce[-1] < ce[0] - 0.05, ce
    assert held_out[-1]["kl_sae"] < held_out[0]["kl_sae"] and held_out[-1]["positions"] == 2 * 8 * 31
    assert os.path.isfile(tmp_path / "log.csv") and os.path.isfile(tmp_path / "ckpt_100" / "cfg.json")
    rows = [r for r in out["rows"] if "loss" in r]
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["train_kl"])  # --kl-reduction token: the mean KL
    assert rows[-1]["backward_passes"] == 24 and 0 < rows[-1]["l0"] <= 4  # TopK: at most k latents active


def test_gradients_reach_only_the_sae(files):
    from model import Transformer
    model = Transformer.from_pretrained(files["model"]).requires_grad_(False)
    sae = SAE(64, 256, "topk", k=4, layer=1)
    idx = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        hb, prefix = original_pass(model, idx, 1, share_prefix=True)
    hs = spliced_pass(model, [(1, sae)], idx, 1, prefix=prefix)
    (hs - hb).pow(2).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.parameters())


def test_ds_terms_run(files, tmp_path):
    out = train_e2e.main(args(files, tmp_path, "--ds-coef", "0.5", "--max-tokens", "1024"))
    assert out["rows"]


def test_resume(files, tmp_path, monkeypatch):
    # with a step that draws from torch's generator (dropout on the spliced stream here): the state must hold that
    # stream where the step left it
    real = train_e2e.kl_and_ce

    def dropout_then_kl(crash_at=None):
        calls = {"n": 0}

        def kl_and_ce(model, h_orig, h, *xs, **kw):
            calls["n"] += torch.is_grad_enabled()
            if calls["n"] == crash_at:
                raise KeyboardInterrupt
            return real(model, h_orig, torch.nn.functional.dropout(h, 0.1), *xs, **kw)
        return kl_and_ce
    monkeypatch.setattr(train_e2e, "kl_and_ce", dropout_then_kl())
    a = train_e2e.main(args(files, tmp_path / "a"))
    monkeypatch.setattr(train_e2e, "kl_and_ce", dropout_then_kl(crash_at=10))
    with pytest.raises(KeyboardInterrupt):
        train_e2e.main(args(files, tmp_path / "b"))
    monkeypatch.setattr(train_e2e, "kl_and_ce", dropout_then_kl())
    b = train_e2e.main(args(files, tmp_path / "b", "--resume"))
    for x, y in zip(a["sae"].state_dict().values(), b["sae"].state_dict().values()):
        assert torch.equal(x, y)


def test_bad_input(files, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        train_e2e.main(with_layer(args(files, tmp_path), "3"))
    with pytest.raises(ValueError, match="larger than the number of latents"):
        train_e2e.main(args(files, tmp_path, "--k", "5000"))


def test_torchrun_two_processes_match_one(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = args(files, tmp_path / "one", "--max-tokens", "1024")
    two = args(files, tmp_path / "two", "--max-tokens", "1024", "--batch-size", "4")
    subprocess.run([sys.executable, "train_e2e.py", *one], cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           "29535", "train_e2e.py", *two], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = SAE.from_pretrained(str(tmp_path / "one")), SAE.from_pretrained(str(tmp_path / "two"))
    # float summation order differs between 1 and 2 processes; Adam turns the rare latent whose TopK selection
    # flips into a full lr-sized step, so compare almost all entries, not every one
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.isclose(x, y, atol=1e-4, rtol=1e-3).float().mean() > 0.99
