#!/usr/bin/env bash
# Apache Kafka (KRaft mode, one combined broker+controller on loopback) for tests, benchmarks and
# local clusters, from its Maven Central artifacts: there is no Kafka package in Debian and no
# download site other than the package registries is reachable, so the jars come through Maven.
#
#   scripts/kafka.sh fetch                      jars into $PGSIDECAR_KAFKA_HOME/libs (idempotent)
#   scripts/kafka.sh start DIR PORT [CPORT]     format DIR if new, start, wait until PORT answers
#   scripts/kafka.sh stop DIR [TIMEOUT]         SIGTERM by DIR/kafka.pid, SIGKILL after TIMEOUT s
#   scripts/kafka.sh status DIR                 exit 0 if the broker of DIR runs
#
# pgsidecar/lab/kafka_broker.py is the Python twin (same layout, same files) used by the tests and by
# `pgsidecar local`; keep the two in step.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KAFKA_VERSION=${PGSIDECAR_KAFKA_VERSION:-3.9.2}
# The slf4j binding the Kafka distribution ships with (kafka_2.13 only depends on slf4j-api).
SLF4J_VERSION=1.7.36
KAFKA_HOME=${PGSIDECAR_KAFKA_HOME:-$REPO/.cache/kafka}
LIBS=$KAFKA_HOME/libs
STAMP=$LIBS/.complete

die() {
    echo "kafka.sh: $*" >&2
    exit 1
}

fetch() {
    if [[ -f $STAMP && $(cat "$STAMP") == "$KAFKA_VERSION" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found: apt-get install maven (Java 17 is needed too)"
    mkdir -p "$KAFKA_HOME"
    # One fetch at a time: a test run and a local cluster may both ask on a fresh machine.
    exec 9>"$KAFKA_HOME/.lock"
    flock -w 900 9 || die "timed out waiting for another fetch ($KAFKA_HOME/.lock)"
    if [[ -f $STAMP && $(cat "$STAMP") == "$KAFKA_VERSION" ]]; then
        return 0
    fi
    local work=$KAFKA_HOME/fetch-$KAFKA_VERSION
    rm -rf "$work" "$LIBS.new"
    mkdir -p "$work"
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pgsidecar</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    local t0=$SECONDS
    echo "kafka.sh: fetching kafka_2.13 $KAFKA_VERSION and its runtime dependencies with Maven" >&2
    # Copy into a side dir and rename at the end, so that a half-done fetch never looks done.
    (cd "$work" && timeout 900 mvn -q -B dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$LIBS.new") ||
        die "Maven could not fetch kafka_2.13 $KAFKA_VERSION (see the output above)"
    ls "$LIBS.new"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after fetch"
    rm -rf "$LIBS"
    mv "$LIBS.new" "$LIBS"
    echo "$KAFKA_VERSION" >"$STAMP"
    rm -rf "$work"
    echo "kafka.sh: $(find "$LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$LIBS" | cut -f1)," \
        "in $((SECONDS - t0)) s -> $LIBS" >&2
}

pid_alive() {
    # A zombie counts as dead: its state is the field after the command's closing ")".
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z && ${stat%% *} != X ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

write_config() {
    local dir=$1 port=$2 cport=$3
    cat >"$dir/server.properties" <<EOF
# written by scripts/kafka.sh: single-node KRaft (combined broker and controller) on loopback
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# A killed broker must come back fast in the outage tests: its restart is refused
# (DUPLICATE_BROKER_REGISTRATION) until the old incarnation's session lapses, 9 s by default.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
num.recovery.threads.per.data.dir=1
log.flush.interval.messages=9223372036854775807
EOF
    cat >"$dir/log4j.properties" <<EOF
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$dir/server.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=1
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
EOF
}

java_opts() {
    local dir=$1
    echo "-Xms64m -Xmx384m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true" \
        "-Dlog4j.configuration=file:$dir/log4j.properties -Dkafka.logs.dir=$dir"
}

start() {
    local dir=${1:?usage: kafka.sh start DIR PORT [CONTROLLER_PORT]}
    local port=${2:?usage: kafka.sh start DIR PORT [CONTROLLER_PORT]}
    local cport=${3:-$((port + 1))}
    command -v java >/dev/null || die "java not found: apt-get install openjdk-17-jre-headless"
    fetch
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/kafka.pid ]] && pid_alive "$(cat "$dir/kafka.pid")"; then
        die "a broker already runs for $dir (pid $(cat "$dir/kafka.pid"))"
    fi
    write_config "$dir" "$port" "$cport"
    # shellcheck disable=SC2046
    if [[ ! -f $dir/data/meta.properties ]]; then
        local cluster_id
        # 16 random bytes, base64url without padding: the form of Kafka's own random-uuid.
        cluster_id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
        java $(java_opts "$dir") -cp "$LIBS/*" kafka.tools.StorageTool format \
            -t "$cluster_id" -c "$dir/server.properties" --ignore-formatted >"$dir/format.log" 2>&1 ||
            die "storage format failed: $(tail -5 "$dir/format.log")"
    fi
    # setsid: the broker outlives this script and no terminal signal reaches it.
    # shellcheck disable=SC2046
    setsid java $(java_opts "$dir") -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
        >"$dir/kafka.out" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$dir/kafka.pid"
    local deadline=$((SECONDS + ${PGSIDECAR_KAFKA_START_TIMEOUT:-90}))
    until port_open "$port"; do
        pid_alive "$pid" || die "broker exited during start: $(tail -5 "$dir/kafka.out" "$dir/server.log" 2>/dev/null)"
        ((SECONDS < deadline)) || {
            kill -KILL "$pid" 2>/dev/null || true
            die "broker did not answer on 127.0.0.1:$port in time (see $dir/server.log)"
        }
        sleep 0.2
    done
    echo "127.0.0.1:$port"
}

stop() {
    local dir=${1:?usage: kafka.sh stop DIR [TIMEOUT]}
    local timeout=${2:-30}
    local pid
    pid=$(cat "$dir/kafka.pid" 2>/dev/null) || return 0
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + timeout))
        while pid_alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if pid_alive "$pid"; then
            echo "kafka.sh: broker $pid ignored SIGTERM for ${timeout}s, killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 100); do
                pid_alive "$pid" || break
                sleep 0.1
            done
        fi
    fi
    rm -f "$dir/kafka.pid"
}

status() {
    local dir=${1:?usage: kafka.sh status DIR}
    local pid
    pid=$(cat "$dir/kafka.pid" 2>/dev/null) || return 1
    pid_alive "$pid"
}

cmd=${1:-}
shift || true
case $cmd in
fetch) fetch ;;
start) start "$@" ;;
stop) stop "$@" ;;
status) status "$@" ;;
*)
    echo "usage: $0 fetch | start DIR PORT [CONTROLLER_PORT] | stop DIR [TIMEOUT] | status DIR" >&2
    exit 2
    ;;
esac
