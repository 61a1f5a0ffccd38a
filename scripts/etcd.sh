#!/usr/bin/env bash
# Start or stop a local single-node etcd (Debian's /usr/bin/etcd) for trying pgsidecar by hand.
#
#   scripts/etcd.sh start DIR [PORT]   client URL http://127.0.0.1:PORT (default 2379), peer PORT+1;
#                                      data in DIR/data, log in DIR/etcd.log, pid in DIR/etcd.pid
#   scripts/etcd.sh stop DIR           SIGTERM, SIGKILL after 10 s; keeps the data
#   scripts/etcd.sh status DIR
#
# Then point the agent at it: dcs: {type: etcd, etcd: {endpoints: ["http://127.0.0.1:PORT"]}}
set -euo pipefail

ETCD_BIN=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}

usage() {
    echo "usage: $0 start DIR [PORT] | stop DIR | status DIR" >&2
    exit 2
}

running() { # pid alive and not a zombie
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [[ $state != Z && $state != X ]]
}

healthy() {
    local port=$1
    if command -v curl >/dev/null; then
        curl -fsS --max-time 1 "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"health":"true"'
    else
        ETCDCTL_API=3 etcdctl --endpoints="http://127.0.0.1:$port" --command-timeout=1s \
            endpoint health >/dev/null 2>&1
    fi
}

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || usage
pidfile=$dir/etcd.pid

case $cmd in
start)
    port=${3:-2379}
    [[ $port =~ ^[0-9]+$ ]] || usage
    [[ -x $ETCD_BIN ]] || { echo "etcd not found (apt-get install etcd-server)" >&2; exit 1; }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    pidfile=$dir/etcd.pid
    if [[ -f $pidfile ]] && running "$(cat "$pidfile")"; then
        echo "etcd already running (pid $(cat "$pidfile")) in $dir" >&2
        exit 1
    fi
    peer=$((port + 1))
    client_url=http://127.0.0.1:$port
    peer_url=http://127.0.0.1:$peer
    # a fresh data dir bootstraps a new cluster; an existing one is simply restarted
    nohup "$ETCD_BIN" \
        --name=local \
        --data-dir="$dir/data" \
        --listen-client-urls="$client_url" \
        --advertise-client-urls="$client_url" \
        --listen-peer-urls="$peer_url" \
        --initial-advertise-peer-urls="$peer_url" \
        --initial-cluster="local=$peer_url" \
        --initial-cluster-state=new \
        --logger=zap --log-level=warn \
        </dev/null >>"$dir/etcd.log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    for _ in $(seq 1 200); do # 20 s
        if ! running "$pid"; then
            echo "etcd exited at start; last lines of $dir/etcd.log:" >&2
            tail -n 20 "$dir/etcd.log" >&2
            rm -f "$pidfile"
            exit 1
        fi
        if healthy "$port"; then
            echo "etcd running: pid $pid, endpoint $client_url, data $dir/data"
            exit 0
        fi
        sleep 0.1
    done
    echo "etcd (pid $pid) not healthy after 20 s; see $dir/etcd.log" >&2
    exit 1
    ;;
stop)
    [[ -f $pidfile ]] || { echo "no $pidfile: not running"; exit 0; }
    pid=$(cat "$pidfile")
    if running "$pid" && grep -q etcd "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 100); do # 10 s
            running "$pid" || break
            sleep 0.1
        done
        if running "$pid"; then
            echo "etcd (pid $pid) ignored SIGTERM for 10 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
    echo "etcd stopped"
    ;;
status)
    if [[ -f $pidfile ]] && running "$(cat "$pidfile")"; then
        echo "running (pid $(cat "$pidfile"))"
    else
        echo "not running"
        exit 3
    fi
    ;;
*)
    usage
    ;;
esac
