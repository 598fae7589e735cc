"""The GPU path (skipped without CUDA): every stage's smoke run on the GPU in bf16, the loss functions
under bf16 autocast against fp32, and the CUDA-graph decoder against the eager one. Run on a CUDA machine with `python -m pytest -q tests/test_cuda.py`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_stage

import common  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402
import training  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

g = load_stage("04_grpo")
rapo = load_stage("05_rapo")


def run(script, *args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    return p


def ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_pipeline_smoke_on_gpu_bf16(tmp_path, tiny_model_dir, demo_data):
    """01 -> 06 on the tiny model, each model stage on cuda in bf16 (--dtype auto = bfloat16 on CUDA, and
    04 with --dtype float32 = fp32 weights under bf16 autocast)."""
    t = f"hf:{tiny_model_dir}"
    d = tmp_path
    ok(run("01_select.py", "--data", demo_data, "--out", d / "sel", "--judge", "none", "--max-examples", 6,
           "--test-frac", 0.3))
    turns = d / "sel" / "turns.jsonl"
    sim = ["--data", turns, "--out", d / "sim", "--policy", t, "--seeker", t, "--critic", t, "--max-examples", 6,
           "--per-dialogue", 1, "-m", 2, "--max-turns", 2, "--max-new-tokens", 6, "--seeker-max-new-tokens", 6,
           "--theta", 0.0, "--device", "cuda"]
    p = run("02_simulate.py", *sim, "--delta", 5)  # degenerate labels: exit 2 after simulating; relabel below
    assert p.returncode in (0, 2), p.stderr[-3000:]
    delta = json.loads((d / "sim" / "simulate_stats.json").read_text())["reward_quantiles"]["median"]
    ok(run("02_simulate.py", *sim, "--delta", delta))
    ok(run("03_train_rm.py", "--data", d / "sim" / "rollouts.jsonl", "--rm", t, "--out", d / "sim", "--epochs", 1,
           "--device", "cuda"))
    m = json.loads((d / "sim" / "rm" / "rm_metrics.json").read_text())
    assert m["predictions"] and all(0.0 <= x["score"] <= 1.0 for x in m["predictions"])
    for dtype in ("auto", "float32"):
        out = d / f"grpo_{dtype}"
        ok(run("04_grpo.py", "--data", turns, "--rm", d / "sim" / "rm", "--policy", t, "--out", out, "--prompts-per-step", 2,
               "--max-steps", 2, "--max-new-tokens", 8, "--device", "cuda", "--dtype", dtype, "--lr", "1e-3"))
        rows = common.read_jsonl(out / "metrics.jsonl")
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["entropy"]])).all()
                                      for r in rows)
    ok(run("04_grpo.py", "--data", turns, "--policy", t, "--out", d / "grpo_plain", "--prompts-per-step", 2, "--max-steps", 1,
           "--max-new-tokens", 8, "--device", "cuda", "--no-shared-prefix"))
    ok(run("04_grpo.py", "--data", turns, "--policy", t, "--out", d / "grpo_graph", "--prompts-per-step", 2, "--max-steps", 1,
           "--max-new-tokens", 8, "--device", "cuda", "--decoder", "cuda-graph"))
    ok(run("05_rapo.py", "--data", turns, "--out", d / "rapo", "--policy", t, "--seeker", t, "--grm", t,
           "--prompts-per-step", 2, "--max-steps", 2, "--max-new-tokens", 8, "--grm-max-new-tokens", 12,
           "--seeker-max-new-tokens", 6, "--grm-retries", 1, "--reward", "rubric-point", "--device", "cuda"))
    rows = common.read_jsonl(d / "rapo" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # not NaN
    ok(run("06_eval.py", "--data", turns, "--out", d / "eval", "--policy", t, "--policy", d / "grpo_auto" / "adapter",
           "--seeker", t, "--critic", t, "--judge", t, "--max-examples", 2, "--max-ref-turns", 3, "--max-turns", 2,
           "--judge-rounds", 2, "--max-new-tokens", 6, "--seeker-max-new-tokens", 5, "--bootstrap", 100,
           "--parts", "interactive,judge,pairwise", "--device", "cuda"))  # reference metrics: CPU libraries only
    assert (d / "eval" / "report.md").exists() and (d / "eval" / "scores.json").exists()


def lora_on_cuda(folder):
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_causal_lm(str(folder), torch.device("cuda"), torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=training.LORA_TARGETS, init_lora_weights=False))
    return model.train(), tok


def rollouts(n_groups=3, G=4, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for k in range(n_groups):
        p = torch.randint(3, vocab, (20 + 13 * k,), generator=gen).tolist()
        for j in range(G):
            prompts.append(p)
            comps.append(torch.randint(3, vocab, (5 + 3 * j,), generator=gen).tolist())
    return g.Rollouts(prompts, comps, torch.randn(n_groups * G, generator=gen))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
def test_grpo_loss_bf16_autocast_close_to_fp32(tiny_model_dir, shared):
    """Per-token log-probs, the loss and the gradient under bf16 autocast against fp32 (tolerances for bf16's
    8-bit mantissa: log-probs within 0.1, loss within 5%, gradient cosine > 0.99)."""
    model, tok = lora_on_cuda(tiny_model_dir)
    ro = rollouts()
    res = {}
    for ac in (None, torch.bfloat16):
        cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=0.9, beta=0.1, micro_batch=8, shared_prefix=shared,
                           autocast_dtype=ac)
        with model.disable_adapter():
            ro.logp_ref = [x - 0.05 for x in g.sequence_logps(model, ro, cfg)]
        lp = g.sequence_logps(model, ro, cfg)
        model.zero_grad(set_to_none=True)
        st = g.accumulate_gradients(model, ro, cfg)
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        res[ac] = (torch.cat(lp), st["loss"], grad)
    (lp32, l32, g32), (lp16, l16, g16) = res[None], res[torch.bfloat16]
    assert (lp32 - lp16).abs().max().item() < 0.1
    assert abs(l32 - l16) <= 0.05 * abs(l32) + 1e-4
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0).item() > 0.99


def test_shared_prefix_equals_plain_on_cuda(tiny_model_dir):
    model, tok = lora_on_cuda(tiny_model_dir)
    ro = rollouts(seed=1)
    out = []
    for shared in (True, False):
        cfg = g.LossConfig(pad_id=tok.pad_token_id, beta=0.0, micro_batch=16, shared_prefix=shared)
        out.append(torch.cat(g.sequence_logps(model, ro, cfg)))
    assert torch.allclose(out[0], out[1], atol=1e-4, rtol=0)


def test_topk_kl_bf16_close_to_fp32():
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(64, 49152, device="cuda", generator=gen) * 3
    t = s + torch.randn(64, 49152, device="cuda", generator=gen)
    k32 = rapo.topk_reverse_kl(s, t, 256)
    k16 = rapo.topk_reverse_kl(s.bfloat16(), t.bfloat16(), 256)  # the function upcasts to fp32 inside
    assert torch.allclose(k32, k16, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decoder_equals_eager(tiny_model_dir, dtype):
    """--decoder cuda-graph replays the eager static loop's kernels: the same tokens, greedy and sampled with
    the same seed (the sampler runs outside the graph); in fp32 the greedy tokens also equal generate()'s."""
    model, tok = models.load_causal_lm(str(tiny_model_dir), torch.device("cuda"), dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randint(100, 2000, (n,), generator=gen).tolist() for n in (3, 40, 17, 9)]
    for temperature in (0.0, 1.0):
        out = {}
        for decoder in ("static", "cuda-graph"):
            torch.manual_seed(1)
            out[decoder] = speed.generate_ids(model, tok, ps, max_new_tokens=24, temperature=temperature, top_p=0.9,
                                              n=4, decoder=decoder)
        assert out["static"] == out["cuda-graph"]
    if dtype == torch.float32:
        kw = dict(max_new_tokens=24, temperature=0.0, n=2)
        assert speed.generate_ids(model, tok, ps, decoder="cuda-graph", **kw) == models.generate_ids(model, tok, ps, **kw)
