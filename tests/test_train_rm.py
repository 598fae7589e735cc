"""03_train_rm.py: metrics and losses against hand computations, padding invariance, and end-to-end runs on the
tiny model: a separable toy labelling is learnt (valid AUC > 0.9), the saved RM reloads (our loader and plain
transformers/PEFT) with the same scores, --resume after --max-steps equals an uninterrupted run, and a 2-rank gloo
torchrun run equals 1 process with gradient accumulation 2."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import common
import models
from conftest import load_stage, run_script

rm = load_stage("03_train_rm")


# ----------------------------------------------------------------------------------------------------
# Metrics on hand values and against naive loops


def test_roc_auc_hand_values():
    assert rm.roc_auc([1, 0, 1, 0], [0.9, 0.4, 0.35, 0.1]) == 0.75  # 3 of 4 (pos, neg) pairs ordered
    assert rm.roc_auc([1, 0], [0.5, 0.5]) == 0.5  # a tie counts 1/2
    assert rm.roc_auc([1, 1, 0], [0.2, 0.7, 0.7]) == 0.25  # (0.2 < 0.7: 0) + (0.7 = 0.7: 1/2), over 2 pairs
    assert math.isnan(rm.roc_auc([1, 1], [0.1, 0.2]))


def test_roc_auc_matches_pairwise_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 8, 60) / 8  # many ties
    pos, neg = s[y == 1], s[y == 0]
    naive = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert math.isclose(rm.roc_auc(y, s), naive)


def test_ece_and_binary_metrics_hand_values():
    # bins of width 0.1: {0.05, 0.15} one each, {0.95, 1.0} in the last bin (1.0 included)
    y, p = [0, 1, 1, 0], [0.05, 0.15, 0.95, 1.0]
    want = (1 * abs(0 - 0.05) + 1 * abs(1 - 0.15) + 2 * abs(0.5 - 0.975)) / 4
    assert math.isclose(rm.expected_calibration_error(y, p), want)
    m = rm.binary_metrics([1, 1, 0, 0, 1], [0.9, 0.2, 0.6, 0.1, 0.7], threshold=0.5, probs=[0.9, 0.2, 0.6, 0.1, 0.7])
    # predictions 1, 0, 1, 0, 1: TP 2, FP 1, FN 1, TN 1
    assert m["accuracy"] == 3 / 5 and m["f1"] == 2 * 2 / (2 * 2 + 1 + 1)
    assert m["positive_rate"] == 3 / 5 and m["label_positive_rate"] == 3 / 5
    assert math.isclose(m["roc_auc"], 5 / 6)  # pairs (pos, neg): .9>.6 .9>.1 .2<.6 .2>.1 .7>.6 .7>.1
    assert m["ece"] is not None and m["n"] == 5


# ----------------------------------------------------------------------------------------------------
# The three objectives against hand computations


def test_losses_match_hand_computation():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0])
    rewards = torch.tensor([1.1, -0.5, 0.7, 0.7], dtype=torch.float64)
    groups = ["a", "a", "b", "b"]
    sig = lambda x: 1 / (1 + math.exp(-x))
    s = logits.tolist()
    ls, n = rm.rm_loss_sum(logits, labels, rewards, groups, "classification")
    want = -(math.log(sig(0.3)) + math.log(1 - sig(-1.2)) + math.log(sig(2.0)) + math.log(1 - sig(0.5)))
    assert n == 4 and math.isclose(ls.item(), want, rel_tol=1e-12)
    ls, n = rm.rm_loss_sum(logits, labels, rewards, groups, "regression")
    want = (0.3 - 1.1) ** 2 + (-1.2 + 0.5) ** 2 + (2.0 - 0.7) ** 2 + (0.5 - 0.7) ** 2
    assert n == 4 and math.isclose(ls.item(), want, rel_tol=1e-12)
    ls, n = rm.rm_loss_sum(logits, labels, rewards, groups, "ranking")
    # group a: r0 > r1 -> one pair (0, 1); group b: r2 == r3 -> no pair; no pair across groups
    assert n == 1 and math.isclose(ls.item(), -math.log(sig(s[0] - s[1])), rel_tol=1e-12)
    ls.backward()
    assert logits.grad[2] == 0 and logits.grad[3] == 0


def test_ranking_pairs_and_packing():
    assert rm.ranking_pairs(["a", "a", "a", "b"], [0.1, 0.5, 0.5, 2.0]) == [(1, 0), (2, 0)]
    recs = [{"turn_id": g} for g in ["x", "x", "y", "y", "y", "z", "w", "w"]]
    assert rm.pack_groups(recs, ["x", "y", "z", "w"], 4) == [[0, 1], [2, 3, 4, 5], [6, 7]]
    assert rm.pack_groups(recs, ["y", "w"], 2) == [[2, 3, 4], [6, 7]]  # a group larger than the batch stays whole


def test_split_by_dialogue_is_disjoint_and_deterministic():
    recs = [{"dialog_id": f"d{k % 7}", "turn_id": f"d{k % 7}-t{k}"} for k in range(40)]
    tr, va = rm.split_by_dialogue(recs, 3, 0.2)
    assert {r["dialog_id"] for r in tr}.isdisjoint({r["dialog_id"] for r in va})
    assert len({r["dialog_id"] for r in va}) == 1 and len(tr) + len(va) == 40  # round(7 * 0.2) = 1
    assert rm.split_by_dialogue(recs, 3, 0.2) == (tr, va)


# ----------------------------------------------------------------------------------------------------
# A separable toy labelling: label = 1 iff the reply contains "banana"

WORDS = "you feel sad tired today work home friend talk help sorry hear that sounds hard".split()


def toy_rollouts(path, dialogues=12, turns=4, m=2, seed=0):
    rng = random.Random(seed)
    recs = []
    for d in range(dialogues):
        for t in range(turns):
            ctx = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(6))}]
            for j in range(m):
                lab = rng.random() < 0.5
                w = [rng.choice(WORDS) for _ in range(6)]
                if lab:
                    w.insert(rng.randrange(7), "banana")
                recs.append({"id": f"d{d}-t{t}-c{j}", "turn_id": f"d{d}-t{t}", "dialog_id": f"d{d}", "context": ctx,
                             "response": " ".join(w), "reward": float(lab) + rng.random() / 10, "label": int(lab)})
    common.write_jsonl(path, recs)
    return recs


def run03(args, nproc=1):
    return run_script("03_train_rm.py", *args, nproc=nproc, timeout=600)


def predictions(out) -> dict:
    m = json.loads((out / "rm" / "rm_metrics.json").read_text())
    return {p["id"]: p["score"] for p in m["predictions"]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("rm")
    recs = toy_rollouts(d / "rollouts.jsonl")
    return {"dir": d, "recs": recs, "base": ["--data", d / "rollouts.jsonl", "--rm", f"hf:{tiny_model_dir}"]}


def test_learns_separable_toy_and_reloads(toy):
    out = toy["dir"] / "full"
    run03(toy["base"] + ["--out", out, "--full", "--lr", "3e-3", "--epochs", "8"])
    m = json.loads((out / "rm" / "rm_metrics.json").read_text())
    assert m["roc_auc"] > 0.9 and m["accuracy"] > 0.8, m
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    # reload with our loader: the same scores as the trained model gave on valid
    model, tok = rm.load_reward_model(out / "rm")
    by = {r["id"]: r for r in toy["recs"]}
    pred = predictions(out)
    ids = list(pred)
    got = rm.score(model, tok, [by[i]["context"] for i in ids], [by[i]["response"] for i in ids], batch_size=5)
    np.testing.assert_allclose(got, [pred[i] for i in ids], atol=1e-5)
    assert math.isclose(rm.roc_auc([by[i]["label"] for i in ids], got), m["roc_auc"])
    # and with plain transformers: sigmoid of the one logit of the chat-formatted input
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(out / "rm").eval()
    ptok = AutoTokenizer.from_pretrained(out / "rm")
    r = by[ids[0]]
    text = ptok.apply_chat_template(r["context"] + [{"role": "assistant", "content": r["response"]}], tokenize=False)
    with torch.no_grad():
        logit = plain(**ptok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert math.isclose(1 / (1 + math.exp(-logit)), pred[ids[0]], abs_tol=1e-5)


def test_padding_does_not_change_scores(toy, tiny_model_dir):
    """Batched (right padded, mixed lengths) scores equal one-at-a-time scores."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    tok = models.load_tokenizer(str(tiny_model_dir))
    model.config.pad_token_id = tok.pad_token_id
    recs = toy["recs"][:6]
    ctx = [r["context"] for r in recs]
    ys = [r["response"] + " more" * k for k, r in enumerate(recs)]  # different lengths
    np.testing.assert_allclose(rm.score(model, tok, ctx, ys, batch_size=6), rm.score(model, tok, ctx, ys, batch_size=1),
                               atol=1e-5)
    ids = rm.rm_input_ids(tok, ctx[:1], ys[:1], max_length=10)[0]
    full = rm.rm_input_ids(tok, ctx[:1], ys[:1], max_length=10_000)[0]
    assert ids == full[-10:]  # cut from the left


def test_lora_saves_score_head_and_reloads_with_peft(toy):
    out = toy["dir"] / "lora"
    run03(toy["base"] + ["--out", out, "--epochs", "1", "--lr", "1e-2", "--objective", "regression"])
    files = os.listdir(out / "rm")
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    from safetensors.torch import load_file

    assert any("score" in k for k in load_file(out / "rm" / "adapter_model.safetensors"))  # modules_to_save
    pred = predictions(out)
    by = {r["id"]: r for r in toy["recs"]}
    ids = list(pred)
    model, tok = rm.load_reward_model(out / "rm")
    got = rm.score(model, tok, [by[i]["context"] for i in ids], [by[i]["response"] for i in ids])
    np.testing.assert_allclose(got, [pred[i] for i in ids], atol=1e-5)  # regression: the raw predicted r_fut
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = json.loads((out / "rm" / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    plain.config.pad_token_id = tok.pad_token_id
    plain = PeftModel.from_pretrained(plain, out / "rm").eval()
    plain.rm_info = {"objective": "regression", "max_length": 1024}
    np.testing.assert_allclose(rm.score(plain, tok, [by[i]["context"] for i in ids], [by[i]["response"] for i in ids]),
                               got, atol=1e-6)


def test_resume_after_max_steps_equals_uninterrupted(toy):
    common_args = toy["base"] + ["--epochs", "2", "--lr", "1e-2", "--objective", "ranking", "--batch-size", "6"]
    run03(common_args + ["--out", toy["dir"] / "straight"])
    cut = toy["dir"] / "cut"
    run03(common_args + ["--out", cut, "--max-steps", "7"])
    assert (cut / "rm_ckpt" / "state.pt").exists()
    assert json.loads((cut / "rm" / "rm_metrics.json").read_text())["steps"] == 7
    # --resume alone restores the run's settings (data, model, objective, ...); a different one is refused
    p = run_script("03_train_rm.py", "--out", cut, "--resume", "--lr", "0.5", check=False)
    assert p.returncode == 2 and "--resume: --lr 0.5 differs from the run's 0.01" in p.stderr, p.stderr
    run03(["--out", cut, "--resume"])
    a, b = predictions(toy["dir"] / "straight"), predictions(cut)
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), atol=1e-6)
    assert not (cut / "rm_ckpt").exists()  # finished: the checkpoint is removed
    m = json.loads((cut / "rm" / "rm_metrics.json").read_text())
    assert m["steps"] == m["total_steps"] and m["ece"] is None  # ranking: sigmoid(s) is not a probability
    # the loss history survives the resume: the same per-step rows as the uninterrupted run
    s = json.loads((toy["dir"] / "straight" / "rm" / "rm_metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == [h["step"] for h in s["history"]] and len(s["history"]) > 7
    np.testing.assert_allclose([h["loss"] for h in m["history"]], [h["loss"] for h in s["history"]], rtol=1e-5)
    assert [v["epoch"] for v in m["valid_history"]] == [v["epoch"] for v in s["valid_history"]] == [0]
    np.testing.assert_allclose([v["roc_auc"] for v in m["valid_history"]], [v["roc_auc"] for v in s["valid_history"]])


def test_torchrun_two_ranks_equals_one_process_with_accumulation(toy):
    common_args = toy["base"] + ["--epochs", "1", "--lr", "1e-2", "--batch-size", "4"]
    run03(common_args + ["--out", toy["dir"] / "one", "--grad-accum", "2"])
    run03(common_args + ["--out", toy["dir"] / "two", "--grad-accum", "1"], nproc=2)
    a, b = predictions(toy["dir"] / "one"), predictions(toy["dir"] / "two")
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), atol=1e-5)
    ha = json.loads((toy["dir"] / "one" / "rm" / "rm_metrics.json").read_text())["history"]
    hb = json.loads((toy["dir"] / "two" / "rm" / "rm_metrics.json").read_text())["history"]
    np.testing.assert_allclose([h["loss"] for h in hb], [h["loss"] for h in ha], rtol=1e-5)
    # gradient norms too (Adam would hide a wrongly scaled gradient in the scores, the norm does not)
    np.testing.assert_allclose([h["grad_norm"] for h in hb], [h["grad_norm"] for h in ha], rtol=1e-4)
    assert len(ha) == len(hb) == 10 and ha[0]["terms"] == 8  # 80 train candidates, 2 micro-batches of 4 per step


def test_bad_input_stops_before_work(tmp_path, toy):
    recs = toy["recs"]
    path = tmp_path / "r.jsonl"
    common.write_jsonl(path, [dict(r, label=1) for r in recs])
    with pytest.raises(common.InputError, match="all .* train labels are 1.*--delta"):
        rm.main(["--data", str(path), "--out", str(tmp_path / "o")])
    common.write_jsonl(path, [dict(r, dialog_id="d0") for r in recs])
    with pytest.raises(common.InputError, match=">= 2 dialogues"):
        rm.main(["--data", str(path), "--out", str(tmp_path / "o")])
    common.write_jsonl(path, recs[:3] + [dict(recs[3], label="yes")])
    with pytest.raises(common.InputError, match="line 4: field 'label'"):
        rm.main(["--data", str(path), "--out", str(tmp_path / "o")])
    with pytest.raises(common.InputError, match="--resume: no checkpoint"):
        rm.main(["--data", str(toy["dir"] / "rollouts.jsonl"), "--out", str(tmp_path / "o"), "--resume"])
    assert not (tmp_path / "o").exists()
