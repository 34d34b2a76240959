#!/usr/bin/env bash
# A privmed federation whose coordinator and hospitals each live in their own Linux network
# namespace, joined by veth pairs on a bridge, so that every message crosses a real network stack
# (TLS, node authentication and SecAgg+ on, as in the README).
#
#   sudo bash scripts/netns_federation.sh [SITES] [ROUNDS]     (default 3 hospitals, 2 rounds)
#
# Needs root and iproute2 (`ip netns`). Everything it creates is named pm-* and removed on exit,
# and every process it started is stopped by its id. Writes into a fresh temporary directory, whose
# path it prints (the run directory is in it).
set -euo pipefail
cd "$(dirname "$0")/.."
SITES=${1:-3}
ROUNDS=${2:-2}
PRIVMED=${PRIVMED:-$PWD/.venv/bin/privmed}
PYTHON=$(dirname "$PRIVMED")/python
[ "$(id -u)" = 0 ] || { echo "netns_federation.sh: needs root (ip netns)" >&2; exit 2; }
command -v ip >/dev/null || { echo "netns_federation.sh: needs iproute2 (apt-get install iproute2)" >&2; exit 2; }
[ -x "$PRIVMED" ] || { echo "netns_federation.sh: $PRIVMED not found; run bash setup.sh first" >&2; exit 2; }

WORK=$(mktemp -d /tmp/privmed-netns.XXXXXX)
BR=pm-br0
NET=10.77.0
COORD_IP=$NET.1
PORT=9092
PIDS=()
NSS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 30); do  # up to 15 s for privmed to stop the Flower processes it started
    alive=0; for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for ns in "${NSS[@]}"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
}
trap cleanup EXIT

ip link add "$BR" type bridge
ip link set "$BR" up

# namespace NAME, address NET.HOST: a veth pair, one end in the namespace, the other on the bridge
add_ns() {
  local ns=$1 host=$2
  ip netns add "$ns"; NSS+=("$ns")
  ip link add "$ns-h" type veth peer name "$ns-n"
  ip link set "$ns-h" master "$BR" up
  ip link set "$ns-n" netns "$ns"
  ip netns exec "$ns" ip addr add "$NET.$host/24" dev "$ns-n"
  ip netns exec "$ns" ip link set "$ns-n" up
  ip netns exec "$ns" ip link set lo up   # Flower's SuperNode serves its app processes on 127.0.0.1
}

add_ns pm-coord 1
for i in $(seq 1 "$SITES"); do add_ns "pm-site$i" $((10 + i)); done

cat > "$WORK/config.yaml" <<YAML
name: netns
seed: 0
data: {source: phantom, size: 16, samples_per_site: 80}
sites: {count: $SITES, partition: natural}
model: {name: cnn, width: 8}
federation: {strategy: fedavg, rounds: $ROUNDS, secure_aggregation: true}
training: {batch_size: 32, lr: 0.003, optimizer: adam}
YAML

"$PRIVMED" certs "$WORK/certs" --name "$COORD_IP" >/dev/null
for i in $(seq 1 "$SITES"); do "$PRIVMED" keys "$WORK/keys" --name "site-$i" >/dev/null; done

setsid ip netns exec pm-coord "$PRIVMED" serve --certs "$WORK/certs" --keys "$WORK/keys" \
  --address "$COORD_IP:$PORT" --home "$WORK/home" >"$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do grep -q "coordinator listening" "$WORK/coordinator.log" && break; sleep 0.5; done
grep -q "coordinator listening" "$WORK/coordinator.log" || { cat "$WORK/coordinator.log"; exit 1; }

for i in $(seq 1 "$SITES"); do
  # a hospital reaches the coordinator only through its veth and the bridge
  ip netns exec "pm-site$i" "$PYTHON" -c "import socket; socket.create_connection(('$COORD_IP', $PORT), timeout=5).close()"
  setsid ip netns exec "pm-site$i" "$PRIVMED" join "$WORK/config.yaml" --site "site-$i" \
    --server "$COORD_IP:$PORT" --certs "$WORK/certs" --key "$WORK/keys/site-$i" \
    --home "$WORK/home-site-$i" >"$WORK/site-$i.log" 2>&1 &
  PIDS+=($!)
done

echo "coordinator: pm-coord $COORD_IP:$PORT; hospitals: pm-site1..pm-site$SITES ($NET.11..); logs in $WORK"
ip netns exec pm-coord "$PRIVMED" run "$WORK/config.yaml" --runner flower --server "$COORD_IP:$PORT" \
  --certs "$WORK/certs" --home "$WORK/home" --out "$WORK/run" --quiet
# traffic really crossed the veths: bytes received by the coordinator's interface
echo "coordinator's interface received $(ip netns exec pm-coord cat /sys/class/net/pm-coord-n/statistics/rx_bytes) bytes"
