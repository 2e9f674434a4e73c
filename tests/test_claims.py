"""Every number that experiments/README.md's claims table and README.md's Results table report as ours is bound to
its source: experiments/sources.tsv lists, cell by cell and in the order the cell shows them, each number with the
results file and key it is read from (`file:key`, the key a dotted path), and the key's value must show as that number
(rounded to its last digit, as a fraction or as a percentage, sign aside); "-" marks a whole number that names a
setting (a layer, k, a token budget) rather than reports a measurement. Changing a digit in a table, or a source's
value, fails the suite; `python experiments/bind.py` proposes sources for new numbers. Numbers the paper reports (the
row's claim column, or a parenthesis starting with "paper") and the commands are not ours and are not bound; neither
are one-digit integers (counts such as "6 of 7") nor the numbers that follow a reference word (Sec., Fig., Table, row,
layer, rank, top, ...). Every results file records its command, commit, machine and wall seconds, or names in
`unrecorded` which of them it lacks (and says why in its note)."""
from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
SOURCES = os.path.join(ROOT, "experiments", "sources.tsv")
PROVENANCE = ("command", "commit", "machine", "wall_seconds")
STATUSES = ("reproduced", "not reproduced", "inconclusive", "not comparable", "not measurable here",
            "not measured here")
# words after which a number names something (a section, a layer, a setting) rather than reports a measurement
REFERENCE_WORDS = {"d_model", "sec.", "secs.", "fig.", "figs.", "table", "tables", "row", "rows", "app.", "eq.", "layer", "layers",
                   "rank", "ranks", "top", "top-k", "latent", "k", "width", "@", "alpha", "threads", "step", "steps",
                   "f1"}
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
            skip = raw.endswith(",")  # "ranks 1, 4, 16, 64: 14.0, ...": the list of names ends without a comma
            continue
        for v, tol in vals:
            if float(v).is_integer() and abs(v) < 10 and tol >= 0.5:
                continue  # counts and indices ("6 of 7", "3 SAEs")
            out.append((tok, v, tol))
    return out


def backed(v: float, tol: float, values: list[float]) -> bool:
    """v is some result value as shown (rounded to its last digit), as a percentage of it, or its magnitude."""
    return any(abs(abs(v) - abs(x) * f) <= tol * (1 + 1e-9) + 1e-12 for x in values for f in (1.0, 100.0))


def value_at(source: str):
    """The value of `file:key` (file relative to experiments/results/, key a dotted path; list items by index)."""
    rel, key = source.split(":", 1)
    with open(os.path.join(RESULTS, rel)) as f:
        obj = json.load(f)
    parts = key.split(".")
    while parts:  # a key may hold dots itself ("share_0.01_to_1"): the longest one that exists
        if isinstance(obj, list):
            obj, parts = obj[int(parts[0])], parts[1:]
            continue
        n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in obj), 1)
        obj, parts = obj[".".join(parts[:n])], parts[n:]
    return obj


def read_sources(path: str = SOURCES) -> dict[str, list[tuple[str, str]]]:
    """sources.tsv as {cell: [(number as shown, source), ...]}; a cell is "claims ROW COLUMN" or "results ROW"."""
    out: dict[str, list[tuple[str, str]]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for ln in f:
                if ln.strip() and not ln.startswith("#"):
                    where, tok, src = ln.rstrip("\n").split("\t")
                    out.setdefault(where, []).append((tok, src))
    return out


def reported(cell: str, exempt: str = "") -> list[tuple[str, float, float]]:
    """The numbers of a cell that are ours: all but those the paper reports (`exempt`: the claim's text)."""
    paper = {v for _, v, _ in numbers(exempt)}
    return [(tok, v, tol) for tok, v, tol in numbers(cell) if v not in paper]


def table(path: str, heading: str, text: str | None = None) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after `heading` in `path` (or in `text`, a copy of it)."""
    if text is None:
        with open(path) as f:
            text = f.read()
    lines = text.splitlines()
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


def claims_rows(text: str | None = None) -> list[dict]:
    """The claims table as {"#", "claim", "command", "status", "checked": [every other cell: ours, and any column a
    later change adds]}, found by header so that columns may be added or moved."""
    header, *rows = table(os.path.join(ROOT, "experiments", "README.md"), "## The paper's claims", text)
    col = {h: i for i, h in enumerate(header)}
    claim = next(i for h, i in col.items() if h.startswith("the paper's claim"))
    command = next(i for h, i in col.items() if "command" in h)
    checked = [i for i in range(len(header)) if i not in (0, claim, command)]
    return [{"#": r[0], "claim": r[claim], "command": r[command], "status": r[col["status"]],
             "checked": [r[i] for i in checked], "labels": [header[i].split()[0] for i in checked]} for r in rows]


def results_rows(text: str | None = None):
    return table(os.path.join(ROOT, "README.md"), "## Results", text)[1:]


def cells(claims_text: str | None = None, results_text: str | None = None):
    """(cell name, cell text, the row's text that may name its files, the column's results folder, the paper's
    numbers) for every bound cell of both tables; the texts, when given, replace the files' (a copy changed by hand)."""
    for r in claims_rows(claims_text):
        for label, cell in zip(r["labels"], r["checked"]):
            folder = {"SmolLM2-135M": "smollm2", "Gemma-3": "gemma3_270m"}.get(label, "")
            yield f"claims {r['#']} {label}", cell, r["command"] + " " + cell, folder, r["claim"]
    for i, (command, cell) in enumerate(results_rows(results_text), 1):
        yield f"results {i}", cell, command + " " + cell, "smollm2" if "SmolLM2" in command else "", ""


def mismatches(sources, claims_text=None, results_text=None) -> dict[str, str]:
    """Cells whose numbers are not the bound ones, and sources whose value does not show as their number."""
    bad, seen = {}, set()
    for where, cell, _, _, exempt in cells(claims_text, results_text):
        seen.add(where)
        shown, bound = reported(cell, exempt), sources.get(where, [])
        if [t for t, _, _ in shown] != [t for t, _ in bound]:
            bad[where] = f"the cell shows {[t for t, _, _ in shown]}, sources.tsv binds {[t for t, _ in bound]}"
            continue
        for (tok, v, tol), (_, src) in zip(shown, bound):
            if src == "-" and "." not in tok:
                continue  # a whole number that names a setting (a layer, k, a token budget), not a measurement
            try:
                x = value_at(src)
            except (ValueError, KeyError, IndexError, OSError) as e:
                bad[where] = f"{tok}: source {src} unreadable ({e!r})"
                break
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not backed(v, tol, [x]):
                bad[where] = f"{tok}: {src} holds {x!r}"
                break
    bad.update({w: "no such cell (row or column gone)" for w in sources if w not in seen})
    return bad


def test_every_reported_number_is_its_sources_value():
    assert len(claims_rows()) >= 42, "one row per claim of the paper"
    bad = mismatches(read_sources())
    assert not bad, "numbers not bound to their results file (python experiments/bind.py proposes sources):\n" + \
        "\n".join(f"{k}: {v}" for k, v in bad.items())


def test_no_number_waits_for_a_rerun():
    rows = [c for r in claims_rows() for c in r["checked"]] + [c for r in results_rows() for c in r]
    assert not [c for c in rows if "not yet re-run" in c]


def test_every_results_file_records_how_it_was_made():
    for path in sorted(glob.glob(os.path.join(RESULTS, "**", "*.json"), recursive=True)):
        with open(path) as f:
            d = json.load(f)
        prov = {**d, **(d.get("provenance") or {})}
        missing = [k for k in PROVENANCE if prov.get(k) in (None, "") and k not in (prov.get("unrecorded") or [])]
        assert not missing, f"{os.path.relpath(path, RESULTS)}: no {missing} (record them, or name them in unrecorded)"


def test_every_status_is_a_defined_one():
    rows = claims_rows()
    with open(os.path.join(ROOT, "experiments", "README.md")) as f:
        text = f.read()
    for s in STATUSES:  # each status the table uses is defined above it
        assert f"*{s}*" in text, s
    bad = [r["#"] for r in rows if not r["status"].lower().startswith(STATUSES)]
    assert not bad, f"rows whose status is not one of {STATUSES}: {bad}"


def test_a_number_changed_by_hand_fails():
    """A copy of the tables with one digit changed fails: in a one-decimal percentage, a three-decimal fraction and a
    four-decimal CE; changed in sources.tsv as well, the results file's value still fails it."""
    sources = read_sources()
    with open(os.path.join(ROOT, "experiments", "README.md")) as f:
        claims = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        results = f.read()
    assert mismatches(sources, claims, results) == {}
    for pattern in (r"(?<![\d.])\d{2}\.\d%", r"(?<![\d.])0\.\d{3}(?![\d%])", r"(?<![\d.])2\.\d{4}(?![\d%])"):
        where, cell, m = next((w, c, m) for w, c, _, _, ex in cells(claims, results) for m in re.finditer(pattern, c)
                              if m.group(0) in [t for t, _, _ in reported(c, ex)])
        old = m.group(0)
        digits = old.rstrip("%")
        new = digits[:-1] + str((int(digits[-1]) + 5) % 10) + old[len(digits):]
        hand = cell[:m.start()] + new + cell[m.end():]
        copy = (claims.replace(cell, hand, 1), results) if where.startswith("claims") else \
            (claims, results.replace(cell, hand, 1))
        assert where in mismatches(sources, *copy), (where, old, new)
        both = {**sources, where: [(new if t == old else t, s) for t, s in sources[where]]}
        assert where in mismatches(both, *copy), (where, old, new, "changed in sources.tsv too")
