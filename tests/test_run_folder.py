"""A run's folder is its own (formats/run_folder.py), and bad values are one line (issue 34): every case runs the
script as a user types it, in a subprocess, and checks the exit code 2, exactly one line of stderr without a
traceback, and every file that existed before unchanged (hashed)."""
import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch

import adapt
import train_sae
from formats import run_folder
from tests.tiny import make_data, make_model, make_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    f = dict(root=root, model=make_model(root / "model"), data=make_data(root / "data"),
             sae=make_sae(root / "sae", "topk", layer=1, k=2), sae2=make_sae(root / "sae2", "topk", layer=2, k=2))
    f["adapt"] = str(root / "adapt")  # a finished adapt.py run
    adapt.main(adapt_args(f, f["adapt"]))
    f["sae_run"] = str(root / "sae_run")  # a finished train_sae.py run
    train_sae.main(sae_args(f, f["sae_run"]))
    return f


def adapt_args(f, out, *extra):
    return ["--model", f["model"], "--data", f["data"], "--sae", f["sae"], "--out", str(out), "--seq-len", "32",
            "--batch-size", "2", "--max-tokens", "256", "--eval-tokens", "128", "--rank", "4", "--compile", "false",
            "--autocast", "float32", "--eval-interval", "2", "--log-interval", "2", "--ckpt-interval", "2", *extra]


def sae_args(f, out, *extra):
    return ["--model", f["model"], "--data", f["data"], "--out", str(out), "--layer", "1", "--k", "8", "--expansion",
            "2", "--max-tokens", "4096", "--batch-tokens", "512", "--buffer-tokens", "2048", "--seq-len", "32",
            "--model-batch", "8", "--eval-interval", "8", "--eval-batches", "1", "--log-interval", "4", "--compile",
            "false", "--autocast", "float32", *extra]


def tree(*folders) -> dict:
    """Path -> sha256 of every file under the folders (a file itself when a path is one)."""
    out = {}
    for top in map(str, folders):
        paths = [top] if os.path.isfile(top) else [os.path.join(r, n) for r, _, ns in os.walk(top) for n in ns]
        for p in paths:
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def cli(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def refused(script, args, watch, *expect):
    """The command exits 2 with one line `script: error: ...` holding every `expect`, and leaves `watch` as it was."""
    before = tree(*watch)
    proc = cli(script, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: "), lines
    for e in expect:
        assert e in lines[0], lines[0]
    assert tree(*watch) == before, "a refused command changed files"
    return lines[0]


# -- 1. a finished or partial run is not overwritten --------------------------------------------------------------------


def test_adapt_refuses_a_folder_holding_a_finished_run(files):
    line = refused("adapt.py", adapt_args(files, files["adapt"]), [files["adapt"]], "already holds", "--resume",
                   "--overwrite")
    assert "ckpt.pt" in line


def test_train_sae_refuses_a_folder_holding_a_finished_run(files):
    refused("train_sae.py", sae_args(files, files["sae_run"]), [files["sae_run"]], "already holds", "--overwrite")


def test_pretrain_refuses_a_folder_holding_a_model(files):
    # the tiny model folder stands for a pretrained one: config.json + model.safetensors
    refused("pretrain.py", ["--out", files["model"], "--max-steps", "4", "--compile", "false"], [files["model"]],
            "already holds", "model.safetensors")


def test_train_e2e_refuses_a_folder_holding_a_partial_run(files, tmp_path):
    (tmp_path / "ckpt_010").mkdir()
    (tmp_path / "ckpt_010" / "cfg.json").write_text("{}")
    refused("train_e2e.py", ["--model", files["model"], "--data", files["data"], "--layer", "1", "--out", tmp_path,
                             "--compile", "false"], [tmp_path], "already holds", "ckpt_010")


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(files, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from formats import run_folder; "
                               f"run_folder.claim({str(out)!r}, resume=False, overwrite=False, checkpoint='ckpt.pt', "
                               "outputs=(), config={}, may_change=frozenset()); print('held', flush=True); "
                               "time.sleep(120)"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused("adapt.py", adapt_args(files, out), [out], "in use by another run", f"pid {holder.pid}")
        assert "choose another --out" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder died with kill -9: its lock file stays, its flock is gone, and the next run takes the folder over
    assert (out / run_folder.LOCK).is_file()
    with run_folder.claim(str(out), resume=False, overwrite=False, checkpoint="ckpt.pt", outputs=(), config={},
                          may_change=frozenset()) as c:
        assert open(out / run_folder.LOCK).read().split()[0] == str(os.getpid()) and c.fd is not None
    assert not (out / run_folder.LOCK).exists()  # released: nothing left behind


def test_overwrite_replaces_the_run_and_leaves_other_files(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out))
    (out / "notes.txt").write_text("mine")
    old = torch.load(out / "ckpt.pt", weights_only=False)["config"]["seed"]
    adapt.main(adapt_args(files, out, "--overwrite", "--seed", "1"))
    assert old == 0 and torch.load(out / "ckpt.pt", weights_only=False)["config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_a_stale_temp_file_of_a_killed_run_is_removed(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    (out / "ckpt.tmp99999.pt").write_bytes(b"")  # what a kill during torch_save leaves
    (out / "adapter" / "adapter_model.tmp99999.safetensors").write_bytes(b"")
    adapt.main(adapt_args(files, out, "--max-tokens", "256", "--resume"))
    assert sorted(os.listdir(out)) == ["adapter", "ckpt.pt", "results.json"]
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_out_that_is_a_file_or_cannot_be_made_is_refused_before_any_work(files, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    refused("adapt.py", adapt_args(files, f), [f], "is a file, not a folder")
    refused("train_sae.py", sae_args(files, f / "sub"), [f], "cannot create the folder")


# -- 1. --resume continues only the run it finds ------------------------------------------------------------------------


def test_adapt_resume_with_changed_settings_names_each_old_and_new(files):
    line = refused("adapt.py", adapt_args(files, files["adapt"], "--resume", "--lr", "0.1", "--rank", "8",
                                          "--batch-size", "4", "--lora-layers", "2,3", "--sae", files["sae2"]),
                   [files["adapt"]], "--resume")
    for change in ("--lr 5e-05 -> 0.1", "--rank 4 -> 8", "--batch-size 2 -> 4", "--lora-layers none -> 2,3",
                   f"--sae [{files['sae']}] -> [{files['sae']}, {files['sae2']}]"):
        assert change in line, line


def test_train_sae_resume_with_changed_settings_names_each(files):
    line = refused("train_sae.py", sae_args(files, files["sae_run"], "--resume", "--k", "4", "--expansion", "4"),
                   [files["sae_run"]])
    assert "--k 8 -> 4" in line and "--expansion 2 -> 4" in line, line
    argv = sae_args(files, files["sae_run"], "--resume")
    argv[argv.index("--layer") + 1] = "2"
    assert "--layer [1] -> [2]" in refused("train_sae.py", argv, [files["sae_run"]])


def test_resume_may_change_the_listed_settings(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    res = adapt.main(adapt_args(files, out, "--resume", "--max-tokens", "256", "--log-interval", "1",
                                "--eval-tokens", "64", "--kl-chunk", "16"))
    assert res["steps"] == 4
    assert adapt.MAY_CHANGE >= {"max_tokens", "log_interval", "eval_tokens", "kl_chunk", "device", "compile"}
    assert not adapt.MAY_CHANGE & {"lr", "rank", "alpha", "sae", "layer", "lora_layers", "batch_size", "seq_len",
                                   "schedule", "seed", "data", "model", "dropout"}
    assert not train_sae.MAY_CHANGE & {"k", "expansion", "layer", "arch", "batch_tokens", "lr", "seq_len"}


def test_changes_lists_only_what_may_not_change():
    saved = dict(rank=4, lr=1e-3, max_tokens=10, sae=["a"], new_flag=None)
    now = dict(rank=8, lr=1e-3, max_tokens=20, sae=("a",), later=1)
    assert run_folder.changes(saved, now, frozenset({"max_tokens"})) == ["--rank 4 -> 8"]
