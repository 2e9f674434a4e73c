"""
How much a reader must read to follow one adaptation step, and how much of it is the method: the files the step's code lives in, their lines, and the lines of the named pieces that are the paper's
method in them; beside it adapt.py's import closure (project modules imported at module level, transitively).

    python tools/reading_load.py            # a table; --json for the numbers

The method pieces are named below (file -> functions, classes or Class.method); adapt.py's step is its loop, from
`while step < total_steps:` to `step += 1`. Lines are physical lines (`wc -l`), docstrings and comments included.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable by path (python tools/reading_load.py) as well as with -m
from plumbing import common  # noqa: E402


@dataclass
class ReadingLoadConfig:
    """How many lines one adaptation step takes to read, and the method's share of them."""
    json: bool = False  # print the numbers as JSON instead of a table
METHOD = {
    "adapt.py": ["<the loop: while step < total_steps ... step += 1>"],
    "splice.py": ["kl_reference", "unspliced_tokens", "splice_hooks", "original_pass", "spliced_pass", "chunk_losses",
                  "kl_and_ce"],  # Eq. 7 and the splice
    "lora.py": ["LoRALinear", "layers_around_saes", "apply_lora", "_adapters_set",
                "adapters_disabled"],  # Eq. 1 (merged or not), where adapters go (Sec. 3.4), p_orig's switch
    "sae.py": ["rectangle", "threshold_grad", "JumpReLUFn", "fp32_region", "jumprelu", "TopKEncoder",
               "SAE._encoder_input", "SAE.pre_acts", "SAE.encode", "SAE.encode_topk", "SAE.decode",
               "SAE.decode_sparse", "SAE.forward"],  # Eqs. 4-5 and JumpReLU (Sec. 3.3)
    "model.py": ["Block.mlp_out", "Block.forward", "Transformer.blocks", "Transformer.head", "Transformer.forward",
                 "run_block", "block_hooks"],  # the path an SAE is spliced into
}


def spans(path: str) -> dict[str, tuple[int, int]]:
    """name -> (first, last line) of every top-level function / class and every method (as Class.method)."""
    out = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno)
            for sub in getattr(node, "body", []) if isinstance(node, ast.ClassDef) else []:
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = (min([sub.lineno] + [d.lineno for d in sub.decorator_list]),
                                                      sub.end_lineno)
    return out


def loop_lines(path: str) -> int:
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "while step < total_steps:")
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "step += 1")
    return end - start + 1


def method_lines(name: str) -> int:
    path = os.path.join(ROOT, name)
    if name == "adapt.py":
        return loop_lines(path)
    where = spans(path)
    missing = [p for p in METHOD[name] if p not in where]
    if missing:
        raise SystemExit(f"reading_load.py: {name} has no {', '.join(missing)}: update METHOD")
    return sum(where[p][1] - where[p][0] + 1 for p in METHOD[name])


def module_file(module: str) -> str | None:
    for candidate in (module.replace(".", os.sep) + ".py", os.path.join(module.replace(".", os.sep), "__init__.py")):
        if os.path.isfile(os.path.join(ROOT, candidate)):
            return candidate
    return None


def closure(start: str) -> list[str]:
    """The project files `start` imports at module level, transitively (imports inside functions are not counted)."""
    seen, todo = [], [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        for node in ast.parse(open(os.path.join(ROOT, name)).read()).body:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            todo += [f for f in map(module_file, mods) if f and f not in seen]
    return sorted(seen)


def count(name: str) -> int:
    return len(open(os.path.join(ROOT, name)).read().splitlines())


def main(argv=None) -> dict:
    cfg, _ = common.parse_args(ReadingLoadConfig, argv)
    files = {name: (count(name), method_lines(name)) for name in METHOD}
    total, method = sum(t for t, _ in files.values()), sum(m for _, m in files.values())
    deps = closure("adapt.py")
    res = dict(files={n: dict(lines=t, method=m) for n, (t, m) in files.items()}, lines=total, method=method,
               method_share=method / total, closure_modules=len(deps), closure_lines=sum(map(count, deps)))
    if cfg.json:
        print(json.dumps(res, indent=1))
        return res
    print(f"{'file':12s} {'lines':>6s} {'method':>7s}")
    for n, (t, m) in files.items():
        print(f"{n:12s} {t:6d} {m:7d}")
    print(f"{'one step':12s} {total:6d} {method:7d}  method {method / total:.1%} of the {len(files)} files")
    print(f"adapt.py's import closure: {len(deps)} modules, {res['closure_lines']:,} lines")
    return res


if __name__ == "__main__":
    common.cli(main)
