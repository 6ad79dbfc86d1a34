#!/usr/bin/env bash
# What an importance matrix gains on a model trained with a GPU's compute: the small llama trained on DATA_DIR's
# tokens (bench_quality's Python docs: bench-quality/tokens-4096) with the GPU, then bench/bench_gguf.py on its f16
# GGUF: each file type's KL divergence from f16 on val.bin (held out by position), without and with importance
# matrices of 100 and 400 training chunks. About 3.5 minutes on one H200 (the KL part on its CPUs).
#
#   tools/gpu_imatrix.sh DATA_DIR [OUT_DIR]
#
# STEPS (default 1200) sets the training steps of 32 x 256 tokens; WHEELS as in tools/gpu_check.sh.
set -uo pipefail
DATA=${1:?usage: tools/gpu_imatrix.sh DATA_DIR [OUT_DIR]}
OUT_DIR=${2:-gpu-imatrix}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TINYGPT_NO_PROGRESS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -2
fi
started=$SECONDS
timeout 200 "$PY" -m tinygpt train --data_dir "$DATA" --tokenizer "$DATA/tokenizer.json" --out "$WORK/best.pt" \
    --runs_dir "$WORK/runs" --preset small --arch llama --max_steps "${STEPS:-1200}" --batch_size 32 --lr 0.001 \
    --min_lr 0.0001 --warmup_steps 100 --eval_interval 250 --eval_batches 50 --ckpt_interval 500 --device cuda \
    --amp auto --compile --threads 8 > "$OUT_DIR/train.log" 2>&1
echo "training: exit status $? after $((SECONDS - started)) s"
grep "validation\|best" "$OUT_DIR/train.log" | tail -8
"$PY" -m tinygpt export --checkpoint "$WORK/best.pt" --out_dir "$WORK/hf" &&
"$PY" -m tinygpt gguf_convert --model_dir "$WORK/hf" --out "$WORK/model-f16.gguf" --outtype f16 &&
timeout 300 "$PY" bench/bench_gguf.py --f16 "$WORK/model-f16.gguf" --tokens "$DATA" --out "$WORK/bench" \
    --imatrix_chunks 100 400 --types q4_k_m q5_k_m q6_k q4_0 q5_0 --eval_chunks 128 --threads "$(nproc)" \
    2>&1 | tee "$OUT_DIR/bench_gguf.log"
cp "$WORK/bench/results.json" "$OUT_DIR/" 2>/dev/null
rm -rf "$WORK"
echo "done in $((SECONDS - started)) s"
