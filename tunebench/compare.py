"""Run a suite: train every recipe on the same setting, evaluate each and the untrained model, report.

    python -m tunebench.compare --suite recipes/suites/gpt2_wikitext2.yaml [--accel accelerate_configs/X.yaml]
    make compare [SUITE=recipes/suites/X.yaml] [ACCEL=accelerate_configs/Y.yaml]

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

Every recipe keeps its own method and learning rate; everything in `overrides` is the same for all,
so all methods see the same tokens in the same order and are evaluated identically. The model as
it is (no training) is always evaluated too: the baseline row.

Each step is skipped when its result is there: a finished run (summary.json) is not trained
again, an interrupted one resumes from its checkpoints (train.py does both), an evaluated run
(eval.json with every task) is not evaluated again. A step that fails leaves error.txt (the last
lines of its output) in the run folder; the suite goes on and the report shows the run as failed.
"""
import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import yaml

from tunebench import inputs, rundir
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.verdict import GENERAL

ROOT = Path(__file__).resolve().parent.parent
SUITE_KEYS = {"name", "recipes", "overrides", "seeds", "eval_args", "runs_dir", "report_dir", "search", "grid", "forgetting"}
FORGETTING_KEYS = {"data_file"}
ERROR_LINES = 20
PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm: "name: 40%|####  | 4/10 [00:01<00:02, ...]"
# train.py exits 128 + SIGINT / SIGTERM after saving a checkpoint; a Python killed by them gives -2 / -15.
INTERRUPTED = {130, 143, -2, -15}


def override_text(key: str, value) -> str:
    """KEY=VALUE as train.py reads it (the value is read back as YAML)."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def load_suite(path) -> dict:
    path = Path(path)
    suite = inputs.read_yaml_mapping(path, "suite file", "pick one under recipes/suites/, e.g. recipes/suites/demo.yaml")
    unknown = sorted(set(suite) - SUITE_KEYS)
    if unknown:
        raise UserError(f"suite file '{path}' has unknown key '{unknown[0]}'; the keys are {', '.join(sorted(SUITE_KEYS))}")
    recipes = suite.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
        raise UserError(f"suite file '{path}': 'recipes' must be a list of recipe files, e.g. [recipes/full.yaml]")
    overrides = suite.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"suite file '{path}': 'overrides' must map dotted recipe keys to values, e.g. train.max_steps: 100")
    seeds = suite.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds)):
        raise UserError(f"suite file '{path}': 'seeds' must be a list of integers, e.g. [1, 2, 3]")
    eval_args = suite.get("eval_args") or []
    if not isinstance(eval_args, list):
        raise UserError(f"suite file '{path}': 'eval_args' must be a list of evaluate.py arguments, e.g. [--max-tokens, 40000]")
    name = str(suite.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"suite file '{path}': 'name' is {name!r}; use letters, digits, '.', '_' and '-' (it names runs/NAME)")
    folders = {"runs_dir": f"runs/{name}", "report_dir": f"reports/{name}"}
    for key in folders:
        if suite.get(key) is not None and not isinstance(suite[key], str):
            raise UserError(f"suite file '{path}': '{key}' must be a folder path, got {suite[key]!r}")
        folders[key] = inputs.writable_folder(suite.get(key) or folders[key], f"suite file '{path}': {key}")
    grid = suite.get("grid") or {}
    if not isinstance(grid, dict):
        raise UserError(f"suite file '{path}': 'grid' must map dotted recipe keys to lists of values, e.g. method.r: [4, 16]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"suite file '{path}': grid key '{key}' has an empty range; list its values, e.g. {key}: [a, b]")
        if key in ("name", "output_dir", "train.seed"):
            raise UserError(f"suite file '{path}': grid key '{key}' is set by the suite itself (use 'seeds' for seeds)")
        if key == "train.lr" and suite.get("search") is not None:
            raise UserError(f"suite file '{path}': a grid over train.lr and a search both set the rate; keep one")
    forgetting = suite.get("forgetting")
    if forgetting is not None:
        if not isinstance(forgetting, dict) or not forgetting.get("data_file"):
            raise UserError(f"suite file '{path}': 'forgetting' needs data_file, a general-domain text, e.g. {{data_file: general.txt}}")
        unknown = sorted(set(forgetting) - FORGETTING_KEYS)
        if unknown:
            raise UserError(f"suite file '{path}': unknown forgetting key '{unknown[0]}'; the keys are {', '.join(sorted(FORGETTING_KEYS))}")
    return {
        "name": name,
        "path": path,
        "recipes": recipes,
        "overrides": [override_text(k, v) for k, v in overrides.items()],
        "seeds": seeds,
        "eval_args": [str(a) for a in eval_args],
        **folders,
        "search_section": suite.get("search"),
        "grid": grid,
        "forgetting": forgetting,
        "search": None,  # the search plan, made by plan() once the recipes are resolved
    }


def check_eval_args(suite: dict, tasks: list) -> None:
    """evaluate.py's own parser reads the suite's eval_args now, so that a bad number fails the suite
    before any training instead of every evaluation after it."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("tunebench_evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            cli.parse_args(["--model", "m", "--tasks", ",".join(tasks), *suite["eval_args"]])
    except SystemExit:
        message = said.getvalue().strip().splitlines()[-1].removeprefix("error: ")
        raise UserError(f"suite '{suite['name']}': eval_args {suite['eval_args']}: {message}") from None


def grid_points(suite: dict, recipe_path: str) -> list:
    """[(name suffix, overrides)] of every grid combination that applies to this recipe ([("", [])] without a grid).
    A method key (method.r) applies to the recipes whose method has it; any other key to every recipe."""
    from tunebench.recipe import METHOD_KEYS, load_recipe

    method = load_recipe(recipe_path, suite["overrides"])["method"]["type"]
    axes = []
    for key, values in suite["grid"].items():
        section, _, leaf = key.partition(".")
        if section == "method" and leaf != "type" and leaf not in METHOD_KEYS[method]:
            continue
        axes.append([(key, value) for value in values])
    points = [[]]
    for axis in axes:
        points = [point + [pair] for point in points for pair in axis]
    return [("".join(f"-{key.rpartition('.')[2]}{value_text(value)}" for key, value in point),
             [override_text(key, value) for key, value in point]) for point in points]


def value_text(value) -> str:
    """A grid value as it appears in a run name (letters, digits, '.', '_')."""
    text = "_".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9._]", "_", text)


def same_examples_per_step(suite: dict, runs: list):
    """A method that adds virtual tokens (a soft prompt, a prefix) is never packed; packed, the other
    methods would see more examples per step and be validated on other rows. With one in the suite,
    no run packs (data.packing=false for every run and search trial). Returns the report's line on
    how packing was made equal, or None when no run needed it."""
    from tunebench.methods import context_tokens

    unpackable = sorted({r["recipe"]["method"]["type"] for r in runs if context_tokens(r["recipe"]["method"])})
    if not unpackable:
        return None
    why = f"{', '.join(unpackable)} add{'s' if len(unpackable) == 1 else ''} virtual tokens"
    packed = [r["name"] for r in runs if r["recipe"]["data"]["packing"]]
    if packed:
        raise UserError(f"suite '{suite['name']}': data.packing is true, but {why} and is never packed, so run "
                        f"{packed[0]} would see other examples per step than the rest; set data.packing: false or leave it unset")
    suite["overrides"].append("data.packing=false")
    for run in runs:
        run["overrides"].append("data.packing=false")
        run["recipe"]["data"]["packing"] = False
    return f"off for every run ({why}), so every method saw the same examples in the same order"


def plan(suite: dict) -> list:
    """Every training run of the suite (its name, recipe file, method, overrides and resolved recipe); also
    makes suite["search"], the search plan, when the suite asks for one."""
    from tunebench import search
    from tunebench.recipe import load_recipe

    # Validating every recipe first: a typo fails the suite now, not after hours of training.
    bases = [(path, load_recipe(path, suite["overrides"] + [f"name={Path(path).stem}"])) for path in suite["recipes"]]
    applies = {key: [path for path, _ in bases if any(o.startswith(key + "=") for _, overrides in grid_points(suite, path)
                                                      for o in overrides)] for key in suite["grid"]}
    for key, paths in applies.items():
        if not paths:
            raise UserError(f"suite grid key '{key}' applies to no recipe of the suite (a method key needs a recipe of that method)")
    runs, tunings = [], []
    for recipe_path, _ in bases:
        for suffix, grid_overrides in grid_points(suite, recipe_path):
            tuning = Path(recipe_path).stem + suffix  # the search tunes each grid point on its own
            for seed in suite["seeds"] or [None]:
                name = tuning + (f"-seed{seed}" if seed is not None else "")
                run_dir = suite["runs_dir"] / name
                overrides = suite["overrides"] + grid_overrides + [f"name={name}", f"output_dir={run_dir}"]
                if seed is not None:
                    overrides.append(f"train.seed={seed}")
                try:
                    recipe = load_recipe(recipe_path, overrides)
                except UserError as e:
                    raise UserError(f"{e} (suite grid point {tuning})" if grid_overrides else str(e)) from None
                runs.append({"name": name, "recipe_path": recipe_path, "method": Path(recipe_path).stem, "tuning": tuning,
                             "overrides": overrides, "recipe": recipe, "dir": run_dir})
            tunings.append((tuning, recipe_path, grid_overrides,
                            load_recipe(recipe_path, suite["overrides"] + grid_overrides + [f"name={tuning}"])))
    if len({r["name"] for r in runs}) < len(runs):
        raise UserError("two runs of the suite have the same name (two recipes with one file name, or grid values that "
                        "read the same in a run name); their runs would share a folder")
    if len({tuple(r["recipe"]["eval"]["tasks"]) for r in runs}) > 1 or not runs[0]["recipe"]["eval"]["tasks"]:
        raise UserError("every run of a suite is evaluated on the same tasks: set eval.tasks in the suite's overrides")
    if suite["forgetting"] is not None:
        if GENERAL in runs[0]["recipe"]["eval"]["tasks"]:
            raise UserError(f"the forgetting text is stored as task '{GENERAL}'; no eval task may have that name")
        if not Path(suite["forgetting"]["data_file"]).is_file():
            raise UserError(f"forgetting data_file '{suite['forgetting']['data_file']}' does not exist"
                            + ("; run `python -m tunebench.demo` first (make demo does)" if ".cache/demo" in suite["forgetting"]["data_file"] else ""))
    suite["packing"] = same_examples_per_step(suite, runs)
    if suite["search_section"] is not None:
        suite["search"] = search.parse(suite["search_section"], f"suite file '{suite['path']}'", tunings, suite["runs_dir"],
                                       suite["overrides"])
    return runs


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host accepts a connection (assumed yes behind a proxy)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_reachable(runs: list) -> None:
    """Every model and data set loads from a local path or the cache, or the hub answers: else one line."""
    from tunebench import data_rows
    from tunebench.models import load_config

    checked = set()
    for run in runs:
        m, d = run["recipe"]["model"], run["recipe"]["data"]
        key = (m["name"], m["gguf_file"], m["revision"], d["dataset"], d["config"])
        if key in checked:
            continue
        checked.add(key)
        try:
            load_config(m)
            data_rows.load_raw(d)
        except UserError as e:
            offline = "hub cannot be reached" in str(e) and "make demo" not in str(e)
            hint = "; `make demo` runs a comparison fully offline" if offline else ""
            raise UserError(f"{e}{hint}") from None


def model_source(model_cfg: dict) -> str:
    """The model as evaluate.py --model takes it: a hub id, a folder, or the path of a .gguf file."""
    gguf = model_cfg["gguf_file"]
    return str(Path(model_cfg["name"]) / gguf) if gguf else model_cfg["name"]


def run_logged(command: list, env: dict) -> tuple:
    """Run a command, its output streamed to the terminal; returns (exit status, last lines of output)."""
    tail = collections.deque(maxlen=64 * 1024)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        while chunk := os.read(process.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail.extend(chunk)
    except KeyboardInterrupt:
        pass  # the child got the SIGINT too: train.py saves a checkpoint and stops
    status = process.wait()
    text = bytes(tail).decode("utf-8", errors="replace")
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS_BAR.search(line)]
    return status, lines[-ERROR_LINES:]


def record_failure(run_dir: Path, what: str, command: list, status: int, lines: list) -> None:
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
    try:
        done = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")).get("tasks") or {}
    except (OSError, ValueError):
        return False
    return bool(done) and all(t in done for t in tasks)


def step(what: str, run_dir: Path, command: list, env: dict) -> bool:
    """Run one step of the suite; False (and error.txt) when it fails. Stops the suite on Ctrl-C."""
    print(f"\n=== {run_dir.name}: {what}\n$ {' '.join(command)}", flush=True)
    status, lines = run_logged(command, env)
    if status in INTERRUPTED:
        print(f"\ninterrupted during {what} of {run_dir.name}; run the same command again to resume", file=sys.stderr)
        sys.exit(status)
    if status != 0:
        record_failure(run_dir, what, command, status, lines)
        return False
    return True


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def launcher(accel) -> list:
    python = sys.executable
    return [python, "-m", "accelerate.commands.launch", "--config_file", accel] if accel else [python]


def evaluate(what: str, run_dir: Path, source: list, tasks: list, args: list, env: dict) -> bool:
    """evaluate.py, unless eval.json holds every task already; False when it fails."""
    if evaluated(run_dir, tasks):
        print(f"=== {run_dir.name}: already evaluated ({run_dir / 'eval.json'})")
        return True
    return step(what, run_dir, [sys.executable, str(ROOT / "evaluate.py"), *source, *args], env)


def judge_against(run: dict, suite: dict, models: list) -> list:
    """With a judge in eval_args, each run's answers are also compared with its untrained model's."""
    if "--judge" not in suite["eval_args"]:
        return []
    model = model_source(run["recipe"]["model"])
    name = "baseline" if len(models) == 1 else f"baseline-{Path(model).name}"
    return ["--judge-against", str(suite["runs_dir"] / name)]


@command
def main(argv=None):
    parser = ArgumentParser(usage_hint="python -m tunebench.compare --suite SUITE.yaml [--accel CONFIG.yaml]", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="recipes/suites/gpt2_wikitext2.yaml", help="suite file (default: %(default)s)")
    parser.add_argument("--accel", default=None, help="accelerate config for training, e.g. accelerate_configs/single_gpu.yaml")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    suite = load_suite(args.suite)
    if args.accel and not Path(args.accel).is_file():
        raise UserError(f"accelerate config '{args.accel}' does not exist; pick one under accelerate_configs/")
    runs = plan(suite)
    check_eval_args(suite, runs[0]["recipe"]["eval"]["tasks"])
    # Out of reach, the hub would be retried for about 25 s by every process: work from the cache.
    offline = os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True", "ON") and not hub_reachable()
    if offline:
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    check_reachable(runs)
    if suite["search"]:
        from tunebench import search

        search.storage_of(suite["search"])  # reachable, or one line now
    if offline:
        print("the Hugging Face hub is out of reach: working offline from local files and the cache")

    env = child_env()
    tasks = runs[0]["recipe"]["eval"]["tasks"]
    eval_args = ["--tasks", ",".join(tasks), *suite["eval_args"]]
    if suite["forgetting"] is not None:  # the general text, with the same evaluation settings, in the same process
        tasks = tasks + [GENERAL]
        eval_args += ["--also-ppl", f"{GENERAL}={suite['forgetting']['data_file']}"]
    failed = []

    baselines = []
    models = list(dict.fromkeys(model_source(r["recipe"]["model"]) for r in runs))
    for model in models:
        name = "baseline" if len(models) == 1 else f"baseline-{Path(model).name}"
        run_dir = suite["runs_dir"] / name
        baselines.append(run_dir)
        clear_failure(run_dir)
        if not evaluate("evaluation of the untrained model", run_dir, ["--model", model, "--out", str(run_dir)], tasks, eval_args, env):
            failed.append(name)

    tuned = {}
    if suite["search"]:
        from tunebench import search

        method_of = {m["name"]: m for m in suite["search"]["methods"]}
        # Several GPUs and one-process trials: one worker per GPU, trials side by side.
        gpus = 0 if args.accel else search.gpu_count()
        helpers = [subprocess.Popen([sys.executable, "-m", "tunebench.search", "--suite", str(suite["path"])],
                                    env={**env, "CUDA_VISIBLE_DEVICES": str(i)}) for i in range(1, gpus)]
        search.work(suite["search"], launcher(args.accel), {**env, "CUDA_VISIBLE_DEVICES": "0"} if gpus > 1 else env)
        for helper in helpers:
            helper.wait()
        found = search.results(suite["search"])
        rundir.write_json(suite["search"]["dir"] / "search.json", found)
        for method, result in found["methods"].items():
            if result.get("best_lr") is not None and result["status"] == "done":
                tuned[method] = result["best_lr"]
                print(f"search {method}: rate {result['best_lr']:g} (recipe: {result['recipe_lr']:g})")
            else:
                tuned[method] = UserError(f"the learning-rate search of {method} failed: {result.get('error')}")

    for run in runs:
        run_dir = run["dir"]
        clear_failure(run_dir)
        overrides = run["overrides"]
        rate = tuned.get(run["tuning"])
        if isinstance(rate, UserError):
            record_failure(run_dir, "training", ["(search)"], 1, [f"error: {rate}"])
            failed.append(run["name"])
            continue
        if rate is not None:
            overrides = overrides + [f"train.lr={rate}"]
        from tunebench.recipe import load_recipe

        try:
            recipe = load_recipe(run["recipe_path"], overrides)
            if rate is not None and search.adopt(method_of[run["tuning"]], rate, recipe, run_dir):
                print(f"\n=== {run['name']}: the search's trial at rate {rate:g} is this run (same recipe, "
                      f"seed and steps): reused, not trained again")
            finished = rundir.status(run_dir, recipe) == rundir.FINISHED
        except UserError:
            finished = False  # train.py says what is wrong, and the failure is recorded
        if finished:
            print(f"\n=== {run['name']}: already trained ({run_dir / 'summary.json'})")
        command = [*launcher(args.accel), str(ROOT / "train.py"), "--recipe", run["recipe_path"], *overrides]
        if not finished and not step("training", run_dir, command, env):
            failed.append(run["name"])
            continue
        if not evaluate("evaluation", run_dir, ["--run", str(run_dir)], tasks, eval_args + judge_against(run, suite, models), env):
            failed.append(run["name"])

    from tunebench.report import write_report

    report = write_report([*baselines, *(r["dir"] for r in runs)], suite["report_dir"],
                          search_dir=suite["search"]["dir"] if suite["search"] else None, packing=suite["packing"],
                          grid={"keys": list(suite["grid"]), "methods": {r["name"]: r["method"] for r in runs}} if suite["grid"] else None)
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(f"\nsuite {suite['name']}: {len(runs)} trained run(s) + baseline in {minutes} min {seconds} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"report: {report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
