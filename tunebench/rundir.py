"""The run directory: what it holds, written so that no crash or typo leaves it half-written.

runs/NAME/recipe.yaml      the fully resolved recipe
runs/NAME/log.jsonl        one JSON object per logged step
runs/NAME/checkpoints/     step-N folders, each complete before it appears (written under a temporary name)
runs/NAME/final/           the best model or adapter by validation loss, save_pretrained format
runs/NAME/summary.json     written last: its presence means the run finished
"""
import json
import os
import shutil
from pathlib import Path

import yaml

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.recipe import Recipe, to_dict, to_yaml

NEW, RESUME, FINISHED = "new", "resume", "finished"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # a checkpoint's files and their sizes, written last: damage shows against it
STATE_KEYS = ("step", "epoch", "batches_in_epoch", "tokens", "train_time_s", "scheduler")


def write_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")




def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key != "overwrite":
            keys.append(f"{prefix}{key}")
    return keys


def status(run_dir, recipe: Recipe) -> str:
    """NEW, RESUME or FINISHED for this recipe; a UserError if the folder holds something else."""
    run_dir = inputs.writable_folder(run_dir, "output_dir")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return NEW
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise UserError(f"output_dir '{run_dir}' holds files that are not a tunebench run; choose another output_dir")
    try:
        old = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        if not isinstance(old, dict):
            raise ValueError("not a mapping of keys")
    except (ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        if recipe.overwrite:
            return NEW
        raise UserError(
            f"output_dir '{run_dir}' holds a run whose recipe.yaml is damaged ({str(e).splitlines()[0][:120]}); "
            "add overwrite=true to replace the run, or choose another output_dir"
        ) from None
    changed = _differences(old, to_dict(recipe))
    if changed:
        if recipe.overwrite:
            return NEW
        raise UserError(
            f"output_dir '{run_dir}' holds another run (its recipe differs in {', '.join(changed[:4])}); "
            "choose another output_dir, or add overwrite=true to replace it"
        )
    if recipe.overwrite:
        return NEW
    if (run_dir / "summary.json").is_file():
        return FINISHED
    found = checkpoints(run_dir)
    if found and all(damage(c) for c in found):
        raise UserError(
            f"run '{run_dir}' cannot resume: every checkpoint is damaged ("
            + "; ".join(f"{c.name}: {damage(c)}" for c in reversed(found[-3:]))
            + "); add overwrite=true to train it again from the start"
        )
    return RESUME if found else NEW


def read_generations(folder) -> list:
    """generations.jsonl of an evaluated run or baseline folder (evaluate.py writes it), [] when there is none."""
    path = Path(folder) / "generations.jsonl"
    return inputs.read_jsonl_records(path, "; delete it and evaluate again") if path.is_file() else []


def start(run_dir, recipe: Recipe) -> None:
    """Make a fresh run directory (replacing an old run only when the recipe says overwrite)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "recipe.yaml", to_yaml(recipe))


def checkpoints(run_dir) -> list:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir):
    found = checkpoints(run_dir)
    return found[-1] if found else None


def seal(checkpoint, state: dict) -> None:
    """Finish a checkpoint folder: its trainer state, then the manifest of every file's size."""
    checkpoint = Path(checkpoint)
    write_json(checkpoint / STATE_FILE, state)
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    write_json(checkpoint / MANIFEST, {"files": files})


def damage(checkpoint) -> str:
    """Why a checkpoint cannot be resumed from (None when it is intact): a file of its manifest missing
    or of another size (a copy cut short, a disk error), weights whose header does not match their
    size, or a trainer state that is not the JSON train.py wrote."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            return f"{STATE_FILE} lacks {', '.join(missing)}"
    except OSError as e:
        return f"{STATE_FILE} cannot be read ({e.strerror or e})"
    except ValueError:  # not JSON, or not UTF-8
        return f"{STATE_FILE} is not valid JSON"
    manifest = checkpoint / MANIFEST
    if manifest.is_file():  # checkpoints written before manifests existed get the other checks only
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is not the JSON train.py wrote"
        for name, size in files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size:,} bytes, {size:,} when saved"
    elif not any(checkpoint.glob("optimizer*.bin")) and not any(checkpoint.glob("pytorch_model*")):
        return "the optimizer state is missing"
    for weights in sorted(checkpoint.glob("*")):
        if weights.is_file() and weights.suffix in (".safetensors", ".bin"):
            problem = inputs.weights_problem(weights)
            if problem:
                return problem
    return None


def set_aside_damaged(run_dir, say=print) -> None:
    """Move damaged checkpoints newer than the newest intact one to checkpoints/damaged-step-N, saying
    so, so that resuming, saving and pruning see only intact ones. Nothing is deleted."""
    for checkpoint in reversed(checkpoints(run_dir)):
        why = damage(checkpoint)
        if not why:
            return
        aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
        say(f"checkpoint {checkpoint.name} is damaged ({why}): skipped, kept as {aside}")


def temporary(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def publish(tmp, final) -> None:
    """Move a completely written folder into place, replacing an older one of the same name."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def recover(run_dir) -> None:
    """Undo what a kill during publish() or a save can leave: a folder moved aside, a partial write."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for old in folder.glob(".*.old"):
            final = old.with_name(old.name[1 : -len(".old")])
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
        for tmp in folder.glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def free_mb(path) -> float:
    return shutil.disk_usage(path).free / 2**20


def prune(run_dir, keep: int) -> None:
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_log(log_path) -> list:
    """log.jsonl's records, up to a line cut off by a crash (which ends the usable log)."""
    log_path, records = Path(log_path), []
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
    return records


def truncate_log(log_path, last_step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            break  # a line cut off by a crash ends the usable log
    write_atomic(log_path, "".join(line + "\n" for line in kept))


def append_log(log_path, record: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# A suite's runs folder keeps how long each of its steps took, one line a step (compare.py and search.py
# write it; the report sets it beside plan.json's predictions), and, last, the suite's own line.
TIMINGS_FILE = "timings.jsonl"
SUITE = "suite"


def record_time(runs_dir, step: str, seconds: float, status: int = 0) -> None:
    """Note that `step` of the suite (a step name of tunebench/forecast.py's plan, or SUITE) took `seconds`."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "seconds": round(seconds, 3), "status": status}
    if step == SUITE:
        record["load_average"] = list(os.getloadavg())
    append_log(runs_dir / TIMINGS_FILE, record)


def read_timings(runs_dir) -> dict:
    """{step: seconds} of the suite's steps (a step run again: its last time), and SUITE: the time of every
    invocation of the suite added up (an interrupted suite and its resumption)."""
    records = [r for r in read_log(Path(runs_dir) / TIMINGS_FILE) if "seconds" in r]
    timings = {r["step"]: r["seconds"] for r in records if r["step"] != SUITE}
    suite = [r["seconds"] for r in records if r["step"] == SUITE]
    if suite:
        timings[SUITE] = sum(suite)
    return timings
