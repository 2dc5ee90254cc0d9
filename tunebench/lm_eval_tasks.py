"""lm-evaluation-harness tasks (`lm-eval` on PyPI) run through its own Python API on a model already loaded:
the trained model as evaluate.py holds it (an adapter, a soft prompt, trained blocks), in its precision.

Names are checked before a model loads: a task of the harness or of an include folder of task YAMLs
(`--lm-eval-include DIR`), with the harness's close matches for an unknown one; a task's data is loaded
before the model too, so a hub task offline fails in one line and nothing is written. Results keep the
harness's own figures and standard errors, the task's version and few-shot count, and each document's
score (for the verdict's paired intervals).
"""
import difflib
import functools
import math
import os
import statistics
from pathlib import Path

from tunebench.errors import UserError

KEY_PREFIX = "lm_eval:"  # eval.json's task key of an lm-eval task: lm_eval:arc_easy
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "pandas")  # dataset_path values that read local files
HOW_OFFLINE = ("run it with the network, or copy its data to local files and point a task YAML at them "
               "(--lm-eval-include DIR; docs/evaluation.md#lm-evaluation-harness-tasks)")


def names(text: str) -> list:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def check_include(folder) -> None:
    """An include folder exists and every task YAML in it is one the harness reads (the harness itself
    skips a broken YAML without a word, and the task would then be 'unknown')."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--lm-eval-include '{folder}' is not a folder; give the folder that holds your task YAML files")
    files = sorted(folder.rglob("*.yaml"))
    if not files:
        raise UserError(f"--lm-eval-include '{folder}' holds no .yaml task file")
    for path in files:
        try:
            config = load_yaml(path, resolve_func=False)
        except Exception as e:  # the harness's loader raises whatever YAML or its include resolution raised
            reason = " ".join(str(e).split())
            raise UserError(f"--lm-eval-include: '{path}' is not a task YAML lm-eval can read ({reason[:200]})") from None
        if not any(key in config for key in ("task", "group", "tag", "include")):
            raise UserError(f"--lm-eval-include: '{path}' names no task (a task YAML has 'task: NAME')")


@functools.lru_cache(maxsize=4)
def _manager(include, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=include_defaults)


def task_manager(wanted: list, include=None):
    """The harness's TaskManager that knows every wanted name: the include folder alone when it holds them
    all (indexing the harness's own thousands of tasks takes seconds), else the harness's tasks as well.
    An unknown name is one line with the harness's close matches."""
    if include is not None:
        check_include(include)
        include = str(Path(include).resolve())
        local = _manager(include, False)
        if all(name in local.all_tasks for name in wanted):
            return local
    manager = _manager(include, True)
    for name in wanted:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=4)
            hint = f"; close matches: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            where = f" or in --lm-eval-include '{include}'" if include else ""
            raise UserError(f"unknown lm-eval task '{name}' (not in lm-eval {version()}{where}){hint}")
    return manager


def version() -> str:
    from importlib.metadata import version as installed

    return installed("lm-eval")


def _data_source(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    return str(((entry.cfg or {}) if entry else {}).get("dataset_path") or "")


def load_tasks(manager, wanted: list) -> dict:
    """{name: the harness's task object} of every task wanted (a group's tasks, a tag's) with its data loaded;
    a data set that cannot be reached is one line naming the task and how to run it."""
    tasks = {}
    for name in wanted:
        try:
            tasks.update(manager.load([name])["tasks"])
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            source = _data_source(manager, name)
            reason = " ".join(str(e).split())[:200]
            if source and source not in LOCAL_BUILDERS and not Path(source).exists():
                offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
                raise UserError(f"lm-eval task '{name}' reads its data from the Hugging Face hub ('{source}'), which "
                                f"{'is off (offline mode)' if offline else 'cannot be reached'}: {HOW_OFFLINE}") from None
            raise UserError(f"lm-eval task '{name}' could not load its data: {reason}") from None
    return tasks


def harness_model(model, tokenizer, max_length: int, batch_size: int):
    """The harness's HFLM around the model as loaded (a soft prompt's virtual tokens, whose logits come first,
    the harness itself skips when it scores a continuation)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run(lm, manager, wanted: list, limit=None, num_fewshot=None) -> tuple:
    """({eval.json key: figures}, {eval.json key: per-document items}) of the harness's simple_evaluate."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=wanted, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=True, verbosity="ERROR")
    figures, items = {}, {}
    for name, values in results["results"].items():
        record = {_metric_name(k): _number(v) for k, v in values.items() if "," in k}
        higher = (results.get("higher_is_better") or {}).get(name) or {}
        record.update(harness=f"lm-eval {version()}", version=(results.get("versions") or {}).get(name),
                      num_fewshot=(results.get("n-shot") or {}).get(name),
                      documents=((results.get("n-samples") or {}).get(name) or {}).get("effective"), limit=limit,
                      higher_is_better={m: bool(h) for m, h in higher.items() if h is not None})
        figures[KEY_PREFIX + name] = record
    for name, samples in (results.get("samples") or {}).items():
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        # Only a figure that is the mean of its documents' values (acc, not perplexity: the harness keeps each
        # document's loglikelihood under that name) is resampled document by document.
        per_document = {m: [_number(s.get(m)) for s in ordered] for m in figures[KEY_PREFIX + name]["higher_is_better"]}
        means = {m: values for m, values in per_document.items() if values and None not in values
                 and math.isclose(statistics.fmean(values), figures[KEY_PREFIX + name].get(m) or 0.0, rel_tol=1e-9, abs_tol=1e-12)}
        items[KEY_PREFIX + name] = {"unit": "document", "doc_id": [s["doc_id"] for s in ordered], **means}
    return figures, items
