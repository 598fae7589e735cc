"""backends.OpenAIBackend against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1.

The server is started once for the module on a free loopback port, pinned to a copy of the tiny test model
(`transformers serve <folder>`: the positional argument preloads a local folder and every request must name
exactly that folder as its `model`), with the hub switched off. Needs `pip install -r requirements-serve.txt`
(fastapi, uvicorn: the `transformers[serving]` extra); without them the server tests are skipped and the
tests that need no server still run.

Two properties of `transformers serve` 5.23 shape the tests:
- it samples only when the served folder's generation_config.json says `do_sample: true` (a request's
  `temperature` > 0 never turns sampling on; `temperature: 0` turns it off), so the served copy gets
  `do_sample: true, top_k: 0` (plain temperature / top-p sampling, as in models.generate_ids);
- a request's `seed` is a global `torch.manual_seed` on the server, so seeded draws are reproducible only
  with one request in flight: the seed tests use concurrency=1, the concurrency test checks bookkeeping.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

import backends
import common
from conftest import free_port

CHATS = [
    [{"role": "user", "content": "I lost my job last week and I feel awful."}],
    [{"role": "system", "content": "You are a kind listener."}, {"role": "user", "content": "My exam went badly."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you today?"},
     {"role": "user", "content": "Lonely, to be honest."}],
]
READY_TIMEOUT = 120.0


def needs_serving_deps():
    pytest.importorskip("fastapi", reason="transformers serve needs: pip install -r requirements-serve.txt")
    pytest.importorskip("uvicorn", reason="transformers serve needs: pip install -r requirements-serve.txt")


@pytest.fixture(scope="module")
def served_model(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model whose generation config samples (see the module docstring)."""
    folder = tmp_path_factory.mktemp("served") / "tiny-chat"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "generation_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(do_sample=True, top_k=0, temperature=1.0, top_p=1.0)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    """`transformers serve` on 127.0.0.1:<free port>; yields (base_url, model name); always stopped."""
    needs_serving_deps()
    port = free_port()
    hub_cache = tmp_path_factory.mktemp("hf-hub-cache")  # /v1/models scans it and fails (500) if it is missing
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(served_model),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, ready = time.monotonic() + READY_TIMEOUT, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    ready = r.status == 200 and json.load(r)["object"] == "list"
                    break
            except OSError:
                time.sleep(0.3)
        if not ready:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"transformers serve not ready after {READY_TIMEOUT:.0f}s "
                               f"(exit code {proc.poll()}): {' '.join(cmd)}\n{tail}")
        yield f"http://127.0.0.1:{port}/v1", str(served_model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local_model(served_model):
    """The same folder in-process: the independent reference for what the server should return."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served_model)
    model = AutoModelForCausalLM.from_pretrained(served_model, dtype=torch.float32).eval()
    return model, tok


def reference(model, tok, chat, *, max_new_tokens, temperature, top_p=1.0, seed=None):
    """What one request should produce: the chat template, model.generate with the folder's generation
    config updated the way the request asks, seeded before the draw, special tokens skipped.
    Returns (text, number of new tokens)."""
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens, gc.temperature, gc.top_p = max_new_tokens, temperature, top_p
    if temperature == 0:
        gc.do_sample = False
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gc)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), len(new)


def recording(backend, pause=0.0):
    """Wrap the backend's real create(): record every request and the server's answer, tag the answer
    with the request's number (`<text>#<k>`) so that every request's text is unique (the tiny random
    model answers nearly the same whatever the chat), and record the peak number of requests in flight."""
    real = backend.client.chat.completions.create
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "calls": []}

    def create(**kw):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(pause)  # keep each request open a moment so overlapping ones are seen overlapping
            r = real(**kw)
            with lock:
                text = r.choices[0].message.content
                tagged = f"{text}#{len(state['calls'])}"
                state["calls"].append((kw, text, tagged))
            r.choices[0].message.content = tagged
            return r
        finally:
            with lock:
                state["now"] -= 1

    backend.client.chat.completions.create = create
    return state


def test_generate_batch_shapes_n_and_concurrency(server):
    base_url, model = server
    b = backends.OpenAIBackend(model, base_url, concurrency=4, retries=0)
    state = recording(b, pause=0.2)
    out = b.generate(CHATS, max_new_tokens=8, temperature=1.0, seed=11, n=2)
    assert len(out) == 3 and all(len(o) == 2 for o in out) and all(isinstance(t, str) for o in out for t in o)
    # 6 requests, up to 4 in flight at once, each with the requested parameters, each answered with text
    assert len(state["calls"]) == 6 and 1 < state["peak"] <= 4
    assert all(kw["max_tokens"] == 8 and kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["model"] == model
               for kw, _, _ in state["calls"])
    assert all(isinstance(text, str) and text for _, text, _ in state["calls"])
    # every text lands at [chat][sample]: the answer to that chat's messages with seed 11 + chat * n + sample (one
    # seed per (chat, sample), as the vLLM backend)
    answers = {(json.dumps(kw["messages"]), kw["seed"]): tagged for kw, _, tagged in state["calls"]}
    assert len(answers) == 6 and sorted(s for _, s in answers) == list(range(11, 17))
    for k, (c, texts) in enumerate(zip(CHATS, out)):
        assert texts == [answers[(json.dumps(c), 11 + 2 * k)], answers[(json.dumps(c), 12 + 2 * k)]]

    one = b.generate(CHATS, max_new_tokens=4, temperature=1.0)
    assert len(one) == 3 and all(len(o) == 1 for o in one)
    assert all(isinstance(text, str) and text for _, text, _ in state["calls"][6:])
    assert all("seed" not in kw and kw["max_tokens"] == 4 for kw, _, _ in state["calls"][6:])
    assert b.calls == 2


def test_seed_temperature_top_p_max_tokens_match_local_generate(server, local_model):
    base_url, model_name = server
    model, tok = local_model
    b = backends.OpenAIBackend(model_name, base_url, concurrency=1, retries=0)  # server seeding is global
    for temperature, max_new in [(1.0, 6), (0.7, 3)]:
        out = b.generate(CHATS, max_new_tokens=max_new, temperature=temperature, seed=5, n=2)
        for k, (c, texts) in enumerate(zip(CHATS, out)):
            for j, text in enumerate(texts):
                ref, n_tok = reference(model, tok, c, max_new_tokens=max_new, temperature=temperature,
                                       seed=5 + 2 * k + j)  # seed + chat * n + sample
                assert text == ref and n_tok == max_new  # cut by max_tokens (no EOS drawn): the bound binds
            assert texts[0] != texts[1]  # two seeds draw differently
        assert b.generate(CHATS, max_new_tokens=max_new, temperature=temperature, seed=5, n=2) == out

    greedy = b.generate(CHATS, max_new_tokens=5, temperature=0.0)
    for c, (text,) in zip(CHATS, greedy):
        assert text == reference(model, tok, c, max_new_tokens=5, temperature=0.0)[0]
    # a top_p this small keeps only the most likely token: sampling at temperature 1 becomes greedy
    nucleus = b.generate(CHATS, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == greedy
    sampled = b.generate(CHATS, max_new_tokens=5, temperature=1.0, seed=3)
    assert sampled != greedy


def test_make_backend_builds_a_working_openai_backend(server, monkeypatch):
    base_url, model = server
    monkeypatch.setattr(backends, "_BACKENDS", {})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    b = backends.make_backend(f"openai:{model}", base_url=base_url)
    assert isinstance(b, backends.OpenAIBackend) and b.model == model
    assert backends.make_backend(f"openai:{model}", base_url=base_url) is b
    texts = b.complete(CHATS[:2], max_new_tokens=4, temperature=1.0, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


def test_unreachable_server_stops_with_server_error_and_never_prints_the_key(monkeypatch, capfd, caplog):
    """An outage is not an answer: after its retries a request raises ServerError (the stage stops, exit 1)
    instead of returning "" for the caller to record as the model's output (issue 14, item 2)."""
    secret = "sk-test-DO-NOT-PRINT-5f1e9c0b7a"
    monkeypatch.setenv("ESC_TEST_API_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    port = free_port()  # bound and closed again: nothing listens there
    b = backends.OpenAIBackend("some-model", f"http://127.0.0.1:{port}/v1", key_env="ESC_TEST_API_KEY",
                               concurrency=2, timeout=5.0, retries=1)
    assert b.client.api_key == secret  # the key is read from the named environment variable
    t0 = time.monotonic()
    with pytest.raises(common.ServerError) as e:
        b.generate(CHATS[:2], max_new_tokens=4, n=1)
    elapsed = time.monotonic() - t0
    assert elapsed < 20.0  # 2 tries with one 1 s back-off each, the two requests in parallel
    assert "failed 2 times (APIConnectionError)" in str(e.value) and f"127.0.0.1:{port}" in str(e.value)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text + str(e.value)

    monkeypatch.delenv("ESC_TEST_API_KEY")
    assert backends.OpenAIBackend("m", f"http://127.0.0.1:{port}/v1", key_env="ESC_TEST_API_KEY").client.api_key == "EMPTY"


def test_make_backend_openai_needs_base_url_or_key(monkeypatch):
    monkeypatch.setattr(backends, "_BACKENDS", {})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(common.InputError, match="openai:x"):
        backends.make_backend("openai:x")
    assert backends._BACKENDS == {}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-hosted")
    assert isinstance(backends.make_backend("openai:x"), backends.OpenAIBackend)  # the hosted API: no request made
