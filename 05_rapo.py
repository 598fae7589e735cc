"""Stage 05: RAPO, reaction-aware policy optimisation (RAPO sections 3.2-3.4, Eq. 8-15; docs/design.md section 6).

Per prompt x (a train turn's context with learn == true from 01_select.py's hindsight selection, Eq. 8):
  1. Chain-of-Supporting: G candidates a_i = <strategy>s_i</strategy> y_i (the assistant turn is prefilled
     with "<strategy>"); only the reply y_i is shown to the other roles.
  2. Reactions (Eq. 9): u_i ~ Seeker(x, y_i), one seeker message per candidate, one batched call.
  3. Generative reward model (Eq. 10): one call per group sees x and every (y_i, u_i), shuffled (position
     bias) and un-shuffled after, and returns {"i": {analysis, rank, score}}; validated, re-asked, scores
     derived from ranks when only the ranks are valid (also when the scores' order contradicts the ranks);
     a group that never parses gets A = 0 and no distillation (counted). r_i = score_i + R_len(y_i): DAPO's
     soft overlong punishment of 04 (RAPO E.3.1: L_max 200, L_cache 80, |y| in completion tokens), which a
     failed group does not get (its A stays 0).
  4. Scalar RL: 04_grpo.py's GRPO loss on the rewards r_i (imported, not copied).
  5. Verbal RL (Eq. 11-14): w = argmin_i r_i (Eq. 11, with R_len; the "better example" is argmax_i r_i). The
     teacher sees the messages of x the student saw, with a hindsight block (y_w, u_w, the critique c_w, the
     better example) that asks for a turn in the prefilled format, and scores the SAME token ids a_w under
     no_grad. Per token, with p the student and q the teacher (K = 256 from the student, fp32, logits / T):
         L_head = sum_{k in TopK(p)} p_k log(p_k / q_k)  (Eq. 13),   L_tail = P_tail log(P_tail / Q_tail)  (Eq. 14)
     weighted by min(exp(logp - logp_old), 2), summed over the distilled tokens (Eq. 12) and divided by their
     global count.
  6. L = L_GRPO + eta * L_SD (Eq. 15), eta = 1e-3; after every optimiser step the teacher's weights move
     towards the policy's: theta_T <- (1 - m) theta_T + m theta, m = 0.5 (EMA, initialised from the
     initial policy). With LoRA the teacher is a second adapter ("teacher") on the same base model.

--dynamic-sampling (DAPO; 04's, on 05's draws): groups whose rewards r_i all tie (A = 0: a failed GRM group, ties of a
rubric judge or of the scripted GRM) are dropped and new prompts drawn (candidates, reactions, GRM) until the step has
its B groups; the distillation targets (Eq. 11) are those of the kept groups.

The RL rows of RAPO Table 1 and Table 3, one preset each (--ablation sets --reward and --sd-coef, and is saved in
args.json; giving --reward or --sd-coef as well is allowed only if it agrees: the same --reward, and eta > 0 for
the rows with SD (it tunes eta), 0 for the rows without):
  paper row                                  command                        = flags
  RAPO (Table 1, Table 3)                    --ablation rapo                 --reward reaction --sd-coef 1e-3
  RAPO w/o SD (Table 3)                      --ablation wo-sd                --reward reaction --sd-coef 0
  RAPO w/o URM (Table 3)                     --ablation wo-urm               --reward rubric-group --sd-coef 1e-3
  RAPO w/o URM + SD (Table 3) = CPO (Table 1) --ablation cpo                 --reward rubric-group --sd-coef 0
  GRPO (Table 1, rubrics-as-judge)           --ablation grpo-rubric          --reward rubric-point --sd-coef 0
  reaction: the GRM takes the seeker's place and sees the reactions; rubric-group: an expert rater ranks the group
  against the rubric, no reactions; rubric-point: an expert rater scores each reply alone.
Also: --teacher live|base (the teacher is the current / the initial policy instead of the EMA).

Deliberate deviations (numbered):
 1. Everything 04_grpo.py lists (CPU-friendly sizes, seeds, distributed denominators) applies here too.
 2. The GRM prompt is prefilled with '{"0": {"analysis": "' for hf:/vllm: judges (a small local judge
    then writes the JSON shape far more often); openai: judges get no prefill.
 3. For rubric-* rewards there is no reaction; the teacher's hindsight block says so.
 4. The distillation tokens are the whole candidate a_w (strategy part and reply), as the student wrote it;
    with --format cos the teacher's block therefore asks for the strategy and the reply (the turn is prefilled
    with "<strategy>"), where the paper's template says "output only the revised response".
 5. --format reply drops the Chain-of-Supporting (not a paper variant): the candidate is the reply alone,
    under the plain ESC prompt that 06 evaluates with. For a policy too small to write and close the
    rationale (SmolLM2-135M closed it in 1 of 20 samples within 64 tokens), the GRM would otherwise score
    rationale text and the policy would be trained under another prompt than it is evaluated with.
 6. The rubric judges' prompts (the paper cites rubrics-as-judge, Gunjal et al. 2025, without a prompt) are
    ours: an expert rater with the criteria RUBRIC, shared with the GRM and 06's pairwise judge.
 7. GRM scores whose order contradicts the ranks (rank 1 with a lower score than rank 2) are invalid: the
    paper asks for unique ranks and scores but says nothing of their agreement; the scores are derived from
    the ranks and the group counted in grm_derived_frac and grm_disordered_frac.
 8. Every row keeps the same scalar RL (DAPO clip-higher, R_len, beta): rows differ only in reward and eta.

Sotopia (--env sotopia; RAPO section 4.2, Appendix G.2; docs/design.md section 11): the prompts are the policy
agent's turns in episodes of training scenarios, written by envs/sotopia.py (turns.jsonl with a "sotopia" state per
turn); a candidate is an action JSON {action_type, argument} under envs/sotopia.AGENT_SYSTEM; the partner agent
(--seeker: the simulated user, with its own profile and goal) takes its next action after each candidate; the GRM
ranks the group against Sotopia's seven criteria (goal the most important) with those reactions; the teacher
refines the worst action from the reaction and the critique. The GRPO + SD update and the ablation flags are the
same (--reward reaction only: the rubric judges are ESC's).

Run:
  python 05_rapo.py --data runs/demo/turns.jsonl --out runs/rapo
  python 05_rapo.py --ablation cpo --out runs/cpo          # and the other Table 1 / Table 3 rows above
  torchrun --nproc_per_node=8 05_rapo.py --policy Qwen/Qwen2.5-7B-Instruct --seeker openai:... --grm openai:... \\
      --seeker-base-url http://host:8000/v1 --grm-base-url http://host:8000/v1 --prompts-per-step 128
"""
import argparse
import copy
import functools
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import backends
import common
import models
import role_cache
import speed
import training
from common import check
from envs import sotopia

grpo = common.load_stage("04_grpo")  # GRPO: prompts, advantages, the loss and its update (Eq. 1-3)

PREFILL = "<strategy>"
RAPO_SYSTEM = (
    "You are an emotional supporter. Understand the person deeply, comfort them and help them.\n"
    "Guidelines: explore their emotional state, soothe, then support or suggest. Strategies you may use: "
    "Inquiry (open questions about background, feelings, needs); Paraphrasing (restate to clarify feelings); "
    "Listening (acknowledge feelings and needs); Self-disclosure (brief, relevant personal experience); "
    "Soothing (warm, calming words); Validation (their feelings are legitimate); Advice-giving (suggestions, "
    "only after understanding); Information (relevant facts or resources). Respect privacy and boundaries, do "
    "not judge or dismiss feelings, do not advise too early, avoid jargon, keep a warm and sensitive tone, and "
    "adapt to the person. Never produce dangerous, violent, sexual or political content.\n"
    "Output format: first the strategy you choose and why inside <strategy></strategy>, then your reply."
)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: pure functions of RAPO (importable; tests check them against exact computations)


def topk_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 256,
                    temperature: float = 1.0) -> torch.Tensor:
    """Eq. 13 + 14: per-token reverse KL(student || teacher) over the student's top-K tokens (the head, Eq. 13)
    plus one tail bucket (Eq. 14).

    student_logits, teacher_logits: [N, V] (one row per distilled token); returns [N], fp32.
        S      = TopK(p), chosen from the student (as the SDPO code and RAPO's Eq. 13 do)
        L_head = sum_{k in S} p_k (log p_k - log q_k)                                        (Eq. 13)
        L_tail = P_tail (log P_tail - log Q_tail),  P_tail = 1 - sum_S p_k,  Q_tail = 1 - sum_S q_k   (Eq. 14)
    Both are softmax(logits / temperature) over the full vocabulary; log(1 - exp(x)) is taken with the
    log-mass x clamped at -1e-7, so a vanishing tail (K = V) stays finite. The teacher gets no gradient
    (the caller computes it under no_grad).
    """
    lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, V]
    lq = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [N, V]
    k = min(k, lp.shape[-1])
    idx = lp.detach().topk(k, dim=-1).indices  # [N, K]: S from the student, not differentiated
    lp_s, lq_s = lp.gather(-1, idx), lq.gather(-1, idx)  # [N, K]
    head = (lp_s.exp() * (lp_s - lq_s)).sum(-1)  # [N]
    lp_tail = torch.log(-torch.expm1(torch.logsumexp(lp_s, -1).clamp(max=-1e-7)))  # log P_tail [N]
    lq_tail = torch.log(-torch.expm1(torch.logsumexp(lq_s, -1).clamp(max=-1e-7)))  # log Q_tail [N]
    return head + lp_tail.exp() * (lp_tail - lq_tail)


def sd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor,
            mask: torch.Tensor, k: int = 256, temperature: float = 1.0, is_clip: float = 2.0) -> dict:
    """Eq. 12: L_SD = sum_t (L_head + L_tail) over the distilled tokens of a micro-batch (the caller divides by the
    global count).

    student_logits/teacher_logits [n, C, V], logp/logp_old/mask [n, C]. Each token's KL is weighted by the
    importance ratio min(exp(logp - logp_old), is_clip), detached (SDPO's clip, "upper limit 2"; 1 when
    the update is on-policy). Returns {loss: weighted KL sum (with grad), kl: KL sum, topk_mass: sum of
    the student's top-K probability mass, n: tokens}.
    """
    m = mask.bool()
    V = student_logits.shape[-1]
    # every position, padding included, then masked (selecting the distilled positions first would make the
    # host wait for the GPU to count them)
    s = student_logits.reshape(-1, V)  # [n*C, V]
    kl = topk_reverse_kl(s, teacher_logits.reshape(-1, V), k, temperature).view(m.shape)  # [n, C]
    kl = torch.where(m, kl, 0.0)  # the distilled tokens only
    w = torch.exp(logp - logp_old).detach().clamp(max=is_clip)
    with torch.no_grad():
        mass = torch.softmax(s.float() / temperature, -1).topk(min(k, V), -1).values.sum(-1).view(m.shape)
    return {"loss": (w * kl).sum(), "kl": kl.detach().sum(), "topk_mass": torch.where(m, mass, 0.0).sum(), "n": m.sum()}


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], m: float = 0.5):
    """Teacher weights after each optimiser step: theta_T <- (1 - m) * theta_T + m * theta (in place)."""
    for t, s in zip(teacher, student):
        t.mul_(1.0 - m).add_(s.detach().to(t.dtype), alpha=m)


def group_rewards(results: list[dict | None], n_tokens: list[int], G: int, l_max: int, l_cache: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [B, G], R_len [B, G]): r_i = score_i + R_len(y_i), R_len the soft overlong punishment of 04
    (grpo.overlong_penalty) on each completion's token count (n_tokens [B*G], group-major). A failed group
    (None) gets r = 0 for every candidate, so its advantages are 0 (Eq. 1) whatever the lengths."""
    pen = torch.tensor([grpo.overlong_penalty(n, l_max, l_cache) for n in n_tokens], dtype=torch.float32).view(-1, G)
    ok = torch.tensor([r is not None for r in results]).unsqueeze(1)  # [B, 1]
    pen = torch.where(ok, pen, 0.0)
    scores = torch.tensor([r["scores"] if r is not None else [0.0] * G for r in results], dtype=torch.float32)
    return scores + pen, pen


def shuffle_group(items: list, rng: random.Random) -> tuple[list, list[int]]:
    """Shown order for the GRM: shown[j] = items[perm[j]]."""
    perm = list(range(len(items)))
    rng.shuffle(perm)
    return [items[p] for p in perm], perm


def unshuffle(shown: list, perm: list[int]) -> list:
    """Back to the candidates' order: out[perm[j]] = shown[j]."""
    out = [None] * len(perm)
    for j, p in enumerate(perm):
        out[p] = shown[j]
    return out


def unshuffle_groups(res, perms: list[list[int]], stats: dict) -> tuple[list[dict | None], dict]:
    """The GRM's parsed answers (backends.ask_json) back in the candidates' order, one per group (None: failed),
    with the fallbacks counted: failed groups, scores derived from the ranks, scores that contradicted them."""
    stats["grm_retried"] = res.retried
    out = []
    for g, v in enumerate(res.values):
        if v is None:
            out.append(None)
            stats["grm_failed"] += 1
            continue
        stats["grm_derived"] += int(v["derived"])
        stats["grm_disordered"] += int(v["disordered"])
        out.append({k: unshuffle(v[k], perms[g]) for k in ("scores", "critiques", "ranks")} | {"derived": v["derived"]})
    return out, stats


TEACHER_BLOCK = (
    "\n\n[Hindsight feedback for the supporter's next reply]\n"
    "<Original Response>\n{response}\n</Original Response>\n"
    "<User Reaction>\n{reaction}\n</User Reaction>\n"
    "<Critic Feedback>\n{critique}\n</Critic Feedback>\n"
    "<Example Better Response>\n{best}\n</Example Better Response>\n"
    "Revise the original response: fix the issues the feedback names, learn from the strengths of the better "
    "response, and be more empathetic, appropriate and helpful. {output}"
)
# What the teacher is asked to write must be what its turn starts with: --format cos prefills "<strategy>" (the
# distilled tokens are rationale and reply), --format reply prefills nothing (the reply alone)
TEACHER_OUTPUT = {
    "cos": "Write the revised turn in the same format: the strategy you choose and why inside <strategy></strategy>, "
           "then the revised reply, and nothing else.",
    "reply": "Output only the revised response, without explanations or prefixes.",
}


def teacher_context(context: list[dict], response: str, reaction: str, critique: str, best: str,
                    fmt: str = "cos") -> list[dict]:
    """The teacher's conversation (template "ESC Teacher Policy", our words): the student's context with the
    hindsight block appended to its last user message; fmt (--format) says what to write after it."""
    out = [dict(m) for m in context]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] += TEACHER_BLOCK.format(response=response, reaction=reaction, critique=critique, best=best,
                                                 output=TEACHER_OUTPUT[fmt])
    return out


def student_messages(tok, context: list[dict], system: str, prefill: str, max_tokens: int) -> list[dict]:
    """The messages of `context` that the student's prompt holds: grpo.prompt_ids drops the oldest ones until
    the prompt fits max_tokens (the last message always stays)."""
    msgs = list(context)
    while len(msgs) > 1 and len(models.chat_ids(tok, [{"role": "system", "content": system}] + msgs, prefill)) > max_tokens:
        msgs = msgs[1:]
    return msgs


def teacher_prompt_ids(tok, context: list[dict], system: str, prefill: str, max_tokens: int, extra_tokens: int,
                       fmt: str, **feedback) -> list[int]:
    """Eq. 11's teacher input (x, f_w): exactly the messages the student saw (never older ones) plus the hindsight
    block (feedback: response, reaction, critique, best), within max_tokens + extra_tokens (--teacher-extra-tokens:
    room for the block only). A last message too long for the student's budget alone is cut from the left in both."""
    seen = student_messages(tok, context, system, prefill, max_tokens)
    return grpo.prompt_ids(tok, teacher_context(seen, fmt=fmt, **feedback), system, prefill, max_tokens + extra_tokens)


def distill_targets(results: list[dict | None], rewards: torch.Tensor, min_gap: float = 0.0) -> dict[int, tuple[int, int]]:
    """Eq. 11 per valid group g: (w, best) from the rewards r_i = score_i + R_len(y_i) [B, G] (the overlong
    punishment included): the distilled candidate a_w = argmin_i r_i and the teacher's "better example"
    argmax_i r_i (the first index on ties). Not distilled: failed groups (None), and tied groups, whose rewards
    spread no more than min_gap (max - min <= min_gap, --sd-min-gap): no candidate is better than a_w there, so
    the "better example" would be an arbitrary one (on an exact tie, a_w itself) and the teacher would only copy it."""
    out = {}
    for g, res in enumerate(results):
        if res is not None:
            r = rewards[g].tolist()
            if max(r) - min(r) > min_gap:
                out[g] = (r.index(min(r)), r.index(max(r)))
    return out


@contextmanager
def active_adapter(model, name: str):
    """Run a PEFT model with adapter `name` active, without touching requires_grad (PEFT's set_adapter
    would make it trainable): the teacher forward happens between the student's forward and backward."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    old = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = name
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m._active_adapter = o


# ----------------------------------------------------------------------------------------------------
# Rewards: reactions, the generative reward model and its ablations (docs/design.md section 6)

# The prompts (our words after RAPO Appendix G): the criteria, shared by the GRM, the rubric judges and 06's pairwise
# judge; one reply scored alone (rubric-point); a group ranked with critiques (the GRM, Eq. 10; rubric-group)
RUBRIC = (
    "Judge the supporter's reply by these criteria: it understands and reflects the seeker's feelings; it is "
    "grounded in the seeker's specific situation, not generic; it helps the seeker explore or cope (good "
    "questions, gentle suggestions after understanding); it is safe, warm and non-judgmental; it is concise "
    "and natural."
)

RUBRIC_POINT_PROMPT = (
    "You are an expert rater of emotional-support conversations (a trained counsellor). Rate one supporter reply "
    "against the rubric below, as an outside expert: not from the help-seeker's point of view, and without knowing "
    "how the seeker reacted.\n{rubric}\n\nConversation so far:\n{context}\n\nSupporter reply:\n{reply}\n\n"
    "Return only JSON: {{\"analysis\": \"<short critique against the rubric>\", \"score\": <a number between 0 and 1>}}"
)


def rubric_point_chats(contexts: list[list[dict]], replies: list[str]) -> list[list[dict]]:
    """One question per reply (--reward rubric-point): the rubric, its context and the reply."""
    return [[{"role": "user", "content": RUBRIC_POINT_PROMPT.format(rubric=RUBRIC, context=common.render_dialogue(c),
                                                                    reply=r)}] for c, r in zip(contexts, replies)]


def validate_point(obj, i):
    """{score, analysis} from a rubric-point answer (ask_json's validate); ValueError if the score is not in [0, 1]."""
    s = float(obj["score"])
    if not 0.0 <= s <= 1.0:
        raise ValueError("score outside [0, 1]")
    return {"score": s, "analysis": str(obj.get("analysis", ""))}


# Who judges a group (Eq. 10): RAPO's GRM takes the help-seeker's place and sees the seeker's reactions; the rubric-group
# judge of the ablations (w/o URM, CPO) is an outside expert rating against the rubric, with no reactions (RAPO
# Table 3: "replaces user-centric reactions with expert-defined rubric rewards").
GRM_VIEWS = {
    "reaction": (
        "Take the place of the help-seeker in the conversation below. Several candidate replies from the supporter "
        "are shown, each with the seeker's reaction to it. Judge them honestly from the seeker's own experience: do "
        "not be lenient or neutral, your judgement decides which replies the system learns."),
    "rubric-group": (
        "You are an expert rater of emotional-support conversations (a trained counsellor). Several candidate "
        "replies from the supporter to the conversation below are shown. Rate them as an outside expert against the "
        "rubric, not from the help-seeker's point of view: be strict, your ratings decide which replies the system "
        "learns."),
}
GRM_PROMPT = (
    "{view}\n{criteria}\n"
    "Lower the score clearly when a reply uses generic empathy not grounded in the context, is confused or "
    "inconsistent, is long with little content, repeats itself, deepens the seeker's negative feelings, or "
    "gives unsafe or invalidating guidance. Concise replies with emotional depth are better than verbose ones.\n"
    "For each candidate write a short critique of its weaknesses in \"analysis\" (about that reply only, "
    "without naming indices or comparing with other candidates), a unique integer \"rank\" (1 = best) and a "
    "unique \"score\" between 0 and 1 (higher = better; the rank-1 reply gets the highest score).\n\n"
    "<Dialogue Context>\n{context}\n</Dialogue Context>\n\n<Candidates>\n{samples}\n</Candidates>\n\n"
    "Return only one JSON object whose keys are the candidate indices: "
    "{{\"0\": {{\"analysis\": \"...\", \"rank\": 1, \"score\": 0.9}}, ...}}"
)


def grm_chats(contexts: list[list[dict]], replies: list[list[str]], reactions: list[list[str]] | None) -> list[list[dict]]:
    """One prompt per group: the context, the G candidate replies (already shuffled by the caller) and,
    for RAPO, the seeker's reaction to each, judged from the seeker's place; without reactions it is the
    rubric-group judge (w/o URM, CPO): an expert rater against the rubric (GRM_VIEWS)."""
    chats = []
    for g, (ctx, ys) in enumerate(zip(contexts, replies)):
        items = []
        for i, y in enumerate(ys):
            s = f"[{i}] Supporter: {y}"
            if reactions is not None:
                s += f"\n[{i}] Seeker's reaction: {reactions[g][i]}"
            items.append(s)
        chats.append([{"role": "user", "content": GRM_PROMPT.format(
            view=GRM_VIEWS["reaction" if reactions is not None else "rubric-group"],
            criteria=RUBRIC, context=common.render_dialogue(ctx), samples="\n\n".join(items))}])
    return chats


def parse_grm(obj, G: int) -> dict:
    """Validate a GRM answer for a group of G: every index 0..G-1, ranks a permutation of 1..G, scores in
    [0, 1], distinct, and in the order of the ranks (rank 1 has the highest score). Ranks valid but scores
    not -> scores derived from ranks ((G - rank) / (G - 1)), flagged `derived`; `disordered` says the scores
    were valid numbers whose order contradicted the ranks (the best-ranked reply must not get the lower
    reward). Raises ValueError if the ranks are invalid.
    """
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    items = []
    for i in range(G):
        v = obj.get(str(i), obj.get(i))
        if not isinstance(v, dict):
            raise ValueError(f"index {i} missing")
        items.append(v)
    try:
        ranks = [int(v["rank"]) for v in items]
    except (KeyError, TypeError, ValueError):
        raise ValueError("rank missing or not an integer") from None
    if sorted(ranks) != list(range(1, G + 1)):
        raise ValueError("ranks are not a permutation of 1..G")
    derived = disordered = False
    try:
        scores = [float(v["score"]) for v in items]
        if any(not 0.0 <= s <= 1.0 for s in scores) or len(set(scores)) != G:
            raise ValueError
        by_rank = [scores[i] for i in sorted(range(G), key=lambda i: ranks[i])]  # rank 1, 2, ..., G
        if any(a <= b for a, b in zip(by_rank, by_rank[1:])):
            disordered = True
            raise ValueError
    except (KeyError, TypeError, ValueError):
        scores = [(G - r) / (G - 1) for r in ranks]
        derived = True
    return {"ranks": ranks, "scores": scores, "critiques": [str(v.get("analysis", "")) for v in items],
            "derived": derived, "disordered": disordered}


def grm_prefill(backend) -> str:
    return "" if backend.spec.startswith("openai:") else '{"0": {"analysis": "'  # deviation 2


def score_groups(grm, mode: str, contexts: list[list[dict]], replies: list[list[str]], reactions: list[list[str]] | None,
                 *, retries: int, max_new_tokens: int, seed: int) -> tuple[list[dict | None], dict]:
    """Scores and critiques per group: [{scores [G], critiques [G], derived}] or None for a failed group."""
    G = len(replies[0])
    stats = {"grm_groups": len(contexts), "grm_failed": 0, "grm_derived": 0, "grm_disordered": 0, "grm_retried": 0}
    if mode == "rubric-point":  # every reply alone (the paper's GRPO baseline)
        flat_ctx = [c for c in contexts for _ in range(G)]
        res = backends.ask_json(grm, rubric_point_chats(flat_ctx, [y for ys in replies for y in ys]),
                                validate_point, retries=retries, max_new_tokens=max_new_tokens, seed=seed,
                                prefill=grm_prefill(grm).replace('{"0": {"analysis": "', '{"analysis": "'))
        stats["grm_retried"] = res.retried
        out = []
        for g in range(len(contexts)):
            vals = res.values[g * G:(g + 1) * G]
            if any(v is None for v in vals):
                out.append(None)
                stats["grm_failed"] += 1
            else:
                out.append({"scores": [v["score"] for v in vals], "critiques": [v["analysis"] for v in vals],
                            "derived": False})
        return out, stats
    # reaction (RAPO) or rubric-group (CPO): one call per group, candidates shuffled against position bias
    rng = random.Random(seed)
    shown, perms = [], []
    for g in range(len(contexts)):
        order, perm = shuffle_group(list(range(G)), rng)
        shown.append(order)
        perms.append(perm)
    sh_replies = [[replies[g][i] for i in shown[g]] for g in range(len(contexts))]
    sh_reacts = None if reactions is None else [[reactions[g][i] for i in shown[g]] for g in range(len(contexts))]
    res = backends.ask_json(grm, grm_chats(contexts, sh_replies, sh_reacts), lambda obj, i: parse_grm(obj, G),
                            retries=retries, max_new_tokens=max_new_tokens, seed=seed, prefill=grm_prefill(grm))
    return unshuffle_groups(res, perms, stats)


def sotopia_reactions(partner, states: list[dict], actions: list[list[dict]], *, max_new_tokens: int, temperature: float,
                      top_p: float, seed: int) -> list[list[dict]]:
    """Eq. 9 on Sotopia: the partner agent's next action after each candidate action, one batched call. A
    candidate after which the episode is over (it leaves, a third "none" in a row, the turn limit) gets no
    reaction ("none")."""
    G = len(actions[0])
    out = [[{"action_type": "none", "argument": ""} for _ in range(G)] for _ in states]
    chats, where = [], []
    for g, st in enumerate(states):
        for i, a in enumerate(actions[g]):
            hist = st["messages"] + [{"turn": len(st["messages"]), "agent": st["agent"], **a}]
            if sotopia.episode_end(hist, sotopia.MAX_TURNS) is None:
                chats.append(sotopia.agent_chat(st["setup"], 1 - st["agent"], hist))
                where.append((g, i))
    texts = partner.complete(chats, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed) if chats else []
    for (g, i), x in zip(where, texts):
        a = sotopia.parse_action(x)
        out[g][i] = {"action_type": a["action_type"], "argument": a["argument"]}
    return out


def score_sotopia_groups(grm, states: list[dict], actions: list[list[dict]], reactions: list[list[dict]], *,
                         retries: int, max_new_tokens: int, seed: int) -> tuple[list[dict | None], dict]:
    """Eq. 10 on Sotopia: one GRM call per group (envs/sotopia.grm_chats: the agent's view, its goal, the seven
    criteria, each candidate action with the partner's reaction), shuffled and un-shuffled as score_groups does."""
    G = len(actions[0])
    stats = {"grm_groups": len(states), "grm_failed": 0, "grm_derived": 0, "grm_disordered": 0, "grm_retried": 0}
    rng = random.Random(seed)
    perms = [shuffle_group(list(range(G)), rng)[0] for _ in states]
    chats = sotopia.grm_chats(states, [[actions[g][i] for i in p] for g, p in enumerate(perms)],
                              [[reactions[g][i] for i in p] for g, p in enumerate(perms)])
    res = backends.ask_json(grm, chats, lambda obj, i: parse_grm(obj, G), retries=retries, max_new_tokens=max_new_tokens,
                          seed=seed, prefill=grm_prefill(grm))
    return unshuffle_groups(res, perms, stats)


# ----------------------------------------------------------------------------------------------------
# The teacher: EMA adapter (LoRA) or EMA copy (full fine-tuning), live policy, or the initial policy


class Teacher:
    """Forward passes of the feedback-conditioned teacher and its EMA update (docs/design.md section 6)."""

    def __init__(self, model, kind: str, lora: bool, ref_model=None, lora_config=None):
        self.model, self.kind, self.lora, self.ref_model = model, kind, lora, ref_model
        self.student = [p for p in model.parameters() if p.requires_grad]
        self.copy = None
        if kind == "ema":
            if lora:  # a second adapter on the same base, initialised from the initial policy's adapter
                model.add_adapter("teacher", lora_config)
                names = dict(model.named_parameters())
                self.pairs = [(names[n.replace(".default.", ".teacher.")], p) for n, p in model.named_parameters()
                              if p.requires_grad]
                for t, s in self.pairs:
                    t.requires_grad_(False)
                    t.data.copy_(s.data)
                self.params = [t for t, _ in self.pairs]
            else:
                self.copy = copy.deepcopy(model).eval().requires_grad_(False)
                self.params = [p for p in self.copy.parameters()]
                self.student = list(model.parameters())

    def context(self):
        if self.kind == "live":
            return nullcontext()
        if self.kind == "base":
            return self.model.disable_adapter() if self.lora else nullcontext()
        return active_adapter(self.model, "teacher") if self.lora else nullcontext()

    def net(self):
        if self.kind == "base" and not self.lora:
            return self.ref_model
        return self.copy if self.copy is not None else self.model

    @torch.no_grad()
    def logits(self, prompts: list[list[int]], completions: list[list[int]], pad_id: int, autocast) -> torch.Tensor:
        """[n, C, V] the teacher's logits (fp32, not divided by T) on exactly the given completion token ids."""
        net = self.net()
        with self.context(), autocast:
            logits = grpo.completion_logps(net, prompts, completions, pad_id, 1.0)[1]
        return logits.float()

    def update(self, m: float):
        if self.kind == "ema":
            ema_update(self.params, self.student, m)

    def state_dict(self) -> dict | None:
        if self.kind != "ema":
            return None
        return {"teacher": [p.detach().cpu().clone() for p in self.params]}

    def load_state_dict(self, st: dict | None):
        if st is not None:
            with torch.no_grad():
                for p, v in zip(self.params, st["teacher"]):
                    p.copy_(v)


def make_sd_loss(teacher: Teacher, ro, distill: dict[int, list[int]], cfg, k: int, is_clip: float,
                 n_distill_tokens: float, stats: dict):
    """L_SD (Eq. 12) as a function of 04's MicroBatch: the distillation loss of the distilled rows of a
    micro-batch, divided by the GLOBAL distilled-token count (so micro-batching and ranks do not change it).
    distill: {row index in the rollouts: the teacher's prompt ids}. Both sides' logits are divided by the
    sampling temperature inside sd_loss. stats: sums for logging, added to on the device."""

    def loss(mb):
        rows = [j for j, i in enumerate(mb.idx) if i in distill]
        if not rows:
            return mb.logp.sum() * 0.0
        comps = [ro.completions[mb.idx[j]] for j in rows]
        t_logits = teacher.logits([distill[mb.idx[j]] for j in rows], comps, cfg.pad_id,
                                  grpo.autocast(cfg, mb.logits.device))  # [r, C', V]
        C = t_logits.shape[1]  # the longest distilled completion of this micro-batch (<= mb's C)
        r = models.to_device(torch.tensor(rows), mb.logits.device)
        res = sd_loss(mb.logits[r, :C], t_logits, mb.logp[r, :C], mb.logp_old[r, :C], mb.completion_mask[r, :C], k,
                      cfg.temperature, is_clip)
        for key, v in (("sd_loss", res["loss"]), ("sd_kl", res["kl"]), ("topk_mass", res["topk_mass"]), ("sd_tokens", res["n"])):
            stats[key] = stats[key] + v.detach().double()  # summed on the device, read once per step
        return res["loss"] / n_distill_tokens

    return loss


# ----------------------------------------------------------------------------------------------------


# The RL rows of RAPO Table 1 / Table 3 (module docstring): --ablation NAME -> (--reward, eta = --sd-coef)
ABLATIONS = {
    "rapo": ("reaction", 1e-3),  # reaction reward + SD
    "wo-sd": ("reaction", 0.0),  # reaction reward, eta 0
    "wo-urm": ("rubric-group", 1e-3),  # rubric-group reward + SD
    "cpo": ("rubric-group", 0.0),  # Table 3's "w/o URM + SD" = Table 1's CPO
    "grpo-rubric": ("rubric-point", 0.0),  # Table 1's GRPO baseline: each reply scored alone by a rubric judge
}


def apply_ablation(args, given: set[str]):
    """--ablation NAME sets --reward and --sd-coef (ABLATIONS). An explicit --reward must be the preset's; an explicit
    --sd-coef may tune eta of a row with SD (> 0) but not remove it, and must be 0 for a row without SD: anything else
    contradicts the row and is refused. Without --ablation, args.ablation names the row the flags amount to (None for
    rubric-point with SD, which is no paper row), so args.json always says which row a run is."""
    if args.ablation is None:
        args.ablation = next((k for k, (rw, eta) in ABLATIONS.items()
                              if rw == args.reward and (eta > 0) == (args.sd_coef > 0)), None)
        if args.ablation is None:
            print(f"warning: --reward {args.reward} with --sd-coef {args.sd_coef} is no row of RAPO's tables (the GRPO "
                  "baseline has no self-distillation: --ablation grpo-rubric)", file=sys.stderr)
        return
    reward, eta = ABLATIONS[args.ablation]
    check("reward" not in given or args.reward == reward,
          f"--ablation {args.ablation} is --reward {reward}, not --reward {args.reward}: drop one of the two flags")
    check("sd_coef" not in given or (args.sd_coef > 0) == (eta > 0),
          f"--ablation {args.ablation} is " + ("with" if eta > 0 else "without") + f" self-distillation, which --sd-coef "
          f"{args.sd_coef} contradicts: " + ("give a positive eta or none" if eta > 0 else "drop --sd-coef"))
    args.reward = reward
    if "sd_coef" not in given:
        args.sd_coef = eta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_grpo_args(p, out="runs/rapo", temperature=1.0, learn_only=True, d=grpo.LossConfig(pad_id=0))
    g = p.add_argument_group("RAPO (docs/design.md section 6)")
    g.add_argument("--ablation", default=None, choices=list(ABLATIONS),
                   help="a row of RAPO Table 1 / Table 3, setting --reward and --sd-coef: rapo (reaction + SD), wo-sd "
                        "(reaction, eta 0), wo-urm (rubric-group + SD), cpo (= w/o URM + SD: rubric-group, eta 0), "
                        "grpo-rubric (rubric-point, eta 0); an explicit --reward/--sd-coef that contradicts it is "
                        "refused (default: none, the row follows from --reward and --sd-coef and is saved as ablation)")
    common.add_role_arg(p, "seeker", "user simulator that reacts to each candidate (Eq. 9)")
    common.add_role_arg(p, "grm", "generative reward model ranking each group with critiques (Eq. 10)")
    g.add_argument("--reward", default="reaction", choices=["reaction", "rubric-group", "rubric-point"],
                   help="reaction = RAPO's (the GRM takes the seeker's place and sees the seeker's reactions); "
                        "rubric-group = an expert rater ranks the group against a rubric, no reactions (w/o URM; CPO "
                        "with --sd-coef 0); rubric-point = an expert rater scores each reply alone (the GRPO baseline "
                        "with --sd-coef 0); see --ablation")
    g.add_argument("--sd-coef", type=float, default=1e-3, help="eta, weight of the self-distillation loss (RAPO: 1e-3; 0 = w/o SD)")
    g.add_argument("--sd-topk", type=int, default=256, help="K, student's top-K tokens in the distillation KL (RAPO: 256)")
    g.add_argument("--sd-is-clip", type=float, default=2.0, help="upper clip of the per-token importance ratio (SDPO: 2)")
    g.add_argument("--sd-min-gap", type=float, default=0.0,
                   help="distil a group only when its rewards spread more than this (max - min): a tied group has no "
                        "better candidate to learn from (default 0: every group but exact ties; the scripted GRMs break "
                        "ties by 1e-6 steps, so 1e-3 skips their ties)")
    g.add_argument("--teacher", default="ema", choices=["ema", "live", "base"],
                   help="ema = EMA of the policy (RAPO); live = the current policy; base = the initial policy")
    g.add_argument("--ema-rate", type=float, default=0.5, help="m in theta_T <- (1 - m) theta_T + m theta (RAPO: 0.5)")
    g.add_argument("--grm-retries", type=int, default=3, help="re-asks of an invalid GRM answer (docs/design.md section 6: 3)")
    g.add_argument("--grm-max-new-tokens", type=int, default=512, help="GRM answer length")
    common.add_request_timeout_arg(g)
    g.add_argument("--seeker-max-new-tokens", type=int, default=64, help="reaction length")
    g.add_argument("--seeker-temperature", type=float, default=0.7, help="seeker sampling temperature")
    g.add_argument("--seeker-top-p", type=float, default=0.9, help="seeker top-p (as 02/06's --seeker-top-p)")
    g.add_argument("--format", default="cos", choices=["cos", "reply"],
                   help="cos = RAPO's Chain-of-Supporting: RAPO's system prompt, the turn prefilled with <strategy>, "
                        "a = [rationale, reply]; reply = the plain ESC system prompt (common.ESC_SYSTEM, as 02, 04 "
                        "--think-prompt none and 06 use) and no prefill: a = the reply (deviation 5)")
    g.add_argument("--env", default="esc", choices=["esc", "sotopia"],
                   help="esc = emotional support (--data from 01_select.py); sotopia = RAPO on Sotopia (--data: turns.jsonl "
                        "from envs/sotopia.py; --seeker plays the partner agent; the GRM uses the seven Sotopia criteria; "
                        "give --max-prompt-tokens 2048 or more: the agent's view is long) (RAPO section 4.2)")
    g.add_argument("--teacher-extra-tokens", type=int, default=1024,
                   help="prompt tokens the teacher gets beyond --max-prompt-tokens, for the hindsight block (the teacher "
                        "sees the student's messages, never older ones)")
    role_cache.add_role_cache_args(p)
    args = p.parse_args(argv)
    if not args.resume:  # (--resume restores the run's row with its other settings)
        apply_ablation(args, common.given_flags(p, argv))
    args = common.resume_args(p, args, argv, Path(args.out) / "checkpoint")  # --resume: the run's own settings
    training.check_grpo_args(args)
    for role in ("seeker", "grm"):  # openai: needs a URL or key; a local path must exist
        common.check_role(args, role)
    check(args.sd_coef >= 0 and args.sd_topk >= 1 and args.sd_is_clip > 0 and args.sd_min_gap >= 0,
          "--sd-coef >= 0, --sd-topk >= 1, --sd-is-clip > 0, --sd-min-gap >= 0")
    check(0 < args.ema_rate <= 1, "--ema-rate must be in (0, 1]")
    check(args.grm_retries >= 0, "--grm-retries must be >= 0")
    check(args.env == "esc" or args.reward == "reaction", "--env sotopia trains with --reward reaction (the rubric "
          "judges are ESC's)")
    check(0 < args.seeker_top_p <= 1 and args.teacher_extra_tokens >= 0,
          "--seeker-top-p must be in (0, 1] and --teacher-extra-tokens >= 0")
    role_cache.check_role_cache_args(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    out, G = Path(args.out), args.group_size
    eval_turns = grpo.held_out_turns(args)  # --eval-every
    dist, turns, fixed, inputs, policy_path = training.start_run(args, "scores")  # all checks before any work
    check(args.env == "esc" or fixed or all(isinstance(t.get("sotopia"), dict) for t in turns),
          f"{args.data}: --env sotopia needs turns written by envs/sotopia.py (a 'sotopia' state per turn)")
    if args.env == "sotopia" and turns:  # the agent's view is one long message: cutting it would drop its start
        tok = models.load_tokenizer(policy_path)
        longest = max(len(models.chat_ids(tok, [{"role": "system", "content": sotopia.AGENT_SYSTEM}] + t["context"]))
                      for t in turns)
        check(longest <= args.max_prompt_tokens, f"{args.data}: a Sotopia context has {longest} prompt tokens, more "
              f"than --max-prompt-tokens {args.max_prompt_tokens}: raise it (the agent's view would lose its start)")
    seeker = grm = None
    cache = role_cache.open_cache(args)  # --role-cache: the seeker's and the GRM's answers recorded / replayed
    if not fixed:  # the role models (each its own engine; roles on one spec share it)
        if args.reward == "reaction":
            seeker = backends.make_backend(args.seeker, args.seeker_base_url, args.device, args.dtype, decoder=args.decoder,
                                           cache=cache, timeout=args.request_timeout)
        grm = backends.make_backend(args.grm, args.grm_base_url, args.device, args.dtype, decoder=args.decoder, cache=cache,
                                    timeout=args.request_timeout)
        backends.preflight({"--seeker": seeker, "--grm": grm})  # openai: servers answer before --overwrite deletes
    engine = None  # the vLLM engine is built before the seeding (LLM() reseeds the process)
    if args.rollout == "vllm":
        engine = speed.VLLMRollout(backends.rollout_engine(policy_path, args), args, dist)
    # full fine-tuning with --teacher base needs the frozen initial model even when beta = 0
    pol = training.setup_policy(args, dist, n_groups=len(fixed or turns), need_ref=args.teacher == "base" and args.sd_coef > 0)
    cfg = grpo.loss_config(args, pol.tok.pad_token_id, dist.device, pol.dtype)
    generate = grpo.sampler(args, pol, engine)
    teacher = Teacher(pol.model, args.teacher if args.sd_coef > 0 else "live", pol.lora, pol.ref_model, pol.lora_config)
    start = cursor = 0  # cursor: prompt batches drawn so far (the data position; 04's deviation 6)
    if args.resume:  # the teacher's state and the data position are the checkpoint's extra state (inside its atomic swap)
        start, extra = training.load_checkpoint(out, pol, dist)
        check(extra is not None and "teacher" in extra, f"--resume: the checkpoint in {out} has no teacher state")
        teacher.load_state_dict(extra["teacher"])
        cursor = extra.get("draws", start)
    system, prefill = (RAPO_SYSTEM, PREFILL) if args.format == "cos" else (common.ESC_SYSTEM, "")
    if args.env == "sotopia":  # the agent's system prompt; a candidate is the action JSON
        system, prefill = sotopia.AGENT_SYSTEM, ""
    log = training.RunLog(args, dist, pol, start, {"system_prompt": system, "prefill": prefill})
    common.print0(f"RAPO ({args.ablation or 'no paper row'}: reward {args.reward}, sd-coef {args.sd_coef}, teacher "
                  f"{args.teacher}): {pol.total} steps, "
                  f"{args.prompts_per_step} prompts x G={G} on {dist.world} rank(s), starting at step {start}")

    eos = set(models.eos_ids(pol.model, pol.tok))

    def eval_score(contexts: list[list[dict]], texts: list[str], comps: list[list[int]]) -> dict[str, list[float]]:
        """--eval-every: the --grm model's rubric score of each reply alone (an absolute scale; a group ranking's mean
        is fixed by its ranks) + R_len; a reply the judge never scores counts 0 (eval_grm_failed_frac)."""
        res, _ = score_groups(grm, "rubric-point", contexts, [[common.strip_reasoning(t)] for t in texts], None,
                              retries=args.grm_retries, max_new_tokens=args.grm_max_new_tokens,
                              seed=common.step_seed(args.seed, -1, dist.rank))
        pen = [grpo.overlong_penalty(len(c), args.l_max, args.l_cache) for c in comps]
        score = [r["scores"][0] if r is not None else 0.0 for r in res]
        return {"total": [a + b for a, b in zip(score, pen)], "reward_score": score, "reward_len": pen,
                "grm_failed_frac": [float(r is None) for r in res]}

    def as_groups(contexts, p_ids, comps, texts, results, reactions, teacher_ids=None) -> list[dict]:
        """One dict per group: its prompt, G candidates, reactions, GRM answer (None: failed) and rewards
        r_i = score_i + R_len(y_i) (failed groups: all-equal rewards, so A = 0, Eq. 1, and no distillation)."""
        rewards, r_len = group_rewards(results, [len(c) for c in comps], G, args.l_max, args.l_cache)  # [B, G]
        lps = engine.last_logps if engine is not None else None  # --rollout vllm: the engine's log-probs of comps
        return [{"context": contexts[b], "prompt_ids": p_ids[b], "completions": comps[b * G:(b + 1) * G],
                 "texts": texts[b * G:(b + 1) * G], "result": results[b],
                 "reactions": reactions[b] if reactions is not None else None,
                 "rw": {"total": rewards[b].tolist(), "len": r_len[b].tolist()},
                 "teacher_prompt_ids": teacher_ids[b] if teacher_ids is not None else None,
                 "engine_logps": lps[b * G:(b + 1) * G] if lps is not None else None} for b in range(len(p_ids))]

    def draw(k: int) -> list[dict]:
        """Draw k of the prompt stream (04's deviation 6; without --dynamic-sampling draw k is step k): this rank's
        prompts, G Chain-of-Supporting candidates each, the reactions (Eq. 9) and the GRM's answers (Eq. 10), as
        groups; the GRM's counts are added to the step's `st`."""
        seed = common.step_seed(args.seed, k, dist.rank)  # the roles' seeds for this draw and rank
        batch = common.shard(training.step_batch(turns, k, pol.steps_per_epoch, args), dist)
        contexts = [t["context"] for t in batch]
        p_ids = [grpo.prompt_ids(pol.tok, c, system, prefill, args.max_prompt_tokens) for c in contexts]
        t = time.time()
        comps = generate(p_ids, G, k)  # [B_local*G], group-major
        timer["gen"] += time.time() - t
        texts = [prefill + pol.tok.decode(c, skip_special_tokens=True) for c in comps]
        replies = [common.strip_reasoning(t) for t in texts]
        reactions = None
        if args.env == "sotopia":  # the partner agent reacts to each candidate action; the GRM ranks with the criteria
            states = [t["sotopia"] for t in batch]
            acts = [[{f: a[f] for f in ("action_type", "argument")} for a in map(sotopia.parse_action, texts[g * G:(g + 1) * G])]
                    for g in range(len(p_ids))]
            reacts = sotopia_reactions(seeker, states, acts, max_new_tokens=args.seeker_max_new_tokens,
                                       temperature=args.seeker_temperature, top_p=args.seeker_top_p, seed=seed)
            results, st_k = score_sotopia_groups(grm, states, acts, reacts, retries=args.grm_retries,
                                                 max_new_tokens=args.grm_max_new_tokens, seed=seed)
            reactions = [[sotopia.action_line(len(s["messages"]) + 1, s["setup"]["names"][1 - s["agent"]], u) for u in rs]
                         for s, rs in zip(states, reacts)]
        else:
            rep_g = [replies[g * G:(g + 1) * G] for g in range(len(p_ids))]
            if args.reward == "reaction":
                recs = [t for t in batch for _ in range(G)]
                hists = [t["context"] + [{"role": "assistant", "content": y}] for t, y in zip(recs, replies)]
                flat = seeker.complete(common.seeker_chats(recs, hists), max_new_tokens=args.seeker_max_new_tokens,
                                       temperature=args.seeker_temperature, top_p=args.seeker_top_p, seed=seed)
                reactions = [[" ".join(u.split()) or "..." for u in flat[g * G:(g + 1) * G]] for g in range(len(p_ids))]
            results, st_k = score_groups(grm, args.reward, contexts, rep_g, reactions, retries=args.grm_retries,
                                         max_new_tokens=args.grm_max_new_tokens, seed=seed)
        for key, v in st_k.items():
            st[key] += v
        return as_groups(contexts, p_ids, comps, texts, results, reactions)

    bar = common.progress(total=pol.total, initial=start, desc="rapo")
    stop = pol.total if args.stop_after is None else min(pol.total, start + args.stop_after)
    for step in range(start, stop):
        t0, timer = time.time(), {"gen": 0.0}
        st = {"grm_groups": 0, "grm_failed": 0, "grm_derived": 0, "grm_disordered": 0, "grm_retried": 0}
        # ---- this step's groups: prompts (data position = step, or the draw count), Chain-of-Supporting rollouts,
        # reactions (Eq. 9) and the generative reward model (Eq. 10); r_i = score_i + R_len(y_i)
        ds_row = {}
        if fixed:
            fx = common.shard(fixed, dist)
            comps = [c for g in fx for c in g["completions"]]
            results = [None if g["scores"] is None else {"scores": g["scores"], "critiques": [""] * G} for g in fx]
            groups = as_groups([[] for _ in fx], [g["prompt_ids"] for g in fx], comps,
                               [prefill + pol.tok.decode(c, skip_special_tokens=True) for c in comps], results, None,
                               [g.get("teacher_prompt_ids") for g in fx])
            st.update(grm_groups=len(fx), grm_failed=sum(r is None for r in results))
        else:  # (--dynamic-sampling, DAPO: zero-spread groups, ties or failed GRM groups, replaced by new prompts)
            groups, cursor, ds_row = grpo.step_groups(draw, step, cursor, args, dist, engine)
        t_gen = timer["gen"] if not fixed else time.time() - t0
        contexts, p_ids = [grp["context"] for grp in groups], [grp["prompt_ids"] for grp in groups]
        comps = [c for grp in groups for c in grp["completions"]]  # [B_local*G], group-major
        texts = [t for grp in groups for t in grp["texts"]]
        replies = [common.strip_reasoning(t) for t in texts]
        results = [grp["result"] for grp in groups]
        reactions = None if groups[0]["reactions"] is None else [grp["reactions"] for grp in groups]
        rewards = torch.tensor([grp["rw"]["total"] for grp in groups], dtype=torch.float32).view(len(groups), G)  # [B, G]
        r_len = torch.tensor([grp["rw"]["len"] for grp in groups], dtype=torch.float32).view(len(groups), G)
        adv = grpo.advantages(rewards, {"score": rewards - r_len, "len": r_len}, {"score": 1.0, "len": 1.0},
                              args.scale_rewards, args.reward_combine, args.adv_eps, dist).flatten()  # [B*G], Eq. 1
        ro = grpo.Rollouts(prompts=[p for p in p_ids for _ in range(G)], completions=comps, advantages=adv)
        # ---- verbal RL targets (Eq. 11): a_w = argmin_i r_i of each valid group, and the teacher's prompt (x, f_w)
        distill = {}
        targets = distill_targets(results, rewards, args.sd_min_gap) if args.sd_coef > 0 else {}
        st["sd_groups"] = len(targets)
        for g, (w, best) in targets.items():
            if fixed:
                if groups[g]["teacher_prompt_ids"]:
                    distill[g * G + w] = groups[g]["teacher_prompt_ids"]
                continue
            react = reactions[g][w] if reactions is not None else "(no reaction observed; rubric feedback only)"
            feedback = dict(response=replies[g * G + w], reaction=react, critique=results[g]["critiques"][w],
                            best=replies[g * G + best])
            if args.env == "sotopia":  # the agent's own view plus the Sotopia hindsight block, same budget rule
                seen = student_messages(pol.tok, contexts[g], system, prefill, args.max_prompt_tokens)
                distill[g * G + w] = grpo.prompt_ids(pol.tok, sotopia.teacher_context(seen, **feedback), system, prefill,
                                                     args.max_prompt_tokens + args.teacher_extra_tokens)
            else:
                distill[g * G + w] = teacher_prompt_ids(pol.tok, contexts[g], system, prefill, args.max_prompt_tokens,
                                                        args.teacher_extra_tokens, args.format, **feedback)
        n_sd = common.all_reduce_named({"n": sum(len(comps[i]) for i in distill)}, dist)["n"]
        # ---- the update: L = L_GRPO + eta * L_SD (Eq. 15), then the teacher's EMA step
        t1 = time.time()  # t_gen .. t1: the seeker's reactions and the GRM (generation by the reward roles)
        grpo.prepare_logps(pol, ro, cfg, args.ppo_epochs)  # reference log-probs; logp_old for --ppo-epochs > 1
        logp_now = functools.cache(lambda: ro.logp_old or grpo.sequence_logps(pol.model, ro, cfg))  # pi_old, once at most
        check_row = speed.sampler_check(engine, ro, logp_now, args.top_p, dist)  # --rollout vllm: engine vs trainer
        check_row.update(grpo.loss_masks(ro, args, eos, engine, logp_now, dist))  # --mask-truncated, --rollout-is/-mask
        sd_st = {"sd_loss": 0.0, "sd_kl": 0.0, "topk_mass": 0.0, "sd_tokens": 0.0}
        l_sd = make_sd_loss(teacher, ro, distill, cfg, args.sd_topk, args.sd_is_clip, max(n_sd, 1.0), sd_st)
        eta_l_sd = (lambda mb: args.sd_coef * l_sd(mb)) if args.sd_coef > 0 else None  # Eq. 15: + eta * L_SD
        try:
            for _ in range(args.ppo_epochs):
                upd = grpo.grpo_step(pol.model, pol.train_model, pol.optimizer, pol.scheduler, ro, cfg, dist,
                                     args.max_grad_norm, extra_loss=eta_l_sd)  # L_GRPO + eta_l_sd, per micro-batch
                teacher.update(args.ema_rate)  # EMA after every optimiser step
        except common.StageFailure as e:
            raise common.StageFailure(f"step {step + 1}: {e}; {training.kept_note(out)}") from None
        t_upd = time.time() - t1

        # ---- logging: 04's metrics plus GRM counts and distillation statistics (docs/05_rapo.md, Metrics)
        row = training.step_metrics(step, pol, dist, comps, rewards, adv, upd, args.beta,
                                    {"reward_len": r_len.flatten().tolist()})
        row.update(training.timings(t0, t_gen, t_upd, row.pop("_tokens"), args.ppo_epochs, dist))
        e = common.all_reduce_named({**st, **{k: float(v) for k, v in sd_st.items()}}, dist)
        n_tok = e["sd_tokens"]
        row.update({"time_reward": t1 - t0 - t_gen, "grm_failed_frac": e["grm_failed"] / e["grm_groups"],
                    "grm_derived_frac": e["grm_derived"] / e["grm_groups"],
                    "grm_disordered_frac": e["grm_disordered"] / e["grm_groups"], "grm_retries": e["grm_retried"],
                    **{k: e[s] / n_tok if n_tok else None for k, s in (("sd_loss", "sd_loss"), ("sd_kl", "sd_kl"),
                                                                      ("sd_topk_mass", "topk_mass"))},
                    "sd_tokens": n_tok, "sd_groups": e["sd_groups"], **check_row, **ds_row})
        if eval_turns is not None and (step + 1) % args.eval_every == 0:  # held-out reward, after the update
            t2 = time.time()
            row.update(grpo.evaluate(generate, eval_turns, pol.tok, system, prefill, args, dist, eval_score),
                       time_eval=time.time() - t2)
        log.metrics(row)
        if log.sample_step(step):
            log.sample({"step": step + 1, "context": contexts[0], "completions": texts[:G], "replies": replies[:G],
                        "reactions": reactions[0] if reactions else None, "grm": results[0], "advantages": adv[:G].tolist()})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", grm_fail=f"{row['grm_failed_frac']:.2f}",
                        sd_kl=f"{row['sd_kl'] or 0:.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop:
            training.save_checkpoint(out, step + 1, pol, dist, args, inputs, extra={"teacher": teacher.state_dict(),
                                                                                      "draws": cursor})
    bar.close()
    role_cache.report(cache, out, dist)  # this run's hits / misses, over all ranks (a log: OUT/role_cache.json)
    training.finish(out, pol, dist, done=stop == pol.total)


if __name__ == "__main__":
    common.run_main(main)
