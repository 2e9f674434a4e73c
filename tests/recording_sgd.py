"""An SGD that records, at every step, each parameter and its gradient as the optimizer sees them (after the
all-reduce, the projections and the clipping of the training loops): for tests of those gradient paths."""
import torch


class RecordingSGD(torch.optim.SGD):
    steps: list = []

    def __init__(self, params, lr=1e-3, **_):  # Adam's betas, eps, weight_decay: dropped
        super().__init__(params, lr=lr)
        RecordingSGD.steps = []

    @torch.no_grad()
    def step(self, closure=None):
        RecordingSGD.steps.append([(p.detach().clone(), p.grad.detach().clone()) for g in self.param_groups
                                   for p in g["params"] if p.grad is not None])
        return super().step(closure)
