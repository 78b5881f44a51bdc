#!/usr/bin/env bash
# The command for a device run (the lead's `run` tool, or any GPU machine): from the repository root,
#   run(command="bash bench/gpu/device.sh", carry=[".whl"], timeout_s=600)
# Extra arguments go to run.py (e.g. `--only e2e qlora` for a second call). Everything the run writes
# comes back in $OUT as three files (the tool returns at most 8): gpu_results.json (the one results
# file), gpu_run.log (what it printed) and gpu_logs.tar.gz (each step's and each process's log).
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu/run.py --out /tmp/tunesmith-gpu-out/gpu_results.json --budget 560 "$@" 2>&1 | tee "$out/gpu_run.log"
status=${PIPESTATUS[0]}
cp /tmp/tunesmith-gpu-out/gpu_results.json "$out/" 2>/dev/null
tar -czf "$out/gpu_logs.tar.gz" -C /tmp/tunesmith-gpu-out gpu_logs 2>/dev/null
exit "$status"
