"""A data set's raw rows, before any tokenizer: where they come from (a registered name, a hub id,
local files), the format they are read as and the fields it reads, the train / validation / test
splits, and each format's fields as the columns tunebench/data.py tokenizes (prompt, response and
input; a conversation's turns; class names).

A registered name reads the hub, or data.files (local files of the hub's rows). A local file of
a known shape is recognised by its fields (SHAPES) when the recipe names no format or fields.
"""
import math
from pathlib import Path

import datasets
import numpy as np

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.recipe import DataSettings

# name -> where it lives on the hub, its splits, and how its rows are read. Fields and templates
# here are the defaults of the data set's format; recipe keys override them.
REGISTRY = {
    "wikitext2": dict(hub="Salesforce/wikitext", config="wikitext-2-raw-v1", format="text", text_field="text"),
    "wikitext103": dict(hub="Salesforce/wikitext", config="wikitext-103-raw-v1", format="text", text_field="text"),
    "lambada": dict(hub="EleutherAI/lambada_openai", config="default", format="text", text_field="text", train_split="test"),
    # IMDB's splits are sorted by label, and its test split is the evaluation set: validation is
    # a shuffled share of train (data.validation_share).
    "imdb": dict(hub="stanfordnlp/imdb", config=None, format="text", text_field="text", label_field="label",
                 label_names=["neg", "pos"]),
    "sst2": dict(hub="stanfordnlp/sst2", config=None, format="text", text_field="sentence", label_field="label",
                 label_names=["negative", "positive"]),
    "alpaca": dict(hub="tatsu-lab/alpaca", config=None, format="instruction", prompt_field="instruction",
                   input_field="input", response_field="output", template="alpaca"),
    "cnn_dailymail": dict(hub="abisee/cnn_dailymail", config="3.0.0", format="summarization", prompt_field="article",
                          response_field="highlights", template="tldr"),
    # As text: the assistant replies only. As conversation: prompt-reply pairs from the message trees.
    "oasst1": dict(hub="OpenAssistant/oasst1", config=None, format="text", text_field="text",
                   text_rows=("role", "assistant"), template="oasst"),
}

# Field defaults per format, for local files; a registered data set's own fields come first.
FORMAT_DEFAULTS = {
    "text": dict(text_field="text"),
    "instruction": dict(prompt_field="instruction", input_field="input", response_field="output", template="alpaca"),
    "summarization": dict(prompt_field="article", response_field="highlights", template="tldr"),
    "prompt_completion": dict(prompt_field="prompt", response_field="completion", template="completion"),
    "conversation": dict(template="oasst"),
    "classification": dict(text_field="text", label_field="label"),
}
FIELD_KEYS = ("text_field", "prompt_field", "input_field", "response_field", "label_field", "template", "chat_template")
# The data keys each format reads; setting another is an error, never silently ignored.
PAIR_KEYS = {"prompt_field", "input_field", "response_field", "template", "train_on_prompt", "max_response_chars"}
FORMAT_KEYS = {
    "text": {"text_field"},
    "instruction": PAIR_KEYS,
    "summarization": PAIR_KEYS,
    "prompt_completion": PAIR_KEYS - {"input_field"} | {"chat_template"},
    "conversation": PAIR_KEYS - {"prompt_field", "input_field", "response_field"} | {"chat_template"},
    "classification": {"text_field", "label_field"},
}
CONVERSATION_COLUMNS = ("message_id", "parent_id", "role", "text")
TURN_COLUMNS = ("messages", "conversations")  # a conversation's turns: role/content, or ShareGPT's from/value
# The shapes a local file is recognised by, when the recipe names no format or fields:
# (format, what its rows hold, the fields that make it). A "text" field alone is plain text.
SHAPES = (
    ("conversation", "messages: lists of {role, content} turns", ("messages",)),
    ("conversation", "ShareGPT: conversations, lists of {from, value} turns", ("conversations",)),
    ("prompt_completion", "prompt and completion", ("prompt", "completion")),
    ("instruction", "Alpaca: instruction, input (optional) and output", ("instruction", "output")),
    ("summarization", "article and highlights", ("article", "highlights")),
    ("conversation", "OpenAssistant message trees: message_id, parent_id, role, text", CONVERSATION_COLUMNS),
)

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


# ---- where the rows come from: the registry, the hub, local files -------------------------------------

def _local_builder(path: Path) -> str:
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"data file '{path}' has an unsupported type; use {', '.join(sorted(LOCAL_BUILDERS))}")
    return builder


def _split_files(folder: Path) -> dict:
    """train / validation / test files of a folder, by their names; all files are train otherwise."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_BUILDERS)
    if not files:
        raise UserError(f"data folder '{folder}' holds no {', '.join(sorted(LOCAL_BUILDERS))} files")
    splits = {}
    for split, stems in SPLIT_NAMES.items():
        chosen = [p for p in files if p.stem.lower() in stems or p.stem.lower().split(".")[0] in stems]
        if chosen:
            splits[split] = chosen
    if "train" not in splits:
        named = {p for ps in splits.values() for p in ps}
        splits["train"] = [p for p in files if p not in named] or files
    return splits


def _load_local(files_by_split: dict) -> datasets.DatasetDict:
    builders = {_local_builder(p) for ps in files_by_split.values() for p in ps}
    if len(builders) > 1:
        raise UserError(f"data files mix types ({', '.join(sorted(builders))}); use one file type per data set")
    for path in (p for ps in files_by_split.values() for p in ps):
        if path.stat().st_size == 0:
            raise UserError(f"data file '{path}' is empty")
    data_files = {split: [str(p) for p in ps] for split, ps in files_by_split.items()}
    try:
        return datasets.load_dataset(builders.pop(), data_files=data_files)
    except Exception as e:  # an untrusted file: whatever the reader met, name the file and, if it can, the line
        for path in (p for ps in files_by_split.values() for p in ps):
            problem = inputs.data_file_problem(path)
            if problem:
                raise UserError(f"data file '{path}', {problem}") from None
        files = ", ".join(sum(data_files.values(), []))
        raise UserError(f"cannot read data file(s) {files}: {inputs.first_line(e, innermost=True)}") from None


def _load_hub(hub_id: str, config: str, name: str) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(hub_id, config)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        local = (
            "set data.files to local files of its shape (jsonl, csv or parquet)" if name in REGISTRY
            else "point data.dataset at local files (e.g. ../shared/data/wikitext-2/valid.txt)"
        )
        raise UserError(
            f"data set '{name}' ({hub_id}{', ' + config if config else ''}) is not in the local cache and the hub "
            f"cannot be reached ({type(e).__name__}); run once with network access, or {local}"
        ) from None


def load_raw(data_cfg: DataSettings) -> tuple:
    """(DatasetDict of raw rows, the registry spec or {}). A registered name reads the hub, or the
    local files of data.files, which hold the hub's rows: one file is the data set's training
    split, a folder's files are split by name (train, validation, test)."""
    name = data_cfg.dataset
    spec = REGISTRY.get(name, {})
    path = Path(name)
    if data_cfg.files:
        files = Path(data_cfg.files)
        if not spec:
            raise UserError(
                f"data.files reads a registered data set ({', '.join(REGISTRY)}) from local files; "
                f"'{name}' is not one: set data.dataset to the files themselves"
            )
        if files.is_file():
            raw = _load_local({spec.get("train_split", "train"): [files]})
        elif files.is_dir():
            raw = _load_local(_split_files(files))
        else:
            raise UserError(f"data.files '{files}' does not exist")
    elif spec:
        raw = _load_hub(spec["hub"], data_cfg.config or spec["config"], name)
    elif path.is_file():
        raw = _load_local({"train": [path]})
    elif path.is_dir():
        raw = _load_local(_split_files(path))
    elif name.startswith((".", "/", "~")) or Path(name).suffix.lower() in LOCAL_BUILDERS:
        raise UserError(f"data file '{name}' does not exist")
    elif "/" in name:
        raw = _load_hub(name, data_cfg.config, name)
    else:
        raise UserError(
            f"data set '{name}' is neither registered ({', '.join(REGISTRY)}), a hub id (owner/name) nor an existing file"
        )
    if data_cfg.validation_file:
        vpath = inputs.existing_file(data_cfg.validation_file, "data.validation_file")
        raw["validation"] = _load_local({"train": [vpath]})["train"]
    return raw, spec


# ---- the format and its fields ------------------------------------------------------------------------

def recognise_shape(columns, name: str) -> tuple:
    """(format, why) of a local file from its fields: one known shape (a "text" field beside it is
    ignored), else a "text" field; none or several is an error that lists the shapes."""
    matches = [(fmt, what) for fmt, what, fields in SHAPES if set(fields) <= set(columns)]
    if len(matches) == 1:
        fmt, what = matches[0]
        return fmt, f"its fields are those of {what}"
    if not matches and "text" in columns:
        return "text", "it has a field 'text' and no other known shape"
    known = "; ".join(f"{what} (data.format={fmt})" for fmt, what, _ in SHAPES)
    found = "match several shapes" if matches else "match no shape tunebench knows"
    raise UserError(
        f"data set '{name}' has fields {', '.join(columns)}, which {found}: {known}; or text (a field 'text'). "
        "Set data.format, and its fields if they are named otherwise (data.text_field, data.prompt_field, "
        "data.response_field)"
    )


def resolve_format(data_cfg: DataSettings, task: str, spec: dict, columns=None) -> tuple:
    """(format, fields, why): the recipe's keys over the registered data set's over the format's
    defaults. A local file (columns: its fields) without a format or fields is read by its shape."""
    name = data_cfg.dataset
    why = None
    if task == "classification":
        fmt = "classification"
    elif data_cfg.format or spec:
        fmt = data_cfg.format or spec["format"]
    elif data_cfg.prompt_field or data_cfg.response_field:
        fmt = "instruction"
    elif data_cfg.text_field or columns is None:
        fmt = "text"
    else:
        fmt, why = recognise_shape(columns, name)
    for key in sorted(set().union(*FORMAT_KEYS.values()) - FORMAT_KEYS[fmt]):
        if getattr(data_cfg, key) not in (None, False):
            raise UserError(
                f"recipe key 'data.{key}' does not apply to data set '{name}' read as {fmt}; "
                f"that reads {', '.join('data.' + k for k in sorted(FORMAT_KEYS[fmt]))}"
            )
    fields = {k: v for k, v in FORMAT_DEFAULTS[fmt].items()}
    fields.update({k: v for k, v in spec.items() if k in FIELD_KEYS and k in FORMAT_KEYS[fmt]})
    fields.update({k: getattr(data_cfg, k) for k in FIELD_KEYS if getattr(data_cfg, k) is not None})
    return fmt, fields, why


# ---- splits ------------------------------------------------------------------------------------------

def split_rows(raw, data_cfg: DataSettings, spec: dict, seed: int) -> tuple:
    """(train, validation, test) rows. Validation is the data set's own split (or data.validation_file),
    test its "test" split; a part it lacks is held out of train, a data.validation_share of it each,
    validation first, by a shuffle with the seed. The parts are disjoint: validation picks the best
    step and, in a suite's search, the learning rate; test only scores the comparison (evaluate.py)."""
    train_name = data_cfg.train_split if data_cfg.train_split != "train" else spec.get("train_split", "train")
    if train_name not in raw:
        raise UserError(f"data set '{data_cfg.dataset}' has no split '{train_name}'; it has {', '.join(raw)}")
    train = raw[train_name]
    val_name = data_cfg.validation_split or spec.get("validation_split")
    if val_name is None and "validation" in raw and train_name != "validation":
        val_name = "validation"
    if val_name is not None and val_name not in raw:
        raise UserError(f"data set '{data_cfg.dataset}' has no split '{val_name}'; it has {', '.join(raw)}")
    test_name = "test" if "test" in raw and "test" not in (train_name, val_name) else None
    parts = {"validation": raw[val_name] if val_name else None, "test": raw[test_name] if test_name else None}
    missing = [part for part, rows in parts.items() if rows is None]
    share = data_cfg.validation_share
    n_held_out = math.ceil(len(train) * share)
    if missing and (share == 0 or n_held_out * len(missing) >= len(train)):
        raise UserError(
            f"data set '{data_cfg.dataset}' has {len(train)} rows and no {' or '.join(missing)} split; give "
            f"data.validation_file or a data.validation_share between 0 and 1 that leaves rows for training after "
            f"{len(missing)} held-out share(s)"
        )
    for part in missing:
        split = train.train_test_split(test_size=n_held_out, seed=seed, shuffle=True)
        train, parts[part] = split["train"], split["test"]
    return train, parts["validation"], parts["test"]


def subsample(ds, fraction: float, seed: int):
    if fraction >= 1.0:
        return ds
    n = max(1, math.ceil(len(ds) * fraction))
    return ds.shuffle(seed=seed).select(range(n))


# ---- each format's fields as columns ------------------------------------------------------------------

def check_column(ds, field: str, key: str, where: str) -> None:
    """A UserError naming the data key to set when the rows lack the field."""
    if field not in ds.column_names:
        raise UserError(f"{where} has no field '{field}'; its fields are {', '.join(ds.column_names)}; set data.{key}")


def turn_column(columns, where: str):
    """The field of a conversation's turns (messages or ShareGPT's conversations), or None for
    OpenAssistant message trees."""
    found = [c for c in TURN_COLUMNS if c in columns]
    if len(found) == 1:
        return found[0]
    if not found and set(CONVERSATION_COLUMNS) <= set(columns):
        return None
    raise UserError(
        f"format conversation reads a field 'messages' (turns of role and content), ShareGPT's 'conversations' "
        f"(turns of from and value) or OpenAssistant message trees ({', '.join(CONVERSATION_COLUMNS)}); "
        f"{where} has {'both messages and conversations' if found else 'fields ' + ', '.join(columns)}"
    )


def turns_source(ds, fmt: str, fields: dict, where: str):
    """Where a row's turns are: a field of turns ('messages', ShareGPT's 'conversations'); the
    prompt and completion fields when they hold turns (TRL's conversational prompt/completion);
    None for OpenAssistant message trees and for prompt/completion strings."""
    if fmt == "conversation":
        return turn_column(ds.column_names, where)
    prompt = fields.get("prompt_field")
    if fmt == "prompt_completion" and prompt in ds.column_names and len(ds) and isinstance(ds[0][prompt], list):
        return (prompt, fields["response_field"])
    return None


def turn_rows(ds, source, where: str):
    """The rows as columns turns (a conversation's turns as they are) and first_scored (the first
    turn whose assistant replies are scored: a completion's first turn, else 0)."""
    columns = source if isinstance(source, tuple) else (source,)
    for column in columns:
        check_column(ds, column, "format", where)

    def fn(batch):
        if len(columns) == 1:
            return {"turns": batch[columns[0]], "first_scored": [0] * len(batch[columns[0]])}
        prompts, completions = batch[columns[0]], batch[columns[1]]
        return {"turns": [(p or []) + (c or []) for p, c in zip(prompts, completions)],
                "first_scored": [len(p or []) for p in prompts]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="reading turns")


def conversation_pairs(ds) -> datasets.Dataset:
    """OpenAssistant message rows -> (prompt, response): each assistant reply with the prompter
    message it answers (its parent in the message tree)."""
    missing = [c for c in CONVERSATION_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(
            f"format conversation reads OpenAssistant message trees ({', '.join(CONVERSATION_COLUMNS)}); "
            f"the data has no {', '.join(missing)}"
        )
    rows = ds.select_columns(list(CONVERSATION_COLUMNS))[:]
    prompter_text = {m: t for m, r, t in zip(rows["message_id"], rows["role"], rows["text"]) if r == "prompter"}
    pairs = [
        (prompter_text[parent], text)
        for parent, role, text in zip(rows["parent_id"], rows["role"], rows["text"])
        if role == "assistant" and parent in prompter_text
    ]
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})


def pair_rows(ds, fmt: str, fields: dict, data_cfg: DataSettings, where: str):
    """The rows as columns prompt, response and, when the data has it, input."""
    if fmt == "conversation":
        return conversation_pairs(ds)
    renames = {}
    for column in ("prompt", "response", "input"):
        field = fields.get(f"{column}_field")
        if field is None:
            continue
        if field not in ds.column_names and column == "input" and data_cfg.input_field is None:
            continue  # the default input field is optional: data without it has no inputs
        check_column(ds, field, f"{column}_field", where)
        renames[field] = column
    ds = ds.select_columns(list(renames))
    return ds.rename_columns({f: c for f, c in renames.items() if f != c})


def label_names(train, val, field: str, spec: dict, where: str) -> list:
    """The class names, index = class id. Integer labels (a ClassLabel on the hub, ints in a file)
    are class ids; text labels are named classes, numbered in sorted order."""
    feature = train.features[field]
    values = set(train.unique(field))
    val_values = set(val.unique(field))
    if None in values | val_values:
        raise UserError(f"{where} has rows without a label in field '{field}'")
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
    elif all(isinstance(v, str) for v in values):
        names = sorted(values)
        unseen = sorted(val_values - values, key=str)
        if unseen:
            raise UserError(f"validation data of {where} has labels {unseen} that no training row has")
        return names
    elif all(isinstance(v, (int, np.integer)) for v in values | val_values):
        names = spec.get("label_names") or [str(i) for i in range(int(max(values | val_values)) + 1)]
    else:
        raise UserError(f"labels in field '{field}' of {where} must be class numbers (0, 1, ...) or class names")
    bad = sorted(v for v in values | val_values if not 0 <= v < len(names))
    if bad:
        raise UserError(f"{where} has labels {bad[:5]} outside 0..{len(names) - 1} ({', '.join(names)}); unlabelled rows?")
    if len(values) < 2:
        raise UserError(f"{where} has a single class in its training rows; classification needs two or more")
    return names
