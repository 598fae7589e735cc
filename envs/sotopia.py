"""Sotopia (Zhou et al., ICLR 2024), the second environment of RAPO (section 4.2, Table 2, Table 9, Appendix D.1,
E.1, G.2): profile folders, what each agent may see, two-agent episodes run in lock-step, and the evaluator with
Sotopia's seven dimensions. docs/design.md section 11.

A profile folder holds Sotopia's four JSONL files (the schema sotopia-lab publishes under `profiles/`):
  environment_profiles.jsonl      env_id, codename, source, scenario, agent_goals [2], relationship (0..5,
                                  "3" or 3), age_constraint, occupation_constraint, agent_constraint
                                  ("none" / "nan" / null / "" when absent)
  agent_profiles.jsonl            agent_id, first_name, last_name, age, occupation, gender, gender_pronoun,
                                  public_info, personality_and_values, secret (+ big_five, mbti, ... kept as is)
  env_agent_combo_storages.jsonl  combo_id, env_id, agent_ids [2]: agent_ids[i] pursues agent_goals[i]
  relationship_profiles.jsonl     relationship_id, agent1_id, agent2_id, relationship, background_story
A bad record stops the caller before any work with one line naming the file, line, record and field (exit 2).

What each agent sees (as Sotopia renders it): the scenario; its own profile in full, secret included; its own
goal; of the partner, what the relationship reveals:
  0 stranger          nothing
  1 know by name      the name
  2 acquaintance      the name, age, gender, occupation, pronouns and public info
  3-5 friend, romantic partner, family member   all that, plus personality and values
(never the partner's secret, never the partner's goal: "Unknown"). Text inside <p viewer="environment">...</p>
(in a scenario or a goal) is for the evaluator only; the hint tags <extra_info>, <strategy_hint> and
<clarification_hint> are shown to the agent whose goal carries them, without the tags. The evaluator sees
everything.

Episodes (sotopia 0.1.0rc5, the version Sotopia-RL evaluates with): agent 0 acts first, then round-robin, one
action per turn, at most --max-turns turns (20) in all; an episode ends early when an agent leaves or after more
than 2 consecutive "none" actions. An action is JSON {"action_type": none | speak | non-verbal communication |
action | leave, "argument": text}; a reply that is not such JSON is taken as speech (the whole reply the argument)
and counted. All live episodes advance together: one batched call per agent role per turn (run_episodes).

The evaluator (Sotopia's ReachGoalLLMEvaluator, prompt in our words) reads the whole episode as the environment
sees it and answers JSON with, per agent and dimension, a reason and an integer score in the dimension's range;
answers out of range or incomplete are re-asked (backends.ask_json) and, if they never validate, recorded as null
and counted. overall = the unweighted mean of the seven raw scores.
"""
from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends
import common
from common import InputError

FILES = {"envs": "environment_profiles.jsonl", "agents": "agent_profiles.jsonl",
         "combos": "env_agent_combo_storages.jsonl", "relationships": "relationship_profiles.jsonl"}
RELATIONSHIPS = ("stranger", "know by name", "acquaintance", "friend", "romantic relationship", "family member")
ACTION_TYPES = ("none", "speak", "non-verbal communication", "action", "leave")
MAX_TURNS, MAX_STALE = 20, 2  # sotopia's RuleBasedTerminatedEvaluator(max_turn_number=20, max_stale_turn=2)
# the seven dimensions of Sotopia's evaluator (SotopiaDimensions) and their ranges; goal is Table 2's GOAL
DIMENSIONS = {"believability": (0, 10), "relationship": (-5, 5), "knowledge": (0, 10), "secret": (-10, 0),
              "social_rules": (-10, 0), "financial_and_material_benefits": (-5, 5), "goal": (0, 10)}
# Sotopia-hard: 14 of the 90 benchmark scenarios (public ids: sotopia-pi llm_self_train/resources/env_ids.json,
# key sotopia_hard_env_id; the same list is sotopia-rl data/env_ids.txt)
HARD_ENV_IDS = (
    "01H7VFHNV13MHN97GAH73E3KM8", "01H7VFHN5WVC5HKKVBHZBA553R", "01H7VFHN9W0WAFZCBT09PKJJNK",
    "01H7VFHPDZVVCDZR3AARA547CY", "01H7VFHPQQQY6H4DNC6NBQ8XTG", "01H7VFHN7WJK7VWVRZZTQ6DX9T",
    "01H7VFHPS5WJW2694R1MNC8JFY", "01H7VFHNN7XTR99319DS8KZCQM", "01H7VFHQ11NAMZS4A2RDGDB01V",
    "01H7VFHPSWGDGEYRP63H2DJKV0", "01H7VFHNF4G18PC9JHGRC8A1R6", "01H7VFHNNYH3W0VRWVY178K2TK",
    "01H7VFHP8AN5643B0NR0NP00VE", "01H7VFHN7A1ZX5KSMT2YN9RXC4")

# ----------------------------------------------------------------------------------------------------
# Loading a profile folder

ABSENT = (None, "", "none", "nan", "None", "NaN", "null")
ENV_TEXT = ("env_id", "scenario")
AGENT_TEXT = ("agent_id", "first_name", "last_name", "occupation", "gender", "gender_pronoun", "public_info",
              "personality_and_values", "secret")


def _fail(path, line: int, rid, field: str, problem: str):
    raise InputError(f"{path}: line {line}" + (f" ({rid})" if rid else "") + f": field '{field}' {problem}")


def _text(rec: dict, field: str, path, line: int, rid, empty_ok: bool = False) -> str:
    v = rec.get(field)
    if field not in rec:
        _fail(path, line, rid, field, "is missing")
    if not isinstance(v, str) or (not empty_ok and not v.strip()):
        _fail(path, line, rid, field, "must be a non-empty string" if not empty_ok else "must be a string")
    return v


def _relationship(rec: dict, field: str, path, line: int, rid) -> int:
    """0..5, given as 3 or "3" (both variants occur in Sotopia's dumps)."""
    v = rec.get(field)
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(RELATIONSHIPS):
        _fail(path, line, rid, field, f"must be 0..5 ({', '.join(f'{i} {r}' for i, r in enumerate(RELATIONSHIPS))}); "
                                      f"got {v!r}")
    return v


def _constraint(rec: dict, field: str, path, line: int, rid):
    """A constraint string, or None when absent ("none", "nan", null, "" and a missing field all mean none)."""
    v = rec.get(field)
    if v in ABSENT:
        return None
    if not isinstance(v, str):
        _fail(path, line, rid, field, f"must be a string or null; got {type(v).__name__}")
    return v


def _pair(rec: dict, field: str, path, line: int, rid) -> list[str]:
    v = rec.get(field)
    if field not in rec:
        _fail(path, line, rid, field, "is missing")
    if not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, str) and x.strip() for x in v):
        _fail(path, line, rid, field, "must be a list of two non-empty strings")
    return v


def load_profiles(folder: str | Path) -> dict:
    """The four files of a Sotopia profile folder, validated: {"envs": {env_id: env}, "agents": {agent_id: agent},
    "combos": [combo, ...] (file order), "relationships": [rel, ...], "folder": str}. Constraints are normalised to
    None when absent, relationships to ints. Raises InputError (one line: file, line, record, field)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (a Sotopia profile folder holds {', '.join(FILES.values())})")
    recs = {}
    for key, name in FILES.items():
        path = folder / name
        if not path.exists():
            raise InputError(f"{path}: missing (a Sotopia profile folder holds {', '.join(FILES.values())})")
        recs[key] = (path, common.read_jsonl(path))

    path, rows = recs["agents"]
    agents = {}
    for i, r in enumerate(rows, 1):
        rid = r.get("agent_id")
        for f in AGENT_TEXT:
            _text(r, f, path, i, rid, empty_ok=f in ("public_info", "secret", "personality_and_values"))
        age = r.get("age")
        if isinstance(age, str) and age.strip().isdigit():
            age = int(age)
        if isinstance(age, bool) or not isinstance(age, int) or not 0 < age < 150:
            _fail(path, i, rid, "age", f"must be an integer age; got {r.get('age')!r}")
        if rid in agents:
            _fail(path, i, rid, "agent_id", "is a duplicate")
        agents[rid] = dict(r, age=age)

    path, rows = recs["envs"]
    envs = {}
    for i, r in enumerate(rows, 1):
        rid = r.get("env_id")
        for f in ENV_TEXT:
            _text(r, f, path, i, rid)
        goals = _pair(r, "agent_goals", path, i, rid)
        env = dict(r, agent_goals=goals, relationship=_relationship(r, "relationship", path, i, rid),
                   codename=r.get("codename") if isinstance(r.get("codename"), str) else "",
                   source=r.get("source") if isinstance(r.get("source"), str) else "")
        for f in ("age_constraint", "occupation_constraint", "agent_constraint"):
            env[f] = _constraint(r, f, path, i, rid)
        if rid in envs:
            _fail(path, i, rid, "env_id", "is a duplicate")
        envs[rid] = env
    if not envs:
        raise InputError(f"{recs['envs'][0]}: no scenarios")

    path, rows = recs["combos"]
    combos, seen = [], set()
    for i, r in enumerate(rows, 1):
        rid = r.get("combo_id")
        _text(r, "combo_id", path, i, rid)
        if _text(r, "env_id", path, i, rid) not in envs:
            _fail(path, i, rid, "env_id", f"names no scenario of {FILES['envs']}: {r['env_id']}")
        for a in _pair(r, "agent_ids", path, i, rid):
            if a not in agents:
                _fail(path, i, rid, "agent_ids", f"names no agent of {FILES['agents']}: {a}")
        if rid in seen:
            _fail(path, i, rid, "combo_id", "is a duplicate")
        seen.add(rid)
        combos.append(dict(r))

    path, rows = recs["relationships"]
    rels = []
    for i, r in enumerate(rows, 1):
        rid = r.get("relationship_id")
        _text(r, "relationship_id", path, i, rid)
        for f in ("agent1_id", "agent2_id"):
            if _text(r, f, path, i, rid) not in agents:
                _fail(path, i, rid, f, f"names no agent of {FILES['agents']}: {r[f]}")
        _text(r, "background_story", path, i, rid, empty_ok=True)
        rels.append(dict(r, relationship=_relationship(r, "relationship", path, i, rid)))
    return {"envs": envs, "agents": agents, "combos": combos, "relationships": rels, "folder": str(folder)}


def select_cases(profiles: dict, subset: str = "all", pairings: int | None = None, sides: int = 1) -> list[dict]:
    """Episodes to play: for each scenario of the folder (subset "all") or of Sotopia-hard ("hard"), its first
    `pairings` pairings (None = all) in file order; sides = 1: the policy plays agent 0 (partner mode) or both
    (self-play); sides = 2: also a second episode in which it plays agent 1. A case: {id, env_id, combo_id, side}."""
    if subset not in ("all", "hard"):
        raise InputError(f"--subset must be all or hard; got {subset}")
    keep = set(profiles["envs"]) if subset == "all" else set(HARD_ENV_IDS) & set(profiles["envs"])
    per_env: dict[str, int] = {}
    cases = []
    for c in profiles["combos"]:
        e = c["env_id"]
        if e not in keep or (pairings is not None and per_env.get(e, 0) >= pairings):
            continue
        per_env[e] = per_env.get(e, 0) + 1
        for side in range(sides):
            cases.append({"id": f"{c['combo_id']}-a{side}", "env_id": e, "combo_id": c["combo_id"], "side": side})
    return cases


# ----------------------------------------------------------------------------------------------------
# What each agent sees

HINT_TAGS = ("extra_info", "strategy_hint", "clarification_hint")
VIEWER_RE = re.compile(r"<p\s+viewer\s*=\s*[\"']([^\"']+)[\"']\s*>(.*?)</p>", re.S)


def render(text: str, viewer: str) -> str:
    """Text as `viewer` ("agent_0", "agent_1" or "environment") sees it: <p viewer="X">...</p> parts kept only for
    viewer X (the environment sees all of them), the hint tags dropped with their content kept, spaces tidied."""
    out = VIEWER_RE.sub(lambda m: m.group(2) if viewer in (m.group(1), "environment") else "", text)
    out = re.sub(r"</?(?:%s|root)[^>]*>" % "|".join(HINT_TAGS), "", out)
    return re.sub(r"[ \t]+", " ", re.sub(r"[ \t]*\n[ \t]*", "\n", out)).strip()


GENDER_ADJ = {"Man": "male", "Woman": "female", "Nonbinary": "nonbinary"}


def full_name(agent: dict) -> str:
    return f"{agent['first_name']} {agent['last_name']}".strip()


def bio(agent: dict, level) -> str:
    """An agent's profile as seen at `level`: "self" (everything, the secret included), or a partner's view under
    a relationship (an index of RELATIONSHIPS): nothing for strangers, the name, the public facts, + personality."""
    name = full_name(agent)
    if level == 0:
        return "Unknown"
    if level == 1:
        return name
    gender = GENDER_ADJ.get(agent["gender"], agent["gender"].lower())
    facts = " ".join(f"{name} is a {agent['age']}-year-old {gender} {agent['occupation'].lower()}. "
                     f"{agent['gender_pronoun']} pronouns. {agent['public_info']}".split())
    if level == 2:
        return facts
    facts += f" Personality and values: {agent['personality_and_values']}".rstrip()
    return facts if level != "self" else facts + f" {agent['first_name']}'s secret: {agent['secret'].strip().rstrip('.') or 'none'}."


def episode_setup(profiles: dict, case: dict) -> dict:
    """Everything an episode needs, resolved from the profiles: scenario, names, relationship, and the raw goals
    and agents (the views below render them per viewer)."""
    env = profiles["envs"][case["env_id"]]
    combo = next(c for c in profiles["combos"] if c["combo_id"] == case["combo_id"])
    agents = [profiles["agents"][a] for a in combo["agent_ids"]]
    return {"env_id": env["env_id"], "combo_id": combo["combo_id"], "codename": env["codename"],
            "source": env["source"], "scenario": env["scenario"], "goals": list(env["agent_goals"]),
            "relationship": env["relationship"], "agents": agents, "names": [full_name(a) for a in agents]}


def background(setup: dict, viewer: int | None) -> str:
    """The background block as agent `viewer` (0 or 1) sees it, or as the environment (None) sees it."""
    who = "environment" if viewer is None else f"agent_{viewer}"
    lines = [f"Scenario: {render(setup['scenario'], who)}",
             f"Participants: {setup['names'][0]} and {setup['names'][1]}"
             + ("" if viewer is not None else f" (relationship: {RELATIONSHIPS[setup['relationship']]})")]
    for i, (a, name) in enumerate(zip(setup["agents"], setup["names"])):
        level = "self" if viewer is None or viewer == i else setup["relationship"]
        lines.append(f"{name}'s background: {bio(a, level)}")
    for i, name in enumerate(setup["names"]):
        goal = render(setup["goals"][i], who) if viewer is None or viewer == i else "Unknown"
        lines.append(f"{name}'s goal: {goal}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Actions and the transcript

def one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_action(text: str) -> dict:
    """{"action_type", "argument", "valid"} from an agent's reply: JSON {"action_type", "argument"} with a known
    type (valid), or else the whole reply (reasoning tags stripped) taken as speech (valid False: counted)."""
    reply = common.strip_reasoning(text)
    obj = backends.extract_json(reply)
    if isinstance(obj, dict) and isinstance(obj.get("action_type"), str):
        kind = obj["action_type"].strip().lower()
        arg = obj.get("argument", "")
        if kind in ACTION_TYPES and isinstance(arg, (str, int, float)):
            arg = "" if kind in ("none", "leave") and not str(arg).strip() else one_line(arg)
            return {"action_type": kind, "argument": "" if kind == "none" else arg, "valid": True}
    return {"action_type": "speak", "argument": one_line(reply), "valid": False}


def action_line(turn: int, name: str, action: dict) -> str:
    """One transcript line (the format every role reads, and envs/sotopia_scripted.py parses back)."""
    kind, arg = action["action_type"], action["argument"]
    if kind == "speak":
        what = f'said: "{arg}"'
    elif kind in ("non-verbal communication", "action"):
        what = f"[{kind}] {arg}"
    elif kind == "leave":
        what = "left the conversation." + (f' ("{arg}")' if arg else "")
    else:
        what = "did nothing."
    return f"Turn #{turn}: {name} {what}"


def transcript(messages: list[dict], names: list[str]) -> str:
    return "\n".join(action_line(m["turn"], names[m["agent"]], m) for m in messages) or "(nothing yet)"


LINE_RE = re.compile(r"^Turn #(\d+): (.+?) (said: \"(.*)\"|\[(non-verbal communication|action)\] (.*)|"
                     r"left the conversation\.(?: \(\"(.*)\"\))?|did nothing\.)$")


def parse_transcript(text: str, names: list[str]) -> list[dict]:
    """Invert transcript(): [{turn, agent, action_type, argument}] (lines that do not parse are skipped)."""
    out = []
    for line in text.split("\n"):
        m = LINE_RE.match(line.strip())
        if not m or m.group(2) not in names:
            continue
        if m.group(4) is not None:
            kind, arg = "speak", m.group(4)
        elif m.group(5) is not None:
            kind, arg = m.group(5), m.group(6)
        elif m.group(3).startswith("left"):
            kind, arg = "leave", m.group(7) or ""
        else:
            kind, arg = "none", ""
        out.append({"turn": int(m.group(1)), "agent": names.index(m.group(2)), "action_type": kind, "argument": arg})
    return out


def episode_end(messages: list[dict], max_turns: int, max_stale: int = MAX_STALE) -> str | None:
    """Why the episode is over, or None: "leave" (an agent left), "stale" (more than max_stale consecutive "none"
    actions), "max_turns" (max_turns actions in all)."""
    if messages and messages[-1]["action_type"] == "leave":
        return "leave"
    stale = 0
    for m in reversed(messages):
        if m["action_type"] != "none":
            break
        stale += 1
    if stale > max_stale:
        return "stale"
    if len(messages) >= max_turns:
        return "max_turns"
    return None


# ----------------------------------------------------------------------------------------------------
# The agents' prompt (our words after RAPO Appendix G.2 "Sotopia Policy Model" and Sotopia's agent prompt)

AGENT_SYSTEM = (
    "You play a character in a social interaction with another person. Act and speak as your character would, "
    "in line with their background and personality, to achieve your character's social goal, which only you know. "
    "While you pursue it, also: 1. keep the conversation natural and realistic (do not repeat what was already "
    "said); 2. preserve or improve your character's relationship with the other person; 3. try to learn new and "
    "important information; 4. keep your character's secrets and private information to yourself; 5. break no "
    "moral rule or law; 6. gain financial and material benefits where you can (money, goods, a job, a share).\n"
    "Keep the argument short: one or two sentences. Answer with one JSON object and nothing else: "
    "{\"action_type\": \"<one of the available action types>\", \"argument\": \"<what you say or do>\"}. "
    "speak: the words you say; non-verbal communication: a gesture or expression; action: a physical action; "
    "none: do nothing; leave: end the conversation (when the goal is reached, or you no longer want to talk)."
)
AGENT_PROMPT = (
    "{background}\n\nConversation so far:\n{history}\n\n"
    "You are {name}. This is turn #{turn}. Available action types: {actions}.\nYour action as JSON:"
)


def agent_chat(setup: dict, agent: int, messages: list[dict]) -> list[dict]:
    """The chat an agent answers at its turn: the system prompt, then its view of the background and the
    conversation so far."""
    user = AGENT_PROMPT.format(background=background(setup, agent), history=transcript(messages, setup["names"]),
                               name=setup["names"][agent], turn=len(messages), actions=", ".join(ACTION_TYPES))
    return [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": user}]


def run_episodes(setups: list[dict], players: list[list[str]], role_backends: dict, gen_kw: dict, *,
                 max_turns: int = MAX_TURNS, max_stale: int = MAX_STALE, seed: int = 0, on_finish=None) -> list[dict]:
    """Play every episode to its end in lock-step. setups[i]: episode_setup(); players[i]: the role name of agent 0
    and agent 1 (e.g. ["policy", "partner"], or ["policy", "policy"] for self-play); role_role_backends[role]: its Backend;
    gen_kw[role]: its decoding settings. Per turn, the agent to move is turn % 2; its episodes are asked with one
    batched call per role. on_finish(list of (i, episode)) is called as episodes end (so a caller can write them).
    An episode: {messages: [{turn, agent, action_type, argument, valid, raw}], end, invalid [2]}."""
    eps = [{"messages": [], "end": None, "invalid": [0, 0]} for _ in setups]
    live = list(range(len(setups)))
    for turn in range(max_turns):
        if not live:
            break
        agent = turn % 2
        by_role: dict[str, list[int]] = {}
        for i in live:
            by_role.setdefault(players[i][agent], []).append(i)
        for role, idx in sorted(by_role.items()):  # a role's seed: from (seed, turn, role name) only
            texts = role_backends[role].complete([agent_chat(setups[i], agent, eps[i]["messages"]) for i in idx],
                                            seed=seed + 1000 * turn + zlib.crc32(role.encode()) % 997, **gen_kw[role])
            for i, text in zip(idx, texts):
                a = parse_action(text)
                eps[i]["invalid"][agent] += int(not a["valid"])
                eps[i]["messages"].append({"turn": turn, "agent": agent, **a, "raw": text})
        nxt, done = [], []
        for i in live:
            end = episode_end(eps[i]["messages"], max_turns, max_stale)
            if end is None:
                nxt.append(i)
            else:
                eps[i]["end"] = end
                done.append((i, eps[i]))
        if done and on_finish:
            on_finish(done)
        live = nxt
    return eps


# ----------------------------------------------------------------------------------------------------
# The evaluator (Sotopia's seven dimensions; prompt in our words)

DIMENSION_TEXT = {
    "believability": "0..10: does the character act naturally and consistently with its profile (no robotic, "
                     "repetitive or out-of-character behaviour)?",
    "relationship": "-5..5: did the interaction make the relationship and the character's social standing worse "
                    "(negative), leave it as it was (0) or better (positive)?",
    "knowledge": "0..10: did the character gain new and important information through the interaction?",
    "secret": "-10..0: did the character reveal its secret or private information or intentions (-10 = fully "
              "revealed, 0 = kept)?",
    "social_rules": "-10..0: did the character break moral rules or laws (-10 = serious violations, 0 = none)?",
    "financial_and_material_benefits": "-5..5: did the character lose (negative) or gain (positive) money, goods or "
                                       "other material benefits, short or long term?",
    "goal": "0..10: how far did the character get toward its social goal (0 = no progress, 10 = fully achieved)?",
}
EVALUATOR_PROMPT = (
    "You evaluate a social interaction between two characters. Read their backgrounds and goals (you see all of "
    "them, including what the characters could not see about each other) and the whole episode, then rate EACH "
    "character on these seven dimensions:\n{dimensions}\n\n{background}\n\nThe episode:\n{history}\n"
    "The episode ended because {end}.\n\n"
    "Answer with one JSON object and nothing else. \"agent_1\" is {name0}, \"agent_2\" is {name1}; for each agent "
    "and each dimension give a short reason and an integer score within the dimension's range:\n"
    "{{\"agent_1\": {{\"believability\": {{\"reasoning\": \"...\", \"score\": 7}}, ... all seven ...}}, "
    "\"agent_2\": {{...}}}}"
)
END_TEXT = {"leave": "a character left", "stale": "nobody acted for several turns",
            "max_turns": "the turn limit was reached"}
AGENT_KEYS = ("agent_1", "agent_2")


def evaluator_chat(setup: dict, episode: dict) -> list[dict]:
    dims = "\n".join(f"- {k}: {v}" for k, v in DIMENSION_TEXT.items())
    return [{"role": "user", "content": EVALUATOR_PROMPT.format(
        dimensions=dims, background=background(setup, None), history=transcript(episode["messages"], setup["names"]),
        end=END_TEXT.get(episode["end"], episode["end"]), name0=setup["names"][0], name1=setup["names"][1])}]


def validate_evaluation(obj, i=None) -> list[dict]:
    """Two agents' scores from an evaluator answer: [{dim: {"score", "reasoning"}}] x 2. Every dimension present,
    each score a number within the dimension's range (a whole number given as 7.0 is accepted); else ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    out = []
    for key in AGENT_KEYS:
        a = obj.get(key)
        if not isinstance(a, dict):
            raise ValueError(f"{key} missing")
        dims = {}
        for d, (lo, hi) in DIMENSIONS.items():
            v = a.get(d)
            if isinstance(v, dict):
                score, why = v.get("score"), v.get("reasoning", v.get("reason", ""))
            elif isinstance(v, (list, tuple)) and len(v) == 2:  # Sotopia's own (reasoning, score) tuples
                why, score = v
            else:
                raise ValueError(f"{key}.{d} missing")
            if isinstance(score, bool) or not isinstance(score, (int, float, str)):
                raise ValueError(f"{key}.{d}: score is not a number")
            score = float(score)  # a string that is no number raises ValueError
            if not lo <= score <= hi:
                raise ValueError(f"{key}.{d}: score {score} outside {lo}..{hi}")
            dims[d] = {"score": score, "reasoning": str(why)}
        out.append(dims)
    return out


def overall(scores: dict) -> float:
    """OVERALL: the unweighted mean of the seven raw scores (Sotopia; RAPO Table 2)."""
    return sum(scores[d] for d in DIMENSIONS) / len(DIMENSIONS)


def evaluate(evaluator, setups: list[dict], episodes: list[dict], *, retries: int = 2, max_new_tokens: int = 1024,
             seed: int = 0, prefill: str = "") -> tuple[list[list[dict] | None], list[str], dict]:
    """Scores of every episode (one batched evaluator call, re-asked where invalid): per episode [agent 0's
    {dim: score, ..., "overall", "reasons"}, agent 1's], or None when no answer validated.
    Returns (results, the last raw answer of each, {"evaluated", "retried", "failed"})."""
    res = backends.ask_json(evaluator, [evaluator_chat(s, e) for s, e in zip(setups, episodes)], validate_evaluation,
                          retries=retries, max_new_tokens=max_new_tokens, seed=seed, prefill=prefill)
    out = []
    for v in res.values:
        if v is None:
            out.append(None)
            continue
        agents = []
        for dims in v:
            s = {d: dims[d]["score"] for d in DIMENSIONS}
            agents.append({**s, "overall": overall(s), "reasons": {d: dims[d]["reasoning"] for d in DIMENSIONS}})
        out.append(agents)
    return out, res.raw, {"evaluated": len(out), "retried": res.retried, "failed": res.failed}


def episode_record(case: dict, setup: dict, players: list[str], episode: dict, scores: list[dict] | None,
                   raw_eval: str = "") -> dict:
    """One line of the episodes output: the case, who played whom, the whole dialogue and the evaluation."""
    return {"id": case["id"], "env_id": setup["env_id"], "combo_id": setup["combo_id"], "codename": setup["codename"],
            "source": setup["source"], "side": case.get("side", 0), "names": setup["names"], "players": players,
            "end": episode["end"], "turns": len(episode["messages"]), "invalid_actions": episode["invalid"],
            "messages": [{k: m[k] for k in ("turn", "agent", "action_type", "argument", "valid")}
                         for m in episode["messages"]],
            "transcript": transcript(episode["messages"], setup["names"]),
            "scores": scores, "evaluator_raw": None if scores is not None else raw_eval}


def play_chunk(profiles: dict, cases: list[dict], players: list[list[str]], role_backends: dict, gen_kw: dict, evaluator,
               *, max_turns: int = MAX_TURNS, seed: int = 0, retries: int = 2, eval_max_new_tokens: int = 1024,
               eval_prefill: str = "", write=None) -> tuple[list[dict], dict]:
    """Play a chunk of episodes in lock-step and evaluate each as it ends (one batched evaluator call per turn at
    which episodes end); write(records) is called with each batch of finished, evaluated episode records.
    Returns (the records in case order, the evaluator's counts)."""
    setups = [episode_setup(profiles, c) for c in cases]
    records, counts = [None] * len(cases), {"evaluated": 0, "retried": 0, "failed": 0}

    def finish(done):
        idx = [i for i, _ in done]
        scores, raw, st = evaluate(evaluator, [setups[i] for i in idx], [e for _, e in done], retries=retries,
                                   max_new_tokens=eval_max_new_tokens, seed=seed + 7, prefill=eval_prefill)
        for k in counts:
            counts[k] += st[k]
        batch = [episode_record(cases[i], setups[i], players[i], e, sc, r)
                 for (i, e), sc, r in zip(done, scores, raw)]
        for i, rec in zip(idx, batch):
            records[i] = rec
        if write:
            write(batch)

    run_episodes(setups, players, role_backends, gen_kw, max_turns=max_turns, seed=seed, on_finish=finish)
    return records, counts


def policy_scores(rec: dict, role: str = "policy") -> list[dict]:
    """The evaluated agents' scores of one episode: both agents in self-play, the policy's side against a partner
    (none when the evaluator's answer never validated)."""
    if rec["scores"] is None:
        return []
    return [rec["scores"][a] for a in range(2) if rec["players"][a] == role]


def summarize(records: list[dict], stat, hard_ids=HARD_ENV_IDS) -> dict:
    """GOAL, OVERALL and every dimension per subset ("all" = every scenario evaluated, "hard" = those of Sotopia-hard),
    each a mean over scenarios (a scenario's value: the mean over its episodes and evaluated agents) with
    stat(values) -> {value, ci} (06's bootstrap over scenarios); plus the episodes' counts (evaluator failures,
    invalid actions of the policy, how episodes ended, mean length)."""
    out = {"episodes": len(records), "evaluator_failed": sum(r["scores"] is None for r in records),
           "policy_invalid_actions": sum(r["invalid_actions"][a] for r in records for a in range(2)
                                         if r["players"][a] == "policy"),
           "policy_actions": sum(1 for r in records for m in r["messages"] if r["players"][m["agent"]] == "policy"),
           "ends": {k: sum(r["end"] == k for r in records) for k in ("leave", "stale", "max_turns")},
           "mean_turns": sum(r["turns"] for r in records) / max(1, len(records))}
    for subset, keep in (("all", lambda e: True), ("hard", lambda e: e in hard_ids)):
        per_env: dict[str, list[dict]] = {}
        for r in records:
            if keep(r["env_id"]):
                per_env.setdefault(r["env_id"], []).extend(policy_scores(r))
        per_env = {e: v for e, v in per_env.items() if v}
        if not per_env:
            continue
        out[subset] = {"scenarios": len(per_env), "agents_scored": sum(len(v) for v in per_env.values()),
                       **{k: stat([sum(x[k] for x in v) / len(v) for v in per_env.values()])
                          for k in (*DIMENSIONS, "overall")}}
    return out


def scenario_values(records: list[dict], key: str) -> dict[str, float]:
    """{env_id: the mean of `key` over the scenario's episodes and evaluated agents}."""
    per_env: dict[str, list[float]] = {}
    for r in records:
        for x in policy_scores(r):
            per_env.setdefault(r["env_id"], []).append(x[key])
    return {e: sum(v) / len(v) for e, v in per_env.items()}


def paired_difference(records_a: list[dict], records_b: list[dict], key: str, stat) -> dict:
    """The mean of a - b over the scenarios both policies were evaluated on (same scenarios, same pairings), with
    stat's CI: the comparison of two policies that accounts for scenarios being easier or harder."""
    va, vb = scenario_values(records_a, key), scenario_values(records_b, key)
    common_envs = sorted(set(va) & set(vb))
    return {"scenarios": len(common_envs), **stat([va[e] - vb[e] for e in common_envs])}


def fmt_stat(s: dict | None) -> str:
    if not s or s.get("value") is None:
        return "-"
    return f"{s['value']:.2f}" + (f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s.get("ci") else "")


def report_tables(summaries: dict[str, dict]) -> str:
    """Markdown: GOAL and OVERALL per subset (RAPO Table 2's columns) and the seven dimensions (Table 9's), one row
    per policy label, 95% CIs over scenarios in brackets."""
    subsets = [s for s in ("all", "hard") if any(s in v for v in summaries.values())]
    head = " | ".join(f"{s.capitalize()} {k}" for s in subsets for k in ("GOAL", "OVERALL"))
    lines = [f"| policy | {head} | episodes | evaluator failed |", "|---" * (3 + 2 * len(subsets)) + "|"]
    for label, s in summaries.items():
        cells = " | ".join(fmt_stat(s.get(sub, {}).get(k)) for sub in subsets for k in ("goal", "overall"))
        lines.append(f"| {label} | {cells} | {s['episodes']} | {s['evaluator_failed']} |")
    for sub in subsets:
        lines += ["", f"Per dimension ({sub}):", "", "| policy | " + " | ".join(DIMENSIONS) + " |",
                  "|---" * (1 + len(DIMENSIONS)) + "|"]
        for label, s in summaries.items():
            if sub in s:
                lines.append(f"| {label} | " + " | ".join(fmt_stat(s[sub][d]) for d in DIMENSIONS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# RAPO's roles on Sotopia (05_rapo.py --env sotopia): the GRM and the teacher (our words after Appendix G.2)

GRM_PROMPT = (
    "You evaluate social intelligence. Below are several candidate actions that {name} could take at the same "
    "point of an interaction, each followed by the other person's reaction to it. Compare them and judge how well "
    "each serves {name}, using the other person's reaction as evidence.\n"
    "Criteria: 1. believability: natural, realistic, consistent with the character; 2. relationship: keeps or "
    "improves the relationship and social standing; 3. knowledge: gains new and important information; "
    "4. secret: keeps secrets and private information; 5. social rules: breaks no moral rule or law; "
    "6. financial and material benefits: gains rather than loses; 7. goal (the most important): progress toward "
    "and completion of {name}'s goal, which is: {goal}\n"
    "For each candidate write a critique in \"analysis\" (about that action only, without naming indices or "
    "comparing with other candidates), a unique integer \"rank\" (1 = best) and a unique \"score\" between 0 and 1 "
    "(higher = better).\n\n<Interaction Context>\n{context}\n</Interaction Context>\n\n"
    "<Candidates>\n{samples}\n</Candidates>\n\n"
    "Return only one JSON object whose keys are the candidate indices: "
    "{{\"0\": {{\"analysis\": \"...\", \"rank\": 1, \"score\": 0.9}}, ...}}"
)


def state_context(setup: dict, agent: int, messages: list[dict]) -> str:
    """The interaction as `agent` sees it (its background view and the conversation so far): the GRM's context."""
    return f"{background(setup, agent)}\n\nConversation so far:\n{transcript(messages, setup['names'])}"


def grm_chats(states: list[dict], actions: list[list[dict]], reactions: list[list[dict]]) -> list[list[dict]]:
    """One GRM prompt per group. states[g]: {setup, agent, messages} (the context); actions[g][i]: candidate i as a
    parsed action (already in the shown order); reactions[g][i]: the partner's action after it."""
    chats = []
    for st, acts, reacts in zip(states, actions, reactions):
        setup, agent, msgs = st["setup"], st["agent"], st["messages"]
        t, names = len(msgs), setup["names"]
        items = [f"[{i}] {action_line(t, names[agent], a)}\n[{i}] Reaction: {action_line(t + 1, names[1 - agent], u)}"
                 for i, (a, u) in enumerate(zip(acts, reacts))]
        chats.append([{"role": "user", "content": GRM_PROMPT.format(
            name=names[agent], goal=render(setup["goals"][agent], f"agent_{agent}"),
            context=state_context(setup, agent, msgs), samples="\n\n".join(items))}])
    return chats


TEACHER_BLOCK = (
    "\n\n[Hindsight feedback for your action at this turn]\n"
    "<Original Response>\n{response}\n</Original Response>\n"
    "<User Reaction>\n{reaction}\n</User Reaction>\n"
    "<Critic Feedback>\n{critique}\n</Critic Feedback>\n"
    "<Example Better Response>\n{best}\n</Example Better Response>\n"
    "Refine the original action from the other person's reaction and the feedback: fix what the feedback names and "
    "serve your goal better. Answer only with the revised action as JSON."
)


def teacher_context(context: list[dict], response: str, reaction: str, critique: str, best: str) -> list[dict]:
    """The teacher's chat (template "Sotopia Teacher Policy", our words): the agent's chat with the hindsight
    block appended to its last user message."""
    out = [dict(m) for m in context]
    out[-1]["content"] += TEACHER_BLOCK.format(response=response, reaction=reaction, critique=critique, best=best)
    return out


# ----------------------------------------------------------------------------------------------------
# Training contexts for 05_rapo.py --env sotopia: episodes of the base policy, its turns as contexts
#
#   python envs/sotopia.py --data PROFILE_FOLDER --out runs/sotopia-train --policy hf:embedded [--partner MODEL]
# writes episodes.jsonl (every episode, resumable: a re-run skips finished ids) and turns.jsonl (05's --data): one
# record per turn the policy played, whose context is the agent's chat at that turn (05 adds AGENT_SYSTEM) and
# whose "sotopia" field holds the state the partner and the GRM need (the setup, the agent, the messages before).

EPISODE_KEYS = ("seed", "subset", "pairings", "sides", "max_turns", "batch_size", "policy", "partner", "temperature",
                "top_p", "max_new_tokens", "partner_temperature")


def chunk_seed(seed: int, k: int) -> int:
    """Seed of chunk k of --batch-size episodes: from (--seed, k) only, so a resumed run equals an uninterrupted one."""
    import numpy as np

    return int(np.random.SeedSequence([seed, 26, k]).generate_state(1)[0] % (1 << 31))


def players_of(case: dict, selfplay: bool) -> list[str]:
    """Role of agent 0 and agent 1: the policy on both (self-play), or the policy on the case's side."""
    if selfplay:
        return ["policy", "policy"]
    return ["policy", "partner"] if case["side"] == 0 else ["partner", "policy"]


def policy_turns(rec: dict, setup: dict) -> list[dict]:
    """turns.jsonl records (05's --data) for the turns the policy played in one episode record."""
    out, msgs = [], []
    for m in rec["messages"]:
        if rec["players"][m["agent"]] == "policy":
            chat = agent_chat(setup, m["agent"], msgs)
            out.append({"id": f"{rec['id']}-t{m['turn']:02d}", "dialog_id": rec["id"], "turn": m["turn"], "split": "train",
                        "learn": True, "context": chat[1:], "target": json.dumps(
                            {"action_type": m["action_type"], "argument": m["argument"]}, ensure_ascii=False),
                        "sotopia": {"setup": setup, "agent": m["agent"], "messages": [dict(x) for x in msgs]}})
        msgs.append({k: m[k] for k in ("turn", "agent", "action_type", "argument")})
    return out


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Play Sotopia episodes with the base policy (self-play, or against "
                                            "--partner) and write the policy's turns as training contexts for "
                                            "05_rapo.py --env sotopia (docs/design.md section 11).")
    common.add_common_args(p, data="data/sotopia", out="runs/sotopia-train")
    common.add_role_arg(p, "policy", "the base policy whose turns become training contexts")
    common.add_role_arg(p, "partner", "the other agent; '' (default) = self-play, the policy plays both agents "
                        "(RAPO trains against a simulated user: Qwen-3-8B)", default="")
    common.add_decoder_arg(p)
    p.add_argument("--subset", default="all", choices=["all", "hard"], help="all scenarios of --data, or Sotopia-hard's")
    p.add_argument("--pairings", type=int, default=None, help="pairings per scenario (default: all)")
    p.add_argument("--sides", type=int, default=1, choices=[1, 2],
                   help="with --partner: 1 = the policy plays agent 0; 2 = also agent 1 (a second episode)")
    p.add_argument("--max-turns", type=int, default=MAX_TURNS, help="actions per episode, both agents (Sotopia: 20)")
    p.add_argument("--batch-size", type=int, default=16, help="episodes advanced together (one call per role per turn)")
    p.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature (ours: 1.0, for varied contexts)")
    p.add_argument("--top-p", type=float, default=1.0, help="policy top-p")
    p.add_argument("--max-new-tokens", type=int, default=96, help="length limit of an action (ours: 96)")
    p.add_argument("--partner-temperature", type=float, default=0.7, help="partner sampling temperature (ours: 0.7)")
    args = p.parse_args(argv)
    common.check_common_args(args)
    common.check_decoder(args)
    common.check(args.max_turns >= 1 and args.batch_size >= 1 and args.max_new_tokens >= 1,
                 "--max-turns, --batch-size and --max-new-tokens must be >= 1")
    common.check(args.pairings is None or args.pairings >= 1, "--pairings must be >= 1")
    common.check(args.temperature >= 0 and args.partner_temperature >= 0 and 0 < args.top_p <= 1,
                 "temperatures must be >= 0 and --top-p in (0, 1]")
    common.check(not (args.sides == 2 and not args.partner), "--sides 2 needs --partner (in self-play the policy "
                                                            "already plays both agents)")
    for role in ("policy", "partner"):
        if getattr(args, role):
            common.check_model_path(getattr(args, role), f"--{role}")
    profiles = load_profiles(args.data)
    cases = select_cases(profiles, args.subset, args.pairings, args.sides if args.partner else 1)
    cases = cases[:args.max_examples] if args.max_examples else cases
    common.check(len(cases) > 0, f"{args.data}: no pairings to play" + (" in Sotopia-hard" if args.subset == "hard" else ""))
    selfplay = not args.partner
    out_dir = Path(args.out)
    inputs = common.input_digests(args, ("data",))
    common.lock_out(out_dir)
    eps_out = common.ResumableOutput(out_dir, "episodes.jsonl")
    done = set() if args.overwrite else eps_out.done
    common.check_resumed_output(out_dir / "args.json", "sotopia_episodes", len(done),
                                {"inputs": inputs, **{k: getattr(args, k) for k in EPISODE_KEYS}}, "episodes")
    chunks = common.chunks(cases, args.batch_size)
    todo = [k for k, ch in enumerate(chunks) if not all(c["id"] in done for c in ch)]
    role_backends, gen_kw = {}, {}
    if todo:
        mk = lambda spec, url: backends.make_backend(spec, url, args.device, args.dtype, decoder=args.decoder)
        role_backends["policy"] = mk(args.policy, args.policy_base_url)
        gen_kw["policy"] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        if not selfplay:
            role_backends["partner"] = mk(args.partner, args.partner_base_url)
            gen_kw["partner"] = dict(max_new_tokens=args.max_new_tokens, temperature=args.partner_temperature, top_p=0.9)
    eps_out = common.ResumableOutput(out_dir, "episodes.jsonl", overwrite=args.overwrite)
    common.save_args(args, out_dir, {"stage": "sotopia_episodes", "inputs": inputs})
    print(f"{len(cases)} episodes in {len(chunks)} chunks; {len(todo)} chunk(s) to play")
    for k in todo:
        ch = chunks[k]
        setups = [episode_setup(profiles, c) for c in ch]
        players = [players_of(c, selfplay) for c in ch]

        def write(finished, ch=ch, setups=setups, players=players):
            eps_out.append([episode_record(ch[i], setups[i], players[i], e, None) for i, e in finished
                            if ch[i]["id"] not in done])

        run_episodes(setups, players, role_backends, gen_kw, max_turns=args.max_turns, seed=chunk_seed(args.seed, k),
                     on_finish=write)
    recs = eps_out.merge([c["id"] for c in cases])
    by_id = {c["id"]: c for c in cases}
    turns = [t for r in recs if r["id"] in by_id for t in policy_turns(r, episode_setup(profiles, by_id[r["id"]]))]
    common.write_jsonl(out_dir / "turns.jsonl", turns)
    invalid = sum(sum(r["invalid_actions"][a] for a in range(2) if r["players"][a] == "policy") for r in recs)
    print(f"wrote {out_dir / 'episodes.jsonl'} ({len(recs)} episodes) and {out_dir / 'turns.jsonl'} ({len(turns)} "
          f"policy turns; {invalid} of them not valid action JSON)")


if __name__ == "__main__":
    common.run_main(main)
