"""Suite files: read and check one, then plan every run it makes, before anything trains.

A suite (recipes/suites/NAME.yaml) names recipes and the setting they share; compare.py runs it. Here
every recipe of it is resolved and checked at once, so that a typo fails the suite now and not after
hours of training: the grid's points, the seeds, the evaluation's arguments, the forgetting text,
packing made equal across methods, and whether the models and data sets can be reached.
"""
import os
import re
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.launch import ROOT, child_env, override_text
from tunebench.methods import context_tokens
from tunebench.recipe import METHOD_KEYS, ModelSettings, load_recipe
from tunebench.verdict import GENERAL

SUITE_KEYS = {"name", "recipes", "overrides", "seeds", "eval_args", "runs_dir", "report_dir", "search", "grid", "forgetting"}
FORGETTING_KEYS = {"data_file", "lm_eval", "metric", "include"}


def load(path) -> dict:
    """A suite file, every key checked; the runs themselves are planned by plan()."""
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
        if not isinstance(forgetting, dict) or bool(forgetting.get("data_file")) == bool(forgetting.get("lm_eval")):
            raise UserError(f"suite file '{path}': 'forgetting' needs data_file, a general-domain text, e.g. {{data_file: "
                            "general.txt}, or lm_eval, lm-eval tasks, e.g. {lm_eval: [arc_easy], metric: acc}; one of them")
        unknown = sorted(set(forgetting) - FORGETTING_KEYS)
        if unknown:
            raise UserError(f"suite file '{path}': unknown forgetting key '{unknown[0]}'; the keys are {', '.join(sorted(FORGETTING_KEYS))}")
        if forgetting.get("data_file") and ({"metric", "include"} & set(forgetting)):
            raise UserError(f"suite file '{path}': forgetting keys metric and include go with lm_eval, not data_file")
        if forgetting.get("lm_eval"):
            tasks = forgetting["lm_eval"] if isinstance(forgetting["lm_eval"], list) else [forgetting["lm_eval"]]
            if not all(isinstance(t, str) and t and "," not in t for t in tasks):
                raise UserError(f"suite file '{path}': forgetting lm_eval must list lm-eval task names, e.g. [arc_easy, hellaswag]")
            forgetting = {**forgetting, "lm_eval": tasks, "metric": str(forgetting.get("metric") or "acc")}
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
        "search": None,  # the search plan: search.parse() makes it once the suite is planned
    }


def forgetting_eval_args(suite: dict) -> list:
    """The evaluate.py arguments that score a suite's forgetting measure (a general text, or lm-eval tasks)."""
    forgetting = suite["forgetting"]
    if forgetting is None:
        return []
    if forgetting.get("data_file"):
        return ["--also-ppl", f"{GENERAL}={forgetting['data_file']}"]
    return (["--forgetting-lm-eval", ",".join(forgetting["lm_eval"]), "--forgetting-metric", forgetting["metric"]]
            + (["--lm-eval-include", str(forgetting["include"])] if forgetting.get("include") else []))


def check_eval_args(suite: dict, tasks: list) -> None:
    """evaluate.py reads the suite's eval_args now (`evaluate.py --check-args`, as a user could run it),
    so that a bad number, or an lm-eval task it does not know, fails the suite before any training instead
    of every evaluation after it."""
    command = [sys.executable, str(ROOT / "evaluate.py"), "--check-args", "--model", "m", "--tasks", ",".join(tasks),
               *suite["eval_args"], *forgetting_eval_args(suite)]
    said = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if said.returncode != 0:
        lines = said.stderr.strip().splitlines() or [f"exit status {said.returncode}"]
        forgetting = forgetting_eval_args(suite) if (suite["forgetting"] or {}).get("lm_eval") else []
        given = f"eval_args {suite['eval_args']}" + (f" with the forgetting measure's {forgetting}" if forgetting else "")
        raise UserError(f"suite '{suite['name']}': {given}: {lines[-1].removeprefix('error: ')}")


def grid_points(suite: dict, recipe_path: str) -> list:
    """[(name suffix, overrides)] of every grid combination that applies to this recipe ([("", [])] without a grid).
    A method key (method.r) applies to the recipes whose method has it; any other key to every recipe."""
    method = load_recipe(recipe_path, suite["overrides"]).method.type
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
    unpackable = sorted({r["recipe"].method.type for r in runs if context_tokens(r["recipe"].method)})
    if not unpackable:
        return None
    why = f"{', '.join(unpackable)} add{'s' if len(unpackable) == 1 else ''} virtual tokens"
    packed = [r["name"] for r in runs if r["recipe"].data.packing]
    if packed:
        raise UserError(f"suite '{suite['name']}': data.packing is true, but {why} and is never packed, so run "
                        f"{packed[0]} would see other examples per step than the rest; set data.packing: false or leave it unset")
    suite["overrides"].append("data.packing=false")
    for run in runs:
        run["overrides"].append("data.packing=false")
        run["recipe"].data.packing = False
    return f"off for every run ({why}), so every method saw the same examples in the same order"


def plan(suite: dict) -> list:
    """Every training run of the suite (its name, recipe file, method, overrides and resolved recipe). Also
    notes what a search would tune (suite["tunings"]: name, recipe file, grid overrides, resolved recipe
    per recipe and grid point) and how packing was made equal (suite["packing"])."""

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
    if len({tuple(r["recipe"].eval.tasks) for r in runs}) > 1 or not runs[0]["recipe"].eval.tasks:
        raise UserError("every run of a suite is evaluated on the same tasks: set eval.tasks in the suite's overrides")
    if suite["forgetting"] is not None and suite["forgetting"].get("data_file"):
        if GENERAL in runs[0]["recipe"].eval.tasks:
            raise UserError(f"the forgetting text is stored as task '{GENERAL}'; no eval task may have that name")
        if not Path(suite["forgetting"]["data_file"]).is_file():
            raise UserError(f"forgetting data_file '{suite['forgetting']['data_file']}' does not exist"
                            + ("; run `python -m tunebench.demo` first (make demo does)" if ".cache/demo" in suite["forgetting"]["data_file"] else ""))
    suite["packing"] = same_examples_per_step(suite, runs)
    suite["tunings"] = tunings
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
    from tunebench import data_rows  # torch, transformers and datasets: only once the suite is known to be good
    from tunebench.models import load_config

    checked = set()
    for run in runs:
        model, data_settings = run["recipe"].model, run["recipe"].data
        key = (model.name, model.gguf_file, model.revision, data_settings.dataset, data_settings.config)
        if key in checked:
            continue
        checked.add(key)
        try:
            load_config(model)
            data_rows.load_raw(data_settings)
        except UserError as e:
            offline = "hub cannot be reached" in str(e) and "make demo" not in str(e)
            hint = "; `make demo` runs a comparison fully offline" if offline else ""
            raise UserError(f"{e}{hint}") from None


def model_source(model: ModelSettings) -> str:
    """The model as evaluate.py --model takes it: a hub id, a folder, or the path of a .gguf file."""
    return str(Path(model.name) / model.gguf_file) if model.gguf_file else model.name
