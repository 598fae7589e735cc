"""Result files committed to experiments/results/ name paths relative to the repository, never the absolute
paths of the machine they ran on: `repo_relative` rewrites every absolute path in a result (nested dicts, lists,
space-separated commands) with os.path.relpath from the repository root, and the interpreter as `python`."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _relative_token(tok: str) -> str:
    if tok == sys.executable:
        return "python"
    # an absolute path of at least two components whose folder exists here (a "/s" in model text is left alone)
    if os.path.isabs(tok) and len(Path(tok).parts) >= 3 and os.path.isdir(os.path.dirname(tok)):
        return os.path.relpath(tok, ROOT)
    return tok


def repo_relative(obj):
    """obj with every absolute path (a whole string, or a space-separated word of one) relative to the repository."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, str):
        return " ".join(_relative_token(t) for t in obj.split(" "))
    return obj
