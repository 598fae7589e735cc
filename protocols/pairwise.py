"""Pairwise preference: for every pair of policies (a, b) the judge compares their replies to the same test
context (the reference protocol's replies), by RAPO's rubric (05_rapo.RUBRIC), in both orders.

Order 1 shows a's reply as "A", order 2 shows it as "B" (one batched judge call for both). Each verdict becomes a
sign for a (+1 a preferred, -1 b preferred, 0 tie); the outcome of a comparison is

  outcome = s_1  if s_1 = s_2,  else 0 (a tie)     MT-Bench's conservative rule (06 deviation 4)
  win = P(outcome = +1), tie = P(outcome = 0), loss = P(outcome = -1)   (%, percentile bootstrap 95% CIs)

A comparison whose answer never parsed (either order) is left out and counted. Two diagnostics: the share of
comparisons whose verdict is the same in both orders, and how often the judge chose the reply shown first (its
position bias). likelihood mode: the most likely of "A", "B", "tie"; generate mode: JSON {"better": ...}.
"""
from __future__ import annotations

import itertools
import json

import numpy as np

import backends
import common
from protocols.base import Protocol, chunk_seed, fmt, md_table, stat

rapo = common.load_stage("05_rapo")  # RUBRIC: the criteria RAPO's reward model compares replies by


PAIRWISE_PROMPT = (
    "Two supporters answered the same help-seeker. {rubric}\n\nConversation so far:\n{context}\n\n"
    "Reply A:\n{a}\n\nReply B:\n{b}\n\nWhich reply gives better emotional support as the supporter's next "
    "message? {answer}"
)
PAIRWISE_ANSWER_ONE = "Answer with A, B or tie only."
PAIRWISE_ANSWER_JSON = 'Answer with one JSON object and nothing else: {"better": "A" or "B" or "tie", "reason": "..."}'


def pairwise_chats(contexts: list[list[dict]], first: list[str], second: list[str], mode: str) -> list[list[dict]]:
    ans = PAIRWISE_ANSWER_ONE if mode == "likelihood" else PAIRWISE_ANSWER_JSON
    return [[{"role": "user", "content": PAIRWISE_PROMPT.format(rubric=rapo.RUBRIC, context=common.render_dialogue(c),
                                                                 a=a, b=b, answer=ans)}]
            for c, a, b in zip(contexts, first, second)]


def validate_verdict(obj, i) -> str:
    v = str(obj["better"]).strip().strip(".").lower()
    if v not in ("a", "b", "tie"):
        raise ValueError("better must be A, B or tie")
    return {"a": "A", "b": "B", "tie": "tie"}[v]


PAIRWISE_OPTIONS = ["A", "B", "tie"]


def judge_pairs(backend, contexts: list[list[dict]], replies_a: list[str], replies_b: list[str], mode: str, *,
                retries: int = 2, max_new_tokens: int = 160, seed: int = 0) -> tuple[list, list, list, list]:
    """Verdicts in both orders, one batched call: order 1 shows policy a as 'A', order 2 shows it as 'B'.
    Returns (verdicts order 1, verdicts order 2, raw 1, raw 2); a verdict is 'A', 'B', 'tie' or None."""
    n = len(contexts)
    chats = (pairwise_chats(contexts, replies_a, replies_b, mode)  # order 1: A = policy a
             + pairwise_chats(contexts, replies_b, replies_a, mode))  # order 2: A = policy b
    if mode == "likelihood":
        ll = backend.option_loglik(chats, PAIRWISE_OPTIONS)  # [2n, 3]
        verdicts, raw = [PAIRWISE_OPTIONS[int(np.argmax(r))] for r in ll], [json.dumps(r) for r in ll]
    else:
        res = backends.ask_json(backend, chats, validate_verdict, retries=retries, max_new_tokens=max_new_tokens,
                                temperature=0.0, seed=seed)
        verdicts, raw = res.values, res.raw
    return verdicts[:n], verdicts[n:], raw[:n], raw[n:]


def verdict_signs(v1: str, v2: str) -> tuple[int, int]:
    """Each order's verdict as a sign for policy a: +1 a preferred, -1 b preferred, 0 tie.
    Order 1 shows a as 'A', order 2 shows a as 'B'."""
    return {"A": 1, "B": -1, "tie": 0}[v1], {"B": 1, "A": -1, "tie": 0}[v2]


def pairwise_outcome(v1: str | None, v2: str | None) -> int | None:
    """Outcome for policy a: +1 win, -1 loss, 0 tie; a verdict that is not the same in both orders is a
    tie (deviation 4); None if either answer never parsed."""
    if v1 is None or v2 is None:
        return None
    s1, s2 = verdict_signs(v1, v2)
    return s1 if s1 == s2 else 0


def pairwise_summary(records: list[dict], n_boot: int, seed: int) -> dict:
    """Win/tie/loss of policy a against b (%, with CIs), failures, the share of comparisons whose verdict
    is the same in both orders, and how often the judge chose the reply shown first (its position bias)."""
    ok = [r for r in records if r["outcome"] is not None]
    o = np.array([r["outcome"] for r in ok], dtype=np.float64)  # [n] in {+1, 0, -1}
    same = [np.equal(*verdict_signs(r["verdict_ab"], r["verdict_ba"])) for r in ok]
    first = [v == "A" for r in ok for v in (r["verdict_ab"], r["verdict_ba"])]
    return {"n": len(ok), "failed": len(records) - len(ok),
            "win": stat(o == 1, n_boot, seed, 100), "tie": stat(o == 0, n_boot, seed, 100),
            "loss": stat(o == -1, n_boot, seed, 100),
            "order_consistent": 100 * float(np.mean(same)) if ok else None,
            "first_shown_chosen": 100 * float(np.mean(first)) if ok else None}


def pairwise_chunk(judge, a: str, b: str, items: list[tuple[dict, str, str]], *, judge_mode: str, retries: int,
                   max_new_tokens: int, seed: int) -> list[dict]:
    """items: (turn, reply of a, reply of b). Both orders in one batched judge call."""
    v1, v2, r1, r2 = judge_pairs(judge, [t["context"] for t, _, _ in items], [x for _, x, _ in items],
                                 [y for _, _, y in items], judge_mode, retries=retries,
                                 max_new_tokens=max_new_tokens, seed=seed)
    return [{"id": f"pairwise/{a} vs {b}/{t['id']}", "a": a, "b": b, "turn_id": t["id"], "verdict_ab": x,
             "verdict_ba": y, "outcome": pairwise_outcome(x, y), "raw_ab": ra[:500], "raw_ba": rb[:500]}
            for (t, _, _), x, y, ra, rb in zip(items, v1, v2, r1, r2)]


class Pairwise(Protocol):
    name = kind = "pairwise"
    output, unit, seed_id, section, empty, per_policy = "pairwise.jsonl", "turns", 4, 6, [], False
    default_on = ("dialogues",)
    eval_keys = ("judge", "judge_mode_used", "retries", "judge_max_new_tokens")

    def roles(self, args):
        return {"judge": False}

    def pairs(self, run) -> list[tuple[str, str]]:
        return list(itertools.combinations([label for label, _ in run.policies], 2))

    def uses(self, run):
        return ["reference"] if self.pairs(run) else []  # every policy's replies to the test turns

    def all_ids(self, run):
        return [f"pairwise/{a} vs {b}/{t['id']}" for a, b in self.pairs(run) for t in run.turns]

    def run_all(self, run):
        pairs, dist, a_ = self.pairs(run), run.dist, run.args
        if not pairs:
            common.print0(f"pairwise: skipped ({self.settings(run)['pairwise_note']})")
            return
        if dist.main:
            run.outs["replies.jsonl"].merge([f"reply/{lab}/{t['id']}" for lab, _ in run.policies for t in run.turns])
        common.barrier(dist)
        replies = {r["id"]: r["reply"] for r in common.read_jsonl(run.outs["replies.jsonl"].final)}
        todo = any(i not in run.done for i in self.all_ids(run))
        judge = run.make("judge") if todo else None  # on every rank at one point
        for a, b in pairs:
            items = [(t, replies[f"reply/{a}/{t['id']}"], replies[f"reply/{b}/{t['id']}"]) for t in run.turns]
            chs = common.chunks(items, a_.batch_size)
            ks = [k for k in run.mine(chs) if any(f"pairwise/{a} vs {b}/{t['id']}" not in run.done for t, _, _ in chs[k])]
            for k in common.progress(ks, desc=f"pairwise {a} vs {b}", unit="chunk"):
                recs = pairwise_chunk(judge, a, b, chs[k], judge_mode=a_.judge_mode_used, retries=a_.retries,
                                      max_new_tokens=a_.judge_max_new_tokens, seed=chunk_seed(a_.seed, self.seed_id, k))
                run.outs[self.output].append([r for r in recs if r["id"] not in run.done])

    def summarise(self, run, label, records):
        by_id = {r["id"]: r for r in records}
        out = []
        for a, b in self.pairs(run):
            rs = [by_id[i] for i in (f"pairwise/{a} vs {b}/{t['id']}" for t in run.turns) if i in by_id]
            out.append({"a": a, "b": b, **pairwise_summary(rs, run.args.bootstrap, run.args.seed)})
        return out

    def settings(self, run):
        return {"pairwise_note": "needs at least two --policy" if self.name in run.parts and not self.pairs(run) else ""}

    def report(self, scores):
        L = ["## Pairwise preference (judge sees both orders; a verdict that changes with the order is a tie)", ""]
        if not scores["pairwise"]:
            return L + [f"Skipped: {scores['settings'].get('pairwise_note', 'needs at least two policies')}.", ""]
        return L + [md_table(["A vs B", "n", "A wins (%)", "tie (%)", "B wins (%)", "failed", "order-consistent (%)",
                              "first shown chosen (%)"],
                             [[f"{q['a']} vs {q['b']}", str(q["n"]), fmt(q["win"]), fmt(q["tie"]), fmt(q["loss"]),
                               str(q["failed"]), fmt({"value": q["order_consistent"]}),
                               fmt({"value": q["first_shown_chosen"]})] for q in scores["pairwise"]]), ""]

    def brief(self, summary):
        return "\n".join(f"{q['a']} vs {q['b']}: win {fmt(q['win'])}% tie {fmt(q['tie'])}% loss {fmt(q['loss'])}% (n={q['n']})"
                         for q in summary)
