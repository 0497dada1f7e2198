# Sourced by the network-namespace scripts: one "host" on a bridge.
# netns_host NS ADDR BRIDGE VETH: namespace NS with its own loopback and an eth0 at ADDR/24,
# joined to BRIDGE by the veth pair whose outer end is VETH.
netns_host() {
    local ns=$1 addr=$2 bridge=$3 veth=$4
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$bridge" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
}
