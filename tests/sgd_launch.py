"""Run a training script with plain SGD in place of its Adam / AdamW, for the 1-vs-2-process tests: Adam divides a
gradient by its own running scale, so gradients summed instead of averaged over processes would train the same;
SGD's step is lr x gradient, so they would not. python tests/sgd_launch.py SCRIPT ARGS... (under torchrun too)."""
import runpy
import sys

import torch


def sgd(params, lr=1e-3, **_):  # betas, eps, weight_decay: Adam's, dropped
    return torch.optim.SGD(params, lr=lr)


if __name__ == "__main__":
    torch.optim.Adam = torch.optim.AdamW = sgd
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
