#!/usr/bin/env bash
# A local S-Bus cluster: one store (PostgreSQL or Redis), N `sbus serve` replicas and
# nginx in front of them, all on loopback, all in the background. docs/operations.md,
# section 3, walks through it. Run with --help for the commands.
#
# The whole script is one { ... } block, so bash reads all of it before running any:
# editing or updating the file while a cluster command runs cannot change that command.
{
set -euo pipefail

PROG=deploy/local/cluster.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DEFAULT_PORT=7080
# nginx keeps idle upstream connections open for less time than a replica does
# (SBUS_KEEPALIVE_TIMEOUT, 5 s by default), so it is nginx that closes them and never
# sends a request down a connection the replica is closing at that moment.
UPSTREAM_KEEPALIVE_S=4
HEALTH_TIMEOUT_S=${SBUS_CLUSTER_TIMEOUT:-60}
# A replica stopping gracefully serves on for SBUS_SHUTDOWN_DELAY, then drains for up to
# SBUS_DRAIN_TIMEOUT (docs/operations.md section 6): it is given both, and 10 s more,
# before SIGKILL.
STOP_TIMEOUT_S=$(awk -v d="${SBUS_SHUTDOWN_DELAY:-0}" -v t="${SBUS_DRAIN_TIMEOUT:-10}" \
  'BEGIN { s = d + t + 10; print (s == int(s)) ? s : int(s) + 1 }')

usage() {
  cat <<EOF
Usage:
  $PROG up [--store pg|redis] [--replicas N] [--port P]
  $PROG down
  $PROG restart [I]
  $PROG status

A local S-Bus cluster on loopback: a store, N replicas of \`sbus serve\` in open mode
(one worker each, each on its own free loopback port) and nginx in front of them.

  up       installs nginx and the store from Debian's packages when they are missing
           (apt-get; needs root), starts the store (PostgreSQL by default, migrated with
           \`sbus migrate\`; or Redis with maxmemory-policy noeviction), the replicas and
           nginx, waits until GET /admin/health answers 200 through nginx, and prints
           "S-Bus load balancer: http://127.0.0.1:PORT" as its last line.
             --store pg|redis   the store (default pg)
             --replicas N       how many replicas (default 3, at most 32)
             --port P           nginx's port on 127.0.0.1 (default $DEFAULT_PORT)
           Fails with "already up" when the cluster of this state directory runs.
  down     stops exactly the processes \`up\` started and removes the state directory
           (harmless when nothing is up).
  restart  rolling restart: each replica in turn (or only replica I, 1-based) gets
           SIGTERM (it finishes its requests in flight, see SBUS_DRAIN_TIMEOUT), is
           waited for, started again on its port and waited for until healthy, then
           the next one. nginx keeps serving through the others.
  status   the load balancer's address and each process, running or not.

State (generated nginx.conf, pid files, one log per process under logs/, the store's
data) lives in \$SBUS_CLUSTER_DIR, else \$XDG_STATE_HOME/sbus-cluster when XDG_STATE_HOME
is set, else .cluster/ in the repository. The data is throwaway: \`down\` deletes it.

The replicas run \`sbus\` from the repository's .venv (make install), or the \`sbus\` on
PATH when there is no .venv. Every SBUS_* variable of the environment reaches them
(SBUS_ADMIN_ENABLED=1, SBUS_SESSION_TTL, ...), except the ones the cluster sets itself:
SBUS_STORE, SBUS_HOST, SBUS_PORT, SBUS_WORKERS and SBUS_AUTH (open). On PostgreSQL
each replica keeps 240/N connections (at most 32) unless SBUS_PG_POOL_SIZE is set.
SBUS_CLUSTER_TIMEOUT (default 60) bounds each wait for a process to become healthy.
EOF
}

die() {
  echo "cluster: $*" >&2
  exit 1
}

say() {
  echo "cluster: $*"
}

# --- state ---------------------------------------------------------------------------

if [ -n "${SBUS_CLUSTER_DIR:-}" ]; then
  STATE=$SBUS_CLUSTER_DIR
elif [ -n "${XDG_STATE_HOME:-}" ]; then
  STATE=$XDG_STATE_HOME/sbus-cluster
else
  STATE=$REPO/.cluster
fi
LOGS=$STATE/logs
PIDS=$STATE/pids
CONF=$STATE/cluster.env

# Each recorded process is checked against its command line before a signal is sent, so
# a pid the kernel has since handed to another program is never touched.
pid_of() {
  local name=$1
  [ -f "$PIDS/$name.pid" ] || return 1
  local pid
  pid=$(cat "$PIDS/$name.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  local marker cmdline
  marker=$(cat "$PIDS/$name.marker" 2>/dev/null || true)
  # (The process may exit between any two of these reads.)
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [ -n "$cmdline" ] || return 1
  if [ -n "$marker" ] && [[ $cmdline != *"$marker"* ]]; then
    return 1
  fi
  # A zombie (exited, not yet reaped) is not running.
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

record_pid() {
  # name pid marker
  echo "$2" >"$PIDS/$1.pid"
  echo "$3" >"$PIDS/$1.marker"
  # Until the background child has exec'd its program, its command line is still this
  # script's (the forked shell), so pid_of would call it gone. Wait (a bounded while)
  # until the command line shows the marker or the process has really exited.
  local tries=0 cmdline
  while [ "$tries" -lt 100 ]; do
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$2/cmdline") || return 0
    [[ $cmdline != *"$3"* ]] || return 0
    [ "$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null)" != Z ] || return 0
    sleep 0.05
    tries=$((tries + 1))
  done
}

running() {
  pid_of "$1" >/dev/null
}

# Stop one recorded process: SIGTERM, up to STOP_TIMEOUT_S for it to exit, then SIGKILL.
stop_process() {
  local name=$1 pid
  pid=$(pid_of "$name") || {
    rm -f "$PIDS/$name.pid" "$PIDS/$name.marker"
    return 0
  }
  kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
      echo "cluster: $name ignored SIGTERM for ${STOP_TIMEOUT_S}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$PIDS/$name.pid" "$PIDS/$name.marker"
}

load_conf() {
  [ -f "$CONF" ] || return 1
  # shellcheck source=/dev/null
  . "$CONF"
}

# Every process `up` records, in the order `down` stops them: the front first, the store
# last.
recorded_names() {
  local names=(nginx) i
  for ((i = 1; i <= ${REPLICAS:-0}; i++)); do names+=("replica-$i"); done
  names+=(redis postgres)
  echo "${names[@]}"
}

any_running() {
  local name
  for name in $(recorded_names); do
    if [ "$name" = postgres ]; then
      pg_running && return 0
    elif running "$name"; then
      return 0
    fi
  done
  return 1
}

# --- helpers -------------------------------------------------------------------------

# Whether $1 is a whole number from $2 to $3.
in_range() {
  [[ $1 =~ ^[0-9]{1,6}$ ]] || return 1
  [ "$((10#$1))" -ge "$2" ] && [ "$((10#$1))" -le "$3" ]
}

# N distinct free loopback ports, one per line: all bound at once, so none repeats.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

port_taken() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
# As nginx binds: a connection of an earlier run lingering in TIME_WAIT does not count.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
finally:
    s.close()
sys.exit(1)
PY
}

# The status of GET URL, or 000 when nothing answered; never through a proxy.
http_status() {
  python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=2) as resp:
        print(resp.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print("000")
PY
}

sbus_command() {
  if [ -x "$REPO/.venv/bin/sbus" ]; then
    echo "$REPO/.venv/bin/sbus"
  elif command -v sbus >/dev/null 2>&1; then
    command -v sbus
  else
    die "no sbus command: run \`make install\` in $REPO (or put sbus on PATH)"
  fi
}

pg_bin() {
  local dirs=(/usr/lib/postgresql/*/bin)
  [ -d "${dirs[0]}" ] || return 0
  printf '%s\n' "${dirs[@]}" | sort -V | tail -1
}

# PostgreSQL refuses to run as root: as root it runs as the postgres user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_running() {
  [ -n "${PGDATA_DIR:-}" ] && [ -f "$PGDATA_DIR/postmaster.pid" ] || return 1
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1
}

fail_with_log() {
  # name log...: say which process failed and show the end of its logs
  local name=$1 log
  shift
  for log in "$@"; do
    echo "cluster: $name failed; the end of $log:" >&2
    tail -n 30 "$log" >&2 2>/dev/null || echo "  (no log)" >&2
  done
  return 1
}

# Wait until URL answers 200 while process NAME runs; on failure show LOG...
wait_healthy() {
  local name=$1 url=$2 deadline status=000
  shift 2
  deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! running "$name"; then
      echo "cluster: $name exited before it was healthy" >&2
      fail_with_log "$name" "$@"
      return 1
    fi
    status=$(http_status "$url")
    [ "$status" = 200 ] && return 0
    sleep 0.2
  done
  echo "cluster: $name: GET $url did not answer 200 within ${HEALTH_TIMEOUT_S}s (last: $status)" >&2
  fail_with_log "$name" "$@"
}

# --- installing ----------------------------------------------------------------------

# The service processes Debian's packages start on their own (nginx on port 80, Redis
# on 6379, the postgresql package's cluster), told apart from anything else by their
# command lines; one per line as "pid cmdline".
package_services() {
  pgrep -a -x 'nginx|redis-server|postgres' 2>/dev/null |
    grep -E 'nginx: master process /usr/sbin/nginx( -g|$)|redis-server 127\.0\.0\.1:6379|config_file=/etc/postgresql/' |
    sort || true
}

# Install Debian packages, leaving no service running that the install started. A
# policy-rc.d that refuses every start is put in place for the install when none exists,
# and a package service that appeared during the install anyway is stopped. One the user
# ran before is left alone.
apt_install() {
  [ "$(id -u)" = 0 ] || die "$* missing; install with: sudo apt-get install -y $*"
  local before after pid policy=/usr/sbin/policy-rc.d added_policy="" log
  log=$(mktemp "${TMPDIR:-/tmp}/sbus-cluster-apt.XXXXXX")
  before=$(package_services)
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# cluster.sh: no service starts during its apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  say "installing $* (apt-get)"
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@"
  } >"$log" 2>&1 || rc=$?
  [ -z "$added_policy" ] || rm -f "$policy"
  after=$(package_services)
  for pid in $(comm -13 <(echo "$before") <(echo "$after") | awk '{print $1}'); do
    say "stopping the service the install started: $(ps -o args= -p "$pid" 2>/dev/null || true)"
    kill -TERM "$pid" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "apt-get install $* failed"
  fi
  rm -f "$log"
}

ensure_packages() {
  local store=$1 need=()
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need+=(nginx)
  if [ "$store" = pg ]; then
    local bin
    bin=$(pg_bin || true)
    [ -n "$bin" ] && [ -x "$bin/initdb" ] || need+=(postgresql)
  else
    command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  fi
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
}

nginx_command() {
  if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; else command -v nginx; fi
}

# --- starting ------------------------------------------------------------------------

start_postgres() {
  PGBIN=$(pg_bin)
  PG_PORT=$STORE_PORT
  local log=$LOGS/postgres.log
  # The data directory (and the server's log) sit in the state directory when the
  # postgres user can reach it; otherwise (a state directory under a private parent) in
  # a temporary directory of their own, linked from the state directory and removed by
  # `down` all the same.
  if [ "$(id -u)" != 0 ] || runuser -u postgres -- test -x "$LOGS" 2>/dev/null; then
    PGDATA_DIR=$STATE/pg
    if [ "$(id -u)" = 0 ]; then
      mkdir -p "$PGDATA_DIR"
      chown postgres:postgres "$PGDATA_DIR"
      touch "$log"
      chown postgres "$log"
    fi
  else
    PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/sbus-cluster-pg.XXXXXX")
    chown postgres:postgres "$PG_TMP"
    ln -s "$PG_TMP" "$STATE/pg"
    PGDATA_DIR=$PG_TMP/data
    runuser -u postgres -- touch "$PG_TMP/postgres.log"
    ln -s "$PG_TMP/postgres.log" "$log"
  fi
  save_conf
  say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres -A trust -E UTF8 --no-sync >>"$log" 2>&1 ||
    fail_with_log postgres "$log" || return 1
  # fsync off: the data is throwaway (`down` deletes it). Commits stay atomic and
  # isolated; only a crash of PostgreSQL itself (or of the machine) could lose the last
  # ones, and the replicas log a warning saying so.
  local out
  if ! out=$(as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$(readlink -f "$log")" -w \
    -t "$HEALTH_TIMEOUT_S" -o "-p $PG_PORT -k $PGDATA_DIR -c listen_addresses=127.0.0.1 \
-c fsync=off -c synchronous_commit=off -c max_connections=300" start 2>&1); then
    echo "$out" >&2
    fail_with_log postgres "$log"
    return 1
  fi
  STORE_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/postgres"
  save_conf
  say "migrating the schema (sbus migrate)"
  SBUS_STORE=$STORE_URL "$SBUS" migrate >"$LOGS/migrate.log" 2>&1 ||
    fail_with_log "sbus migrate" "$LOGS/migrate.log" || return 1
}

start_redis() {
  REDIS_PORT=$STORE_PORT
  mkdir -p "$STATE/redis"
  say "starting Redis on 127.0.0.1:$REDIS_PORT"
  local log=$LOGS/redis.log
  nohup redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" \
    --save '' --appendonly no --maxmemory-policy noeviction \
    >"$log" 2>&1 </dev/null &
  # Redis rewrites its command line once started ("redis-server 127.0.0.1:PORT").
  record_pid redis $! "redis-server"
  STORE_URL="redis://127.0.0.1:$REDIS_PORT/0"
  save_conf
  local deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    running redis || { fail_with_log redis "$log"; return 1; }
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "cluster: redis never answered PING within ${HEALTH_TIMEOUT_S}s" >&2
  fail_with_log redis "$log"
}

# The environment of a replica: the caller's, SBUS_* included, with the settings the
# cluster owns replaced.
start_replica() {
  local i=$1 port=$2
  local log=$LOGS/replica-$i.log
  echo "--- started $(date -u +%FT%TZ) on 127.0.0.1:$port" >>"$log"
  # PostgreSQL allows 300 connections here; the replicas share 240 of them (at most 32
  # each), unless SBUS_PG_POOL_SIZE says otherwise.
  local pool=$((240 / REPLICAS))
  [ "$pool" -le 32 ] || pool=32
  SBUS_PG_POOL_SIZE=${SBUS_PG_POOL_SIZE:-$pool} \
    SBUS_STORE=$STORE_URL SBUS_HOST=127.0.0.1 SBUS_PORT=$port SBUS_WORKERS=1 SBUS_AUTH=open \
    nohup "$SBUS" serve >>"$log" 2>&1 </dev/null &
  record_pid "replica-$i" $! "$SBUS serve"
}

replica_port() {
  local var=REPLICA_PORT_$1
  echo "${!var}"
}

write_nginx_conf() {
  local user_line="" i
  # As root the workers run as nobody (they open nothing: logs are opened by the master,
  # and bodies and responses stay in memory, see below).
  [ "$(id -u)" != 0 ] || user_line="user nobody nogroup;"
  mkdir -p "$STATE/nginx/tmp"
  {
    cat <<EOF
# Generated by $PROG; rewritten by every \`up\`.
$user_line
worker_processes 1;
pid $STATE/nginx/nginx.pid;
error_log $LOGS/nginx-error.log notice;

events {
  worker_connections 1024;
}

http {
  # One line per request, with the replica that answered it (\$upstream_addr; several,
  # comma-separated, when nginx tried more than one) and the agent the SDK names in
  # X-Agent-Id.
  log_format sbus '\$remote_addr [\$time_iso8601] "\$request" \$status \$body_bytes_sent '
                  'agent="\$http_x_agent_id" upstream=\$upstream_addr '
                  'upstream_status=\$upstream_status rt=\$request_time '
                  'urt=\$upstream_response_time';
  access_log $LOGS/nginx-access.log sbus;

  # Bodies up to 2 MiB reach the bus, which answers an oversized one itself
  # (413 RequestTooLarge past SBUS_MAX_BODY, 1 MiB by default). Bodies and answers are
  # held in memory, never in temporary files.
  client_max_body_size 2m;
  client_body_buffer_size 2m;
  proxy_max_temp_file_size 0;
  client_body_temp_path $STATE/nginx/tmp/body;
  proxy_temp_path $STATE/nginx/tmp/proxy;
  fastcgi_temp_path $STATE/nginx/tmp/fastcgi;
  uwsgi_temp_path $STATE/nginx/tmp/uwsgi;
  scgi_temp_path $STATE/nginx/tmp/scgi;

  upstream sbus {
    # A replica that refused a connection is left out for 2 s, then tried again.
EOF
    for ((i = 1; i <= REPLICAS; i++)); do
      echo "    server 127.0.0.1:$(replica_port "$i") max_fails=1 fail_timeout=2s;"
    done
    cat <<EOF
    keepalive 32;
    keepalive_timeout ${UPSTREAM_KEEPALIVE_S}s;
  }

  server {
    listen 127.0.0.1:$PORT;
    # Also the Host a request without one is forwarded with.
    server_name 127.0.0.1 localhost;

    # Forwarded to every replica: open mode refuses a Host that is not the bus's own
    # (403 HostNotAllowed), and \$host is the name the client used.
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    # HTTP/1.1 with an empty Connection header keeps the upstream connections alive.
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_connect_timeout 2s;
    # nginx's default: a request that could not be sent (connection refused, reset
    # before sending) goes to the next replica; once a POST has been sent it is never
    # resent (it may have been applied), and the client gets 502. The SDK resends it
    # with its Idempotency-Key.
    proxy_next_upstream error timeout;

    location / {
      proxy_pass http://sbus;
    }

    # The change stream: events go out as they come (the bus also says so with
    # X-Accel-Buffering: no), and a quiet stream is not cut (heartbeats every 15 s).
    location = /watch {
      proxy_pass http://sbus;
      proxy_buffering off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
  } >"$STATE/nginx.conf"
}

start_nginx() {
  local nginx
  nginx=$(nginx_command)
  write_nginx_conf
  # nginx's own messages before it has read its configuration go to -e; what it prints
  # to stdout and stderr to nginx.log.
  "$nginx" -t -q -e "$LOGS/nginx-error.log" -p "$STATE/nginx" -c "$STATE/nginx.conf" \
    >>"$LOGS/nginx.log" 2>&1 ||
    fail_with_log "nginx -t" "$LOGS/nginx.log" "$LOGS/nginx-error.log" || return 1
  say "starting nginx on 127.0.0.1:$PORT"
  nohup "$nginx" -e "$LOGS/nginx-error.log" -p "$STATE/nginx" -c "$STATE/nginx.conf" \
    -g 'daemon off;' >>"$LOGS/nginx.log" 2>&1 </dev/null &
  record_pid nginx $! "$STATE/nginx.conf"
}

save_conf() {
  {
    echo "STORE=$STORE"
    echo "REPLICAS=$REPLICAS"
    echo "PORT=$PORT"
    echo "SBUS=$SBUS"
    echo "STORE_URL=${STORE_URL:-}"
    echo "PGBIN=${PGBIN:-}"
    echo "PGDATA_DIR=${PGDATA_DIR:-}"
    echo "PG_TMP=${PG_TMP:-}"
    local i
    for ((i = 1; i <= REPLICAS; i++)); do
      echo "REPLICA_PORT_$i=$(replica_port "$i")"
    done
  } >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

# --- stopping ------------------------------------------------------------------------

stop_all() {
  local name
  for name in $(recorded_names); do
    if [ "$name" = postgres ]; then
      if pg_running; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$STOP_TIMEOUT_S" stop >/dev/null 2>&1 ||
          as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1 || true
      fi
    else
      stop_process "$name"
    fi
  done
}

remove_data() {
  [ -z "${PG_TMP:-}" ] || rm -rf "$PG_TMP"
  rm -rf "$STATE/pg" "$STATE/redis" "$STATE/nginx" "$PIDS" "$CONF"
}

# --- commands ------------------------------------------------------------------------

cmd_up() {
  STORE=pg
  REPLICAS=3
  PORT=$DEFAULT_PORT
  while [ $# -gt 0 ]; do
    case $1 in
      --store)
        [ $# -ge 2 ] || die "--store needs pg or redis"
        STORE=$2
        shift 2
        ;;
      --store=*) STORE=${1#*=}; shift ;;
      --replicas)
        [ $# -ge 2 ] || die "--replicas needs a number"
        REPLICAS=$2
        shift 2
        ;;
      --replicas=*) REPLICAS=${1#*=}; shift ;;
      --port)
        [ $# -ge 2 ] || die "--port needs a number"
        PORT=$2
        shift 2
        ;;
      --port=*) PORT=${1#*=}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown option for up: $1 (see --help)" ;;
    esac
  done
  case $STORE in
    pg | redis) ;;
    *) die "--store must be pg or redis, not '$STORE'" ;;
  esac
  in_range "$REPLICAS" 1 32 || die "--replicas must be a number from 1 to 32, not '$REPLICAS'"
  in_range "$PORT" 1 65535 || die "--port must be a number from 1 to 65535, not '$PORT'"

  if [ -f "$CONF" ]; then
    (
      load_conf
      any_running
    ) && die "already up: a cluster of $STATE is running (run \`$PROG down\` first)"
    # What a crashed or killed run left behind: nothing of it runs any more.
    (
      load_conf
      remove_data
    )
  fi
  port_taken "$PORT" && die "port $PORT on 127.0.0.1 is taken; choose another with --port"

  SBUS=$(sbus_command)
  ensure_packages "$STORE"
  # The logs a failed `up` left are replaced by this run's.
  rm -rf "$LOGS"
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  local i ports
  mapfile -t ports < <(free_ports $((REPLICAS + 1)))
  [ ${#ports[@]} -eq $((REPLICAS + 1)) ] || die "could not find $((REPLICAS + 1)) free ports"
  STORE_PORT=${ports[0]}
  for ((i = 1; i <= REPLICAS; i++)); do
    printf -v "REPLICA_PORT_$i" '%s' "${ports[$i]}"
  done
  save_conf
  say "state in $STATE; logs in $LOGS"

  if ! start_cluster; then
    echo "cluster: stopping what was started; logs kept in $LOGS" >&2
    stop_all
    remove_data
    exit 1
  fi
  echo "S-Bus load balancer: http://127.0.0.1:$PORT"
}

start_cluster() {
  if [ "$STORE" = pg ]; then
    start_postgres || return 1
  else
    start_redis || return 1
  fi
  local i
  say "starting $REPLICAS replicas ($SBUS serve)"
  for ((i = 1; i <= REPLICAS; i++)); do
    start_replica "$i" "$(replica_port "$i")"
  done
  for ((i = 1; i <= REPLICAS; i++)); do
    wait_healthy "replica-$i" "http://127.0.0.1:$(replica_port "$i")/admin/health" \
      "$LOGS/replica-$i.log" || return 1
    say "replica-$i healthy on 127.0.0.1:$(replica_port "$i")"
  done
  start_nginx || return 1
  wait_healthy nginx "http://127.0.0.1:$PORT/admin/health" "$LOGS/nginx.log" \
    "$LOGS/nginx-error.log" || return 1
}

cmd_down() {
  [ $# -eq 0 ] || die "down takes no arguments"
  if ! load_conf; then
    say "nothing is up (no cluster state in $STATE)"
    rm -rf "$STATE"
    return 0
  fi
  if any_running; then
    say "stopping nginx, $REPLICAS replicas and the store"
  else
    say "nothing was running; removing the state left in $STATE"
  fi
  stop_all
  remove_data
  rm -rf "$STATE"
  say "down"
}

cmd_restart() {
  [ $# -le 1 ] || die "restart takes at most one replica number"
  load_conf || die "nothing is up (no cluster state in $STATE)"
  local which=() i
  if [ $# -eq 1 ]; then
    in_range "$1" 1 "$REPLICAS" || die "no replica '$1': the cluster has replicas 1 to $REPLICAS"
    which=("$1")
  else
    for ((i = 1; i <= REPLICAS; i++)); do which+=("$i"); done
  fi
  for i in "${which[@]}"; do
    local port
    port=$(replica_port "$i")
    say "restarting replica-$i (127.0.0.1:$port)"
    stop_process "replica-$i"
    # A drain that had to cut requests says so in the replica's last line (exit 4).
    if tail -n 2 "$LOGS/replica-$i.log" | grep -q "SBUS_DRAIN_TIMEOUT=.* cut"; then
      say "replica-$i: $(tail -n 2 "$LOGS/replica-$i.log" | grep "SBUS_DRAIN_TIMEOUT=" | tail -n 1)"
    fi
    start_replica "$i" "$port"
    wait_healthy "replica-$i" "http://127.0.0.1:$port/admin/health" "$LOGS/replica-$i.log" ||
      die "replica-$i did not come back; the others still serve"
    say "replica-$i healthy again"
  done
}

cmd_status() {
  load_conf || {
    say "nothing is up (no cluster state in $STATE)"
    return 3
  }
  local name state all=0
  for name in $(recorded_names); do
    if [ "$name" = postgres ]; then
      [ "$STORE" = pg ] || continue
      pg_running && state=running || state=stopped
    else
      [ "$name" != redis ] || [ "$STORE" = redis ] || continue
      running "$name" && state="running (pid $(pid_of "$name"))" || state=stopped
    fi
    [ "${state%% *}" = running ] || all=1
    printf '%-12s %s\n' "$name" "$state"
  done
  echo "S-Bus load balancer: http://127.0.0.1:$PORT"
  return $all
}

main() {
  [ $# -ge 1 ] || {
    usage >&2
    exit 2
  }
  local cmd=$1
  shift
  case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    restart) cmd_restart "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *)
      echo "cluster: unknown command '$cmd'" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
exit
}
