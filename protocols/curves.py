"""Training curves for 06's report (RAPO Fig. 4: reward, entropy and completion length per step), read from the
metrics.jsonl of 04_grpo.py / 05_rapo.py runs (--runs) into training_curves.png. Not a protocol: the report's
picture of how the evaluated adapters were trained. matplotlib is an optional extra.
"""
from __future__ import annotations

import math
from pathlib import Path

import common
from common import check
from protocols.base import pyplot

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


def plot_training_curves(runs: list[tuple[str, list[dict]]], panels: dict[str, list[str]], path: Path) -> dict:
    """One panel per metric (RAPO Fig. 4: reward, entropy, completion length), one line per run.
    Returns {panel: {run: key used or None}}."""
    plt = pyplot()
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
