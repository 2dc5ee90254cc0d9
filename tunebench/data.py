"""Data sets: registry of named sets, local files, formats, tokenization, packing, masking.

A recipe's data section names a data set (a registered name, a hub id, or local files) and a
format; every format ends in token sequences with labels, where label -100 is never scored.

  text           documents joined with the end-of-text token and cut into blocks of data.max_length
                 tokens (packed); every token is scored. The last block may be shorter.
  instruction    a prompt and a response through a template (Alpaca's by default): the loss is on
                 the response and the end-of-text token after it (data.train_on_prompt: true scores
                 the prompt too). A response too long for data.max_length is cut at its end.
  summarization  like instruction with the "tldr" template (article, "\\nTL;DR:", summary); the
                 article is cut instead, so the summary always fits in data.max_length.
  prompt_completion  TRL's prompt and completion strings: the completion (and the end-of-text token)
                 follows the prompt as it is (template "completion"); the loss is on the completion.
                 Prompt and completion as lists of turns are one conversation through the chat
                 template, the loss on the completion's assistant turns.
  conversation   rows of turns (`messages` of role/content, or ShareGPT's `conversations` of
                 from/value) through the model's chat template (tunebench/chat.py); the loss is on
                 every assistant turn. OpenAssistant message trees: each assistant reply with the
                 prompter message it answers, through the "oasst" template.
  classification (task: classification) a text and a label; the text is cut to data.max_length.

Formatted examples are packed into rows of data.max_length tokens where that is exact
(pack_examples: position ids restart per example, attention stays inside each example; train.py
decides, see data.packing in the README); otherwise each is one row, and the collator pads a
batch to its longest row (dynamic padding) with label -100. Padding is never scored and no
example attends to another. Batches are drawn in the data loader's seeded random order, never bucketed by length:
bucketing would change which examples share a batch, and so the gradient noise, by method.

Tokenization is cached by the datasets library under a fingerprint of the data, the tokenizer and
every setting that shapes the examples.
"""
import hashlib
import math
import os
import re
from pathlib import Path

import datasets
import numpy as np
import torch

from tunebench import chat, inputs
from tunebench.errors import UserError
from tunebench.metrics import IGNORE_INDEX  # the label no loss scores

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

# Prompt templates: {prompt} and {response} stand for the mapped fields, {input} for the optional
# input field. A pair is (without input, with input), chosen per row by whether its input is empty.
_ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
TEMPLATES = {
    "alpaca": (
        _ALPACA_HEAD.format("") + "### Instruction:\n{prompt}\n\n### Response:\n{response}",
        _ALPACA_HEAD.format(", paired with an input that provides further context")
        + "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n{response}",
    ),
    "tldr": "{prompt}\nTL;DR: {response}",
    "oasst": "### Human: {prompt} ### Assistant: {response}",
    "plain": "{prompt}\n{response}",
    "completion": "{prompt}{response}",
}
PLACEHOLDERS = ("prompt", "input", "response")

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}



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


def load_raw(data_cfg: dict) -> tuple:
    """(DatasetDict of raw rows, the registry spec or {}). A registered name reads the hub, or the
    local files of data.files, which hold the hub's rows: one file is the data set's training
    split, a folder's files are split by name (train, validation, test)."""
    name = data_cfg["dataset"]
    spec = REGISTRY.get(name, {})
    path = Path(name)
    if data_cfg["files"]:
        files = Path(data_cfg["files"])
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
        raw = _load_hub(spec["hub"], data_cfg["config"] or spec["config"], name)
    elif path.is_file():
        raw = _load_local({"train": [path]})
    elif path.is_dir():
        raw = _load_local(_split_files(path))
    elif name.startswith((".", "/", "~")) or Path(name).suffix.lower() in LOCAL_BUILDERS:
        raise UserError(f"data file '{name}' does not exist")
    elif "/" in name:
        raw = _load_hub(name, data_cfg["config"], name)
    else:
        raise UserError(
            f"data set '{name}' is neither registered ({', '.join(REGISTRY)}), a hub id (owner/name) nor an existing file"
        )
    if data_cfg["validation_file"]:
        vpath = inputs.existing_file(data_cfg["validation_file"], "data.validation_file")
        raw["validation"] = _load_local({"train": [vpath]})["train"]
    return raw, spec


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


def resolve_format(data_cfg: dict, task: str, spec: dict, columns=None) -> tuple:
    """(format, fields, why): the recipe's keys over the registered data set's over the format's
    defaults. A local file (columns: its fields) without a format or fields is read by its shape."""
    name = data_cfg["dataset"]
    why = None
    if task == "classification":
        fmt = "classification"
    elif data_cfg["format"] or spec:
        fmt = data_cfg["format"] or spec["format"]
    elif data_cfg["prompt_field"] or data_cfg["response_field"]:
        fmt = "instruction"
    elif data_cfg["text_field"] or columns is None:
        fmt = "text"
    else:
        fmt, why = recognise_shape(columns, name)
    for key in sorted(set().union(*FORMAT_KEYS.values()) - FORMAT_KEYS[fmt]):
        if data_cfg[key] not in (None, False):
            raise UserError(
                f"recipe key 'data.{key}' does not apply to data set '{name}' read as {fmt}; "
                f"that reads {', '.join('data.' + k for k in sorted(FORMAT_KEYS[fmt]))}"
            )
    fields = {k: v for k, v in FORMAT_DEFAULTS[fmt].items()}
    fields.update({k: v for k, v in spec.items() if k in FIELD_KEYS and k in FORMAT_KEYS[fmt]})
    fields.update({k: data_cfg[k] for k in FIELD_KEYS if data_cfg[k] is not None})
    return fmt, fields, why


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
        _column_check(ds, column, "format", where)

    def fn(batch):
        if len(columns) == 1:
            return {"turns": batch[columns[0]], "first_scored": [0] * len(batch[columns[0]])}
        prompts, completions = batch[columns[0]], batch[columns[1]]
        return {"turns": [(p or []) + (c or []) for p, c in zip(prompts, completions)],
                "first_scored": [len(p or []) for p in prompts]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="reading turns")


def split_rows(raw, data_cfg: dict, spec: dict, seed: int) -> tuple:
    """(train, validation, test) rows. Validation is the data set's own split (or data.validation_file),
    test its "test" split; a part it lacks is held out of train, a data.validation_share of it each,
    validation first, by a shuffle with the seed. The parts are disjoint: validation picks the best
    step and, in a suite's search, the learning rate; test only scores the comparison (evaluate.py)."""
    train_name = data_cfg["train_split"] if data_cfg["train_split"] != "train" else spec.get("train_split", "train")
    if train_name not in raw:
        raise UserError(f"data set '{data_cfg['dataset']}' has no split '{train_name}'; it has {', '.join(raw)}")
    train = raw[train_name]
    val_name = data_cfg["validation_split"] or spec.get("validation_split")
    if val_name is None and "validation" in raw and train_name != "validation":
        val_name = "validation"
    if val_name is not None and val_name not in raw:
        raise UserError(f"data set '{data_cfg['dataset']}' has no split '{val_name}'; it has {', '.join(raw)}")
    test_name = "test" if "test" in raw and "test" not in (train_name, val_name) else None
    parts = {"validation": raw[val_name] if val_name else None, "test": raw[test_name] if test_name else None}
    missing = [part for part, rows in parts.items() if rows is None]
    share = data_cfg["validation_share"]
    n_held_out = math.ceil(len(train) * share)
    if missing and (share == 0 or n_held_out * len(missing) >= len(train)):
        raise UserError(
            f"data set '{data_cfg['dataset']}' has {len(train)} rows and no {' or '.join(missing)} split; give "
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


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token}|{text}".encode()).hexdigest()[:16]


def _fingerprint(ds, tokenizer, *settings) -> str:
    """The cache key of a tokenized data set: its rows, the tokenizer and every setting that shapes it."""
    text = "|".join(map(str, (ds._fingerprint, tokenizer_fingerprint(tokenizer), *settings)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _column_check(ds, field: str, key: str, where: str) -> None:
    if field not in ds.column_names:
        raise UserError(f"{where} has no field '{field}'; its fields are {', '.join(ds.column_names)}; set data.{key}")


# ---- text: packed -----------------------------------------------------------------------------------

def tokenize(ds, tokenizer, text_field: str, num_proc=None):
    """Token ids of every non-empty row; cached on disk by the datasets library."""
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_field]], batched=True, num_proc=num_proc)
    return ds.map(
        lambda batch: {"input_ids": tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]},
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        new_fingerprint=_fingerprint(ds, tokenizer, text_field),
        desc="tokenizing",
    )


class Examples(torch.utils.data.Dataset):
    """Token sequences with labels (per token, or one class per row); the collator pads them.
    Packed blocks are one case of it; formatted rows are read lazily from the tokenized table."""

    def __init__(self, input_ids, labels, label_names: list = None, packable: bool = False):
        self.input_ids, self.labels, self.label_names = input_ids, labels, label_names
        # One prompt/response example or conversation per row, labels per token: rows train.py may pack.
        self.packable = packable

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def num_tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))


def pack(token_ds, eos_id: int, max_length: int) -> Examples:
    """Join documents with the end-of-text token and cut the stream into max_length blocks."""
    docs = token_ds.with_format("numpy")["input_ids"]
    eos = np.array([eos_id], dtype=np.int64)
    stream = np.concatenate([part for doc in docs for part in (np.asarray(doc, dtype=np.int64), eos)])
    blocks = [torch.from_numpy(stream[i : i + max_length].copy()) for i in range(0, len(stream), max_length)]
    return Examples(blocks, blocks)


# ---- prompt and response: instruction, summarization, conversation -----------------------------------

def template_variants(template: str) -> tuple:
    """(without input, with input) for a built-in template's name or a template text."""
    value = TEMPLATES.get(template, template)
    variants = value if isinstance(value, tuple) else (value, value)
    for text in variants:
        names = re.findall(r"\{(\w*)\}", text)
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if "{" not in text:
            raise UserError(
                f"data.template '{template}' is neither a built-in template ({', '.join(TEMPLATES)}) nor a text "
                "with {prompt} and {response}, e.g. 'Question: {prompt}\\nAnswer: {response}'"
            )
        in_order = names.count("prompt") == names.count("response") == 1 and text.index("{prompt}") < text.index("{response}")
        if unknown or not in_order:
            raise UserError(
                f"data.template {template!r} must hold {{prompt}} once, then {{response}} once, and may hold {{input}}"
                + (f"; it names {', '.join('{' + n + '}' for n in unknown)}" if unknown else "")
            )
    return variants


def render(template: str, prompt: str, response: str, input_text: str = "") -> tuple:
    """A template filled in, as (text before the prompt, the prompt, text after it, target text).
    The target is the response with the template's text after it. The pieces are tokenized apart,
    so spaces that end a piece begin the next: GPT-2's tokens carry their leading space
    ("TL;DR:" + " The", not "TL;DR: " + "The")."""
    head, rest = template.split("{prompt}")
    middle, after = rest.split("{response}")
    head, middle, after = (part.replace("{input}", input_text) for part in (head, middle, after))
    head_end, middle_end = head.rstrip(" "), middle.rstrip(" ")
    return head_end, head[len(head_end):] + prompt, middle_end, middle[len(middle_end):] + response + after


def fit_prompt_side(head: list, prompt: list, middle: list, room: int) -> list:
    """The prompt side of a row (token ids of the template's head, the prompt, the template's text
    before the response) in `room` tokens: the prompt is cut at its end to fit. Training and
    evaluate.py build it with this one function."""
    return head + prompt[: max(0, room - len(head) - len(middle))] + middle


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


def pair_rows(ds, fmt: str, fields: dict, data_cfg: dict, where: str):
    """The rows as columns prompt, response and, when the data has it, input."""
    if fmt == "conversation":
        return conversation_pairs(ds)
    renames = {}
    for column in ("prompt", "response", "input"):
        field = fields.get(f"{column}_field")
        if field is None:
            continue
        if field not in ds.column_names and column == "input" and data_cfg["input_field"] is None:
            continue  # the default input field is optional: data without it has no inputs
        _column_check(ds, field, f"{column}_field", where)
        renames[field] = column
    ds = ds.select_columns(list(renames))
    return ds.rename_columns({f: c for f, c in renames.items() if f != c})


def tokenize_pairs(ds, tokenizer, template: str, data_cfg: dict, cut_prompt: bool, num_proc=None):
    """input_ids = prompt side + target + end-of-text; labels = the target tokens, -100 elsewhere
    (or all tokens with data.train_on_prompt). Rows too long for data.max_length are cut: the
    prompt (cut_prompt: summarization's article) or else the target's end; a row where nothing of
    the target, or nothing of the prompt, would remain is dropped. Column "cut" marks cut rows."""
    variants = template_variants(template)
    max_length, eos = data_cfg["max_length"], tokenizer.eos_token_id
    train_on_prompt = data_cfg["train_on_prompt"]

    def encode(texts):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def fn(batch):
        inputs = batch["input"] if "input" in batch else [None] * len(batch["prompt"])
        pieces = [
            render(variants[bool(i)], p or "", r, i or "") for p, r, i in zip(batch["prompt"], batch["response"], inputs)
        ]
        out = {"input_ids": [], "labels": [], "cut": []}
        for head, prompt, middle, target in zip(*(encode(column) for column in zip(*pieces))):
            target = target + [eos]
            over = len(head) + len(prompt) + len(middle) + len(target) - max_length
            if over > 0 and cut_prompt and over >= len(prompt):
                continue
            if over > 0 and not cut_prompt:
                if over >= len(target):
                    continue
                target = target[: len(target) - over]
            prompt_side = fit_prompt_side(head, prompt, middle, max_length - len(target))
            out["input_ids"].append(prompt_side + target)
            out["labels"].append(prompt_side + target if train_on_prompt else [IGNORE_INDEX] * len(prompt_side) + target)
            out["cut"].append(over > 0)
        return out

    settings = (variants, max_length, cut_prompt, train_on_prompt)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, *settings), desc="tokenizing")


def tokenize_conversations(ds, tokenizer, template: str, data_cfg: dict, num_proc=None):
    """Rows of turn_rows -> input_ids = the conversation through the chat template; labels = every
    assistant turn's reply and end-of-turn token from first_scored on, -100 elsewhere (all tokens
    with data.train_on_prompt). A conversation longer than data.max_length keeps its turns up to
    the last assistant turn that fits (column "cut"); column "problem" says why a row gives no
    example ("" when it does): a bad row (chat.BadConversation), or "too long" when not even its
    first reply fits."""
    max_length, train_on_prompt = data_cfg["max_length"], data_cfg["train_on_prompt"]

    def fn(batch):
        out = {"input_ids": [], "labels": [], "cut": [], "problem": []}
        for row, first in zip(batch["turns"], batch["first_scored"]):
            ids, spans, cut, problem = [], [], False, ""
            try:
                messages = chat.turns(row)
                scored = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
                if not scored:
                    raise chat.BadConversation("no assistant turn in the completion")
                ids, spans = chat.encode(tokenizer, template, messages, scored)
                ids, spans, cut = chat.fit(ids, spans, max_length)
                if ids is None:
                    ids, spans, problem = [], [], "too long"
            except chat.BadConversation as e:
                problem = str(e)
            out["input_ids"].append(ids)
            out["labels"].append(chat.labels_for(ids, spans, train_on_prompt))
            out["cut"].append(cut)
            out["problem"].append(problem)
        return out

    settings = ("chat", template, max_length, train_on_prompt)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, *settings), desc="tokenizing")


def usable_conversations(tokens, where: str, max_length: int):
    """The rows that gave an example. Bad rows are counted and skipped, as are conversations too
    long for even their first reply; a split where no row is left is an error."""
    problems = {}
    for problem in tokens["problem"]:
        if problem:
            problems[problem] = problems.get(problem, 0) + 1
    too_long = problems.pop("too long", 0)
    summary = ", ".join(f"{n:,} {p}" for p, n in sorted(problems.items(), key=lambda item: -item[1]))
    kept = tokens.filter(lambda batch: [not p for p in batch["problem"]], batched=True)
    if len(kept) == 0:
        if problems:
            raise UserError(f"{where} has no conversation to train on: of {len(tokens):,} rows, {summary}"
                            + (f", {too_long:,} too long for data.max_length {max_length}" if too_long else ""))
        raise UserError(f"{where} has no conversation whose first reply fits data.max_length {max_length}; raise it")
    if problems:
        print(f"data: {where}: skipped {sum(problems.values()):,} of {len(tokens):,} rows ({summary})")
    cut = sum(kept["cut"])
    if cut or too_long:
        print(f"data: {where}: of {len(tokens) - sum(problems.values()):,} conversations, {cut:,} cut to fit "
              f"data.max_length {max_length} (whole turns kept where possible), {too_long:,} dropped "
              "(not even the first reply fits)")
    return kept


# ---- classification ---------------------------------------------------------------------------------

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


def tokenize_labelled(ds, tokenizer, text_field: str, label_field: str, names: list, max_length: int, num_proc=None):
    """input_ids = the text's first max_length tokens, labels = the class id. The pad token is
    dropped from the text: GPT-2 pads with its end-of-text token, and its classifier reads each
    row at the last token that is not the pad token, which must be the text's own last token."""
    pad = tokenizer.pad_token_id
    class_id = {name: i for i, name in enumerate(names)}

    def fn(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {
            "input_ids": [[t for t in row if t != pad][:max_length] for row in ids],
            "labels": [class_id[v] if isinstance(v, str) else int(v) for v in batch[label_field]],
        }

    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_field]], batched=True, num_proc=num_proc)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, text_field, label_field, names, max_length, pad),
                  desc="tokenizing")


# ---- build ------------------------------------------------------------------------------------------

def _lazy(token_ds, names=None, packable=False) -> Examples:
    token_ds = token_ds.with_format("torch", columns=["input_ids", "labels"])
    return Examples(token_ds["input_ids"], token_ds["labels"], names, packable)


def build(data_cfg: dict, tokenizer, seed: int, task: str = "causal_lm") -> tuple:
    """(train Examples, validation Examples) for a recipe's data section; for classification both
    carry label_names. Conversations set tokenizer.chat_template to the template they use."""
    name = data_cfg["dataset"]
    raw, spec = load_raw(data_cfg)
    train, val, _ = split_rows(raw, data_cfg, spec, seed)
    fmt, fields, why = resolve_format(data_cfg, task, spec, train.column_names)
    if why and fmt != "text":  # plain text, as ever, goes without saying
        print(f"data: {name} read as {fmt}: {why} (data.format sets another)")
    num_proc = data_cfg["num_proc"] or (min(8, os.cpu_count() or 1) if len(train) > 50_000 else None)
    splits = {"train": train, "validation": val}
    wheres = {"train": f"data set '{name}'", "validation": f"validation data of '{name}'"}

    if fmt == "classification":
        for split, ds in splits.items():
            _column_check(ds, fields["text_field"], "text_field", wheres[split])
            _column_check(ds, fields["label_field"], "label_field", wheres[split])
        names = label_names(train, val, fields["label_field"], spec, wheres["train"])
        splits["train"] = subsample(train, data_cfg["fraction"], seed)
        out = []
        for split, ds in splits.items():
            tokens = tokenize_labelled(ds, tokenizer, fields["text_field"], fields["label_field"], names,
                                       data_cfg["max_length"], num_proc)
            if len(tokens) == 0:
                raise UserError(f"{wheres[split]} has no text in field '{fields['text_field']}'")
            out.append(_lazy(tokens, names))
        return tuple(out)

    if fmt == "text":
        out = []
        for split, ds in splits.items():
            _column_check(ds, fields["text_field"], "text_field", wheres[split])
            if "text_rows" in spec:
                column, value = spec["text_rows"]
                ds = ds.filter(lambda batch: [v == value for v in batch[column]], batched=True)
            if split == "train":
                ds = subsample(ds, data_cfg["fraction"], seed)
            tokens = tokenize(ds, tokenizer, fields["text_field"], num_proc)
            if len(tokens) == 0:
                raise UserError(f"{wheres[split]} has no text in its {split} split (field '{fields['text_field']}')")
            out.append(pack(tokens, tokenizer.eos_token_id, data_cfg["max_length"]))
        return tuple(out)

    source = turns_source(train, fmt, fields, f"data set '{name}'")
    if source is not None:
        return conversations(splits, tokenizer, source, fields, data_cfg, wheres, seed, num_proc)

    template_variants(fields["template"])  # a bad template fails before any tokenizing
    out = []
    for split, ds in splits.items():
        rows = pair_rows(ds, fmt, fields, data_cfg, wheres[split])
        limit = data_cfg["max_response_chars"]
        rows = rows.filter(
            lambda batch: [bool(r and r.strip()) and (limit is None or len(r) <= limit) for r in batch["response"]],
            batched=True,
        )
        if len(rows) == 0:
            shorter = f" of at most data.max_response_chars {limit} characters" if limit else ""
            raise UserError(f"{wheres[split]} has no example with a response{shorter}")
        if split == "train":
            rows = subsample(rows, data_cfg["fraction"], seed)
        tokens = tokenize_pairs(rows, tokenizer, fields["template"], data_cfg, fmt == "summarization", num_proc)
        if len(tokens) == 0:
            raise UserError(
                f"{wheres[split]} has no example whose {'summary' if fmt == 'summarization' else 'prompt'} fits "
                f"data.max_length {data_cfg['max_length']} with room for the response; raise data.max_length"
            )
        dropped, cut = len(rows) - len(tokens), sum(tokens["cut"])
        if dropped or cut:
            print(
                f"data: {name} {split}: of {len(rows):,} examples, {cut:,} cut to fit data.max_length "
                f"{data_cfg['max_length']} (the {'article' if fmt == 'summarization' else 'response'}), "
                f"{dropped:,} dropped (too long to cut)"
            )
        out.append(_lazy(tokens, packable=True))
    return tuple(out)


def conversations(splits: dict, tokenizer, source, fields: dict, data_cfg: dict, wheres: dict, seed: int,
                  num_proc=None) -> tuple:
    """(train Examples, validation Examples) of rows of turns through the chat template."""
    what = f"'{source}'" if isinstance(source, str) else f"'{source[0]}' and '{source[1]}' turns"
    for key in ("template", "max_response_chars"):
        if data_cfg[key] is not None:
            raise UserError(f"recipe key 'data.{key}' does not apply to conversations of turns ({what}): these use the "
                            "model's chat template, or data.chat_template (data.template is for OpenAssistant message "
                            "trees and prompt/completion strings)")
    template, how = chat.choose_template(tokenizer, fields.get("chat_template"))
    # The run saves its tokenizer in final/: with the template it trained on, the model brings it
    # to evaluate.py, transformers' pipelines and serving.
    tokenizer.chat_template = template
    print(f"data: conversations ({what}) through {how}; loss on "
          + ("every token" if data_cfg["train_on_prompt"] else "the assistant turns"))
    out = []
    for split, ds in splits.items():
        if split == "train":
            ds = subsample(ds, data_cfg["fraction"], seed)
        tokens = tokenize_conversations(turn_rows(ds, source, wheres[split]), tokenizer, template, data_cfg, num_proc)
        out.append(_lazy(usable_conversations(tokens, wheres[split], data_cfg["max_length"]), packable=True))
    return tuple(out)


def collate(pad_id: int):
    """Pad a batch to its longest example (right side); padded positions get label -100 and
    attention mask 0. A batch without padding gets no attention mask, so attention runs its plain
    causal path. Class labels (one per row) become a (batch,) tensor.

    Packed rows (with position_ids, see pack_examples) get no attention mask: transformers derives
    the block-diagonal causal mask from position ids that restart per example. Their padding
    continues with positions 0, 1, ..., a segment of its own that no example attends to; the
    batch's "num_tokens" counts the tokens that are not padding."""

    def fn(examples):
        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : lengths[row]] = torch.as_tensor(e["input_ids"])
        if torch.as_tensor(examples[0]["labels"]).ndim == 0:
            labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        else:
            labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
            for row, e in enumerate(examples):
                labels[row, : lengths[row]] = torch.as_tensor(e["labels"])
        batch = {"input_ids": input_ids, "labels": labels}
        if "position_ids" in examples[0]:
            position_ids = torch.arange(longest).repeat(len(examples), 1)
            for row, e in enumerate(examples):
                position_ids[row, : lengths[row]] = e["position_ids"]
                position_ids[row, lengths[row] :] -= lengths[row]
            batch.update(position_ids=position_ids, num_tokens=torch.tensor(sum(lengths)))
        elif min(lengths) < longest:
            batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch

    return fn


# ---- packing prompt/response examples ---------------------------------------------------------------

class PackedExamples(torch.utils.data.Dataset):
    """Examples (anything whose items hold input_ids and per-token labels) packed into rows of at
    most max_length tokens. A row holds its examples one after another, with position ids that
    restart at each example and the first label of each example set to -100: in a row of its own
    that label is never a target either, and here it would be the previous example's last target."""

    def __init__(self, examples, rows: list, tokens: int):
        self.examples, self.rows, self.tokens, self.label_names = examples, rows, tokens, None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        parts = [self.examples[j] for j in self.rows[i]]
        labels = []
        for part in parts:
            own = torch.as_tensor(part["labels"]).clone()
            own[0] = IGNORE_INDEX
            labels.append(own)
        return {
            "input_ids": torch.cat([torch.as_tensor(p["input_ids"]) for p in parts]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(p["input_ids"])) for p in parts]),
        }

    def num_tokens(self) -> int:
        return self.tokens


OPEN_ROWS = 64  # rows pack_examples keeps open for later examples


def pack_examples(examples, max_length: int) -> PackedExamples:
    """Pack examples into rows of at most max_length tokens, first fit in the data's order: each
    example goes into the first of the last OPEN_ROWS rows with room for it. The result depends on the data and
    max_length only, so every method trains the same rows in the same order."""
    lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
    rows, room, open_rows = [], [], []  # open_rows: rows that still have room for the shortest example
    shortest = min(lengths, default=1)
    for i, length in enumerate(lengths):
        row = next((r for r in open_rows if room[r] >= length), None)
        if row is None:
            rows.append([]), room.append(max_length)
            row = len(rows) - 1
            open_rows.append(row)
        rows[row].append(i)
        room[row] -= length
        if room[row] < shortest:
            open_rows.remove(row)
        elif len(open_rows) > OPEN_ROWS:
            open_rows.pop(0)  # the oldest row stays as it is: bounded time per example
    return PackedExamples(examples, rows, sum(lengths))


# Packed and alone may differ by this many units in the last place of the largest logit, in the
# logits' dtype. On SmolLM2-135M rounding makes 10 in float32; attending across examples makes
# 8 million in float32 and 94 in bfloat16.
ROUNDING_ULPS = 32


def packing_is_exact(model, vocab_size: int) -> bool:
    """Whether this model (with its method) scores two examples packed in one row exactly as it
    scores each alone: position ids must restart the attention too, and nothing the method adds
    (a soft prompt, a prefix) may be shared across the row. Checked by running it, in eval mode.
    Packed and alone, the logits differ by rounding only (SmolLM2-135M in float32: 4e-5 on logits near
    36, ten units in the last place of the largest); attending across examples changes them by tens."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # DeepSpeed ZeRO-3 holds a share of each weight until it runs: judge by the method instead.
        config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
        return not getattr(config, "is_prompt_learning", False)
    device = next(model.parameters()).device
    first, second = torch.arange(5, device=device) % vocab_size, torch.arange(7, 11, device=device) % vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=ids[None], use_cache=False).logits[0, -len(ids) :] for ids in (first, second)]
            positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)
            packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions[None],
                           use_cache=False).logits[0, -9:]
    finally:
        model.train(was_training)
    alone = torch.cat(alone).float()
    rounding = ROUNDING_ULPS * torch.finfo(packed.dtype).eps * alone.abs().max()
    return packed.shape[0] == 9 and bool((packed.float() - alone).abs().max() <= rounding)
