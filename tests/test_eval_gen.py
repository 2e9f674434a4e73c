"""eval.py's TruthfulQA generation and --generate: each setting's text against greedy decoding by full recomputation
with the setting's adapters and splice, the scores as truthfulqa.summarize computes them, the Table 5 layout of
eval.md, and the command line with and without --adapter (a subprocess, as a user runs it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from evals import truthfulqa as tq
from evals.generate import cut_at_stop
from lora import adapters_disabled, merged
from sae import SAE
from splice import splice_hooks
from tests.test_eval import MMLU, SAE_LAYER, load, run, world  # noqa: F401  (world: the shared fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = [{"question": "What does the cat see?", "correct_answers": ["the cat sees the dog"],
        "incorrect_answers": ["the cat sees the bird", "nothing"]},
       {"question": "Who helps the cow?", "correct_answers": ["the bear helps the cow."],
        "incorrect_answers": ["the lion."]}]
NEW = 8


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def greedy(model, tok, prompt, hooks_for):
    """Greedy decoding without a cache: BOS + the prompt cut from the left to leave NEW tokens of room, the full
    forward at every step; hooks_for(idx, prompt_len). Stops at EOS; the text cut at lm-eval's stop sequence."""
    room = model.cfg.max_seq_len - NEW - 1
    ids = [tok.bos_id] + tok.encode(prompt)[-room:]
    n, idx, new = len(ids), torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(idx, hooks=hooks_for(idx, n))[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-4  # no near-tie: the token check below is exact on every CPU
            t = int(logits.argmax())
            if t == tok.eos_id:
                break
            new.append(t)
            idx = torch.cat([idx, torch.tensor([[t]])], 1)
    return cut_at_stop(tok.decode(new), tq.UNTIL)


def test_generation_settings_as_computed_by_hand(world):  # noqa: F811
    qfile = write(world["root"] / "gen.jsonl", GEN)
    res, saved, out = run(world, "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"],
                          "--truthfulqa-gen", qfile, "--authors-splice", "--gen-tokens", str(NEW), "--generate",
                          "the big cat", "--bench-batch", "2", out="gen")
    model, tok = load(world, "rand"), world["tok"]
    sae = SAE.from_pretrained(world["sae"]["crude"])
    results = {**saved["benchmarks"], **saved["groups"][0]["benchmarks"]}
    qs = tq.questions(GEN, "gen")

    def everywhere(idx, n):
        return splice_hooks([(SAE_LAYER, sae)], idx, tok.bos_id)

    def prompt_only(idx, n):  # the authors' run: spliced prompt, unspliced generated tokens
        splice = everywhere(idx[:, :n], n)[SAE_LAYER]
        return {SAE_LAYER: lambda x: torch.cat([splice(x[:, :n]), x[:, n:]], 1)}
    for setting in ("original", "sae", "sae_lora", "lora"):
        with merged(model) if "lora" in setting else adapters_disabled(model):
            for key, hooks in (("truthfulqa_gen", everywhere), (tq.PROMPT_ONLY, prompt_only)):
                got = results[setting][key]
                hooks = hooks if "sae" in setting else (lambda idx, n: {})
                want = [greedy(model, tok, q["prompt"], hooks) for q in qs]
                assert got["completions"] == want, (setting, key)
                summary = tq.summarize(qs, want)
                assert all(got[k] == pytest.approx(v, nan_ok=True) for k, v in summary.items() if k != "completions")
            text = greedy(model, tok, "the big cat", everywhere if "sae" in setting else lambda idx, n: {})
            gens = saved["generations"] if setting in ("original", "sae") else saved["groups"][0]["generations"]
            assert gens[setting] == [text]
    assert results["sae"]["truthfulqa_gen"]["completions"] != results["original"]["truthfulqa_gen"]["completions"]
    assert results["sae"][tq.PROMPT_ONLY]["completions"] != results["sae"]["truthfulqa_gen"]["completions"]
    md = open(os.path.join(out, "eval.md")).read()
    for metric in ("bleu_acc", "rouge1_acc", "rouge2_acc"):
        assert f"| rand | truthfulqa_gen | {metric} | 2 |" in md
        assert f"| rand | truthfulqa_gen, SAE on the prompt only (the authors' run) | {metric} | 2 |" in md
    assert "## Generations" in md and "sae_prompt_only" in saved["generations"]


def cli(world, out, *args):  # noqa: F811
    return subprocess.run([sys.executable, "eval.py", "--model", world["model"], "--sae", world["sae"]["crude"],
                           "--out", str(world["root"] / out), "--device", "cpu", "--autocast", "float32", "--plots",
                           "false", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_without_adapter_sae_and_original_only(world):  # noqa: F811
    """No --adapter: the benchmark table has the SAE and original columns (the others '-'); eval.md is written."""
    mmlu = write(world["root"] / "mmlu_cli.jsonl", MMLU[:2])
    p = cli(world, "cli1", "--mmlu", mmlu, "--truthfulqa-gen", write(world["root"] / "gen_cli.jsonl", GEN),
            "--gen-tokens", "4", "--generate", "the red dog", "--generate", "a bird")
    assert p.returncode == 0, p.stderr[-2000:]
    md = open(world["root"] / "cli1" / "eval.md").read()
    assert "| (none) | mmlu | acc | 2 |" in md and "| (none) | truthfulqa_gen | rouge2_acc | 2 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| (none) | truthfulqa_gen | bleu_acc"))
    assert row.split(" | ")[5] == "-" and row.split(" | ")[7].strip(" |") == "-"  # SAE + LoRA, LoRA: none
    assert "[original] the red dog" in p.stdout and "[sae] a bird" in p.stdout
    saved = json.load(open(world["root"] / "cli1" / "eval.json"))
    assert set(saved["benchmarks"]) == {"original", "sae"} and len(saved["generations"]["sae"]) == 2
    p = cli(world, "cli2", "--truthfulqa-gen", str(world["root"] / "missing.jsonl"))
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_bad_generation_flags_are_one_line_errors(world):  # noqa: F811
    base = ["--sae", world["sae"]["crude"], "--generate", "the cat"]
    with pytest.raises(ValueError, match="--gen-tokens 0: need at least 1"):
        run(world, *base, "--gen-tokens", "0", out="badgen1")
    with pytest.raises(ValueError, match="temperature >= 0"):
        run(world, *base, "--temperature", "-1", out="badgen2")
    with pytest.raises(ValueError, match="not a truthfulqa_gen row"):
        run(world, "--sae", world["sae"]["crude"], "--truthfulqa-gen",
            write(world["root"] / "mc.jsonl", [{"question": "q", "mc1_targets": {}}]), out="badgen3")
    with pytest.raises(ValueError, match="layout bos_chunks"):  # test_eval's token folder has no whole documents
        run(world, "--sae", world["sae"]["crude"], "--truthfulqa-gen", "corpus", "--data", world["data"], out="bad4")
    _, saved, _ = run(world, *base, out="gen_default")  # lm-eval's 256 tokens do not fit: half of the 256 context
    assert saved["config"]["gen_tokens"] == 128 and len(saved["generations"]["sae"]) == 1


def test_generate_on_a_real_model_keeps_the_ce_table_when_asked(world, monkeypatch, capsys):  # noqa: F811
    # --model with --generate and no --data: a typed --eval-tokens asks for the CE table, which then reads the stdlib
    # corpus in the model's tokens (embedded.corpus_for, stubbed with the world's tokens); untyped, the table is left
    # out and a log line says so
    from plumbing import embedded
    import eval as ev
    asked = []
    monkeypatch.setattr(embedded, "corpus_for", lambda model: asked.append(model) or world["data"])
    base = ["--model", world["model"], "--sae", world["sae"]["crude"], "--adapter", world["adapter"]["rand"],
            "--generate", "the big cat", "--gen-tokens", "2", "--autocast", "float32", "--plots", "false",
            "--device", "cpu", "--seq-len", "32", "--batch-size", "2"]
    with_table = ev.main([*base, "--eval-tokens", "128", "--out", str(world["root"] / "gen-table")])
    g = with_table["groups"][0]
    assert asked == [world["model"]] and g["settings"]["sae_lora"]["ce"] > 0 and g["positions"] == 4 * 31
    assert g["per_token"] and g["generations"]
    without = ev.main([*base, "--out", str(world["root"] / "gen-only")])
    assert asked == [world["model"]] and "settings" not in without["groups"][0] and without["groups"][0]["generations"]
    assert "the CE table, per-token breakdown and distances are left out" in capsys.readouterr().out
