"""gpu_check.py's report: the machine it ran on, and its JSON, log and markdown table (rewritten after every part)."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from plumbing import common
from formats import disk


def environment(dev: torch.device) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, device=str(dev),
               **{pkg: version(pkg) for pkg in ("transformers", "peft", "triton")})
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   gpus=torch.cuda.device_count(), bf16_peak_tflops=common.peak_flops(dev, "bfloat16") / 1e12)
    else:
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine()
        env.update(device_name=name, threads=torch.get_num_threads())
    return env


def cell(x) -> str:
    return str(x).replace("|", "/")  # a table cell: an error message may hold a pipe


def write_report(folder: str, report: dict, log_text: list):
    disk.write_json(os.path.join(folder, "gpu_check.json"), disk.jsonable(report))
    disk.write_text(os.path.join(folder, "gpu_check.log"), "\n".join(log_text))
    env, parts = report["environment"], report["parts"]
    lines = [f"# GPU check: {len(report['passed'])} of {len(parts)} parts passed", "",
             f"`{report['command']}` ({report['mode']}) on {env.get('device_name')} ({env['device']}): torch "
             f"{env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, peft {env['peft']}; "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| part | result | time / budget | what ran | numbers |", "| --- | --- | --- | --- | --- |"]
    for name, r in sorted(parts.items(), key=lambda kv: kv[1]["number"]):
        result = "pass" if r["ok"] else f"**fail**: {cell(r['error'])}"
        lines.append(f"| {r['number']}. {r['title']} | {result} | {r['seconds']:.0f} / {r['budget_s']:.0f} s | "
                     f"{cell(r.get('ran', '-'))} | {cell(r.get('summary', '-'))} |")
    if "checks" in parts.get("numerics", {}):
        lines += ["", "## 1. Numerics", "", "| check | result | relative error (tolerance) |", "| --- | --- | --- |"]
        for name, c in parts["numerics"]["checks"].items():
            errs = c.get("error") or "; ".join(f"{w}: {e:.1e} ({c['tolerances'][w]:.0e})" if isinstance(e, float) else
                                               f"{w}: {e} ({c['tolerances'][w]})" for w, e in c["errors"].items())
            lines.append(f"| {name} | {'pass' if c['ok'] else '**fail**'} | {cell(errs)} |")
    if parts.get("adapt", {}).get("rows"):
        a = parts["adapt"]
        lines += ["", "## 3. Adapt step", "", f"MFU against {a['peak_tflops']:.4g} TFLOP/s ({a['peak_basis']}).", "",
                  "| configuration | tokens/s | MFU | peak memory (GB) | cold start (s) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in a["rows"].values():  # cold start: process start to the end of the first step, empty compile cache
            lines.append(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_gb']:.2f} | "
                         f"{r.get('cold_start_s', float('nan')):.0f} |"
                         if "tokens_per_s" in r else f"| {r['label']} | **fail**: {cell(r.get('error'))} | | | |")
    disk.write_text(os.path.join(folder, "gpu_check.md"), "\n".join(lines) + "\n")
