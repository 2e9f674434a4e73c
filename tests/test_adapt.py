"""adapt.py: layer rules, bad input, resume, DDP / FSDP2 and a real gap closed (the objective: test_splice.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adapt
from plumbing import common
from lora import layers_around_saes
from model import Transformer
from formats.sae_files import load_saes
from splice import splice_hooks
from fixtures.tiny import BOS, make_data, make_model, make_sae
from tests.tol import assert_close, close
from tests.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return dict(model=make_model(root / "model"), data=make_data(root / "data"),
                sae=make_sae(root / "sae", "topk", layer=1, k=2),
                jump=make_sae(root / "jump", "jumprelu", layer=2))


def small_args(files, out, *extra, sae=None):
    return ["--model", files["model"], "--data", files["data"], "--sae", sae or files["sae"], "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--max-tokens", "2048", "--eval-tokens", "512",
            "--eval-interval", "8", "--log-interval", "4", "--ckpt-interval", "4", "--lr", "3e-3", "--rank", "8",
            "--compile", "false", "--autocast", "float32", "--dropout", "0", *extra]


def idx_batch(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, 512, (B, T), generator=g)
    idx[:, 0] = BOS
    return idx


def test_layer_rules_for_jumprelu(files):
    model = Transformer.from_pretrained(files["model"])
    jump = load_saes([files["jump"]], None, model, "cpu")
    assert layers_around_saes(None, jump, 4) == [3]  # default: after the SAE only
    with pytest.raises(ValueError, match="feed a JumpReLU SAE"):
        layers_around_saes("all", jump, 4)
    assert layers_around_saes("all", jump, 4, allow_before_jumprelu=True) == [0, 1, 2, 3]
    topk = load_saes([files["sae"]], None, model, "cpu")
    assert layers_around_saes(None, topk, 4) == [0, 1, 2, 3]


def test_bad_input_errors(files, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        adapt.main(small_args(files, tmp_path / "out", "--layer", "9"))
    with pytest.raises(ValueError, match="2 layers for 1 SAEs"):
        adapt.main(small_args(files, tmp_path / "out", "--layer", "1", "--layer", "2"))
    wide = make_sae(tmp_path / "wide", d=32, m=64)
    with pytest.raises(ValueError, match="d_in=32.*d_model=64"):
        adapt.main(small_args(files, tmp_path / "out", sae=wide))
    with pytest.raises(FileNotFoundError):
        adapt.main(small_args(files, tmp_path / "out", sae=str(tmp_path / "nothing-here")))
    with pytest.raises(ValueError, match="--kl-reduction batchmean: expected sequence or token"):
        adapt.main(small_args(files, tmp_path / "out", "--kl-reduction", "batchmean"))


def test_training_lowers_the_kl_and_writes_results(files, tmp_path):
    # a random model has no CE gap worth the name; the objective itself (Eq. 7) must go down on held-out tokens.
    # The CE gap closed on a pretrained model is checked in test_pipeline.py.
    res = adapt.main(small_args(files, tmp_path / "run", "--max-tokens", "6144", "--eval-interval", "48"))
    assert res["kl_sae"] > 0.05, "the crude SAE should move the distribution"
    assert res["kl_sae_lora"] < 0.9 * res["kl_sae"], res
    on_disk = json.load(open(tmp_path / "run" / "results.json"))
    for key in ("ce_base", "ce_sae", "ce_sae_lora", "gap_closed", "tokens_per_s", "kl_sae", "kl_sae_lora"):
        assert key in on_disk
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors")


def test_resume_continues_exactly(files, tmp_path, monkeypatch):
    # with the default LoRA dropout (0.1), whose masks draw from torch's generator at every step: the resumed run, a
    # fresh process as after a real crash, must continue the stream exactly where the checkpoint's step left it
    argv = small_args(files, tmp_path / "a", "--max-tokens", "1024", "--dropout", "0.1")
    straight = adapt.main(argv)
    # the same run, interrupted during step 6 (after the checkpoint of step 4), then resumed
    real, calls = adapt.kl_and_ce, {"n": 0}

    def crash_at_step_6(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training steps only, not evaluation
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(adapt, "kl_and_ce", crash_at_step_6)
    b = [str(tmp_path / "b") if x == str(tmp_path / "a") else x for x in argv]
    with pytest.raises(KeyboardInterrupt):
        adapt.main(b)
    monkeypatch.setattr(adapt, "kl_and_ce", real)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "adapt.py", *b, "--resume"], cwd=ROOT, env=env, check=True, capture_output=True)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for x, y in zip(a["adapter"], b["adapter"]):
        assert torch.equal(x, y)
    assert straight["ce_sae_lora"] == json.load(open(tmp_path / "b" / "results.json"))["ce_sae_lora"]


def test_torchrun_two_processes_match_one(files, tmp_path):
    common_args = small_args(files, tmp_path, "--max-tokens", "1024", "--eval-tokens", "256")
    one = common_args[:common_args.index("--out")] + ["--out", str(tmp_path / "one")] + \
        common_args[common_args.index("--out") + 2:]
    two = [str(tmp_path / "two") if a == str(tmp_path / "one") else a for a in one]  # --batch-size is global
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "adapt.py", *one], cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(free_port()), "adapt.py", *two], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)
    for x, y in zip(a["adapter"], b["adapter"]):
        assert close(x, y, 1e-4)  # on each tensor's scale: summation order differs


def test_adapting_a_trained_model_closes_part_of_the_ce_gap(tmp_path):
    from fixtures.tiny import make_trained_model
    data = make_data(tmp_path / "data")
    files = dict(model=make_trained_model(tmp_path / "model", data), data=data,
                 sae=make_sae(tmp_path / "sae", "topk", layer=1, k=2))
    # a short run at a high rate needs the decay the embedded preset uses (a constant 1e-2 keeps bouncing)
    res = adapt.main(small_args(files, tmp_path / "run", "--max-tokens", "8192", "--eval-interval", "64",
                                "--rank", "16", "--lr", "1e-2", "--kl-reduction", "token", "--schedule", "cosine",
                                "--warmup-frac", "0.02", "--decay-frac", "1", "--min-lr-frac", "0.1"))
    assert res["ce_sae"] > res["ce_base"] + 0.1, "the crude SAE should open a CE gap"
    assert res["gap_closed"] > 0.1, res


def test_two_saes_at_once_report_compound_ce(files, tmp_path):
    second = make_sae(tmp_path / "sae2", "topk", layer=2, k=2, seed=1)
    res = adapt.main(small_args(files, tmp_path / "run", "--sae", second, "--max-tokens", "1024"))
    assert res["sae_layers"] == [1, 2]
    model = Transformer.from_pretrained(files["model"])
    one = load_saes([files["sae"]], None, model, "cpu")
    two = load_saes([files["sae"], second], None, model, "cpu")
    assert [layer for layer, _ in two] == [1, 2]
    with torch.no_grad():
        idx = idx_batch()
        ce_one, ce_two = (F.cross_entropy(model(idx, hooks=splice_hooks(s, idx, BOS))[:, :-1].flatten(0, 1),
                                          idx[:, 1:].flatten()) for s in (one, two))
    assert ce_two != ce_one  # the compound splice is a different, measured model
    assert res["positions"] == 4 * (512 // (4 * 32)) * 31  # held-out: 4 batches of 4 windows, 31 predicted each


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    real, calls = adapt.kl_and_ce, {"n": 0}

    def nan_at_step_6(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        kl, ce, ce_orig = real(*args, **kwargs)
        return (kl * float("nan") if calls["n"] == 6 else kl), ce, ce_orig
    monkeypatch.setattr(adapt, "kl_and_ce", nan_at_step_6)
    # the loss is read back from the device only at log and checkpoint steps (4, 8): caught at step 8, before the
    # checkpoint of step 8 could overwrite the good one of step 4; the sixth step's loss is that of the state after 5
    with pytest.raises(FloatingPointError, match="loss is not finite.*state after 5 steps.*ckpt.pt holds the state "
                                                 "after 4 steps"):
        adapt.main(small_args(files, tmp_path, "--max-tokens", "1024"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4


KILL_AT_STEP_6 = """
import os, signal, sys, torch, adapt
real, calls = adapt.kl_and_ce, {"n": 0}
def kill(*args, **kwargs):  # kill -9 the process of rank KILL_RANK during training step 6
    calls["n"] += torch.is_grad_enabled()  # training steps only, not the held-out evaluation
    if calls["n"] == 6 and os.environ.get("RANK", "0") == os.environ["KILL_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
adapt.kl_and_ce = kill
adapt.main(sys.argv[1:])
"""


def torchrun(script, argv, port, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(port), str(script), *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True)


def killed_and_resumed(argv, out, tmp_path, port, rank):
    """The run of argv with --out `out`, its process of `rank` killed with SIGKILL during step 6 (the job ends; the
    checkpoint of step 4 is the last), then resumed under torchrun: the checkpoint it ends with."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_STEP_6)
    argv = [str(out) if prev == "--out" else x for prev, x in zip([None, *argv], argv)]
    proc = torchrun(script, argv, port, KILL_RANK=str(rank))
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 4
    proc = torchrun("adapt.py", [*argv, "--resume"], port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    return torch.load(out / "ckpt.pt", weights_only=False)


@pytest.fixture(scope="module")
def ddp_dropout(files, tmp_path_factory):
    """2 gloo processes (DDP: gradients all-reduced), the global batch of 4 split 2 + 2, LoRA dropout 0.1: the
    arguments and the uninterrupted run's checkpoint and results."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    argv = small_args(files, out, "--max-tokens", "1024", "--eval-tokens", "256", "--dropout", "0.1")
    proc = torchrun("adapt.py", argv, free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return argv, torch.load(out / "ckpt.pt", weights_only=False), json.load(open(out / "results.json"))


def test_torchrun_worker_killed_resumes_exactly(ddp_dropout, tmp_path):
    # kill -9 of one worker: torchrun ends the job, and --resume from the last checkpoint must end with the adapter
    # of the uninterrupted run, every rank continuing its own dropout stream
    argv, straight, _ = ddp_dropout
    resumed = killed_and_resumed(argv, tmp_path / "b", tmp_path, free_port(), rank=1)
    assert straight["step"] == resumed["step"] == 8
    for x, y in zip(straight["adapter"], resumed["adapter"]):
        assert torch.equal(x, y)
    # each rank draws its own masks (one process draws one per sequence of the batch): a state per rank, restored
    # on that rank (rank 0's on both would have drawn other masks on rank 1)
    with torch.random.fork_rng():
        draws = [common.set_rng_state(resumed["rng"], rank) or torch.rand(16) for rank in (0, 1)]
    assert len(resumed["rng"]) == 2 and not torch.equal(*draws)


def test_fsdp2_equals_ddp_and_resumes_exactly(files, ddp_dropout, tmp_path):
    # FSDP2 (each layer's weights and adapters sharded over 2 gloo ranks, the global batch of 4 split 2 + 2) must
    # train the adapter that DDP trains, drawing the same dropout masks on each rank; and a run whose rank 0 (the one
    # that writes checkpoints) is killed at step 6 must resume from its step-4 checkpoint to the same end
    argv, ddp, ddp_results = ddp_dropout
    fsdp = [*argv, "--fsdp"]
    a = tmp_path / "a"
    proc = torchrun("adapt.py", [str(a) if prev == "--out" else x for prev, x in zip([None, *fsdp], fsdp)], free_port())
    assert proc.returncode == 0, proc.stderr[-6000:]
    b = killed_and_resumed(fsdp, tmp_path / "b", tmp_path, free_port(), rank=0)
    a = torch.load(a / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == ddp["step"] == 8
    for x, y, z in zip(a["adapter"], b["adapter"], ddp["adapter"]):
        assert torch.equal(x, y)
        # DDP all-reduces gradients, FSDP2 reduce-scatters them: rounding apart, the same adapter
        assert close(x, z, 1e-4)
    res = json.load(open(tmp_path / "a" / "results.json"))
    assert res["ce_sae_lora"] == pytest.approx(ddp_results["ce_sae_lora"], rel=1e-5)
    from formats.peft import load_adapter  # the gathered adapter on disk is whole and loads into a plain model
    model = Transformer.from_pretrained(files["model"])
    for p, saved in zip(load_adapter(model, str(tmp_path / "a" / "adapter")), a["adapter"]):
        assert torch.equal(p.detach(), saved)


def test_default_flags_step_count_and_lr_are_the_authors_loop(files, tmp_path):
    # train_lora.py / utils.train_model: one 1024-token sequence per optimizer step, AdamW at a constant 5e-5, so a
    # budget of N sequences is N steps at 5e-5 each
    base = ["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--max-tokens", str(4 * 1024),
            "--eval-tokens", "1024", "--compile", "false", "--log-interval", "1", "--eval-interval", "100"]
    res = adapt.main([*base, "--out", str(tmp_path / "one")])
    logs = [h for h in res["history"] if "lr" in h]
    assert res["steps"] == 4 and res["train_tokens"] == 4 * 1024 and [h["lr"] for h in logs] == [5e-5] * 4
    cfg = res["config"]
    assert (cfg["batch_size"], cfg["seq_len"], cfg["dropout"], cfg["weight_decay"], cfg["kl_reduction"]) == \
        (1, 1024, 0.1, 0.01, "sequence")
    # the batch is global: 2 processes with --batch-size 2 take the steps of one process with --batch-size 2 (no
    # more, no fewer), and the paper's batch of one sequence cannot be split over 2 processes: one line says so
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*torchrun, "adapt.py", *base, "--batch-size", "2", "--out", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert two["steps"] == 2 and all(h["lr"] == 5e-5 for h in two["history"] if "lr" in h)
    proc = subprocess.run([*torchrun, "adapt.py", *base, "--out", str(tmp_path / "three")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "adapt.py: error: --batch-size 1 (sequences per optimizer step" in proc.stderr


def test_dropout_steps_turns_lora_dropout_off_for_good(files, tmp_path, monkeypatch):
    """--dropout-steps 2 of 4: LoRA dropout is active in steps 1-2 only (the authors' loop: off for good after its
    first in-loop evaluation); without it, in every step. Held-out evaluations always run without it."""
    import re
    forward = torch.nn.Dropout.forward

    def pattern(*extra):
        seen = []

        def record(self, x):
            seen.append("T" if self.training else "F")
            return forward(self, x)
        monkeypatch.setattr(torch.nn.Dropout, "forward", record)
        adapt.main(small_args(files, tmp_path / str(len(extra)), "--dropout", "0.1", "--max-tokens", str(4 * 4 * 32),
                              *extra))
        return "".join(seen)
    every, first_two = pattern(), pattern("--dropout-steps", "2")
    assert re.fullmatch(r"F+T+F+", every) and re.fullmatch(r"F+T+F+", first_two), (every, first_two)
    assert every.count("T") == 2 * first_two.count("T") > 0


def test_eval_py_reports_the_numbers_adapt_py_reports(files, tmp_path):
    """CE, KL and gap closed have one definition (splice.py): adapt.py's results.json and eval.py's eval.json, run as a
    user types them on the same held-out windows, agree to float precision (both run the adapters beside the weights;
    under bf16 too: tests/test_eval.py::test_bf16_core_table_is_adapt_pys_held_out_evaluation)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "adapt.py", *small_args(files, tmp_path / "run", "--max-tokens", "1024")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "eval.py", "--model", files["model"], "--data", files["data"], "--sae",
                           files["sae"], "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "eval"),
                           "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "512", "--autocast", "float32",
                           "--plots", "false", "--distances", "false"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.load(open(tmp_path / "run" / "results.json"))
    e = json.load(open(tmp_path / "eval" / "eval.json"))["groups"][0]
    assert a["positions"] == e["positions"] == 4 * 4 * 31  # 4 batches of 4 windows of 32 tokens: 31 predicted each
    assert a["kl_sae"] > 0.05 and a["kl_sae_lora"] > 0
    for setting, key in (("original", "ce_base"), ("sae", "ce_sae"), ("sae_lora", "ce_sae_lora")):
        assert e["settings"][setting]["ce"] == pytest.approx(a[key], rel=1e-6), setting
    for setting, key in (("sae", "kl_sae"), ("sae_lora", "kl_sae_lora")):
        assert e["settings"][setting]["kl"] == pytest.approx(a[key], rel=1e-5), setting
    if a["gap_closed"] is None:  # no gap to close on this random model: undefined in both
        assert e["gap_closed"] is None
    else:
        assert e["gap_closed"] == pytest.approx(a["gap_closed"], rel=1e-4, abs=1e-6)
    # where each setting came from: typed on the command line or the dataclass default (no preset with --model)
    src = a["config_sources"]
    assert (src["lr"], src["rank"], src["alpha"], src["weight_decay"]) == ("typed", "typed", "default", "default")


def test_readme_method_snippet_is_the_loop_as_it_runs():
    """README's "The method in one screen" is adapt.py's training step line for line, not a paraphrase of it."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = readme.split("## The method in one screen", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    loop = [line.strip() for line in open(os.path.join(ROOT, "adapt.py")).read().splitlines()]
    lines = [line.strip() for line in snippet.strip().splitlines()]
    assert len(lines) >= 5 and "adapters_disabled" in lines[0]
    start = loop.index(lines[0])
    assert loop[start:start + len(lines)] == lines


def first_batch_kl(files, batch, seq_len):
    """KL(p_orig || p_sae) at every predicted position of the first training batch, by hand: full logits, the SAE
    after its layer except at BOS (a SAELens-format SAE: no_bos), a fresh adapter (B = 0) changing nothing."""
    from data import TokenLoader
    model = Transformer.from_pretrained(files["model"])
    [(layer, sae)] = load_saes([files["sae"]], None, model, "cpu")
    idx = TokenLoader(files["data"], "train", batch, seq_len, 0, 1, 0).next_batch()
    with torch.no_grad():
        lp_orig = F.log_softmax(model(idx)[:, :-1].double(), -1)
        lp = F.log_softmax(model(idx, hooks={layer: lambda x: torch.where((idx == BOS)[..., None], x, sae(x))})
                           [:, :-1].double(), -1)
    return (lp_orig.exp() * (lp_orig - lp)).sum(-1)  # (batch, seq_len - 1)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_the_loss_is_eq7_summed_then_divided_by_sequences_or_positions(files, tmp_path, reduction):
    # --kl-reduction sequence: the authors' kl_div(reduction="batchmean"), KL summed over a window's positions and
    # averaged over windows; token: the mean over positions. The first step's logged loss, before its update
    res = adapt.main(small_args(files, tmp_path, "--max-tokens", str(4 * 32), "--log-interval", "1",
                                "--eval-tokens", "128", "--kl-reduction", reduction))
    kl = first_batch_kl(files, 4, 32)
    [row] = [h for h in res["history"] if "loss" in h]
    expected = kl.sum().item() / (4 if reduction == "sequence" else 4 * 31)
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert row["train_kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert kl.sum().item() / 4 > 2 * kl.mean().item()  # the two divisors differ enough to tell apart


def sgd_instead_of_adam(monkeypatch):
    """adapt.py's AdamW as plain SGD: Adam divides each gradient by its own running scale, so a gradient scaled by the
    number of micro-batches or processes would train the same; SGD's step is lr x gradient."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_micro_batches_accumulate_to_the_big_batch(files, tmp_path, monkeypatch, reduction):
    # --micro-batch 1 with --batch-size 4: four backward passes, one step, the gradient of the whole batch's loss
    sgd_instead_of_adam(monkeypatch)
    argv = ["--max-tokens", str(3 * 4 * 32), "--ckpt-interval", "3", "--grad-clip", "1e9", "--lr", "0.5",
            "--kl-reduction", reduction]
    big = adapt.main(small_args(files, tmp_path / "big", *argv))
    micro = adapt.main(small_args(files, tmp_path / "micro", *argv, "--micro-batch", "1"))
    a = torch.load(tmp_path / "big" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "micro" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for x, y in zip(a["adapter"], b["adapter"]):
        assert_close(y, x, 1e-4)  # every entry, on each tensor's scale
    assert max(x.abs().max().item() for x in a["adapter"][1::2]) > 1e-3  # B moved from zero: the test can tell
    for key in ("loss", "train_kl"):
        assert [h[key] for h in micro["history"] if key in h] == pytest.approx(
            [h[key] for h in big["history"] if key in h], rel=1e-5)


def test_torchrun_two_processes_average_gradients_like_one(files, tmp_path):
    # SGD (tests/sgd_launch.py), no clipping, no dropout: 2 processes x 2 windows take the step of 1 process x 4
    # windows exactly when the gradients are averaged over processes (summed, each step would be twice as long)
    argv = small_args(files, tmp_path / "one", "--max-tokens", "1024", "--eval-tokens", "256", "--grad-clip", "1e9",
                      "--lr", "0.5")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "tests/sgd_launch.py", "adapt.py", *argv], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = torchrun("tests/sgd_launch.py", ["adapt.py", *[str(tmp_path / "two") if a == str(tmp_path / "one") else a
                                                          for a in argv]], free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for x, y in zip(a["adapter"], b["adapter"]):
        assert_close(y, x, 1e-4)  # every entry, on each tensor's scale


def test_gradients_are_clipped_to_grad_clip(files, tmp_path, monkeypatch):
    # torch's clip_grad_norm_: the norm over every adapter gradient together is at most --grad-clip
    from tests.recording_sgd import RecordingSGD
    monkeypatch.setattr(torch.optim, "AdamW", RecordingSGD)
    adapt.main(small_args(files, tmp_path, "--max-tokens", str(2 * 4 * 32), "--grad-clip", "1e-4"))
    assert len(RecordingSGD.steps) == 2
    for step in RecordingSGD.steps:
        norm = torch.stack([g.norm() for _, g in step]).norm().item()
        assert norm == pytest.approx(1e-4, rel=1e-3)  # the raw gradient is far larger (B starts at zero, A does not)
