"""Failures that must stop a stage with one line, second round (issue 30): the items of a hostile trial that did
not hold. Each test names its item; every one failed on the code before the fix."""
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, JsonServer, load_stage, run_script

import backends  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402

rapo = load_stage("05_rapo")
grpo = load_stage("04_grpo")


def run(script, *args, timeout=300):
    return run_script(script, *args, env={"OPENAI_API_KEY": None}, timeout=timeout, check=False)


def error_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith("error:")]


def refused(stage: str, argv: list, capsys) -> str:
    """Run a stage's main in-process under run_main; it must exit 2 with exactly one line on stderr: returned."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: load_stage(stage).main([str(a) for a in argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def turns_file(path: Path, n: int = 8) -> Path:
    common.write_jsonl(path, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "split": "train", "target": "ok",
                               "context": [{"role": "user", "content": f"I feel low {i}."}]} for i in range(n)])
    return path


# ----------------------------------------------------------------------------------------------------
# Items 1, 9 and 10: optimiser, LoRA and --max-examples settings that trained backwards, trained nothing, or gave a
# traceback once the model had loaded, are refused up front (exit 2, one line, --out untouched)


@pytest.mark.parametrize("stage,flag", [
    ("03_train_rm", ["--max-grad-norm", "-1"]), ("04_grpo", ["--max-grad-norm", "-1"]),
    ("05_rapo", ["--max-grad-norm", "-1"]), ("04_grpo", ["--max-grad-norm", "0"]),  # item 1
    ("04_grpo", ["--lora-alpha", "0"]), ("05_rapo", ["--lora-alpha", "0"]),  # item 9
    ("04_grpo", ["--max-examples", "0"]), ("05_rapo", ["--max-examples", "0"]),  # item 9: one rule everywhere
    ("04_grpo", ["--adam-betas", "1.5", "0.9"]), ("05_rapo", ["--adam-betas", "0.9", "-0.1"]),  # item 10
    ("03_train_rm", ["--weight-decay", "-1"]), ("04_grpo", ["--weight-decay", "-1"]),  # item 10
])
def test_bad_optimiser_lora_and_max_examples_settings_are_refused_up_front(stage, flag, tmp_path, capsys,
                                                                           tiny_model_dir):
    out = tmp_path / "out"
    model = ["--rm" if stage == "03_train_rm" else "--policy", f"hf:{tiny_model_dir}"]
    err = refused(stage, ["--out", out, "--data", turns_file(tmp_path / "turns.jsonl"), *model, *flag], capsys)
    assert err.startswith(f"error: {flag[0]} ") and "must be" in err
    assert not out.exists()


def test_max_grad_norm_help_states_the_rule():
    """Item 1: the choice (refuse <= 0) is in --help."""
    for stage in ("03_train_rm", "04_grpo"):
        r = run_script(stage + ".py", "--help")
        assert "--max-grad-norm" in r.stdout and "> 0" in " ".join(r.stdout.split())


# ----------------------------------------------------------------------------------------------------
# Item 2: --overwrite deletes nothing before every role's spec and capability is checked


@pytest.mark.parametrize("stage,argv,says", [
    ("01_select", ["--judge", "scripted"], "--judge scripted"),
    ("01_select", ["--judge", "hf:embedded", "--judge-mode", "generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("02_simulate", ["--policy", "scripted", "--seeker", "scripted", "--critic", "scripted"], "--policy scripted"),
])
def test_overwrite_keeps_the_old_output_when_a_role_cannot_work(stage, argv, says, tmp_path, capsys, demo_data):
    out = tmp_path / "out"
    out.mkdir()
    name = "turns.jsonl" if stage == "01_select" else "rollouts.jsonl"
    (out / name).write_text('{"id": "old"}\n')
    data = demo_data if stage == "01_select" else turns_file(tmp_path / "turns.jsonl")
    err = refused(stage, ["--data", data, "--out", out, "--overwrite", *argv], capsys)
    assert err.startswith(f"error: {says}")
    assert (out / name).read_text() == '{"id": "old"}\n'  # nothing deleted


def test_a_role_that_has_no_scripted_version_is_named(tmp_path, capsys, demo_data):
    err = refused("01_select", ["--data", demo_data, "--out", tmp_path / "o", "--judge", "scripted"], capsys)
    assert err.startswith("error: --judge scripted: this role has no scripted version")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------
# Item 4: --resume with a larger --max-steps follows the NEW schedule from its first step


def cosine_lr(lr: float, k: int, total: int) -> float:
    """The learning rate of optimiser step k (0-based) of `total` under cosine decay without warm-up."""
    return lr * 0.5 * (1 + math.cos(math.pi * k / total))


@pytest.fixture(scope="module")
def rapo_groups(tiny_model_dir, tmp_path_factory):
    """Two fixed RAPO groups (G = 4) with scores and no teacher prompt."""
    tok = models.load_tokenizer(str(tiny_model_dir))
    recs = []
    for g in range(2):
        p = grpo.prompt_ids(tok, [{"role": "user", "content": f"worry {g}: I cannot sleep."}], rapo.RAPO_SYSTEM,
                            rapo.PREFILL, 128)
        recs.append({"prompt_ids": p, "completions": [[100 + 7 * j + g, 200 + j, 300] for j in range(4)],
                     "scores": [0.1, 0.9, 0.4, 0.6], "teacher_prompt_ids": None})
    path = tmp_path_factory.mktemp("rapo") / "groups.jsonl"
    common.write_jsonl(path, recs)
    return path


@pytest.fixture(scope="module")
def grpo_groups(tiny_model_dir, tmp_path_factory):
    tok = models.load_tokenizer(str(tiny_model_dir))
    recs = []
    for g in range(2):
        p = grpo.prompt_ids(tok, [{"role": "user", "content": f"worry {g}: I cannot sleep."}], "Be kind.", "", 128)
        recs.append({"prompt_ids": p, "completions": [[100 + 7 * j + g, 200 + j, 300] for j in range(4)],
                     "rewards": [0.1, 0.9, 0.4, 0.6]})
    path = tmp_path_factory.mktemp("grpo") / "groups.jsonl"
    common.write_jsonl(path, recs)
    return path


@pytest.mark.parametrize("stage", ["04_grpo", "05_rapo"])
def test_resume_with_more_steps_follows_the_new_schedule(stage, tiny_model_dir, grpo_groups, rapo_groups, tmp_path):
    out, lr = tmp_path / "run", 1e-3
    groups = grpo_groups if stage == "04_grpo" else rapo_groups
    r = run(stage + ".py", "--policy", f"hf:{tiny_model_dir}", "--rollouts-file", groups, "--group-size", 4,
            "--prompts-per-step", 2, "--max-steps", 3, "--lr", lr, "--lr-schedule", "cosine", "--lora-r", 2,
            "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(stage + ".py", "--out", out, "--resume", "--max-steps", 6)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [row["lr"] for row in common.read_jsonl(out / "metrics.jsonl")]
    want = [cosine_lr(lr, k, 3) for k in range(3)] + [cosine_lr(lr, k, 6) for k in range(3, 6)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)  # step 4 ran at 0.5e-3, not at the old schedule's 0


# ----------------------------------------------------------------------------------------------------
# Items 5 and 6: 01's dialogue ids over --data and --test-data, and --retries


def chat_jsonl(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": f"I feel sad ({i})."},
                                                              {"role": "assistant", "content": "Tell me more."}]}) + "\n"
                            for i in ids))
    return path


def test_01_refuses_a_dialogue_id_in_both_data_and_test_data(tmp_path, capsys):
    data, test = chat_jsonl(tmp_path / "a.jsonl", ["a1", "a2", "x7"]), chat_jsonl(tmp_path / "b.jsonl", ["b1", "x7"])
    err = refused("01_select", ["--data", data, "--test-data", test, "--out", tmp_path / "o", "--judge", "none"], capsys)
    assert "dialogue id 'x7'" in err and str(test) in err and str(data) in err
    assert not (tmp_path / "o").exists()


def test_01_refuses_the_same_file_as_data_and_test_data(tmp_path, capsys, demo_data):
    err = refused("01_select", ["--data", demo_data, "--test-data", demo_data, "--out", tmp_path / "o", "--judge", "none"],
                  capsys)
    assert "the same file as --data" in err


def test_01_refuses_negative_retries(tmp_path, capsys, demo_data, tiny_model_dir):
    err = refused("01_select", ["--data", demo_data, "--out", tmp_path / "o", "--retries", "-1", "--judge",
                                f"hf:{tiny_model_dir}", "--judge-mode", "generate", "--max-examples", "2"], capsys)
    assert err == "error: --retries must be >= 0"


# ----------------------------------------------------------------------------------------------------
# Item 8: a checkpoint whose tensors do not all load is refused on --resume


def test_resume_refuses_a_checkpoint_whose_tensors_do_not_match(tiny_model_dir, grpo_groups, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    r = run("04_grpo.py", "--policy", f"hf:{tiny_model_dir}", "--rollouts-file", grpo_groups, "--group-size", 4,
            "--prompts-per-step", 2, "--max-steps", 2, "--stop-after", 1, "--lora-r", 2, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    path = out / "checkpoint" / "adapter" / "adapter_model.safetensors"
    sd = load_file(path)
    renamed = {k.replace("base_model.model.", "base_model.other."): v for k, v in sd.items()}  # nothing would load
    save_file(renamed, path)
    r = run("04_grpo.py", "--out", out, "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    err = error_lines(r.stderr)
    assert len(err) == 1 and str(path) in err[0] and "do not match" in err[0]
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 1  # nothing trained from a fresh LoRA

    sd.pop(next(iter(sd)))  # one tensor missing: refused too
    save_file(sd, path)
    r = run("04_grpo.py", "--out", out, "--resume")
    assert r.returncode == 2 and "1 missing" in r.stderr, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# Item 10: an --out that cannot be written, and Ctrl-C / SIGTERM anywhere: one line, no traceback


def test_a_dangling_symlink_as_out(tmp_path, capsys, demo_data):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    err = refused("01_select", ["--data", demo_data, "--out", link, "--judge", "none"], capsys)
    assert err == f"error: --out {link}: {link} is a symbolic link to {tmp_path / 'gone'}, which does not exist"


def test_an_out_that_cannot_be_written(tmp_path, capsys, demo_data):
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no process may create files in
        out = Path("/sys/esc-rl-test/out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out"
    err = refused("01_select", ["--data", demo_data, "--out", out, "--judge", "none"], capsys)
    assert err.startswith(f"error: --out {out}: cannot write there (")
    r = run("04_grpo.py", "--out", out, "--data", demo_data)  # a training stage, as a user runs it
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(error_lines(r.stderr)) == 1


def ctrl_c_as_in_a_terminal():
    """In the child before exec: SIGINT at its default, as a stage started in a terminal has it. A test run started in
    the background of a non-interactive shell (`pytest ... &`, as CI scripts do) ignores SIGINT, every child inherits
    that, and Python then installs no KeyboardInterrupt handler: the stage would not see the signal under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stage,sig,code", [("01_select.py", signal.SIGINT, 130), ("04_grpo.py", signal.SIGTERM, 143)])
def test_a_signal_while_the_stage_waits_gives_one_line(stage, sig, code, tmp_path, tiny_model_dir):
    """The stage blocks reading its --data (a FIFO nobody writes to) after its start-up; the signal stops it at once."""
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    extra = ["--judge", "none"] if stage == "01_select.py" else ["--policy", f"hf:{tiny_model_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    p = subprocess.Popen([sys.executable, str(ROOT / stage), "--data", str(fifo), "--out", str(tmp_path / "out"), *extra],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        deadline, w = time.monotonic() + 120, None
        while w is None and time.monotonic() < deadline and p.poll() is None:
            try:  # succeeds once the stage has opened the FIFO to read it: it is inside main()
                w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.1)
        assert w is not None, p.stderr.read() if p.poll() is not None else "the stage never read --data"
        time.sleep(0.3)  # (it now blocks in read())
        t0 = time.monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
        os.close(w)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err and error_lines(err) == [
        f"error: interrupted ({sig.name}): stopped; what was finished is kept (re-run, or --resume for 03/04/05, to continue)"]


# ----------------------------------------------------------------------------------------------------
# Items 2 (preflight), 3 and 7: openai: servers that refuse the key or model, never answer, or answer null


def completion(content) -> tuple[int, dict]:
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "finish_reason": "stop" if content is not None else "content_filter",
                              "message": {"role": "assistant", "content": content}}]}


REFUSED = {401: {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
           404: {"error": {"message": "The model 'm' does not exist", "type": "invalid_request_error"}}}


class SilentServer:
    """Accepts every connection and never answers (a hung server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.conns, self.accepted = [], threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            self.accepted.set()

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("stage,code", [("01_select", 401), ("02_simulate", 404), ("05_rapo", 401)])
def test_preflight_stops_a_refused_key_or_model_before_overwrite_deletes(stage, code, tmp_path, tiny_model_dir,
                                                                        demo_data):
    server = JsonServer((code, REFUSED[code]))
    out = tmp_path / "out"
    out.mkdir()
    tiny = f"hf:{tiny_model_dir}"
    role, old = {"01_select": ("--judge", "turns.jsonl"), "02_simulate": ("--seeker", "rollouts.jsonl"),
                 "05_rapo": ("--grm", "metrics.jsonl")}[stage]
    (out / old).write_text('{"id": "old", "step": 1}\n')
    data = demo_data if stage == "01_select" else turns_file(tmp_path / "turns.jsonl")
    extra = {"01_select": [], "02_simulate": ["--policy", tiny, "--critic", tiny],
             "05_rapo": ["--policy", tiny, "--all-turns", "--reward", "rubric-group"]}[stage]
    try:
        r = run(stage + ".py", "--data", data, "--out", out, "--overwrite", role, "openai:m", role + "-base-url",
                server.url, *extra)
    finally:
        server.close()
    assert r.returncode == 2, r.stderr[-3000:]
    err = error_lines(r.stderr)
    assert len(err) == 1 and err[0].startswith(f"error: {role} openai:m: ") and server.url in err[0]
    assert f"HTTP {code}" in err[0] and ("OPENAI_API_KEY" in err[0] if code == 401 else f"model name in {role}" in err[0])
    assert server.hits == 1  # one request, never retried
    assert (out / old).read_text() == '{"id": "old", "step": 1}\n'  # nothing deleted


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_stage_waiting_on_a_silent_server_at_once(sig, code, tmp_path, demo_data):
    """Item 3: 01 waits on a server that accepts and never answers (the per-try timeout is 10 minutes here);
    the signal stops it within seconds, with one line, the lock free and nothing written or deleted."""
    server, out = SilentServer(), tmp_path / "out"
    out.mkdir()
    (out / "turns.jsonl").write_text('{"id": "old"}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    p = subprocess.Popen([sys.executable, str(ROOT / "01_select.py"), "--data", str(demo_data), "--out", str(out),
                          "--overwrite", "--judge", "openai:m", "--judge-base-url", server.url, "--request-timeout", "600"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not server.accepted.wait(0.2) and p.poll() is None and time.monotonic() < deadline:
            pass
        assert server.accepted.is_set(), p.stderr.read() if p.poll() is not None else "no request after 120 s"
        time.sleep(0.5)
        t0 = time.monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        waited = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
        server.close()
    assert p.returncode == code and waited < 10, err[-3000:]
    assert "Traceback" not in err and len(error_lines(err)) == 1 and f"interrupted ({sig.name})" in err
    assert (out / "turns.jsonl").read_text() == '{"id": "old"}\n'
    with open(out / ".lock", "a+") as f:  # the lock is free
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_request_timeout_bounds_a_silent_server():
    """Item 3: each try waits --request-timeout seconds; (retries + 1) tries and the back-off, then ServerError."""
    server = SilentServer()
    try:
        b = backends.OpenAIBackend("m", server.url, timeout=0.5, retries=1)
        t0 = time.monotonic()
        with pytest.raises(common.ServerError, match=r"failed 2 times \(APITimeoutError\)"):
            b.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=4)
        assert time.monotonic() - t0 < 8  # 2 x 0.5 s + 1 s back-off
    finally:
        server.close()
    assert common.request_worst_case(60.0, 4) == 5 * 60 + 1 + 2 + 4 + 8


def test_request_timeout_is_a_flag_with_the_worst_case_in_help():
    r = run_script("01_select.py", "--help")
    text = " ".join(r.stdout.split())
    assert "--request-timeout" in text and "315 s" in text
    r = run("01_select.py", "--request-timeout", "0")
    assert r.returncode == 2 and error_lines(r.stderr) == ["error: --request-timeout must be > 0"]


def test_content_null_is_retried_counted_and_never_an_answer():
    """Item 7: a 200 whose content is null is not an answer: the try is repeated and counted; if every try is null the
    stage stops (ServerError) instead of storing "" or "..." as the model's text."""
    server = JsonServer(completion(None), completion(None), completion("I hear you."))
    try:
        b = backends.OpenAIBackend("m", server.url, concurrency=1, timeout=5.0, retries=2)
        assert b.complete([[{"role": "user", "content": "hi"}]]) == ["I hear you."]
        assert b.null_answers == 2 and server.hits == 3
    finally:
        server.close()
    server = JsonServer(completion(None))
    try:
        b = backends.OpenAIBackend("m", server.url, concurrency=1, timeout=5.0, retries=1)
        with pytest.raises(common.ServerError, match=r"failed 2 times \(content null, finish_reason content_filter\)"):
            b.complete([[{"role": "user", "content": "hi"}]])
        assert b.null_answers == 2
    finally:
        server.close()


@pytest.mark.parametrize("code", [401, 404])
def test_06_preflight_stops_a_refused_policy_server_before_overwrite_deletes(code, tmp_path):
    """Item 2 in 06: an openai: policy whose server refuses the key (401) or the model name (404) stops the run
    with one line before --overwrite deletes the old records or report."""
    server = JsonServer((code, REFUSED[code]))
    out, turns = tmp_path / "out", tmp_path / "turns.jsonl"
    out.mkdir()
    common.write_jsonl(turns, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "split": "test", "target": "ok",
                                "situation": "exams", "context": [{"role": "user", "content": f"I feel low {i}."}]}
                               for i in range(2)])
    old = {"dialogs.jsonl": '{"id": "old"}\n', "report.md": "# old report\n"}
    for name, text in old.items():
        (out / name).write_text(text)
    try:
        r = run("06_eval.py", "--data", turns, "--out", out, "--overwrite", "--parts", "interactive", "--seeker",
                "scripted", "--critic", "scripted", "--policy", "openai:m", "--policy-base-url", server.url)
    finally:
        server.close()
    assert r.returncode == 2, r.stderr[-3000:]
    err = error_lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("error: --policy openai:m") and f"HTTP {code}" in err[0], err
    assert server.hits == 1
    assert {n: (out / n).read_text() for n in old} == old  # nothing deleted
