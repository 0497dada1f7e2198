#!/usr/bin/env bash
# Runs on the GPU machine, without compiling: the CUDA parity tests and the kernel benchmark
# from .gpu/ (built by gpu-build.sh), logs into OUT_DIR. Fails when the parity tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"

# CUDA libraries installed with pip (nvidia-cublas, nvidia-cuda-nvrtc, ...; system, user or the
# repo's .venv) and the toolkit's.
lib_dirs=$(
  {
    sites="$(python3 -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)"
    for sp in $sites .venv/lib/python3*/site-packages; do
      if [ -d "$sp/nvidia" ]; then
        find "$sp/nvidia" \( -name 'libcublas.so*' -o -name 'libnvrtc.so*' \) -printf '%h\n'
      fi
    done
    ls -d /usr/local/cuda*/lib64 2>/dev/null || true
  } | sort -u | tr '\n' ':'
)
export LD_LIBRARY_PATH="${lib_dirs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/env.txt"

nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" || true

status=0
.gpu/cuda_parity --test-threads=1 2>&1 | tee "$out/cuda_parity.txt" || status=$?
.gpu/tandem bench kernels --device cuda:0 2>&1 | tee "$out/bench_kernels.txt" || echo "bench exited with $?" | tee -a "$out/bench_kernels.txt"

if [ "$status" -ne 0 ]; then
  echo "gpu-check: CUDA parity tests FAILED (exit $status)" >&2
fi
exit "$status"
