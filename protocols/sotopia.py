"""Sotopia (Zhou et al., ICLR 2024; RAPO section 4.2, Table 2, Table 9): two-agent social episodes on a Sotopia
profile folder (--test-data FOLDER), rated by an evaluator on Sotopia's seven dimensions (envs/sotopia.py).

Self-play (--sotopia-mode selfplay, RAPO Table 2): the evaluated policy plays both agents, and both are scored.
Partner mode (--sotopia-mode partner, Table 9's "GPT-4o-as-Partner"): the other agent is --partner; the policy plays
agent 0 (--sotopia-sides 1) or, in a second episode, agent 1 too (--sotopia-sides 2), and only its agent is scored.
Scenarios: every one of the folder (--sotopia-subset all) or Sotopia-hard's (hard: the public id list), each with its
first --sotopia-pairings pairings (default: all, Sotopia's 5 per scenario). Episodes: round-robin, at most
--sotopia-max-turns actions (20), ended early by a leave or more than 2 consecutive "none"; the policy's replies
that are not action JSON are taken as speech and counted. The evaluator (--evaluator; RAPO: GPT-4o) answers JSON per
agent and dimension; invalid answers are re-asked (--retries), then recorded as null and counted.

Numbers: GOAL (0..10) and OVERALL (the unweighted mean of the seven dimensions) per subset, with the seven
dimensions; each is a mean over scenarios (a scenario's value: the mean over its episodes and scored agents) with a
percentile bootstrap 95% CI over scenarios. RAPO averages 3 runs: run 06 with three --seed values.
"""
from __future__ import annotations

from pathlib import Path

import common
from common import check
from envs import sotopia as S
from protocols.base import Protocol, fmt, md_table, stat


def folder_cases(path: str) -> list[dict]:
    """Every episode of a Sotopia profile folder (validated: one line naming file, record and field), as 06's cases;
    the protocol's prepare() narrows them to its subset, pairings and sides."""
    profiles = S.load_profiles(path)
    return [dict(c, case_id=c["id"]) for c in S.select_cases(profiles, "all", None, 2)]


class Sotopia(Protocol):
    name = kind = "sotopia"
    inputs = default_on = ("sotopia",)
    own_roles = ("partner", "evaluator")  # --partner, --evaluator: add_args below
    seed_id, section, empty = 7, 7, {"episodes": 0}
    eval_keys = ("sotopia_mode", "sotopia_subset", "sotopia_pairings", "sotopia_sides", "sotopia_max_turns", "partner",
                 "partner_temperature", "evaluator", "evaluator_max_new_tokens", "retries")

    def add_args(self, p):
        g = p.add_argument_group("sotopia (--test-data: a Sotopia profile folder; RAPO Table 2 / Table 9)")
        g.add_argument("--sotopia-mode", default="selfplay", choices=["selfplay", "partner"],
                       help="selfplay: the policy plays both agents (RAPO Table 2); partner: the other agent is "
                            "--partner (RAPO Table 9: GPT-4o)")
        g.add_argument("--sotopia-subset", default="all", choices=["all", "hard"],
                       help="every scenario of the folder, or Sotopia-hard's 14 (public ids, envs/sotopia.HARD_ENV_IDS); "
                            "with all, the report also gives the hard ones present")
        g.add_argument("--sotopia-pairings", type=int, default=None,
                       help="pairings (agent pairs) per scenario, in file order (default: all; Sotopia has 5)")
        g.add_argument("--sotopia-sides", type=int, default=1, choices=[1, 2],
                       help="partner mode: 1 = the policy plays agent 0; 2 = also agent 1, in a second episode")
        g.add_argument("--sotopia-max-turns", type=int, default=S.MAX_TURNS,
                       help="actions per episode, both agents (Sotopia: 20)")
        common.add_role_arg(g, "partner", "the other agent in --sotopia-mode partner (RAPO: GPT-4o)")
        g.add_argument("--partner-temperature", type=float, default=0.7, help="partner sampling temperature (ours: 0.7)")
        common.add_role_arg(g, "evaluator", "Sotopia's evaluator of the seven dimensions (RAPO: GPT-4o)")
        g.add_argument("--evaluator-max-new-tokens", type=int, default=1024,
                       help="evaluator answer length (14 reasons and scores)")

    def check_args(self, args):
        check(args.sotopia_pairings is None or args.sotopia_pairings >= 1, "--sotopia-pairings must be >= 1")
        check(args.sotopia_max_turns >= 1 and args.evaluator_max_new_tokens >= 1,
              "--sotopia-max-turns and --evaluator-max-new-tokens must be >= 1")
        check(args.sotopia_sides == 1 or args.sotopia_mode == "partner",
              "--sotopia-sides 2 needs --sotopia-mode partner (in self-play the policy already plays both agents)")
        check(args.partner_temperature >= 0, "--partner-temperature must be >= 0")

    def prepare(self, run):
        a = run.args
        profiles = S.load_profiles(a.test_data)
        cases = S.select_cases(profiles, a.sotopia_subset, a.sotopia_pairings,
                               a.sotopia_sides if a.sotopia_mode == "partner" else 1)
        run.cases = [dict(c, case_id=c["id"]) for c in cases][:a.max_examples or None]
        check(run.cases, f"{a.test_data}: no pairings to play" + (" in Sotopia-hard" if a.sotopia_subset == "hard" else ""))
        run.read[self.name] = profiles

    def roles(self, args):
        return {"evaluator": True, **({"partner": True} if args.sotopia_mode == "partner" else {})}

    def load(self, run):
        return {r: run.make(r) for r in self.roles(run.args)}

    def run_chunk(self, run, roles, label, items, seed):
        a, own = run.args, run.backends[self.name]
        selfplay = a.sotopia_mode == "selfplay"
        players = [["policy", "policy"] if selfplay else (["policy", "partner"] if c["side"] == 0 else ["partner", "policy"])
                   for c in items]
        backends = {"policy": roles.policy, **({} if selfplay else {"partner": own["partner"]})}
        gen_kw = {"policy": roles.policy_kw,
                  "partner": dict(roles.policy_kw, temperature=a.partner_temperature)}
        recs, _ = S.play_chunk(run.read[self.name], items, players, backends, gen_kw, own["evaluator"],
                               max_turns=a.sotopia_max_turns, seed=seed, retries=a.retries,
                               eval_max_new_tokens=a.evaluator_max_new_tokens)
        return [dict(r, id=f"{self.kind}/{label}/{r['id']}", kind=self.kind, policy=label, case_id=r["id"]) for r in recs]

    def summarise(self, run, label, records):
        a = run.args
        return S.summarize(records, lambda v: stat(v, a.bootstrap, a.seed))

    def settings(self, run):
        a = run.args
        return {"sotopia": {
            "protocol": f"Sotopia {a.sotopia_mode} on {a.test_data} ({a.sotopia_subset} scenarios, "
                        f"{a.sotopia_pairings or 'all'} pairing(s) each" + (f", {a.sotopia_sides} side(s)" if
                                                                           a.sotopia_mode == "partner" else "") +
                        f"), at most {a.sotopia_max_turns} actions per episode, evaluator on seven dimensions",
            "mode": a.sotopia_mode, "partner": a.partner if a.sotopia_mode == "partner" else None,
            "evaluator": a.evaluator, "evaluator_settings": f"JSON per agent and dimension, greedy, {a.retries} re-asks, "
                                                           f"max {a.evaluator_max_new_tokens} new tokens",
            "policy_prompt": "envs/sotopia.AGENT_SYSTEM and the agent's view (not --policy-system); the policy's "
                             "--temperature, --top-p and --max-new-tokens"}}

    def role_rows(self, run):
        a, used = run.args, self.name in run.parts
        rows = [["evaluator (sotopia)", a.evaluator, self.settings(run)["sotopia"]["evaluator_settings"], used]]
        if a.sotopia_mode == "partner":
            rows.append(["partner (sotopia)", a.partner, f"temperature {a.partner_temperature}, top-p {a.top_p}", used])
        return rows

    def report(self, scores):
        st, pols = scores["settings"]["sotopia"], scores["policies"]
        rows = {p["label"]: p["sotopia"] for p in pols if p["sotopia"].get("episodes")}
        L = [f"## Sotopia ({st['mode']}; RAPO Table 2 / Table 9)", "", st["protocol"] + ". GOAL 0..10; OVERALL = the "
             "mean of the seven dimensions; means over scenarios with 95% bootstrap CIs over scenarios. Every episode "
             "(with the evaluator's reasons) is in dialogs.jsonl.", "", S.report_tables(rows), "",
             md_table(["policy", "episodes", "evaluator failed", "policy actions not JSON", "ended: leave / stale / max",
                       "mean turns"],
                      [[k, str(s["episodes"]), str(s["evaluator_failed"]),
                        f"{s['policy_invalid_actions']} of {s['policy_actions']}",
                        " / ".join(str(s["ends"][e]) for e in ("leave", "stale", "max_turns")), f"{s['mean_turns']:.1f}"]
                       for k, s in rows.items()]), ""]
        return L

    def brief(self, s):
        if not s.get("episodes") or "all" not in s:
            return ""
        return f" sotopia GOAL {fmt(s['all']['goal'], 2)} OVERALL {fmt(s['all']['overall'], 2)} (n={s['episodes']});"
