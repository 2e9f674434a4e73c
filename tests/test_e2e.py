"""train_e2e.py: an end-to-end SAE trained through the frozen (tiny, trained) model."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_e2e
from splice import original_pass, spliced_pass
from sae import SAE
from fixtures.tiny import make_data, make_trained_model
from tests.ports import free_port
from tests.sgd_launch import assert_same_sae_updates

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
    held_out = [r for r in out["rows"] if "ce_sae" in r]  # held_out.evaluate's numbers, as adapt.py reports them
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


def test_ds_term_is_added_to_the_loss(files, tmp_path, monkeypatch):
    # e2e+ds (Braun et al. 2024): KL + ds_coef x the mean over the later layers (those after the SAE's, before the
    # last) of ||a_spliced - a_orig||^2 / ||a_orig||^2 (each a mean over positions), by hand on the first step's batch
    seen = {}

    def spy(model, saes, idx, keep=(), **kw):
        if "ref" not in seen:
            [(layer, sae)] = saes
            later = range(layer + 1, model.cfg.n_layer - 1)
            o, s = {}, {}

            def rec(store, i):
                return lambda x: store.__setitem__(i, x.double()) or x
            kept = torch.isin(idx, torch.tensor(keep))[..., None]
            with torch.no_grad():
                lp_o = F.log_softmax(model(idx, hooks={i: rec(o, i) for i in later})[:, :-1].double(), -1)
                hooks = {layer: lambda x: torch.where(kept, x, sae(x)), **{i: rec(s, i) for i in later}}
                lp_s = F.log_softmax(model(idx, hooks=hooks)[:, :-1].double(), -1)
            kl = (lp_o.exp() * (lp_o - lp_s)).sum(-1).mean()
            ds = sum((s[i] - o[i]).pow(2).sum(-1).mean() / o[i].pow(2).sum(-1).mean() for i in later) / len(later)
            seen["ref"], seen["kl"], seen["ds"] = (kl + 0.5 * ds).item(), kl.item(), ds.item()
        return spliced_pass(model, saes, idx, keep, **kw)
    monkeypatch.setattr(train_e2e, "spliced_pass", spy)
    # the SAE after block 0: two later layers (1, 2), so their mean is a mean
    out = train_e2e.main(with_layer(args(files, tmp_path, "--ds-coef", "0.5", "--max-tokens", str(8 * 32),
                                         "--log-interval", "1", "--eval-batches", "1"), "0"))
    row = [r for r in out["rows"] if "loss" in r][0]
    assert 0.5 * seen["ds"] > 0.01 * seen["kl"]  # the ds term is a visible part of the loss
    assert row["train_kl"] == pytest.approx(seen["kl"], rel=1e-4)
    assert row["loss"] == pytest.approx(seen["ref"], rel=1e-4)


def test_init_fine_tunes_the_given_sae_on_kl_plus_mse(files, tmp_path, monkeypatch):
    # Karvonen 2025's short fine-tune: the first step starts from the file's SAE (not a fresh one, not b_dec moved to
    # the median), its width and k replace --expansion / --k, and the loss is KL + mse_coef x ||x_hat - x||^2 over
    # the stream's variance (positions the splice skips reconstruct exactly), by hand on the first step's batch
    init = SAE(64, 128, "topk", k=8, layer=1)
    with torch.no_grad():
        init.b_dec.normal_()
        init.b_enc.normal_(0, 0.1)
    init.save(str(tmp_path / "init"))
    seen = {}

    def spy(model, saes, idx, keep=(), **kw):
        if "ref" not in seen:
            [(layer, sae)] = saes
            seen["same"] = all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(),
                                                                  init.state_dict().values()))
            kept = torch.isin(idx, torch.tensor(keep))[..., None]
            got = {}

            def splice(x):
                got["x"], got["x_hat"] = x.double(), torch.where(kept, x, sae(x)).double()
                return torch.where(kept, x, sae(x))
            with torch.no_grad():
                lp_o = F.log_softmax(model(idx)[:, :-1].double(), -1)
                lp_s = F.log_softmax(model(idx, hooks={layer: splice})[:, :-1].double(), -1)
            kl = (lp_o.exp() * (lp_o - lp_s)).sum(-1).mean()
            x, x_hat = got["x"], got["x_hat"]
            fvu = (x_hat - x).pow(2).sum(-1).mean() / (x - x.reshape(-1, 64).mean(0)).pow(2).sum(-1).mean()
            seen["ref"], seen["kl"], seen["mse"] = (kl + 0.5 * fvu).item(), kl.item(), fvu.item()
        return spliced_pass(model, saes, idx, keep, **kw)
    monkeypatch.setattr(train_e2e, "spliced_pass", spy)
    out = train_e2e.main(args(files, tmp_path / "out", "--init", str(tmp_path / "init"), "--mse-coef", "0.5",
                              "--max-tokens", str(8 * 32), "--log-interval", "1", "--eval-batches", "1"))
    row = [r for r in out["rows"] if "loss" in r][0]
    assert seen["same"] and out["sae"].d_sae == 128 and out["sae"].k == 8
    assert 0.5 * seen["mse"] > 0.01 * seen["kl"]  # the MSE term is a visible part of the loss
    assert row["train_kl"] == pytest.approx(seen["kl"], rel=1e-4)
    assert row["loss"] == pytest.approx(seen["ref"], rel=1e-4)
    jump = SAE(64, 128, "jumprelu", layer=1)
    jump.save(str(tmp_path / "jump"))
    with pytest.raises(ValueError, match="fine-tunes TopK"):
        train_e2e.main(args(files, tmp_path / "out2", "--init", str(tmp_path / "jump")))


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


def test_torchrun_two_processes_average_gradients_like_one(files, tmp_path):
    # SGD (tests/sgd_launch.py; Adam's step ignores a constant gradient scale), no clipping: --batch-size 8 is 8
    # windows a step over all processes, so 2 processes x 4 windows take the steps of 1 process x 8 exactly when
    # gradients are averaged over processes. Compared on the updates
    # after the first checkpoint (step 1 of 4), on their own scale, every entry
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    sgd = ["--max-tokens", "1024", "--grad-clip", "1e9", "--lr", "0.05", "--warmup-frac", "0", "--decay-frac", "0"]
    one = args(files, tmp_path / "one", *sgd)
    two = args(files, tmp_path / "two", *sgd)
    subprocess.run([sys.executable, "tests/sgd_launch.py", "train_e2e.py", *one], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(free_port()), "tests/sgd_launch.py", "train_e2e.py", *two], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_sae_updates(str(tmp_path / "one"), str(tmp_path / "two"))


def test_decoder_gradients_are_tangent(files, tmp_path, monkeypatch):
    # as train_sae.py: each unit-norm decoder row's gradient loses its radial part before the step
    from tests.recording_sgd import RecordingSGD
    monkeypatch.setattr(torch.optim, "Adam", RecordingSGD)
    train_e2e.main(args(files, tmp_path, "--max-tokens", str(2 * 8 * 32)))
    assert len(RecordingSGD.steps) == 2
    for step in RecordingSGD.steps:
        [(w_dec, g_dec)] = [(p, g) for p, g in step if p.shape == (256, 64)]
        radial = (g_dec * w_dec).sum(1) / w_dec.norm(dim=1)
        assert radial.abs().max() <= 1e-5 * g_dec.norm(dim=1).max() and g_dec.abs().max() > 0
