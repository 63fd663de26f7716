#!/usr/bin/env bash
# The GPU benchmarks in device-tool-sized calls (one call: at most 10 minutes; the lent machine goes
# back ~30 s after a call ends, taking its files with it).
#
#   bash bench/gpu_session.sh speed      # sft_throughput + inference_speed (full size, H100)
#   bash bench/gpu_session.sh quality    # bench.quality stages in order until the time budget is spent
#
# Run from the repository root on the device, with ".whl" carried (../shared/gpu/make-wheels.sh fills
# it: deepspeed and pydantic, which the device's python3 lacks). Each part stops starting new work
# once GPU_SESSION_BUDGET_S (default 540 s) is spent, and copies whatever result files exist into
# $OUT (the folder the device tool brings back). quality resumes from the stage checkpoints in
# runs/quality, so its next call must come before the machine is given back (within ~30 s);
# a fresh machine starts over from the data stage.
# Extra arguments go to the python scripts (e.g. --tiny for a CPU dry run of this script).
set -uo pipefail
part=${1:?usage: bash bench/gpu_session.sh speed|quality [args for the scripts]}
shift
case "$part" in speed|quality) ;; *) echo "unknown part '$part' (speed | quality)" >&2; exit 2 ;; esac
budget=${GPU_SESSION_BUDGET_S:-540}
start=$SECONDS
py=${PYTHON:-python3}
out=${OUT:-}

if [ -d .whl ] && ! "$py" -c "import deepspeed, pydantic" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # the device's default (9.0a) breaks DeepSpeed's op builder

left() { echo $((budget - (SECONDS - start))); }
run() {  # run a python module within the remaining budget; report how it ended
  local t
  t=$(left)
  if [ "$t" -le 20 ]; then echo "[gpu_session] budget spent before: $*"; return 124; fi
  echo "[gpu_session] $* (budget left ${t}s)"
  timeout "$t" "$py" -m "$@"
  local rc=$?
  echo "[gpu_session] exit $rc after $((SECONDS - start))s: $*"
  return $rc
}
bring_back() {  # copy the named files that exist into $OUT
  [ -n "$out" ] || return 0
  mkdir -p "$out"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$out/"; done
  return 0
}

"$py" -c "import torch; print('[gpu_session] torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
case "$part" in
  speed)
    run bench.sft_throughput "$@"
    run bench.inference_speed "$@"
    bring_back bench/results/sft_throughput.json bench/results/inference_speed.json \
      bench/results/sft_throughput_cpu_tiny.json bench/results/inference_speed_cpu_tiny.json
    ;;
  quality)
    for stage in data nocot cot colar rl eval; do
      run bench.quality --stage "$stage" "$@" || { echo "[gpu_session] stopped in stage $stage; call again to resume"; break; }
    done
    bring_back bench/results/quality.json docs/img/quality.png \
      bench/results/quality_cpu_tiny.json docs/img/quality_cpu_tiny.png
    ;;
esac
