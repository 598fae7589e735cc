"""ESC-Eval (Zhao et al., EMNLP 2024; RAPO Tables 6 and 8) on role cards.

Each role card is played by the seeker (ESC-Eval's ESC-Role): the assistant's fixed greeting opens, then --esc-rounds
rounds of (seeker, policy), the seeker first (rating.converse, lock-step over the chunk). As in the official script
the policy under test does not see the greeting; the seeker uses the --seeker-* sampling settings (06 deviation 8).
The judge (ESC-Eval's ESC-Rank) then rates the whole transcript, the greeting included, on seven dimensions 0-4,
one question each: fluency, diversity, empathy, suggestion effectiveness, humanoid, emotional knowledge, human
preference (ESC_DIMS: the published anchors, our wording). A judge spec with '{dim}' gives one model per
dimension ('hf:ESC-RANK/{dim}_en'), --esc-judge-prompts replaces our questions with another wording. Scores and
their mean: rating.py (a judge answer is its JSON "score" or first number; the official scorer takes the smallest
digit anywhere; invalid answers are re-asked and counted, not set to -1). Cards can also be written from dialogues'
or profiles' fields (card_text).
"""
from __future__ import annotations

import json
from pathlib import Path

import common
from common import InputError, check
from protocols.base import simulate
from protocols.rating import RatedConversations, converse, protocol_record, rate_dimensions

ESC_DIM_KEYS = ("fluency", "diversity", "empathic", "suggestion", "human", "tech", "overall")  # = ESC_DIMS' keys
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


assert tuple(ESC_DIMS) == ESC_DIM_KEYS


def card_text(case: dict) -> str:
    """The ESC-Eval role card's `base` text: the card itself, or one written from a dialogue's or profile's fields."""
    if case.get("card"):
        return case["card"]
    p = case.get("profile") or {}
    rows = [("Background", p.get("background")), ("Personality", p.get("personality")),
            ("Emotion", case.get("emotion_type")), ("Problem", case.get("problem_type")),
            ("Situation", case.get("situation"))]
    return "\n".join(f"{k}: {v}" for k, v in rows if v) or "Problem: going through a hard time"


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


class EscEval(RatedConversations):
    name = kind = "esc-eval"
    seed_id, section, settings_key, role_label = 5, 4, "esc_eval", "judge (esc-eval)"
    default_on = ("cards",)
    rounds_flag, cases_key, chunk = "esc_rounds", "cards", staticmethod(esc_eval_chunk)
    dims, lo, hi, title = ESC_DIMS, 0, 4, "ESC-Eval protocol"
    eval_keys = ("judge", "judge_mode_used", "retries", "judge_max_new_tokens", "esc_judge_prompts", "esc_rounds")
    files = ("esc_judge_prompts",)

    def add_args(self, p):
        g = p.add_argument_group("esc-eval (ESC-Eval, 0-4)")
        g.add_argument("--esc-rounds", type=int, default=5,
                       help="esc-eval: rounds of (seeker, policy) after the fixed greeting (ESC-Eval: 5)")
        g.add_argument("--esc-judge-prompts", default=None,
                       help="esc-eval: a JSON file {dimension: prompt} replacing our judge prompts, each with a "
                            f"'{{dialogue}}' placeholder, for every dimension of {','.join(ESC_DIM_KEYS)} (e.g. the "
                            "wording a fine-tuned scorer such as ESC-Rank was trained on; our prompts are our own words)")

    def check_args(self, args):
        check(args.esc_rounds >= 1, "--esc-rounds must be >= 1")

    def prepare(self, run):
        run.read[self.name] = load_judge_prompts(run.args.esc_judge_prompts)

    def chunk_kw(self, run):
        return {"prompts": run.read[self.name]}

    def protocol_text(self, a):
        return ("ESC-Eval (Zhao et al., EMNLP 2024): the assistant's fixed greeting, then "
                f"{a.esc_rounds} rounds of (seeker playing the role card, policy); the policy does "
                "not see the greeting; 7 dimensions 0-4 on the whole transcript, one question each")

    def judge_fields(self, a):
        return {"judge": a.judge,
                "judge_models": {d: a.judge.replace("{dim}", d) for d in ESC_DIMS} if "{dim}" in a.judge else None}

    def prompts_note(self, a):
        return f"; prompts from {a.esc_judge_prompts}" if a.esc_judge_prompts else "; our prompts"

    def cases_text(self, run):
        return ("role cards of " + str(run.args.test_data) if run.source == "cards"
                else f"cards written from the {run.source}' fields")
