"""The shared-prefix path (each context runs once, its G completions attend to its keys/values) against
the plain path (every sequence runs its whole context): per-token log-probs, every trainable parameter's
gradient of the full GRPO loss, the reference/old-policy forwards, and greedy generation with a shared
prefill. All in fp32 on a tiny Llama; tolerances are stated at each assertion."""
import pytest
import torch

from conftest import load_stage

import common  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402
import training  # noqa: E402

g = load_stage("04_grpo")

LOGP_ATOL = 1e-5  # per-token log-probs, fp32 (observed ~1e-6: another summation order in attention)
GRAD_RTOL = 1e-4  # per parameter: max |g_shared - g_plain| <= GRAD_RTOL * max |g_plain| (observed ~1e-6)


def make_model(folder, lora: bool):
    model, tok = models.load_causal_lm(str(folder), torch.device("cpu"), torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=training.LORA_TARGETS, init_lora_weights=False)  # B != 0
        model = get_peft_model(model, cfg)
    model.train()
    return model, tok


def groups(lengths_p, lengths_c, seed=0, vocab=300):
    """Group-major rollouts: one context per entry of lengths_p, with completions of lengths lengths_c."""
    gen = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for lp in lengths_p:
        p = torch.randint(3, vocab, (lp,), generator=gen).tolist()
        for lc in lengths_c:
            prompts.append(p)
            comps.append(torch.randint(3, vocab, (lc,), generator=gen).tolist())
    return prompts, comps


CASES = {
    "one context": ([9], [5, 5, 5, 5]),
    "contexts of different lengths, padded completions": ([3, 11, 7], [1, 6, 4, 2]),
}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_logps_and_gradients_equal_plain_path(tiny_model_dir, lora, case):
    model, tok = make_model(tiny_model_dir, lora)
    prompts, comps = groups(*CASES[case])
    n_groups = len(CASES[case][0])
    G = len(CASES[case][1])
    adv = torch.randn(n_groups * G, generator=torch.Generator().manual_seed(1))
    ro = g.Rollouts(prompts, comps, adv)
    res = {}
    for shared in (False, True):
        cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=0.8, beta=0.1, micro_batch=64, shared_prefix=shared)
        lp, _, cmask = g.logps_fn(cfg)(model, prompts, comps, tok.pad_token_id, 0.8)
        ro.logp_ref = [x - 0.05 for x in g.sequence_logps(model, ro, cfg)]  # a reference != policy: KL term active
        ro.logp_old = [x + 0.1 for x in g.sequence_logps(model, ro, cfg)]  # rho != 1
        model.zero_grad(set_to_none=True)
        st = g.accumulate_gradients(model, ro, cfg)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        res[shared] = (lp.detach() * cmask, g.sequence_logps(model, ro, cfg), st, grads)
    (lp0, seq0, st0, g0), (lp1, seq1, st1, g1) = res[False], res[True]
    assert lp0.shape == lp1.shape and torch.allclose(lp0, lp1, atol=LOGP_ATOL, rtol=0), (lp0 - lp1).abs().max()
    for a, b in zip(seq0, seq1):
        assert a.shape == b.shape and torch.allclose(a, b, atol=LOGP_ATOL, rtol=0)
    assert st0["loss"] == pytest.approx(st1["loss"], rel=1e-5, abs=1e-7)
    assert st0["entropy"] == pytest.approx(st1["entropy"], rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        scale = g0[name].abs().max().item()
        assert scale > 0, name  # every trainable parameter gets a gradient
        assert (g0[name] - g1[name]).abs().max().item() <= GRAD_RTOL * scale, name


def test_micro_batches_hold_whole_groups():
    prompts = [[1]] * 4 + [[2, 3]] * 4 + [[4]] * 4  # three groups of G = 4
    assert g.micro_batches(prompts, 8, True) == [list(range(0, 8)), list(range(8, 12))]
    assert g.micro_batches(prompts, 6, True) == [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]
    assert g.micro_batches(prompts, 3, True) == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9, 10], [11]]  # G > size: split
    assert g.micro_batches(prompts, 5, False) == [list(range(0, 5)), list(range(5, 10)), [10, 11]]
    assert speed.prefix_runs(prompts) == [(0, 4), (4, 8), (8, 12)]


def test_extra_loss_sees_same_logits(tiny_model_dir):
    """05_rapo.py's callback gets the same (scaled) logits from both paths."""
    model, tok = make_model(tiny_model_dir, True)
    prompts, comps = groups([4, 8], [3, 5, 2])
    ro = g.Rollouts(prompts, comps, torch.zeros(len(prompts)))
    seen = {}
    for shared in (False, True):
        cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=0.7, beta=0.0, micro_batch=64, shared_prefix=shared)
        rows = []

        def extra(mb):
            rows.append((mb.logits.detach() * mb.completion_mask.unsqueeze(-1)).clone())
            return (mb.logits * mb.completion_mask.unsqueeze(-1)).square().mean()

        model.zero_grad(set_to_none=True)
        g.accumulate_gradients(model, ro, cfg, extra_loss=extra)
        seen[shared] = torch.cat(rows)
    assert torch.allclose(seen[False], seen[True], atol=1e-4, rtol=0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "plain-model"])
def test_shared_prefill_generation_equals_plain_greedy(tiny_model_dir, lora):
    model, tok = make_model(tiny_model_dir, lora)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    prompts, _ = groups([3, 12, 7], [1])
    kw = dict(max_new_tokens=12, temperature=0.0, batch_size=64, n=3)
    plain = models.generate_ids(model, tok, prompts, **kw)
    shared = speed.generate_ids(model, tok, prompts, shared_prefill=True, **kw)
    assert len(plain) == 9 and plain == shared
    assert all(plain[3 * i] == plain[3 * i + 1] == plain[3 * i + 2] for i in range(3))  # greedy: n identical
    small = speed.generate_ids(model, tok, prompts, shared_prefill=True, **{**kw, "batch_size": 4})  # 1 prompt per call
    assert small == plain


def test_option_logprobs_equal_plain_continuations(tiny_model_dir):
    """speed.option_logprobs (prompt once, K options against its keys/values) against one full forward per pair."""
    model, tok = make_model(tiny_model_dir, False)
    model.eval()
    prompts, _ = groups([2, 9, 5], [1])
    options = [[11, 12, 13], [14], [15, 16]]
    got = speed.option_logprobs(model, tok, prompts, options, batch_size=2)
    want = models.continuation_logprobs(model, tok, [p for p in prompts for _ in options], options * len(prompts))
    assert torch.allclose(got.flatten(), torch.tensor(want), atol=1e-4, rtol=0)


def test_gradient_checkpointing_needs_plain_path():
    with pytest.raises(common.InputError, match="--no-shared-prefix"):
        g.parse_args(["--gradient-checkpointing"])
    args = g.parse_args(["--gradient-checkpointing", "--no-shared-prefix"])
    assert args.no_shared_prefix


def test_rollout_with_merged_lora_equals_unmerged_and_restores_weights(tiny_model_dir):
    """04's rollout samples with the adapter folded into the weights (merged_lora): the same greedy tokens as
    through the LoRA layers, and afterwards every weight is bit-identical and the adapter is active again."""
    model, tok = make_model(tiny_model_dir, True)
    model.generation_config.eos_token_id = tok.eos_token_id
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts, _ = groups([3, 12, 7], [1])
    kw = dict(max_new_tokens=10, temperature=0.0, batch_size=64)
    plain = speed.rollout(model, tok, prompts, 2, merge_lora=False, **kw)
    merged = speed.rollout(model, tok, prompts, 2, merge_lora=True, **kw)
    assert merged == plain
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    from peft.tuners.lora import LoraLayer

    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    assert model.training  # rollout() restores the mode
    with torch.no_grad():  # the adapter still acts: the LoRA-disabled model gives other logits
        x = torch.tensor([prompts[0]])
        with model.disable_adapter():
            base = model(input_ids=x).logits
        assert not torch.allclose(model(input_ids=x).logits, base)
