"""Every named data set gives the same examples from its hub shape as from local files of that shape.

The hub cannot be reached here, so the hub's rows are built in memory in the hub's shape (its
splits, columns and feature types) and handed to the loader in place of the download; the same
rows written to jsonl / csv / parquet files are read through data.files."""
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from conftest import ROOT
from tiny import prose
from tunebench import data, data_rows
from tunebench.models import load_tokenizer
from tunebench.recipe import ModelSettings, load_recipe

TEXT = [p.replace("\n", " ")[:300] for p in prose(40)]


def wikitext():
    lines = lambda ps: [line for p in ps for line in ("", f" = {p[:20]} = \n", "", f" {p} \n")]  # noqa: E731
    return DatasetDict({s: Dataset.from_dict({"text": lines(TEXT[i::3])}) for i, s in enumerate(["train", "validation", "test"])})


def labelled(column, names, splits):
    features = Features({"idx": Value("int32"), column: Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict({
        split: Dataset.from_dict(
            {"idx": list(range(n)), column: TEXT[:n], "label": [-1 if split == "test" and column == "sentence" else i % 2 for i in range(n)]},
            features=features,
        )
        for split, n in splits.items()
    })


def imdb():
    d = labelled("text", ["neg", "pos"], {"train": 20, "test": 10, "unsupervised": 6})
    return DatasetDict({s: ds.remove_columns("idx") for s, ds in d.items()})


def alpaca():
    rows = [dict(instruction=f"Summarise part {i}.", input="" if i % 2 else TEXT[i][:80], output=TEXT[i + 1][:120]) for i in range(20)]
    for r in rows:
        r["text"] = "..."  # the hub's rendered prompt: not read
    return DatasetDict({"train": Dataset.from_list(rows)})


def cnn_dailymail():
    return DatasetDict({
        split: Dataset.from_dict({"article": [TEXT[i] * 3 for i in range(k, k + 8)],
                                  "highlights": [TEXT[i][:60] for i in range(k, k + 8)],
                                  "id": [f"{split}{i}" for i in range(8)]})
        for k, split in enumerate(["train", "validation", "test"])
    })


def oasst1():
    features = Features({
        "message_id": Value("string"), "parent_id": Value("string"), "user_id": Value("string"),
        "created_date": Value("string"), "text": Value("string"), "role": Value("string"), "lang": Value("string"),
        "review_count": Value("int32"), "review_result": Value("bool"), "deleted": Value("bool"), "rank": Value("int32"),
        "synthetic": Value("bool"), "model_name": Value("string"),
        "detoxify": {"toxicity": Value("float64"), "threat": Value("float64")},
        "message_tree_id": Value("string"), "tree_state": Value("string"),
        "emojis": Sequence({"name": Value("string"), "count": Value("int32")}),
        "labels": Sequence({"name": Value("string"), "value": Value("float64"), "count": Value("int32")}),
    })

    def tree(split, k):
        rows = []
        for t in range(3):
            root = f"{split}-{t}"
            chain = [(root, None, "prompter"), (root + "a", root, "assistant"), (root + "b", root, "assistant"),
                     (root + "c", root + "a", "prompter"), (root + "d", root + "c", "assistant")]
            for j, (mid, parent, role) in enumerate(chain):
                rows.append(dict(
                    message_id=mid, parent_id=parent, user_id="u", created_date="2023-02-05", text=TEXT[k + t * 5 + j][:90],
                    role=role, lang="en", review_count=3, review_result=True, deleted=False, rank=None if role == "prompter" else j,
                    synthetic=False, model_name=None, detoxify={"toxicity": 0.01, "threat": 0.0}, message_tree_id=root,
                    tree_state="ready_for_export", emojis={"name": ["+1"], "count": [2]},
                    labels={"name": ["spam"], "value": [0.0], "count": [3]},
                ))
        return Dataset.from_list(rows, features=features)

    return DatasetDict({"train": tree("train", 0), "validation": tree("validation", 15)})


def write(hub, folder, kind):
    folder.mkdir()
    for split, ds in hub.items():
        path = folder / f"{split}.{kind}"
        {"jsonl": lambda: ds.to_json(path, lines=True), "csv": lambda: ds.to_csv(path, index=False),
         "parquet": lambda: ds.to_parquet(path)}[kind]()
    return folder


CASES = [  # name, hub rows, local file type, recipe overrides
    ("wikitext2", wikitext, "parquet", []),
    ("wikitext103", wikitext, "jsonl", []),
    ("lambada", lambda: DatasetDict({"test": Dataset.from_dict({"text": TEXT[:12]})}), "jsonl", []),
    ("imdb", imdb, "csv", []),
    ("imdb", imdb, "csv", ["task=classification"]),
    ("sst2", lambda: labelled("sentence", ["negative", "positive"], {"train": 20, "validation": 8, "test": 6}), "csv",
     ["task=classification"]),
    ("alpaca", alpaca, "csv", []),
    ("cnn_dailymail", cnn_dailymail, "jsonl", []),
    ("oasst1", oasst1, "parquet", []),
    ("oasst1", oasst1, "jsonl", ["data.format=conversation"]),
]


def examples(ds):
    return [(e["input_ids"].tolist(), e["labels"].tolist()) for e in ds]


@pytest.mark.parametrize("name, hub_rows, kind, overrides", CASES, ids=[f"{c[0]}-{c[2]}{'-' + c[3][0] if c[3] else ''}" for c in CASES])
def test_local_files_of_the_hub_shape_give_the_same_examples(name, hub_rows, kind, overrides, assets, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(ModelSettings(name=str(assets / "gpt2")))
    base = ["name=t", "model.name=m", f"data.dataset={name}", "data.max_length=512", "data.validation_share=0.2", *overrides]
    recipe = load_recipe(None, base)
    task = recipe.task
    hub = hub_rows()
    spec = data_rows.REGISTRY[name]

    def from_hub(hub_id, config, asked):
        assert (hub_id, config, asked) == (spec["hub"], spec["config"], name)
        return hub

    monkeypatch.setattr(data_rows, "_load_hub", from_hub)
    from_hub_shape = data.build(recipe.data, tokenizer, 0, task)

    local = write(hub, tmp_path / name, kind)
    if name == "lambada":  # one file: the data set's only split
        local = local / "test.jsonl"
    monkeypatch.setattr(data_rows, "_load_hub", None)  # the hub is not asked
    from_files = data.build(load_recipe(None, [*base, f"data.files={local}"]).data, tokenizer, 0, task)

    for hub_split, file_split in zip(from_hub_shape, from_files):
        assert len(hub_split) > 0
        assert examples(hub_split) == examples(file_split)
        assert hub_split.label_names == file_split.label_names
    if task == "classification":
        assert from_files[0].label_names == spec["label_names"]


HUB_ROWS = {"alpaca": alpaca, "cnn_dailymail": cnn_dailymail, "oasst1": oasst1, "imdb": imdb,
            "sst2": lambda: labelled("sentence", ["negative", "positive"], {"train": 20, "validation": 8, "test": 6})}
RECIPES = [p for p in sorted((ROOT / "recipes" / "tasks").glob("*.yaml")) if load_recipe(p).data.dataset in data_rows.REGISTRY]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_task_recipes_build_their_data_from_local_files_of_the_hub_shape(path, assets, tmp_path):
    recipe = load_recipe(path)
    name = recipe.data.dataset
    local = write(HUB_ROWS[name](), tmp_path / name, "parquet")
    recipe = load_recipe(path, [f"data.files={local}"])
    train, val = data.build(recipe.data, load_tokenizer(ModelSettings(name=str(assets / "gpt2"))), 0, recipe.task)
    assert len(train) > 0 and len(val) > 0
    assert all(len(e["input_ids"]) <= recipe.data.max_length for e in train)
    assert (train.label_names is not None) == (recipe.task == "classification")
