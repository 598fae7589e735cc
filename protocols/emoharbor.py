"""EmoHarbor-style user-as-judge (Ye et al., 2026; RAPO Tables 5 and 7); our implementation, not the official code.

A simulated user with a profile (background, personality, situation, inner state) opens and talks with the policy
for --emoharbor-rounds rounds of (user, policy) (rating.converse, lock-step over the chunk). Then the same user, with
the same profile prompt, steps out of the chat and rates the supporter as itself, 1-5, on ten dimensions, one
question each (EH_DIMS; higher = better for every one, redundancy and safety included). Scores and their mean:
rating.py. 06 deviation 9: one prompted model plays the user (EmoHarbor splits the user's inner world into three
agents); the user opens; the number of rounds is ours. Profiles can be seeded from role cards or dialogues
(profile_of). The rating model is --user-judge (default: the --seeker model, as RAPO used GPT-4o for both).
"""
from __future__ import annotations

import common
from common import check
from protocols.base import simulate
from protocols.cases import PROFILE_FIELDS
from protocols.rating import RatedConversations, converse, protocol_record, rate_dimensions

# EmoHarbor's ten dimensions, 1-5, rated by the simulated user themself (higher = better for every one,
# redundancy and safety included: 5 = no redundancy, entirely safe).
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
PROFILE_LABELS = {"background": "Who you are", "personality": "Your personality", "situation": "What is going on",
                  "inner_state": "What you feel and think inside (not said openly at first)"}


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


def rating_chats(dialogue: list[dict], profile: dict) -> dict[str, list[dict]]:
    """{dimension: chat}: the simulated user (its profile as system prompt, as in the conversation) rates the
    supporter as itself, one dimension per question."""
    text = common.render_dialogue(dialogue, user="Me", assistant="Supporter")
    sys_msg = {"role": "system", "content": EH_USER_SYSTEM.format(profile=profile_text(profile))}
    return {k: [sys_msg, {"role": "user", "content": EH_RATE_PROMPT.format(dialogue=text, name=n, rubric=r)}]
            for k, (n, r) in EH_DIMS.items()}


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


class EmoHarbor(RatedConversations):
    name = kind = "emoharbor"
    seed_id, section, settings_key, role_label = 6, 5, "emoharbor", "user judge (emoharbor)"
    default_on, own_roles = ("cards", "profiles"), ("user_judge",)  # --user-judge: add_args below
    rounds_flag, cases_key, chunk = "emoharbor_rounds", "profiles", staticmethod(emoharbor_chunk)
    dims, lo, hi, title, judge_role = EH_DIMS, 1, 5, "EmoHarbor-style user-as-judge", "user_judge"
    eval_keys = ("emoharbor_rounds", "user_judge", "user_judge_mode_used", "retries", "judge_max_new_tokens")

    def add_args(self, p):
        g = p.add_argument_group("emoharbor (EmoHarbor-style user-as-judge, 1-5)")
        g.add_argument("--emoharbor-rounds", type=int, default=5,
                       help="emoharbor: rounds of (user, policy), the user opening (our choice; not from the paper)")
        g.add_argument("--user-judge", default=None,
                       help="model of the simulated user that rates the emoharbor part as itself (default: the --seeker "
                            "model, as RAPO used GPT-4o for both); same spec forms as --judge, '{dim}' included")
        g.add_argument("--user-judge-base-url", default=None, help="base URL for an openai: --user-judge")

    def check_args(self, args):
        check(args.emoharbor_rounds >= 1, "--emoharbor-rounds must be >= 1")
        args.user_judge = args.user_judge or args.seeker  # the seeker's model (and server) unless given
        if args.user_judge == args.seeker and args.user_judge_base_url is None:
            args.user_judge_base_url = args.seeker_base_url
        args.user_judge_mode_used = args.judge_mode if args.judge_mode != "auto" else (
            "generate" if common.parse_spec(args.user_judge).backend == "openai" else "likelihood")

    def protocol_text(self, a):
        return ("EmoHarbor-style user-as-judge (Ye et al., 2026; our implementation, not the official "
                f"code): the simulated user opens, {a.emoharbor_rounds} rounds of (user, policy), then "
                "the same user rates 10 dimensions 1-5 as itself, one question each")

    def judge_fields(self, a):
        return {"user_judge": a.user_judge}

    def cases_text(self, run):
        return ("profiles of " + str(run.args.test_data) if run.source == "profiles"
                else f"profiles seeded from the {run.source}")
