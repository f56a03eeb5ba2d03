#!/usr/bin/env bash
# A real PostgreSQL 15 server on 127.0.0.1 for `make test`, benchmarks and developers. No Docker
# and no Debian cluster tools (pg_ctlcluster): initdb/pg_ctl on our own data dir, run as the
# `postgres` OS user (the server refuses root). Database cdp_test, user postgres, trust auth.
#
#   deploy/postgres/postgres.sh start|stop|status|url
#
# env: CDP_PG_PORT (55432), CDP_CACHE_DIR (<repo>/.cache), CDP_PG_START_TIMEOUT (60 s)
# layout: <cache>/postgres-15/port-<port>/  data/, postgres.log, the unix socket, .lock
#         (or /tmp/cdp-postgres-<port>/ when the postgres user cannot traverse <cache>)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${CDP_CACHE_DIR:-$REPO/.cache}"
PORT="${CDP_PG_PORT:-55432}"
TIMEOUT="${CDP_PG_START_TIMEOUT:-60}"
BIN=/usr/lib/postgresql/15/bin
DB=cdp_test

log() { echo "postgres: $*" >&2; }
now_ms() { date +%s%3N; }
# cd /: the caller's cwd may be /root. 9>&-: the server must not inherit (and hold) our lock.
as_pg() { (cd / && runuser -u postgres -- "$@" 9>&-); }
ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -t 2; }
sql() { "$BIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "$1"; }

ensure_tools() {
  if [[ ! -x "$BIN/postgres" ]]; then
    log "installing postgresql-15"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
  fi
  id postgres &>/dev/null || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
}

# The server's own files must be reachable by the postgres user, and <repo> may sit under a
# root-only directory such as /root. We do not loosen permissions of directories that are not
# ours (chmod o+x on /root would be a surprise); if postgres cannot traverse the cache path,
# the server's dir moves to a postgres-owned one under /tmp. Sets BASE, DATA, LOG.
pick_dirs() {
  mkdir -p "$CACHE/postgres-15" && chmod 755 "$CACHE/postgres-15"
  local cached fallback="/tmp/cdp-postgres-$PORT" dir
  cached="$(cd "$CACHE/postgres-15" && pwd -P)/port-$PORT"
  BASE="$cached"
  id postgres &>/dev/null && as_pg test -x "${BASE%/*}" || BASE="$fallback"
  # A server this script started in either dir is ours: the path's permissions may have
  # changed since (a fresh clone under a directory made by mktemp -d, opened up later),
  # and a stop that looked only in the dir chosen now left that server running.
  for dir in "$cached" "$fallback"; do
    DATA="$dir/data"
    if our_pid >/dev/null; then BASE="$dir"; break; fi
  done
  DATA="$BASE/data" LOG="$BASE/postgres.log"
}

# Our postmaster's pid if it is alive: the pid file could be stale and its pid reused, so
# also check that the process runs in our data dir (the postmaster chdirs there).
our_pid() {
  local pid
  pid="$(head -n1 "$DATA/postmaster.pid" 2>/dev/null)" && [[ -n "$pid" ]] || return 1
  [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DATA" ]] && echo "$pid"
}

init_once() {
  [[ -f "$DATA/PG_VERSION" ]] && return 0
  log "initdb $DATA (once)"
  rm -rf "$DATA.tmp" # a previous initdb that was killed half-way
  local loc
  for loc in C.UTF-8 C; do # into .tmp and then renamed: a data dir exists only when complete
    as_pg "$BIN/initdb" -D "$DATA.tmp" --auth=trust --username=postgres --encoding=UTF8 \
      --locale="$loc" >"$BASE/initdb.log" 2>&1 && break
    log "initdb with locale $loc failed"; rm -rf "$DATA.tmp"
  done
  [[ -d "$DATA.tmp" ]] || { tail -n 20 "$BASE/initdb.log" >&2; return 1; }
  echo "include 'cdp.conf'" >>"$DATA.tmp/postgresql.conf"
  mv "$DATA.tmp" "$DATA"
}

cmd_start() {
  local t0 pid state=ready
  t0=$(now_ms)
  ensure_tools
  pick_dirs
  mkdir -p "$BASE" && chown postgres: "$BASE" && chmod 700 "$BASE"
  exec 9>"$BASE/.lock" # one start at a time per port
  flock -w $((TIMEOUT + 30)) 9 || { log "another start still holds $BASE/.lock"; return 1; }
  if pid=$(our_pid); then
    for _ in $(seq $((TIMEOUT * 5))); do ready && break; sleep 0.2; done
    ready || { log "our server (pid $pid) does not answer on 127.0.0.1:$PORT"; tail -n 30 "$LOG" >&2; return 1; }
    state="already running"
  elif ready; then
    # Someone else's server (another clone's cache dir, a developer's own): use it, never stop it.
    state="using a server not started by this script"
  else
    init_once
    # Rewritten on every start, so a changed port or socket dir applies. fsync stays on:
    # the benchmarks measure this server. pg_stat_statements (in Debian's postgresql-15,
    # loaded when it is there): the time of each statement, which benchmarks/pipeline.py prints.
    local preload=""
    if [[ -f "$BIN/../lib/pg_stat_statements.so" ]]; then
      preload="shared_preload_libraries = 'pg_stat_statements'"
    fi
    cat >"$DATA/cdp.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$BASE'
fsync = on
synchronous_commit = on
shared_buffers = 256MB
max_connections = 200
$preload
EOF
    chown postgres: "$DATA/cdp.conf"
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" -w -t "$TIMEOUT" -l "$LOG" start >/dev/null; then
      log "the server did not start:"; tail -n 30 "$LOG" >&2 2>/dev/null || true; return 1
    fi
    pid=$(our_pid) || true
  fi
  if [[ "$(sql "select 1 from pg_database where datname = '$DB'")" != 1 ]]; then
    sql "create database $DB" || { log "cannot create database $DB on 127.0.0.1:$PORT"; return 1; }
  fi
  log "$state on 127.0.0.1:$PORT${pid:+ (pid $pid, log $LOG)} in $(($(now_ms) - t0))ms"
}

cmd_stop() {
  pick_dirs
  our_pid >/dev/null || { log "not running (from $DATA)"; return 0; }
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null
  log "stopped"
}

cmd_status() {
  local pid
  pick_dirs
  if pid=$(our_pid) && ready; then
    echo "running: pid $pid on 127.0.0.1:$PORT (data $DATA)"
  elif ready; then
    echo "running: a server not started by this script answers on 127.0.0.1:$PORT"
  else
    echo "stopped"; return 3
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) echo "postgresql+asyncpg://postgres@127.0.0.1:$PORT/$DB" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
