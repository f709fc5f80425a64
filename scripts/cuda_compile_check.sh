#!/usr/bin/env bash
# Compile-only check of every CUDA source in csrc/SOURCES for sm_90, on a machine with nvcc but no
# CUDA torch (CI: no GPU, CPU torch). So broken CUDA cannot land.
#
# 1. Headers: the CUDA build of torch is not installed here, so its headers are taken from the
#    CUDA torch wheel (torch/include/** only), plus the cuBLAS / cuSPARSE / cuSOLVER headers that ATen's CUDA
#    headers include (wheels matching the CUDA 13.0 toolkit that this torch pins). Wheels are
#    fetched with `pip download --no-deps` (or reused from $MPLUS_TORCH_CUDA_WHEEL_DIR, default
#    /tmp/torchcuda), only include/ trees are extracted, into .cache/cuda_headers/ (gitignored);
#    later runs reuse that cache and download nothing.
# 2. Each `cuda` entry of csrc/SOURCES is compiled with
#    nvcc -std=c++20 -c -arch=sm_90 --expt-relaxed-constexpr -DMPLUS_FAST_WITH_CUDA=1 (+ the
#    -D__CUDA_NO_HALF*/BFLOAT16_CONVERSIONS__ defines torch adds), and each
#    torch-free device header csrc/kernels/*.cuh is compiled standalone (a one-line TU each), so
#    the headers stay self-contained. One line per file; exit status 1 if any failed.
#
# Environment: NVCC (default: nvcc on PATH), PYTHON (default: .venv/bin/python or python3),
# MPLUS_CUDA_CHECK_JOBS (parallel nvcc jobs, default 2), MPLUS_CUDA_CHECK_SKIP=1 to skip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${MPLUS_CUDA_CHECK_SKIP:-0}" = "1" ]; then
  echo "cuda-check: skipped (MPLUS_CUDA_CHECK_SKIP=1)"; exit 0
fi
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "cuda-check: nvcc not found; cannot compile-check CUDA sources" >&2
  exit 1
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

TORCH_VERSION=${MPLUS_TORCH_CUDA_VERSION:-2.14.1}
CUBLAS_SPEC=${MPLUS_CUBLAS_SPEC:-"nvidia-cublas==13.1.1.3.*"}      # = cuda-toolkit 13.0.3 [cublas]
CUSPARSE_SPEC=${MPLUS_CUSPARSE_SPEC:-"nvidia-cusparse==12.6.3.3.*"}  # = cuda-toolkit 13.0.3 [cusparse]
CUSOLVER_SPEC=${MPLUS_CUSOLVER_SPEC:-"nvidia-cusolver==12.0.4.66.*"}  # = cuda-toolkit 13.0.3 [cusolver]
CACHE="$ROOT/.cache/cuda_headers/torch-$TORCH_VERSION"
WHEEL_DIR=${MPLUS_TORCH_CUDA_WHEEL_DIR:-/tmp/torchcuda}

# ---- 1. headers -----------------------------------------------------------------------------
if [ ! -f "$CACHE/.complete" ]; then
  echo "cuda-check: preparing headers in $CACHE"
  rm -rf "$CACHE"; mkdir -p "$CACHE"
  DL=$(mktemp -d); trap 'rm -rf "$DL"' EXIT
  torch_whl=$(ls "$WHEEL_DIR"/torch-"$TORCH_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$torch_whl" ]; then
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "torch==$TORCH_VERSION" -d "$DL" 2>&1 \
      | grep -v '^WARNING' || true
    torch_whl=$(ls "$DL"/torch-"$TORCH_VERSION"-*.whl | head -1)
  fi
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "$CUBLAS_SPEC" "$CUSPARSE_SPEC" "$CUSOLVER_SPEC" -d "$DL" 2>&1 \
    | grep -v '^WARNING' || true
  "$PYTHON" - "$CACHE" "$torch_whl" "$DL"/nvidia_cublas-*.whl "$DL"/nvidia_cusparse-*.whl "$DL"/nvidia_cusolver-*.whl <<'EOF'
import sys, zipfile, pathlib
out = pathlib.Path(sys.argv[1])
for whl in sys.argv[2:]:
    n = 0
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            # torch/include/** ; nvidia/cu13/include/** (or nvidia/<lib>/include/**) -> flat include/
            parts = name.split("/")
            if "include" not in parts[:-1] or name.endswith("/"):
                continue
            i = parts.index("include")
            prefix = "torch" if parts[0] == "torch" else "nvidia"
            dest = out / prefix / "/".join(parts[i:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
            n += 1
    print(f"cuda-check: extracted {n} headers from {pathlib.Path(whl).name}")
EOF
  touch "$CACHE/.complete"
fi

PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
INCS=(-I"$ROOT/csrc" -I"$CACHE/torch/include" -I"$CACHE/torch/include/torch/csrc/api/include"
      -I"$CACHE/nvidia/include" -I"$PY_INC")
# The defines torch's CUDAExtension adds to every nvcc line (COMMON_NVCC_FLAGS), so code that relies
# on implicit half/bf16 conversions fails here as it would in the real build.
FLAGS=(-std=c++20 -c -arch=sm_90 --expt-relaxed-constexpr -O1 -DMPLUS_FAST_WITH_CUDA=1
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ -D_GLIBCXX_USE_CXX11_ABI=1 -Xcompiler -fPIC -w)

# ---- 2. compile -----------------------------------------------------------------------------
OUT=$(mktemp -d); trap 'rm -rf "$OUT" "${DL:-}"' EXIT
mapfile -t CU < <(sed -e 's/#.*//' csrc/SOURCES | awk '$1 == "cuda" {print $2}')
mapfile -t CUH < <(ls csrc/kernels/*.cuh 2>/dev/null || true)
for h in "${CUH[@]}"; do   # standalone TU per device header: it must include what it uses
  tu="$OUT/$(basename "$h" .cuh)_standalone.cu"
  printf '#include "%s"\n' "${h#csrc/}" > "$tu"
  CU+=("$tu")
done
if [ ${#CU[@]} -eq 0 ]; then echo "cuda-check: no CUDA sources listed"; exit 0; fi

compile_one() {  # $1 source; prints "ok|FAIL  <src>  <seconds>"; log in $OUT/<name>.log
  local src=$1 name; name=$(echo "$src" | tr '/' '_')
  local t0=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${INCS[@]}" "$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1; then
    echo "cuda-check: ok    ${src#"$OUT"/}  ($((SECONDS - t0)) s)"
  else
    echo "cuda-check: FAIL  ${src#"$OUT"/}  ($((SECONDS - t0)) s)"; sed 's/^/    /' "$OUT/$name.log" | head -40
    return 1
  fi
}
export -f compile_one; export NVCC OUT
fail=0
JOBS=${MPLUS_CUDA_CHECK_JOBS:-2}
pids=(); srcs=()
for src in "${CU[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  compile_one "$src" > "$OUT/$(echo "$src" | tr '/' '_').res" 2>&1 &
  pids+=($!); srcs+=("$src")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || fail=1
  cat "$OUT/$(echo "${srcs[$i]}" | tr '/' '_').res"
done
if [ $fail -ne 0 ]; then echo "cuda-check: FAILED"; exit 1; fi
echo "cuda-check: all ${#CU[@]} CUDA translation units compile for sm_90"
