"""esc_env.py, the scripted ESC environment: each rule on hand-written replies, the mood recomputed by hand, the
critic's options and the GRM's JSON through the stages' own parsers and validators (02's critic, 05's GRM) (and 05's shuffled scoring),
determinism, prompts it does not know, and the scripted roles in 02 under a 2-rank gloo torchrun."""
import os
import socket
import subprocess
import sys

import pytest

import backends
import common
from envs import esc as E
from conftest import ROOT, load_stage

sim = load_stage("02_simulate")  # PPDPP's critic
rapo = load_stage("05_rapo")  # the GRM's prompt and parser

CTX = [{"role": "user", "content": "I lost my job last week and I am so worried about paying the rent."}]
SEEKER_AGAIN = {"role": "user", "content": "I lost my job and the rent worries me."}
GOOD = ["Losing your job is hard and feeling worried about rent makes sense. What worries you most right now?",
        "No wonder you feel anxious, a lost job shakes everything. How are you coping with the rent this month?",
        "It is understandable to be scared after losing a job like that. What would help you most with the rent?"]


def supported(n: int) -> list[dict]:
    """CTX followed by n excellent replies, each different, each answered by the seeker."""
    d = list(CTX)
    for k in range(n):
        d += [{"role": "assistant", "content": GOOD[k % 3]}, SEEKER_AGAIN]
    return d


# ----------------------------------------------------------------------------------------------------
# Each rule on hand-written replies: exactly the named rule fires (others stay off)


@pytest.mark.parametrize("reply, ctx, on", [
    ("That is a big change for anyone. What has been the hardest part of it all?", CTX, {"question"}),
    ("That is a big change. Could you tell me more about what happened there?", CTX, {"question"}),  # asks for more
    ("That is a big change for anyone. Are you okay with all of it today?", CTX, set()),  # closed question
    ("That is a big change for anyone and it can leave a person feeling lonely.", CTX, {"feeling"}),
    ("Paying the rent after that news is a heavy weight to carry right now.", CTX, {"grounded"}),
    ("That is a big change and it makes sense that it shakes everything up.", CTX, {"validation"}),
    ("That is a big change. You could write a short list of the next steps.", CTX, {"early_advice"}),
    ("That is a big change. You could write a short list of the next steps.",
     CTX + [{"role": "assistant", "content": "Hmm, go on please."}, {"role": "user", "content": "It was sudden."},
            {"role": "assistant", "content": "Go on."}, {"role": "user", "content": "That is all."}], {"advice"}),
    ("Oh no.", CTX, {"length"}),
    (" ".join(["That is a big change for anyone to go through"] * 7), CTX, {"length"}),
    ("I understand. That is a big change for anyone to go through at once.", CTX, {"filler"}),
    ("I understand, the rent after a sudden job loss is a big change to face.", CTX, {"grounded", "filler"}),
])
def test_each_rule_on_hand_written_replies(reply, ctx, on):
    f = E.reply_features(reply, ctx)
    assert {k for k, v in f.items() if v} == on
    assert E.reply_score(reply, ctx) == pytest.approx(sum(E.W[k] for k in on))


def test_repetition_of_the_previous_reply():
    prev = "That is a big change for anyone to go through at once."
    hist = CTX + [{"role": "assistant", "content": prev}, {"role": "user", "content": "Yes it is."}]
    assert E.reply_features(prev, hist)["repetition"]
    assert not E.reply_features("Nothing like the last one, a fresh set of words entirely here.", hist)["repetition"]


def test_revised_rules_pinned():
    """The rules as revised once on train contexts (esc_env docstring, REVISION): LEAK 0.8, repetition -0.2,
    filler -0.1; a steady d passes theta = 0.5 only if d > 0.2 (m -> -0.5 + 5 d)."""
    assert (E.BASELINE, E.LEAK, E.HEARD_AFTER, E.MIN_WORDS, E.MAX_WORDS) == (-0.5, 0.8, 3, 6, 50)
    assert E.W == {"question": 0.20, "feeling": 0.20, "grounded": 0.20, "validation": 0.15, "advice": 0.15,
                   "early_advice": -0.20, "length": -0.30, "repetition": -0.20, "filler": -0.10}
    prev = "I understand. That is a big change for anyone to go through at once."
    hist = CTX + [{"role": "assistant", "content": prev}, {"role": "user", "content": "Yes it is."}]
    assert E.reply_score(prev, hist) == pytest.approx(-0.2 - 0.1)  # repeated filler: both penalties
    m = E.BASELINE
    for _ in range(40):
        m = E.BASELINE + E.LEAK * (m - E.BASELINE) + 0.25
    assert m > 0.5  # d = 0.25 steadily: success
    m = E.BASELINE
    for _ in range(40):
        m = E.BASELINE + E.LEAK * (m - E.BASELINE) + 0.2
    assert m < 0.5  # d = 0.2 never quite passes


def test_mood_recomputed_by_hand():
    good = "Losing your job is hard and feeling worried about rent makes sense. What worries you most right now?"
    d1 = E.reply_score(good, CTX)
    assert d1 == pytest.approx(0.2 + 0.2 + 0.2 + 0.15)  # question, feeling, grounded (job/rent), validation
    dialogue = [{"role": "assistant", "content": "Hello, welcome!"}] + CTX + [  # a greeting before the seeker: no move
        {"role": "assistant", "content": good}, {"role": "user", "content": "The rent, mostly."},
        {"role": "assistant", "content": "Oh no."}]  # length: -0.3
    m1 = -0.5 + 0.8 * 0.0 + d1  # LEAK 0.8
    m2 = -0.5 + 0.8 * (m1 + 0.5) - 0.3
    assert E.mood(dialogue[:3]) == pytest.approx(m1) and E.mood(dialogue) == pytest.approx(m2)
    assert E.mood(CTX) == E.BASELINE
    # clipping: many excellent replies never push the mood above 1
    assert all(E.reply_score(y, CTX) >= 0.75 for y in GOOD)
    assert E.mood(supported(6)) == 1.0


@pytest.mark.parametrize("m", [-1.0, -0.9, -0.5, -0.2, 0.0, 0.3, 0.5, 0.51, 0.75, 1.0])
def test_option_weights_have_expectation_m(m):
    p = E.option_probs(m)
    assert sum(p) == pytest.approx(1.0) and min(p) >= 0.0
    assert sum(pk * v for pk, (_, v) in zip(p, sim.CRITIC_OPTIONS)) == pytest.approx(m)
    assert sum(x > 0 for x in p) <= 2  # only the two neighbouring options


# ----------------------------------------------------------------------------------------------------
# The backend behind common's own callers and validators


@pytest.fixture
def backend():
    return backends.make_backend("scripted")


def test_spec_and_factory(backend):
    assert common.parse_spec("scripted").backend == "scripted"
    assert isinstance(backend, backends.ScriptedBackend) and backends.make_backend("scripted") is backend
    assert common.parse_spec("hf:scripted").backend == "hf"  # only the bare word names the scripted roles


def test_critic_scores_equal_the_mood_in_both_modes(backend):
    hists = [CTX + [{"role": "assistant", "content": r}, {"role": "user", "content": "Maybe."}] for r in
             ["Oh no.", "Losing your job is hard and feeling worried makes sense. What worries you most?\nTell me more."]]
    got = sim.critic_scores(backend, hists, "likelihood")
    assert got == pytest.approx([E.mood(h) for h in hists], abs=1e-9)
    s1 = sim.critic_scores(backend, hists, "sample", n=10, temperature=1.1, seed=3)
    s2 = sim.critic_scores(backend, hists, "sample", n=10, temperature=1.1, seed=3)
    assert s1 == s2  # deterministic
    outs = backend.generate(sim.critic_chats(hists), n=10, seed=3)
    for h, texts in zip(hists, outs):  # every sample is one of the options, with a weight above 0
        p = dict(zip([o for o, _ in sim.CRITIC_OPTIONS], E.option_probs(E.mood(h))))
        assert all(sim.match_critic_option(t) is not None and p[t] > 0 for t in texts)


def test_grm_json_passes_parse_grm_and_ranks_by_rule_score(backend):
    replies = ["Oh no.", "Losing your job is hard. What worries you most about the rent?",
               "You should look for a new job.", "Oh no.", "I understand. Everything will be fine in the end, really."]
    chats = rapo.grm_chats([CTX], [replies], [["a", "b", "c", "d", "e"]])
    res = backends.ask_json(backend, chats, lambda o, i: rapo.parse_grm(o, 5), retries=0, prefill='{"0": {"analysis": "')
    assert res.failed == 0 and res.retried == 0
    v = res.values[0]
    assert not v["derived"] and len(set(v["scores"])) == 5
    d = [E.reply_score(y, CTX) for y in replies]
    for i in range(5):
        for j in range(5):
            if d[i] > d[j]:
                assert v["ranks"][i] < v["ranks"][j] and v["scores"][i] > v["scores"][j]
    assert v["scores"][0] - v["scores"][3] == pytest.approx(1e-6)  # a tie: broken by position, by 1e-6
    assert v["critiques"][2].startswith("Lacks:") and "advice before the person has been heard" in v["critiques"][2]
    assert "asks an open question" in v["critiques"][1]


def test_grm_through_05_score_groups_unshuffles(backend):
    rapo = load_stage("05_rapo")
    replies = [["Oh no.", "Losing your job is hard. What worries you most about the rent?", "You should rest.", "Hmm."]] * 2
    ctxs = [CTX, CTX + [{"role": "assistant", "content": "Go on."}, {"role": "user", "content": "My job is gone."}]]
    out, st = rapo.score_groups(backend, "reaction", ctxs, replies, [["r"] * 4] * 2, retries=0, max_new_tokens=64, seed=5)
    assert st["grm_failed"] == 0 and st["grm_derived"] == 0
    for ctx, res, ys in zip(ctxs, out, replies):
        want = [(E.reply_score(y, ctx) - E.D_MIN) / (E.D_MAX - E.D_MIN) for y in ys]
        assert res["scores"] == pytest.approx(want, abs=1e-5)  # each score back at its own reply
    point, st = rapo.score_groups(backend, "rubric-point", ctxs, replies, None, retries=0, max_new_tokens=64, seed=5)
    assert st["grm_failed"] == 0 and point[0]["scores"] == pytest.approx(out[0]["scores"], abs=1e-5)


def test_scripted_seeker(backend):
    rec = {"emotion_type": "anxiety", "problem_type": "job crisis", "situation": "I lost my job."}
    hist_q = CTX + [{"role": "assistant", "content": "That sounds hard. What happened at work?"}]
    hist_bad = CTX + [{"role": "assistant", "content": "Oh no."}]
    a = backend.complete(common.seeker_chats([rec, rec], [hist_q, hist_bad]))
    assert a == backend.complete(common.seeker_chats([rec, rec], [hist_q, hist_bad]))  # deterministic
    assert "job crisis" in a[0] and "anxiety" in a[0]
    assert a[0] == E.seeker_message(common.persona(rec), hist_q) and a[0] != a[1]
    happy = supported(3)
    assert E.mood(happy) > 0.5 and "better" in backend.complete(common.seeker_chats([rec], [happy]))[0]


def test_unknown_prompt_and_policy_role_refused(backend):
    with pytest.raises(common.InputError, match="not scripted"):
        backend.complete([[{"role": "user", "content": "Write a poem."}]])
    with pytest.raises(common.InputError, match="critic's four options"):
        backend.option_loglik([[{"role": "user", "content": "Write a poem."}]], ["a", "b"])
    grpo = load_stage("04_grpo")
    with pytest.raises(common.InputError, match="--policy"):
        grpo.main(["--policy", "scripted", "--out", "/nonexistent/x"])


def test_render_and_template_inverses():
    msgs = [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "a: b\n\nc"}]
    assert E.parse_dialogue(common.render_dialogue(msgs)) == msgs
    assert E.unformat("x {a} y {b}!", "x 1 y {2}!") == {"a": "1", "b": "{2}"}
    assert E.unformat("x {a} y", "nope") is None
    ys, us = E.parse_candidates("[0] Supporter: hi\nthere\n[0] Seeker's reaction: ok\n\n[1] Supporter: yo\n[1] Seeker's reaction: no")
    assert ys == ["hi\nthere", "yo"] and us == ["ok", "no"]


# ----------------------------------------------------------------------------------------------------
# The scripted roles in a stage under torchrun (2 ranks, gloo) give the 1-process run's output


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_02_with_scripted_roles_two_ranks_equal_one(tiny_model_dir, demo_data, tmp_path):
    dialogues = common.load_dialogues(demo_data)
    turns = common.build_turns(dialogues, {d["dialog_id"]: "train" for d in dialogues})
    common.write_jsonl(tmp_path / "turns.jsonl", turns)
    args = ["--data", tmp_path / "turns.jsonl", "--policy", f"hf:{tiny_model_dir}", "--seeker", "scripted", "--critic",
            "scripted", "--max-examples", 4, "--per-dialogue", 1, "-m", 2, "--max-turns", 2, "--batch-size", 1,
            "--max-new-tokens", 5, "--theta", -0.6, "--delta", -0.6]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    codes = []
    for nproc, name in ((1, "one"), (2, "two")):
        pre = [sys.executable] + ([] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                                          f"--master-port={_port()}"])
        p = subprocess.run(pre + [str(ROOT / "02_simulate.py"), *map(str, args), "--out", str(tmp_path / name)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 2), p.stderr[-2000:]  # 2: a degenerate label set is reported, the file is written
        codes.append(p.returncode)
    a, b = (tmp_path / "one" / "rollouts.jsonl").read_bytes(), (tmp_path / "two" / "rollouts.jsonl").read_bytes()
    assert a == b and codes[0] == codes[1]
    by_id = {t["id"]: t for t in turns}
    recs = common.read_jsonl(tmp_path / "one" / "rollouts.jsonl")
    assert len(recs) == 8
    for r in recs:
        hist = list(r["context"])
        for k, m in enumerate(r["trajectory"]):
            if m["role"] == "user":  # the scripted seeker's message and the critic's score, recomputed here
                assert m["content"] == E.seeker_message(common.persona(by_id[r["turn_id"]]), hist)
                assert r["critic_scores"][k // 2] == pytest.approx(E.mood(hist + [m]), abs=1e-9)
            hist.append(m)


def test_experiment_trace_helpers():
    """experiments/scripted_env.py's trace: the pairwise AUC, the rule fractions of 06's dialogues and the label
    ceiling, each against a hand computation."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scripted_env", ROOT / "experiments" / "scripted_env.py")
    x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(x)
    assert x.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # pairs (pos, neg): 3 of 4 ordered
    assert x.auc([1, 1], [0, 1]) == 0.5 and x.auc([1, 2], [1, 1]) is None
    good, filler = GOOD[0], "I'm sorry to hear that. I understand how you feel right now."
    recs = [{"messages": CTX + [{"role": "assistant", "content": good}, SEEKER_AGAIN, {"role": "assistant", "content": filler}]}]
    prof = x.rule_profile(recs)
    d1, d2 = E.reply_score(good, CTX), E.reply_score(filler, CTX + [{"role": "assistant", "content": good}, SEEKER_AGAIN])
    assert prof["turns"] == 2 and prof["mean_d"] == round((d1 + d2) / 2, 4)
    assert prof["rule_frac"]["question"] == 0.5 and prof["rule_frac"]["filler"] == 0.5
    rolls = [{"id": f"c{i}", "label": lab, "response": y, "context": CTX, "critic_scores": [c, c]}
             for i, (lab, y, c) in enumerate([(1, good, 0.2), (0, filler, -0.6), (1, filler, 0.1), (0, good, -0.7)])]
    ceil = x.label_ceiling(rolls + [{"id": "other", "label": 1}], {"c0", "c1", "c2", "c3"})
    assert ceil["n"] == 4 and ceil["auc_critic_after_reply_c1"] == 1.0  # c_1 orders the labels perfectly
    assert ceil["auc_reply_score_d"] == 0.5  # the same two replies on both sides: d cannot tell them apart
