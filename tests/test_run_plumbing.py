"""The run plumbing of common.py (docs/reliability.md: resume, checkpoints and outputs): settings restored and
checked on --resume, input hashes, the atomic checkpoint swap and its fallback, weights_only loading, RNG
states, and the --out lock; end to end with 01_select.py (no model needed with --judge none)."""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, run_script


def parser():
    p = argparse.ArgumentParser()
    common.add_common_args(p, data="d.jsonl", out="o", resume_flag="resume")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--scale-rewards", default="group")
    return p


def parse(argv):
    p = parser()
    args = p.parse_args(argv)
    return common.resume_args(p, args, argv, Path(args.out) / "ckpt")


def write_run(tmp_path, argv, step=3):
    """A checkpoint as save_checkpoint writes it, for the run started with argv."""
    data = tmp_path / "d.jsonl"
    if not data.exists():
        data.write_text('{"id": 1}\n')
    args = parser().parse_args(argv)
    common.save_checkpoint(tmp_path / "o" / "ckpt", step, args, None, lambda tmp: (tmp / "state.pt").write_text("x"),
                           common.input_digests(args, ("data",)))


def test_given_flags_are_the_ones_on_the_command_line():
    assert common.given_flags(parser(), ["--lr", "1e-3", "--flag", "--out", "x"]) == {"lr", "flag", "out"}
    assert common.given_flags(parser(), []) == set()


def test_resume_restores_settings_and_refuses_other_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, ["--data", "d.jsonl", "--lr", "0.5", "--betas", "0.8", "0.9", "--max-steps", "4", "--stop-after", "1",
                         "--seed", "7", "--flag"])
    a = parse(["--resume"])  # the README's command: every setting comes from the run
    assert (a.lr, list(a.betas), a.max_steps, a.seed, a.flag) == (0.5, [0.8, 0.9], 4, 7, True)
    assert a.stop_after is None and a.resume  # per invocation: never restored
    a = parse(["--resume", "--lr", "0.5", "--betas", "0.8", "0.9", "--seed", "7"])  # equal: accepted
    assert a.lr == 0.5
    a = parse(["--resume", "--max-steps", "9", "--stop-after", "2", "--device", "cpu"])  # may change
    assert (a.max_steps, a.stop_after, a.device, a.lr) == (9, 2, "cpu", 0.5)
    for argv, flag in ((["--lr", "0.1"], "--lr 0.1"), (["--seed", "0"], "--seed 0"), (["--betas", "0.8", "0.99"], "--betas"),
                       (["--data", "other.jsonl"], "--data other.jsonl")):
        with pytest.raises(common.InputError, match=f"^--resume: {flag}.* differs from the run's"):
            parse(["--resume", *argv])
    with pytest.raises(common.InputError, match="exclude each other"):
        parse(["--resume", "--overwrite"])
    # the input file's content is part of the run
    (tmp_path / "d.jsonl").write_text('{"id": 2}\n')
    with pytest.raises(common.InputError, match="made from another --data"):
        parse(["--resume"])
    shutil.rmtree(tmp_path / "o")
    with pytest.raises(common.InputError, match="--resume: no checkpoint"):
        parse(["--resume"])
    assert parse(["--lr", "0.2"]).lr == 0.2  # no --resume: nothing restored


def test_checkpoint_swap_falls_back_to_the_newest_complete_one(tmp_path):
    ck = tmp_path / "checkpoint"
    args = argparse.Namespace(x=1)
    save = lambda step: common.save_checkpoint(ck, step, args, None, lambda t: (t / "w.txt").write_text(str(step)))
    save(1)
    save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert common.find_checkpoint(ck)[1]["step"] == 2 and (ck / "w.txt").read_text() == "2"
    # a kill between the two renames: checkpoint.old (step 2) and checkpoint.tmp (step 3), both complete
    shutil.copytree(ck, tmp_path / "checkpoint.tmp")
    common.write_json(tmp_path / "checkpoint.tmp" / common.CHECKPOINT_META, {"step": 3, "args": {}, "inputs": {}})
    (tmp_path / "checkpoint.tmp" / "w.txt").write_text("3")
    os.replace(ck, tmp_path / "checkpoint.old")
    path, meta = common.find_checkpoint(ck)
    assert path.name == "checkpoint.tmp" and meta["step"] == 3
    save(4)  # the newest complete one is kept as `checkpoint` until the new one is complete, then replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"] and (ck / "w.txt").read_text() == "4"
    # a kill while writing: an incomplete checkpoint.tmp (no meta.json) is ignored
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "w.txt").write_text("half")
    assert common.find_checkpoint(ck)[0] == ck
    # a kill after the swap, before the old one is removed
    shutil.copytree(ck, tmp_path / "checkpoint.old")
    common.write_json(tmp_path / "checkpoint.old" / common.CHECKPOINT_META, {"step": 2, "args": {}, "inputs": {}})
    assert common.find_checkpoint(ck)[0] == ck
    shutil.rmtree(ck)
    (tmp_path / "checkpoint.tmp" / "w.txt").unlink()
    assert common.find_checkpoint(ck)[0].name == "checkpoint.old"
    assert common.find_checkpoint(tmp_path / "none") is None


class Payload:
    """Unpickling this object runs a shell command (what a crafted checkpoint file can do with weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_state_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "step": 1}, tmp_path / "trainer.pt")
    with pytest.raises(common.InputError, match=r"trainer.pt: refused to load"):
        common.load_state(tmp_path / "trainer.pt")
    assert not marker.exists()
    # optimiser and scheduler states, tensors and plain containers load
    p = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(p.parameters(), betas=(0.8, 0.9))
    p(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "h": [{"loss": 1.5}]}, tmp_path / "ok.pt")
    st = common.load_state(tmp_path / "ok.pt")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(st["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and st["h"] == [{"loss": 1.5}]


def test_rng_state_round_trip_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # numpy: a cached Gaussian is part of the state
    torch.save(common.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    common.set_rng_state(common.load_state(tmp_path / "rng.pt"))
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist()) == want


def hold_lock(out):
    """A process holding the --out lock until killed."""
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import common; common.lock_out({str(out)!r}); " \
           "print('locked', flush=True); time.sleep(120)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def run01(*args):
    return run_script("01_select.py", *args, check=False)


def test_lock_on_out_names_the_other_process(tmp_path, demo_data):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(common.InputError, match=f"in use by another run \\(pid {holder.pid} on "):
            common.lock_out(out)
        r = run01("--data", demo_data, "--out", out, "--judge", "none", "--max-examples", 2)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: {out} is in use by another run (pid {holder.pid} on ")
        assert not (out / "turns.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait()
    r = run01("--data", demo_data, "--out", out, "--judge", "none", "--max-examples", 2)
    assert r.returncode == 0, r.stderr


def test_select_rerun_checks_input_and_settings(tmp_path, demo_data):
    out, data = tmp_path / "out", tmp_path / "esconv.json"
    shutil.copy(demo_data, data)
    base = ["--data", data, "--out", out, "--judge", "none", "--max-examples", 4]
    assert run01(*base).returncode == 0
    before = {p: (out / p).read_bytes() for p in ("turns.jsonl", "select_args.json", "select_stats.json")}
    r = run01(*base)  # same input and settings: resumes, nothing to do
    assert r.returncode == 0 and "0 to do" in r.stdout
    for extra, flag in ((["--seed", 1], "--seed 1"), (["--test-frac", 0.3], "--test-frac 0.3"),
                        (["--max-examples", 5], "--max-examples 5")):
        r = run01(*base, *extra)
        assert r.returncode == 2 and f"were made with {flag.split()[0]}" in r.stderr and "--overwrite" in r.stderr, r.stderr
    dialogues = json.loads(data.read_text())
    dialogues[0], dialogues[1] = dialogues[1], dialogues[0]
    data.write_text(json.dumps(dialogues))
    r = run01(*base)
    assert r.returncode == 2 and "made from another --data" in r.stderr, r.stderr
    assert {p: (out / p).read_bytes() for p in before} == before  # untouched
    # --overwrite with a judge that cannot load deletes nothing (the judge loads first)
    (tmp_path / "not_a_model").mkdir()
    r = run01(*base, "--overwrite", "--judge", f"hf:{tmp_path / 'not_a_model'}")
    assert r.returncode != 0
    assert {p: (out / p).read_bytes() for p in before} == before
    r = run01(*base, "--overwrite")
    assert r.returncode == 0 and (out / "turns.jsonl").read_bytes() != before["turns.jsonl"]


def test_resume_maps_a_renamed_setting(tmp_path, monkeypatch):
    """A run started before --adv-norm became --scale-rewards resumes with the same normalisation: its saved
    adv_norm 'none' must not turn into the new flag's default 'group'."""
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, ["--data", "d.jsonl"])
    meta_path = tmp_path / "o" / "ckpt" / common.CHECKPOINT_META
    meta = json.loads(meta_path.read_text())
    meta["args"].pop("scale_rewards")
    meta["args"]["adv_norm"] = "none"
    common.write_json(meta_path, meta)
    assert parse(["--resume"]).scale_rewards == "none"
    with pytest.raises(common.InputError, match="--scale-rewards group differs"):
        parse(["--resume", "--scale-rewards", "group"])
