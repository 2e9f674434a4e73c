"""train_sae.py on the tiny random model: learning, TopK invariants, dead latents, resume, torchrun."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_sae
from training import sae_loss
from sae import SAE
from fixtures.tiny import make_data, make_model
from tests.ports import free_port
from tests.sgd_launch import assert_same_sae_updates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    return dict(model=make_model(root / "model"), data=make_data(root / "data"))


def with_layer(argv, layer):
    return [layer if i and argv[i - 1] == "--layer" else a for i, a in enumerate(argv)]


def args(files, out, *extra):
    return ["--model", files["model"], "--data", files["data"], "--out", str(out), "--layer", "1", "--k", "8",
            "--expansion", "4", "--max-tokens", "40960", "--batch-tokens", "1024", "--buffer-tokens", "8192",
            "--seq-len", "32", "--model-batch", "16", "--eval-interval", "40", "--eval-batches", "1",
            "--log-interval", "10", "--lr", "2e-3", "--autocast", "float32", "--compile", "false", *extra]


def test_topk_training_learns_and_keeps_invariants(files, tmp_path):
    out = train_sae.main(args(files, tmp_path))
    fvus = [h["fvu"] for h in out["history"] if "fvu" in h]
    assert fvus[-1] < 0.5 < 1.0, fvus  # the mean-only reconstruction has FVU 1 by definition
    assert fvus[-1] < fvus[0]
    assert all(h["l0"] == 8 for h in out["history"] if "l0" in h)
    sae = SAE.from_pretrained(str(tmp_path))
    assert sae.layer == 1 and sae.k == 8
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)
    for p in range(10, 101, 10):
        assert os.path.isfile(tmp_path / f"ckpt_{p:03d}" / "cfg.json")
    # the held-out numbers of the last step are the CE of the model and of the model with the saved SAE spliced
    # after layer 1 except at BOS (splice.py's definitions), by hand on the same windows (--eval-batches 1)
    from data import TokenLoader
    from model import Transformer
    ce = [h for h in out["history"] if "ce_sae" in h][-1]
    model = Transformer.from_pretrained(files["model"])
    idx = TokenLoader(files["data"], "validation", 16, 32, 0, 1, 0, shuffle=False).next_batch()
    with torch.no_grad():
        def hand_ce(hooks):
            return F.cross_entropy(model(idx, hooks=hooks)[:, :-1].flatten(0, 1).double(), idx[:, 1:].flatten()).item()
        base = hand_ce({})
        spliced = hand_ce({1: lambda x: torch.where((idx == model.cfg.bos_token_id)[..., None], x, sae(x))})
    assert ce["ce_base"] == pytest.approx(base, rel=1e-5) and ce["ce_sae"] == pytest.approx(spliced, rel=1e-5)
    assert ce["positions"] == 16 * 31 and ce["kl_sae"] > 0


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_other_architectures_train(files, tmp_path, arch):
    extra = ["--max-tokens", "40960", "--l0-coef", "1e-3", "--bandwidth", "0.05"]
    out = train_sae.main(args(files, tmp_path, "--arch", arch, *extra))
    fvus = [h["fvu"] for h in out["history"] if "fvu" in h]
    assert fvus[-1] < 0.9
    sae = SAE.from_pretrained(str(tmp_path))
    assert sae.arch == "jumprelu"  # BatchTopK is saved as the JumpReLU SAE it is at inference


def test_dead_latent_accounting():
    since = torch.tensor([0, 5, 100, 0])
    sae_loss.update_since_fired(since, torch.tensor([True, False, False, False]), 10)
    assert since.tolist() == [0, 15, 110, 10]
    sae_loss.update_since_fired(since, torch.tensor([False, False, True, False]), 10)
    assert since.tolist() == [10, 25, 0, 20]
    assert ((since >= 20).float().mean().item()) == 0.5


def test_resume_after_interruption_continues_identically(files, tmp_path, monkeypatch):
    # with a step that draws from torch's generator too (dropout on the activations here): the state must hold that
    # stream where the step left it, beside the buffer's own shuffling generator
    real = train_sae.training_loss

    def dropout_then_loss(crash_at=None):
        calls = {"n": 0}

        def loss(sae, x, *xs, **kw):
            calls["n"] += 1
            if calls["n"] == crash_at:  # the state is saved at every 10% (4 steps); step 7 dies
                raise KeyboardInterrupt
            return real(sae, torch.nn.functional.dropout(x, 0.1), *xs, **kw)
        return loss
    monkeypatch.setattr(train_sae, "training_loss", dropout_then_loss())
    a = train_sae.main(args(files, tmp_path / "a"))
    monkeypatch.setattr(train_sae, "training_loss", dropout_then_loss(crash_at=7))
    with pytest.raises(KeyboardInterrupt):
        train_sae.main(args(files, tmp_path / "b"))
    monkeypatch.setattr(train_sae, "training_loss", dropout_then_loss())
    b = train_sae.main(args(files, tmp_path / "b", "--resume"))
    for x, y in zip(a["sae"].state_dict().values(), b["sae"].state_dict().values()):
        assert torch.equal(x, y)


def test_bad_input(files, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        train_sae.main(with_layer(args(files, tmp_path), "7"))
    with pytest.raises(ValueError, match="exactly one --layer"):
        train_sae.main(args(files, tmp_path, "--layer", "2"))
    with pytest.raises(ValueError, match="--arch"):
        train_sae.main(args(files, tmp_path, "--arch", "gated"))
    with pytest.raises(ValueError, match="larger than the number of latents"):
        train_sae.main(args(files, tmp_path, "--k", "1000"))


def test_torchrun_two_processes_average_gradients_like_one(files, tmp_path):
    # a buffer of one batch: shuffling permutes the tokens inside the batch, which leaves its (mean) loss unchanged.
    # SGD (tests/sgd_launch.py; Adam's step ignores a constant gradient scale), no clipping: 2 processes x 512 tokens
    # take the steps of 1 process x 1024 exactly when gradients are averaged over processes. Compared on the updates
    # after the first checkpoint (step 1 of 8), on their own scale, every entry
    exact = ["--buffer-tokens", "1024", "--include-bos", "true", "--max-tokens", "8192", "--eval-interval", "1000",
             "--grad-clip", "1e9", "--lr", "0.05", "--warmup-frac", "0", "--decay-frac", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = args(files, tmp_path / "one", *exact)
    two = args(files, tmp_path / "two", *exact, "--model-batch", "8")
    subprocess.run([sys.executable, "tests/sgd_launch.py", "train_sae.py", *one], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(free_port()), "tests/sgd_launch.py", "train_sae.py", *two], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_sae_updates(str(tmp_path / "one"), str(tmp_path / "two"))


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_topk_transcoder_trains_and_adapt_splices_it_in_place_of_the_mlp(files, tmp_path, family):
    """--transcoder: block 1's normalised MLP input -> its MLP sublayer's output (Gemma-3: after the post-FF norm). It
    learns (FVU against that output falls), is saved with SAELens' hook_name / hook_name_out and loads back as a
    transcoder; adapt.py runs with it spliced in."""
    import adapt
    from fixtures.tiny import make_model
    model_dir = files["model"] if family == "llama3" else make_model(tmp_path / "gemma3", "gemma3")
    run = {**files, "model": model_dir}
    out = train_sae.main(args(run, tmp_path / "tc", "--transcoder", "true", "--lr", "5e-3", "--max-tokens", "81920"))
    fvus = [h["fvu"] for h in out["history"] if "fvu" in h]
    # a random model's MLP is far from linear in its input (a least-squares fit leaves FVU 0.95 for the llama3
    # fixture): the check is that the transcoder learns, and beats predicting the mean (FVU 1)
    assert fvus[-1] < 0.9 * fvus[0] and fvus[-1] < 0.95, fvus
    tc = SAE.from_pretrained(str(tmp_path / "tc"))
    assert tc.transcoder and tc.layer == 1 and tc.hook_name == "blocks.1.ln2.hook_normalized"
    assert not tc.apply_b_dec_to_input
    from model import Transformer
    model = Transformer.from_pretrained(model_dir)
    import numpy as np
    val = np.fromfile(os.path.join(files["data"], "val.bin"), dtype=np.uint16)[:64 * 32].astype(np.int64)
    idx = torch.from_numpy(val).view(64, 32).clone()
    idx[:, 0] = 1  # windows start with BOS, as data.TokenLoader's
    with torch.no_grad():  # the saved transcoder reproduces the MLP sublayer it was trained on, on held-out tokens
        xy = train_sae.mlp_pairs(model, idx, 1)[idx != 1]  # BOS positions are not trained on
        h, y = xy.split(model.cfg.d_model, dim=-1)
        fvu = ((tc(h) - y).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()).item()
    assert fvu < 0.95, fvu
    res = adapt.main(["--model", model_dir, "--data", files["data"], "--sae", str(tmp_path / "tc"), "--out",
                      str(tmp_path / "adapt"), "--seq-len", "32", "--batch-size", "4", "--max-tokens", "6144",
                      "--eval-tokens", "512", "--eval-interval", "48", "--log-interval", "8", "--lr", "3e-3",
                      "--rank", "8", "--compile", "false", "--autocast", "float32", "--dropout", "0"])
    assert res["lora_layers"] == list(range(model.cfg.n_layer))  # a TopK transcoder: every layer, as for TopK SAEs
    assert res["kl_sae"] > 0 and math.isfinite(res["kl_sae_lora"])  # Eq. 7's gradient: tests/test_gemma_scope_2.py


def test_decoder_gradients_are_tangent_and_clipped(files, tmp_path, monkeypatch):
    # Gao et al.: the gradient of each unit-norm decoder row loses its radial part before the step; then the whole
    # gradient is clipped to --grad-clip
    from tests.recording_sgd import RecordingSGD
    monkeypatch.setattr(torch.optim, "Adam", RecordingSGD)
    train_sae.main(args(files, tmp_path, "--max-tokens", "2048", "--grad-clip", "1e-3"))
    assert len(RecordingSGD.steps) == 2
    for step in RecordingSGD.steps:
        [(w_dec, g_dec)] = [(p, g) for p, g in step if p.shape == (256, 64)]  # W_dec (d_sae, d_in)
        radial = (g_dec * w_dec).sum(1) / w_dec.norm(dim=1)
        assert radial.abs().max() <= 1e-5 * g_dec.norm(dim=1).max()
        assert torch.stack([g.norm() for _, g in step]).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_loss_scale_is_the_variance_around_the_mean(files, tmp_path, monkeypatch):
    # Gao et al. (2024) normalise the reconstruction MSE by the activations' variance, E||x - E[x]||^2 (the normalised
    # MSE: 1 for the mean-only reconstruction, the FVU). With one batch of buffer, the scale is measured on exactly the
    # first training batch, so the first loss must be that batch's FVU, written out here:
    #   loss = mean_t ||x_t - recon_t||^2 / mean_t ||x_t - mean_s x_s||^2
    seen = []

    def recording(sae, x, *a, **kw):
        out = sae_loss.training_loss(sae, x, *a, **kw)
        with torch.no_grad():
            seen.append((x.clone(), a[1], out[0].item(), sae(x)))
        return out
    monkeypatch.setattr(train_sae, "training_loss", recording)
    train_sae.main(args(files, tmp_path, "--max-tokens", "1024", "--buffer-tokens", "1024"))
    x, scale, loss, recon = seen[0]
    variance = (x - x.mean(0)).pow(2).sum(-1).mean().item()
    assert x.mean(0).pow(2).sum().item() > 0.05 * variance  # the mean is not negligible: an uncentred scale differs
    assert scale == pytest.approx(variance, rel=1e-5)
    assert loss == pytest.approx((x - recon).pow(2).sum(-1).mean().item() / variance, rel=1e-5)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["scale"] == pytest.approx(variance, rel=1e-5)


def test_buffer_shuffle_follows_the_seed():
    # --seed sets the buffer's shuffle too: a fake forward whose activations are the token ids, so each buffer is a
    # permutation of the same ids; seed 0 keeps torch's default stream (the permutations shipped/'s SAE saw)
    class Loader:
        def next_batch(self):
            return torch.arange(64).view(2, 32) + 1

        def state_dict(self):
            return {}

    class Model:
        cfg = type("C", (), {"bos_token_id": 0})()

    def buffered(seed):
        buf = train_sae.ActivationBuffer(Model(), Loader(), 0, 64, True, torch.autocast("cpu", enabled=False), "cpu",
                                         seed=seed)
        buf.forward = lambda idx: idx.float().unsqueeze(-1)
        return buf.next(64).flatten()

    a, b, again = buffered(0), buffered(1), buffered(1)
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(1, 65))
    assert not torch.equal(a, b) and torch.equal(b, again)
    default = torch.Generator()
    assert torch.equal(a, (torch.arange(64) + 1).float()[torch.randperm(64, generator=default)])
