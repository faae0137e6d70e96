#!/usr/bin/env bash
# Mutation testing of the pure decision modules: does a one-token change to the
# code make a unit test fail? Runs mutmut (3.8.1) in a copy of the working tree,
# so the checkout is never written to; prints total / killed / surviving per module.
#
#   scripts/mutation.sh                 # all modules (about 40 min on 2 cores)
#   scripts/mutation.sh 'controller.rollout.canary*'   # only mutants whose name matches (re-run after adding tests)
#
# MUTATION_DIR (default: $TMPDIR/diffops-mutation) keeps the copy and mutmut's
# results between runs; MUTATION_JOBS (default: the CPU count) runs mutants in parallel.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=${MUTATION_DIR:-${TMPDIR:-/tmp}/diffops-mutation}
jobs=${MUTATION_JOBS:-$(nproc)}

modules=(controller/rollout/steps.py controller/rollout/canary.py controller/plan/changes.py controller/plan/versions.py controller/apply/serve_config.py
         controller/apply/drift.py controller/errors.py controller/gate/start.py serving/requests.py serving/cache_eviction.py)
tests=(tests/test_rollout.py tests/test_canary.py tests/test_plan.py tests/test_serve_config.py tests/test_drift.py
       tests/test_errors.py tests/test_gate_input.py tests/test_requests.py tests/test_cache.py tests/test_release_schema.py
       tests/test_reconciler.py)
# Tests over 2 s each (a 30 s oversize reference, a 10 s property test, a killed fetch): each mutant runs the tests
# that reach it, so these would dominate the run; the faster rows beside them cover the same decisions.
slow=(tests/test_gate_input.py::test_an_oversize_reference_is_never_read_and_fails_the_golden_check
      tests/test_gate_input.py::test_a_1024px_golden_reference_passes_through_the_gate_job_path
      "tests/test_gate_input.py::test_the_job_request_is_a_pointer_whatever_the_reference_size[2048]"
      tests/test_requests.py::test_any_json_object_gives_parameters_or_a_named_422
      tests/test_cache.py::test_staging_of_a_killed_fetch_is_removed_on_the_next_open_but_a_running_fetch_is_untouched)

echo "mutation: copying the working tree to $work (mutants/ and results kept there)"
mkdir -p "$work"
(cd "$root" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$root" && tar --null --files-from=- --ignore-failed-read -cf -) | (cd "$work" && tar -xf -)

{
  echo "[mutmut]"
  echo "source_paths ="
  echo "    controller"
  echo "    serving"
  echo "only_mutate ="
  printf '    %s\n' "${modules[@]}"
  echo "also_copy ="
  printf '    %s\n' checks releases models bench docs scripts README.md constraints.txt Dockerfile Makefile  # tests read some
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "${tests[@]}"
  echo "pytest_add_cli_args ="
  printf '    %s\n' -p no:cacheprovider -p no:randomly
  for test in "${slow[@]}"; do printf '    --deselect\n    %s\n' "$test"; done
} > "$work/setup.cfg"
# mutmut reads [tool.mutmut] from pyproject.toml before setup.cfg: take the copy's out of its way
"$python" - "$work/pyproject.toml" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
open(path, "w").write(re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", text))
EOF

cd "$work"
started=$(date +%s)
"$python" -m mutmut run --max-children "$jobs" "$@" > mutmut-run.log 2>&1 || { tail -40 mutmut-run.log; exit 1; }
echo "mutation: mutmut ran in $(( $(date +%s) - started ))s; log in $work/mutmut-run.log"

"$python" -m mutmut results --all true > mutmut-results.txt
"$python" - mutmut-results.txt "$work" <<'EOF'
"""Per module: total, killed, surviving (and any other outcome: timeout, suspicious, no tests)."""
import collections, re, sys

counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    match = re.match(r"\s*([\w.]+)\.(?:x_|xǁ)\S*__mutmut_\d+: (.+)$", line.rstrip())
    if match:
        counts[match.group(1)][match.group(2).strip()] += 1
total = collections.Counter()
print(f"{'module':32s} {'total':>6s} {'killed':>7s} {'survived':>9s}  other")
for module, c in sorted(counts.items()):
    total.update(c)
    other = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("killed", "survived"))
    print(f"{module:32s} {sum(c.values()):6d} {c['killed']:7d} {c['survived']:9d}  {other}")
other = ", ".join(f"{k} {v}" for k, v in total.items() if k not in ("killed", "survived"))
print(f"{'all':32s} {sum(total.values()):6d} {total['killed']:7d} {total['survived']:9d}  {other}")
print(f"score: {total['killed'] / max(1, sum(total.values())):.1%} killed; survivors: `mutmut show NAME` in {sys.argv[2]}")
EOF
