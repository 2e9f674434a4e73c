"""One training run, as adapt.py, train_sae.py, train_e2e.py and pretrain.py run it. None of it is the method; a
student may skip this file.

    with Run(cfg, outputs=("adapter", "results.json"), may_change=MAY_CHANGE, inputs=dict(model=..., data=...)) as run:
        ...                              # model, data, optimizer
        run.keep(adapter=params, optimizer=optimizer, loader=train)  # what every checkpoint holds
        state = run.resume(("history",)) # those restored; the inputs checked, RNG and time restored; or None
        while step < total_steps:
            ...                          # one step
            run.tick(tokens, seconds)    # elapsed time, and the speed, ETA and MFU of the next log line
            run.watch(step, loss)        # a non-finite loss marks the state bad, without a host sync
            run.stop_if_diverged(...)    # at log and checkpoint steps: the divergence stop (formats/run_folder.py)
            run.save(**state)            # ckpt.pt, atomically, the one before kept as ckpt.prev.pt
        run.finish("results.json", results)

Run owns the output folder (formats/run_folder.claim: the lock, the refusals, --overwrite, the --resume checks of the
settings and of the inputs' content), the processes (torchrun / DDP, distributed.setup; torn down when the run ends
well), the checkpoint file and the results file.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch

from plumbing import common
from plumbing import distributed
from formats import disk, run_folder

CHECKPOINT = "ckpt.pt"  # every training script's checkpoint: model or adapter state, optimizer, data position, RNG
FORMER_NAMES = ("state.pt", "train_state.pt")  # what train_sae.py / train_e2e.py and pretrain.py called it before


class Run:
    """The output folder, processes, checkpoint, divergence stop, speed and results of one training run of `cfg`
    (a script's config: it has out, resume, overwrite and device)."""

    def __init__(self, cfg, *, outputs: tuple[str, ...], may_change: frozenset[str], inputs: dict,
                 may_lower=("lr",), out: str | None = None, one_step: tuple[int, str] | None = None):
        """outputs: what the script writes to the folder besides the checkpoint (globs; --overwrite deletes them);
        may_change: the settings --resume may change; inputs: {flag: path(s)} the run reads, compared by content on
        --resume; one_step: (tokens of one optimizer step, how they are made up), checked against --max-tokens."""
        self.cfg, self.out, self.t_start = cfg, out or cfg.out, time.time()
        if one_step is not None:
            common.check_one_step(cfg.max_tokens, *one_step)
        self.path = os.path.join(self.out, CHECKPOINT)
        former = [os.path.join(self.out, n) for n in FORMER_NAMES if os.path.isfile(os.path.join(self.out, n))]
        if cfg.resume and former and not os.path.exists(self.path) and int(os.environ.get("RANK", "0")) == 0:
            # a run from before the scripts shared one name: continued under it
            os.replace(former[0], self.path)
            common.log(f"--resume: {former[0]} renamed {CHECKPOINT}, the checkpoint's name in every script")
        self.given = dict(inputs)
        paths = [p for v in inputs.values() for p in (v if isinstance(v, (list, tuple)) else [v])]
        self.claim = run_folder.claim(
            self.out, resume=cfg.resume, overwrite=cfg.overwrite, checkpoint=CHECKPOINT, config=asdict(cfg),
            outputs=(CHECKPOINT, run_folder.previous(CHECKPOINT), *FORMER_NAMES, *outputs), may_change=may_change,
            inputs=paths, by_content=tuple(inputs), may_lower=may_lower)
        try:
            self.ddp = distributed.setup(cfg.device)
        except BaseException:
            self.claim.release()
            raise
        self.elapsed = 0.0  # training seconds over every invocation (restored by resume)
        self._window = [0, 0.0]  # tokens and seconds since the last log line
        self._first_bad = torch.full((), -1, device=self.ddp.device)  # the first step whose loss is not finite
        self._inputs = None
        self.parts = {}

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:  # a run that failed on one rank must not wait for the others at a barrier
            distributed.teardown()
            common.log(f"{time.time() - self.t_start:.0f}s in all (set-up, training, evaluations and saves)")
        self.claim.release()

    @property
    def inputs(self) -> dict:
        """What the inputs hold (run_folder.inputs_of), recorded in every checkpoint; read once, when first needed
        (after the script has found and loaded them)."""
        if self._inputs is None:
            self._inputs = run_folder.inputs_of(**self.given)
        return self._inputs

    # -- the checkpoint ------------------------------------------------------------------------------------------------

    def keep(self, **parts):
        """What every checkpoint holds besides what save() is given, by name, and --resume restores: weights (a module,
        or a list of tensors, FSDP2 shards gathered), an optimizer (its state with whole tensors) and each rank's data
        position (an object with state_dict / load_state_dict: a loader, a buffer)."""
        self.parts = parts

    def _state_of(self, part):  # a collective under torchrun: every rank calls it
        if isinstance(part, torch.nn.Module):
            return part.state_dict()
        if isinstance(part, torch.optim.Optimizer):
            return distributed.optimizer_state(part, _params_of(part))
        if isinstance(part, (list, tuple)):
            return [distributed.whole(p) for p in part]
        return distributed.gather_objects(part.state_dict())

    def resume(self, keys: tuple[str, ...] = (), required: bool = False) -> dict | None:
        """With --resume, the checkpoint's state, its parts (keep) restored: it must hold them and `keys`, have been
        trained from inputs of the same content and hold weights of this run's shapes; this rank's random state and
        the training time are restored. None without --resume, or (unless `required`) when there is no checkpoint
        yet."""
        if not self.cfg.resume:
            return None
        if not os.path.isfile(self.path):
            if required:
                raise FileNotFoundError(f"--resume: no checkpoint at {self.path}")
            common.log(f"--resume: no checkpoint at {self.path}, starting fresh")
            return None
        state = disk.torch_load(self.path, self.ddp.device, keys=(*self.parts, *keys, "step", "elapsed"))
        run_folder.check_inputs(state.get("inputs"), self.inputs, self.path)
        for name, part in self.parts.items():
            saved = state[name]
            if isinstance(part, torch.nn.Module):
                run_folder.check_tensors(list(saved.values()), list(part.state_dict().values()), self.path, name)
                part.load_state_dict(saved)
            elif isinstance(part, torch.optim.Optimizer):
                distributed.optimizer_state(part, _params_of(part), load=saved)
            elif isinstance(part, (list, tuple)):
                run_folder.check_tensors(saved, part, self.path, name)
                for p, t in zip(part, saved):
                    p.data.copy_(distributed.shard_like(p, t))
            else:
                part.load_state_dict(saved[self.ddp.rank])
        common.set_rng_state(state.get("rng"), self.ddp.rank)  # where this rank's stream was when it was saved
        self.elapsed = state["elapsed"]
        common.log(f"resumed from {self.path} at step {state['step']}")
        return state

    def save(self, **state):
        """Write the checkpoint: the parts (keep), `state` (step and whatever else the script needs to go on
        exactly), the training time, every rank's random state, the config and the inputs' record. Every rank calls
        it (FSDP2 shards and the ranks' positions are gathered); rank 0 writes, atomically, keeping the one before as
        ckpt.prev.pt against a divergence."""
        parts = {name: self._state_of(part) for name, part in self.parts.items()}
        rngs = distributed.gather_objects(common.rng_state())
        if self.ddp.master:
            run_folder.save_checkpoint(dict(parts, **state, elapsed=self.elapsed, rng=rngs, config=asdict(self.cfg),
                                            inputs=self.inputs), self.path)

    def finish(self, name: str | None = None, results: dict | None = None):
        """The run ended well: `results` written as `name` (JSON; NaN as null) by rank 0, and the checkpoint kept
        against a divergence removed."""
        if self.ddp.master:
            if name is not None:
                disk.write_json(os.path.join(self.out, name), disk.jsonable(results))
            run_folder.finish(self.path)

    # -- the divergence stop -------------------------------------------------------------------------------------------

    def watch(self, step: int, loss: torch.Tensor):
        """Mark `step` (the loss of the state after `step` updates) if the loss is not finite; on the device, no sync:
        stop_if_diverged reads it."""
        self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(loss.detach()), step, self._first_bad)

    def stop_if_diverged(self, step: int, weights, what: str, advice: str, on_stop=None):
        """A host sync, on every rank: if a loss watched since the last call or one of `weights` ({name: tensor}, or a
        list: weight 0, 1, ...; each rank's shard) is not finite on any rank, end the run with run_folder.diverged's
        line (the newest checkpoint from before the bad state is kept, and named with `advice`). Where one is kept,
        rank 0 sets the weights (keep; not FSDP2 shards) back to it and calls on_stop(), to rewrite what it writes
        from them (adapt.py's adapter/)."""
        weights = weights if isinstance(weights, dict) else {f"weight {i}": t for i, t in enumerate(weights)}
        bad_name = next((n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(
            t.to_local() if hasattr(t, "to_local") else t).all()), None)
        never = torch.iinfo(torch.long).max
        finite = torch.tensor(int(bad_name is None), device=self._first_bad.device)
        first_bad = torch.where(self._first_bad >= 0, self._first_bad, never)
        health = distributed.all_reduce_min(torch.stack([first_bad, finite]))
        bad_step, finite = int(health[0]), bool(health[1])
        if bad_step == never and finite:
            return
        bad_step, which = (bad_step, "the loss") if bad_step != never else (step, bad_name or "a weight")
        err = run_folder.diverged(self.path, bad_step, f"{what}: {which} is not finite", advice,
                                  master=self.ddp.master)
        if self.ddp.master and os.path.isfile(self.path) and self._reload_weights() and on_stop is not None:
            on_stop()
        raise err

    def _reload_weights(self) -> bool:
        saved = disk.torch_load(self.path, self.ddp.device)
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                part.load_state_dict(saved[name])
            elif isinstance(part, (list, tuple)):
                if any(hasattr(p, "to_local") for p in part):
                    return False
                for p, t in zip(part, saved[name]):
                    p.data.copy_(t)
        return True

    # -- speed ---------------------------------------------------------------------------------------------------------

    def tick(self, tokens: int, seconds: float):
        """One step's tokens and wall seconds."""
        self.elapsed += seconds
        self._window = [self._window[0] + tokens, self._window[1] + seconds]

    def speed(self, tokens_left: int, flops_per_token: float | None = None) -> tuple[float, str]:
        """(tokens/s since the last call, 'N tok/s | MFU x | ETA y min'): MFU where the step's FLOPs per token are
        given (against common.peak_flops of the device at the run's autocast)."""
        tps = self._window[0] / max(self._window[1], 1e-9)
        self._window = [0, 0.0]
        mfu = ""
        if flops_per_token is not None:
            peak = common.peak_flops(self.ddp.device, getattr(self.cfg, "autocast", "bfloat16"))
            mfu = f" | MFU {tps * flops_per_token / peak:.1%}"
        return tps, f"{tps:,.0f} tok/s{mfu} | ETA {tokens_left / max(tps, 1e-9) / 60:.1f} min"


def log_held_out(step: int, part: str, res: dict, norm_rule: float | None = None):
    """The log lines of a held-out evaluation (evals.held_out.evaluate's numbers; answers.evaluate_answers' where given)."""
    common.log(f"step {step} | {part} CE original {res['ce_base']:.4f} | with SAE {res['ce_sae']:.4f} | with SAE + "
               f"LoRA {res['ce_sae_lora']:.4f} | gap closed {res['gap_closed']:.1%} | KL {res['kl_sae']:.4f} -> "
               f"{res['kl_sae_lora']:.4f}")
    if norm_rule is not None:
        common.log(f"step {step} | norm rule (> {norm_rule:g} x median): SAE left out at "
                   f"{res['norm_skipped_sae']:,} / {res.get('norm_skipped_sae_lora', 0):,} of {res['positions']:,} "
                   f"{part} positions (SAE / SAE + LoRA)")
    if "answer_ce_base" in res:
        common.log(f"step {step} | held-out answers: CE original {res['answer_ce_base']:.4f} | with SAE "
                   f"{res['answer_ce_sae']:.4f} | with SAE + LoRA {res['answer_ce_sae_lora']:.4f} | exact "
                   f"{res['answer_acc_base']:.1%} / {res['answer_acc_sae']:.1%} / {res['answer_acc_sae_lora']:.1%}")


def _params_of(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]
