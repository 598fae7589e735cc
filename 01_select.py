"""Stage 01: dialogues -> turns.jsonl, with Hindsight Dialogue Selection (RAPO section 3.2, Eq. 8).

Every supporter turn of the input dialogues becomes one record (docs/design.md section 1): its context, the target
reply, the split (by dialogue, seeded), and for train turns a judge's verdict `learn` / `learn_reason`:
is this reply worth learning from (empathy, coping strategies, clarifying questions...) or is it a
greeting, small talk, an acknowledgement? RAPO trains only on `learn == true` turns (13K -> 5,412 turns
in the paper); `--judge none` keeps every turn (the paper's "Full" setting).

Judge modes (docs/design.md section 2):
  generate    the judge writes {"learn": bool, "reason": str}; unparseable answers are re-asked
              (--retries), then recorded as learn = null with the raw text and counted;
  likelihood  p(learn) = p('{"learn": true') / (p(... true) + p(... false)) from the judge's log-likelihoods,
              learn = p(learn) > 0.5; deterministic, and the only mode that gives a small local model a
              usable answer. Default for hf:/vllm: judges; openai: judges use generate.
Deviation: valid/test turns are not judged (learn = null); they are for evaluation only.

Run:
  python 01_select.py --data data/demo_esconv.json --out runs/demo
  python 01_select.py --data ESConv.json --judge openai:Qwen2.5-72B-Instruct --judge-base-url http://host:8000/v1
Re-running on the same --out resumes (turns already written are skipped) if the input files and the settings
that shape the records (SELECT_KEYS) are those of the earlier run, else it stops with one line; --overwrite
starts afresh (the old output is deleted only once the judge has loaded).
"""
import argparse
import math
import sys
from pathlib import Path

import backends
import common
import role_cache
from common import InputError, check

# Settings that shape the records: a re-run on an --out that holds records must use the same ones (and the same
# --data / --test-data content); --null-as, --batch-size and the device settings may change.
SELECT_KEYS = ("seed", "test_frac", "valid_frac", "max_examples", "judge", "judge_mode_used", "judge_context", "retries",
               "max_new_tokens")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="data/demo_esconv.json", out="runs/demo")
    g = p.add_argument_group("split (by dialogue, deterministic from --seed)")
    g.add_argument("--test-frac", type=float, default=0.1, help="fraction of dialogues in the test split (RAPO: 0.1)")
    g.add_argument("--valid-frac", type=float, default=0.0, help="fraction of dialogues in the valid split")
    g.add_argument("--test-data", default=None,
                   help="take the test split from this separate file instead (e.g. PPDPP's 130-dialogue file); "
                        "then every --data dialogue is train/valid")
    g = p.add_argument_group("hindsight selection judge")
    common.add_role_arg(p, "judge", "judge LLM deciding learn true/false, or 'none' to keep every turn")
    common.add_decoder_arg(g)
    g.add_argument("--judge-mode", default="auto", choices=["auto", "generate", "likelihood"],
                   help="auto = likelihood for hf:/vllm: judges, generate for openai: judges")
    g.add_argument("--retries", type=int, default=2, help="re-asks of an unparseable judge answer (generate mode)")
    g.add_argument("--null-as", default="false", choices=["false", "true"],
                   help="how a turn whose judge answer never parsed (learn = null) counts in the kept fraction")
    g.add_argument("--judge-context", type=int, default=0,
                   help="show the judge only the last N context messages (0 = the whole context, as in the paper); "
                        "the judge's cost grows with the context length")
    g.add_argument("--batch-size", type=int, default=32, help="turns judged per batched call")
    g.add_argument("--max-new-tokens", type=int, default=96, help="judge answer length (generate mode)")
    role_cache.add_role_cache_args(p)
    args = p.parse_args(argv)
    common.check_common_args(args)
    role_cache.check_role_cache_args(args)
    common.check_decoder(args)
    check(0 <= args.test_frac < 1 and 0 <= args.valid_frac < 1 and args.test_frac + args.valid_frac < 1,
          "--test-frac and --valid-frac must be in [0, 1) and sum to less than 1")
    check(args.batch_size >= 1 and args.judge_context >= 0, "--batch-size must be >= 1 and --judge-context >= 0")
    check(args.max_examples is None or args.max_examples >= 1, "--max-examples must be >= 1")
    if args.judge != "none":
        common.check_model_path(args.judge, "--judge")
    return args


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the hindsight-selection judge (RAPO section 3.2, Eq. 8): its prompt (our words) and its answer

SELECT_PROMPT = (
    "You curate training data for an emotional-support assistant. Decide whether the assistant reply below "
    "is worth learning from.\n"
    "Worth learning: empathy and validation, reflecting feelings, coping strategies, grounding or reframing, "
    "safety-aware guidance (suggesting professional help when it fits), clarifying questions that move the "
    "support forward, support tailored to this person.\n"
    "Not worth learning: greetings, small talk, pleasantries, logistics unrelated to support, bare "
    "acknowledgements ('ok', 'sure', 'thanks'), repetition without new value, unsafe or judgmental content.\n\n"
    "Conversation so far:\n{context}\n\nAssistant reply to judge:\n{target}\n\n"
    "Answer with one JSON object and nothing else, for example {{\"learn\": true, \"reason\": \"validates the "
    "feeling and asks an open question\"}} or {{\"learn\": false, \"reason\": \"a greeting with no support value\"}}."
)
SELECT_PREFIX = '{"learn": '  # likelihood mode compares p(SELECT_PREFIX + "true") with p(SELECT_PREFIX + "false")


def select_chats(turns: list[dict]) -> list[list[dict]]:
    """One question per turn: its context and the reply to judge."""
    return [[{"role": "user", "content": SELECT_PROMPT.format(context=common.render_dialogue(t["context"]),
                                                              target=t["target"])}] for t in turns]


def validate_select(obj, i):
    """{learn, reason} from a generate-mode answer (ask_json's validate); ValueError if learn is not a boolean."""
    learn = obj.get("learn") if isinstance(obj, dict) else None
    if isinstance(learn, str) and learn.lower() in ("true", "false"):
        learn = learn.lower() == "true"
    if not isinstance(learn, bool):
        raise ValueError("learn must be a boolean")
    return {"learn": learn, "reason": str(obj.get("reason", ""))}


# ----------------------------------------------------------------------------------------------------
# Turns, and the judge's verdicts on a batch of them


def load_all_turns(args) -> list[dict]:
    """Dialogues -> split -> turn records (no model involved)."""
    dialogues = common.load_dialogues(args.data, id_prefix="d", max_chars=args.max_message_chars)
    if args.max_examples:
        dialogues = dialogues[:args.max_examples]
    if args.test_data:
        test = common.load_dialogues(args.test_data, id_prefix="t", max_chars=args.max_message_chars)
        split = common.split_dialogues([d["dialog_id"] for d in dialogues], args.seed, 0.0, args.valid_frac)
        split.update({d["dialog_id"]: "test" for d in test})
        dialogues = dialogues + test
    else:
        split = common.split_dialogues([d["dialog_id"] for d in dialogues], args.seed, args.test_frac, args.valid_frac)
    turns = common.build_turns(dialogues, split)
    check(len(turns) > 0, f"{args.data}: no supporter turn with a seeker message before it")
    return turns


def judge_batch(backend, batch: list[dict], mode: str, args) -> tuple[list[dict], int, int]:
    """learn / learn_reason for a batch of turns; returns (updates, retried, failed)."""
    if args.judge_context:
        batch = [dict(t, context=common.last_messages(t["context"], args.judge_context)) for t in batch]
    chats = select_chats(batch)
    if mode == "likelihood":
        pre = SELECT_PREFIX
        ll = backend.option_loglik(chats, [pre + "true", pre + "false"])
        ups = []
        for i in range(len(batch)):
            p = 1.0 / (1.0 + math.exp(ll[i][1] - ll[i][0]))  # p(true) over {true, false}
            ups.append({"learn": p > 0.5, "learn_reason": f"likelihood judge: p(learn)={p:.3f}"})
        return ups, 0, 0
    res = backends.ask_json(backend, chats, validate_select, retries=args.retries,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    ups = []
    for v, raw in zip(res.values, res.raw):
        ups.append({"learn": v["learn"], "learn_reason": v["reason"]} if v is not None
                   else {"learn": None, "learn_reason": f"unparseable judge output: {raw[:500]}"})
    return ups, res.retried, res.failed


def main(argv=None):
    args = parse_args(argv)
    turns = load_all_turns(args)  # all input validation happens here, before any output is touched
    judge_spec = None if args.judge == "none" else common.parse_spec(args.judge)
    mode = args.judge_mode
    if mode == "auto":
        mode = "generate" if judge_spec is not None and judge_spec.backend == "openai" else "likelihood"
    if judge_spec is not None and judge_spec.backend == "openai" and mode == "likelihood":
        raise InputError("--judge-mode likelihood needs an hf: or vllm: judge (openai: servers give no prompt log-probs)")

    args.judge_mode_used = mode
    inputs = common.input_digests(args, ("data", "test_data"))
    common.lock_out(args.out)  # one run at a time on --out
    # 02_simulate.py writes its args.json into the same folder by default, so 01 keeps its own name
    settings_path = Path(args.out) / "select_args.json"
    done = set() if args.overwrite else common.ResumableOutput(args.out, "turns.jsonl").done
    settings = {"inputs": inputs, **{k: getattr(args, k) for k in SELECT_KEYS}}
    common.check_resumed_output(settings_path, "01_select", len(done), settings, "turns")  # same input and settings
    cache = role_cache.open_cache(args)  # --role-cache: the judge's answers recorded / replayed
    backend = None if judge_spec is None else backends.make_backend(args.judge, args.judge_base_url, args.device, args.dtype,
                                                                   decoder=args.decoder, cache=cache)
    out = common.ResumableOutput(args.out, "turns.jsonl", overwrite=args.overwrite)  # (deletes only now: the judge loaded)
    common.save_args(args, args.out, {"stage": "01_select", "inputs": inputs}, name=settings_path.name)
    todo = [t for t in turns if t["id"] not in done]
    print(f"{len(turns)} turns from {len({t['dialog_id'] for t in turns})} dialogues "
          f"({sum(t['split'] == 'train' for t in turns)} train, {sum(t['split'] == 'valid' for t in turns)} valid, "
          f"{sum(t['split'] == 'test' for t in turns)} test); {len(done)} already written, {len(todo)} to do")

    retried = failed = 0
    bar = common.progress(total=len(todo), desc="select")
    for batch in common.chunks(todo, args.batch_size):
        train = [t for t in batch if t["split"] == "train"]
        if backend is None:
            for t in train:
                t["learn"], t["learn_reason"] = True, "no judge (--judge none): every turn kept"
        elif train:
            ups, r, f = judge_batch(backend, train, mode, args)
            retried, failed = retried + r, failed + f
            for t, u in zip(train, ups):
                t.update(u)
        for t in batch:
            if t["split"] != "train":
                t["learn_reason"] = f"not judged ({t['split']} split)"
        out.append(batch)
        bar.update(len(batch))
    bar.close()

    # Summary over the whole output (this run and earlier resumed ones), stored beside it.
    recs = out.merge([t["id"] for t in turns])
    train = [r for r in recs if r["split"] == "train"]
    nulls = sum(r["learn"] is None for r in train)
    kept = sum(r["learn"] is True or (r["learn"] is None and args.null_as == "true") for r in train)
    stats = {"turns": len(recs), "train_turns": len(train), "kept": kept,
             "kept_fraction": kept / max(len(train), 1), "judge_failures": nulls,
             "retried_this_run": retried, "failed_this_run": failed, "judge": args.judge, "judge_mode": mode}
    common.write_json(Path(args.out) / "select_stats.json", stats)
    role_cache.report(cache, args.out, name="select_role_cache.json")  # this run's hits / misses (a log)
    print(f"kept {kept}/{len(train)} train turns ({stats['kept_fraction']:.1%}); judge failures (learn = null): "
          f"{nulls}; wrote {out.final}")
    if judge_spec is not None and train and kept in (0, len(train)):
        why = (f"{nulls} of its answers never parsed" if nulls else "it does not discriminate")
        print(f"warning: the judge kept {'none' if kept == 0 else 'all'} of the {len(train)} train turns: {why} "
              "(a small local judge never discriminates, docs/design.md section 8): use a capable --judge",
              file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
