#!/bin/bash
# Issue 21's measurement: what a fix re-runs. In a scratch copy of this commit (the script edits code
# there, never in your tree), on the embedded default config:
#   1. a full `colar run`;
#   2. a comment added to tasks/report.py, then `colar run` again (expected: every stage Cached, report runs);
#   3. a failure injected at the top of the evaluate task, then `colar run` (expected: fails in evaluate);
#   4. the failure fixed in code (a different line, so evaluate's key changes), then `colar retry RUN`
#      (expected: evaluate and report run, everything else Cached).
# Prints each step's wall time and the `Stages:` line of `colar`. Usage: bash bench/retrigger.sh [SCRATCH_DIR]
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/colar-retrigger.XXXXXX)}
mkdir -p "$work" && git -C "$src" archive HEAD | tar xf - -C "$work" && cd "$work" || exit 2
export PYTHONPATH="$work" COLAR_HOME="$work/home" DO_NOT_TRACK=1
unset MLFLOW_TRACKING_URI PREFECT_API_URL
colar() { python3 -m flows.cli "$@"; }
timed() {  # timed NAME CMD...: output to NAME.out/.err, prints wall time and the Stages line
  local name=$1; shift; local s; s=$(date +%s.%N)
  "$@" > "$name.out" 2> "$name.err"; local rc=$?
  printf '%s: %.1f s wall, exit %d\n' "$name" "$(echo "$(date +%s.%N) - $s" | bc)" "$rc"
  grep -h '^Stages' "$name.out" || true
}
echo "scratch copy: $work"
timed run1-full colar run
echo "# a comment: the report task edited" >> tasks/report.py
timed run2-report-edited colar run
python3 - <<'PY'
from pathlib import Path
p = Path("tasks/evaluate.py"); s = p.read_text()
anchor = '    ``ColarModel.load_options``); None allows neither."""\n'
assert anchor in s, "the evaluate task's docstring moved: update bench/retrigger.sh"
p.write_text(s.replace(anchor, anchor + '    raise RuntimeError("injected failure")\n', 1))
PY
timed run3-evaluate-broken colar run
parent=$(grep -o "colar retry [0-9a-f]*" run3-evaluate-broken.err | tail -1 | awk '{print $3}')
sed -i 's/    raise RuntimeError("injected failure")/    pass  # fixed: the injected failure is gone/' tasks/evaluate.py
timed run4-retry-after-fix colar retry "$parent"
colar servers stop > /dev/null 2>&1
