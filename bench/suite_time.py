"""Where a suite's wall time went: training steps, validation, evaluation, and the rest (start-ups, loads, saves).

    python bench/suite_time.py runs/demo

The suite's time is runs/SUITE/timings.jsonl's (every invocation added up). Each search trial and each
run trained outside the search reports its own clock: summary.json's time_split_s, or, for a trial a
rung stopped, the state of its last checkpoint (which holds every figure but that checkpoint's own save).
Evaluation is eval.json's task times (the model's load left out). What is left is outside all of them:
process starts and exits, imports, model loads, saves, the suite's own bookkeeping and report.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tunebench import rundir  # noqa: E402


def last_checkpoint_state(run_dir: Path) -> dict:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    state = rundir.read_json(checkpoints[-1] / rundir.STATE_FILE)
    return {**state["time_split_s"], "steps": state["train_time_s"]}


def training_clocks(runs: Path) -> dict:
    """time_split_s summed over every process that trained, once per run folder."""
    folders = sorted((runs / "search").glob("*/lr-*"))
    folders += [d for d in sorted(runs.iterdir()) if d.is_dir() and (d / "summary.json").is_file() and not d.is_symlink()]
    totals = {}
    for folder in folders:
        summary_file = folder / "summary.json"
        if summary_file.is_file():
            summary = rundir.read_json(summary_file)
            if "time_split_s" not in summary or (folder.parent == runs and summary.get("search_trial")):
                continue  # the baseline; a comparison run that is a search trial, counted with the search
            split = summary["time_split_s"]
        elif (folder / "checkpoints").is_dir():
            split = last_checkpoint_state(folder)
        else:
            continue
        for key, seconds in split.items():
            totals[key] = totals.get(key, 0.0) + seconds
    return totals


def main(runs: Path) -> None:
    wall = rundir.read_timings(runs)[rundir.SUITE]
    clocks = training_clocks(runs)
    evaluation = sum(seconds for e in runs.glob("*/eval.json")
                     for task, seconds in (rundir.read_json(e).get("time_s") or {}).items() if task != "load_model")
    steps, validation = clocks.get("steps", 0.0), clocks.get("validation", 0.0)
    outside = wall - steps - validation - evaluation
    print(f"suite {wall:.0f} s: training steps {steps:.0f} s, validation in training {validation:.0f} s, "
          f"evaluation {evaluation:.0f} s")
    print(f"outside them {outside:.0f} s ({outside / wall:.0%}); counting validation as outside too, "
          f"{outside + validation:.0f} s ({(outside + validation) / wall:.0%})")
    print(f"of which, on the trainers' own clocks: setup {clocks.get('setup', 0):.0f} s, final/ saves "
          f"{clocks.get('final_saves', 0):.0f} s, checkpoints {clocks.get('checkpoints', 0):.0f} s (without the last of each process)")


if __name__ == "__main__":
    if len(sys.argv) != 2 or rundir.SUITE not in rundir.read_timings(sys.argv[1]):
        sys.exit("usage: python bench/suite_time.py runs/SUITE (the runs folder of a suite that has run)")
    main(Path(sys.argv[1]))
