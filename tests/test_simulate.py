"""02_simulate.py: r_fut / label on hand-made critic traces, lock-step batching counted with a recording backend,
and end-to-end runs on the tiny model: degenerate-label error + relabel without simulating, resume after an
interrupted run, and a 2-rank gloo torchrun run equal to the 1-process run."""
import json
import math
import shutil

import pytest

import backends
import common
from conftest import load_stage, run_script

sim = load_stage("02_simulate")


# ----------------------------------------------------------------------------------------------------
# r_fut and label on hand-made critic traces (docs/design.md section 3)


@pytest.mark.parametrize("trace, theta, T, lam, delta, success, end, r, label", [
    ([0.8], 0.5, 4, 0.5, 0.5, True, 1, 0.8 + 0.5 * 3 / 3, 1),  # success at turn 1: the full bonus
    ([0.1, 0.9], 0.5, 4, 0.5, 0.5, True, 2, 0.9 + 0.5 * 2 / 3, 1),  # success at turn 2 of 4
    ([-0.5, 0.0, 0.2, 0.7], 0.5, 4, 0.5, 0.5, True, 4, 0.7, 1),  # success at turn T: no bonus
    ([-0.5, 0.0, 0.2, 0.7], 0.5, 4, 0.5, 0.75, True, 4, 0.7, 0),  # ... and below a higher delta
    ([-0.5, -1.0, 0.3, 0.4], 0.5, 4, 0.5, 0.5, False, 4, 0.4, 0),  # never: r = c_end
    ([-0.5, -1.0, 0.3, 0.4], 0.5, 4, 0.5, 0.3, False, 4, 0.4, 1),  # never, but c_end > delta
    ([0.5, 0.5], 0.5, 2, 0.5, 0.5, False, 2, 0.5, 0),  # c == theta is not a success; r == delta is not positive
    ([0.3], 0.1, 8, 1.0, 0.5, True, 1, 1.3, 1),  # DPDP's theta; lambda 1
])
def test_future_reward_hand_traces(trace, theta, T, lam, delta, success, end, r, label):
    assert sim.rollout_outcome(trace, theta, T) == (success, end)
    got = sim.future_reward(trace, success, end, T, lam)
    assert math.isclose(got, r, abs_tol=1e-12)
    assert sim.reward_label(got, delta) == label


def test_select_contexts_spreads_and_windows():
    turns = [{"id": f"d{d}-t{t}", "dialog_id": f"d{d}", "context": [{"role": "user", "content": str(k)} for k in range(t)]}
             for d in range(3) for t in range(1, 7)]
    got = sim.select_contexts(turns, per_dialogue=2, max_examples=None)
    assert [t["id"] for t in got] == ["d0-t2", "d0-t5", "d1-t2", "d1-t5", "d2-t2", "d2-t5"]  # centres of 2 halves of 6
    got = sim.select_contexts(turns, per_dialogue=1, max_examples=2, context_window=2)
    assert [t["id"] for t in got] == ["d0-t4", "d1-t4"]
    assert [m["content"] for m in got[0]["context"]] == ["2", "3"]  # the last 2 of 4 messages
    assert len(turns[3]["context"]) == 4  # the input records are not changed


def test_degenerate_label_message_names_the_knob():
    recs = [{"turn_id": "a", "dialog_id": "d", "reward": r, "label": 1, "success": True, "end_turn": 1,
             "critic_scores": [r - 0.5]} for r in (1.2, 1.3, 1.4)]
    args = sim.parse_args(["--delta", "0.5"])
    s = sim.summarize(recs, args)
    msg = sim.degenerate_label_message(s, args)
    assert "all 3 labels are 1" in msg and "--delta 1.300" in msg and "--theta" in msg
    recs[0]["label"] = 0
    assert sim.degenerate_label_message(sim.summarize(recs, args), args) is None


# ----------------------------------------------------------------------------------------------------
# Lock-step batching: one batched call per role per round, finished conversations drop out


class Recording(backends.Backend):
    """A scripted backend that records every batched call (method, batch size)."""

    def __init__(self, name, success_turn=None):
        self.spec, self.log, self.success_turn = name, [], success_turn or {}

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        self.log.append(("generate", len(chats), n))
        if self.spec == "seeker":
            return [["I see."] for _ in chats]
        out = []
        for c in chats:
            ctx = next(m["content"] for m in c if m["role"] == "user")  # "ctxK": which context
            turn = sum(m["role"] == "assistant" for m in c) + 1
            out.append([f"reply {ctx} c{j}" if turn == 1 else f"more support {turn}" for j in range(n)])
        return out

    def option_loglik(self, chats, options):
        """Critic: 'solved' (1.0) at the scripted turn of each conversation, else 'the same' (-0.5)."""
        self.log.append(("option_loglik", len(chats), len(options)))
        res = []
        for c in chats:
            text = c[-1]["content"]
            key = text.split("Supporter: reply ")[1].split("\n")[0]  # "ctxK cJ"
            turn = text.count("Supporter:")
            k = 3 if self.success_turn.get(key) == turn else 1
            res.append([0.0 if i == k else -1e4 for i in range(len(options))])  # one-hot after softmax
        return res


def test_lockstep_one_call_per_role_per_round():
    T, m = 4, 3
    success = {"ctx0 c0": 1, "ctx0 c1": 2, "ctx1 c0": 3, "ctx1 c2": 1}  # ctx0 c2, ctx1 c1: never
    pol, see, cri = Recording("policy"), Recording("seeker"), Recording("critic", success)
    roles = sim.Roles(policy=pol, seeker=see, critic=cri)
    turns = [{"id": f"d{k}-t01", "dialog_id": f"d{k}", "context": [{"role": "user", "content": f"ctx{k}"}],
              "situation": "s", "emotion_type": "e", "problem_type": "p"} for k in range(2)]
    recs = sim.simulate_chunk(roles, turns, m=m, max_turns=T, theta=0.5, seed=0, cand_kw={}, lambda_eff=0.5, delta=1.2)
    live = [6, 4, 3, 2]  # conversations alive in rounds 1..4
    assert pol.log == [("generate", 2, 3)] + [("generate", n, 1) for n in live[1:]]  # candidates: one call, n = m
    assert see.log == [("generate", n, 1) for n in live]
    assert cri.log == [("option_loglik", n, 4) for n in live]
    by = {r["id"]: r for r in recs}
    assert [r["id"] for r in recs] == [f"d{k}-t01-c{j}" for k in range(2) for j in range(m)]
    for k in range(2):
        for j in range(m):
            r = by[f"d{k}-t01-c{j}"]
            s = success.get(f"ctx{k} c{j}")
            end = s or T
            assert r["response"] == f"reply ctx{k} c{j}"
            assert r["critic_scores"] == [-0.5] * (end - 1) + [1.0 if s else -0.5]
            assert (r["success"], r["end_turn"]) == (s is not None, end)
            want = (1.0 + 0.5 * (T - s) / (T - 1)) if s else -0.5  # hand: c_end + bonus
            assert math.isclose(r["reward"], want) and r["label"] == int(want > 1.2)
            assert len(r["trajectory"]) == 2 * end and r["trajectory"][0]["content"] == r["response"]
            assert [x["role"] for x in r["trajectory"]] == ["assistant", "user"] * end


# ----------------------------------------------------------------------------------------------------
# End to end on the tiny model (subprocesses, one thread each so runs compare byte for byte)


def run02(args, nproc=1):
    return run_script("02_simulate.py", *args, nproc=nproc, timeout=600, check=False)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_model_dir, demo_data):
    """A complete 1-process run; first with --delta 5 (every label 0: the error), then relabelled."""
    d = tmp_path_factory.mktemp("sim")
    dialogues = common.load_dialogues(demo_data)
    turns = common.build_turns(dialogues, common.split_dialogues([x["dialog_id"] for x in dialogues], 0, 0.2))
    common.write_jsonl(d / "turns.jsonl", turns)
    tiny = f"hf:{tiny_model_dir}"
    args = ["--data", d / "turns.jsonl", "--policy", tiny, "--seeker", tiny, "--critic", tiny, "--max-examples", 6,
            "--per-dialogue", 1, "-m", 2, "--max-turns", 3, "--batch-size", 2, "--max-new-tokens", 6,
            "--seeker-max-new-tokens", 6, "--context-window", 4, "--theta", 0.0]
    p = run02(args + ["--out", d / "a", "--delta", 5])
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: all 12 labels are 0") and "--delta" in err
    first = common.read_jsonl(d / "a" / "rollouts.jsonl")
    delta = json.loads((d / "a" / "simulate_stats.json").read_text())["reward_quantiles"]["median"]
    p = run02(args + ["--out", d / "a", "--delta", delta])  # relabel: nothing simulated again
    assert p.returncode == 0, p.stderr
    assert "0 missing, 0 chunk(s) to simulate" in p.stdout
    return {"dir": d, "args": args + ["--delta", delta], "first": first, "delta": delta,
            "bytes": (d / "a" / "rollouts.jsonl").read_bytes()}


def test_e2e_outputs_and_relabel(ref):
    recs = common.read_jsonl(ref["dir"] / "a" / "rollouts.jsonl")
    assert len(recs) == 12 and len({r["id"] for r in recs}) == 12
    assert len({r["dialog_id"] for r in recs}) == 6  # --per-dialogue 1
    for r, f in zip(recs, ref["first"]):
        assert r["id"] == f["id"] and r["critic_scores"] == f["critic_scores"] and r["reward"] == f["reward"]
        assert f["label"] == 0 and r["label"] == int(r["reward"] > ref["delta"])
        assert r["trajectory"][0] == {"role": "assistant", "content": r["response"]}
        assert len(r["context"]) <= 4 and r["context"][-1]["role"] == "user"
        assert r["success"] == any(c > 0.0 for c in r["critic_scores"])
        assert len(r["critic_scores"]) == r["end_turn"] and len(r["trajectory"]) == 2 * r["end_turn"]
    assert 0 < sum(r["label"] for r in recs) < 12
    stats = json.loads((ref["dir"] / "a" / "simulate_stats.json").read_text())
    assert stats["candidates"] == 12 and sum(stats["reward_histogram"]["counts"]) == 12
    assert math.isclose(stats["success_rate"], sum(r["success"] for r in recs) / 12)
    saved = json.loads((ref["dir"] / "a" / "args.json").read_text())
    assert saved["lambda_eff"] == 0.5 and saved["theta"] == 0.0 and saved["stage"] == "02_simulate"


def test_resume_after_interruption_equals_uninterrupted(ref):
    """Chunk 0 written, chunk 1 cut after one record and a torn line: the re-run recomputes chunk 1, writes only its
    missing ids, drops the torn line, and ends with the same file as the uninterrupted run."""
    out = ref["dir"] / "resume"
    out.mkdir()
    lines = ref["bytes"].decode().splitlines(keepends=True)
    (out / "rollouts.jsonl").write_text("".join(lines[:5]) + lines[5][:40])  # 4 = chunk 0 (2 contexts x 2), 1 of chunk 1
    shutil.copy(ref["dir"] / "a" / "args.json", out / "args.json")
    p = run02(ref["args"][:-2] + ["--delta", ref["delta"], "--out", out])
    assert p.returncode == 0, p.stderr
    assert "7 missing, 2 chunk(s) to simulate" in p.stdout
    assert (out / "rollouts.jsonl").read_bytes() == ref["bytes"]
    # resuming with another simulation setting is refused before any work, leaving the file as it is
    p = run02(ref["args"] + ["--out", out, "--theta", 0.2])
    assert p.returncode == 2 and "--theta" in p.stderr and "--overwrite" in p.stderr
    assert (out / "rollouts.jsonl").read_bytes() == ref["bytes"]
    # so is another --data with the same simulation flags (its content is hashed into args.json at the start)
    other = ref["dir"] / "other_turns.jsonl"
    turns = common.read_jsonl(ref["dir"] / "turns.jsonl")
    common.write_jsonl(other, turns[1:] + turns[:1])
    p = run02(ref["args"] + ["--out", out, "--data", other])
    assert p.returncode == 2 and "made from another --data" in p.stderr, p.stderr
    assert (out / "rollouts.jsonl").read_bytes() == ref["bytes"]


def test_torchrun_two_ranks_equals_one_process(ref):
    out = ref["dir"] / "ddp"
    p = run02(ref["args"] + ["--out", out], nproc=2)
    assert p.returncode == 0, p.stderr
    assert (out / "rollouts.jsonl").read_bytes() == ref["bytes"]
    assert not list(out.glob("rollouts.jsonl.part*"))  # parts merged and removed


@pytest.fixture
def turns_file(tmp_path):
    t = {"id": "d0-t01", "dialog_id": "d0", "split": "train", "context": [{"role": "user", "content": "hi"}],
         "target": "hello", "learn": False}
    common.write_jsonl(tmp_path / "turns.jsonl", [t])
    return tmp_path / "turns.jsonl"


@pytest.mark.parametrize("argv, msg", [
    (["--max-turns", "1"], "--max-turns"),
    (["--theta", "1.0"], "--theta"),
    (["-m", "3", "--temperature", "0"], "--temperature"),
    (["--critic", "openai:x", "--critic-base-url", "http://x", "--critic-mode", "likelihood"], "likelihood"),
    (["--learn-only"], "learn == true"),
])
def test_bad_arguments_stop_before_work(argv, msg, turns_file, tmp_path):
    with pytest.raises(common.InputError, match=msg):
        sim.main(argv + ["--data", str(turns_file), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_malformed_turns_name_the_line(turns_file, tmp_path):
    with open(turns_file, "a") as f:
        f.write('{"id": "d0-t03", "dialog_id": "d0", "split": "train", "target": "x"}\n')
    with pytest.raises(common.InputError, match=r"turns.jsonl: line 2: missing field 'context'"):
        sim.main(["--data", str(turns_file), "--out", str(tmp_path / "o")])
