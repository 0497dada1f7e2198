#!/usr/bin/env bash
# Runs on the GPU machine, without compiling: the CUDA parity tests, the NCCL collectives' GPU
# tests, an end-to-end generation with three PEFT adapters on the GPU against the CPU, and the
# kernel benchmark from .gpu/ (built by gpu-build.sh), logs into OUT_DIR. Fails when the parity
# tests, the NCCL tests or the generation fail.
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

# The whole serving path on the GPU (paged adapters read back from the pool, the multi-LoRA
# kernels, attention, sampling): greedy tokens of requests over three oracle-checked adapters
# and the base model, against the CPU's.
fixture=tools/oracle/fixtures/llama
printf '%s\n' \
  '{"prompt_ids":[1,5,9,3],"adapter":"a","max_tokens":8}' \
  '{"prompt_ids":[2,7,7],"adapter":"b","max_tokens":8}' \
  '{"prompt_ids":[4,4,8,1,6],"adapter":"c","max_tokens":8}' \
  '{"prompt_ids":[9,3,1],"max_tokens":8}' >"$out/generate_requests.jsonl"
generate() {
  .gpu/tandem generate --model "$fixture" --adapter "a=$fixture/adapters/all_linear_patterns" \
    --adapter "b=$fixture/adapters/attn_r8_layer1" --adapter "c=$fixture/adapters/mlp_rslora_r4" \
    --requests "$out/generate_requests.jsonl" --json --device "$1"
}
generate_status=0
generate cpu >"$out/generate_cpu.jsonl" 2>"$out/generate_cpu.err" || generate_status=$?
generate cuda:0 >"$out/generate_cuda.jsonl" 2>"$out/generate_cuda.err" || generate_status=$?
if [ "$generate_status" -eq 0 ] && ! diff "$out/generate_cpu.jsonl" "$out/generate_cuda.jsonl" >"$out/generate_diff.txt"; then
  generate_status=1
fi
cat "$out/generate_cuda.jsonl" "$out/generate_cuda.err" "$out/generate_diff.txt" 2>/dev/null || true

.gpu/tandem bench kernels --device cuda:0 2>&1 | tee "$out/bench_kernels.txt" || echo "bench exited with $?" | tee -a "$out/bench_kernels.txt"

if [ "$status" -ne 0 ]; then
  echo "gpu-check: CUDA parity tests FAILED (exit $status)" >&2
fi
if [ "$nccl_status" -ne 0 ]; then
  echo "gpu-check: NCCL tests FAILED (exit $nccl_status)" >&2
  [ "$status" -ne 0 ] || status=$nccl_status
fi
if [ "$generate_status" -ne 0 ]; then
  echo "gpu-check: generation on the GPU FAILED or differs from the CPU's (see $out/generate_*)" >&2
  [ "$status" -ne 0 ] || status=$generate_status
fi
exit "$status"
