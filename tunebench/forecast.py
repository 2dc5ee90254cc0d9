"""A suite's bill before it runs: every run and search trial with its tokens, its predicted peak memory per
process and its predicted wall time for training and evaluation, from a short calibration on this machine.

    python -m tunebench.compare --suite recipes/suites/X.yaml --plan [--budget-gb G] [--accel CONFIG.yaml]

Memory: tunebench/plan.py's prediction (train.py --plan) for each distinct setting, with the budget check
and the cheapest change that fits; and the peak the calibration measured for that setting, the figure
the table shows as predicted.

Time: for each distinct cost setting (model, method, sequence length, micro-batch, accumulation, optimizer,
validation batches, precision and launcher: cost_key) the calibration trains a copy of the suite's first
run of that setting for CALIBRATION_STEPS steps in two processes, as a search trial trains: the first stops
after two steps (a checkpoint), the second resumes and finishes. Both start as the suite starts its
children (launch.start: forked warm where it can), so their start-up is measured, not assumed:
  start                   a child's start and exit, outside train.py's own clock
  setup, setup_resumed    model, data, method, optimizer; resumed, the checkpoint's load too
  step                    one optimizer step at steady pace (the second); first_step, resumed_first_step:
                          what a process's first step adds
  validation, final_save, checkpoint   one of each (train.py's summary.json time_split_s)
The evaluation is not a copy: the plan runs the suite's own first steps, the evaluations of the untrained
models (the baseline rows), and keeps them, so the suite does not run them again. Every evaluation of that
model is predicted to take as long as its baseline's did; the calibration's cost is the training copies and
the preloading only, the same for a suite of minutes or of a night. A run's time is then start + setup + its
steps + its validations (each after step 0 assumed to improve on the best, so to save final/) + its
checkpoints, where train.py makes them (eval_every, save_every, the end, a search rung's stop). train.py caches the untrained validation for
runs that differ only in training keys (recipe.NOT_BEFORE_TRAINING): only the first of them pays it. A
trial at a later rung resumes from its checkpoint. A comparison run that is the search winner's trial
(search.adopt) trains nothing. The suite adds its own start (measured: this command's, up to the plan)
and, once, the warm starts' preloading (measured), paid by its first step. The total is what the suite has
left to do: the baselines the plan evaluated are shown with their measured time, outside it.

Not predicted: rates the search adds past an edge (`extend`), failed steps and retries, the report's
plots, steps an earlier invocation finished (the plan is for the suite run afresh), an untrained
validation cached by an earlier suite. The calibration's runs live in RUNS/.calibration and are removed.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tunebench import rundir, search, warm
from tunebench.errors import UserError
from tunebench.launch import ROOT, follow, start
from tunebench.recipe import NOT_BEFORE_TRAINING, RESULT_NEUTRAL, flatten, load_recipe, setting_without
from tunebench.report_forecast import PLAN_FILE

CALIBRATION_STEPS = 3  # two in the first process (the second at steady pace), one after resuming
COST_KEYS = ("data.max_length", "data.packing", "data.dataset", "train.micro_batch_size", "train.grad_accum",
             "train.optimizer", "train.eval_max_batches", "train.fused_loss", "train.compile")


def step_name(run: str, what: str) -> str:
    """A step's name in the plan and in the suite's timings: RUN: training, RUN: evaluation."""
    return f"{run}: {what}"


def cost_key(recipe, accel) -> str:
    """What a step's time and memory depend on; runs that share it share a calibration."""
    flat = flatten(recipe)
    kept = {k: v for k, v in flat.items() if k.startswith(("model.", "method.")) or k in COST_KEYS}
    return json.dumps({"accel": accel, **kept}, sort_keys=True, default=str)


def untrained_key(recipe) -> str:
    """Runs with the same key share train.py's cached untrained validation."""
    return json.dumps(setting_without(recipe, NOT_BEFORE_TRAINING), sort_keys=True, default=str)


def same_training(trial, run) -> bool:
    """search.adopt's test: the run is the trial (every key but the neutral ones and the rate the same)."""
    neutral = (*RESULT_NEUTRAL, "train.lr")
    return setting_without(trial, neutral) == setting_without(run, neutral)


# ---- the steps of the suite -------------------------------------------------------------------------------

def planned_steps(suite: dict, runs: list, models: list, baseline_name, accel) -> list:
    """Every step the suite will run, in its order: the baselines' evaluations, the search's trials (a row per
    rung and slot), each run's training (none when the search's trial is the run) and evaluation."""
    rows = [{"row": name, "kind": "baseline", "model": model, "eval_step": step_name(name, "evaluation")}
            for model, name in ((m, baseline_name(m, models)) for m in models)]
    plan = suite["search"]
    trials = {}
    if plan:
        for method in plan["methods"]:
            recipe = load_recipe(method["recipe_path"], method["overrides"] + [
                f"train.lr={method['rates'][0]}", f"name={method['name']}-trial", f"output_dir={method['dir'] / 'trial'}"])
            trials[method["name"]] = recipe
            before = 0
            for rung, (steps, alive) in enumerate(plan["rungs"]):
                for slot in range(alive):
                    name = search.trial_step(method["name"], rung, slot)
                    rows.append({"row": name, "kind": "trial", "recipe": recipe, "recipe_path": method["recipe_path"],
                                 "overrides": method["overrides"], "from": before, "to": steps, "total": plan["max_steps"],
                                 "train_step": name})
                before = steps
    for run in runs:
        recipe = run["recipe"]
        adopted = run["tuning"] in trials and same_training(trials[run["tuning"]], recipe)
        rows.append({"row": run["name"], "kind": "run", "recipe": recipe, "recipe_path": run["recipe_path"],
                     "overrides": run["overrides"], "from": 0, "to": 0 if adopted else recipe.train.max_steps,
                     "total": recipe.train.max_steps, "adopted": adopted, "model": model_source_of(recipe),
                     "train_step": step_name(run["name"], "training"), "eval_step": step_name(run["name"], "evaluation")})
    for row in rows:
        if "recipe" in row:
            row["cost_key"] = cost_key(row["recipe"], accel)
    return rows


def model_source_of(recipe) -> str:
    from tunebench.suites import model_source

    return model_source(recipe.model)


def tokens(row: dict, processes: int) -> int:
    """The tokens a row trains on (a reused run: those its search trial trained to its last step), padding included."""
    train, steps = row["recipe"].train, (row["total"] if row.get("adopted") else row["to"] - row["from"])
    return steps * train.micro_batch_size * train.grad_accum * processes * row["recipe"].data.max_length


# ---- memory: plan.py, and the budget ---------------------------------------------------------------------

def memory_plans(rows: list, setup, budget_gb) -> dict:
    """{cost key: plan.py's predicted peak in MB}; with a budget, one line naming the first step that does not
    fit and the cheapest change that does (train.py --plan --budget-gb's search)."""
    from tunebench import plan
    from tunebench.models import load_config

    peaks = {}
    for row in rows:
        key = row.get("cost_key")
        if key is None or key in peaks:
            continue
        recipe = row["recipe"]
        if recipe.task != "causal_lm":
            peaks[key] = None  # plan.py covers causal language modelling; the calibration measures the rest
            continue
        planner = plan.Planner(recipe, load_config(recipe.model), setup)
        prediction = planner.predict()
        peaks[key] = prediction.peak / plan.MB
        if budget_gb is not None and not plan.fits(prediction, setup, int(budget_gb * plan.GB)):
            found = plan.cheapest_fits(planner, int(budget_gb * plan.GB), how_many=1)
            change = (f"the cheapest change that fits: {' '.join(found[0][0])} ({found[0][1].peak / plan.MB:,.0f} MB)"
                      if found else "no change tried fits (micro-batch, 8-bit AdamW, checkpointing, ZeRO); try a shorter "
                      "data.max_length, a lighter method or more processes")
            raise UserError(f"{row['row']} needs {prediction.peak / plan.MB:,.0f} MB per process, over the budget of "
                            f"{budget_gb:g} GB; {change}")
    return peaks


# ---- the calibration --------------------------------------------------------------------------------------

def timed(command: list, env: dict, what: str) -> float:
    """Run a child as the suite does (warm where it can), its output kept quiet; its seconds, or one line."""
    started = time.perf_counter()
    child = start(command, env)
    status, lines = follow_quietly(child)
    if status != 0:
        raise UserError(f"the plan's calibration ({what}) failed: {(lines or [f'exit status {status}'])[-1]}")
    return time.perf_counter() - started


def follow_quietly(child) -> tuple:
    """follow(), its output not shown: the calibration prints one line per step instead."""
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        return follow(child)
    finally:
        sys.stdout.close()
        sys.stdout = saved


def calibrate_training(row: dict, launcher: list, env: dict, run_dir: Path) -> dict:
    """Two processes of CALIBRATION_STEPS steps of this row's setting: the figures the module's docstring lists."""
    command = [*launcher, str(ROOT / "train.py"), "--recipe", row["recipe_path"], *row["overrides"],
               f"train.lr={row['recipe'].train.lr}", f"train.max_steps={CALIBRATION_STEPS}", "train.eval_every=0",
               f"train.save_every={CALIBRATION_STEPS}", "train.log_every=1", "train.keep_checkpoints=1",
               "train.trackers=[]", f"name={run_dir.name}", f"output_dir={run_dir}"]
    first = timed([*command, "--stop-after-steps", "2"], env, f"{row['row']}, 2 steps")
    state = rundir.read_json(rundir.latest_checkpoint(run_dir) / rundir.STATE_FILE)
    times = {r["step"]: r["time"] for r in rundir.read_log(run_dir / "log.jsonl") if r.get("step")}
    second = timed(command, env, f"{row['row']}, resumed")
    summary = rundir.read_json(run_dir / "summary.json")
    before, after = state["time_split_s"], summary["time_split_s"]
    step = times[2] - times[1]
    setup_resumed = after["setup"] - before["setup"]
    return {
        "start": max(0.0, second - setup_resumed - summary["wall_time_s"]),
        "setup": before["setup"],
        "setup_resumed": setup_resumed,
        "step": step,
        "first_step": max(0.0, times[1] - step),
        "resumed_first_step": max(0.0, summary["train_time_s"] - times[2] - step),
        "validation": after["validation"] - before["validation"],
        "final_save": after["final_saves"] - before["final_saves"],  # the last step's validation keeps it
        "checkpoint": after["checkpoints"],
        "peak_mb": summary["peak_gpu_mem_mb"] if summary.get("peak_gpu_mem_mb") is not None else summary["peak_cpu_rss_mb"],
        "seconds": first + second,
    }


def calibrate(rows: list, launcher: list, env: dict, work: Path) -> dict:
    """{cost key: training figures}, one line printed per calibration."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    training = {}
    try:
        for row in rows:
            key = row.get("cost_key")
            if key is None or key in training:
                continue
            training[key] = calibrate_training(row, launcher, env, work / f"train-{len(training)}")
            c = training[key]
            print(f"calibrated {row['row']}: {c['step']:.2f} s a step, start-up {c['start'] + c['setup']:.1f} s, "
                  f"validation {c['validation']:.1f} s ({c['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return training


def baseline_seconds(rows: list, runs_dir: Path, evaluate_baselines) -> dict:
    """{model: seconds of its untrained evaluation}: the suite's baseline steps, run now and kept (the suite
    then finds them done); a baseline evaluated by an earlier invocation keeps the time it took then."""
    if not evaluate_baselines():
        raise UserError("the plan's evaluation of the untrained model failed; see error.txt in its run folder")
    timings = rundir.read_timings(runs_dir)
    seconds = {}
    for row in rows:
        if row["kind"] == "baseline":
            if row["eval_step"] not in timings:
                raise UserError(f"{row['row']} was evaluated before its time was recorded ({runs_dir / rundir.TIMINGS_FILE}); "
                                f"remove {runs_dir / row['row']} and plan again")
            seconds[row["model"]] = timings[row["eval_step"]]
            row["done"] = True
    return seconds


# ---- the prediction ---------------------------------------------------------------------------------------

def training_seconds(row: dict, c: dict, pays_validation: bool) -> float:
    """One training process from step `from` to `to`, as train.py's loop validates and checkpoints."""
    begin, end, total, train = row["from"], row["to"], row["total"], row["recipe"].train
    if begin == end:
        return 0.0
    seconds = c["start"] + (end - begin) * c["step"]
    if begin == 0:  # fresh: the untrained validation (cached after the first run of its key); never final/
        seconds += c["setup"] + c["first_step"] + (c["validation"] if pays_validation else 0.0)
    else:
        seconds += c["setup_resumed"] + c["resumed_first_step"]
    later = range(begin + 1, end + 1)
    validations = sum(1 for s in later if s == total or (train.eval_every and s % train.eval_every == 0))
    checkpoints = sum(1 for s in later if s == end or s == total or s % train.save_every == 0)
    return seconds + validations * (c["validation"] + c["final_save"]) + checkpoints * c["checkpoint"]


def predict(rows: list, training: dict, evaluation: dict, plan_peaks: dict, processes: int, preload_s: float) -> None:
    """Each row's tokens, peaks and seconds, in place; the suite's first step still to do starts its first warm
    child, so it pays the preloading."""
    validated = set()
    for row in rows:
        if "recipe" in row:
            c = training[row["cost_key"]]
            key = untrained_key(row["recipe"])
            pays = row["from"] == 0 and row["to"] > 0 and key not in validated
            if row["to"] > 0 and row["from"] == 0:
                validated.add(key)
            row.update(tokens=tokens(row, processes), train_s=training_seconds(row, c, pays),
                       peak_mb=c["peak_mb"], plan_peak_mb=plan_peaks[row["cost_key"]])
        if "eval_step" in row:
            row["eval_s"] = evaluation[row["model"]]
    first = next((r for r in rows if not r.get("done") and (r.get("train_s") or r.get("eval_s"))), None)
    if first is not None:
        first["train_s" if first.get("train_s") else "eval_s"] += preload_s


def as_json(rows: list) -> list:
    keys = ("row", "kind", "tokens", "peak_mb", "plan_peak_mb", "train_s", "eval_s", "adopted", "done", "from", "to",
            "train_step", "eval_step")
    return [{k: row[k] for k in keys if k in row} for row in rows]


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def table(plan: dict) -> str:
    def cell(value, digits=0):
        return "—" if value is None else f"{value:,.{digits}f}"

    width = max(len(r["row"]) for r in plan["rows"])
    lines = [f"{'step':<{width}}  {'tokens':>8}  {'peak MB':>8}  {'plan.py MB':>10}  {'train s':>8}  {'eval s':>7}"]
    for r in plan["rows"]:
        train = "reused" if r.get("adopted") else cell(r.get("train_s"), 1)
        evaluation = cell(r.get("eval_s"), 1) + (" (done)" if r.get("done") else "")
        lines.append(f"{r['row']:<{width}}  {cell(r.get('tokens')):>8}  {cell(r.get('peak_mb')):>8}  "
                     f"{cell(r.get('plan_peak_mb')):>10}  {train:>8}  {evaluation:>7}")
    return "\n".join(lines)


def totals(rows: list, suite_start_s: float, preload_s: float) -> dict:
    """The suite's time still to come (the steps the plan did, such as the baselines, apart: done_s)."""
    search_s = sum(r.get("train_s", 0) for r in rows if r["kind"] == "trial")
    total = suite_start_s + sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in rows if not r.get("done"))
    done = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in rows if r.get("done"))
    return {"total_s": total, "search_s": search_s, "search_share": search_s / total if total else 0.0,
            "suite_start_s": suite_start_s, "preload_s": preload_s, "done_s": done}


def make(suite: dict, runs: list, models: list, baseline_name, steps, accel, budget_gb, since_start: float,
         evaluate_baselines) -> dict:
    """The plan: the steps, the budget check, the baselines' evaluations (the suite's own, kept), the calibration
    and the prediction; plan.json written, the table printed. `since_start`: seconds this command took to plan
    the suite (the suite pays them too); `evaluate_baselines()`: the suite's first step, True when it worked."""
    from tunebench import plan as memory

    rows = planned_steps(suite, runs, models, baseline_name, accel)
    setup = memory.setup_from_config_file(accel)
    started = time.perf_counter()
    can_fork = warm.can_fork([sys.executable, str(ROOT / "train.py")], steps.env)
    if can_fork:
        warm.prepare()  # as the suite's first warm start does; plan.py's runtime memory then matches a child's
    preload_s = time.perf_counter() - started if can_fork else 0.0
    plan_peaks = memory_plans(rows, setup, budget_gb)
    evaluation = baseline_seconds(rows, suite["runs_dir"], evaluate_baselines)
    calibration_started = time.perf_counter()
    training = calibrate(rows, steps.launcher, steps.env, suite["runs_dir"] / ".calibration")
    calibration_s = time.perf_counter() - calibration_started + preload_s
    predict(rows, training, evaluation, plan_peaks, setup.processes, preload_s)
    result = {"suite": suite["name"], "setup": setup.describe(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average": list(os.getloadavg()), "calibration_s": calibration_s,
              **totals(rows, since_start, preload_s), "calibration": list(training.values()), "evaluation_s": evaluation,
              "rows": as_json(rows)}
    suite["runs_dir"].mkdir(parents=True, exist_ok=True)
    rundir.write_json(suite["runs_dir"] / PLAN_FILE, result)
    loads = " / ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"\nplan of suite {suite['name']} ({setup.describe()}; load averages {loads} over 1 / 5 / 15 min):\n")
    print(table(result))
    print(f"\npredicted total: {duration(result['total_s'])} ({result['total_s']:.0f} s), of which the search "
          f"{duration(result['search_s'])} ({100 * result['search_share']:.0f}%); the suite's own start "
          f"({since_start:.0f} s) included, and the warm starts' preloading ({preload_s:.0f} s) in its first step")
    print(f"done while planning, and kept: the evaluation of the untrained model ({duration(result['done_s'])}); "
          f"the suite will not run it again")
    print(f"calibration: {duration(calibration_s)} ({100 * calibration_s / result['total_s']:.0f}% of the predicted total), "
          f"{duration(calibration_s / max(1, len(training)))} for each of its {len(training)} setting(s)")
    print(f"plan: {suite['runs_dir'] / PLAN_FILE}")
    return result
