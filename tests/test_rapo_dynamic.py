"""05_rapo.py --dynamic-sampling (DAPO, through 04's dynamic_sampling): a draw is a batch of prompts with their
candidates, the seeker's reactions and the GRM's rewards. The scripted seeker and GRM of envs/esc.py play the roles,
except that the GRM answers no JSON for a prompt whose context carries MARK: that group fails (r = 0 for every
candidate, zero spread). One run of two steps (in process) is checked by hand: which groups the update and the
distillation got, the draws and the logged counts; an interrupted and resumed run equals it."""
import re

import numpy as np
import pytest

import backends
import common
import models
from conftest import load_stage, run_in_process
from test_grpo import assert_same_adapter, assert_same_metrics

rapo = load_stage("05_rapo")
MARK = "ZEBRA"
SEED, G = 0, 2

# Epoch 0's prompt order (training.step_batch: a permutation seeded by (--seed, 0)) of the 8 turns, 2 per draw;
# the marked positions: draw 0 = [marked, plain], draw 1 = [plain, plain], draw 2 = [marked, marked],
# draw 3 = [marked, plain]
ORDER = np.random.default_rng([SEED, 0]).permutation(8).tolist()
MARKED = {ORDER[0], ORDER[4], ORDER[5], ORDER[6]}


class FailingGRM(backends.ScriptedBackend):
    """The scripted roles; the GRM's answer for a group whose context carries MARK is no JSON (a failed group)."""

    def generate(self, chats, **kw):
        out = super().generate(chats, **kw)
        return [[kw.get("prefill", "") + "no answer"] * len(o)
                if "<Candidates>" in c[-1]["content"] and MARK in c[-1]["content"] else o for c, o in zip(chats, out)]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The full run (2 steps, --max-draws 2) with every step's rollouts and distillation rows captured, and the
    same run stopped after step 1 and resumed."""
    tmp = tmp_path_factory.mktemp("rapo_dynamic")
    turns = tmp / "turns.jsonl"
    common.write_jsonl(turns, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "turn": 1, "split": "train", "learn": True,
                                "context": [{"role": "user", "content": f"I feel worried about thing number {i}."
                                             + (f" {MARK}" if i in MARKED else "")}], "target": "That sounds hard."}
                               for i in range(8)])
    args = ["--policy", f"hf:{tiny_model_dir}", "--data", turns, "--seeker", "scripted", "--grm", "scripted",
            "--format", "reply", "--prompts-per-step", "2", "--group-size", G, "--max-new-tokens", "6", "--grm-retries",
            "0", "--max-steps", "2", "--dynamic-sampling", "--max-draws", "2", "--lr", "5e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--sd-coef", "0.5", "--sd-topk", "16", "--seed", SEED, "--device", "cpu"]
    seen, make_sd_loss = [], rapo.make_sd_loss

    def spy(teacher, ro, distill, *a):
        seen.append((ro, distill))
        return make_sd_loss(teacher, ro, distill, *a)

    grm = FailingGRM()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "make_backend", lambda *a, **kw: grm)
        mp.setattr(rapo, "make_sd_loss", spy)
        run_in_process(rapo, *args, "--out", tmp / "full")
        full = list(seen)
        run_in_process(rapo, *args, "--out", tmp / "cut", "--stop-after", "1")
        run_in_process(rapo, "--out", tmp / "cut", "--resume")
    return {"dir": tmp, "seen": full, "tok": models.load_tokenizer(str(tiny_model_dir))}


def turn_of(tok, ids) -> int:
    return int(re.search(r"thing number (\d+)", tok.decode(ids)).group(1))


def test_dynamic_sampling_step_by_hand(runs):
    tok, rows = runs["tok"], common.read_jsonl(runs["dir"] / "full" / "metrics.jsonl")
    # step 1: draw 0 keeps ORDER[1] (ORDER[0] fails), draw 1 gives ORDER[2] (ORDER[3] is not needed)
    # step 2: draws 2 and 3 (the cap) keep only ORDER[7]; the last dropped group (ORDER[6], A = 0) fills the step
    want = [[ORDER[1], ORDER[2]], [ORDER[7], ORDER[6]]]
    counts = [{"dynamic_draws": 2, "dynamic_groups_drawn": 4, "dynamic_groups_dropped": 1, "dynamic_groups_filled": 0,
               "data_position": 2},
              {"dynamic_draws": 2, "dynamic_groups_drawn": 4, "dynamic_groups_dropped": 2, "dynamic_groups_filled": 1,
               "data_position": 4}]
    assert len(runs["seen"]) == 2
    for s, ((ro, distill), row) in enumerate(zip(runs["seen"], rows)):
        assert [turn_of(tok, p) for p in ro.prompts[::G]] == want[s], s  # the update's groups, in order
        assert all(ro.prompts[g * G:(g + 1) * G] == [ro.prompts[g * G]] * G for g in range(2))
        assert {k: row[k] for k in counts[s]} == counts[s], s
        # the GRM counts are over every group drawn: 1 of 4 failed, then 3 of 4
        assert row["grm_failed_frac"] == [0.25, 0.75][s]
        # the teacher's targets follow the kept groups: one per valid kept group, on its own prompt
        assert sorted(i // G for i in distill) == [[0, 1], [0]][s], s
        for i, t_ids in distill.items():
            text = tok.decode(t_ids)
            assert turn_of(tok, t_ids) == want[s][i // G] and "Hindsight feedback" in text and MARK not in text
        assert row["sd_tokens"] == sum(len(ro.completions[i]) for i in distill)
    assert rows[0]["zero_std_frac"] == 0 and rows[1]["zero_std_frac"] == 0.5  # the filled group has A = 0
    assert (runs["seen"][1][0].advantages[G:] == 0).all()


def test_dynamic_sampling_resume_equals_uninterrupted(runs):
    full, cut = runs["dir"] / "full", runs["dir"] / "cut"
    mf, mc = common.read_jsonl(full / "metrics.jsonl"), common.read_jsonl(cut / "metrics.jsonl")
    assert_same_metrics(mf, mc)
    for x, y in zip(mf, mc):
        for k in ("dynamic_draws", "dynamic_groups_drawn", "dynamic_groups_dropped", "dynamic_groups_filled",
                  "data_position", "grm_failed_frac", "sd_tokens"):
            assert x[k] == y[k], (x["step"], k)
        assert y["sd_kl"] == pytest.approx(x["sd_kl"], rel=1e-5)
    assert_same_adapter(full / "adapter", cut / "adapter", atol=1e-7)
    assert_same_adapter(full / "adapter" / "teacher", cut / "adapter" / "teacher", atol=1e-7)
