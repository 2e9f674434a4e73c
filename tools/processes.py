"""Commands run by tools/gpu_check.py: each in its own process group with a deadline (the whole group killed at it:
torchrun's workers, compile workers), its stdout lines stamped with their arrival time, and what went wrong in one line.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_proc(args, timeout: float, env=None, cwd=ROOT, log: str | None = None) -> dict:
    """Run a command in its own process group; at the timeout the whole group is killed. stdout lines are stamped
    with the time they arrived (stage times of a pipeline); stderr is written to `log` as it comes, when given.
    {rc, stdout, stderr, lines: [(t, line)], timed_out}."""
    err = open(log, "w+") if log else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: [lines.append((time.time(), line)) for line in proc.stdout], daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: torchrun's workers, compile workers, bench children
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=5)
    err.seek(0)
    text = err.read()
    err.close()
    return dict(rc=proc.returncode, stdout="".join(line for _, line in lines), stderr=text, lines=lines,
                timed_out=timed_out)


def one_line_error(text: str) -> str:
    """The line that says what went wrong: a script's one-line error, else an exception's last line, else the last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for pattern in (r"\S+\.py: error: .*", r"[\w.]*(Error|Exception|Interrupt)\b.*"):
        hit = next((line for line in reversed(lines) if re.fullmatch(pattern, line)), None)
        if hit:
            return hit[:400]
    return lines[-1][:400] if lines else ""


def cpu_seconds() -> float:
    """CPU time of the finished child processes (and theirs): what a part cost the host's cores."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]


def tail(text: str, n: int = 150) -> str:
    return "\n".join(text.splitlines()[-n:])
