"""A scripted, transparent ESC environment: the seeker's mood as a rule model, and the roles that read it.

Why: the embedded 135M model does not discriminate as a critic or reward model (README), so with it neither
method has a signal to learn from. Like CartPole for PPO, this module is a small environment whose right
answer is known, deterministic and cheap. It is a stand-in: results in it are results in a scripted
environment, not on people.

Choose it with the spec `scripted` for a role (`--critic scripted`, `--grm scripted`, `--seeker scripted`);
backends.make_backend builds a backends.ScriptedBackend, the Backend interface of the LLM roles over answer() and
critic_option_loglik() below, so the
stages need no special case. It reads the same prompts an LLM would read (the roles' templates, inverted by
`unformat`: the critic's in 02_simulate.py, the GRM's and the rubric judge's in 05_rapo.py, the seeker's in
common.py) and answers in the same form: the critic's option log-likelihoods (or sampled option texts), the GRM's
JSON, the seeker's message.

THE RULES (fixed before any experiment, revised once on train contexts only: see REVISION below; a reader checks
each in a few lines below)
Each supporter reply y that answers a seeker message gets a score d(y) = the sum of the terms that apply:
  open question   +0.20  a sentence ending in "?" that starts with what/how/why/when/which/who/where, or
                         asks the person to tell/share/say more
  feeling         +0.20  names a feeling (FEELINGS: anxious, sad, lonely, overwhelmed, ...)
  grounded        +0.20  repeats a content word (3+ letters, not a stop word) of the seeker's last message
  validation      +0.15  a validating phrase (VALIDATION: "makes sense", "understandable", "no wonder", ...)
  advice          +0.15  a suggestion (ADVICE: "you could", "have you tried", ...) once the seeker has been
                         heard (3 or more seeker messages so far); -0.20 before that
  length          -0.30  fewer than 6 or more than 50 words
  repetition      -0.20  shares half or more of its distinct words with the previous supporter reply (Jaccard)
  generic filler  -0.10  a stock phrase (FILLER: "sorry to hear", "going through a tough time",
                         "I'm here for you", "I understand", ...)
The seeker's mood m starts at BASELINE = -0.5 at the first seeker message and after each such reply becomes
  m <- clip(BASELINE + LEAK * (m - BASELINE) + d(y), -1, 1),   LEAK = 0.8
(without support the mood drifts back to the baseline; a steady d gives m -> BASELINE + d / (1 - LEAK)
= -0.5 + 5 d, which passes theta = 0.5 only if d > 0.2: success needs replies that do two things well, or one
with nothing wrong, turn after turn, and a few turns to build up: one reply moves m by at most D_MAX = 0.9).
REVISION (once, before any held-out evaluation of a trained policy; decided on train contexts only): the first
rules had LEAK 0.6, repetition -0.40, filler -0.20. Under them the embedded policy (SmolLM2-135M, 32 new tokens)
succeeded in 0 of 40 train dialogues (../shared/data/esconv_failed.json, 06 interactive, T = 4, scripted seeker
and critic; final mood -0.78 on average, half the cases at the floor -1): with a steady d it needed d > 0.4, and
its replies (stock sympathy, repeated word for word, cut before any question) score about -0.1. The revision lets
the mood keep more of each reply (LEAK 0.8) and halves the two penalties the base policy pays on most turns, so
the floor no longer hides differences; on the same 40 train dialogues the base policy then succeeded in 1 of 40
(final mood -0.39 on average).
Critic: PPDPP's four options from the mood: m is placed between the two neighbouring option values
(-1 worse, -0.5 same, 0.5 better, 1 solved) with linear weights, so the expected score c_t equals m exactly;
likelihood mode returns log of those weights, sample mode draws options from them (seeded by the prompt).
GRM (RAPO Eq. 10): each candidate's score is its d(y) in the group's context, mapped linearly onto [0, 1];
ranks follow the scores; ties are broken by position with a 1e-6 step (so tied replies get advantages of
about 0: 1e-6 is far below the advantage's eps = 1e-4); the analysis names what the reply lacked and what
it did well. The rubric-point judge (05 --reward rubric-point) returns the same score for one reply.
Seeker: templated messages from its persona (emotion, problem) and the mood the last reply left it in.
"""
from __future__ import annotations

import functools
import json
import math
import random
import re
import string
import zlib

import common

BASELINE, LEAK = -0.5, 0.8  # LEAK was 0.6 before the revision (docstring)
HEARD_AFTER = 3  # seeker messages before advice counts as "after the person has been heard"
MIN_WORDS, MAX_WORDS = 6, 50
W = {"question": 0.20, "feeling": 0.20, "grounded": 0.20, "validation": 0.15, "advice": 0.15,
     "early_advice": -0.20, "length": -0.30, "repetition": -0.20, "filler": -0.10}  # revised: -0.40, -0.20 before
D_MIN = W["early_advice"] + W["length"] + W["repetition"] + W["filler"]  # the lowest possible d (-0.8)
D_MAX = W["question"] + W["feeling"] + W["grounded"] + W["validation"] + W["advice"]  # the highest (0.9)

FEELINGS = set("""anxious anxiety worried worry worries scared afraid fear frightened stressed stress overwhelmed
nervous sad sadness down depressed depression lonely alone hurt hurting angry anger mad frustrated frustrating
frustration upset ashamed shame guilty guilt jealous hopeless helpless exhausted tired disappointed heartbroken
grief grieving pain painful miserable confused insecure embarrassed devastated betrayed terrified panic""".split())
VALIDATION = ("makes sense", "understandable", "normal to feel", "no wonder", "it's normal", "it is normal", "that sounds hard",
              "sounds really hard", "sounds difficult", "sounds so hard", "sounds tough", "anyone would",
              "of course you", "not alone", "must be hard", "must be difficult", "must feel", "it's okay to feel",
              "it is okay to feel", "that's a lot", "completely valid", "totally valid")
ADVICE = ("you could", "you should", "try to", "you might try", "have you tried", "have you considered",
          "maybe you", "i suggest", "i recommend", "it might help", "how about", "consider ")
FILLER = ("sorry to hear", "going through a tough time", "going through a difficult time", "going through a hard time",
          "i'm here for you", "i am here for you", "here to support you", "i understand", "everything will be",
          "happens for a reason", "stay positive", "as an ai", "don't worry")
WH = ("what", "how", "why", "when", "which", "who", "where")
ASK_MORE = ("tell me", "share", "say more", "talk about")
STOP = set("""the and you are was for but not his her she him had has its our out who why how can did get got one
all any may now see way too yes yeah okay its it's i'm you're that's don't can't didn't i've i'll let lot bit day
about above after again against also been before being below between both could does doing down
during each from further have having here hers herself himself into itself just more most myself only other ours
over same should some such than that their theirs them themselves then there these they this those through under
until very were what when where which while whom with would your yours yourself really know feel feeling think
want like going things thing something anything because make made much well even still dont cant didnt""".split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def content_words(text: str) -> set[str]:
    """Words of 3+ letters that are not stop words, a plural 's' dropped ('jobs' = 'job')."""
    ws = {w.strip("'") for w in words(text)}
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in ws if len(w) >= 3 and w not in STOP}


def has_open_question(text: str) -> bool:
    for sent in re.findall(r"[^.!?]*\?", text):
        ws = words(sent)
        if ws and (ws[0] in WH or any(k in sent.lower() for k in ASK_MORE)):
            return True
    return False


def reply_features(reply: str, history: list[dict]) -> dict[str, bool]:
    """Which rules apply to a supporter reply given the dialogue before it (ending with a seeker message)."""
    low, ws = reply.lower(), words(reply)
    seeker_msgs = [m["content"] for m in history if m["role"] == "user"]
    prev = [m["content"] for m in history if m["role"] == "assistant"]
    grounded = bool(seeker_msgs) and bool(content_words(reply) & content_words(seeker_msgs[-1]))
    advice = any(k in low for k in ADVICE)
    heard = len(seeker_msgs) >= HEARD_AFTER
    a, b = set(ws), set(words(prev[-1])) if prev else set()
    return {
        "question": has_open_question(reply),
        "feeling": bool(FEELINGS & {w.strip("'") for w in ws}),
        "grounded": grounded,
        "validation": any(k in low for k in VALIDATION),
        "advice": advice and heard,
        "early_advice": advice and not heard,
        "length": not MIN_WORDS <= len(ws) <= MAX_WORDS,
        "repetition": bool(a and b) and len(a & b) / len(a | b) >= 0.5,
        "filler": any(k in low for k in FILLER),
    }


def reply_score(reply: str, history: list[dict]) -> float:
    """d(y): the sum of the weights of the rules that apply (module docstring)."""
    return round(sum(W[k] for k, on in reply_features(reply, history).items() if on), 6)


def mood(dialogue: list[dict]) -> float:
    """The seeker's mood after a dialogue: BASELINE at the first seeker message, moved by every supporter reply
    that answers a seeker message (a greeting before the seeker has spoken does not count)."""
    m, seen_user = BASELINE, False
    for i, msg in enumerate(dialogue):
        if msg["role"] == "user":
            seen_user = True
        elif seen_user:
            m = min(1.0, max(-1.0, BASELINE + LEAK * (m - BASELINE) + reply_score(msg["content"], dialogue[:i])))
    return m


def option_probs(m: float) -> list[float]:
    """Weights of the critic's four options (02_simulate.CRITIC_OPTIONS order) whose expectation is exactly m."""
    vals = [v for _, v in stage("02_simulate").CRITIC_OPTIONS]
    p = [0.0] * len(vals)
    for k in range(len(vals) - 1):
        lo, hi = vals[k], vals[k + 1]
        if lo <= m <= hi:
            p[k + 1] = (m - lo) / (hi - lo)
            p[k] = 1.0 - p[k + 1]
            return p
    p[0 if m < vals[0] else -1] = 1.0
    return p


def critique(f: dict[str, bool]) -> str:
    """The GRM's analysis: what the reply lacked, then what it did well (templated from the rules)."""
    lacks = {"question": "an open question about their feelings or situation", "feeling": "naming their feeling",
             "grounded": "a link to what they just said", "validation": "validation of their feelings"}
    faults = {"early_advice": "gives advice before the person has been heard", "length": "is too short or too long",
              "repetition": "repeats the previous reply", "filler": "uses generic filler not grounded in their words"}
    good = {"question": "asks an open question", "feeling": "names a feeling", "grounded": "refers to what they said",
            "validation": "validates them", "advice": "offers a suggestion after listening"}
    missing = [v for k, v in lacks.items() if not f[k]] + [v for k, v in faults.items() if f[k]]
    did = [v for k, v in good.items() if f[k]]
    return (("Lacks: " + "; ".join(missing) + ". ") if missing else "Lacks nothing the rules check. ") + \
        (("Does well: " + "; ".join(did) + ".") if did else "Does nothing the rules reward.")


def grm_answer(context: list[dict], replies: list[str]) -> dict:
    """{"i": {"analysis", "rank", "score"}} in the LLM GRM's JSON shape (05_rapo.parse_grm validates it)."""
    scores = [(reply_score(y, context) - D_MIN) / (D_MAX - D_MIN) for y in replies]
    order = sorted(range(len(replies)), key=lambda i: (-scores[i], i))  # best first; ties by position
    out = {}
    for rank, i in enumerate(order, 1):
        tie = sum(1 for j in order[rank:] if scores[j] == scores[i])  # later tied replies below this one
        s = min(1.0, max(0.0, scores[i])) + 1e-6 * tie
        out[str(i)] = {"analysis": critique(reply_features(replies[i], context)), "rank": rank, "score": round(s, 7)}
    return out


def seeker_message(persona_text: str, dialogue: list[dict]) -> str:
    """The scripted seeker's next message: from its persona and the mood the supporter's last reply left."""
    emo = re.search(r"You feel (.+?)\.", persona_text)
    prob = re.search(r"Your problem: (.+?)\.", persona_text)
    emo, prob = (emo.group(1) if emo else "bad"), (prob.group(1) if prob else "my situation")
    m = mood(dialogue)
    last = next((x["content"] for x in reversed(dialogue) if x["role"] == "assistant"), "")
    if m > 0.5:
        return f"Thank you, that really helps. I feel better about the {prob} now."
    if has_open_question(last):
        return f"It's mostly the {prob}. The {emo} won't go away and I don't know what to do."
    if m > 0.0:
        return f"That helps a little. I still feel {emo} about the {prob}."
    return f"I don't know. I just feel {emo} and the {prob} is still there."


# ----------------------------------------------------------------------------------------------------
# Reading the prompts the LLM roles get (their stages' templates), and answering them


@functools.cache
def stage(name: str):
    """A stage script as a module, loaded once on first use: the critic's prompt and options live in 02_simulate.py,
    the GRM's and the rubric judge's prompts in 05_rapo.py. Loaded here, not at import, so `from envs import esc`
    stays light and backends.make_backend can import this module without a cycle."""
    return common.load_stage(name)


def unformat(template: str, text: str) -> dict[str, str] | None:
    """Invert template.format(**fields): the fields, or None if the text was not made from the template."""
    pattern, names = "", []
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name is not None:
            pattern += f"(?P<{name}>.*?)" if name not in names else f"(?P={name})"
            names.append(name)
    m = re.fullmatch(pattern, text, re.S)
    return m.groupdict() if m else None


def parse_dialogue(rendered: str, user: str = "Seeker", assistant: str = "Supporter") -> list[dict]:
    """Invert common.render_dialogue: a line that starts with 'Seeker: ' or 'Supporter: ' opens a message, other
    lines continue the previous one (a reply that itself starts a line with such a prefix is misread)."""
    msgs = []
    for line in rendered.split("\n"):
        for who, role in ((user, "user"), (assistant, "assistant")):
            if line.startswith(who + ": "):
                msgs.append({"role": role, "content": line[len(who) + 2:]})
                break
        else:
            if msgs:
                msgs[-1]["content"] += "\n" + line
    return msgs


def parse_candidates(samples: str) -> tuple[list[str], list[str] | None]:
    """Invert the candidate block of 05_rapo.grm_chats: replies (and reactions, if shown) in their order."""
    parts = re.split(r"(?:^|\n\n)\[(\d+)\] Supporter: ", samples)[1:]
    replies, reactions = [], []
    for k in range(0, len(parts), 2):
        body = parts[k + 1]
        y, sep, u = body.partition(f"\n[{parts[k]}] Seeker's reaction: ")
        replies.append(y)
        reactions.append(u if sep else None)
    return replies, (reactions if all(u is not None for u in reactions) else None)


def answer(chat: list[dict], n: int, seed: int | None, agent: str = "rules") -> list[str]:
    """n answers of the scripted critic, GRM, rubric-point judge or seeker to one chat, whichever role's prompt it
    is. Deterministic: the same prompt gives the same answer (the critic's sample mode draws from an RNG seeded by
    the prompt). backends.ScriptedBackend (spec `scripted`) puts this behind the Backend interface; agent: who
    answers a Sotopia agent prompt (spec `scripted:NAME`, envs/sotopia_scripted.AGENTS; a demonstrator draws per sample)."""
    text = chat[-1]["content"] if chat else ""
    sim, rapo = stage("02_simulate"), stage("05_rapo")  # the templates of the critic, GRM and rubric judge
    if (f := unformat(sim.CRITIC_PROMPT, text)) is not None:
        p = option_probs(mood(parse_dialogue(f["dialogue"])))
        rng = random.Random(zlib.crc32(f"{seed}|{text}".encode()))
        return [rng.choices([o for o, _ in sim.CRITIC_OPTIONS], weights=p)[0] for _ in range(n)]
    if (f := unformat(rapo.GRM_PROMPT, text)) is not None:
        replies, _ = parse_candidates(f["samples"])
        return [json.dumps(grm_answer(parse_dialogue(f["context"]), replies))] * n
    if (f := unformat(rapo.RUBRIC_POINT_PROMPT, text)) is not None:
        ctx = parse_dialogue(f["context"])
        s = (reply_score(f["reply"], ctx) - D_MIN) / (D_MAX - D_MIN)
        return [json.dumps({"analysis": critique(reply_features(f["reply"], ctx)), "score": round(s, 6)})] * n
    if chat and chat[0]["role"] == "system" and (f := unformat(common.SEEKER_SYSTEM, chat[0]["content"])):
        # common.seeker_chats swaps the roles: the seeker speaks as 'assistant', the supporter as 'user'
        dialogue = [{"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in chat[1:]]
        return [seeker_message(f["persona"], dialogue)] * n
    from envs import sotopia_scripted  # the Sotopia roles: partner, evaluator, GRM (envs/sotopia_scripted.py)

    if (ans := sotopia_scripted.answer(chat, agent, seed)) is not None:  # agent: who sits in a Sotopia agent's seat
        if agent == "rules":  # the rules are deterministic; a demonstrator may draw (the coin), once per sample
            return [ans] * n
        return [ans] + [sotopia_scripted.answer(chat, agent, seed, i) for i in range(1, n)]
    raise common.InputError("scripted: this role is not scripted (only --seeker, --critic and --grm, incl. 05's "
                            "--reward rubric-point, and Sotopia's --partner, --evaluator and --grm can be "
                            "'scripted'); got a prompt it does not know")


def critic_option_loglik(chat: list[dict], options: list[str]) -> list[float]:
    """The scripted critic's log-likelihood of each of its options after a critic prompt (log of option_probs)."""
    sim = stage("02_simulate")
    values = dict(sim.CRITIC_OPTIONS)
    f = unformat(sim.CRITIC_PROMPT, chat[-1]["content"]) if chat else None
    if f is None or any(o not in values for o in options):
        raise common.InputError("scripted: log-likelihoods exist only for the critic's four options")
    p = dict(zip([o for o, _ in sim.CRITIC_OPTIONS], option_probs(mood(parse_dialogue(f["dialogue"])))))
    return [float("-inf") if p[o] == 0 else math.log(p[o]) for o in options]
