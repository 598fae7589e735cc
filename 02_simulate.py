"""Stage 02: future-oriented rewards by multi-agent simulation (RLFF-ESC stage 1; docs/design.md section 3).

For every train context x, the ESC model samples m candidate replies (paper: m = 4, temperature 1.0). Each
candidate is supporter turn 1 of a simulated future: the seeker (a user simulator playing the dialogue's
persona) answers, the critic judges how the seeker feels (worse -1, same -0.5, better 0.5, solved 1), the
supporter answers again, ... until the critic's score c_t > theta (success) or T supporter turns:

    r_fut = c_end + lambda_eff * 1[success] * (T - t_end) / (T - 1)                  (future reward)
    label = 1[r_fut > delta]                                                         (RM target)

c_end is the last critic score and t_end the supporter turns used. The reward model (03_train_rm.py) learns
`label` from (context, candidate), and GRPO (04_grpo.py) uses that model as R_fut.

Lock-step batching: within a chunk of --batch-size contexts, the m candidates come from one batched policy
call (n = m), and all live conversations advance together, one batched call per role per round
(simulate_lockstep); finished conversations drop out.

Deviations and decisions (the summary of the paper gives no formula; see docs/design.md section 3):
 1. r_fut is our reading of "terminal reward combined with efficiency"; every constant is an option.
 2. Critic `likelihood` mode (default for hf:/vllm: critics) replaces PPDPP's 10 samples at temperature 1.1
    by the exact expectation over the four options; `--critic-mode sample` is PPDPP's way.
 3. Rewards and labels are recomputed from the stored critic scores at the end of every run, so re-running
    the same command with another --delta / --lambda-eff relabels the rollouts without simulating again.
 4. Determinism: chunk k holds contexts [k*C, (k+1)*C) and everything in it is seeded from (--seed, k);
    ranks take whole chunks round-robin. A chunk always has the same batch composition and random stream,
    so the output does not depend on the number of ranks, and a resumed run equals an uninterrupted one.
 5. Cost knobs the paper does not have: --per-dialogue K (spread few contexts over many dialogues) and
    --context-window N (simulate from the last N messages only); both off by default.

Run:
  python 02_simulate.py --data runs/demo/turns.jsonl --out runs/demo
  # the CPU demo (~1.5 CPU-minutes): the embedded critic scores near 0, so theta 0 lets both labels occur
  python 02_simulate.py --max-examples 8 --per-dialogue 1 -m 2 --max-turns 3 --max-new-tokens 24 \\
      --seeker-max-new-tokens 20 --context-window 2 --theta 0.0
  torchrun --nproc_per_node=8 02_simulate.py --data runs/esconv/turns.jsonl --out runs/esconv --batch-size 16 \\
      --policy hf:Qwen/Qwen2.5-7B-Instruct --seeker openai:Qwen2.5-72B-Instruct --seeker-base-url http://host:8000/v1 \\
      --critic openai:Qwen2.5-72B-Instruct --critic-base-url http://host:8000/v1     (critic mode: sample)
Re-running on the same --out resumes (finished candidates are skipped); --overwrite starts afresh.
"""
import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import backends
import common
import role_cache
from common import InputError, check

# Settings that change the simulation itself: a resumed run must use the same ones, and the same --data content
# (rewards/labels may change: --delta and --lambda-eff only relabel).
SIM_KEYS = ("seed", "context_window", "num_candidates", "temperature", "top_p",
            "max_new_tokens", "supporter_temperature", "seeker_temperature", "seeker_top_p", "seeker_max_new_tokens",
            "critic_mode", "critic_samples", "critic_temperature", "max_turns", "theta", "batch_size",
            "policy", "seeker", "critic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="runs/demo/turns.jsonl", out="runs/demo")
    g = p.add_argument_group("contexts (train split of turns.jsonl)")
    g.add_argument("--learn-only", action="store_true",
                   help="use only turns with learn == true (RAPO's hindsight selection); default: every train turn")
    g.add_argument("--per-dialogue", type=int, default=None,
                   help="at most K contexts per dialogue, evenly spread over it (default: all; for quick runs "
                        "that still cover many dialogues)")
    g.add_argument("--context-window", type=int, default=0,
                   help="keep only the last N messages of each context (default 0 = all, as the paper); a cost knob "
                        "for CPU runs and short-context models; the records store the context as simulated and N, and "
                        "the reward model (03) reads every context by the same rule, also when 04 queries it")
    g.add_argument("--batch-size", type=int, default=8,
                   help="C, contexts per chunk (ours: 8): the chunk's C*m conversations advance in lock-step (one "
                        "batched call per role per round); also the unit of resume and of the per-chunk seeds")
    g = p.add_argument_group("roles (each on its own backend and model)")
    common.add_role_arg(g, "policy", "ESC model writing the candidates and the later supporter turns")
    common.add_role_arg(g, "seeker", "user simulator playing the help-seeker (paper: Qwen2.5-72B)")
    common.add_role_arg(g, "critic", "critic judging the seeker's state after each seeker message")
    common.add_decoder_arg(g)
    g = p.add_argument_group("candidates and supporter")
    g.add_argument("-m", "--num-candidates", type=int, default=4, help="candidates sampled per context (paper: m=4)")
    g.add_argument("--temperature", type=float, default=1.0, help="candidate sampling temperature (paper: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="candidate and supporter top-p (paper: 1.0)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="length limit of a supporter reply in tokens (paper: not given; ours: 64)")
    g.add_argument("--supporter-temperature", type=float, default=1.0,
                   help="temperature of supporter turns 2..T (paper: not given; the ESC model's 1.0)")
    add_simulation_args(p.add_argument_group("seeker"), p.add_argument_group("critic and stopping"),
                        "T: supporter turns per simulation, candidate included (paper: 8)")
    g = p.add_argument_group("future reward and label (recomputed at the end of every run)")
    g.add_argument("--lambda-eff", type=float, default=0.5, help="weight of the efficiency bonus in r_fut (ours: 0.5)")
    g.add_argument("--delta", type=float, default=0.5, help="label = 1[r_fut > delta] (ours: 0.5)")
    role_cache.add_role_cache_args(p)
    args = p.parse_args(argv)
    common.check_common_args(args)
    role_cache.check_role_cache_args(args)
    common.check_decoder(args)
    check(args.num_candidates >= 1, "--num-candidates must be >= 1")
    check(args.max_turns >= 2, "--max-turns must be >= 2 (r_fut divides by T - 1)")
    check(-1.0 <= args.theta < 1.0, "--theta must be in [-1, 1): critic scores lie in [-1, 1] and success needs c_t > theta")
    check(args.batch_size >= 1, "--batch-size must be >= 1")
    check(args.per_dialogue is None or args.per_dialogue >= 1, "--per-dialogue must be >= 1")
    check(args.context_window >= 0, "--context-window must be >= 0 (0 = whole context)")
    check(args.max_examples is None or args.max_examples >= 1, "--max-examples must be >= 1")
    check(args.max_new_tokens >= 1 and args.seeker_max_new_tokens >= 1, "--max-new-tokens values must be >= 1")
    check(args.critic_samples >= 1, "--critic-samples must be >= 1")
    check(args.lambda_eff >= 0, "--lambda-eff must be >= 0")
    for name in ("temperature", "supporter_temperature", "seeker_temperature", "critic_temperature"):
        check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    check(args.temperature > 0 or args.num_candidates == 1,
          "--temperature 0 (greedy) makes all m candidates identical: use a temperature > 0 or -m 1")
    for name in ("top_p", "seeker_top_p"):
        check(0 < getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in (0, 1]")
    for role in ("policy", "seeker", "critic"):
        common.check_model_path(getattr(args, role), f"--{role}")
    return args


# ----------------------------------------------------------------------------------------------------
# Settings shared with 06_eval.py: the simulation's flags, and the check that a re-run keeps its settings


def add_simulation_args(seeker, critic, max_turns_help: str):
    """The lock-step simulation's flags, shared with 06_eval.py: the seeker's sampling (on argument group `seeker`),
    PPDPP's critic and the stopping rule (on group `critic`). Each stage checks their values in its parse_args."""
    seeker.add_argument("--seeker-temperature", type=float, default=0.7, help="seeker temperature (PPDPP: 0.7)")
    seeker.add_argument("--seeker-top-p", type=float, default=0.9, help="seeker top-p (ours: 0.9)")
    seeker.add_argument("--seeker-max-new-tokens", type=int, default=48,
                        help="length limit of a seeker message in tokens (ours: 48)")
    critic.add_argument("--critic-mode", default="auto", choices=["auto", "likelihood", "sample"],
                        help="likelihood: exact expectation over the four options; sample: PPDPP's n samples; "
                             "auto = likelihood for hf:/vllm: critics, sample for openai:")
    critic.add_argument("--critic-samples", type=int, default=10, help="samples per judgement in sample mode (PPDPP: 10)")
    critic.add_argument("--critic-temperature", type=float, default=1.1,
                        help="critic temperature in sample mode (PPDPP: 1.1)")
    critic.add_argument("--max-turns", type=int, default=8, help=max_turns_help)
    critic.add_argument("--theta", type=float, default=0.5,
                        help="success when the critic score c_t > theta (PPDPP: 0.5; DPDP: 0.1)")


def check_resume_settings(args, out_dir: Path, n_done: int, inputs: dict, keys: tuple[str, ...] = SIM_KEYS,
                          stage: str = "02_simulate", what: str = "rollouts",
                          note: str = "--delta and --lambda-eff may change: they only relabel"):
    """Resuming with another input or other settings (`keys` of args) would mix two experiments in one file:
    refuse with one line (on every rank alike, so all stop together). 06_eval.py checks its protocol with it."""
    common.check_resumed_output(out_dir / "args.json", stage, n_done,
                                {"inputs": inputs, **{k: getattr(args, k) for k in keys}}, what, note)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the future-oriented reward and the label (docs/design.md section 3)


def rollout_outcome(critic_scores: list[float], theta: float, max_turns: int) -> tuple[bool, int]:
    """(success, t_end) of a critic trace c_1, c_2, ...: success at the first t with c_t > theta;
    otherwise a failure after max_turns supporter turns (t_end = T)."""
    for t, c in enumerate(critic_scores, 1):
        if c > theta:
            return True, t
    return False, max_turns


def future_reward(critic_scores: list[float], success: bool, end_turn: int, max_turns: int, lambda_eff: float) -> float:
    """r_fut = c_end + lambda_eff * 1[success] * (T - t_end) / (T - 1): the critic's final judgement plus an
    efficiency bonus that is lambda_eff for success at turn 1 and 0 for success at turn T."""
    c_end = critic_scores[-1]
    return c_end + lambda_eff * float(success) * (max_turns - end_turn) / (max_turns - 1)


def reward_label(r_fut: float, delta: float) -> int:
    """Binary target of the reward model: 1[r_fut > delta]."""
    return int(r_fut > delta)


def label_records(records: list[dict], args) -> list[dict]:
    """(Re)compute reward and label of every record from its stored critic trace (deviation 3)."""
    for r in records:
        r["reward"] = future_reward(r["critic_scores"], r["success"], r["end_turn"], args.max_turns, args.lambda_eff)
        r["label"] = reward_label(r["reward"], args.delta)
    return records


# ----------------------------------------------------------------------------------------------------
# The critic (PPDPP): four options for the seeker's state, each with its value (docs/design.md section 3)

CRITIC_OPTIONS = [("The seeker feels worse.", -1.0), ("The seeker feels the same.", -0.5),
                  ("The seeker feels better.", 0.5), ("The seeker's issue is solved.", 1.0)]
CRITIC_PROMPT = (
    "Read this conversation between a supporter and a help-seeker and judge how the seeker feels now, at "
    "its end.\n\n{dialogue}\n\nChoose exactly one option:\n"
    "- The seeker feels worse.\n- The seeker feels the same.\n- The seeker feels better.\n"
    "- The seeker's issue is solved.\nAnswer with the option only."
)


def critic_chats(histories: list[list[dict]]) -> list[list[dict]]:
    """One question per dialogue: how does the seeker feel at its end?"""
    return [[{"role": "user", "content": CRITIC_PROMPT.format(dialogue=common.render_dialogue(h))}] for h in histories]


def match_critic_option(text: str) -> float | None:
    """Value of the first option the text names (sample mode), or None."""
    t = text.lower()
    keys = [("worse", -1.0), ("the same", -0.5), ("solved", 1.0), ("better", 0.5)]
    hits = [(t.find(k), v) for k, v in keys if k in t]
    return min(hits)[1] if hits else None


def critic_scores(backend: backends.Backend, histories: list[list[dict]], mode: str = "likelihood", n: int = 10,
                  temperature: float = 1.1, seed: int | None = None) -> list[float]:
    """Critic score in [-1, 1] of each dialogue, one batched call.

    likelihood: sum_k p_k v_k with p_k = softmax over the four options of log p(option_k | prompt)
                (the exact expectation over the option set; deterministic);
    sample:     PPDPP: n samples at `temperature`, each matched to the first option it names; the mean
                of matched values (0 if none matched).
    """
    chats = critic_chats(histories)
    if mode == "likelihood":
        lp = torch.tensor(backend.option_loglik(chats, [o for o, _ in CRITIC_OPTIONS]), dtype=torch.float64)
        v = torch.tensor([v for _, v in CRITIC_OPTIONS], dtype=torch.float64)
        return (torch.softmax(lp, dim=-1) @ v).tolist()
    outs = backend.generate(chats, n=n, temperature=temperature, max_new_tokens=16, seed=seed)
    scores = []
    for samples in outs:
        vals = [v for v in map(match_critic_option, samples) if v is not None]
        scores.append(sum(vals) / len(vals) if vals else 0.0)
    return scores


# ----------------------------------------------------------------------------------------------------
# Lock-step conversation simulation: supporter, seeker and critic (also 06_eval.py's interactive part
# and role-plays)


@dataclass
class Roles:
    """The three conversation roles of docs/design.md section 3 with their decoding settings."""
    policy: backends.Backend
    seeker: backends.Backend
    critic: backends.Backend
    policy_system: str | None = common.ESC_SYSTEM
    policy_kw: dict = field(default_factory=lambda: dict(max_new_tokens=64, temperature=1.0, top_p=1.0))
    seeker_kw: dict = field(default_factory=lambda: dict(max_new_tokens=48, temperature=0.7, top_p=0.9))
    critic_mode: str = "likelihood"
    critic_n: int = 10
    critic_temperature: float = 1.1


def simulate_lockstep(roles: Roles, cases: list[dict], starts: list[list[dict]], *, max_turns: int = 8,
                      theta: float = 0.5, first_replies: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Roll every conversation forward together until the critic's score passes theta or max_turns
    supporter turns (RLFF-ESC stage 1; PPDPP's interactive protocol).

    starts[i]: the dialogue so far, ending with a seeker message; cases[i]: the record with the persona.
    first_replies[i]: if given, supporter turn 1 (the candidate being scored); else the policy writes it.
    One round = one batched call per role over the live conversations (supporter, seeker, critic);
    finished conversations drop out. Returns per case {trajectory, critic_scores, success, end_turn}.
    Only replies stripped of <think>/<strategy> parts enter the history the other roles see.
    """
    n = len(cases)
    hist = [list(s) for s in starts]
    res = [{"trajectory": [], "critic_scores": [], "success": False, "end_turn": max_turns} for _ in range(n)]
    live = list(range(n))
    for t in range(1, max_turns + 1):
        if not live:
            break
        # supporter turn t (turn 1 may be the given candidate)
        if t == 1 and first_replies is not None:
            replies = [first_replies[i] for i in live]
        else:
            chats = [([{"role": "system", "content": roles.policy_system}] if roles.policy_system else []) + hist[i]
                     for i in live]
            replies = roles.policy.complete(chats, seed=seed + 3 * t, **roles.policy_kw)
        for i, y in zip(live, replies):
            m = {"role": "assistant", "content": common.strip_reasoning(y)}
            hist[i].append(m)
            res[i]["trajectory"].append(m)
        # the seeker reacts
        reacts = roles.seeker.complete(common.seeker_chats([cases[i] for i in live], [hist[i] for i in live]),
                                       seed=seed + 3 * t + 1, **roles.seeker_kw)
        for i, u in zip(live, reacts):
            m = {"role": "user", "content": " ".join(u.split()) or "..."}
            hist[i].append(m)
            res[i]["trajectory"].append(m)
        # the critic judges the seeker's state
        scores = critic_scores(roles.critic, [hist[i] for i in live], roles.critic_mode, roles.critic_n,
                               roles.critic_temperature, seed=seed + 3 * t + 2)
        nxt = []
        for i, c in zip(live, scores):
            res[i]["critic_scores"].append(float(c))
            if c > theta:
                res[i]["success"], res[i]["end_turn"] = True, t
            elif t < max_turns:
                nxt.append(i)
        live = nxt
    return res


# ----------------------------------------------------------------------------------------------------
# Contexts, chunks, one chunk's simulation


def select_contexts(turns: list[dict], per_dialogue: int | None, max_examples: int | None,
                    context_window: int = 0) -> list[dict]:
    """Input order; at most `per_dialogue` contexts per dialogue (evenly spread), then the first max_examples;
    each context cut to its last `context_window` messages (0 = whole)."""
    if per_dialogue:
        by_dialog: dict[str, list[dict]] = {}
        for t in turns:
            by_dialog.setdefault(t["dialog_id"], []).append(t)
        keep = set()
        for ts in by_dialog.values():
            n = len(ts)
            for i in range(min(per_dialogue, n)):
                keep.add(ts[(2 * i + 1) * n // (2 * min(per_dialogue, n))]["id"])  # centres of K equal parts
        turns = [t for t in turns if t["id"] in keep]
    turns = turns[:max_examples] if max_examples else turns
    if context_window:
        turns = [dict(t, context=common.last_messages(t["context"], context_window)) for t in turns]
    return turns


def candidate_ids(turn: dict, m: int) -> list[str]:
    return [f"{turn['id']}-c{j}" for j in range(m)]


def chunk_seed(seed: int, k: int) -> int:
    """Seed of chunk k: a function of (--seed, k) only, never of the rank or the number of ranks."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def simulate_chunk(roles: Roles, turns: list[dict], *, m: int, max_turns: int, theta: float, seed: int,
                   cand_kw: dict, lambda_eff: float, delta: float, context_window: int = 0) -> list[dict]:
    """Sample m candidates per context (one batched call, n = m), roll all C*m conversations forward in
    lock-step, and return one rollouts.jsonl record per candidate (context-major order). context_window: the
    --context-window the contexts were cut with, stored in each record for the reward model (03)."""
    common.seed_everything(seed)
    sys_msg = [{"role": "system", "content": roles.policy_system}] if roles.policy_system else []
    cands = roles.policy.generate([sys_msg + t["context"] for t in turns], n=m, seed=seed, **cand_kw)  # [C][m]
    cases = [t for t in turns for _ in range(m)]  # [C*m], context-major
    sims = simulate_lockstep(roles, cases, [t["context"] for t in cases], max_turns=max_turns, theta=theta,
                                    first_replies=[y for ys in cands for y in ys], seed=seed)
    records = []
    for i, (t, sim) in enumerate(zip(cases, sims)):
        success, end_turn = rollout_outcome(sim["critic_scores"], theta, max_turns)
        assert (success, end_turn) == (sim["success"], sim["end_turn"]), "simulate_lockstep disagrees with rollout_outcome"
        r = future_reward(sim["critic_scores"], success, end_turn, max_turns, lambda_eff)
        records.append({
            "id": candidate_ids(t, m)[i % m], "turn_id": t["id"], "dialog_id": t["dialog_id"], "context": t["context"],
            "response": sim["trajectory"][0]["content"],  # the reply as the seeker saw it (<think> etc. stripped)
            "reward": r, "label": reward_label(r, delta), "success": success, "end_turn": end_turn,
            "critic_scores": sim["critic_scores"], "trajectory": sim["trajectory"],
            "context_window": context_window,  # the reward model reads contexts by the same rule (03, 04)
        })
    return records


# ----------------------------------------------------------------------------------------------------
# Summary


def summarize(records: list[dict], args) -> dict:
    """Success rate, turns, reward histogram, label balance, and the turn-1 critic scores (to choose theta)."""
    T = args.max_turns
    rewards = np.array([r["reward"] for r in records], dtype=np.float64)
    labels = np.array([r["label"] for r in records])
    succ = np.array([r["success"] for r in records], dtype=bool)
    ends = np.array([r["end_turn"] for r in records])
    c1 = np.array([r["critic_scores"][0] for r in records], dtype=np.float64)
    counts, edges = np.histogram(rewards, bins=10, range=(-1.0, 1.0 + args.lambda_eff))
    q = lambda x: {k: float(np.quantile(x, v)) for k, v in (("min", 0), ("p25", .25), ("median", .5), ("p75", .75), ("max", 1))}
    return {
        "candidates": len(records), "contexts": len({r["turn_id"] for r in records}),
        "dialogues": len({r["dialog_id"] for r in records}),
        "success_rate": float(succ.mean()), "mean_end_turn": float(ends.mean()),
        "sr_at_t": [float((succ & (ends <= t)).mean()) for t in range(1, T + 1)],
        "mean_reward": float(rewards.mean()), "reward_quantiles": q(rewards),
        "reward_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        "positive_rate": float(labels.mean()), "positives": int(labels.sum()),
        "critic_turn1_quantiles": q(c1),
        "theta": args.theta, "delta": args.delta, "lambda_eff": args.lambda_eff, "max_turns": T,
    }


def print_summary(s: dict):
    print(f"{s['candidates']} candidates for {s['contexts']} contexts ({s['dialogues']} dialogues): "
          f"success rate {s['success_rate']:.1%}, mean turns {s['mean_end_turn']:.2f}, mean r_fut {s['mean_reward']:.3f}, "
          f"labels: {s['positives']} positive ({s['positive_rate']:.1%})")
    print("SR@t " + " ".join(f"{t}:{v:.2f}" for t, v in enumerate(s["sr_at_t"], 1)))
    h = s["reward_histogram"]
    top = max(max(h["counts"]), 1)
    print("r_fut histogram:")
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        print(f"  [{lo:+.2f}, {hi:+.2f})  {c:6d}  {'#' * round(30 * c / top)}")
    q = s["critic_turn1_quantiles"]
    print(f"critic score at turn 1: min {q['min']:.3f} p25 {q['p25']:.3f} median {q['median']:.3f} "
          f"p75 {q['p75']:.3f} max {q['max']:.3f}")


def degenerate_label_message(s: dict, args) -> str | None:
    """The one-line error for an all-0 / all-1 label set, naming the knobs to turn, or None."""
    n, pos = s["candidates"], s["positives"]
    if 0 < pos < n:
        return None
    q, c1 = s["reward_quantiles"], s["critic_turn1_quantiles"]["median"]
    if q["max"] > q["min"]:
        relabel = (f"re-run the same command with --delta {q['median']:.3f} (the median r_fut) to relabel these "
                   "rollouts without simulating again")
    else:
        relabel = "every r_fut is equal, so no --delta separates them"
    if pos == n:
        return (f"all {n} labels are 1: every r_fut is above --delta {args.delta} (r_fut ranges {q['min']:.3f}.."
                f"{q['max']:.3f}); {relabel}; or raise --theta (with --overwrite; the turn-1 critic median is {c1:.3f}): "
                "a critic that passes everything, like the embedded model (README), cannot tell replies apart, "
                "use a capable --critic")
    return (f"all {n} labels are 0: no r_fut is above --delta {args.delta} (r_fut ranges {q['min']:.3f}..{q['max']:.3f}); "
            f"{relabel}; or lower --theta (with --overwrite; the turn-1 critic median is {c1:.3f}) so that more "
            "conversations succeed")


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # Validation before any work: input file, selection, role specs.
    turns = common.load_turns(args.data, split="train", learn_only=args.learn_only, max_chars=args.max_message_chars)
    check(len(turns) > 0, f"{args.data}: no train contexts" + (" with learn == true" if args.learn_only else ""))
    turns = select_contexts(turns, args.per_dialogue, args.max_examples, args.context_window)
    specs = {r: common.parse_spec(getattr(args, r)) for r in ("policy", "seeker", "critic")}
    for role, ms in specs.items():
        check(ms.backend != "openai" or getattr(args, f"{role}_base_url") or os.environ.get("OPENAI_API_KEY"),
              f"--{role} {ms}: an openai: model needs --{role}-base-url or $OPENAI_API_KEY")
    mode = args.critic_mode
    if mode == "auto":
        mode = "sample" if specs["critic"].backend == "openai" else "likelihood"
    check(not (mode == "likelihood" and specs["critic"].backend == "openai"),
          "--critic-mode likelihood needs an hf: or vllm: critic (openai: servers give no prompt log-probs)")
    m, C = args.num_candidates, args.batch_size
    order = [cid for t in turns for cid in candidate_ids(t, m)]

    out_dir = Path(args.out)
    inputs = common.input_digests(args, ("data",))
    dist = common.init_dist(args.device)
    common.lock_out(out_dir, dist)  # one run at a time on --out
    done = set() if args.overwrite or not out_dir.exists() else common.ResumableOutput(out_dir, "rollouts.jsonl").done
    check_resume_settings(args, out_dir, len(done), inputs)  # same input and simulation settings, else stop
    all_chunks = common.chunks(turns, C)  # chunk k = contexts [k*C, (k+1)*C)
    todo_all = [k for k, ch in enumerate(all_chunks) if not all(c in done for t in ch for c in candidate_ids(t, m))]

    roles = None
    cache = role_cache.open_cache(args)  # --role-cache: the roles' answers recorded / replayed
    if todo_all:  # every rank loads the models at the same point (vLLM under torchrun needs that)
        mk = lambda r: backends.make_backend(getattr(args, r), getattr(args, f"{r}_base_url"), str(dist.device), args.dtype,
                                             decoder=args.decoder, cache=cache)
        roles = Roles(
            policy=mk("policy"), seeker=mk("seeker"), critic=mk("critic"),
            policy_kw=dict(max_new_tokens=args.max_new_tokens, temperature=args.supporter_temperature, top_p=args.top_p),
            seeker_kw=dict(max_new_tokens=args.seeker_max_new_tokens, temperature=args.seeker_temperature,
                           top_p=args.seeker_top_p),
            critic_mode=mode, critic_n=args.critic_samples, critic_temperature=args.critic_temperature)
    common.barrier(dist)  # every rank has read `done` before rank 0 may delete outputs (--overwrite)
    out = common.ResumableOutput(out_dir, "rollouts.jsonl", dist.rank, dist.world, overwrite=args.overwrite)
    if dist.main:
        common.save_args(args, out_dir, {"stage": "02_simulate", "critic_mode_used": mode, "inputs": inputs})
    mine = [k for k in todo_all if k % dist.world == dist.rank]  # whole chunks, round-robin over ranks
    common.print0(f"{len(turns)} contexts x {m} candidates = {len(order)} conversations in {len(all_chunks)} chunks of "
                  f"{C} contexts; {len(order) - len(done & set(order))} missing, {len(todo_all)} chunk(s) to simulate "
                  f"on {dist.world} rank(s)")

    cand_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    bar = common.progress(total=sum(len(all_chunks[k]) * m for k in mine), desc="simulate", unit="conv")
    for k in mine:
        recs = simulate_chunk(roles, all_chunks[k], m=m, max_turns=args.max_turns, theta=args.theta,
                              seed=chunk_seed(args.seed, k), cand_kw=cand_kw, lambda_eff=args.lambda_eff,
                              delta=args.delta, context_window=args.context_window)
        out.append([r for r in recs if r["id"] not in done])  # a chunk cut short earlier: only its missing ids
        bar.update(len(recs))
    bar.close()
    common.barrier(dist)

    if dist.main:  # merge the parts in input order, relabel with this run's --delta / --lambda-eff, summarize
        recs = label_records(out.merge(order), args)  # (records of an earlier, larger run come last)
        common.write_jsonl(out.final, recs)
        s = summarize(recs, args)
        common.write_json(out_dir / "simulate_stats.json", s)
        print_summary(s)
        print(f"wrote {out.final} and {out_dir / 'simulate_stats.json'}")
    role_cache.report(cache, out_dir, dist)  # this run's hits / misses, over all ranks (a log: OUT/role_cache.json)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    if dist.main:
        msg = degenerate_label_message(s, args)
        if msg:
            raise InputError(msg)


if __name__ == "__main__":
    common.run_main(main)
