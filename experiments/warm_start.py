"""A supervised warm start: teach a small policy the action format and the moves of a demonstrator, before RL.

Why: the embedded 135M model cannot write Sotopia's action JSON, a price or an "I take ..." split (docs/results.md,
2026-12-03), so RAPO's groups hold nothing that the scripted GRM can tell apart by outcome. A few minutes of
supervised fine-tuning on the rule agent's own actions (envs/sotopia_scripted.py in the policy's seat, played by
envs/sotopia.py --policy scripted) gives it those moves; RL then starts from a policy whose candidates differ in
what they offer and accept. This is the usual SFT-then-RL recipe in miniature, not a part of RAPO.

Input: a turns.jsonl of envs/sotopia.py (or any JSONL whose records have `context`, a chat as a list of
{role, content} without the system message, and `target`, the reply to learn). The prompt is the policy's chat:
--system (default: envs/sotopia.AGENT_SYSTEM, as 05 --env sotopia and 06's sotopia protocol use) + context, in the
model's chat template; the loss is the mean cross-entropy over the reply's tokens (the template's end-of-turn token
included), nothing over the prompt.

Training: LoRA (r, alpha; all projections, as 04/05) with AdamW at a constant lr after a linear warm-up, batches of
--batch-size records drawn without replacement, epoch after epoch (seeded). The adapter is then merged into the
base weights and the result saved as a plain transformers model folder (OUT/model: from_pretrained, vLLM, and 05's
--policy, which trains a new adapter on top of it), with the tokenizer; OUT/metrics.jsonl holds the loss per step.
A finished OUT/model is never overwritten (exit 2; --overwrite to redo).

  python experiments/warm_start.py --data runs/rules/turns.jsonl --out runs/warm --steps 120
"""
import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import models  # noqa: E402
from training import LORA_TARGETS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSONL records with `context` (a chat, no system message) and `target`")
    p.add_argument("--out", required=True, help="output folder: model/ (merged), metrics.jsonl, args.json")
    p.add_argument("--model", default="embedded", help="the base model: a folder, hub id or 'embedded' (SmolLM2-135M)")
    p.add_argument("--system", default=None,
                   help="system message put before each context (default: envs/sotopia.AGENT_SYSTEM; '' = none)")
    p.add_argument("--steps", type=int, default=120, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=8, help="records per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--max-examples", type=int, default=0, help="use only the first N records (0: all)")
    p.add_argument("--max-tokens", type=int, default=1536, help="refuse a record whose prompt + reply is longer")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's init and of the batch order")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true", help="redo a finished OUT/model")
    return p.parse_args(argv)


def encode(tok, system: str, rec: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the chat template with the generation prompt, then the reply as the template closes
    an assistant turn (so the end-of-turn token is learnt). Falls back to reply + eos if the template's full
    rendering does not start with its own generation prompt."""
    chat = ([{"role": "system", "content": system}] if system else []) + rec["context"]
    prompt = models.chat_ids(tok, chat)
    full = tok(tok.apply_chat_template(chat + [{"role": "assistant", "content": rec["target"]}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    if full[:len(prompt)] == prompt and len(full) > len(prompt):
        reply = full[len(prompt):]
        while len(reply) > 1 and tok.decode(reply[-1:]).strip() == "":  # trailing newline after the end-of-turn token
            reply = reply[:-1]
        return prompt, reply
    return prompt, tok(rec["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def load_records(path: str, max_examples: int) -> list[dict]:
    recs = common.read_jsonl(path, required=("context", "target"))
    for i, r in enumerate(recs, 1):
        ok = isinstance(r["context"], list) and r["context"] and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant", "system")
            for m in r["context"])
        common.check(ok, f"{path}: record {i} ({r.get('id', '?')}): field context must be a non-empty list of "
                         "{role: user|assistant|system, content: text}")
        common.check(isinstance(r["target"], str) and r["target"].strip(),
                     f"{path}: record {i} ({r.get('id', '?')}): field target must be non-empty text")
    common.check(recs, f"{path}: no records")
    return recs[:max_examples] if max_examples else recs


def sft_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the reply tokens of a batch of (prompt ids, reply ids); prompts carry no loss.
    Exact: one forward and backward over prompt + reply (the reference; tests compare detached_sft_loss to it)."""
    device = next(model.parameters()).device
    ids, mask = models.right_pad([p + r for p, r in batch], pad_id, device)
    labels = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(batch):
        labels[i, len(p):len(p) + len(r)] = True
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = models.selective_log_softmax(logits, ids[:, 1:])  # log p(ids[t+1] | ids[:t+1])
    take = labels[:, 1:]
    return -(lp * take).sum() / take.sum()


def detached_sft_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """The same loss value as sft_loss, at about a quarter of its cost on a CPU (docs/design.md section 11): the prompt but its last token runs once
    without a graph (its keys and values become a cache), then the last prompt token and the reply run with one.
    The gradient is the reply positions' own: it does not flow back into the prompt's keys and values (a stop-
    gradient on the context, as when fine-tuning on top of a frozen prefix)."""
    device = next(model.parameters()).device
    heads = [p[:-1] for p, _ in batch]
    tails = [p[-1:] + r for p, r in batch]
    h_ids, h_mask = models.left_pad(heads, pad_id, device)
    t_ids, t_mask = models.right_pad(tails, pad_id, device)
    h_pos = (h_mask.cumsum(1) - 1).clamp(min=0)
    t_pos = h_mask.sum(1, keepdim=True) + torch.arange(t_ids.shape[1], device=device)[None]
    with torch.no_grad():
        cache = model(input_ids=h_ids, attention_mask=h_mask, position_ids=h_pos, use_cache=True).past_key_values
    logits = model(input_ids=t_ids, attention_mask=torch.cat([h_mask, t_mask], 1), position_ids=t_pos,
                   past_key_values=cache, use_cache=True).logits[:, :-1]
    lp = models.selective_log_softmax(logits, t_ids[:, 1:])
    take = t_mask[:, 1:].bool()
    return -(lp * take).sum() / take.sum()


def main(argv=None):
    a = parse_args(argv)
    common.check(min(a.steps, a.batch_size, a.lora_r, a.lora_alpha, a.max_tokens) >= 1 and a.lr > 0
                 and min(a.warmup_steps, a.max_examples) >= 0, "--steps, --batch-size, LoRA sizes and --max-tokens "
                                                               "must be >= 1, --lr > 0")
    out = Path(a.out)
    common.check(a.overwrite or not (out / "model" / "config.json").exists(),
                 f"{out / 'model'}: a finished warm start is there (--overwrite to redo it)")
    recs = load_records(a.data, a.max_examples)
    from envs import sotopia as S

    system = S.AGENT_SYSTEM if a.system is None else a.system
    device = common.resolve_device(a.device)
    common.seed_everything(a.seed)
    model, tok = models.load_causal_lm(models.resolve_path(a.model), device, torch.float32)
    data = [encode(tok, system, r) for r in recs]
    for i, (p, r) in enumerate(data):
        common.check(len(p) >= 2, f"{a.data}: record {i + 1}: a prompt of under 2 tokens")
        common.check(len(p) + len(r) <= a.max_tokens, f"{a.data}: record {i + 1} ({recs[i].get('id', '?')}): "
                                                      f"{len(p) + len(r)} tokens, over --max-tokens {a.max_tokens}")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.warmup_steps)))
    if a.overwrite:
        shutil.rmtree(out / "model", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    rng, order = random.Random(a.seed), []
    t0 = time.time()
    bar = common.progress(range(a.steps), desc="warm start")
    for step in bar:
        if len(order) < a.batch_size:  # next epoch: a fresh permutation after what is left of this one
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:a.batch_size], order[a.batch_size:]
        loss = detached_sft_loss(model, [data[i] for i in idx], tok.pad_token_id)
        common.check(torch.isfinite(loss).item(), f"warm start: loss is {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        common.append_jsonl(out / "metrics.jsonl", [{"step": step + 1, "loss": round(loss.item(), 5),
                                                      "time": round(time.time() - t0, 2)}])
        bar.set_postfix(loss=f"{loss.item():.3f}")
    merged = model.merge_and_unload()
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out / "model")
    common.save_args(a, out, {"stage": "warm_start", "records": len(data), "inputs": {"data": common.input_digest(a.data)}})
    print(f"wrote {out / 'model'} ({len(data)} records, {a.steps} steps, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    common.run_main(main)
