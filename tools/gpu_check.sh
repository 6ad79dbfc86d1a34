#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go (about 8 minutes on one H200):
#   1. tests/test_gpu.py: bf16 and fp16 (gradient scaler) runs killed and resumed to identical weights,
#      torch.compile with amp auto and MFU, LoRA on a bf16 base imported from a Hugging Face folder;
#   2. bench/bench_train.py on the GPU: the small preset's training step, compiled, against a plain fp32 step and
#      the GPU's measured matmul peak;
#   3. the training recipe of workflow/configs/small-gpu.yaml on DATA_DIR's tokens, timed, with its losses.
#
#   tools/gpu_check.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR: an encode stage's folder (train.bin, val.bin, meta.json) with the tokenizer.json beside them, e.g.
# data/tokens plus data/tokenizer/tokenizer.json of a run with the small-gpu config. A machine without network
# that lacks packages (gguf, jsonschema, zstandard) takes them as wheels from $WHEELS (installed with --no-deps).
# Each part has its own time limit, so a hang in one still leaves the others' results in OUT_DIR; the recipe
# gets what is left of $DEADLINE seconds (default 560), and its throughput says how long the whole would take.
set -uo pipefail
DATA=${1:?usage: tools/gpu_check.sh DATA_DIR [OUT_DIR]}
OUT_DIR=${2:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TINYGPT_NO_PROGRESS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS
part() { echo; echo "=== $1 ($((SECONDS - started)) s in)"; }

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -2
fi

part "tests/test_gpu.py"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/tests.log" | tail -25

part "bench_train: small preset, batch 64, compiled"
timeout 90 "$PY" bench/bench_train.py --presets small --arch llama --batch_size 64 --vocab_size 8192 --steps 20 \
    --warmup 5 --compile --matmul_size 8192 2>&1 | tee "$OUT_DIR/bench_train.log" | tail -12

part "small-gpu recipe: $DATA"
# workflow/configs/small-gpu.yaml's train and model settings, as the workflow's train rule passes them
timeout $(( ${DEADLINE:-560} - (SECONDS - started) - 20 )) "$PY" -m tinygpt train --data_dir "$DATA" --tokenizer "$DATA/tokenizer.json" \
    --out "$OUT_DIR/best.pt" --runs_dir "$OUT_DIR/runs" --preset small --arch llama --max_steps 6000 \
    --batch_size 64 --grad_accum 1 --lr 0.001 --min_lr 0.0001 --warmup_steps 300 --eval_interval 500 \
    --eval_batches 50 --ckpt_interval 250 --device cuda --amp auto --compile --threads 4 > "$OUT_DIR/train.log" 2>&1
echo "exit status $? after $((SECONDS - started)) s"
tail -5 "$OUT_DIR/train.log"
cat "$OUT_DIR"/runs/*/metrics.jsonl > "$OUT_DIR/metrics.jsonl" 2>/dev/null
"$PY" - "$OUT_DIR/metrics.jsonl" <<'EOF'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
for m in lines:
    if "val_loss" in m:
        print({k: round(v, 4) for k, v in m.items() if k in ("step", "train_loss", "val_loss", "val_bpb", "mfu")})
rates = sorted(m["tokens_per_s"] for m in lines if "tokens_per_s" in m)
mfus = sorted(m["mfu"] for m in lines if "mfu" in m)
if rates:
    print(f"training steps: median {rates[len(rates) // 2]:,.0f} tokens/s, median MFU {mfus[len(mfus) // 2]:.3f}; "
          f"last step {lines[-1]['step']}")
EOF
rm -rf "$OUT_DIR/runs" "$OUT_DIR/best.pt"  # hundreds of MB of checkpoints: the logs above are the result
echo "done in $((SECONDS - started)) s"
