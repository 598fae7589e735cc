"""Judge dimensions: ESC-Eval-style ratings (Zhao et al. 2024) of fixed-length role-plays, 0-4 on seven dimensions
(fluency, diversity, empathy, information, human-likeness, skill, overall; our wording).

Each test case becomes a role-play of --judge-rounds supporter turns through 02's lock-step engine with no critic
(06 deviation 2: the interactive dialogues stop at the first success, so their lengths would differ by policy).
The judge then rates every transcript on every dimension d (deviation 3):

  likelihood mode (hf:/vllm: judges)  one question per dimension, score_d = sum_{k=0..4} k * p(k),
                                      p = softmax over the log-likelihoods of the digits "0".."4"
  generate mode (openai: judges)      one JSON answer {d: 0-4} per transcript at temperature 0; an invalid answer
                                      is re-asked (--retries, sampled at 0.7), then recorded as null and counted
The table gives each dimension's mean over the transcripts that parsed, with a percentile bootstrap 95% CI.
"""
from __future__ import annotations

import math

import torch

import backends
import common
from protocols.base import Protocol, dialogue_record, fmt, md_table, simulate, stat
from protocols.cases import opening_message


DIMENSIONS = {  # our own words after ESC-Eval's seven dimensions; 0 = worst, 4 = best
    "fluency": "Fluency: 0 = broken or incoherent text; 2 = understandable with awkward or inconsistent passages; "
               "4 = natural, coherent and consistent throughout.",
    "diversity": "Diversity: 0 = the supporter repeats the same phrases or template every turn; 2 = some variety; "
                 "4 = varied wording and approaches, every turn adds something new.",
    "empathy": "Empathy: 0 = ignores or dismisses the seeker's feelings; 2 = generic sympathy; 4 = understands, "
               "reflects and validates this seeker's specific feelings.",
    "information": "Information: 0 = no useful content, or unsafe advice; 2 = generic suggestions; 4 = concrete, "
                   "relevant and well-timed suggestions or information that fit the situation.",
    "human_likeness": "Human-likeness: 0 = obviously a machine (lists, disclaimers, robotic phrasing); 2 = somewhat "
                      "natural; 4 = reads like a caring person chatting.",
    "skill": "Skill: 0 = no support strategy; 2 = some strategies used mechanically; 4 = questions, reflection, "
             "validation, reframing and suggestions used at the right moments.",
    "overall": "Overall: 0 = harmful or useless; 2 = somewhat helpful; 4 = the seeker would clearly feel supported "
               "and helped.",
}
JUDGE_PROMPT = (
    "You are an expert in emotional-support conversations. Read this conversation between a help-seeker and a "
    "supporter and rate the supporter.\n\n{dialogue}\n\n{rubric}\n\n{answer}"
)
JUDGE_ANSWER_ONE = "Answer with a single digit from 0 to 4."
JUDGE_ANSWER_ALL = ("Answer with one JSON object and nothing else, with an integer from 0 to 4 for every "
                    "dimension: {" + ", ".join(f'"{k}": 0-4' for k in DIMENSIONS) + "}")


def judge_chats(dialogues: list[list[dict]], mode: str) -> list[list[dict]]:
    """likelihood: one chat per (dialogue, dimension), dimension-minor; generate: one chat per dialogue."""
    chats = []
    for d in dialogues:
        text = common.render_dialogue(d)
        if mode == "likelihood":
            chats += [[{"role": "user", "content": JUDGE_PROMPT.format(dialogue=text, rubric=r, answer=JUDGE_ANSWER_ONE)}]
                      for r in DIMENSIONS.values()]
        else:
            chats.append([{"role": "user", "content": JUDGE_PROMPT.format(
                dialogue=text, rubric="\n".join(DIMENSIONS.values()), answer=JUDGE_ANSWER_ALL)}])
    return chats


def validate_dims(obj, i) -> dict:
    out = {}
    for k in DIMENSIONS:
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 4:
            raise ValueError(f"{k} must be a number in [0, 4]")
        out[k] = float(v)
    return out


def judge_dimensions(backend, dialogues: list[list[dict]], mode: str, *, retries: int = 2, max_new_tokens: int = 160,
                     seed: int = 0) -> tuple[list[dict | None], list[str], int]:
    """Scores {dimension: 0..4} per dialogue (None when the answer never parsed), raw answers, failures.

    likelihood: E[score] = sum_k k * softmax_k(log p("k" | question)) over the digits 0..4 (deviation 3)."""
    chats = judge_chats(dialogues, mode)
    if mode == "likelihood":
        D = len(DIMENSIONS)
        lp = torch.tensor(backend.option_loglik(chats, [str(k) for k in range(5)]), dtype=torch.float64)  # [n*D, 5]
        exp = (torch.softmax(lp, -1) @ torch.arange(5, dtype=torch.float64)).view(len(dialogues), D)  # [n, D]
        return [dict(zip(DIMENSIONS, row.tolist())) for row in exp], [""] * len(dialogues), 0
    res = backends.ask_json(backend, chats, validate_dims, retries=retries, max_new_tokens=max_new_tokens,
                            temperature=0.0, seed=seed)
    return res.values, res.raw, res.failed


class NoCritic(backends.Backend):
    """A critic that is never consulted for stopping: role-plays run a fixed number of rounds (deviation 2)."""

    spec = "none"

    def option_loglik(self, chats, options):
        return [[0.0] * len(options) for _ in chats]

    def generate(self, chats, **kw):
        raise TypeError("NoCritic is only asked for option log-likelihoods (likelihood mode)")


def roleplay_chunk(roles: simulate.Roles, judge, label: str, cases: list[dict], *, rounds: int, judge_mode: str,
                   retries: int, judge_max_new_tokens: int, seed: int) -> list[dict]:
    """Fixed-length role-plays (no critic), then the judge's seven scores for each (one batched call)."""
    common.seed_everything(seed)
    rp = simulate.Roles(policy=roles.policy, seeker=roles.seeker, critic=NoCritic(), policy_system=roles.policy_system,
                        policy_kw=roles.policy_kw, seeker_kw=roles.seeker_kw, critic_mode="likelihood")
    starts = [[opening_message(c)] for c in cases]
    sims = simulate.simulate_lockstep(rp, cases, starts, max_turns=rounds, theta=math.inf, seed=seed)
    recs = [dialogue_record("roleplay", label, c, s[0], sim) for c, s, sim in zip(cases, starts, sims)]
    scores, raw, _ = judge_dimensions(judge, [r["messages"] for r in recs], judge_mode, retries=retries,
                                      max_new_tokens=judge_max_new_tokens, seed=seed)
    for r, sc, rw in zip(recs, scores, raw):
        r["judge"] = sc
        if sc is None:
            r["judge_raw"] = rw[:1000]
    return recs


class Judge(Protocol):
    name, kind = "judge", "roleplay"
    inputs = ("dialogues", "cards", "profiles")  # a case's situation opens the conversation
    default_on = ("dialogues",)
    seed_id, section, empty = 3, 3, {"n": 0, "failed": 0, "dims": {}}
    eval_keys = ("judge", "judge_mode_used", "judge_rounds", "retries", "judge_max_new_tokens")

    def add_args(self, p):
        p.add_argument_group("judge dimensions").add_argument(
            "--judge-rounds", type=int, default=5, help="supporter turns of each judged role-play (ESC-Eval-style: 5)")

    def check_args(self, args):
        common.check(args.judge_rounds >= 1, "--judge-rounds must be >= 1")

    def roles(self, args):
        return {"seeker": True, "judge": False}

    def load(self, run):
        return {"judge": run.make("judge")}

    def run_chunk(self, run, roles, label, items, seed):
        a = run.args
        return roleplay_chunk(roles, run.backends[self.name]["judge"], label, items, rounds=a.judge_rounds,
                              judge_mode=a.judge_mode_used, retries=a.retries, judge_max_new_tokens=a.judge_max_new_tokens,
                              seed=seed)

    def summarise(self, run, label, records):
        ok = [r["judge"] for r in records if r["judge"] is not None]
        B, seed = run.args.bootstrap, run.args.seed
        return {"n": len(ok), "failed": len(records) - len(ok), "dims": {k: stat([j[k] for j in ok], B, seed) for k in DIMENSIONS}}

    def settings(self, run):
        a = run.args
        return {"judge_rounds": a.judge_rounds, "judge": a.judge, "judge_settings": f"{a.judge_mode_used} mode" + (
            " (expected 0-4 score from the digits' log-likelihoods; pairwise: most likely of A/B/tie)"
            if a.judge_mode_used == "likelihood" else f" (JSON at temperature 0, {a.retries} re-asks at 0.7)")}

    def role_rows(self, run):  # the judge of this protocol and of pairwise
        return [["judge", run.args.judge, self.settings(run)["judge_settings"], bool({"judge", "pairwise"} & set(run.parts))]]

    def report(self, scores):
        st, pols = scores["settings"], scores["policies"]
        return [f"## Judge dimensions (ESC-Eval style, 0-4) on {st['judge_rounds']}-round role-plays", "",
                md_table(["policy", "n", "failed"] + list(DIMENSIONS),
                         [[p["label"], str(p["judge"]["n"]), str(p["judge"]["failed"])] +
                          [fmt(p["judge"]["dims"].get(k), 2) for k in DIMENSIONS] for p in pols]), ""]

    def brief(self, s):
        return f" judge overall {fmt(s['dims']['overall'], 2)}" if s["n"] else ""
