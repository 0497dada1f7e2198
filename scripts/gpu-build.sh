#!/usr/bin/env bash
# Builds, on this (CPU) machine, what the GPU machine runs: the `tandem` binary and the CUDA
# parity test binary, both with the CUDA backend, copied into .gpu/ (see gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --features cuda -p tandem
# The test binary's path has a hash in it; cargo reports it in its JSON messages.
test_bin=$(cargo test --release --features cuda -p tandem-kernels --test cuda_parity --no-run --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "cuda_parity" and msg.get("executable"):
        print(msg["executable"])
')
[ -n "$test_bin" ] || { echo "gpu-build: no cuda_parity test binary found" >&2; exit 1; }

mkdir -p .gpu
cp target/release/tandem .gpu/tandem
cp "$test_bin" .gpu/cuda_parity
ls -l .gpu
