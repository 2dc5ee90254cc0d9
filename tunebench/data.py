"""Data sets: registry of named sets, local files, validation split, tokenization, packing.

Plain text (causal-LM) data is tokenized once (cached by the datasets library under a fingerprint
of the data and the tokenizer), documents are joined with the end-of-text token and cut into
blocks of data.max_length tokens. Every token is used: the last block may be shorter, and the
collator pads it with labels of -100 so padding is never scored.
"""
import hashlib
import math
import os
from pathlib import Path

import datasets
import numpy as np
import torch

from tunebench.errors import UserError

# name -> where it lives on the hub and how its rows are read.
REGISTRY = {
    "wikitext2": dict(hub="Salesforce/wikitext", config="wikitext-2-raw-v1", text_field="text"),
    "wikitext103": dict(hub="Salesforce/wikitext", config="wikitext-103-raw-v1", text_field="text"),
    "lambada": dict(hub="EleutherAI/lambada_openai", config="default", text_field="text", train_split="test"),
    "imdb": dict(hub="stanfordnlp/imdb", config=None, text_field="text", validation_split="test"),
}

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}

IGNORE_INDEX = -100


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
    data_files = {split: [str(p) for p in ps] for split, ps in files_by_split.items()}
    try:
        return datasets.load_dataset(builders.pop(), data_files=data_files)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"cannot read data files {sum(data_files.values(), [])}: {str(e).splitlines()[0]}") from None


def _load_hub(hub_id: str, config: str, name: str) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(hub_id, config)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"data set '{name}' ({hub_id}{', ' + config if config else ''}) is not in the local cache and the hub "
            f"cannot be reached ({type(e).__name__}); run once with network access, or point data.dataset at "
            "local files (e.g. ../shared/data/wikitext-2/valid.txt)"
        ) from None


def load_raw(data_cfg: dict) -> tuple:
    """(DatasetDict of raw rows, the text field, the registry spec or {})."""
    name = data_cfg["dataset"]
    spec = REGISTRY.get(name, {})
    path = Path(name)
    if spec:
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
        vpath = Path(data_cfg["validation_file"])
        if not vpath.is_file():
            raise UserError(f"data.validation_file '{vpath}' does not exist")
        raw["validation"] = _load_local({"train": [vpath]})["train"]
    text_field = data_cfg["text_field"] or spec.get("text_field", "text")
    return raw, text_field, spec


def _column_check(ds, field: str, where: str) -> None:
    if field not in ds.column_names:
        raise UserError(f"{where} has no field '{field}'; its fields are {', '.join(ds.column_names)}; set data.text_field")


def split_train_validation(raw, data_cfg: dict, spec: dict, seed: int) -> tuple:
    """The train split and a validation split: the data set's own, or a held-out share of train."""
    train_name = data_cfg["train_split"] if data_cfg["train_split"] != "train" else spec.get("train_split", "train")
    if train_name not in raw:
        raise UserError(f"data set '{data_cfg['dataset']}' has no split '{train_name}'; it has {', '.join(raw)}")
    train = raw[train_name]
    val_name = data_cfg["validation_split"] or spec.get("validation_split")
    if val_name is None and "validation" in raw and train_name != "validation":
        val_name = "validation"
    if val_name is not None:
        if val_name not in raw:
            raise UserError(f"data set '{data_cfg['dataset']}' has no split '{val_name}'; it has {', '.join(raw)}")
        return train, raw[val_name]
    share = data_cfg["validation_share"]
    n_val = math.ceil(len(train) * share)
    if share == 0 or n_val >= len(train):
        raise UserError(
            f"data set '{data_cfg['dataset']}' has {len(train)} rows and no validation split; "
            "give data.validation_file or a data.validation_share between 0 and 1 that leaves rows for both"
        )
    parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def subsample(ds, fraction: float, seed: int):
    if fraction >= 1.0:
        return ds
    n = max(1, math.ceil(len(ds) * fraction))
    return ds.shuffle(seed=seed).select(range(n))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token}|{text}".encode()).hexdigest()[:16]


def tokenize(ds, tokenizer, text_field: str, num_proc=None):
    """Token ids of every non-empty row; cached on disk by the datasets library."""
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_field]], batched=True, num_proc=num_proc)
    fingerprint = hashlib.sha256(f"{ds._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{text_field}".encode()).hexdigest()[:16]
    return ds.map(
        lambda batch: {"input_ids": tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]},
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


class Examples(torch.utils.data.Dataset):
    """Token sequences with labels; the collator pads them. Packed blocks are one case of it."""

    def __init__(self, input_ids: list, labels: list):
        self.input_ids, self.labels = input_ids, labels

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


def build(data_cfg: dict, tokenizer, seed: int) -> tuple:
    """(train Examples, validation Examples) for a recipe's data section."""
    raw, text_field, spec = load_raw(data_cfg)
    train, val = split_train_validation(raw, data_cfg, spec, seed)
    _column_check(train, text_field, f"data set '{data_cfg['dataset']}'")
    _column_check(val, text_field, f"validation data of '{data_cfg['dataset']}'")
    train = subsample(train, data_cfg["fraction"], seed)
    num_proc = data_cfg["num_proc"] or (min(8, os.cpu_count() or 1) if len(train) > 50_000 else None)
    out = []
    for split, ds in (("train", train), ("validation", val)):
        tokens = tokenize(ds, tokenizer, text_field, num_proc)
        if len(tokens) == 0:
            raise UserError(f"data set '{data_cfg['dataset']}' has no text in its {split} split (field '{text_field}')")
        out.append(pack(tokens, tokenizer.eos_token_id, data_cfg["max_length"]))
    return tuple(out)


def collate(pad_id: int):
    """Pad a batch to its longest example; padded positions get label -100 and attention mask 0.
    A batch without padding gets no attention mask, so attention runs its plain causal path."""

    def fn(examples):
        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : lengths[row]] = torch.as_tensor(e["input_ids"])
            labels[row, : lengths[row]] = torch.as_tensor(e["labels"])
        batch = {"input_ids": input_ids, "labels": labels}
        if min(lengths) < longest:
            batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch

    return fn
