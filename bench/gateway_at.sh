#!/usr/bin/env bash
# `tandem bench gateway` on an older commit: the "before" rows of docs/benchmarks.md's gateway
# table. Checks REV out in a worktree beside this one, adds this tree's bench file and the
# machine description it prints to it (the bench talks to the processes only through HTTP, the
# worker's gRPC and `tandem status --json`, which older commits share), builds it in this
# tree's target folder and runs it.
#   bench/gateway_at.sh d198ac3 [bench gateway flags...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
rev="${1:?usage: bench/gateway_at.sh REV [flags]}"; shift
tree="$(mktemp -d /tmp/tandem-at-XXXXXX)"
trap 'git -C "$here" worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add -q --detach "$tree" "$rev"
cp "$here/cli/src/bench_gateway.rs" "$here/cli/src/machine.rs" "$tree/cli/src/"
if ! grep -q "^mod machine;" "$tree/cli/src/main.rs"; then
    sed -i 's/^mod jobs;$/mod jobs;\nmod machine;/' "$tree/cli/src/main.rs"
fi
if ! grep -q bench_gateway "$tree/cli/src/main.rs"; then
    sed -i 's/^mod bench_finetune;$/mod bench_finetune;\nmod bench_gateway;/' "$tree/cli/src/main.rs"
    sed -i 's/^    Failover(crate::bench_failover::FailoverArgs),$/&\n    Gateway(crate::bench_gateway::GatewayArgs),/' "$tree/cli/src/bench.rs"
    sed -i 's/^        Bench::Failover(args) => crate::bench_failover::run(args),$/&\n        Bench::Gateway(args) => crate::bench_gateway::run(args),/' "$tree/cli/src/bench.rs"
fi
(cd "$tree" && CARGO_TARGET_DIR="$here/target/at-rev" cargo build --release -q)
cd "$here" && "$here/target/at-rev/release/tandem" bench gateway "$@"
