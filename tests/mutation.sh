#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one core file against the fast tests that cover it, in a scratch copy of the
# working tree (mutmut writes a mutants/ folder and a setup.cfg there, never here). Results: tests/MUTATION.md.
#   bash tests/mutation.sh splice.py tests/test_formulas.py tests/test_splice.py
# MUTATION_DIR (default /tmp/lorasae-mutation) holds the copies; MUTATION_K a pytest -k filter (default: the
# torch.compile tests are left out, seconds each per mutant and covered by their eager twins).
set -euo pipefail
file=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-/tmp/lorasae-mutation}/${file%.py}
rm -rf "$work" && mkdir -p "$work"
(cd "$root" && git ls-files -co --exclude-standard | grep -v '^shipped/\|^experiments/' | tar -cf - -T -) | tar -xf - -C "$work"
{
  echo "[mutmut]"
  echo "source_paths = $file"
  echo "also_copy ="
  # a folder without the mutated file goes as the folder (mutmut copies a file only into a folder it made)
  (cd "$work" && { ls *.py; for d in accounting evals fixtures formats tools training; do
     if [ "$(dirname "$file")" = "$d" ]; then ls $d/*.py; else echo $d; fi; done; } | grep -vx "$file" | sed 's/^/    /')
  echo "pytest_add_cli_args_test_selection ="
  for t in "$@"; do echo "    $t"; done
  echo "pytest_add_cli_args ="
  echo "    -p"
  echo "    no:cacheprovider"
  echo "    -k"
  echo "    ${MUTATION_K:-not compile and not graph_break}"
} > "$work/setup.cfg"
cd "$work"
OMP_NUM_THREADS=1 nice -n 5 mutmut run --max-children 1 || true
mutmut results --all true > results.txt || mutmut results > results.txt || true
echo "mutation: $work/results.txt"
