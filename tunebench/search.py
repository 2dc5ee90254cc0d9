"""The learning rate of every method of a suite, tuned with equal effort: successive halving over
train.py runs, its trials kept in an Optuna study.

    python -m tunebench.compare --suite recipes/suites/X.yaml          searches (when the suite asks), then compares
    python -m tunebench.search --suite recipes/suites/X.yaml [--workers N] [--worker-id ID]   more workers on the same study

The suite's `search:` section (all keys optional; see the README):

    search:
      rates: 3            # learning rates per method, log-spaced around the recipe's train.lr ...
      spacing: 3.16       # ... this factor apart (3 rates: lr/3.16, lr, 3.16 lr)
      lrs: {lora_r16: [1e-4, 3e-4, 1e-3]}   # or listed per recipe (by recipe file name); the same count for every method
      metric: val_loss    # val_loss (lower is better) or val_acc (classification; higher is better)
      max_steps: 12       # the longest trial (its last rung); default: the suite's train.max_steps
      first_rung: 4       # steps every rate trains before the first cut
      reduction: 3        # at each rung the best 1/reduction of the rates go on
      seed: 42            # the trials' seed (default: the suite's train.seed)
      overrides: {}       # recipe keys for the trials only, the same for every method
      extend: 2           # rates added past an edge the best rate sits at, per side (0: none)
      storage: sqlite:///runs/SUITE/search/optuna.db   # default; a postgresql:// URL shares the study between machines
      heartbeat: 30       # seconds between a running trial's heartbeats
      grace: 180          # seconds without one after which a worker of another machine is taken for dead

Successive halving, synchronous: every rate trains `first_rung` steps (train.py --stop-after-steps) and is
scored on the metric; the best 1/reduction resume exactly from their checkpoints to reduction x first_rung
steps, and so on until max_steps. Every method therefore gets the same rates count, the same rungs and the
same tuning tokens, and a rate cut at a rung costs only its rung. The best rate at the last rung is the
method's rate for the comparison runs. A method is a recipe, or a recipe at one grid point of the suite
(RECIPE-r64): each is tuned on its own.

When that best rate is the lowest or highest rate tried, a rate one spacing beyond it (the ratio of the edge
rate to its neighbour) is added and runs through the same rungs: it goes on from a rung only if it is as good
as the worst rate that went on from there, and at the last rung it is ranked with the others. Rates are
added until the best lies inside the rates tried, `extend` rates were added on that side, or an added rate
is cut or diverges (that side is then closed). Every method follows this rule.

The Optuna study (one per method, `SUITE-METHOD-HASH`) holds one trial per piece of work: a rate's first
rung, or "the k-th best rate of the rung below" for the later rungs, all enqueued when the study is made;
an added rate's rungs (slots low1, high1, ...) are enqueued one at a time, by the worker that finds every
trial before them complete. A worker claims a trial whose rung below is complete (WAITING -> RUNNING: under
a file lock for SQLite, a row lock for a server database), so no trial runs twice; a trial whose worker died
(same worker id, i.e. the same machine: its process is gone; another id: no heartbeat for `grace` seconds)
is failed and enqueued again, so none is lost. HASH is that of the trial setting (the resolved trial recipe
but its rate, the rates, rungs and metric): a changed recipe gets a new study, and the old one is left as it
was. The trials' runs live in runs/SUITE/search/METHOD-HASH/lr-RATE/ and are reused by a rerun.
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from tunebench import rundir
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.inputs import positive
from tunebench.launch import INTERRUPTED, ROOT, child_env, follow, gpu_count, launch_prefix, override_text, start
from tunebench.recipe import RESULT_NEUTRAL, Recipe, flatten, load_recipe, setting_without, to_yaml

SEARCH_KEYS = {"rates", "spacing", "lrs", "metric", "max_steps", "first_rung", "reduction", "seed", "overrides", "extend",
               "storage", "heartbeat", "grace"}
METRICS = {"val_loss": "minimize", "val_acc": "maximize"}
HASH_CHARS = 12  # of a trial setting's hash in study and folder names
HEARTBEAT_S, GRACE_S, POLL_S = 30, 180, 2.0
DIVERGED = "training loss became"  # train.py's line when the loss is no longer finite


# ---- the plan: rates and rungs, the same for every method ------------------------------------------

def rungs_for(n_rates: int, first_rung: int, reduction: int, max_steps: int) -> list:
    """[(steps, rates that train to there)] of successive halving: every rate to first_rung, then the
    best 1/reduction to reduction x first_rung, ..., the last rung at max_steps."""
    rungs, steps, alive = [], first_rung, n_rates
    while True:
        if steps >= max_steps or alive == 1:
            rungs.append((max_steps, alive))
            return rungs
        rungs.append((steps, alive))
        steps, alive = steps * reduction, max(1, alive // reduction)


def default_first_rung(n_rates: int, reduction: int, max_steps: int) -> int:
    """The first rung that brings n rates down to one at max_steps."""
    cuts, alive = 0, n_rates
    while alive > 1:
        alive, cuts = max(1, alive // reduction), cuts + 1
    return max(1, max_steps // reduction ** cuts)


def log_spaced(lr: float, n: int, spacing: float) -> list:
    return [float(f"{lr * spacing ** (i - (n - 1) / 2):.3g}") for i in range(n)]


def setting_hash(trial_recipe: Recipe, rates: list, rungs: list, metric: str) -> str:
    """What a study's trials mean: the resolved trial recipe but its rate, name and folder; the rates, rungs, metric."""
    recipe = {k: v for k, v in flatten(trial_recipe).items() if k not in ("train.lr", "name", "output_dir")}
    text = json.dumps({"recipe": recipe, "rates": rates, "rungs": rungs, "metric": metric}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:HASH_CHARS]


def _positive_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _whole(value, what: str, least: int) -> int:
    if type(value) is not int or value < least:
        raise UserError(f"{what} must be a whole number of at least {least}, got {value!r}")
    return value


def parse(suite: dict) -> dict:
    """The planned suite's `search:` section checked against its methods (suite["tunings"]: name, recipe
    file, grid overrides and resolved recipe per recipe and grid point): every rate, rung and trial recipe."""
    section, where, methods = suite["search_section"], f"suite file '{suite['path']}'", suite["tunings"]
    runs_dir, overrides = suite["runs_dir"], suite["overrides"]
    if not isinstance(section, dict):
        raise UserError(f"{where}: 'search' must be a mapping, e.g. {{rates: 3, metric: val_loss}}")
    unknown = sorted(set(section) - SEARCH_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown search key '{unknown[0]}'; the keys are {', '.join(sorted(SEARCH_KEYS))}")
    metric = section.get("metric", "val_loss")
    if metric not in METRICS:
        raise UserError(f"{where}: search metric '{metric}' is not one of {', '.join(METRICS)}")
    tasks = {recipe.task for _, _, _, recipe in methods}
    if metric == "val_acc" and tasks != {"classification"}:
        raise UserError(f"{where}: search metric 'val_acc' needs task classification; a causal_lm run logs val_loss only")
    names = list(dict.fromkeys(Path(path).stem for _, path, _, _ in methods))
    lrs = section.get("lrs") or {}
    if not isinstance(lrs, dict):
        raise UserError(f"{where}: search 'lrs' must map recipe names to lists of rates, e.g. {{full: [1e-5, 3e-5]}}")
    for name, listed in lrs.items():
        if name not in names:
            raise UserError(f"{where}: search 'lrs' names '{name}', which is not a recipe of the suite ({', '.join(names)})")
        if not isinstance(listed, list) or not listed:
            raise UserError(f"{where}: search 'lrs' of '{name}' is an empty range; list at least one rate, e.g. [1e-4, 3e-4]")
        lrs[name] = sorted(_positive_number(v, f"{where}: search 'lrs' of '{name}'") for v in listed)
        if len(set(lrs[name])) < len(lrs[name]):
            raise UserError(f"{where}: search 'lrs' of '{name}' lists a rate twice")
    counts = {len(v) for v in lrs.values()}
    if "rates" in section:
        counts.add(_whole(section["rates"], f"{where}: search 'rates'", 1))
    if len(counts) > 1:
        raise UserError(f"{where}: every method gets the same number of rates (equal effort); 'rates' and 'lrs' give "
                        f"{', '.join(map(str, sorted(counts)))}")
    n_rates = counts.pop() if counts else 3
    spacing = _positive_number(section.get("spacing", 3.16), f"{where}: search 'spacing'")
    if spacing <= 1 and n_rates > 1:
        raise UserError(f"{where}: search 'spacing' must be above 1 (the factor between neighbouring rates), got {spacing}")
    reduction = _whole(section.get("reduction", 3), f"{where}: search 'reduction'", 2)
    base_steps = {recipe.train.max_steps for _, _, _, recipe in methods}
    max_steps = section.get("max_steps", base_steps.pop() if len(base_steps) == 1 else None)
    if max_steps is None:
        raise UserError(f"{where}: set search 'max_steps' (the longest trial), or one train.max_steps for every recipe "
                        "and grid point of the suite")
    max_steps = _whole(max_steps, f"{where}: search 'max_steps'", 1)
    first_rung = _whole(section.get("first_rung", default_first_rung(n_rates, reduction, max_steps)),
                        f"{where}: search 'first_rung'", 1)
    if first_rung > max_steps:
        raise UserError(f"{where}: search 'first_rung' ({first_rung}) is beyond 'max_steps' ({max_steps})")
    trial_overrides = section.get("overrides") or {}
    if not isinstance(trial_overrides, dict):
        raise UserError(f"{where}: search 'overrides' must map dotted recipe keys to values, e.g. data.max_length: 64")
    for key in ("train.lr", "train.max_steps", "train.seed", "name", "output_dir"):
        if key in trial_overrides:
            raise UserError(f"{where}: search 'overrides' cannot set {key}; the search sets it (see search 'max_steps', 'seed')")
    seed = section.get("seed", methods[0][3].train.seed)
    if type(seed) is not int:
        raise UserError(f"{where}: search 'seed' must be a whole number, got {seed!r}")
    extend = _whole(section.get("extend", 2), f"{where}: search 'extend'", 0)
    storage = section.get("storage") or default_storage(runs_dir)
    if not isinstance(storage, str):
        raise UserError(f"{where}: search 'storage' must be a database URL, e.g. sqlite:///runs/search.db")
    heartbeat = _whole(section.get("heartbeat", HEARTBEAT_S), f"{where}: search 'heartbeat'", 1)
    grace = _whole(section.get("grace", GRACE_S), f"{where}: search 'grace'", 1)
    if grace <= heartbeat:
        raise UserError(f"{where}: search 'grace' ({grace} s) must be longer than 'heartbeat' ({heartbeat} s), "
                        "or a live worker is taken for dead between two heartbeats")

    rungs = rungs_for(n_rates, first_rung, reduction, max_steps)
    trial_settings = [override_text(k, v) for k, v in trial_overrides.items()] + [
        f"train.max_steps={max_steps}", f"train.seed={seed}", f"train.save_every={max_steps}", "train.keep_checkpoints=1"]
    planned = []
    for name, path, grid_overrides, recipe in methods:
        rates = lrs.get(Path(path).stem) or log_spaced(recipe.train.lr, n_rates, spacing)
        # Every rung's last step validated: at the run's own eval_every where it does (the winner's last
        # rung is then the comparison run itself), else at every first_rung steps.
        eval_every = recipe.train.eval_every if recipe.train.eval_every and first_rung % recipe.train.eval_every == 0 else first_rung
        shared = overrides + grid_overrides + trial_settings + [f"train.eval_every={eval_every}"]
        trial = load_recipe(path, shared + [f"train.lr={rates[0]}", f"output_dir={runs_dir / 'search' / name}"])  # checks the keys
        tag = f"{name}-{setting_hash(trial, rates, rungs, metric)}"
        planned.append({"name": name, "recipe_path": path, "recipe_lr": recipe.train.lr, "rates": rates,
                        "dir": runs_dir / "search" / tag, "overrides": shared, "task": trial.task,
                        "study": f"{runs_dir.name}-{tag}"})
    return {"metric": metric, "direction": METRICS[metric], "rungs": rungs, "n_rates": n_rates, "reduction": reduction,
            "max_steps": max_steps, "first_rung": first_rung, "seed": seed, "extend": extend, "storage": storage,
            "heartbeat": heartbeat, "grace": grace, "methods": planned, "dir": runs_dir / "search", "trial_overrides": trial_overrides}


def tuning_steps(plan: dict) -> int:
    """Optimizer steps one method's search trains when nothing diverges (the same for every method)."""
    total, before = 0, 0
    for steps, alive in plan["rungs"]:
        total, before = total + alive * (steps - before), steps
    return total


# ---- the Optuna storage ----------------------------------------------------------------------------

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def default_storage(runs_dir: Path) -> str:
    return f"sqlite:///{runs_dir / 'search' / 'optuna.db'}"


def storage_of(plan: dict):
    return open_storage(plan["storage"], make_folder=plan["dir"] if plan["storage"] == default_storage(plan["dir"].parent) else None,
                        heartbeat=plan["heartbeat"], grace=plan["grace"])


def sqlite_path(url: str):
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def driver_url(url: str) -> str:
    """A postgresql:// URL with the driver the requirements install (psycopg 3): SQLAlchemy 2.0's default
    for a bare postgresql:// is psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def shown_url(url: str) -> str:
    """The URL as printed and kept in search.json: its password, if any, as ***."""
    if "@" not in url:
        return url
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_storage(url: str, make_folder: Path = None, heartbeat: int = HEARTBEAT_S, grace: int = GRACE_S):
    """The study storage, or one line saying why it cannot be reached. `make_folder`: the default SQLite
    file's folder, made when missing (a folder named in a URL must exist)."""
    optuna = _optuna()
    import sqlalchemy

    path, shown = sqlite_path(url), shown_url(url)
    if path is not None:
        if make_folder is not None and path.parent == make_folder:
            make_folder.mkdir(parents=True, exist_ok=True)
        if not path.parent.is_dir():
            raise UserError(f"search storage '{url}' cannot be reached: folder '{path.parent}' does not exist; "
                            "make it, or leave search 'storage' out for a SQLite file under the suite's runs folder")
        engine = {"connect_args": {"timeout": 120}}
    else:
        engine = {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            # Two workers making a new SQLite file's tables at once would collide: one at a time.
            with claim_lock(url) if path is not None else contextlib.nullcontext():
                return optuna.storages.RDBStorage(driver_url(url), engine_kwargs=engine, heartbeat_interval=heartbeat,
                                                  grace_period=grace)
        except ModuleNotFoundError as e:
            raise UserError(f"search storage '{shown}' needs the database driver '{e.name}' (pip install it)") from None
        except Exception as e:  # sqlalchemy's errors for a bad URL, a host that does not answer, a refused login
            # Workers on several machines making a new server database's tables at once: one wins, the others
            # find them made on the next try.
            if path is None and attempt < 2 and isinstance(e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
                time.sleep(1 + attempt)
                continue
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
            raise UserError(f"search storage '{shown}' cannot be reached: {reason}; "
                            "fix the URL or leave search 'storage' out for a SQLite file under the suite's runs folder") from None


@contextlib.contextmanager
def claim_lock(url: str):
    """SQLite reads and writes a trial's state in two statements: a file lock makes the claim atomic
    (SQLite's workers share one machine). A server database locks the row itself."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_study(storage, plan: dict, method: dict):
    """Load the method's study, making it (every trial enqueued) when this worker is the first."""
    optuna = _optuna()
    direction = optuna.study.StudyDirection.MINIMIZE if plan["direction"] == "minimize" else optuna.study.StudyDirection.MAXIMIZE
    try:
        storage.create_new_study([direction], method["study"])
        creator = True
    except optuna.exceptions.DuplicatedStudyError:
        creator = False
    study = optuna.load_study(study_name=method["study"], storage=storage)
    if creator:
        study.set_user_attr("rates", method["rates"])
        study.set_user_attr("rungs", [steps for steps, _ in plan["rungs"]])
        study.set_user_attr("recipe_lr", method["recipe_lr"])
        for slot, lr in enumerate(method["rates"]):
            study.enqueue_trial({}, user_attrs={"rung": 0, "slot": slot, "attempt": 0, "lr": lr})
        for rung, (_, alive) in enumerate(plan["rungs"][1:], start=1):
            for slot in range(alive):  # "the slot-th best rate of the rung below", known once that rung is done
                study.enqueue_trial({}, user_attrs={"rung": rung, "slot": slot, "attempt": 0})
        study.set_user_attr("ready", True)
    deadline = time.monotonic() + 120
    while not study.user_attrs.get("ready"):  # another worker is enqueueing right now
        if time.monotonic() > deadline:
            raise UserError(f"study '{method['study']}' was never completed by the worker that made it; delete it and start again")
        time.sleep(POLL_S)
        study = optuna.load_study(study_name=method["study"], storage=storage)
    return study


# ---- the state of a study ---------------------------------------------------------------------------

def latest_attempts(trials: list) -> dict:
    """(rung, slot) -> its latest trial (a failed trial enqueued again has a later attempt). Of two trials
    with one attempt number (enqueued twice at once by workers on a server database) the first counts."""
    latest = {}
    for t in trials:
        key = (t.user_attrs["rung"], t.user_attrs["slot"])
        if key not in latest or t.user_attrs["attempt"] > latest[key].user_attrs["attempt"]:
            latest[key] = t
    return latest


def is_added(slot) -> bool:
    """A rate added past an edge has a slot named by its side and count ("high1"); a base rate's is a number."""
    return isinstance(slot, str)


def base_attempts(latest: dict) -> dict:
    return {key: t for key, t in latest.items() if not is_added(key[1])}


def ranked(latest: dict, rung: int, direction: str) -> list:
    """The trials of a finished rung, best first (a diverged rate last; ties: the lower rate first)."""
    sign = 1 if direction == "minimize" else -1
    return sorted((t for (r, _), t in latest.items() if r == rung), key=lambda t: (sign * t.value, t.user_attrs["lr"]))


def rung_done(latest: dict, rung: int) -> bool:
    from optuna.trial import TrialState

    return all(t.state == TrialState.COMPLETE for (r, _), t in latest.items() if r == rung)


def rates_tried(latest: dict) -> list:
    return sorted({t.user_attrs["lr"] for (rung, _), t in latest.items() if rung == 0})


def edge(latest: dict, plan: dict, rates: list):
    """'lowest' or 'highest' when the best rate at the last rung is that edge of the rates tried (of at least
    two rates offered, and not diverged), else None."""
    finished = ranked(latest, len(plan["rungs"]) - 1, plan["direction"])
    if len(rates) < 2 or not finished or not math.isfinite(finished[0].value):
        return None
    best, tried = finished[0].user_attrs["lr"], rates_tried(latest)
    return "lowest" if best == tried[0] else "highest" if best == tried[-1] else None


def survives(latest: dict, trial, plan: dict) -> bool:
    """Whether an added rate goes on from its rung: as good as the worst base rate that went on from there."""
    rung, sign = trial.user_attrs["rung"], 1 if plan["direction"] == "minimize" else -1
    went_on = ranked(base_attempts(latest), rung, plan["direction"])[:plan["rungs"][rung + 1][1]]
    return math.isfinite(trial.value) and sign * trial.value <= max(sign * t.value for t in went_on)


def next_extension(latest: dict, plan: dict, rates: list):
    """The next piece of work past an edge, given every trial so far complete: the newest added rate's next
    rung when it survived its last, else a rate one spacing beyond the edge the best rate sits at (while that
    side has had fewer than `extend`); None when there is none: the search is done. An added rate that was cut
    or diverged lies beyond the best, so its side is closed."""
    last = len(plan["rungs"]) - 1
    for (rung, slot), t in latest.items():
        if is_added(slot) and rung < last and (rung + 1, slot) not in latest and survives(latest, t, plan):
            return {"rung": rung + 1, "slot": slot, "attempt": 0, "lr": t.user_attrs["lr"]}
    side = edge(latest, plan, rates)
    if side is None:
        return None
    prefix = side[:-3]  # "low" or "high"
    count = len({slot for _, slot in latest if is_added(slot) and slot.startswith(prefix)})
    tried = rates_tried(latest)
    rate, neighbour = (tried[0], tried[1]) if side == "lowest" else (tried[-1], tried[-2])
    beyond = float(f"{rate * rate / neighbour:.3g}")
    if count >= plan["extend"] or beyond in tried:  # the limit, or a spacing too fine for 3 significant digits
        return None
    return {"rung": 0, "slot": f"{prefix}{count + 1}", "attempt": 0, "lr": beyond}


def study_status(latest: dict, plan: dict, method: dict) -> str:
    """'done', 'failed' (a trial failed in train.py: see its error) or 'running' (trials to run or to add)."""
    from optuna.trial import TrialState

    if any(t.state == TrialState.FAIL and t.user_attrs.get("error") for t in latest.values()):
        return "failed"
    if any(t.state != TrialState.COMPLETE for t in latest.values()):
        return "running"
    return "running" if next_extension(latest, plan, method["rates"]) else "done"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_lost(study, plan: dict, worker: str, retry_failed: bool) -> None:
    """Fail the trials whose worker is gone (the same worker id, i.e. this machine: no such process; another
    id: no heartbeat for plan["grace"] seconds) and enqueue each failed piece of work again once. A trial that
    failed in train.py (it has an error) is retried only when `retry_failed` (a worker starting: a rerun
    tries again, as compare does)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        gone = t.user_attrs.get("worker") == worker and not _alive(t.user_attrs.get("pid", 0))
        # A worker that died between claiming and recording itself left no pid and no heartbeat.
        unowned = "pid" not in t.user_attrs and t.datetime_start and (now - t.datetime_start).total_seconds() > plan["grace"]
        if gone or unowned:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    optuna.storages.fail_stale_trials(study)
    for (rung, slot), t in latest_attempts(study.get_trials(deepcopy=False)).items():
        if t.state == TrialState.FAIL and (retry_failed or not t.user_attrs.get("error")):
            attrs = {"rung": rung, "slot": slot, "attempt": t.user_attrs["attempt"] + 1}
            if rung == 0 or is_added(slot):  # the pieces enqueued with their rate keep it
                attrs["lr"] = t.user_attrs["lr"]
            study.enqueue_trial({}, user_attrs=attrs)


def enqueue_extension(study, plan: dict, method: dict) -> None:
    """Once every trial is complete, enqueue the next piece of work past an edge, if any (waiting, it stops
    the next worker from enqueueing it again)."""
    from optuna.trial import TrialState

    latest = latest_attempts(study.get_trials(deepcopy=False))
    if all(t.state == TrialState.COMPLETE for t in latest.values()):
        piece = next_extension(latest, plan, method["rates"])
        if piece:
            study.enqueue_trial({}, user_attrs=piece)


def claim(study, storage, plan: dict):
    """A waiting trial whose rung below is done, now RUNNING for this worker, with its rate; or None."""
    from optuna.trial import TrialState

    latest = latest_attempts(study.get_trials(deepcopy=False))
    base = base_attempts(latest)
    for t in sorted((t for t in latest.values() if t.state == TrialState.WAITING), key=lambda t: t.number):
        rung, slot = t.user_attrs["rung"], t.user_attrs["slot"]
        if rung > 0 and not is_added(slot) and not rung_done(base, rung - 1):
            continue
        if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
            lr = t.user_attrs.get("lr") or ranked(base, rung - 1, plan["direction"])[slot].user_attrs["lr"]
            return t, lr
    return None


# ---- running a trial's rung ---------------------------------------------------------------------------

def trial_step(method: str, rung: int, slot) -> str:
    """A trial's row in the suite's plan and timings: its rung (from 1) and slot (the rate's index at the first
    rung, the rank it went on with at a later one, low1/high1... for a rate added past an edge)."""
    return f"search {method} rung {rung + 1} slot {slot}"


def run_name(lr: float) -> str:
    return f"lr-{lr:.3g}".replace("e+", "e")  # a name train.py accepts: lr-1e10, not lr-1e+10


def diverged_file(run_dir: Path) -> Path:
    """Beside the run, not in it: train.py starts a run without a checkpoint afresh, emptying its folder."""
    return run_dir.with_name(run_dir.name + ".diverged")


def logged_value(run_dir: Path, step: int, metric: str):
    """The metric logged at `step` by train.py, None when not there. A rate whose loss diverged before it, or
    whose metric is NaN there, gets the worst value: +inf (minimize) or -inf (maximize)."""
    worst = math.inf if METRICS[metric] == "minimize" else -math.inf
    log = rundir.read_log(run_dir / "log.jsonl")
    for record in log:
        if record.get("step") == step and record.get(metric) is not None:
            value = float(record[metric])
            return worst if math.isnan(value) else value
    error = diverged_file(run_dir)
    if error.is_file() and int(error.read_text().split()[0]) <= step:
        return worst
    return None


def run_trial(study, storage, trial, lr: float, plan: dict, method: dict, launcher: list, env: dict, worker: str) -> None:
    """Train one rate up to its rung (resuming its run) and tell the study its metric there."""
    from optuna.trial import TrialState

    optuna = _optuna()
    rung = trial.user_attrs["rung"]
    steps = plan["rungs"][rung][0]
    distribution = optuna.distributions.FloatDistribution(min(method["rates"][0], lr), max(method["rates"][-1], lr), log=True)
    storage.record_heartbeat(trial._trial_id)  # from the claim on: a machine that dies before its training starts loses it too
    storage.set_trial_param(trial._trial_id, "lr", distribution.to_internal_repr(lr), distribution)
    for key, value in {"lr": lr, "steps": steps, "worker": worker, "pid": os.getpid()}.items():
        storage.set_trial_user_attr(trial._trial_id, key, value)
    run_dir = method["dir"] / run_name(lr)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(storage, trial._trial_id, plan["heartbeat"], stop), daemon=True)
    try:
        value = logged_value(run_dir, steps, plan["metric"])
        if value is None:
            command = [*launcher, str(ROOT / "train.py"), "--recipe", method["recipe_path"], *method["overrides"],
                       f"train.lr={lr}", f"name={method['name']}-{run_name(lr)}", f"output_dir={run_dir}"]
            if steps < plan["max_steps"]:
                command += ["--stop-after-steps", str(steps)]
            print(f"\n=== search {method['name']}: rate {lr:g}, rung {rung + 1} of {len(plan['rungs'])} (to step {steps})\n"
                  f"$ {' '.join(command)}", flush=True)
            started = time.perf_counter()
            child = start(command, env)  # before the heartbeat's thread: a warm start forks this process
            beat.start()
            status, lines = follow(child)
            rundir.record_time(plan["dir"].parent, trial_step(method["name"], rung, trial.user_attrs["slot"]),
                               time.perf_counter() - started, status)
            if status in INTERRUPTED:
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)  # enqueued again by a rerun
                print(f"\ninterrupted during the search of {method['name']}; run the same command again to resume", file=sys.stderr)
                sys.exit(status)
            diverged = next((line for line in lines if DIVERGED in line), None)
            at = re.search(r"by step (\d+)", diverged or "")
            if status == 1 and at:
                rundir.write_atomic(diverged_file(run_dir), f"{at.group(1)}\n{diverged}\n")
            value = logged_value(run_dir, steps, plan["metric"])
            if value is None:
                error = (lines or [f"exit status {status}"])[-1]
                storage.set_trial_user_attr(trial._trial_id, "error", error)
                study.tell(trial.number, state=TrialState.FAIL)
                print(f"\n*** search {method['name']}: rate {lr:g} failed: {error}", flush=True)
                return
        if math.isinf(value):
            storage.set_trial_user_attr(trial._trial_id, "diverged", True)
        trial_obj = optuna.Trial(study, trial._trial_id)
        trial_obj.report(value, steps)
        study.tell(trial.number, value)
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()  # gone before the next trial: a warm start forks only a process without other threads


def _heartbeat(storage, trial_id: int, interval: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            storage.record_heartbeat(trial_id)
        except Exception:  # a missed beat only risks a retry
            pass
        stop.wait(interval)


def work(plan: dict, launcher: list, env: dict, worker: str = None) -> None:
    """Take trials from every method's study until all are done (or failed). `worker`: this machine's id in
    the studies (default: its host name)."""
    worker = worker or socket.gethostname()
    storage = storage_of(plan)
    with claim_lock(plan["storage"]):
        studies = [(method, ensure_study(storage, plan, method)) for method in plan["methods"]]
        for _, study in studies:
            requeue_lost(study, plan, worker, retry_failed=True)
    while True:
        pending, claimed = False, None
        with claim_lock(plan["storage"]):
            for method, study in studies:
                if study_status(latest_attempts(study.get_trials(deepcopy=False)), plan, method) != "running":
                    continue
                pending = True
                requeue_lost(study, plan, worker, retry_failed=False)
                enqueue_extension(study, plan, method)
                claimed = claim(study, storage, plan)
                if claimed:
                    break
        if claimed:
            run_trial(study, storage, *claimed, plan, method, launcher, env, worker)
        elif not pending:
            return
        else:
            time.sleep(POLL_S)  # the rungs left wait for trials other workers are running


# ---- a trial that is the comparison run ------------------------------------------------------------------

def adopt(method: dict, lr: float, recipe: Recipe, run_dir: Path) -> bool:
    """When the comparison run's recipe is the search's last-rung trial at this rate (every key but the
    RESULT_NEUTRAL ones the same: model, method, data, seed, steps, batch, rate, validation...), that
    finished trial is the run: its files are linked into run_dir (recipe.yaml and summary.json rewritten
    with the run's name) instead of training it again."""
    import shutil

    import yaml

    from tunebench import rundir
    trial_dir = method["dir"] / run_name(lr)
    if run_dir.exists() or not (trial_dir / "summary.json").is_file():
        return False
    trial = yaml.safe_load((trial_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    if setting_without(trial, RESULT_NEUTRAL) != setting_without(recipe, RESULT_NEUTRAL):
        return False
    tmp = rundir.temporary(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(trial_dir, tmp, copy_function=link)
    rundir.write_atomic(tmp / "recipe.yaml", to_yaml(recipe))
    summary = rundir.read_json(tmp / "summary.json")
    rundir.write_json(tmp / "summary.json", {**summary, "name": recipe.name, "search_trial": str(trial_dir)})
    (tmp / "eval.json").unlink(missing_ok=True)
    os.replace(tmp, run_dir)
    return True


# ---- results ---------------------------------------------------------------------------------------------

def tokens_trained(run_dir: Path) -> int:

    log = rundir.read_log(run_dir / "log.jsonl")
    return max((r.get("tokens") or 0 for r in log), default=0)


def results(plan: dict) -> dict:
    """Every method's trials, its best rate and the caveats, as search.json holds them. A method's `rates` are
    every rate tried (those added past an edge too, also listed in `extension_rates`); `edge` says that its
    best rate is still the lowest or highest of them after `extend` rates were added on that side."""
    optuna = _optuna()
    storage = storage_of(plan)
    out = {"metric": plan["metric"], "direction": plan["direction"], "storage": shown_url(plan["storage"]),
           "rungs": [{"steps": s, "rates": a} for s, a in plan["rungs"]], "rates_per_method": plan["n_rates"],
           "reduction": plan["reduction"], "seed": plan["seed"], "tuning_steps_per_method": tuning_steps(plan),
           "extend": plan["extend"], "trial_overrides": plan["trial_overrides"], "methods": {}}
    for method in plan["methods"]:
        study = optuna.load_study(study_name=method["study"], storage=storage)
        latest = latest_attempts(study.get_trials(deepcopy=False))
        trials = [{"lr": t.user_attrs.get("lr"), "rung": r, "slot": slot, "steps": plan["rungs"][r][0], "value": t.value,
                   "state": t.state.name, "diverged": bool(t.user_attrs.get("diverged")), "error": t.user_attrs.get("error"),
                   "trial": t.number}
                  for (r, slot), t in sorted(latest.items(), key=lambda item: item[1].number)]
        status = study_status(latest, plan, method)
        tried = rates_tried(latest)
        entry = {"recipe": method["recipe_path"], "recipe_lr": method["recipe_lr"], "rates": tried,
                 "extension_rates": [t["lr"] for t in trials if t["rung"] == 0 and is_added(t["slot"])],
                 "study": method["study"], "folder": str(method["dir"]), "status": status, "trials": trials,
                 "tuning_tokens": sum(tokens_trained(method["dir"] / run_name(lr)) for lr in tried)}
        if status == "done":
            best = ranked(latest, len(plan["rungs"]) - 1, plan["direction"])[0]
            value = best.value
            entry.update(best_lr=best.user_attrs["lr"], best_value=value)
            side = edge(latest, plan, method["rates"])
            if side:
                entry["edge"] = side
            if not math.isfinite(value):
                entry["status"], entry["error"] = "failed", "every rate diverged"
        elif status == "failed":
            entry["error"] = next(t["error"] for t in trials if t["error"])
        out["methods"][method["name"]] = entry
    return out


# ---- the command for extra workers ---------------------------------------------------------------------

@command
def main(argv=None):
    parser = ArgumentParser(usage_hint="python -m tunebench.search --suite SUITE.yaml [--workers N] [--worker-id ID]",
                            description="Work on a suite's learning-rate search (its Optuna study) beside other workers.")
    parser.add_argument("--suite", required=True, help="the suite file, with a search: section")
    parser.add_argument("--workers", type=positive, default=1,
                        help="worker processes on this machine (with GPUs: one per GPU, GPU i for worker i)")
    parser.add_argument("--accel", default=None, help="accelerate config for the trials' training")
    parser.add_argument("--worker-id", default=socket.gethostname(),
                        help="this machine's name in the study (default: its host name): a trial of the same id whose "
                             "process is gone is taken over at once, one of another id after search 'grace' seconds "
                             "without a heartbeat; give each machine its own")
    args = parser.parse_args(argv)
    from tunebench import suites

    suite = suites.load(args.suite)
    if suite["search_section"] is None:
        raise UserError(f"suite file '{args.suite}' has no search: section; nothing to tune")
    suites.plan(suite)
    plan = parse(suite)
    storage_of(plan)  # reachable, or one line now
    env = child_env()
    launcher = launch_prefix(args.accel)
    if args.workers == 1:
        work(plan, launcher, env, args.worker_id)
    else:
        workers = []
        for i in range(args.workers):
            worker_env = dict(env, **({"CUDA_VISIBLE_DEVICES": str(i)} if gpu_count() > i else {}))
            workers.append(subprocess.Popen([sys.executable, "-m", "tunebench.search", "--suite", args.suite,
                                             "--worker-id", args.worker_id,
                                             *(["--accel", args.accel] if args.accel else [])], env=worker_env))
        sys.exit(max(w.wait() for w in workers))
    print(json.dumps({name: m.get("best_lr") for name, m in results(plan)["methods"].items()}))


if __name__ == "__main__":
    main()
