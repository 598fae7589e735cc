"""Shared test fixtures: a tiny Llama-shaped model with the embedded tokenizer, saved as a normal HF folder,
so every backend and stage can be run on it in seconds (`hf:<folder>`); a free port, and a stage run as a
subprocess the way a user runs it (python or torchrun)."""
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import common  # noqa: E402
import models  # noqa: E402


load_stage = common.load_stage  # import a numbered stage script (e.g. "04_grpo") as a module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then closed again): torchrun's --master-port, a test
    server's port, or a dead URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, nproc: int = 1, env: dict | None = None, timeout: float | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run a script of the repository as a user does, in its root: `python SCRIPT ARGS`, or for nproc > 1
    `torchrun --nproc_per_node=N --master-port=<free port> SCRIPT ARGS`. One thread per process (OMP_NUM_THREADS=1:
    fast on shared cores, and runs compare byte for byte), no tokenizers threads; output captured as text.
    env: more variables (a None value removes one); check: assert exit code 0."""
    cmd = [str(ROOT / script), *map(str, args)]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master-port={free_port()}", *cmd]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env={k: v for k, v in e.items() if v is not None},
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def run_in_process(script, *args, check: bool = True) -> subprocess.CompletedProcess:
    """A script's main(ARGS) in this process, as run_script runs it in a new one (common.run_main: exit code 2 on
    bad input, 1 on a failure; one torch thread, as OMP_NUM_THREADS=1 there), its stdout and stderr captured; then
    the --out lock is released and the role models it built are forgotten, as the end of its process would. Saves
    a process start and the imports (seconds each) where the test's point is the script's result; tests of
    signals, kills and torchrun keep run_script."""
    import contextlib
    import importlib
    import io

    import backends

    if isinstance(script, (str, Path)):  # a script of the repository, or a stage module already loaded
        name = str(script).removesuffix(".py")
        mod = importlib.import_module(name.replace("/", ".")) if "/" in name else load_stage(name)
    else:
        mod, script = script, script.__name__
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved, threads = dict(backends._BACKENDS), torch.get_num_threads()
    torch.set_num_threads(1)  # as run_script's OMP_NUM_THREADS=1: the same numbers as a run in its own process
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            common.run_main(lambda: mod.main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        while common._HELD_LOCKS:
            common._HELD_LOCKS.pop().close()
        backends._BACKENDS.clear()
        backends._BACKENDS.update(saved)
        torch.set_num_threads(threads)
    p = subprocess.CompletedProcess([str(script), *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, f"exit {code}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer(str(models.embedded_tokenizer_path()))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with the SmolLM2 tokenizer and chat template (random weights)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return ROOT / "data" / "demo_esconv.json"


@pytest.fixture(scope="session")
def eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with an untied output row for EOS aligned with its typical hidden state (logit ~6), so
    some completions stop at once and others run to the cap: the overlong reward then differs within groups
    (a random model otherwise never stops, and every reward would be equal)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("eos") / "model"
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = src.config
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(src.state_dict(), strict=False)
    tok = models.load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.copy_(src.model.embed_tokens.weight)
        x = torch.tensor([models.chat_ids(tok, [{"role": "user", "content": "I feel worried today."}], "<think>")])
        h = model.model(input_ids=x).last_hidden_state[0].mean(0)
        model.lm_head.weight[2] = 6.0 * h / h.norm() ** 2
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class JsonServer:
    """A tiny OpenAI-compatible server on 127.0.0.1 answering every POST with answers[min(hits, last)]: a
    (status code, JSON body) pair. Counts the requests."""

    def __init__(self, *answers):
        self.answers, self.hits = answers, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code, body = server.answers[min(server.hits, len(server.answers) - 1)]
                server.hits += 1
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
