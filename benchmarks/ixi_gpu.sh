#!/usr/bin/env bash
# The IXI benchmarks on a GPU machine whose python3 already has torch (CUDA), with privmed's other
# dependencies carried as wheels in .whl and the IXI folder in .devdata/ixi-t1 (see the README's
# Benchmarks). Writes benchmarks/results/ixi_*.md and copies them, with example figures, to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}
ROUNDS=${ROUNDS:-100}
LIMIT=${LIMIT:-420}
nvidia-smi -L
python3 -c "import torch, privmed; print('torch', torch.__version__, torch.cuda.is_available())"
run() {  # task, rows..., then --set
  timeout "$LIMIT" python3 benchmarks/ixi.py --data .devdata/ixi-t1 --workers 5 --rounds "$ROUNDS" "$@" 2>&1 \
    | grep -v -i warn | tail -25
}
run --task segmentation --rows pooled fedavg fedprox cyclic local --out benchmarks/results/ixi_segmentation_gpu.md \
  --set training.device=cuda model.width=16 &
run --task reconstruction --rows pooled fedavg fedprox cyclic local --set training.device=cuda &
wait
cp benchmarks/results/ixi_* "$OUT"/ 2>/dev/null
for t in segmentation reconstruction; do
  for s in pooled fedavg; do
    # the newest run of that row (each run's folder ends in a hash of its settings)
    dir=$(ls -td runs/ixi-benchmark/ixi-$t-$s-s0-*/ 2>/dev/null | head -1)
    [ -n "$dir" ] && cp "${dir}plots/examples.png" "$OUT/examples_${t}_${s}.png"
  done
done
ls -la "$OUT"
