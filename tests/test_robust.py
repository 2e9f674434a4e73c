"""Nothing lost anywhere (issue 48): every writer guards its output folder (formats/run_folder.claim), --resume compares
what the run was built from by content, a divergence stop keeps a state from before it, and every file read checks
types and consistency. Each refusal runs the command as a user types it, in a subprocess: exit code 2, one line of
stderr without a traceback, every file that existed before unchanged (hashed); tests/test_run_folder.py's tiny
fixtures."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapt
from tests.test_run_folder import ROOT, adapt_args, cli, files, sae_args, tree  # noqa: F401 (files: fixture)


def refused(script, args, watch, *expect):
    """The command exits 2 with one line `script: error: ...` holding every `expect`, and leaves `watch` as it was
    (tests/test_run_folder.py's check, for scripts run by path too)."""
    before = tree(*watch)
    proc = cli(script, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"{os.path.basename(script)}: error: "), lines
    for e in expect:
        assert e in lines[0], lines[0]
    assert tree(*watch) == before, "a refused command changed files"
    return lines[0]


def ok(script, *args):
    proc = cli(script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# -- one output rule for every writer ------------------------------------------------------------------------------------


def export_args(files, out, *extra):
    return ["--model", files["model"], "--adapter", os.path.join(files["adapt"], "adapter"), "--out", out, *extra]


def test_export_never_writes_into_the_base_models_folder(files):
    refused("tools/export.py", export_args(files, files["model"]), [files["model"]], "is the folder of the input")
    refused("tools/export.py", export_args(files, files["model"], "--overwrite"), [files["model"]],
            "is the folder of the input")


def test_export_refuses_a_folder_with_other_files_and_its_own_earlier_output(files, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "notes"}')
    (mine / "notes.txt").write_text("keep me")
    refused("tools/export.py", export_args(files, mine), [mine], "already holds files", "--overwrite")
    out = tmp_path / "export"
    ok("tools/export.py", *export_args(files, out))
    refused("tools/export.py", export_args(files, out), [out], "already holds files")
    ok("tools/export.py", *export_args(files, mine, "--overwrite"))  # replaces export's files, keeps the rest
    assert (mine / "notes.txt").read_text() == "keep me" and json.load(open(mine / "config.json")) != {"my": "notes"}


def test_out_that_is_a_file_is_one_line_for_export_and_data(files, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    refused("tools/export.py", export_args(files, f), [f], "is a file, not a folder")
    refused("data.py", ["--source", "stdlib", "--tokenizer", files["model"], "--out", f], [f],
            "is a file, not a folder")


def test_data_py_refuses_an_existing_token_folder(files):
    refused("data.py", ["--source", "stdlib", "--tokenizer", files["model"], "--out", files["data"],
                        "--max-tokens", "1000"], [files["data"]], "already holds files", "train.bin")


def test_eval_refuses_a_folder_with_other_files_and_an_inputs_folder(files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    adapter = os.path.join(files["adapt"], "adapter")
    args = ["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--adapter", adapter,
            "--seq-len", "32", "--eval-tokens", "64", "--plots", "false"]
    refused("eval.py", [*args, "--out", tmp_path], [tmp_path], "already holds files", "notes.txt")
    refused("eval.py", [*args, "--out", adapter, "--overwrite"], [files["adapt"]], "is the folder of the input")


def test_train_e2e_never_writes_over_the_sae_it_fine_tunes(files):
    refused("train_e2e.py", ["--model", files["model"], "--data", files["data"], "--layer", "1", "--init",
                             files["sae"], "--out", files["sae"], "--overwrite", "--compile", "false"],
            [files["sae"]], "is the folder of the input")


# -- --resume compares content, not the spelling of paths ------------------------------------------------------------------


def test_resume_accepts_the_same_inputs_under_other_paths(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    same_data = tmp_path / "tokens-under-another-cache-name"
    shutil.copytree(files["data"], same_data)
    monkeypatch.chdir(os.path.dirname(files["sae"]))  # the SAE by a relative path now, the data from another folder
    argv = adapt_args(files, out, "--max-tokens", "256", "--resume")
    argv[argv.index("--sae") + 1] = os.path.basename(files["sae"])
    argv[argv.index("--data") + 1] = str(same_data)
    assert adapt.main(argv)["steps"] == 4


def test_resume_refuses_another_sae_at_the_same_path(files, tmp_path):
    from fixtures.tiny import make_sae
    out, sae = tmp_path / "run", tmp_path / "sae"
    shutil.copytree(files["sae"], sae)
    argv = adapt_args(files, out, "--max-tokens", "128")
    argv[argv.index("--sae") + 1] = str(sae)
    adapt.main(argv)
    shutil.rmtree(sae)
    make_sae(sae, "topk", layer=1, k=2, seed=7)  # retrained in place: same path, same shape, other weights
    argv[argv.index("--max-tokens") + 1] = "256"
    line = refused("adapt.py", [*argv, "--resume"], [out, sae], "--sae", "same path, other content")
    assert "ckpt.pt" in line


def test_resume_refuses_a_checkpoint_whose_tensors_do_not_fit(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    state = torch.load(out / "ckpt.pt", weights_only=False)
    state["adapter"] = state["adapter"][:-3]  # three adapter tensors missing
    torch.save(state, out / "ckpt.pt")
    refused("adapt.py", adapt_args(files, out, "--max-tokens", "256", "--resume"), [out], "holds", "adapter tensors",
            "--overwrite")
    state["adapter"] = [t[:, :1] if t.dim() == 2 else t for t in torch.load(
        os.path.join(files["adapt"], "ckpt.pt"), weights_only=False)["adapter"]]
    torch.save(state, out / "ckpt.pt")
    refused("adapt.py", adapt_args(files, out, "--max-tokens", "256", "--resume"), [out], "has shape")


def test_resume_refuses_a_checkpoint_missing_a_key(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    state = torch.load(out / "ckpt.pt", weights_only=False)
    del state["loader"]  # another version's or script's checkpoint: resuming it would fail part way
    torch.save(state, out / "ckpt.pt")
    refused("adapt.py", adapt_args(files, out, "--max-tokens", "256", "--resume"), [out], "not a complete checkpoint",
            "'loader'", "--overwrite")


# -- a divergence stop that keeps a state from before it, and whose advice works ----------------------------------------


def test_divergence_keeps_the_state_before_it_and_a_lower_lr_resumes(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    before = torch.load(out / "ckpt.pt", weights_only=False)  # a run at --lr 1e20 whose first two steps went well
    before["config"]["lr"] = 1e20
    torch.save(before, out / "ckpt.pt")
    proc = cli("adapt.py", *adapt_args(files, out, "--max-tokens", "640", "--lr", "1e20", "--resume",
                                       "--ckpt-interval", "1", "--log-interval", "1", "--eval-interval", "100"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert "diverged" in line and "not finite" in line and "lower --lr" in line, line
    assert f"{out / 'ckpt.pt'} holds the state after" in line, line
    kept = torch.load(out / "ckpt.pt", weights_only=False)
    assert kept["step"] < int(line.split("(the state after ")[1].split()[0])  # from before the divergence
    assert all(torch.isfinite(t).all() for t in kept["adapter"])
    if kept["step"] == 2:  # the previous checkpoint was restored: adapter/ holds its weights again, not step 3's
        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        assert max(t.abs().max().item() for t in saved.values()) < 1e3
    res = adapt.main(adapt_args(files, out, "--max-tokens", "640", "--lr", "1e-4", "--resume"))  # the advice
    assert res["steps"] == 10 and all(v is not None and v == v for v in (res["ce_sae_lora"], res["kl_sae_lora"]))
    assert not (out / "ckpt.prev.pt").exists()


def test_divergence_with_no_good_checkpoint_says_so(files, tmp_path):
    out = tmp_path / "run"
    proc = cli("adapt.py", *adapt_args(files, out, "--lr", "1e30", "--ckpt-interval", "1", "--log-interval", "1"))
    line = proc.stderr.strip()
    assert proc.returncode == 2 and len(line.splitlines()) == 1, proc.stderr[-3000:]
    assert "no checkpoint from before it was written" in line and "lower --lr" in line, line
    assert not (out / "ckpt.pt").exists()


def test_diverged_leaves_the_newest_checkpoint_from_before_the_bad_step(tmp_path):
    from formats import run_folder
    path = str(tmp_path / "ckpt.pt")
    run_folder.save_checkpoint(dict(step=2), path)
    run_folder.save_checkpoint(dict(step=3), path)  # the loss of this state turns out not finite
    assert torch.load(run_folder.previous(path))["step"] == 2
    err = str(run_folder.diverged(path, 3, "diverged", "a lower --lr"))
    assert torch.load(path)["step"] == 2 and not os.path.exists(run_folder.previous(path))
    assert f"{path} holds the state after 2 steps" in err and "--resume and a lower --lr" in err
    assert "after 2 steps" in str(run_folder.diverged(path, 5, "diverged", "a lower --lr"))  # older: kept as is
    assert torch.load(path)["step"] == 2
    err = str(run_folder.diverged(path, 2, "diverged", "a lower --lr"))  # nothing from before it: removed
    assert "no checkpoint from before it" in err and not os.path.exists(path)


def test_train_sae_divergence_names_a_state_that_exists(files, tmp_path):
    out = tmp_path / "sae"
    proc = cli("train_sae.py", *sae_args(files, out, "--lr", "1e30"))
    line = proc.stderr.strip()
    assert proc.returncode == 2 and len(line.splitlines()) == 1 and "diverged" in line, proc.stderr[-3000:]
    if "holds the state after" in line:
        state = torch.load(out / "ckpt.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["sae"].values() if t.is_floating_point())
    else:
        assert "no checkpoint from before it" in line and not (out / "ckpt.pt").exists()


def test_lr_may_only_be_lowered_on_resume(files):
    line = refused("adapt.py", adapt_args(files, files["adapt"], "--resume", "--lr", "1e-3"), [files["adapt"]],
                   "--lr 5e-05 -> 0.001")
    assert "only a lower --lr" in line


# -- infinite and absurd values: refused as they are parsed -----------------------------------------------------------------

ABSURD = {
    "adapt lr inf": ("adapt.py", ["--lr", "inf"], "--lr inf: must be a finite number"),
    "adapt alpha nan": ("adapt.py", ["--alpha", "nan"], "--alpha nan: must be a finite number"),
    "adapt max-tokens 1e23": ("adapt.py", ["--max-tokens", "99999999999999999999999"], "is beyond what any run"),
    "adapt max-tokens 1e23 written so": ("adapt.py", ["--max-tokens", "1e23"], "invalid int value: '1e23'"),
    "train_sae grad-clip inf": ("train_sae.py", ["--grad-clip", "inf"], "--grad-clip inf: must be a finite"),
    "eval alpha nan": ("eval.py", ["--alpha", "nan"], "--alpha nan: must be a finite number"),
    "eval temperature inf": ("eval.py", ["--temperature", "inf"], "--temperature inf: must be a finite number"),
    "data max-tokens 0": ("data.py", ["--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
    "bench steps 0": ("tools/bench.py", ["adapt", "--steps", "0"], "--steps 0: must be at least 1"),
    "bench steps -1": ("tools/bench.py", ["adapt", "--steps", "-1"], "--steps -1: must be at least 1"),
    "bench rank 0": ("tools/bench.py", ["adapt", "--rank", "0"], "--rank 0: must be at least 1"),
    "bench vocab 0": ("tools/bench.py", ["adapt", "--vocab", "0"], "--vocab 0: must be at least 1"),
    "bench seq-len 0": ("tools/bench.py", ["adapt", "--seq-len", "0"], "--seq-len 0: must be at least 1"),
    "bench layer 99": ("tools/bench.py", ["adapt", "--layer", "99"], "--layer 99 is out of range"),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_value_is_one_line_before_any_work(files, case):
    script, flags, expect = ABSURD[case]
    watch = files["adapt"] if script == "adapt.py" else files["sae_run"]  # a finished run's folder stays untouched
    refused(script, [*flags, *([] if script == "tools/bench.py" else ["--out", watch])], [watch], expect)


def test_bench_exits_non_zero_when_a_row_fails(tmp_path):
    proc = cli("tools/bench.py", "adapt", "--model", tmp_path / "nope", "--layer", "1")
    assert proc.returncode != 0


# -- every file read checks types and consistency ---------------------------------------------------------------------------


def broken_model(files, where, edit):
    shutil.copytree(files["model"], where)
    cfg = json.load(open(where / "config.json"))
    edit(cfg)
    (where / "config.json").write_text(json.dumps(cfg))
    return where


CONFIGS = {
    "number as a string": (lambda c: c.update(hidden_size="64"), 'hidden_size is "64", expected a whole number'),
    "null": (lambda c: c.update(num_hidden_layers=None), "num_hidden_layers is null"),
    "missing": (lambda c: c.pop("vocab_size"), "vocab_size is missing"),
    "string for a float": (lambda c: c.update(rms_norm_eps="small"), 'rms_norm_eps is "small"'),
    "float for a count": (lambda c: c.update(num_attention_heads=2.5), "num_attention_heads is 2.5"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_json_of_the_wrong_type_is_one_line_naming_file_and_key(files, tmp_path, case):
    edit, expect = CONFIGS[case]
    model = broken_model(files, tmp_path / "model", edit)
    argv = adapt_args(files, tmp_path / "run")
    argv[argv.index("--model") + 1] = str(model)
    refused("adapt.py", argv, [model], os.path.join(str(model), "config.json"), expect)


def test_token_folder_meta_of_the_wrong_type_is_one_line(files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    meta = json.load(open(data / "meta.json"))
    meta["vocab_size"] = "512"
    (data / "meta.json").write_text(json.dumps(meta))
    argv = adapt_args(files, tmp_path / "run")
    argv[argv.index("--data") + 1] = str(data)
    refused("adapt.py", argv, [data], os.path.join(str(data), "meta.json"), 'vocab_size is "512"')


def test_integer_weights_are_one_line_naming_file_and_tensor(files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    state = load_file(model / "model.safetensors")
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name].to(torch.int32)
    save_file(state, model / "model.safetensors")
    argv = adapt_args(files, tmp_path / "run")
    argv[argv.index("--model") + 1] = str(model)
    refused("adapt.py", argv, [model], "model.safetensors", name, "int32")


SAE_CONFIGS = {
    "k contradicts": (lambda c: c.update(k=9999), "k is 9999, larger than the number of latents"),
    "d_in contradicts": (lambda c: c.update(d_in=32), "d_in is 32, but the weights have d_in 64"),
    "d_sae contradicts": (lambda c: c.update(d_sae=100), "d_sae is 100, but the weights have d_sae 256"),
    "k as a string": (lambda c: c.update(k="2"), 'k is "2", expected a number'),
    "flag as a string": (lambda c: c.update(apply_b_dec_to_input="yes"), 'apply_b_dec_to_input is "yes"'),
}


@pytest.mark.parametrize("case", SAE_CONFIGS)
def test_sae_config_contradicting_its_weights_is_one_line(files, tmp_path, case):
    edit, expect = SAE_CONFIGS[case]
    sae = tmp_path / "sae"
    shutil.copytree(files["sae"], sae)
    cfg = json.load(open(sae / "cfg.json"))
    edit(cfg)
    (sae / "cfg.json").write_text(json.dumps(cfg))
    argv = adapt_args(files, tmp_path / "run")
    argv[argv.index("--sae") + 1] = str(sae)
    refused("adapt.py", argv, [sae], os.path.join(str(sae), "cfg.json"), expect)


def test_sae_with_integer_weights_is_one_line(files, tmp_path):
    sae = tmp_path / "sae"
    shutil.copytree(files["sae"], sae)
    state = load_file(sae / "sae_weights.safetensors")
    state["W_dec"] = state["W_dec"].to(torch.int64)
    save_file(state, sae / "sae_weights.safetensors")
    argv = adapt_args(files, tmp_path / "run")
    argv[argv.index("--sae") + 1] = str(sae)
    refused("adapt.py", argv, [sae], "W_dec is torch.int64, not a floating-point tensor")


def test_adapter_config_of_the_wrong_type_is_one_line(files, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(files["adapt"], "adapter"), adapter)
    cfg = json.load(open(adapter / "adapter_config.json"))
    cfg["r"] = "4"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    refused("eval.py", ["--model", files["model"], "--sae", files["sae"], "--adapter", adapter, "--data",
                        files["data"], "--out", tmp_path / "e", "--seq-len", "32", "--eval-tokens", "64"], [adapter],
            os.path.join(str(adapter), "adapter_config.json"), 'r must be a whole number of at least 1, got \'4\'')


def test_adapter_of_another_base_model_gives_a_warning_line(files, tmp_path):
    from fixtures.tiny import make_model
    other = make_model(tmp_path / "other_model", seed=3)  # the same shape, other weights
    adapter = os.path.join(files["adapt"], "adapter")
    proc = ok("tools/export.py", "--model", other, "--adapter", adapter, "--out", tmp_path / "export")
    assert "warning" in proc.stdout and "base_model_name_or_path" in proc.stdout and other in proc.stdout
    same = tmp_path / "same_model"  # the base model under another path: no warning
    shutil.copytree(files["model"], same)
    proc = ok("tools/export.py", "--model", same, "--adapter", adapter, "--out", tmp_path / "export2")
    assert "warning" not in proc.stdout, proc.stdout


# -- reports kept as they finish; a full disk is one line -------------------------------------------------------------------


def test_eval_keeps_the_parts_done_when_a_later_one_fails(files, tmp_path, monkeypatch):
    import eval as ev
    from evals import report

    def fail(res):
        raise RuntimeError("a later part failed")
    monkeypatch.setattr(report, "markdown", fail)
    out = tmp_path / "e"
    with pytest.raises(RuntimeError):
        ev.main(["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--adapter",
                 os.path.join(files["adapt"], "adapter"), "--out", str(out), "--seq-len", "32", "--batch-size", "2",
                 "--eval-tokens", "64", "--plots", "false", "--autocast", "float32"])
    partial = json.load(open(out / "eval.partial.json"))
    assert partial["groups"][0]["settings"]["sae_lora"]["ce"] > 0
    assert json.load(open(out / "eval.json"))["groups"]  # written before the report that failed


def test_a_full_disk_is_one_line_naming_the_folder_and_the_old_checkpoint_survives(files, tmp_path):
    out = tmp_path / "run"
    adapt.main(adapt_args(files, out, "--max-tokens", "128"))
    before = tree(out / "ckpt.pt")
    full_disk = ("import errno, os, runpy, sys\n"
                 "real = os.replace\n"
                 "def replace(a, b, *args, **kw):\n"
                 "    if str(b).endswith(os.sep + 'ckpt.pt'):\n"
                 "        raise OSError(errno.ENOSPC, 'No space left on device', a)\n"
                 "    return real(a, b, *args, **kw)\n"
                 "os.replace = replace\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path('adapt.py', run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", full_disk, "adapt.py",
                           *adapt_args(files, out, "--max-tokens", "256", "--resume")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    line = proc.stderr.strip()
    assert proc.returncode == 2 and len(line.splitlines()) == 1, proc.stderr[-3000:]
    assert f"no space left on the disk of {out}" in line and "ckpt.pt" in line, line
    assert tree(out / "ckpt.pt") == before


# -- a --model that names nothing is reported as the model, by every script ----------------------------------------------


@pytest.mark.parametrize("script", ["adapt.py", "train_sae.py", "eval.py"])
def test_a_model_that_names_nothing_is_one_line_about_the_model(script, tmp_path):
    # the model is resolved before its tokenizer turns the offline corpus into its tokens: the line names the model
    line = refused(script, ["--model", "nope", "--layer", "1", "--out", str(tmp_path / "o")], [tmp_path],
                   "nope: no such model folder or .gguf file", "smollm2")
    assert "tokenizer" not in line
