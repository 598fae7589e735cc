"""The protocol interface of 06_eval.py, and what every protocol shares: the run it works in, chunk seeds,
percentile-bootstrap statistics and the report's table helpers.

A protocol is one evaluation (reference metrics, PPDPP's interactive success, ...): a class with the attributes
and methods of Protocol below, in its own file under protocols/, registered by one line in protocols/__init__.py.
06_eval.py, the runner, never names a protocol: it validates each chosen protocol's inputs, flags and roles before
any work, splits its work into chunks of --batch-size cases (or turns) with one record id per case and policy,
runs the chunks that miss a record for every policy (resumable, sharded over ranks by whole chunks), then asks
each protocol for its summary per policy (means with bootstrap CIs), its plots and its report section.

Determinism (06 deviation 7): chunk k of a protocol is seeded from (--seed, the protocol's seed_id, k) only, never
from the rank or the policy, so every policy meets the same seeker draws and a resumed or 2-rank run equals an
uninterrupted 1-process one.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np

import common

simulate = common.load_stage("02_simulate")  # the lock-step conversations (and PPDPP's critic) are 02's


@dataclass
class Run:
    """What a protocol sees of the run: the arguments, the test set, the policies, the roles and outputs."""
    args: object
    cases: list[dict]  # one per test dialogue, role card or profile
    turns: list[dict]  # the reference turns (dialogues only)
    source: str  # the kind of test file: "dialogues", "cards", "profiles", "sotopia" (cases.INPUT_KINDS)
    policies: list[tuple[str, str]]  # (label, spec)
    parts: list[str]  # the protocols chosen (--parts)
    dist: common.Dist | None = None
    done: set = field(default_factory=set)  # record ids already written (resume)
    outs: dict = field(default_factory=dict)  # output file name -> common.ResumableOutput
    make: object = None  # make(role, spec=None) -> the backend of a role (--<role>, --<role>-base-url)
    backends: dict = field(default_factory=dict)  # protocol name -> its judges, loaded once
    read: dict = field(default_factory=dict)  # protocol name -> what its prepare() read (e.g. prompt files)
    system: str | None = None  # the policy's system prompt (--policy-system)
    # the runner's own: the command line, input digests, policy digests, (training runs, plot panels)
    command: str = ""
    inputs: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)
    curves: tuple = ([], {})
    servers: list = field(default_factory=list)  # (role, flag, spec) of every openai: model: asked once before outputs open

    def mine(self, chunks: list) -> list[int]:
        """This rank's chunks: whole chunks, round-robin."""
        return [k for k in range(len(chunks)) if k % self.dist.world == self.dist.rank]


class Protocol(abc.ABC):
    """One evaluation protocol. Subclasses set the attributes and override what they need (summarise always;
    run_chunk when per_policy, run_all when not)."""

    name = ""  # its --parts name and its key in scores.json
    kind = ""  # record ids are "{kind}/{policy label}/{case or turn id}"
    output = "dialogs.jsonl"  # the JSONL file its records go to
    inputs = ("dialogues",)  # the kinds of test file it runs on (protocols/cases.py INPUT_KINDS)
    default_on: tuple[str, ...] = ()  # the kinds of test file for which it is in the default --parts
    own_roles: tuple[str, ...] = ()  # the roles it adds beyond the runner's seeker, critic and judge (their
    # --ROLE / --ROLE-base-url flags come from its add_args, common.add_role_arg); 06 validates them like the others
    unit = "cases"  # what its chunks hold: "cases" or "turns" (reference turns; dialogues only)
    seed_id = 0  # chunk k is seeded from (--seed, seed_id, k)
    section = 0  # its place in the report (and in a policy's scores)
    empty = None  # its entry in every policy's scores when it is not run (None: no entry)
    eval_keys: tuple[str, ...] = ()  # its flags that shape the records: a resumed run must keep them
    files: tuple[str, ...] = ()  # its flags naming input files: their content is hashed, a resume must keep it
    per_policy = True  # False: it runs once over all the policies' records (run_all), after them

    def add_args(self, p):
        """Its own flags (an argparse group of its own)."""

    def check_args(self, args):
        """InputError for a bad value of its flags."""

    def prepare(self, run: Run):
        """Validation before any work, when chosen (its packages, its prompt files); may keep what it read."""

    def roles(self, args) -> dict[str, bool]:
        """The roles it needs, {role: may the role be `scripted`}: seeker, critic, judge, or its own_roles."""
        return {}

    def uses(self, run: Run) -> list[str]:
        """Other protocols whose records it needs (run for every policy even when not chosen)."""
        return []

    def load(self, run: Run) -> dict:
        """Its own backends (judges), loaded once before its first chunk: {name: backend}."""
        return {}

    def items(self, run: Run) -> list[dict]:
        return run.turns if self.unit == "turns" else run.cases

    def ids(self, label: str, items: list[dict]) -> list[str]:
        key = "id" if self.unit == "turns" else "case_id"
        return [f"{self.kind}/{label}/{x[key]}" for x in items]

    def run_chunk(self, run: Run, roles, label: str, items: list[dict], seed: int) -> list[dict]:
        """The records of one chunk for one policy (roles: 02's Roles with this policy). Only per-policy protocols
        run chunks; the runner never calls this on the others."""
        raise TypeError(f"protocol {self.name}: per_policy is set but it defines no run_chunk")

    def run_all(self, run: Run):
        """per_policy = False: its whole work over every policy's records."""

    @abc.abstractmethod
    def summarise(self, run: Run, label: str | None, records: list[dict]):
        """Its numbers for one policy's records (with bootstrap CIs); per_policy = False: over all its records."""

    def all_ids(self, run: Run) -> list[str]:
        """Every record id it can write, in file order."""
        return [i for label, _ in run.policies for i in self.ids(label, self.items(run))]

    def settings(self, run: Run) -> dict:
        """Its settings in scores.json (written whether or not it runs)."""
        return {}

    def role_rows(self, run: Run) -> list[list]:
        """Rows [role, spec, settings, used] of the report's roles table."""
        return []

    def plots(self, run: Run, policy_scores: list[dict], out_dir) -> dict:
        """Its plots: {name: True (written) or False (matplotlib missing)}."""
        return {}

    def report(self, scores: dict) -> list[str]:
        """Its section of report.md (markdown lines)."""
        return []

    def brief(self, summary) -> str:
        """Its numbers for the console: a fragment of a policy's line (per_policy), else whole lines."""
        return ""


def chunk_seed(seed: int, seed_id: int, k: int) -> int:
    """Seed of chunk k of a protocol: a function of (--seed, protocol, k) only, never of the rank or the policy."""
    return int(np.random.SeedSequence([seed, seed_id, k]).generate_state(1)[0])


def dialogue_record(kind: str, label: str, case: dict, opening: dict, sim: dict) -> dict:
    """The record of one lock-step conversation of 02's simulate_lockstep (interactive, judge role-plays)."""
    return {"id": f"{kind}/{label}/{case['case_id']}", "kind": kind, "policy": label, "case_id": case["case_id"],
            "situation": case["situation"], "emotion_type": case["emotion_type"], "problem_type": case["problem_type"],
            "messages": [opening] + sim["trajectory"]}


# ----------------------------------------------------------------------------------------------------
# Statistics: percentile bootstrap confidence intervals over cases (the papers give none)


def bootstrap_ci(values, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap CI of the mean of `values` over its first axis ([n] or [n, k] -> [lo, hi] each
    of shape [] or [k]); resamples n cases with replacement, seeded (same seed + same n = same resamples,
    so policies evaluated on the same cases are resampled alike). None when n_boot == 0 or n == 0."""
    v = np.asarray(values, dtype=np.float64)
    if n_boot == 0 or len(v) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))  # [B, n]
    means = v[idx].mean(axis=1)  # [B] or [B, k]
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a], axis=0)
    return lo, hi


def stat(values, n_boot: int, seed: int, scale: float = 1.0) -> dict:
    """{value, ci} of a mean, scaled (x100 for rates and scores shown in percent)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"value": None, "ci": None}
    ci = bootstrap_ci(v, n_boot, seed)
    return {"value": float(v.mean()) * scale, "ci": None if ci is None else [float(ci[0]) * scale, float(ci[1]) * scale]}


# ----------------------------------------------------------------------------------------------------
# Report helpers


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s or s.get("value") is None:
        return "n/a"
    v = f"{s['value']:.{digits}f}"
    return v + (f" [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]" if s.get("ci") else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def lib_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def pyplot():
    """matplotlib's pyplot (Agg), or None: plots are an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
