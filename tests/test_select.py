"""01_select.py end to end (as a subprocess, as a user runs it): judged flags, resume, bad input."""
import json

from conftest import run_script


def run(*args, check=True):
    return run_script("01_select.py", *args, check=check)


def lines(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_select_none_keeps_every_train_turn(tmp_path, demo_data):
    run("--data", demo_data, "--out", tmp_path, "--judge", "none", "--max-examples", 4)
    recs = lines(tmp_path / "turns.jsonl")
    assert recs and len({r["id"] for r in recs}) == len(recs)
    assert all(r["learn"] is True for r in recs if r["split"] == "train")
    assert all(r["learn"] is None for r in recs if r["split"] != "train")
    stats = json.loads((tmp_path / "select_stats.json").read_text())
    assert stats["kept_fraction"] == 1.0 and json.loads((tmp_path / "select_args.json").read_text())["judge"] == "none"


def test_select_with_judges_and_resume(tmp_path, demo_data, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    common_args = ["--data", demo_data, "--judge", f"hf:{tiny_model_dir}", "--max-examples", 2, "--batch-size", 4]
    run(*common_args, "--out", a)
    recs = lines(a / "turns.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    assert train and all(isinstance(r["learn"], bool) and "p(learn)=" in r["learn_reason"] for r in train)
    # interrupted run: keep 5 records and a torn 6th line, then resume
    b.mkdir()
    text = (a / "turns.jsonl").read_text().splitlines(keepends=True)
    (b / "turns.jsonl").write_text("".join(text[:5]) + text[5][:20])
    (b / "select_args.json").write_text((a / "select_args.json").read_text())  # written at the start of a run
    r = run(*common_args, "--out", b)
    assert "5 already written" in r.stdout
    assert (b / "turns.jsonl").read_text() == (a / "turns.jsonl").read_text()
    # generate mode with a judge that cannot write JSON: learn_judge = null (learn = --null-as), counted, never a crash
    run(*common_args, "--out", tmp_path / "g", "--judge-mode", "generate", "--retries", 1, "--max-new-tokens", 8)
    stats = json.loads((tmp_path / "g" / "select_stats.json").read_text())
    assert stats["judge_failures"] == stats["train_turns"] > 0 and stats["kept"] == 0


def test_bad_input_exits_2_and_leaves_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "turns.jsonl").write_text('{"id": "keep"}\n')
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"dialog": [{"speaker": "seeker", "content": "hi"}, {"speaker": "robot", "content": "x"}]}]))
    r = run("--data", bad, "--out", out, "--judge", "none", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {bad}: record 1: dialog[1].speaker: unknown speaker 'robot' "
                                             "(expected seeker/supporter, usr/sys or user/assistant)"]
    assert (out / "turns.jsonl").read_text() == '{"id": "keep"}\n' and not (out / "select_args.json").exists()
    r = run("--data", tmp_path / "missing.json", "--out", out, "--judge", "none", check=False)
    assert r.returncode == 2 and "file not found" in r.stderr
    r = run("--test-frac", 1.5, "--out", out, check=False)
    assert r.returncode == 2 and "--test-frac" in r.stderr
