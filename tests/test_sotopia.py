"""Sotopia: the profile loader (every malformed class), what each agent sees, episode termination and action
parsing, the evaluator's validation, and the scripted environment's rules checked by hand (envs/sotopia.py,
envs/sotopia_scripted.py). Fixtures: tests/fixtures/sotopia (written for the project)."""
import json
import shutil
from pathlib import Path

import pytest

import backends
import common
from conftest import run_in_process, run_script
from envs import sotopia as S
from envs import sotopia_scripted as R
from test_openai_backend import server, served_model  # noqa: F401  (the `transformers serve` fixtures)

FIX = Path(__file__).parent / "fixtures" / "sotopia"


@pytest.fixture()
def profiles():
    return S.load_profiles(FIX)


def setup_of(profiles, combo_id):
    combo = next(c for c in profiles["combos"] if c["combo_id"] == combo_id)
    return S.episode_setup(profiles, {"id": combo_id, "env_id": combo["env_id"], "combo_id": combo_id, "side": 0})


# ----------------------------------------------------------------------------------------------------
# Loading


def test_load_both_schema_variants(profiles):
    envs = profiles["envs"]
    assert envs["fx-env-bargain"]["relationship"] == 0 and envs["fx-env-divide"]["relationship"] == 3  # "0" and 3
    assert envs["fx-env-open"]["relationship"] == 2
    for e in envs.values():  # "none", "nan", null all mean no constraint
        assert e["occupation_constraint"] is None and e["agent_constraint"] is None
    assert envs["fx-env-bargain"]["age_constraint"] == "[(18, 70), (18, 70)]"
    assert profiles["agents"]["fx-a2"]["age"] == 27  # "27"
    assert [r["relationship"] for r in profiles["relationships"]] == [0, 3]
    assert len(profiles["combos"]) == 5


def corrupt(tmp_path, name, edit):
    """A copy of the fixture folder with file `name`'s records passed through edit(list) -> list or raw text."""
    folder = tmp_path / "profiles"
    shutil.copytree(FIX, folder)
    path = folder / name
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    out = edit(recs)
    path.write_text(out if isinstance(out, str) else "".join(json.dumps(r) + "\n" for r in out))
    return folder


def set_field(i, field, value):
    def edit(recs):
        if value is DELETE:
            del recs[i][field]
        else:
            recs[i][field] = value
        return recs
    return edit


DELETE = object()
ENVS, AGENTS, COMBOS, RELS = S.FILES["envs"], S.FILES["agents"], S.FILES["combos"], S.FILES["relationships"]
MALFORMED = {
    "invalid-json": (ENVS, lambda r: "".join(json.dumps(x) + "\n" for x in r) + "{not json\n", "line 5: invalid JSON"),
    "missing-scenario": (ENVS, set_field(1, "scenario", DELETE), "line 2 (fx-env-divide): field 'scenario' is missing"),
    "goals-not-two": (ENVS, set_field(0, "agent_goals", ["only one"]), "line 1 (fx-env-bargain): field 'agent_goals'"),
    "relationship-range": (ENVS, set_field(2, "relationship", "7"), "line 3 (fx-env-open): field 'relationship' must be 0..5"),
    "relationship-word": (ENVS, set_field(2, "relationship", "friend"), "field 'relationship' must be 0..5"),
    "constraint-type": (ENVS, set_field(0, "age_constraint", 5), "line 1 (fx-env-bargain): field 'age_constraint'"),
    "duplicate-env": (ENVS, lambda r: r + [r[0]], "line 5 (fx-env-bargain): field 'env_id' is a duplicate"),
    "agent-age": (AGENTS, set_field(1, "age", "old"), "line 2 (fx-a1): field 'age'"),
    "agent-secret-type": (AGENTS, set_field(0, "secret", None), "line 1 (fx-a0): field 'secret'"),
    "combo-env": (COMBOS, set_field(2, "env_id", "nope"), "line 3 (fx-c2): field 'env_id' names no scenario"),
    "combo-agent": (COMBOS, set_field(0, "agent_ids", ["fx-a0", "ghost"]), "line 1 (fx-c0): field 'agent_ids' names no agent"),
    "combo-pair": (COMBOS, set_field(0, "agent_ids", "fx-a0"), "field 'agent_ids' must be a list of two"),
    "rel-agent": (RELS, set_field(1, "agent2_id", "ghost"), "line 2 (fx-r1): field 'agent2_id' names no agent"),
    "rel-relationship": (RELS, set_field(0, "relationship", -1), "line 1 (fx-r0): field 'relationship' must be 0..5"),
    "no-scenarios": (ENVS, lambda r: "", "no scenarios"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_malformed_one_line_error(tmp_path, case):
    name, edit, msg = MALFORMED[case]
    folder = corrupt(tmp_path, name, edit)
    with pytest.raises(common.InputError) as e:
        S.load_profiles(folder)
    text = str(e.value)
    assert "\n" not in text and msg in text
    if case != "no-scenarios":
        assert name in text  # the file is named


def test_load_missing_file(tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(FIX, folder)
    (folder / COMBOS).unlink()
    with pytest.raises(common.InputError, match=f"{COMBOS}: missing"):
        S.load_profiles(folder)
    with pytest.raises(common.InputError, match="not a folder"):
        S.load_profiles(tmp_path / "absent")


def test_select_cases_subsets_pairings_sides(profiles):
    assert [c["id"] for c in S.select_cases(profiles)] == [f"fx-c{i}-a0" for i in range(5)]
    assert [c["id"] for c in S.select_cases(profiles, "hard")] == ["fx-c4-a0"]  # the one env with a hard id
    assert [c["id"] for c in S.select_cases(profiles, pairings=1)] == ["fx-c0-a0", "fx-c2-a0", "fx-c3-a0", "fx-c4-a0"]
    two = S.select_cases(profiles, pairings=1, sides=2)
    assert [(c["combo_id"], c["side"]) for c in two[:2]] == [("fx-c0", 0), ("fx-c0", 1)] and len(two) == 8
    with pytest.raises(common.InputError):
        S.select_cases(profiles, "easy")


# ----------------------------------------------------------------------------------------------------
# Visibility


def test_partner_profile_by_relationship(profiles):
    a = profiles["agents"]["fx-a1"]
    assert S.bio(a, 0) == "Unknown"  # stranger
    assert S.bio(a, 1) == "Tobias Marek"  # know by name
    acq = S.bio(a, 2)
    assert "51-year-old male surveyor" in acq and "old maps" in acq and "careful" not in acq
    for close in (3, 4, 5):  # friend, romantic, family: + personality
        assert "careful and values order" in S.bio(a, close)
    for level in range(6):
        assert "gambling" not in S.bio(a, level)  # never the secret
    assert "gambling debt" in S.bio(a, "self")


def test_agent_views_hide_partner_goal_secret_and_environment_text(profiles):
    st = setup_of(profiles, "fx-c0")  # strangers, bargain
    v0, v1, env = S.background(st, 0), S.background(st, 1), S.background(st, None)
    assert "Tobias Marek's background: Unknown" in v0 and "Wren Calloway's background: Unknown" in v1
    assert "forged a reference" in v0 and "forged a reference" not in v1  # own secret only
    assert "target price is $150" in v0 and "$150" not in v1 and "Tobias Marek's goal: Unknown" in v0
    assert "forged" in env and "gambling" in env and "$150" in env and "$120" in env  # the evaluator sees all
    st = setup_of(profiles, "fx-c3")  # acquaintances, <p viewer="environment"> in scenario and goal
    for viewer in (0, 1):
        assert "host's sister" not in S.background(st, viewer)
    assert "Both of them know the host's sister." in S.background(st, None)
    assert "(the host's sister)" in S.background(st, None)
    assert "Juno Okafor's background: Juno Okafor is a 27-year-old nonbinary nurse" in S.background(st, 0)
    assert "direct and values freedom" not in S.background(st, 0)  # acquaintance: no personality
    st = setup_of(profiles, "fx-c2")  # friends; hint tags shown to their own agent, without the tags
    v1 = S.background(st, 1)
    assert "Hint: ask what matters to the other person." in v1 and "<strategy_hint>" not in v1
    assert "Hint: ask what matters" not in S.background(st, 0)
    assert "Juno is direct and values freedom" in S.background(st, 0)  # friends see personality


def test_render_viewer_tags():
    t = "a <p viewer='agent_1'>one</p> <p viewer=\"environment\">env</p> <extra_info>x</extra_info> b"
    assert S.render(t, "agent_0") == "a x b"
    assert S.render(t, "agent_1") == "a one x b"
    assert S.render(t, "environment") == "a one env x b"


# ----------------------------------------------------------------------------------------------------
# Actions and episodes


@pytest.mark.parametrize("text,kind,arg,valid", [
    ('{"action_type": "speak", "argument": "Hi there"}', "speak", "Hi there", True),
    ('```json\n{"action_type": "action", "argument": "opens\\nthe door"}\n```', "action", "opens the door", True),
    ('{"action_type": "non-verbal communication", "argument": "smiles"}', "non-verbal communication", "smiles", True),
    ('{"action_type": "none", "argument": "ignored"}', "none", "", True),
    ('{"action_type": "leave", "argument": ""}', "leave", "", True),
    ('{"action_type": "dance", "argument": "x"}', "speak", '{"action_type": "dance", "argument": "x"}', False),
    ("Hello, nice to meet you!", "speak", "Hello, nice to meet you!", False),
    ('<think>plan</think>{"action_type": "speak", "argument": "ok"}', "speak", "ok", True),
])
def test_parse_action(text, kind, arg, valid):
    assert S.parse_action(text) == {"action_type": kind, "argument": arg, "valid": valid}


def test_transcript_round_trip():
    names = ["Ann Lee", "Bo Park"]
    msgs = [{"turn": 0, "agent": 0, "action_type": "speak", "argument": 'I say "hi"'},
            {"turn": 1, "agent": 1, "action_type": "non-verbal communication", "argument": "waves"},
            {"turn": 2, "agent": 0, "action_type": "action", "argument": "sits down"},
            {"turn": 3, "agent": 1, "action_type": "none", "argument": ""},
            {"turn": 4, "agent": 0, "action_type": "leave", "argument": "bye"}]
    assert S.parse_transcript(S.transcript(msgs, names), names) == msgs


class Script(backends.Backend):
    """Answers from a list per role (one per call of that agent), counting batched calls."""
    spec = "script"

    def __init__(self, replies):
        self.replies, self.calls, self.batches = replies, 0, []

    def generate(self, chats, *, n=1, prefill="", **kw):
        self.calls += 1
        self.batches.append(len(chats))
        out = []
        for c in chats:
            turn = int(c[-1]["content"].rsplit("This is turn #", 1)[1].split(".")[0])
            out.append([self.replies[min(turn, len(self.replies) - 1)]] * n)
        return out


def speak(x):
    return json.dumps({"action_type": "speak", "argument": x})


NONE = json.dumps({"action_type": "none", "argument": ""})
LEAVE = json.dumps({"action_type": "leave", "argument": ""})


def play(profiles, replies, max_turns=20, n=1):
    st = setup_of(profiles, "fx-c3")
    b = Script(replies)
    eps = S.run_episodes([st] * n, [["p", "p"]] * n, {"p": b}, {"p": {}}, max_turns=max_turns)
    return eps, b


def test_episode_ends_when_an_agent_leaves(profiles):
    eps, _ = play(profiles, [speak("a"), speak("b"), speak("c"), LEAVE, speak("never")])
    assert eps[0]["end"] == "leave" and len(eps[0]["messages"]) == 4 and eps[0]["messages"][-1]["agent"] == 1


def test_episode_ends_after_more_than_two_consecutive_none(profiles):
    eps, _ = play(profiles, [speak("a"), NONE, NONE, speak("b"), NONE, NONE, NONE, speak("never")])
    assert eps[0]["end"] == "stale" and len(eps[0]["messages"]) == 7  # two "none" in a row do not end it
    assert S.episode_end([{"action_type": "none"}] * 2, 20) is None
    assert S.episode_end([{"action_type": "none"}] * 3, 20) == "stale"


def test_episode_ends_at_max_turns_and_counts_invalid_replies(profiles):
    eps, _ = play(profiles, ["just talking"], max_turns=5)
    assert eps[0]["end"] == "max_turns" and len(eps[0]["messages"]) == 5
    assert eps[0]["invalid"] == [3, 2]  # every non-JSON reply taken as speech and counted per agent
    assert all(m["action_type"] == "speak" and m["argument"] == "just talking" for m in eps[0]["messages"])


def test_lockstep_one_call_per_role_per_turn(profiles):
    st = setup_of(profiles, "fx-c0")
    pol, par = Script([speak("x")]), Script([speak("y")])
    finished = []
    eps = S.run_episodes([st] * 3, [["policy", "partner"], ["partner", "policy"], ["policy", "partner"]],
                         {"policy": pol, "partner": par}, {"policy": {}, "partner": {}}, max_turns=4,
                         on_finish=finished.extend)
    assert pol.calls == par.calls == 4 and pol.batches == [2, 1, 2, 1] and par.batches == [1, 2, 1, 2]
    assert [i for i, _ in finished] == [0, 1, 2] and all(e["end"] == "max_turns" for e in eps)
    assert [m["argument"] for m in eps[1]["messages"]] == ["y", "x", "y", "x"]


# ----------------------------------------------------------------------------------------------------
# The evaluator's validation


def good_answer(**over):
    mid = {"believability": 8, "relationship": 2, "knowledge": 5, "secret": 0, "social_rules": -1,
           "financial_and_material_benefits": 1, "goal": 7}
    mid.update(over)
    return {k: {d: {"reasoning": "because", "score": v} for d, v in mid.items()} for k in S.AGENT_KEYS}


def test_validate_evaluation_good_and_overall():
    v = S.validate_evaluation(good_answer())
    assert v[0]["goal"] == {"score": 7.0, "reasoning": "because"}
    assert S.overall({d: v[0][d]["score"] for d in S.DIMENSIONS}) == pytest.approx(22 / 7)
    lows = {d: lo for d, (lo, _) in S.DIMENSIONS.items()}
    assert S.validate_evaluation(good_answer(**lows))[1]["secret"]["score"] == -10  # range ends are valid


@pytest.mark.parametrize("dim,score", [("goal", 11), ("secret", 1), ("relationship", -6), ("knowledge", -1),
                                       ("financial_and_material_benefits", 5.5), ("believability", "high"),
                                       ("social_rules", True)])
def test_validate_evaluation_rejects_out_of_range(dim, score):
    with pytest.raises(ValueError):
        S.validate_evaluation(good_answer(**{dim: score}))


def test_validate_evaluation_rejects_incomplete():
    a = good_answer()
    del a["agent_2"]["goal"]
    with pytest.raises(ValueError):
        S.validate_evaluation(a)
    with pytest.raises(ValueError):
        S.validate_evaluation({"agent_1": good_answer()["agent_1"]})


class Answers(backends.Backend):
    spec = "answers"

    def __init__(self, texts):
        self.texts, self.calls = list(texts), 0

    def generate(self, chats, *, n=1, prefill="", **kw):
        self.calls += 1
        return [[self.texts.pop(0)] * n for _ in chats]


def test_evaluate_reasks_and_counts_failures(profiles):
    st = setup_of(profiles, "fx-c0")
    ep = {"messages": [], "end": "max_turns", "invalid": [0, 0]}
    bad, good = json.dumps(good_answer(goal=12)), json.dumps(good_answer())
    res, raw, stats = S.evaluate(Answers([bad, good]), [st], [ep], retries=2)
    assert stats == {"evaluated": 1, "retried": 1, "failed": 0} and res[0][0]["goal"] == 7
    assert res[0][1]["overall"] == pytest.approx(22 / 7) and res[0][0]["reasons"]["goal"] == "because"
    res, raw, stats = S.evaluate(Answers([bad, bad, "no json"]), [st], [ep], retries=2)
    assert res == [None] and stats["failed"] == 1 and raw == ["no json"]


# ----------------------------------------------------------------------------------------------------
# The scripted environment, by hand

BARGAIN_BUYER = {"family": "bargain", "role": "buyer", "target": 100.0, "listing": 160.0}
DIVIDE = {"family": "divide", "counts": {"mug": 2, "plant": 1, "candle": 3}, "values": {"mug": 4, "plant": 1, "candle": 2}}


def m(agent, text, kind="speak"):
    return {"agent": agent, "action_type": kind, "argument": text}


def test_read_task_phrasings():
    assert R.read_task("A lamp for sale at $80.", "As the seller, your target price is set at $64.5.") == \
        {"family": "bargain", "role": "seller", "target": 64.5, "listing": 80.0}
    t = R.read_task("They have 3 apples, 2 bananas, and 1 orange.",
                    "For you, 1 apple = 1 point, 1 banana = 2 points, 1 orange = 3 points")
    assert t == {"family": "divide", "counts": {"apple": 3, "banana": 2, "orange": 1},
                 "values": {"apple": 1, "banana": 2, "orange": 3}}
    assert R.read_task("x", "Books give you 5 points each")["family"] == "open"  # no item counts in the scenario
    assert R.read_task("Two friends chat.", "Convince your friend.") == {"family": "open"}


def test_outcome_and_goal_bargain():
    msgs = [m(0, "Would you take $80?"), m(1, "I can't, I could do $130."), m(0, "Deal? How about $90"),
            m(1, "OK, $110 then."), m(0, "Deal, that works for me.")]
    out = R.outcome(BARGAIN_BUYER, msgs)
    assert out["deal"] == 110 and out["closed_by"] == 0  # "Deal? ... $90" named a new price: no close
    assert R.goal_score(BARGAIN_BUYER, 100, 0) == 10 and R.goal_score(BARGAIN_BUYER, 80, 0) == 10
    assert R.goal_score(BARGAIN_BUYER, 125, 0) == 5 and R.goal_score(BARGAIN_BUYER, 150, 0) == 0
    assert R.goal_score(BARGAIN_BUYER, None, 0) == 0
    seller = dict(BARGAIN_BUYER, role="seller")
    assert R.goal_score(seller, 75, 1) == 5 and R.financial_score(seller, 120, 1) == 2.0
    assert R.financial_score(BARGAIN_BUYER, 60, 0) == 4.0 and R.financial_score(BARGAIN_BUYER, 300, 0) == -5
    assert R.outcome(BARGAIN_BUYER, [m(0, "$90"), m(1, "No deal, I can't.")])["deal"] is None


def test_proposals_and_divide_goal():
    p = R.proposal_in("I take 2 mugs and the plant, you take 3 candles.", DIVIDE["counts"], 1)
    assert p == {1: {"mug": 2, "plant": 1, "candle": 0}, 0: {"mug": 0, "plant": 0, "candle": 3}}
    assert R.proposal_in("You can have all the candles.", DIVIDE["counts"], 0) == \
        {0: {"mug": 2, "plant": 1, "candle": 0}, 1: {"mug": 0, "plant": 0, "candle": 3}}
    assert R.proposal_in("Nice weather today.", DIVIDE["counts"], 0) is None
    deal = R.outcome(DIVIDE, [m(0, "I take 2 mugs, you take the rest."), m(1, "Sounds good, deal.")])["deal"]
    assert R.points(DIVIDE, deal, 0) == 8 and R.total_points(DIVIDE) == 15
    assert R.goal_score(DIVIDE, deal, 0) == round(10 * 8 / 10.5, 4) and R.financial_score(DIVIDE, deal, 0) == \
        round(10 * 8 / 15 - 5, 4)


def test_partner_concedes_on_schedule_accepts_when_offers_cross_and_says_why():
    bg = {"scenario": "A bike for sale at $200.", "names": ["A", "B"], "secrets": [None, None],
          "goals": [None, "You are the seller; your target price is $120."]}
    asks = []
    msgs = []
    for k in range(4):
        msgs += [m(0, "Would you take $50?")]
        a = R.partner_action(bg, 1, msgs)
        asks.append(R.price_in(a["argument"]))
        assert "can't sell at $50" in a["argument"]  # says why it refuses
        assert ("My final offer is $120." in a["argument"]) == (k == 3)  # rules v5: its floor, announced
        msgs.append({**a, "agent": 1})
    assert asks == [200, 173, 147, 120]  # L - (L - T) min(1, k / 3), said in whole dollars
    a = R.partner_action(bg, 1, msgs + [m(0, "Would you take $50?")])  # its final offer was not taken: it walks away
    assert a["action_type"] == "leave" and "no deal" in a["argument"] and not R.accepts(a["argument"])
    assert R.partner_action(bg, 1, msgs + [m(0, "Deal.")])["argument"].startswith("Great, we have a deal")  # taken
    assert R.outcome(R.task_of(bg, 1), msgs + [m(0, "Deal.")])["deal"] == 120.0
    assert "could do $200" in R.partner_action(bg, 1, [m(0, "I can pay $185.")])["argument"]  # below its ask 200
    a = R.partner_action(bg, 1, [m(0, "I can pay $185."), m(1, "No."), m(0, "Still $185.")])  # k = 1: asks 173.33
    assert a["argument"].startswith("Deal, $185")  # the offers crossed
    assert R.partner_action(bg, 1, [m(0, "I can pay $205.")])["argument"].startswith("Deal, $205")


def test_partner_divide_accepts_enough_and_leaves_after_deal_or_hostility():
    bg = {"scenario": "Splitting 2 mugs, 1 plant and 3 candles.", "names": ["A", "B"], "secrets": [None, None],
          "goals": [None, "A mug is worth 1 point, a plant is worth 5 points, a candle is worth 2 points."]}
    task = R.task_of(bg, 1)  # total 13; needs 0.9 * 13 = 11.7 at k = 0
    a = R.partner_action(bg, 1, [m(0, "I take 2 mugs, you take the rest.")])  # gives it 11 points < 11.7
    assert a["argument"].startswith("That split leaves me too little. I take")
    prop = R.proposal_in(a["argument"], task["counts"], 1)
    assert R.points(task, prop, 1) >= 11.7
    a = R.partner_action(bg, 1, [m(0, "I take 1 mug, you take the rest.")])  # 12 points
    assert "deal" in a["argument"].lower()
    assert R.partner_action(bg, 1, [m(0, "I take 1 mug, you take the rest."), m(1, "Deal, thanks."),
                                    m(0, "Great")])["action_type"] == "leave"
    assert R.partner_action(bg, 1, [m(0, "You idiot."), m(1, "Hm."), m(0, "Stupid offer.")])["action_type"] == "leave"
    # rules v5: it needs 0.9 - 0.4 min(1, k / 3) of its 13 points: 11.7, 9.97, 8.23, 6.5 (its final offer)
    msgs = []
    for k in range(4):
        msgs += [m(0, "I take 3 candles, you take the rest.")]  # gives it 7 points: enough only at k = 3
        a = R.partner_action(bg, 1, msgs)
        msgs.append({**a, "agent": 1})
        if k < 3:
            assert R.points(task, R.proposal_in(a["argument"], task["counts"], 1), 1) >= (0.9 - 0.4 * k / 3) * 13
            assert "final offer" not in a["argument"]
    assert "deal" in a["argument"].lower()  # k = 3: 7 >= 6.5
    msgs = [m(0, "Hello"), m(1, "a"), m(0, "Hi"), m(1, "b"), m(0, "Hey")]  # no offer of A's: k = 2 -> 3
    msgs += [{**R.partner_action(bg, 1, msgs), "agent": 1}, m(0, "Hmm")]
    final = R.partner_action(bg, 1, msgs)
    assert final["argument"].startswith("My final offer: I take")
    assert R.points(task, R.proposal_in(final["argument"], task["counts"], 1), 1) >= 6.5
    assert R.partner_action(bg, 1, msgs + [{**final, "agent": 1}, m(0, "Let me think.")])["action_type"] == "leave"


def test_rule_dimensions_by_hand():
    sec = "He has a large gambling debt"
    msgs = [m(0, "What do you need it for? Thank you for coming."), m(1, "x"),
            m(0, "What do you need it for? Thank you for coming."), m(1, "y"),
            m(0, "You idiot, my target is $100."), m(1, "z"), m(0, '{"action_type": "spe')]
    d = R.rule_dimensions(BARGAIN_BUYER, sec, msgs, 0)["dims"]  # the repeated question is paid once
    assert d == {"believability": 6.0, "relationship": -1.0, "knowledge": 2.0, "secret": -5.0, "social_rules": -3.0}
    d = R.rule_dimensions(BARGAIN_BUYER, sec, [m(0, "Honestly I have a large gambling debt.")], 0)["dims"]
    assert d["secret"] == -10
    left = R.rule_dimensions(BARGAIN_BUYER, "", [m(0, "$90"), m(1, "No."), m(0, "", "leave")], 0)
    assert left["dims"]["relationship"] == -1 and "leaves before any deal" in left["faults"]
    assert R.rule_dimensions(DIVIDE, "", [m(0, "Mugs are 4 points to me.")], 0)["dims"]["secret"] == -5


def test_rules_v2_wordless_messages_and_questions():
    """Rules version 2: a message with no letter and no digit is a broken action (any action type; v1 let "$." keep
    believability 10); knowledge pays each information question once, and never an offer phrased as a question (v1
    paid 2 points per "?": "speak?" said five times scored 10)."""
    assert R.RULES_VERSION >= 2
    dims = lambda task, msgs: R.rule_dimensions(task, "", msgs, 0)
    r = dims(BARGAIN_BUYER, [m(0, "$."), m(1, "x"), m(0, "...", "non-verbal communication"), m(1, "y"), m(0, "$90")])
    assert r["dims"]["believability"] == 6.0 and "is a broken action (JSON debris, or no words)" in r["faults"]
    assert dims(BARGAIN_BUYER, [m(0, "smiles", "non-verbal communication"), m(1, "x"), m(0, "$90")])["dims"][
        "believability"] == 10.0  # a word or a number is not broken
    speak_q = [x for _ in range(5) for x in (m(0, "speak?"), m(1, "x"))]
    d = dims(BARGAIN_BUYER, speak_q)["dims"]
    assert d["knowledge"] == 2.0 and d["believability"] == 2.0  # one question paid; four repetitions cost 8
    offers = [m(0, "Would you take $90?"), m(1, "x"), m(0, "How about $95?"), m(1, "y")]
    assert dims(BARGAIN_BUYER, offers)["dims"]["knowledge"] == 0.0
    assert dims(DIVIDE, [m(0, "Can I take 2 mugs and you take the rest?")])["dims"]["knowledge"] == 0.0
    mixed = [m(0, "What do you use it for?"), m(1, "x"), m(0, "Is it still under warranty?"), m(1, "y"),
             m(0, "?"), m(1, "z"), m(0, "what do you use it for?")]
    d = dims(BARGAIN_BUYER, mixed)["dims"]
    assert d["knowledge"] == 4.0 and d["believability"] == 6.0  # "?" is broken, not a question; the last repeats


def test_rules_v3_repetition_counts_numbers():
    """Rules version 3: repetition compares words and numbers (v2 compared letter words only: a bare "$30." said
    three times was no repetition, and two offers differing only in their amounts were one)."""
    assert R.RULES_VERSION >= 3
    assert R.tokens("I'd pay $1,200.50 now") == {"i'd", "pay", "1", "200", "50", "now"}
    dims = lambda task, msgs: R.rule_dimensions(task, "", msgs, 0)["dims"]
    bare = [m(0, "$30."), m(1, "x"), m(0, "$30."), m(1, "y"), m(0, "$30.")]
    assert dims(DIVIDE, bare)["believability"] == 6.0  # two repetitions (v2: 10)
    moving = [m(0, "I can't sell at $300: it is worth more than that to me. I could do $350."), m(1, "x"),
              m(0, "I can't sell at $290: it is worth more than that to me. I could do $340.")]
    assert dims(BARGAIN_BUYER, moving)["believability"] == 10.0  # 14 shared of 18 tokens: 0.78 (v2: the same words)
    same = [m(0, "I could do $350."), m(1, "x"), m(0, "I could do $350!")]
    assert dims(BARGAIN_BUYER, same)["believability"] == 8.0


def test_rules_v4_an_open_offer_is_worth_its_goal_while_a_turn_is_left():
    """Rules version 4: an offer still open after the reaction is worth its full GOAL while the agent has a turn left
    before TURN_LIMIT to accept it, 0 after (v3: 0.6 x its GOAL at any turn, so accepting beat waiting); a reaction
    at the turn limit or later is left out."""
    assert R.RULES_VERSION >= 4 and R.TURN_LIMIT == 10 and not hasattr(R, "OPEN_OFFER")
    # Wren buys (target $150) from a seller (target $120, listing $200) asking $170, then $150 if Wren waits.
    bg = {"scenario": "A bike is for sale at $200.", "names": ["Wren", "Tobias"], "secrets": [None, None],
          "goals": ["You are the buyer; your target price is $150.", "You are the seller; your target price is $120."]}
    accept, wait = m(0, "Deal."), m(0, "Let me think about it.")
    early = [m(0, "Hello"), m(1, "I am asking $200."), m(0, "Hi"), m(1, "I could do $170.")]  # candidate at turn 4
    v_accept, _ = R.candidate_value(bg, 0, early + [accept, m(1, "Thank you!")])
    v_wait, why = R.candidate_value(bg, 0, early + [wait, m(1, "I could do $150.")])
    # goal at $170: 10 (1 - 20 / 75) = 7.3333; waiting: $150 stands and Wren acts again at turn 6, goal 10
    assert v_accept == pytest.approx(10 * (1 - 20 / 75), abs=1e-4) and v_wait == 10.0
    assert "can still be accepted" in why and "goal value 10.0 of 10" in why
    # the same exchange at turns 8-9 (TURN_LIMIT 10): Wren's turn 8 is its last, so waiting leaves no deal
    late = [m(0, "Hello"), m(1, "I am asking $200."), m(0, "Hi"), m(1, "I could do $185."), m(0, "Hm"),
            m(1, "I could do $178."), m(0, "Well"), m(1, "I could do $170.")]
    assert R.candidate_value(bg, 0, late + [accept, m(1, "Thank you!")])[0] == pytest.approx(v_accept, abs=1e-4)
    v_late, why = R.candidate_value(bg, 0, late + [wait, m(1, "I could do $150.")])
    assert v_late == 0.0 and "ends before it can be accepted" in why
    # a candidate at turn 9 (the last action): the partner's reaction at turn 10 never happens, so an offer the
    # partner would accept there closes nothing
    last = late + [m(0, "Hmm")]
    offer = m(1, "Would you take $150?")
    assert R.candidate_value(bg, 1, last + [offer, m(0, "Deal, $150 it is.")])[0] <= 0.0
    assert R.outcome(R.task_of(bg, 1), last + [offer, m(0, "Deal, $150 it is.")])["deal"] == 150.0


def test_rules_v5_the_final_offer_is_worth_taking():
    """Rules version 5: the partner announces its floor as its final offer and walks away if it is not taken, so the
    GRM ranks taking it above waiting (before, waiting for the next concession never cost anything)."""
    assert R.RULES_VERSION == 5 and R.K_CONCEDE == 3 and R.PARTNER_RULES == 2
    bg = {"scenario": "A bike is for sale at $200.", "names": ["Wren", "Tobias"], "secrets": [None, None],
          "goals": ["You are the buyer; your target price is $150.", "You are the seller; your target price is $120."]}
    msgs = []
    for line in ("Hello", "Hi", "Hm", "Well"):
        msgs.append(m(0, line))
        msgs.append({**R.partner_action(bg, 1, msgs), "agent": 1})
    assert msgs[-1]["argument"].endswith("My final offer is $120.") and len(msgs) == 8
    accept, wait = m(0, "Deal."), m(0, "Let me think about it.")
    reactions = [{**R.partner_action(bg, 1, msgs + [c]), "agent": 1} for c in (accept, wait)]
    assert reactions[1]["action_type"] == "leave"  # walks away
    v_accept = R.candidate_value(bg, 0, msgs + [accept, reactions[0]])[0]
    v_wait, why = R.candidate_value(bg, 0, msgs + [wait, reactions[1]])
    assert v_accept == 10.0 and v_wait == 0.0 and "ended without a deal" in why  # $120 is below Wren's $150 target


def test_demonstrators_wait_accept_and_the_grm_ranks_their_moves_by_the_final_offer():
    """The scripted demonstrators of the policy's seat (AGENTS; not rules): the waiter never offers or accepts and
    never repeats a line, so its episodes run to the final offer and the walk-away; the coin accepts a standing offer
    about half the time, never without one, and leaves after a deal. By hand, along the episode of an agent that
    waits with those lines: the GRM ranks waiting above accepting before the final offer, accepting above waiting at it."""
    bg = {"scenario": "A bike is for sale at $200.", "names": ["Wren", "Tobias"], "secrets": [None, None],
          "goals": ["You are the buyer; your target price is $150.", "You are the seller; your target price is $120."]}
    task, rng = R.task_of(bg, 0), __import__("random").Random(0)
    msgs = []
    while not msgs or msgs[-1]["action_type"] != "leave":
        msgs.append({**R.waiter_action(bg, 0, msgs, rng), "agent": 0})
        if len(msgs) > 1:  # before the partner's answer: accepting its standing offer against the waiting line
            acc = m(0, R.ACCEPT_LINE)
            vals = [R.candidate_value(bg, 0, msgs[:-1] + [c, {**R.partner_action(bg, 1, msgs[:-1] + [c]), "agent": 1}])[0]
                    for c in (acc, msgs[-1])]
            final = "final offer" in msgs[-2]["argument"]
            assert (vals[0] > vals[1]) == final, (len(msgs), vals)
        msgs.append({**R.partner_action(bg, 1, msgs), "agent": 1})
    mine = [x["argument"] for x in msgs if x["agent"] == 0]
    assert mine == list(R.WAIT_LINES[:5]) and len(set(mine)) == 5  # 5 turns, no repetition
    out = R.outcome(task, msgs)
    assert out["deal"] is None and out["offers"][0] is None and msgs[-3]["argument"].endswith("My final offer is $120.")
    assert msgs[-1]["argument"].startswith("You did not take my final offer")
    assert R.coin_action(bg, 0, [], rng)["argument"] == R.WAIT_LINES[0]  # no offer standing: it waits
    after = msgs[:2]  # the partner asks $200
    picks = [R.coin_action(bg, 0, after, __import__("random").Random(i))["argument"] for i in range(200)]
    assert 60 < picks.count(R.ACCEPT_LINE) < 140 and set(picks) == {R.ACCEPT_LINE, R.WAIT_LINES[1]}
    closed = after + [m(0, R.ACCEPT_LINE)]
    assert R.outcome(task, closed)["deal"] == 200.0
    assert R.coin_action(bg, 1, closed, rng)["action_type"] == "leave"


def test_scripted_agent_specs_play_the_policy_seat(profiles):
    """`scripted:NAME` puts a demonstrator in a Sotopia agent's seat (the partner, the evaluator and the GRM are the
    rules whatever the name); a coin's draw repeats with the seed; an unknown name is refused at once."""
    assert common.parse_spec("scripted:coin") == common.ModelSpec("scripted", "coin")
    assert common.parse_spec("scripted") == common.ModelSpec("scripted", "rules")
    with pytest.raises(common.InputError, match="scripted:nobody: no such scripted agent"):
        backends.make_backend("scripted:nobody")
    st = setup_of(profiles, "fx-c0")
    msgs = [{"turn": 0, "agent": 0, "action_type": "speak", "argument": "Would you take $100?"}]
    chat = S.agent_chat(st, 1, msgs)
    rules, waiter, coin = (backends.make_backend(s) for s in ("scripted", "scripted:waiter", "scripted:coin"))
    assert json.loads(waiter.complete([chat])[0]) == {"action_type": "speak", "argument": R.WAIT_LINES[0]}
    assert json.loads(rules.complete([chat])[0])["argument"].startswith("I can't sell at $100")
    draws = [json.loads(coin.complete([chat], seed=s)[0])["argument"] for s in range(40)]
    assert draws == [json.loads(coin.complete([chat], seed=s)[0])["argument"] for s in range(40)]
    assert set(draws) == {R.ACCEPT_LINE, R.WAIT_LINES[0]}
    ev = S.evaluator_chat(st, {"messages": msgs, "end": "max_turns"})
    assert waiter.complete([ev]) == rules.complete([ev])


def test_scripted_backend_plays_evaluates_and_ranks(profiles):
    rapo = common.load_stage("05_rapo")
    b = backends.make_backend("scripted")
    st = setup_of(profiles, "fx-c0")  # Wren buys (target $150), Tobias sells (target $120, listing $200)
    msgs = [{"turn": 0, "agent": 0, "action_type": "speak", "argument": "Would you take $100?"}]
    act = json.loads(b.complete([S.agent_chat(st, 1, msgs)])[0])
    assert act == {"action_type": "speak", "argument": "I can't sell at $100: it is worth more than that to me. "
                                                       "I could do $200."}
    msgs.append({"turn": 1, "agent": 1, **act})
    cands = [{"action_type": "speak", "argument": "Fine, $200, deal."},  # overpays: goal 0 after the close
             {"action_type": "speak", "argument": "You are greedy. $100 or nothing."},
             {"action_type": "speak", "argument": "Could you do $140? Thank you."},
             {"action_type": "leave", "argument": ""}]
    reacts = []
    for c in cands:
        hist = msgs + [{"turn": 2, "agent": 0, **c}]
        reacts.append(S.parse_action(b.complete([S.agent_chat(st, 1, hist)])[0]) if c["action_type"] != "leave"
                      else {"action_type": "none", "argument": ""})
    chat = S.grm_chats([{"setup": st, "agent": 0, "messages": msgs}], [cands], [reacts])
    g = rapo.parse_grm(json.loads(b.complete(chat)[0]), 4)
    # by hand: [0] closes at $200: goal 10 (1 - 50 / 75) = 3.33; [1] the seller now asks $173 (rules v5: 200 - 80 / 3,
    # said in whole dollars): an open offer Wren can still accept at turn 4, goal 10 (1 - 23 / 75) = 6.93, hostile
    # -2 - 3: 1.93; [2] the same 6.93 + polite 1 = 7.93 (an offer asked as a question earns no knowledge); [3] leaves
    # without a deal: 0 - 1 = -1
    assert g["ranks"] == [2, 3, 1, 4] and not g["derived"]
    assert "is hostile" in g["critiques"][1]
    ep = {"messages": msgs + [{"turn": 2, "agent": 0, **cands[2]}, {"turn": 3, "agent": 1, **reacts[2]},
                              {"turn": 4, "agent": 0, "action_type": "speak", "argument": "OK, deal."}], "end": "max_turns"}
    res, _, stats = S.evaluate(b, [st], [ep])
    assert stats["failed"] == 0 and R.price_in(reacts[2]["argument"]) == 173  # the deal closes at the seller's $173
    assert res[0][0]["goal"] == pytest.approx(10 * (1 - 23 / 75), abs=1e-4) and res[0][1]["goal"] == 10  # seller: above its $120
    fin = (res[0][0]["financial_and_material_benefits"], res[0][1]["financial_and_material_benefits"])
    assert fin == pytest.approx((10 * (150 - 173) / 150, 10 * (173 - 120) / 120), abs=1e-4)
    # believability 10, relationship 1 (polite), knowledge 0 (its two questions are offers), secret 0, rules 0
    assert res[0][0]["overall"] == pytest.approx((10 + 1 + 0 + 0 + 0 + fin[0] + res[0][0]["goal"]) / 7)


def test_generator_is_seeded_and_loads(tmp_path):
    a, b = R.generate_profiles(10, seed=3), R.generate_profiles(10, seed=3)
    assert a == b and a != R.generate_profiles(10, seed=4)
    R.write_profiles(tmp_path / "gen", a)
    p = S.load_profiles(tmp_path / "gen")
    fams = [R.read_task(e["scenario"], S.render(g, "agent_0"))["family"] for e in p["envs"].values() for g in e["agent_goals"]]
    assert fams == ["bargain"] * 2 + ["divide"] * 2 + ["bargain"] * 2 + ["divide"] * 2 + ["bargain"] * 2 + \
        ["divide"] * 2 + ["bargain"] * 2 + ["divide"] * 2 + ["bargain"] * 2 + ["divide"] * 2
    assert len(S.select_cases(p)) == 20 and all(e["source"] == "scripted-generator" for e in p["envs"].values())
    run_script("envs/sotopia_scripted.py", "--out", tmp_path / "cli", "-n", "10", "--seed", "3")  # the same folder
    for name in S.FILES.values():
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "gen" / name).read_bytes()


# ----------------------------------------------------------------------------------------------------
# The training contexts (envs/sotopia.py as a stage) and RAPO on Sotopia (05_rapo.py --env sotopia)


def test_episodes_stage_writes_policy_turns_and_resumes_byte_identical(tiny_model_dir, tmp_path):
    args = ["--data", FIX, "--policy", f"hf:{tiny_model_dir}", "--partner", "scripted", "--sides", "2",
            "--pairings", "1", "--max-turns", "4", "--max-new-tokens", "8", "--batch-size", "3", "--max-examples", "5"]
    run_in_process("envs/sotopia.py", *args, "--out", tmp_path / "a")
    eps = common.read_jsonl(tmp_path / "a" / "episodes.jsonl")
    assert [e["id"] for e in eps] == ["fx-c0-a0", "fx-c0-a1", "fx-c2-a0", "fx-c2-a1", "fx-c3-a0"]
    assert [e["players"] for e in eps[:2]] == [["policy", "partner"], ["partner", "policy"]]
    turns = common.load_turns(tmp_path / "a" / "turns.jsonl")
    assert turns and all(eps[[e["id"] for e in eps].index(t["dialog_id"])]["players"][t["sotopia"]["agent"]] == "policy"
                         for t in turns)
    t = turns[1]  # the context is the agent's chat at that turn, its state the messages before it
    assert t["context"][0]["content"] == S.agent_chat(t["sotopia"]["setup"], t["sotopia"]["agent"],
                                                      t["sotopia"]["messages"])[1]["content"]
    # an interrupted run (its last episode lost, a torn line left) resumes to the same bytes
    full = (tmp_path / "a" / "episodes.jsonl").read_bytes()
    lines = full.decode().splitlines(keepends=True)
    (tmp_path / "a" / "episodes.jsonl").write_text("".join(lines[:-2]) + lines[-2][:40])
    run_in_process("envs/sotopia.py", *args, "--out", tmp_path / "a")
    assert (tmp_path / "a" / "episodes.jsonl").read_bytes() == full
    r = run_in_process("envs/sotopia.py", *args[:-2], "--max-examples", "4", "--max-turns", "6", "--out", tmp_path / "a",
                   check=False)
    assert r.returncode == 2 and "--max-turns 4 (now 6)" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(FIX, bad)
    (bad / ENVS).write_text((bad / ENVS).read_text().replace('"relationship": 3', '"relationship": 9'))
    r = run_script("envs/sotopia.py", *args[2:], "--data", bad, "--out", tmp_path / "b", check=False)  # as a script
    assert r.returncode == 2 and "environment_profiles.jsonl: line 2 (fx-env-divide): field 'relationship'" in r.stderr
    assert not (tmp_path / "b" / "episodes.jsonl").exists()


def test_rapo_on_sotopia_one_step(tiny_model_dir, tmp_path):
    run_in_process("envs/sotopia.py", "--data", FIX, "--policy", f"hf:{tiny_model_dir}", "--partner", "scripted",
               "--max-turns", "4", "--max-new-tokens", "8", "--out", tmp_path / "ep")
    run_in_process("05_rapo.py", "--env", "sotopia", "--data", tmp_path / "ep" / "turns.jsonl", "--out", tmp_path / "r",
               "--policy", f"hf:{tiny_model_dir}", "--seeker", "scripted", "--grm", "scripted", "--prompts-per-step", "2",
               "--group-size", "3", "--max-steps", "1", "--max-new-tokens", "6", "--grm-retries", "0",
               "--max-prompt-tokens", "2048")
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["env"] == "sotopia" and saved["system_prompt"] == S.AGENT_SYSTEM and saved["prefill"] == ""
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grm_failed_frac"] == 0 and row["sd_tokens"] > 0
    sample = json.loads((tmp_path / "r" / "samples.jsonl").read_text().splitlines()[0])
    assert len(sample["reactions"]) == 3 and all(x.startswith("Turn #") for x in sample["reactions"])
    assert "(goal value" in sample["grm"]["critiques"][0]  # the scripted GRM's analysis
    r = run_in_process("05_rapo.py", "--env", "sotopia", "--data", tmp_path / "ep" / "turns.jsonl", "--out", tmp_path / "y",
                   "--policy", f"hf:{tiny_model_dir}", "--max-prompt-tokens", "256", check=False)
    assert r.returncode == 2 and "more than --max-prompt-tokens 256" in r.stderr and not (tmp_path / "y" / "args.json").exists()
    r = run_in_process("05_rapo.py", "--env", "sotopia", "--reward", "rubric-point", "--data", tmp_path / "ep" / "turns.jsonl",
                   "--out", tmp_path / "x", "--policy", f"hf:{tiny_model_dir}", check=False)
    assert r.returncode == 2 and "--env sotopia trains with --reward reaction" in r.stderr


def test_rapo_on_sotopia_two_ranks(tiny_model_dir, tmp_path):
    """05 --env sotopia under torchrun: each rank plays its share of the prompts (reactions of the scripted partner,
    the scripted GRM), and the step's numbers are sums over both ranks (a rank's groups missing from the all-reduce
    would halve sd_tokens). Live rollouts are seeded per rank (docs/04_grpo.md, deviation 6), so the weights are
    not compared with one process: tests/test_rapo.py does that on fixed rollouts."""
    run_in_process("envs/sotopia.py", "--data", FIX, "--policy", f"hf:{tiny_model_dir}", "--partner", "scripted",
                   "--max-turns", "4", "--max-new-tokens", "8", "--out", tmp_path / "ep")
    args = ["--env", "sotopia", "--data", tmp_path / "ep" / "turns.jsonl", "--policy", f"hf:{tiny_model_dir}",
            "--seeker", "scripted", "--grm", "scripted", "--prompts-per-step", "4", "--group-size", "3", "--max-steps",
            "1", "--max-new-tokens", "6", "--grm-retries", "0", "--max-prompt-tokens", "2048"]
    run_in_process("05_rapo.py", *args, "--out", tmp_path / "one")
    run_script("05_rapo.py", *args, "--out", tmp_path / "two", nproc=2, timeout=600)
    one, two = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("one", "two"))
    assert one["sd_tokens"] == two["sd_tokens"] == 4 * 6  # the worst candidate of each of the 4 groups, 6 tokens each
    assert two["grm_failed_frac"] == 0 and two["completion_len_mean"] == 6
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "adapter" / "teacher" / "adapter_model.safetensors").is_file()


def mean_stat(values):
    return {"value": sum(values) / len(values), "ci": [min(values), max(values)]}


def test_play_chunk_summary_and_paired_difference(profiles):
    b = backends.make_backend("scripted")
    cases = S.select_cases(profiles)
    written = []
    recs, counts = S.play_chunk(profiles, cases, [["partner", "partner"]] * len(cases), {"partner": b}, {"partner": {}},
                                b, max_turns=20, write=written.extend)
    assert counts == {"evaluated": 5, "retried": 0, "failed": 0} and sorted(r["id"] for r in written) == \
        sorted(c["id"] for c in cases)
    for r in recs:  # the scripted partner plays both agents here: label them as the policy for the summary
        r["players"] = ["policy", "policy"]
    s = S.summarize(recs, mean_stat)
    assert s["all"]["scenarios"] == 4 and s["hard"]["scenarios"] == 1 and s["evaluator_failed"] == 0
    # bargain: both agents reach their targets (goal 10, twice over two pairings); divide 9.52 / 9.89; open 5 and 5
    assert s["all"]["goal"]["value"] == pytest.approx((10 + (9.5238 + 9.8901) / 2 + 5 + 5) / 4)
    assert s["hard"]["goal"]["value"] == 5 and s["all"]["overall"]["ci"][1] <= 10
    recs[0]["scores"] = None  # an evaluator failure leaves the episode out of the means, counted
    assert S.summarize(recs, mean_stat)["evaluator_failed"] == 1
    worse = [dict(r, scores=[dict(x, goal=x["goal"] - 1) for x in r["scores"]]) for r in recs[1:]]
    d = S.paired_difference(recs, worse, "goal", mean_stat)
    assert d["scenarios"] == 4 and d["value"] == pytest.approx(1)
    table = S.report_tables({"base": s, "rapo": s})
    assert "| policy | All GOAL | All OVERALL | Hard GOAL | Hard OVERALL |" in table and "| rapo |" in table


def test_openai_partner_and_evaluator_against_a_real_server(server, tiny_model_dir, tmp_path):
    """The Sotopia prompts through an OpenAI-compatible server (`transformers serve`, as tests/test_openai_backend.py):
    the partner plays its side; the tiny random model never writes valid JSON, which is taken as speech and counted,
    and the evaluator's answers are re-asked, then recorded as failures, never a crash."""
    url, name = server
    run_in_process("envs/sotopia.py", "--data", FIX, "--policy", f"hf:{tiny_model_dir}", "--partner", f"openai:{name}",
               "--partner-base-url", url, "--max-turns", "3", "--max-new-tokens", "6", "--max-examples", "2",
               "--out", tmp_path / "ep")
    eps = common.read_jsonl(tmp_path / "ep" / "episodes.jsonl")
    assert len(eps) == 2 and all(e["turns"] == 3 and e["invalid_actions"] == [2, 1] for e in eps)
    profiles = S.load_profiles(FIX)
    setups = [setup_of(profiles, e["combo_id"]) for e in eps]
    b = backends.make_backend(f"openai:{name}", url)
    res, raw, stats = S.evaluate(b, setups, [{"messages": e["messages"], "end": e["end"]} for e in eps], retries=1,
                                 max_new_tokens=8)
    assert res == [None, None] and stats == {"evaluated": 2, "retried": 2, "failed": 2} and all(isinstance(x, str) for x in raw)


# ----------------------------------------------------------------------------------------------------
# 06_eval.py --test-data PROFILE_FOLDER: the sotopia protocol


def test_eval_sotopia_selfplay_scripted_known_numbers(tmp_path):
    """The scripted agent as the policy in self-play, the scripted evaluator: the numbers worked out by hand in the
    tests above (bargain 10 and 10, divide 9.52 and 9.89, the two open scenarios 5), on a folder 06 never saw."""
    run_in_process("06_eval.py", "--test-data", FIX, "--out", tmp_path / "e", "--policy", "rules=scripted",
               "--evaluator", "scripted", "--bootstrap", "200")
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    s = scores["policies"][0]["sotopia"]
    assert s["episodes"] == 5 and s["evaluator_failed"] == 0 and s["all"]["scenarios"] == 4
    assert s["all"]["goal"]["value"] == pytest.approx((10 + (9.5238 + 9.8901) / 2 + 5 + 5) / 4)
    assert s["hard"]["goal"]["value"] == 5 and len(s["all"]["goal"]["ci"]) == 2
    recs = common.read_jsonl(tmp_path / "e" / "dialogs.jsonl")
    assert [r["id"] for r in recs] == [f"sotopia/rules/fx-c{i}-a0" for i in range(5)]
    assert recs[0]["players"] == ["policy", "policy"] and recs[0]["transcript"].startswith("Turn #0: Wren Calloway")
    report = (tmp_path / "e" / "report.md").read_text()
    assert "| rules | 7.43 [" in report and "`scripted`" in report
    r = run_in_process("06_eval.py", "--test-data", FIX, "--out", tmp_path / "x", "--parts", "interactive", check=False)
    assert r.returncode == 2 and "a Sotopia profile folder" in r.stderr


def test_eval_sotopia_partner_resumes_byte_identical_and_two_ranks_equal_one(tiny_model_dir, tmp_path):
    args = ["--test-data", FIX, "--policy", f"tiny=hf:{tiny_model_dir}", "--evaluator", "scripted", "--sotopia-mode",
            "partner", "--partner", "scripted", "--sotopia-sides", "2", "--sotopia-pairings", "1", "--sotopia-max-turns",
            "4", "--max-new-tokens", "6", "--batch-size", "3", "--bootstrap", "100"]
    run_in_process("06_eval.py", *args, "--out", tmp_path / "one")
    full = (tmp_path / "one" / "dialogs.jsonl").read_bytes()
    recs = common.read_jsonl(tmp_path / "one" / "dialogs.jsonl")
    assert len(recs) == 8 and [r["players"] for r in recs[:2]] == [["policy", "partner"], ["partner", "policy"]]
    scores = (tmp_path / "one" / "scores.json").read_bytes()
    lines = full.decode().splitlines(keepends=True)  # interrupted: the last chunk lost, a torn line left
    (tmp_path / "one" / "dialogs.jsonl").write_text("".join(lines[:-3]) + lines[-3][:50])
    run_in_process("06_eval.py", *args, "--out", tmp_path / "one")
    assert (tmp_path / "one" / "dialogs.jsonl").read_bytes() == full
    assert (tmp_path / "one" / "scores.json").read_bytes() == scores
    run_script("06_eval.py", *args, "--out", tmp_path / "two", nproc=2)
    assert (tmp_path / "two" / "dialogs.jsonl").read_bytes() == full
    r = run_in_process("06_eval.py", *args[:-2], "--bootstrap", "100", "--sotopia-max-turns", "6", "--out",
                   tmp_path / "one", check=False)
    assert r.returncode == 2 and "--sotopia-max-turns" in r.stderr


def test_experiment_bench_families_and_outcomes(tmp_path):
    """experiments/sotopia_scripted.py without models: the filtered profile folder (only scenarios of the named
    sources whose goals the rules read as bargain or divide, with the records they reference; "open" ones left out
    and listed), and the outcome summary of the rule partner playing the policy's seat (every deal closes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_scripted_exp", FIX.parents[2] / "experiments" / "sotopia_scripted.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    got = x.write_bench_families(FIX, tmp_path / "b", ["fixture"])
    assert [(r["env_id"], r["families"]) for r in got["kept"]] == [("fx-env-bargain", ["bargain", "bargain"]),
                                                                    ("fx-env-divide", ["divide", "divide"])]
    assert [(r["env_id"], r["families"]) for r in got["left_out"]] == [("fx-env-open", ["open", "open"]),
                                                                        ("01H7VFHNV13MHN97GAH73E3KM8", ["open", "open"])]
    p = S.load_profiles(tmp_path / "b")
    assert sorted(p["envs"]) == ["fx-env-bargain", "fx-env-divide"]
    assert [c["combo_id"] for c in p["combos"]] == ["fx-c0", "fx-c1", "fx-c2"] and sorted(p["agents"]) == ["fx-a0", "fx-a1", "fx-a2"]
    assert len(p["relationships"]) == 2
    src = {json.loads(l)["env_id"]: l for l in (FIX / ENVS).read_text().splitlines()}
    assert (tmp_path / "b" / ENVS).read_text().splitlines() == [src["fx-env-bargain"], src["fx-env-divide"]]  # unchanged
    with pytest.raises(common.InputError, match="no scenario of source other"):
        x.write_bench_families(FIX, tmp_path / "c", ["other"])
    b = backends.make_backend("scripted")
    cases = S.select_cases(p, sides=2)
    players = [["policy", "partner"] if c["side"] == 0 else ["partner", "policy"] for c in cases]
    recs, _ = S.play_chunk(p, cases, players, {"policy": b, "partner": b}, {"policy": {}, "partner": {}}, b, max_turns=20)
    out = x.policy_outcomes(p, recs)
    assert out["episodes"] == 6 and out["deal_frac"] == 1.0 and out["deal_frac_by_family"] == {"bargain": 1.0, "divide": 1.0}
    # the rule agent's refusals ("I can't sell at $X ... I could do $Y") move their amounts: no repetition (rules v3);
    # in item division it proposes one split twice, word for word and number for number: a repetition (2 of 6)
    assert out["episodes_with_fault"] == {"repeats an earlier message": 0.333} and 0 < out["offer_frac_of_actions"] <= 1
    # --context-drop-decided: the policy's turns after the deal are dropped; by hand, the turn that closed each deal
    turns = [t for r in recs for t in S.policy_turns(r, S.episode_setup(p, r))]
    closing = {}
    for r in recs:
        bg = R.parse_background(S.background(S.episode_setup(p, r), None))
        task = R.task_of(bg, r["players"].index("policy"))
        closing[r["id"]] = next(m["turn"] for i, m in enumerate(r["messages"])
                                if R.outcome(task, r["messages"][:i + 1])["deal"] is not None)
    kept = x.undecided_turns(turns)
    assert [t["id"] for t in kept] == [t["id"] for t in turns if t["turn"] <= closing[t["dialog_id"]]]
    assert 0 < len(kept) < len(turns)  # the rule partner closes some deals on the policy's offer: a goodbye follows
    # the results of a real 06 run on that folder (two policy labels, the rule agent in both seats: no model)
    from conftest import run_script

    run_script("06_eval.py", "--test-data", tmp_path / "b", "--out", tmp_path / "e", "--parts", "sotopia", "--sotopia-mode",
               "partner", "--partner", "scripted", "--evaluator", "scripted", "--sotopia-sides", "2", "--sotopia-max-turns",
               "6", "--bootstrap", "100", "--policy", "base=scripted", "--policy", "warm=scripted", "--policy", "rapo=scripted")
    a = x.parse_args(["--bench", str(FIX), "--bootstrap", "100"])
    seed_of = lambda cmd: cmd[cmd.index("--seed") + 1]
    assert seed_of(x.rapo_cmd(a, "rapo", Path("t.jsonl"), Path("o"), "hf:embedded")) == "0"  # 05 takes --seed ...
    b = x.parse_args(["--bench", str(FIX), "--seed", "3", "--train-seed", "5"])  # ... or --train-seed where given
    assert seed_of(x.rapo_cmd(b, "wo-sd", Path("t.jsonl"), Path("o"), "hf:embedded")) == "5"
    assert "--sd-min-gap" not in x.rapo_cmd(a, "rapo", Path("t.jsonl"), Path("o"), "hf:embedded")  # 05's default
    c = x.parse_args(["--bench", str(FIX), "--sd-min-gap", "0.001"])  # the RAPO run only: w/o SD distils nothing
    assert x.rapo_cmd(c, "rapo", Path("t.jsonl"), Path("o"), "hf:embedded")[-2:] == ["--sd-min-gap", "0.001"]
    assert "--sd-min-gap" not in x.rapo_cmd(c, "wo-sd", Path("t.jsonl"), Path("o"), "hf:embedded")
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    table = x.results_table(p, scores, common.read_jsonl(tmp_path / "e" / "dialogs.jsonl"), a)
    assert [r["policy"] for r in table] == ["base", "warm", "rapo"] and table[0]["episodes"] == 6 and table[0]["scenarios"] == 2
    assert table[2]["goal"] == table[0]["goal"] and set(table[2]["by_family"]) == {"bargain", "divide"}
    assert table[2]["minus_base"]["goal"]["value"] == 0 and table[2]["minus_base"]["overall"]["scenarios"] == 2
    # paired against the base for every other row, and against the warm start (RL's own share) for the RL rows
    assert [sorted(k for k in r if k.startswith("minus_")) for r in table] == [[], ["minus_base"], ["minus_base", "minus_warm"]]
    assert table[2]["minus_warm"]["goal"]["value"] == 0
    top = table[2]["outcomes"]["top_action"]  # the most frequent action of the policy and its share, counted again here
    mine = [(m["action_type"], m["argument"]) for r in common.read_jsonl(tmp_path / "e" / "dialogs.jsonl")
            if r["policy"] == "rapo" for m in r["messages"] if m["agent"] == r["players"].index("policy")]
    assert top["frac_of_actions"] == round(mine.count((top["action_type"], top["argument"])) / len(mine), 3)
    assert all(mine.count(k) <= mine.count((top["action_type"], top["argument"])) for k in mine)
    x.plot(a, {"rapo": [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.6}]}, table, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_experiment_reuse_copies_finished_stages(tmp_path):
    """experiments/sotopia_scripted.py --reuse: the early stages are copied from a work folder whose log.json says they
    were made with the same settings (commands and wall times come along, marked reused); other settings stop."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_scripted_exp", FIX.parents[2] / "experiments" / "sotopia_scripted.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    src, made = tmp_path / "src", {"train-profiles": [4, 0], "warm": [2, 4, 0.001, 0], "contexts": [1, 2, 6, 8, 0]}
    for f in ("train-profiles", "warm-data", "warm", "contexts"):
        (src / f).mkdir(parents=True)
        (src / f / "a.txt").write_text(f)
    names = ["1_train_profiles", "1b_warm_data", "1c_warm_start", "2_contexts"]
    common.write_json(src / "log.json", {"made": made, "commands": {n: f"cmd {n}" for n in names + ["3_05_rapo"]},
                                         "wall_s": {n: 1.0 for n in names}, "warm_start": {"steps": 2}})
    log, W = {}, tmp_path / "w"
    W.mkdir()
    x.reuse_stages(src, W, made, log, warm=True)
    assert all((W / f / "a.txt").read_text() == f for f in ("train-profiles", "warm-data", "warm", "contexts"))
    assert sorted(log["commands"]) == sorted(names) and log["reused"] == {n: str(src) for n in names}
    assert log["made"] == made and log["warm_start"] == {"steps": 2}
    (W / "contexts" / "a.txt").write_text("mine")  # a finished stage of the work folder is kept
    x.reuse_stages(src, W, made, {}, warm=True)
    assert (W / "contexts" / "a.txt").read_text() == "mine"
    W2 = tmp_path / "w2"
    W2.mkdir()
    with pytest.raises(common.InputError, match="its contexts stage was made with"):
        x.reuse_stages(src, W2, {**made, "contexts": [1, 2, 6, 16, 0]}, {}, warm=False)
    assert list(W2.iterdir()) == []  # checked before anything is copied
    x.reuse_stages(src, W2, made, {}, warm=False)
    assert not (W2 / "warm").exists() and (W2 / "contexts").exists()  # without a warm start its folders stay
    with pytest.raises(common.InputError, match="no log.json"):
        x.reuse_stages(tmp_path / "nowhere", W2, made, {}, warm=False)


def test_experiment_stops_on_work_folder_of_other_rules(tmp_path):
    """experiments/sotopia_scripted.py: the rules' version is part of the training stage's settings (the scripted GRM
    ranks by the rules), so a work folder trained under other rules stops the run before any stage, and the results
    record the version with the rules' commit."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_scripted_exp", FIX.parents[2] / "experiments" / "sotopia_scripted.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    a = x.parse_args(["--bench", str(FIX)])
    train = [a.steps, a.prompts_per_step, a.group_size, a.lr, a.beta, a.max_new_tokens, a.max_prompt_tokens]
    W = tmp_path / "w"
    W.mkdir()
    common.write_json(W / "log.json", {"made": {"train": train + ["rules", R.RULES_VERSION - 1]}})
    before = (W / "log.json").read_bytes()
    with pytest.raises(common.InputError, match=rf"its train stage was made with .*'rules', {R.RULES_VERSION - 1}\]"):
        x.main(["--bench", str(FIX), "--out", str(W), "--results", str(tmp_path / "res")])
    assert sorted(p.name for p in W.iterdir()) == ["log.json"] and (W / "log.json").read_bytes() == before
    assert x.rules_commit()["version"] == R.RULES_VERSION


def test_experiment_records_the_partner_and_refuses_other_turn_limits(tmp_path):
    """experiments/sotopia_scripted.py under rules version 5: the rule partner's version is part of the warm start's
    and the contexts' settings (the rule agent's lines and the partner's reactions are in them), so a work folder
    made with the version 1 partner stops the run; and the episode lengths must be the GRM's TURN_LIMIT."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_scripted_exp", FIX.parents[2] / "experiments" / "sotopia_scripted.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    a = x.parse_args(["--bench", str(FIX)])
    assert x.PARTNER == R.PARTNER_RULES == 2 and a.context_max_turns == a.eval_max_turns == R.TURN_LIMIT
    W = tmp_path / "w"
    W.mkdir()
    old = [a.context_pairings, a.context_episodes, a.context_max_turns, a.max_new_tokens, a.seed]  # no partner: v1-v4
    common.write_json(W / "log.json", {"made": {"contexts": old}})
    with pytest.raises(common.InputError, match=r"its contexts stage was made with .*now .*'partner', 2\]"):
        x.main(["--bench", str(FIX), "--out", str(W), "--results", str(tmp_path / "res")])
    # a demonstrator or a context player other than the defaults is part of those stages' settings too
    common.write_json(W / "log.json", {"made": {"warm": [a.warm_start_steps, a.warm_start_batch, a.warm_start_lr,
                                                         a.seed, "partner", 2]}})
    with pytest.raises(common.InputError, match=r"its warm stage was made with .*now .*'demonstrator', 'coin'\]"):
        x.main(["--bench", str(FIX), "--out", str(W), "--results", str(tmp_path / "res"), "--demonstrator", "coin"])
    common.write_json(W / "log.json", {"made": {"contexts": old + ["partner", 2]}})
    with pytest.raises(common.InputError, match=r"its contexts stage was made with .*now .*'by', 'waiter'\]"):
        x.main(["--bench", str(FIX), "--out", str(W), "--results", str(tmp_path / "res"), "--context-policy", "waiter"])
    for flag in ("--eval-max-turns", "--context-max-turns"):
        with pytest.raises(common.InputError, match="must be 10"):
            x.main(["--bench", str(FIX), "--out", str(tmp_path / "w2"), "--results", str(tmp_path / "res"), flag, "6"])
    assert not (tmp_path / "w2").exists()


def waiter_turns(tmp_path, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Episodes of the waiter against the rule partner on n generated scenarios (2 pairings, both sides; each runs
    to the partner's final offer) and the policy's turns in them (05's contexts)."""
    R.write_profiles(tmp_path / "g", R.generate_profiles(n, seed=seed))
    p = S.load_profiles(tmp_path / "g")
    cases = S.select_cases(p, sides=2)
    players = [["policy", "partner"] if c["side"] == 0 else ["partner", "policy"] for c in cases]
    bk = {"policy": backends.make_backend("scripted:waiter"), "partner": backends.make_backend("scripted")}
    recs, _ = S.play_chunk(p, cases, players, bk, {"policy": {}, "partner": {}}, bk["partner"], max_turns=R.TURN_LIMIT)
    return recs, [t for r in recs for t in S.policy_turns(r, S.episode_setup(p, r))]


def test_experiment_balances_final_offer_and_earlier_contexts(tmp_path):
    """experiments/sotopia_scripted.py --context-balance: on the waiter's episodes (each runs to the partner's final
    offer), per episode its final-offer context and as many earlier contexts at which the partner's offer stands,
    drawn with the seed; counted here from the messages by hand. The setting is part of the training stage's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_scripted_exp", FIX.parents[2] / "experiments" / "sotopia_scripted.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    recs, turns = waiter_turns(tmp_path, 4, seed=1)
    last = lambda t: t["sotopia"]["messages"][-1] if t["sotopia"]["messages"] else None
    theirs = lambda t: [m for m in t["sotopia"]["messages"] if m["agent"] != t["sotopia"]["agent"]]
    # the rule partner's final offer is its message after K_CONCEDE concessions from its opening one
    final = {t["id"] for t in turns if len(theirs(t)) == R.K_CONCEDE + 1 and last(t) is theirs(t)[-1]}
    assert len(final) == len(recs) == 16  # one per episode: every waiter episode reaches the final offer
    kept = x.balanced_turns(turns, seed=0)
    assert {t["id"] for t in kept} >= final and len(kept) == 2 * len(final)
    assert [t["id"] for t in kept] == [t["id"] for t in turns if t in kept]  # the file's order
    for t in kept:
        if t["id"] not in final:  # an earlier context answers an offer of the partner, not its opening silence
            assert last(t)["agent"] != t["sotopia"]["agent"] and "final offer" not in last(t)["argument"].lower()
            assert "$" in last(t)["argument"] or "I take" in last(t)["argument"]
    assert sum(t["dialog_id"] == kept[0]["dialog_id"] for t in kept) == 2
    assert x.balanced_turns(turns, seed=0) == kept
    draws = {tuple(t["id"] for t in x.balanced_turns(turns, seed=s)) for s in range(6)}
    assert len(draws) > 1  # the earlier context is drawn, not always the first
    assert x.balanced_turns([t for t in turns if t["id"] not in final], seed=0) == []  # none to balance against
    # part of the training stage's settings: a work folder trained without it stops the run
    a = x.parse_args(["--bench", str(FIX)])
    W = tmp_path / "w"
    W.mkdir()
    common.write_json(W / "log.json", {"made": {"train": [a.steps, a.prompts_per_step, a.group_size, a.lr, a.beta,
                                                          a.max_new_tokens, a.max_prompt_tokens, "rules", R.RULES_VERSION]}})
    with pytest.raises(common.InputError, match=r"its train stage was made with .*now .*'balance', 'rules'"):
        x.main(["--bench", str(FIX), "--out", str(W), "--results", str(tmp_path / "res"), "--context-balance"])


def test_when_probe_counts_acceptances_by_context_kind(tmp_path):
    """experiments/sotopia_when.py: on waiter contexts, the waiter never closes a deal, the coin closes one in about
    half its samples at both kinds of context (it is blind to "final offer"), and an acceptance is counted by the
    rules' outcome, not by its words; its JSON holds the counts it prints."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sotopia_when", FIX.parents[2] / "experiments" / "sotopia_when.py")
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)
    recs, turns = waiter_turns(tmp_path, 2, seed=3)
    kinds = [w.context_kind(t) for t in turns]
    assert kinds.count("final") == len(recs) == 8 and kinds.count("earlier") > 8 and None in kinds
    t = next(t for t, k in zip(turns, kinds) if k == "final")
    acc = json.dumps({"action_type": "speak", "argument": R.ACCEPT_LINE})
    assert w.closes_deal(t, acc) and not w.closes_deal(t, json.dumps({"action_type": "speak", "argument": R.WAIT_LINES[0]}))
    assert not w.closes_deal(t, json.dumps({"action_type": "leave", "argument": R.ACCEPT_LINE}))  # leaving closes nothing
    r = w.accept_rates(turns, [[acc, "no JSON at all"] for _ in turns])
    assert r["final"] == {"contexts": 8, "samples": 16, "accepts": 8, "rate": 0.5} and r["gap"] == 0.0
    common.write_jsonl(tmp_path / "t.jsonl", turns)
    w.main(["--data", str(tmp_path / "t.jsonl"), "--policy", "waiter=scripted:waiter", "--policy", "coin=scripted:coin",
            "-G", "16", "--out", str(tmp_path / "when.json")])
    got = json.loads((tmp_path / "when.json").read_text())["policies"]
    assert got["waiter"]["final"]["accepts"] == got["waiter"]["earlier"]["accepts"] == 0
    assert 0.3 < got["coin"]["final"]["rate"] < 0.7 and 0.3 < got["coin"]["earlier"]["rate"] < 0.7
    assert got["coin"]["final"]["samples"] == 8 * 16
    with pytest.raises(common.InputError, match="expected LABEL=SPEC"):
        w.main(["--data", str(tmp_path / "t.jsonl"), "--policy", "scripted:coin"])
    common.write_jsonl(tmp_path / "bad.jsonl", [{"id": "x"}])
    with pytest.raises(common.InputError, match="record 1: no 'sotopia' state"):
        w.main(["--data", str(tmp_path / "bad.jsonl"), "--policy", "c=scripted:coin"])
