"""Experiment: does 04_grpo.py learn? The thinking-format reward on the embedded model, on CPU.

Protocol (04_grpo.py deviation 1): system prompt asking for <think>...</think> then the reply, assistant turn
prefilled with "<think>"; reward = the format reward alone (--rm none, R_fmt in {0, 1}; overlong
punishment off since completions are capped at --max-new-tokens); B=2 prompts x G=8, 64 new tokens, LoRA
r=16, lr 1e-3, 30 steps, k3 KL penalty beta 0.04 against the base model. A short system prompt and a
128-token prompt budget (the latest messages of the context) keep a step affordable on CPU.
The format rate on held-out prompts (the test split of the demo data, never trained on) is measured before
and after training with the same prompts, sampling settings (temperature 1.0) and seed, together with the
base model's negative log-likelihood per completion token (a coherence check: the format reward says
nothing about the text inside and after the tags; with --beta 0 the policy learns to fill them with
gibberish, which this number exposes). The training curve is 04's own metrics.jsonl.

Run (about 25 minutes on 2 CPU cores; the beta-0 comparison, 60 steps, about 50):
  python experiments/format_reward.py                      # -> experiments/results/format_reward_kl*
  python experiments/format_reward.py --beta 0 --steps 60 --out runs/experiments/format_reward_beta0 --tag _beta0
Outputs: <out>/grpo/ (the 04 run: metrics.jsonl, samples.jsonl, adapter/), and in experiments/results/
format_reward<tag>.json, format_reward<tag>_curve.png and format_reward<tag>_curve.csv. Re-running resumes
the 04 run and reuses the measured "before" numbers.
"""
import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import models  # noqa: E402
sys.path.insert(0, str(ROOT / "experiments"))
from repo_paths import repo_relative  # noqa: E402
import speed  # noqa: E402


SHORT_SYSTEM = ("You are a warm emotional supporter. First think briefly about the person's feelings inside "
                "<think> </think> tags, then write your reply to them.")


def load_grpo():
    return common.load_stage("04_grpo")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiments/format_reward_kl", help="working folder (turns, the 04 run)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), help="where the json/png/csv go")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps")
    p.add_argument("--prompts-per-step", type=int, default=2, help="B")
    p.add_argument("--group-size", type=int, default=8, help="G (8: a rare success still lands in some groups)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap (training and evaluation)")
    p.add_argument("--max-prompt-tokens", type=int, default=128, help="prompt budget (oldest messages dropped)")
    p.add_argument("--system-prompt", default=SHORT_SYSTEM, help="a short system prompt (CPU time goes with length)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr for LoRA r=16 at this scale")
    p.add_argument("--beta", type=float, default=0.04,
                   help="k3 KL coefficient against the base model (0 skips the reference forward, and lets the policy "
                        "satisfy the format with gibberish: docs/results.md)")
    p.add_argument("--tag", default="_kl", help="suffix of the result files (format_reward<tag>.json/.csv/.png)")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the evaluation samples")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args()


@torch.no_grad()
def format_rate(g, model, tok, turns, args) -> dict:
    """Format rate of --eval-samples completions per held-out prompt (temperature 1.0, seeded)."""
    _, prefill = g.system_prompt("prefill")
    system = args.system_prompt
    p_ids = [g.prompt_ids(tok, t["context"], system, prefill, args.max_prompt_tokens) for t in turns]
    torch.manual_seed(args.seed + 12345)
    comps = speed.rollout(model, tok, p_ids, args.eval_samples, max_new_tokens=args.max_new_tokens,
                          temperature=1.0, batch_size=64)
    texts = [prefill + tok.decode(c, skip_special_tokens=True) for c in comps]
    fmt = [g.format_reward(t) for t in texts]
    # coherence check: the base model's mean negative log-likelihood per completion token (the LoRA-disabled
    # model scores the samples; a policy that games the format reward with gibberish shows a high value)
    ro = g.Rollouts([p for p in p_ids for _ in range(args.eval_samples)], comps, torch.zeros(len(comps)))
    cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=1.0, beta=0.0, micro_batch=16)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        lp = g.sequence_logps(model, ro, cfg)
    nll = -float(torch.cat(lp).mean())
    return {"format_rate": sum(fmt) / len(fmt), "n": len(fmt), "base_model_nll_per_token": nll, "examples": texts[:3]}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    out, res_dir = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    turns_path = out / "demo" / "turns.jsonl"
    if not turns_path.exists():  # the demo data with every train turn kept (no judge needed)
        subprocess.run([sys.executable, str(ROOT / "01_select.py"), "--data", str(ROOT / "data" / "demo_esconv.json"),
                        "--out", str(out / "demo"), "--judge", "none"], check=True, env=env)
    held_out = common.load_turns(turns_path, split="test")
    g = load_grpo()
    device = torch.device("cpu")

    before_path = out / "before.json"
    if before_path.exists() and "base_model_nll_per_token" in json.loads(before_path.read_text()):
        before = json.loads(before_path.read_text())
    else:
        model, tok = models.load_causal_lm("embedded", device, torch.float32)
        before = format_rate(g, model, tok, held_out, args)
        common.write_json(before_path, before)
        del model
    print(f"before: format rate {before['format_rate']:.3f} on {before['n']} held-out samples", flush=True)

    run = out / "grpo"
    cmd = [sys.executable, str(ROOT / "04_grpo.py"), "--policy", "hf:embedded", "--rm", "none",
           "--data", str(turns_path), "--out", str(run), "--think-prompt", "prefill", "--temperature", "1.0",
           "--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--max-prompt-tokens", str(args.max_prompt_tokens),
           "--lr", str(args.lr), "--system-prompt", args.system_prompt, "--beta", str(args.beta), "--max-steps", str(args.steps), "--l-max", "0", "--micro-batch", "8",
           "--checkpoint-every", "5", "--sample-every", "5", "--seed", str(args.seed), "--device", "cpu"]
    if not (run / "adapter").exists():
        if (run / "checkpoint").exists():
            cmd.append("--resume")
        elif run.exists():
            cmd.append("--overwrite")
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)

    model, tok = models.load_causal_lm(str(run / "adapter"), device, torch.float32)
    after = format_rate(g, model, tok, held_out, args)
    print(f"after:  format rate {after['format_rate']:.3f} on {after['n']} held-out samples", flush=True)
    print(f"base-model NLL per completion token: before {before['base_model_nll_per_token']:.2f}, "
          f"after {after['base_model_nll_per_token']:.2f}", flush=True)

    metrics = common.read_jsonl(run / "metrics.jsonl")
    with open(res_dir / f"format_reward{args.tag}_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_format_rate", "zero_std_frac", "kl", "entropy", "completion_len_mean", "time_step"])
        for m in metrics:
            w.writerow([m["step"], m["format_rate"], m["zero_std_frac"], m["kl"], m["entropy"], m["completion_len_mean"],
                        round(m["time_step"], 2)])
    result = {"command": " ".join(cmd), "held_out_prompts": len(held_out), "samples_per_prompt": args.eval_samples,
              "before": before, "after": after, "steps": len(metrics),
              "mean_step_seconds": sum(m["time_step"] for m in metrics) / max(len(metrics), 1),
              "settings": vars(args)}
    common.write_json(res_dir / f"format_reward{args.tag}.json", repo_relative(result))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [m["step"] for m in metrics]
        rate = [m["format_rate"] for m in metrics]
        k = 5
        smooth = [sum(rate[max(0, i - k + 1):i + 1]) / len(rate[max(0, i - k + 1):i + 1]) for i in range(len(rate))]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, rate, color="0.75", label="train rollouts (per step)")
        ax.plot(steps, smooth, color="C0", label=f"train rollouts ({k}-step mean)")
        ax.scatter([0, steps[-1]], [before["format_rate"], after["format_rate"]], color="C3", zorder=3,
                   label="held-out prompts (before / after)")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("thinking-format rate")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"04_grpo.py, format reward only (beta {args.beta:g}, lr {args.lr:g}), SmolLM2-135M, CPU", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(res_dir / f"format_reward{args.tag}_curve.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: wrote the CSV curve only", file=sys.stderr)
    print(f"wrote {res_dir / f'format_reward{args.tag}.json'}")


if __name__ == "__main__":
    main()
