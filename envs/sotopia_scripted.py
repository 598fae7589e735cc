"""A scripted Sotopia environment whose answer is known: two scenario families a rule can score, a generator of
training scenarios of those families, a rule partner, a rule evaluator and a rule GRM (docs/design.md section 11).

Why: as on ESC (envs/esc.py), the embedded 135M model cannot play a capable partner, evaluator or GRM, so with it
RAPO has nothing to learn from on a CPU. Here the partner, the evaluator and the GRM follow stated rules, behind
the Backend interface (the spec `scripted`: `--partner scripted`, `--evaluator scripted`, `--grm scripted`); they
read the same prompts an LLM would read (envs/sotopia.py's templates, inverted by envs.esc.unformat) and answer in
the same form (an action's JSON, the evaluator's JSON, the GRM's JSON). Results in it are results in a scripted
environment, not on people.

THE RULES (fixed before any evaluation of a trained policy; each is a few lines below)
Families (read_task), recognised from a scenario and a goal, in the benchmark's phrasings and the generator's:
  bargain  the scenario lists an item for $L; each goal names the role (buyer or seller) and a target price $T.
  divide   the scenario lists item counts ("3 books, 2 hats and 1 ball"); each goal gives the agent's private
           points per item ("books give you 5 points each", "a hat is worth 3 points", "1 apple = 1 point").
  Anything else is "open": the rules cannot score its goal (GOAL 5, financial 0 for everyone).
Offers (outcome): in bargain, the last dollar amount an agent names is its offer; in divide, "I take <items>" and/or
  "you take <items>" (the other side gets the rest). An agreement is an accepting message ("deal", "I accept",
  "agreed", "sounds good", "works for me"; not "no deal", "can't", "cannot", "won't") that names no new offer
  (or repeats the other's): it closes at the other agent's standing offer; later messages change nothing.
Partner (partner_action; k = the partner's own earlier actions, K = K_CONCEDE = 3):
  bargain seller asks L - (L - T) min(1, k / K) (from the listing down to its target); buyer offers
          a0 + (T - a0) min(1, k / K), a0 = 0.7 T (up to its target). It accepts the other's standing offer once
          the offers cross (seller: offer >= ask; buyer: offer <= its bid) and says why it refuses otherwise.
  divide  it needs N_k = 0.9 - 0.4 min(1, k / K) of its own total points (0.9 down to 0.5); it accepts a proposal
          that gives it at least N_k, otherwise refuses and proposes the greedy split (its most valuable items
          first) reaching N_k.
  Its offer at k = K (its target, its floor of 0.5) is announced as its final offer; if the other does not take it
  (or make an offer it accepts) at once, it walks away at its next turn without a deal. It leaves once a deal is
  closed, or after two hostile messages from the other. Open scenarios: it asks what the other has in mind and
  leaves at its 5th turn.
Evaluator (evaluate_episode; agent a, its own messages only):
  goal       bargain: no deal 0; buyer 10 clip(1 - (p - T) / (T / 2), 0, 1), seller 10 clip(1 - (T - p) / (T / 2),
             0, 1) (full marks at or beyond the target, 0 at 50% off it); divide: no deal 0, else
             10 min(1, points / (0.7 total)); open: 5.
  financial  bargain: buyer clip(10 (T - p) / T, -5, 5), seller clip(10 (p - T) / T, -5, 5); divide:
             clip(10 points / total - 5, -5, 5); no deal or open: 0.
  believability  10 - 2 per broken action (speech holding JSON debris "{" / "action_type"; a message with no letter
             and no digit: empty, "$.", "...") - 2 per repetition (Jaccard of tokens, words and numbers, >= 0.8
             with one of its earlier messages) - 1 per message over 60 words.
  relationship   +1 if polite once (please, thank, appreciate) - 2 per hostile message (HOSTILE) - 1 for leaving a
             bargain/divide before any deal (leaving early); clip -5..5.
  knowledge  2 per question that seeks information: a message with "?" that names no offer (an offer phrased as a
             question is a proposal) and is not a repetition of an earlier question of the agent, at most 10.
  secret     -10 if a message holds 60% of the content words of its profile secret (2 or more such words);
             else -5 if it gives away its private numbers (bargain: "target", "bottom line", "my limit" or
             "budget is" next to a number; divide: any "N point(s)"); else 0.
  social_rules  -3 per hostile message, at least -10.
GRM (grm_answer; RAPO Eq. 10 with the rules as judge, from the view of the candidate's agent): each candidate's
  conversation is extended by it and the partner's reaction (a reaction at turn TURN_LIMIT or later is left out: the
  episode is over by then); value = GOAL of the closed deal; with an offer of the partner still open, the GOAL that
  offer would give if the agent has a turn left before TURN_LIMIT to accept it, else 0; 0 with no offer standing or
  after leaving without a deal; plus the other rule dimensions' penalties on the candidate's agent (believability -
  10, relationship, secret, social_rules) and knowledge / 5; score = clip((value + 25) / 40, 0, 1); ranks by score,
  ties by position (1e-6 steps, as envs/esc.py); the analysis states the outcome and the faults. TURN_LIMIT = 10
  actions: the GRM assumes the episode length of experiments/sotopia_scripted.py since its sixth run (its contexts
  and its evaluation; it refuses other lengths under these rules).

RULE VERSIONS (RULES_VERSION; the experiment records it and the commit that last changed this file). Each version is
fixed in a commit before any policy trained under it is evaluated.
  1  commit 0ff2a13: the first five runs of experiments/sotopia_scripted.py (docs/results.md).
  2  two weak rules found in those runs closed, nothing else changed: a message with no letter and no digit is a
     broken action (v1 let "$." keep believability 10), and knowledge pays a question once and not for an offer
     phrased as a question (v1 paid 2 points per message with a "?": "speak?" scored knowledge 10).
  3  two changes after the sixth run (docs/results.md), nothing else changed: repetition compares tokens with their
     numbers (v2 compared letter words only, so a bare "$30." said again and again was no repetition, and two offers
     that differ only in their amounts were one); the GRM values an offer still open after the reaction at 0.6 x its
     GOAL, not 0.8 x (with 0.8 the GRM ranked waiting above accepting the partner's offer in 12 of 14 bargaining
     and 10 of 18 item-division contexts of the fifth run, while the start policy's own 10-turn context episodes
     closed a deal in 10 of 16: an open offer is worth about that share of a closed one).
  4  one change after the seventh run (docs/results.md), nothing else changed: an offer still open after the reaction
     is worth its full GOAL while the agent has a turn left to accept it before the turn limit (TURN_LIMIT = 10
     actions), and 0 after it (v3: 0.6 x its GOAL at any turn, which ranked accepting the partner's current offer
     above waiting for its next concession at almost every turn, so that RL learnt to take the first offer; on the
     generated training scenarios, taking the first offer reaches a fraction of the GOAL that taking the offer
     standing at the agent's last turn does: docs/results.md, eighth run).
  5  the partner (and the rule agent, the same function) changes after the eighth run (docs/results.md), nothing else
     changed: it concedes over K = 3 of its turns (was 4; divide: N_k = 0.9 - 0.4 min(1, k / 3), was max(0.5,
     0.9 - 0.1 k)), announces its offer at k = K as its final offer, and walks away without a deal at its next turn
     if that offer is not taken. Before, nothing told the other agent when waiting stopped paying: its floor came at
     its 5th action, after the last turn the other could accept it at in 10-action episodes, and refusing it cost
     nothing, so no GRM could rank taking it above waiting except by the turn number.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
from envs import sotopia as S

RULES_VERSION = 5  # RULE VERSIONS above
TURN_LIMIT = 10  # actions per episode the GRM assumes (an offer open at the agent's last turn is worth nothing)
K_CONCEDE = 3  # partner turns from its opening offer to its final one (its target, or half its points)
PARTNER_RULES = 2  # the rule partner's (and rule agent's) behaviour: 1 in rules versions 1-4, 2 from version 5
HOSTILE = ("stupid", "idiot", "shut up", "ridiculous", "liar", "hate you", "scam", "rip-off", "rip off", "greedy",
           "pathetic", "get lost", "damn", "moron", "useless")
POLITE = ("please", "thank", "appreciate")
ACCEPT = ("deal", "i accept", "accepted", "agreed", "i agree", "sounds good", "works for me", "let's do it")
REJECT = ("no deal", "not a deal", "can't", "cannot", "won't", "not accept", "don't accept", "no way")
STOP = set("""the and you are was for but not his her she him had has its our out who why how can did get got one
all any may now see way too yes that this with from have they them their what when where which while would your
about into just more most only other some such than then there these those very were will""".split())

# ----------------------------------------------------------------------------------------------------
# Reading a task (family, role, targets, items, values) from a scenario and a goal

NUM = r"(\d[\d,]*(?:\.\d+)?)"
MONEY_RE = re.compile(r"\$\s?" + NUM)
DOLLARS_RE = re.compile(NUM + r"\s*(?:dollars|bucks)\b", re.I)


def money(s: str) -> float:
    return float(s.replace(",", ""))


def singular(w: str) -> str:
    return w[:-1] if w.endswith("s") and not w.endswith("ss") else w


def item_counts(scenario: str) -> dict[str, int]:
    """{"book": 3, ...} from "3 books, 2 hats, and 1 ball" (every 'number noun' pair; the goal's values filter)."""
    out = {}
    for n, w in re.findall(r"\b(\d+)\s+([a-z]+)\b", scenario.lower()):
        out.setdefault(singular(w), int(n))
    return out


def item_values(goal: str, items) -> dict[str, int]:
    """{"book": 5, ...}: per clause of the goal (split at , ; and 'and'), the item it names and its 'N point(s)'."""
    out = {}
    for clause in re.split(r",|;|\band\b|\.(?!\d)", goal.lower()):
        pts = re.search(r"(\d+)\s*points?\b", clause)
        if not pts:
            continue
        for it in items:
            if re.search(rf"\b{re.escape(it)}s?\b", clause) and it not in out:
                out[it] = int(pts.group(1))
    return out


def read_task(scenario: str, goal: str) -> dict:
    """The family of a scenario as one agent's goal states it: bargain {role, target, listing}, divide {counts,
    values} or open {}."""
    g = goal.lower()
    t = re.search(r"target price[^$]*\$\s?" + NUM, goal, re.I)
    if t and ("buyer" in g or "seller" in g):
        listing = MONEY_RE.search(scenario)
        return {"family": "bargain", "role": "buyer" if "buyer" in g else "seller", "target": money(t.group(1)),
                "listing": money(listing.group(1)) if listing else None}
    counts = item_counts(scenario)
    values = item_values(goal, counts)
    if values:
        return {"family": "divide", "counts": {k: counts[k] for k in values}, "values": values}
    return {"family": "open"}


# ----------------------------------------------------------------------------------------------------
# Offers and the outcome of a conversation

QTY = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def price_in(text: str) -> float | None:
    """The last dollar amount in a message ($350, 350 dollars), or None."""
    found = [(m.start(), money(m.group(1))) for m in MONEY_RE.finditer(text)]
    found += [(m.start(), money(m.group(1))) for m in DOLLARS_RE.finditer(text)]
    return max(found)[1] if found else None


def items_in(clause: str, counts: dict[str, int]) -> dict[str, int]:
    """Quantities named in a clause: '2 books', 'a hat', 'the ball' / 'all the hats' (= all of them)."""
    out = {}
    for it, c in counts.items():
        m = re.search(rf"\b(\d+|a|an|one|two|three|four|five|six|the|all|both)\s+(?:of\s+the\s+|the\s+)?{re.escape(it)}s?\b",
                      clause)
        if m:
            q = m.group(1)
            out[it] = min(c, int(q) if q.isdigit() else QTY.get(q, c))
    return out


MINE_RE = re.compile(r"\b(?:i|i'll|i will|i'd|i would|let me)\s+(?:like to\s+)?(?:take|get|keep|have|want)\b(.*?)"
                     r"(?=\byou\b|[.;!?]|$)")
YOURS_RE = re.compile(r"\byou\s+(?:can\s+|could\s+|would\s+|will\s+)?(?:take|get|keep|have)\b(.*?)"
                      r"(?=\bi\b|\bi'll\b|[.;!?]|$)")


def proposal_in(text: str, counts: dict[str, int], speaker: int) -> dict[int, dict[str, int]] | None:
    """A split {agent: {item: n}} from 'I take ...' and/or 'you take ...' by `speaker`; the side not named gets
    the rest. None if the message names no items for either side."""
    t = text.lower()
    mine = items_in(" ".join(MINE_RE.findall(t)), counts)
    yours = items_in(" ".join(YOURS_RE.findall(t)), counts)
    if not mine and not yours:
        return None
    if mine:
        yours = {it: c - mine.get(it, 0) for it, c in counts.items()} if not yours else yours
    else:
        mine = {it: c - yours.get(it, 0) for it, c in counts.items()}
    mine = {it: min(c, mine.get(it, 0)) for it, c in counts.items()}
    yours = {it: c - mine[it] for it, c in counts.items()}  # what is left over goes to the other side
    return {speaker: mine, 1 - speaker: yours}


def accepts(text: str) -> bool:
    t = text.lower()
    return any(k in t for k in ACCEPT) and not any(k in t for k in REJECT)


def is_hostile(text: str) -> bool:
    return any(k in text.lower() for k in HOSTILE)


def offer_of(task: dict, msg: dict):
    if msg["action_type"] not in ("speak", "action"):
        return None
    if task["family"] == "bargain":
        return price_in(msg["argument"])
    if task["family"] == "divide":
        return proposal_in(msg["argument"], task["counts"], msg["agent"])
    return None


def outcome(task: dict, messages: list[dict]) -> dict:
    """{"deal": price / split / None, "offers": [agent 0's standing offer, agent 1's], "closed_by": agent or None}.
    The first accepting message that names no new offer closes the deal at the other's standing offer."""
    offers = [None, None]
    for m in messages:
        if task["family"] == "open":
            break
        a, new = m["agent"], offer_of(task, m)
        if m["action_type"] in ("speak", "action") and accepts(m["argument"]) and offers[1 - a] is not None \
                and (new is None or new == offers[1 - a]):
            return {"deal": offers[1 - a], "offers": offers, "closed_by": a}
        if new is not None:
            offers[a] = new
    return {"deal": None, "offers": offers, "closed_by": None}


def points(task: dict, split: dict, agent: int) -> int:
    return sum(task["values"][it] * n for it, n in split[agent].items())


def total_points(task: dict) -> int:
    return sum(task["values"][it] * c for it, c in task["counts"].items())


def goal_score(task: dict, deal, agent: int) -> float:
    """GOAL 0..10 of `agent` (whose task this is) for a deal (a price, a split) or None (no deal)."""
    if task["family"] == "open":
        return 5.0
    if deal is None:
        return 0.0
    if task["family"] == "bargain":
        T = task["target"]
        miss = (deal - T) if task["role"] == "buyer" else (T - deal)
        return round(10 * min(1.0, max(0.0, 1 - miss / (T / 2))), 4)
    tot = total_points(task)
    return round(10 * min(1.0, points(task, deal, agent) / (0.7 * tot)), 4) if tot else 0.0


def financial_score(task: dict, deal, agent: int) -> float:
    if task["family"] == "open" or deal is None:
        return 0.0
    if task["family"] == "bargain":
        T = task["target"]
        gain = (T - deal) if task["role"] == "buyer" else (deal - T)
        return round(max(-5.0, min(5.0, 10 * gain / T)), 4)
    tot = total_points(task)
    return round(max(-5.0, min(5.0, 10 * points(task, deal, agent) / tot - 5)), 4) if tot else 0.0


# ----------------------------------------------------------------------------------------------------
# The rule dimensions other than GOAL and financial (evaluator and GRM)

def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def content_words(text: str) -> set[str]:
    return {w.strip("'") for w in words(text) if len(w) >= 3 and w not in STOP}


def leaks_numbers(task: dict, text: str) -> bool:
    t = text.lower()
    if task["family"] == "bargain":
        return bool(re.search(r"(target|bottom line|my limit|budget is)[^.?!]*\d|\d[^.?!]*(target|bottom line)", t))
    if task["family"] == "divide":
        return bool(re.search(r"\d+\s*points?\b", t))
    return False


def tokens(text: str) -> set[str]:
    """The words and numbers of a text ("$1,200.50" -> 1, 200, 50)."""
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def repeats_one_of(text: str, earlier: list[str]) -> bool:
    """Jaccard of tokens (words and numbers) >= 0.8 with one of the earlier texts (a text without tokens repeats
    nothing)."""
    a = tokens(text)
    return bool(a) and any(len(a & tokens(p)) / len(a | tokens(p)) >= 0.8 for p in earlier if tokens(p))


def says_nothing(text: str) -> bool:
    return not re.search(r"[A-Za-z0-9]", text)


def rule_dimensions(task: dict, secret: str, messages: list[dict], agent: int) -> dict:
    """believability, relationship, knowledge, secret, social_rules of `agent` (module docstring), with the faults
    found (for the GRM's analysis)."""
    mine = [m for m in messages if m["agent"] == agent]
    acts = [m for m in mine if m["action_type"] in ("speak", "non-verbal communication", "action")]
    said = [m["argument"] for m in acts]
    broken = sum(1 for m in acts if says_nothing(m["argument"]) or m["action_type"] == "speak" and (
        "{" in m["argument"] or "action_type" in m["argument"]))
    repeats = sum(repeats_one_of(s, said[:j]) for j, s in enumerate(said))
    asked = []  # the questions that seek information, each counted once
    for m in acts:
        q = m["argument"]
        if "?" in q and words(q) and offer_of(task, m) is None and not repeats_one_of(q, asked):
            asked.append(q)
    long = sum(1 for s in said if len(words(s)) > 60)
    hostile = sum(1 for s in said if is_hostile(s))
    polite = any(k in s.lower() for s in said for k in POLITE)
    left = any(m["action_type"] == "leave" for m in mine)
    early = left and task["family"] != "open" and outcome(task, messages)["deal"] is None
    sec = content_words(secret)
    leaked = len(sec) >= 2 and any(len(sec & content_words(s)) >= 0.6 * len(sec) for s in said)
    numbers = any(leaks_numbers(task, s) for s in said)
    dims = {
        "believability": float(max(0, 10 - 2 * broken - 2 * repeats - long)),
        "relationship": float(max(-5, min(5, int(polite) - 2 * hostile - int(early)))),
        "knowledge": float(min(10, 2 * len(asked))),
        "secret": -10.0 if leaked else (-5.0 if numbers else 0.0),
        "social_rules": float(max(-10, -3 * hostile)),
    }
    faults = [f for f, on in (("is a broken action (JSON debris, or no words)", broken),
                              ("repeats an earlier message", repeats), ("is too long", long), ("is hostile", hostile), ("leaves before any deal", early),
                              ("reveals the character's secret", leaked),
                              ("gives away private numbers (target or point values)", numbers and not leaked)) if on]
    return {"dims": dims, "faults": faults}


# ----------------------------------------------------------------------------------------------------
# Reading the prompts of envs/sotopia.py back

def parse_background(text: str) -> dict:
    """From background() text: scenario, names, goals (None where "Unknown") and secrets (None where not shown)."""
    scen = re.search(r"^Scenario: (.*?)\nParticipants: ", text, re.S)
    parts = re.search(r"^Participants: (.+?) and (.+?)(?: \(relationship: [^)]*\))?$", text, re.M)
    names = [parts.group(1), parts.group(2)] if parts else ["", ""]
    goals, secrets = [None, None], [None, None]
    for i, name in enumerate(names):
        nxt = rf"(?=\n{re.escape(names[1])}'s goal: |\Z)" if i == 0 else r"\Z"
        g = re.search(rf"^{re.escape(name)}'s goal: (.*?){nxt}", text, re.S | re.M)
        if g and g.group(1).strip() != "Unknown":
            goals[i] = g.group(1).strip()
        b = re.search(rf"^{re.escape(name)}'s background: (.*)$", text, re.M)
        s = re.search(r"'s secret: (.*)\.$", b.group(1)) if b else None
        secrets[i] = s.group(1) if s else None
    return {"scenario": scen.group(1) if scen else "", "names": names, "goals": goals, "secrets": secrets}


def task_of(bg: dict, agent: int) -> dict:
    return read_task(bg["scenario"], bg["goals"][agent] or "")


# ----------------------------------------------------------------------------------------------------
# The three scripted roles

def fmt_price(x: float) -> str:
    return f"{x:.0f}" if x >= 20 else f"{x:.2f}"


def fmt_items(split: dict[str, int]) -> str:
    parts = [f"{n} {it}{'s' if n != 1 else ''}" for it, n in split.items() if n > 0]
    return ", ".join(parts) if parts else "nothing"


def greedy_split(task: dict, me: int, need: float) -> dict:
    """The partner's proposal: its most valuable items first, unit by unit, until it holds `need` points."""
    mine = {it: 0 for it in task["counts"]}
    got = 0
    for it in sorted(task["counts"], key=lambda i: -task["values"][i]):
        while mine[it] < task["counts"][it] and got < need:
            mine[it] += 1
            got += task["values"][it]
    return {me: mine, 1 - me: {it: c - mine[it] for it, c in task["counts"].items()}}


def partner_action(bg: dict, me: int, messages: list[dict]) -> dict:
    """The rule partner's next action as agent `me` (module docstring)."""
    task = task_of(bg, me)
    k = sum(1 for m in messages if m["agent"] == me)
    other = [m for m in messages if m["agent"] != me]
    out = outcome(task, messages)
    if out["deal"] is not None:
        return {"action_type": "leave", "argument": "Great, we have a deal. Goodbye!"}
    if sum(is_hostile(m["argument"]) for m in other) >= 2:
        return {"action_type": "leave", "argument": "I don't want to be talked to like that."}
    o = out["offers"][1 - me]
    walk = {"action_type": "leave", "argument": "You did not take my final offer, so we have no deal. Goodbye."}
    offer = "My final offer is" if k == K_CONCEDE else None
    if task["family"] == "bargain":
        T = task["target"]
        f = min(1.0, k / K_CONCEDE)
        if task["role"] == "seller":
            L = task["listing"] if task["listing"] and task["listing"] > T else 1.3 * T
            ask = round(L - (L - T) * f, 2)
            if o is not None and o >= ask:
                return {"action_type": "speak", "argument": f"Deal, ${fmt_price(o)} it is. Thank you!"}
            if k > K_CONCEDE:
                return walk
            if o is None:
                return {"action_type": "speak", "argument": f"It is in good shape. {offer or 'I am asking'} "
                                                            f"${fmt_price(ask)}{'' if offer else ' for it'}."}
            return {"action_type": "speak", "argument": f"I can't sell at ${fmt_price(o)}: it is worth more than that "
                                                        f"to me. {offer or 'I could do'} ${fmt_price(ask)}."}
        a0 = 0.7 * T
        bid = round(a0 + (T - a0) * f, 2)
        if o is not None and o <= bid:
            return {"action_type": "speak", "argument": f"Deal, ${fmt_price(o)} it is. Thank you!"}
        if k > K_CONCEDE:
            return walk
        if o is None:
            ask = f"My final offer is ${fmt_price(bid)}." if offer else f"Would you take ${fmt_price(bid)}?"
            return {"action_type": "speak", "argument": f"I am interested. {ask}"}
        return {"action_type": "speak", "argument": f"${fmt_price(o)} is more than I can pay right now, it is too "
                                                    f"steep for me. {offer or 'I can offer'} ${fmt_price(bid)}."}
    if task["family"] == "divide":
        need = (0.9 - 0.4 * min(1.0, k / K_CONCEDE)) * total_points(task)
        if o is not None and points(task, o, me) >= need:
            return {"action_type": "speak", "argument": "That works for me, deal. Thank you!"}
        if k > K_CONCEDE:
            return walk
        prop = greedy_split(task, me, need)
        why = "That split leaves me too little. " if o is not None else ""
        return {"action_type": "speak", "argument": f"{why}{'My final offer: ' if offer else ''}I take {fmt_items(prop[me])}, "
                                                    f"you take {fmt_items(prop[1 - me])}."}
    if k >= 4:
        return {"action_type": "leave", "argument": "I have to go now. Nice talking to you."}
    return {"action_type": "speak", "argument": "I see. What do you have in mind?"}


# ----------------------------------------------------------------------------------------------------
# Demonstrators: other scripted agents for the policy's seat only (the partner is always partner_action), chosen by
# the spec `scripted:NAME` (`--policy scripted:coin`); they are not part of the rules (the evaluator, the GRM and
# the partner ignore them)

WAIT_LINES = ("Hello, thank you for meeting me! What do you have in mind?",
              "Thank you, but I am not sure yet. Can you do better than that?",
              "I appreciate the offer, but it is not quite enough for me. What else could you offer?",
              "Thanks for your patience. I was hoping for something better. Could you move a little?",
              "Please let me think. Is there any room to improve your offer?",
              "I appreciate it, but could you make me a better offer than that?")
ACCEPT_LINE = "That works for me, deal. Thank you!"


def waiting_line(me: int, messages: list[dict]) -> dict:
    """A neutral line that names no offer and accepts nothing: the first of WAIT_LINES the agent has not said yet
    (so that waiting is never a repetition), the last one once all are said."""
    said = {m["argument"] for m in messages if m["agent"] == me}
    return {"action_type": "speak", "argument": next((x for x in WAIT_LINES if x not in said), WAIT_LINES[-1])}


def waiter_action(bg: dict, me: int, messages: list[dict], rng: random.Random) -> dict:
    """The waiter: never offers, never accepts (its episodes run to the partner's final offer and its walk-away:
    every turn of them is a turn where accepting and waiting lead to different outcomes)."""
    return waiting_line(me, messages)


def coin_action(bg: dict, me: int, messages: list[dict], rng: random.Random) -> dict:
    """The coin: with an offer of the partner standing it accepts it with probability 1/2, else it waits
    (waiting_line); it leaves once a deal is closed. It never reads the words "final offer": it shows both moves
    and not when each pays."""
    task = task_of(bg, me)
    out = outcome(task, messages)
    if out["deal"] is not None:
        return {"action_type": "leave", "argument": "Great, we have a deal. Goodbye!"}
    if out["offers"][1 - me] is not None and rng.random() < 0.5:
        return {"action_type": "speak", "argument": ACCEPT_LINE}
    return waiting_line(me, messages)


AGENTS = {"rules": lambda bg, me, messages, rng: partner_action(bg, me, messages), "waiter": waiter_action,
          "coin": coin_action}


def evaluate_episode(bg: dict, messages: list[dict]) -> dict:
    """The rule evaluator's answer in the LLM evaluator's JSON shape (envs/sotopia.validate_evaluation)."""
    out = {}
    for a, key in enumerate(S.AGENT_KEYS):
        task = task_of(bg, a)
        deal = outcome(task, messages)["deal"]
        rd = rule_dimensions(task, bg["secrets"][a] or "", messages, a)
        dims = {**rd["dims"], "goal": goal_score(task, deal, a), "financial_and_material_benefits":
                financial_score(task, deal, a)}
        why = f"{task['family']}: " + (f"deal at {deal}" if deal is not None else "no deal") + \
              ("; " + "; ".join(rd["faults"]) if rd["faults"] else "")
        out[key] = {d: {"reasoning": why, "score": dims[d]} for d in S.DIMENSIONS}
    return out


def candidate_value(bg: dict, me: int, messages: list[dict]) -> tuple[float, str]:
    """The GRM's value of a conversation that ends with a candidate of `me` and the partner's reaction."""
    task = task_of(bg, me)
    turn = len(messages) - 2  # the candidate's turn
    if turn + 1 >= TURN_LIMIT:  # the episode ends with the candidate: the reaction never happens
        messages = messages[:-1]
    out = outcome(task, messages)
    left = any(m["action_type"] == "leave" for m in messages)
    if out["deal"] is not None:
        g, what = goal_score(task, out["deal"], me), f"the deal closes at {out['deal']}"
    elif left or out["offers"][1 - me] is None:
        g, what = (goal_score(task, None, me), "the conversation ended without a deal" if left else "no offer stands")
    elif turn + 2 < TURN_LIMIT:
        g = goal_score(task, out["offers"][1 - me], me)
        what = f"the other side now offers {out['offers'][1 - me]}, which can still be accepted"
    else:
        g = 0.0
        what = f"the other side offers {out['offers'][1 - me]}, but the conversation ends before it can be accepted"
    if task["family"] == "open":
        g, what = 5.0, "the rules cannot score this goal"
    rd = rule_dimensions(task, bg["secrets"][me] or "", messages, me)
    d = rd["dims"]
    value = g + (d["believability"] - 10) + d["relationship"] + d["secret"] + d["social_rules"] + d["knowledge"] / 5
    analysis = f"After the reaction {what} (goal value {g:.1f} of 10). " + \
        ("Faults: " + "; ".join(rd["faults"]) + "." if rd["faults"] else "No faults the rules check.")
    return value, analysis


def grm_answer(bg: dict, me: int, history: list[dict], pairs: list[tuple[dict, dict]]) -> dict:
    """{"i": {analysis, rank, score}} for the candidates (each (action, reaction)), in the GRM's JSON shape."""
    vals = [candidate_value(bg, me, history + [a, u]) for a, u in pairs]
    scores = [min(1.0, max(0.0, (v + 25) / 40)) for v, _ in vals]
    order = sorted(range(len(pairs)), key=lambda i: (-scores[i], i))
    out = {}
    for rank, i in enumerate(order, 1):
        tie = sum(1 for j in order[rank:] if scores[j] == scores[i])
        out[str(i)] = {"analysis": vals[i][1], "rank": rank, "score": round(min(1.0, scores[i] + 1e-6 * tie), 7)}
    return out


def _history(text: str, names: list[str]) -> list[dict]:
    return S.parse_transcript(text, names)


def answer(chat: list[dict], agent: str = "rules", seed: int | None = None, sample: int = 0) -> str | None:
    """The scripted answer to a Sotopia prompt (agent, evaluator or GRM), or None for a prompt that is not one.
    agent: who answers an agent prompt (AGENTS: the rule agent, or a demonstrator); a coin's draw is seeded by
    (seed, sample, the prompt), so a run repeats."""
    from envs.esc import unformat

    text = chat[-1]["content"] if chat else ""
    if len(chat) == 2 and chat[0]["content"] == S.AGENT_SYSTEM and (f := unformat(S.AGENT_PROMPT, text)):
        bg = parse_background(f["background"])
        me = bg["names"].index(f["name"]) if f["name"] in bg["names"] else 0
        rng = random.Random(f"{seed}|{sample}|{text}")
        return json.dumps(AGENTS[agent](bg, me, _history(f["history"], bg["names"]), rng))
    if (f := unformat(S.EVALUATOR_PROMPT, text)) is not None:
        bg = parse_background(f["background"])
        return json.dumps(evaluate_episode(bg, _history(f["history"], bg["names"])))
    if (f := unformat(S.GRM_PROMPT, text)) is not None:
        ctx, _, hist = f["context"].partition("\n\nConversation so far:\n")
        bg = parse_background(ctx)
        me = bg["names"].index(f["name"]) if f["name"] in bg["names"] else 0
        pairs = []
        for item in re.split(r"\n\n(?=\[\d+\] )", f["samples"]):
            lines = [re.sub(r"^\[\d+\] (?:Reaction: )?", "", ln) for ln in item.split("\n")]
            acts = S.parse_transcript("\n".join(lines), bg["names"])
            if len(acts) != 2:
                raise common.InputError("scripted GRM: a candidate or its reaction does not parse")
            pairs.append((acts[0], acts[1]))
        return json.dumps(grm_answer(bg, me, _history(hist, bg["names"]), pairs))
    return None


# ----------------------------------------------------------------------------------------------------
# The generator of training scenarios (seeded, unlimited, our own texts: never the benchmark's)

FIRST = ("Ada", "Bram", "Cleo", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lionel", "Mira",
         "Nils", "Oona", "Pavel", "Rosa", "Soren", "Tessa", "Umar")
LAST = ("Alder", "Brook", "Castell", "Dunmore", "Ellery", "Fairbank", "Greaves", "Holt", "Ives", "Jarrow")
JOBS = ("librarian", "carpenter", "nurse", "accountant", "baker", "translator", "bus driver", "pharmacist")
SECRETS = ("once failed a driving test five times", "keeps a diary about the neighbours",
           "borrowed money from a friend and never paid it back", "secretly plays in a heavy metal band",
           "is looking for a new job without telling the boss", "cannot swim")
GOODS = (("bicycle", "a light road bicycle with new tyres", 240), ("desk", "a solid oak writing desk", 180),
         ("guitar", "an acoustic guitar with a soft case", 320), ("camera", "a film camera with two lenses", 410),
         ("sofa", "a grey two-seat sofa, barely used", 520), ("lamp", "a brass floor lamp", 60),
         ("kettle", "an electric kettle in its box", 35), ("tent", "a four-person camping tent", 150))
THINGS = ("book", "hat", "ball", "mug", "plant", "candle", "poster", "pillow", "record", "lamp")
GROUPS = (("Two roommates", 3), ("Two cousins", 5), ("Two colleagues", 2), ("Two old friends", 3))


def generate_profiles(n: int, seed: int = 0, pairings: int = 2) -> dict:
    """n scenarios (alternating bargain and divide) with 12 generated agents and `pairings` pairings each, in the
    four-file schema: {"envs", "agents", "combos", "relationships"} as lists of records."""
    rng = random.Random(seed)
    agents = []
    for i in range(12):
        fn, ln = FIRST[(i + seed) % len(FIRST)], LAST[(3 * i + seed) % len(LAST)]
        g = rng.choice((("Woman", "She/her"), ("Man", "He/him"), ("Nonbinary", "They/them")))
        agents.append({"agent_id": f"gen{seed}-agent{i:02d}", "first_name": fn, "last_name": ln,
                       "age": rng.randint(22, 68), "occupation": rng.choice(JOBS), "gender": g[0],
                       "gender_pronoun": g[1], "public_info": f"{fn} likes {rng.choice(('hiking', 'chess', 'cooking', 'jazz'))}.",
                       "personality_and_values": f"{fn} is {rng.choice(('careful', 'outgoing', 'patient', 'direct'))} "
                                                 f"and values {rng.choice(('fairness', 'loyalty', 'freedom'))}.",
                       "decision_making_style": rng.choice(("analytical", "intuitive")), "secret": rng.choice(SECRETS),
                       "big_five": "", "moral_values": [], "schwartz_personal_values": [], "mbti": ""})
    envs, combos = [], []
    for k in range(n):
        env_id = f"gen{seed}-env{k:05d}"
        if k % 2 == 0:
            name, desc, base = rng.choice(GOODS)
            L = round(base * rng.uniform(0.8, 1.2))
            tb, ts = round(L * rng.uniform(0.6, 0.9)), round(L * rng.uniform(0.55, 0.85))
            scen = f"Someone has put {desc} up for sale at ${L}, and someone else would like to buy the {name}."
            goals = [f"Buy the {name}: you are the buyer, and your target price is ${tb}. Paying well above the target "
                     f"is penalised; paying less than it earns you a bonus.",
                     f"Sell the {name}: you are the seller, and your target price is ${ts}. Selling well below the "
                     f"target is penalised; selling above it earns you a bonus."]
            rel = rng.choice((0, 1, 2))
            codename = f"bargain_{name}"
        else:
            who, rel = rng.choice(GROUPS)
            items = rng.sample(THINGS, 3)
            counts = [rng.randint(1, 4) for _ in items]
            listed = ", ".join(f"{c} {it}{'s' if c != 1 else ''}" for c, it in zip(counts[:-1], items[:-1]))
            listed += f" and {counts[-1]} {items[-1]}{'s' if counts[-1] != 1 else ''}"
            scen = (f"{who} are splitting {listed} that they own together. Each item is worth a different number of "
                    f"points to each of them.")
            goals = []
            for _ in range(2):
                vals = [rng.randint(0, 6) for _ in items]
                vals[rng.randrange(3)] += 1  # never all zero
                spec = ", ".join(f"a {it} is worth {v} points" for it, v in zip(items, vals))
                goals.append(f"Get as many points as you can from the split (<extra_info>Your private values: {spec}."
                             f"</extra_info>)")
            codename = "divide_" + "_".join(items)
        envs.append({"env_id": env_id, "codename": codename, "source": "scripted-generator", "scenario": scen,
                     "agent_goals": goals, "relationship": str(rel), "age_constraint": None,
                     "occupation_constraint": "nan", "agent_constraint": "none"})
        for j in range(pairings):
            a, b = rng.sample(range(len(agents)), 2)
            combos.append({"combo_id": f"{env_id}-p{j}", "env_id": env_id,
                           "agent_ids": [agents[a]["agent_id"], agents[b]["agent_id"]]})
    rels = [{"relationship_id": f"gen{seed}-rel{i:02d}", "agent1_id": agents[i]["agent_id"],
             "agent2_id": agents[(i + 1) % len(agents)]["agent_id"], "relationship": rng.randint(0, 5),
             "background_story": ""} for i in range(len(agents))]
    return {"envs": envs, "agents": agents, "combos": combos, "relationships": rels}


def write_profiles(folder: str | Path, profiles: dict):
    """A profile folder (the four files) from generate_profiles()."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in S.FILES.items():
        common.write_jsonl(folder / name, profiles[key])


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a Sotopia profile folder of generated bargain/divide scenarios "
                                            "(the scripted environment's training data).")
    p.add_argument("--out", required=True, help="the profile folder to write")
    p.add_argument("-n", "--num-scenarios", type=int, default=200, help="scenarios (default 200)")
    p.add_argument("--pairings", type=int, default=2, help="pairings per scenario (default 2)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = p.parse_args(argv)
    common.check(args.num_scenarios >= 1 and args.pairings >= 1, "--num-scenarios and --pairings must be >= 1")
    write_profiles(args.out, generate_profiles(args.num_scenarios, args.seed, args.pairings))
    print(f"wrote {args.num_scenarios} scenarios to {args.out}")


if __name__ == "__main__":
    common.run_main(main)
