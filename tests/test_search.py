"""The learning-rate search end to end on a tiny real GPT-2: every method gets the same rates, rungs and
tuning tokens, a cut rate stops at its rung, the survivor resumes to the end, the best rate trains the
comparison run (here: is it, the setting being the same), forgetting is measured on a general text, the
report opens with the recommendation, and a rerun trains nothing again. Bad search, grid and forgetting
input is one line and exit 2 with nothing started."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, assert_one_clear_line, read_log, tiny_suite
from tunebench import demo, search

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPES = [str(ROOT / "recipes" / "full.yaml"), str(ROOT / "recipes" / "lora_r4.yaml")]


def base_suite(assets, **extra):
    steps = {"train.max_steps": 6, "train.eval_every": 2, "train.save_every": 6, "train.keep_checkpoints": 1}
    return tiny_suite(assets, RECIPES, steps, **extra)


SEARCH = {"rates": 3, "spacing": 10, "first_rung": 2, "reduction": 3}


def write(path, suite):
    path.write_text(yaml.safe_dump(suite))
    return path


def run_module(module, suite, cwd, timeout=1500):
    return subprocess.run([sys.executable, "-m", module, "--suite", str(suite)], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=timeout)


def read(path):
    return json.loads(path.read_text())


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
        folder = tmp / "runs" / "tiny" / "search" / name
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
        # Same recipe, seed and steps as the winning trial: that trial is the run, not trained twice.
        assert f"=== {name}: the search's trial at rate {best:g} is this run" in first.stdout
        trial = tmp / "runs" / "tiny" / "search" / name / search.run_name(best)
        assert read_log(run) == read_log(trial) and read(run / "summary.json")["name"] == name
        assert "ppl" in read(run / "eval.json")["tasks"]


def test_report_opens_with_the_recommendation_and_measures_forgetting(searched):
    tmp, _, _ = searched
    out = tmp / "reports" / "tiny"
    md = (out / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[:2] == ["## Recommendation", "## Results"] and "## Learning-rate search" in sections
    assert "| if your budget is | pick |" in md and "small tuning budget (3 rates, at most 6 steps each)" in md
    assert "one seed: seed noise not measured" in md
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
        trials = optuna.load_study(study_name=f"tiny-{name}", storage=storage).get_trials()
        assert sorted((t.user_attrs["rung"], t.user_attrs["slot"]) for t in trials) == [(0, 0), (0, 1), (0, 2), (1, 0)]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        pids |= {t.user_attrs["pid"] for t in trials}
        for t in trials:  # each rate's log holds every step once: no two trainings of one run
            steps = [r["step"] for r in read_log(tmp_path / "runs" / "tiny" / "search" / name / search.run_name(t.params["lr"]))]
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
    first_log = tmp_path / "runs" / "tiny" / "search" / "lora_r4" / "lr-2e-05" / "log.jsonl"
    deadline = time.monotonic() + 600
    while not (first_log.is_file() and first_log.read_text().count("\n") >= 2):  # mid-trial: step 1 logged
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()[-2000:]
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    storage = search.open_storage(f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'search' / 'optuna.db'}")
    trials = optuna.load_study(study_name="tiny-lora_r4", storage=storage).get_trials()
    states = sorted((t.user_attrs["rung"], t.user_attrs["slot"], t.user_attrs["attempt"], t.state.name) for t in trials)
    assert states == [(0, 0, 0, "FAIL"), (0, 0, 1, "COMPLETE"), (0, 1, 0, "COMPLETE"), (0, 2, 0, "COMPLETE"),
                      (1, 0, 0, "COMPLETE")], states
    steps = [r["step"] for r in read_log(first_log.parent)]
    assert steps == sorted(set(steps)) and 2 in steps


@pytest.mark.parametrize("extra,expected", [
    ({"search": {"rate": 3}}, "unknown search key 'rate'"),
    ({"search": {"lrs": {"full": []}}}, "search 'lrs' of 'full' is an empty range"),
    ({"search": {"metric": "val_acc"}}, "search metric 'val_acc' needs task classification"),
    ({"search": {"metric": "bleu"}}, "search metric 'bleu' is not one of"),
    ({"search": {"rates": 0}}, "search 'rates' must be a whole number of at least 1"),
    ({"search": {"storage": "sqlite:////nonexistent-folder/sub/study.db"}}, "search storage 'sqlite:////nonexistent-folder/sub/study.db' cannot be reached"),
    ({"search": {"storage": "postgresql://user@127.0.0.1:9/study"}}, "search storage 'postgresql://user@127.0.0.1:9/study'"),
    ({"grid": {"train.max_step": [2, 3]}}, "did you mean 'train.max_steps'"),
    ({"grid": {"method.r": []}}, "grid key 'method.r' has an empty range"),
    ({"grid": {"method.num_virtual_tokens": [4, 8]}}, "grid key 'method.num_virtual_tokens' applies to no recipe"),
    ({"forgetting": {"data_file": "nowhere.txt"}}, "forgetting data_file 'nowhere.txt' does not exist"),
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
    from conftest import run_script

    also = also.replace("FILE", str(assets / "valid.txt"))
    result = run_script("evaluate.py", "--model", assets / "gpt2", "--tasks", "ppl", "--data-file", assets / "valid.txt",
                        "--also-ppl", also, "--out", tmp_path / "base")
    assert_one_clear_line(result, expected)
    assert not (tmp_path / "base").exists()
