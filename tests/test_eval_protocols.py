"""06_eval.py's benchmark protocols: ESC-Eval (role cards, fixed greeting, 5 rounds, 7 dimensions 0-4, per-dimension
judges) and the EmoHarbor-style user-as-judge (profiles, 10 dimensions 1-5): loaders, who speaks when, score
parsing with retries and counts, summaries, and end-to-end runs on the fixtures in tests/fixtures/."""
import json
import re
import shutil

import numpy as np
import pytest

import backends
import common
import protocols
import protocols.cases
import protocols.rating
from conftest import ROOT, load_stage, make_tiny_model, run_script
from test_eval import lines

ev = load_stage("06_eval")
CARDS = ROOT / "tests" / "fixtures" / "esc_eval_cards.json"
PROFILES = ROOT / "tests" / "fixtures" / "emoharbor_profiles.jsonl"


# ----------------------------------------------------------------------------------------------------
# Loaders


def test_cards_and_profiles_are_detected_and_loaded(demo_data):
    kind, cases = protocols.cases.detect_test_file(str(CARDS))
    raw = json.loads(CARDS.read_text())
    assert kind == "cards" and [c["case_id"] for c in cases] == [str(r["id"]) for r in raw] and len(cases) == 10
    assert cases[0]["card"] == raw[0]["base"] and cases[0]["problem_type"] == raw[0]["res"]
    assert cases[0]["situation"] == raw[0]["base"].split("Problem: ")[1]  # the card's Problem line
    kind, cases = protocols.cases.detect_test_file(str(PROFILES))
    assert kind == "profiles" and [c["case_id"] for c in cases] == ["p1", "p2", "p3"]
    assert cases[2]["profile"]["background"] == "" and cases[0]["profile"]["inner_state"].startswith("Panicky")
    assert protocols.cases.detect_test_file(str(demo_data)) == ("dialogues", None)


def write_cards(tmp_path, recs):
    p = tmp_path / "cards.json"
    p.write_text(json.dumps(recs))
    return str(p)


@pytest.mark.parametrize("recs, msg", [
    ([{"id": 1, "base": "Problem: a"}, {"id": 2}], "record 2: field 'base'"),  # one card without base (records numbered from 1)
    ([{"id": 1, "base": "Problem: a"}, {"id": 2, "base": "   "}], "record 2: field 'base'"),
    ([{"id": 1, "base": "Problem: a"}, {"id": 2, "base": 7}], "record 2: field 'base'"),
    ([{"base": "Problem: a"}], "record 1: missing field 'id'"),
    ([{"id": 1, "base": "Problem: a", "language": 3}], "record 1: field 'language'"),
    ([{"id": 1, "base": "Problem: a"}, {"id": 1, "base": "Problem: b"}], "duplicate id 1"),
])
def test_malformed_cards_name_file_record_and_field(tmp_path, recs, msg):
    path = write_cards(tmp_path, recs)
    with pytest.raises(common.InputError, match=re.escape(msg)) as e:
        protocols.cases.detect_test_file(path)
    assert path in str(e.value)


@pytest.mark.parametrize("rec, msg", [
    ({"id": "a", "personality": "shy", "situation": "lost job"}, "line 1: missing field 'inner_state'"),
    ({"id": "a", "personality": "shy", "situation": "  ", "inner_state": "sad"}, "line 1: field 'situation' is empty"),
    ({"id": "a", "personality": ["shy"], "situation": "x", "inner_state": "sad"}, "line 1: field 'personality' must be"),
    ({"id": "a", "personality": "shy", "situation": "x", "inner_state": "sad", "background": 4}, "field 'background'"),
])
def test_malformed_profiles_name_file_line_and_field(tmp_path, rec, msg):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(common.InputError, match=re.escape(msg)):
        protocols.cases.detect_test_file(str(path))


# ----------------------------------------------------------------------------------------------------
# Scripted backends: who speaks when, what each role sees


class Recorder(backends.Backend):
    """generate -> text_fn(chat, temperature); option_loglik -> ll_fn(chat, options); keeps every batch it got."""

    def __init__(self, text_fn=None, ll_fn=None, spec="scripted"):
        self.text_fn, self.ll_fn, self.spec, self.batches = text_fn, ll_fn, spec, []

    def generate(self, chats, *, n=1, temperature=1.0, **kw):
        self.batches.append(chats)
        return [[self.text_fn(c, temperature) for _ in range(n)] for c in chats]

    def option_loglik(self, chats, options):
        self.batches.append(chats)
        return [self.ll_fn(c, options) for c in chats]


def numbered(prefix):
    """A speaker whose k-th message in a conversation is '<prefix> k' (k counted from its own earlier messages)."""
    def text(chat, temperature):
        return f"{prefix} {sum(m['role'] == 'assistant' for m in chat) + 1}"  # each role is 'assistant' in its chat
    return text


def cards(n):
    return [{"case_id": f"c{i}", "situation": f"sit {i}", "emotion_type": "", "problem_type": "", "first_user": "",
             "card": f"Age: {20 + i}\nProblem: worry number {i}"} for i in range(n)]


def test_esc_eval_greeting_then_five_rounds_seeker_first():
    policy, seeker = Recorder(numbered("policy")), Recorder(numbered("seeker"))
    judge = Recorder(ll_fn=lambda c, o: [0.0] * len(o))  # uniform over 0..4 -> expected 2
    roles = ev.simulate.Roles(policy=policy, seeker=seeker, critic=None, policy_system="SYS")
    recs = protocols.esc_eval.esc_eval_chunk(roles, {d: judge for d in protocols.esc_eval.ESC_DIMS}, "p", cards(3), rounds=5, judge_mode="likelihood",
                             retries=0, judge_max_new_tokens=4, seed=0)
    for r in recs:
        m = r["messages"]
        assert m[0] == {"role": "assistant", "content": protocols.esc_eval.ESC_GREETING}  # the fixed greeting opens
        assert len(m) == 1 + 2 * 5 and [x["role"] for x in m[1:]] == ["user", "assistant"] * 5  # seeker first
        assert [x["content"] for x in m[1:]] == [f"{who} {k}" for k in range(1, 6) for who in ("seeker", "policy")]
        assert r["scores"] == {d: pytest.approx(2.0) for d in protocols.esc_eval.ESC_DIMS} and r["id"] == f"esc-eval/p/{r['case_id']}"
    # lock-step: 5 batched calls per role over the 3 conversations
    assert [len(b) for b in seeker.batches] == [3] * 5 and [len(b) for b in policy.batches] == [3] * 5
    # the seeker plays its card and sees the greeting as the other side's message
    first = seeker.batches[0][1]
    assert "Problem: worry number 1" in first[0]["content"] and first[1] == {"role": "user", "content": protocols.esc_eval.ESC_GREETING}
    # the policy never sees the greeting: its system prompt, then the seeker's first message
    last = policy.batches[4][0]
    assert last[0] == {"role": "system", "content": "SYS"} and last[1] == {"role": "user", "content": "seeker 1"}
    assert len(last) == 1 + 9 and all(protocols.esc_eval.ESC_GREETING != x["content"] for x in last)
    # the judge: one batched call, one question per dimension, each with its own rubric and the whole transcript
    assert len(judge.batches) == 1 and len(judge.batches[0]) == 3 * 7
    q = judge.batches[0][:7]
    for (name, rubric), chat in zip(protocols.esc_eval.ESC_DIMS.values(), q):
        assert rubric in chat[0]["content"] and f"AI assistant: {protocols.esc_eval.ESC_GREETING}" in chat[0]["content"]
        assert "User: seeker 5" in chat[0]["content"] and "from 0 to 4" in chat[0]["content"]


def test_esc_eval_per_dimension_judges_get_only_their_dimension():
    """A '{dim}' judge spec (ESC-Rank: one adapter per dimension) -> one backend per dimension, each asked only
    its own rubric; answers parsed on the 0-4 scale."""
    made = {}

    def make(spec):
        d = spec.split("/")[-1].removesuffix("_en")
        made[spec] = Recorder(text_fn=lambda c, t, d=d: str(list(protocols.esc_eval.ESC_DIMS).index(d) % 5), spec=spec)
        return made[spec]
    judges = protocols.rating.dim_backends("hf:/models/ESC-RANK/{dim}_en", protocols.esc_eval.ESC_DIMS, make)
    assert sorted(made) == sorted(f"hf:/models/ESC-RANK/{d}_en" for d in protocols.esc_eval.ESC_DIM_KEYS)
    roles = ev.simulate.Roles(policy=Recorder(numbered("policy")), seeker=Recorder(numbered("seeker")), critic=None)
    recs = protocols.esc_eval.esc_eval_chunk(roles, judges, "p", cards(2), rounds=1, judge_mode="generate", retries=1,
                             judge_max_new_tokens=4, seed=0)
    for d, (name, rubric) in protocols.esc_eval.ESC_DIMS.items():
        b = judges[d]
        assert len(b.batches) == 1 and len(b.batches[0]) == 2  # its dimension for both dialogues, one call
        assert all(rubric in c[0]["content"] for c in b.batches[0])
    assert recs[0]["scores"] == {d: float(i % 5) for i, d in enumerate(protocols.esc_eval.ESC_DIMS)}
    assert recs[0]["answers"] == {"asked": 7, "unparseable": 0, "out_of_range": 0, "retried": 0, "failed": 0}
    shared = protocols.rating.dim_backends("hf:judge", protocols.esc_eval.ESC_DIMS, lambda s: Recorder(spec=s))
    assert len({id(b) for b in shared.values()}) == 1


def test_emoharbor_user_opens_and_rates_as_itself():
    profile = {"background": "Sam, 30", "personality": "blunt", "situation": "lost job", "inner_state": "scared"}
    case = {"case_id": "u1", "situation": "lost job", "emotion_type": "", "problem_type": "", "first_user": "",
            "profile": profile}
    policy, user = Recorder(numbered("policy")), Recorder(numbered("seeker"))
    rater = Recorder(ll_fn=lambda c, o: list(np.log([0.1, 0.1, 0.2, 0.2, 0.4])))  # E = .1+.2+.6+.8+2.0 = 3.7
    roles = ev.simulate.Roles(policy=policy, seeker=user, critic=None, policy_system=None)
    [r] = protocols.emoharbor.emoharbor_chunk(roles, {d: rater for d in protocols.emoharbor.EH_DIMS}, "p", [case], rounds=3, judge_mode="likelihood",
                             retries=0, judge_max_new_tokens=4, seed=0)
    assert [x["role"] for x in r["messages"]] == ["user", "assistant"] * 3  # the user opens, 3 rounds
    assert r["messages"][0]["content"] == "seeker 1" and r["profile"] == profile
    assert policy.batches[0][0] == [{"role": "user", "content": "seeker 1"}]  # no system prompt: 'none'
    assert r["scores"] == {d: pytest.approx(3.7) for d in protocols.emoharbor.EH_DIMS}
    [q] = rater.batches
    assert len(q) == 10
    for (name, rubric), chat in zip(protocols.emoharbor.EH_DIMS.values(), q):
        # the same profile prompt as in the conversation, then the whole transcript and one dimension, 1-5
        assert chat[0] == {"role": "system", "content": protocols.emoharbor.EH_USER_SYSTEM.format(profile=protocols.emoharbor.profile_text(profile))}
        assert "inside (not said openly at first): scared" in chat[0]["content"]
        assert rubric in chat[1]["content"] and "Me: seeker 3" in chat[1]["content"] and "from 1 to 5" in chat[1]["content"]
    assert user.batches[0][0][0] == q[0][0]  # the user's system prompt while talking


def test_profiles_seeded_from_cards_and_dialogues():
    card = cards(1)[0]
    p = protocols.emoharbor.profile_of(card)
    assert p["background"] == card["card"] and p["situation"] == "sit 0" and p["personality"] == ""
    dia = {"case_id": "d", "situation": "my exam", "emotion_type": "anxiety", "problem_type": "academic pressure",
           "first_user": ""}
    p = protocols.emoharbor.profile_of(dia)
    assert p["situation"] == "my exam" and "anxiety" in p["inner_state"] and "academic pressure" in p["inner_state"]
    assert protocols.esc_eval.card_text(dia) == "Emotion: anxiety\nProblem: academic pressure\nSituation: my exam"
    assert "Your personality" not in protocols.emoharbor.profile_text(p)  # empty fields are left out of the prompt


def test_judge_prompts_file_replaces_ours(tmp_path):
    prompts = {d: f"Rate {d} of:\n{{dialogue}}\nThe number only." for d in protocols.esc_eval.ESC_DIMS}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    loaded = protocols.esc_eval.load_judge_prompts(str(path))
    dialogue = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "I'm tired"}]
    chats = protocols.esc_eval.esc_judge_chats(dialogue, loaded)
    assert chats["tech"] == [{"role": "user", "content": "Rate tech of:\nAI assistant: hello\nUser: I'm tired\nThe number only."}]
    assert protocols.esc_eval.esc_judge_chats(dialogue)["tech"][0]["content"].startswith("You annotate")  # ours by default
    for bad, msg in (({**prompts, "overall": "no placeholder"}, "field 'overall'"),
                     ({k: v for k, v in prompts.items() if k != "human"}, "field 'human'"),
                     ({**prompts, "empathy": "x {dialogue}"}, "unknown dimension 'empathy'")):
        path.write_text(json.dumps(bad))
        with pytest.raises(common.InputError, match=re.escape(msg)):
            protocols.esc_eval.load_judge_prompts(str(path))


# ----------------------------------------------------------------------------------------------------
# Parsing the two scales: out-of-range and unparseable answers re-asked and counted


@pytest.mark.parametrize("text, lo, hi, expect", [
    ("3", 0, 4, (3, "")), ("Score: 4", 0, 4, (4, "")), ('{"score": 2, "why": "ok"}', 0, 4, (2, "")),
    ("0", 0, 4, (0, "")), ("5", 0, 4, (None, "out_of_range")), ("-1", 0, 4, (None, "out_of_range")),
    ("5", 1, 5, (5, "")), ("1.0", 1, 5, (1, "")), ("0", 1, 5, (None, "out_of_range")), ("6/5", 1, 5, (None, "out_of_range")),
    ("great job", 1, 5, (None, "unparseable")), ("", 0, 4, (None, "unparseable")), ("2.5", 0, 4, (None, "unparseable")),
    ('{"score": "x"} 3', 0, 4, (3, "")),
])
def test_parse_score(text, lo, hi, expect):
    assert protocols.rating.parse_score(text, lo, hi) == expect


@pytest.mark.parametrize("lo, hi", [(0, 4), (1, 5)])
def test_invalid_answers_are_retried_and_counted(lo, hi):
    """Dialogue k's answers, by attempt: 'good' valid at once; 'late' out of range, then unparseable, then valid;
    'never' unparseable every time. Greedy first, re-asks sampled."""
    script = {"good": [str(hi)], "late": [str(hi + 1), "no idea", str(lo)], "never": ["hmm"] * 3}
    temps = []

    def text(chat, temperature):
        temps.append(temperature)
        key = re.search(r"KEY=(\w+)", chat[0]["content"]).group(1)
        n = sum(chat is c for b in judge.batches for c in b)  # times this exact chat was asked (incl. now)
        return script[key][min(n, len(script[key])) - 1]
    judge = Recorder(text_fn=text)
    chats = [{"a": [{"role": "user", "content": f"KEY={k}"}], "b": [{"role": "user", "content": f"KEY={k}"}]}
             for k in ("good", "late", "never")]
    scores, raw, counts = protocols.rating.rate_dimensions({"a": judge, "b": judge}, chats, lo, hi, "generate", retries=2,
                                             max_new_tokens=4)
    assert scores == [{"a": float(hi), "b": float(hi)}, {"a": float(lo), "b": float(lo)}, {"a": None, "b": None}]
    assert counts == [{"asked": 2, "unparseable": 0, "out_of_range": 0, "retried": 0, "failed": 0},
                      {"asked": 2, "unparseable": 2, "out_of_range": 2, "retried": 4, "failed": 0},
                      {"asked": 2, "unparseable": 6, "out_of_range": 0, "retried": 4, "failed": 2}]
    assert raw == [{}, {}, {"a": "hmm", "b": "hmm"}]
    assert [len(b) for b in judge.batches] == [6, 4, 4]  # one call per attempt, only the invalid ones re-asked
    assert temps[:6] == [0.0] * 6 and set(temps[6:]) == {0.7}


def test_likelihood_scores_are_expectations_on_each_scale():
    rng = np.random.default_rng(0)
    table = {k: rng.normal(size=5) for k in ("x", "y")}
    for lo in (0, 1):
        judge = Recorder(ll_fn=lambda c, o: list(table[c[0]["content"]]))
        scores, _, _ = protocols.rating.rate_dimensions({"d": judge}, [{"d": [{"role": "user", "content": k}]} for k in table],
                                          lo, lo + 4, "likelihood")
        for s, k in zip(scores, table):
            p = np.exp(table[k]) / np.exp(table[k]).sum()
            assert s["d"] == pytest.approx(float(p @ np.arange(lo, lo + 5)))
        assert judge.batches and all(len(b) == 2 for b in judge.batches)


def test_protocol_summary_means_and_counts():
    recs = [{"scores": {"a": 1.0, "b": 3.0}, "answers": {"asked": 2, "failed": 0}},
            {"scores": {"a": 2.0, "b": None}, "answers": {"asked": 2, "failed": 1}},
            {"scores": {"a": 4.0, "b": 2.0}, "answers": {"asked": 2, "failed": 0}}]
    s = protocols.rating.protocol_summary(recs, ["a", "b"], 500, 0)
    assert s["n"] == 3 and s["complete"] == 2 and s["answers"] == {"asked": 6, "failed": 1}
    assert s["dims"]["a"]["value"] == pytest.approx(7 / 3) and s["dims"]["b"]["value"] == pytest.approx(2.5)
    assert s["mean"]["value"] == pytest.approx(np.mean([2.0, 3.0]))  # dialogues with every dimension only
    assert s["mean"]["ci"][0] <= s["mean"]["value"] <= s["mean"]["ci"][1]


# ----------------------------------------------------------------------------------------------------
# End to end on the fixtures (tiny models)


def proto_args(out, tiny, *extra):
    t = f"hf:{tiny}"
    return ["06_eval.py", "--test-data", CARDS, "--out", out, "--seeker", t, "--judge", t, "--max-examples", 3,
            "--esc-rounds", 2, "--emoharbor-rounds", 2, "--max-new-tokens", 5, "--seeker-max-new-tokens", 4,
            "--batch-size", 2, "--bootstrap", 200, *extra]


def test_end_to_end_cards_two_policies_both_protocols_and_resume(tmp_path, tiny_model_dir):
    tiny2 = make_tiny_model(tmp_path / "tiny2", seed=1)
    judges = tmp_path / "rank"  # a per-dimension judge: one folder per ESC-Eval dimension
    for d in protocols.esc_eval.ESC_DIM_KEYS:
        shutil.copytree(tiny_model_dir, judges / f"{d}_en")
    out = tmp_path / "eval"
    args = proto_args(out, tiny_model_dir, "--policy", f"base=hf:{tiny_model_dir}", "--policy", f"hf:{tiny2}",
                      "--judge", f"hf:{judges}/{{dim}}_en")
    p = run_script(*args)
    assert "parts: esc-eval,emoharbor" in p.stdout  # the default for a role-card file
    assert "base vs tiny2" not in p.stdout  # no pairwise part, no pairwise line
    scores = json.loads((out / "scores.json").read_text())
    recs = lines(out / "dialogs.jsonl")
    assert sorted((r["kind"], r["policy"]) for r in recs) == sorted(
        [(k, lab) for k in ("esc-eval", "emoharbor") for lab in ("base", "tiny2") for _ in range(3)])
    # all policies on the same cards: the same seeker opening (seeded by chunk, not by policy)
    esc = {(r["policy"], r["case_id"]): r for r in recs if r["kind"] == "esc-eval"}
    assert [esc["base", c]["messages"][1] for c in ("1001", "1002", "1003")] == \
           [esc["tiny2", c]["messages"][1] for c in ("1001", "1002", "1003")]
    assert all(len(r["messages"]) == 5 for r in esc.values()) and esc["base", "1001"]["card"].startswith("Age: 34")
    for q in scores["policies"]:
        for part, dims in (("esc-eval", protocols.esc_eval.ESC_DIMS), ("emoharbor", protocols.emoharbor.EH_DIMS)):
            s = q[part]
            assert s["n"] == 3 and s["complete"] == 3 and set(s["dims"]) == set(dims)
            lo, hi = (0, 4) if part == "esc-eval" else (1, 5)
            assert lo <= s["mean"]["value"] <= hi and s["mean"]["ci"][0] <= s["mean"]["value"] <= s["mean"]["ci"][1]
            mean = np.mean([np.mean(list(r["scores"].values())) for r in recs if r["kind"] == part and r["policy"] == q["label"]])
            assert s["mean"]["value"] == pytest.approx(mean)
    st = scores["settings"]
    assert st["esc_eval"]["judge_models"]["tech"] == f"hf:{judges}/tech_en" and st["source"] == "cards"
    report = (out / "report.md").read_text()
    for word in ["ESC-Eval protocol", "EmoHarbor-style user-as-judge", "our implementation, not the official",
                 "Emotional knowledge", "Human preference", "Mood improvement", "Redundancy", "mean", "base", "tiny2",
                 "{dim}", "one model per dimension", "3 ESC-Eval role cards"]:
        assert word in report, word
    assert "critic" not in report.split("## Policies and roles")[1].split("##")[0]  # no critic in this run
    # resume: nothing is redone, the scores are the same
    before = (out / "dialogs.jsonl").read_text()
    p = run_script(*args)
    assert "12 records already written" in p.stdout and (out / "dialogs.jsonl").read_text() == before
    assert json.loads((out / "scores.json").read_text())["policies"] == scores["policies"]
    # another round count is another protocol: refused, outputs untouched
    p = run_script(*args, "--esc-rounds", 3, check=False)
    assert p.returncode == 2 and "--esc-rounds 2 (now 3)" in p.stderr and (out / "dialogs.jsonl").read_text() == before


def test_end_to_end_profiles_generate_mode_counts_failures(tmp_path, tiny_model_dir):
    """A random tiny model never answers a number: every answer is counted, re-asked, and the dimension left out."""
    out = tmp_path / "eval"
    run_script(*proto_args(out, tiny_model_dir, "--test-data", PROFILES, "--policy", f"hf:{tiny_model_dir}", "--judge-mode",
                           "generate", "--retries", 1, "--judge-max-new-tokens", 3, "--max-examples", 2))
    s = json.loads((out / "scores.json").read_text())["policies"][0]["emoharbor"]
    assert s["n"] == 2 and s["complete"] <= 2 and s["answers"]["asked"] == 20
    invalid = s["answers"]["unparseable"] + s["answers"]["out_of_range"]
    assert invalid == s["answers"]["retried"] + s["answers"]["failed"]  # every invalid answer: re-asked or final
    assert "Answers: " in (out / "report.md").read_text()


def test_bad_protocol_input_exits_2_before_any_work(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "dialogs.jsonl").write_text("keep me\n")
    bad = tmp_path / "cards.json"
    bad.write_text(json.dumps([{"id": 1, "base": "Problem: x"}, {"id": 2, "bas": "typo"}]))
    p = run_script("06_eval.py", "--test-data", bad, "--out", out, check=False)
    assert p.returncode == 2 and f"{bad}: record 2: field 'base'" in p.stderr
    p = run_script("06_eval.py", "--test-data", CARDS, "--out", out, "--parts", "reference", check=False)
    assert p.returncode == 2 and "needs dialogues" in p.stderr and "warning" not in p.stderr
    zh = tmp_path / "zh.json"
    zh.write_text(json.dumps([{"id": 1, "base": "Problem: x", "language": "chinese"}]))
    p = run_script("06_eval.py", "--test-data", zh, "--out", out, "--parts", "reference", check=False)
    assert p.returncode == 2 and "cards in chinese; the seeker and judge prompts are English" in p.stderr
    p = run_script("06_eval.py", "--test-data", CARDS, "--out", out, "--parts", "judge,esc-eval", "--judge", "hf:x/{dim}",
                   check=False)
    assert p.returncode == 2 and "{dim}" in p.stderr
    p = run_script("06_eval.py", "--test-data", CARDS, "--out", out, "--judge", "hf:./no/such/{dim}", check=False)
    assert p.returncode == 2 and re.search(r"no/such/[a-z]+: no such file", p.stderr)
    assert (out / "dialogs.jsonl").read_text() == "keep me\n"
