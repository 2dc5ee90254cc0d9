"""Runs -> one comparison: report.md, report.html (the same, self-contained, with the plots and the generations
side by side: tunebench/report_html.py), report.csv, report.json, loss_curves.png, pareto.png, and with
what a suite adds: lr_sweep.png (its learning-rate search), learning_forgetting.png (a general text),
grid.png (grids over recipe keys).

    python evaluate.py report runs/A runs/B ... --out reports/NAME [--search runs/SUITE/search]

report.md opens with the recommendation (tunebench/verdict.py): for each budget, the method to pick.

A row per method. Runs whose folder names differ only by a `-seedN` suffix (full-seed1,
full-seed2) are one recipe trained with several seeds: their row holds the mean and the sample
standard deviation (mean ± std). A run without summary.json did not finish: it shows as failed
with its error (error.txt, written by the compare driver, or the last step of its log), and the
other runs still report. Numbers are copied from summary.json and eval.json, never recomputed.
"""
import csv
import io
import json
import math
import os
import random
import re
import statistics
from pathlib import Path

import yaml

from tunebench import inputs, rundir, verdict
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.rundir import write_atomic, write_json


# (summary.json key, column header, how to format it)
TRAIN_COLUMNS = [
    ("trainable_params", "trainable params", "params"),
    ("artifact_mb", "size on disk (MB)", "mb"),
    ("train_time_s", "train time (s)", "seconds"),
    ("tokens_per_s", "tokens/s", "rate"),
    ("peak_gpu_mem_mb", "peak GPU mem (MB)", "mb"),
    ("peak_cpu_rss_mb", "peak CPU mem (MB)", "mb"),
    ("optimizer_state_mb", "optimizer state (MB)", "mb"),
    ("best_train_loss", "best train loss", "loss"),
    ("best_val_loss", "best val loss", "loss"),
]
# eval.json numbers that describe how a task was measured rather than a result: shown in the setting,
# as are its text values (precision, data file). Every other number is a result column.
EVAL_SETTINGS = {"tokens", "words", "bytes", "windows", "stride", "max_length", "max_tokens", "batch_size",
                 "examples", "limit", "num_beams", "max_new_tokens", "prompt_tokens", "seed",
                 "judge_temperature", "judge_examples", "judge_scored", "judge_failed", "judge_pairwise_verdicts",
                 "judge_pairwise_failed", "judge_pairwise_unmatched", "judge_pairwise_scored", "judge_pairwise_inconsistent",
                 "judge_pairwise_unscored"}


# ---- reading runs ------------------------------------------------------------------------------------

def _read_json(path: Path, advice: str):
    """A run's JSON file, None when absent; a damaged one is an error naming it (never read as missing)."""
    return inputs.read_json_object(path, advice=advice) if path.is_file() else None


def _error_text(run_dir: Path, log: list, recipe: dict) -> str:
    """Why a run has no summary.json: the last meaningful line of error.txt, else where its log stops."""
    error_file = run_dir / "error.txt"
    if error_file.is_file():
        lines = [line.strip() for line in error_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        marked = [line for line in lines if line.startswith("error:") or re.match(r"^[\w.]*(Error|Exception)\b", line)]
        if marked or lines:
            return (marked or lines)[-1]
    if log:
        total = ((recipe or {}).get("train") or {}).get("max_steps")
        of = f" of {total}" if total else ""
        return f"unfinished: its log stops at step {log[-1].get('step')}{of} and no error was recorded (resume it by running it again)"
    return "no summary.json, log or error.txt: the run never started"


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json", "; delete it and run the command that wrote it again")
    evaluation = _read_json(run_dir / "eval.json", "; delete it and evaluate the run again") or {}
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recipe = None
    log = rundir.read_log(run_dir / "log.jsonl")
    method = (summary or {}).get("method") or ((recipe or {}).get("method") or {}).get("type") or "—"
    run = {
        "name": run_dir.name,
        "dir": str(run_dir),
        "method": method,
        "label": method_label(summary, recipe, method),
        "finished": summary is not None,
        "summary": summary or {},
        "eval": evaluation.get("tasks") or {},
        "items": evaluation.get("items") or {},
        "recipe": recipe or {},
        "log": log,
        "error": None if summary is not None else _error_text(run_dir, log, recipe),
        "generations": rundir.read_generations(run_dir),
        "eval_seed": (evaluation.get("settings") or {}).get("seed"),
    }
    if summary is not None and (run_dir / "error.txt").is_file():
        run["error"] = "evaluation failed: " + _error_text(run_dir, [], recipe)  # trained, then not evaluated
    return run


def method_label(summary, recipe, method: str) -> str:
    """The method and its key settings ("LoRA r16 + DoRA"): summary.json's, else made from the recipe
    (a failed run), else the method type (a run from before labels)."""
    if (summary or {}).get("method_label"):
        return summary["method_label"]
    from tunebench.methods import label

    try:
        return label((recipe or {}).get("method") or {})
    except (KeyError, TypeError, AttributeError):
        return method


# ---- generations side by side ------------------------------------------------------------------------

GENERATION_EXAMPLES = 5  # prompts shown side by side
PROMPT_CHARS = 1000  # a longer prompt shows its end (what the model read last); generations.jsonl has it whole


def side_by_side(runs: list, count: int = GENERATION_EXAMPLES):
    """A handful of held-out prompts of the first generation task the runs were evaluated on, chosen with
    the evaluation seed among the prompts every such run answered, with the reference and each run's
    output (and the judge's score where there is one). None without generations."""
    with_texts = [r for r in runs if r["finished"] and r["generations"]]
    if not with_texts:
        return None
    task = with_texts[0]["generations"][0]["task"]
    per_run = {}
    for run in with_texts:
        records = {(g["prompt"], g["reference"]): g for g in run["generations"] if g.get("task") == task}
        if records:
            per_run[run["name"]] = records
    first = next(iter(per_run.values()))
    common = [key for key in first if all(key in records for records in per_run.values())]
    seed = next((r["eval_seed"] for r in with_texts if r["eval_seed"] is not None), 42)
    chosen = sorted(random.Random(seed).sample(range(len(common)), min(count, len(common))))
    examples = []
    for i in chosen:
        key = common[i]
        examples.append({"id": first[key].get("id"), "prompt": key[0], "reference": key[1],
                         "outputs": {name: records[key].get("output", "") for name, records in per_run.items()},
                         "judge_scores": {name: records[key].get("judge_score") for name, records in per_run.items()}})
    return {"task": task, "seed": seed, "prompts": len(common), "examples": examples}


def shown_prompt(prompt: str) -> str:
    return prompt if len(prompt) <= PROMPT_CHARS else f"… ({len(prompt) - PROMPT_CHARS} characters before) " + prompt[-PROMPT_CHARS:]


def _fenced(text: str) -> list:
    fence = "~~~"
    while fence in text:
        fence += "~"
    return [fence + "text", text if text else "(empty)", fence]


def side_by_side_markdown(view: dict) -> list:
    lines = [f"{len(view['examples'])} held-out prompts of task `{view['task']}`, chosen with seed {view['seed']} among the "
             f"{view['prompts']} every model answered: the reference, then what each model wrote (`generations.jsonl` "
             "in each run folder has them all)."]
    for number, example in enumerate(view["examples"], 1):
        lines += ["", f"### Prompt {number} (example {example['id']})", "", *_fenced(shown_prompt(example["prompt"])), "",
                  "**Reference**", "", *_fenced(example["reference"])]
        for name, output in example["outputs"].items():
            score = example["judge_scores"].get(name)
            lines += ["", f"**{name}**" + (f" (judge: {score:g}/100)" if _number(score) is not None else ""), "", *_fenced(output)]
    return lines


# ---- the table ---------------------------------------------------------------------------------------

def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def eval_columns(runs: list) -> list:
    """(task, metric) of every numeric result in any eval.json, in order of first appearance."""
    columns = []
    for run in runs:
        for task, metrics in run["eval"].items():
            if not isinstance(metrics, dict):
                continue
            for metric, value in metrics.items():
                if metric not in EVAL_SETTINGS and _number(value) is not None and (task, metric) not in columns:
                    columns.append((task, metric))
    return columns


def run_values(run: dict, evals: list, derived: dict = None) -> dict:
    summary = run["summary"]
    values = {"lr": _number((run["recipe"].get("train") or {}).get("lr")) if run["method"] != "baseline" else None}
    values.update({key: _number(summary.get(key)) for key, _, _ in TRAIN_COLUMNS})
    total = _number(summary.get("total_params"))
    values["total_params"] = total
    values["trainable_pct"] = 100.0 * values["trainable_params"] / total if total and values["trainable_params"] is not None else None
    for task, metric in evals:
        values[f"{task}.{metric}"] = _number((run["eval"].get(task) or {}).get(metric))
    learned = (derived or {}).get(run["name"]) or {}
    values.update(gain=learned.get("gain"), forgetting=learned.get("forgetting"))
    return values


def group_key(name: str) -> str:
    return verdict.SEED_SUFFIX.sub("", name)


def build_rows(runs: list, evals: list, derived: dict = None) -> list:
    """One row per recipe (seeds aggregated), then a row per failed run; values are means, with stds."""
    groups = {}
    for run in runs:
        if run["finished"]:
            groups.setdefault(group_key(run["name"]), []).append(run)
    rows = []
    for name, members in groups.items():
        per_run = [run_values(r, evals, derived) for r in members]
        row = {"name": name if len(members) > 1 else members[0]["name"], "method": members[0]["method"],
               "label": members[0]["label"],
               "status": "finished" if len(members) == 1 else f"{len(members)} seeds",
               "runs": [r["name"] for r in members], "error": "; ".join(r["error"] for r in members if r["error"]) or None}
        std = {}
        for key in per_run[0]:
            numbers = [v[key] for v in per_run if v[key] is not None]
            row[key] = statistics.fmean(numbers) if numbers else None
            if numbers and all(isinstance(n, int) for n in numbers) and row[key].is_integer():
                row[key] = int(row[key])
            if len(numbers) > 1:
                std[key] = statistics.stdev(numbers)
        row["std"] = std
        rows.append(row)
    for run in runs:
        if not run["finished"]:
            row = {"name": run["name"], "method": run["method"], "label": run["label"], "status": "failed", "runs": [run["name"]],
                   "error": run["error"], "std": {}}
            row.update({key: None for key in run_values(run, evals, derived)})
            rows.append(row)
    return rows


def _format(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "params":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{value:.3g}%"
    if kind in ("mb", "seconds"):
        return f"{value:.1f}"
    if kind == "rate":
        return f"{value:.0f}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "nats":
        return f"{value:+.4f}"
    if kind == "rank":
        return f"{value:d}"
    return f"{value:.4g}"


def _cell(row: dict, key: str, kind: str) -> str:
    text = _format(row.get(key), kind)
    if row.get(f"{key}_low") is not None:  # an interval (gain, forgetting) says more than a standard deviation
        return f"{text} [{_format(row[f'{key}_low'], kind)}, {_format(row[f'{key}_high'], kind)}]"
    if row["std"].get(key):  # identical values across seeds (a parameter count) need no "± 0"
        text += f" ± {_format(row['std'][key], kind)}"
    return text


METRIC_NAMES = {"word_ppl": "word ppl", "bits_per_byte": "bits/byte", "tokens_per_s": "eval tokens/s",
                "judge_score": "judge score (0-100)", "judge_win_rate": "judge win rate vs baseline"}


def _eval_name(task: str, metric: str) -> str:
    name = METRIC_NAMES.get(metric, metric)
    if task == verdict.GENERAL:
        return f"general-text {name}"
    return name if task == "ppl" else f"{task} {name}"  # the task "ppl" scores the user's own text file


def table_columns(evals: list, derived: bool = False) -> list:
    """(key, header, kind) of every column after name, method and status."""
    columns = [("lr", "lr", "lr")] + TRAIN_COLUMNS + [(f"{task}.{metric}", _eval_name(task, metric), "metric") for task, metric in evals]
    if derived:
        columns += [("gain", "gain (nats/token) [95%]", "nats"), ("rank", "rank", "rank"),
                    ("forgetting", "forgetting (nats/token) [95%]", "nats")]
    return columns


def markdown_table(rows: list, evals: list, derived: bool = False) -> str:
    # The general text's perplexity is its one column here (its other figures are in report.csv).
    columns = [c for c in table_columns(evals, derived)
               if not c[0].startswith(verdict.GENERAL + ".") or c[0] == f"{verdict.GENERAL}.ppl"]
    header = ["method", "name", "status"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    for row in rows:
        cells = [row["label"], row["name"], row["status"]]
        for key, _, kind in columns:
            cell = _cell(row, key, kind)
            if key == "trainable_params" and row.get("trainable_pct") is not None:
                cell += f" ({_format(row['trainable_pct'], 'pct')})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the setting ---------------------------------------------------------------------------------------

def _distinct(runs: list, get) -> dict:
    """value (as text) -> names of the runs that have it, for runs where get() gives something."""
    seen = {}
    for run in runs:
        value = get(run)
        if value not in (None, "", {}, []):
            text = ", ".join(f"{k} {v}" for k, v in sorted(value.items())) if isinstance(value, dict) else str(value)
            seen.setdefault(text, []).append(run["name"])
    return seen


def _hardware_text(hw: dict) -> str:
    parts = [f"{hw.get('cpu', '?')} ({hw.get('cpu_cores', '?')} cores)", ", ".join(hw.get("gpus") or []) or "no GPU",
             f"{hw.get('num_processes', 1)} process(es)", f"mixed precision {hw.get('mixed_precision', 'no')}"]
    if hw.get("distributed_type", "NO") != "NO":
        parts.append(hw["distributed_type"])
    return ", ".join(parts)


def _versions_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def setting(runs: list) -> dict:
    """What the numbers were measured on; several values of one item mean the runs differ there."""
    finished = [r for r in runs if r["finished"]]
    trained = [r for r in finished if r["method"] != "baseline"]
    tasks = list(dict.fromkeys(task for r in finished for task in r["eval"]))

    def summary(key):
        return lambda r: r["summary"].get(key)

    def eval_setting(task):
        return lambda r: {k: v for k, v in (r["eval"].get(task) or {}).items()
                          if k in EVAL_SETTINGS or (v is not None and _number(v) is None)}

    return {
        "model": _distinct(finished, summary("model")),
        "data": _distinct(trained, lambda r: r["summary"].get("dataset") or r["recipe"].get("data", {}).get("dataset")),
        "training tokens": _distinct(trained, summary("train_tokens")),
        "optimizer steps": _distinct(trained, summary("final_step")),
        "sequence length": _distinct(trained, summary("max_length")),
        "global batch (sequences)": _distinct(trained, summary("global_batch")),
        "packing": _distinct(trained, summary("packing")),
        "seed": _distinct(trained, lambda r: (r["recipe"].get("train") or {}).get("seed")),
        "hardware": _distinct(trained, lambda r: r["summary"].get("hardware") and _hardware_text(r["summary"]["hardware"])),
        "library versions": _distinct(trained, lambda r: r["summary"].get("versions") and _versions_text(r["summary"]["versions"])),
        "evaluation": {task: _distinct(finished, eval_setting(task)) for task in tasks},
    }


def _setting_lines(item: str, values: dict) -> list:
    if not values:
        return []
    if len(values) == 1:
        return [f"- **{item}**: {next(iter(values))}"]
    lines = [f"- **{item}** (differs between runs):"]
    lines += [f"  - {value}: {', '.join(names)}" for value, names in values.items()]
    return lines


def setting_markdown(s: dict) -> str:
    lines = []
    for item, values in s.items():
        if item == "evaluation":
            for task, task_values in values.items():
                lines += _setting_lines(f"evaluation {task}", task_values)
        else:
            lines += _setting_lines(item, values)
    return "\n".join(lines)


# ---- the plots -------------------------------------------------------------------------------------------

def _colors(names: list) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_loss_curves(runs: list, path: Path) -> None:
    import matplotlib.pyplot as plt

    logged = [r for r in runs if r["log"]]
    by_tokens = all("tokens" in rec for r in logged for rec in r["log"])
    x_key, x_label = ("tokens", "training tokens") if by_tokens else ("step", "optimizer step")
    colors = _colors(list(dict.fromkeys(group_key(r["name"]) for r in logged)))
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True, sharey=True)
    labelled = set()
    for run in logged:
        group = group_key(run["name"])
        label = None if group in labelled else group + ("" if run["finished"] else " (failed)")
        labelled.add(group)
        style = dict(color=colors[group], linestyle="-" if run["finished"] else ":")
        train = [(rec[x_key], rec["train_loss"]) for rec in run["log"] if rec.get("train_loss") is not None]
        val = [(rec[x_key], rec["val_loss"]) for rec in run["log"] if rec.get("val_loss") is not None]
        if train:
            ax_train.plot(*zip(*train), marker=".", markersize=4, label=label, **style)
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=label, **style)
    ax_train.set_title("train loss (mean since the previous log line)")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("loss (nats per token)")
    if logged:
        ax_val.legend(fontsize=8, loc="upper right")
    else:
        ax_train.text(0.5, 0.5, "no run has a log.jsonl", ha="center", transform=ax_train.transAxes)
    _save(fig, path)
    plt.close(fig)


def quality_metric(rows: list, evals: list) -> tuple:
    """(row key, label) of the quality shown in pareto.png: a perplexity from eval.json where the trained
    rows have one, else the best validation loss."""
    trained = [r for r in rows if r["status"] != "failed" and r["method"] != "baseline"]
    for task, metric in evals:
        key = f"{task}.{metric}"
        if metric == "ppl" and task != verdict.GENERAL and trained and all(r.get(key) is not None for r in trained):
            return key, f"{_eval_name(task, metric)} (perplexity, lower is better)"
    return "best_val_loss", "best validation loss (lower is better)"


def _frontier(points: list) -> list:
    """The points no other point beats on both axes (lower x and lower y), sorted by x."""
    best, out = math.inf, []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def plot_pareto(rows: list, evals: list, path: Path) -> tuple:
    import matplotlib.pyplot as plt

    q_key, q_label = quality_metric(rows, evals)
    use_gpu = any(r.get("peak_gpu_mem_mb") is not None for r in rows)
    mem_key = "peak_gpu_mem_mb" if use_gpu else "peak_cpu_rss_mb"
    panels = [
        ("trainable_params", "trainable parameters"),
        (mem_key, "peak GPU memory (MB)" if use_gpu else "peak CPU memory, RSS (MB)"),
        ("train_time_s", "training time (s)"),
    ]
    done = [r for r in rows if r["status"] != "failed" and r.get(q_key) is not None]
    baselines = [r for r in done if r["method"] == "baseline"]
    trained = [r for r in done if r["method"] != "baseline"]
    colors = _colors([r["name"] for r in trained])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, (x_key, x_label) in zip(axes, panels):
        points = []
        for row in trained:
            x, y = row.get(x_key), row[q_key]
            if x is None or x <= 0:
                continue
            points.append((x, y))
            ax.errorbar(x, y, yerr=row["std"].get(q_key), fmt="o", color=colors[row["name"]], capsize=3, label=row["name"])
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(points) > 1:
            ax.step(*zip(*_frontier(points)), where="post", color="grey", alpha=0.5, linewidth=1, label="Pareto front")
        for row in baselines:
            ax.axhline(row[q_key], color="black", linestyle="--", linewidth=1, label=f"{row['name']} (not trained)")
        xs = [x for x, _ in points]
        if xs and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)  # a linear axis from zero shows differences at their true proportion
        ax.set_xlabel(x_label + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(q_label)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Quality against cost: {q_label}")
    _save(fig, path)
    plt.close(fig)
    return q_key, q_label


# ---- writing ---------------------------------------------------------------------------------------------

def flat_rows(rows: list, evals: list, derived: bool = False) -> list:
    """The rows as flat dicts of plain values: what report.csv and report.json hold."""
    keys = ["total_params", "trainable_pct"] + [key for key, _, _ in table_columns(evals, derived)]
    if derived:
        keys += ["gain_low", "gain_high", "forgetting_low", "forgetting_high"]
    out = []
    for row in rows:
        flat = {"name": row["name"], "method": row["method"], "label": row["label"], "status": row["status"],
                "runs": " ".join(row["runs"])}
        for key in keys:
            flat[key] = row.get(key)
            if any(r["std"] for r in rows):
                flat[f"{key}_std"] = row["std"].get(key)
        flat["error"] = row["error"]
        out.append(flat)
    return out


def plot_lr_sweep(search: dict, path: Path) -> None:
    """The search's metric against the learning rate, per method: a line through every rate at the first
    rung, a marker per later rung, the chosen rate circled and the recipe's own rate as a dotted line."""
    import matplotlib.pyplot as plt

    methods = search["methods"]
    colors = _colors(list(methods))
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "os^Dv*"
    for name, method in methods.items():
        color = colors[name]
        for rung, info in enumerate(search["rungs"]):
            points = sorted((t["lr"], t["value"]) for t in method["trials"]
                            if t["rung"] == rung and t["value"] is not None and math.isfinite(t["value"]))
            if not points:
                continue
            label = f"{name} (rung {rung + 1}: {info['steps']} steps)" if rung == 0 else None
            ax.plot(*zip(*points), marker=markers[rung % len(markers)], color=color, alpha=0.5 if rung == 0 else 1.0,
                    linestyle="-" if rung == 0 else ":", label=label)
        for t in method["trials"]:
            if t["diverged"] and t["rung"] == 0:
                ax.axvline(t["lr"], color=color, alpha=0.3, linewidth=4)
        if method.get("best_lr") is not None and method.get("best_value") is not None and math.isfinite(method["best_value"]):
            ax.scatter([method["best_lr"]], [method["best_value"]], s=180, facecolors="none", edgecolors=color, linewidths=2)
        ax.axvline(method["recipe_lr"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale; dotted: the recipe's own, wide band: diverged)")
    metric = {"val_loss": "validation loss (lower is better)", "val_acc": "validation accuracy (higher is better)"}[search["metric"]]
    ax.set_ylabel(metric)
    ax.set_title(f"Learning-rate search: {search['rates_per_method']} rates per method, successive halving "
                 f"({' → '.join(str(r['steps']) for r in search['rungs'])} steps); circled: chosen", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_learning_forgetting(rows: list, path: Path, gain_label: str) -> None:
    """Gain on the target against forgetting on the general text, one point per method (error bars: the 95%
    intervals; a hollow point: a gain not measurably above zero)."""
    import matplotlib.pyplot as plt

    def bar(row, key):
        if row.get(f"{key}_low") is None:
            return None
        return [[row[key] - row[f"{key}_low"]], [row[f"{key}_high"] - row[key]]]

    points = [r for r in rows if r["status"] != "failed" and r.get("gain") is not None and r.get("forgetting") is not None]
    colors = _colors([r["name"] for r in points])
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in points:
        tied = row.get("gain_low") is None or row["gain_low"] <= 0
        ax.errorbar(row["gain"], row["forgetting"], xerr=bar(row, "gain"), yerr=bar(row, "forgetting"),
                    fmt="o", mfc="white" if tied else colors[row["name"]], color=colors[row["name"]], capsize=3,
                    label=f"{row['name']} (rank {row.get('rank', '—')})")
        ax.annotate(row["name"], (row["gain"], row["forgetting"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="black", linestyle="--", linewidth=1)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"learning: gain on the target (nats/token; {gain_label})")
    ax.set_ylabel("forgetting: loss on the general text vs untrained (nats/token)")
    ax.set_title("Learning against forgetting (right: learns more; down: forgets less)\n"
                 "bars: 95% intervals; hollow: gain not measurably above zero; equal ranks: tied", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def grid_series(runs: list, grid: dict, keys: list) -> dict:
    """key -> method -> [(value, run name)] for the finished runs of a grid, read from their recipes."""
    from tunebench.recipe import flatten

    out = {key: {} for key in keys}
    for run in runs:
        method = grid["methods"].get(run["name"])
        if method is None or not run["finished"]:
            continue
        flat = flatten(run["recipe"])
        for key in keys:
            if key in flat:
                out[key].setdefault(method, []).append((flat[key], run["name"]))
    return out


def grid_points_by_key(rows: list, runs: list, grid: dict, q_key: str) -> dict:
    """key -> method -> sorted [(value, mean quality, std)], the rows of that method (other keys at each value
    averaged: the marginal effect of the key)."""
    by_name = {}
    for row in rows:
        for name in row["runs"]:
            by_name[name] = row
    out = {}
    for key, methods in grid_series(runs, grid, grid["keys"]).items():
        out[key] = {}
        for method, pairs in methods.items():
            values = {}
            for value, name in pairs:
                row = by_name.get(name)
                if row is not None and row.get(q_key) is not None:
                    values.setdefault(json.dumps(value), {})[row["name"]] = row[q_key]
            out[key][method] = sorted(((json.loads(v), statistics.fmean(q.values()),
                                        statistics.stdev(q.values()) if len(q) > 1 else 0.0) for v, q in values.items()),
                                      key=lambda p: (isinstance(p[0], (int, float)) is False, p[0] if isinstance(p[0], (int, float)) else str(p[0])))
    return out


def plot_grid(points: dict, q_label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = list(points)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    methods = list(dict.fromkeys(m for per in points.values() for m in per))
    colors = _colors(methods)
    for ax, key in zip(axes[0], keys):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for per in points[key].values() for v, _, _ in per)
        labels = list(dict.fromkeys(str(v) for per in points[key].values() for v, _, _ in per))
        for method, series in points[key].items():
            xs = [v if numeric else labels.index(str(v)) for v, _, _ in series]
            ax.errorbar(xs, [q for _, q, _ in series], yerr=[s for _, _, s in series], marker="o", capsize=3,
                        color=colors[method], label=method)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif len({v for per in points[key].values() for v, _, _ in per}) > 2:
            values = [v for per in points[key].values() for v, _, _ in per]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(q_label)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Grid: the metric against each swept key (other swept keys averaged), one line per method")
    _save(fig, path)
    plt.close(fig)


def search_lines(search: dict) -> list:
    lines = [f"Each method's learning rate was chosen on {search['metric']} by successive halving with equal effort: "
             f"{search['rates_per_method']} rates per method; every rate trains {search['rungs'][0]['steps']} steps, then "
             + ", then ".join(f"the best {r['rates']} to step {r['steps']}" for r in search["rungs"][1:])
             + f" ({search['tuning_steps_per_method']} optimizer steps per method; seed {search['seed']}"
             + (f"; trial settings {', '.join(f'{k}={v}' for k, v in search['trial_overrides'].items())}" if search["trial_overrides"] else "")
             + f"). A best rate at the edge of the rates tried got up to {search['extend']} more rate(s) past that edge, "
             f"each through the same rungs; tuning tokens count every rate tried. Study: {search['storage']}.", "",
             "| method | recipe's rate | rates tried | chosen rate | its " + search["metric"] + " | added past an edge | tuning tokens | note |",
             "|---|---:|---|---:|---:|---|---:|---|"]
    for name, m in search["methods"].items():
        note = m.get("error") or (f"still at the {m['edge']} edge of the rates tried" if m.get("edge") else "")
        best = f"{m['best_lr']:.3g}" if m.get("best_lr") is not None else "—"
        value = f"{m['best_value']:.4f}" if m.get("best_value") is not None and math.isfinite(m["best_value"]) else "—"
        diverged = [f"{t['lr']:.3g}" for t in m["trials"] if t["diverged"] and t["rung"] == 0]
        if diverged:
            note = "; ".join(filter(None, [note, f"diverged at {', '.join(diverged)}"]))
        added = ", ".join(f"{r:.3g}" for r in m["extension_rates"]) or "—"
        lines.append(f"| {name} | {m['recipe_lr']:.3g} | {', '.join(f'{r:.3g}' for r in m['rates'])} | {best} | {value} | "
                     f"{added} | {m['tuning_tokens']:,} | {note or '—'} |")
    return lines


def add_intervals(rows: list, derived: dict) -> None:
    """Each trained row's 95% intervals of gain and forgetting and its rank (tied rows share one)."""
    trained = [r for r in rows if r["status"] != "failed" and r["method"] != "baseline" and r.get("gain") is not None]
    rank = verdict.ranks(trained, derived)
    for row in trained:
        row["rank"] = rank[row["name"]]
        for key in ("gain", "forgetting"):
            if row.get(key) is not None:
                found = verdict.estimate(row, derived, key)
                row[f"{key}_low"], row[f"{key}_high"] = found["low"], found["high"]


def write_report(run_dirs: list, out: Path, search_dir=None, grid: dict = None, packing: str = None) -> Path:
    """packing: how a suite made packing the same for every run (tunebench.compare), for the setting."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    evals = eval_columns(runs)
    derived = verdict.learning_and_forgetting(runs)
    has_derived = any(v["gain"] is not None for v in derived.values())
    rows = build_rows(runs, evals, derived)
    add_intervals(rows, derived)
    use_gpu = any(r.get("peak_gpu_mem_mb") is not None for r in rows)
    for row in rows:
        row["peak_mem_mb"] = row.get("peak_gpu_mem_mb" if use_gpu else "peak_cpu_rss_mb")
        row["recipe"] = group_key(row["name"])  # its search entry (a recipe, or a recipe at a grid point)
    search = _read_json(Path(search_dir) / "search.json", "; delete it and run the suite again") if search_dir else None
    seeded = any(len(r["runs"]) > 1 for r in rows if r["status"] != "failed")
    out.mkdir(parents=True, exist_ok=True)

    plot_loss_curves(runs, out / "loss_curves.png")
    q_key, q_label = plot_pareto(rows, evals, out / "pareto.png")
    plots = ["- `loss_curves.png`: train and validation loss of every run against training tokens.",
             f"- `pareto.png`: {q_label} against trainable parameters, peak memory and training time; "
             "the dashed line is the model before training, the grey steps the Pareto front."]
    the_setting = setting(runs)
    if packing:
        the_setting["packing"] = {packing: [r["name"] for r in runs if r["finished"] and r["method"] != "baseline"]}
    flat = flat_rows(rows, evals, has_derived)

    memory = "peak GPU memory" if use_gpu else "peak CPU memory (RSS)"
    warnings = verdict.edge_warnings(search)
    md = [f"# Comparison of {len(runs)} runs", "", "## Recommendation", "", *(line for w in warnings for line in (w, "")),
          *verdict.recommendation(rows, derived, search, seeded, memory), "",
          f"Gain: {verdict.gain_source(runs)}; forgetting: ln(perplexity) on the general text, trained minus untrained "
          "(positive: worse than before training). Both in nats per token.", "",
          "## Results", "", markdown_table(rows, evals, has_derived), ""]
    md.append("Trainable params in parentheses: share of all parameters (tied weights counted once). "
              "Memory and sizes in MiB; train time excludes validation and start-up. lr: the rate the run trained at. "
              "— : not measured for that row.")
    if any(r["std"] for r in rows):
        md.append("Rows with several seeds (runs named NAME-seedN) show mean ± sample standard deviation.")
    if has_derived:
        md += ["", "## Noise", "", *verdict.noise_lines(rows, derived, seeded)]
    scores = verdict.score_lines(runs, rows)
    if scores:
        md += ["", "## Generation scores against the untrained model", "", *scores]
    if search:
        plot_lr_sweep(search, out / "lr_sweep.png")
        plots.append("- `lr_sweep.png`: the search's validation metric against the learning rate, per method and rung; "
                     "circled: the rate chosen, dotted: the recipe's own.")
        md += ["", "## Learning-rate search", "", *search_lines(search)]
    if any(r.get("forgetting") is not None for r in rows):
        plot_learning_forgetting(rows, out / "learning_forgetting.png", verdict.gain_source(runs))
        plots.append("- `learning_forgetting.png`: gain on the target against the loss on the general text, per method.")
    grid_data = None
    if grid and grid.get("keys"):
        grid_data = grid_points_by_key(rows, runs, grid, q_key)
        plot_grid(grid_data, q_label, out / "grid.png")
        plots.append("- `grid.png`: the metric against each swept key, one line per method.")
        md += ["", "## Grid", "", f"{q_label} at each value of each swept key (other swept keys averaged):", ""]
        for key, methods in grid_data.items():
            values = list(dict.fromkeys(json.dumps(v) for per in methods.values() for v, _, _ in per))
            md += [f"| {key} | " + " | ".join(json.loads(v).__repr__() if not isinstance(json.loads(v), str) else json.loads(v)
                                             for v in values) + " |", "|---|" + "---:|" * len(values)]
            for method, series in methods.items():
                cells = {json.dumps(v): f"{q:.4g}" for v, q, _ in series}
                md.append(f"| {method} | " + " | ".join(cells.get(v, "—") for v in values) + " |")
            md.append("")
    failed = [r for r in rows if r["error"]]
    if failed:
        md += ["", "## Failed", ""] + [f"- **{r['name']}**: {r['error']}" for r in failed]
    view = side_by_side(runs)
    if view:
        md += ["", "## Generations side by side", "", *side_by_side_markdown(view)]
    md += ["", "## Setting", "", setting_markdown(the_setting), "", "## Plots", "", *plots, ""]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]) if flat else ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    write_atomic(out / "report.csv", buffer.getvalue())
    write_json(out / "report.json", {
        "rows": flat,
        "setting": the_setting,
        "quality_in_pareto": q_key,
        "search": search,
        "grid": grid_data,
        "generations": view,
        "runs": [{k: r[k] for k in ("name", "dir", "method", "finished", "error", "summary", "eval")} for r in runs],
    })
    write_atomic(out / "report.md", "\n".join(md))
    from tunebench import report_html

    write_atomic(out / "report.html", report_html.page("\n".join(md), out, view))
    return out / "report.md"


@command
def main(argv=None):
    parser = ArgumentParser(usage_hint="evaluate.py report RUN_DIR [RUN_DIR ...] --out reports/NAME", prog="evaluate.py report", description="Aggregate run folders into one report.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/full runs/lora_r16")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, report.json and the plots")
    parser.add_argument("--search", default=None, help="a suite's search folder (runs/SUITE/search, with search.json)")
    args = parser.parse_args(argv)
    for run in args.runs:
        path = Path(run)
        if not path.is_dir():
            raise UserError(f"run folder '{run}' does not exist; give folders that train.py or evaluate.py wrote")
        if not any((path / f).exists() for f in ("summary.json", "recipe.yaml", "error.txt", "log.jsonl")):
            raise UserError(f"'{run}' is not a run folder (no summary.json, recipe.yaml, log.jsonl or error.txt)")
    if len({Path(r).name for r in args.runs}) < len(args.runs):
        raise UserError("two run folders have the same name; the report names rows by folder name")
    out = inputs.writable_folder(args.out, "--out")
    if args.search and not (Path(args.search) / "search.json").is_file():
        raise UserError(f"--search '{args.search}' has no search.json; give the search folder of a suite (runs/SUITE/search)")
    path = write_report(args.runs, out, search_dir=args.search)  # reads every run before it writes
    print(path)
    return path


if __name__ == "__main__":
    main()
