"""data.py: the held-out split in two parts, validation (every choice) and test (every reported number).

The reference is the definition written in the test itself: each part's windows, read back from the tokens the loader
returns, against the split's own documents (a document's tokens name it)."""
import json
import os

import numpy as np
import pytest

from data import HELD_OUT_PARTS, TokenLoader, held_out_part

BOS, SPAN = 60000, 9  # seq_len 10: BOS + 9 tokens of the stream


def documents_dataset(folder, lengths):
    """val.bin: document d is BOS followed by `lengths[d]` tokens of value d + 1, so a window names its documents."""
    os.makedirs(folder, exist_ok=True)
    val = np.concatenate([np.r_[BOS, np.full(n, d + 1)] for d, n in enumerate(lengths)]).astype(np.uint16)
    val.tofile(os.path.join(folder, "val.bin"))
    np.arange(100, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": 65536, "dtype": "uint16", "bos_id": BOS, "eos_id": BOS - 1,
                   "train_tokens": 100, "val_tokens": len(val)}, f)
    return str(folder), val


def read_all(loader):
    """Every window of the part in the loader's order, as rows of tokens (BOS dropped)."""
    return [row for _ in range(loader.per_rank // loader.batch_size) for row in loader.next_batch()[:, 1:].numpy()]


def docs_of(row):
    return {int(t) - 1 for t in row if t != BOS}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    return documents_dataset(tmp_path, rng.integers(4 * SPAN, 12 * SPAN, 40))  # 40 files, 4-12 windows each


def test_parts_are_disjoint_halves_of_the_split(dataset):
    d, val = dataset
    n = len(val) // SPAN
    windows = {p: held_out_part(n, p) for p in HELD_OUT_PARTS}
    a, b = (set(w.tolist()) for w in windows.values())
    assert len(a) == len(b) == n // 2 and not a & b  # disjoint, no window twice
    assert a | b == set(range(2 * (n // 2)))  # together the whole split (an odd last window in neither)
    # the loader returns exactly those windows' tokens
    for p in HELD_OUT_PARTS:
        rows = read_all(TokenLoader(d, p, 1, SPAN + 1, shuffle=False))
        assert [r.tolist() for r in rows] == [val[w * SPAN:(w + 1) * SPAN].tolist() for w in windows[p]]


def test_each_part_covers_every_file(dataset):
    d, val = dataset
    n_docs = int(val[val != BOS].max())
    for p in HELD_OUT_PARTS:
        rows = read_all(TokenLoader(d, p, 4, SPAN + 1, shuffle=False))
        inside = {next(iter(docs_of(r))) for r in rows if len(docs_of(r)) == 1 and BOS not in r}
        assert inside == set(range(n_docs)), p  # a whole window of every document, in both parts
        # a small budget is a sample from across the split, not its first documents
        first = set().union(*(docs_of(r) for r in rows[:20]))
        assert len(first) >= 12 and max(first) >= 30, (p, sorted(first))


def test_parts_are_deterministic_and_do_not_follow_the_run_seed(dataset):
    d, val = dataset
    n = len(val) // SPAN
    for p in HELD_OUT_PARTS:
        assert np.array_equal(held_out_part(n, p), held_out_part(n, p))
        runs = [np.stack(read_all(TokenLoader(d, p, 4, SPAN + 1, seed=s, shuffle=False))) for s in (0, 1)]
        assert np.array_equal(*runs)  # every --seed is measured on the same windows
        assert not np.array_equal(held_out_part(n, p), held_out_part(n, p, seed=1))  # the seed does decide them
        assert not np.array_equal(np.sort(held_out_part(n, p)), held_out_part(n, p))  # read in a random order
    with pytest.raises(ValueError, match="unknown held-out part"):
        held_out_part(n, "val")


def test_ranks_split_a_part_between_them(dataset):
    d, val = dataset
    single = read_all(TokenLoader(d, "test", 4, SPAN + 1, shuffle=False))
    ranks = [read_all(TokenLoader(d, "test", 2, SPAN + 1, rank=r, world_size=2, shuffle=False)) for r in range(2)]
    together = [row for pair in zip(*ranks) for row in pair]  # rank r holds windows r, r + 2, ...
    assert [r.tolist() for r in together] == [r.tolist() for r in single[:len(together)]]


def test_adapt_reports_test_and_steers_on_validation(tmp_path):
    """adapt.py's final numbers are the test part's (its original-model CE recomputed here with F.cross_entropy on the
    test windows), its evaluations during training the validation part's; --eval-split validation reports those."""
    import torch
    import torch.nn.functional as F

    import adapt
    from model import Transformer
    from fixtures.tiny import make_data, make_model, make_sae
    model, data = make_model(tmp_path / "model"), make_data(tmp_path / "data")
    sae = make_sae(tmp_path / "sae", "topk", layer=1, k=2)
    args = ["--model", model, "--data", data, "--sae", sae, "--seq-len", "32", "--batch-size", "2", "--max-tokens",
            "128", "--eval-tokens", "128", "--rank", "4", "--compile", "false", "--autocast", "float32",
            "--eval-interval", "2", "--log-interval", "2"]
    res = adapt.main(args + ["--out", str(tmp_path / "a")])
    m = Transformer.from_pretrained(model)

    def ce(part):
        loader = TokenLoader(data, part, 2, 32, shuffle=False)
        idx = torch.cat([loader.next_batch() for _ in range(2)])
        with torch.no_grad():
            return F.cross_entropy(m(idx)[:, :-1].flatten(0, 1).double(), idx[:, 1:].flatten()).item()
    assert res["eval_split"] == "test"
    assert res["ce_base"] == pytest.approx(ce("test"), abs=1e-4)
    assert res["history"][-1]["ce_base"] == pytest.approx(ce("validation"), abs=1e-4)
    assert abs(ce("test") - ce("validation")) > 1e-3  # the two parts are different tokens
    val = adapt.main(args + ["--out", str(tmp_path / "b"), "--eval-split", "validation"])
    assert val["eval_split"] == "validation" and val["ce_base"] == pytest.approx(ce("validation"), abs=1e-4)
