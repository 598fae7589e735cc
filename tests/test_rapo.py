"""05_rapo.py: the top-K distillation loss against exact KLs, the EMA teacher, the teacher's token alignment,
GRM parsing and shuffling, equality with 04's update at --sd-coef 0, and the stage end to end."""
import json
import math
import random

import pytest
import torch

import backends
import common
import models
import training  # noqa: E402
from conftest import load_stage, run_script

rapo = load_stage("05_rapo")
grpo = load_stage("04_grpo")


def exact_reverse_kl(s, t, T=1.0):
    p, q = torch.log_softmax(s.double() / T, -1), torch.log_softmax(t.double() / T, -1)
    return (p.exp() * (p - q)).sum(-1)


def test_topk_kl_at_full_vocabulary_is_the_exact_kl_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(6, 40, requires_grad=True)
    t = torch.randn(6, 40)
    got = rapo.topk_reverse_kl(s, t, k=40, temperature=0.7)
    want = exact_reverse_kl(s, t, 0.7)
    assert torch.allclose(got.double(), want, atol=2e-6)
    g1, = torch.autograd.grad(got.sum(), s)
    g2, = torch.autograd.grad(want.sum(), s)
    assert torch.allclose(g1.double(), g2.double(), atol=1e-6)


def test_topk_kl_head_plus_tail_matches_a_naive_loop():
    torch.manual_seed(1)
    s, t, K, T = torch.randn(4, 30), torch.randn(4, 30), 5, 1.3
    got = rapo.topk_reverse_kl(s, t, k=K, temperature=T)
    for i in range(4):
        p = [math.exp(x) for x in torch.log_softmax(s[i].double() / T, -1).tolist()]
        q = [math.exp(x) for x in torch.log_softmax(t[i].double() / T, -1).tolist()]
        S = sorted(range(30), key=lambda j: -p[j])[:K]
        P, Q = 1 - sum(p[j] for j in S), 1 - sum(q[j] for j in S)
        naive = sum(p[j] * math.log(p[j] / q[j]) for j in S) + P * math.log(P / Q)
        assert math.isclose(got[i].item(), naive, rel_tol=1e-4, abs_tol=1e-6)
    assert (got >= -1e-6).all()  # a KL over K+1 buckets is never negative
    assert rapo.topk_reverse_kl(s, s, k=K).abs().max() < 1e-6  # zero when teacher == student


def test_sd_loss_importance_clip_and_mask():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = torch.tensor([[0.0, 2.0, 0.0], [0.1, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    res = rapo.sd_loss(s, t, logp, old, mask, k=20)
    kl = exact_reverse_kl(s, t)
    w = torch.tensor([[1.0, 2.0, 0.0], [math.exp(0.1), 0.0, 0.0]])  # exp(2) clipped at 2; masked tokens out
    assert math.isclose(res["loss"].item(), (w * kl).sum().item(), rel_tol=1e-5)
    assert math.isclose(res["kl"].item(), (kl * mask).sum().item(), rel_tol=1e-5) and res["n"] == 3
    # padded positions take no part, whatever their logits (the loss runs on every position, then masks)
    s2, t2 = s.clone().requires_grad_(), t.clone()
    s2.data[0, 2], t2[1, 1] = 1e4 * torch.randn(20), -1e4 * torch.rand(20)
    res2 = rapo.sd_loss(s2, t2, logp, old, mask, k=5)
    s1 = s.clone().requires_grad_()
    res1 = rapo.sd_loss(s1, t, logp, old, mask, k=5)
    res1["loss"].backward(), res2["loss"].backward()
    assert torch.allclose(res1["loss"], res2["loss"]) and torch.isfinite(s2.grad).all()
    assert torch.allclose(s1.grad * mask.unsqueeze(-1), s2.grad) and (s2.grad[mask == 0] == 0).all()


def test_ema_update_on_hand_values():
    t, s = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    rapo.ema_update(t, s, m=0.5)
    assert t[0].tolist() == [2.0, 0.0]
    rapo.ema_update(t, s, m=0.25)
    assert t[0].tolist() == [2.25, -0.5]


def test_shuffle_unshuffle_roundtrip_and_grm_scores_follow_candidates():
    rng = random.Random(3)
    items = ["a", "b", "c", "d"]
    shown, perm = rapo.shuffle_group(items, rng)
    assert rapo.unshuffle(shown, perm) == items

    class ScriptedGRM(backends.Backend):
        """Ranks candidates by reply length, whatever order they are shown in."""

        def generate(self, chats, n=1, prefill="", **kw):
            outs = []
            for c in chats:
                text = c[0]["content"].split("<Candidates>")[1]
                replies = [line.split("Supporter: ", 1)[1] for line in text.splitlines() if "Supporter: " in line]
                order = sorted(range(len(replies)), key=lambda i: -len(replies[i]))
                ans = {str(i): {"analysis": f"critique of {replies[i]}", "rank": order.index(i) + 1,
                                "score": round(1 - order.index(i) / 10, 2)} for i in range(len(replies))}
                outs.append([prefill + json.dumps(ans)[len(prefill):] if not prefill else json.dumps(ans)])
            return outs

    replies = [["short", "a much longer reply", "mid reply", "x"]]
    res, st = rapo.score_groups(ScriptedGRM(), "reaction", [[{"role": "user", "content": "hi"}]], replies,
                                [["r0", "r1", "r2", "r3"]], retries=0, max_new_tokens=64, seed=5)
    assert res[0]["scores"] == [0.8, 1.0, 0.9, 0.7]  # follows the candidates, not the shown positions
    assert res[0]["critiques"][1] == "critique of a much longer reply" and st["grm_failed"] == 0

    class Broken(backends.Backend):
        def generate(self, chats, n=1, **kw):
            return [['{"0": {"analysis": "x", "rank": 1, "score": 0.5}}'] for _ in chats]  # indices missing

    res, st = rapo.score_groups(Broken(), "rubric-group", [[{"role": "user", "content": "hi"}]], replies, None,
                                retries=2, max_new_tokens=64, seed=5)
    assert res == [None] and st["grm_failed"] == 1 and st["grm_retried"] == 2


def test_teacher_scores_the_students_token_ids(tiny_model_dir):
    """The teacher's logits line up with the student's completion tokens, with left padding in both."""
    model, tok = models.load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    ctx = [{"role": "user", "content": "I lost my job and I feel lost."}]
    p_short = grpo.prompt_ids(tok, ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, 512)
    t_ctx = rapo.teacher_context(ctx, "ok", "that did not help", "too short", "That sounds really hard.")
    assert t_ctx[0]["content"].startswith(ctx[0]["content"]) and "<Critic Feedback>" in t_ctx[0]["content"]
    assert ctx[0]["content"] == "I lost my job and I feel lost."  # the student's context is not modified
    p_teacher = grpo.prompt_ids(tok, t_ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, 2048)
    comp = tok("Question</strategy>How are you holding up?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    teacher = rapo.Teacher(model, "live", lora=False)
    # batch of two: a short prompt forces left padding on the longer completion's row
    logits = teacher.logits([p_teacher, p_short], [comp, comp[:3]], tok.pad_token_id, torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        full = model(torch.tensor([p_teacher + comp])).logits[0]
    # row 0, completion position j is predicted by the logits at prompt_len - 1 + j
    assert torch.allclose(logits[0, :len(comp)], full[len(p_teacher) - 1:len(p_teacher) - 1 + len(comp)], atol=1e-4)


def _fixed_batch(tok, G=4, B=2, seed=0):
    rng = random.Random(seed)
    prompts = [grpo.prompt_ids(tok, [{"role": "user", "content": f"message {i} about my worries"}], rapo.RAPO_SYSTEM,
                               rapo.PREFILL, 256) for i in range(B)]
    comps = [[rng.randrange(100, 2000) for _ in range(rng.randrange(3, 9))] for _ in range(B * G)]
    scores = torch.tensor([[rng.random() for _ in range(G)] for _ in range(B)])
    return prompts, comps, scores


def _lora_model(path, b_std=0.02):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tok = models.load_causal_lm(str(path), torch.device("cpu"), torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=training.LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, b_std)
    return model, tok, cfg


def test_sd_coef_zero_is_exactly_grpo_and_sd_changes_the_update(tiny_model_dir):
    G = 4
    grads = {}
    for name in ("grpo", "rapo0", "rapo"):
        model, tok, lcfg = _lora_model(tiny_model_dir, b_std=1.0)  # a policy far from the base: a visible KL
        prompts, comps, scores = _fixed_batch(tok, G)
        adv = grpo.group_advantages(scores).flatten()
        ro = grpo.Rollouts(prompts=[p for p in prompts for _ in range(G)], completions=comps, advantages=adv)
        cfg = grpo.LossConfig(pad_id=tok.pad_token_id, beta=0.0, micro_batch=3)
        extra = None
        if name != "grpo":
            teacher = rapo.Teacher(model, "base", True)
            distill = {g * G + int(scores[g].argmin()): prompts[1 - g] for g in range(2)}  # some other prompt as teacher's
            n_sd = float(sum(len(comps[i]) for i in distill))
            st = {"sd_loss": 0.0, "sd_kl": 0.0, "topk_mass": 0.0, "sd_tokens": 0.0}
            eta, l_sd = 0.0 if name == "rapo0" else 0.5, rapo.make_sd_loss(teacher, ro, distill, cfg, 50, 2.0, n_sd, st)
            extra = lambda mb, eta=eta, l_sd=l_sd: eta * l_sd(mb)  # noqa: E731 (05's Eq. 15 term)
        model.zero_grad()
        grpo.accumulate_gradients(model, ro, cfg, extra_loss=extra)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    # eta = 0 adds exact zeros; allow rounding only (CPU matmul kernels may sum in another order when buffers
    # sit at other addresses, which the extra allocations of the SD branch change): 1e-6 of the largest entry,
    # while the SD term itself moves the gradient by ~1e-4
    scale = grads["grpo"].abs().max()
    assert (grads["rapo0"] - grads["grpo"]).abs().max() <= 1e-6 * scale
    assert (grads["rapo"] - grads["grpo"]).abs().max() > 1e-5 * scale


def test_sd_loss_is_invariant_to_micro_batching(tiny_model_dir):
    G, out = 4, []
    for mb in (1, 3, 8):
        model, tok, lcfg = _lora_model(tiny_model_dir, b_std=1.0)
        prompts, comps, scores = _fixed_batch(tok, G)
        ro = grpo.Rollouts(prompts=[p for p in prompts for _ in range(G)], completions=comps,
                           advantages=torch.zeros(len(comps)))  # isolate the distillation term
        cfg = grpo.LossConfig(pad_id=tok.pad_token_id, beta=0.0, micro_batch=mb)
        teacher = rapo.Teacher(model, "base", True)
        distill = {1: prompts[1], 6: prompts[0]}
        st = {"sd_loss": 0.0, "sd_kl": 0.0, "topk_mass": 0.0, "sd_tokens": 0.0}
        extra = rapo.make_sd_loss(teacher, ro, distill, cfg, 30, 2.0, float(len(comps[1]) + len(comps[6])), st)  # eta = 1
        model.zero_grad()
        res = grpo.accumulate_gradients(model, ro, cfg, extra_loss=extra)
        out.append((res["extra"], torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    for v, g in out[1:]:
        assert out[0][0] > 1e-5 and math.isclose(v, out[0][0], rel_tol=1e-5)
        assert torch.allclose(g, out[0][1], rtol=1e-4, atol=1e-7)


def _run(args, nproc=1):
    return run_script("05_rapo.py", *args, nproc=nproc, timeout=600)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def fixed_groups(tiny_model_dir, tmp_path_factory):
    """Four groups of G=4 with scores, one failed group and teacher prompts for the worst candidates."""
    tok = models.load_tokenizer(str(tiny_model_dir))
    rng = random.Random(7)
    recs = []
    for g in range(4):
        ctx = [{"role": "user", "content": f"worry number {g}: " + "I cannot sleep. " * (g + 1)}]
        p = grpo.prompt_ids(tok, ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, 256)
        t_ctx = rapo.teacher_context(ctx, "ok", "not helpful", "generic", "That sounds exhausting.")
        recs.append({"prompt_ids": p, "completions": [[rng.randrange(100, 3000) for _ in range(rng.randrange(3, 8))]
                                                       for _ in range(4)],
                     "scores": None if g == 2 else [rng.random() for _ in range(4)],
                     "teacher_prompt_ids": grpo.prompt_ids(tok, t_ctx, rapo.RAPO_SYSTEM, rapo.PREFILL, 512)})
    path = tmp_path_factory.mktemp("fixed") / "groups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _fixed_args(tiny_model_dir, groups, out, *extra):
    return ["--policy", f"hf:{tiny_model_dir}", "--rollouts-file", str(groups), "--out", str(out), "--prompts-per-step", "4",
            "--max-steps", "2", "--lr", "1e-2", "--micro-batch", "3", "--sd-coef", "0.5", "--sd-topk", "32",
            "--lora-r", "4", *extra]


def test_two_rank_gloo_equals_one_process(tiny_model_dir, fixed_groups, tmp_path):
    # lr 1e-3 (as in test_grpo's 2-rank test): Adam turns rounding-level gradient differences (another summation
    # order over ranks) into weight differences proportional to lr, which reached 1e-6 at lr 1e-2 with
    # transformers 5.19; a wrong gradient would differ by O(lr) = 1e-3
    _run(_fixed_args(tiny_model_dir, fixed_groups, tmp_path / "one", "--lr", "1e-3"))
    _run(_fixed_args(tiny_model_dir, fixed_groups, tmp_path / "two", "--lr", "1e-3"), nproc=2)
    a, b = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["sd_kl"], 5) for r in m1] == [round(r["sd_kl"], 5) for r in m2]
    assert m1[0]["grm_failed_frac"] == 0.25 and m1[0]["sd_tokens"] > 0
    teacher = _adapter(tmp_path / "one" / "adapter" / "teacher")  # the EMA teacher is saved beside the policy
    assert any(not torch.equal(teacher[k], a[k]) for k in a)


def test_resume_equals_uninterrupted(tiny_model_dir, fixed_groups, tmp_path):
    _run(_fixed_args(tiny_model_dir, fixed_groups, tmp_path / "full", "--max-steps", "3"))
    _run(_fixed_args(tiny_model_dir, fixed_groups, tmp_path / "part", "--max-steps", "3", "--stop-after", "1"))
    _run(["--out", str(tmp_path / "part"), "--resume"])  # the run's own settings (--max-steps 3 included)
    ck = tmp_path / "part" / "checkpoint"  # the teacher's EMA state is inside the atomic checkpoint
    assert (ck / "extra.pt").exists() and not (ck / "teacher.pt").exists()
    a, b = _adapter(tmp_path / "full" / "adapter"), _adapter(tmp_path / "part" / "adapter")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k
    ta, tb = _adapter(tmp_path / "full" / "adapter" / "teacher"), _adapter(tmp_path / "part" / "adapter" / "teacher")
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-7), k
    ma = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-9) and math.isclose(x["sd_kl"], y["sd_kl"], rel_tol=1e-5)


def test_end_to_end_with_roles_and_bad_input(tiny_model_dir, tmp_path, demo_data):
    sel = tmp_path / "sel"
    run_script("01_select.py", "--data", demo_data, "--out", sel, "--judge", "none", "--max-examples", "3")
    tiny = f"hf:{tiny_model_dir}"
    _run(["--data", str(sel / "turns.jsonl"), "--out", str(tmp_path / "r"), "--policy", tiny, "--seeker", tiny, "--grm", tiny,
          "--prompts-per-step", "2", "--max-steps", "1", "--max-new-tokens", "6", "--grm-max-new-tokens", "12",
          "--seeker-max-new-tokens", "6", "--grm-retries", "1", "--reward", "rubric-point"])
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"grm_failed_frac", "grm_retries", "sd_kl", "entropy", "reward"} <= row.keys()
    sample = json.loads((tmp_path / "r" / "samples.jsonl").read_text().splitlines()[0])
    assert all(c.startswith("<strategy>") for c in sample["completions"])
    r = run_script("05_rapo.py", "--out", tmp_path / "bad", "--group-size", "1", check=False)
    assert r.returncode == 2 and "--group-size" in r.stderr and not (tmp_path / "bad").exists()


def test_format_reply_trains_the_plain_reply_under_the_esc_prompt(tiny_model_dir, tmp_path, demo_data):
    """--format reply: the ESC system prompt of 06, no <strategy> prefill; the scripted GRM scores every group and
    the worst candidate is distilled."""
    sel = tmp_path / "sel"
    run_script("01_select.py", "--data", demo_data, "--out", sel, "--judge", "none", "--max-examples", "3")
    _run(["--data", str(sel / "turns.jsonl"), "--out", str(tmp_path / "r"), "--policy", f"hf:{tiny_model_dir}",
          "--seeker", "scripted", "--grm", "scripted", "--all-turns", "--format", "reply", "--prompts-per-step", "2",
          "--max-steps", "1", "--max-new-tokens", "6", "--grm-retries", "0"])
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["format"] == "reply" and saved["system_prompt"] == common.ESC_SYSTEM and saved["prefill"] == ""
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grm_failed_frac"] == 0 and row["sd_tokens"] > 0
    sample = json.loads((tmp_path / "r" / "samples.jsonl").read_text().splitlines()[0])
    assert not any(c.startswith("<strategy>") for c in sample["completions"])
    assert sample["replies"] == [common.strip_reasoning(c) for c in sample["completions"]]
