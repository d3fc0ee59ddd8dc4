#!/usr/bin/env bash
# Run a command with throwaway PostgreSQL and Redis servers on free loopback ports
# (and etcd installed for the load tests' peer comparison, which starts its own, and
# Chromium for the browser tests).
#
#   scripts/with-services.sh .venv/bin/pytest ...
#
# Installs the servers with apt when they are missing (the machines run as root and
# have no systemd), starts them in a temporary directory, exports
# SBUS_TEST_POSTGRES_URL and SBUS_TEST_REDIS_URL for the command, and stops them and
# removes the directory whatever happens. The command's exit code is ours.
# It also starts a Redis Cluster of 3 masters and 3 replicas (one per master) and exports
# SBUS_TEST_REDIS_CLUSTER_URL (redis+cluster://127.0.0.1:P1,...); each node's
# configuration file is redis.conf in its own directory, so a test that kills a node can
# start it again with `redis-server <that file>` (INFO server names it).
set -euo pipefail

need_install=()
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || need_install+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
# etcd is only a peer the load tests compare against (loadtest/peers.py), installed here
# with the others so one apt run serves the whole suite.
command -v etcd >/dev/null 2>&1 || need_install+=(etcd-server)
# The browser tests (tests/browser) drive Debian's Chromium through Playwright; it is
# installed without its recommends (printing, sound and power daemons a headless
# browser has no use for), with the fonts the screenshots are drawn in.
browser=()
command -v chromium >/dev/null 2>&1 || browser=(chromium fonts-liberation)
if [ ${#need_install[@]} -gt 0 ] || [ ${#browser[@]} -gt 0 ]; then
  echo "with-services: installing ${need_install[*]} ${browser[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  if [ ${#need_install[@]} -gt 0 ]; then
    apt-get install -y -qq "${need_install[@]}" >/dev/null
  fi
  if [ ${#browser[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null
  fi
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
# Debian's package starts a system Redis on 6379 where it can; ours is separate.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

SVC=$(mktemp -d /tmp/sbus-svc.XXXXXX)
chown postgres:postgres "$SVC"
PG_PORT=$(free_port)
REDIS_PORT=$(free_port)

CLUSTER_PORTS=()
for _ in 1 2 3 4 5 6; do CLUSTER_PORTS+=("$(free_port)"); done

cleanup() {
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SVC/pg" -m immediate -w stop >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  for port in "${CLUSTER_PORTS[@]}"; do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  # a node a test stopped (SIGSTOP) or restarted answers no SHUTDOWN: end it by its pid
  for pidfile in "$SVC"/cluster/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pid" ] && kill -CONT "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$SVC"
}
trap cleanup EXIT INT TERM

runuser -u postgres -- "$PGBIN/initdb" -D "$SVC/pg" -U postgres -A trust -E UTF8 --no-sync >/dev/null
# fsync and synchronous_commit are off for test speed only; production needs them on.
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SVC/pg" -l "$SVC/pg.log" -w -t 60 -o \
  "-p $PG_PORT -k $SVC -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" \
  start >/dev/null
mkdir -p "$SVC/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
  --pidfile "$SVC/redis/redis.pid" --dir "$SVC/redis" --logfile "$SVC/redis/redis.log" \
  --save '' --appendonly no --maxmemory-policy noeviction
# Wait for PONG; a server that never answers stops the run here (the tests would
# otherwise fail one by one, far from the cause).
redis_up=
for _ in $(seq 50); do
  if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then redis_up=1; break; fi
  sleep 0.1
done
if [ -z "$redis_up" ]; then
  echo "with-services: redis-server on $REDIS_PORT never answered PING" >&2
  tail -n 20 "$SVC/redis/redis.log" >&2 2>/dev/null || true
  exit 1
fi

# The Redis Cluster: each node's bus port is chosen free too (port + 10000 may be taken,
# or past 65535). A short node timeout makes a failover take a few seconds, not 15+.
cluster_nodes=()
for port in "${CLUSTER_PORTS[@]}"; do
  dir="$SVC/cluster/$port"
  mkdir -p "$dir"
  cat >"$dir/redis.conf" <<CONF
port $port
bind 127.0.0.1
cluster-enabled yes
cluster-port $(free_port)
cluster-config-file $dir/nodes.conf
cluster-node-timeout 2000
dir $dir
pidfile $dir/redis.pid
logfile $dir/redis.log
daemonize yes
save ""
appendonly no
maxmemory-policy noeviction
CONF
  redis-server "$dir/redis.conf"
  cluster_nodes+=("127.0.0.1:$port")
done
for port in "${CLUSTER_PORTS[@]}"; do
  for _ in $(seq 50); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
done
if ! redis-cli --cluster create "${cluster_nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >"$SVC/cluster/create.log" 2>&1; then
  echo "with-services: redis-cli --cluster create failed" >&2
  tail -n 20 "$SVC/cluster/create.log" >&2
  exit 1
fi
# Ready when every node says cluster_state:ok and each master has its replica attached.
cluster_up=
for _ in $(seq 200); do
  ok=0
  for port in "${CLUSTER_PORTS[@]}"; do
    redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
  done
  linked=$(redis-cli -p "${CLUSTER_PORTS[0]}" cluster nodes 2>/dev/null | grep -c ' slave ' || true)
  if [ "$ok" = 6 ] && [ "$linked" = 3 ]; then cluster_up=1; break; fi
  sleep 0.1
done
if [ -z "$cluster_up" ]; then
  echo "with-services: the Redis Cluster never reached cluster_state:ok" >&2
  exit 1
fi
cluster_url=$(IFS=,; echo "${cluster_nodes[*]}")

export SBUS_TEST_REDIS_CLUSTER_URL="redis+cluster://$cluster_url"
export SBUS_TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/postgres"
export SBUS_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export SBUS_TEST_PGBIN="$PGBIN"
echo "with-services: PostgreSQL on $PG_PORT, Redis on $REDIS_PORT, Redis Cluster on $cluster_url" >&2
set +e
"$@"
status=$?
set -e
exit $status
