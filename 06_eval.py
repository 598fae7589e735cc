"""Stage 06: evaluation of any number of policies on one protocol (docs/design.md section 7; RAPO section 4.1 and
Appendix D/E.3.2/E.4, RLFF-ESC's success rate after PPDPP).

Every policy given (`--policy` repeated: the base model, a trained adapter folder, an openai: endpoint) is
evaluated on the same test cases, with the same roles and the same seeds, so the table compares like with
like. Each part (`--parts`) is a protocol in its own file under protocols/, registered by one line in
protocols/__init__.py (its docstring gives its paper and equations; `--help` lists the parts and their defaults per
kind of test file); this script only runs them. Every statistic comes with a percentile bootstrap 95% confidence
interval over cases (the papers give none). The decisions and deviations, numbered so a fork can find them, are in
docs/06_eval.md ("Deviations and decisions"); each protocol's docstring writes its own out.

Run:
  python 06_eval.py --data runs/demo/turns.jsonl --out runs/eval --policy hf:embedded --policy grpo=runs/grpo/adapter \\
      --runs runs/grpo
  torchrun --nproc_per_node=8 06_eval.py --test-data esconv_ppdpp_valid.jsonl --out runs/eval-ppdpp \\
      --policy vllm:Qwen/Qwen2.5-7B-Instruct --policy rapo=runs/rapo/adapter \\
      --seeker openai:Qwen2.5-72B-Instruct --seeker-base-url http://host:8000/v1 \\
      --critic openai:Qwen2.5-72B-Instruct --critic-base-url http://host:8000/v1 \\
      --judge openai:gpt-4o --bertscore-model roberta-large
  python 06_eval.py --test-data card_high_en.json --parts esc-eval --out runs/eval-esc --policy rapo=runs/rapo/adapter \
      --seeker hf:haidequanbu/ESC-Role --judge 'openai:{dim}' --judge-base-url http://host:8001/v1 --judge-mode generate
  python 06_eval.py --test-data profiles.jsonl --out runs/eval-emoharbor --policy rapo=runs/rapo/adapter \
      --seeker openai:gpt-4o --judge-mode generate        # emoharbor: gpt-4o plays the user and rates as the user
  python 06_eval.py --test-data sotopia-profiles/ --out runs/eval-sotopia --policy rapo=runs/rapo-sotopia/adapter \
      --evaluator openai:gpt-4o --sotopia-mode selfplay      # sotopia: RAPO Table 2 (partner mode: Table 9)
Re-running on the same --out resumes (finished ids are skipped; a new --policy only adds its records) if the
test file's content, the protocol settings (EVAL_KEYS) and each earlier policy label's spec (and adapter
content) are those of the earlier run, else it stops with one line; --overwrite starts afresh (nothing is deleted
before every input, flag and role has passed its checks; the old records go once the first models have loaded).
"""
import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

import backends
import common
import protocols
import role_cache
from common import InputError, check
from protocols import base, curves
from protocols.base import Run, chunk_seed, lib_version, md_table
from protocols.cases import INPUT_KINDS, check_policies, load_test_set, policy_digests, policy_system

simulate = base.simulate  # 02's lock-step simulation (common.load_stage("02_simulate")), PPDPP's critic, their flags
REGISTRY = protocols.REGISTRY  # --parts name -> protocol
PARTS = tuple(REGISTRY)
DEFAULT_PARTS = {kind: ",".join(n for n, p in REGISTRY.items() if kind in p.default_on)  # by the kind of test file
                 for kind in INPUT_KINDS}
OUTPUTS = tuple(dict.fromkeys(p.output for p in REGISTRY.values()))  # replies, dialogs, pairwise .jsonl
ROLES = tuple(dict.fromkeys(("seeker", "critic", "judge") + tuple(r for p in REGISTRY.values() for r in p.own_roles)))
# Settings that change the generated dialogues or verdicts: a resumed run must use the same ones (the runner's,
# then every protocol's own).
EVAL_KEYS = tuple(dict.fromkeys(
    ("data", "test_data", "seed", "batch_size", "temperature", "top_p", "max_new_tokens", "policy_system", "seeker",
     "seeker_temperature", "seeker_top_p", "seeker_max_new_tokens")
    + tuple(k for p in REGISTRY.values() for k in p.eval_keys)))


def auto_mode(spec: str, local: str, remote: str) -> str:
    """A role's scoring mode under --*-mode auto: `remote` for an openai: model (no prompt log-probs), else `local`."""
    return remote if common.parse_spec(spec).backend == "openai" else local


def parts_help() -> str:
    """--parts' help, from the registry: the parts, the default ones per kind of test file, those of one kind only."""
    default = "; ".join(f"{DEFAULT_PARTS[k]} for {v.holds}" for k, v in INPUT_KINDS.items() if DEFAULT_PARTS[k])
    only = "; ".join(f"{n} needs {INPUT_KINDS[p.inputs[0]].holds}" for n, p in REGISTRY.items() if len(p.inputs) == 1)
    return f"comma-separated parts to run, of {','.join(PARTS)} (default: {default}; {only})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, data="runs/demo/turns.jsonl", out="runs/eval")
    g = p.add_argument_group("test cases")
    g.add_argument("--test-data", default=None,
                   help="take the test cases from this file instead of the test split of --data, detected by content: "
                        + ", ".join(k.file for k in INPUT_KINDS.values()))
    g.add_argument("--max-ref-turns", type=int, default=None,
                   help="score at most N test turns in the reference and pairwise parts (default: every turn of "
                        "the chosen test dialogues; --max-examples N takes the first N dialogues)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="cases per chunk: one batched call per role per round within a chunk; also the unit of "
                        "resume, sharding and seeding (part of the protocol: changing it changes the samples)")
    g.add_argument("--parts", default=None, help=parts_help())
    g = p.add_argument_group("policies (all evaluated on the same cases, roles and seeds)")
    g.add_argument("--policy", action="append", default=None,
                   help="a policy to evaluate, repeatable: [LABEL=]MODEL with MODEL hf:PATH | vllm:PATH | openai:MODEL "
                        "| a bare path; a folder with adapter_config.json is a trained PEFT adapter (default: "
                        f"{common.DEFAULT_MODEL}); LABEL names its row (default: derived from the spec)")
    g.add_argument("--policy-base-url", default=None,
                   help="base URL of the OpenAI-compatible server for every openai: --policy (key from $OPENAI_API_KEY)")
    g.add_argument("--policy-system", default="esc",
                   help="policy system prompt: 'esc' (common.ESC_SYSTEM), 'none', or a path to a text file (use the "
                        "prompt the policy was trained with)")
    g.add_argument("--temperature", type=float, default=0.3, help="policy sampling temperature (RAPO E.3.2: 0.3)")
    g.add_argument("--top-p", type=float, default=0.9, help="policy top-p (RAPO E.3.2: 0.9)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="length limit of a policy reply, reasoning included (RAPO: 2048 generation tokens)")
    g = p.add_argument_group("roles")
    common.add_role_arg(g, "seeker", "user simulator playing the help-seeker (PPDPP: ChatGPT; ESC-Eval: ESC-Role)")
    common.add_role_arg(g, "critic", "critic judging the seeker's state after each seeker message (PPDPP's four options)")
    common.add_role_arg(g, "judge", "judge rating role-plays (7 dimensions), comparing replies (pairwise) and scoring "
                        "the esc-eval part (ESC-Eval: ESC-Rank); for esc-eval a '{dim}' in the spec makes one model per "
                        f"dimension, {{dim}} replaced by {', '.join(protocols.esc_eval.ESC_DIM_KEYS)} (ESC-Rank's adapter names)")
    common.add_decoder_arg(g)
    simulate.add_simulation_args(g, p.add_argument_group("interactive success (PPDPP protocol)"),
                                 "T: supporter turns before a failure (PPDPP, RLFF-ESC: 8)")
    g = p.add_argument_group("judges (judge, pairwise, esc-eval, emoharbor)")
    g.add_argument("--judge-mode", default="auto", choices=["auto", "likelihood", "generate"],
                   help="likelihood: expected score from the digits' log-likelihoods; generate: JSON answers "
                        "(greedy); auto = likelihood for hf:/vllm: judges, generate for openai:")
    g.add_argument("--retries", type=int, default=2, help="re-asks of an invalid judge answer (generate mode)")
    g.add_argument("--judge-max-new-tokens", type=int, default=160, help="judge answer length (generate mode)")
    for proto in REGISTRY.values():
        proto.add_args(p)
    g = p.add_argument_group("statistics and plots")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0 = no CIs)")
    g.add_argument("--runs", nargs="+", default=[],
                   help="training run folders (or metrics.jsonl files) whose curves go into training_curves.png")
    g.add_argument("--curve-keys", default=None,
                   help="override the metrics.jsonl keys plotted, e.g. 'reward=reward,entropy=entropy,"
                        "length=completion_len_mean' (the keys 04_grpo.py and 05_rapo.py log; default: the first of "
                        "each panel's known names present)")
    common.add_request_timeout_arg(p)
    role_cache.add_role_cache_args(p)
    args = p.parse_args(argv)
    common.check_common_args(args)
    common.check_decoder(args)
    role_cache.check_role_cache_args(args)
    if args.parts is not None:
        parts = [s.strip() for s in args.parts.split(",") if s.strip()]
        bad = [s for s in parts if s not in PARTS]
        check(parts and not bad, f"--parts: unknown part {bad[0] if bad else '(none)'}; choose from {','.join(PARTS)}")
        args.parts = ",".join(s for s in PARTS if s in parts)
    check(args.batch_size >= 1, "--batch-size must be >= 1")
    check(args.max_examples is None or args.max_examples >= 1, "--max-examples must be >= 1")
    check(args.max_ref_turns is None or args.max_ref_turns >= 1, "--max-ref-turns must be >= 1")
    check(args.max_new_tokens >= 1 and args.seeker_max_new_tokens >= 1 and args.judge_max_new_tokens >= 1,
          "--max-new-tokens values must be >= 1")
    check(args.retries >= 0, "--retries must be >= 0")
    check(args.bootstrap == 0 or args.bootstrap >= 100, "--bootstrap must be 0 (no CIs) or >= 100")
    for name in ("temperature", "seeker_temperature", "critic_temperature"):
        check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    for name in ("top_p", "seeker_top_p"):
        check(0 < getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in (0, 1]")
    args.critic_mode_used = args.critic_mode if args.critic_mode != "auto" else auto_mode(args.critic, "likelihood", "sample")
    args.judge_mode_used = args.judge_mode if args.judge_mode != "auto" else auto_mode(args.judge, "likelihood", "generate")
    for proto in REGISTRY.values():
        proto.check_args(args)
    return args


# ----------------------------------------------------------------------------------------------------
# Validation before any work, and the resumable outputs


def prepare(args, command: str) -> Run:
    """Every check before any work (no model loads, no output is touched before they pass): the test set, the parts
    and the inputs each accepts, the policies, each chosen protocol's own inputs, its roles, the plot inputs."""
    cases, turns, source = load_test_set(args)
    args.parts = args.parts or DEFAULT_PARTS[source]
    check(args.parts, f"{args.test_data or args.data}: no part runs on {INPUT_KINDS[source].holds} by default: choose --parts")
    for name in args.parts.split(","):
        check(source in REGISTRY[name].inputs, f"--parts {name}: needs "
              f"{' or '.join(INPUT_KINDS[k].holds for k in REGISTRY[name].inputs)}, but {args.test_data or args.data} "
              f"holds {INPUT_KINDS[source].holds} (use {', '.join(n for n, p in REGISTRY.items() if source in p.inputs)})")
    policies = check_policies(args)
    run = Run(args, cases, turns, source, policies, args.parts.split(","))
    run.servers = [("policy", "--policy", s) for _, s in policies if common.parse_spec(s).backend == "openai"]
    run.command, run.system = command, policy_system(args.policy_system)
    for proto in (REGISTRY[n] for n in run.parts):
        proto.prepare(run)
    check_roles(run)
    run.curves = [curves.load_run_metrics(r) for r in args.runs], curves.parse_curve_keys(args.curve_keys)
    run.inputs = common.input_digests(args, ("test_data",) if args.test_data else ("data",))
    run.inputs["policy_system"] = common.input_digest(args.policy_system) if Path(args.policy_system).is_file() else None
    for key in (k for p in REGISTRY.values() for k in p.files):  # the protocols' own input files (prompts, ...)
        run.inputs[key] = common.input_digest(getattr(args, key)) if getattr(args, key) else None
    run.digests = policy_digests(policies)
    return run


def check_roles(run: Run):
    """Each role a chosen protocol needs: a '{dim}' spec only where a protocol rates per dimension, the model path or
    server of every spec, `scripted` only where the rule-based roles know the prompts (envs/esc.py: the seeker of
    02's conversations and the critic), and prompt log-likelihoods only from hf:/vllm: models."""
    args, users = run.args, {}
    for proto in (REGISTRY[n] for n in run.parts):
        for role, scriptable in proto.roles(args).items():
            users.setdefault(role, []).append((proto, scriptable))
    undeclared = [f"{p.name}: {r}" for r in users if r not in ROLES for p, _ in users[r]]
    assert not undeclared, f"a protocol's own role is not in its own_roles: {undeclared}"
    for role in sorted(users, key=ROLES.index):
        flag, spec = "--" + role.replace("_", "-"), getattr(args, role)
        per_dim = [p for p, _ in users[role] if getattr(p, "judge_role", None) == role]
        others = [p.name for p, _ in users[role] if p not in per_dim]
        check("{dim}" not in spec or not others, f"{flag} with '{{dim}}' (one model per dimension) serves the "
              f"{', '.join(p.name for p in per_dim) or 'esc-eval'} part only; run {', '.join(others)} separately")
        dims = per_dim[0].dims if per_dim and "{dim}" in spec else [""]
        for s in sorted({spec.replace("{dim}", d) for d in dims}):
            common.check_model_path(s, flag)
            ms = common.parse_spec(s)
            if ms.backend == "openai":
                run.servers.append((role, flag, s))
            check(ms.backend != "openai" or getattr(args, f"{role}_base_url") or os.environ.get("OPENAI_API_KEY"),
                  f"{flag} {ms}: an openai: model needs {flag}-base-url or $OPENAI_API_KEY")
            fixed = [p.name for p, ok in users[role] if not ok]
            check(ms.backend != "scripted" or not fixed, f"{flag} scripted: the {role.replace('_', ' ')} of "
                  f"{', '.join(fixed)} cannot be scripted (envs/esc.py answers only the seeker of 02's conversations "
                  "and the critic); give a model")
            check(not (getattr(args, f"{role}_mode_used", "") == "likelihood" and ms.backend == "openai"),
                  f"{flag} is an openai: model: likelihood scoring needs an hf: or vllm: model "
                  "(openai: servers give no prompt log-probs); use --judge-mode generate")


def check_resume_settings(args, out_dir: Path, n_done: int, inputs: dict, policies: dict):
    """Resuming with another test file, other protocol settings, or another model under an earlier policy label
    would mix two evaluations in one folder: refuse (a new label only adds its records)."""
    simulate.check_resume_settings(args, out_dir, n_done, inputs, EVAL_KEYS, "06_eval", "records", note="")
    if not n_done:
        return
    prev = json.loads((out_dir / "args.json").read_text(encoding="utf-8")).get("policies", {})
    for label, now in policies.items():
        if label in prev and prev[label] != now:
            what = "spec" if prev[label]["spec"] != now["spec"] else "adapter content (sha256)"
            raise InputError(f"{out_dir}: the records of policy '{label}' were made with another {what} "
                             f"({prev[label]['spec']}, now {now['spec']}): give it another LABEL=, use another --out, "
                             "or --overwrite")


def open_outputs(run: Run):
    """The outputs, and args.json, once the first models have loaded: only then does --overwrite delete records.
    The old summaries (report.md, scores.json, plots) go first, so a run that stops later never leaves them beside
    a new args.json."""
    if run.outs:
        return
    args, dist, out_dir = run.args, run.dist, Path(run.args.out)
    # a wrong key or model name of any openai: role or policy stops the run here, before anything is deleted
    backends.preflight({f"{flag} {spec}": run.make(role, spec) for role, flag, spec in run.servers})
    common.barrier(dist)  # every rank has read `done` before rank 0 may delete outputs (--overwrite)
    run.outs.update({n: common.ResumableOutput(out_dir, n, dist.rank, dist.world, overwrite=args.overwrite) for n in OUTPUTS})
    if dist.main:
        for old in [out_dir / "report.md", out_dir / "scores.json", *out_dir.glob("*.png")]:
            old.unlink(missing_ok=True)
        prev = out_dir / "args.json"
        earlier = {} if args.overwrite or not prev.is_file() else json.loads(prev.read_text(encoding="utf-8"))
        common.save_args(args, out_dir, {"stage": "06_eval", "inputs": run.inputs,  # earlier labels' records stay
                                         "policies": {**earlier.get("policies", {}), **run.digests}})
    common.barrier(dist)


# ----------------------------------------------------------------------------------------------------
# The loop: every policy through every per-policy protocol, then the protocols over all policies


def evaluate_policy(run: Run, jobs: list, label: str, spec: str, shared: dict):
    """The chunks of each protocol in `jobs` that miss a record of this policy (the same decision on every rank),
    with the roles and judges they need (loaded once, kept in `shared` for the next policy), then the policy freed."""
    args = run.args
    chunks = {p: common.chunks(p.items(run), args.batch_size) for p in jobs}
    todo = {p: [k for k, ch in enumerate(chunks[p]) if any(i not in run.done for i in p.ids(label, ch))] for p in jobs}
    if not any(todo.values()):
        return
    for p in (p for p in jobs if todo[p]):
        for role in {"seeker", "critic"} & set(p.roles(args)):
            shared[role] = shared.get(role) or run.make(role)
        if p.name not in run.backends:
            run.backends[p.name] = p.load(run)
    policy = run.make("policy", spec)  # (through --role-cache when given)
    open_outputs(run)  # (the same point on every rank: `todo` is decided alike)
    roles = simulate.Roles(policy=policy, seeker=shared.get("seeker"), critic=shared.get("critic"),
                           policy_system=run.system, critic_mode=args.critic_mode_used, critic_n=args.critic_samples,
                           policy_kw=dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p),
                           seeker_kw=dict(max_new_tokens=args.seeker_max_new_tokens, temperature=args.seeker_temperature,
                                          top_p=args.seeker_top_p), critic_temperature=args.critic_temperature)
    for p, ks in todo.items():
        my = [k for k in ks if k in set(run.mine(chunks[p]))]
        bar = common.progress(total=len(my), desc=f"{label} {p.kind}", unit="chunk")
        for k in my:
            recs = p.run_chunk(run, roles, label, chunks[p][k], chunk_seed(args.seed, p.seed_id, k))
            run.outs[p.output].append([r for r in recs if r["id"] not in run.done])  # a chunk cut short: its missing ids
            bar.update(1)
        bar.close()
    keep = list(shared.values()) + [b for js in run.backends.values() for b in js.values()]
    if not any(policy is b for b in keep):  # free the policy's model unless a role uses the same one
        backends.release_backend(policy)


# ----------------------------------------------------------------------------------------------------
# Scores and the report (rank 0), over the whole output of this and earlier resumed runs


def by_section(protos) -> list:
    return sorted(protos, key=lambda p: p.section)


def summarise(run: Run, chosen: list) -> dict:
    args, out_dir = run.args, Path(run.args.out)
    recs = {}
    for name in OUTPUTS:  # every record of the file, in the order of every protocol's ids
        order = [i for p in REGISTRY.values() if p.output == name for i in p.all_ids(run)]
        recs.update({r["id"]: r for r in run.outs[name].merge(order)})
    pol_scores = []
    for label, spec in run.policies:
        ps = {"label": label, "spec": spec}
        ps.update({p.name: copy.deepcopy(p.empty) for p in by_section(REGISTRY.values())
                   if p.per_policy and p.empty is not None})
        for p in (p for p in chosen if p.per_policy):
            ps[p.name] = p.summarise(run, label, [recs[i] for i in p.ids(label, p.items(run)) if i in recs])
        pol_scores.append(ps)
    cross = {p.name: p.summarise(run, None, [recs[i] for i in p.all_ids(run) if i in recs]) if p in chosen else p.empty
             for p in REGISTRY.values() if not p.per_policy}
    plots = {}
    for p in by_section(chosen):
        plots.update(p.plots(run, pol_scores, out_dir))
    runs, panels = run.curves
    if runs:
        plots["training_curves"] = curves.plot_training_curves(runs, panels, out_dir / "training_curves.png") or None
    if any(v is False for v in plots.values()) or (runs and not plots.get("training_curves")):
        plots["note"] = "matplotlib is not installed (pip install matplotlib): no PNG plots"
        print(f"warning: {plots['note']}", file=sys.stderr)
    B = args.bootstrap
    st = {"command": run.command, "parts": run.parts,
          "test_source": f"{args.test_data} (every record)" if args.test_data else f"{args.data} (test split)",
          "cases": len(run.cases), "ref_turns": len(run.turns), "seed": args.seed, "batch_size": args.batch_size,
          "ci": f"percentile bootstrap 95% CI over cases, {B} resamples, seed {args.seed}" if B else "no CIs (--bootstrap 0)",
          "policy_decoding": f"temperature {args.temperature}, top-p {args.top_p}, max {args.max_new_tokens} new tokens, "
                             f"system prompt {args.policy_system}; <think>/<strategy> parts stripped before scoring",
          "seeker": args.seeker, "seeker_decoding": f"temperature {args.seeker_temperature}, top-p {args.seeker_top_p}, "
          f"max {args.seeker_max_new_tokens} new tokens; opens with the situation (interactive, judge)", "source": run.source}
    for p in REGISTRY.values():
        st.update(p.settings(run))
    st["roles_used"] = [row for p in REGISTRY.values() for row in p.role_rows(run)]  # [role, spec, settings, used]
    st["scripted_roles"] = [r for r in ROLES if common.parse_spec(getattr(args, r)).backend == "scripted"]
    st["plots"] = plots
    st["versions"] = {k: lib_version(k) for k in ("torch", "transformers", "sacrebleu", "rouge-score", "bert-score")}
    st["embedded_judges"] = any("embedded" in spec for _, spec, _, used in st["roles_used"] if used)
    return {"settings": st, "policies": pol_scores, **cross}


def write_report(scores: dict, chosen: list, path: Path):
    st, pols = scores["settings"], scores["policies"]
    what = INPUT_KINDS[st["source"]].counted.format(**st)
    L = ["# Evaluation report", "", f"Command: `{st['command']}`", "", f"Test set: {st['test_source']}: {what}. Every policy "
         f"saw the same cases, roles and seeds. Brackets: {st['ci']}.", ""]
    if st["embedded_judges"]:
        L += ["> **The critic or judge here is the embedded SmolLM2-135M, which does not discriminate (docs/design.md "
              "section 8): these numbers demonstrate the plumbing, not the policies.** "
              "Put capable models on --seeker/--critic/--judge for results.", ""]
    if st.get("scripted_roles"):
        L += [f"> **Scripted roles: {', '.join(st['scripted_roles'])}** (`scripted`: the rules of envs/esc.py and, on "
              "Sotopia, envs/sotopia_scripted.py; the critic's score is the seeker's rule-based mood). Their numbers are results in a scripted environment, not on people.", ""]
    L += ["## Policies and roles", "",
          md_table(["role", "model", "settings"],
                   [[f"policy `{p['label']}`", f"`{p['spec']}`", st["policy_decoding"]] for p in pols]
                   + [["seeker", f"`{st['seeker']}`", st["seeker_decoding"]]]
                   + [[r, f"`{spec}`", how] for r, spec, how, used in st["roles_used"] if used]), ""]
    for p in by_section(chosen):
        L += p.report(scores)
    if st["plots"].get("training_curves"):
        L += ["## Training curves", "", "![training curves](training_curves.png)", "",
              "Keys plotted: " + "; ".join(f"{panel}: " + ", ".join(f"{r} -> {k or 'absent'}" for r, k in used.items())
                                           for panel, used in st["plots"]["training_curves"].items()), ""]
    L += ["## Settings", "", "```json", json.dumps({k: v for k, v in st.items() if k != "command"}, indent=1), "```",
          "", "Files: `scores.json` (every number above), `dialogs.jsonl` (every simulated dialogue), `replies.jsonl` "
          "(reference replies), `pairwise.jsonl` (verdicts), `args.json`.", ""]
    path.write_text("\n".join(L), encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    run = prepare(args, "python 06_eval.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv)))
    run.dist = dist = common.init_dist(args.device)
    out_dir = Path(args.out)
    common.lock_out(out_dir, dist)  # one run at a time on --out
    run.done = set() if args.overwrite else set().union(*(common.ResumableOutput(out_dir, n).done for n in OUTPUTS))
    if not args.overwrite:  # on every rank alike: all stop together
        check_resume_settings(args, out_dir, len(run.done), run.inputs, run.digests)
    cache = role_cache.open_cache(args)  # --role-cache: every role's and policy's answers recorded / replayed
    run.make = lambda role, spec=None: backends.make_backend(spec or getattr(args, role), getattr(args, f"{role}_base_url"),
                                                             str(dist.device), args.dtype, decoder=args.decoder, cache=cache,
                                                             timeout=args.request_timeout)
    common.print0(f"{len(run.policies)} policies x {len(run.cases)} test cases ({run.source}; {len(run.turns)} turns); "
                  f"parts: {args.parts}; {len(run.done)} records already written; {dist.world} rank(s)")
    chosen = [REGISTRY[n] for n in run.parts]
    needed = set(run.parts) | {n for p in chosen for n in p.uses(run)}
    jobs = [p for n, p in REGISTRY.items() if p.per_policy and n in needed]
    shared = {}  # role -> backend, kept across policies
    for label, spec in run.policies:  # one policy's model in memory at a time
        evaluate_policy(run, jobs, label, spec, shared)
    open_outputs(run)
    common.barrier(dist)
    for p in chosen:
        if not p.per_policy:
            p.run_all(run)
    common.barrier(dist)
    role_cache.report(cache, out_dir, dist)  # this run's hits / misses, over all ranks (a log: OUT/role_cache.json)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    if not dist.main:
        return
    scores = summarise(run, chosen)
    common.write_json(out_dir / "scores.json", scores)
    write_report(scores, chosen, out_dir / "report.md")
    for ps in scores["policies"]:
        print(f"{ps['label']}:" + "".join(p.brief(ps[p.name]) for p in by_section(chosen) if p.per_policy))
    for p in (p for p in chosen if not p.per_policy and p.brief(scores[p.name])):
        print(p.brief(scores[p.name]))
    print(f"report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
