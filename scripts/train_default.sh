#!/usr/bin/env bash
# The recipe of the shipped default model (see its MODEL_CARD.md): AR start -> block diffusion.
#
#   stage 1  AR, from the previous AR baseline, constant learning rate (the "stable" phase of
#            WSD); stopped by hand when stage 2 should start (it checkpoints every ~40 s and
#            resumes when re-run)
#   stage 2  two runs from stage 1's weights, on the same batches (same seed) and the same token
#            budget, each with its own cosine decay:
#              runs/stage2-bd  block diffusion, block size 1 -> 2 -> 4, token shift  (the model)
#              runs/stage2-ar  the AR baseline it is compared with
#
# Every run resumes from runs/<name>/train_state when started again. Usage:
#   scripts/train_default.sh stage1      # in the background: nohup ... &
#   scripts/train_default.sh stage2      # after stopping stage 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

case "${1:-}" in
  stage1)
    exec "$PY" -m unmask train --config configs/stage1-ar.json --out runs/stage1-ar --quiet ;;
  stage2)
    # freeze stage 1 as a model directory: both stage-2 runs start from exactly these weights
    "$PY" -m unmask train --config configs/stage1-ar.json --out runs/stage1-ar --export-only --quiet
    nohup "$PY" -m unmask train --config configs/stage2-bd.json --out runs/stage2-bd --quiet \
      > runs/stage2-bd.log 2>&1 &
    bd=$!
    nohup "$PY" -m unmask train --config configs/stage2-ar.json --out runs/stage2-ar --quiet \
      > runs/stage2-ar.log 2>&1 &
    ar=$!
    # the AR run is cheaper and ends first: then the block-diffusion run resumes on both cores
    nohup bash -c "while kill -0 $ar 2>/dev/null; do sleep 20; done
      kill $bd 2>/dev/null; sleep 5
      exec $PY -m unmask train --config configs/stage2-bd.json --out runs/stage2-bd --quiet \
        --num-threads 2" >> runs/stage2-bd.log 2>&1 &
    echo "stage 2 started: runs/stage2-bd, runs/stage2-ar" ;;
  *)
    echo "usage: $0 stage1|stage2" >&2; exit 2 ;;
esac
