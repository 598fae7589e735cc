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
    is the step number and a resumed run sees exactly the prompts it would have seen.
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
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import backends
import common
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
    l_gen: int = 256  # L_gen for seq-mean-token-sum-norm (= --max-new-tokens)
    micro_batch: int = 8  # sequences per forward/backward
    shared_prefix: bool = True  # speed.shared_prefix_logps (False: the plain completion_logps)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast on GPU


def loss_config(args, pad_id: int, device: torch.device, dtype: torch.dtype) -> LossConfig:
    return LossConfig(pad_id=pad_id, temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high,
                      beta=args.beta, loss_agg=args.loss_agg, l_gen=args.max_new_tokens, micro_batch=args.micro_batch,
                      shared_prefix=not args.no_shared_prefix,
                      autocast_dtype=torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_grpo_args(p, out="runs/grpo", temperature=1.1, learn_only=False, d=LossConfig(pad_id=0))
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
    g.add_argument("--fmt-coef", type=float, default=0.5, help="alpha, weight of the format reward (RLFF-ESC: 0.5)")
    args = p.parse_args(argv)
    args = common.resume_args(p, args, argv, Path(args.out) / "checkpoint")  # --resume: the run's own settings
    training.check_grpo_args(args)
    return args




# ----------------------------------------------------------------------------------------------------
# Rewards (SPEC section 5): the place a reward ablation edits

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
    rm, rm_tok = loaded if isinstance(loaded, tuple) else (loaded, common.load_tokenizer(path))
    return lambda contexts, replies: rm_mod.score(rm, rm_tok, contexts, replies, batch_size)


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
        ids = common.chat_ids(tok, [{"role": "system", "content": system}] + msgs, prefill)
        if len(ids) <= max_tokens or len(msgs) == 1:
            return ids[-max_tokens:]
        msgs = msgs[1:]


def rollout(model, tok, prompts: list[list[int]], G: int, *, max_new_tokens: int, temperature: float,
            top_p: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0) -> list[list[int]]:
    """G completions per prompt sampled from the policy: [B*G] token-id lists, group-major (ending in EOS when
    one was produced). (min_new_tokens > 0 suppresses EOS before that length: fixed-work benchmarks.)"""
    was_training = model.training
    model.eval()
    comps = common.generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
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
    return tuple(common.to_device(t, device) for t in (ids, attn, pos, attn[:, P:].contiguous()))


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
    # log_softmax(logits / T) gathered at the completion tokens: common.selective_log_softmax is exactly
    #   torch.log_softmax(logits.float() / T, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    # taken in blocks, so that no fp32 [n, C, V] copy is held (tests/test_common.py)
    return common.selective_log_softmax(logits, ids[:, -C:], temperature=temperature), logits, cmask


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
    """fn(prompts, G, step) -> [B*G] completions: rollout, speed.rollout (the default: shared prefill, merged LoRA,
    --decoder) or the vLLM engine (--rollout vllm). All sample the same distribution."""
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if engine is not None:
        return lambda prompts, G, step: engine(pol.model, prompts, G, step, **kw)
    kw["batch_size"] = args.gen_batch_size
    if args.no_shared_prefix and args.no_rollout_merge and args.decoder == "hf":
        return lambda prompts, G, step: rollout(pol.model, pol.tok, prompts, G, **kw)
    return lambda prompts, G, step: speed.rollout(pol.model, pol.tok, prompts, G, shared_prefix=not args.no_shared_prefix,
                                                  merge_lora=not args.no_rollout_merge, decoder=args.decoder, **kw)


# ----------------------------------------------------------------------------------------------------
# The loss (Eq. 2-3) and its aggregation


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
    n_tokens: float  # global completion-token count (all micro-batches and ranks)
    n_seqs: float  # global sequence count


def grpo_loss(mb: MicroBatch, cfg: LossConfig) -> torch.Tensor:
    """L_GRPO: this micro-batch's share of the batch's GRPO loss (Eq. 2-3, --loss-agg)."""
    tok_loss = grpo_token_loss(mb.logp, mb.logp_old, mb.logp_ref, mb.adv, cfg.eps_low, cfg.eps_high, cfg.beta)  # [n, C]
    return aggregate(tok_loss, mb.completion_mask, cfg.loss_agg, mb.n_tokens, mb.n_seqs, cfg.l_gen)


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
    return MicroBatch(idx, logp, logits, cmask, logp_old, logp_ref, common.to_device(ro.advantages[idx], device),
                      n_tokens, n_seqs)


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
    counts = torch.tensor([float(sum(len(c) for c in ro.completions)), float(len(ro.completions))], dtype=torch.float64)
    n_tokens, n_seqs = common.all_reduce_sum(counts.to(device), dist).tolist()  # every micro-batch divides by these
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
    clipped = ((rho > 1 + cfg.eps_high) & (a > 0)) | ((rho < 1 - cfg.eps_low) & (a < 0))
    kl = (k3_kl(mb.logp.detach(), mb.logp_ref) * m).sum() if mb.logp_ref is not None else torch.zeros((), device=m.device)
    ent = (common.softmax_entropy(mb.logits, temperature=cfg.temperature) * m).sum()
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
# The training loop


def main(argv=None):
    args = parse_args(argv)
    out, G = Path(args.out), args.group_size
    dist, turns, fixed, inputs, policy_path = training.start_run(args, "rewards")  # all checks before any work
    rm_fn = None if args.rm == "none" or fixed else make_rm_scorer(args.rm, dist.device, common.resolve_dtype(
        args.dtype, dist.device), args.rm_batch_size)
    engine = None  # the vLLM engine is built before the seeding (LLM() reseeds the process)
    if args.rollout == "vllm":
        engine = speed.VLLMRollout(backends.rollout_engine(policy_path, args), args, dist)
    pol = training.setup_policy(args, dist, n_groups=len(fixed or turns))
    cfg = loss_config(args, pol.tok.pad_token_id, dist.device, pol.dtype)
    generate = sampler(args, pol, engine)
    start = training.load_checkpoint(out, pol, dist)[0] if args.resume else 0
    system, prefill = system_prompt(args.think_prompt)
    system = args.system_prompt if args.system_prompt is not None else system
    log = training.RunLog(args, dist, pol, start, {"system_prompt": system, "prefill": prefill})
    common.print0(f"GRPO: {pol.total} steps ({pol.steps_per_epoch} per epoch), {args.prompts_per_step} prompts x G={G} "
                  f"per step on {dist.world} rank(s), {sum(p.numel() for p in pol.model.parameters() if p.requires_grad):,} "
                  f"trainable parameters, starting at step {start}")

    bar = common.progress(total=pol.total, initial=start, desc="grpo")
    stop = pol.total if args.stop_after is None else min(pol.total, start + args.stop_after)
    for step in range(start, stop):
        t0 = time.time()
        # ---- this step's prompts (data position = step; deviation 6) and G completions each
        if fixed:
            groups = common.shard(fixed, dist)
            p_ids, contexts = [g["prompt_ids"] for g in groups], [[] for _ in groups]
            comps = [c for g in groups for c in g["completions"]]
        else:
            batch = common.shard(training.step_batch(turns, step, pol.steps_per_epoch, args), dist)  # this rank's
            contexts = [t["context"] for t in batch]
            p_ids = [prompt_ids(pol.tok, c, system, prefill, args.max_prompt_tokens) for c in contexts]
            comps = generate(p_ids, G, step)  # [B_local*G], group-major
        t_gen = time.time() - t0
        # ---- rewards and group advantages (Eq. 1)
        texts = [prefill + pol.tok.decode(c, skip_special_tokens=True) for c in comps]
        if fixed:
            rw = {"total": [r for g in groups for r in g["rewards"]], "fut": [0.0] * len(comps),
                  "fmt": [format_reward(t) for t in texts], "len": [0.0] * len(comps)}
        else:
            rw = compute_rewards(texts, [len(c) for c in comps], [c for c in contexts for _ in range(G)],
                                 fmt_coef=args.fmt_coef, l_max=args.l_max, l_cache=args.l_cache, rm_fn=rm_fn)
        rewards = torch.tensor(rw["total"], dtype=torch.float32).view(len(p_ids), G)  # [B_local, G]
        adv = group_advantages(rewards, args.adv_norm, args.adv_eps).flatten()  # [B_local*G]
        ro = Rollouts(prompts=[p for p in p_ids for _ in range(G)], completions=comps, advantages=adv)
        # ---- the update(s) (Eq. 2-3)
        t1 = time.time()
        prepare_logps(pol, ro, cfg, args.ppo_epochs)  # reference log-probs; logp_old for --ppo-epochs > 1
        check_row = speed.sampler_check(engine, ro, lambda: ro.logp_old or sequence_logps(pol.model, ro, cfg),
                                        args.top_p, dist)  # --rollout vllm: engine vs trainer log-probs
        try:
            for _ in range(args.ppo_epochs):
                st = grpo_step(pol.model, pol.train_model, pol.optimizer, pol.scheduler, ro, cfg, dist, args.max_grad_norm)
        except common.StageFailure as e:
            raise common.StageFailure(f"step {step + 1}: {e}; {training.kept_note(out)}") from None
        t_upd = time.time() - t1
        # ---- logging (sums over ranks; SPEC section 5 list, README table) and checkpoints
        row = training.step_metrics(step, pol, dist, comps, rewards, adv, st, args.beta,
                                    {"reward_fut": rw["fut"], "reward_fmt": rw["fmt"], "reward_len": rw["len"]})
        row.update(training.timings(t0, t_gen, t_upd, row.pop("_tokens"), args.ppo_epochs, dist))
        row.update(format_rate=row["reward_fmt"], **check_row)
        log.metrics(row)
        if log.sample_step(step):
            log.sample({"step": step + 1, "context": contexts[0], "prompt": pol.tok.decode(p_ids[0]),
                        "completions": texts[:G], "replies": [common.strip_reasoning(t) for t in texts[:G]],
                        "rewards": {k: v[:G] for k, v in rw.items()}, "advantages": adv[:G].tolist()})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl'] or 0:.2e}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop:
            training.save_checkpoint(out, step + 1, pol, dist, args, inputs)
    bar.close()
    training.finish(out, pol, dist, done=stop == pol.total)


if __name__ == "__main__":
    common.run_main(main)
