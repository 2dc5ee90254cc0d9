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

from tunebench.errors import UserError
from tunebench.recipe import to_yaml

NEW, RESUME, FINISHED = "new", "resume", "finished"
STATE_FILE = "trainer_state.json"


def write_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


_REQUIRED = object()


def read_json(path, default=_REQUIRED):
    """The file's JSON; with a default, that default when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if default is _REQUIRED:
            raise
        return default


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key != "overwrite":
            keys.append(f"{prefix}{key}")
    return keys


def status(run_dir, recipe: dict) -> str:
    """NEW, RESUME or FINISHED for this recipe; a UserError if the folder holds something else."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return NEW
    if run_dir.is_file():
        raise UserError(f"output_dir '{run_dir}' is a file; give a folder path")
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise UserError(f"output_dir '{run_dir}' holds files that are not a tunebench run; choose another output_dir")
    old = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    changed = _differences(old, recipe)
    if changed:
        if recipe.get("overwrite"):
            return NEW
        raise UserError(
            f"output_dir '{run_dir}' holds another run (its recipe differs in {', '.join(changed[:4])}); "
            "choose another output_dir, or add overwrite=true to replace it"
        )
    if recipe.get("overwrite"):
        return NEW
    if (run_dir / "summary.json").is_file():
        return FINISHED
    return RESUME if latest_checkpoint(run_dir) else NEW


def start(run_dir, recipe: dict) -> None:
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
