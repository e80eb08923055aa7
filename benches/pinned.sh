#!/usr/bin/env bash
# Benchmark on a core of its own while the machine does other work (cgroup v1 cpuset; run as root):
#   benches/pinned.sh split &                  # core 0 for benchmarks; every other process moved to the other cores
#   benches/pinned.sh run CMD ARGS...          # run CMD (and its children) on core 0
#   touch /tmp/pinned.stop                     # ends `split` and moves every process back
# Why: on a small machine a benchmark that shares cores with builds and tests measures the load, not the code;
# a pinned core keeps the tool's CPU share near 1 (check it: CPU time over wall time, which methods.py records).
set -euo pipefail
C=/sys/fs/cgroup/cpuset
N=$(nproc --all)
case "${1:-}" in
  split)
    rm -f /tmp/pinned.stop
    for n in bench others; do mkdir -p "$C/$n"; cat "$C/cpuset.mems" > "$C/$n/cpuset.mems"; done
    echo 0 > "$C/bench/cpuset.cpus"
    echo "1-$((N - 1))" > "$C/others/cpuset.cpus"
    while [ ! -e /tmp/pinned.stop ]; do
      # new processes start in the root cpuset (kernel threads stay there: their writes fail)
      for p in $(cat "$C/cgroup.procs"); do echo "$p" > "$C/others/cgroup.procs" 2>/dev/null || true; done
      sleep 2
    done
    for n in bench others; do
      for p in $(cat "$C/$n/cgroup.procs"); do echo "$p" > "$C/cgroup.procs" 2>/dev/null || true; done
    done ;;
  run)
    shift
    echo $$ > "$C/bench/cgroup.procs"
    exec "$@" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
