"""What the two benchmark protocols (esc_eval.py, emoharbor.py) share: seeker-first conversations, one rating
question per dimension to a judge (or one judge per dimension), the parse of a score, and the summary.

  score_d (likelihood) = sum_{k=lo..hi} k * softmax_k(log p("k" | question_d))     (06 deviation 3)
  score_d (generate)   = the JSON "score" or the first number of the answer, if a whole number in [lo, hi];
                         else re-asked (sampled at 0.7, --retries times) and counted, then left out
  mean                 = (1/|D|) sum_d score_d, over the dialogues with every dimension parsed (RAPO's 'mean')
each with a percentile bootstrap 95% CI over dialogues.
"""
from __future__ import annotations

import re

import numpy as np
import torch

import backends
import common
from protocols.base import Protocol, fmt, md_table, simulate, stat


NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, lo: int, hi: int) -> tuple[int | None, str]:
    """(score, '') for an answer naming a whole number in [lo, hi]; (None, 'unparseable' | 'out_of_range')
    otherwise. The number is a JSON object's "score" if there is one, else the first number in the text."""
    obj = backends.extract_json(text)
    v = obj.get("score") if isinstance(obj, dict) else None
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        m = NUMBER_RE.search(text)
        if m is None:
            return None, "unparseable"
        v = float(m.group())
    if v != int(v):
        return None, "unparseable"  # 2.5 on an integer scale
    if not lo <= v <= hi:
        return None, "out_of_range"
    return int(v), ""


def dim_backends(spec: str, dims, make) -> dict:
    """{dimension: backend}: one per dimension when the spec has a '{dim}' placeholder (a per-dimension scorer
    such as ESC-Rank's adapters), else one backend shared by every dimension."""
    if "{dim}" in spec:
        return {d: make(spec.replace("{dim}", d)) for d in dims}
    b = make(spec)
    return {d: b for d in dims}


def rate_dimensions(judges: dict, chats: list[dict[str, list[dict]]], lo: int, hi: int, mode: str, *,
                    retries: int = 2, max_new_tokens: int = 16, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Per dialogue: scores {dimension: value or None}, {dimension: raw answer} of the invalid ones, answer counts.

    One batched call per distinct backend (all dimensions of all dialogues that backend scores).
    likelihood: E[score] = sum_k k * softmax_k(log p("k" | question)) over the digits lo..hi (deviation 3);
    generate: greedy, then each invalid answer (unparseable, or a number outside [lo, hi]) is re-asked (sampled
    at 0.7, only the invalid ones, batched) up to `retries` times; every invalid answer is counted by kind, and
    what never parsed stays None ('failed')."""
    dims = list(chats[0]) if chats else []
    scores = [dict.fromkeys(dims) for _ in chats]
    raw = [{} for _ in chats]
    counts = [{"asked": len(dims), "unparseable": 0, "out_of_range": 0, "retried": 0, "failed": 0} for _ in chats]
    groups: dict[int, list[str]] = {}  # id(backend) -> its dimensions
    for d in dims:
        groups.setdefault(id(judges[d]), []).append(d)
    digits = [str(k) for k in range(lo, hi + 1)]
    for ds in groups.values():
        backend = judges[ds[0]]
        items = [(i, d) for i in range(len(chats)) for d in ds]  # dialogue-major
        if mode == "likelihood":
            lp = torch.tensor(backend.option_loglik([chats[i][d] for i, d in items], digits), dtype=torch.float64)
            exp = torch.softmax(lp, -1) @ torch.arange(lo, hi + 1, dtype=torch.float64)  # [len(items)]
            for (i, d), v in zip(items, exp.tolist()):
                scores[i][d] = v
            continue
        todo = items
        for attempt in range(retries + 1):
            if not todo:
                break
            if attempt:
                for i, _ in todo:
                    counts[i]["retried"] += 1
            outs = backend.complete([chats[i][d] for i, d in todo], max_new_tokens=max_new_tokens,
                                    temperature=0.0 if attempt == 0 else 0.7, seed=seed + attempt)
            nxt = []
            for (i, d), text in zip(todo, outs):
                v, why = parse_score(text, lo, hi)
                if v is None:
                    counts[i][why] += 1
                    raw[i][d] = text[:500]
                    nxt.append((i, d))
                else:
                    scores[i][d] = float(v)
                    raw[i].pop(d, None)
            todo = nxt
        for i, _ in todo:
            counts[i]["failed"] += 1
    return scores, raw, counts


def protocol_summary(records: list[dict], dims, n_boot: int, seed: int) -> dict:
    """Per-dimension means over the dialogues whose answer parsed, the mean of the dimensions over dialogues
    with every dimension parsed (RAPO's 'mean'), with CIs, and the answer counts summed over dialogues."""
    if not records:
        return {"n": 0}
    full = [r for r in records if all(r["scores"].get(d) is not None for d in dims)]
    counts = {k: sum(r["answers"][k] for r in records) for k in records[0]["answers"]}
    return {"n": len(records), "complete": len(full), "answers": counts,
            "dims": {d: stat([r["scores"][d] for r in records if r["scores"].get(d) is not None], n_boot, seed)
                     for d in dims},
            "mean": stat([float(np.mean([r["scores"][d] for d in dims])) for r in full], n_boot, seed)}


def converse(roles: simulate.Roles, seeker_systems: list[str], starts: list[list[dict]], *, rounds: int, hidden: int,
             seed: int) -> list[list[dict]]:
    """Seeker-first role-plays in lock-step: each round, one batched seeker call over every conversation, then
    one batched policy call. starts[i]: the messages before the seeker's first one (ESC-Eval: the greeting).
    The seeker plays seeker_systems[i] and sees the dialogue with roles swapped (common.seeker_chats); the
    policy sees its system prompt and the dialogue without its first `hidden` messages (ESC-Eval's model under
    test never sees the greeting). Replies enter the history stripped of <think>/<strategy> parts."""
    hist = [list(s) for s in starts]
    sys_msg = [{"role": "system", "content": roles.policy_system}] if roles.policy_system else []
    for t in range(1, rounds + 1):
        chats = [[{"role": "system", "content": s}] + c[1:]  # common's persona prompt replaced by the card/profile
                 for s, c in zip(seeker_systems, common.seeker_chats([{}] * len(hist), hist))]
        for h, u in zip(hist, roles.seeker.complete(chats, seed=seed + 2 * t, **roles.seeker_kw)):
            h.append({"role": "user", "content": " ".join(u.split()) or "..."})
        replies = roles.policy.complete([sys_msg + h[hidden:] for h in hist], seed=seed + 2 * t + 1, **roles.policy_kw)
        for h, y in zip(hist, replies):
            h.append({"role": "assistant", "content": common.strip_reasoning(y)})
    return hist


def protocol_record(kind: str, label: str, case: dict, messages: list[dict], scores: dict, raw: dict,
                    counts: dict) -> dict:
    r = {"id": f"{kind}/{label}/{case['case_id']}", "kind": kind, "policy": label, "case_id": case["case_id"],
         "messages": messages, "scores": scores, "answers": counts}
    if raw:
        r["invalid_answers"] = raw  # the last invalid answer of each dimension that was re-asked or failed
    return r


def protocol_judge_note(mode: str, retries: int, lo: int, hi: int) -> str:
    if mode == "likelihood":
        return f"likelihood mode (expected score over the digits {lo}-{hi} from their log-likelihoods)"
    return (f"generate mode (greedy; an unparseable or out-of-range answer is re-asked up to {retries} times at "
            "temperature 0.7, then recorded as missing)")


class RatedConversations(Protocol):
    """A benchmark protocol: conversations on cases, then ratings on `dims` (name, rubric) from lo to hi."""

    inputs = ("dialogues", "cards", "profiles")
    dims: dict = {}
    lo, hi = 0, 4
    title = ""
    settings_key, role_label = "", ""  # its key in scores.json's settings; its row in the report's roles table
    rounds_flag, cases_key = "", ""  # its --*-rounds flag; what its cases are called in its settings
    chunk = None  # chunk(roles, judges, label, cases, *, rounds, judge_mode, retries, judge_max_new_tokens, seed)
    judge_role = "judge"  # the role that rates: judge, or the simulated user (user_judge)

    def roles(self, args):
        return {"seeker": False, self.judge_role: False}  # their prompts are this protocol's: never `scripted`

    def load(self, run):
        return dim_backends(getattr(run.args, self.judge_role), self.dims, lambda spec: run.make(self.judge_role, spec))

    def summarise(self, run, label, records):
        return protocol_summary(records, list(self.dims), run.args.bootstrap, run.args.seed)

    def run_chunk(self, run, roles, label, items, seed):
        a = run.args
        return self.chunk(roles, run.backends[self.name], label, items, rounds=getattr(a, self.rounds_flag),
                          judge_mode=self.mode(a), retries=a.retries, judge_max_new_tokens=a.judge_max_new_tokens,
                          seed=seed, **self.chunk_kw(run))

    def chunk_kw(self, run) -> dict:
        return {}

    def mode(self, args) -> str:
        return getattr(args, f"{self.judge_role}_mode_used")

    def settings(self, run):
        a = run.args
        note = protocol_judge_note(self.mode(a), a.retries, self.lo, self.hi) + self.prompts_note(a)
        return {self.settings_key: {"protocol": self.protocol_text(a), "seeker": a.seeker, **self.judge_fields(a),
                                    "judge_settings": note, self.cases_key: self.cases_text(run)}}

    def prompts_note(self, args) -> str:
        return ""

    def role_rows(self, run):
        how = self.settings(run)[self.settings_key]["judge_settings"]
        return [[self.role_label, getattr(run.args, self.judge_role), how, self.name in run.parts]]

    def report(self, scores):
        st, pols, part = scores["settings"], scores["policies"], self.name
        pr = st[self.settings_key]
        judge = pr.get("user_judge") or pr["judge"]
        L = [f"## {self.title} ({self.lo}-{self.hi} per dimension; mean = mean of the {len(self.dims)} dimensions)", "",
             f"Protocol: {pr['protocol']}. Cases: {pr.get('cards') or pr.get('profiles')}. Seeker: `{pr['seeker']}`; "
             f"{'rated by the simulated user' if self.judge_role == 'user_judge' else 'judge'}: `{judge}`"
             + (" (one model per dimension)" if "{dim}" in judge else "") + f"; {pr['judge_settings']}.", "",
             md_table(["policy", "n"] + [n for n, _ in self.dims.values()] + ["mean"],
                      [[p["label"], str(p.get(part, {}).get("n", 0))]
                       + [fmt(p.get(part, {}).get("dims", {}).get(k), 2) for k in self.dims]
                       + [fmt(p.get(part, {}).get("mean"), 2)] for p in pols]), ""]
        if pr["judge_settings"].startswith("generate"):
            L += ["Answers: " + "; ".join(
                f"{p['label']}: {a['asked']} asked, {a['unparseable']} unparseable, {a['out_of_range']} out of range, "
                f"{a['retried']} re-asked, {a['failed']} never valid; {p[part]['complete']}/{p[part]['n']} dialogues "
                "with every dimension" for p in pols if p.get(part, {}).get("n") for a in [p[part]["answers"]]), ""]
        return L

    def brief(self, s):
        return f" {self.name} mean {fmt(s['mean'], 2)} (n={s['n']});" if s.get("n") else ""
