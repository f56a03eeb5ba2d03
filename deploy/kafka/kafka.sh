#!/usr/bin/env bash
# A real single-node Apache Kafka 4.3.1 broker (KRaft: broker + controller in one JVM) on
# 127.0.0.1, for `make test` and developers. No Docker: the jars come from Maven Central.
#
#   deploy/kafka/kafka.sh start|stop|status|reset
#
# reset: stop it and delete its data (topics, offsets), for a broker as new at the next
# start. Why: every test run leaves its topics (thousands of partitions after `make test`),
# and such a broker spends about twice the CPU per event (benchmarks/pipeline.py, issue 10).
#
# env: CDP_KAFKA_PORT (9092), CDP_KAFKA_CONTROLLER_PORT (9093), CDP_CACHE_DIR (<repo>/.cache),
#      CDP_KAFKA_START_TIMEOUT (60 s), CDP_KAFKA_HEAP (512m), CDP_PYTHON (<repo>/.venv/bin/python),
#      CDP_KAFKA_INITIAL_REBALANCE_DELAY_MS (0: a new group's first member starts at once, which
#      tests want; Kafka's default, 3000, lets members started together join before the first
#      assignment, as on a production broker: `make bench` uses it)
# layout: <cache>/kafka-4.3.1/lib/           jars (fetched once by Maven, via ~/.m2)
#         <cache>/kafka-4.3.1/broker-<port>/ server.properties, data/, kafka.pid, server.log
set -euo pipefail

VERSION=4.3.1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${CDP_CACHE_DIR:-$REPO/.cache}"
mkdir -p "$CACHE" && CACHE="$(cd "$CACHE" && pwd)"
PORT="${CDP_KAFKA_PORT:-9092}"
CPORT="${CDP_KAFKA_CONTROLLER_PORT:-9093}"
TIMEOUT="${CDP_KAFKA_START_TIMEOUT:-60}"
REBALANCE_DELAY="${CDP_KAFKA_INITIAL_REBALANCE_DELAY_MS:-0}"
PY="${CDP_PYTHON:-$REPO/.venv/bin/python}"
KDIR="$CACHE/kafka-$VERSION"
LIB="$KDIR/lib"
RUN="$KDIR/broker-$PORT"
PIDFILE="$RUN/kafka.pid"
BOOT="127.0.0.1:$PORT"

log() { echo "kafka: $*" >&2; }
now_ms() { date +%s%3N; }

# A fresh machine of this kind has Java 17 and Maven; install them if one is missing (root).
ensure_tools() {
  local pkgs=()
  command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || pkgs+=(maven)
  if ((${#pkgs[@]})); then
    log "installing ${pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
}

# Our broker's pid if it is alive (the pid file could be stale and its pid reused).
our_pid() {
  local pid cmd
  pid="$(cat "$PIDFILE" 2>/dev/null)" && [[ -n "$pid" ]] || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmd" == *"kafka.Kafka $RUN/server.properties"* ]] && echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Does a Kafka broker on $BOOT answer a metadata request and list itself? With the project's
# venv this is a real client (aiokafka); without it, fall back to the broker's own log line.
# $1: pid to watch (empty: none), $2: seconds. Loops inside Python: one interpreter start.
wait_ready() {
  local pid="$1" secs="$2"
  if "$PY" -c 'import aiokafka' 2>/dev/null; then
    "$PY" - "$BOOT" "$pid" "$secs" <<'EOF'
import asyncio, logging, os, sys, time
from aiokafka.client import AIOKafkaClient
logging.disable(logging.CRITICAL)  # "connect failed" is expected while the broker boots
boot, pid, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])

async def once():
    c = AIOKafkaClient(bootstrap_servers=boot, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(c.bootstrap(), 3)
        return bool(c.cluster.brokers())
    finally:
        await c.close()

async def main():
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pid:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return 2  # the broker died
        try:
            if await once():
                return 0
        except Exception:
            pass
        await asyncio.sleep(0.2)
    return 1

sys.exit(asyncio.run(main()))
EOF
  else
    local end=$((SECONDS + secs))
    while ((SECONDS < end)); do
      [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null || return 2
      port_open "$PORT" && grep -q "Kafka Server started" "$RUN/server.log" 2>/dev/null && return 0
      sleep 0.2
    done
    return 1
  fi
}

fetch_jars() {
  [[ -f "$LIB/.complete" ]] && return 0
  ensure_tools
  local t0; t0=$(now_ms)
  log "fetching kafka_2.13:$VERSION jars with Maven into $LIB (once)"
  rm -rf "$LIB.tmp"
  mvn -B -q -f "$HERE/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIB.tmp" >"$KDIR/mvn.log" 2>&1 ||
    { cat "$KDIR/mvn.log" >&2; log "Maven could not fetch the jars"; return 1; }
  rm -rf "$LIB" && mv "$LIB.tmp" "$LIB" && touch "$LIB/.complete"
  log "fetched $(ls "$LIB" | wc -l) jars in $(( ($(now_ms) - t0) ))ms"
}

write_config() {
  mkdir -p "$RUN/data"
  # Static controller.quorum.voters (not controller.quorum.bootstrap.servers): the controller's
  # address comes from this file on every start, so a formatted data dir survives a change of
  # the controller port; the matching format is *without* --standalone.
  cat >"$RUN/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$RUN/data
num.network.threads=2
num.io.threads=4
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=$REBALANCE_DELAY
# the application creates its topics; a typo'd topic must fail, not appear
auto.create.topics.enable=false
EOF
  # kafka_2.13 brings log4j-core; log4j-slf4j-impl (pom.xml) routes SLF4J into it.
  cat >"$RUN/log4j2.properties" <<EOF
status = warn
appender.f.type = RollingFile
appender.f.name = F
appender.f.fileName = $RUN/server.log
appender.f.filePattern = $RUN/server.log.%i
appender.f.layout.type = PatternLayout
appender.f.layout.pattern = [%d] %p %m (%c)%n
appender.f.policies.type = Policies
appender.f.policies.size.type = SizeBasedTriggeringPolicy
appender.f.policies.size.size = 50MB
appender.f.strategy.type = DefaultRolloverStrategy
appender.f.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.f.ref = F
logger.sc.name = state.change.logger
logger.sc.level = WARN
EOF
}

format_once() {
  [[ -f "$RUN/data/meta.properties" ]] && return 0
  local id
  # A cluster id is 16 random bytes in base64url; not starting with '-' (it is a CLI argument).
  until [[ "${id:-}" =~ ^[A-Za-z0-9_] ]]; do
    id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
  done
  log "formatting $RUN/data (cluster id $id)"
  java -cp "$LIB/*" -Dlog4j2.configurationFile="$RUN/log4j2.properties" \
    kafka.tools.StorageTool format --config "$RUN/server.properties" --cluster-id "$id" >/dev/null
}

cmd_start() {
  local t0 pid rc=0
  t0=$(now_ms)
  mkdir -p "$RUN"
  exec 9>"$RUN/.lock" && flock -w $((TIMEOUT + 30)) 9 # one start at a time per broker dir
  if pid=$(our_pid); then
    wait_ready "$pid" "$TIMEOUT" || rc=$?
    ((rc == 0)) && { log "already running (pid $pid) on $BOOT"; return 0; }
  elif port_open "$PORT"; then
    # Someone else's broker (another clone's cache dir, a developer's own): use it, never stop it.
    wait_ready "" 5 && { log "a broker not started by this script answers on $BOOT; using it"; return 0; }
    log "port $PORT is taken by something that is not a Kafka broker"; return 1
  else
    fetch_jars
    write_config
    format_once
    : >"$RUN/kafka.out"
    # setsid: the broker outlives the shell (and Ctrl-C) that started it; the inner shell
    # writes its own pid and then becomes java, so the pid file holds java's pid.
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
      java -Xms"${CDP_KAFKA_HEAP:-512m}" -Xmx"${CDP_KAFKA_HEAP:-512m}" -XX:+UseG1GC \
      -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$RUN/log4j2.properties" \
      -cp "$LIB/*" kafka.Kafka "$RUN/server.properties" </dev/null >>"$RUN/kafka.out" 2>&1 9>&- &
    for _ in $(seq 50); do pid=$(our_pid) && break; sleep 0.1; done
    [[ -n "${pid:-}" ]] || { log "the broker did not start:"; tail -n 30 "$RUN/kafka.out" >&2; return 1; }
    wait_ready "$pid" "$TIMEOUT" || rc=$?
  fi
  if ((rc != 0)); then
    ((rc == 2)) && log "the broker exited during start-up" || log "not ready after ${TIMEOUT}s"
    tail -n 40 "$RUN/server.log" >&2 2>/dev/null || true
    tail -n 20 "$RUN/kafka.out" >&2 2>/dev/null || true
    return 1
  fi
  log "ready on $BOOT (pid $pid) in $(( $(now_ms) - t0 ))ms; log: $RUN/server.log"
}

cmd_stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PIDFILE"
    log "not running (from $RUN)"; return 0
  fi
  kill -TERM "$pid"
  # A controlled shutdown of one node takes a few seconds; SIGKILL only past the bound
  # (the next start then recovers the log, which is safe).
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "no exit 30s after SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

cmd_status() {
  local pid
  if pid=$(our_pid); then
    echo "running: pid $pid on $BOOT (dir $RUN)"
  elif port_open "$PORT" && wait_ready "" 3; then
    echo "running: a broker not started by this script answers on $BOOT"
  else
    echo "stopped"; return 3
  fi
}

cmd_reset() {
  cmd_stop
  rm -rf "$RUN/data"
  log "data deleted ($RUN/data): the next start formats a new one"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  *) echo "usage: $0 start|stop|status|reset" >&2; exit 2 ;;
esac
