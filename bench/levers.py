"""Speed levers of a training step, measured one at a time on a plain loop (part of make bench).

    python bench/levers.py --model DIR --max-length 512 --micro-batch-size 8 --steps 4 --warmup 2 --reps 3 --out levers.json

The baseline is the plainest correct loop: fp32, SDPA attention, the logits shifted for the loss,
gradient clipping, torch.optim.AdamW as constructed by default. Each lever changes one thing on
top of it; the rounds are interleaved (every lever once per round) and each figure is the median
over rounds of the median step time after the warm-up steps. Token ids are random: the speed of a
step does not depend on them.
"""
import argparse
import gc
import json
import statistics
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
    "kept": "the levers train.py uses by default: fused AdamW, shifted labels",
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
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # one host sync per step, as at a log step
        times.append(time.perf_counter() - start)
    trainable, total = count_params(model)
    flops = measure.train_flops_per_token(model.config, trainable, total, args.max_length)
    del model, optimizer, logits, loss
    gc.collect()
    return times[args.warmup :], flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder with config.json (weights are drawn at random)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    levers = args.levers.split(",")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        parser.error(f"unknown levers {unknown}; choose from {', '.join(LEVERS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    medians, flops = {lever: [] for lever in levers}, {}
    for rep in range(args.reps):
        for lever in levers:
            times, flops[lever] = step_times(lever, args, device)
            medians[lever].append(statistics.median(times))
            print(f"round {rep + 1}/{args.reps} {lever:<16} {statistics.median(times):8.3f} s/step", flush=True)
    tokens = args.micro_batch_size * args.max_length
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "levers": {
            lever: {
                "what": LEVERS[lever],
                "step_s": statistics.median(medians[lever]),
                "step_s_per_round": medians[lever],
                "tokens_per_s": tokens / statistics.median(medians[lever]),
                "model_flops_per_token": flops[lever],
            }
            for lever in levers
        },
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
