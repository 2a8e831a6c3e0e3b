#!/usr/bin/env bash
# The GPU check, run ON the GPU machine (../shared/docs/GPU.md: Python 3.12 at /opt/torch/.venv,
# torch 2.11.0+cu130, no TorchRec / fbgemm-gpu, no network) in the repository root:
#
#   1. install: the parts made by benchmarks/gpu_prepare.sh (looked for in .gpuwhl/parts/ and in
#      each folder of MLET_GPU_PARTS) are checked against SHA256SUMS, joined, checked again and
#      unpacked into MLET_GPU_SITE (benchmarks/gpu_bundle.py); PYTHONPATH = checkout:site.
#   2. import: versions of torch / fbgemm-gpu / TorchRec, where each was loaded from, the GPU.
#   3. tests: the CUDA tests, `pytest -m cuda tests/test_cuda.py` (world size 1, nccl).
#   4. bench: the GPU train benchmark, MLET(128,16) vs EBC(128) vs EBC(16),
#      configs/bench_train_gpu.toml, results written into $OUT.
#
# Everything lands in $OUT (the device tool's output folder; else outputs/gpu_check/): summary.txt
# (machine, versions, each step's exit code and seconds), cuda_tests.log, bench.log and the
# benchmark's train_<gpu>_<date>.{json,md} + 2 PNGs: 7 files (the tool returns at most 8).
# Sized for 6 minutes (MLET_GPU_BUDGET_S = 360): install, import and tests have fixed limits (90,
# 60, 150 s), the benchmark gets what is left of the budget, at least 150 s. A step that fails does not stop the next ones,
# except install/import (nothing can run without the stack). Exit code 0 only if every step passed.
#
# Environment:
#   MLET_PYTHON        interpreter (default python3: /opt/torch/.venv's there)
#   MLET_GPU_PARTS     ':'-separated folders holding carried parts (default /tmp/mlet_parts)
#   MLET_GPU_SITE      where the stack is unpacked (default /tmp/mlet_site; kept while the machine
#                      stays warm, so a rerun skips the unpack)
#   MLET_GPU_STEPS     steps to run (default "install import tests bench")
#   MLET_GPU_BENCH_ARGS extra arguments of `python -m benchmarks.run` (e.g. --bench.repeats=2)
#   MLET_GPU_REHEARSAL =1 on a machine without a GPU: the tests run on CPU at world size 1
#                      (MLET_CUDA_TESTS_DEVICE=cpu) and the benchmark is not required to see CUDA;
#                      checks the script's plumbing, not the GPU.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${MLET_PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/gpu_check}
SITE=${MLET_GPU_SITE:-/tmp/mlet_site}
STEPS=" ${MLET_GPU_STEPS:-install import tests bench} "
BUDGET=${MLET_GPU_BUDGET_S:-360}
REHEARSAL=${MLET_GPU_REHEARSAL:-0}
IFS=: read -ra EXTRA_PARTS <<<"${MLET_GPU_PARTS:-/tmp/mlet_parts}"
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
failed=0

log() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
wants() { [[ "$STEPS" == *" $1 "* ]]; }

# run_step NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout`, output to LOGFILE and stdout.
run_step() {
  local name=$1 limit=$2 logfile=$3 start rc shown
  shift 3
  start=$(date +%s)
  shown="$*"
  shown=${shown//$'\n'/ }
  (( ${#shown} > 160 )) && shown="${shown:0:157}..."
  log "step $name: start at +$(elapsed) s, limit $limit s: $shown"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logfile"
  rc=${PIPESTATUS[0]}
  [[ $rc -eq 124 || $rc -eq 137 ]] && log "step $name: TIMED OUT after $limit s"
  log "step $name: exit code $rc in $(( $(date +%s) - start )) s"
  (( rc == 0 )) || failed=1
  return "$rc"
}

log "$(date -u +%FT%TZ) on $(hostname); checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 \
    | tee -a "$SUMMARY"
else
  log "nvidia-smi: not found"
fi
log "python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"

if wants install; then
  parts_args=(--parts-dir "$ROOT/.gpuwhl/parts")
  for d in "${EXTRA_PARTS[@]}"; do [[ -n "$d" ]] && parts_args+=(--parts-dir "$d"); done
  run_step install 90 "$OUT/install.log" \
    "$PY" -m benchmarks.gpu_bundle install "${parts_args[@]}" --site "$SITE" \
    || { log "the stack could not be installed: nothing else can run"; exit 1; }
  cat "$OUT/install.log" >>"$SUMMARY" && rm -f "$OUT/install.log"  # keep $OUT at <= 8 files
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

IMPORT_CHECK=$(cat <<'EOF'
import importlib.metadata as md
import torch, fbgemm_gpu, torchrec, tensordict, torchmetrics, mlet_dist
for name, mod in [("torch", torch), ("fbgemm_gpu", fbgemm_gpu), ("torchrec", torchrec),
                  ("tensordict", tensordict), ("torchmetrics", torchmetrics),
                  ("mlet_dist", mlet_dist)]:
    dists = {"fbgemm_gpu": ["fbgemm-gpu", "fbgemm-gpu-cpu"]}.get(name, [name])
    version = getattr(mod, "__version__", "?")
    for dist in dists:
        try:
            version = md.version(dist)
            break
        except md.PackageNotFoundError:
            pass
    print(f"{name} {version} from {mod.__file__}")
print(f"torch CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}, "
      f"devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0))
    # one fbgemm CUDA kernel: the GPU build was loaded, not a CPU one
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        torch.randn(4, 8, device="cuda"), 8)
    print("fbgemm CUDA op ok:", tuple(q.shape), q.device)
EOF
)
if wants import; then
  run_step import 60 "$OUT/import.log" "$PY" -c "$IMPORT_CHECK" \
    || { cat "$OUT/import.log" >>"$SUMMARY"; log "import failed: nothing else can run"; exit 1; }
  cat "$OUT/import.log" >>"$SUMMARY" && rm -f "$OUT/import.log"
fi

cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ "$cuda" != 1 && "$REHEARSAL" != 1 ]]; then
  log "no CUDA device visible to torch: the CUDA tests and the GPU benchmark cannot run"
  exit 1
fi
test_env=()
[[ "$cuda" != 1 ]] && test_env=(env MLET_CUDA_TESTS_DEVICE=cpu)

if wants tests; then
  run_step tests 150 "$OUT/cuda_tests.log" \
    "${test_env[@]}" "$PY" -m pytest tests/test_cuda.py -m cuda -q -rA --durations=5
  grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -1 >>"$SUMMARY"
fi

if wants bench; then
  left=$(( BUDGET - $(elapsed) - 10 ))
  (( left < 150 )) && left=150  # 3 fresh processes (start-up ~30 s each) + the planner dry runs
  # shellcheck disable=SC2086  # MLET_GPU_BENCH_ARGS is a list of arguments
  run_step bench "$left" "$OUT/bench.log" \
    "$PY" -m benchmarks.run --suite train --config configs/bench_train_gpu.toml --out "$OUT" \
    ${MLET_GPU_BENCH_ARGS:-}
  grep -E "samples/s|^train:" "$OUT/bench.log" >>"$SUMMARY"
fi

log "done in $(elapsed) s; $([[ $failed == 0 ]] && echo 'every step passed' || echo 'A STEP FAILED')"
ls -la "$OUT" >>"$SUMMARY"
exit "$failed"
