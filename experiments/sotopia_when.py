"""When does a Sotopia policy accept? On a file of training contexts of the scripted twin (envs/sotopia.py
turns.jsonl), sample G actions per context from each policy, as 05 does (temperature 1, top-p 1), and count the
actions that close a deal (the rules' outcome: an acceptance of the partner's standing offer, envs/sotopia_scripted.py)
separately at the contexts that answer the partner's final offer and at the earlier ones where an offer of the
partner stands. A policy that has learnt the timing accepts far more often at the first kind than at the second; one
that has only learnt how often to accept, about as often at both. docs/results.md, "2026-12-07 (twelfth run)", uses it.

  python experiments/sotopia_when.py --data runs/experiments/sotopia_scripted_v5_bal/contexts/turns-balanced.jsonl \
      --policy warm=runs/experiments/sotopia_scripted_v5_coin/warm/model \
      --policy rapo=runs/experiments/sotopia_scripted_v5_bal/rapo/adapter --out when.json
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backends  # noqa: E402
import common  # noqa: E402
from envs import sotopia as S  # noqa: E402
from envs import sotopia_scripted as R  # noqa: E402


def turn_task(t: dict) -> dict:
    """The rules' reading of the policy agent's task at a context (the evaluator's view of the scenario)."""
    st = t["sotopia"]
    return R.task_of(R.parse_background(S.background(st["setup"], None)), st["agent"])


def context_kind(t: dict) -> str | None:
    """"final" (the last message is the partner's and says "final offer"), "earlier" (another offer of the partner
    stands) or None (no offer of the partner stands: accepting is not a move there)."""
    st = t["sotopia"]
    msgs, me = st["messages"], st["agent"]
    if msgs and msgs[-1]["agent"] != me and "final offer" in msgs[-1]["argument"].lower():
        return "final"
    return "earlier" if R.outcome(turn_task(t), msgs)["offers"][1 - me] is not None else None


def closes_deal(t: dict, text: str) -> bool:
    """Whether the action `text` (an agent's reply) closes a deal at the partner's standing offer, by the rules."""
    st = t["sotopia"]
    a = S.parse_action(text)
    me = st["agent"]
    msgs = st["messages"] + [{"turn": len(st["messages"]), "agent": me, "action_type": a["action_type"],
                              "argument": a["argument"]}]
    return R.outcome(turn_task(t), msgs)["closed_by"] == me


def accept_rates(turns: list[dict], texts: list[list[str]]) -> dict:
    """{kind: {"contexts", "samples", "accepts", "rate"}} over the contexts of each kind, and "gap" = final - earlier."""
    out = {}
    for kind in ("final", "earlier"):
        idx = [i for i, t in enumerate(turns) if context_kind(t) == kind]
        acc = sum(closes_deal(turns[i], x) for i in idx for x in texts[i])
        n = sum(len(texts[i]) for i in idx)
        out[kind] = {"contexts": len(idx), "samples": n, "accepts": acc, "rate": round(acc / n, 4) if n else None}
    f, e = out["final"]["rate"], out["earlier"]["rate"]
    out["gap"] = round(f - e, 4) if f is not None and e is not None else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training contexts (envs/sotopia.py turns.jsonl, or a subset of it)")
    p.add_argument("--policy", action="append", required=True, metavar="LABEL=SPEC",
                   help="a policy to sample from (model spec, a merged model folder or a PEFT adapter folder, or "
                        "scripted:NAME); repeat for several")
    p.add_argument("-G", "--group-size", type=int, default=8, help="actions sampled per context (05's G)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (05 samples at 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="action length")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", default=None, help="also write the counts as JSON here (rewritten after each policy)")
    a = p.parse_args(argv)
    turns = common.read_jsonl(Path(a.data))
    for i, t in enumerate(turns):
        common.check("sotopia" in t and "context" in t,
                     f"{a.data}: record {i + 1}: no 'sotopia' state or 'context' (not envs/sotopia.py turns)")
    common.check(a.group_size >= 1 and a.max_new_tokens >= 1, "-G and --max-new-tokens must be >= 1")
    pols = []
    for s in a.policy:
        label, sep, spec = s.partition("=")
        common.check(bool(sep and label and spec), f"--policy {s}: expected LABEL=SPEC")
        pols.append((label, spec))
    kinds = [context_kind(t) for t in turns]
    print(f"{a.data}: {kinds.count('final')} contexts answer a final offer, {kinds.count('earlier')} an earlier offer, "
          f"{kinds.count(None)} no offer (not counted)")
    chats = [[{"role": "system", "content": S.AGENT_SYSTEM}] + t["context"] for t in turns]
    res = {}
    for label, spec in pols:
        b = backends.make_backend(spec, None, a.device)
        texts = b.generate(chats, n=a.group_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_p=1.0, seed=a.seed)
        res[label] = {"spec": spec, **accept_rates(turns, texts)}
        r = res[label]
        print(f"{label}: accepts at the final offer {r['final']['rate']} ({r['final']['accepts']}/{r['final']['samples']}), "
              f"at an earlier offer {r['earlier']['rate']} ({r['earlier']['accepts']}/{r['earlier']['samples']}), "
              f"gap {r['gap']}")
        if a.out:  # after each policy: a long run stopped early keeps what it measured
            common.write_json(Path(a.out), {"data": a.data, "settings": {k: v for k, v in vars(a).items() if k != "out"},
                                            "policies": res})


if __name__ == "__main__":
    common.run_main(main)
