"""What folding the LoRA adapter into bf16 weights changes (04's merged_lora rollouts, CPU).

Sampling with the adapter merged (W + s B A in the weights' dtype) is exact in fp32 up to summation order; in
bf16 the merged weight is rounded to bf16, so the sampling distribution differs slightly from the one the
trainer differentiates (adapter applied beside the frozen bf16 weight). This script measures that difference
on the embedded model: a LoRA adapter with trained-sized weights (random A and B, scaled so that |s B A| is about
1% of |W|, like an adapter after a few hundred steps), completions sampled from prompts, and the mean and max
|log-prob difference| of the sampled tokens between the merged and the unmerged model, in fp32 and in bf16.

    python bench/merged_lora_bf16.py [--prompts 8] [--new-tokens 48]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402
import training  # noqa: E402

grpo = common.load_stage("04_grpo")

PROMPTS = ["I lost my job and I do not know how to tell my family.", "My best friend moved away and I feel alone.",
           "I keep failing my driving test and I am embarrassed.", "My mother is ill and I am scared.",
           "I cannot sleep because of work stress.", "My partner and I argue every day.",
           "I feel like nobody listens to me at school.", "I am anxious about moving to a new city."]


def logps_of(model, ro, cfg):
    return torch.cat(grpo.sequence_logps(model, ro, cfg))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--scale", type=float, default=0.01, help="|s B A| / |W| per projection")
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model, tok = models.load_causal_lm("embedded", torch.device("cpu"), dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=training.LORA_TARGETS,
                                                 init_lora_weights=False))
        with torch.no_grad():  # trained-sized adapter: |s B A| about args.scale of |W|
            from peft.tuners.lora import LoraLayer

            for m in model.modules():
                if isinstance(m, LoraLayer):
                    w = m.get_base_layer().weight
                    delta = m.get_delta_weight("default")
                    k = (args.scale * w.float().norm() / delta.float().norm()).sqrt()
                    m.lora_A["default"].weight.mul_(k)
                    m.lora_B["default"].weight.mul_(k)
        model.eval()
        prompts = [grpo.prompt_ids(tok, [{"role": "user", "content": t}], common.ESC_SYSTEM, "", 512)
                   for t in PROMPTS[:args.prompts]]
        torch.manual_seed(1)
        comps = speed.rollout(model, tok, prompts, 2, max_new_tokens=args.new_tokens, temperature=1.0, merge_lora=True)
        ro = grpo.Rollouts(prompts=[q for q in prompts for _ in range(2)], completions=comps,
                           advantages=torch.zeros(len(comps)))
        cfg = grpo.LossConfig(pad_id=tok.pad_token_id, temperature=1.0, micro_batch=4)
        unmerged = logps_of(model, ro, cfg)
        with speed.merged_lora(model):
            merged = logps_of(model, ro, cfg)
        d = (merged - unmerged).abs()
        rows.append((str(dtype).replace("torch.", ""), len(d), d.mean().item(), d.max().item()))
    print("| dtype | sampled tokens | mean abs logp diff (merged vs unmerged) | max |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2e} | {r[3]:.2e} |")


if __name__ == "__main__":
    main()
