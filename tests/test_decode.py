"""Our static-cache decoding loop (speed.static_decode, `--decoder static|cuda-graph`) against transformers'
generate(), and its sampler against transformers' own temperature and top-p warpers."""
import pytest
import torch

import backends
import common
import models
import speed  # noqa: E402
import training  # noqa: E402
from conftest import load_stage

g = load_stage("04_grpo")


def load(folder, lora=False, impl="sdpa"):
    model, tok = models.load_causal_lm(str(folder), torch.device("cpu"), torch.float32)
    model.set_attn_implementation(impl)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=training.LORA_TARGETS, task_type="CAUSAL_LM"))
        with torch.no_grad():  # a non-zero adapter, so that it changes the tokens
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 2000, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("n", [1, 3])
def test_static_greedy_equals_generate(tiny_model_dir, impl, n):
    """Left padding (lengths 3/12/7), n copies per prompt from one prefill, a batch split over two calls."""
    model, tok = load(tiny_model_dir, impl=impl)
    ps = prompts([3, 12, 7])
    kw = dict(max_new_tokens=14, temperature=0.0, n=n)
    want = models.generate_ids(model, tok, ps, batch_size=64, **kw)
    assert speed.generate_ids(model, tok, ps, batch_size=64, decoder="static", **kw) == want
    assert speed.generate_ids(model, tok, ps, batch_size=2 * n, decoder="static", **kw) == want


def test_static_greedy_equals_generate_lora_and_eos(eos_model_dir):
    """LoRA layers in the forward; a model that stops early (EOS ends a completion and is kept, the rest is
    dropped) and min_new_tokens (EOS banned before it) give the same completions as generate()."""
    model, tok = load(eos_model_dir, lora=True)
    ps = prompts([5, 9, 2, 14], seed=1)
    for min_new in (0, 4):
        kw = dict(max_new_tokens=20, temperature=0.0, n=2, min_new_tokens=min_new)
        want = models.generate_ids(model, tok, ps, **kw)
        got = speed.generate_ids(model, tok, ps, decoder="static", **kw)
        assert got == want
        assert all(len(c) >= min_new for c in got)
    stopped = [c for c in speed.generate_ids(model, tok, ps, max_new_tokens=20, temperature=0.0, decoder="static")
               if c[-1] == tok.eos_token_id]
    assert stopped and all(tok.eos_token_id not in c[:-1] for c in stopped)


def test_rollout_with_static_decoder_equals_generate(tiny_model_dir):
    """04's rollout (merged LoRA) with --decoder static gives generate()'s greedy groups."""
    model, tok = load(tiny_model_dir, lora=True)
    ps = prompts([4, 10])
    kw = dict(max_new_tokens=8, temperature=0.0)
    assert speed.rollout(model, tok, ps, 3, decoder="static", **kw) == speed.rollout(model, tok, ps, 3, **kw)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 0.5)])
def test_sampler_matches_transformers_warpers(temperature, top_p):
    """Token frequencies of sample_tokens over 40,000 draws against the distribution that transformers'
    TemperatureLogitsWarper + TopPLogitsWarper leave (4 standard errors); tokens they drop never appear."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.3, -0.5, -1.0, -3.0, 0.9]])
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    want = want.softmax(-1)[0]
    torch.manual_seed(0)
    draws = speed.sample_tokens(logits.expand(40000, -1), temperature, top_p)
    freq = torch.bincount(draws, minlength=logits.shape[1]).float() / draws.numel()
    se = (want * (1 - want) / draws.numel()).sqrt()
    assert torch.all((freq - want).abs() <= 4 * se + 1e-9), (freq, want)
    assert torch.all(freq[want == 0] == 0)
    assert (want == 0).any() == (top_p < 1)  # the nucleus cases do drop tokens


def test_sampler_greedy_and_decoder_errors(tiny_model_dir):
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    assert speed.sample_tokens(logits, 0.0).tolist() == [1, 0]
    model, tok = load(tiny_model_dir)
    with pytest.raises(ValueError, match="CUDA"):
        speed.generate_ids(model, tok, prompts([3]), max_new_tokens=2, decoder="cuda-graph")
    with pytest.raises(ValueError, match="unknown decoder"):
        speed.generate_ids(model, tok, prompts([3]), max_new_tokens=2, decoder="vllm")


def test_hf_backend_static_decoder_equals_generate(tiny_model_dir):
    """The roles' backend (02, 05, 06) with --decoder static: generate()'s greedy texts, with a prefill."""
    chats = [[{"role": "user", "content": "I feel alone."}], [{"role": "user", "content": "My exams went badly, help."}]]
    out = {}
    for decoder in ("hf", "static"):
        b = backends.HFBackend(str(tiny_model_dir), torch.device("cpu"), torch.float32, decoder=decoder)
        out[decoder] = b.generate(chats, max_new_tokens=10, temperature=0.0, n=2, prefill="<think>")
    assert out["static"] == out["hf"] and all(t.startswith("<think>") for ts in out["hf"] for t in ts)


@pytest.mark.parametrize("stage", ["01_select", "02_simulate", "04_grpo", "05_rapo", "06_eval"])
def test_every_stage_takes_decoder_and_refuses_cuda_graph_on_cpu(stage):
    mod = load_stage(stage)
    assert mod.parse_args(["--decoder", "static"]).decoder == "static"
    with pytest.raises(common.InputError, match="cuda-graph needs a CUDA device"):
        mod.parse_args(["--decoder", "cuda-graph", "--device", "cpu"])
