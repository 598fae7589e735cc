"""The test inputs of 06_eval.py: dialogue cases and their reference turns, ESC-Eval role cards, EmoHarbor-style
profiles and Sotopia profile folders, read and validated before any model loads (a bad record: one line naming
file, record and field); and the policies evaluated on them (--policy [LABEL=]MODEL, --policy-system).

The kinds of test file (INPUT_KINDS, detected by content: detect_test_file; a protocol's `inputs` names the kinds it
runs on, its `default_on` those for which it is in the default --parts):
  dialogues  the test split of 01's turns.jsonl (--data), or --test-data in one of common.load_dialogues' three
             formats: one case per dialogue (its situation opens the conversation) and its supporter turns
             (reference, pairwise)
  cards      ESC-Eval role cards: a JSON list of {id, base, language?, source?, res?}
  profiles   EmoHarbor-style profiles: JSONL of {id, personality, situation, inner_state, background?}
  sotopia    a Sotopia profile folder (the four files of envs/sotopia.py): its episodes are the cases
Every case has the same fields (case_id, situation, emotion_type, problem_type, first_user; card or profile), so a
protocol that accepts several kinds reads them alike. Records are numbered from 1, lines too.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import common
import models
from common import check

PROFILE_FIELDS = ("background", "personality", "situation", "inner_state")  # the profile JSONL schema (docs/06_eval.md)


class InputKind(NamedTuple):
    holds: str  # what a test file of this kind holds (messages naming it)
    file: str  # how such a file looks (--test-data's help)
    counted: str  # its cases in the report's "Test set" line, formatted with scores.json's settings (cases, ref_turns)


INPUT_KINDS = {  # the kinds of test file (detect_test_file tells them apart)
    "dialogues": InputKind("dialogues", "dialogues (ESConv.json, PPDPP jsonl or chat jsonl, e.g. "
                           "PPDPP's 130-dialogue file)",
                           "{cases} dialogues (interactive, judge), {ref_turns} turns (reference, pairwise)"),
    "cards": InputKind("ESC-Eval role cards", "an ESC-Eval role-card file (JSON list of {id, base, ...})",
                       "{cases} ESC-Eval role cards"),
    "profiles": InputKind("EmoHarbor-style profiles", "EmoHarbor-style profiles (JSONL of {id, personality, "
                          "situation, inner_state, background?}; docs/06_eval.md)", "{cases} profiles"),
    "sotopia": InputKind("a Sotopia profile folder", "a Sotopia profile folder (the four files of envs/sotopia.py)",
                         "{cases} Sotopia episodes (scenario pairings)"),
}


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
        where = f"{path}: {unit} {i + 1}"  # records and lines are numbered from 1
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
        where = f"{path}: {unit} {i + 1}"  # records and lines are numbered from 1
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
    if Path(path).is_dir():  # a Sotopia profile folder: its episodes are the cases (protocols/sotopia.py)
        from protocols.sotopia import folder_cases

        return "sotopia", folder_cases(path)
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
        other = sorted({c["language"] for c in cases if c.get("language", "").lower() not in ("", "english", "en")})
        if other:
            print(f"warning: {args.test_data}: cards in {', '.join(other)}; the seeker and judge prompts are English",
                  file=sys.stderr)
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


# ----------------------------------------------------------------------------------------------------
# Policies: --policy [LABEL=]MODEL -> (label, spec), checked before any model loads

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
    """[(label, spec)] with unique labels; LABEL=MODEL names a row, otherwise the label comes from the spec."""
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
    check(len(set(labels)) == len(labels), f"--policy: duplicate label in {labels}; name rows with LABEL=MODEL")
    for lab, s in out:
        check(lab is not None or specs.count(s) == 1,
              f"--policy {s} is given twice: give each copy its own LABEL=MODEL if that is intended")
    return list(zip(labels, specs))


def check_policies(args) -> list[tuple[str, str]]:
    """parse_policies(--policy), each spec's local path and openai: server checked (before any model loads)."""
    policies = parse_policies(args.policy)
    for _, s in policies:
        common.check_model_path(s, "--policy")
        check(common.parse_spec(s).backend != "openai" or args.policy_base_url or os.environ.get("OPENAI_API_KEY"),
              f"--policy {s}: an openai: model needs --policy-base-url or $OPENAI_API_KEY")
    return policies


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


def policy_digests(policies: list[tuple[str, str]]) -> dict[str, dict]:
    """{label: {spec, sha256}}: the sha256 of a local adapter folder (small), None for other specs (a full model
    folder is not hashed: gigabytes)."""
    out = {}
    for label, spec in policies:
        ms = common.parse_spec(spec)
        path = os.path.expanduser(ms.name)
        adapter = ms.backend != "openai" and ms.name != "embedded" and models.is_adapter_folder(path)
        out[label] = {"spec": spec, "sha256": common.input_digest(path) if adapter else None}
    return out
