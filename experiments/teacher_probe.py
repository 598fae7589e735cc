"""Probe what a Sotopia RAPO teacher does with its hindsight block: for each group 05 logged (samples.jsonl), decode
greedily from a model (default: the run's start policy) once on the student's prompt and once on the teacher's
prompt (the same context plus the block with the worst candidate, its reaction, its critique and the best
candidate, as 05 builds it: envs/sotopia.teacher_context), and say whether the teacher's answer is a verbatim copy
of the block's best candidate. docs/results.md, "2026-12-03 (second run)", uses it to trace RAPO's collapse.

  python experiments/teacher_probe.py --run runs/experiments/sotopia_scripted_warm/rapo \
      --model runs/experiments/sotopia_scripted_warm/warm/model
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import models  # noqa: E402
from envs import sotopia as S  # noqa: E402


def probe_chats(sample: dict) -> tuple[list[dict], list[dict], int, int]:
    """(student chat, teacher chat, worst index, best index) for one logged group of 05 --env sotopia."""
    scores, crits = sample["grm"]["scores"], sample["grm"]["critiques"]
    w = min(range(len(scores)), key=lambda i: scores[i])
    b = max(range(len(scores)), key=lambda i: scores[i])
    system = [{"role": "system", "content": S.AGENT_SYSTEM}]
    teacher = S.teacher_context(sample["context"], response=sample["replies"][w], reaction=sample["reactions"][w],
                                critique=crits[w], best=sample["replies"][b])
    return system + sample["context"], system + teacher, w, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a 05 --env sotopia output folder (its samples.jsonl is read)")
    p.add_argument("--model", required=True, help="the model to decode with (e.g. the run's --policy)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of each greedy answer")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a = p.parse_args(argv)
    path = Path(a.run) / "samples.jsonl"
    samples = common.read_jsonl(path, required=("step", "context", "replies", "reactions", "grm"))
    common.check(samples, f"{path}: no logged groups")
    for i, s in enumerate(samples, 1):
        common.check(isinstance(s["grm"], dict) and "scores" in s["grm"] and s["reactions"] is not None,
                     f"{path}: record {i}: field grm/reactions: not a group of 05 --env sotopia with reactions")
    model, tok = models.load_causal_lm(models.resolve_path(a.model), common.resolve_device(a.device), torch.float32)
    chats = [probe_chats(s) for s in samples]
    prompts = [models.chat_ids(tok, c) for st, te, _, _ in chats for c in (st, te)]
    with torch.no_grad():  # every prompt in one batched greedy call
        outs = models.generate_ids(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=0.0)
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    copies = 0
    for k, (s, (_, _, w, b)) in enumerate(zip(samples, chats)):
        student, teacher = texts[2 * k], texts[2 * k + 1]
        copy = teacher == s["replies"][b].strip()
        copies += copy
        print(f"step {s['step']}: best candidate: {s['replies'][b]!r}\n  student greedy: {student!r}\n"
              f"  teacher greedy: {teacher!r}  (verbatim copy of the best candidate: {'yes' if copy else 'no'})")
    print(f"{copies} of {len(samples)} teacher answers copy the block's best candidate word for word")


if __name__ == "__main__":
    common.run_main(main)
