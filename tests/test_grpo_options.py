"""Tests of 04_grpo.py's optional GRPO knobs against independent computations: the rollout correction's IS
weights and masks (--rollout-is, --rollout-mask), GSPO's sequence ratio (--is-level sequence), the reward scaling
modes (--scale-rewards, --reward-combine), masking truncated completions (--mask-truncated), DAPO's dynamic
sampling (--dynamic-sampling) and the held-out evaluation (--eval-every), with their resume."""
import argparse
import math

import numpy as np
import pytest
import torch

from conftest import load_stage, run_in_process

g = load_stage("04_grpo")
import common  # noqa: E402

from test_grpo import adapter_tensors, assert_same_adapter, assert_same_metrics, fixed_rollouts, lora_model  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# rollout correction: truncated IS weights and masks


def test_rollout_correction_weights_and_masks_by_hand():
    old = [torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.log(torch.tensor([0.3, 0.6]))]
    eng = [[math.log(0.25), math.log(0.2), math.log(0.3)], [math.log(0.3), math.log(0.1)]]
    # token ratios pi_old / pi_engine: [2, 1, 3] and [1, 6]
    w, keep = g.rollout_correction(old, eng, "token", 2.5, "token", (0.5, 2.0))
    assert torch.allclose(w[0], torch.tensor([2.0, 1.0, 2.5])) and torch.allclose(w[1], torch.tensor([1.0, 2.5]))
    assert keep[0].tolist() == [1.0, 1.0, 0.0] and keep[1].tolist() == [1.0, 0.0]
    # sequence: the product of the ratios (6 and 6), capped; the mask by their geometric mean (6^(1/3), 6^(1/2))
    w, keep = g.rollout_correction(old, eng, "sequence", 10.0, "sequence", (0.5, 2.0))
    assert torch.allclose(w[0], torch.full((3,), 6.0)) and torch.allclose(w[1], torch.full((2,), 6.0))
    assert keep[0].tolist() == [1.0] * 3 and keep[1].tolist() == [0.0] * 2  # 1.82 inside, 2.45 outside
    w, _ = g.rollout_correction(old, eng, "sequence", 2.0, "none", (0.5, 2.0))
    assert torch.allclose(w[1], torch.full((2,), 2.0))
    # no gap: every weight 1, every token kept
    same = [x.tolist() for x in old]
    for mode in ("token", "sequence"):
        w, keep = g.rollout_correction(old, same, mode, 2.0, mode, (0.9, 1.1))
        assert all(torch.equal(x, torch.ones_like(x)) for x in w + keep)


def test_unit_is_weights_leave_the_loss_unchanged_and_weights_scale_only_the_surrogate():
    torch.manual_seed(0)
    logp = -torch.rand(3, 5) * 2
    old, ref = logp + 0.3 * torch.randn(3, 5), logp + 0.2 * torch.randn(3, 5)
    adv = torch.tensor([1.0, -0.5, 2.0])
    plain = g.grpo_token_loss(logp, old, ref, adv, 0.2, 0.28, 0.1)
    assert torch.equal(g.grpo_token_loss(logp, old, ref, adv, 0.2, 0.28, 0.1, is_weight=torch.ones(3, 5)), plain)
    w = torch.rand(3, 5) * 2
    rho = np.exp((logp - old).numpy())
    a = adv.numpy()[:, None]
    d = (ref - logp).numpy()
    want = -w.numpy() * np.minimum(rho * a, np.clip(rho, 0.8, 1.28) * a) + 0.1 * (np.exp(d) - d - 1)
    got = g.grpo_token_loss(logp, old, ref, adv, 0.2, 0.28, 0.1, is_weight=w)
    assert np.allclose(got.numpy(), want, atol=1e-6)


def test_loss_masks_defaults_do_nothing():
    ro = g.Rollouts([[1]], [[5, 6]], torch.zeros(1))
    args = argparse.Namespace(mask_truncated=False, rollout_is="none", rollout_mask="none", max_new_tokens=2)
    called = []
    assert g.loss_masks(ro, args, {2}, None, lambda: called.append(1)) == {}
    assert ro.keep is None and ro.is_weight is None and not called  # no log-probs asked for


# ----------------------------------------------------------------------------------------------------
# GSPO


def test_gspo_ratio_and_clipping_against_numpy():
    torch.manual_seed(1)
    N, T = 4, 6
    lens = [6, 3, 4, 1]
    mask = torch.zeros(N, T)
    for i, L in enumerate(lens):
        mask[i, :L] = 1
    base = -torch.rand(N, T) * 2
    old = base + torch.tensor([0.0, 0.1, -0.001, 0.0002])[:, None] + 0.01 * torch.randn(N, T)
    adv = torch.tensor([1.0, -1.0, 1.5, -0.5])
    eps_low, eps_high = 3e-4, 4e-4
    lp = base.clone().requires_grad_(True)
    tok = g.grpo_token_loss(lp, old, None, adv, eps_low, eps_high, 0.0, is_level="sequence", mask=mask)
    loss = g.aggregate(tok, mask, "seq-mean-token-mean", float(sum(lens)), float(N), T)
    loss.backward()
    # numpy: s_i = exp(mean_t (logp - logp_old)); L = (1/N) sum_i -min(s_i A_i, clip(s_i) A_i);
    # dL/dlogp_it = -(A_i s_i / |y_i|) / N where the unclipped term is the minimum, else 0
    b, o, m = base.double().numpy(), old.double().numpy(), mask.numpy()
    s = np.exp(((b - o) * m).sum(1) / m.sum(1))
    a = adv.double().numpy()
    unclipped, clipped = s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a
    want = np.mean(-np.minimum(unclipped, clipped))
    grad = np.where((unclipped <= clipped)[:, None], -(a * s / m.sum(1))[:, None] / N, 0.0) * m
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert np.allclose(lp.grad.numpy(), grad, atol=1e-6)
    assert (unclipped > clipped).any() and (unclipped <= clipped).any(), "both branches must be exercised"
    assert not torch.allclose(g.grpo_token_loss(base, old, None, adv, 0.2, 0.28, 0.0), tok.detach())  # not per token


def test_grpo_loss_clips_the_sequence_ratio_with_its_own_range():
    """--is-level sequence: rho_i = exp(0.01) = 1.01 is outside GSPO's [1 - 3e-4, 1 + 4e-4] (no gradient for A > 0)
    but inside the token clip range [0.8, 1.28] (a gradient)."""
    old = torch.full((1, 3), -1.01)
    grads = {}
    for level in ("sequence", "token"):
        lp = torch.full((1, 3), -1.0, requires_grad=True)
        mb = g.MicroBatch([0], lp, torch.zeros(1, 3, 5), torch.ones(1, 3), old, None, torch.tensor([1.0]), 3.0, 1.0)
        g.grpo_loss(mb, g.LossConfig(pad_id=0, beta=0.0, is_level=level)).backward()
        grads[level] = lp.grad
    assert torch.equal(grads["sequence"], torch.zeros(1, 3))
    assert torch.allclose(grads["token"], torch.full((1, 3), -math.exp(0.01) / 3))


def test_gspo_on_policy_gradient_equals_token_level():
    """rho_i = 1 on-policy (logp_old = logp.detach()): the sequence ratio's gradient with seq-mean-token-mean is the
    token ratio's (the GSPO paper's remark), so --is-level only matters off-policy."""
    torch.manual_seed(2)
    base, mask = -torch.rand(3, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).float()
    adv = torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for level in ("token", "sequence"):
        lp = base.clone().requires_grad_(True)
        g.aggregate(g.grpo_token_loss(lp, lp.detach(), None, adv, 0.2, 0.28, 0.0, is_level=level, mask=mask), mask,
                    "seq-mean-token-mean", 8.0, 3.0, 4).backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# reward scaling


R = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])


def test_scale_rewards_modes_on_a_small_matrix():
    r = R.double().numpy()
    centred = r - r.mean(1, keepdims=True)
    eps = 1e-4
    want = {"group": centred / (r.std(1, ddof=1, keepdims=True) + eps), "batch": centred / (r.std(ddof=1) + eps),
            "none": centred}
    for mode, w in want.items():
        assert np.allclose(g.group_advantages(R, mode, eps).numpy(), w, atol=1e-6), mode
        assert np.allclose(g.advantages(R, {"r": R}, {"r": 1.0}, mode, "sum", eps).numpy(), w, atol=1e-6), mode
    assert torch.equal(g.group_advantages(R, "std", eps), g.group_advantages(R, "group", eps))  # the old name


def test_gdpo_normalises_each_part_then_sums():
    fut = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.1, 0.1, 0.3, 0.3]])
    fmt = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = {"fut": 1.0, "fmt": 0.5}
    eps = 1e-4

    def grp(x):
        return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + eps)

    f, m = fut.double().numpy(), fmt.double().numpy()
    a_sum = grp(f) + 0.5 * grp(m)
    want = (a_sum - a_sum.mean()) / (a_sum.std(ddof=1) + eps)
    total = fut + 0.5 * fmt
    got = g.advantages(total, {"fut": fut, "fmt": fmt}, w, "group", "gdpo", eps)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    summed = g.advantages(total, {"fut": fut, "fmt": fmt}, w, "group", "sum", eps)
    assert not torch.allclose(got, summed, atol=1e-3)  # the two orders differ on this matrix


# ----------------------------------------------------------------------------------------------------
# truncated completions


def test_truncated_completions_contribute_no_gradient(tiny_model_dir):
    """--mask-truncated: the gradient equals that of the batch without the truncated completions (same advantages)."""
    model, tok = lora_model(tiny_model_dir)
    prompts, comps, rewards = fixed_rollouts(seed=4, n_groups=3, G=4)
    eos, cap = tok.eos_token_id, 6
    comps = [c[:cap] if len(c) >= cap else c[:-1] + [eos] for c in comps]  # ends in EOS or is cut at the cap
    comps[1], comps[6] = (comps[1] * cap)[:cap], (comps[6] * cap)[:cap]
    comps[1][-1] = comps[6][-1] = 7  # two completions at the cap without EOS
    cut = g.truncated(comps, {eos}, cap)
    assert sum(cut) >= 2 and not all(cut)
    adv = g.group_advantages(rewards).flatten()
    cfg = g.LossConfig(pad_id=tok.pad_token_id, beta=0.1, micro_batch=5)
    with model.disable_adapter():
        ref = g.sequence_logps(model, g.Rollouts(prompts, comps, adv), cfg)

    def grads(ro):
        model.zero_grad(set_to_none=True)
        st = g.accumulate_gradients(model, ro, cfg)
        return st, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ro = g.Rollouts(prompts, comps, adv, logp_ref=ref)
    args = argparse.Namespace(mask_truncated=True, rollout_is="none", rollout_mask="none", max_new_tokens=cap)
    g.loss_masks(ro, args, {eos}, None, None)
    st, got = grads(ro)
    kept = [i for i in range(len(comps)) if not cut[i]]
    sub = g.Rollouts([prompts[i] for i in kept], [comps[i] for i in kept], adv[kept], logp_ref=[ref[i] for i in kept])
    st_sub, want = grads(sub)
    assert st["n_tokens"] == sum(len(comps[i]) for i in kept) and st["n_seqs"] == len(kept)  # the denominators
    assert st["loss"] == pytest.approx(st_sub["loss"], rel=1e-5)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-7, rtol=1e-5), n
    assert any(v.abs().sum() > 0 for v in want.values())


# ----------------------------------------------------------------------------------------------------
# dynamic sampling


def test_dynamic_sampling_batch_and_counts_by_hand():
    """Draws of 3 groups with hand-set rewards; the step needs 3 groups whose rewards differ."""
    draws = {5: [[1, 1], [0, 1], [2, 2]], 6: [[0, 0], [3, 3], [1, 0]], 7: [[4, 5], [0, 2], [1, 1]]}
    seen = []

    def draw(k):
        seen.append(k)
        return [{"name": f"{k}.{b}", "rw": {"total": r}} for b, r in enumerate(draws[k])]

    groups, st = g.dynamic_sampling(draw, 5, 3, 10, common.Dist())
    assert seen == [5, 6, 7]
    assert [x["name"] for x in groups] == ["5.1", "6.2", "7.0"]  # the first three that differ, in draw order
    assert st == {"dynamic_draws": 3, "dynamic_groups_drawn": 9, "dynamic_groups_dropped": 5, "dynamic_groups_filled": 0}
    # (7.1 differs too but is not needed: drawn 9 = 3 used + 5 zero-spread dropped + 1 surplus)
    # at the cap: the kept ones, then the last dropped ones fill the step
    seen.clear()
    groups, st = g.dynamic_sampling(draw, 5, 3, 2, common.Dist())
    assert seen == [5, 6] and [x["name"] for x in groups] == ["5.1", "6.2", "6.1"]
    assert st == {"dynamic_draws": 2, "dynamic_groups_drawn": 6, "dynamic_groups_dropped": 3, "dynamic_groups_filled": 1}


def test_dynamic_sampling_denominators_by_hand(tiny_model_dir):
    """The step's global token and sequence counts are those of the kept groups only."""
    model, tok = lora_model(tiny_model_dir)
    prompts, comps, rewards = fixed_rollouts(seed=5, n_groups=4, G=2)
    rewards[1] = rewards[3] = 0.5  # two zero-spread groups

    def draw(k):
        return [{"prompt_ids": prompts[2 * b], "completions": comps[2 * b:2 * b + 2], "rw": {"total": rewards[b].tolist()}}
                for b in range(4)]

    groups, st = g.dynamic_sampling(draw, 0, 2, 4, common.Dist())
    assert st["dynamic_groups_dropped"] == 2 and [grp["prompt_ids"] for grp in groups] == [prompts[0], prompts[4]]
    r = torch.tensor([grp["rw"]["total"] for grp in groups])
    ro = g.Rollouts([grp["prompt_ids"] for grp in groups for _ in range(2)], [c for grp in groups for c in grp["completions"]],
                    g.group_advantages(r).flatten())
    out = g.accumulate_gradients(model, ro, g.LossConfig(pad_id=tok.pad_token_id, beta=0.0))
    assert out["n_tokens"] == len(comps[0]) + len(comps[1]) + len(comps[4]) + len(comps[5]) and out["n_seqs"] == 4


# ----------------------------------------------------------------------------------------------------
# end to end: dynamic sampling + held-out evaluation + truncation mask, and their resume


@pytest.fixture(scope="module")
def split_turns(tmp_path_factory):
    path = tmp_path_factory.mktemp("turns") / "turns.jsonl"
    recs = []
    for i in range(12):
        split = "train" if i < 9 else "valid"
        recs.append({"id": f"d{i}-t01", "dialog_id": f"d{i}", "turn": 1, "split": split,
                     "context": [{"role": "user", "content": f"I feel worried about thing number {i}."}],
                     "target": "That sounds hard.", "learn": True})
    common.write_jsonl(path, recs)
    return path


def run_stage(args, check=True):
    return run_in_process("04_grpo.py", *args, check=check)


def test_dynamic_sampling_and_eval_resume_equal_uninterrupted(eos_model_dir, split_turns, tmp_path):
    args = ["--policy", f"hf:{eos_model_dir}", "--data", str(split_turns), "--prompts-per-step", "2", "--group-size", "3",
            "--max-new-tokens", "8", "--l-max", "8", "--l-cache", "6", "--max-steps", "4", "--checkpoint-every", "2",
            "--lr", "5e-2", "--lora-r", "4", "--lora-alpha", "8", "--device", "cpu", "--dynamic-sampling", "--max-draws", "3",
            "--mask-truncated", "--eval-every", "2", "--eval-size", "3", "--is-level", "sequence", "--loss-agg",
            "seq-mean-token-mean", "--scale-rewards", "batch"]
    run_stage([*args, "--out", str(tmp_path / "full")])
    run_stage([*args, "--out", str(tmp_path / "cut"), "--stop-after", "2"])
    run_stage(["--out", str(tmp_path / "cut"), "--resume"])
    mf = common.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    mc = common.read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert_same_metrics(mf, mc)
    keys = ["dynamic_draws", "dynamic_groups_dropped", "data_position", "eval_reward", "eval_reward_len",
            "eval_completion_len_mean"]
    for x, y in zip(mf, mc):
        for k in keys:
            assert (k in x) == (k in y) and x.get(k) == pytest.approx(y.get(k), rel=1e-6, abs=1e-9), (x["step"], k)
    assert [m["step"] for m in mf if "eval_reward" in m] == [2, 4]  # every --eval-every 2 steps, not in between
    assert sum(m["dynamic_groups_dropped"] for m in mf) > 0, "zero-spread groups must have been replaced"
    assert mf[-1]["data_position"] > 4  # more prompt batches drawn than steps
    assert all(m["zero_std_frac"] == 0 for m in mf if m["dynamic_groups_filled"] == 0)
    assert_same_adapter(tmp_path / "full" / "adapter", tmp_path / "cut" / "adapter", atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in adapter_tensors(tmp_path / "full" / "adapter").items() if "lora_B" in k)
    # the evaluation does not touch the training's random stream: without it, the same training numbers
    run_stage([*args[:args.index("--eval-every")], *args[args.index("--eval-size") + 2:], "--out", str(tmp_path / "noeval")])
    assert_same_metrics(mf, common.read_jsonl(tmp_path / "noeval" / "metrics.jsonl"))
    # --eval-every may change on --resume (it is in RESUME_MAY_CHANGE); a training knob may not
    r = run_stage(["--out", tmp_path / "cut", "--resume", "--is-level", "token"], check=False)
    assert r.returncode == 2 and "--is-level token differs from the run's sequence" in r.stderr, r.stderr


@pytest.mark.parametrize("bad,msg", [
    (["--rollout-is", "token"], "need --rollout vllm"),
    (["--rollout-mask", "sequence", "--rollout", "vllm", "--top-p", "0.9"], "--top-p 1"),
    (["--rollout-mask-band", "1.5", "2"], "--rollout-mask-band"),
    (["--eval-every", "2", "--eval-split", "nosuchsplit"], "for --eval-every"),
    (["--max-draws", "0"], "--max-draws"),
])
def test_bad_option_is_one_clear_error(bad, msg, split_turns, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: g.main(["--out", str(out), "--data", str(split_turns), *bad]))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_every_new_flag_names_its_source():
    p = argparse.ArgumentParser()
    import training

    training.add_grpo_args(p, out="x", temperature=1.0, learn_only=False, d=g.LossConfig(pad_id=0))
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    sources = {"--scale-rewards": "TRL", "--reward-combine": "GDPO", "--is-level": "GSPO", "--seq-eps-low": "GSPO",
               "--seq-eps-high": "GSPO", "--mask-truncated": "DAPO", "--rollout-is": "verl", "--rollout-mask": "verl",
               "--eval-every": "TRL"}
    for flag, src in sources.items():
        assert src in helps[flag], flag
    for stage in ("04_grpo.py", "05_rapo.py"):  # (05: its own draws, through 04's dynamic_sampling)
        h = " ".join(run_in_process(stage, "--help").stdout.split())
        assert "--dynamic-sampling" in h and "DAPO's dynamic sampling" in h and "verl max_num_gen_batches" in h, stage


def test_rapo_eval_every_and_options(tiny_model_dir, split_turns, tmp_path):
    """05 takes the same knobs (its update is 04's) and logs its held-out reward: the --grm model's rubric score of
    each reply alone (the scripted judge here) plus R_len, at the --eval-every steps."""
    run_in_process("05_rapo.py", "--data", split_turns, "--out", tmp_path / "r", "--policy", f"hf:{tiny_model_dir}",
               "--seeker", "scripted", "--grm", "scripted", "--all-turns", "--format", "reply", "--prompts-per-step", "2",
               "--group-size", "2", "--max-steps", "2", "--max-new-tokens", "6", "--grm-retries", "0", "--eval-every", "2",
               "--eval-size", "2", "--mask-truncated", "--scale-rewards", "batch", "--reward-combine", "gdpo",
               "--is-level", "sequence")
    rows = common.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "eval_reward" not in rows[0]
    ev = rows[1]
    assert ev["eval_grm_failed_frac"] == 0 and 0 <= ev["eval_reward_score"] <= 1
    assert ev["eval_reward"] == pytest.approx(ev["eval_reward_score"] + ev["eval_reward_len"])
