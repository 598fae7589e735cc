"""How many operators (on a GPU: kernel launches, roughly) the reference forward and one GRPO step of 04_grpo.py
issue, per path and micro-batch size. Runs on a CPU in seconds: the count depends on the number of layers and
micro-batches, not on the width, so a narrow model with the layer count of a real architecture stands in for it.
A step whose launches take longer on the host than its kernels take on the GPU is launch-bound: fewer, larger
micro-batches are then the first remedy.

Counted: leaf aten operators (those that call no other operator) minus the ones that only make views or
allocate (as_strided, view, empty, ...), i.e. the operators that run a kernel.
  python bench/count_ops.py [--layers 28] [--prompts 8] [--group-size 4] [--prompt-len 64] [--new-tokens 32]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import training  # noqa: E402

grpo = common.load_stage("04_grpo")

NO_KERNEL = {"aten::as_strided", "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::resolve_conj",
             "aten::resolve_neg", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::result_type",
             "aten::lift_fresh", "aten::detach", "aten::alias", "aten::t", "aten::transpose", "aten::expand",
             "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::split",
             "aten::unbind", "aten::narrow", "aten::reshape", "aten::flatten", "aten::is_nonzero",
             "aten::_local_scalar_dense", "aten::item", "aten::scalar_tensor", "aten::set_", "aten::split_with_sizes"}


def count(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children and e.name not in NO_KERNEL)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen2.5-1.5B: 28)")
    p.add_argument("--prompts", type=int, default=8, help="B")
    p.add_argument("--group-size", type=int, default=4, help="G")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (does not change the count)")
    p.add_argument("--new-tokens", type=int, default=32, help="completion tokens (does not change the count)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[8, 16, 32], help="micro-batch sizes to count")
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=training.LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    B, G, P, L = args.prompts, args.group_size, args.prompt_len, args.new_tokens
    prompts = torch.randint(100, 4000, (B, P)).tolist()
    ro = grpo.Rollouts([q for q in prompts for _ in range(G)], torch.randint(100, 4000, (B * G, L)).tolist(),
                       torch.randn(B * G))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    print(f"{args.layers} layers, LoRA r=16 on all projections, {B} prompts x G={G}\n")
    print("| path | micro-batch | operators: reference forward | operators: GRPO step (fwd + bwd + AdamW) |\n|---|---|---|---|")
    for shared in (True, False):
        for mb in args.micro_batches:
            lcfg = grpo.LossConfig(pad_id=0, beta=5e-4, micro_batch=mb, l_gen=L, shared_prefix=shared)

            def ref():
                with model.disable_adapter():
                    ro.logp_ref = grpo.sequence_logps(model, ro, lcfg)

            n_ref = count(ref)
            n_step = count(lambda: grpo.grpo_step(model, model, opt, None, ro, lcfg))
            print(f"| {'shared prefix' if shared else 'plain'} | {mb} | {n_ref:,} | {n_step:,} |", flush=True)


if __name__ == "__main__":
    main()
