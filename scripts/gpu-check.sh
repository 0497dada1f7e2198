#!/usr/bin/env bash
# Runs on the GPU machine, without compiling: the CUDA parity tests, the NCCL collectives' GPU
# tests and the kernel benchmark from .gpu/ (built by gpu-build.sh), logs into OUT_DIR. Fails
# when the parity tests or the NCCL tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"

# CUDA libraries installed with pip (nvidia-cublas, nvidia-cuda-nvrtc, nvidia-nccl-cu13, ...;
# system, user or the repo's .venv) and the toolkit's.
lib_dirs=$(
  {
    sites="$(python3 -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)"
    for sp in $sites .venv/lib/python3*/site-packages; do
      if [ -d "$sp/nvidia" ]; then
        find "$sp/nvidia" \( -name 'libcublas.so*' -o -name 'libnvrtc.so*' -o -name 'libnccl.so*' \) -printf '%h\n'
      fi
    done
    ls -d /usr/local/cuda*/lib64 2>/dev/null || true
  } | sort -u | tr '\n' ':'
)
# cudarc opens libnccl.so, but pip's NCCL (and apt's without libnccl-dev) has only
# libnccl.so.2: a link to it in a directory of our own comes first.
nccl_link_dir=$(mktemp -d)
nccl_so2=$(
  IFS=:
  for d in $lib_dirs /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [ -n "$d" ] && [ -e "$d/libnccl.so.2" ] && { echo "$d/libnccl.so.2"; break; }
  done
  true
)
[ -n "$nccl_so2" ] && ln -s "$nccl_so2" "$nccl_link_dir/libnccl.so"
export LD_LIBRARY_PATH="${nccl_link_dir}:${lib_dirs}${LD_LIBRARY_PATH:-}"
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; echo "libnccl.so -> ${nccl_so2:-(no libnccl.so.2 found)}"; } | tee "$out/env.txt"

nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" || true

status=0
.gpu/cuda_parity --test-threads=1 2>&1 | tee "$out/cuda_parity.txt" || status=$?

# The NCCL tests that need a GPU are #[ignore]d (a machine without one runs none of them);
# those of two ranks need two GPUs and run only where there are two.
nccl_status=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nccl_args=(--ignored --test-threads=1 --nocapture)
if [ "${gpus:-0}" -lt 2 ]; then
  nccl_args+=(--skip gpu_two_ranks)
fi
{
  echo "GPUs: ${gpus:-0}"
  [ "${gpus:-0}" -lt 2 ] && echo "gpu_two_ranks_* not run: they need two GPUs"
  NCCL_DEBUG=${NCCL_DEBUG:-WARN} .gpu/nccl "${nccl_args[@]}"
} 2>&1 | tee "$out/nccl.txt" || nccl_status=$?
.gpu/tandem bench kernels --device cuda:0 2>&1 | tee "$out/bench_kernels.txt" || echo "bench exited with $?" | tee -a "$out/bench_kernels.txt"

if [ "$status" -ne 0 ]; then
  echo "gpu-check: CUDA parity tests FAILED (exit $status)" >&2
fi
if [ "$nccl_status" -ne 0 ]; then
  echo "gpu-check: NCCL tests FAILED (exit $nccl_status)" >&2
  [ "$status" -ne 0 ] || status=$nccl_status
fi
exit "$status"
