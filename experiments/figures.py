"""What the experiments write beside their results JSON: a CSV of the training runs' metrics per step, and a figure
of the training reward curves next to bar charts of held-out numbers with their 95% CIs."""
import csv
import sys
from pathlib import Path

import numpy as np


def write_curves_csv(path: Path, curves: dict[str, list[dict]], keys: list[str]):
    """One row per (run, step) of the runs' metrics.jsonl records: run, step and `keys` (empty where absent)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step"] + keys)
        for name, ms in curves.items():
            for m in ms:
                w.writerow([name, m["step"]] + [m.get(k) for k in keys])


def plot_curves_and_bars(path: Path, curves: dict[str, list[dict]], reward_label: str, table: list[dict],
                         bars: list[tuple[str, str]], bar_title: str, title: str):
    """Left: each run's train reward per step (raw, faint; 5-step running mean, solid). Then one panel per (key,
    label) of `bars`: table rows' {value, ci} under that key as bars with their CI, one bar per row["policy"]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 1 + len(bars), figsize=(4 * (1 + len(bars)), 3.5))
    for k, (name, ms) in enumerate(curves.items()):
        steps, r = [m["step"] for m in ms], [m["reward"] for m in ms]
        sm = [float(np.mean(r[max(0, i - 4):i + 1])) for i in range(len(r))]
        color = next((f"C{i}" for i, row in enumerate(table) if row["policy"] == name), f"C{k}")
        ax[0].plot(steps, r, color=color, alpha=0.3)
        ax[0].plot(steps, sm, color=color, label=f"{name} (5-step mean)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel(reward_label)
    ax[0].legend(fontsize=8)
    for j, (key, label) in enumerate(bars, 1):
        xs = np.arange(len(table))
        v = [r[key]["value"] for r in table]
        lo = [r[key]["value"] - r[key]["ci"][0] for r in table]
        hi = [r[key]["ci"][1] - r[key]["value"] for r in table]
        ax[j].bar(xs, v, yerr=[lo, hi], capsize=4, color=[f"C{i}" for i in range(len(table))])
        ax[j].set_xticks(xs, [r["policy"] for r in table])
        ax[j].set_ylabel(label + ", 95% CI")
        ax[j].set_title(bar_title, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
