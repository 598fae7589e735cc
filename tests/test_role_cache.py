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

import common
import role_cache
from conftest import ROOT, make_tiny_model, run_script

CHATS = [[{"role": "user", "content": f"I feel worried about thing {i}."}] for i in range(4)]


class Fake(common.Backend):
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
    hf = common.HFBackend(str(folder), dev, torch.float32, batch_size=4)
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
