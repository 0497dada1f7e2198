#!/usr/bin/env bash
# A cluster of five hosts on one machine: three coordinators and two CPU workers, each in its
# own network namespace on one bridge (10.98.0.0/24), started as the systemd units start them
# (their ExecStart lines, the example settings deploy/systemd/*.toml) with what differs here
# given as the per-host TANDEM_* variables an operator writes into /etc/tandem/*.env. Then, as
# an operator and a tenant would from outside: a base model registered with `tandem models
# register`, a tenant's key, a completion, a short fine-tuning job whose adapter then answers,
# and `tandem workers list`. The hosts share this machine's disk, as the blobs folder would be
# shared (NFS) across real hosts.
#
#
# With --roll, a rolling upgrade follows (docs/operator-guide.md, "Upgrade"), while a client
# keeps calling completions and uploading files and a fine-tuning job trains: every coordinator
# in turn is replaced by a new binary (the leader last, after handing its leadership over), then
# every worker (drained first, so its job is handed off at a checkpoint). It fails if a file
# whose upload was acknowledged is lost or the job does not succeed, and reports the
# completions' error rate during the roll.
#
# Needs root (CAP_NET_ADMIN), iproute2 and python3; `.ci/run` runs it with --roll.
# Usage: deploy/netns-cluster.sh [--roll] [path/to/tandem]   (default: target/release/tandem)
#        KEEP=1 deploy/netns-cluster.sh             (leave it running; Ctrl-C takes it down)
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/netns-host.sh
roll=
[ "${1:-}" = --roll ] && { roll=1; shift; }
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/tandem}")
[ -x "$bin" ] || { echo "netns-cluster: no binary at $bin (cargo build --release first)" >&2; exit 1; }
work=$(mktemp -d)
bridge=tandem-cl0
net=10.98.0
coordinators=(1 2 3)
workers=(w1 w2)
declare -A addr=([1]=$net.1 [2]=$net.2 [3]=$net.3 [w1]=$net.11 [w2]=$net.12)
declare -A pid=()

cleanup() {
    for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in $(ip netns list | awk '/^tandem-h/ {print $1}'); do ip netns del "$ns" 2>/dev/null || true; done
    ip link del "$bridge" 2>/dev/null || true
    if [ -n "${failed:-}" ]; then
        for log in "$work"/*/log; do echo "--- $log"; tail -n 30 "$log"; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'failed=1' ERR

# The hosts: a namespace each, an eth0 on the bridge; this machine is 10.98.0.254 on it.
ip link add "$bridge" type bridge
ip addr add "$net.254/24" dev "$bridge"
ip link set "$bridge" up
for host in "${coordinators[@]}" "${workers[@]}"; do netns_host "tandem-h$host" "${addr[$host]}" "$bridge" "tcl$host"; done

# What an operator puts in /etc/tandem: the certificates (each host's own, and the operator's),
# the operator's key, the units' settings. The base model's folder, shared like the blobs.
etc=$work/etc
mkdir -p "$etc" "$work/blobs" "$work/models"
"$bin" certs --dir "$etc/certs" init >/dev/null
for id in "${coordinators[@]}"; do "$bin" certs --dir "$etc/certs" issue --role coordinator --name "$id" >/dev/null; done
for id in "${workers[@]}"; do "$bin" certs --dir "$etc/certs" issue --role worker --name "$id" >/dev/null; done
"$bin" certs --dir "$etc/certs" issue --role operator --name operator >/dev/null
admin_key=sk-netns-$RANDOM$RANDOM
(umask 077 && printf '%s\n' "$admin_key" > "$etc/admin-key")
cp deploy/systemd/coordinator.toml deploy/systemd/worker.toml "$etc/"
"$bin" init-model --preset tiny --out "$work/models/base" >/dev/null

peers=$(for id in "${coordinators[@]}"; do printf '%s=%s:7400,' "$id" "${addr[$id]}"; done)
peers=${peers%,}
# Each unit's command line, as its ExecStart gives it, with the paths of this machine.
command_of() {
    local line
    line=$(sed -n 's/^ExecStart=//p' "deploy/systemd/tandem-$1.service")
    line=${line//\/usr\/local\/bin\/tandem/$bin}
    echo "${line//\/etc\/tandem/$etc}"
}
# Starts host $1 as unit $2, with the variables that follow (its /etc/tandem/$2.env).
start() {
    local host=$1 unit=$2
    shift 2
    mkdir -p "$work/$host"
    printf '%s\n' "$@" > "$work/$host/env"
    echo "$unit" > "$work/$host/unit"
    run "$host"
}
# (Re)starts host $1's unit with its variables.
run() {
    local host=$1
    # shellcheck disable=SC2046 # one word per variable and per argument, as systemd splits them
    ip netns exec "tandem-h$host" env -i PATH="$PATH" $(cat "$work/$host/env") \
        $(command_of "$(cat "$work/$host/unit")") >> "$work/$host/log" 2>&1 &
    pid[$host]=$!
}
# Stops host $1 as systemd does (SIGTERM, and waits for it).
stop() {
    kill "${pid[$1]}"
    wait "${pid[$1]}" 2>/dev/null || true
}
# Waits until host $1's health port (9401 coordinators, 9501 workers) answers 200.
ready() {
    local host=$1 port=$2 i
    for i in $(seq 1 300); do
        if python3 - "${addr[$host]}:$port" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}/health", timeout=2)
PY
        sleep 0.2
    done
    echo "netns-cluster: host $host never became ready" >&2
    failed=1
    return 1
}

# The settings every host shares come from the files; these are this deployment's.
shared=("TANDEM_CERTS=$etc/certs" "TANDEM_BLOBS=$work/blobs")
for id in "${coordinators[@]}"; do
    start "$id" coordinator "${shared[@]}" "TANDEM_ID=$id" "TANDEM_PEERS=$peers" \
        "TANDEM_DATA_DIR=$work/$id/data" "TANDEM_API_KEY_FILE=$etc/admin-key"
done
for id in "${coordinators[@]}"; do ready "$id" 9401; done
echo "netns-cluster: coordinators 1-3 ready at $net.1-3 (a quorum answers on each)"

operator=(--coordinator "$net.1:7400,$net.2:7400,$net.3:7400" --certs "$etc/certs" --cert-name operator)
"$bin" models register base --path "$work/models/base" "${operator[@]}"
for id in "${workers[@]}"; do
    start "$id" worker "${shared[@]}" "TANDEM_ID=$id" "TANDEM_LISTEN=${addr[$id]}:7500" \
        "TANDEM_COORDINATOR=$net.1:7400,$net.2:7400,$net.3:7400" "TANDEM_MODEL=$work/models/base" \
        "TANDEM_DEVICE=cpu" "TANDEM_POOL_PAGES=512"
done
for id in "${workers[@]}"; do ready "$id" 9501; done
echo "netns-cluster: workers w1, w2 ready at $net.11-12 (each holds its lease)"
"$bin" workers list "${operator[@]}"

# A tenant, through the gateway of coordinator 2: a completion, then a short fine-tuning job
# whose adapter answers once it succeeds.
gateway=$net.2:8080
# The key alone goes to stdout (its description to stderr).
tenant_key=$(TANDEM_API_KEY=$admin_key "$bin" keys create --gateway "$gateway" --tenant acme 2>/dev/null)
python3 - "$gateway" "$tenant_key" <<'PY'
import json, sys, time, urllib.request

gateway, key = sys.argv[1], sys.argv[2]


def call(method, path, body=None, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{gateway}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


out = call("POST", "/v1/completions", {"model": "base", "prompt": "Hello", "max_tokens": 4})
assert out["usage"]["completion_tokens"] == 4, out
print(f"netns-cluster: a completion through {gateway}: {out['choices'][0]['text']!r}")

lines = "".join(json.dumps({"prompt": f"n{i} =", "completion": f" {i % 3}"}) + "\n" for i in range(16))
boundary = "netns-cluster-boundary"
form = (
    f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n"
    f"Content-Type: application/jsonl\r\n\r\n{lines}\r\n--{boundary}--\r\n"
).encode()
file = call("POST", "/v1/files", form, f"multipart/form-data; boundary={boundary}")
job = call("POST", "/v1/fine_tuning/jobs", {
    "model": "base", "training_file": file["id"], "suffix": "netns",
    "hyperparameters": {"n_epochs": 3, "batch_size": 4},
})
deadline = time.time() + 240
while job["status"] not in ("succeeded", "failed", "cancelled"):
    assert time.time() < deadline, f"the job did not end in time: {job}"
    time.sleep(0.5)
    job = call("GET", f"/v1/fine_tuning/jobs/{job['id']}")
assert job["status"] == "succeeded", job
out = call("POST", "/v1/completions", {"model": job["fine_tuned_model"], "prompt": "n1 =", "max_tokens": 2})
print(f"netns-cluster: job {job['id']} succeeded; its adapter {job['fine_tuned_model']} answers {out['choices'][0]['text']!r}")
PY

if [ -n "$roll" ]; then
    # The new version: another binary (here a copy), put where the units run it from.
    cp "$bin" "$work/tandem-new"
    bin=$work/tandem-new
    # A job long enough to train through the roll, then the client's workload.
    TANDEM_API_KEY=$tenant_key python3 deploy/roll_workload.py start "$net.1:8080,$net.2:8080,$net.3:8080" "$work/roll" &
    client=$!
    until [ -s "$work/roll/started" ]; do
        kill -0 "$client" 2>/dev/null || { echo "netns-cluster: the workload did not start" >&2; failed=1; exit 1; }
        sleep 0.2
    done
    leader() { "$bin" status --json "${operator[@]}" | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])'; }
    # Coordinators: the followers one at a time, the leader last after it hands leadership over.
    first=$(leader)
    for id in $(printf '%s\n' "${coordinators[@]}" | grep -vx "$first") "$first"; do
        if [ "$id" = "$(leader)" ]; then
            next=$(printf '%s\n' "${coordinators[@]}" | grep -vx "$id" | head -n1)
            "$bin" coordinators transfer-leader "$next" "${operator[@]}"
        fi
        stop "$id"
        run "$id"
        ready "$id" 9401
        echo "netns-cluster: coordinator $id replaced (leader now $(leader))"
    done
    # Workers: drained (jobs handed off at a checkpoint, no new requests), replaced, back.
    for id in "${workers[@]}"; do
        "$bin" workers drain "$id" --wait 120 "${operator[@]}"
        stop "$id"
        run "$id"
        ready "$id" 9501
        "$bin" workers undrain "$id" "${operator[@]}"
        echo "netns-cluster: worker $id replaced"
    done
    touch "$work/roll/stop"
    wait "$client"
    TANDEM_API_KEY=$tenant_key python3 deploy/roll_workload.py check "$net.1:8080,$net.2:8080,$net.3:8080" "$work/roll"
fi

if [ -n "${KEEP:-}" ]; then
    echo "netns-cluster: running until Ctrl-C. Gateways: http://$net.{1,2,3}:8080/v1 (the operator's key in"
    echo "  $etc/admin-key, tenant acme's: $tenant_key). As the operator, add to tandem's commands:"
    echo "  ${operator[*]}"
    wait
fi
echo "netns-cluster: passed"
