"""task: classification: GPT-2's sequence-classification head on the last real token, every method."""
import json
import random

import pytest
import torch
from conftest import assert_one_clear_line, read_log, run_script
from peft import PeftModel

from tiny import EOS, write_jsonl
from tunebench import data
from tunebench.methods import apply_method, count_params
from tunebench.models import load_model, load_tokenizer
from tunebench.recipe import ModelSettings, load_recipe

POSITIVE = "good great fine nice happy".split()
NEGATIVE = "bad awful poor sad ugly".split()
FILLER = "the movie was and plot it film story long".split()


def reviews(n, seed):
    """Separable toy reviews of 2 to 12 filler words and a last word of the label's sentiment. Some
    end with a real end-of-text token after it, GPT-2's pad token, which the classifier must not
    take for padding."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("neg", "pos")[i % 2]
        words = rng.choices(FILLER, k=rng.randint(2, 12)) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rows.append({"text": " ".join(words) + (EOS if i % 3 == 0 else ""), "label": label})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_jsonl(folder / "train.jsonl", reviews(256, 0))  # 243 after the 5% test share: 15 batches of 16
    write_jsonl(folder / "valid.jsonl", reviews(64, 1))
    return folder


def recipe(assets, toy, method, *overrides):
    return load_recipe(None, [
        "name=c", "model.name=" + str(assets / "gpt2"), "task=classification", f"method.type={method}",
        f"data.dataset={toy / 'train.jsonl'}", f"data.validation_file={toy / 'valid.jsonl'}", "data.max_length=32",
        *overrides,
    ])


def test_labelled_text_tokens_never_hold_the_pad_token(assets, toy):
    tokenizer = load_tokenizer(ModelSettings(name=str(assets / "gpt2")))
    train, val = data.build(recipe(assets, toy, "full").data, tokenizer, 0, "classification")
    assert train.label_names == ["neg", "pos"] and len(train) == 256 - 13 and len(val) == 64  # 13 held out for test
    assert all(tokenizer.pad_token_id not in e["input_ids"].tolist() for e in train)
    assert sorted({int(e["labels"]) for e in val}) == [0, 1]


@pytest.mark.parametrize("method, overrides", [
    ("full", []),
    ("lora", ["method.r=4"]),
    ("partial", ["method.top_blocks=1"]),
    ("partial", []),  # the head alone: a linear probe
    ("prompt_tuning", ["method.num_virtual_tokens=4"]),
])
def test_every_method_trains_the_head_and_reads_the_last_real_token(assets, toy, method, overrides):
    r = recipe(assets, toy, method, *overrides)
    tokenizer = load_tokenizer(r.model)
    train, _ = data.build(r.data, tokenizer, 0, "classification")
    torch.manual_seed(0)
    model = apply_method(load_model(r.model, train.label_names, tokenizer.pad_token_id), r.method, tokenizer)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".score." in f".{name}" for name in trained)  # the new head (peft: its modules_to_save copy)
    trainable, total = count_params(model)
    assert 0 < trainable <= total
    # A row alone and the same row right-padded in a batch with a longer one: the same logits.
    model.eval()
    rows = sorted((train[i] for i in range(8)), key=lambda e: len(e["input_ids"]))
    short, long = rows[0], rows[-1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = data.collate(tokenizer.pad_token_id)([short, long])
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=short["input_ids"][None]).logits
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_classification_trains_above_chance_through_train_py(assets, toy, tmp_path):
    run = tmp_path / "runs" / "toy"
    (toy / "recipe.yaml").write_text(
        "name: toy\ntask: classification\n"
        f"model: {{name: {assets / 'gpt2'}}}\nmethod: {{type: lora, r: 8, alpha: 16}}\n"
        f"data: {{dataset: {toy / 'train.jsonl'}, validation_file: {toy / 'valid.jsonl'}, max_length: 32}}\n"
        "train: {max_steps: 16, micro_batch_size: 16, lr: 1.0e-2, eval_every: 8, save_every: 16}\n"
    )
    result = run_script("train.py", "--recipe", toy / "recipe.yaml", f"output_dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    accuracies = [r["val_acc"] for r in read_log(run) if "val_acc" in r]
    assert summary["task"] == "classification" and summary["label_names"] == ["neg", "pos"]
    assert summary["best_val_acc"] == max(accuracies) and summary["best_step"] > 0
    assert summary["best_val_acc"] >= 0.75 > accuracies[0]  # chance is 0.5; 48 of 64 right is 4 sigma above it

    # final/ holds the adapter with the trained head: loaded as a user would, it scores the same.
    r = recipe(assets, toy, "lora")
    tokenizer = load_tokenizer(ModelSettings(name=str(run / "final")))
    _, val = data.build(r.data, tokenizer, 0, "classification")
    base = load_model(r.model, summary["label_names"], tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, str(run / "final")).eval()
    batch = data.collate(tokenizer.pad_token_id)([val[i] for i in range(len(val))])
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert (predicted == batch["labels"]).float().mean().item() == pytest.approx(summary["best_val_acc"])

    # evaluate.py scores language models: a classification run gets one line, exit 2, nothing written.
    refused = run_script("evaluate.py", "--run", run)
    assert_one_clear_line(refused, "is a classification run: its accuracy is best_val_acc in summary.json")
    assert not (run / "eval.json").exists()
