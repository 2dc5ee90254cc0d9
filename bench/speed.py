"""make bench: training and evaluation speed of tunebench, side by side with the Hugging Face baseline.

    python bench/speed.py [--quick] [--reps 3] [--cases full-fp32,lora_r16-fp32,...] [--out reports/bench]

Training: the same work through train.py (a subprocess, exactly as a user runs it) and through
transformers.Trainer (bench/hf_trainer.py): same model, same packed blocks, same batch, same AdamW,
same precision. The runs are interleaved (A B A B ...) in rounds; each run's figure is the median
step time after its warm-up steps (from log.jsonl for train.py, from a step callback for the
Trainer), and each case's figure the median over rounds. Evaluation: evaluate.py's perplexity
against a plain one-window-per-forward loop (bench/hf_perplexity.py) over the same windows.
Levers: bench/levers.py times one training-step change at a time on a plain loop, each in a process of
its own. The case full-fp32-same-allocator is a control: the Trainer given the allocator setting train.py
makes.

The model is GPT-2 small in shape (GPT2Config(): 12 layers, 768 wide, vocabulary 50257) with random
weights; no GPT-2 tokenizer is available offline, so the tokenizer is the 512-token BPE of
tests/tiny.py, whose ids are the first 512 rows of the model's 50257: every matrix keeps GPT-2's
size, so the FLOPs are GPT-2's, and speed does not depend on which ids are fed. Model FLOPs
utilisation is model FLOPs per second (tunebench.measure.train_flops_per_token) over the peak this
bench measures with a large matrix product in the same precision. Writes OUT/bench.json and prints
a table.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import tiny  # noqa: E402  (the tokenizer and prose of the test suite: offline and small)
from tunebench import measure  # noqa: E402

# Three warm-up steps: glibc's allocator and the heap settle over the first two or three steps
# (GPT-2 small on a CPU: 18, 17, 16, then 14.5 s per step).
FULL = dict(n_layer=12, n_embd=768, n_head=12, max_length=512, batch=8, warmup=3, steps=3, reps=3,
            eval_tokens=16384, lever_reps=2, lever_steps=3)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, max_length=64, batch=4, warmup=1, steps=3, reps=2,
             eval_tokens=1024, lever_reps=1, lever_steps=2)
# case -> (recipe, what train.py runs with, what the Trainer runs with)
CASES = {
    "full-fp32": ("full", "fp32", "fp32"),
    # train.py with the plain loss on the logits (train.fused_loss=false): how train.py ran before
    # the fused loss, for a before/after in one run.
    "full-fp32-plain-loss": ("full", "fp32-plain-loss", "fp32"),
    "lora_r16-fp32": ("lora_r16", "fp32", "fp32"),
    "full-bf16": ("full", "bf16", "bf16"),
    "lora_r16-bf16": ("lora_r16", "bf16", "bf16"),
    "full-defaults": ("full", "defaults", "defaults"),
    "full-compile": ("full", "compile", "compile"),
    # A control: the Trainer's process given the allocator setting train.py makes (glibc keeps freed
    # blocks), to show how much of the difference that setting is.
    "full-fp32-same-allocator": ("full", "fp32", "fp32+allocator"),
}
SAME_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}  # set_cpu_allocator's mallopt
# compile on top of the kept levers is the full-compile case of train.py.
LEVERS = ["baseline", "heap_allocator", "fused_adamw", "foreach_adamw", "shift_labels", "eager_attention", "vocab_pad64",
          "compile", "kept"]
BF16_LEVERS = ["bf16_autocast"]


def matmul_peak(dtype, device) -> dict:
    """FLOP/s of the best square matrix product in dtype: the size doubles from 256 until one product
    takes 0.2 s (at most 8192), then the best of five; `a @ b` and F.linear (the layers' kernel) both."""

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        if timed(lambda: a @ b) > 0.2 or n >= 8192:
            break
        n *= 2
    best = {}
    for name, fn in (("matmul", lambda: a @ b), ("linear", lambda: torch.nn.functional.linear(a, b))):
        fn()
        best[name] = 2 * n**3 / min(timed(fn) for _ in range(5))
    return {"flops_per_s": max(best.values()), "n": n, "by_kernel": best}


def machine() -> dict:
    flags = set()
    if Path("/proc/cpuinfo").exists():
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags") for f in line.split()}
    hardware = measure.hardware()
    return {
        **{k: hardware[k] for k in ("cpu", "cpu_cores", "gpus")},
        "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": measure.bf16_native(),
        "load_average_at_start": os.getloadavg(),
    }


def make_assets(work: Path, shape: dict) -> None:
    """GPT-2-shaped model (random weights, vocabulary 50257) with the tiny tokenizer, and text files."""
    tokenizer = tiny.make_tokenizer(work / "tokenizer")
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(work / "gpt2")
    tokenizer.save_pretrained(work / "gpt2")
    paragraphs = tiny.prose()
    tiny.write_text(work / "train.txt", paragraphs[:70])
    tiny.write_text(work / "valid.txt", paragraphs[70:])
    tiny.write_text(work / "eval.txt", paragraphs)


def run(cmd, log: Path, env: dict) -> float:
    """Run a command, its output to log; returns the 1-minute load average before it started."""
    load = os.getloadavg()[0]
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed (exit {done.returncode}); its log {log} ends:\n{tail}")
    return load


def durations(ends: list) -> list:
    """Step durations from the times at which steps ended (measured from the start of training)."""
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]


def train_py(case, rnd, args, work, env) -> dict:
    recipe, setting, _ = CASES[case]
    out = work / "runs" / f"train_py-{case}-{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    total = args.warmup + args.steps
    overrides = [
        f"model.name={work / 'gpt2'}", f"data.dataset={work / 'train.txt'}", f"data.validation_file={work / 'valid.txt'}",
        f"data.max_length={args.max_length}", f"train.max_steps={total}", "train.log_every=1", "train.eval_every=0",
        "train.eval_max_batches=1", f"train.save_every={total}", f"output_dir={out}",
    ]
    if setting != "defaults":
        overrides.append(f"train.micro_batch_size={args.batch}")
    if setting == "compile":
        overrides.append("train.compile=true")
    if setting == "fp32-plain-loss":
        overrides.append("train.fused_loss=false")
    launcher = [sys.executable]
    if setting == "bf16":  # as a user launches it: accelerate launch without a config (it sets OMP_NUM_THREADS=1)
        launcher += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                     "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    load = run([*launcher, "train.py", "--recipe", f"recipes/{recipe}.yaml", *overrides], work / "logs" / f"{out.name}.log", env)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steps = durations([r["time"] for r in log if r["step"] > 0])
    shutil.rmtree(out)  # checkpoints of GPT-2 small take GBs
    return {
        "step_s": steps, "tokens_per_step": summary["global_batch"] * args.max_length, "load_average": load,
        "whole_run_tokens_per_s": summary["tokens_per_s"], "peak_cpu_rss_mb": summary["peak_cpu_rss_mb"],
        "peak_gpu_mem_mb": summary["peak_gpu_mem_mb"], "model_flops_per_token": summary["model_flops_per_token"],
        "micro_batch_size": summary["global_batch"], "precision": summary["hardware"]["mixed_precision"],
        "threads_per_process": summary["hardware"].get("threads_per_process"), "loss": summary.get("loss"),
    }


def trainer(case, rnd, args, work, env) -> dict:
    recipe, _, setting = CASES[case]
    out = work / "runs" / f"trainer-{case}-{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "bench/hf_trainer.py", "--model", work / "gpt2", "--data-file", work / "train.txt",
           "--validation-file", work / "valid.txt", "--recipe", f"recipes/{recipe}.yaml", "--max-length", args.max_length,
           "--micro-batch-size", args.batch, "--steps", args.warmup + args.steps, "--out", out]
    cmd += {"defaults": ["--defaults"], "bf16": ["--precision", "bf16"], "compile": ["--compile"]}.get(setting, [])
    if setting == "fp32+allocator":
        env = {**env, **SAME_ALLOCATOR_ENV}
    load = run(list(map(str, cmd)), work / "logs" / f"{out.name}.log", env)
    result = json.loads((out / "result.json").read_text())
    shutil.rmtree(out)
    steps = durations(result["step_end_times"])
    return {
        "step_s": steps, "tokens_per_step": result["tokens_per_step"], "load_average": load,
        "whole_run_tokens_per_s": result["tokens_per_step"] * len(steps) / result["train_runtime_s"],
        "peak_cpu_rss_mb": result["peak_cpu_rss_mb"], "peak_gpu_mem_mb": result["peak_gpu_mem_mb"],
        "model_flops_per_token": result["model_flops_per_token"], "micro_batch_size": result["micro_batch_size"],
        "precision": result["precision"], "optimizer": result["optimizer"],
    }


def alpaca_shaped(work: Path, n: int, seed: int = 0) -> None:
    """Instruction rows shaped like Alpaca's (instruction, empty input, output; 50 to 400 tokens through
    the Alpaca template, log-uniform: many short rows and a long tail) made from pydoc_data's prose,
    as train.jsonl and validation.jsonl in work/alpaca."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "gpt2")
    rng, paragraphs = random.Random(seed), tiny.prose()
    head = len(tokenizer(data_template_head())["input_ids"])
    rows = []
    while len(rows) < n:
        text = paragraphs[len(rows) % len(paragraphs)].split()
        instruction = " ".join(text[: rng.randint(4, 16)])
        total = round(math.exp(rng.uniform(math.log(50), math.log(400))))
        room = max(4, total - head - len(tokenizer(instruction)["input_ids"]))
        stream = paragraphs[rng.randrange(len(paragraphs))] + " " + paragraphs[rng.randrange(len(paragraphs))]
        output = tokenizer.decode(tokenizer(stream)["input_ids"][:room])
        rows.append({"instruction": instruction, "input": "", "output": output.strip()})
    (work / "alpaca").mkdir(exist_ok=True)
    tiny.write_jsonl(work / "alpaca" / "train.jsonl", rows[: n - 16])
    tiny.write_jsonl(work / "alpaca" / "validation.jsonl", rows[n - 16 :])


def data_template_head() -> str:
    from tunebench.data import TEMPLATES

    return TEMPLATES["alpaca"][0].split("{prompt}")[0] + TEMPLATES["alpaca"][0].split("{prompt}")[1].split("{response}")[0]


def packing_run(packing: bool, rnd, args, work, env, extra=(), launcher=(sys.executable,)) -> dict:
    """train.py (full fine-tuning) on the Alpaca-shaped rows, packed or padded: useful (non-pad) tokens/s.
    extra: more recipe overrides; launcher: what starts train.py (e.g. accelerate launch with a config)."""
    out = work / "runs" / f"packing-{packing}-{rnd}{'-' + '-'.join(extra).replace('=', '_') if extra else ''}"
    shutil.rmtree(out, ignore_errors=True)
    total = args.warmup + args.steps
    overrides = [
        f"model.name={work / 'gpt2'}", f"data.dataset={work / 'alpaca'}", "data.format=instruction",
        "data.max_length=512", f"data.packing={str(packing).lower()}", f"train.micro_batch_size={args.batch}",
        f"train.max_steps={total}", "train.log_every=1", "train.eval_every=0", "train.eval_max_batches=1",
        f"train.save_every={total}", f"output_dir={out}", *extra,
    ]
    load = run([*launcher, "train.py", "--recipe", "recipes/full.yaml", *overrides], work / "logs" / f"{out.name}.log", env)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    measured = [r for r in log if r["step"] > args.warmup]
    start = next(r for r in log if r["step"] == args.warmup)
    seconds, tokens = measured[-1]["time"] - start["time"], measured[-1]["tokens"] - start["tokens"]
    return {"useful_tokens_per_s": tokens / seconds, "useful_tokens_per_step": tokens / len(measured),
            "step_s": seconds / len(measured), "packing": summary["packing"], "load_average": load,
            "peak_cpu_rss_mb": summary["peak_cpu_rss_mb"]}


def evaluate_py(rnd, args, work, env) -> dict:
    out = work / "runs" / f"evaluate_py-{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "evaluate.py", "--model", work / "gpt2", "--tasks", "ppl", "--data-file", work / "eval.txt",
           "--max-length", args.max_length, "--stride", args.max_length, "--max-tokens", args.eval_tokens,
           "--precision", "fp32", "--out", out]
    load = run(list(map(str, cmd)), work / "logs" / f"{out.name}.log", env)
    result = json.loads((out / "eval.json").read_text())
    ppl = result["tasks"]["ppl"]
    return {"tokens": ppl["tokens"], "seconds": result["time_s"]["ppl"], "ppl": ppl["ppl"],
            "batch_size": ppl["batch_size"], "load_average": load}


def plain_loop(rnd, args, work, env) -> dict:
    out = work / "runs" / f"plain-{rnd}"
    cmd = [sys.executable, "bench/hf_perplexity.py", "--model", work / "gpt2", "--data-file", work / "eval.txt",
           "--max-length", args.max_length, "--max-tokens", args.eval_tokens, "--out", out]
    load = run(list(map(str, cmd)), work / "logs" / f"{out.name}.log", env)
    result = json.loads((out / "result.json").read_text())
    return {**result, "batch_size": 1, "load_average": load}


def lever(name, rnd, args, work, env) -> dict:
    out = work / "runs" / f"lever-{name}-{rnd}.json"
    out.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "bench/levers.py", "--lever", name, "--model", work / "gpt2", "--max-length", args.max_length,
           "--micro-batch-size", args.batch, "--steps", args.lever_steps, "--warmup", args.warmup, "--out", out]
    load = run(list(map(str, cmd)), work / "logs" / f"lever-{name}-{rnd}.log", env)
    return {**json.loads(out.read_text()), "load_average": load}


def summarize(runs: list, warmup: int, peak: float) -> dict:
    """Median over rounds of each run's median step time after the warm-up steps."""
    per_run = [statistics.median(r["step_s"][warmup:]) for r in runs]
    step = statistics.median(per_run)
    last = runs[-1]
    tokens_per_s = last["tokens_per_step"] / step
    return {
        "step_s": step,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * last["model_flops_per_token"] / peak,
        "step_s_per_round": per_run,
        "whole_run_tokens_per_s": statistics.median(r["whole_run_tokens_per_s"] for r in runs),
        "peak_cpu_rss_mb": max(r["peak_cpu_rss_mb"] for r in runs),
        "peak_gpu_mem_mb": max((r["peak_gpu_mem_mb"] or 0) for r in runs) or None,
        **{k: last[k] for k in ("tokens_per_step", "model_flops_per_token", "micro_batch_size", "precision", "optimizer") if k in last},
        "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a 2-layer model, short sequences, one round of levers")
    parser.add_argument("--cases", help=f"comma-separated training cases, from: {', '.join(CASES)} "
                                        "(default: all; the bf16 ones only where the hardware has bf16)")
    parser.add_argument("--reps", type=int, help="rounds of interleaved runs (default 3; quick 2)")
    parser.add_argument("--steps", type=int, help="measured steps per run, after the warm-up steps (default 3)")
    parser.add_argument("--warmup", type=int, help="steps per run and lever not measured (default 3)")
    parser.add_argument("--batch", type=int, help="micro-batch size of the equal-settings cases (default 8, the recipes')")
    parser.add_argument("--eval-tokens", type=int, help="tokens scored per evaluation run (default 16384)")
    parser.add_argument("--lever-reps", type=int, help="rounds of the lever measurements (default 2; 0 skips them)")
    parser.add_argument("--lever-steps", type=int, help="measured steps per lever and round, after the warm-up steps (default 3)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation speed")
    parser.add_argument("--packing-reps", type=int, default=1,
                        help="rounds of the packed-against-padded case on Alpaca-shaped rows (default 1; 0 skips it)")
    parser.add_argument("--out", default="reports/bench", help="where bench.json goes (default reports/bench)")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key in ("reps", "steps", "warmup", "batch", "eval_tokens", "lever_reps", "lever_steps"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.max_length = preset["max_length"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine()
    if args.cases:
        cases = args.cases.split(",")
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    else:
        cases = [c for c in CASES if not c.endswith("bf16") or info["bf16_native"]]
    out = ROOT / args.out
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "datasets_cache"))
    started = time.time()

    print("measuring the matrix-product peaks ...", flush=True)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    make_assets(work, preset)

    # ---- training: train.py and the Trainer, interleaved, in rounds ----------------------------------
    sides = {"train.py": train_py, "Trainer": trainer}
    runs = {(case, side): [] for case in cases for side in sides}
    for rnd in range(args.reps):
        for case in cases:
            for side, fn in sides.items():
                runs[case, side].append(fn(case, rnd, args, work, env))
                step = statistics.median(runs[case, side][-1]["step_s"][args.warmup :])
                print(f"round {rnd + 1}/{args.reps}  {case:<25} {side:<9} {step:7.3f} s/step", flush=True)
    training = {}
    for case in cases:
        precision = "bf16" if CASES[case][1] == "bf16" else "fp32"
        rows = {side: summarize(runs[case, side], args.warmup, peaks[precision]["flops_per_s"]) for side in sides}
        training[case] = {"recipe": CASES[case][0], "setting": CASES[case][1], "peak": precision, **rows,
                          "ratio": rows["train.py"]["tokens_per_s"] / rows["Trainer"]["tokens_per_s"]}

    # ---- packed against padded instruction rows: useful tokens/s of train.py ---------------------------
    packing = {"skipped": "--packing-reps 0"}
    if args.packing_reps:
        alpaca_shaped(work, 400)
        pk = {"packed": [], "padded": []}
        for rnd in range(args.packing_reps):
            for side in pk:
                pk[side].append(packing_run(side == "packed", rnd, args, work, env))
                print(f"round {rnd + 1}/{args.packing_reps}  alpaca-shaped {side:<7} "
                      f"{pk[side][-1]['useful_tokens_per_s']:7.0f} useful tokens/s", flush=True)
        packing = {side: {"useful_tokens_per_s": statistics.median(r["useful_tokens_per_s"] for r in rs), "runs": rs}
                   for side, rs in pk.items()}
        packing["ratio"] = packing["packed"]["useful_tokens_per_s"] / packing["padded"]["useful_tokens_per_s"]

    # ---- evaluation: evaluate.py against the plain loop -------------------------------------------------
    evaluation = None
    if args.no_eval:
        evaluation = {"skipped": "--no-eval"}
    elif not (ROOT / "evaluate.py").exists():
        evaluation = {"skipped": "this checkout has no evaluate.py"}
    else:
        ev = {"evaluate.py": [], "plain loop": []}
        for rnd in range(args.reps):
            ev["evaluate.py"].append(evaluate_py(rnd, args, work, env))
            ev["plain loop"].append(plain_loop(rnd, args, work, env))
            print(f"round {rnd + 1}/{args.reps}  perplexity     " + "  ".join(f"{k} {v[-1]['tokens'] / v[-1]['seconds']:7.0f} tokens/s" for k, v in ev.items()), flush=True)
        evaluation = {
            side: {"tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rs), "ppl": rs[-1]["ppl"],
                   "tokens": rs[-1]["tokens"], "batch_size": rs[-1]["batch_size"], "runs": rs}
            for side, rs in ev.items()
        }
        evaluation["ratio"] = evaluation["evaluate.py"]["tokens_per_s"] / evaluation["plain loop"]["tokens_per_s"]

    # ---- levers, one at a time, on a plain loop: a process per lever and round, interleaved ---------------
    levers = {"skipped": "--lever-reps 0"}
    if args.lever_reps:
        names = LEVERS + (BF16_LEVERS if info["bf16_native"] else [])
        lever_runs = {name: [] for name in names}
        for rnd in range(args.lever_reps):
            for name in names:
                lever_runs[name].append(lever(name, rnd, args, work, env))
                print(f"round {rnd + 1}/{args.lever_reps}  lever {name:<16} {statistics.median(lever_runs[name][-1]['step_s']):7.3f} s/step", flush=True)
        levers = {"levers": {}}
        for name, rs in lever_runs.items():
            per_round = [statistics.median(r["step_s"]) for r in rs]
            step = statistics.median(per_round)
            tokens_per_s = rs[-1]["tokens_per_step"] / step
            peak = peaks["bf16" if name.startswith("bf16") else "fp32"]["flops_per_s"]
            levers["levers"][name] = {
                "what": rs[-1]["what"], "step_s": step, "step_s_per_round": per_round,
                "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * rs[-1]["model_flops_per_token"] / peak,
                "peak_cpu_rss_mb": max(r["peak_cpu_rss_mb"] for r in rs), "runs": rs,
            }
        base = levers["levers"]["baseline"]["tokens_per_s"]
        for row in levers["levers"].values():
            row["speedup_vs_baseline"] = row["tokens_per_s"] / base
        if not info["bf16_native"]:
            levers["bf16_autocast"] = f"not measured: no native bf16 matrix product here (bf16 peak {peaks['bf16']['flops_per_s'] / 1e9:.1f} GFLOP/s)"

    report = {
        "machine": {**info, "load_average_at_end": os.getloadavg()},
        "versions": measure.versions(),
        "settings": {
            "model": f"GPT-2 shape, random weights: n_layer {preset['n_layer']}, n_embd {preset['n_embd']}, n_head {preset['n_head']}, "
                     "vocabulary 50257; tokenizer: tests/tiny.py BPE (512 ids, all within the model's vocabulary)",
            "data": "packed blocks of Python's documentation prose (pydoc_data.topics), tests/tiny.py",
            "max_length": args.max_length, "micro_batch_size": args.batch, "warmup_steps": args.warmup,
            "measured_steps": args.steps, "rounds": args.reps, "eval_tokens": args.eval_tokens,
            "lever_rounds": args.lever_reps, "lever_steps": args.lever_steps, "quick": args.quick, "cases": {c: CASES[c] for c in cases},
            "step_time": "median over rounds of each run's median step time after the warm-up steps; train.py: "
                         "differences of log.jsonl 'time' (log_every=1); Trainer: perf_counter at on_step_end",
        },
        "peaks": peaks,
        "training": training,
        "packing": packing,
        "evaluation": evaluation,
        "levers": levers,
        "wall_time_s": time.time() - started,
    }
    report["targets"] = targets(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten: {out / 'bench.json'}")


def targets(report) -> list:
    """The targets of the issue, each with the measured value and whether it is met."""
    training, out = report["training"], []

    def check(what, value, goal):
        out.append({"target": what, "value": value, "goal": goal, "met": None if value is None else value >= goal})

    def ratio(case):
        return training[case]["ratio"] if case in training else None

    check("train.py / Trainer tokens/s at equal precision, full fp32", ratio("full-fp32"), 1.2)
    check("train.py / Trainer tokens/s at equal precision, LoRA r16 fp32", ratio("lora_r16-fp32"), 1.2)
    for case in ("full-bf16", "lora_r16-bf16"):
        if case in training:
            check(f"train.py / Trainer tokens/s at equal precision, {case}", ratio(case), 1.2)
    check("train.py / Trainer tokens/s, each with its defaults", ratio("full-defaults"), 1.5)
    if "ratio" in report.get("packing", {}):
        check("packed / padded useful tokens/s, Alpaca-shaped rows", report["packing"]["ratio"], 2.0)
    if "full-fp32" in training and "full-fp32-plain-loss" in training:
        out.append({"target": "peak RSS, full fp32: fused loss below 0.7x the plain loss's and below the Trainer's",
                    "value": training["full-fp32"]["train.py"]["peak_cpu_rss_mb"]
                    / training["full-fp32-plain-loss"]["train.py"]["peak_cpu_rss_mb"], "goal": 0.7,
                    "met": training["full-fp32"]["train.py"]["peak_cpu_rss_mb"]
                    < min(0.7 * training["full-fp32-plain-loss"]["train.py"]["peak_cpu_rss_mb"],
                          training["full-fp32"]["Trainer"]["peak_cpu_rss_mb"])})
    bf16_case = "full-bf16" if "full-bf16" in training else None
    if bf16_case:
        check("full fine-tuning MFU of the bf16 matrix-product peak", training[bf16_case]["train.py"]["mfu"], 0.40)
    if "full-fp32" in training:
        check("full fine-tuning MFU of the fp32 matrix-product peak (bf16 not native here)" if not bf16_case else
              "full fine-tuning MFU of the fp32 matrix-product peak", training["full-fp32"]["train.py"]["mfu"], 0.40)
    for precision in ("fp32", "bf16"):
        full, lora = f"full-{precision}", f"lora_r16-{precision}"
        if full in training and lora in training:
            check(f"LoRA r16 / full tokens/s at the same batch, train.py {precision}",
                  training[lora]["train.py"]["tokens_per_s"] / training[full]["train.py"]["tokens_per_s"], 1.3)
    return out


def print_table(report) -> None:
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cpu_cores']} cores, GPUs: {', '.join(m['gpus']) or 'none'}; torch {report['versions']['torch']}, "
          f"transformers {report['versions']['transformers']}; bf16 native: {m['bf16_native']}")
    print("peaks: " + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s (n={v['n']})" for k, v in report["peaks"].items()))
    s = report["settings"]
    print(f"sequence {s['max_length']}, batch {s['micro_batch_size']} (defaults case: each side's own), "
          f"{s['warmup_steps']} warm-up + {s['measured_steps']} measured steps, {s['rounds']} rounds\n")
    print(f"{'case':<26}{'side':<10}{'tokens/s':>10}{'step s':>9}{'MFU':>7}{'peak RSS MB':>13}{'whole-run tok/s':>17}{'ratio':>7}")
    for case, row in report["training"].items():
        for side in ("train.py", "Trainer"):
            r = row[side]
            ratio = f"{row['ratio']:.2f}" if side == "train.py" else ""
            print(f"{case if side == 'train.py' else '':<26}{side:<10}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.2f}"
                  f"{100 * r['mfu']:>6.1f}%{r['peak_cpu_rss_mb']:>13.0f}{r['whole_run_tokens_per_s']:>17.0f}{ratio:>7}")
    pk = report.get("packing", {})
    print()
    if "ratio" in pk:
        for side in ("packed", "padded"):
            print(f"alpaca-shaped rows, full, train.py {side:<7}{pk[side]['useful_tokens_per_s']:>8.0f} useful tokens/s  "
                  f"({pk[side]['runs'][-1]['packing']})")
        print(f"packed / padded useful tokens/s: {pk['ratio']:.2f}")
    ev = report["evaluation"]
    print()
    if "skipped" in ev:
        print(f"evaluation: skipped ({ev['skipped']})")
    else:
        for side in ("evaluate.py", "plain loop"):
            print(f"perplexity  {side:<12}{ev[side]['tokens_per_s']:>9.0f} tokens/s  ppl {ev[side]['ppl']:.4f}  batch {ev[side]['batch_size']}")
        print(f"perplexity  ratio {ev['ratio']:.2f}")
    lv = report["levers"]
    print()
    if "levers" in lv:
        print(f"{'lever (plain loop)':<18}{'step s':>9}{'tokens/s':>10}{'x base':>8}{'MFU':>7}  what")
        for name, r in lv["levers"].items():
            print(f"{name:<18}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}{r['speedup_vs_baseline']:>8.2f}{100 * r['mfu']:>6.1f}%  {r['what']}")
        if "bf16_autocast" in lv:
            print(f"bf16_autocast: {lv['bf16_autocast']}")
    else:
        print(f"levers: skipped ({lv['skipped']})")
    print()
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"target {t['target']}: {value} (goal {t['goal']}) {verdict}")


if __name__ == "__main__":
    main()
