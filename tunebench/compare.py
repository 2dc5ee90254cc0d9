"""Run a suite: train every recipe on the same setting, evaluate each and the untrained model, report.

    python -m tunebench.compare --suite recipes/suites/gpt2_wikitext2.yaml [--accel accelerate_configs/X.yaml]
    make compare [SUITE=recipes/suites/X.yaml] [ACCEL=accelerate_configs/Y.yaml]
    python -m tunebench.compare --suite ... --plan [--budget-gb G]   # the bill first: nothing is trained, the baseline is evaluated (forecast.py)
    make compare PLAN=1 [BUDGET_GB=G]

A suite file (recipes/suites/NAME.yaml):

    name: gpt2_wikitext2          # runs go to runs/NAME/, the report to reports/NAME/ (default: file name)
    recipes: [recipes/full.yaml, recipes/lora_r16.yaml, ...]
    overrides:                    # dotted recipe keys given to every recipe: the shared setting
      model.name: gpt2
      train.max_steps: 500        # the token budget: steps x micro_batch_size x grad_accum x max_length
      eval.tasks: [wikitext2]
    seeds: [1, 2, 3]              # optional: each recipe once per seed, runs named RECIPE-seedN
    eval_args: [--max-tokens, "40000"]   # optional: extra evaluate.py arguments, the same for every model
    search: {rates: 3, ...}       # optional: tune the learning rate of each recipe (and grid point) first (tunebench/search.py)
    grid: {method.r: [4, 16]}     # optional: every recipe once per combination of these recipe keys
    forgetting: {data_file: general.txt}   # optional: also score every model on a general text
                                           # (or on lm-eval tasks: {lm_eval: [arc_easy], metric: acc})

Every recipe keeps its own method and learning rate; everything in `overrides` is the same for all,
so all methods see the same tokens in the same order and are evaluated identically. The model as
it is (no training) is always evaluated too: the baseline row.

Each step is skipped when its result is there: a finished run (summary.json) is not trained
again, an interrupted one resumes from its checkpoints (train.py does both), an evaluated run
(eval.json with every task) is not evaluated again. A step that fails leaves error.txt (the last
lines of its output) in the run folder; the suite goes on and the report shows the run as failed.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunebench import forecast, rundir, search, suites
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.forecast import step_name
from tunebench.inputs import positive_number
from tunebench.launch import INTERRUPTED, ROOT, child_env, gpu_count, launch_prefix, run_logged
from tunebench.recipe import load_recipe
from tunebench.suites import model_source
from tunebench.verdict import GENERAL


@dataclass
class Steps:
    """How the suite's steps run: the child processes' environment, the training command's start, the
    tasks every model is evaluated on and evaluate.py's arguments. `failed` names each run whose step
    failed (its error.txt says why), apart from the results."""
    env: dict
    launcher: list
    tasks: list
    eval_args: list
    failed: list = field(default_factory=list)


def record_failure(run_dir: Path, what: str, command: list, status: int, lines: list) -> None:
    """error.txt in the run folder: the failed command and the last lines of its output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = f"{what} failed with exit status {status}: {' '.join(command)}\n" + "\n".join(lines) + "\n"
    rundir.write_atomic(run_dir / "error.txt", text)
    print(f"\n*** {run_dir.name}: {what} failed (exit status {status}); see {run_dir / 'error.txt'}; going on\n", flush=True)


def clear_failure(run_dir: Path) -> None:
    """Forget an earlier failure before trying again (a folder left empty counts as a new run)."""
    error = run_dir / "error.txt"
    if error.is_file():
        error.unlink()
        if not any(run_dir.iterdir()):
            run_dir.rmdir()


def evaluated(run_dir: Path, tasks: list) -> bool:
    """Whether eval.json holds every task already."""
    try:
        done = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")).get("tasks") or {}
    except (OSError, ValueError):
        return False
    return bool(done) and all(t in done for t in tasks)


def step(what: str, run_dir: Path, command: list, env: dict) -> bool:
    """Run one step of the suite; False (and error.txt) when it fails. Stops the suite on Ctrl-C."""
    print(f"\n=== {run_dir.name}: {what}\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    status, lines = run_logged(command, env)
    rundir.record_time(run_dir.parent, step_name(run_dir.name, what.split()[0]), time.perf_counter() - started, status)
    if status in INTERRUPTED:
        print(f"\ninterrupted during {what} of {run_dir.name}; run the same command again to resume", file=sys.stderr)
        sys.exit(status)
    if status != 0:
        record_failure(run_dir, what, command, status, lines)
        return False
    return True


def evaluate(what: str, run_dir: Path, source: list, tasks: list, args: list, env: dict) -> bool:
    """evaluate.py, unless eval.json holds every task already; False when it fails."""
    if evaluated(run_dir, tasks):
        print(f"=== {run_dir.name}: already evaluated ({run_dir / 'eval.json'})")
        return True
    return step(what, run_dir, [sys.executable, str(ROOT / "evaluate.py"), *source, *args], env)


def baseline_name(model: str, models: list) -> str:
    """The untrained model's run folder name: baseline, or baseline-MODEL when the suite has several models."""
    return "baseline" if len(models) == 1 else f"baseline-{Path(model).name}"


def judge_against(run: dict, suite: dict, models: list) -> list:
    """With a judge in eval_args, each run's answers are also compared with its untrained model's."""
    if "--judge" not in suite["eval_args"]:
        return []
    return ["--judge-against", str(suite["runs_dir"] / baseline_name(model_source(run["recipe"].model), models))]


# ---- the suite's phases ----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(usage_hint="python -m tunebench.compare --suite SUITE.yaml [--accel CONFIG.yaml]", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="recipes/suites/gpt2_wikitext2.yaml", help="suite file (default: %(default)s)")
    parser.add_argument("--accel", default=None, help="accelerate config for training, e.g. accelerate_configs/single_gpu.yaml")
    parser.add_argument("--plan", action="store_true",
                        help="train nothing: calibrate, then print every step's tokens, peak memory and time and the total "
                             "(and write runs/SUITE/plan.json)")
    parser.add_argument("--budget-gb", type=positive_number, default=None, metavar="G",
                        help="with --plan: refuse when a run's predicted peak per process does not fit in G GB")
    args = parser.parse_args(argv)
    if args.budget_gb is not None and not args.plan:
        raise UserError("--budget-gb goes with --plan: python -m tunebench.compare --suite SUITE.yaml --plan --budget-gb G")
    return args


def plan(suite: dict, args) -> list:
    """Every run of the suite, and its search when it has one, checked before anything trains."""
    if args.accel and not Path(args.accel).is_file():
        raise UserError(f"accelerate config '{args.accel}' does not exist; pick one under accelerate_configs/")
    runs = suites.plan(suite)
    suites.check_eval_args(suite, runs[0]["recipe"].eval.tasks)
    # Out of reach, the hub would be retried for about 25 s by every process: work from the cache.
    offline = os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True", "ON") and not suites.hub_reachable()
    if offline:
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    suites.check_reachable(runs)
    if suite["search_section"] is not None:
        suite["search"] = search.parse(suite)
        search.storage_of(suite["search"])  # reachable, or one line now
    if offline:
        print("the Hugging Face hub is out of reach: working offline from local files and the cache")
    return runs


def how_steps_run(suite: dict, runs: list, args) -> Steps:
    tasks = runs[0]["recipe"].eval.tasks
    eval_args = ["--tasks", ",".join(tasks), *suite["eval_args"]]
    if suite["forgetting"] is not None:  # the forgetting measure, with the same evaluation settings, in the same process
        lm_eval = suite["forgetting"].get("lm_eval")
        tasks = tasks + ([f"lm_eval:{t}" for t in lm_eval] if lm_eval else [GENERAL])
        eval_args += suites.forgetting_eval_args(suite)
    return Steps(child_env(), launch_prefix(args.accel), tasks, eval_args)


def evaluate_baselines(suite: dict, models: list, steps: Steps) -> list:
    """Each untrained model of the suite, evaluated as the runs will be: the baseline rows."""
    baselines = []
    for model in models:
        name = baseline_name(model, models)
        run_dir = suite["runs_dir"] / name
        baselines.append(run_dir)
        clear_failure(run_dir)
        if not evaluate("evaluation of the untrained model", run_dir, ["--model", model, "--out", str(run_dir)],
                        steps.tasks, steps.eval_args, steps.env):
            steps.failed.append(name)
    return baselines


def search_rates(suite: dict, args, steps: Steps) -> tuple:
    """The learning-rate search: (the best rate of each method searched, why each failed method failed)."""
    if not suite["search"]:
        return {}, {}
    # Several GPUs and one-process trials: one worker per GPU, trials side by side.
    gpus = 0 if args.accel else gpu_count()
    helpers = [subprocess.Popen([sys.executable, "-m", "tunebench.search", "--suite", str(suite["path"])],
                                env={**steps.env, "CUDA_VISIBLE_DEVICES": str(i)}) for i in range(1, gpus)]
    search.work(suite["search"], steps.launcher, {**steps.env, "CUDA_VISIBLE_DEVICES": "0"} if gpus > 1 else steps.env)
    for helper in helpers:
        helper.wait()
    found = search.results(suite["search"])
    rundir.write_json(suite["search"]["dir"] / "search.json", found)
    rates, failures = {}, {}
    for method, result in found["methods"].items():
        if result.get("best_lr") is not None and result["status"] == "done":
            rates[method] = result["best_lr"]
            print(f"search {method}: rate {result['best_lr']:g} (recipe: {result['recipe_lr']:g})")
        else:
            failures[method] = f"the learning-rate search of {method} failed: {result.get('error')}"
    return rates, failures


def train_and_evaluate(run: dict, suite: dict, models: list, rates: dict, search_failures: dict, steps: Steps) -> None:
    """Train one run at its tuned rate (or reuse the search's trial that is this run), then evaluate it."""
    run_dir = run["dir"]
    clear_failure(run_dir)
    if run["tuning"] in search_failures:
        record_failure(run_dir, "training", ["(search)"], 1, [f"error: {search_failures[run['tuning']]}"])
        steps.failed.append(run["name"])
        return
    rate = rates.get(run["tuning"])
    overrides = run["overrides"] + ([f"train.lr={rate}"] if rate is not None else [])
    try:
        recipe = load_recipe(run["recipe_path"], overrides)
        searched = rate is not None and next(m for m in suite["search"]["methods"] if m["name"] == run["tuning"])
        if searched and search.adopt(searched, rate, recipe, run_dir):
            print(f"\n=== {run['name']}: the search's trial at rate {rate:g} is this run (same recipe, "
                  f"seed and steps): reused, not trained again")
        finished = rundir.status(run_dir, recipe) == rundir.FINISHED
    except UserError:
        finished = False  # train.py says what is wrong, and the failure is recorded
    if finished:
        print(f"\n=== {run['name']}: already trained ({run_dir / 'summary.json'})")
    command = [*steps.launcher, str(ROOT / "train.py"), "--recipe", run["recipe_path"], *overrides]
    if not finished and not step("training", run_dir, command, steps.env):
        steps.failed.append(run["name"])
        return
    if not evaluate("evaluation", run_dir, ["--run", str(run_dir)], steps.tasks,
                    steps.eval_args + judge_against(run, suite, models), steps.env):
        steps.failed.append(run["name"])


def report(suite: dict, baselines: list, runs: list) -> Path:
    from tunebench.report import write_report

    grid = {"keys": list(suite["grid"]), "methods": {r["name"]: r["method"] for r in runs}} if suite["grid"] else None
    return write_report([*baselines, *(r["dir"] for r in runs)], suite["report_dir"],
                        search_dir=suite["search"]["dir"] if suite["search"] else None, packing=suite["packing"], grid=grid,
                        plan_dir=suite["runs_dir"])


@command
def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    suite = suites.load(args.suite)
    runs = plan(suite, args)
    steps = how_steps_run(suite, runs, args)
    models = list(dict.fromkeys(model_source(r["recipe"].model) for r in runs))
    if args.plan:
        def first_step() -> bool:  # the plan runs the baselines' evaluations, the suite's first step, and keeps them
            evaluate_baselines(suite, models, steps)
            return not steps.failed

        forecast.make(suite, runs, models, baseline_name, steps, args.accel, args.budget_gb, time.perf_counter() - started,
                      first_step)
        return

    baselines = evaluate_baselines(suite, models, steps)
    rates, search_failures = search_rates(suite, args, steps)
    for run in runs:
        train_and_evaluate(run, suite, models, rates, search_failures, steps)
    rundir.record_time(suite["runs_dir"], rundir.SUITE, time.perf_counter() - started, 1 if steps.failed else 0)
    report_file = report(suite, baselines, runs)

    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(f"\nsuite {suite['name']}: {len(runs)} trained run(s) + baseline in {minutes} min {seconds} s"
          + (f"; failed: {', '.join(steps.failed)}" if steps.failed else ""))
    print(f"report: {report_file}")
    sys.exit(1 if steps.failed else 0)


if __name__ == "__main__":
    main()
