#!/usr/bin/env bash
# Reruns every benchmark of docs/benchmarks.md whose ferromerge side needs a quiet machine, reusing mergekit's cached
# runs (mergekit 0.1.5 is a fixed peer; its column keeps the date and load it was measured at). Run it as root (cold
# runs drop the page cache; the 70B-shape proof uses a memory cgroup) from the repository root, with nothing else
# running; it records the load before and after every run.
#   scripts/bench_final.sh                       # about 30 minutes on the 2-core VM (see docs/benchmarks.md)
# Environment: DATA (/work/benchdata: the families and results), FAMILY (the 1.1B family, /work/bench11/family),
# THREADS (2), SPECTRAL_REPS (1), SKIP (space-separated parts to leave out: methods shapes70b spectral).
# Results: $DATA/final-<date>/{methods/methods.md,methods.json,methods.svg; shapes70b.json,.md; spectral.json,.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/benchdata}
FAMILY=${FAMILY:-/work/bench11/family}
THREADS=${THREADS:-2}
OUT="$DATA/final-$(date -u +%Y%m%dT%H%MZ)"
PY=${PYTHON:-python}
mkdir -p "$OUT"
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
echo "load at start: $(cat /proc/loadavg)" | tee "$OUT/load.txt"

# 1. all 20 methods on the 1.1B family, warm and cold, ferromerge only; mergekit's column from the cache
#    (benches/methods.py --no-ferromerge --warm filled it); outputs compared with mergekit's stored samples.
#    The cache of record is $DATA/m-1.1b/mergekit-cache.json (with the stored output samples beside it); without it,
#    docs/mergekit-1.1b-cache.json (a copy, no samples: no output comparison) is used. mergekit methods missing from
#    the cache are not run here: `benches/methods.py --family "$FAMILY" --no-ferromerge --warm --out $DATA/m-1.1b`
#    fills them (about 5 min a method on the quiet VM; --cold adds as much again plus the disk).
if ! skip methods; then
  CACHE=${MERGEKIT_CACHE:-$DATA/m-1.1b/mergekit-cache.json}
  if [ ! -f "$CACHE" ]; then mkdir -p "$(dirname "$CACHE")"; cp docs/mergekit-1.1b-cache.json "$CACHE"; fi
  $PY benches/methods.py --family "$FAMILY" --threads "$THREADS" --no-mergekit --mergekit-cache "$CACHE" \
    --out "$OUT/methods"
fi

# 2. 70B shapes: TIES, DARE-TIES, DELLA cold, unlimited and in a 4 GiB cgroup, SHA-256 compared; the cold read floor.
#    (The family is made once: benches/shapes70b.py make $DATA/f70b; mergekit's runs on it are not repeated.)
if ! skip shapes70b; then
  [ -f "$DATA/f70b/COMPLETE" ] || $PY benches/shapes70b.py make "$DATA/f70b" --layers 1
  $PY benches/shapes70b.py run "$DATA/f70b" --threads "$THREADS" --no-mergekit --json "$OUT/shapes70b.json"
  $PY benches/shapes70b.py table "$OUT/shapes70b.json" > "$OUT/shapes70b.md"
fi

# 3. TSV-M of one 8B-shaped layer against the torch reference (both sides rerun: a ratio within one run).
if ! skip spectral; then
  $PY benches/spectral.py --methods tsv_m --threads "$THREADS" --reps "${SPECTRAL_REPS:-1}" \
    --dir "$DATA/layer8b" --json "$OUT/spectral.json" | tee "$OUT/spectral.md"
fi
echo "load at end: $(cat /proc/loadavg)" | tee -a "$OUT/load.txt"
echo "results in $OUT"
