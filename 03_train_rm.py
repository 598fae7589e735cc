"""Stage 03: the future-oriented reward model (RLFF-ESC stage 2; docs/design.md section 4).

A sequence classifier with one logit reads the chat template of (context, candidate as the final assistant
message), truncated from the left so the candidate and the latest turns survive, and learns the simulated
future outcome of rollouts.jsonl (02_simulate.py). GRPO (04_grpo.py) then scores replies with it through
`load_reward_model` + `score`, cheaply, instead of simulating every completion.

Objectives (--objective), for logits s (one per candidate):
  classification  BCE(s, label); R_fut = sigmoid(s)                         (the paper's choice, 41.5% SR)
  regression      MSE(s, r_fut); R_fut = s
  ranking         Bradley-Terry over pairs (i, j) of candidates of the same context with r_i > r_j:
                  -log sigmoid(s_i - s_j); R_fut = sigmoid(s)               (the paper's ablation, 26.9% SR)
Each loss is a sum over examples (pairs for ranking) divided by their count in the whole optimiser step:
all micro-batches of all ranks, known up front because every rank holds the same data order. So the gradient
does not depend on --grad-accum or on the number of ranks (1 rank x accum 2 == 2 ranks x accum 1).

Deviations and decisions (the paper gives only "a LLaMA-3.2-1B binary classifier"):
 1. LoRA (r=16, alpha=32 on all projections, RAPO E.3.1's policy settings) + the score head; --full for full
    fine-tuning. lr, epochs, warm-up and the valid fraction are ours.
 2. Batches hold whole groups (all candidates of a context), so ranking pairs never straddle micro-batches.
 3. Valid metrics threshold sigmoid(s) at 0.5 (classification, ranking) or s at --delta (regression); ECE is
    reported for the probabilistic objectives only (for ranking, sigmoid(s) is a score, not a probability).
 4. One context rule for training and use: rollouts simulated with 02's --context-window N carry N; the model
    reads the last N messages of a context (rm_input_ids) and rm_info.json records N, so when 04 scores a
    full turn context it is cut the same way (the model never sees longer contexts than it was trained on).

Run:
  python 03_train_rm.py --data runs/demo/rollouts.jsonl --out runs/demo
  torchrun --nproc_per_node=8 03_train_rm.py --data runs/esconv/rollouts.jsonl --out runs/esconv \\
      --rm meta-llama/Llama-3.2-1B-Instruct --batch-size 16
Writes OUT/rm/: save_pretrained (the PEFT adapter with its score head, or the full model) + tokenizer,
rm_metrics.json (valid metrics, per-step history, per-candidate valid predictions), rm_info.json, args.json.
--resume continues from OUT/rm_ckpt/ (kept until the run ends).
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import models
import training
from common import check


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="runs/demo/rollouts.jsonl", out="runs/demo", resume_flag="resume")
    g = p.add_argument_group("model")
    g.add_argument("--rm", default=common.DEFAULT_MODEL,
                   help="base LM of the reward model: hf:PATH, hub id or 'embedded' (paper: LLaMA-3.2-1B; "
                        f"default: {common.DEFAULT_MODEL})")
    g.add_argument("--objective", default="classification", choices=["classification", "regression", "ranking"],
                   help="BCE on label (paper), MSE on reward, or pairwise Bradley-Terry within a context (paper's ablation)")
    g.add_argument("--max-length", type=int, default=1024, help="tokens kept per input, cut from the left (ours: 1024)")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (use --dtype float32 on GPU)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (RAPO E.3.1: 16)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha, >= 1 (RAPO E.3.1: 32)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (paper: not given)")
    g = p.add_argument_group("training")
    g.add_argument("--valid-frac", type=float, default=0.2,
                   help="fraction of dialogues held out for validation (split by dialogue; ours: 0.2)")
    g.add_argument("--epochs", type=int, default=2, help="passes over the train split (paper: not given)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (ours: 1e-4 for LoRA; ~1e-5 for --full)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction of the steps, then linear decay to 0 (ours: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, >= 0 (ours: 0)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="examples per micro-batch (ours: 8; whole groups: a context's candidates are never split)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step and rank (ours: 1)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this value, > 0 (RAPO: 1.0; a large value clips nothing)")
    g.add_argument("--eval-batch-size", type=int, default=16, help="examples per forward pass when scoring valid (ours: 16)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimiser steps (the schedule still spans --epochs; continue with --resume)")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint to OUT/rm_ckpt every N optimiser steps (ours: 50)")
    g.add_argument("--delta", type=float, default=None,
                   help="regression only: valid label threshold on the predicted r_fut (default: the --delta "
                        "of the 02 run, from the args.json beside --data, else 0.5)")
    args = p.parse_args(argv)
    common.check_common_args(args)
    # --resume: the run's own settings; --max-steps stops one invocation here (like 04's --stop-after), never restored
    args = common.resume_args(p, args, argv, Path(args.out) / "rm_ckpt", per_call=("max_steps",))
    check(args.max_length >= 8, "--max-length must be >= 8")
    check(0 < args.valid_frac < 1, "--valid-frac must be in (0, 1)")
    check(args.epochs >= 1 and args.batch_size >= 1 and args.grad_accum >= 1 and args.eval_batch_size >= 1,
          "--epochs, --batch-size, --grad-accum and --eval-batch-size must be >= 1")
    check(args.lr > 0 and 0 <= args.warmup_ratio < 1, "--lr must be > 0 and --warmup-ratio in [0, 1)")
    check(args.lora_r >= 1 and 0 <= args.lora_dropout < 1, "--lora-r must be >= 1 and --lora-dropout in [0, 1)")
    training.check_optimizer_args(args)  # --max-grad-norm > 0, --weight-decay >= 0, --lora-alpha >= 1
    check(args.max_steps is None or args.max_steps >= 1, "--max-steps must be >= 1")
    check(args.save_every >= 1, "--save-every must be >= 1")
    check(args.max_examples is None or args.max_examples >= 1, "--max-examples must be >= 1")
    check(common.parse_spec(args.rm).backend == "hf", f"--rm {args.rm}: the reward model is trained in-process (hf: or a path)")
    common.check_model_path(args.rm, "--rm")
    return args


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: inputs and the three objectives (docs/design.md section 4)


def rm_input_ids(tok, contexts: list[list[dict]], replies: list[str], max_length: int,
                 context_window: int = 0) -> list[list[int]]:
    """The reward model's one input rule, in training and when 04 queries it: the last context_window messages
    of the context (0 = all; 02's --context-window, recorded in rm_info.json), the chat template of those +
    the reply as the final assistant message, cut from the left to max_length tokens."""
    out = []
    for ctx, y in zip(contexts, replies):
        msgs = common.last_messages(ctx, context_window) + [{"role": "assistant", "content": y}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"][-max_length:])  # keep the end
    return out


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and mask padded on the right: positions need no shifting, and the classifier pools the
    rightmost non-pad token (the end of the candidate's turn)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def rm_logits(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B] one logit per sequence (float32)."""
    device = next(model.parameters()).device
    ids, mask = right_pad(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def ranking_pairs(groups: list[str], rewards: list[float]) -> list[tuple[int, int]]:
    """(i, j) with the same group and r_i > r_j (ties give no pair): the Bradley-Terry comparisons."""
    return [(i, j) for i in range(len(groups)) for j in range(len(groups))
            if groups[i] == groups[j] and rewards[i] > rewards[j]]


def rm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, groups: list[str],
                objective: str) -> tuple[torch.Tensor, int]:
    """(sum of per-example (per-pair for ranking) losses, their count) for one micro-batch; logits [B]."""
    if objective == "classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum"), len(logits)
    if objective == "regression":
        return ((logits - rewards.to(logits.dtype)) ** 2).sum(), len(logits)
    pairs = ranking_pairs(groups, rewards.tolist())
    if not pairs:
        return logits.sum() * 0.0, 0  # keeps the graph (DDP needs a backward on every rank)
    i, j = torch.tensor(pairs, device=logits.device).T
    return -F.logsigmoid(logits[i] - logits[j]).sum(), len(pairs)  # Bradley-Terry: p(i beats j) = sigmoid(s_i - s_j)


def to_reward(logits: torch.Tensor, objective: str) -> torch.Tensor:
    """R_fut from the logit: sigmoid for classification (a probability) and ranking (a bounded score);
    the raw value for regression (a predicted r_fut)."""
    return logits if objective == "regression" else torch.sigmoid(logits)


# ----------------------------------------------------------------------------------------------------
# Metrics (numpy only)


def roc_auc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (Mann-Whitney U with
    average ranks); NaN when one class is missing."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks (1-based) over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(labels, probs, bins: int = 10) -> float:
    """sum_b (n_b / N) |mean(label in b) - mean(prob in b)| over `bins` equal-width bins of [0, 1]
    (the last bin includes 1.0)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).sum()
                     for b in range(bins) if (idx == b).any()) / len(y))


def binary_metrics(labels, scores, threshold: float, probs=None) -> dict:
    """Accuracy, ROC-AUC, F1, predicted and true positive rate, and ECE (if probs are given)."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) > threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {
        "n": int(len(y)), "accuracy": float((pred == y).mean()), "roc_auc": roc_auc(y, scores),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "positive_rate": float(pred.mean()), "label_positive_rate": float(y.mean()),
        "ece": expected_calibration_error(y, probs) if probs is not None else None, "threshold": threshold,
    }


# ----------------------------------------------------------------------------------------------------
# Loading and scoring (used by 04_grpo.py)


def check_reward_model_folder(path: str | Path):
    """InputError unless `path` holds a sequence classifier (what this script saves), before anything loads: a
    causal-LM adapter or model from 04/05 would otherwise fail deep inside transformers or PEFT."""
    path = Path(path)
    check(path.is_dir(), f"--rm {path}: reward model folder not found (train one with 03_train_rm.py)")
    if models.is_adapter_folder(str(path)):
        task = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        check(task == "SEQ_CLS", f"--rm {path}: a PEFT adapter for {task}, not a reward model: pass the rm/ folder "
              "03_train_rm.py wrote")
        return
    cfg = path / "config.json"
    check(cfg.is_file(), f"--rm {path}: no config.json or adapter_config.json: not a model folder")
    arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    check(any(a.endswith("ForSequenceClassification") for a in arch),
          f"--rm {path}: a {', '.join(arch) or 'model'} without a classification head, not a reward model: pass the "
          "rm/ folder 03_train_rm.py wrote")


def load_reward_model(path: str | Path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a reward model saved by this script: a PEFT adapter folder (base model from its
    adapter_config.json) or a full AutoModelForSequenceClassification folder. `model.rm_info` holds the
    objective, max_length and context_window that `score` uses."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    check_reward_model_folder(path)
    info_path = path / "rm_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"objective": "classification", "max_length": 1024}
    tok = models.load_tokenizer(str(path))
    if models.is_adapter_folder(str(path)):
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not Path(base).exists() and info.get("base"):
            base = models.resolve_path(common.parse_spec(info["base"]).name)  # moved machines: 'embedded' etc.
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(model, str(path))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    model.rm_info = info
    return model.to(device).eval(), tok


@torch.no_grad()
def score(rm, tok, contexts: list[list[dict]], replies: list[str], batch_size: int = 16) -> list[float]:
    """R_fut(x, y) for a batch of (context messages, reply text): sigmoid(logit) for classification and
    ranking models, the predicted r_fut for regression ones. Batched, right padded, each input built by
    rm_input_ids with the rule the model was trained with (its context window and max_length)."""
    info = getattr(rm, "rm_info", {})
    seqs = rm_input_ids(tok, contexts, replies, info.get("max_length", 1024), info.get("context_window", 0))
    out = []
    for s in range(0, len(seqs), batch_size):
        out += to_reward(rm_logits(rm, seqs[s:s + batch_size], tok.pad_token_id), info.get("objective", "classification")).tolist()
    return out


# ----------------------------------------------------------------------------------------------------
# Data


def load_rollouts(path: str, max_examples: int | None, max_chars: int = common.MAX_MESSAGE_CHARS) -> list[dict]:
    """rollouts.jsonl, validated; the first max_examples contexts (all their candidates)."""
    recs = common.read_jsonl(path, required=("id", "turn_id", "context", "response", "reward", "label"))
    check(len(recs) > 0, f"{path}: no rollouts")
    for i, r in enumerate(recs, 1):
        where = f"{path}: line {i}"
        check(isinstance(r["context"], list) and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                                     and isinstance(m.get("content"), str) for m in r["context"]),
              f"{where}: field 'context' must be a list of {{role: user|assistant, content: str}}")
        check(isinstance(r["response"], str), f"{where}: field 'response' must be a string")
        common.check_message_lengths(r["context"] + [{"content": r["response"]}], f"{where}: context + response", max_chars)
        w = r.setdefault("context_window", 0)  # 02 records it; files without it were simulated on whole contexts
        check(isinstance(w, int) and w >= 0 and w == recs[0].get("context_window", 0),
              f"{where}: field 'context_window' is {w!r}, line 1 has {recs[0].get('context_window', 0)!r}: the "
              "reward model reads every context by one rule, so one file must come from one --context-window")
        check(r["label"] in (0, 1) and not isinstance(r["label"], float), f"{where}: field 'label' must be 0 or 1")
        check(isinstance(r["reward"], (int, float)) and math.isfinite(r["reward"]), f"{where}: field 'reward' must be a finite number")
        r.setdefault("dialog_id", r["turn_id"].rsplit("-t", 1)[0])
    if max_examples:
        keep = list(dict.fromkeys(r["turn_id"] for r in recs))[:max_examples]
        recs = [r for r in recs if r["turn_id"] in set(keep)]
    return recs


def split_by_dialogue(recs: list[dict], seed: int, valid_frac: float) -> tuple[list[dict], list[dict]]:
    """Train/valid by dialogue (never by turn or candidate), deterministic from the seed; >= 1 dialogue each."""
    ids = sorted({r["dialog_id"] for r in recs})
    random.Random(seed).shuffle(ids)
    n_valid = min(max(1, round(len(ids) * valid_frac)), len(ids) - 1)
    valid = set(ids[:n_valid])
    return [r for r in recs if r["dialog_id"] not in valid], [r for r in recs if r["dialog_id"] in valid]


def pack_groups(recs: list[dict], order: list[str], batch_size: int) -> list[list[int]]:
    """Micro-batches of record indices, whole groups (turn_id) in `order`, up to batch_size examples each
    (a group larger than batch_size is a micro-batch on its own)."""
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        by_group.setdefault(r["turn_id"], []).append(i)
    batches, cur = [], []
    for g in order:
        if cur and len(cur) + len(by_group[g]) > batch_size:
            batches.append(cur)
            cur = []
        cur = cur + by_group[g]
    return batches + ([cur] if cur else [])


def epoch_batches(recs: list[dict], seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """The epoch's micro-batches: groups shuffled by (seed, epoch), identical on every rank."""
    groups = list(dict.fromkeys(r["turn_id"] for r in recs))
    perm = np.random.default_rng([seed, epoch]).permutation(len(groups))
    return pack_groups(recs, [groups[k] for k in perm], batch_size)


def count_terms(recs: list[dict], batch: list[int], objective: str) -> int:
    """Loss terms of a micro-batch (examples, or pairs for ranking): the denominators, without a model."""
    if objective != "ranking":
        return len(batch)
    return len(ranking_pairs([recs[i]["turn_id"] for i in batch], [recs[i]["reward"] for i in batch]))


# ----------------------------------------------------------------------------------------------------


def build_model(args, device, dtype, tok):
    """AutoModelForSequenceClassification (one logit) on the base LM, pad id in its config, LoRA or full."""
    from transformers import AutoModelForSequenceClassification

    base = models.resolve_path(common.parse_spec(args.rm).name)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id  # Llama-style configs have none: needed to find the last token
    if not args.full:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=training.LORA_TARGETS)  # SEQ_CLS: the score head is trained and saved (modules_to_save)
        model = get_peft_model(model, cfg)
    return model.to(device)


def micro_batch_loss(model, tok, recs: list[dict], args) -> torch.Tensor:
    """Summed loss of one micro-batch (whole groups) under --objective."""
    seqs = rm_input_ids(tok, [r["context"] for r in recs], [r["response"] for r in recs], args.max_length,
                        recs[0]["context_window"])
    logits = rm_logits(model, seqs, tok.pad_token_id)  # [b]
    labels = torch.tensor([r["label"] for r in recs], device=logits.device)
    rewards = torch.tensor([r["reward"] for r in recs], dtype=torch.float32, device=logits.device)
    return rm_loss_sum(logits, labels, rewards, [r["turn_id"] for r in recs], args.objective)[0]


@torch.no_grad()
def evaluate(model, tok, recs: list[dict], args, threshold: float) -> dict:
    model.eval()
    seqs = rm_input_ids(tok, [r["context"] for r in recs], [r["response"] for r in recs], args.max_length,
                        recs[0]["context_window"])
    logits = torch.cat([rm_logits(model, seqs[s:s + args.eval_batch_size], tok.pad_token_id)
                        for s in range(0, len(seqs), args.eval_batch_size)])
    model.train()
    scores = to_reward(logits, args.objective).cpu().numpy()
    labels = [r["label"] for r in recs]
    m = binary_metrics(labels, scores, threshold, probs=scores if args.objective == "classification" else None)
    if args.objective == "regression":
        m["mse"] = float(np.mean((scores - np.array([r["reward"] for r in recs])) ** 2))
    m["predictions"] = [{"id": r["id"], "label": r["label"], "reward": r["reward"], "score": float(x)}
                        for r, x in zip(recs, scores)]  # for audit, and to check a reloaded model against
    return m


def save_checkpoint(path: Path, args, dist, inputs: dict, model, opt, sched, step: int, micro_batches_per_step: int,
                    history: list, valid_history: list):
    """Trainable weights, optimiser, scheduler, step and the loss history so far (the data order and dropout
    seeds follow from the step), swapped in atomically by common.save_checkpoint."""
    def write(tmp: Path):
        if dist.main:
            trainable = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
            torch.save({"model": trainable, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                        "micro_batches_per_step": micro_batches_per_step, "history": history,
                        "valid_history": valid_history}, tmp / "state.pt")
    common.save_checkpoint(path, step, args, dist, write, inputs)


def main(argv=None):
    args = parse_args(argv)
    recs = load_rollouts(args.data, args.max_examples, args.max_message_chars)  # validation before any work
    check(len({r["dialog_id"] for r in recs}) >= 2,
          f"{args.data}: the train/valid split is by dialogue and needs rollouts from >= 2 dialogues "
          "(02_simulate.py --per-dialogue K --max-examples N spreads contexts over dialogues)")
    train, valid = split_by_dialogue(recs, args.seed, args.valid_frac)
    pos = sum(r["label"] for r in train)
    check(args.objective != "classification" or 0 < pos < len(train),
          f"{args.data}: all {len(train)} train labels are {int(pos > 0)}: relabel the rollouts by re-running "
          "02_simulate.py with another --delta (no new simulation), or use --objective regression")
    if args.objective == "ranking":
        check(sum(count_terms(train, b, "ranking") for b in epoch_batches(train, args.seed, 0, args.batch_size)) > 0,
              f"{args.data}: no pair of candidates of one context with different rewards: ranking has nothing to learn")
    threshold = 0.5
    if args.objective == "regression":
        prev = Path(args.data).parent / "args.json"
        d = json.loads(prev.read_text()).get("delta") if prev.exists() else None
        threshold = args.delta if args.delta is not None else d if d is not None else 0.5
    out_dir, rm_dir, ckpt = Path(args.out), Path(args.out) / "rm", Path(args.out) / "rm_ckpt"
    inputs = common.input_digests(args, ("data",))

    dist = common.init_dist(args.device)
    common.lock_out(out_dir, dist)  # one run at a time on --out
    dtype = models.resolve_dtype(args.dtype, dist.device)
    common.seed_everything(args.seed)  # same on every rank: identical score-head / LoRA init
    tok = models.load_tokenizer(models.resolve_path(common.parse_spec(args.rm).name))
    model = build_model(args, dist.device, dtype, tok)
    raw = model  # the unwrapped model: saved, evaluated
    model = training.wrap_ddp(model, dist)
    params = [p for p in raw.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    W, A = dist.world, args.grad_accum
    steps_per_epoch = [math.ceil(len(epoch_batches(train, args.seed, e, args.batch_size)) / (W * A)) for e in range(args.epochs)]
    total = sum(steps_per_epoch)
    warm = int(args.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    step = 0
    history, valid_history = [], []  # per optimiser step / per epoch; restored on --resume
    if args.resume:
        found = common.find_checkpoint(ckpt)
        check(found is not None, f"--resume: no checkpoint in {ckpt}")
        st = common.load_state(found[0] / "state.pt", map_location=dist.device)
        named = {k: v for k, v in raw.named_parameters() if v.requires_grad}
        training.check_same_tensors(st["model"], named, found[0] / "state.pt")  # names and shapes, or stop
        with torch.no_grad():
            for k, v in st["model"].items():
                named[k].copy_(v)
        opt.load_state_dict(st["optimizer"])
        training.resume_schedule(sched, st["scheduler"])
        step = st["step"]
        history, valid_history = st["history"], st["valid_history"]
        check(st.get("micro_batches_per_step") == W * A,
              f"--resume: {ckpt} was made with {st.get('micro_batches_per_step')} micro-batches per step (ranks x "
              f"--grad-accum), now {W * A}: the data position would not match")
    stop = min(total, args.max_steps) if args.max_steps else total
    n_train_params = sum(p.numel() for p in params)
    common.print0(f"{len(recs)} rollouts: {len(train)} train ({pos} positive), {len(valid)} valid, split by dialogue; "
                  f"{args.objective}, {'full' if args.full else 'LoRA'} ({n_train_params:,} trainable parameters), "
                  f"{total} optimiser steps of {W} rank(s) x {A} micro-batches; starting at step {step}")

    t0 = time.time()
    bar = common.progress(total=stop, initial=step, desc="train rm", unit="step")
    model.train()
    g = 0  # global step counter while walking the epochs (the data position is a function of the step)
    for epoch in range(args.epochs):
        batches = epoch_batches(train, args.seed, epoch, args.batch_size)
        for s in range(steps_per_epoch[epoch]):
            if g >= stop:
                break
            if g < step:  # resumed: these steps are done
                g += 1
                continue
            glob = batches[s * W * A:(s + 1) * W * A]  # this step's micro-batches over all ranks
            n_glob = sum(count_terms(train, b, args.objective) for b in glob)  # the global denominator
            if n_glob > 0:  # (ranking: a step without any pair of different rewards is skipped on every rank alike)
                mine = glob[dist.rank::W]
                n_back = math.ceil(len(glob) / W)  # the same number of backward passes on every rank (DDP)
                torch.manual_seed(args.seed * 1_000_003 + g * W + dist.rank)  # LoRA dropout: differs per rank and step
                loss_sum = 0.0
                for i in range(n_back):
                    b, weight = (mine[i], 1.0) if i < len(mine) else (glob[0], 0.0)  # no batch left here: weight 0
                    sync = contextlib.nullcontext() if (W == 1 or i == n_back - 1) else model.no_sync()
                    with sync:  # gradients are all-reduced on the last micro-batch only
                        ls = micro_batch_loss(model, tok, [train[k] for k in b], args)
                        # / the global term count; * W undoes DDP's average over ranks
                        (ls * weight * W / n_glob).backward()
                    loss_sum += weight * ls.item()
                loss_t = common.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64), dist).item() / n_glob
                try:  # clip (after the all-reduce), and step unless the loss or gradient norm is not finite
                    gnorm = training.optimizer_step(params, opt, None, loss_t, args.max_grad_norm, dist)
                except common.StageFailure as e:
                    raise common.StageFailure(
                        f"step {g + 1}: {e}: {ckpt if (ckpt / 'state.pt').exists() else 'no checkpoint'} is the last "
                        f"good state, {rm_dir} was not written") from None
                opt.zero_grad(set_to_none=True)
                history.append({"step": g + 1, "epoch": epoch, "loss": loss_t, "grad_norm": gnorm,
                                "lr": sched.get_last_lr()[0], "terms": n_glob})
                bar.set_postfix(loss=f"{loss_t:.4f}")
            sched.step()
            g += 1
            bar.update(1)
            if (g % args.save_every == 0 or g == stop) and g < total:  # every rank (barriers inside)
                save_checkpoint(ckpt, args, dist, inputs, raw, opt, sched, g, W * A, history, valid_history)
        # every finished epoch but the last is evaluated once (the final evaluation follows the loop); a run resumed
        # from a checkpoint at an epoch's end evaluates that epoch here, with the weights it had then
        if dist.main and step <= g < stop and not any(v["epoch"] == epoch for v in valid_history):
            v = evaluate(raw, tok, valid, args, threshold)
            valid_history.append({"epoch": epoch, "step": g, **{k: v[k] for k in ("roc_auc", "accuracy", "f1")}})
            bar.write(f"epoch {epoch}: valid ROC-AUC {v['roc_auc']:.3f} accuracy {v['accuracy']:.3f} F1 {v['f1']:.3f}")
    bar.close()
    common.barrier(dist)

    if dist.main:
        metrics = evaluate(raw, tok, valid, args, threshold)
        metrics.update({"objective": args.objective, "steps": g, "total_steps": total, "train_examples": len(train),
                        "valid_dialogues": sorted({r["dialog_id"] for r in valid}), "train_seconds": time.time() - t0,
                        "auc_above_chance": bool(metrics["roc_auc"] > 0.5), "history": history,
                        "valid_history": valid_history})
        tmp = out_dir / "rm.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        raw.save_pretrained(tmp)  # PEFT: adapter + score head (modules_to_save); full: the whole model
        tok.save_pretrained(tmp)
        common.write_json(tmp / "rm_info.json", {"objective": args.objective, "max_length": args.max_length,
                                                 "context_window": recs[0]["context_window"], "base": args.rm,
                                                 "threshold": threshold, "lora": not args.full})
        common.save_args(args, tmp, {"stage": "03_train_rm"})
        common.write_json(tmp / "rm_metrics.json", {k: None if isinstance(v, float) and math.isnan(v) else v
                                                    for k, v in metrics.items()})  # NaN (one-class valid) -> null
        shutil.rmtree(rm_dir, ignore_errors=True)
        os.replace(tmp, rm_dir)  # the whole folder appears at once
        if g >= total:  # finished: nothing to resume
            for p in common.checkpoint_paths(ckpt):
                shutil.rmtree(p, ignore_errors=True)
        print(f"valid ({metrics['n']} candidates, {len(metrics['valid_dialogues'])} dialogues): accuracy "
              f"{metrics['accuracy']:.3f}, ROC-AUC {metrics['roc_auc']:.3f}, F1 {metrics['f1']:.3f}, predicted positive "
              f"rate {metrics['positive_rate']:.3f} (true {metrics['label_positive_rate']:.3f})"
              + (f", ECE {metrics['ece']:.3f}" if metrics["ece"] is not None else "") + f"; wrote {rm_dir} (rm_metrics.json in it)")
        if not metrics["roc_auc"] > 0.5:
            what = (f"is {metrics['roc_auc']:.3f}, not above 0.5: this reward model ranks candidates no better than chance"
                    if not math.isnan(metrics["roc_auc"]) else "is undefined: the valid split has only one label")
            print("\n" + "!" * 100 + f"\nWARNING: valid ROC-AUC {what}.\nGRPO with it optimises noise (the paper's "
                  "GRPO_Random: 18.5% SR). More rollouts, a capable --critic in 02, or more epochs.\n" + "!" * 100,
                  file=sys.stderr)
    training.finish(out_dir, None, dist, done=False)  # (the rm folder is written above)


if __name__ == "__main__":
    common.run_main(main)
