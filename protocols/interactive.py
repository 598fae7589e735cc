"""Interactive success: PPDPP's protocol (Deng et al. 2024), the success rate RLFF-ESC reports.

For each test case the seeker (a user simulator playing the dialogue's persona) opens with the dialogue's situation;
policy and seeker then alternate in 02's lock-step engine (02_simulate.simulate_lockstep: one batched call per role
per turn over the chunk), and after each seeker message the critic rates the seeker's state, c_t in [-1, 1]
(PPDPP's four options, as expectation or sample mean: 02's critic). The dialogue succeeds at the first supporter
turn t with c_t > theta, and fails after T turns without it.

  SR    = (1/n) sum_i 1[success_i]                          (success rate, %)
  AT    = (1/n) sum_i t_i,  t_i = end turn, T for a failure  (average turns)
  reward = (1/n) sum_i c_end,i, the critic's last score      (06 deviation 1: PPDPP reports SR and AT only;
                                                             RLFF-ESC's efficiency bonus belongs to training)
  SR@t  = (1/n) sum_i 1[success_i and t_i <= t], t = 1..T    (plotted with its CI band: sr_at_t.png)
each with a percentile bootstrap 95% CI over cases.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import common
from protocols.base import Protocol, bootstrap_ci, dialogue_record, fmt, md_table, pyplot, simulate, stat
from protocols.cases import opening_message


def interactive_summary(records: list[dict], max_turns: int, n_boot: int, seed: int) -> dict:
    """SR, AT (T for failures), average reward (c_end, deviation 1) and SR@t for t = 1..T, with CIs."""
    if not records:
        return {"n": 0}
    succ = np.array([r["success"] for r in records], dtype=np.float64)  # [n]
    ends = np.array([r["end_turn"] if r["success"] else max_turns for r in records], dtype=np.float64)  # [n]
    c_end = np.array([r["critic_scores"][-1] for r in records], dtype=np.float64)  # [n]
    at_t = (succ[:, None] > 0) & (ends[:, None] <= np.arange(1, max_turns + 1)[None, :])  # [n, T]
    ci = bootstrap_ci(at_t.astype(np.float64), n_boot, seed)
    sr_at_t = [{"value": float(at_t[:, t].mean()) * 100,
                "ci": None if ci is None else [float(ci[0][t]) * 100, float(ci[1][t]) * 100]} for t in range(max_turns)]
    return {"n": len(records), "sr": stat(succ, n_boot, seed, 100), "avg_turns": stat(ends, n_boot, seed),
            "avg_reward": stat(c_end, n_boot, seed), "sr_at_t": sr_at_t}


def interactive_chunk(roles: simulate.Roles, label: str, cases: list[dict], *, max_turns: int, theta: float,
                      seed: int) -> list[dict]:
    """PPDPP's protocol for a chunk of cases: the seeker opens with the situation, lock-step until success or T."""
    common.seed_everything(seed)
    starts = [[opening_message(c)] for c in cases]
    sims = simulate.simulate_lockstep(roles, cases, starts, max_turns=max_turns, theta=theta, first_replies=None,
                                      seed=seed)
    recs = []
    for c, s, sim in zip(cases, starts, sims):
        r = dialogue_record("interactive", label, c, s[0], sim)
        r.update(critic_scores=sim["critic_scores"], success=sim["success"], end_turn=sim["end_turn"],
                 reward=sim["critic_scores"][-1])
        recs.append(r)
    return recs


def plot_sr_at_t(rows: list[tuple[str, dict]], path: Path) -> bool:
    """SR@t per policy with its 95% CI band."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for j, (label, s) in enumerate(rows):
        pts = s["sr_at_t"]
        t = np.arange(1, len(pts) + 1)
        y = [p["value"] for p in pts]
        line, = ax.plot(t, y, marker="osD^v<>"[j % 7], ls=["-", "--", ":", "-."][j % 4], lw=2, markersize=7,
                        label=f"{label} (n={s['n']})")
        if pts and pts[0]["ci"] is not None:
            ax.fill_between(t, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("supporter turns t", fontsize=12)
    ax.set_ylabel("success rate within t turns (%)", fontsize=12)
    ax.set_title("SR@t (bands: 95% bootstrap CI)", fontsize=13)
    ax.set_ylim(-2, 102)
    ax.set_xticks(np.arange(1, max(len(s["sr_at_t"]) for _, s in rows) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


class Interactive(Protocol):
    name = kind = "interactive"
    inputs = ("dialogues", "cards", "profiles")  # a case's situation opens the conversation
    default_on = ("dialogues",)
    seed_id, section, empty = 2, 1, {"n": 0}
    eval_keys = ("critic", "critic_mode_used", "critic_samples", "critic_temperature", "max_turns", "theta")

    def check_args(self, args):
        check = common.check
        check(args.max_turns >= 1, "--max-turns must be >= 1")
        check(-1.0 <= args.theta < 1.0, "--theta must be in [-1, 1): critic scores lie in [-1, 1] and success needs c_t > theta")
        check(args.critic_samples >= 1, "--critic-samples must be >= 1")

    def roles(self, args):
        return {"seeker": True, "critic": True}

    def run_chunk(self, run, roles, label, items, seed):
        return interactive_chunk(roles, label, items, max_turns=run.args.max_turns, theta=run.args.theta, seed=seed)

    def summarise(self, run, label, records):
        return interactive_summary(records, run.args.max_turns, run.args.bootstrap, run.args.seed)

    def settings(self, run):
        a = run.args
        return {"max_turns": a.max_turns, "theta": a.theta, "critic": a.critic,
                "critic_settings": f"{a.critic_mode_used} mode" + (
                    f", {a.critic_samples} samples at temperature {a.critic_temperature}" if a.critic_mode_used == "sample"
                    else " (expectation over the four options)") + f"; success when c_t > {a.theta}"}

    def role_rows(self, run):
        return [["critic", run.args.critic, self.settings(run)["critic_settings"], self.name in run.parts]]

    def plots(self, run, policy_scores, out_dir):
        rows = [(p["label"], p["interactive"]) for p in policy_scores if p["interactive"]["n"]]
        return {"sr_at_t": plot_sr_at_t(rows, out_dir / "sr_at_t.png")} if rows else {}

    def report(self, scores):
        st, pols = scores["settings"], scores["policies"]
        T = st["max_turns"]
        return [f"## Interactive success (PPDPP protocol, T = {T}, success when c_t > {st['theta']})", "",
                "SR and SR@t in %; AT = average supporter turns (T for failures); reward = mean final critic score "
                "c_end in [-1, 1].", "",
                md_table(["policy", "n", "SR (%)", "AT", "avg reward"],
                         [[p["label"], str(p["interactive"]["n"]), fmt(p["interactive"].get("sr")),
                           fmt(p["interactive"].get("avg_turns"), 2), fmt(p["interactive"].get("avg_reward"), 3)]
                          for p in pols]), "",
                md_table(["policy"] + [f"SR@{t}" for t in range(1, T + 1)],
                         [[p["label"]] + [fmt(x, 0) for x in p["interactive"].get("sr_at_t", [])] for p in pols]), "",
                "![SR@t](sr_at_t.png)" if st["plots"].get("sr_at_t") else f"(SR@t plot: {st['plots'].get('note', '')})",
                ""]

    def brief(self, s):
        return f" SR {fmt(s['sr'])}% AT {fmt(s['avg_turns'], 2)} reward {fmt(s['avg_reward'], 3)} (n={s['n']});" if s.get("n") else ""
