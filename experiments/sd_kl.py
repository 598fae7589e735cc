"""Does RAPO's distillation term pull the policy towards its feedback-conditioned teacher on examples it
was not trained on? (05_rapo.py, Eq. 13-15, on the embedded SmolLM2-135M, CPU.)

Distilled examples are built from the demo data: a train turn's context, a reply the policy itself samples
(greedy, `<strategy>` prefill: the on-policy tokens a_w), and the teacher's input = the context with the
hindsight block (the reply, a fixed discouraged seeker reaction, a fixed critique, and the dataset's
supporter reply as the "better response"). The turns of 8 dialogues train; the other dialogues are held out.
Training uses 05's machinery with the GRPO advantages set to zero, so only `eta * L_SD` moves the LoRA
adapter (eta = 1 here, to see an effect in a few steps); the teacher is 05's default EMA adapter (m = 0.5).
Reported: the mean top-K (K = 256) teacher-student KL per distilled token on the held-out examples, before
and after, and on the train examples.

  python experiments/sd_kl.py            # writes experiments/results/sd_kl.json
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import models  # noqa: E402
sys.path.insert(0, str(ROOT / "experiments"))
from repo_paths import repo_relative  # noqa: E402
import training  # noqa: E402

grpo = common.load_stage("04_grpo")
rapo = common.load_stage("05_rapo")

REACTION = "I don't know... that doesn't really feel like you heard what I said."
CRITIQUE = ("Generic and vague: it does not reflect the specific feelings the person described, and it does not "
            "ask about their situation. Acknowledge the concrete worry first, then ask one open question.")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "demo_esconv.json"), help="dialogues (ESConv format)")
    p.add_argument("--per-dialogue", type=int, default=2, help="distilled examples (turns) per dialogue")
    p.add_argument("--train-dialogues", type=int, default=8, help="dialogues whose turns train; the rest are held out")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps on the train examples")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the LoRA adapter")
    p.add_argument("--sd-coef", type=float, default=1.0, help="eta (05's default is 1e-3; larger here for a short run)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="length of the policy's sampled replies")
    p.add_argument("--context-messages", type=int, default=2, help="last context messages kept (CPU cost)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "sd_kl.json"), help="output JSON")
    return p.parse_args()


@torch.no_grad()
def mean_kl(teacher, model, prompts, comps, t_prompts, cfg) -> float:
    """Mean top-K KL(student || teacher) per completion token, no gradient."""
    ids, attn, pos, cmask = grpo.collate(prompts, comps, cfg.pad_id)
    s_logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=cmask.shape[1] + 1).logits[:, :-1]
    t_logits = teacher.logits(t_prompts, comps, cfg.pad_id, torch.autocast("cpu", enabled=False))
    m = cmask.bool()
    return rapo.topk_reverse_kl(s_logits[m], t_logits[m], 256, cfg.temperature).mean().item()


def main():
    args = parse_args()
    common.seed_everything(args.seed)
    dialogues = common.load_dialogues(args.data)
    turns = common.build_turns(dialogues, {d["dialog_id"]: "train" for d in dialogues})
    rng = random.Random(args.seed)
    by_dialog = {}
    for t in turns:
        if t["turn"] >= 4:
            by_dialog.setdefault(t["dialog_id"], []).append(t)
    groups = [rng.sample(v, min(args.per_dialogue, len(v))) for _, v in sorted(by_dialog.items())]
    picked = [t for g in groups[:args.train_dialogues] for t in g]  # train examples first, split by dialogue
    half = len(picked)
    picked += [t for g in groups[args.train_dialogues:] for t in g]
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_causal_lm("embedded", torch.device("cpu"), torch.float32)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=training.LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    ctxs = [t["context"][-args.context_messages:] for t in picked]
    prompts = [grpo.prompt_ids(tok, c, rapo.RAPO_SYSTEM, rapo.PREFILL, 512) for c in ctxs]
    comps = models.generate_ids(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0)  # a_w
    replies = [common.strip_reasoning(rapo.PREFILL + tok.decode(c, skip_special_tokens=True)) for c in comps]
    t_prompts = [grpo.prompt_ids(tok, rapo.teacher_context(c, y, REACTION, CRITIQUE, t["target"]), rapo.RAPO_SYSTEM,
                                 rapo.PREFILL, 1024) for c, y, t in zip(ctxs, replies, picked)]
    teacher = rapo.Teacher(model, "ema", True, None, lcfg)
    cfg = grpo.LossConfig(pad_id=tok.pad_token_id, temperature=1.0, beta=0.0, micro_batch=3)
    tr, ho = slice(0, half), slice(half, len(picked))
    before = {"heldout": mean_kl(teacher, model, prompts[ho], comps[ho], t_prompts[ho], cfg),
              "train": mean_kl(teacher, model, prompts[tr], comps[tr], t_prompts[tr], cfg)}
    print(f"before: held-out KL {before['heldout']:.4f}, train KL {before['train']:.4f}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    ro = grpo.Rollouts(prompts=prompts[tr], completions=comps[tr], advantages=torch.zeros(half))
    distill = {i: t_prompts[i] for i in range(half)}
    n_tok = float(sum(len(c) for c in comps[tr]))
    curve = []
    t0 = time.time()
    for step in common.progress(range(args.steps), desc="sd"):
        st = {"sd_loss": 0.0, "sd_kl": 0.0, "topk_mass": 0.0, "sd_tokens": 0.0}
        l_sd = rapo.make_sd_loss(teacher, ro, distill, cfg, 256, 2.0, n_tok, st)
        grpo.grpo_step(model, model, opt, None, ro, cfg, extra_loss=lambda mb: args.sd_coef * l_sd(mb))  # Eq. 15
        teacher.update(0.5)
        curve.append({"step": step + 1, "train_sd_kl": float(st["sd_kl"] / st["sd_tokens"])})
    after = {"heldout": mean_kl(teacher, model, prompts[ho], comps[ho], t_prompts[ho], cfg),
             "train": mean_kl(teacher, model, prompts[tr], comps[tr], t_prompts[tr], cfg)}
    print(f"after {args.steps} steps ({time.time() - t0:.0f} s): held-out KL {after['heldout']:.4f}, "
          f"train KL {after['train']:.4f}")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    common.write_json(args.results, repo_relative({"args": vars(args), "before": before, "after": after, "curve": curve,
                                                   "examples": {"train": half, "heldout": len(picked) - half}}))


if __name__ == "__main__":
    main()
