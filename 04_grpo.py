"""Stage 04: GRPO on the ESC policy with future-oriented + format rewards (RLFF-ESC stage 3; docs/design.md section 5).

One step, per rank: B prompts (turn contexts from turns.jsonl), G completions each, sampled from the policy;
rewards r_i = R_fut(x, y_i) + alpha * R_fmt(y_i) + R_len(y_i); group advantages (Eq. 1); the clipped
surrogate with DAPO clip-higher and a k3 KL penalty against the reference policy (Eq. 2-3); one AdamW step.

    A_i  = (r_i - mean_g r) / (std_g r + eps)                                  Eq. 1 (unbiased std)
    rho_t = exp(logp_t - logp_old_t)
    L_t  = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t   Eq. 2-3
    KL_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1                  k3 estimator
    L    = sum_t L_t / (global completion-token count)                         --loss-agg token-mean

Options researchers reach for, each one flag, off by default (the defaults are the papers' settings above):
    --scale-rewards batch|none   A_i = (r_i - mean_g r) / (std_batch r + eps) | r_i - mean_g r     (TRL; Dr. GRPO)
    --reward-combine gdpo        A = norm_batch(sum_k w_k A(r_k)): Eq. 1 per reward part, then summed    (GDPO)
    --is-level sequence          rho_i = exp(mean_t (logp_t - logp_old_t)), one ratio per completion,
                                 clipped to [1 - 3e-4, 1 + 4e-4] (--seq-eps-low/-high)                  (GSPO)
    --rollout-is token|sequence  L_t = -w min(...) + beta KL_t, w = min(pi_old / pi_engine, C) per token, or
                                 per completion (product of the ratios); --rollout vllm                 (TIS)
    --rollout-mask token|sequence  tokens (completions: geometric-mean ratio) whose pi_old / pi_engine leaves
                                 [lo, hi] get no loss and leave the denominators     (verl rollout_correction)
    --mask-truncated             completions cut at --max-new-tokens without EOS get no loss        (DAPO)
    --dynamic-sampling           groups with all-equal rewards (A = 0) are replaced by new prompts  (DAPO)
    --eval-every N               mean reward of one completion per held-out turn, fixed seed: eval_* metrics

logp are computed from logits / sampling temperature. The reference is the initial policy: with LoRA it is
the same network with the adapter disabled (`model.disable_adapter()`), so no second model is held; with
`--no-lora` (full fine-tuning) a frozen copy is kept, the only case where a second model exists.

Read top to bottom: settings, rewards, advantages, log-probs, the loss, the update, the training loop. The
log-probs and rollouts written here are the plain versions (one forward of prompt + completion per sequence,
one generate() call). speed.py holds their faster twins (same signature, tested equal: each context runs once
for its G completions, merged-LoRA and static decoding, vLLM), chosen in ONE place below (`logps_fn`,
`sampler`; the defaults use them, `--no-shared-prefix --no-rollout-merge` the plain ones). Set-up,
checkpoints and logs are in training.py.

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
    is the step number and a resumed run sees exactly the prompts it would have seen. (--dynamic-sampling: the
    data position is the number of prompt batches drawn, saved in the checkpoint.)
 7. Distributed: prompts of a step are split over ranks (whole groups stay on one rank); DDP averages
    gradients over ranks, so each rank's loss is multiplied by the world size and divided by the
    all-reduced global token (or sequence) count: the gradient is that of the global-batch loss, for any
    number of ranks and micro-batches.
 8. `--loss-agg token-mean` by default (every completion token of the batch weighs the same, as in DAPO and
    verl), where the paper's Eq. 2 averages per sequence first (`seq-mean-token-mean`, one flag away): the
    per-sequence mean gives a long reply's tokens less weight each, the length bias DAPO removed.

Run:
  python 04_grpo.py --data runs/demo/turns.jsonl --rm runs/demo/rm --out runs/grpo
  python 04_grpo.py --rm none --prompts-per-step 2 --group-size 8 --max-new-tokens 64 --lr 3e-4   # format only
  torchrun --nproc_per_node=8 04_grpo.py --policy Qwen/Qwen2.5-1.5B-Instruct --rm runs/rm --rollout vllm \\
      --prompts-per-step 128 --max-new-tokens 2048 --epochs 3
  python 04_grpo.py --out runs/grpo --resume          # continue from runs/grpo/checkpoint
"""
import argparse
import functools
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import backends
import common
import models
import speed
import training

THINK_SYSTEM = (
    common.ESC_SYSTEM + " Before you reply, think briefly about the person's feelings and what would help them, "
    "inside <think> </think> tags; then write your reply to them after </think>."
)


# ----------------------------------------------------------------------------------------------------
# Settings


@dataclass
class LossConfig:
    """Everything the update needs besides the model and the rollouts (its defaults are the flags')."""
    pad_id: int
    temperature: float = 1.0
    eps_low: float = 0.2  # RAPO: 0.2
    eps_high: float = 0.28  # DAPO clip-higher, RAPO: 0.28
    beta: float = 5e-4  # k3 KL coefficient, RAPO: 5e-4
    loss_agg: str = "token-mean"  # deviation 8
    is_level: str = "token"  # --is-level: token (GRPO's rho_t) or sequence (GSPO's rho_i)
    seq_eps_low: float = 3e-4  # GSPO's clip range for rho_i (GSPO paper: 3e-4 / 4e-4)
    seq_eps_high: float = 4e-4
    l_gen: int = 256  # L_gen for seq-mean-token-sum-norm (= --max-new-tokens)
    micro_batch: int = 8  # sequences per forward/backward
    shared_prefix: bool = True  # speed.shared_prefix_logps (False: the plain completion_logps)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast on GPU


def loss_config(args, pad_id: int, device: torch.device, dtype: torch.dtype) -> LossConfig:
    return LossConfig(pad_id=pad_id, temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high,
                      beta=args.beta, loss_agg=args.loss_agg, is_level=args.is_level, seq_eps_low=args.seq_eps_low,
                      seq_eps_high=args.seq_eps_high, l_gen=args.max_new_tokens, micro_batch=args.micro_batch,
                      shared_prefix=not args.no_shared_prefix,
                      autocast_dtype=torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_grpo_args(p, out="runs/grpo", temperature=1.1, learn_only=False, d=LossConfig(pad_id=0))
    g = p.add_argument_group("RLFF-ESC rewards and prompts (docs/design.md section 5)")
    g.add_argument("--rm", default="none",
                   help="reward model folder from 03_train_rm.py giving R_fut, or 'none' = format (+ length) reward "
                        "only (RLFF-ESC uses the trained RM; default none so the stage runs on its own)")
    g.add_argument("--rm-batch-size", type=int, default=16, help="replies scored per reward-model call")
    g.add_argument("--think-prompt", default="prefill", choices=["prefill", "instruct", "none"],
                   help="thinking-format protocol (deviation 1): prefill = instruction + assistant turn prefilled "
                        "with <think>; instruct = instruction only; none = plain ESC prompt")
    g.add_argument("--system-prompt", default=None,
                   help="replace the protocol's system prompt with this text (the prefill still follows --think-prompt)")
    g.add_argument("--fmt-coef", type=float, default=0.5, help="alpha, weight of the format reward (RLFF-ESC: 0.5)")
    args = p.parse_args(argv)
    args = common.resume_args(p, args, argv, Path(args.out) / "checkpoint")  # --resume: the run's own settings
    training.check_grpo_args(args)
    if args.rm != "none" and not args.rollouts_file:  # a causal-LM adapter as --rm fails here, before --out is touched
        common.load_stage("03_train_rm").check_reward_model_folder(args.rm)
    return args




# ----------------------------------------------------------------------------------------------------
# Rewards (docs/design.md section 5): the place a reward ablation edits

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


def compute_rewards(texts: list[str], n_tokens: list[int], contexts: list[list[dict]], *, fmt_coef: float,
                    l_max: int, l_cache: int, rm_fn=None) -> dict[str, list[float]]:
    """r = R_fut + alpha R_fmt + R_len per completion; the RM sees only the reply after </think>."""
    fmt = [format_reward(t) for t in texts]
    length = [overlong_penalty(n, l_max, l_cache) for n in n_tokens]
    fut = rm_fn(contexts, [common.strip_reasoning(t) for t in texts]) if rm_fn is not None else [0.0] * len(texts)
    total = [f + fmt_coef * m + ln for f, m, ln in zip(fut, fmt, length)]
    return {"total": total, "fut": [float(x) for x in fut], "fmt": fmt, "len": length}


def make_rm_scorer(path: str, device, dtype, batch_size: int):
    """R_fut from 03_train_rm.py's reward model: fn(contexts, replies) -> list[float]. The contexts are the
    turns' whole contexts: rm_mod.score cuts them by the rule the model was trained with (its rm_info.json)."""
    rm_mod = common.load_stage("03_train_rm")
    rm_mod.check_reward_model_folder(path)  # InputError for a causal-LM adapter etc., before anything loads
    loaded = rm_mod.load_reward_model(path, device, dtype)
    rm, rm_tok = loaded if isinstance(loaded, tuple) else (loaded, models.load_tokenizer(path))
    return lambda contexts, replies: rm_mod.score(rm, rm_tok, contexts, replies, batch_size)


def batch_moments(x: torch.Tensor, dist: common.Dist | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) of every element of x over all ranks (the global batch), in float64."""
    x, dist = x.double(), dist or common.Dist()
    s = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), (x * x).sum()])  # [n, sum, sum of squares]
    s = common.all_reduce_sum(s.to(dist.device), dist).cpu()
    n, mean = s[0], s[1] / s[0]
    var = (s[2] - n * mean * mean) / (n - 1).clamp(min=1)
    return mean, var.clamp(min=0).sqrt()


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4, dist: common.Dist | None = None) -> torch.Tensor:
    """Eq. 1: rewards [B, G] -> advantages [B, G], centred on the group mean and divided by (--scale-rewards)
      group: (r - mean_g r) / (std_g r + eps)      unbiased std of the group (GRPO; TRL, verl)
      batch: (r - mean_g r) / (std_B r + eps)      unbiased std of the whole batch, all ranks (TRL scale_rewards="batch")
      none:  r - mean_g r                          (Dr. GRPO)
    A group whose rewards are all equal gets A = 0. ("std" is the old name of group.)"""
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "none":
        return centred.to(rewards.dtype)
    if scale in ("group", "std"):
        return (centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)).to(rewards.dtype)
    if scale == "batch":
        return (centred / (batch_moments(r, dist)[1] + eps)).to(rewards.dtype)
    raise ValueError(f"unknown reward scaling {scale!r}")


def advantages(rewards: torch.Tensor, parts: dict[str, torch.Tensor], weights: dict[str, float], scale: str = "group",
               combine: str = "sum", eps: float = 1e-4, dist: common.Dist | None = None) -> torch.Tensor:
    """Advantages [B, G] of a reward made of parts r = sum_k w_k r_k (04: R_fut, R_fmt with alpha, R_len), --reward-combine:
      sum:  Eq. 1 on the summed reward r (`rewards`, [B, G])                              (sum, then normalise)
      gdpo: A_sum = sum_k w_k A(r_k), each part's own group advantage (Eq. 1, --scale-rewards);
            A = (A_sum - mean_B A_sum) / (std_B A_sum + eps), over the whole batch      (GDPO: normalise each, then sum)
    parts: {name: [B, G]}; weights: {name: w_k} (the parts summed)."""
    if combine == "sum":
        return group_advantages(rewards, scale, eps, dist)
    if combine != "gdpo":
        raise ValueError(f"unknown reward combination {combine!r}")
    a_sum = sum(w * group_advantages(parts[k], scale, eps, dist).double() for k, w in weights.items())  # [B, G]
    mean, std = batch_moments(a_sum, dist)
    return ((a_sum - mean) / (std + eps)).to(rewards.dtype)


# ----------------------------------------------------------------------------------------------------
# Prompts and rollouts


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
        ids = models.chat_ids(tok, [{"role": "system", "content": system}] + msgs, prefill)
        if len(ids) <= max_tokens or len(msgs) == 1:
            return ids[-max_tokens:]
        msgs = msgs[1:]


def rollout(model, tok, prompts: list[list[int]], G: int, *, max_new_tokens: int, temperature: float,
            top_p: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0) -> list[list[int]]:
    """G completions per prompt sampled from the policy: [B*G] token-id lists, group-major (ending in EOS when
    one was produced). (min_new_tokens > 0 suppresses EOS before that length: fixed-work benchmarks.)"""
    was_training = model.training
    model.eval()
    comps = models.generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, batch_size=batch_size, min_new_tokens=min_new_tokens, n=G)
    model.train(was_training)
    return comps


@dataclass
class Rollouts:
    """One rank's batch: N = B*G sequences, group-major (the G completions of a prompt are consecutive)."""
    prompts: list[list[int]]  # N prompt token ids
    completions: list[list[int]]  # N completion ids (ending in EOS when one was produced)
    advantages: torch.Tensor  # [N]
    logp_old: list[torch.Tensor] | None = None  # per sequence [|y_i|]: stored before the first update (ppo-epochs > 1)
    logp_ref: list[torch.Tensor] | None = None  # per sequence [|y_i|]: the reference policy's log-probs (beta > 0)
    keep: list[torch.Tensor] | None = None  # per sequence [|y_i|] 0/1: tokens in the GRPO loss (--mask-truncated,
    #                                         --rollout-mask; see loss_masks); None = every completion token
    is_weight: list[torch.Tensor] | None = None  # per sequence [|y_i|]: truncated IS weights (--rollout-is); None = 1


# ----------------------------------------------------------------------------------------------------
# Log-probs (the plain path)


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
    return tuple(models.to_device(t, device) for t in (ids, attn, pos, attn[:, P:].contiguous()))


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float):
    """log pi(y_t | x, y_<t) of every completion token: (logp [n, C] fp32, logits [n, C, V], completion_mask [n, C]).

    One forward of prompt + completion per sequence; only the last C+1 positions' logits are computed
    (`logits_to_keep`); the logits at position t predict token t + 1, so the first completion token is
    predicted by the last prompt position. The logits are the model's (the caller divides by T where needed).
    """
    ids, attn, pos, cmask = collate(prompts, completions, pad_id, next(model.parameters()).device)
    C = cmask.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=C + 1,
                   use_cache=False).logits[:, :-1]  # [n, C, V]
    # log_softmax(logits / T) gathered at the completion tokens: models.selective_log_softmax is exactly
    #   torch.log_softmax(logits.float() / T, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    # taken in blocks, so that no fp32 [n, C, V] copy is held (tests/test_common.py)
    return models.selective_log_softmax(logits, ids[:, -C:], temperature=temperature), logits, cmask


def micro_batches(prompts: list[list[int]], size: int, shared_prefix: bool) -> list[list[int]]:
    """Sequence indices of each micro-batch (at most `size` sequences): consecutive chunks; with the shared
    prefix, whole groups packed together (speed.group_micro_batches)."""
    return speed.group_micro_batches(prompts, size) if shared_prefix else common.chunks(list(range(len(prompts))), size)


# ---- speed: the ONE place the twins of speed.py are chosen (each tested equal to the plain function above)


def logps_fn(cfg: LossConfig, train_model=None):
    """completion_logps, or speed.shared_prefix_logps (the default: each context runs once per micro-batch)."""
    if not cfg.shared_prefix:
        return completion_logps
    inner = train_model.module if isinstance(train_model, torch.nn.parallel.DistributedDataParallel) else train_model
    return functools.partial(speed.shared_prefix_logps, cont_model=inner)  # DDP sees one forward per backward


def sampler(args, pol: training.Policy, engine: speed.VLLMRollout | None):
    """fn(prompts, G, step, seed=None) -> [B*G] completions: rollout, speed.rollout (the default: shared prefill, merged
    LoRA, --decoder) or the vLLM engine (--rollout vllm). All sample the same distribution. The engine's seed comes
    from step unless seed is given; the hf rollouts draw from torch's generator (seeded by the caller)."""
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if engine is not None:
        return lambda prompts, G, step, seed=None: engine(pol.model, prompts, G, step, seed=seed, **kw)
    kw["batch_size"] = args.gen_batch_size
    if args.no_shared_prefix and args.no_rollout_merge and args.decoder == "hf":
        return lambda prompts, G, step, seed=None: rollout(pol.model, pol.tok, prompts, G, **kw)
    return lambda prompts, G, step, seed=None: speed.rollout(pol.model, pol.tok, prompts, G,
                                                             shared_prefix=not args.no_shared_prefix,
                                                             merge_lora=not args.no_rollout_merge, decoder=args.decoder, **kw)


# ----------------------------------------------------------------------------------------------------
# The loss (Eq. 2-3) and its aggregation


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = logp_ref - logp (>= 0, 0 iff equal)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None, adv: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float = 0.28, beta: float = 5e-4, *, is_level: str = "token",
                    mask: torch.Tensor | None = None, is_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token GRPO loss [N, T] (Eq. 2-3 with DAPO clip-higher):
        L_t = -w_t min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3(logp, logp_ref)
    --is-level token:    rho = rho_t = exp(logp_t - logp_old_t)                                    (GRPO)
    --is-level sequence: rho = rho_i = exp(mean_t (logp_t - logp_old_t)) over y_i's tokens (mask),
                         the same for every token of y_i, its gradient reaching every token        (GSPO)
    w_t: the rollout correction's truncated IS weight (is_weight [N, T], --rollout-is; None = 1).
    adv is per sequence [N]; logp_ref may be None when beta == 0. Masking and averaging: aggregate()."""
    log_ratio = logp - logp_old  # [N, T]
    if is_level == "sequence":  # GSPO: the length-normalised sequence ratio (needs the completion mask)
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    rho = torch.exp(log_ratio)  # [N, T]
    a = adv.unsqueeze(-1).to(logp.dtype)  # [N, 1]
    loss = -torch.min(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)  # Eq. 3: clipped surrogate
    if is_weight is not None:
        loss = is_weight * loss  # rollout correction: w_t = min(pi_old / pi_engine, C), a constant
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


@dataclass
class MicroBatch:
    """One micro-batch's forward: what the loss needs (and an extra loss may use), on the model's device."""
    idx: list[int]  # positions of these sequences in the Rollouts
    logp: torch.Tensor  # [n, C] log-probs under logits / T, with grad
    logits: torch.Tensor  # [n, C, V] the policy's logits (not divided by T), with grad
    completion_mask: torch.Tensor  # [n, C]
    logp_old: torch.Tensor  # [n, C]
    logp_ref: torch.Tensor | None  # [n, C] (beta > 0)
    adv: torch.Tensor  # [n]
    n_tokens: float  # global count of the tokens in the loss (all micro-batches and ranks)
    n_seqs: float  # global count of the sequences in the loss
    loss_mask: torch.Tensor | None = None  # [n, C] completion_mask without the masked tokens (Rollouts.keep); None = it
    is_weight: torch.Tensor | None = None  # [n, C] truncated IS weights (--rollout-is)


def grpo_loss(mb: MicroBatch, cfg: LossConfig) -> torch.Tensor:
    """L_GRPO: this micro-batch's share of the batch's GRPO loss (Eq. 2-3, --is-level, --loss-agg)."""
    mask = mb.loss_mask if mb.loss_mask is not None else mb.completion_mask
    eps = (cfg.seq_eps_low, cfg.seq_eps_high) if cfg.is_level == "sequence" else (cfg.eps_low, cfg.eps_high)
    tok_loss = grpo_token_loss(mb.logp, mb.logp_old, mb.logp_ref, mb.adv, *eps, cfg.beta, is_level=cfg.is_level,
                               mask=mask, is_weight=mb.is_weight)  # [n, C]
    return aggregate(tok_loss, mask, cfg.loss_agg, mb.n_tokens, mb.n_seqs, cfg.l_gen)


def _pad_values(rows: list[torch.Tensor], C: int, device) -> torch.Tensor:
    """Per-sequence values (Rollouts.keep, is_weight) as a [n, C] float32 tensor, zero beyond each row."""
    vals = torch.zeros((len(rows), C), dtype=torch.float32)
    for i, r in enumerate(rows):
        vals[i, :len(r)] = r
    return models.to_device(vals, device)


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
    vals, known = models.to_device(vals, like.device), models.to_device(known, like.device)  # two copies, not one per row
    return torch.where(known, vals, like.detach().float())  # [n, C]


def autocast(cfg: LossConfig, device: torch.device):
    return torch.autocast(device.type, dtype=cfg.autocast_dtype) if cfg.autocast_dtype is not None else nullcontext()


def forward(train_model, ro: Rollouts, idx: list[int], cfg: LossConfig, n_tokens: float, n_seqs: float) -> MicroBatch:
    """The policy's forward on the sequences idx of ro, with what the loss compares it to."""
    device = next(train_model.parameters()).device
    with autocast(cfg, device):
        logp, logits, cmask = logps_fn(cfg, train_model)(train_model, [ro.prompts[i] for i in idx],
                                                         [ro.completions[i] for i in idx], cfg.pad_id, cfg.temperature)
    logp = logp.float()
    logp_old = _pad_rows([ro.logp_old[i] for i in idx], logp) if ro.logp_old is not None else logp.detach()  # rho = 1
    logp_ref = _pad_rows([ro.logp_ref[i] for i in idx], logp) if cfg.beta > 0 else None
    C = cmask.shape[1]
    loss_mask = cmask * _pad_values([ro.keep[i] for i in idx], C, device) if ro.keep is not None else None
    is_weight = _pad_values([ro.is_weight[i] for i in idx], C, device) if ro.is_weight is not None else None
    return MicroBatch(idx, logp, logits, cmask, logp_old, logp_ref, models.to_device(ro.advantages[idx], device),
                      n_tokens, n_seqs, loss_mask, is_weight)


@torch.no_grad()
def sequence_logps(model, ro: Rollouts, cfg: LossConfig) -> list[torch.Tensor]:
    """Per-sequence completion log-probs [|y_i|] under `model` (no grad), in micro-batches. Called inside
    `model.disable_adapter()` for the reference, or before the first update for logp_old."""
    device = next(model.parameters()).device
    res, done = [None] * len(ro.completions), []
    for idx in micro_batches(ro.prompts, cfg.micro_batch, cfg.shared_prefix):
        with autocast(cfg, device):
            lp = logps_fn(cfg)(model, [ro.prompts[i] for i in idx], [ro.completions[i] for i in idx], cfg.pad_id,
                               cfg.temperature)[0]
        done.append((idx, lp.float()))  # copied to the host after the loop: no wait for the GPU in between
    for idx, lp in done:
        lp = lp.cpu()
        for k, i in enumerate(idx):
            res[i] = lp[k, :len(ro.completions[i])]
    return res


def prepare_logps(pol: training.Policy, ro: Rollouts, cfg: LossConfig, ppo_epochs: int):
    """Reference log-probs (beta > 0; LoRA: the adapter disabled, no second model) and, with --ppo-epochs > 1,
    logp_old from before the first update."""
    if cfg.beta > 0:
        if pol.lora:
            with pol.model.disable_adapter():
                ro.logp_ref = sequence_logps(pol.model, ro, cfg)
        else:
            ro.logp_ref = sequence_logps(pol.ref_model, ro, cfg)
    if ppo_epochs > 1:
        ro.logp_old = sequence_logps(pol.model, ro, cfg)


def rollout_correction(logp_old: list[torch.Tensor], logp_engine: list[list[float]], is_mode: str = "none",
                       cap: float = 2.0, mask_mode: str = "none", band: tuple[float, float] = (0.5, 2.0)):
    """The engine's sampling distribution pi_engine drifts from the trainer's pi_old (another kernel, dtype, merged
    weights): per sequence [|y_i|], with d_t = logp_old_t - logp_engine_t,
      --rollout-is token:      w_t = min(exp(d_t), C)                         (truncated IS, per token)
      --rollout-is sequence:   w_t = min(exp(sum_t d_t), C) on every token    (truncated IS, per sequence)
      --rollout-mask token:    keep_t = [lo <= exp(d_t) <= hi]
      --rollout-mask sequence: keep_t = [lo <= exp(mean_t d_t) <= hi] on every token (geometric mean: a product of
                               hundreds of ratios would leave any band)
    Returns (weights or None, keep or None); when the engine and the trainer agree (d = 0), w = 1 and keep = 1."""
    weights, keep = [] if is_mode != "none" else None, [] if mask_mode != "none" else None
    for lp, eng in zip(logp_old, logp_engine):
        d = lp.double() - torch.tensor(eng, dtype=torch.float64)  # [|y_i|] log(pi_old / pi_engine)
        if is_mode == "token":
            weights.append(d.exp().clamp(max=cap).float())
        elif is_mode == "sequence":
            weights.append(d.sum().exp().clamp(max=cap).float().expand(len(d)).clone())
        if mask_mode != "none":
            r = d.exp() if mask_mode == "token" else d.mean().exp().expand(len(d))
            keep.append(((r >= band[0]) & (r <= band[1])).float())
    return weights, keep


def truncated(completions: list[list[int]], eos: set[int], max_new_tokens: int) -> list[bool]:
    """Completions that hit --max-new-tokens without an EOS token."""
    return [len(c) >= max_new_tokens and (not c or c[-1] not in eos) for c in completions]


def loss_masks(ro: Rollouts, args, eos: set[int], engine=None, logp_now=None, dist: common.Dist | None = None) -> dict:
    """Which tokens enter the GRPO loss and with which weight, set on ro (keep, is_weight), and their metrics:
    --mask-truncated drops the completions that hit --max-new-tokens without EOS (DAPO's overlong filtering);
    --rollout-is / --rollout-mask (--rollout vllm) weight or drop tokens by pi_old / pi_engine (rollout_correction;
    logp_now() gives pi_old's per-sequence log-probs, the engine's come with its samples). The denominators of
    aggregate() then count the kept tokens/sequences only. With every flag at its default: nothing, {}."""
    row, keep = {}, None
    if args.mask_truncated:  # (their count is step_metrics' truncated_frac)
        cut = truncated(ro.completions, eos, args.max_new_tokens)
        keep = [torch.full((len(c),), 0.0 if t else 1.0) for c, t in zip(ro.completions, cut)]
    if args.rollout_is != "none" or args.rollout_mask != "none":
        weights, rkeep = rollout_correction(logp_now(), engine.last_logps, args.rollout_is, args.rollout_is_cap,
                                            args.rollout_mask, tuple(args.rollout_mask_band))
        s = {"n": sum(len(c) for c in ro.completions), "w": 0.0, "masked": 0.0}
        if weights is not None:
            ro.is_weight = weights
            s["w"] = float(sum(w.double().sum() for w in weights))
        if rkeep is not None:
            s["masked"] = float(sum((1 - k).sum() for k in rkeep))
            keep = rkeep if keep is None else [a * b for a, b in zip(keep, rkeep)]
        s = common.all_reduce_named(s, dist or common.Dist())
        if weights is not None:
            row["rollout_is_weight_mean"] = s["w"] / max(s["n"], 1.0)  # per token
        if rkeep is not None:
            row["rollout_masked_frac"] = s["masked"] / max(s["n"], 1.0)  # of the tokens
    ro.keep = keep
    return row


# ----------------------------------------------------------------------------------------------------
# The update


def accumulate_gradients(train_model, ro: Rollouts, cfg: LossConfig, dist: common.Dist | None = None,
                         extra_loss=None) -> dict:
    """Forward/backward of the GRPO loss over the micro-batches of `ro`; the gradients are ADDED to .grad.

    train_model: the policy, possibly wrapped in DDP (then the gradients are all-reduced in the last
    micro-batch's backward only). extra_loss(mb: MicroBatch) -> scalar: a term added to each micro-batch's
    loss (05_rapo.py: eta * L_SD, Eq. 15); like aggregate(), its share of a global mean.
    Returns sums over this rank: loss (extra included), kl, entropy and clipped (token sums), extra; and the
    global n_tokens / n_seqs.
    """
    dist = dist or common.Dist()
    device = next(train_model.parameters()).device
    if ro.keep is None:  # every completion token is in the loss
        counts = torch.tensor([float(sum(len(c) for c in ro.completions)), float(len(ro.completions))], dtype=torch.float64)
    else:  # only the kept tokens, and the sequences with at least one (a batch with none: loss 0, not 0 / 0)
        counts = torch.tensor([float(sum(k.sum() for k in ro.keep)), float(sum(bool(k.any()) for k in ro.keep))],
                              dtype=torch.float64)
    n_tokens, n_seqs = common.all_reduce_sum(counts.to(device), dist).tolist()  # every micro-batch divides by these
    if ro.keep is not None:
        n_tokens, n_seqs = max(n_tokens, 1.0), max(n_seqs, 1.0)
    mbs = micro_batches(ro.prompts, cfg.micro_batch, cfg.shared_prefix)
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # read once at the end: no host wait per micro-batch
    for k, idx in enumerate(mbs):
        with train_model.no_sync() if ddp and k < len(mbs) - 1 else nullcontext():  # DDP: sync on the last only
            mb = forward(train_model, ro, idx, cfg, n_tokens, n_seqs)
            loss = grpo_loss(mb, cfg)
            extra = extra_loss(mb) if extra_loss is not None else torch.zeros((), device=device)
            ((loss + extra) * dist.world).backward()  # DDP averages over ranks: x world = the global-batch gradient
        sums += update_stats(mb, cfg, loss + extra, extra)
    return {"n_tokens": n_tokens, "n_seqs": n_seqs, **dict(zip(("loss", "kl", "entropy", "clipped", "extra"), sums.tolist()))}


@torch.no_grad()
def update_stats(mb: MicroBatch, cfg: LossConfig, loss: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Logged sums of a micro-batch: loss, kl, entropy, clipped tokens (no gradient there), extra."""
    m = mb.completion_mask.float()
    rho, a = torch.exp(mb.logp.detach() - mb.logp_old), mb.adv.unsqueeze(-1)
    eps_low, eps_high = cfg.eps_low, cfg.eps_high
    if cfg.is_level == "sequence":  # GSPO's rho_i on every token of y_i (as grpo_token_loss)
        lm = mb.loss_mask if mb.loss_mask is not None else m
        rho = torch.exp(((mb.logp.detach() - mb.logp_old) * lm).sum(-1, keepdim=True) / lm.sum(-1, keepdim=True).clamp(min=1))
        eps_low, eps_high = cfg.seq_eps_low, cfg.seq_eps_high
    clipped = ((rho > 1 + eps_high) & (a > 0)) | ((rho < 1 - eps_low) & (a < 0))
    kl = (k3_kl(mb.logp.detach(), mb.logp_ref) * m).sum() if mb.logp_ref is not None else torch.zeros((), device=m.device)
    ent = (models.softmax_entropy(mb.logits, temperature=cfg.temperature) * m).sum()
    return torch.stack([loss.detach(), kl, ent, (clipped.float() * m).sum(), extra.detach()]).double()


def grpo_step(model, train_model, optimizer, scheduler, ro: Rollouts, cfg: LossConfig, dist: common.Dist | None = None,
              max_grad_norm: float = 1.0, extra_loss=None) -> dict:
    """One optimiser step on fixed rollouts: zero the gradients, accumulate them over the micro-batches, clip,
    AdamW, schedule (training.optimizer_step: a non-finite loss or gradient norm stops BEFORE the step).
    `model` is the unwrapped policy, `train_model` the one to call (DDP or the same). Returns
    accumulate_gradients' sums plus grad_norm (before clipping) and lr."""
    dist = dist or common.Dist()
    optimizer.zero_grad(set_to_none=True)
    st = accumulate_gradients(train_model, ro, cfg, dist, extra_loss)
    st["lr"] = optimizer.param_groups[0]["lr"]
    st["grad_norm"] = training.optimizer_step([p for p in model.parameters() if p.requires_grad], optimizer, scheduler,
                                              st["loss"], max_grad_norm, dist)
    return st


# ----------------------------------------------------------------------------------------------------
# The step's groups (dynamic sampling) and the held-out evaluation


def zero_spread(total: list[float]) -> bool:
    """A group whose rewards are all equal: A = 0 for every completion (Eq. 1), nothing to learn from."""
    return max(total) == min(total)


def dynamic_sampling(draw, cursor: int, n_groups: int, max_draws: int, dist: common.Dist) -> tuple[list[dict], dict]:
    """DAPO's dynamic sampling (--dynamic-sampling): draws cursor, cursor + 1, ... of the prompt stream (each a step's
    worth of prompts, training.step_batch) until every rank holds n_groups groups whose rewards differ, or
    --max-draws draws were made; the zero-spread groups are dropped. At the cap a rank short of groups fills up with
    its last dropped ones (A = 0: what the step would have trained on without dynamic sampling). Every rank makes
    the same draws (a rank already full skips its share of a draw), so the data position is the draw count, kept
    in the checkpoint. draw(k) -> this rank's groups of draw k. Returns (n_groups groups, counts for the log)."""
    kept, dropped, n, drawn = [], [], 0, 0
    while True:
        if len(kept) < n_groups:
            for grp in draw(cursor + n):
                (dropped if zero_spread(grp["rw"]["total"]) else kept).append(grp)
                drawn += 1
        n += 1
        short = common.all_reduce_named({"short": float(len(kept) < n_groups)}, dist, op="max")["short"]
        if not short or n >= max_draws:
            break
    fill = max(0, n_groups - len(kept))
    groups = kept[:n_groups] + dropped[len(dropped) - fill:]
    s = common.all_reduce_named({"drawn": drawn, "dropped": len(dropped) - fill, "filled": fill}, dist)
    return groups, {"dynamic_draws": n, "dynamic_groups_drawn": s["drawn"], "dynamic_groups_dropped": s["dropped"],
                    "dynamic_groups_filled": s["filled"]}


def step_groups(draw, step: int, cursor: int, args, dist: common.Dist, engine=None) -> tuple[list[dict], int, dict]:
    """A training step's groups from the prompt stream (deviation 6): draw(step), or with --dynamic-sampling draws
    cursor, cursor + 1, ... (dynamic_sampling). Returns (groups, the data position after them, the dynamic_* log
    row). --rollout vllm: the engine's log-probs become the kept groups' (they may come from several draws)."""
    if not args.dynamic_sampling:
        return draw(step), step + 1, {}
    groups, row = dynamic_sampling(draw, cursor, args.prompts_per_step // dist.world, args.max_draws, dist)
    row["data_position"] = cursor + row["dynamic_draws"]  # prompt batches drawn since the start of the run
    if engine is not None:
        engine.last_logps = [x for grp in groups for x in grp["engine_logps"]]
    return groups, row["data_position"], row


def held_out_turns(args) -> list[dict] | None:
    """--eval-every: the first --eval-size turns of --eval-split in --eval-data (default --data), checked before any
    work (at least one per rank); None when there is no held-out evaluation."""
    if not args.eval_every:
        return None
    path, world = args.eval_data or args.data, int(os.environ.get("WORLD_SIZE", "1"))
    turns = common.load_turns(path, split=args.eval_split, max_chars=args.max_message_chars)[:args.eval_size]
    common.check(len(turns) >= world, f"{path}: {len(turns)} turns with split == {args.eval_split!r} for "
                 f"--eval-every, fewer than the {world} rank(s) (pick --eval-split or --eval-data)")
    return turns


@torch.no_grad()
def evaluate(generate, turns: list[dict], tok, system: str, prefill: str, args, dist: common.Dist, score) -> dict:
    """--eval-every: the policy's mean reward on the held-out turns, one completion per turn (this rank's share),
    sampled at a fixed seed (common.step_seed(--seed, -1, rank): the same noise at every evaluation and after
    --resume) inside a fork of torch's generator, so the training's random stream is untouched.
    score(contexts, texts, completions) -> {"total": [...], part: [...]}, the stage's reward.
    Returns eval_reward (the mean total), eval_<name> for score's other entries, eval_completion_len_mean and
    eval_truncated_frac: means over all ranks."""
    mine = common.shard(turns, dist)
    contexts = [t["context"] for t in mine]
    p_ids = [prompt_ids(tok, c, system, prefill, args.max_prompt_tokens) for c in contexts]
    seed = common.step_seed(args.seed, -1, dist.rank)
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        torch.manual_seed(seed)
        comps = generate(p_ids, 1, -1, seed=seed)
    texts = [prefill + tok.decode(c, skip_special_tokens=True) for c in comps]
    rw = score(contexts, texts, comps)
    s = common.all_reduce_named({"n": len(comps), "tokens": sum(len(c) for c in comps),
                                 "truncated": sum(len(c) >= args.max_new_tokens for c in comps),
                                 **{k: sum(v) for k, v in rw.items()}}, dist)
    return {"eval_reward": s["total"] / s["n"], **{f"eval_{k}": s[k] / s["n"] for k in rw if k != "total"},
            "eval_completion_len_mean": s["tokens"] / s["n"], "eval_truncated_frac": s["truncated"] / s["n"]}


# ----------------------------------------------------------------------------------------------------
# The training loop


def main(argv=None):
    args = parse_args(argv)
    out, G = Path(args.out), args.group_size
    eval_turns = held_out_turns(args)  # --eval-every
    dist, turns, fixed, inputs, policy_path = training.start_run(args, "rewards")  # all checks before any work
    rm_fn = None if args.rm == "none" or fixed else make_rm_scorer(args.rm, dist.device, models.resolve_dtype(
        args.dtype, dist.device), args.rm_batch_size)
    engine = None  # the vLLM engine is built before the seeding (LLM() reseeds the process)
    if args.rollout == "vllm":
        engine = speed.VLLMRollout(backends.rollout_engine(policy_path, args), args, dist)
    pol = training.setup_policy(args, dist, n_groups=len(fixed or turns))
    cfg = loss_config(args, pol.tok.pad_token_id, dist.device, pol.dtype)
    generate = sampler(args, pol, engine)
    start, extra = training.load_checkpoint(out, pol, dist) if args.resume else (0, None)
    cursor = extra["draws"] if extra is not None and "draws" in extra else start  # prompt batches drawn so far
    system, prefill = system_prompt(args.think_prompt)
    system = args.system_prompt if args.system_prompt is not None else system
    eos = set(models.eos_ids(pol.model, pol.tok))
    log = training.RunLog(args, dist, pol, start, {"system_prompt": system, "prefill": prefill})
    common.print0(f"GRPO: {pol.total} steps ({pol.steps_per_epoch} per epoch), {args.prompts_per_step} prompts x G={G} "
                  f"per step on {dist.world} rank(s), {sum(p.numel() for p in pol.model.parameters() if p.requires_grad):,} "
                  f"trainable parameters, starting at step {start}")

    def score(contexts: list[list[dict]], texts: list[str], comps: list[list[int]]) -> dict[str, list[float]]:
        """r = R_fut + alpha R_fmt + R_len of each completion (contexts: one per completion)."""
        return compute_rewards(texts, [len(c) for c in comps], contexts, fmt_coef=args.fmt_coef, l_max=args.l_max,
                               l_cache=args.l_cache, rm_fn=rm_fn)

    def draw(k: int) -> list[dict]:
        """Draw k of the prompt stream (deviation 6; without dynamic sampling draw k is step k): this rank's
        prompts, G completions each and their rewards, as groups."""
        batch = common.shard(training.step_batch(turns, k, pol.steps_per_epoch, args), dist)  # this rank's
        contexts = [t["context"] for t in batch]
        p_ids = [prompt_ids(pol.tok, c, system, prefill, args.max_prompt_tokens) for c in contexts]
        t = time.time()
        comps = generate(p_ids, G, k)  # [B_local*G], group-major
        timer["gen"] += time.time() - t
        texts = [prefill + pol.tok.decode(c, skip_special_tokens=True) for c in comps]
        rw = score([c for c in contexts for _ in range(G)], texts, comps)
        lps = engine.last_logps if engine is not None else None  # --rollout vllm: the engine's log-probs of comps
        return [{"context": contexts[b], "prompt_ids": p_ids[b], "completions": comps[b * G:(b + 1) * G],
                 "texts": texts[b * G:(b + 1) * G], "rw": {name: v[b * G:(b + 1) * G] for name, v in rw.items()},
                 "engine_logps": lps[b * G:(b + 1) * G] if lps is not None else None} for b in range(len(p_ids))]

    bar = common.progress(total=pol.total, initial=start, desc="grpo")
    stop = pol.total if args.stop_after is None else min(pol.total, start + args.stop_after)
    for step in range(start, stop):
        t0, timer = time.time(), {"gen": 0.0}
        # ---- this step's groups: prompts (data position = step, or the draw count; deviation 6), G completions
        # each and their rewards r = R_fut + alpha R_fmt + R_len
        ds_row = {}
        if fixed:
            groups = []
            for grp in common.shard(fixed, dist):
                texts = [prefill + pol.tok.decode(c, skip_special_tokens=True) for c in grp["completions"]]
                groups.append({"context": [], "prompt_ids": grp["prompt_ids"], "completions": grp["completions"],
                               "texts": texts, "rw": {"total": grp["rewards"], "fut": [0.0] * G,
                                                      "fmt": [format_reward(t) for t in texts], "len": [0.0] * G}})
        else:  # (--dynamic-sampling, DAPO: zero-spread groups replaced by new prompts)
            groups, cursor, ds_row = step_groups(draw, step, cursor, args, dist, engine)
        t_gen = timer["gen"] if not fixed else time.time() - t0
        contexts, p_ids = [grp["context"] for grp in groups], [grp["prompt_ids"] for grp in groups]
        comps = [c for grp in groups for c in grp["completions"]]  # [B_local*G], group-major
        texts = [t for grp in groups for t in grp["texts"]]
        rw = {k: [x for grp in groups for x in grp["rw"][k]] for k in ("total", "fut", "fmt", "len")}
        # ---- group advantages (Eq. 1; --scale-rewards, --reward-combine)
        rewards = torch.tensor(rw["total"], dtype=torch.float32).view(len(p_ids), G)  # [B_local, G]
        parts = {k: torch.tensor(rw[k], dtype=torch.float32).view(len(p_ids), G) for k in ("fut", "fmt", "len")}
        adv = advantages(rewards, parts, {"fut": 1.0, "fmt": args.fmt_coef, "len": 1.0}, args.scale_rewards,
                         args.reward_combine, args.adv_eps, dist).flatten()  # [B_local*G]
        ro = Rollouts(prompts=[p for p in p_ids for _ in range(G)], completions=comps, advantages=adv)
        # ---- the update(s) (Eq. 2-3)
        t1 = time.time()
        prepare_logps(pol, ro, cfg, args.ppo_epochs)  # reference log-probs; logp_old for --ppo-epochs > 1
        logp_now = functools.cache(lambda: ro.logp_old or sequence_logps(pol.model, ro, cfg))  # pi_old, once at most
        check_row = speed.sampler_check(engine, ro, logp_now, args.top_p, dist)  # --rollout vllm: engine vs trainer
        mask_row = loss_masks(ro, args, eos, engine, logp_now, dist)  # --mask-truncated, --rollout-is/-mask
        try:
            for _ in range(args.ppo_epochs):
                st = grpo_step(pol.model, pol.train_model, pol.optimizer, pol.scheduler, ro, cfg, dist, args.max_grad_norm)
        except common.StageFailure as e:
            raise common.StageFailure(f"step {step + 1}: {e}; {training.kept_note(out)}") from None
        t_upd = time.time() - t1
        # ---- logging (sums over ranks; docs/04_grpo.md, Metrics) and checkpoints
        row = training.step_metrics(step, pol, dist, comps, rewards, adv, st, args.beta,
                                    {"reward_fut": rw["fut"], "reward_fmt": rw["fmt"], "reward_len": rw["len"]})
        row.update(training.timings(t0, t_gen, t_upd, row.pop("_tokens"), args.ppo_epochs, dist))
        row.update(format_rate=row["reward_fmt"], **check_row, **mask_row, **ds_row)
        if eval_turns is not None and (step + 1) % args.eval_every == 0:  # held-out reward, after the update
            t2 = time.time()
            row.update(evaluate(generate, eval_turns, pol.tok, system, prefill, args, dist, lambda *a: {
                ("total" if k == "total" else f"reward_{k}"): v for k, v in score(*a).items()}), time_eval=time.time() - t2)
        log.metrics(row)
        if log.sample_step(step):
            log.sample({"step": step + 1, "context": contexts[0], "prompt": pol.tok.decode(p_ids[0]),
                        "completions": texts[:G], "replies": [common.strip_reasoning(t) for t in texts[:G]],
                        "rewards": {k: v[:G] for k, v in rw.items()}, "advantages": adv[:G].tolist()})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl'] or 0:.2e}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop:
            training.save_checkpoint(out, step + 1, pol, dist, args, inputs, extra={"draws": cursor})
    bar.close()
    training.finish(out, pol, dist, done=stop == pol.total)


if __name__ == "__main__":
    common.run_main(main)
