"""gpu_check.py in its quick mode (every part at tiny shapes on the CPU, so that the GPU check cannot rot between GPU
days), its guard (a part that fails or overruns is recorded and the rest still run), and devices that are not there
(one line, exit code 2, like every other bad input)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from plumbing import common
from plumbing import distributed
from tools import gpu_check
from tests.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["numerics", "adapt", "sae", "torchrun", "pipeline"]  # the order they run in


def check(*args, timeout=1500):
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_mode_runs_every_part_and_reports_numbers(tmp_path):
    proc = check("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["passed"] == PARTS and report["failed"] == [] and report["mode"] == "quick"
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["transformers"]
    parts = report["parts"]
    assert all(parts[n]["ok"] and parts[n]["seconds"] > 0 and parts[n]["ran"] for n in PARTS)

    checks = parts["numerics"]["checks"]  # every comparison passed with a number under its tolerance
    assert {"model vs transformers: gemma2 float32", "model vs transformers: llama3 bfloat16", "graph breaks",
            "flex_attention vs math path, head_dim 256: float32", "fused TopK SAE vs dense: bfloat16"} <= set(checks)
    assert any(name.startswith("compiled passes + KL chunk vs kl_reference") for name in checks)
    for c in checks.values():
        assert c["ok"] and c["errors"], c
        assert all(math.isfinite(e) and e <= c["tolerances"][w] for w, e in c["errors"].items()), c

    pipeline = parts["pipeline"]
    assert math.isfinite(pipeline["results"]["gap_closed"]) and pipeline["results"]["steps"] > 0
    assert pipeline["stages"]["adaptation"] > 0

    rows = parts["adapt"]["rows"]  # ours against transformers + peft, as the authors ran it and at its best
    assert set(rows) == {"tiny ours", "tiny authors", "tiny best"}
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_gb"] > 0 and r["cold_start_s"] > 0
               for r in rows.values()), rows
    assert "eager attention" in rows["tiny authors"]["label"] and "float32 weights" in rows["tiny authors"]["label"]
    assert set(parts["adapt"]["speedup"]) == {"tiny"}
    saved = json.load(open(tmp_path / "parts" / "adapt.json"))  # each part's record, as it was written
    assert saved["rows"] == rows

    torchrun = parts["torchrun"]  # one process under torchrun, then FSDP2: the same adapter
    assert torchrun["adapters_agree"] and set(torchrun["runs"]) == {"gloo", "fsdp"}
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in torchrun["runs"].values())

    sae = parts["sae"]["results"]
    assert sae["ours_tokens_per_s"] > 0 and sae["paper_tokens_per_s"] > 0

    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: 5 of 5 parts passed")
    for row in ("| 1. numerics", "| 2. python adapt.py", "| 3. adapt step", "| 4. torchrun", "| 5. bench.py sae"):
        assert row in table
    assert "===== part 5 (sae): pass" in (tmp_path / "gpu_check.log").read_text()


def test_a_part_past_its_budget_is_recorded_and_the_rest_still_run(tmp_path):
    # 18 s of budget, 15 of them kept for start-up and the report: each part gets 1.5 s, too little to do anything
    proc = check("--quick", "--parts", "sae", "--parts", "pipeline", "--budget", "18", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["passed"] == [] and report["failed"] == ["sae", "pipeline"]
    assert all(report["parts"][n]["error"].startswith("timed out after") for n in ("sae", "pipeline"))
    assert (tmp_path / "parts" / "sae.log").exists()  # its stderr, written as it came
    assert "**fail**: timed out after" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_part_records_its_one_line_error(tmp_path, monkeypatch):
    def broken(p):
        p.put(ran="half", summary="a number before the failure")
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")
    monkeypatch.setattr(gpu_check, "part_sae", broken)
    cfg, _ = common.parse_args(gpu_check.CheckConfig, ["--part", "sae", "--record", str(tmp_path / "sae.json"),
                                                      "--quick", "--device", "cpu"])
    gpu_check.run_part(cfg, torch.device("cpu"))
    rec = json.load(open(tmp_path / "sae.json"))
    assert rec == dict(ran="half", summary="a number before the failure", ok=False,
                       error="RuntimeError: CUDA error: an illegal memory access was encountered")


def test_adapt_shapes_are_the_named_models_at_their_batch():
    from model import ModelConfig
    from tools import bench
    for spec in gpu_check.SHAPES:
        b = gpu_check.shape_config(spec, torch.device("cpu"))
        name, bt = spec.split(":")
        assert bench.model_config(b) == ModelConfig.from_name(name) and f"{b.batch_size}x{b.seq_len}" == bt
        assert 0 < b.layer[0] < ModelConfig.from_name(name).n_layer - 1 and b.kl_chunk == b.seq_len
    proc = check("--parts", "adapt", "--shapes", "gemma-2-2b:1x1024,gemma-9:2x8", "--quick", timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("gpu_check.py: error: --shapes 'gemma-9:2x8': expected")


def test_one_line_error_finds_the_line_that_says_what_went_wrong():
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of " \
                "memory.\nW1130 some warning after it\n"
    assert gpu_check.one_line_error(traceback) == "torch.OutOfMemoryError: CUDA out of memory."
    assert gpu_check.one_line_error("noise\nadapt.py: error: --device cuda:3: only 1 CUDA GPU is visible here\n" +
                                    traceback) == "adapt.py: error: --device cuda:3: only 1 CUDA GPU is visible here"


# -- devices that are not there: one line, exit code 2 -----------------------------------------------------------------


def test_pick_device_says_what_is_visible(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.pick_device("auto", gpus=0) == torch.device("cpu")
    assert distributed.pick_device("auto", gpus=1) == torch.device("cuda")
    assert distributed.pick_device("cuda:1", gpus=2) == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:3: only 1 CUDA GPU is visible here \(cuda:0\)"):
        distributed.pick_device("cuda:3", gpus=1)
    with pytest.raises(ValueError, match="--device cuda: .*; use --device cpu"):
        distributed.pick_device("cuda", gpus=0)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        distributed.pick_device("tpu", gpus=1)
    # torchrun: each process takes the GPU of its LOCAL_RANK; with more processes than GPUs every process says so
    # (rank 0 too: none waits in the rendezvous for a peer that has gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match="torchrun started 2 processes on this node but only 1 CUDA GPU is "
                                             "visible here: use --nproc_per_node 1"):
            distributed.pick_device("cuda", gpus=1)
        assert distributed.pick_device("auto", gpus=2) == torch.device("cuda", int(rank))
    with pytest.raises(ValueError, match="under torchrun each process takes the GPU of its LOCAL_RANK"):
        distributed.pick_device("cuda:0", gpus=2)


@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_a_device_that_is_not_there_is_one_line_and_exit_2(device):
    proc = subprocess.run([sys.executable, "adapt.py", "--device", device], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"adapt.py: error: --device {device}") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only messages")
def test_without_a_gpu_cuda_is_one_line_under_torchrun_and_the_full_check(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(free_port()), "adapt.py", "--device", "cuda"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("adapt.py: error: --device cuda: ") == 2, proc.stderr[-3000:]  # each process, one line
    proc = check("--out", str(tmp_path), timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("gpu_check.py: error: the full check runs on a CUDA GPU")
