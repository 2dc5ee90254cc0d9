"""make gpu-check: what only a GPU can show, in one table, in at most 8 minutes on one GPU.

    python bench/gpu_check.py [--out reports/gpu-check] [--minutes 8]

Each row runs train.py (or transformers.Trainer) as bench/speed.py and bench/memory.py do, on GPT-2
shapes with random weights built from their config (no download: speed and memory do not depend on
the values):

- bf16 speed: GPT-2 small, micro-batch 8 x 512, tokens/s and MFU (of the bf16 matrix-product peak
  measured here) of train.py against transformers.Trainer on the same step (bench/speed.py's full-bf16);
- GPT-2 medium full fine-tuning, bf16, gradient checkpointing, 8-bit AdamW (bitsandbytes), micro-batch 4:
  peak CUDA memory against the 6 GB target, and the memory plan's prediction (bench/memory.py);
- QLoRA (4-bit NF4 base) on GPT-2 medium, the same batch: its peak;
- the fused loss: the medium run again with the plain loss on the logits, and the difference;
- packing with the GPU attention kernels (sdpa, and flash_attention_2 where flash-attn is installed):
  useful tokens/s packed against padded on Alpaca-shaped rows, and whether packing was exact;
- FSDP2 on one GPU (accelerate_configs/fsdp2.yaml, --num_processes 1): full fine-tuning and LoRA through
  the same train.py, a run stopped and resumed against one uninterrupted, final/ reloaded as a plain
  Hugging Face folder and as a peft adapter, the plan's prediction against the measured peak; and
  QLoRA under FSDP2, which may fail where bitsandbytes' 4-bit weights cannot be sharded (the row says).

A row that fails shows its error and the rest go on; rows not started by the time limit say so.
Without a CUDA GPU it says so and exits 0. Writes OUT/gpu_check.json beside the printed table.
"""
import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]
import memory  # noqa: E402  (bench/memory.py: GPT-2 shapes, train.py runs and their peaks)
import speed  # noqa: E402  (bench/speed.py: train.py and the Trainer on the same step, packing)

TARGET_MB = 6 * 1024
SINGLE_GPU = "accelerate_configs/single_gpu.yaml"
SPEED = SimpleNamespace(warmup=3, steps=5, max_length=512, batch=8)


def mb(value) -> str:
    """A figure in MB, or why there is none (a plan that could not run, no GPU peak)."""
    return "n/a" if value is None else f"{value:,.0f} MB"


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def accelerate(config: str, *more) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
            "--main_process_port", "0", *more]


def bf16_speed(work: Path, state: dict) -> tuple:
    peak = speed.matmul_peak(torch.bfloat16, torch.device("cuda"))["flops_per_s"]
    ours = speed.summarize([speed.train_py("full-bf16", 0, SPEED, work, env())], SPEED.warmup, peak)
    theirs = speed.summarize([speed.trainer("full-bf16", 0, SPEED, work, env())], SPEED.warmup, peak)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return (f"train.py {ours['tokens_per_s']:,.0f} tok/s, MFU {100 * ours['mfu']:.1f}% | Trainer "
            f"{theirs['tokens_per_s']:,.0f} tok/s, MFU {100 * theirs['mfu']:.1f}% (peak {peak / 1e12:.0f} TFLOP/s)",
            f"x{ratio:.2f} of the Trainer", {"train.py": ours, "trainer": theirs, "peak_flops": peak})


def medium_8bit(work: Path, state: dict) -> tuple:
    row = memory.train("medium-full-8bit-ckpt-bf16-mb4", "full", state["medium"], state["data"], work / "runs",
                       "adamw_8bit", True, micro_batch=4, accelerate_config=SINGLE_GPU)
    state["medium_fused_peak"] = row["measured_peak_mb"]
    verdict = "under" if row["measured_peak_mb"] <= TARGET_MB else "OVER"
    return (f"peak {mb(row['measured_peak_mb'])} (plan {mb(row['predicted_peak_mb'])}), "
            f"optimizer {row['optimizer_bytes_per_param']:.2f} B/param", f"{verdict} the 6 GB target", row)


def qlora(work: Path, state: dict) -> tuple:
    row = memory.train("medium-qlora-bf16-mb4", "qlora", state["medium"], state["data"], work / "runs", "adamw", False,
                       micro_batch=4, accelerate_config=SINGLE_GPU)
    return (f"peak {mb(row['measured_peak_mb'])} (plan {mb(row['predicted_peak_mb'])}), "
            f"{row['trainable_params']:,} trained", "", row)


def fused_loss(work: Path, state: dict) -> tuple:
    row = memory.train("medium-full-8bit-ckpt-bf16-mb4-plain-loss", "full", state["medium"], state["data"], work / "runs",
                       "adamw_8bit", True, micro_batch=4, accelerate_config=SINGLE_GPU, fused_loss=False)
    fused = state.get("medium_fused_peak")
    if fused is None:
        return f"plain loss peak {mb(row['measured_peak_mb'])} (the fused run did not finish)", "", row
    saved = row["measured_peak_mb"] - fused
    return (f"plain {mb(row['measured_peak_mb'])}, fused {mb(fused)}", f"saves {mb(saved)}", row)


def packing(work: Path, state: dict) -> tuple:
    kernels = ["sdpa"] + (["flash_attention_2"] if _has("flash_attn") else [])
    launcher = accelerate(SINGLE_GPU)
    parts, results = [], {}
    for kernel in kernels:
        extra = (f"model.attn_implementation={kernel}",)
        packed = speed.packing_run(True, 0, SPEED, work, env(), extra, launcher)
        padded = speed.packing_run(False, 0, SPEED, work, env(), extra, launcher)
        results[kernel] = {"packed": packed, "padded": padded}
        exact = packed["packing"].startswith("packed")
        parts.append(f"{kernel}: {packed['useful_tokens_per_s']:,.0f} vs {padded['useful_tokens_per_s']:,.0f} useful tok/s"
                     f" (x{packed['useful_tokens_per_s'] / padded['useful_tokens_per_s']:.2f}"
                     f"{'' if exact else ', NOT packed: ' + packed['packing']})")
    verdict = "" if "flash_attention_2" in kernels else "flash-attn not installed"
    return "; ".join(parts), verdict, results


def fsdp2_launch(work: Path, recipe: str, out: Path, *more) -> list:
    """train.py under accelerate_configs/fsdp2.yaml on one GPU, GPT-2 small, 6 steps; returns its log.jsonl."""
    base = [f"model.name={work / 'gpt2'}", f"data.dataset={work / 'train.txt'}", f"data.validation_file={work / 'valid.txt'}",
            "data.max_length=512", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1",
            "train.eval_every=3", "train.eval_max_batches=2", "train.save_every=3", "train.warmup_ratio=0"]
    speed.run([*accelerate("accelerate_configs/fsdp2.yaml"), "train.py", "--recipe", f"recipes/{recipe}.yaml", *base,
               f"output_dir={out}", *more], work / "logs" / f"{out.name}.log", env())
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def fsdp2(work: Path, state: dict) -> tuple:
    """One GPU under FSDP2: an uninterrupted run, one stopped at step 3 and resumed, and LoRA; final/ reloaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, runs = work / "gpt2", work / "runs"

    def launch(recipe, out, *more):
        return fsdp2_launch(work, recipe, out, *more)

    straight = launch("full", runs / "fsdp2-full")
    launch("full", runs / "fsdp2-resumed", "--stop-after-steps", "3")
    resumed = launch("full", runs / "fsdp2-resumed")
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(straight, resumed) if a["train_loss"] is not None]
    worst = max(abs(a - b) / abs(a) for a, b in losses)
    summary = json.loads((runs / "fsdp2-full" / "summary.json").read_text())
    reloaded, info = AutoModelForCausalLM.from_pretrained(runs / "fsdp2-full" / "final", output_loading_info=True)
    missing = info["missing_keys"]

    launch("lora_r16", runs / "fsdp2-lora", "method.dropout=0")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), runs / "fsdp2-lora" / "final")
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    trained = bool(lora_b) and any(p.abs().sum() > 0 for p in lora_b)
    ok = worst < 1e-3 and not missing and trained and summary["hardware"]["distributed_type"] == "FSDP"
    return (f"{summary['tokens_per_s']:,.0f} tok/s, peak {mb(summary['peak_gpu_mem_mb'])} (plan "
            f"{mb(summary['predicted_peak_mb'])}); resume: worst loss difference {worst:.1e}; final/ reloads "
            f"({len(missing)} missing keys); LoRA adapter reloads {'trained' if trained else 'UNTRAINED'}",
            "ok" if ok else "CHECK", {"worst_relative_loss_difference": worst, "missing_keys": missing,
                                      "lora_trained": trained, "summary": summary})


def fsdp2_qlora(work: Path, state: dict) -> tuple:
    """QLoRA under FSDP2, where bitsandbytes' 4-bit weights and FSDP2 allow it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = work / "runs" / "fsdp2-qlora"
    log = fsdp2_launch(work, "qlora", out, "method.dropout=0")
    summary = json.loads((out / "summary.json").read_text())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "gpt2"), out / "final")
    return (f"trains: val loss {log[0]['val_loss']:.3f} -> {summary['best_val_loss']:.3f}, peak "
            f"{mb(summary['peak_gpu_mem_mb'])}; adapter reloads", "ok", summary)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


ROWS = [
    ("bf16 speed, GPT-2 small, vs Trainer", bf16_speed),
    ("GPT-2 medium full, 8-bit AdamW", medium_8bit),
    ("QLoRA, GPT-2 medium", qlora),
    ("fused loss saving, GPT-2 medium", fused_loss),
    ("packing, GPU attention kernels", packing),
    ("FSDP2 on one GPU", fsdp2),
    ("QLoRA under FSDP2", fsdp2_qlora),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/gpu-check", help="where gpu_check.json goes (default reports/gpu-check)")
    parser.add_argument("--minutes", type=float, default=8.0, help="start no row after this many minutes (default 8)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check")
        return
    start = time.perf_counter()
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / "runs").mkdir()
    speed.make_assets(work, dict(n_layer=12, n_embd=768, n_head=12))
    speed.alpaca_shaped(work, 400)
    folders = memory.assets(work / "memory", ["medium"], vocab_size=memory.GPT2_VOCAB)
    state = {"medium": folders["medium"], "data": work / "memory"}
    table, details = [], {}
    for name, check in ROWS:
        elapsed = time.perf_counter() - start
        if elapsed > args.minutes * 60:
            table.append((name, f"not started: {elapsed / 60:.1f} of {args.minutes:g} minutes used", "skipped"))
            continue
        row_start = time.perf_counter()
        try:
            result, verdict, detail = check(work, state)
            details[name] = detail
        except BaseException as e:  # noqa: BLE001 - a failed row (SystemExit from a failed run too) must not lose the rest
            if isinstance(e, KeyboardInterrupt):
                raise
            lines = str(e).strip().splitlines() or [type(e).__name__]
            result, verdict = f"{type(e).__name__}: {lines[0][:200]}" + (f" ... {lines[-1][:200]}" if len(lines) > 1 else ""), "FAILED"
            details[name] = {"error": traceback.format_exc()}
        table.append((name, f"{result} [{time.perf_counter() - row_start:.0f} s]", verdict))
    shutil.rmtree(work / "runs", ignore_errors=True)  # checkpoints of GPT-2 medium take GBs
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": table, "details": details}, indent=1, default=str))
    print(f"\ngpu-check on {device}, {(time.perf_counter() - start) / 60:.1f} minutes")
    width = max(len(name) for name, _, _ in table)
    print(f"{'check':<{width}} | {'verdict':<24} | result")
    print(f"{'-' * width}-|-{'-' * 24}-|-{'-' * 40}")
    for name, result, verdict in table:
        print(f"{name:<{width}} | {verdict:<24} | {result}")


if __name__ == "__main__":
    main()
