#!/usr/bin/env bash
# Builds, on this (CPU) machine, what the GPU machine runs: the `tandem` binary, the CUDA parity
# test binary and the NCCL collectives' test binary, all with the CUDA backend, copied into .gpu/
# (see gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --features cuda -p tandem

# A test binary's path has a hash in it; cargo reports it in its JSON messages.
test_binary() { # PACKAGE TEST
  local bin
  bin=$(cargo test --release --features cuda -p "$1" --test "$2" --no-run --message-format=json \
    | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == name and msg.get("executable"):
        print(msg["executable"])
' "$2")
  [ -n "$bin" ] || { echo "gpu-build: no $2 test binary found" >&2; exit 1; }
  echo "$bin"
}
parity_bin=$(test_binary tandem-kernels cuda_parity)
# The NCCL collectives' tests (its GPU tests are #[ignore]d; gpu-check.sh runs them with --ignored).
nccl_bin=$(test_binary tandem-worker nccl)

mkdir -p .gpu
cp target/release/tandem .gpu/tandem
cp "$parity_bin" .gpu/cuda_parity
cp "$nccl_bin" .gpu/nccl
ls -l .gpu
