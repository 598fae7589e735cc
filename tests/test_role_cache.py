"""role_cache.py: the record/replay cache of role calls (keys, partial batches, seeds, modes, torn files, ranks),
on fake backends, the tiny hf: model, the real `transformers serve` (openai:) and the stages 02, 05 and 06."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import backends
import common
import role_cache
from conftest import ROOT, run_in_process
from test_openai_backend import served_model, server  # noqa: F401 (the real `transformers serve`)

CHATS = [[{"role": "user", "content": f"I feel worried about thing {i}."}] for i in range(4)]


class Fake(backends.Backend):
    """Answers that are a function of what the rule says determines them, recording the batches it gets."""

    def __init__(self, rule="per-item", spec="fake:m"):
        self.spec, self.seed_rule, self.batches = spec, rule, []

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.calls += 1
        self.batches.append([c[-1]["content"] for c in chats])
        everyone = "|".join(c[-1]["content"] for c in chats)
        out = []
        for i, c in enumerate(chats):
            s = {"per-item": seed, "position": None if seed is None else seed + i * n, "batch": seed}[self.seed_rule]
            tag = f"{everyone}@{i}" if self.seed_rule == "batch" else ""
            out.append([f"{prefill}{c[-1]['content']}/{s}/{j}/{temperature}/{max_new_tokens}{tag}" for j in range(n)])
        return out

    def loglik(self, chats, continuations):
        self.calls += 1
        self.batches.append([c[-1]["content"] for c in chats])
        return [-float(len(c[-1]["content"]) + len(k)) / 7 for c, k in zip(chats, continuations)]


def test_replay_is_identical_with_zero_model_calls(tmp_path):
    inner = Fake()
    cache = role_cache.RoleCache(tmp_path / "c")
    b = cache.wrap(inner)
    first = b.generate(CHATS, n=2, seed=5, temperature=0.7, max_new_tokens=9)
    ll = b.loglik(CHATS, ["a", "bb", "c", "dd"])
    opts = b.option_loglik(CHATS[:2], ["yes", "no"])
    assert inner.calls == 3 and cache.totals() == {"hits": 0, "misses": 10, "model_calls": 3}
    inner2 = Fake()
    cache2 = role_cache.RoleCache(tmp_path / "c")  # another process: reads the files
    b2 = cache2.wrap(inner2)
    assert b2.generate(CHATS, n=2, seed=5, temperature=0.7, max_new_tokens=9) == first
    assert b2.loglik(CHATS, ["a", "bb", "c", "dd"]) == ll and b2.option_loglik(CHATS[:2], ["yes", "no"]) == opts
    assert json.dumps([first, ll, opts]) == json.dumps([b2.generate(CHATS, n=2, seed=5, temperature=0.7, max_new_tokens=9),
                                                       b2.loglik(CHATS, ["a", "bb", "c", "dd"]),
                                                       b2.option_loglik(CHATS[:2], ["yes", "no"])])  # byte for byte
    assert inner2.calls == 0 and cache2.totals()["model_calls"] == 0 and cache2.totals()["hits"] == 20
    assert b2.complete(CHATS[:1], seed=5, temperature=0.7, max_new_tokens=9) == [first[0][0]]  # n=1 is another key
    assert inner2.calls == 1


def test_partial_batch_sends_only_the_misses_in_one_call_in_order(tmp_path):
    inner = Fake()
    b = role_cache.RoleCache(tmp_path / "c").wrap(inner)
    b.generate([CHATS[0], CHATS[2]], seed=3, temperature=0.7)
    inner.batches.clear()
    full = b.generate(CHATS, seed=3, temperature=0.7)
    assert inner.batches == [[CHATS[1][0]["content"], CHATS[3][0]["content"]]]  # one call, the misses only
    assert full == Fake().generate(CHATS, seed=3, temperature=0.7)  # in order, as an uncached call


@pytest.mark.parametrize("change", [
    dict(chats=[[{"role": "user", "content": "another prompt"}]] + CHATS[1:]), dict(temperature=0.8), dict(top_p=0.9),
    dict(max_new_tokens=10), dict(n=2), dict(seed=4), dict(prefill="{"), dict(spec="fake:other")])
def test_a_changed_prompt_setting_seed_or_model_misses(tmp_path, change):
    base = dict(chats=CHATS, temperature=0.7, top_p=1.0, max_new_tokens=9, n=1, seed=3, prefill="")
    cache = role_cache.RoleCache(tmp_path / "c")
    cache.wrap(Fake()).generate(base["chats"], **{k: v for k, v in base.items() if k != "chats"})
    kw = {**base, **change}
    inner = Fake(spec=kw.pop("spec", "fake:m"))
    cache.wrap(inner).generate(kw.pop("chats"), **kw)
    assert inner.calls == 1 and len(inner.batches[0]) == (1 if "chats" in change else 4)


def test_position_seeded_backend_partial_batches_equal_full_ones(tmp_path):
    """vllm: prompt i draws at seed + i*n: the misses go in runs of consecutive positions, each at its own seed."""
    want = Fake("position").generate(CHATS + CHATS[:2], n=2, seed=10, temperature=1.0)
    inner = Fake("position")
    b = role_cache.RoleCache(tmp_path / "c").wrap(inner)
    six = CHATS + [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    b.generate([six[1]], n=2, seed=10 + 1 * 2, temperature=1.0)  # = item 1 of the full batch
    b.generate(six[3:5], n=2, seed=10 + 3 * 2, temperature=1.0)  # = items 3, 4
    inner.batches.clear()
    got = b.generate(six, n=2, seed=10, temperature=1.0)
    assert inner.batches == [[six[0][0]["content"]], [six[2][0]["content"]], [six[5][0]["content"]]]  # three runs
    assert got == Fake("position").generate(six, n=2, seed=10, temperature=1.0)
    assert got[:4] == want[:4]


def test_batch_seeded_backend_resends_the_whole_batch(tmp_path):
    """hf: one random stream per call: a sampled item is keyed by its batch and place; a miss sends the batch."""
    inner = Fake("batch")
    cache = role_cache.RoleCache(tmp_path / "c")
    b = cache.wrap(inner)
    full = b.generate(CHATS, seed=1, temperature=0.7)
    b.generate(CHATS[:2], seed=1, temperature=0.7)  # another batch: its own keys
    assert inner.calls == 2
    # lose the last answer of the first batch (a torn write): the whole batch goes again, the answers are the same
    f = next((tmp_path / "c").glob("*.jsonl"))
    lines = f.read_bytes().split(b"\n")
    f.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:20])
    inner2 = Fake("batch")
    assert role_cache.RoleCache(tmp_path / "c").wrap(inner2).generate(CHATS, seed=1, temperature=0.7) == full
    assert inner2.batches == [[c[0]["content"] for c in CHATS]]
    # greedy: no seed matters, items are keyed alone and hit in any batch
    b.generate(CHATS, temperature=0.0, seed=1)
    inner.batches.clear()
    b.generate(CHATS[::-1] + [[{"role": "user", "content": "new"}]], temperature=0.0, seed=99)
    assert inner.batches == [["new"]]


def test_unseeded_sampling_is_never_cached_and_read_mode_refuses_it(tmp_path):
    inner = Fake()
    b = role_cache.RoleCache(tmp_path / "c").wrap(inner)
    b.generate(CHATS, temperature=0.7)
    b.generate(CHATS, temperature=0.7)
    assert inner.calls == 2 and not list((tmp_path / "c").glob("*.jsonl"))
    (tmp_path / "c").mkdir()
    with pytest.raises(common.StageFailure, match="without a seed"):
        role_cache.RoleCache(tmp_path / "c", "read").wrap(Fake()).generate(CHATS, temperature=0.7)


def test_read_mode_replays_and_a_miss_is_one_line_naming_the_call(tmp_path):
    role_cache.RoleCache(tmp_path / "c").wrap(Fake()).generate(CHATS[:2], seed=1, temperature=0.7)
    inner = Fake()
    b = role_cache.RoleCache(tmp_path / "c", "read").wrap(inner)
    assert len(b.generate(CHATS[:2], seed=1, temperature=0.7)) == 2
    with pytest.raises(common.StageFailure) as e:
        b.generate(CHATS[:3], seed=1, temperature=0.7)
    msg = str(e.value)
    assert "\n" not in msg and "generate call to fake:m" in msg and "item 3 of 3" in msg and "thing 2" in msg
    assert inner.calls == 0
    assert len(list((tmp_path / "c").glob("*.jsonl"))) == 1  # read mode writes nothing


def test_write_mode_rerecords_and_the_newer_answer_wins(tmp_path):
    role_cache.RoleCache(tmp_path / "c").wrap(Fake()).generate(CHATS[:1], seed=1, temperature=0.7)
    time.sleep(0.01)
    other = Fake()
    other.generate = lambda chats, **kw: [["re-recorded"] for _ in chats]
    role_cache.RoleCache(tmp_path / "c", "write").wrap(other).generate(CHATS[:1], seed=1, temperature=0.7)
    inner = Fake()
    assert role_cache.RoleCache(tmp_path / "c").wrap(inner).generate(CHATS[:1], seed=1, temperature=0.7) == [["re-recorded"]]
    assert inner.calls == 0


def test_torn_and_damaged_lines_are_skipped(tmp_path):
    b = role_cache.RoleCache(tmp_path / "c").wrap(Fake())
    want = b.generate(CHATS, seed=2, temperature=0.7)
    f = next((tmp_path / "c").glob("*.jsonl"))
    data = f.read_bytes().split(b"\n")
    damaged = data[1].replace(b"thing 1", b"thing 9")  # parses, but its checksum does not match
    f.write_bytes(data[0] + b"\n" + damaged + b"\n" + b"\0" * 30 + b"\n" + data[2] + b"\n" + data[3][:15])
    cache = role_cache.RoleCache(tmp_path / "c")
    assert cache.skipped == 2
    inner = Fake()
    assert cache.wrap(inner).generate(CHATS, seed=2, temperature=0.7) == want
    assert inner.batches == [[CHATS[1][0]["content"], CHATS[3][0]["content"]]]


def test_concurrent_processes_write_their_own_files(tmp_path):
    """Two writers at once (ranks, runs): one file each, every answer readable by a third."""
    code = ("import sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r}); import role_cache, test_role_cache as t\n"
            "b = role_cache.RoleCache({d!r}).wrap(t.Fake())\n"
            "for s in range(40): b.generate(t.CHATS, seed=s * 2 + {r}, temperature=0.7)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                                 d=str(tmp_path / "c"), r=r)]) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list((tmp_path / "c").glob("*.jsonl"))) == 2
    inner = Fake()
    b = role_cache.RoleCache(tmp_path / "c").wrap(inner)
    for s in range(80):
        b.generate(CHATS, seed=s, temperature=0.7)
    assert inner.calls == 0


def test_killed_writer_leaves_a_readable_cache(tmp_path):
    """SIGKILL a process in the middle of writing answers: the next process reads the cache without error and
    completes the calls the first never stored."""
    code = ("import sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r}); import role_cache, test_role_cache as t\n"
            "b = role_cache.RoleCache({d!r}).wrap(t.Fake())\n"
            "big = [[{{'role': 'user', 'content': 'x' * 200000 + str(i)}}] for i in range(8)]\n"
            "for s in range(100000): b.generate(big, seed=s, temperature=0.7)\n")
    p = subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), tests=str(ROOT / "tests"), d=str(tmp_path / "c"))])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(f.stat().st_size for f in (tmp_path / "c").glob("*.jsonl")) < 20_000_000:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    cache = role_cache.RoleCache(tmp_path / "c")
    n = len(cache.entries)
    assert n > 0
    big = [[{"role": "user", "content": "x" * 200000 + str(i)}] for i in range(8)]
    inner = Fake()
    b = cache.wrap(inner)
    for s in range(n // 8 + 2):  # every stored batch replays; the first unstored ones go to the model
        assert b.generate(big, seed=s, temperature=0.7) == Fake().generate(big, seed=s, temperature=0.7)
    assert 1 <= inner.calls <= 3


def test_hf_model_key_covers_its_files_and_the_rng_is_untouched(tmp_path, tiny_model_dir):
    """hf: the answers are keyed by the model folder's digest (a changed file misses), replayed byte for byte."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    dev = torch.device("cpu")
    cache = role_cache.RoleCache(tmp_path / "c")
    hf = backends.HFBackend(str(folder), dev, torch.float32, batch_size=4)
    b = cache.wrap(hf)
    want = hf.generate(CHATS, max_new_tokens=5, temperature=1.0, seed=7, n=2)
    assert b.generate(CHATS, max_new_tokens=5, temperature=1.0, seed=7, n=2) == want  # the same draws through the cache
    ll = b.option_loglik(CHATS, ["yes", "no"])
    calls = hf.calls
    again = role_cache.RoleCache(tmp_path / "c").wrap(hf)
    assert again.generate(CHATS, max_new_tokens=5, temperature=1.0, seed=7, n=2) == want
    assert again.option_loglik(CHATS, ["yes", "no"]) == ll and hf.calls == calls
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**cfg, "note": 1}))  # any file of the model
    changed = role_cache.RoleCache(tmp_path / "c").wrap(hf)
    changed.option_loglik(CHATS, ["yes", "no"])
    assert hf.calls == calls + 1


def test_seeded_hf_call_leaves_the_process_rng_alone(tiny_model_dir):
    """A seeded hf: role call draws from its own stream: what the stage samples next (05's rollouts) is the same
    whether the call ran or was replayed from the cache."""
    hf = backends.HFBackend(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = hf.generate(CHATS[:2], max_new_tokens=3, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert hf.generate(CHATS[:2], max_new_tokens=3, temperature=1.0, seed=7) == a  # still seeded


def test_make_backend_wraps_one_wrapper_per_model_and_release_forgets_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(backends, "_BACKENDS", {})
    cache = role_cache.RoleCache(tmp_path / "c")
    a = backends.make_backend(f"hf:{tiny_model_dir}", device="cpu", cache=cache)
    b = backends.make_backend(f"hf:{tiny_model_dir}", device="cpu", cache=cache)
    assert a is b and isinstance(a, role_cache.CachedBackend) and a.tok is a.inner.tok  # attributes of the inner one
    assert backends.make_backend("scripted", cache=cache).spec == "scripted"  # rules: not cached
    assert not isinstance(backends.make_backend(f"hf:{tiny_model_dir}", device="cpu"), role_cache.CachedBackend)
    backends.release_backend(a)
    assert backends._BACKENDS.get((f"hf:{tiny_model_dir}", None, "cpu", "auto", "hf")) is None and not cache._wrapped


# ----------------------------------------------------------------------------------------------------
# The real `transformers serve` (openai:) and the stages


def test_openai_answers_replay_without_the_server(server, tmp_path, monkeypatch):
    """Record through make_backend against the real server; replay with no server at all (a dead URL): the same
    texts, no request; a changed setting misses, and replay-only mode refuses it in one line."""
    from conftest import free_port

    url, name = server
    monkeypatch.setattr(backends, "_BACKENDS", {})
    cache = role_cache.RoleCache(tmp_path / "c")
    b = backends.make_backend(f"openai:{name}", url, cache=cache)
    first = b.generate(CHATS[:3], max_new_tokens=5, temperature=1.0, seed=11, n=2)
    greedy = b.complete(CHATS[:3], max_new_tokens=5, temperature=0.0)
    assert b.calls == 2 and cache.totals() == {"hits": 0, "misses": 6, "model_calls": 2}
    dead = backends.OpenAIBackend(name, f"http://127.0.0.1:{free_port()}/v1", retries=0)
    replay = role_cache.RoleCache(tmp_path / "c", "read").wrap(dead)
    assert replay.generate(CHATS[:3], max_new_tokens=5, temperature=1.0, seed=11, n=2) == first
    assert replay.complete(CHATS[:3], max_new_tokens=5, temperature=0.0) == greedy and replay.calls == 0
    with pytest.raises(common.StageFailure, match=r"^role cache .* no stored answer for a generate call to openai:"):
        replay.generate(CHATS[:3], max_new_tokens=6, temperature=1.0, seed=11, n=2)
    with pytest.raises(common.ServerError):  # readwrite: the miss goes to the (dead) server
        role_cache.RoleCache(tmp_path / "c").wrap(dead).generate(CHATS[:1], max_new_tokens=5, temperature=1.0, seed=12)


def _outputs(folder, names):
    return {n: (folder / n).read_bytes() for n in names}


def _counts(folder):
    c = json.loads((folder / "role_cache.json").read_text())
    return c["hits"], c["misses"], c["model_calls"]


def test_02_killed_run_resumes_from_the_cache_and_replays_byte_for_byte(tmp_path, tiny_model_dir, demo_data):
    dialogues = common.load_dialogues(demo_data)
    turns = common.build_turns(dialogues, common.split_dialogues([x["dialog_id"] for x in dialogues], 0, 0.2))
    common.write_jsonl(tmp_path / "turns.jsonl", turns)
    tiny, cache = f"hf:{tiny_model_dir}", tmp_path / "cache"
    args = ["02_simulate.py", "--data", tmp_path / "turns.jsonl", "--policy", tiny, "--seeker", tiny, "--critic", tiny,
            "--max-examples", 6, "--per-dialogue", 1, "-m", 2, "--max-turns", 3, "--batch-size", 2, "--max-new-tokens", 6,
            "--seeker-max-new-tokens", 6, "--context-window", 4, "--theta", 0.0, "--delta", -0.258, "--role-cache", cache]
    # a run killed (SIGKILL) once it has stored some answers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen([sys.executable, *map(str, args), "--out", str(tmp_path / "a")], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and sum(
            f.stat().st_size for f in cache.glob("*.jsonl") if f.stat().st_size) < 6000:
        time.sleep(0.02)
    p.kill()
    assert p.wait() == -signal.SIGKILL  # killed mid-way, not finished
    # the same command completes, reading the torn cache; then a replay-only run makes no model call
    done = run_in_process(*args, "--out", tmp_path / "a", check=False)
    assert done.returncode in (0, 2) and "role cache" in done.stdout, done.stderr  # 2: a one-class label set
    again = run_in_process(*args, "--out", tmp_path / "b", "--role-cache-mode", "read", check=False)
    assert again.returncode == done.returncode, again.stderr
    names = ["rollouts.jsonl", "simulate_stats.json"]
    assert _outputs(tmp_path / "a", names) == _outputs(tmp_path / "b", names)
    assert _counts(tmp_path / "b")[1:] == (0, 0) and _counts(tmp_path / "b")[0] > 0
    # a changed setting misses: replay-only stops with one line, exit code 1
    bad = run_in_process(*args, "--out", tmp_path / "c", "--seeker-temperature", 0.5, "--role-cache-mode", "read", check=False)
    last = bad.stderr.strip().splitlines()[-1]  # (the lines above it: progress bars)
    assert bad.returncode == 1 and last.startswith("error: role cache") and "no stored answer for a generate call" in last
    assert "temperature 0.5" in last and not (tmp_path / "c" / "rollouts.jsonl").exists()


def test_05_second_run_makes_no_role_call_and_trains_the_same(tmp_path, tiny_model_dir, demo_data):
    """Two steps with hf: seeker and GRM: the step-2 rollouts continue the process's random stream, which a
    replayed role call must leave as a live one does."""
    sel = tmp_path / "sel"
    run_in_process("01_select.py", "--data", demo_data, "--out", sel, "--judge", "none", "--max-examples", "3")
    tiny = f"hf:{tiny_model_dir}"
    args = ["05_rapo.py", "--data", sel / "turns.jsonl", "--policy", tiny, "--seeker", tiny, "--grm", tiny,
            "--prompts-per-step", 2, "--group-size", 2, "--max-steps", 2, "--max-new-tokens", 6, "--grm-max-new-tokens", 8,
            "--seeker-max-new-tokens", 6, "--grm-retries", 1, "--role-cache", tmp_path / "cache"]
    run_in_process(*args, "--out", tmp_path / "a")
    run_in_process(*args, "--out", tmp_path / "b")
    assert _counts(tmp_path / "a")[2] > 0 and _counts(tmp_path / "b")[1:] == (0, 0)
    names = ["samples.jsonl", "adapter/adapter_model.safetensors"]
    assert _outputs(tmp_path / "a", names) == _outputs(tmp_path / "b", names)


def test_06_second_run_makes_no_model_call_and_writes_the_same_report(tmp_path, tiny_model_dir, demo_data):
    d = tmp_path / "turns"
    run_in_process("01_select.py", "--data", demo_data, "--out", d, "--judge", "none", "--test-frac", "0.2")
    t = f"hf:{tiny_model_dir}"
    args = ["06_eval.py", "--data", d / "turns.jsonl", "--seeker", t, "--critic", t, "--judge", t, "--policy", t,
            "--max-examples", 2, "--max-ref-turns", 2, "--max-turns", 2, "--judge-rounds", 1, "--max-new-tokens", 5,
            "--seeker-max-new-tokens", 5, "--batch-size", 2, "--bootstrap", 0, "--bertscore-model", "none",
            "--role-cache", tmp_path / "cache"]
    run_in_process(*args, "--out", tmp_path / "a")
    run_in_process(*args, "--out", tmp_path / "b")
    assert _counts(tmp_path / "a")[2] > 0 and _counts(tmp_path / "b")[1:] == (0, 0)
    names = ["scores.json", "report.md", "dialogs.jsonl", "replies.jsonl"]
    a, b = _outputs(tmp_path / "a", names), _outputs(tmp_path / "b", names)
    assert a["dialogs.jsonl"] == b["dialogs.jsonl"] and a["replies.jsonl"] == b["replies.jsonl"]
    # scores.json / report.md name the command, whose --out differs
    out_a, out_b = str(tmp_path / "a").encode(), str(tmp_path / "b").encode()
    assert a["scores.json"].replace(out_a, out_b) == b["scores.json"] and a["report.md"].replace(out_a, out_b) == b["report.md"]


def test_05_grm_prefill_sees_an_openai_grm_through_the_cache(tmp_path):
    rapo = common.load_stage("05_rapo")
    served = backends.OpenAIBackend("m", "http://127.0.0.1:9/v1")
    assert rapo.grm_prefill(role_cache.RoleCache(tmp_path / "c").wrap(served)) == rapo.grm_prefill(served) == ""


def test_any_text_round_trips_byte_for_byte(tmp_path):
    """Unicode, a lone surrogate, newlines and quotes in a model's text; NaN and -inf log-likelihoods."""
    odd = ["héllo 😊\n\"quoted\" \\ \ud800 end", "", "\x00"]
    inner = Fake()
    inner.generate = lambda chats, **kw: [odd for _ in chats]
    inner.loglik = lambda chats, conts: [float("nan"), float("-inf")][:len(chats)]
    b = role_cache.RoleCache(tmp_path / "c").wrap(inner)
    assert b.generate(CHATS[:1], seed=1, temperature=0.5) == [odd]
    b.loglik(CHATS[:2], ["a", "b"])
    again = role_cache.RoleCache(tmp_path / "c").wrap(Fake())
    assert again.generate(CHATS[:1], seed=1, temperature=0.5) == [odd]
    ll = again.loglik(CHATS[:2], ["a", "b"])
    assert ll[0] != ll[0] and ll[1] == float("-inf")


def test_01_judge_replays_in_read_mode(tmp_path, tiny_model_dir, demo_data):
    args = ["01_select.py", "--data", demo_data, "--judge", f"hf:{tiny_model_dir}", "--max-examples", 3,
            "--role-cache", tmp_path / "cache"]
    run_in_process(*args, "--out", tmp_path / "a")
    run_in_process(*args, "--out", tmp_path / "b", "--role-cache-mode", "read")
    assert (tmp_path / "a" / "turns.jsonl").read_bytes() == (tmp_path / "b" / "turns.jsonl").read_bytes()
    a, b = (json.loads((tmp_path / d / "select_role_cache.json").read_text()) for d in "ab")
    assert a["misses"] > 0 and a["model_calls"] > 0 and (b["hits"], b["misses"], b["model_calls"]) == (a["misses"], 0, 0)
