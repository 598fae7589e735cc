"""GPU benchmark of one GRPO step (04_grpo.py) and RAPO's extra teacher forward (05_rapo.py) at a realistic
shape: a model built from a published config with random weights (throughput does not depend on weight
values), LoRA r=16 on all projections, bf16, G=4 x 8 prompts, 512-token prompts, 256 new tokens (generation
forced to full length with min_new_tokens).

Prints a table: generated tokens/s, the decode step time against its memory-bandwidth floor (weight + KV
bytes per step over the measured device-to-device bandwidth), update tokens/s and model-FLOPs utilisation
(4 x params x tokens for a LoRA forward+backward, over the measured bf16 matmul peak), peak GPU memory, and
where the step's time goes (generation, log-prob forwards, update, the rest).

  python bench/bench_gpu.py                               # Qwen2.5-1.5B shapes on cuda
  python bench/bench_gpu.py --arch llama-3.2-1b
  python bench/bench_gpu.py --arch tiny --device cpu      # a smoke run of the script itself on a CPU
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402
import training  # noqa: E402

grpo = common.load_stage("04_grpo")
rapo = common.load_stage("05_rapo")

# Published configs (config.json of the Hugging Face repositories), the fields that set the shapes.
ARCHS = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1e6, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def measure_bandwidth(device, n_bytes=1 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _, t = timed(lambda: [y.copy_(x) for _ in range(10)], device)
    return 2 * n_bytes * 10 / t


def measure_matmul_peak(device, dtype, n=8192):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _, t = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * n ** 3 * 10 / t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen2.5-1.5b", choices=list(ARCHS), help="model shapes (random weights)")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run with --arch tiny)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    p.add_argument("--group-size", type=int, default=4, help="G")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens (forced: min_new_tokens)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all projections")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward in the update")
    p.add_argument("--sd-topk", type=int, default=256, help="K of RAPO's distillation")
    p.add_argument("--no-shared-prefix", action="store_true", help="04's plain path (each sequence runs its whole prompt)")
    p.add_argument("--no-rollout-merge", action="store_true", help="sample through the LoRA layers (04's --no-rollout-merge)")
    p.add_argument("--decoder", default="hf", choices=list(common.DECODERS),
                   help="the rollout's decoding loop (04's --decoder): hf generate(), our static-cache loop, or that "
                        "loop with each decode step replayed as a CUDA graph")
    p.add_argument("--save-model", default=None,
                   help="only save the random-weight model (+ the embedded tokenizer) to this folder, e.g. to run "
                        "04_grpo.py / 05_rapo.py on it, and exit")
    args = p.parse_args()
    shared = not args.no_shared_prefix
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = dict(ARCHS[args.arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    if args.save_model:
        model.save_pretrained(args.save_model)
        models.load_tokenizer(str(models.embedded_tokenizer_path())).save_pretrained(args.save_model)
        print(f"saved {args.arch} (random weights, {dtype}) to {args.save_model}")
        return
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=training.LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    tok = models.load_tokenizer(str(models.embedded_tokenizer_path()))  # only its special ids are used
    V = cfg.vocab_size
    B, G, P, L = args.prompts, args.group_size, args.prompt_len, args.new_tokens
    prompts = torch.randint(100, V - 1, (B, P)).tolist()
    bw = measure_bandwidth(device) if device.type == "cuda" else float("nan")
    peak = measure_matmul_peak(device, dtype) if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # ---- rollout: B*G sequences, forced to L new tokens; the decode step time is (t(L) - t(1)) / (L - 1)
    model.eval()
    reps = [p for p in prompts for _ in range(G)]

    def gen(n):
        return speed.rollout(model, tok, prompts, G, max_new_tokens=n, temperature=1.0, min_new_tokens=n,
                             batch_size=B * G, shared_prefix=shared, merge_lora=not args.no_rollout_merge,
                             decoder=args.decoder)

    gen(L)  # warm-up (kernels, allocator)
    _, t_first = timed(lambda: gen(1), device)
    comps, t_gen = timed(lambda: gen(L), device)
    n_gen = sum(len(c) for c in comps)
    step_time = max(t_gen - t_first, 1e-9) / (L - 1)  # cuda-graph: includes the capture (about 2 steps) of gen(L)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    kv_bytes = kv_per_token * B * G * (P + L / 2)  # KV read per decode step, at the average context length
    floor = (weight_bytes + kv_bytes) / bw

    # ---- update: reference and old log-prob forwards, then forward + backward + AdamW
    model.train()
    lcfg = grpo.LossConfig(pad_id=tok.pad_token_id, temperature=1.0, micro_batch=args.micro_batch,
                           autocast_dtype=None, l_gen=L, shared_prefix=shared)
    ro = grpo.Rollouts(prompts=reps, completions=comps, advantages=torch.randn(B * G))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with model.disable_adapter():  # warm-up of the update's shapes (kernel selection, allocator), then timed
        ro.logp_ref = grpo.sequence_logps(model, ro, lcfg)
    grpo.grpo_step(model, model, opt, None, ro, lcfg)
    with model.disable_adapter():
        ro.logp_ref, t_ref = timed(lambda: grpo.sequence_logps(model, ro, lcfg), device)
    _, t_upd = timed(lambda: grpo.grpo_step(model, model, opt, None, ro, lcfg), device)
    tokens = sum(len(r) + len(c) for r, c in zip(reps, comps))

    # ---- RAPO: the teacher's extra forward on the B distilled sequences (one per group) and the SD loss
    teacher = rapo.Teacher(model, "base", True)
    idx = [g * G for g in range(B)]
    t_prompts = [prompts[g] + prompts[g][:64] for g in range(B)]  # a teacher prompt ~64 tokens longer (hindsight block)
    _, t_teacher = timed(lambda: teacher.logits(t_prompts, [comps[i] for i in idx], tok.pad_token_id,
                                                torch.autocast(device.type, enabled=False)), device)
    t_tokens = sum(len(p) + len(comps[i]) for p, i in zip(t_prompts, idx))
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    t_step = t_gen + t_ref + t_upd
    rows = [
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        ("model", f"{args.arch} ({n_params / 1e9:.2f} B params, random weights), LoRA r={args.lora_r}, {dtype}"),
        ("shape", f"{B} prompts x G={G}, {P} prompt tokens, {L} new tokens"),
        ("path", ("shared prefix" if shared else "plain (--no-shared-prefix)") + f", decoder {args.decoder}"
         + f", micro-batch {args.micro_batch}"
         + (", sampling through the LoRA layers" if args.no_rollout_merge else ", LoRA merged for sampling")),
        ("prefill + first token (batch {})".format(B * G), f"{t_first * 1e3:.1f} ms"),
        ("measured bandwidth / bf16 matmul peak", f"{bw / 1e9:.0f} GB/s / {peak / 1e12:.0f} TFLOP/s"),
        ("generated tokens/s", f"{n_gen / t_gen:,.0f}"),
        (f"decode step (batch {B * G}) vs bandwidth floor", f"{step_time * 1e3:.2f} ms vs {floor * 1e3:.2f} ms "
                                                             f"({step_time / floor:.1f}x)"),
        ("update tokens/s (fwd+bwd+AdamW)", f"{tokens / t_upd:,.0f}"),
        ("update MFU (4 x params x tokens)", f"{4 * n_params * tokens / t_upd / peak:.1%}"),
        ("reference log-prob forward", f"{t_ref:.2f} s ({tokens / t_ref:,.0f} tokens/s)"),
        ("RAPO teacher forward (B sequences)", f"{t_teacher:.2f} s ({t_tokens / t_teacher:,.0f} tokens/s)"),
        ("step time: generation / ref forward / update", f"{t_gen:.2f} / {t_ref:.2f} / {t_upd:.2f} s "
                                                         f"({t_gen / t_step:.0%} / {t_ref / t_step:.0%} / {t_upd / t_step:.0%})"),
        ("peak GPU memory", f"{mem:.1f} GiB"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")


if __name__ == "__main__":
    main()
