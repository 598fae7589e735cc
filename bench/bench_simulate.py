"""Benchmark of 02_simulate.py's lock-step simulation on the demo data: conversations per minute and model calls
per round, per role, for a few chunk sizes (contexts per lock-step batch). Not a test: it prints a table so later
changes (a faster backend, prefix caching, another batching) can be compared on the same machine.

  python bench/bench_simulate.py                                   # embedded model, chunk sizes 1 and 4
  python bench/bench_simulate.py --batch-sizes 1,2,4,8 --contexts 8 --max-turns 4
  python bench/bench_simulate.py --policy vllm:Qwen/Qwen2.5-7B-Instruct --contexts 64 --batch-sizes 8,64

Each row simulates the same contexts with the same settings; only the chunking differs. "calls/round" counts the
batched calls each role made divided by the lock-step rounds run (1.0 = one call per role per round; the policy's
candidate call counts in round 1). Time is wall clock on this machine, models loaded once beforehand.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
import common  # noqa: E402
from backends import Backend  # noqa: E402


class Timed(Backend):
    """A role's view of a (possibly shared) backend: counts its batched calls and items and times them."""

    def __init__(self, inner: Backend, role: str):
        self.inner, self.spec, self.role = inner, inner.spec, role
        self.calls, self.items, self.seconds = 0, 0, 0.0

    def _run(self, fn, chats, *a, **k):
        t = time.perf_counter()
        out = fn(chats, *a, **k)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.items += len(chats)
        return out

    def generate(self, chats, **kw):
        return self._run(self.inner.generate, chats, **kw)

    def option_loglik(self, chats, options):
        return self._run(self.inner.option_loglik, chats, options)

    def loglik(self, chats, continuations):
        return self._run(self.inner.loglik, chats, continuations)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo_esconv.json", help="dialogues (any format 01_select.py reads)")
    for role in ("policy", "seeker", "critic"):
        p.add_argument(f"--{role}", default=common.DEFAULT_MODEL, help=f"{role} model spec")
        p.add_argument(f"--{role}-base-url", default=None, help=f"base URL for an openai: --{role}")
    p.add_argument("--contexts", type=int, default=4, help="train contexts simulated per row (one per dialogue)")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated contexts per lock-step chunk, one row each")
    p.add_argument("-m", "--num-candidates", type=int, default=2, help="candidates per context")
    p.add_argument("--max-turns", type=int, default=3, help="T")
    p.add_argument("--theta", type=float, default=0.0, help="success threshold")
    p.add_argument("--max-new-tokens", type=int, default=32, help="supporter reply length")
    p.add_argument("--seeker-max-new-tokens", type=int, default=24, help="seeker message length")
    p.add_argument("--context-window", type=int, default=4, help="last N context messages (0 = all)")
    p.add_argument("--critic-mode", default="likelihood", choices=["likelihood", "sample"], help="critic mode")
    p.add_argument("--device", default="auto", help="device for hf: models")
    p.add_argument("--dtype", default="auto", help="dtype for hf: models")
    p.add_argument("--seed", type=int, default=0, help="seed (chunk k uses 02's chunk_seed(seed, k))")
    args = p.parse_args()

    sim = common.load_stage("02_simulate")

    dialogues = common.load_dialogues(args.data)
    turns = common.build_turns(dialogues, {d["dialog_id"]: "train" for d in dialogues})
    turns = sim.select_contexts(turns, 1, args.contexts, args.context_window)
    made = {r: backends.make_backend(getattr(args, r), getattr(args, f"{r}_base_url"), args.device, args.dtype)
                for r in ("policy", "seeker", "critic")}
    m, T = args.num_candidates, args.max_turns
    print(f"{len(turns)} contexts x m={m}, T={T}, theta={args.theta}, reply {args.max_new_tokens} / seeker "
          f"{args.seeker_max_new_tokens} tokens, context window {args.context_window}, critic {args.critic_mode}; "
          f"policy {args.policy}, seeker {args.seeker}, critic {args.critic}; load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    rows = []
    for C in [int(x) for x in args.batch_sizes.split(",")]:
        t = {r: Timed(b, r) for r, b in made.items()}
        roles = sim.Roles(policy=t["policy"], seeker=t["seeker"], critic=t["critic"],
                          policy_kw=dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0),
                          seeker_kw=dict(max_new_tokens=args.seeker_max_new_tokens, temperature=0.7, top_p=0.9),
                          critic_mode=args.critic_mode)
        rounds, recs = 0, []
        t0 = time.perf_counter()
        for k, chunk in enumerate(common.chunks(turns, C)):
            out = sim.simulate_chunk(roles, chunk, m=m, max_turns=T, theta=args.theta, seed=sim.chunk_seed(args.seed, k),
                                     cand_kw=dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0),
                                     lambda_eff=0.5, delta=0.5)
            rounds += max(r["end_turn"] for r in out)
            recs += out
        wall = time.perf_counter() - t0
        rows.append((C, len(recs), rounds, wall, t, sum(r["end_turn"] for r in recs) / len(recs)))
    hdr = (f"{'ctx/chunk':>9} {'convs':>5} {'rounds':>6} {'mean turns':>10} {'wall s':>7} {'conv/min':>8} "
           f"{'calls/round p/s/c':>17} {'s per call p/s/c':>20} {'items/call p/s/c':>18}")
    print(hdr)
    print("-" * len(hdr))
    for C, n, rounds, wall, t, turns_mean in rows:
        cpr = "/".join(f"{t[r].calls / rounds:.2f}" for r in ("policy", "seeker", "critic"))
        spc = "/".join(f"{t[r].seconds / max(t[r].calls, 1):.1f}" for r in ("policy", "seeker", "critic"))
        ipc = "/".join(f"{t[r].items / max(t[r].calls, 1):.1f}" for r in ("policy", "seeker", "critic"))
        print(f"{C:>9} {n:>5} {rounds:>6} {turns_mean:>10.2f} {wall:>7.1f} {60 * n / wall:>8.2f} {cpr:>17} {spc:>20} {ipc:>18}")


if __name__ == "__main__":
    main()
