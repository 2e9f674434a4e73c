"""bench.py as a user types it, on model and SAE folders (not only its random-weights default)."""
import json
import os
import subprocess
import sys

from fixtures.tiny import make_model, make_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_adapt_with_model_and_sae_folders(tmp_path):
    model = make_model(tmp_path / "model", family="gemma2")
    sae = make_sae(tmp_path / "sae", layer=1)
    proc = subprocess.run([sys.executable, "tools/bench.py", "adapt", "--model", model, "--sae", sae, "--layer", "2",
                           "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--steps", "1", "--warmup", "1", "--compile", "false"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed" not in proc.stdout, proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # ours and transformers + peft, side by side
    assert summary["ours_tokens_per_s"] > 0 and summary["reference_tokens_per_s"] > 0 and summary["ratio"] > 0


def test_bench_shape_is_the_named_models_shape():
    """--shape gemma-2-2b: random weights of exactly the paper's model shape (head_dim 256, vocabulary 256k)."""
    from tools.bench import BenchConfig, model_config
    from model import ModelConfig
    assert model_config(BenchConfig(shape="gemma-2-2b")) == ModelConfig.from_name("gemma-2-2b")


def test_bench_profile_prints_where_the_step_goes():
    proc = subprocess.run([sys.executable, "tools/bench.py", "adapt", "--profile", "--d-model", "64", "--n-layer", "2",
                           "--vocab", "512", "--layer", "0", "--seq-len", "32", "--batch-size", "2", "--rank", "4",
                           "--steps", "1", "--warmup", "1", "--compile", "false"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"original forward", "spliced forward", "KL + CE forward", "backward", "all"} <= set(rows)
    assert "matmul" in rows["phase"] and "share of the time: matmul" in proc.stdout


def test_bench_draws_a_fitting_sae_for_a_model_folder(tmp_path):
    """--model without --sae: the random SAE fits that model, even where another run of bench left a different one."""
    from tools.bench import BenchConfig, bench_folder, build_inputs
    from sae import SAE
    model = make_model(tmp_path / "model", family="gemma2")
    b = BenchConfig(model=model, layer=[1], k=8)
    folder = bench_folder(b)
    assert folder != bench_folder(BenchConfig())  # not the random-weights default's folder
    SAE(48, 96, "topk", k=8, layer=1).save(os.path.join(folder, "sae"))  # a stale SAE of another width
    build_inputs(b, folder, "cpu")
    d_model = json.load(open(os.path.join(model, "config.json")))["hidden_size"]
    assert SAE.from_pretrained(os.path.join(folder, "sae")).W_enc.shape[0] == d_model != 48
