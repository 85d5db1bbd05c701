#!/usr/bin/env bash
# Seed compatibility: run the nietest daemon for one queue (or all) with given counts.
#   scripts/start_dramatiq_workers.sh [-q master|subtask|subtask_ops|all] [-p PROCESSES] [-t THREADS]
set -euo pipefail
queue=all processes="" threads=""
usage() { sed -n 2,3p "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "q:p:t:h" opt; do
  case "$opt" in
    q) queue=$OPTARG ;;
    p) processes=$OPTARG ;;
    t) threads=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
args=("$queue")
[ -n "$processes" ] && args+=(--processes "$processes")
[ -n "$threads" ] && args+=(--threads "$threads")
python=${NIETEST_PYTHON:-$(command -v python3)}
# Prefer the project's virtualenv when the script runs from a checkout.
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$here/.venv/bin/python" ] && python=${NIETEST_PYTHON:-$here/.venv/bin/python}
exec "$python" -m nietest_daemon.start_dramatiq "${args[@]}"
