"""Where the update's time goes on a GPU: the reference forward and one GRPO step of 04_grpo.py on fixed random
rollouts (no generation), shared-prefix path against the plain path, at Qwen2.5-1.5B shapes with LoRA r=16 in
bf16. Prints seconds per call (median of --reps after a warm-up) and, for the reference forward and the
GRPO step of each path, the top operators by GPU and by host time (torch.profiler).
  python bench/profile_gpu_update.py [--micro-batch 8] [--prompt-len 512] [--new-tokens 256]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import training  # noqa: E402

grpo = common.load_stage("04_grpo")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="B")
    p.add_argument("--group-size", type=int, default=4, help="G")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="completion tokens")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions")
    p.add_argument("--no-profile", action="store_true", help="timings only")
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import ARCHS

    device = torch.device("cuda")
    spec = dict(ARCHS["qwen2.5-1.5b"])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=training.LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    B, G, P, L = args.prompts, args.group_size, args.prompt_len, args.new_tokens
    prompts = torch.randint(100, cfg.vocab_size - 1, (B, P)).tolist()
    reps = [p for p in prompts for _ in range(G)]
    comps = torch.randint(100, cfg.vocab_size - 1, (B * G, L)).tolist()
    ro = grpo.Rollouts(reps, comps, torch.randn(B * G))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    print("| path | ref forward s | GRPO step s | peak GiB |\n|---|---|---|---|")
    for shared in (True, False):
        lcfg = grpo.LossConfig(pad_id=0, temperature=1.0, beta=5e-4, micro_batch=args.micro_batch, l_gen=L, shared_prefix=shared)

        def ref():
            with model.disable_adapter():
                ro.logp_ref = grpo.sequence_logps(model, ro, lcfg)

        def step():
            grpo.grpo_step(model, model, opt, None, ro, lcfg)

        torch.cuda.reset_peak_memory_stats()
        ref(), step()  # warm-up
        tr = statistics.median(timed(ref) for _ in range(args.reps))
        ts = statistics.median(timed(step) for _ in range(args.reps))
        print(f"| {'shared prefix' if shared else 'plain'} | {tr:.3f} | {ts:.3f} | "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |", flush=True)
        if not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            for name, fn in (("reference forward", ref), ("GRPO step", step)):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                print(f"#### {name}: top kernels by GPU time, then by host time")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
