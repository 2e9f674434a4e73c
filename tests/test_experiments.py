"""experiments/run.py: the time-to-CE bookkeeping behind the frontier tables (not the runs themselves: too long)."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("experiments_run", os.path.join(ROOT, "experiments", "run.py"))
run = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(run)
from experiments import frontier, harness  # noqa: E402  (what run.py's experiments share; the frontier's own module)


def test_time_to_reach_a_ce_is_the_first_point_at_or_below_it():
    curve = [dict(time=t, ce=c) for t, c in [(30.0, 2.9), (10.0, 3.1), (20.0, 2.95), (40.0, 2.92)]]  # not monotone
    time_to = lambda ce: (run.reaching(curve, "time", ce) or {}).get("time")
    assert time_to(3.0) == 20.0
    assert time_to(2.9) == 30.0
    assert time_to(2.95) == 20.0
    assert time_to(2.8) is None


def test_interpolate_checkpoint_times():
    steps, secs = [0, 10, 20], [0.0, 5.0, 15.0]
    assert run.interpolate(steps, secs, 15) == 10.0
    assert run.interpolate(steps, secs, 20) == 15.0
    assert run.interpolate(steps, secs, 0) == 0.0


def test_unknown_experiment_is_a_clear_error():
    proc = subprocess.run([sys.executable, "experiments/run.py", "fronteir"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: python experiments/run.py" in proc.stderr


def test_frontier_retabulates_a_finished_folder_with_flops_and_backward_passes(tmp_path, monkeypatch):
    """A finished frontier folder, faked: run.py must train and evaluate nothing, and add the FLOPs axis (each
    script's formula on each run's saved config and steps) and the backward-pass counts to the tables."""
    from dataclasses import asdict
    import csv
    import json
    import torch
    import adapt
    import train_e2e
    import train_sae
    from accounting.flops import adapt_step_flops, e2e_step_flops, sae_run_flops
    from model import Transformer
    from sae import SAE
    from fixtures.tiny import make_model, make_sae
    model = make_model(tmp_path / "model", "gemma2")
    root = tmp_path / "exp" / "frontier"
    cfg = run.ExpConfig(model=model, data=str(tmp_path / "data"), layer=1, k=4, expansion=2, frontier_ckpts="50,100",
                        out=str(tmp_path / "exp"))
    sae_cfg = train_sae.TrainSAEConfig(layer=[1], k=4, expansion=2, max_tokens=40 * 1024, batch_tokens=1024,
                                       buffer_tokens=4096, seq_len=32, model_batch=4)
    log = [dict(step=s, time=float(s), fvu=0.5, l0=4.0, **(dict(auxk=1.0) if s > 20 else {})) for s in (10, 20, 30, 40)]
    os.makedirs(root / "topk")
    with open(root / "topk" / "history.json", "w") as f:
        json.dump(dict(config=asdict(sae_cfg), history=log), f)
    e2e_cfg = train_e2e.E2EConfig(layer=[1], k=4, expansion=2, batch_size=2, seq_len=32, kl_chunk=40)
    os.makedirs(root / "e2e")
    torch.save(dict(config=asdict(e2e_cfg)), root / "e2e" / "ckpt.pt")
    open(root / "e2e" / "cfg.json", "w").write("{}")
    with open(root / "e2e" / "log.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=["step", "tokens", "seconds", "backward_passes"])
        w.writeheader()
        w.writerows(dict(step=s, tokens=64 * s, seconds=2.0 * s, backward_passes=s) for s in range(1, 11))
    heldout = {}
    for p in range(10, 101, 10):  # TopK: 3.0 -> 2.55; e2e: 3.2 -> 2.5 (reaches what TopK + LoRA reaches, later)
        heldout[str(root / "topk" / f"ckpt_{p:03d}")] = dict(ce_base=2.4, ce_sae=3.05 - p / 200, kl_sae=0.1)
        heldout[str(root / "e2e" / f"ckpt_{p:03d}")] = dict(ce_base=2.4, ce_sae=3.27 - p * 0.0077, kl_sae=0.1)
    json.dump(heldout, open(root / "heldout.json", "w"))
    a_cfg = asdict(adapt.AdaptConfig(seq_len=32, batch_size=2, rank=4, kl_chunk=40, max_tokens=2048))
    for p, ce in ((50, 2.62), (100, 2.52)):
        make_sae(root / "topk" / f"ckpt_{p:03d}", layer=1, m=128, k=4)
        os.makedirs(root / f"lora-{p:03d}")
        json.dump(dict(ce_sae=3.05 - p / 200, ce_sae_lora=ce, train_seconds=5.0, train_tokens=2048, steps=32,
                       lora_layers=[0, 1, 2, 3], sae_layers=[1], config=a_cfg),
                  open(root / f"lora-{p:03d}" / "results.json", "w"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished folder must only be tabulated")
    launch = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: forbidden() if cmd[0] == sys.executable
                        else launch(cmd, *a, **k))  # no script runs (platform.processor() may call uname)
    monkeypatch.setattr(frontier, "held_out", forbidden)
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path / "results"))
    run.frontier(cfg)

    assert not (tmp_path / "results" / "frontier.json").exists()  # the tiny model's record: a real model's goes apart
    res = json.load(open(tmp_path / "results" / "model" / "frontier.json"))
    mcfg = Transformer.from_pretrained(model).cfg
    pts = res["points"]
    # e2e at 50%: 5 steps of 64 tokens, 2 sequences each
    e2e = e2e_step_flops(mcfg, 1, 2 * mcfg.d_model, 4, 2, 32, 40)  # layer 1, 2x latents, k 4, 2 x 32 tokens, chunk 40
    assert pts["e2e"][4]["flops"] == 5 * 64 * e2e and pts["e2e"][4]["backward"] == 10
    # TopK at 100%: 40 steps, AuxK on steps 21..40 (the log lines that carry it stand for the 10 steps before them)
    want = sae_run_flops(mcfg, 1, 2 * mcfg.d_model, "topk", 4, 40, 20, batch_tokens=1024, buffer_tokens=4096,
                         model_batch=4, seq_len=32, include_bos=False)
    assert pts["topk"][-1]["flops"] == want and pts["topk"][-1]["backward"] == 0
    lora = 2048 * adapt_step_flops(mcfg, [(1, SAE.from_pretrained(str(root / "topk" / "ckpt_100")))], [0, 1, 2, 3],
                                   4, 32, 2, 40)
    assert pts["topk_lora"][-1]["lora_flops"] == lora and pts["topk_lora"][-1]["backward"] == 64
    assert pts["topk_lora"][-1]["flops"] == pts["topk"][-1]["flops"] + lora
    # CE 2.52 (TopK + LoRA at 100%): e2e first reaches it at 100% (2.50), TopK never does
    row = next(r for r in res["speedups_flops"] if r["ce"] == 2.52)
    assert row["e2e"] == pts["e2e"][-1]["flops"] and row["topk"] is None
    assert row["speedup"] == row["e2e"] / row["topk_lora"] and row["e2e_backward"] == 20
    table = open(tmp_path / "results" / "model" / "frontier.md").read()
    assert "speedup at matched FLOPs" in table and "speedup at matched time" in table
    assert "| 2.520 |" in table and f"| 64 | 20 | {20 / 64:.1f}x |" in table


def test_results_record_command_commit_machine_and_the_wall_time_of_every_step(tmp_path, monkeypatch):
    """A step that ran records its own seconds (run.json); a later invocation that finds it done counts them, so a
    results file's wall_seconds is never just the tabulation's; a step with no record makes it null, not 0."""
    import json
    script = tmp_path / "step.py"
    script.write_text("import os, sys, time\nout = sys.argv[sys.argv.index('--out') + 1]\nos.makedirs(out)\n"
                      "time.sleep(0.3)\nopen(os.path.join(out, 'done'), 'w').write('1')\n")
    cfg = run.ExpConfig(model="m", out=str(tmp_path / "exp"))
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(harness, "base_args", lambda cfg: [])

    def invocation(outs):
        run._STEPS.clear(), run._RAN.clear(), run._CACHED.clear()
        run._STARTED[0] = __import__("time").time()
        for out in outs:
            run.run(cfg, str(script), str(tmp_path / "exp" / out), [], "done", resume=False)
        run.save("x", {}, "table")
        return json.load(open(tmp_path / "results" / "x.json"))

    first = invocation(["a"])
    rec = json.load(open(tmp_path / "exp" / "a" / "run.json"))
    assert rec["wall_seconds"] >= 0.3 and rec["command"].startswith("python ") and "--out" in rec["command"]
    assert first["wall_seconds"] >= rec["wall_seconds"]
    second = invocation(["a"])  # found done: its recorded seconds count, the invocation itself takes little
    assert second["provenance"]["this_invocation_seconds"] < 0.3 <= second["wall_seconds"]
    prov = second["provenance"]
    assert prov["command"].startswith("python experiments/run.py") and prov["machine"]["cores"] == os.cpu_count()
    assert prov["commit"] is None or len(prov["commit"].split("+")[0]) == 40
    os.makedirs(tmp_path / "exp" / "old")
    open(tmp_path / "exp" / "old" / "done", "w").write("1")  # done before steps recorded their time
    third = invocation(["a", "old"])
    assert third["wall_seconds"] is None and third["provenance"]["unrecorded_steps"] == [str(tmp_path / "exp" / "old")]


def test_held_out_windows_follow_adapt_args_and_are_never_read_twice(tmp_path):
    """The frontier scores SAE checkpoints on the windows its adaptations report on: --adapt-args' --seq-len and
    --eval-tokens shape them as adapt.py's own held-out set (data.TokenLoader over the test part, the reference), and
    a budget above the part reads each window once, not again from the start."""
    import torch
    from data import TokenLoader
    from fixtures.tiny import make_data, make_model
    model, data_dir = make_model(tmp_path / "model", "llama3"), make_data(tmp_path / "data", n_val=4_000)
    cfg = run.ExpConfig(model=model, data=data_dir, adapt_args="--batch-size 2 --seq-len 64 --eval-tokens 300")
    a, batches = harness.held_out_batches(cfg, torch.device("cpu"))
    assert (a.seq_len, a.batch_size) == (64, 2) and len(batches) == 3  # 300 tokens: 5 windows, rounded up to 3 batches
    ref = TokenLoader(data_dir, "test", 2, 64, 0, 1, shuffle=False)
    assert all(torch.equal(b, ref.next_batch()) for b in batches)
    cfg.adapt_args = "--batch-size 2 --seq-len 64 --eval-tokens 10000000"
    batches = harness.held_out_batches(cfg, torch.device("cpu"))[1]
    windows = torch.cat(batches)
    assert len(windows) == ref.per_rank // 2 * 2 and len({tuple(w.tolist()) for w in windows}) == len(windows)


def test_help_lists_every_flag_even_with_a_percent_sign_in_its_text():
    """argparse formats help texts with %: frontier_ckpts' "(% of training)" made --help a TypeError traceback."""
    proc = subprocess.run([sys.executable, "experiments/run.py", "frontier", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "% of training" in proc.stdout and "--adapt-args" in proc.stdout


def test_a_model_that_is_not_there_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "experiments/run.py", "frontier", "--model", "/no/such/model"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "/no/such/model" in proc.stderr


def test_a_results_file_the_harness_did_not_write_is_left_alone(tmp_path, monkeypatch):
    """experiments/results/smollm2/frontier.json was computed by hand from other files: a frontier run on SmolLM2
    must not replace it silently; a file the harness wrote (with provenance) is its own to rewrite."""
    import json
    import pytest
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path / "results"))
    assert harness.results_dir("/models/SmolLM2-135M.Q4_1.gguf") == str(tmp_path / "results" / "smollm2_135m_q4_1")
    assert harness.results_dir("gemma3-270m") == str(tmp_path / "results" / "gemma3_270m")
    os.makedirs(tmp_path / "results" / "smollm2")
    by_hand = tmp_path / "results" / "smollm2" / "frontier.json"
    by_hand.write_text('{"note": "by hand"}')
    with pytest.raises(ValueError, match="not written by experiments/run.py"):
        harness.save("frontier", dict(config=dict(model="smollm2")), "table")
    assert json.loads(by_hand.read_text()) == {"note": "by hand"}
    harness.save("rank", dict(config=dict(model="smollm2")), "table")
    harness.save("rank", dict(config=dict(model="smollm2"), again=1), "table")
    assert json.load(open(tmp_path / "results" / "smollm2" / "rank.json"))["again"] == 1
