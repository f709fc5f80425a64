#!/usr/bin/env bash
# One GPU session in ONE device call (a lent H100/H200 with a CUDA torch preinstalled; no network):
#   nvidia-smi and versions → build the CUDA extension in place → GPU tests (ops, prefetch, random
#   model, CUDA-graph decoding) → released-geometry engine benchmark → CPU parity tests → op and engine benchmarks →
#   a one-line-per-benchmark report. Logs, JUnit XML and benchmark JSON go to $OUT.
#
#   bash scripts/gpu_session.sh              # on the GPU machine; OUT defaults to ./gpu-out
#   bash scripts/gpu_session.sh --dry-run    # anywhere: no GPU steps, no build; the random-model
#                                            # tests and the engine benchmark at the tiny CPU size
#
# Budget: a device call may run 600 s. Every stage runs under `timeout`, limited to its own cap
# and to what is left of MPLUS_GPU_SESSION_BUDGET_S (default 540 s); the report gets 30 s more.
# Most valuable first, so a slow build costs the least useful stages. A failing, timed-out or
# unrun stage is logged and the next stage runs anyway; the exit status is 1 if any stage did not
# pass.
# Environment: OUT, PYTHON (default: the first of python3/python that imports torch), MAX_JOBS
# (default 16), TORCH_CUDA_ARCH_LIST (default 9.0, Hopper), MPLUS_GPU_SESSION_BUDGET_S.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_session: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_session: cannot create OUT=$OUT" >&2; exit 2; }
cd "$ROOT" || exit 2
BUDGET=${MPLUS_GPU_SESSION_BUDGET_S:-540}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  for candidate in python3 python; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
export PY=$PYTHON OUT DRY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=()

# stage NAME CAP_S FUNCTION: run FUNCTION (exported) under timeout into $OUT/NAME.log.
stage() {
  local name=$1 cap=$2 fn=$3 left=$((BUDGET - SECONDS)) t0=$SECONDS rc status
  if [ "$left" -lt 15 ]; then
    printf '%-14s %-22s %5s  %s\n' "$name" "NOT RUN (budget)" "-" "" | tee -a "$SUMMARY"
    FAILED+=("$name"); return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (up to ${cap}s)"
  timeout --kill-after=10 "$cap" bash -c "$fn" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${cap}s)" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  printf '%-14s %-22s %4ss  %s\n' "$name" "$status" $((SECONDS - t0)) "$OUT/$name.log" | tee -a "$SUMMARY"
  if [ "$status" != ok ]; then
    FAILED+=("$name")
    tail -n 30 "$OUT/$name.log" | sed 's/^/    | /'
  fi
}

skip() { printf '%-14s %-22s\n' "$1" "skipped (dry run)" | tee -a "$SUMMARY"; }

# ---- stage bodies (run in a child bash, hence exported) ------------------------------------------
nvidia() {
  nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
}
versions() {
  echo "python: $(command -v "$PY")"; "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
EOF
  local rc=$?
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo absent)"
  echo "ninja: $(ninja --version 2>/dev/null || echo absent)   cores: $(nproc)"
  free -g 2>/dev/null | head -n 2
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|pytest|pytest-benchmark|psutil|safetensors|numpy|ninja|setuptools|wheel) '
  return $rc
}
build() {
  export MAX_JOBS=${MAX_JOBS:-16} MPLUS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  # --no-deps: the machine has no network; a missing dependency shows up in the next stages.
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    echo "gpu_session: pip install failed; building in place with setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "from mplus_fast.ops._library import build_info as b; i = b(); print(i)
assert i['cuda_built'] and i['ext_loaded'], 'the CUDA build of mplus_fast._C is not loaded'"
}
tests_gpu() {
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_random_model.py --junitxml="$OUT/tests-gpu.xml"
  else
    MPLUS_FAST_REQUIRE_EXT=1 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/test_prefetch.py \
      tests/test_random_model.py tests/test_decoding.py --junitxml="$OUT/tests-gpu.xml"
  fi
}
bench_engine() {
  local size=released; [ "$DRY" = 1 ] && size=small
  MPLUS_FAST_BENCH_SIZE=$size "$PY" -m pytest -q -p no:cacheprovider bench/bench_gpu_engine.py --benchmark-only \
    --benchmark-json="$OUT/bench-gpu.json" --benchmark-columns=min,median,max,rounds
}
tests_parity() {
  MPLUS_FAST_REQUIRE_EXT=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_parity.py --junitxml="$OUT/tests-parity.xml"
}
bench_ops() {
  "$PY" -m pytest -q -p no:cacheprovider bench --ignore=bench/bench_gpu_engine.py --benchmark-only \
    --benchmark-max-time=0.5 --benchmark-json="$OUT/bench-ops.json" --benchmark-columns=min,median,rounds
}
report() {
  "$PY" -m bench.gpu_report "$OUT/bench-gpu.json" "$OUT/bench-ops.json"
}
export -f nvidia versions build tests_gpu bench_engine tests_parity bench_ops report

# ---- the session ---------------------------------------------------------------------------------
echo "gpu_session: $(date -u +%FT%TZ) root=$ROOT out=$OUT python=$PY budget=${BUDGET}s dry_run=$DRY"
if [ "$DRY" = 1 ]; then skip nvidia-smi; else stage nvidia-smi 30 nvidia; cat "$OUT/nvidia-smi.log" 2>/dev/null; fi
stage versions 60 versions; cat "$OUT/versions.log" 2>/dev/null
if [ "$DRY" = 1 ]; then skip build; else stage build 270 build; fi
cp mplus_fast/_build_info.py "$OUT/build_info.py" 2>/dev/null
stage tests-gpu 150 tests_gpu
stage bench-engine 200 bench_engine
if [ "$DRY" = 1 ]; then skip tests-parity; skip bench-ops; else
  stage tests-parity 120 tests_parity
  stage bench-ops 150 bench_ops
fi
BUDGET=$((SECONDS + 30)) stage report 30 report; cat "$OUT/report.log" 2>/dev/null

echo "== summary ($SECONDS s)"; cat "$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_session: ${#FAILED[@]} stage(s) did not pass: ${FAILED[*]}"
  exit 1
fi
echo "gpu_session: all stages passed"
