"""One speed lever of a training step, timed on a plain loop in a process of its own (part of make bench).

    python bench/levers.py --lever fused_adamw --model DIR --max-length 512 --micro-batch-size 8 --steps 3 --warmup 2 --out lever.json

The baseline is the plainest correct loop: fp32, SDPA attention, the logits shifted for the loss,
gradient clipping, torch.optim.AdamW as constructed by default, glibc's allocator as it comes. Each
lever changes one thing on top of it. One lever per process, because the allocator's state carries
over from one loop to the next in a process (glibc raises its mmap threshold as large blocks are
freed), which would favour whichever lever runs later. Token ids are random: the speed of a step
does not depend on them. Writes the step times after the warm-up steps.
"""
import argparse
import json
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from tunebench import measure
from tunebench.methods import count_params
from tunebench.metrics import causal_nll

LEVERS = {
    "baseline": "fp32, SDPA, loss on shifted logits, AdamW default (for-loop on CPU)",
    "fused_adamw": "AdamW(fused=True)",
    "foreach_adamw": "AdamW(foreach=True)",
    "shift_labels": "loss on shifted labels (no copy of the logits)",
    "compile": "torch.compile of the model (inductor)",
    "vocab_pad64": "vocabulary padded to a multiple of 64 (changes the model)",
    "eager_attention": "eager attention instead of SDPA",
    "bf16_autocast": "bf16 autocast",
    "heap_allocator": "glibc keeps freed blocks for the next step (tunebench.measure.set_cpu_allocator)",
    "kept": "the levers train.py uses by default: fused AdamW, shifted labels, the heap allocator",
}


def shifted_logits_nll(logits, labels):
    """The loss as train.py computed it before: the slice of the logits is a copy."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")


def shifted_labels_nll(logits, labels):
    """The loss as train.py computes it now (tunebench.metrics.causal_nll)."""
    return causal_nll(logits, labels)[0]


def build(lever, model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    if lever == "vocab_pad64":
        config.vocab_size = (config.vocab_size + 63) // 64 * 64
    torch.manual_seed(0)
    attn = "eager" if lever == "eager_attention" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    if lever == "compile":
        model.compile()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kept = lever == "kept"
    options = {"fused": True} if lever == "fused_adamw" or kept else {"foreach": True} if lever == "foreach_adamw" else {}
    optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
    loss_fn = shifted_labels_nll if lever == "shift_labels" or kept else shifted_logits_nll
    autocast = torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16) if lever == "bf16_autocast" else nullcontext()
    return model, optimizer, loss_fn, autocast


def step_times(lever, args, device):
    model, optimizer, loss_fn, autocast = build(lever, args.model)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.micro_batch_size, args.max_length), generator=generator).to(device)
        start = time.perf_counter()
        with autocast:
            logits = model(input_ids=ids).logits
            loss = loss_fn(logits, ids)
            del logits  # as train.py: not kept through the backward pass
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # one host sync per step, as at a log step
        times.append(time.perf_counter() - start)
    trainable, total = count_params(model)
    flops = measure.train_flops_per_token(model.config, trainable, total, args.max_length)
    return times[args.warmup :], flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lever", required=True, choices=LEVERS)
    parser.add_argument("--model", required=True, help="folder with config.json (weights are drawn at random)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.lever in ("heap_allocator", "kept"):
        measure.set_cpu_allocator(exact_rss=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times, flops = step_times(args.lever, args, device)
    result = {
        "lever": args.lever, "what": LEVERS[args.lever], "step_s": times,
        "tokens_per_step": args.micro_batch_size * args.max_length, "model_flops_per_token": flops,
        "peak_cpu_rss_mb": measure.peak_cpu_rss_mb(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
