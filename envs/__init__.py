"""Scripted environments: rule-based roles whose right answer is known, behind the same backend interface as
the model roles (`--seeker scripted`, `--critic scripted`, ...), so a stage's logic can be checked and a policy
can learn on a CPU. Imported by the backend registry, never by common.py."""
