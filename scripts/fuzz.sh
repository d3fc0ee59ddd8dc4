#!/usr/bin/env bash
# Fuzz a real `sbus serve` process with the Schemathesis CLI: every operation of the
# OpenAPI document, all four phases (examples, coverage, fuzzing, stateful), against
# three servers in turn: a default one (no settings), open mode with the admin endpoints
# and test hooks on, and token mode with an all-rights token. The only check is "no 5xx"
# (and no traceback in the server's log): every other answer is a 4xx problem or a success.
#
#   scripts/fuzz.sh [STORE_URL]        (default: a throwaway SQLite file)
#   FUZZ_MAX_EXAMPLES=50 FUZZ_MAX_TIME=300 scripts/fuzz.sh
#
# `make fuzz` runs it over SQLite; `scripts/with-services.sh scripts/fuzz.sh
# "$SBUS_TEST_POSTGRES_URL"` over PostgreSQL. Exit code: non-zero if any run found a
# failure. Reports (JUnit XML) land in $FUZZ_REPORT_DIR (default: a temp dir, printed).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/.venv/bin}
WORK=$(mktemp -d /tmp/sbus-fuzz.XXXXXX)
STORE=${1:-sqlite:///$WORK/fuzz.db}
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-30}
MAX_TIME=${FUZZ_MAX_TIME:-240}
REPORTS=${FUZZ_REPORT_DIR:-$WORK/reports}
mkdir -p "$REPORTS"
SECRET=fuzz-secret-fuzz-secret-fuzz-secret-0123
SERVER_PID=

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap 'stop_server; rm -rf "$WORK"' EXIT INT TERM

wait_ready() {
  for _ in $(seq 100); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "fuzz: the server exited before it was ready:" >&2
      tail -n 20 "$WORK"/*.log >&2
      return 1
    fi
    curl -sf "http://127.0.0.1:$1/admin/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "fuzz: the server on port $1 never became ready" >&2
  return 1
}

# run_mode NAME [schemathesis header args...]; the server's env is set by the caller.
run_mode() {
  local name=$1 port=$2
  shift 2
  echo "fuzz: $name mode, store $STORE, up to $MAX_EXAMPLES examples per operation, ${MAX_TIME}s" >&2
  set +e
  (cd "$WORK" && "$BIN/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
    --checks not_a_server_error \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" \
    --workers 1 --request-timeout 10 --continue-on-failure \
    --suppress-health-check all \
    --report junit --report-dir "$REPORTS/$name" \
    "$@")  # run from the work dir: the CLI leaves a .schemathesis/ cache where it runs
  local status=$?
  set -e
  return $status
}

failed=0
case "$STORE" in
  postgresql*) "$BIN/sbus" migrate --store "$STORE" ;;
esac

# fuzz_server NAME [VAR=value ...] -- [schemathesis args...]: start `sbus serve` with
# the given settings on a free port, fuzz it, stop it, and fail on a logged traceback.
fuzz_server() {
  local name=$1 port settings=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do settings+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  port=$(free_port)
  env SBUS_STORE="$STORE" SBUS_PORT="$port" "${settings[@]}" \
    "$BIN/sbus" serve >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  wait_ready "$port" || { failed=1; stop_server; return; }
  run_mode "$name" "$port" "$@" || failed=1
  stop_server
  if grep -q "Traceback" "$WORK/$name.log"; then
    echo "fuzz: the $name server logged a traceback:" >&2
    grep -n -m3 -A20 "Traceback" "$WORK/$name.log" >&2 || true
    failed=1
  fi
}

# 1. A default server: no settings but the store and the port.
fuzz_server default
# 2. Open mode with the admin endpoints and the test hooks on.
fuzz_server open SBUS_ADMIN_ENABLED=1 SBUS_TEST_HOOKS=1
# 3. Token mode with a token holding every right.
TOKEN=$(SBUS_SECRET=$SECRET "$BIN/sbus" token issue --agent fuzzer \
  --allow 'read,write,create,delete,mandate,admin:**' --ttl 1h)
fuzz_server token SBUS_AUTH=token SBUS_TEST_HOOKS=1 SBUS_SECRET=$SECRET -- \
  -H "Authorization: Bearer $TOKEN"

if [ -z "${FUZZ_REPORT_DIR:-}" ]; then
  # Keep the reports: the work dir is removed on exit.
  KEEP=$(mktemp -d /tmp/sbus-fuzz-reports.XXXXXX)
  cp -r "$REPORTS"/. "$KEEP"/
  echo "fuzz: reports in $KEEP" >&2
fi
[ $failed -eq 0 ] && echo "fuzz: no server errors in any mode" >&2
exit $failed
