"""Run folders -> the rows a report compares. Each run is read (summary.json, eval.json, recipe.yaml,
log.jsonl, generations.jsonl, error.txt); runs whose names differ only by a `-seedN` suffix are one
row (mean, and sample standard deviation), a run that did not finish is a row of its own with its
error; gain and forgetting get their 95% intervals and ranks (tunebench/verdict.py). Also here: the
columns and their names, the flat rows of report.csv and report.json, the setting the runs were
measured on, and the points of a grid. Numbers are copied from the run files, never recomputed.
"""
import json
import math
import re
import statistics
from pathlib import Path

from tunebench import inputs, rundir, verdict
from tunebench.errors import UserError


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
                 "judge_pairwise_unscored", "version", "num_fewshot", "documents"}


# ---- reading runs ------------------------------------------------------------------------------------

def read_optional_json(path: Path, advice: str):
    """A run's JSON file, None when absent; a damaged one is an error naming it (never read as missing)."""
    return inputs.read_json_object(path, advice=advice) if path.is_file() else None


def _error_text(run_dir: Path, log: list, recipe) -> str:
    """Why a run has no summary.json: the last meaningful line of error.txt, else where its log stops."""
    error_file = run_dir / "error.txt"
    if error_file.is_file():
        lines = [line.strip() for line in error_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        marked = [line for line in lines if line.startswith("error:") or re.match(r"^[\w.]*(Error|Exception)\b", line)]
        if marked or lines:
            return (marked or lines)[-1]
    if log:
        total = recipe.train.max_steps if recipe else None
        of = f" of {total}" if total else ""
        return f"unfinished: its log stops at step {log[-1].get('step')}{of} and no error was recorded (resume it by running it again)"
    return "no summary.json, log or error.txt: the run never started"


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    summary = read_optional_json(run_dir / "summary.json", "; delete it and run the command that wrote it again")
    evaluation = read_optional_json(run_dir / "eval.json", "; delete it and evaluate the run again") or {}
    recipe = read_recipe(run_dir)
    log = rundir.read_log(run_dir / "log.jsonl")
    method = (summary or {}).get("method") or (recipe.method.type if recipe else None) or "—"
    run = {
        "name": run_dir.name,
        "dir": str(run_dir),
        "method": method,
        "label": method_label(summary, recipe, method),
        "finished": summary is not None,
        "summary": summary or {},
        "eval": evaluation.get("tasks") or {},
        "items": evaluation.get("items") or {},
        "forgetting": evaluation.get("forgetting"),  # lm-eval tasks as the forgetting measure (else the general text)
        "recipe": recipe,
        "log": log,
        "error": None if summary is not None else _error_text(run_dir, log, recipe),
        "generations": rundir.read_generations(run_dir),
        "eval_seed": (evaluation.get("settings") or {}).get("seed"),
    }
    if summary is not None and (run_dir / "error.txt").is_file():
        run["error"] = "evaluation failed: " + _error_text(run_dir, [], recipe)  # trained, then not evaluated
    return run


def read_recipe(run_dir: Path):
    """The run's recipe.yaml as a Recipe; None when there is none or it no longer loads (damaged, or
    written by a version with other keys): the report still shows the run, from its other files."""
    from tunebench.recipe import load_recipe

    if not (run_dir / "recipe.yaml").is_file():
        return None
    try:
        return load_recipe(run_dir / "recipe.yaml")
    except UserError:
        return None


def method_label(summary, recipe, method: str) -> str:
    """The method and its key settings ("LoRA r16 + DoRA"): summary.json's, else made from the recipe
    (a failed run), else the method type (a run from before labels)."""
    if (summary or {}).get("method_label"):
        return summary["method_label"]
    from tunebench.methods import label

    return label(recipe.method) if recipe else method


# ---- the rows ----------------------------------------------------------------------------------------

def finite_number(value):
    """The value if it is a finite number (not a bool), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def eval_columns(runs: list) -> list:
    """(task, metric) of every numeric result in any eval.json, in order of first appearance."""
    columns = []
    for run in runs:
        for task, metrics in run["eval"].items():
            if not isinstance(metrics, dict):
                continue
            for metric, value in metrics.items():
                if metric not in EVAL_SETTINGS and finite_number(value) is not None and (task, metric) not in columns:
                    columns.append((task, metric))
    return columns


def run_values(run: dict, evals: list, derived: dict = None) -> dict:
    summary = run["summary"]
    values = {"lr": finite_number(run["recipe"].train.lr) if run["recipe"] and run["method"] != "baseline" else None}
    values.update({key: finite_number(summary.get(key)) for key, _, _ in TRAIN_COLUMNS})
    total = finite_number(summary.get("total_params"))
    values["total_params"] = total
    values["trainable_pct"] = 100.0 * values["trainable_params"] / total if total and values["trainable_params"] is not None else None
    for task, metric in evals:
        values[f"{task}.{metric}"] = finite_number((run["eval"].get(task) or {}).get(metric))
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


METRIC_NAMES = {"word_ppl": "word ppl", "bits_per_byte": "bits/byte", "tokens_per_s": "eval tokens/s",
                "judge_score": "judge score (0-100)", "judge_win_rate": "judge win rate vs baseline"}


def _eval_name(task: str, metric: str) -> str:
    name = METRIC_NAMES.get(metric, metric)
    if task == verdict.GENERAL:
        return f"general-text {name}"
    return name if task == "ppl" else f"{task} {name}"  # the task "ppl" scores the user's own text file


def table_columns(evals: list, derived: bool = False, forgetting_unit: str = "nats/token") -> list:
    """(key, header, kind) of every column after name, method and status."""
    columns = [("lr", "lr", "lr")] + TRAIN_COLUMNS + [(f"{task}.{metric}", _eval_name(task, metric), "metric") for task, metric in evals]
    if derived:
        columns += [("gain", "gain (nats/token) [95%]", "nats"), ("rank", "rank", "rank"),
                    ("forgetting", f"forgetting ({forgetting_unit}) [95%]", "nats")]
    return columns


def quality_metric(rows: list, evals: list) -> tuple:
    """(row key, label) of the quality shown in pareto.png: a perplexity from eval.json where the trained
    rows have one, else the best validation loss."""
    trained = [r for r in rows if r["status"] != "failed" and r["method"] != "baseline"]
    for task, metric in evals:
        key = f"{task}.{metric}"
        if metric == "ppl" and task != verdict.GENERAL and trained and all(r.get(key) is not None for r in trained):
            return key, f"{_eval_name(task, metric)} (perplexity, lower is better)"
    return "best_val_loss", "best validation loss (lower is better)"


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
                          if k in EVAL_SETTINGS or (v is not None and finite_number(v) is None)}

    return {
        "model": _distinct(finished, summary("model")),
        "data": _distinct(trained, lambda r: r["summary"].get("dataset") or (r["recipe"] and r["recipe"].data.dataset)),
        "training tokens": _distinct(trained, summary("train_tokens")),
        "optimizer steps": _distinct(trained, summary("final_step")),
        "sequence length": _distinct(trained, summary("max_length")),
        "global batch (sequences)": _distinct(trained, summary("global_batch")),
        "packing": _distinct(trained, summary("packing")),
        "seed": _distinct(trained, lambda r: r["recipe"] and r["recipe"].train.seed),
        "hardware": _distinct(trained, lambda r: r["summary"].get("hardware") and _hardware_text(r["summary"]["hardware"])),
        "library versions": _distinct(trained, lambda r: r["summary"].get("versions") and _versions_text(r["summary"]["versions"])),
        "evaluation": {task: _distinct(finished, eval_setting(task)) for task in tasks},
    }


# ---- a grid's points ---------------------------------------------------------------------------------

def grid_series(runs: list, grid: dict, keys: list) -> dict:
    """key -> method -> [(value, run name)] for the finished runs of a grid, read from their recipes."""
    from tunebench.recipe import flatten

    out = {key: {} for key in keys}
    for run in runs:
        method = grid["methods"].get(run["name"])
        if method is None or not run["finished"]:
            continue
        flat = flatten(run["recipe"]) if run["recipe"] else {}
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
