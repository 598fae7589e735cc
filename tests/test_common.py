"""Foundation: dialogue formats, merging, splits, JSONL resume, the embedded model cache, the hf backend,
shared-prompt option scoring and the likelihood-mode critic (02_simulate.py) against hand computations; the
GRM's parser (05_rapo.py) and ask_json with 01's judge validator."""
import json
import math

import pytest
import torch

import backends
import common
import models
from common import InputError
from conftest import load_stage

select = load_stage("01_select")  # the hindsight-selection judge's answers (validate_select)
sim = load_stage("02_simulate")  # PPDPP's critic
rapo = load_stage("05_rapo")  # the GRM's parser


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


ESCONV = [{
    "emotion_type": "anxiety", "problem_type": "job crisis", "situation": "I may lose my job.",
    "experience_type": "Current Experience", "survey_score": {"seeker": {"empathy": "5"}},
    "dialog": [
        {"speaker": "supporter", "content": "Hi, how are you?", "annotation": {"strategy": "Question"}},
        {"speaker": "seeker", "content": "Not good.", "annotation": {}},
        {"speaker": "seeker", "content": "My job   is at risk.", "annotation": {"feedback": "4"}},
        {"speaker": "supporter", "content": "That sounds stressful.", "annotation": {"strategy": "Reflection of feelings"}},
        {"speaker": "supporter", "content": "What happened?", "annotation": {"strategy": "Question"}},
        {"speaker": "seeker", "content": "Layoffs.", "annotation": {}},
        {"speaker": "supporter", "content": "I see.", "annotation": {"strategy": "Others"}},
    ]}]


def test_esconv_loading_merges_and_builds_turns(tmp_path):
    d = common.load_dialogues(write(tmp_path / "e.json", ESCONV))
    msgs = d[0]["messages"]
    assert [m["role"] for m in msgs] == ["assistant", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "Not good.\nMy job is at risk."  # merged with a newline, spaces normalised
    assert msgs[2]["content"] == "That sounds stressful.\nWhat happened?"
    assert msgs[2]["strategy"] == "Reflection of feelings"  # the first strategy of a merged turn
    turns = common.build_turns(d, {"d0000": "train"})
    # the opening greeting has no user message before it: not a turn
    assert [t["turn"] for t in turns] == [2, 4]
    assert turns[0]["id"] == "d0000-t02" and turns[0]["context"][-1]["role"] == "user"
    assert turns[1]["context"] == [{"role": m["role"], "content": m["content"]} for m in msgs[:4]]
    assert turns[1]["target"] == "I see." and turns[1]["situation"] == "I may lose my job."


def test_ppdpp_and_chat_formats(tmp_path):
    ppdpp = {"emotion_type": "sadness", "problem_type": "breakup", "situation": "s",
             "dialog": [{"text": "I am sad", "speaker": "usr"}, {"text": "Why?", "speaker": "sys", "strategy": "Question"},
                        {"text": "She left", "speaker": "usr"}, {"text": "I'm sorry", "speaker": "sys", "strategy": "Others"}]}
    p = write(tmp_path / "p.jsonl", json.dumps(ppdpp) + "\n" + json.dumps(ppdpp) + "\n")
    d = common.load_dialogues(p, id_prefix="t")
    assert [x["dialog_id"] for x in d] == ["t0000", "t0001"]
    assert len(common.build_turns(d, {"t0000": "test", "t0001": "test"})) == 4
    chat = {"id": "c1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                     {"role": "assistant", "content": "how can I help?"}]}
    d = common.load_dialogues(write(tmp_path / "c.jsonl", json.dumps(chat) + "\n"))
    assert d[0]["dialog_id"] == "c1" and d[0]["messages"][1]["content"] == "hello\nhow can I help?"


@pytest.mark.parametrize("content,needle", [
    ("[{\"dialog\": [", "invalid JSON"),
    (json.dumps([{"emotion_type": "x"}]), "record 1: missing field 'dialog'"),
    (json.dumps([{"dialog": [{"speaker": "therapist", "content": "hi"}]}]), "unknown speaker 'therapist'"),
    (json.dumps([{"dialog": [{"speaker": "seeker"}]}]), "dialog[0]: missing field 'content'"),
    ("", "empty file"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n{"messages": [{"role": "bot"', "line 2: invalid JSON"),
])
def test_malformed_inputs_name_file_record_field(tmp_path, content, needle):
    p = write(tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl"), content)
    with pytest.raises(InputError) as e:
        common.load_dialogues(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_split_is_deterministic_and_by_dialogue():
    ids = [f"d{i:04d}" for i in range(100)]
    a, b = common.split_dialogues(ids, 7), common.split_dialogues(list(reversed(ids)), 7)
    assert a == b  # independent of input order
    assert sum(v == "test" for v in a.values()) == 10
    assert common.split_dialogues(ids, 8) != a
    s = common.split_dialogues(ids, 7, 0.1, 0.2)
    assert [sum(v == k for v in s.values()) for k in ("train", "valid", "test")] == [70, 20, 10]
    dialogues = [{"dialog_id": i, "situation": "", "emotion_type": "", "problem_type": "",
                  "messages": [{"role": "user", "content": "a", "strategy": None},
                               {"role": "assistant", "content": "b", "strategy": None}] * 3} for i in ids]
    turns = common.build_turns(dialogues, a)
    by_dialog = {}
    for t in turns:
        by_dialog.setdefault(t["dialog_id"], set()).add(t["split"])
    assert all(len(v) == 1 for v in by_dialog.values())  # no dialogue in two splits


def test_resume_drops_torn_last_line(tmp_path):
    out = common.ResumableOutput(tmp_path, "x.jsonl")
    out.append([{"id": "a"}, {"id": "b"}])
    with open(out.path, "a") as f:
        f.write('{"id": "c", "val')  # a crash mid-write
    assert out.done == {"a", "b"}
    out.append([{"id": "c"}])  # appending first cuts the torn tail
    assert [r["id"] for r in common.read_jsonl(out.path)] == ["a", "b", "c"]
    # a torn line that is not the last one of our own output is an error, not silently skipped
    write(tmp_path / "y.jsonl", '{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(InputError, match="line 2"):
        common.read_jsonl(tmp_path / "y.jsonl", allow_torn_tail=True)


def test_sharded_output_merges_in_input_order(tmp_path):
    parts = [common.ResumableOutput(tmp_path, "r.jsonl", rank=r, world=2) for r in range(2)]
    parts[1].append([{"id": "b"}, {"id": "d"}])
    parts[0].append([{"id": "c"}, {"id": "a"}])
    merged = parts[0].merge(["a", "b", "c", "d"])
    assert [r["id"] for r in merged] == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob("r.jsonl.part*"))
    assert common.ResumableOutput(tmp_path, "r.jsonl").done == {"a", "b", "c", "d"}


def test_parse_spec_and_strip_reasoning():
    assert (common.parse_spec("hf:a/b").backend, common.parse_spec("hf:a/b").name) == ("hf", "a/b")
    assert common.parse_spec("/models/x").backend == "hf"
    assert common.parse_spec("openai:gpt-4o").name == "gpt-4o"
    assert common.strip_reasoning("<think>sad user</think> I hear you.") == "I hear you."
    assert common.strip_reasoning("<strategy>Question</strategy>What happened?") == "What happened?"
    assert common.strip_reasoning("<think>never closed") == "<think>never closed"


def test_extract_json_and_grm_parsing():
    assert backends.extract_json('Sure! ```json\n{"learn": true, "reason": "ok",}\n```') == {"learn": True, "reason": "ok"}
    assert backends.extract_json("no json here") is None
    ok = {"0": {"analysis": "a", "rank": 2, "score": 0.3}, "1": {"analysis": "b", "rank": 1, "score": 0.8},
          "2": {"analysis": "c", "rank": 3, "score": 0.1}}
    r = rapo.parse_grm(ok, 3)
    assert r["ranks"] == [2, 1, 3] and r["scores"] == [0.3, 0.8, 0.1] and not r["derived"]
    bad_scores = {k: dict(v, score=0.5) for k, v in ok.items()}  # ties: derive from ranks
    r = rapo.parse_grm(bad_scores, 3)
    assert r["derived"] and r["scores"] == [0.5, 1.0, 0.0]
    with pytest.raises(ValueError):
        rapo.parse_grm({k: dict(v, rank=1) for k, v in ok.items()}, 3)
    with pytest.raises(ValueError):
        rapo.parse_grm({"0": ok["0"], "1": ok["1"]}, 3)


class ScriptedBackend(backends.Backend):
    """Answers from a script, to test ask_json's retries and counting."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), []

    def generate(self, chats, n=1, **kw):
        self.calls += 1
        self.asked.append(len(chats))
        return [[self.answers.pop(0)] for _ in chats]


def test_ask_json_retries_only_failures_and_counts():
    b = ScriptedBackend(['{"learn": true, "reason": "x"}', "garbage", '{"learn": "maybe"}',
                         '{"learn": false, "reason": "y"}', "still garbage", "garbage again"])
    res = backends.ask_json(b, [[{"role": "user", "content": str(i)}] for i in range(3)], select.validate_select, retries=2)
    assert b.asked == [3, 2, 1]  # batched; only the failures are re-asked
    assert res.values[0] == {"learn": True, "reason": "x"} and res.values[1] == {"learn": False, "reason": "y"}
    assert res.values[2] is None and res.failed == 1 and res.retried == 3


def test_embedded_cache_matches_gguf_logits():
    from transformers import AutoModelForCausalLM

    path = models.embedded_model_path()
    cached = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gguf = AutoModelForCausalLM.from_pretrained(models.gguf_folder(), gguf_file=models.GGUF_FILE, dtype=torch.float32)
    tok = models.load_tokenizer(str(path))
    x = tok(["My exams start tomorrow and I cannot sleep."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(cached(**x).logits, gguf(**x).logits, atol=1e-5)
    assert tok.chat_template


def test_hf_backend_batched_generation(tiny_model_dir):
    b = backends.HFBackend(str(tiny_model_dir), torch.device("cpu"), torch.float32, batch_size=2)
    chats = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a much longer message here"}],
             [{"role": "user", "content": "x"}]]
    g1 = b.generate(chats, max_new_tokens=5, temperature=0.0)
    g2 = b.generate(chats, max_new_tokens=5, temperature=0.0, n=2)
    assert len(g1) == 3 and all(len(x) == 1 for x in g1) and all(len(x) == 2 for x in g2)
    assert [x[0] for x in g1] == [x[0] for x in g2]  # greedy: n copies agree with n = 1
    # left padding must not change a sequence's greedy continuation
    alone = b.generate(chats[:1], max_new_tokens=5, temperature=0.0)
    assert alone[0] == g1[0]
    s1 = b.generate(chats, max_new_tokens=6, temperature=1.0, seed=3)
    s2 = b.generate(chats, max_new_tokens=6, temperature=1.0, seed=3)
    assert s1 == s2  # seeded sampling is reproducible
    assert b.generate(chats[:1], max_new_tokens=4, temperature=0.0, prefill="<think>")[0][0].startswith("<think>")
    ids = models.generate_ids(b.model, b.tok, [models.chat_ids(b.tok, chats[0])], max_new_tokens=7, temperature=1.0)
    assert 1 <= len(ids[0]) <= 7


def test_option_scoring_equals_naive_loglik(tiny_model_dir):
    b = backends.HFBackend(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    chats = [[{"role": "user", "content": "short"}], [{"role": "user", "content": "a somewhat longer prompt, padded"}]]
    opts = ["yes", "no thank you", "The seeker feels better."]
    fast = torch.tensor(b.option_loglik(chats, opts))  # prompt once, options against the expanded cache
    naive = torch.tensor(backends.Backend.option_loglik(b, chats, opts))  # every (prompt, option) separately
    assert torch.allclose(fast, naive, atol=1e-4)
    # and the naive path equals a hand computation for one pair, without padding or batching
    p = models.chat_ids(b.tok, chats[1])
    c = b.tok(opts[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(b.model(torch.tensor([p + c])).logits[0], -1)
    hand = sum(lp[len(p) - 1 + j, c[j]].item() for j in range(len(c)))
    assert math.isclose(naive[1, 1].item(), hand, abs_tol=1e-4)


def test_likelihood_critic_is_the_expectation(tiny_model_dir):
    b = backends.HFBackend(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    hist = [[{"role": "user", "content": "I feel bad"}, {"role": "assistant", "content": "Tell me more"},
             {"role": "user", "content": "Thanks, that helps"}]]
    score = sim.critic_scores(b, hist, mode="likelihood")[0]
    chat = sim.critic_chats(hist)[0]
    ll = [b.loglik([chat], [opt])[0] for opt, _ in sim.CRITIC_OPTIONS]
    z = sum(math.exp(x) for x in ll)
    hand = sum(math.exp(x) / z * v for x, (_, v) in zip(ll, sim.CRITIC_OPTIONS))
    assert math.isclose(score, hand, abs_tol=1e-4)
    assert -1.0 <= score <= 1.0


def test_sample_critic_matches_as_ppdpp():
    assert sim.match_critic_option("The seeker feels better, not worse") == -1.0  # PPDPP tries "worse" first
    assert sim.match_critic_option("worse than before") == -1.0
    assert sim.match_critic_option("It's solved!") == 1.0
    assert sim.match_critic_option("no idea") is None
    b = ScriptedBackend(["feels better", "nonsense", "worse", "nonsense"])
    b.generate = lambda chats, n=1, **kw: [["feels better", "nonsense", "worse"], ["nonsense"]]
    assert sim.critic_scores(b, [[], []], mode="sample", n=3) == [(0.5 - 1.0) / 2, 0.0]


@pytest.mark.parametrize("budget", [10**9, 3 * 7 * 11, 2 * 11, 11, 5])  # all at once, row groups, runs of positions
def test_blockwise_log_softmax_and_entropy_match_full(budget):
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 7, 11)).requires_grad_()  # [B, T, V]
    index = torch.randint(0, 11, (4, 7))
    lp = models.selective_log_softmax(logits, index, budget=budget)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.log_softmax(ref_logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-6)
    w = torch.randn(4, 7)
    (lp * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
    p = torch.softmax(ref_logits.detach(), -1)
    ent = -(p * torch.log(p)).sum(-1)
    assert torch.allclose(models.softmax_entropy(logits, budget=budget), ent, atol=1e-5)


@pytest.mark.parametrize("budget", [10**9, 2 * 11, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_log_softmax_with_temperature_matches_full(budget, dtype):
    """The speed path's log-probs at T != 1 (04's default 1.1): values and gradients equal a full fp32
    log_softmax(logits / T), for fp32 and bf16 logits (the gradient comes back in the logits' dtype)."""
    torch.manual_seed(1)
    T = 1.1
    logits = (3 * torch.randn(3, 5, 11)).to(dtype).requires_grad_()
    index = torch.randint(0, 11, (3, 5))
    lp = models.selective_log_softmax(logits, index, budget=budget, temperature=T)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.log_softmax(ref_logits.float() / T, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert lp.dtype == torch.float32 and torch.allclose(lp, ref, atol=1e-5)
    w = torch.randn(3, 5)
    (lp * w).sum().backward()
    (ref * w).sum().backward()
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    p = torch.softmax(ref_logits.detach().float() / T, -1)
    assert torch.allclose(models.softmax_entropy(logits, budget=budget, temperature=T), -(p * p.log()).sum(-1), atol=1e-4)
