"""Failures that stop a stage (issue 14, items 2, 4-8, 13): an unreachable openai: server, non-finite training
and hyperparameters, the k3 KL at extreme pad log-probs, the schedule under --ppo-epochs, RAPO's overlong
punishment, the reward model's one context rule, and bad input that must give one line and exit code 2."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import JsonServer, free_port, load_stage, run_script

import backends  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402

grpo = load_stage("04_grpo")
rapo = load_stage("05_rapo")
rm = load_stage("03_train_rm")
select = load_stage("01_select")
simulate = load_stage("02_simulate")
evaluate = load_stage("06_eval")


def run(script, *args, timeout=300):
    return run_script(script, *args, env={"OPENAI_API_KEY": None}, timeout=timeout, check=False)


def error_lines(r) -> list[str]:
    return [x for x in r.stderr.splitlines() if x.startswith("error:")]


# ----------------------------------------------------------------------------------------------------
# Item 2: an openai: server that cannot be reached or keeps failing stops the stage (exit 1, nothing written)


def FakeServer(mode: str) -> JsonServer:
    """A tiny OpenAI-compatible HTTP server on 127.0.0.1: mode '500' answers every request with HTTP 500, mode
    'garbage' with a valid chat completion whose text is not JSON. Counts the requests."""
    if mode == "500":
        return JsonServer((500, {"error": {"message": "boom"}}))
    return JsonServer((200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "I think so, yes."}}]}))


@pytest.fixture
def server_500():
    s = FakeServer("500")
    yield s
    s.close()


@pytest.fixture
def server_garbage():
    s = FakeServer("garbage")
    yield s
    s.close()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # bound and closed again: nothing listens there


def test_http_500_is_retried_then_stops(server_500):
    b = backends.OpenAIBackend("m", server_500.url, concurrency=1, timeout=5.0, retries=2)
    with pytest.raises(common.ServerError, match=r"failed 3 times \(HTTP 500"):
        b.generate([[{"role": "user", "content": "hi"}]] * 3, max_new_tokens=4)
    assert server_500.hits == 3  # the first request's 3 tries; the others were cancelled, never sent


def test_unparseable_answers_are_retried_recorded_and_counted(server_garbage):
    b = backends.OpenAIBackend("m", server_garbage.url, concurrency=2, timeout=5.0, retries=0)
    res = backends.ask_json(b, select.select_chats([{"context": [{"role": "user", "content": "hi"}], "target": "hello"}] * 2),
                            select.validate_select, retries=1)
    assert res.values == [None, None] and res.failed == 2 and res.retried == 2
    assert res.raw == ["I think so, yes."] * 2 and server_garbage.hits == 4


def test_01_stops_on_an_outage_and_judges_everything_once_the_server_answers(tmp_path, demo_data, server_garbage):
    out = tmp_path / "sel"
    args = ["--data", demo_data, "--out", out, "--max-examples", 2, "--judge", "openai:judge", "--retries", 0]
    r = run("01_select.py", *args, "--judge-base-url", dead_url())
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(error_lines(r)) == 1 and "openai:judge" in error_lines(r)[0] and "APIConnectionError" in r.stderr
    recs = common.read_jsonl(out / "turns.jsonl") if (out / "turns.jsonl").exists() else []
    assert not [t for t in recs if t["split"] == "train"]  # no judged record was written for the outage
    # the server answers (text that is not JSON): every train turn is judged now, recorded as null and counted
    r = run("01_select.py", *args, "--judge-base-url", server_garbage.url)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((out / "select_stats.json").read_text())
    assert stats["judge_failures"] == stats["train_turns"] > 0 and "never parsed" in r.stderr


def test_02_stops_on_a_seeker_outage_without_writing_rollouts(tmp_path, tiny_model_dir):
    turns = tmp_path / "turns.jsonl"
    common.write_jsonl(turns, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "split": "train", "target": "ok",
                                "context": [{"role": "user", "content": f"I feel low {i}."}]} for i in range(2)])
    tiny = f"hf:{tiny_model_dir}"
    r = run("02_simulate.py", "--data", turns, "--out", tmp_path / "sim", "--policy", tiny, "--critic", tiny,
            "--seeker", "openai:x", "--seeker-base-url", dead_url(), "-m", 2, "--max-turns", 2, "--max-new-tokens", 4)
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(error_lines(r)) == 1 and "openai:x" in error_lines(r)[0]
    rollouts = tmp_path / "sim" / "rollouts.jsonl"
    assert not rollouts.exists() or rollouts.read_text() == ""


# ----------------------------------------------------------------------------------------------------
# Item 4: non-finite training stops (exit 1, last good checkpoint kept); non-finite settings are refused


@pytest.mark.parametrize("stage,flag", [("04_grpo", ["--beta", "inf"]), ("04_grpo", ["--lr", "nan"]),
                                        ("04_grpo", ["--adam-betas", "0.9", "inf"]), ("05_rapo", ["--sd-coef", "inf"]),
                                        ("03_train_rm", ["--lr", "inf"]), ("02_simulate", ["--theta", "nan"])])
def test_non_finite_settings_are_refused_up_front(stage, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: load_stage(stage).main(["--out", str(out), *flag]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag[0]} " in err[0] and "finite" in err[0]
    assert not out.exists()


def tiny_rollouts(tok, G=4, n_groups=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for k in range(n_groups):
        p = models.chat_ids(tok, [{"role": "user", "content": f"I feel worried, number {k}."}])
        for j in range(G):
            prompts.append(p)
            comps.append(torch.randint(100, 3000, (2 + (j + k) % 4,), generator=gen).tolist())
    return prompts, comps


def test_grpo_step_stops_before_the_update_on_a_non_finite_loss(tiny_model_dir):
    model, tok = models.load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    model.train()
    prompts, comps = tiny_rollouts(tok)
    adv = torch.ones(len(comps))
    adv[3] = float("nan")  # e.g. a reward model that returned NaN
    ro = grpo.Rollouts(prompts, comps, adv)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(common.StageFailure, match="non-finite training: loss nan"):
        grpo.grpo_step(model, model, opt, sched, ro, grpo.LossConfig(pad_id=tok.pad_token_id, beta=0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no optimiser step
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0


def test_04_non_finite_run_exits_1_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    tok = models.load_tokenizer(str(tiny_model_dir))
    prompts, comps = tiny_rollouts(tok)
    rfile = tmp_path / "groups.jsonl"
    common.write_jsonl(rfile, [{"prompt_ids": prompts[4 * k], "completions": comps[4 * k:4 * k + 4],
                                "rewards": [0.0, 1.0, 0.5, 2.0]} for k in range(2)])
    out = tmp_path / "run"
    # lr 1e30 is finite, so it passes the up-front check; one AdamW step makes the LoRA weights ~1e30, and the
    # next forward overflows (the reproduction of `--beta inf`, which is now refused up front)
    r = run("04_grpo.py", "--policy", f"hf:{tiny_model_dir}", "--rollouts-file", rfile, "--group-size", 4,
            "--prompts-per-step", 2, "--max-steps", 3, "--checkpoint-every", 1, "--lr", "1e30", "--lora-r", 4,
            "--out", out)
    assert r.returncode == 1, r.stderr[-3000:]
    err = error_lines(r)
    assert len(err) == 1 and err[0].startswith("error: step 2: non-finite training") and "last good checkpoint" in err[0]
    assert [m["step"] for m in common.read_jsonl(out / "metrics.jsonl")] == [1]  # no row for the failed step
    assert not (out / "adapter").exists()  # never saved as a finished run
    ck = load_file(out / "checkpoint" / "adapter" / "adapter_model.safetensors")  # the checkpoint of step 1
    assert ck and all(torch.isfinite(v).all() for v in ck.values())


# ----------------------------------------------------------------------------------------------------
# Item 5: the k3 KL at padded positions whose log-prob is far below -88.7 (exp overflow)


def test_k3_kl_with_an_extreme_pad_logprob_is_finite_and_equals_the_masked_loss():
    torch.manual_seed(0)
    lens = [3, 1, 2]
    N, C = len(lens), max(lens)
    base = -torch.rand(N, C) * 2
    base[1, 1:] = -200.0  # the policy's log-prob of the pad token at padded positions: exp(0 - (-200)) = inf
    base[2, 2] = -150.0
    ref_rows = [base[i, :L] + 0.3 * torch.randn(L) for i, L in enumerate(lens)]
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.zeros(N, C)
    for i, L in enumerate(lens):
        mask[i, :L] = 1
    lp = base.clone().requires_grad_(True)
    ref = grpo._pad_rows(ref_rows, lp)
    loss = grpo.aggregate(grpo.grpo_token_loss(lp, lp.detach(), ref, adv, beta=0.5), mask, "token-mean", float(sum(lens)),
                          float(N), C)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    # the masked computation, token by token on the real tokens only
    lp2 = base.clone().requires_grad_(True)
    total = 0.0
    for i, L in enumerate(lens):
        for t in range(L):
            d = ref_rows[i][t] - lp2[i, t]
            total = total - adv[i] * torch.exp(lp2[i, t] - lp2[i, t].detach()) + 0.5 * (torch.exp(d) - d - 1)
    total = total / sum(lens)
    total.backward()
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-7) and (lp.grad[mask == 0] == 0).all()


def test_k3_kl_in_the_update_with_pad_logprobs_below_the_overflow(tiny_model_dir, tiny_model_dir_2):
    """Through accumulate_gradients: at temperature 1e-3 the tiny model's log-prob of the pad token at padded
    positions is far below -88.7; the loss and gradient stay finite and equal the unpadded (one sequence per
    micro-batch) computation."""
    model, tok = models.load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    ref_model, _ = models.load_causal_lm(str(tiny_model_dir_2), torch.device("cpu"), torch.float32)
    T = 1e-3
    prompts = [models.chat_ids(tok, [{"role": "user", "content": f"I feel low, number {k}."}]) for k in range(2)]
    greedy = grpo.rollout(model, tok, prompts, 1, max_new_tokens=4, temperature=0.0)
    comps = [greedy[0][:4], greedy[0][:1], greedy[1][:3], greedy[1][:2]]  # greedy prefixes: logp ~ 0, ragged
    ro = grpo.Rollouts([prompts[0]] * 2 + [prompts[1]] * 2, comps, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    grads, losses = [], []
    for mb in (4, 1):
        cfg = grpo.LossConfig(pad_id=tok.pad_token_id, temperature=T, beta=0.1, micro_batch=mb, shared_prefix=False)
        ro.logp_ref = grpo.sequence_logps(ref_model, ro, cfg)
        if mb == 4:  # the padded positions really are below the overflow point
            lp, _, cmask = grpo.completion_logps(model, ro.prompts, ro.completions, tok.pad_token_id, T)
            assert lp[cmask == 0].max() < -89
        model.zero_grad()
        st = grpo.accumulate_gradients(model, ro, cfg)
        losses.append(st["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(math.isfinite(x) for x in losses) and torch.isfinite(grads[0]).all()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model_dir_2(tmp_path_factory):
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


# ----------------------------------------------------------------------------------------------------
# Item 6: the learning-rate schedule counts optimiser steps (--ppo-epochs of them per training step)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_counts_optimiser_steps(schedule, tiny_model_dir, tmp_path):
    args = grpo.parse_args(["--policy", f"hf:{tiny_model_dir}", "--out", str(tmp_path), "--ppo-epochs", "2",
                            "--max-steps", "5", "--warmup-steps", "1", "--lr-schedule", schedule, "--lr", "0.1",
                            "--lora-r", "2"])
    pol = training.setup_policy(args, common.Dist(), n_groups=40)
    got = []
    for _ in range(10):  # 5 training steps x 2 PPO epochs = 10 optimiser steps, each followed by scheduler.step()
        got.append(pol.optimizer.param_groups[0]["lr"])
        pol.optimizer.step()
        pol.scheduler.step()
    W, total, want = 2, 10, []  # independent: warm-up over 1 x 2 optimiser steps, decay over the other 8
    for k in range(total):
        if k < W:
            f = (k + 1) / W
        else:
            frac = (k - W) / (total - W)
            f = 1 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        want.append(0.1 * f)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[5] > 0.05  # the second half is not already at 0 (linear) or climbing back (cosine)


# ----------------------------------------------------------------------------------------------------
# Item 7: RAPO's soft overlong punishment (RAPO E.3.1: L_max 200, L_cache 80), shared with 04


def test_rapo_rewards_add_the_overlong_punishment_except_for_failed_groups():
    results = [{"scores": [0.9, 0.1, 0.5]}, None]
    n_tok = [100, 150, 250, 10, 190, 300]
    r, pen = rapo.group_rewards(results, n_tok, 3, 200, 80)
    # by hand: 0 up to 120 tokens, (120 - n) / 80 up to 200, -1 beyond; the failed group gets 0 everywhere
    assert pen.tolist() == [[0.0, (120 - 150) / 80, -1.0], [0.0, 0.0, 0.0]]
    assert torch.allclose(r, torch.tensor([[0.9, 0.1 - 30 / 80, 0.5 - 1.0], [0.0, 0.0, 0.0]]))
    assert (grpo.group_advantages(r)[1] == 0).all()
    args = rapo.parse_args([])
    assert (args.l_max, args.l_cache) == (200, 80)  # the paper's defaults


def test_rapo_run_logs_the_length_reward(tiny_model_dir, tmp_path):
    tok = models.load_tokenizer(str(tiny_model_dir))
    prompts, comps = tiny_rollouts(tok)
    groups = [{"prompt_ids": prompts[4 * k], "completions": comps[4 * k:4 * k + 4],
               "scores": [0.1, 0.4, 0.7, 0.9] if k == 0 else None, "teacher_prompt_ids": None} for k in range(2)]
    rfile = tmp_path / "groups.jsonl"
    common.write_jsonl(rfile, groups)
    r = run("05_rapo.py", "--policy", f"hf:{tiny_model_dir}", "--rollouts-file", rfile, "--out", tmp_path / "r",
            "--prompts-per-step", 2, "--max-steps", 1, "--lora-r", 2, "--l-max", 4, "--l-cache", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    row = common.read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    pen = [grpo.overlong_penalty(len(c), 4, 2) for c in groups[0]["completions"]] + [0.0] * 4  # group 2 failed
    assert any(pen) and row["reward_len"] == pytest.approx(sum(pen) / 8)
    assert row["reward"] == pytest.approx((sum(groups[0]["scores"]) + sum(pen)) / 8)


# ----------------------------------------------------------------------------------------------------
# Item 8: one context rule for the reward model: 02 stores the window, 03 records it, 04's queries use it


def test_reward_model_reads_contexts_by_the_rule_it_was_trained_with(tiny_model_dir, tmp_path):
    long_ctx = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}: I feel tired and alone."}
                for i in range(5)]
    turns = [{"id": f"d{d}-t05", "dialog_id": f"d{d}", "split": "train", "target": "ok",
              "context": [dict(m, content=m["content"] + f" ({d})") for m in long_ctx]} for d in range(4)]
    # 02: what it simulates and stores
    sel = simulate.select_contexts(turns, None, None, 2)
    assert [t["context"] for t in sel] == [t["context"][-2:] for t in turns]
    recs = []
    for d, t in enumerate(sel):
        for j in range(2):
            recs.append({"id": f"{t['id']}-c{j}", "turn_id": t["id"], "dialog_id": t["dialog_id"], "context": t["context"],
                         "response": f"reply {j}", "reward": float(j), "label": j, "context_window": 2})
    rfile = tmp_path / "rollouts.jsonl"
    common.write_jsonl(rfile, recs)
    # 03 trains on them and records the rule
    r = run("03_train_rm.py", "--data", rfile, "--out", tmp_path, "--rm", f"hf:{tiny_model_dir}", "--max-steps", 1,
            "--valid-frac", 0.5, "--full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "rm" / "rm_info.json").read_text())["context_window"] == 2
    # 04 queries it with the turns' whole contexts: the same scores as on the contexts it was trained on
    score_full = grpo.make_rm_scorer(str(tmp_path / "rm"), "cpu", torch.float32, 4)
    replies = ["reply 0", "reply 1"] * 2
    full = score_full([t["context"] for t in turns], replies)
    model, tok = rm.load_reward_model(tmp_path / "rm")
    trained = rm.score(model, tok, [t["context"] for t in sel], replies)
    assert full == pytest.approx(trained, abs=1e-6)
    model.rm_info["context_window"] = 0  # the whole context: other inputs, other scores (the test has teeth)
    assert rm.score(model, tok, [t["context"] for t in turns], replies) != pytest.approx(trained, abs=1e-6)
    # one file, one rule
    common.write_jsonl(rfile, recs[:-1] + [dict(recs[-1], context_window=0)])
    with pytest.raises(common.InputError, match="context_window"):
        rm.load_rollouts(str(rfile), None)


# ----------------------------------------------------------------------------------------------------
# Item 13: bad input gives one line and exit code 2 before any work, one test per case


def fails_with(tmp_path, capsys, stage, argv, needle):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: load_stage(stage).main(["--out", str(out), *map(str, argv)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()
    return err[0]


@pytest.fixture
def latin1(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    return p


@pytest.mark.parametrize("stage,flag", [("01_select", "--data"), ("02_simulate", "--data"), ("06_eval", "--test-data")])
def test_non_utf8_input(stage, flag, latin1, tmp_path, capsys):
    extra = ["--judge", "none"] if stage == "01_select" else []
    fails_with(tmp_path, capsys, stage, [flag, latin1, *extra], f"{latin1}: line 2: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("stage", ["01_select", "02_simulate", "04_grpo"])
def test_a_folder_as_data(stage, tmp_path, capsys):
    fails_with(tmp_path, capsys, stage, ["--data", tmp_path, "--judge", "none"] if stage == "01_select" else
               ["--data", tmp_path], f"{tmp_path}: is a folder, not a file")


@pytest.mark.parametrize("stage", ["01_select", "03_train_rm", "04_grpo", "06_eval"])
def test_a_file_as_out(stage, tmp_path, capsys, demo_data):
    f = tmp_path / "afile"
    f.write_text("keep")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: load_stage(stage).main(["--out", str(out), "--data", str(demo_data)]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == [f"error: --out {out}: {f} is a file, not a folder"]
    assert f.read_text() == "keep"


@pytest.mark.parametrize("stage,flag", [("04_grpo", "--policy"), ("05_rapo", "--policy"), ("05_rapo", "--grm"),
                                        ("06_eval", "--policy"), ("01_select", "--judge"), ("02_simulate", "--seeker"),
                                        ("03_train_rm", "--rm")])
def test_a_local_model_path_that_does_not_exist(stage, flag, tmp_path, capsys, demo_data):
    extra = ["--test-data", demo_data] if stage == "06_eval" else []  # 06 reads its test set first
    fails_with(tmp_path, capsys, stage, [flag, "/no/such/dir", *extra], f"{flag} /no/such/dir: no such file or folder")


def test_a_causal_lm_adapter_as_rm(tmp_path, capsys):
    adapter = tmp_path / "policy_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": "x"}))
    turns = tmp_path / "turns.jsonl"
    common.write_jsonl(turns, [{"id": f"d{i}-t01", "dialog_id": f"d{i}", "split": "train", "target": "ok",
                                "context": [{"role": "user", "content": "hi"}]} for i in range(8)])
    fails_with(tmp_path, capsys, "04_grpo", ["--rm", adapter, "--data", turns],
               f"--rm {adapter}: a PEFT adapter for CAUSAL_LM, not a reward model")


def test_teacher_base_full_fine_tuning_without_kl_builds_the_reference(tiny_model_dir, tmp_path):
    """--teacher base --no-lora --beta 0 crashed (no frozen copy is built when beta is 0): now it runs and
    distils from the initial model."""
    tok = models.load_tokenizer(str(tiny_model_dir))
    prompts, comps = tiny_rollouts(tok)
    t_ids = models.chat_ids(tok, [{"role": "user", "content": "I feel worried. [feedback: be warmer]"}], "<strategy>")
    groups = [{"prompt_ids": prompts[4 * k], "completions": comps[4 * k:4 * k + 4], "scores": [0.1, 0.4, 0.7, 0.9],
               "teacher_prompt_ids": t_ids} for k in range(2)]
    rfile = tmp_path / "groups.jsonl"
    common.write_jsonl(rfile, groups)
    r = run("05_rapo.py", "--policy", f"hf:{tiny_model_dir}", "--rollouts-file", rfile, "--out", tmp_path / "r",
            "--prompts-per-step", 2, "--max-steps", 1, "--no-lora", "--teacher", "base", "--beta", 0, "--sd-topk", 16)
    assert r.returncode == 0, r.stderr[-3000:]
    row = common.read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    assert row["sd_tokens"] == len(comps[0]) + len(comps[4]) and row["sd_kl"] > 0  # each group's worst candidate


def test_a_message_too_long_for_the_models(tmp_path, capsys):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"dialog": [{"speaker": "seeker", "content": "hi"}, {"speaker": "supporter", "content": "hello"}]},
                                {"dialog": [{"speaker": "seeker", "content": "x" * 30_000},
                                            {"speaker": "supporter", "content": "I see"}]}]))
    fails_with(tmp_path, capsys, "01_select", ["--data", data, "--judge", "none"],
               f"{data}: record 2: message 0: content has 30,000 characters, over the limit of 20,000 (--max-message-chars")
    turns = tmp_path / "turns.jsonl"
    common.write_jsonl(turns, [{"id": "d0-t01", "dialog_id": "d0", "split": "test", "target": "ok",
                                "context": [{"role": "user", "content": "y" * 501}]}])
    fails_with(tmp_path, capsys, "06_eval", ["--data", turns, "--max-message-chars", 500],
               f"{turns}: line 1: context: message 0: content has 501 characters")


def test_a_pretty_printed_json_object(tmp_path, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"dialog": [{"speaker": "seeker", "content": "hi"}]}, indent=2))
    fails_with(tmp_path, capsys, "01_select", ["--data", data, "--judge", "none"],
               f"{data}: one JSON object spread over several lines; expected a JSON list")


def test_records_of_a_json_list_are_numbered_from_1_like_jsonl_lines(tmp_path):
    bad = {"dialog": [{"speaker": "robot", "content": "x"}]}
    ok = {"dialog": [{"speaker": "seeker", "content": "hi"}]}
    (tmp_path / "a.json").write_text(json.dumps([ok, bad]))
    (tmp_path / "a.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(common.InputError, match=r"a\.json: record 2: dialog\[0\]\.speaker"):
        common.load_dialogues(tmp_path / "a.json")
    with pytest.raises(common.InputError, match=r"a\.jsonl: line 2: dialog\[0\]\.speaker"):
        common.load_dialogues(tmp_path / "a.jsonl")
