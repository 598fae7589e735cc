"""experiments/warm_start.py: the supervised warm start before RL on Sotopia (loss, masking, the detached-prefix
loss against the exact one, bad input, the merged model it writes)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import models
from conftest import ROOT, run_in_process

spec = importlib.util.spec_from_file_location("warm_start", ROOT / "experiments" / "warm_start.py")
W = importlib.util.module_from_spec(spec)
spec.loader.exec_module(W)


def records(n: int = 6) -> list[dict]:
    return [{"id": f"r{i}", "context": [{"role": "user", "content": f"Scenario {i}: sell the lamp. " + "word " * (3 * i)}],
             "target": json.dumps({"action_type": "speak", "argument": f"I am asking ${40 + i} for it."})}
            for i in range(n)]


def lora_model(folder: Path, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_causal_lm(str(folder), torch.device("cpu"), torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.0))
    for n, p in model.named_parameters():  # a non-zero adapter: its B matrices start at 0
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model, tok


def test_encode_masks_the_prompt_and_keeps_the_end_of_turn(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    rec = records(1)[0]
    prompt, reply = W.encode(tok, "You play a character.", rec)
    assert prompt == models.chat_ids(tok, [{"role": "system", "content": "You play a character."}] + rec["context"])
    assert tok.decode(reply) == rec["target"] + "<|im_end|>"  # the end-of-turn token is learnt, the newline after it is not


def test_detached_loss_equals_the_exact_loss(tiny_model_dir):
    """Same value as one forward over prompt + reply, with prompts of different lengths (left padding, positions,
    the cache), and a gradient that reaches the adapter; the loss covers the reply tokens only."""
    model, tok = lora_model(tiny_model_dir)
    data = [W.encode(tok, "sys", r) for r in records(4)]
    exact = W.sft_loss(model, data, tok.pad_token_id)
    detached = W.detached_sft_loss(model, data, tok.pad_token_id)
    assert abs(exact.item() - detached.item()) < 1e-5
    # by hand: each reply token's log-probability from the model run on that record alone, no padding
    lps = []
    for p, r in data:
        ids = torch.tensor([p + r])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        lps += [lp[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
    assert abs(exact.item() + sum(lps) / len(lps)) < 1e-5
    detached.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_warm_start_learns_and_writes_a_loadable_model(tiny_model_dir, tmp_path):
    data = tmp_path / "turns.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(2)))
    out = tmp_path / "warm"
    run_in_process("experiments/warm_start.py", "--data", data, "--out", out, "--model", tiny_model_dir, "--steps", "25",
                   "--batch-size", "2", "--lr", "3e-2", "--warmup-steps", "1", "--system", "", "--device", "cpu")
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    # a random 32-wide model cannot go far below ln(vocab) (its tied output rows are tiny), but it must go down
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # a plain model folder: no adapter left
    assert not (out / "model" / "adapter_config.json").exists() and not any("lora" in n for n, _ in merged.named_parameters())
    # the merged weights hold what was learnt: their loss on the data is below the start model's
    tok = models.load_tokenizer(str(out / "model"))
    start, _ = models.load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        loss, loss0 = (W.sft_loss(m, [W.encode(tok, "", r) for r in records(2)], tok.pad_token_id).item()
                       for m in (merged, start))
    assert loss < loss0 - 0.1 and abs(loss0 - losses[0]) < 1e-3
    r = run_in_process("experiments/warm_start.py", "--data", data, "--out", out, "--model", tiny_model_dir, "--steps", "1",
                       check=False)
    assert r.returncode == 2 and "a finished warm start is there" in r.stderr


@pytest.mark.parametrize("bad, field", [({"context": [], "target": "x"}, "context"),
                                        ({"context": [{"role": "user", "content": "hi"}], "target": ""}, "target"),
                                        ({"context": [{"role": "bot", "content": "hi"}], "target": "x"}, "context")])
def test_bad_records_stop_before_any_work(tmp_path, bad, field):
    data = tmp_path / "turns.jsonl"
    data.write_text(json.dumps(records(1)[0]) + "\n" + json.dumps({"id": "bad", **bad}) + "\n")
    r = run_in_process("experiments/warm_start.py", "--data", data, "--out", tmp_path / "w", "--model", "/nonexistent",
                       check=False)
    assert r.returncode == 2 and f"record 2 (bad): field {field}" in r.stderr and not (tmp_path / "w").exists()


def test_teacher_probe(tiny_model_dir, tmp_path):
    """experiments/teacher_probe.py: the student and teacher chats of a logged group (worst and best by GRM score,
    the hindsight block as 05 builds it), one batched greedy decode, and a bad log refused with exit 2."""
    spec = importlib.util.spec_from_file_location("teacher_probe", ROOT / "experiments" / "teacher_probe.py")
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    from envs import sotopia as S

    sample = {"step": 3, "context": [{"role": "user", "content": "You are Ada. Your action as JSON:"}],
              "replies": ['{"action_type": "speak", "argument": "A"}', '{"action_type": "speak", "argument": "B"}',
                          '{"action_type": "speak", "argument": "C"}'],
              "reactions": ["Turn #1: Bo said: \"no\"", "Turn #1: Bo said: \"deal\"", "Turn #1: Bo said: \"maybe\""],
              "grm": {"scores": [0.5, 0.9, 0.1], "critiques": ["ok", "good", "bad"]}}
    student, teacher, w, b = P.probe_chats(sample)
    assert (w, b) == (2, 1) and student[0]["content"] == S.AGENT_SYSTEM and student[1:] == sample["context"]
    assert teacher[1:] == S.teacher_context(sample["context"], response=sample["replies"][2], reaction=sample["reactions"][2],
                                            critique="bad", best=sample["replies"][1])
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    r = run_in_process("experiments/teacher_probe.py", "--run", run, "--model", tiny_model_dir, "--max-new-tokens", "4")
    assert "step 3: best candidate" in r.stdout and "of 1 teacher answers copy" in r.stdout
    (run / "samples.jsonl").write_text(json.dumps({**sample, "reactions": None}) + "\n")
    r = run_in_process("experiments/teacher_probe.py", "--run", run, "--model", "/nonexistent", check=False)
    assert r.returncode == 2 and "record 1: field grm/reactions" in r.stderr
