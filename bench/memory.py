"""Memory benchmark: optimizer state per parameter, and the memory plan's predicted peak beside the
measured one, for full fine-tuning, LoRA and prompt tuning on GPT-2 small and medium shapes.

    python bench/memory.py [--shapes small,medium] [--only-loss] [--loss-recipes full] [--out runs/bench_memory]      (make bench-memory)

The models are GPT-2 shapes with random weights (GPT2Config: small 124M, medium 355M parameters; memory
does not depend on the values), trained by train.py itself for a few steps at sequence length 512,
micro-batch 1, each run in its own process. Measured is what summary.json reports: on a CPU the
process's peak resident memory (peak_cpu_rss_mb), on a GPU the CUDA allocator's peak
(peak_gpu_mem_mb); the prediction is summary.json's predicted_peak_mb, made before the model loaded.
It also runs GPT-2 medium full fine-tuning with bf16 mixed precision (accelerate_configs/single_gpu.yaml),
gradient checkpointing and adamw_8bit: on a GPU at micro-batch 1 and 4 (target: a peak under 6 GB),
without one at micro-batch 1 on a CPU with bf16 instructions (measured as peak RSS); elsewhere the
float32 row with the same checkpointing and optimizer stands in.

The loss rows (LOSS_RUNS; --only-loss runs just them) train GPT-2 shapes with GPT-2's own vocabulary
of 50,257, where the logits are the largest tensor of a step, each with the fused loss and with the
plain one (train.fused_loss=false).

Targets: adamw_8bit keeps at most 2.1 bytes of optimizer state per parameter (adamw: 8), and the
predicted peak is within 15% of the measured one. Results: OUT/results.json and OUT/results.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import tiny  # noqa: E402  (the test suite's tokenizer and prose, for a data set that is always there)
from tunebench import measure  # noqa: E402

SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12), "medium": dict(n_embd=1024, n_layer=24, n_head=16)}
SEQ = 512
# (shape, recipe, optimizer, gradient checkpointing)
RUNS = [
    ("small", "full", "adamw", False),
    ("small", "full", "adamw", True),
    ("small", "full", "adamw_8bit", False),
    ("small", "lora_r16", "adamw", False),
    ("small", "lora_r16", "adamw", True),
    ("small", "prompt_tuning", "adamw", False),
    ("medium", "full", "adamw", False),
    ("medium", "full", "adamw_8bit", False),
    ("medium", "full", "adamw_8bit", True),
    ("medium", "lora_r16", "adamw", False),
    ("medium", "lora_r16", "adamw", True),
    ("medium", "prompt_tuning", "adamw", False),
]
GPU_TARGET_MB = 6 * 1024
# The loss with and without the logits (train.fused_loss), at GPT-2's own vocabulary of 50,257, where
# the logits are the largest tensor of a step: (shape, recipe, micro-batch), each run fused and plain.
LOSS_RUNS = [("small", "full", 4), ("small", "lora_r16", 4), ("medium", "full", 1), ("medium", "lora_r16", 1)]
GPT2_VOCAB = 50257


def assets(cache: Path, shapes: list, vocab_size=None) -> dict:
    """Tokenizer, train/validation text, and one model folder per shape (made once, kept in cache);
    the model's vocabulary is the tokenizer's 2048 ids, or vocab_size rows (ids beyond the tokenizer's
    are never fed; the output layer and its logits keep that size)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.make_tokenizer(cache / "tokenizer", vocab_size=2048)
    paragraphs = tiny.prose()
    tiny.write_text(cache / "train.txt", paragraphs[:-8])
    tiny.write_text(cache / "valid.txt", paragraphs[-8:])
    folders = {}
    for shape in shapes:
        folder = cache / f"gpt2-{shape}{f'-vocab{vocab_size}' if vocab_size else ''}"
        if not (folder / "model.safetensors").exists():
            torch.manual_seed(0)
            config = GPT2Config(**SHAPES[shape], bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                vocab_size=vocab_size or len(tokenizer))
            GPT2LMHeadModel(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        folders[shape] = folder
    return folders


def train(name, recipe, model, data, out, optimizer, checkpointing, micro_batch=1, grad_accum=1, accelerate_config=None,
          fused_loss=True):
    run = out / name
    command = [sys.executable, str(ROOT / "train.py")]
    if accelerate_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, str(ROOT / "train.py")]
    command += [
        "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"), f"model.name={model}",
        f"data.dataset={data / 'train.txt'}", f"data.validation_file={data / 'valid.txt'}", f"data.max_length={SEQ}",
        f"train.micro_batch_size={micro_batch}", f"train.grad_accum={grad_accum}", "train.max_steps=2",
        "train.eval_every=0", "train.eval_max_batches=1", "train.log_every=1", "train.save_every=1000",
        f"train.optimizer={optimizer}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
        "train.exact_cpu_rss=true", f"train.fused_loss={str(fused_loss).lower()}",
        f"name={name}", f"output_dir={run}", "overwrite=true",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    for bulky in ("checkpoints", "final"):  # gigabytes each for GPT-2 medium; only summary.json is needed
        shutil.rmtree(run / bulky, ignore_errors=True)
    measured = summary["peak_gpu_mem_mb"] if summary["peak_gpu_mem_mb"] is not None else summary["peak_cpu_rss_mb"]
    predicted = summary["predicted_peak_mb"]
    return {
        "run": name, "method": summary["method"], "optimizer": optimizer, "checkpointing": checkpointing,
        "loss": "fused" if summary["loss"].startswith("fused") else "plain", "loss_path": summary["loss"],
        "micro_batch": micro_batch, "mixed_precision": summary["hardware"]["mixed_precision"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "measured_peak_mb": measured,
        "measured": "peak_gpu_mem_mb" if summary["peak_gpu_mem_mb"] is not None else "peak_cpu_rss_mb",
        "predicted_peak_mb": predicted,
        "error_pct": None if predicted is None else 100 * (predicted - measured) / measured,
        "optimizer_state_mb": summary["optimizer_state_mb"],
        "optimizer_bytes_per_param": summary["optimizer_state_mb"] * 2**20 / summary["trainable_params"],
        "plan": summary["memory_plan"], "wall_s": round(time.perf_counter() - start, 1),
    }


def table(rows) -> str:
    lines = ["| run | method | optimizer | ckpt | mb | loss | precision | measured peak MB | predicted MB | error | optimizer state MB | bytes/param |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['optimizer']} | {'on' if r['checkpointing'] else 'off'} | {r['micro_batch']} | {r['loss']} "
            f"| {r['mixed_precision']} | {r['measured_peak_mb']:,.0f} ({r['measured']}) | {r['predicted_peak_mb'] or 0:,.0f} "
            f"| {error} | {r['optimizer_state_mb']:,.1f} | {r['optimizer_bytes_per_param']:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,medium", help="comma-separated: small, medium")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_memory"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench_memory"))
    parser.add_argument("--only-loss", action="store_true", help="only the fused-against-plain loss rows (GPT-2's vocabulary)")
    parser.add_argument("--loss-recipes", default="full,lora_r16", help="recipes of the loss rows (default full,lora_r16)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = assets(Path(args.cache), shapes)
    data = Path(args.cache)

    rows = []
    for shape, recipe, optimizer, checkpointing in [] if args.only_loss else RUNS:
        if shape in shapes:
            name = f"{shape}-{recipe}-{optimizer}{'-ckpt' if checkpointing else ''}"
            rows.append(train(name, recipe, folders[shape], data, out, optimizer, checkpointing))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")  # kept if a later run fails
    full_vocab = assets(Path(args.cache), shapes, vocab_size=GPT2_VOCAB)
    loss_rows = []
    for shape, recipe, micro_batch in LOSS_RUNS:
        if shape in shapes and recipe in args.loss_recipes.split(","):
            for fused in (True, False):
                name = f"{shape}-vocab{GPT2_VOCAB}-{recipe}-mb{micro_batch}-{'fused' if fused else 'plain'}"
                loss_rows.append(train(name, recipe, full_vocab[shape], data, out, "adamw", False, micro_batch=micro_batch,
                                       fused_loss=fused))
                print(table(loss_rows[-1:]).splitlines()[-1], flush=True)
                (out / "results.json").write_text(json.dumps(rows + loss_rows, indent=2) + "\n")
    rows += loss_rows
    gpu = torch.cuda.is_available()
    # bf16 autocast on a CPU without bf16 instructions is emulated: hours for these two steps.
    if "medium" in shapes and measure.bf16_native() and not args.only_loss:  # the 6 GB target's settings
        for micro_batch in (1, 4) if gpu else (1,):
            rows.append(train(f"medium-full-adamw_8bit-ckpt-bf16-mb{micro_batch}", "full", folders["medium"], data, out,
                              "adamw_8bit", True, micro_batch=micro_batch, grad_accum=8 // micro_batch if gpu else 1,
                              accelerate_config=str(ROOT / "accelerate_configs" / "single_gpu.yaml")))
            print(table(rows[-1:]).splitlines()[-1], flush=True)

    report = [table(rows), ""]
    if "medium" in shapes and not measure.bf16_native():
        report.append("the 6 GB target's bf16 row is not run: no GPU and no bf16 instructions in this CPU; "
                      "medium-full-adamw_8bit-ckpt is the same settings in float32")
    per_param = {r["optimizer"]: r["optimizer_bytes_per_param"] for r in rows
                 if r["run"].startswith("medium-full") and not r["checkpointing"]}
    if per_param:
        report.append("optimizer state per parameter, GPT-2 medium full: " + ", ".join(
            f"{k} {v:.2f} bytes" for k, v in per_param.items()) + "  (target: adamw_8bit <= 2.1, adamw 8)")
    within = [r for r in rows if r["error_pct"] is not None and abs(r["error_pct"]) <= 15]
    report.append(f"plan within 15% of the measured peak: {len(within)} of {len(rows)} runs "
                  f"(largest error {max(abs(r['error_pct']) for r in rows if r['error_pct'] is not None):.1f}%)")
    for r in rows:
        if "bf16" in r["run"]:
            verdict = "under" if r["measured_peak_mb"] < GPU_TARGET_MB else "NOT under"
            where = "GPU allocator" if r["measured"] == "peak_gpu_mem_mb" else "CPU process RSS (no GPU here)"
            report.append(f"{r['run']}: peak {r['measured_peak_mb']:,.0f} MB ({where}), {verdict} 6 GB")
    for fused, plain in zip(loss_rows[::2], loss_rows[1::2]):
        report.append(f"{fused['run'].removesuffix('-fused')}: fused loss peak {fused['measured_peak_mb']:,.0f} MB against "
                      f"plain {plain['measured_peak_mb']:,.0f} MB ({100 * (fused['measured_peak_mb'] / plain['measured_peak_mb'] - 1):+.0f}%)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU): measured = peak RSS"
    report.append(f"device: {device}; sequence length {SEQ}; 2 steps per run")
    text = "\n".join(report)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
