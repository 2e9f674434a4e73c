"""A run's folder is its own (formats/run_folder.py), and bad values are one line (issue 34): every case runs the
script as a user types it, in a subprocess, and checks the exit code 2, exactly one line of stderr without a
traceback, and every file that existed before unchanged (hashed)."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

import adapt
import train_sae
from formats import run_folder
from fixtures.tiny import make_data, make_model, make_sae

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
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "lorasae_saes.json"]


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


# -- 2. every value checked as it is parsed, before any work --------------------------------------------------------------

BAD_VALUES = {  # script, flags, what the one line must say
    "adapt ckpt-interval 0": ("adapt.py", ["--ckpt-interval", "0"], "--ckpt-interval 0: must be at least 1"),
    "adapt log-interval 0": ("adapt.py", ["--log-interval", "0"], "--log-interval 0: must be at least 1"),
    "adapt eval-interval 0": ("adapt.py", ["--eval-interval", "0"], "--eval-interval 0: must be at least 1"),
    "adapt kl-chunk 0": ("adapt.py", ["--kl-chunk", "0"], "--kl-chunk 0: must be at least 1"),
    "adapt dtype float33": ("adapt.py", ["--dtype", "float33"], "--dtype float33: expected float32, bfloat16 or"),
    "adapt dtype int8": ("adapt.py", ["--dtype", "int8"], "--dtype int8: expected"),
    "adapt eval-tokens 0": ("adapt.py", ["--eval-tokens", "0"], "--eval-tokens 0: must be at least 1"),
    "adapt lr nan": ("adapt.py", ["--lr", "nan"], "--lr nan: must be a finite number"),
    "adapt dropout 1": ("adapt.py", ["--dropout", "1"], "--dropout 1.0: must be at least 0 and below 1"),
    "train_sae batch-tokens 0": ("train_sae.py", ["--batch-tokens", "0"], "--batch-tokens 0: must be at least 1"),
    "train_sae eval-batches 0": ("train_sae.py", ["--eval-batches", "0"], "--eval-batches 0: must be at least 1"),
    "train_e2e eval-batches 0": ("train_e2e.py", ["--eval-batches", "0"], "--eval-batches 0: must be at least 1"),
    "train_e2e expansion 0": ("train_e2e.py", ["--expansion", "0"], "--expansion 0: must be at least 1"),
    "pretrain warmup-frac 2": ("pretrain.py", ["--warmup-frac", "2"], "--warmup-frac 2.0: must be a fraction"),
    "eval eval-tokens 0": ("eval.py", ["--eval-tokens", "0"], "--eval-tokens 0: must be at least 1"),
    "eval dtype int8": ("eval.py", ["--dtype", "int8"], "--dtype int8: expected"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_value_is_one_line_before_any_work(files, case):
    script, flags, expect = BAD_VALUES[case]
    out = files["adapt"] if script == "adapt.py" else files["sae_run"]  # a finished run's folder stays untouched
    inputs = [] if script == "pretrain.py" else ["--model", files["model"], "--data", files["data"]]
    refused(script, [*inputs, "--out", out, *flags], [out], expect)


def test_eval_out_that_is_a_file_is_refused_before_the_evaluation(files, tmp_path):
    f = tmp_path / "report"
    f.write_text("x")
    refused("eval.py", ["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--out", f,
                        "--adapter", os.path.join(files["adapt"], "adapter")], [f], "is a file, not a folder")


# -- 3. a held-out budget beyond the split: all of it, once, and a line that says so; adapt.py and eval.py alike ---------


def test_eval_tokens_beyond_the_split_are_capped_alike_in_adapt_and_eval(files, tmp_path, capsys):
    import eval as eval_script
    from data import TokenLoader
    windows = TokenLoader(files["data"], "test", 2, 32, shuffle=False).n_windows  # make_data: 8,000 tokens, 129 of test
    res = adapt.main(adapt_args(files, tmp_path / "a", "--eval-tokens", "100000000", "--max-tokens", "64"))
    said = capsys.readouterr().out
    assert "--eval-tokens 100,000,000 asks for more than the held-out split holds" in said, said
    assert res["positions"] == windows // 2 * 2 * 31  # every window once, 31 predicted positions each
    ev = eval_script.main(["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--adapter",
                           str(tmp_path / "a" / "adapter"), "--eval-tokens", "100000000", "--batch-size", "2",
                           "--seq-len", "32", "--out", str(tmp_path / "e"), "--plots", "false", "--autocast",
                           "float32"])
    assert "asks for more than the held-out split holds" in capsys.readouterr().out
    assert ev["groups"][0]["positions"] == res["positions"]
    for ours, theirs in (("ce_sae_lora", "sae_lora"), ("ce_sae", "sae"), ("ce_base", "original")):
        assert abs(ev["groups"][0]["settings"][theirs]["ce"] - res[ours]) < 1e-4 * res[ours]


def test_the_same_small_budget_is_the_same_positions_in_adapt_and_eval(files, tmp_path):
    import eval as eval_script
    res = adapt.main(adapt_args(files, tmp_path / "a", "--eval-tokens", "100", "--max-tokens", "64"))
    ev = eval_script.main(["--model", files["model"], "--data", files["data"], "--sae", files["sae"], "--adapter",
                           str(tmp_path / "a" / "adapter"), "--eval-tokens", "100", "--batch-size", "2",
                           "--seq-len", "32", "--out", str(tmp_path / "e"), "--plots", "false", "--autocast",
                           "float32"])
    assert res["positions"] == ev["groups"][0]["positions"] == 2 * 2 * 31  # 100 tokens: 4 windows, 2 batches of 2


# -- 4. files read with their path in the error; text that is not UTF-8; the SAEs an adapter was trained around --------


def broken_adapter(files, where, damage):
    import shutil
    shutil.copytree(os.path.join(files["adapt"], "adapter"), where)
    damage(where)
    return str(where)


def eval_args(files, out, *extra, sae=None):
    return ["--model", files["model"], "--data", files["data"], "--sae", sae or files["sae"], "--out", out,
            "--seq-len", "32",
            "--batch-size", "2", "--eval-tokens", "128", "--plots", "false", "--autocast", "float32", *extra]


def test_eval_truncated_adapter_is_one_line_naming_the_file(files, tmp_path):
    def truncate(p):
        data = (p / "adapter_model.safetensors").read_bytes()
        (p / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    adapter = broken_adapter(files, tmp_path / "adapter", truncate)
    refused("eval.py", eval_args(files, tmp_path / "e", "--adapter", adapter), [adapter],
            os.path.join(adapter, "adapter_model.safetensors"), "truncated")


def test_eval_adapter_config_that_is_not_json_is_one_line_naming_the_file(files, tmp_path):
    adapter = broken_adapter(files, tmp_path / "adapter",
                             lambda p: (p / "adapter_config.json").write_text("{'r': 4,"))
    refused("eval.py", eval_args(files, tmp_path / "e", "--adapter", adapter), [adapter],
            os.path.join(adapter, "adapter_config.json"), "not valid JSON")


def test_text_that_is_not_utf8_is_read_with_replacement_and_counted(tmp_path, capsys):
    from formats.corpus import iter_documents
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain UTF-8 text", encoding="utf-8")
    (folder / "b.txt").write_bytes("caf\xe9 cr\xe8me, latin-1 ".encode("latin-1") * 10)
    docs = sorted(iter_documents(str(folder)))
    assert len(docs) == 2 and docs[0].startswith("caf\ufffd cr\ufffdme") and docs[1] == "plain UTF-8 text"
    assert "1 of 2 files are not valid UTF-8 (b.txt)" in capsys.readouterr().out
    alone = tmp_path / "alone.txt"  # one latin-1 file alone: its text, not "holds no text"
    alone.write_bytes("na\xefve".encode("latin-1"))
    assert list(iter_documents(str(alone))) == ["na\ufffdve"]
    jsonl = tmp_path / "docs.jsonl"  # one bad byte in a .jsonl: every line still a document
    jsonl.write_bytes(b'{"text": "one"}\n{"text": "tw\xff"}\n{"text": "three"}\n')
    assert sorted(iter_documents(str(jsonl))) == ["one", "three", "tw\ufffd"]
    assert "docs.jsonl" in capsys.readouterr().out


def test_adapter_records_its_saes_and_eval_with_others_says_so(files, tmp_path, capsys):
    import json
    import eval as eval_script
    from formats.peft import SAES_NAME
    adapter = os.path.join(files["adapt"], "adapter")
    record = json.load(open(os.path.join(adapter, SAES_NAME)))["saes"]
    assert [(r["path"], r["layer"]) for r in record] == [(os.path.realpath(files["sae"]), 1)]
    capsys.readouterr()
    eval_script.main(eval_args(files, str(tmp_path / "same"), "--adapter", adapter))
    assert "warning" not in capsys.readouterr().out
    eval_script.main(eval_args(files, str(tmp_path / "other"), "--adapter", adapter, sae=files["sae2"]))
    said = capsys.readouterr().out
    assert f"--adapter {adapter} was trained around {os.path.realpath(files['sae'])} at layer 1; this run splices " \
           f"{os.path.realpath(files['sae2'])} at layer 2" in said, said


def test_adapter_with_its_sae_record_still_loads_in_peft(files):
    # reference: peft's PeftModel.from_pretrained on adapt.py's folder (with lorasae_saes.json beside PEFT's files)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(ref, os.path.join(files["adapt"], "adapter"))
    assert sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")) > 0


# -- 5. smaller silences --------------------------------------------------------------------------------------------------


def test_max_tokens_below_one_step_is_one_line(files, tmp_path):
    refused("adapt.py", adapt_args(files, files["adapt"], "--max-tokens", "10"), [files["adapt"]],
            "--max-tokens 10 is less than one optimizer step (--batch-size 2 x --seq-len 32 = 64 tokens)")
    refused("train_sae.py", sae_args(files, files["sae_run"], "--max-tokens", "100"), [files["sae_run"]],
            "--max-tokens 100 is less than one optimizer step (--batch-tokens = 512 tokens)")


def test_generate_prompt_longer_than_the_context_says_it_was_cut(files, capsys):
    import types
    from evals import generate
    from model import Transformer
    model = Transformer.from_pretrained(files["model"]).eval()

    class Words:  # a stub tokenizer: one token per word
        bos_id, eos_id, vocab_size = 1, 2, 512

        def encode(self, text):
            return [3 + len(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))
    n = model.cfg.max_seq_len + 10
    cfg = types.SimpleNamespace(gen_tokens=4, authors_splice=False, seed=0, temperature=0.0, top_k=None, bench_batch=2)
    generate.show(model, Words(), ["word " * n, "short"], ("original",), [], (), cfg, None)
    said = capsys.readouterr().out
    room = model.cfg.max_seq_len - 4 - 1
    assert f"--generate prompt 1: {n} tokens, more than the {room}" in said and f"first {n - room} tokens are cut" \
        in said, said
    assert "prompt 2" not in said


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    with run_folder.claim(str(out), resume=False, overwrite=False, checkpoint="ckpt.pt", outputs=(), config={},
                          may_change=frozenset()):
        assert out.is_dir()
    assert not out.exists()
    out.mkdir()  # a folder that was there before stays
    run_folder.claim(str(out), resume=False, overwrite=False, checkpoint="ckpt.pt", outputs=(), config={},
                     may_change=frozenset()).release()
    assert out.is_dir() and not os.listdir(out)
