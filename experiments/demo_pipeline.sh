#!/usr/bin/env bash
# The whole pipeline, 01 to 06, on the bundled demo dialogues with the embedded SmolLM2-135M, sized to finish
# in about 10 minutes on 2 CPU cores. The embedded model does not discriminate as a critic or reward model
# (README, "Models"; docs/design.md section 8), so the critic (02, 06) and the GRM (05) are the scripted roles
# of envs/esc.py (`scripted`: a documented rule model of the seeker's mood): 02's labels, 03's reward model,
# 05's ranks and critiques and 06's interactive rows then carry a signal a reader can trace to those rules.
# The seeker and 01's and 06's judges stay the embedded LLM. Results in a scripted environment, not on people.
# 02 labels r_fut > 0 (--delta 0: the seeker ends above neutral); with 3 simulated turns of 24 tokens the
# scripted critic rarely sees that, and when no label is positive 02 says so (exit 2) and the rollouts are
# relabelled at their median r_fut (02 re-run with that --delta: no new simulation), so 03 gets both labels.
# The sizes are tiny; scale up with the flags of docs/reproducing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false

echo "== 01: turns + hindsight selection (judge: embedded, likelihood mode)"
python3 01_select.py --data data/demo_esconv.json --out runs/demo --max-examples 8 --test-frac 0.3 --judge-context 2 --overwrite

echo "== 02: future-oriented rewards by simulation (RLFF-ESC stage 1)"
SIM=(02_simulate.py --data runs/demo/turns.jsonl --out runs/demo --max-examples 6 --per-dialogue 1 -m 2 --max-turns 3
     --max-new-tokens 24 --seeker-max-new-tokens 20 --context-window 2 --critic scripted)
python3 "${SIM[@]}" --overwrite --delta 0.0 || python3 "${SIM[@]}" --delta "$(python3 -c \
    'import json; print(json.load(open("runs/demo/simulate_stats.json"))["reward_quantiles"]["median"])')"

echo "== 03: the reward model (RLFF-ESC stage 2)"
python3 03_train_rm.py --data runs/demo/rollouts.jsonl --out runs/demo --max-length 256

echo "== 04: GRPO on R_fut + 0.5 R_fmt + R_len (RLFF-ESC stage 3)"
python3 04_grpo.py --data runs/demo/turns.jsonl --rm runs/demo/rm --out runs/grpo --overwrite \
    --prompts-per-step 2 --group-size 4 --max-new-tokens 24 --max-prompt-tokens 192 --max-steps 2 --lr 1e-3

echo "== 05: RAPO (reactions, generative reward model, self-distillation)"
python3 05_rapo.py --data runs/demo/turns.jsonl --out runs/rapo --overwrite \
    --prompts-per-step 2 --group-size 4 --max-new-tokens 24 --max-prompt-tokens 192 --max-steps 2 --lr 1e-3 \
    --seeker-max-new-tokens 16 --grm scripted --grm-retries 0

echo "== 06: evaluation of the base model and both trained adapters"
python3 06_eval.py --data runs/demo/turns.jsonl --out runs/eval --overwrite \
    --policy base=hf:embedded --policy grpo=runs/grpo/adapter --policy rapo=runs/rapo/adapter \
    --runs runs/grpo runs/rapo --critic scripted --max-examples 2 --max-turns 4 --max-new-tokens 24 --seeker-max-new-tokens 16 \
    --judge-rounds 2 --max-ref-turns 4

echo
echo "Report: runs/eval/report.md (plots: runs/eval/*.png)"
