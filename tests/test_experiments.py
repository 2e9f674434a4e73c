"""experiments/run.py: the time-to-CE bookkeeping behind the frontier tables (not the runs themselves: too long)."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("experiments_run", os.path.join(ROOT, "experiments", "run.py"))
run = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(run)


def test_time_to_reach_a_ce_is_the_first_point_at_or_below_it():
    curve = [(30.0, 2.9), (10.0, 3.1), (20.0, 2.95), (40.0, 2.92)]  # unsorted; not monotone
    assert run.time_to(curve, 3.0) == 20.0
    assert run.time_to(curve, 2.9) == 30.0
    assert run.time_to(curve, 2.95) == 20.0
    assert run.time_to(curve, 2.8) is None


def test_interpolate_checkpoint_times():
    steps, secs = [0, 10, 20], [0.0, 5.0, 15.0]
    assert run.interpolate(steps, secs, 15) == 10.0
    assert run.interpolate(steps, secs, 20) == 15.0
    assert run.interpolate(steps, secs, 0) == 0.0


def test_unknown_experiment_is_a_clear_error():
    proc = subprocess.run([sys.executable, "experiments/run.py", "fronteir"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: python experiments/run.py" in proc.stderr
