#!/usr/bin/env bash
# The GPU benchmarks (issue 24) in ONE device command; bench/gpu_session.py runs the parts:
#   sft_deepspeed, sft_torch  SFT tokens/s and MFU, CoT SFT vs CoLaR SFT, Llama-3.2-1B architecture (random
#                             weights), LoRA r=128 on q,v, DeepSpeed ZeRO-2 bf16 / plain torch bf16
#   inference                 the latent step vs the token step at batch 1 and 64
#   smollm2                   a short SmolLM2-135M run on real GSM8K through the pipeline's stages
# -> bench/results/gpu_session_<device>.json, copied into $OUT after every part (with each part's log).
# Each part runs under its own time limit (GPU_SESSION_BUDGET_S, default 540 s, split by the shares in
# bench/gpu_session.py); a part past its limit is killed and recorded as timed_out, the others still report.
#
# Before, here (network): .whl/ (deepspeed, pydantic, hjson, gguf: the device's python3 lacks them), and
# SmolLM2's GGUF (98 MB: over the 64 MiB one call may carry) cut in two under build/gpu-session/:
#   bash ../shared/gpu/make-wheels.sh gguf==0.19.0
#   python -m bench.gpu_session --prepare-carry      # prints each call's size against 64 MiB
# Then two device calls, back to back (the machine keeps ignored files between calls while it is warm,
# ~30 s after a call); the first only brings part 1 over:
#   1. command "ls -l build/gpu-session/smollm2-a"  carry ["build/gpu-session/smollm2-a"]             timeout_s 60
#   2. command "bash bench/gpu_session.sh"          carry [".whl", "build/gpu-session/smollm2-b"]    timeout_s 600
# If the machine went back between them, call 2 still runs every part but smollm2 (skipped, naming the
# missing part). Call 2: wheel install (~15 s) + at most 540 s of parts + the summary, inside the 600 s a
# call may run; with the machine's start (1-2 min) and call 1, about 12 of the 15 device minutes.
#
# On a CPU: bash bench/gpu_session.sh --tiny   (every part at its smoke size; tests/test_gpu_session.py)
# Options go to bench/gpu_session.py (--parts, --budget-s, --out, --work).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
need="import deepspeed, pydantic, gguf"
if [ -d .whl ] && ! "$py" -c "$need" 2>/dev/null; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$py" -c "$need" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || echo "[gpu_session] installing .whl failed; the parts that need those packages will fail" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # the device's default (9.0a) breaks DeepSpeed's op builder
"$py" -c "import torch; print('[gpu_session] torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
exec "$py" -m bench.gpu_session "$@"
