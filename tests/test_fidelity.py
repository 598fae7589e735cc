"""Faithful to the papers (issue 23): every named variant computes what its paper calls it. One regression test per
item: RAPO Table 1 / Table 3 rows as presets, the rubric judges' point of view, Eq. 11's distilled candidate on
r_i = score_i + R_len, GRM scores that contradict the ranks, one OpenAI seed per (chat, sample), the hindsight
judge seeing what followed (Eq. 8), --null-as reaching training, the RLFF-ESC label depending on efficiency,
PPDPP's critic matching, and the teacher's context / output format / equation numbers."""
import json

import pytest
import torch

import backends
import common
import models
from conftest import load_stage, run_script

sel = load_stage("01_select")
sim = load_stage("02_simulate")
rapo = load_stage("05_rapo")


# ----------------------------------------------------------------------------------------------------
# 1. RAPO Table 1 / Table 3 RL rows: --ablation presets


@pytest.mark.parametrize("row, reward, eta", [
    ("rapo", "reaction", 1e-3), ("wo-sd", "reaction", 0.0), ("wo-urm", "rubric-group", 1e-3),
    ("cpo", "rubric-group", 0.0), ("grpo-rubric", "rubric-point", 0.0),
])
def test_ablation_presets_set_reward_and_eta(row, reward, eta):
    args = rapo.parse_args(["--ablation", row])
    assert (args.ablation, args.reward, args.sd_coef) == (row, reward, eta)
    # the same flags without the preset name the same row (saved in args.json either way)
    assert rapo.parse_args(["--reward", reward, "--sd-coef", str(eta)]).ablation == row


def test_ablation_refuses_contradicting_flags():
    with pytest.raises(common.InputError, match="--ablation cpo is without self-distillation"):
        rapo.parse_args(["--ablation", "cpo", "--sd-coef", "1e-3"])  # CPO = w/o URM + SD: no SD
    with pytest.raises(common.InputError, match="--ablation wo-urm is with self-distillation"):
        rapo.parse_args(["--ablation", "wo-urm", "--sd-coef", "0"])
    with pytest.raises(common.InputError, match="--ablation rapo is --reward reaction"):
        rapo.parse_args(["--ablation", "rapo", "--reward", "rubric-group"])
    a = rapo.parse_args(["--ablation", "wo-urm", "--sd-coef", "0.01", "--reward", "rubric-group"])  # agreeing flags
    assert (a.reward, a.sd_coef) == ("rubric-group", 0.01)
    assert rapo.parse_args(["--reward", "rubric-point"]).ablation is None  # rubric-point + SD is no paper row


def test_ablation_row_end_to_end_in_args_json(tiny_model_dir, tmp_path, demo_data):
    """w/o URM with the scripted judge: the rubric-group (expert) prompt is answered, its critiques distilled, and the
    row is in args.json."""
    s = tmp_path / "sel"
    run_script("01_select.py", "--data", demo_data, "--out", s, "--judge", "none", "--max-examples", "2")
    run_script("05_rapo.py", "--data", s / "turns.jsonl", "--out", tmp_path / "r", "--policy", f"hf:{tiny_model_dir}",
               "--grm", "scripted", "--ablation", "wo-urm", "--all-turns", "--format", "reply", "--prompts-per-step", "2",
               "--max-steps", "1", "--max-new-tokens", "6", "--grm-retries", "0", timeout=600)
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (saved["ablation"], saved["reward"], saved["sd_coef"]) == ("wo-urm", "rubric-group", 1e-3)
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grm_failed_frac"] == 0 and row["sd_tokens"] > 0 and row["grm_disordered_frac"] == 0


# ----------------------------------------------------------------------------------------------------
# 2. The rubric judges are expert raters, the GRM takes the seeker's place


def test_rubric_judges_are_expert_raters():
    ctx = [[{"role": "user", "content": "I lost my job."}]]
    seeker_view = ("take the place of the help-seeker", "seeker's own experience")
    group = rapo.grm_chats(ctx, [["a", "b"]], None)[0][0]["content"].lower()  # rubric-group (w/o URM, CPO)
    point = rapo.rubric_point_chats(ctx, ["a"])[0][0]["content"].lower()  # rubric-point (GRPO baseline)
    grm = rapo.grm_chats(ctx, [["a", "b"]], [["u0", "u1"]])[0][0]["content"].lower()  # RAPO's GRM
    for text in (group, point):
        assert "expert rater" in text and not any(v in text for v in seeker_view) and "reaction:" not in text
    assert all(v in grm for v in seeker_view) and "seeker's reaction: u1" in grm


# ----------------------------------------------------------------------------------------------------
# 3. Eq. 11: a_w = argmin_i r_i and the better example argmax_i r_i, r_i = score_i + R_len(y_i)


def test_distilled_candidate_includes_the_overlong_punishment():
    results = [{"scores": [0.9, 0.2, 0.6, 0.4], "critiques": [""] * 4}, None]
    r, pen = rapo.group_rewards(results, [250, 30, 30, 30] + [10] * 4, 4, 200, 80)
    assert pen[0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    # candidate 0 is over L_max: r_0 = 0.9 - 1 is the group's lowest, so it is distilled; the best example is r_2
    assert rapo.distill_targets(results, r) == {0: (0, 2)}  # the failed group 1 is not distilled


def test_tied_groups_are_not_distilled():
    """--sd-min-gap: a group whose rewards spread no more than the gap has no better candidate, so it is not
    distilled (an exact tie never is: argmin and argmax would both be candidate 0)."""
    tie = 1e-6  # the scripted GRMs' tie-break step
    results = [{"scores": s, "critiques": [""] * 3} for s in ([0.5, 0.5, 0.5], [0.5 + 2 * tie, 0.5 + tie, 0.5],
                                                              [0.5, 0.7, 0.6])]
    r = torch.tensor([res["scores"] for res in results])
    assert rapo.distill_targets(results, r) == {1: (2, 0), 2: (0, 1)}  # default 0: only the exact tie is skipped
    assert rapo.distill_targets(results, r, 1e-3) == {2: (0, 1)}  # the tie-broken group too
    assert rapo.distill_targets(results, r, 0.2) == {}  # a spread of exactly the gap is a tie
    assert rapo.parse_args(["--data", "d.jsonl", "--sd-min-gap", "1e-3"]).sd_min_gap == 1e-3


# ----------------------------------------------------------------------------------------------------
# 4. GRM scores whose order contradicts the ranks: derived from the ranks, counted


def test_scores_contradicting_ranks_are_derived_and_counted():
    ok = rapo.parse_grm({"0": {"rank": 2, "score": 0.3}, "1": {"rank": 1, "score": 0.8}, "2": {"rank": 3, "score": 0.1}}, 3)
    assert ok["scores"] == [0.3, 0.8, 0.1] and not ok["derived"] and not ok["disordered"]
    bad = {"0": {"rank": 1, "score": 0.1, "analysis": "x"}, "1": {"rank": 2, "score": 0.9, "analysis": "y"},
           "2": {"rank": 3, "score": 0.5, "analysis": "z"}}
    got = rapo.parse_grm(bad, 3)
    assert got["scores"] == [1.0, 0.5, 0.0] and got["derived"] and got["disordered"]  # the best-ranked gets the most

    class Disordered(backends.Backend):
        def generate(self, chats, n=1, prefill="", **kw):
            return [[json.dumps(bad)] for _ in chats]

    res, st = rapo.score_groups(Disordered(), "reaction", [[{"role": "user", "content": "hi"}]] * 2,
                                [["a", "b", "c"]] * 2, [["u", "v", "w"]] * 2, retries=0, max_new_tokens=64, seed=1)
    assert st["grm_disordered"] == 2 and st["grm_derived"] == 2 and st["grm_failed"] == 0
    for r in res:  # whatever the shuffle, every candidate's score follows its rank
        assert sorted(zip(r["ranks"], r["scores"])) == [(1, 1.0), (2, 0.5), (3, 0.0)]


# ----------------------------------------------------------------------------------------------------
# 5. OpenAI backend: one seed per (chat, sample), as the vLLM backend


def test_openai_seeds_one_per_chat_and_sample(tmp_path):
    """Request bodies captured at the client: three identical chats (two equal candidates in 02, G equal reaction
    prompts in 05) x n = 2 get six different seeds, seed + chat * n + sample (VLLMBackend.sampling's streams)."""
    b = backends.OpenAIBackend("m", "http://127.0.0.1:9/v1", concurrency=1, retries=0)
    sent = []

    class Reply:  # the shape of a chat completion that OpenAIBackend reads
        def __init__(self, text):
            self.choices = [type("Choice", (), {"message": type("Message", (), {"content": text})()})()]

    def create(**kw):
        sent.append(kw)
        return Reply(f"seed {kw['seed']}")

    b.client.chat.completions.create = create
    chat = [{"role": "user", "content": "I feel alone."}]
    out = b.generate([chat, chat, chat], n=2, seed=100, max_new_tokens=4)
    assert [kw["seed"] for kw in sent] == [100, 101, 102, 103, 104, 105]
    assert out == [["seed 100", "seed 101"], ["seed 102", "seed 103"], ["seed 104", "seed 105"]]  # [chat][sample]
    # --role-cache keys an openai: item by its position's seed (seed + i * n), like vllm: equal chats of one call are
    # different items, recorded and replayed apart, and misses are sent at their own seeds
    import role_cache

    cache = role_cache.RoleCache(tmp_path / "cache")
    assert cache.wrap(b).generate([chat, chat, chat], n=2, seed=100, max_new_tokens=4) == out
    b.client.chat.completions.create = None  # replay only: no request may reach the server
    replay = role_cache.RoleCache(tmp_path / "cache", "read").wrap(b)
    assert replay.generate([chat, chat, chat], n=2, seed=100, max_new_tokens=4) == out


# ----------------------------------------------------------------------------------------------------
# 6. Hindsight selection (Eq. 8): the judge sees what followed the reply


class Capture(backends.Backend):
    """Records the judge's prompts; answers learn = true (generate) or p(true) > p(false) (likelihood)."""

    def __init__(self):
        self.chats = []

    def generate(self, chats, n=1, prefill="", **kw):
        self.chats += chats
        return [['{"learn": true, "reason": "ok"}'] * n for _ in chats]

    def option_loglik(self, chats, options):
        self.chats += chats
        return [[0.0, -1.0] for _ in chats]


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_hindsight_judge_sees_what_followed(demo_data, mode):
    def prompts(future):
        args = sel.parse_args(["--data", str(demo_data), "--judge", "none", "--max-examples", "1",
                               "--judge-future", future])
        turns, after = sel.load_all_turns(args)
        train = [t for t in turns if t["split"] == "train"][:3]
        b = Capture()
        ups, _, _ = sel.judge_batch(b, train, mode, args, after)
        assert [u["learn_judge"] for u in ups] == [True] * 3
        return train, after, [c[0]["content"] for c in b.chats]

    train, after, got = prompts("all")
    t, text = train[0], got[0]
    nxt, rest = after[t["id"]][0], after[t["id"]]
    assert nxt["role"] == "user" and len(rest) > 2
    hind = text.split("What followed the reply")[1]
    assert nxt["content"] in hind and rest[-1]["content"] in hind  # the seeker's reaction and the rest of D
    assert t["target"] in text.split("What followed the reply")[0]
    _, _, got1 = prompts("1")
    hind1 = got1[0].split("What followed the reply")[1]
    assert nxt["content"] in hind1 and rest[1]["content"] not in hind1
    _, _, got0 = prompts("0")  # Appendix G's template as printed
    assert "What followed" not in got0[0] and t["target"] in got0[0]


# ----------------------------------------------------------------------------------------------------
# 7. --null-as true reaches training (load_turns(learn_only) of 02/04/05)


def test_null_as_reaches_training(tmp_path, demo_data, tiny_model_dir):
    out = tmp_path / "sel"
    base = ["--data", demo_data, "--out", out, "--judge", f"hf:{tiny_model_dir}", "--judge-mode", "generate",
            "--retries", 0, "--max-new-tokens", 4, "--max-examples", 2, "--judge-future", 1]
    run_script("01_select.py", *base, "--null-as", "true")  # a judge that never writes JSON: every verdict null
    recs = common.read_jsonl(out / "turns.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    assert train and all(r["learn_judge"] is None and r["learn"] is True for r in train)
    assert all(r["learn_reason"].startswith("unparseable judge output: ") for r in train)  # the raw answer kept
    assert [r["id"] for r in common.load_turns(out / "turns.jsonl", learn_only=True)] == [r["id"] for r in train]
    p = run_script("01_select.py", *base, "--null-as", "false")  # re-resolves without judging again
    assert f"{len(recs)} already written, 0 to do" in p.stdout
    assert common.load_turns(out / "turns.jsonl", learn_only=True) == []
    assert all(r["learn"] is None for r in common.read_jsonl(out / "turns.jsonl") if r["split"] != "train")


# ----------------------------------------------------------------------------------------------------
# 8. RLFF-ESC: under the defaults the classification label depends on efficiency


def test_label_depends_on_efficiency_under_the_defaults():
    def label(argv, trace):
        a = sim.parse_args(argv)
        success, end = sim.rollout_outcome(trace, a.theta, a.max_turns)
        return sim.reward_label(sim.future_reward(trace, success, end, a.max_turns, a.lambda_eff), a.delta)

    early, late = [0.6], [-0.5] * 6 + [0.6]  # "feels better" at turn 1 or at turn 7 of T = 8: both successes
    assert sim.parse_args([]).delta == 0.75  # theta + lambda_eff / 2
    assert (label([], early), label([], late)) == (1, 0)  # efficiency decides
    assert label([], [-0.5] * 7 + [1.0]) == 1  # solved counts at any turn
    assert label(["--lambda-eff", "0", "--delta", "0.75"], early) == 0  # --lambda-eff changes the classification target
    # the documented alternative: --delta = --theta makes the label 1[success], where --lambda-eff cannot matter
    assert (label(["--delta", "0.5"], early), label(["--delta", "0.5"], late)) == (1, 1)
    assert label(["--delta", "0.5", "--lambda-eff", "0"], late) == 1


# ----------------------------------------------------------------------------------------------------
# 9. PPDPP's critic matching (sample mode): keys tried in the order worse, same, better, solved


@pytest.mark.parametrize("text, value", [
    ("The seeker feels better, not worse", -1.0),  # "worse" is tried first, wherever it stands
    ("Feels the same", -0.5), ("same as before, maybe better", -0.5),
    ("It's solved and the seeker feels better", 0.5),  # "better" is tried before "solved"
    ("The seeker's issue is solved.", 1.0), ("no idea", None),
])
def test_critic_sample_matching_is_ppdpp(text, value):
    assert sim.match_critic_option(text) == value


# ----------------------------------------------------------------------------------------------------
# 10. Small ones: equation numbers, the teacher's context, the teacher's output format


def test_sd_docstrings_cite_eq_12_for_the_summed_loss():
    assert "Eq. 12" in rapo.sd_loss.__doc__ and "Eq. 12" in rapo.make_sd_loss.__doc__
    assert "Eq. 14" not in rapo.sd_loss.__doc__ and "Eq. 14" not in rapo.make_sd_loss.__doc__
    assert "Eq. 13" in rapo.topk_reverse_kl.__doc__ and "Eq. 14" in rapo.topk_reverse_kl.__doc__  # head and tail


def test_teacher_sees_the_students_messages_plus_the_block():
    tok = models.load_tokenizer(str(models.embedded_tokenizer_path()))
    ctx = [{"role": "user", "content": "OLDEST " + "I worry about everything at work. " * 30},
           {"role": "assistant", "content": "That sounds heavy. What worries you most?"},
           {"role": "user", "content": "LATEST my manager ignores me."}]
    grpo = load_stage("04_grpo")
    budget = len(models.chat_ids(tok, [{"role": "system", "content": rapo.RAPO_SYSTEM}] + ctx[1:], rapo.PREFILL)) + 5
    student = tok.decode(grpo.prompt_ids(tok, ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, budget))
    assert "OLDEST" not in student and "LATEST" in student  # the student's budget drops the oldest message
    fb = dict(response="ok", reaction="meh", critique="too short", best="That sounds lonely.")
    teacher = tok.decode(rapo.teacher_prompt_ids(tok, ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, budget, 1024, "cos", **fb))
    assert "OLDEST" not in teacher and "LATEST" in teacher and "<Critic Feedback>\ntoo short" in teacher
    assert "What worries you most?" in teacher  # every message the student saw


def test_teacher_output_instruction_agrees_with_the_prefill():
    ctx = [{"role": "user", "content": "hi"}]
    cos = rapo.teacher_context(ctx, "ok", "meh", "short", "better", fmt="cos")[0]["content"]
    reply = rapo.teacher_context(ctx, "ok", "meh", "short", "better", fmt="reply")[0]["content"]
    assert "<strategy></strategy>" in cos and "Output only the revised response" not in cos  # the turn starts <strategy>
    assert "Output only the revised response" in reply and "<strategy>" not in reply  # no prefill
