"""Every command in README.md runs as typed: each command line (fenced bash blocks and inline `python ...` spans) is
parsed by its own script's argument parser, torchrun's options by torchrun's parser, and every other program it
names is one that the requirements install."""
import importlib.metadata
import json
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from plumbing import common
from plumbing import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("python", "torchrun", "pip", "hf", "bash")


def readme_commands(path=os.path.join(ROOT, "README.md")) -> list[list[str]]:
    text = open(path, encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()  # a continued line is one command
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [s for s in re.findall(r"`([^`\n]+)`", prose) if s.split(" ")[0] in PROGRAMS and " " in s]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while "&&" in words:  # `a && b`: two commands
            i = words.index("&&")
            commands.append(words[:i])
            words = words[i + 1:]
        commands.append(words)
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the program
            words.pop(0)
    return [words for words in commands if words]


COMMANDS = readme_commands()


class Parsed(Exception):
    pass


def load(script: str):
    name = "readme_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_script(script: str, args: list[str], monkeypatch):
    """The config the script's own main() builds from `args`, stopped right after parsing."""
    assert os.path.isfile(os.path.join(ROOT, script)), f"README names {script}, which does not exist"
    real = common.parse_args

    def parse_only(cls, argv=None, epilog=None):
        raise Parsed(real(cls, argv, epilog)[0])
    monkeypatch.setattr(common, "parse_args", parse_only)
    with pytest.raises(Parsed) as e:
        load(script).main(args)
    return e.value.args[0]


def check_python(words, monkeypatch):
    if words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, f"python -m {words[2]}: not installed"
    elif words[1] == "-c":
        compile(words[2], "<README>", "exec")
    else:
        parse_script(words[1], words[2:], monkeypatch)


def check_torchrun(words, monkeypatch):
    from torch.distributed.run import get_args_parser
    ns = get_args_parser().parse_args(words[1:])
    cfg = parse_script(ns.training_script, ns.training_script_args, monkeypatch)
    if hasattr(cfg, "micro_batch"):  # the batch must split over the processes, as adapt.py splits it
        distributed.batch_split(cfg.batch_size, cfg.micro_batch, int(ns.nproc_per_node))


def check_pip(words, monkeypatch):
    assert words[1] == "install", words
    for i, w in enumerate(words):
        if w == "-r":
            assert os.path.isfile(os.path.join(ROOT, words[i + 1])), f"pip install -r {words[i + 1]}: no such file"


def check_hf(words, monkeypatch):
    scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points}
    assert "hf" in scripts, "huggingface-hub (requirements.txt) does not install the `hf` command"
    sub = []
    for w in words[1:3]:
        if not re.fullmatch(r"[a-z-]+", w):
            break
        sub.append(w)
    proc = subprocess.run(["hf", *sub, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, f"hf {' '.join(sub)}: not a command of the installed hf: {proc.stderr[-300:]}"


def check_bash(words, monkeypatch):
    assert os.path.isfile(os.path.join(ROOT, words[1])), words


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:80] for w in COMMANDS])
def test_readme_command_parses(words, monkeypatch):
    assert words[0] in PROGRAMS, f"README runs {words[0]}, which the requirements do not install"
    globals()["check_" + words[0]](words, monkeypatch)


def test_readme_has_commands_of_each_kind():
    kinds = {w[0] for w in COMMANDS}
    assert {"python", "torchrun", "pip"} <= kinds, kinds
    assert "huggingface-cli" not in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_a_wrong_flag_fails_the_check(monkeypatch):
    with pytest.raises(SystemExit):
        parse_script("adapt.py", ["--rnak", "64"], monkeypatch)
    with pytest.raises(ValueError):
        distributed.batch_split(1, None, 8)


def test_adapt_defaults_on_a_real_model_layout_are_the_authors_run(tmp_path):
    """No flags but the files: 15,000 steps of 1 x 1024 tokens and 977 held-out windows a part (train_lora.py's 15,000
    sequences; utils.py's ceil(1M / 1024) validation windows). The plan is printed before training starts."""
    import numpy as np
    from fixtures.tiny import BOS, EOS, VOCAB, make_model, make_sae
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8 * 1024), ("val", 2_002_000)):  # data.prepare's default: 1M for each held-out part
        rng.integers(3, VOCAB, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps(dict(vocab_size=VOCAB, dtype="uint16", train_tokens=8 * 1024,
                                                    val_tokens=2_002_000, bos_id=BOS, eos_id=EOS, source="test")))
    cmd = [sys.executable, "adapt.py", "--model", make_model(tmp_path / "model"), "--data", str(data),
           "--sae", make_sae(tmp_path / "sae", layer=1), "--out", str(tmp_path / "out"), "--compile", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("plan:") or len(lines) > 50:
                break
    finally:
        proc.kill()
        proc.wait()
    plan = next((x for x in lines if x.startswith("plan:")), "".join(lines))
    assert "plan: 15,000 optimizer steps of 1 x 1024 tokens; held-out 977 windows of 1024 a part" in plan, plan
    assert "LoRA dropout 0.1 on every step" in plan, plan


def test_one_step_reads_in_five_files_a_third_of_them_the_method():
    """The teaching budget (tools/reading_load.py): one adaptation step in adapt.py, splice.py, lora.py, sae.py and
    model.py, about 1,500 lines at most, the method's named pieces at least 30% of them, adapt.py about 180 lines."""
    import tools.reading_load as rl
    res = rl.main(["--json"])
    for name, counts in res["files"].items():  # physical lines, as wc -l counts them
        assert counts["lines"] == open(os.path.join(ROOT, name), "rb").read().count(b"\n")
    assert res["lines"] <= 1500 and res["method_share"] >= 0.30, res
    assert res["files"]["adapt.py"]["lines"] <= 185, res["files"]["adapt.py"]
