"""Every number that experiments/README.md's claims table and README.md's Results table report as ours is in a results
file under experiments/results/ (the reference: the JSON and Markdown that experiments/run.py wrote), or its clause says
"(not yet re-run)". Numbers the paper reports (the row's claim column, or a parenthesis starting with "paper") and the
commands are not ours and are not checked; neither are one-digit integers (counts such as "6 of 7") nor the numbers
that follow a reference word (Sec., Fig., Table, row, layer, rank, top, ...)."""
from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
NOT_RERUN = "not yet re-run"
STATUSES = ("reproduced", "not reproduced", "inconclusive", "not comparable", "not measurable here",
            "not measured here")
# words after which a number names something (a section, a layer, a setting) rather than reports a measurement
REFERENCE_WORDS = {"d_model", "sec.", "secs.", "fig.", "figs.", "table", "tables", "row", "rows", "app.", "eq.", "layer", "layers",
                   "rank", "ranks", "top", "top-k", "latent", "k", "width", "@", "alpha", "threads", "step", "steps"}
SUFFIX = {"k": 1e3, "M": 1e6, "B": 1e9}
NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?"
TOKEN = re.compile(rf"^({NUM})(?:-({NUM}))?(%|x|k|M|B)?$")


def parse(tok: str) -> list[tuple[float, float]]:
    """(value, half a unit of its last shown digit) for a number token such as 2.8133, 32.9%, 1.15x, 1.5M, 0.62-0.88x;
    [] for anything else (Gemma-2-2B, L0, bf16)."""
    m = TOKEN.match(tok)
    if not m:
        return []
    scale = SUFFIX.get(m.group(3), 1.0)
    out = []
    for s in filter(None, m.group(1, 2)):
        s = s.replace(",", "").replace("−", "-")
        mant = s.split("e")[0]
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        exp = int(s.split("e")[1]) if "e" in s else 0
        out.append((float(s) * scale, 0.5 * 10.0 ** (exp - decimals) * scale))
    return out


def numbers(text: str) -> list[tuple[str, float, float]]:
    """(token, value, tolerance) for every reported number of a table cell's text."""
    text = re.sub(r"`[^`]*`", " ", text)  # commands and flags
    text = re.sub(r"\(paper[^)]*\)", " ", text)  # the paper's numbers, quoted for comparison
    out, skip = [], False
    for raw in re.split(r"\s+|/", text):
        tok = raw.strip(",;:()[]*±~<>=") .rstrip(".")
        vals = parse(tok)
        if not vals:
            skip = tok.lower() in REFERENCE_WORDS or raw.lower().rstrip(",;:") in REFERENCE_WORDS
            continue
        if skip:
            skip = not raw.endswith((":", ";", ")"))  # "ranks 1, 4, 16, 64: 14.0, ...": the list of names ends
            continue
        for v, tol in vals:
            if float(v).is_integer() and abs(v) < 10 and tol >= 0.5:
                continue  # counts and indices ("6 of 7", "3 SAEs")
            out.append((tok, v, tol))
    return out


def result_values() -> list[float]:
    """Every number in experiments/results/ and its subfolders (smollm2/, gpu-h200/): JSON leaves and the numbers of
    the Markdown tables."""
    vals: list[float] = []

    def walk(o):
        if isinstance(o, bool):
            return
        if isinstance(o, (int, float)):
            vals.append(float(o))
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)
        elif isinstance(o, list):
            for x in o:
                walk(x)
    for path in glob.glob(os.path.join(RESULTS, "**", "*.json"), recursive=True):
        with open(path) as f:
            walk(json.load(f))
    for path in glob.glob(os.path.join(RESULTS, "**", "*.md"), recursive=True):
        with open(path) as f:
            vals += [v for _, v, _ in numbers(f.read().replace("|", " "))]
    return sorted(set(vals))


def backed(v: float, tol: float, values: list[float]) -> bool:
    """v is some result value as shown (rounded to its last digit), as a percentage of it, or its magnitude."""
    return any(abs(abs(v) - abs(x) * f) <= tol * (1 + 1e-9) + 1e-12 for x in values for f in (1.0, 100.0))


def unbacked(cell: str, values: list[float], exempt: str = "") -> list[str]:
    """The numbers of a table cell that no results file holds, clause by clause (a clause is text between ';')."""
    paper = {v for _, v, _ in numbers(exempt)}
    bad = []
    if cell.startswith(f"({NOT_RERUN})"):  # the whole cell
        return bad
    for clause in cell.split(";"):
        if NOT_RERUN in clause:
            continue
        bad += [tok for tok, v, tol in numbers(clause) if v not in paper and not backed(v, tol, values)]
    return bad


def table(path: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after `heading` in `path`."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(heading))
    rows, seen = [], False
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            seen = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif seen:
            break
    return rows  # the header first


def claims_rows() -> list[dict]:
    """The claims table as {"#", "claim", "command", "status", "checked": [every other cell: ours, and any column a
    later change adds]}, found by header so that columns may be added or moved."""
    header, *rows = table(os.path.join(ROOT, "experiments", "README.md"), "## The paper's claims")
    col = {h: i for i, h in enumerate(header)}
    claim = next(i for h, i in col.items() if h.startswith("the paper's claim"))
    command = next(i for h, i in col.items() if "command" in h)
    checked = [i for i in range(len(header)) if i not in (0, claim, command)]
    return [{"#": r[0], "claim": r[claim], "command": r[command], "status": r[col["status"]],
             "checked": [r[i] for i in checked]} for r in rows]


def results_rows():
    return table(os.path.join(ROOT, "README.md"), "## Results")[1:]


def test_claims_table_numbers_are_in_results_files():
    values = result_values()
    rows = claims_rows()
    assert len(rows) >= 42, "one row per claim of the paper"
    bad = {r["#"]: [x for cell in r["checked"] for x in unbacked(cell, values, exempt=r["claim"])] for r in rows}
    assert not {k: v for k, v in bad.items() if v}, "numbers with no results file (mark the clause (not yet re-run))"


def test_readme_results_numbers_are_in_results_files():
    values = result_values()
    bad = {r[0]: unbacked(r[1], values) for r in results_rows()}
    assert not {k: v for k, v in bad.items() if v}, "numbers with no results file (mark the clause (not yet re-run))"


def test_every_status_is_a_defined_one():
    rows = claims_rows()
    with open(os.path.join(ROOT, "experiments", "README.md")) as f:
        text = f.read()
    for s in STATUSES:  # each status the table uses is defined above it
        assert f"*{s}*" in text, s
    bad = [r["#"] for r in rows if not r["status"].lower().startswith(STATUSES)]
    assert not bad, f"rows whose status is not one of {STATUSES}: {bad}"


def test_a_number_changed_by_hand_fails():
    """The check can fail: one reported number altered in the table's text is caught, the original is not."""
    values = result_values()
    ours = next(c for r in claims_rows() for c in r["checked"] if "2.8133" in c)
    assert "2.8133" not in unbacked(ours, values)
    assert "2.8193" in unbacked(ours.replace("2.8133", "2.8193"), values)
    # four decimals: a one-decimal percentage is a 0.1-point window, which some value of a results folder this size
    # falls into by chance (a train KL of 0.3388 backs "33.9%")
    assert "32.917%" in unbacked("ranks 1, 4, 16, 64: 14.0, 21.6, 28.9, 32.917%", values)
    assert "32.9%" not in unbacked("ranks 1, 4, 16, 64: 14.0, 21.6, 28.9, 32.9%", values)
    assert unbacked("4x the tokens: 3.0012 (not yet re-run)", values) == []  # the marked clause is exempt
    assert unbacked("e2e 2.8326 (paper: 2.6126)", values) == []
