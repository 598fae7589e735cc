"""Experiment: do RLFF-ESC and RAPO learn in the scripted ESC environment (envs/esc.py)? CPU, embedded model.

A transparent stand-in environment, not people: the seeker, the critic and the GRM are the rules of envs/esc.py,
fixed before these runs (their commit precedes the results). Train contexts come from one ESConv file
(--train-data: the runs in docs/results.md used FailedESConv.json, every dialogue train), held-out cases from
another (--test-data: PPDPP's data/esc-valid.txt): no test dialogue is trained on or was used to set the rules.
Both are downloads (README, "Getting the data"); they are read in place and never copied into the repository.

  --method rlff   RLFF-ESC: 02 (embedded policy, scripted seeker and critic) -> 03 with each objective
                  (classification, regression, ranking) on the same rollouts, valid AUC of each -> 04 GRPO with
                  the classification reward model (plain ESC system prompt, no thinking format: 06 evaluates with
                  that prompt) -> 06 interactive on held-out cases, base against trained.
  --method rapo   RAPO: 05 with the scripted seeker and GRM, and the same run with --sd-coef 0 (w/o SD) ->
                  06 interactive on held-out cases, base against both.
06 uses the scripted seeker and critic (success when the critic score c_t > theta = 0.5 within T turns); every
policy sees the same cases and seeds. Beside 06's per-policy bootstrap CIs, the script computes a paired
bootstrap CI of trained minus base over the same cases.

Run (docs/results.md's runs, one thread each of the 2-core machine, the two methods side by side; DATA is the
folder holding the downloaded files, FailedESConv.json with its speaker labels renamed as README says):
  OMP_NUM_THREADS=1 python experiments/scripted_env.py --method rapo --train-data DATA/esconv_failed.json \
      --test-data DATA/esc-valid.txt --prompts-per-step 4 --group-size 8 --steps 20 --eval-cases 40
  OMP_NUM_THREADS=1 python experiments/scripted_env.py --method rlff --train-data DATA/esconv_failed.json \
      --test-data DATA/esc-valid.txt --contexts 80 --rm-epochs 3 --rm-lr 5e-4 --rm-max-length 256 \
      --prompts-per-step 4 --group-size 8 --steps 20 --eval-cases 40
  (--until rm stops RLFF after the reward models; --rm-objectives adds objectives to a finished run)
Outputs: <out>/<method>/ (every stage's folder), and in experiments/results/: scripted_<method>.json (settings,
commands, wall times, results), scripted_<method>_curve.csv (training metrics per step) and scripted_<method>.png
(training reward curve and SR / average reward with CIs). Re-running resumes: finished stages are skipped,
02 and 06 resume their JSONL outputs, 04/05 continue from their checkpoints.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
sys.path.insert(0, str(ROOT / "experiments"))
from figures import plot_curves_and_bars, write_curves_csv  # noqa: E402
from repo_paths import repo_relative  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=["rlff", "rapo"], help="which pipeline to run")
    p.add_argument("--train-data", required=True,
                   help="dialogues for training contexts (any format 01 reads; the runs used ESConv's FailedESConv.json)")
    p.add_argument("--test-data", required=True,
                   help="held-out dialogues for 06 (the runs used PPDPP's data/esc-valid.txt, 130 dialogues)")
    p.add_argument("--out", default="runs/experiments/scripted", help="working folder (a subfolder per method)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"),
                   help="where the json/csv/png go (paths inside them are written relative to the repository)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--max-new-tokens", type=int, default=32, help="supporter reply length (all stages)")
    p.add_argument("--train-max-new-tokens", type=int, default=None,
                   help="04/05 rollout length (default: --max-new-tokens); RAPO's candidates start with a <strategy> "
                        "rationale, which rarely closes within 32 tokens, and the GRM sees only the reply after it")
    p.add_argument("--max-prompt-tokens", type=int, default=192, help="04/05 prompt budget (oldest messages dropped)")
    p.add_argument("--contexts", type=int, default=6, help="02: train contexts (one per dialogue)")
    p.add_argument("--candidates", type=int, default=4, help="02: m candidates per context (paper: 4)")
    p.add_argument("--sim-turns", type=int, default=2, help="02: T, supporter turns simulated (paper: 8)")
    p.add_argument("--delta", default="median",
                   help="02: label = 1[r_fut > delta] (02's default 0.5), or 'median': the median r_fut of these train "
                        "rollouts (balanced labels; with a strict critic and short simulations almost no r_fut passes 0.5 "
                        "or even 0, and a reward model cannot learn from one positive). 02 relabels without simulating")
    p.add_argument("--context-window", type=int, default=4, help="02: simulate from the last N context messages")
    p.add_argument("--rm-epochs", type=int, default=2, help="03: epochs")
    p.add_argument("--rm-lr", type=float, default=1e-4, help="03: peak learning rate (03's LoRA default 1e-4)")
    p.add_argument("--rm-max-length", type=int, default=384, help="03: tokens kept per input (cut from the left)")
    p.add_argument("--steps", type=int, default=5, help="04/05: optimiser steps")
    p.add_argument("--prompts-per-step", type=int, default=2, help="04/05: B")
    p.add_argument("--group-size", type=int, default=4, help="04/05: G")
    p.add_argument("--lr", type=float, default=1e-3, help="04/05: AdamW lr (LoRA r=16; the format-reward experiment's)")
    p.add_argument("--beta", type=float, default=0.04, help="04/05: k3 KL coefficient against the base model")
    p.add_argument("--rapo-format", default="reply", choices=["cos", "reply"],
                   help="rapo: 05's --format; reply (default here) trains the reply alone under the ESC prompt 06 "
                        "evaluates with, cos is RAPO's <strategy> rationale + reply (the 135M policy rarely closes it)")
    p.add_argument("--eval-cases", type=int, default=12, help="06: held-out dialogues")
    p.add_argument("--eval-turns", type=int, default=4, help="06: T (PPDPP: 8)")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the paired bootstrap")
    p.add_argument("--rm-objectives", default="classification,regression,ranking",
                   help="rlff: the 03 objectives to train on the same rollouts (classification is always needed: 04 uses "
                        "it); a later run with more objectives adds their reward models and AUCs, keeping 04 and 06")
    p.add_argument("--base-from", default=None,
                   help="a 06 folder of the other method (e.g. runs/experiments/scripted/rlff/eval) whose base-policy "
                        "records to start from, instead of simulating the base again: same test cases, settings and "
                        "seeds (06 refuses other settings when it resumes), so the base row is the same in both tables")
    p.add_argument("--until", default="eval", choices=["rm", "eval"],
                   help="rlff: stop after the three reward models (write their AUCs) or run on to 04 and 06")
    return p.parse_args(argv)


def run(cmd: list[str], log: dict, name: str):
    """Run one stage (skipped by the caller when its output exists), timing it into log[name]."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable] + cmd, check=True, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    log.setdefault("wall_s", {})[name] = round(time.time() - t0, 1)
    log.setdefault("commands", {})[name] = "python " + " ".join(cmd)


def train_cmd(stage: str, turns: Path, out: Path, a, extra: list[str]) -> list[str]:
    cmd = [stage, "--data", str(turns), "--out", str(out), "--policy", "hf:embedded", "--device", "cpu",
           "--seed", str(a.seed), "--prompts-per-step", str(a.prompts_per_step), "--group-size", str(a.group_size),
           "--max-new-tokens", str(a.train_max_new_tokens or a.max_new_tokens),
           "--max-prompt-tokens", str(a.max_prompt_tokens), "--lr", str(a.lr), "--beta", str(a.beta), "--max-steps", str(a.steps), "--micro-batch", "8",
           "--checkpoint-every", "5", "--sample-every", "5"] + extra
    if (out / "checkpoint").exists():
        cmd.append("--resume")
    elif out.exists():
        cmd.append("--overwrite")
    return cmd


def paired_diff(base: dict, other: dict, key, n_boot: int, seed: int) -> dict:
    """Mean of other - base over the cases both have, with a percentile bootstrap 95% CI (cases resampled)."""
    ids = sorted(set(base) & set(other))
    d = np.array([key(other[i]) - key(base[i]) for i in ids], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return {"n": len(d), "mean": float(d.mean()), "ci": [float(lo), float(hi)]}


def auc(scores, labels) -> float | None:
    """ROC-AUC by counting pairs (ties count one half)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def label_ceiling(rollouts: list[dict], valid_ids: set[str]) -> dict:
    """How much of 02's label a reply can explain: the ROC-AUC, on 03's valid candidates, of the candidate's own
    rule score d(y) (what a perfect reward model of the reply could know) and of the critic's score right
    after it (c_1, which adds the context's mood); the rest of the label is the context and the simulated
    future (the next supporter reply and the seeker)."""
    from envs import esc

    rs = [r for r in rollouts if r["id"] in valid_ids]
    y = [r["label"] for r in rs]
    return {"n": len(rs), "auc_reply_score_d": auc([esc.reply_score(r["response"], r["context"]) for r in rs], y),
            "auc_critic_after_reply_c1": auc([r["critic_scores"][0] for r in rs], y)}


def rule_profile(records: list[dict]) -> dict:
    """How often each rule of envs/esc.py applied to a policy's supporter turns in 06's dialogues (fractions of
    turns), and the mean reply score d: the trace from a policy's replies to its critic scores."""
    from envs import esc

    feats, ds = [], []
    for r in records:
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                feats.append(esc.reply_features(m["content"], msgs[:i]))
                ds.append(esc.reply_score(m["content"], msgs[:i]))
    out = {k: round(float(np.mean([f[k] for f in feats])), 3) for k in esc.W} if feats else {}
    return {"turns": len(ds), "mean_d": round(float(np.mean(ds)), 4) if ds else None, "rule_frac": out}


def main(argv=None):
    a = parse_args(argv)
    for f in (a.train_data, a.test_data):
        common.check(Path(f).exists(), f"{f}: not found (the ESConv files are read in place, never copied here)")
    out, res_dir = Path(a.out) / a.method, Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    save = lambda: common.write_json(log_path, log)
    t_start = time.time()

    turns = out / "data" / "turns.jsonl"
    if not turns.exists():  # every dialogue of the train file is train; every turn kept (no judge)
        run(["01_select.py", "--data", a.train_data, "--out", str(out / "data"), "--judge", "none", "--test-frac", "0",
             "--seed", str(a.seed)], log, "01_select")
        save()

    policies = [("base", "hf:embedded")]
    runs = []
    if a.method == "rlff":
        sim = out / "sim"
        sim_cmd = ["02_simulate.py", "--data", str(turns), "--out", str(sim), "--policy", "hf:embedded", "--seeker", "scripted",
                   "--critic", "scripted", "--max-examples", str(a.contexts), "--per-dialogue", "1", "-m", str(a.candidates),
                   "--max-turns", str(a.sim_turns), "--max-new-tokens", str(a.max_new_tokens), "--context-window",
                   str(a.context_window), "--batch-size", "16", "--seed", str(a.seed), "--device", "cpu"]
        if not (sim / "simulate_stats.json").exists():  # simulate (labels at delta 0 first when 'median')
            run(sim_cmd + ["--delta", "0" if a.delta == "median" else a.delta], log, "02_simulate")
            save()
        delta = a.delta
        if a.delta == "median":
            delta = str(float(np.median([r["reward"] for r in common.read_jsonl(sim / "rollouts.jsonl")])))
        if json.loads((sim / "simulate_stats.json").read_text())["delta"] != float(delta):
            run(sim_cmd + ["--delta", delta], log, "02_relabel")  # every id done: relabels only
            for obj in ("classification", "regression", "ranking"):  # reward models of the old labels are stale
                shutil.rmtree(out / f"rm_{obj}", ignore_errors=True)
            save()
        log["simulate_stats"] = json.loads((sim / "simulate_stats.json").read_text())
        log["rm"] = {}
        objectives = [o for o in ("classification", "regression", "ranking") if o in a.rm_objectives.split(",")]
        common.check("classification" in objectives, "--rm-objectives must include classification (04 uses it)")
        for obj in objectives:
            rm_out = out / f"rm_{obj}"
            if not (rm_out / "rm" / "rm_metrics.json").exists():
                run(["03_train_rm.py", "--data", str(sim / "rollouts.jsonl"), "--out", str(rm_out), "--objective", obj,
                     "--epochs", str(a.rm_epochs), "--max-length", str(a.rm_max_length), "--lr", str(a.rm_lr), "--seed", str(a.seed), "--device", "cpu"],
                    log, f"03_train_rm_{obj}")
                save()
            m = json.loads((rm_out / "rm" / "rm_metrics.json").read_text())
            log["rm"][obj] = {k: m.get(k) for k in ("roc_auc", "accuracy", "f1", "ece", "n", "positive_rate",
                                                     "label_positive_rate", "train_examples")}
        cls = json.loads((out / "rm_classification" / "rm" / "rm_metrics.json").read_text())
        log["label_ceiling"] = label_ceiling(common.read_jsonl(sim / "rollouts.jsonl"), {p["id"] for p in cls["predictions"]})
        print(f"label ceiling on the valid candidates: {log['label_ceiling']}")
        if a.until == "rm":  # the reward models' valid metrics only
            log.update(settings=vars(a), environment="scripted (envs/esc.py): rule-based seeker and critic; not people")
            common.write_json(res_dir / f"scripted_{a.method}.json", repo_relative(log))
            save()
            for obj, m in log["rm"].items():
                print(f"{obj}: valid ROC-AUC {m['roc_auc']} accuracy {m['accuracy']} (n={m['n']})")
            print(f"wrote {res_dir / f'scripted_{a.method}.json'}")
            return
        grpo = out / "grpo"
        if not (grpo / "adapter").exists():
            run(train_cmd("04_grpo.py", turns, grpo, a, ["--rm", str(out / "rm_classification" / "rm"),
                                                          "--think-prompt", "none", "--l-max", "0"]), log, "04_grpo")
            save()
        policies.append(("grpo", str(grpo / "adapter")))
        runs.append(grpo)
    else:
        for label, extra in (("rapo", []), ("rapo_wo_sd", ["--sd-coef", "0"])):
            d = out / label
            if not (d / "adapter").exists():
                run(train_cmd("05_rapo.py", turns, d, a, ["--seeker", "scripted", "--grm", "scripted", "--all-turns",
                                                          "--grm-retries", "0", "--format", a.rapo_format] + extra), log, f"05_{label}")
                save()
            policies.append((label, str(d / "adapter")))
            runs.append(d)

    ev = out / "eval"
    if a.base_from and not (ev / "dialogs.jsonl").exists():
        src = Path(a.base_from)
        ev.mkdir(parents=True, exist_ok=True)
        base_rows = [r for r in common.read_jsonl(src / "dialogs.jsonl") if r["policy"] == "base"]
        common.write_jsonl(ev / "dialogs.jsonl", base_rows)
        for name in ("replies.jsonl", "pairwise.jsonl"):
            (ev / name).write_text("")
        shutil.copy(src / "args.json", ev / "args.json")
    done = json.loads((ev / "scores.json").read_text()) if (ev / "scores.json").exists() else None
    if done is None or done["settings"]["cases"] != a.eval_cases or [p["label"] for p in done["policies"]] != [l for l, _ in policies]:
        # 06 resumes: policies already evaluated in ev (e.g. the base, run early) are not simulated again
        cmd = ["06_eval.py", "--test-data", a.test_data, "--out", str(ev), "--parts", "interactive", "--seeker", "scripted",
               "--critic", "scripted", "--max-examples", str(a.eval_cases), "--max-turns", str(a.eval_turns),
               "--max-new-tokens", str(a.max_new_tokens), "--batch-size", "20", "--seed", str(a.seed), "--device", "cpu",
               "--runs", *map(str, runs)]
        for label, spec in policies:
            cmd += ["--policy", f"{label}={spec}"]
        run(cmd, log, "06_eval")
        save()

    # results: 06's per-policy numbers with CIs, and paired differences against the base policy
    scores = json.loads((ev / "scores.json").read_text())
    dialogs = [r for r in common.read_jsonl(ev / "dialogs.jsonl") if r.get("kind", "interactive") == "interactive"]
    by = {}
    for r in dialogs:
        by.setdefault(r["policy"], {})[r["case_id"]] = r
    table = []
    for p in scores["policies"]:
        i = p["interactive"]
        row = {"policy": p["label"], "n": i["n"], "sr": i["sr"], "avg_reward": i["avg_reward"], "avg_turns": i["avg_turns"]}
        if p["label"] != "base":
            row["sr_minus_base"] = paired_diff(by["base"], by[p["label"]], lambda r: 100.0 * r["success"], a.bootstrap, a.seed)
            row["reward_minus_base"] = paired_diff(by["base"], by[p["label"]], lambda r: r["critic_scores"][-1],
                                                   a.bootstrap, a.seed)
        row["rules"] = rule_profile(list(by[p["label"]].values()))
        table.append(row)
    log["results"] = table
    curves = {d.name: common.read_jsonl(d / "metrics.jsonl") for d in runs}
    keys = ["reward", "zero_std_frac", "kl", "entropy", "completion_len_mean", "time_step"] + \
           (["sd_tokens", "sd_kl", "grm_failed_frac"] if a.method == "rapo" else ["reward_fut"])
    write_curves_csv(res_dir / f"scripted_{a.method}_curve.csv", curves, keys)
    log["settings"] = vars(a)
    log["wall_s_total_this_invocation"] = round(time.time() - t_start, 1)
    log["environment"] = "scripted (envs/esc.py): rule-based seeker, critic and GRM; not people"
    common.write_json(res_dir / f"scripted_{a.method}.json", repo_relative(log))
    save()
    for row in table:
        print(f"{row['policy']}: SR {row['sr']['value']:.1f}% {row['sr']['ci']}  avg reward {row['avg_reward']['value']:.3f} "
              f"{row['avg_reward']['ci']}" + (f"  paired SR diff {row['sr_minus_base']['mean']:.1f} {row['sr_minus_base']['ci']}"
                                              f"  reward diff {row['reward_minus_base']['mean']:.3f} {row['reward_minus_base']['ci']}"
                                              if "sr_minus_base" in row else ""))
        print(f"  {row['rules']['turns']} supporter turns, mean d {row['rules']['mean_d']}, rule fractions "
              + " ".join(f"{k} {v:.2f}" for k, v in row["rules"]["rule_frac"].items()))
    plot(a, curves, table, res_dir / f"scripted_{a.method}.png")
    print(f"wrote {res_dir / f'scripted_{a.method}.json'}")


def plot(a, curves: dict, table: list[dict], path: Path):
    plot_curves_and_bars(path, curves, "train reward (" + ("RM R_fut" if a.method == "rlff" else "scripted GRM score") + ")",
                         table, [("sr", "SR (%)"), ("avg_reward", "average reward c_end")],
                         f"held-out: {table[0]['n']} cases, T={a.eval_turns}",
                         f"{a.method}: scripted ESC environment (envs/esc.py), SmolLM2-135M, CPU - not results on people")


if __name__ == "__main__":
    common.run_main(main)
