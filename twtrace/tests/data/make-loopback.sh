#!/bin/bash
# Records twtrace/tests/data/loopback.twt: a small real trace of one namespace with every
# kind of event (each end reason, an abort, port failures, a purge). Run as root after
# `cargo build --release --workspace --bins`: sudo twtrace/tests/data/make-loopback.sh OUT
NS=twfix$$
OUT=$1
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
L=$ROOT/target/release/twload
T=$ROOT/target/release/twtrace
ip netns add $NS
ip netns exec $NS ip link set lo up
ip netns exec $NS sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.tcp_fin_timeout=1
$T record --netns $NS -o "$OUT" --duration 14 2>/tmp/fix.err &
P=$!
sleep 3
ip netns exec $NS $L client-first 127.0.0.1:8080 >/dev/null 2>&1
ip netns exec $NS $L server-first 127.0.0.1:8081 >/dev/null 2>&1
ip netns exec $NS $L shutdown 127.0.0.1:8082 >/dev/null 2>&1
ip netns exec $NS sysctl -qw net.ipv4.ip_local_port_range="40000 40000"
ip netns exec $NS $L reuse 127.0.0.1:8083 >/dev/null 2>&1
ip netns exec $NS sysctl -qw net.ipv4.ip_local_port_range="32768 60999"
ip netns exec $NS $L recycle 127.0.0.1:8084 >/dev/null 2>&1
ip netns exec $NS $L rst 127.0.0.1:8085 >/dev/null 2>&1
ip netns exec $NS $L linger0 127.0.0.1:8090 >/dev/null 2>&1
ip netns exec $NS $L hold 127.0.0.1:8086 2500 >/dev/null 2>&1
ip netns exec $NS $L restart 127.0.0.1:8087 >/dev/null 2>&1 || true
ip netns exec $NS $L churn 127.0.0.1:8088 1 40 >/dev/null 2>&1
ip netns exec $NS sysctl -qw net.ipv4.ip_local_port_range="40000 40001" net.ipv4.tcp_tw_reuse=0
ip netns exec $NS $L exhaust 127.0.0.1:8089 >/dev/null 2>&1 || true
sleep 1
ip netns del $NS
wait $P
cat /tmp/fix.err
