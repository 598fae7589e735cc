"""Tests of 04_grpo.py: the pure functions against naive loops and hand values, micro-batch invariance,
a 2-rank gloo torchrun update against a 1-process update, exact resume, and learning a toy reward."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_stage, run_script

g = load_stage("04_grpo")
import common  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402
import training  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------------------------------
# pure functions


def test_group_advantages_hand_cases():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    a = g.group_advantages(r, "std", eps=1e-4)
    # group 0: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    assert torch.allclose(a[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4))  # ties: zero advantage, no division blow-up
    # group 2: mean 2, unbiased std sqrt(2 / 3)
    assert torch.allclose(a[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (math.sqrt(2 / 3) + 1e-4), atol=1e-6)
    n = g.group_advantages(r, "none")
    assert torch.allclose(n[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert torch.equal(n[1], torch.zeros(4))


def test_k3_kl_zero_at_identity_positive_otherwise():
    lp = torch.log(torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(g.k3_kl(lp, lp), torch.zeros(3))
    other = torch.log(torch.tensor([0.2, 0.4, 0.3]))
    kl = g.k3_kl(lp, other)
    assert (kl > 0).all()
    d = other - lp
    assert torch.allclose(kl, torch.exp(d) - d - 1)


def test_overlong_penalty_three_regions():
    assert g.overlong_penalty(50, 200, 80) == 0.0
    assert g.overlong_penalty(120, 200, 80) == 0.0  # edge of the free region
    assert g.overlong_penalty(160, 200, 80) == pytest.approx(-0.5)  # (120 - 160) / 80
    assert g.overlong_penalty(200, 200, 80) == pytest.approx(-1.0)
    assert g.overlong_penalty(201, 200, 80) == -1.0
    assert g.overlong_penalty(5000, 200, 80) == -1.0


def test_format_reward_cases():
    assert g.format_reward("<think>they are sad</think>I hear you.") == 1.0
    assert g.format_reward("  <think>\nhmm\n</think>\n\nThat sounds hard.") == 1.0
    assert g.format_reward("<think>no reply</think>   ") == 0.0
    assert g.format_reward("<think></think>Reply") == 0.0  # empty thinking does not count
    assert g.format_reward("<think>never closed, I hear you") == 0.0
    assert g.format_reward("I hear you.") == 0.0
    assert g.format_reward("<think>a</think>b<think>c</think>d") == 0.0
    assert g.format_reward("Sure. <think>a</think>b") == 0.0  # must start with the thinking block


def naive_loss(logp, logp_old, logp_ref, adv, lens, eps_low, eps_high, beta, mode, l_gen):
    """Independent per-token loop (Python floats for the structure, autograd for the gradient)."""
    total = 0.0
    n_tok = sum(lens)
    for i, L in enumerate(lens):
        seq = 0.0
        for t in range(L):
            rho = torch.exp(logp[i, t] - logp_old[i, t])
            unclipped = rho * adv[i]
            clipped = min(max(rho, torch.tensor(1 - eps_low)), torch.tensor(1 + eps_high)) * adv[i]
            lt = -torch.minimum(unclipped, clipped)
            d = logp_ref[i, t] - logp[i, t]
            lt = lt + beta * (torch.exp(d) - d - 1)
            seq = seq + lt
        if mode == "token-mean":
            total = total + seq / n_tok
        elif mode == "seq-mean-token-mean":
            total = total + seq / L / len(lens)
        else:
            total = total + seq / (len(lens) * l_gen)
    return total


@pytest.mark.parametrize("mode", AGG_MODES)
def test_loss_and_gradient_match_naive_loop(mode):
    torch.manual_seed(0)
    N, T, l_gen = 5, 7, 9
    lens = [7, 3, 5, 1, 6]
    mask = torch.zeros(N, T)
    for i, L in enumerate(lens):
        mask[i, :L] = 1
    base = -torch.rand(N, T) * 3
    logp_old = base + 0.3 * torch.randn(N, T)  # rho != 1, some tokens outside the clip range
    logp_ref = base + 0.2 * torch.randn(N, T)
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.5])
    lp1 = base.clone().requires_grad_(True)
    loss = g.aggregate(g.grpo_token_loss(lp1, logp_old, logp_ref, adv, 0.2, 0.28, 0.05), mask, mode,
                       float(sum(lens)), float(N), l_gen)
    loss.backward()
    lp2 = base.clone().requires_grad_(True)
    ref = naive_loss(lp2, logp_old, logp_ref, adv, lens, 0.2, 0.28, 0.05, mode, l_gen)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(lp1.grad, lp2.grad, atol=1e-6)
    rho = torch.exp(base - logp_old)
    clipped = ((rho > 1.28) & (adv[:, None] > 0)) | ((rho < 0.8) & (adv[:, None] < 0))
    assert (clipped & (mask > 0)).any(), "the test must exercise the clipped branch"
    assert (lp1.grad[mask == 0] == 0).all()  # padding gets no gradient


def test_on_policy_ratio_keeps_policy_gradient():
    """rho = exp(logp - logp.detach()) = 1 but d loss / d logp = -A / n_tokens (the policy gradient)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = g.aggregate(g.grpo_token_loss(logp, logp.detach(), None, torch.tensor([2.0]), beta=0.0),
                       torch.ones(1, 2), "token-mean", 2.0, 1.0, 2)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_per_token_logps_match_full_log_softmax(tiny_model_dir):
    model, tok = models.load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    prompts, comps = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    ids, attn, pos, cmask = g.collate(prompts, comps, tok.pad_token_id)
    assert cmask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with torch.no_grad():
        lp, logits, _ = g.completion_logps(model, prompts, comps, tok.pad_token_id, 0.7)
        ent = models.softmax_entropy(logits, temperature=0.7)
        for i, (p, c) in enumerate(zip(prompts, comps)):  # each sequence alone, unpadded, full log-softmax
            x = torch.tensor([p + c])
            full = torch.log_softmax(model(input_ids=x).logits[0] / 0.7, -1)  # [T, V]
            want = torch.stack([full[len(p) - 1 + t, c[t]] for t in range(len(c))])
            assert torch.allclose(lp[i, :len(c)], want, atol=1e-5)
            probs = full.exp()[len(p) - 1:len(p) - 1 + len(c)]
            assert torch.allclose(ent[i, :len(c)], -(probs * full[len(p) - 1:len(p) - 1 + len(c)]).sum(-1), atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# the update on fixed rollouts


def lora_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tok = models.load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=training.LORA_TARGETS))
    with torch.no_grad():  # non-zero B so that every LoRA parameter gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, tok


def fixed_rollouts(seed=0, n_groups=4, G=4, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(n_groups):
        p = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(G):
            prompts.append(p)
            comps.append(torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist())
    rewards = torch.rand(n_groups, G, generator=gen)
    return prompts, comps, rewards


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_and_gradient_invariant_to_micro_batches(tiny_model_dir, mode):
    model, tok = lora_model(tiny_model_dir)
    prompts, comps, rewards = fixed_rollouts()
    ro = g.Rollouts(prompts, comps, g.group_advantages(rewards).flatten())
    cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=0.9, beta=0.1, loss_agg=mode, micro_batch=16)
    with model.disable_adapter():
        ro.logp_ref = g.sequence_logps(model, ro, cfg)
    ro.logp_old = [x + 0.1 * torch.randn_like(x) for x in g.sequence_logps(model, ro, cfg)]  # rho != 1
    results = []
    for mb in (16, 8, 4):  # 1, 2 and 4 micro-batches
        cfg.micro_batch = mb
        model.zero_grad(set_to_none=True)
        st = g.accumulate_gradients(model, ro, cfg)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((st["loss"], grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-8)
        for n, gr in grads.items():
            assert torch.allclose(gr, results[0][1][n], atol=1e-7, rtol=1e-5), n
    assert any(gr.abs().sum() > 0 for gr in results[0][1].values())


def test_extra_loss_callback_is_added(tiny_model_dir):
    """05_rapo.py's hook: the callback's term is added to the loss and its gradient flows."""
    model, tok = lora_model(tiny_model_dir)
    prompts, comps, rewards = fixed_rollouts(n_groups=2)
    ro = g.Rollouts(prompts, comps, torch.zeros(len(comps)))  # zero advantages: only the extra term remains
    cfg = g.LossConfig(pad_id=tok.pad_token_id, beta=0.0, micro_batch=3)
    seen = []

    def extra(mb):
        seen.extend(mb.idx)
        assert mb.logits.shape[:2] == mb.logp.shape == mb.completion_mask.shape
        return -(mb.logp * mb.completion_mask).sum() / mb.n_tokens

    st = g.accumulate_gradients(model, ro, cfg, extra_loss=extra)
    assert seen == list(range(len(comps)))
    assert st["extra"] == pytest.approx(st["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_toy_verifiable_reward_rises():
    """A 64-token toy vocabulary; reward = fraction of even token ids in the completion (base rate 0.5).
    GRPO (full fine-tuning of a 1-layer model, so the tied embeddings can move) must raise it clearly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = models.load_tokenizer(str(models.embedded_tokenizer_path()))  # only its pad/eos id (2) is used
    cfg_m = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg_m)
    model.generation_config.eos_token_id = 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = g.LossConfig(pad_id=2, temperature=1.0, beta=0.0, micro_batch=64)
    gen = torch.Generator().manual_seed(1)
    means = []
    for step in range(20):
        prompts = [torch.randint(3, 64, (4,), generator=gen).tolist() for _ in range(8)]
        comps = speed.rollout(model, tok, prompts, 4, max_new_tokens=8, temperature=1.0)
        r = torch.tensor([sum(t % 2 == 0 for t in c) / len(c) for c in comps]).view(8, 4)  # [B, G]
        means.append(r.mean().item())
        ro = g.Rollouts([p for p in prompts for _ in range(4)], comps, g.group_advantages(r).flatten())
        g.grpo_step(model, model, opt, None, ro, cfg)
    first, last = sum(means[:4]) / 4, sum(means[-4:]) / 4
    assert last > first + 0.2, (first, last, means)


# ----------------------------------------------------------------------------------------------------
# end to end: torchrun equality, resume, bad input


def run_stage(args, nproc=1, timeout=240):
    return run_script("04_grpo.py", *args, nproc=nproc, env={"PYTHONPATH": str(ROOT)}, timeout=timeout)


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=1e-6):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=atol, rtol=0), (k, (ta[k] - tb[k]).abs().max())


METRIC_KEYS = ["reward", "loss", "kl", "entropy", "grad_norm", "clip_frac", "completion_len_mean", "zero_std_frac", "lr"]


def assert_same_metrics(ma, mb, rel=1e-5):
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for k in METRIC_KEYS:
            if x[k] is None:
                assert y[k] is None
            else:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-8), (x["step"], k)


def test_torchrun_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    prompts, comps, rewards = fixed_rollouts(seed=3, n_groups=4, G=4)
    rfile = tmp_path / "rollouts.jsonl"
    common.write_jsonl(rfile, [{"prompt_ids": prompts[4 * k], "completions": comps[4 * k:4 * k + 4],
                                "rewards": rewards[k].tolist()} for k in range(4)])
    common_args = ["--policy", f"hf:{tiny_model_dir}", "--rollouts-file", str(rfile), "--group-size", "4",
                   "--prompts-per-step", "4", "--max-steps", "2", "--micro-batch", "3", "--lr", "1e-3", "--beta", "0.1",
                   "--lora-r", "4", "--lora-alpha", "8", "--temperature", "0.9", "--max-grad-norm", "0.05", "--device", "cpu"]
    # lr 1e-3: Adam divides by sqrt(v), which turns rounding-level gradient differences (another summation order
    # over ranks) into weight differences proportional to lr: ~1e-6 at lr 1e-2, ~1e-8 here. A wrong gradient
    # would differ by O(lr) = 1e-3 >> atol, and the metrics (loss, grad_norm) are compared too.
    run_stage([*common_args, "--out", str(tmp_path / "one")])
    run_stage([*common_args, "--out", str(tmp_path / "two")], nproc=2)
    assert_same_adapter(tmp_path / "one" / "adapter", tmp_path / "two" / "adapter")
    m1 = common.read_jsonl(tmp_path / "one" / "metrics.jsonl")
    m2 = common.read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert_same_metrics(m1, m2)
    assert m1[0]["grad_norm"] > 0.05  # clipping active: a wrong gradient scale would change the update
    assert json.loads((tmp_path / "two" / "args.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def turns_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("turns") / "turns.jsonl"
    recs = []
    for i in range(6):
        recs.append({"id": f"d{i}-t01", "dialog_id": f"d{i}", "turn": 1, "split": "train",
                     "context": [{"role": "user", "content": f"I feel worried about thing number {i}."}],
                     "target": "That sounds hard.", "learn": True})
    common.write_jsonl(path, recs)
    return path


def test_resume_equals_uninterrupted(eos_model_dir, turns_file, tmp_path):
    args = ["--policy", f"hf:{eos_model_dir}", "--data", str(turns_file), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "12", "--l-max", "8", "--l-cache", "6", "--max-steps", "4", "--checkpoint-every", "2",
            "--lr", "5e-2", "--lora-r", "4", "--lora-alpha", "8", "--sample-every", "1", "--device", "cpu"]
    run_stage([*args, "--out", str(tmp_path / "full")])
    run_stage([*args, "--out", str(tmp_path / "cut"), "--stop-after", "2"])
    assert not (tmp_path / "cut" / "adapter").exists()
    cut = tmp_path / "cut"
    # a kill between the two renames of the checkpoint swap: the newest complete checkpoint is checkpoint.tmp
    os.replace(cut / "checkpoint", cut / "checkpoint.tmp")
    shutil.copytree(cut / "checkpoint.tmp", cut / "checkpoint.old")
    meta = json.loads((cut / "checkpoint.old" / "meta.json").read_text())
    common.write_json(cut / "checkpoint.old" / "meta.json", dict(meta, step=1))
    # the README's command: --resume alone continues the run with its own settings (data, model, sizes, lr...)
    run_stage(["--out", str(cut), "--resume"])
    mf = common.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    mc = common.read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert len(mf) == 4
    assert_same_metrics(mf, mc)
    assert any(m["zero_std_frac"] < 1 for m in mf), "the run must do real updates"
    assert_same_adapter(tmp_path / "full" / "adapter", tmp_path / "cut" / "adapter", atol=1e-6)
    assert adapter_tensors(tmp_path / "full" / "adapter") != {}
    # the adapter really moved (lora_B starts at zero)
    assert any(v.abs().sum() > 0 for k, v in adapter_tensors(tmp_path / "full" / "adapter").items() if "lora_B" in k)
    # the final adapter reloads with PEFT
    m, _ = models.load_causal_lm(str(tmp_path / "full" / "adapter"), torch.device("cpu"), torch.float32)
    assert type(m).__name__.startswith("Peft")
    assert sorted(p.name for p in cut.glob("checkpoint*")) == ["checkpoint"]
    # a setting given again must equal the run's (else one line, exit 2); --max-steps may change
    for bad, msg in ((["--lr", "0.1"], "--resume: --lr 0.1 differs from the run's 0.05"),
                     (["--group-size", "2"], "--resume: --group-size 2 differs from the run's 4")):
        r = run_script("04_grpo.py", "--out", cut, "--resume", *bad, check=False)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {msg} ({cut / 'checkpoint' / 'meta.json'}); "
                                                                       "omit it to continue the run as it was, or start a "
                                                                       "new run (--overwrite or another --out)"], r.stderr
    # a crafted checkpoint file cannot run code: weights_only loading refuses it (one line, exit 2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    st = torch.load(cut / "checkpoint" / "trainer.pt", weights_only=True)
    torch.save(dict(st, step=Payload()), cut / "checkpoint" / "trainer.pt")
    r = run_script("04_grpo.py", "--out", cut, "--resume", "--max-steps", "5", check=False)
    assert r.returncode == 2 and "trainer.pt: refused to load" in r.stderr and not marker.exists(), r.stderr


@pytest.mark.parametrize("bad,msg", [
    (["--group-size", "1"], "--group-size"),
    (["--eps-low", "1.5"], "--eps-low"),
    (["--data", "/nonexistent/turns.jsonl"], "file not found"),
    (["--resume"], "no checkpoint"),
    (["--rollout", "vllm", "--no-lora"], "--no-lora"),
])
def test_bad_input_is_one_clear_error(bad, msg, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: g.main(["--out", str(out), *bad]))
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_deletes_only_after_the_models_load(tmp_path):
    """A typo in --policy with --overwrite: the previous run's outputs survive (they are deleted last)."""
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "trainer.pt").write_text("previous run")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    prompts, comps, rewards = fixed_rollouts(seed=1, n_groups=2, G=2)
    rfile = tmp_path / "rollouts.jsonl"
    common.write_jsonl(rfile, [{"prompt_ids": prompts[2 * k], "completions": comps[2 * k:2 * k + 2],
                                "rewards": rewards[k].tolist()} for k in range(2)])
    (tmp_path / "not_a_model").mkdir()
    r = run_script("04_grpo.py", "--out", out, "--overwrite", "--policy", f"hf:{tmp_path / 'not_a_model'}",
                   "--rollouts-file", rfile, "--group-size", "2", "--prompts-per-step", "2", "--device", "cpu", check=False)
    assert r.returncode != 0
    assert (out / "checkpoint" / "trainer.pt").read_text() == "previous run"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
