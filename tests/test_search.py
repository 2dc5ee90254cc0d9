"""The learning-rate search end to end on a tiny real GPT-2: every method gets the same rates, rungs and
tuning tokens, a cut rate stops at its rung, the survivor resumes to the end, the best rate trains the
comparison run (here: is it, the setting being the same), forgetting is measured on a general text, the
report opens with the recommendation, and a rerun trains nothing again. Bad search, grid and forgetting
input is one line and exit 2 with nothing started."""
import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_one_clear_line, read_log, run_command, run_script, snapshot, tiny_suite
from tunebench import demo, search, verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPES = [str(ROOT / "recipes" / "full.yaml"), str(ROOT / "recipes" / "lora_r4.yaml")]


def base_suite(assets, **extra):
    # How often to save and how many checkpoints to keep are the suite's own (the trials save at their rungs
    # only): keys that cannot change a result, so the winning trial is still the comparison run.
    steps = {"train.max_steps": 6, "train.eval_every": 2, "train.save_every": 3, "train.keep_checkpoints": 2}
    return tiny_suite(assets, RECIPES, steps, **extra)


# No rates past an edge here (extend: 0): these tests hold the base halving's equal budget exactly.
SEARCH = {"rates": 3, "spacing": 10, "first_rung": 2, "reduction": 3, "extend": 0}


def write(path, suite):
    path.write_text(yaml.safe_dump(suite))
    return path


def run_module(module, suite, cwd, timeout=1500):
    return run_command([sys.executable, "-m", module, "--suite", str(suite)], cwd=cwd, timeout=timeout)


def read(path):
    return json.loads(path.read_text())


def trials_dir(runs, name):
    """A method's trial runs: runs/SUITE/search/NAME-HASH, HASH naming its trial setting."""
    (folder,) = (runs / "search").glob(f"{name}-" + "?" * search.HASH_CHARS)
    return folder


def study_names(storage, name):
    import optuna

    return sorted(n for n in optuna.get_all_study_names(storage)
                  if re.fullmatch(f"tiny-{name}-[0-9a-f]{{{search.HASH_CHARS}}}", n))


def search_results(suite_path, cwd):
    """search.results() of a suite whose search ran in cwd (its runs folder is relative to cwd)."""
    from tunebench import suites

    with contextlib.chdir(cwd):
        suite = suites.load(suite_path)
        suites.plan(suite)
        return search.results(search.parse(suite))


@pytest.fixture(scope="module")
def searched(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    demo.write_general(tmp)
    general = tmp / "general.txt"
    suite = write(tmp / "tiny.yaml", base_suite(assets, search=SEARCH, forgetting={"data_file": str(general)}))
    first = run_module("tunebench.compare", suite, tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, suite, first


def test_every_method_gets_the_same_rates_rungs_and_tokens(searched):
    tmp, _, _ = searched
    found = read(tmp / "runs" / "tiny" / "search" / "search.json")
    assert [(r["steps"], r["rates"]) for r in found["rungs"]] == [(2, 3), (6, 1)]
    assert found["tuning_steps_per_method"] == 3 * 2 + 1 * 4
    for name, recipe_lr in (("full", 5e-5), ("lora_r4", 2e-4)):
        method = found["methods"][name]
        assert method["rates"] == pytest.approx([recipe_lr / 10, recipe_lr, recipe_lr * 10])
        folder = trials_dir(tmp / "runs" / "tiny", name)
        assert tmp / method["folder"] == folder
        first = [t for t in method["trials"] if t["rung"] == 0]
        assert sorted(t["lr"] for t in first) == method["rates"] and all(t["state"] == "COMPLETE" for t in first)
        for t in first:  # the study holds what train.py logged at the rung
            log = read_log(folder / search.run_name(t["lr"]))
            assert t["value"] == next(r["val_loss"] for r in log if r["step"] == 2)
        best_first = min(first, key=lambda t: (t["value"], t["lr"]))["lr"]
        (last,) = [t for t in method["trials"] if t["rung"] == 1]
        assert last["lr"] == best_first == method["best_lr"]
        survivor = read_log(folder / search.run_name(best_first))
        assert [r["step"] for r in survivor] == [0, 1, 2, 3, 4, 5, 6] and last["value"] == survivor[-1]["val_loss"]
        for rate in method["rates"]:
            if rate != best_first:  # a cut rate cost only its rung: stopped at step 2, resumable from there
                run = folder / search.run_name(rate)
                assert read_log(run)[-1]["step"] == 2 and not (run / "summary.json").exists()
                assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-2"]
        assert method["tuning_tokens"] == found["tuning_steps_per_method"] * 4 * 32  # steps x batch x length


def test_the_best_rate_trains_the_comparison_run(searched):
    tmp, _, first = searched
    found = read(tmp / "runs" / "tiny" / "search" / "search.json")
    for name in ("full", "lora_r4"):
        best = found["methods"][name]["best_lr"]
        run = tmp / "runs" / "tiny" / name
        assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"] == best
        # Same recipe, seed and steps as the winning trial (it saved and kept checkpoints otherwise): that
        # trial is the run, not trained twice.
        assert f"=== {name}: the search's trial at rate {best:g} is this run" in first.stdout
        assert f"=== {name}: training" not in first.stdout
        trial = trials_dir(tmp / "runs" / "tiny", name) / search.run_name(best)
        assert read_log(run) == read_log(trial) and read(run / "summary.json")["name"] == name
        assert "ppl" in read(run / "eval.json")["tasks"]


def test_report_opens_with_the_recommendation_and_measures_forgetting(searched):
    tmp, _, _ = searched
    out = tmp / "reports" / "tiny"
    md = (out / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[:2] == ["## Recommendation", "## Results"] and "## Learning-rate search" in sections
    assert "| if your budget is | pick |" in md and "small tuning budget (3 rates, at most 6 steps each)" in md
    assert "one seed: the interval covers the test items, not training noise" in md
    found = read(tmp / "runs" / "tiny" / "search" / "search.json")
    # At rates this low for the tiny model the highest wins, and extend: 0 adds none past it: a warning
    # above the recommendation table, not a footnote.
    assert found["methods"]["full"]["edge"] == "highest"
    warning = verdict.edge_warnings(found)[0]
    assert "full" in warning and md.index(warning) < md.index("| if your budget is")
    assert "| full | 5e-05 | 5e-06, 5e-05, 0.0005 | 0.0005 |" in md  # recipe's rate, rates tried, chosen
    with open(out / "report.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    runs = tmp / "runs" / "tiny"
    base = read(runs / "baseline" / "eval.json")["tasks"]
    found = read(runs / "search" / "search.json")
    for name in ("full", "lora_r4"):
        tasks = read(runs / name / "eval.json")["tasks"]
        assert float(rows[name]["lr"]) == found["methods"][name]["best_lr"]  # each row shows its rate
        assert float(rows[name]["gain"]) == pytest.approx(math.log(base["ppl"]["ppl"]) - math.log(tasks["ppl"]["ppl"]))
        assert float(rows[name]["forgetting"]) == pytest.approx(
            math.log(tasks["general"]["ppl"]) - math.log(base["general"]["ppl"]))
        assert tasks["general"]["tokens"] == base["general"]["tokens"] > 0  # the same general text for every model
    for name in ("lr_sweep.png", "learning_forgetting.png", "pareto.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_rerun_trains_and_evaluates_nothing_again(searched):
    tmp, suite, _ = searched
    logs = sorted((tmp / "runs" / "tiny").rglob("log.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    second = run_module("tunebench.compare", suite, tmp)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "=== search" not in second.stdout and "$ " not in second.stdout  # no command started
    assert {p: p.stat().st_mtime_ns for p in logs} == before


def test_two_workers_share_one_study(assets, tmp_path):
    """Two worker processes on one SQLite study: every piece of work done exactly once."""
    suite = write(tmp_path / "tiny.yaml", base_suite(assets, search=SEARCH))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workers = [subprocess.Popen([sys.executable, "-m", "tunebench.search", "--suite", str(suite)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=1500)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    started = [line for out in outputs for line in out.splitlines() if line.startswith("=== search")]
    assert len(started) == 2 * (3 + 1) and len(set(started)) == len(started), started  # none lost, none run twice

    import optuna

    storage = search.open_storage(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'search' / 'optuna.db'}")
    pids = set()
    for name in ("full", "lora_r4"):
        (study,) = study_names(storage, name)
        trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        assert sorted((t.user_attrs["rung"], t.user_attrs["slot"]) for t in trials) == [(0, 0), (0, 1), (0, 2), (1, 0)]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        pids |= {t.user_attrs["pid"] for t in trials}
        for t in trials:  # each rate's log holds every step once: no two trainings of one run
            steps = [r["step"] for r in read_log(trials_dir(tmp_path / "runs" / "tiny", name) / search.run_name(t.params["lr"]))]
            assert steps == sorted(set(steps))
    assert len(pids) == 2  # both workers took trials


def test_a_killed_worker_loses_nothing(assets, tmp_path):
    """A worker killed (with its training) in the middle of a trial: the next worker fails that trial,
    enqueues its work again and trains that rate's run to its rung."""
    import signal
    import time

    import optuna

    suite = base_suite(assets, search=SEARCH)
    suite["recipes"] = RECIPES[1:]
    path = write(tmp_path / "tiny.yaml", suite)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "tunebench.search", "--suite", str(path)]
    worker = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)

    def first_log():
        return next((tmp_path / "runs" / "tiny" / "search").glob("lora_r4-*/lr-2e-05/log.jsonl"), None)

    deadline = time.monotonic() + 600
    while not (first_log() and first_log().read_text().count("\n") >= 2):  # mid-trial: step 1 logged
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()[-2000:]
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as kill -9 or the OOM killer would: its trial dies with it
    worker.wait()
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(worker.pid, 0)  # a process of the worker's session is left: its trial still training?
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(worker.pid, signal.SIGKILL)
            raise AssertionError("the killed worker's trial went on training without it")
        time.sleep(0.1)
    again = run_command(command, cwd=tmp_path, timeout=1500)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    storage = search.open_storage(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'search' / 'optuna.db'}")
    (study,) = study_names(storage, "lora_r4")
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    states = sorted((t.user_attrs["rung"], t.user_attrs["slot"], t.user_attrs["attempt"], t.state.name) for t in trials)
    assert states == [(0, 0, 0, "FAIL"), (0, 0, 1, "COMPLETE"), (0, 1, 0, "COMPLETE"), (0, 2, 0, "COMPLETE"),
                      (1, 0, 0, "COMPLETE")], states
    steps = [r["step"] for r in read_log(first_log().parent)]
    assert steps == sorted(set(steps)) and 2 in steps


def test_an_edited_recipe_gets_its_own_search_and_leaves_the_old_one_alone(assets, tmp_path):
    """A study and its trial runs belong to the trial setting's content, not to the recipe's path."""
    recipe = yaml.safe_load(open(RECIPES[1]))
    recipe["method"]["r"] = 2
    write(tmp_path / "lora.yaml", recipe)
    suite = base_suite(assets, search={"rates": 1, "max_steps": 2})
    suite["recipes"] = [str(tmp_path / "lora.yaml")]
    path = write(tmp_path / "tiny.yaml", suite)
    assert run_module("tunebench.search", path, tmp_path).returncode == 0
    folder = tmp_path / "runs" / "tiny" / "search"
    before = {p: h for p, h in snapshot(folder).items() if not p.name.startswith("optuna.db")}

    recipe["method"]["r"] = 4
    write(tmp_path / "lora.yaml", recipe)
    again = run_module("tunebench.search", path, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "=== search lora: rate 0.0002" in again.stdout  # trained again, not the old study's answer
    after = snapshot(folder)
    assert {p: after.get(p) for p in before} == before  # the old trials untouched
    found = search_results(path, tmp_path)["methods"]["lora"]
    new_trial = tmp_path / found["folder"] / search.run_name(found["best_lr"])
    assert yaml.safe_load((new_trial / "recipe.yaml").read_text())["method"]["r"] == 4
    assert Path(found["folder"]).name not in {p.parts[0] for p in before}  # a folder of its own
    assert len(study_names(search.open_storage(f"sqlite:///{folder / 'optuna.db'}"), "lora")) == 2


def test_a_nan_validation_loss_is_scored_as_diverged(assets, tmp_path):
    """At 1e10, full fine-tuning's first update with a nonzero rate (step 2; step 1 is warm-up) leaves
    weights that overflow: train.py logs val_loss NaN at step 2 and goes on, as its training loss was
    measured before that update. The search scores the rate as diverged (+inf) and finishes."""
    suite = base_suite(assets, search={"lrs": {"full": [1e-3, 1e10]}, "first_rung": 2, "max_steps": 4, "reduction": 2})
    suite["recipes"] = RECIPES[:1]
    path = write(tmp_path / "tiny.yaml", suite)
    result = run_module("tunebench.search", path, tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    method = search_results(path, tmp_path)["methods"]["full"]
    (nan_trial,) = [t for t in method["trials"] if t["lr"] == 1e10]
    assert math.isnan(read_log(tmp_path / method["folder"] / search.run_name(1e10))[-1]["val_loss"])
    assert (nan_trial["rung"], nan_trial["state"], nan_trial["value"], nan_trial["diverged"]) == (0, "COMPLETE", math.inf, True)
    assert method["status"] == "done" and method["best_lr"] == 1e-3


# Rates far too low for the tiny model, whose validation loss falls the faster the higher the rate up to
# about 1e-3: the best of the two is the highest.
EDGE = {"lrs": {"full": [1e-5, 3e-5]}, "first_rung": 2, "max_steps": 4, "reduction": 2}


def edge_suite(assets, tmp_path, **keys):
    suite = base_suite(assets, search={**EDGE, **keys})
    suite["recipes"] = RECIPES[:1]
    suite["overrides"]["train.warmup_ratio"] = 0
    return write(tmp_path / "tiny.yaml", suite)


def test_a_winner_at_the_edge_is_searched_past_it(assets, tmp_path):
    """The best rate is the highest: the search adds 9e-5 (the same factor 3 on), which survives the first
    rung, trains to the end and wins, then 2.7e-4 likewise; the limit (extend: 2 by default) reached, the
    winner is still at the edge and results say so. Two workers share the work; a rerun trains nothing."""
    path = edge_suite(assets, tmp_path)
    command = [sys.executable, "-m", "tunebench.search", "--suite", str(path), "--workers", "2"]
    result = run_command(command, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    started = [line for line in result.stdout.splitlines() if line.startswith("=== search")]
    assert len(started) == 3 + 2 * 2 and len(set(started)) == len(started), started  # each piece once
    method = search_results(path, tmp_path)["methods"]["full"]
    assert method["rates"] == [1e-5, 3e-5, 9e-5, 2.7e-4] and method["extension_rates"] == [9e-5, 2.7e-4]
    assert (method["status"], method["best_lr"], method["edge"]) == ("done", 2.7e-4, "highest")
    for slot, rate in (("high1", 9e-5), ("high2", 2.7e-4)):
        assert sorted((t["rung"], t["slot"]) for t in method["trials"] if t["lr"] == rate) == [(0, slot), (1, slot)]
        log = read_log(tmp_path / method["folder"] / search.run_name(rate))
        assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and log[2]["val_loss"] is not None
    assert method["tuning_tokens"] == (2 * 2 + 2 + 2 * 4) * 4 * 32  # base 6 steps, each added rate 4
    again = run_module("tunebench.search", path, tmp_path)
    assert again.returncode == 0 and "=== search" not in again.stdout


def test_extend_0_leaves_a_winner_at_the_edge_and_says_so(assets, tmp_path):
    path = edge_suite(assets, tmp_path, extend=0)
    result = run_module("tunebench.search", path, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    found = search_results(path, tmp_path)
    method = found["methods"]["full"]
    assert (method["rates"], method["extension_rates"], method["best_lr"], method["edge"]) == ([1e-5, 3e-5], [], 3e-5, "highest")
    assert "full" in verdict.edge_warnings(found)[0] and "extend: 0" in verdict.edge_warnings(found)[0]


class Trial:
    """What the search reads of an Optuna trial."""

    def __init__(self, rung, slot, lr, value):
        from optuna.trial import TrialState

        self.user_attrs, self.value, self.state = {"rung": rung, "slot": slot, "attempt": 0, "lr": lr}, value, TrialState.COMPLETE


def test_an_added_rate_goes_on_from_a_rung_only_as_a_survivor_would():
    """Base rates 1, 2, 4; at the first rung 4 and 2 go on (2 the worse, at 4.0); 4 wins the last rung."""
    plan = {"rungs": [(1, 3), (3, 2), (9, 1)], "direction": "minimize", "extend": 2}
    base = [Trial(0, 0, 1.0, 5.0), Trial(0, 1, 2.0, 4.0), Trial(0, 2, 4.0, 3.0),
            Trial(1, 0, 4.0, 2.5), Trial(1, 1, 2.0, 3.5), Trial(2, 0, 4.0, 2.0)]

    def next_piece(*added):
        return search.next_extension(search.latest_attempts(base + list(added)), plan, [1.0, 2.0, 4.0])

    assert next_piece() == {"rung": 0, "slot": "high1", "attempt": 0, "lr": 8.0}
    assert next_piece(Trial(0, "high1", 8.0, 4.1)) is None  # cut at the first rung: 4 lies inside the rates tried
    assert next_piece(Trial(0, "high1", 8.0, 4.0)) == {"rung": 1, "slot": "high1", "attempt": 0, "lr": 8.0}  # as good as 2
    assert next_piece(Trial(0, "high1", 8.0, math.inf)) is None  # diverged: that side is closed
    assert next_piece(Trial(0, "high1", 8.0, 4.0), Trial(1, "high1", 8.0, 2.6)) is None  # worse than 4, the one that went on
    wins = [Trial(0, "high1", 8.0, 4.0), Trial(1, "high1", 8.0, 2.0), Trial(2, "high1", 8.0, 1.0)]
    assert next_piece(*wins) == {"rung": 0, "slot": "high2", "attempt": 0, "lr": 16.0}
    plan["extend"] = 1
    assert next_piece(*wins) is None  # the limit
    lowest_wins = [Trial(0, 0, 1.0, 3.0), Trial(0, 1, 2.0, 4.0), Trial(0, 2, 4.0, 5.0),
                   Trial(1, 0, 1.0, 2.5), Trial(1, 1, 2.0, 3.5), Trial(2, 0, 1.0, 2.0)]
    assert search.next_extension(search.latest_attempts(lowest_wins), plan, [1.0, 2.0, 4.0]) == {
        "rung": 0, "slot": "low1", "attempt": 0, "lr": 0.5}


@pytest.mark.parametrize("extra,expected", [
    ({"search": {"rate": 3}}, "unknown search key 'rate'"),
    ({"search": {"lrs": {"full": []}}}, "search 'lrs' of 'full' is an empty range"),
    ({"search": {"metric": "val_acc"}}, "search metric 'val_acc' needs task classification"),
    ({"search": {"metric": "bleu"}}, "search metric 'bleu' is not one of"),
    ({"search": {"rates": 0}}, "search 'rates' must be a whole number of at least 1"),
    ({"search": {"extend": -1}}, "search 'extend' must be a whole number of at least 0, got -1"),
    ({"search": {"extend": True}}, "search 'extend' must be a whole number of at least 0, got True"),
    ({"search": {"storage": "sqlite:////nonexistent-folder/sub/study.db"}}, "search storage 'sqlite:////nonexistent-folder/sub/study.db' cannot be reached"),
    ({"search": {"storage": "postgresql://user@127.0.0.1:9/study"}}, "search storage 'postgresql://user@127.0.0.1:9/study'"),
    ({"search": {"heartbeat": 5, "grace": 5}}, "search 'grace' (5 s) must be longer than 'heartbeat' (5 s)"),
    ({"grid": {"train.max_step": [2, 3]}}, "did you mean 'train.max_steps'"),
    ({"grid": {"method.r": []}}, "grid key 'method.r' has an empty range"),
    ({"grid": {"method.num_virtual_tokens": [4, 8]}}, "grid key 'method.num_virtual_tokens' applies to no recipe"),
    ({"forgetting": {"data_file": "nowhere.txt"}}, "forgetting data_file 'nowhere.txt' does not exist"),
    ({"forgetting": {"data_file": "general.txt", "lm_eval": ["arc_easy"]}}, "or lm_eval, lm-eval tasks"),
    ({"forgetting": {"lm_eval": ["my_mc"], "include": "nowhere"}}, "--lm-eval-include 'nowhere' is not a folder"),
    ({"forgetting": {"lm_eval": ["arc_easy"]}}, "lm-eval task 'arc_easy' reads its data from the Hugging Face hub"),
])
def test_bad_search_grid_or_forgetting_is_one_line_and_nothing_starts(assets, tmp_path, extra, expected):
    suite = write(tmp_path / "bad.yaml", base_suite(assets, **extra))
    result = run_module("tunebench.compare", suite, tmp_path, timeout=300)
    assert_one_clear_line(result, expected)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("also,expected", [
    ("general=nowhere.txt", "--also-ppl file 'nowhere.txt' does not exist"),
    ("ppl=FILE", "give NAME=FILE with a NAME that is not a task"),
    ("general", "give NAME=FILE"),
])
def test_bad_also_ppl_is_one_line(assets, tmp_path, also, expected):
    also = also.replace("FILE", str(assets / "valid.txt"))
    result = run_script("evaluate.py", "--model", assets / "gpt2", "--tasks", "ppl", "--data-file", assets / "valid.txt",
                        "--also-ppl", also, "--out", tmp_path / "base")
    assert_one_clear_line(result, expected)
    assert not (tmp_path / "base").exists()
