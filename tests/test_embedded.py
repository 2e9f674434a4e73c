"""plumbing/embedded.py and the command line: presets fill only what was not typed, the cache is reused, every flag is
documented, and bad input ends in one line with exit code 2 (as the user types the scripts, in a subprocess)."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest

import adapt
from plumbing import common
import config
from plumbing import embedded
import eval as ev
import pretrain
import train_e2e
import train_sae
from formats import stdlib_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["adapt.py", "train_sae.py", "train_e2e.py", "eval.py", "pretrain.py", "tools/bench.py"]


def cli(*args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stub_pipeline(monkeypatch, tmp_path):
    """The embedded builders replaced by fixed paths: nothing is trained."""
    monkeypatch.setattr(embedded, "model", lambda: "MODEL")
    monkeypatch.setattr(embedded, "corpus", lambda: "CORPUS")
    monkeypatch.setattr(embedded, "sae", lambda layer=embedded.SAE_LAYER: f"SAE-L{layer}")
    monkeypatch.setattr(ev, "evaluate_all", lambda cfg: cfg)
    for mod in (adapt, train_sae, train_e2e):  # the training scripts end at their run's start, with their config
        monkeypatch.setattr(mod, "Run", stop_with_config)
        monkeypatch.setattr(mod, "main", returns_config(mod.main))
    monkeypatch.chdir(tmp_path)


class Configured(Exception):
    pass


def stop_with_config(cfg, **kwargs):
    raise Configured(cfg)


def returns_config(main):
    def parse(argv):
        try:
            main(argv)
        except Configured as e:
            return e.args[0]
        raise AssertionError("the script ran past its config")
    return parse


def test_presets_fill_only_untyped_flags(stub_pipeline):
    cfg = adapt.main([])
    assert (cfg.model, cfg.data, cfg.sae) == ("MODEL", "CORPUS", ["SAE-L2"])
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.kl_reduction) == (3e-3, 8, 256, "token")
    cfg = adapt.main(["--lr", "5e-5", "--batch-size", "1"])  # the paper's values, typed: kept
    assert (cfg.lr, cfg.batch_size, cfg.seq_len) == (5e-5, 1, 256)
    assert adapt.main(["--layer", "1"]).sae == ["SAE-L1"]  # the embedded SAE of that layer
    cfg = train_sae.main(["--k", "64"])
    assert (cfg.k, cfg.layer, cfg.max_tokens) == (64, [2], 4_000_000)
    assert train_e2e.main([]).layer == [2]
    cfg = adapt.main(["--model", "some/model", "--sae", "x", "--data", "d"])  # a real model: the paper's values
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.dropout, cfg.weight_decay) == (5e-5, 1, 1024, 0.1, 0.01)


def test_presets_are_logged_first_and_recorded(stub_pipeline, capsys):
    """A plain `python adapt.py` trains with the tiny preset, not the defaults --help lists: the first log lines say
    so, value by value, and config_sources records where each value came from."""
    cfg = adapt.main(["--lr", "1e-4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "adapt.py: no --model, so the tiny model's preset (config/adapt_tiny.py) replaces these " \
                       "defaults (typed flags win):"
    listed = [line.strip() for line in lines[1:] if line.startswith("  --")]
    for flag in ("--schedule cosine (default linear)", "--weight-decay 0.0 (default 0.01)", "--dropout 0.0 (default 0.1)",
                 "--kl-reduction token (default sequence)", "--seq-len 256 (default 1024)", "--decay-frac 1.0 (default "
                 "0.0)"):
        assert flag in listed, (flag, listed)
    changed = {k for k, v in config.preset("adapt").items() if v != getattr(adapt.AdaptConfig(), k) and k != "lr"}
    assert len(listed) == len(changed)  # every value the preset changed, and only those
    assert not any(x.startswith("--lr") for x in listed)  # typed: the user's value
    src = common.sources(cfg)
    assert (src["lr"], src["schedule"], src["rank"]) == ("typed", "preset", "default")
    assert src["log_interval"] == "preset"  # a preset value equal to the default is the preset's, and not listed
    assert cfg.lr == 1e-4 and cfg.schedule == "cosine"
    # train_sae.py --recipe authors: its values listed and recorded as the recipe's, over the tiny preset's
    cfg = train_sae.main(["--recipe", "authors"])
    out = capsys.readouterr().out
    assert "train_sae.py: --recipe authors replaces these values (typed flags win):\n  --batch-tokens 256 (default " \
           "4096)" in out
    assert common.sources(cfg)["batch_tokens"] == "recipe" and common.sources(cfg)["k"] == "preset"
    # --help ends with the preset's values
    help_text = cli("adapt.py", "--help").stdout
    assert "(config/adapt_tiny.py)" in help_text and "--lr 0.003" in help_text


def test_real_model_without_sae_uses_the_paper_sae_or_says_what_to_pass(stub_pipeline):
    cfg = adapt.main(["--model", "google/gemma-2-2b", "--layer", "12", "--data", "d"])
    assert cfg.sae == ["google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"]  # the paper's SAE
    with pytest.raises(ValueError, match="no --sae given and no --layer"):
        adapt.main(["--model", "google/gemma-2-2b", "--data", "d"])
    with pytest.raises(ValueError, match="no --sae given.*pass --sae"):
        adapt.main(["--model", "meta-llama/Llama-3.2-1B", "--layer", "8", "--data", "d"])


def fake_model(folder, weights=b""):
    """A model folder as far as the cache keys look: model.safetensors (its bytes are the SAE key's input)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(weights)
    return folder


@pytest.fixture
def no_build(monkeypatch):
    """The builders record what they were asked to build, write only the marker, and train nothing."""
    built = []

    def fake_script(script, flags):  # `python SCRIPT --flag value ...`, read as the script reads its flags
        argv = [f"--{k}={v}" for k, vs in flags.items() for v in (vs if isinstance(vs, list) else [vs])]
        if script == "pretrain.py":
            cfg, _ = common.parse_args(pretrain.PretrainConfig, argv)
            built.append(("pretrain", cfg))
            fake_model(cfg.out, b"weights of a new recipe")
            return
        assert script == "train_sae.py"
        cfg, _ = common.parse_args(train_sae.TrainSAEConfig, argv)
        built.append(("train_sae", cfg))
        os.makedirs(cfg.out, exist_ok=True)
        open(os.path.join(cfg.out, "cfg.json"), "w").write("{}")
    monkeypatch.setattr(embedded, "run_script", fake_script)
    monkeypatch.setattr(stdlib_corpus, "corpus_and_tokenizer", lambda *a, **k: ("CORPUS", "TOKENIZER"))
    monkeypatch.setattr(embedded, "corpus_for", lambda model: "CORPUS")
    return built


def test_cached_artefacts_are_not_rebuilt(monkeypatch, tmp_path, no_build):
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "SHIPPED", str(tmp_path / "nothing shipped"))
    model = fake_model(embedded.model_dir(pretrain.PretrainConfig()))
    sae = embedded.sae_dir(1, model)
    assert os.path.dirname(model) == os.path.dirname(sae) == str(tmp_path)
    os.makedirs(sae)
    open(os.path.join(sae, "cfg.json"), "w").write("{}")
    assert embedded.model() == model and embedded.sae(1) == sae
    assert no_build == []


def test_cache_folders_are_keyed_by_the_recipe(monkeypatch, tmp_path):
    """A changed recipe builds beside the old artefact instead of reusing it: the model's folder is named by
    embedded.PretrainRecipe's fields, the SAE's by its recipe, layer and the weights it reads."""
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path))
    model = embedded.model_dir(pretrain.PretrainConfig())
    assert embedded.model_dir(pretrain.PretrainConfig()) == model  # `python pretrain.py` writes the pipeline's folder
    run_only = dict(out="x", data="d", stop_after=3, eval_interval=1, eval_batches=1, log_interval=1, ckpt_interval=1,
                    resume=True, overwrite=False, compile=False, device="cpu")
    assert {f.name for f in dataclasses.fields(pretrain.PretrainConfig)} - set(run_only) == \
        {f.name for f in dataclasses.fields(embedded.PretrainRecipe)}  # every other field is in the recipe
    assert embedded.model_dir(pretrain.PretrainConfig(**run_only)) == model  # not the recipe: same model
    for name, value in dict(max_steps=10, lr=1e-3, seed=1, autocast="float32", d_model=128).items():
        assert embedded.model_dir(pretrain.PretrainConfig(**{name: value})) != model, name
    a, b = fake_model(tmp_path / "a", b"one model"), fake_model(tmp_path / "b", b"another model")
    sae = embedded.sae_dir(2, a)
    assert embedded.sae_dir(1, a) != sae
    assert os.path.basename(embedded.sae_dir(2, b)) != os.path.basename(sae)  # other weights, same folder name
    monkeypatch.setitem(embedded.SAE, "k", 32)
    assert embedded.sae_dir(2, a) != sae


def test_shipped_files_are_used_when_the_recipe_matches(monkeypatch, tmp_path, no_build):
    """An empty cache: the default recipe's model and SAE come from shipped/ and nothing is built."""
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path))
    model = embedded.model()
    assert model == os.path.join(embedded.SHIPPED, os.path.basename(embedded.model_dir(pretrain.PretrainConfig())))
    assert embedded.sae() == os.path.join(embedded.SHIPPED, os.path.basename(embedded.sae_dir(2, model)))
    assert no_build == [] and os.listdir(tmp_path) == []


def test_a_changed_recipe_builds_its_own_folder(monkeypatch, tmp_path, no_build):
    monkeypatch.setenv("LORASAE_CACHE", str(tmp_path))
    monkeypatch.setitem(embedded.SAE, "k", 32)  # the SAE recipe: a new SAE on the shipped model
    sae = embedded.sae()
    assert os.path.dirname(sae) == str(tmp_path) and os.path.basename(sae) not in os.listdir(embedded.SHIPPED)
    (kind, cfg), = no_build
    assert kind == "train_sae" and cfg.k == 32 and cfg.out == sae
    assert os.path.dirname(cfg.model) == embedded.SHIPPED  # trained on the shipped model it is keyed by
    monkeypatch.setattr(stdlib_corpus, "CORPUS_VAL_TOKENS", 100_000)  # the model's recipe: pretrained anew, then its SAE
    model = embedded.model()
    assert os.path.dirname(model) == str(tmp_path) and no_build[1][0] == "pretrain" and no_build[1][1].out == model
    assert os.path.dirname(embedded.sae()) == str(tmp_path) and no_build[2][1].model == model
    assert len(no_build) == 3


def test_shipped_files_are_what_their_recipe_built():
    """Each shipped folder holds what the default recipe built: pretrain.json records the model's recipe, history.json
    the SAE's, and the SAE's folder is keyed by the shipped model's weights. A changed default recipe fails here until
    shipped/ is rebuilt (shipped/README.md)."""
    model = os.path.join(embedded.SHIPPED, os.path.basename(embedded.model_dir(pretrain.PretrainConfig())))
    assert os.path.isfile(os.path.join(model, "model.safetensors")), \
        "the default recipe changed: rebuild shipped/ with the commands in shipped/README.md"
    recorded = json.load(open(os.path.join(model, "pretrain.json")))["config"]
    asked = embedded.PretrainRecipe()
    for f in dataclasses.fields(embedded.PretrainRecipe):
        if f.name == "autocast":  # pretrain.json records what "auto" ran as on the machine that built it
            assert asked.autocast == "auto" and recorded["autocast"] in ("bfloat16", "float32")
        else:
            assert recorded[f.name] == getattr(asked, f.name), f.name
    assert os.path.isfile(os.path.join(model, "tokenizer.model")) and os.path.isfile(os.path.join(model, "config.json"))
    sae = os.path.join(embedded.SHIPPED, os.path.basename(embedded.sae_dir(embedded.SAE_LAYER, model)))
    recorded = json.load(open(os.path.join(sae, "history.json")))["config"]
    assert {k: recorded[k] for k in embedded.SAE} == embedded.SAE
    assert os.path.isfile(os.path.join(sae, "sae_weights.safetensors"))
    assert sorted(os.listdir(embedded.SHIPPED)) == sorted(["README.md", os.path.basename(model), os.path.basename(sae)])


def typed_other(value, key=""):
    """A command-line value unlike the preset's `value`, and valid for flag `key` (each config checks its values)."""
    if key in ("schedule", "kl_reduction"):
        return {"cosine": "linear", "linear": "cosine", "token": "sequence", "sequence": "token"}[value]
    if key == "dropout" or key.endswith("_frac"):  # fractions
        return str(value / 2 if value else 0.5)
    if isinstance(value, bool):
        return str(not value)
    if isinstance(value, list):
        return [str(value[0] - 1 if value[0] else 1)]
    if isinstance(value, (int, float)):
        return str(value * 2 + 1)
    return f"typed-{value}"


@pytest.mark.parametrize("script", ["adapt", "eval", "train_e2e", "train_sae"])
def test_typed_flags_are_never_overridden(stub_pipeline, script):
    """Every flag of a preset typed with another value keeps the typed value; so do --data and --sae."""
    module = {"adapt": adapt, "train_sae": train_sae, "train_e2e": train_e2e, "eval": ev}[script]
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v))
    argv, want = [], {}
    for key, value in config.preset(script).items():
        typed = typed_other(value, key)
        for v in typed if isinstance(typed, list) else [typed]:
            argv += ["--" + key.replace("_", "-"), v]
        want[key] = typed
    argv += ["--data", "DATA"] + (["--sae", "S"] if "sae" in {f.name for f in dataclasses.fields(config_cls)} else [])
    cfg = module.main(argv)
    for key, typed in want.items():
        got = getattr(cfg, key)
        assert (([str(x) for x in got] if isinstance(got, list) else str(got)) == typed), (key, got, typed)
    assert cfg.data == "DATA" and getattr(cfg, "sae", ["S"]) == ["S"] and cfg.model == "MODEL"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_flag(script):
    module = importlib.import_module(script[:-3].replace("/", "."))
    configs = [v for v in vars(module).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
               and v.__module__ in (module.__name__, "config." + module.__name__)]  # its own, or config/SCRIPT.py
    assert configs, script
    for cls in configs:
        helps = common.field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
        assert not missing, f"{script}: {cls.__name__} fields without help: {missing}"
    proc = cli(script, "--help")
    assert proc.returncode == 0 and "(default:" in proc.stdout


def test_design_card_line_on_the_tiny_model_says_what_to_run():
    proc = cli("adapt.py", "--layer", "12", "--rank", "64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "embedded tiny model has 4 layers" in line and "--model google/gemma-2-2b --layer 12" in line


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A good model / data / SAE, and one broken copy of each kind a user brings by mistake."""
    import shutil

    import torch

    from sae import SAE
    from fixtures.tiny import make_data, make_model, make_sae
    root = tmp_path_factory.mktemp("bad")
    f = dict(model=make_model(root / "m"), data=make_data(root / "d"), sae=make_sae(root / "s", layer=1),
             wide=make_sae(root / "wide", d=32, m=64), root=root)

    def broken(src, name, edit):
        shutil.copytree(src, root / name)
        edit(root / name)
        return str(root / name)

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    f["bad_json"] = broken(f["sae"], "bad_json", lambda p: (p / "cfg.json").write_text("{not json"))
    f["trunc_sae"] = broken(f["sae"], "trunc_sae", lambda p: truncate(p / "sae_weights.safetensors"))
    f["trunc_model"] = broken(f["model"], "trunc_model", lambda p: truncate(p / "model.safetensors"))
    f["no_config"] = broken(f["model"], "no_config", lambda p: (p / "config.json").unlink())
    nan = SAE.from_pretrained(f["sae"])
    with torch.no_grad():
        nan.W_enc[0, 0] = float("nan")
    nan.save(str(root / "nan"))
    f["nan"] = str(root / "nan")

    def smaller_vocab(p):
        meta = json.loads((p / "meta.json").read_text())
        (p / "meta.json").write_text(json.dumps({**meta, "vocab_size": 256}))
    f["other_tok"] = broken(f["data"], "other_tok", smaller_vocab)
    (root / "ckpt").mkdir()
    (root / "ckpt" / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    return f


BAD_INPUTS = {  # case: (flags replacing the good ones, what the one line must say)
    "missing SAE": (dict(sae="{root}/nothing"), "no such file or folder"),
    "SAE of another width": (dict(sae="{wide}"), "d_in=32"),
    "cfg.json not JSON": (dict(sae="{bad_json}"), "not valid JSON"),
    "truncated SAE": (dict(sae="{trunc_sae}"), "corrupt or truncated"),
    "truncated model": (dict(model="{trunc_model}"), "corrupt or truncated"),
    "NaN in the SAE": (dict(sae="{nan}"), "NaN"),
    "no config.json": (dict(model="{no_config}"), "no config.json"),
    "layer 99": (dict(layer="99"), "out of range"),
    "layer -1": (dict(layer="-1"), "out of range"),
    "rank 0": (dict(rank="0"), "--rank 0: must be at least 1"),
    "missing data": (dict(data="{root}/nodata"), "no meta.json"),
    "seq-len beyond the data": (dict(seq_len="100000", max_tokens="100000"), "larger than the data"),
    "corrupt ckpt.pt": (dict(out="{root}/ckpt", resume="true"), "unreadable checkpoint"),
    "another tokenizer's data": (dict(data="{other_tok}"), "tokenize the data with the model's own tokenizer"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(bad_files, case):
    flags = dict(model="{model}", data="{data}", sae="{sae}", out="{root}/out", compile="false", max_tokens="256",
                 seq_len="32")
    change, expect = BAD_INPUTS[case]
    args = [x for k, v in {**flags, **change}.items() for x in ("--" + k.replace("_", "-"), v.format(**bad_files))]
    proc = cli("adapt.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("adapt.py: error:") and expect in proc.stderr, proc.stderr
    if case == "corrupt ckpt.pt":
        assert (bad_files["root"] / "ckpt" / "ckpt.pt").is_file()  # nothing deleted


def test_debug_flag_shows_the_traceback(bad_files):
    proc = cli("adapt.py", "--model", bad_files["model"], "--data", bad_files["data"], "--sae", "/nonexistent/sae",
               "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_embedded_lr_typed_at_the_paper_value_is_kept(tmp_path, monkeypatch):
    """`python adapt.py --lr 5e-5` on the embedded pipeline trains at 5e-5 (its saved config says so), with a stub
    cache so that nothing is pretrained here."""
    from fixtures.tiny import make_data, make_model, make_sae
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORASAE_CACHE", str(cache))  # the folder names the subprocess will look for
    make_sae(embedded.sae_dir(2, make_model(embedded.model_dir(pretrain.PretrainConfig()))), layer=2)
    data = make_data(tmp_path / "data")
    proc = cli("adapt.py", "--lr", "5e-5", "--data", data, "--max-tokens", "2048", "--out", str(tmp_path / "o"),
               "--compile", "false", "--seq-len", "32", "--eval-tokens", "256", env={"LORASAE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.load(open(tmp_path / "o" / "results.json"))["config"]
    assert saved["lr"] == 5e-5 and saved["batch_size"] == 8 and saved["kl_reduction"] == "token"
