"""Run a training script with plain SGD in place of its Adam / AdamW, for the 1-vs-2-process tests: Adam divides a
gradient by its own running scale, so gradients summed instead of averaged over processes would train the same;
SGD's step is lr x gradient, so they would not. python tests/sgd_launch.py SCRIPT ARGS... (under torchrun too)."""
import runpy
import sys

import torch


def assert_same_sae_updates(one: str, two: str):
    """The SAEs of a 1-process and a 2-process run (folders `one`, `two`): equal at their first checkpoint and equal
    in what every later step changed, entry by entry (summed gradients would double SGD's steps)."""
    import os
    from sae import SAE
    from tests.tol import assert_close
    first = sorted(f for f in os.listdir(one) if f.startswith("ckpt_"))[0]
    a, b = (SAE.from_pretrained(str(run)).state_dict() for run in (one, two))
    a0, b0 = (SAE.from_pretrained(os.path.join(run, first)).state_dict() for run in (one, two))
    for key in a:
        assert_close(b0[key], a0[key], 1e-4)
        assert_close(b[key] - b0[key], a[key] - a0[key], 1e-3)
    assert (a["W_enc"] - a0["W_enc"]).abs().max() > 1e-4  # the SAE moved: the comparison can tell


def sgd(params, lr=1e-3, **_):  # betas, eps, weight_decay: Adam's, dropped
    return torch.optim.SGD(params, lr=lr)


if __name__ == "__main__":
    torch.optim.Adam = torch.optim.AdamW = sgd
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
