#!/usr/bin/env bash
# Tensor-parallel ranks as separate hosts would be: each `tandem tp-rank` in its own network
# namespace, joined to the others by a veth link to one bridge (10.99.0.0/24), must give the
# logits, training losses and adapter gradients of a group of one (within 1e-4), dense and MoE
# (experts split inside, and whole experts per rank), at degrees 2 and 4. The ranks hold worker
# certificates of one cluster CA, so their connections run under TLS as group workers' do.
# Needs root (CAP_NET_ADMIN) and iproute2; `.ci/run` runs it.
# Usage: deploy/netns-tp-parity.sh [path/to/tandem]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/netns-host.sh
bin=${1:-${CARGO_TARGET_DIR:-target}/release/tandem}
[ -x "$bin" ] || { echo "netns: no binary at $bin (cargo build --release first)" >&2; exit 1; }
work=$(mktemp -d)
bridge=tandem-br0
cleanup() {
    cleanup_ns_only
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# Namespaces and their links (a veth pair goes with its namespace's end, but not at once).
cleanup_ns_only() {
    for ns in $(ip netns list | awk '/^tandem-r/ {print $1}'); do ip netns del "$ns" 2>/dev/null || true; done
    for link in $(ip -o link show | awk -F': ' '/tveth/ {sub(/@.*/, "", $2); print $2}'); do
        ip link del "$link" 2>/dev/null || true
    done
}

"$bin" certs --dir "$work/certs" init >/dev/null
for i in 0 1 2 3; do "$bin" certs --dir "$work/certs" issue --role worker --name "rank$i" >/dev/null; done

ip link add "$bridge" type bridge
ip link set "$bridge" up
# One namespace per rank: its own loopback, an eth0 at 10.99.0.(rank+1) on the bridge.
hosts() {
    local world=$1
    cleanup_ns_only
    for ((i = 0; i < world; i++)); do netns_host "tandem-r$i" "10.99.0.$((i + 1))" "$bridge" "tveth$i"; done
}

compare() {  # compare REF OUT...: every rank's logits within 1e-4 of the reference's
    python3 - "$@" <<'PY'
import json, sys
want = json.load(open(sys.argv[1]))
ref = want["logits"]
for path in sys.argv[2:]:
    out = json.load(open(path))
    diff = max(abs(a - b) for s, t in zip(out["logits"], ref) for a, b in zip(s, t))
    assert len(out["logits"]) == len(ref), path
    assert diff < 1e-4, f"{path}: rank {out['rank']} of {out['world']} differs by {diff}"
    # Training: the same losses, and every adapter gradient within 1e-4 of its largest value.
    for l, w in zip(out["losses"], want["losses"]):
        assert abs(l - w) < 1e-4 * (1 + abs(w)), f"{path}: loss {l} vs {w}"
    assert sorted(out["gradients"]) == sorted(want["gradients"]) != [], path
    worst = 0.0
    for name, w in want["gradients"].items():
        g, scale = out["gradients"][name], max(max(abs(v) for v in w), 1e-3)
        assert len(g) == len(w), f"{path}: {name}"
        worst = max(worst, max(abs(a - b) for a, b in zip(g, w)) / scale)
    assert worst <= 1e-4, f"{path}: a gradient differs by {worst} of its largest value"
    print(f"  rank {out['rank']} of {out['world']}: logits max difference {diff:.2e}, gradients {worst:.2e} "
          f"(relative), bytes sent {out['bytes']}")
PY
}

# Each run: a name, the preset, and how a MoE model's experts are split.
for run in "tiny tiny intermediate" "tiny-moe tiny-moe intermediate" "tiny-moe-ep tiny-moe experts"; do
    read -r name preset moe_split <<<"$run"
    model=$work/$preset
    [ -d "$model" ] || "$bin" init-model --preset "$preset" --out "$model" >/dev/null
    "$bin" tp-rank --model "$model" --moe-split "$moe_split" > "$work/$name-ref.json"
    for world in 2 4; do
        hosts "$world"
        peers=$(for ((i = 0; i < world; i++)); do printf '10.99.0.%d:7700,' $((i + 1)); done)
        peers=${peers%,}
        pids=()
        for ((i = 0; i < world; i++)); do
            ip netns exec "tandem-r$i" "$bin" tp-rank --model "$model" --moe-split "$moe_split" --rank "$i" \
                --peers "$peers" --timeout-s 20 --certs "$work/certs" > "$work/$name-$world-$i.json" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
        echo "netns: $name, degree $world, ranks in $world network namespaces:"
        compare "$work/$name-ref.json" "$work/$name-$world-"*.json
    done
done
echo "netns: tensor-parallel parity across network namespaces passed"
