#!/usr/bin/env bash
# Same-machine A/B timing of two ferromerge installs (e.g. before and after a refactor), alternating runs so drift in
# the machine's load hits both alike, and checking that both wrote the same bytes.
#   scripts/ab_speed.sh OLD_FERROMERGE NEW_FERROMERGE      (paths of the two `ferromerge` executables)
# Environment: METHODS (default "ties dare_ties linear breadcrumbs della sce"), REPS (3), THREADS (2),
# WORK (/tmp/ferromerge-ab: a bf16 family of base + 3, hidden 1024, 6 layers, vocab 8192, 168 MB a model).
set -euo pipefail
OLD=$1 NEW=$2
W=${WORK:-/tmp/ferromerge-ab}
PY="$(dirname "$NEW")/python"
if [ ! -d "$W/base" ]; then
  "$PY" -c "from ferromerge.synth import make_family
make_family('$W', n_finetunes=3, hidden=1024, intermediate=2816, layers=6, vocab=8192, dtype='bfloat16', seed=1)"
fi
for m in ${METHODS:-ties dare_ties linear breadcrumbs della sce}; do
  {
    [ "$m" = linear ] || echo "base_model: $W/base"
    echo "merge_method: $m"
    echo "models:"
    for i in 1 2 3; do
      case $m in
        sce) echo "  - {model: $W/ft$i}" ;;
        linear) echo "  - {model: $W/ft$i, parameters: {weight: 1.0}}" ;;
        *) echo "  - {model: $W/ft$i, parameters: {weight: 1.0, density: 0.5}}" ;;
      esac
    done
  } > "$W/$m.yml"
  for rep in $(seq "${REPS:-3}"); do
    for side in old new; do
      exe=$OLD; [ $side = new ] && exe=$NEW
      rm -rf "$W/out-$side"
      s=$(date +%s.%N); "$exe" run "$W/$m.yml" "$W/out-$side" --quiet --threads "${THREADS:-2}"; e=$(date +%s.%N)
      printf '%-12s %s rep %s  %.2f s\n' "$m" $side "$rep" "$(echo "$e - $s" | bc)"
    done
    if cmp -s "$W/out-old/model.safetensors" "$W/out-new/model.safetensors"; then echo "  same bytes"; else echo "  BYTES DIFFER"; fi
  done
done
