"""
Prompt / answer pairs for `adapt.py --objective ce` offline, from the Python standard library's own sources: the
prompt is a function's signature and the opening of its docstring, the answer the docstring's first line. One JSONL
object per line, in a seeded random order (adapt.py holds out the file's last tenth).

    python experiments/docstring_pairs.py --out out/docstring_pairs.jsonl --n 2000
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from formats.corpus import read_text, stdlib_files  # noqa: E402


def pairs_from(source: str) -> list[dict]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if not 20 <= len(first) <= 100:
            continue
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        out.append({"prompt": f'{prefix} {node.name}({ast.unparse(node.args)}):\n    """', "answer": first})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    seen, pairs = set(), []
    for path in stdlib_files():
        text = read_text(path)
        for pair in pairs_from(text) if text else []:
            if pair["prompt"] not in seen:  # one answer per prompt: a signature seen twice is dropped
                seen.add(pair["prompt"])
                pairs.append(pair)
    random.Random(a.seed).shuffle(pairs)
    with open(a.out, "w", encoding="utf-8") as f:
        for pair in pairs[:a.n]:
            f.write(json.dumps(pair) + "\n")
    print(f"{min(a.n, len(pairs))} of {len(pairs)} pairs -> {a.out}")


if __name__ == "__main__":
    main()
