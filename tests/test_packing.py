"""Packing prompt/response examples: each example's loss packed equals its loss alone, a soft prompt
is never shared across a row (packing is refused or left off), and train.py packs by default where
it is exact."""
import json
import random

import pytest
import torch
from accelerate.utils import set_seed

from conftest import ROOT, assert_one_clear_line, run_script, tiny_run, train
from tiny import prose, write_jsonl
from tunebench import data, packing
from tunebench.methods import apply_method
from tunebench.metrics import IGNORE_INDEX, token_nll
from tunebench.models import load_model, load_tokenizer
from tunebench.recipe import ModelSettings, load_recipe


def instruction_rows(n=40, seed=0):
    """Instruction rows of very different lengths, from real prose."""
    rng, paragraphs = random.Random(seed), prose()
    rows = []
    for i in range(n):
        words = paragraphs[i % len(paragraphs)].split()
        rows.append({"instruction": " ".join(words[: rng.randint(1, 4)]), "input": "",
                     "output": " ".join(words[4 : 4 + rng.randint(1, 8)])})
    return rows


def build(assets, tmp_path, *overrides):
    write_jsonl(tmp_path / "train.jsonl", instruction_rows())
    write_jsonl(tmp_path / "validation.jsonl", instruction_rows(8, seed=1))
    cfg = load_recipe(None, ["name=t", "model.name=m", f"data.dataset={tmp_path}", "data.format=instruction",
                             "data.template=plain", "data.max_length=128", *overrides]).data
    return data.build(cfg, load_tokenizer(ModelSettings(name=str(assets / "gpt2"))), 0)[0]


def token_losses(model, batch):
    """Per-position NLL of a collated batch (0 where nothing is scored)."""
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    inputs["use_cache"] = False  # as train.py runs it: packed attention is derived from position ids without a cache
    return token_nll(model(**inputs).logits, targets)


@pytest.mark.parametrize("model_dir", ["gpt2_nodropout", "llama"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_each_example_scores_the_same_packed_and_alone(assets, tmp_path, model_dir, train_on_prompt):
    examples = build(assets, tmp_path, f"data.train_on_prompt={str(train_on_prompt).lower()}")
    lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
    packed = packing.pack_examples(examples, 128)
    assert len(packed) < len(examples) / 3  # short examples share rows
    assert sorted(i for row in packed.rows for i in row) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in packed.rows)
    model = load_model(ModelSettings(name=str(assets / model_dir), dtype="float32")).eval()
    collate = data.collate(0)
    with torch.no_grad():
        alone = token_losses(model, collate([examples[i] for i in range(len(examples))])).sum(-1)
        together = token_losses(model, collate([packed[i] for i in range(len(packed))]))
    for r, row in enumerate(packed.rows):
        start = 0
        for i in row:
            assert together[r, start : start + lengths[i]].sum().item() == pytest.approx(alone[i].item(), rel=1e-4), (r, i)
            start += lengths[i]
        assert together[r, start:].sum() == 0  # the row's padding is never scored


def test_a_soft_prompt_is_not_packed(assets, tmp_path):
    """A soft prompt sits at the start of each row: packed, only the row's first example would see it."""
    recipe = load_recipe(ROOT / "recipes/prompt_tuning.yaml", [f"model.name={assets / 'gpt2'}", "method.num_virtual_tokens=4"])
    set_seed(0)
    tokenizer = load_tokenizer(recipe.model)
    prompt_tuned = apply_method(load_model(recipe.model), recipe.method, tokenizer)
    assert not packing.packing_is_exact(prompt_tuned, len(tokenizer))
    assert packing.packing_is_exact(load_model(recipe.model), len(tokenizer))

    write_jsonl(tmp_path / "train.jsonl", instruction_rows())
    write_jsonl(tmp_path / "validation.jsonl", instruction_rows(8, seed=1))
    args = tiny_run(assets, tmp_path / "run", steps=2) + [f"data.dataset={tmp_path}", "data.format=instruction",
                                                         "data.validation_file=null", "method.num_virtual_tokens=4",
                                                         "data.template=plain"]
    refused = run_script("train.py", "--recipe", ROOT / "recipes/prompt_tuning.yaml", *args, "data.packing=true")
    assert_one_clear_line(refused, "data.packing is true but method prompt_tuning puts virtual tokens before the text")
    assert not (tmp_path / "run").exists()
    ran = train("prompt_tuning", *args)
    assert "data: not packed (method prompt_tuning puts virtual tokens before the text" in ran.stdout


class AttendsAcrossExamples(torch.nn.Module):
    """A model that does not restart attention where position ids restart: given an attention mask,
    transformers applies it instead of the block-diagonal mask it derives from position ids."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


@pytest.mark.parametrize("model_dir", ["gpt2_nodropout", "llama"])
def test_packing_is_exact_unless_attention_crosses_examples(assets, model_dir):
    model = load_model(ModelSettings(name=str(assets / model_dir), dtype="float32"))
    assert packing.packing_is_exact(model, model.config.vocab_size)
    assert not packing.packing_is_exact(AttendsAcrossExamples(model), model.config.vocab_size)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packing_is_exact_on_smollm2(smollm2, dtype):
    """SmolLM2-135M's logits reach about 36: float32 rounding makes packed and alone differ by about 4e-5
    there, far below what attending across examples changes (about 30)."""
    model = load_model(ModelSettings(name=str(smollm2), dtype=dtype))
    assert packing.packing_is_exact(model, model.config.vocab_size)
    assert not packing.packing_is_exact(AttendsAcrossExamples(model), model.config.vocab_size)


def test_train_py_packs_smollm2_when_asked(smollm2, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", instruction_rows())
    write_jsonl(tmp_path / "validation.jsonl", instruction_rows(8, seed=1))
    run = tmp_path / "run"
    train("lora_r4", f"model.name={smollm2}", f"data.dataset={tmp_path}", "data.format=instruction",
          "data.template=plain", "data.max_length=64", "data.packing=true", "train.micro_batch_size=2",
          "train.max_steps=1", "train.eval_max_batches=1", "train.warmup_ratio=0", f"output_dir={run}")
    assert json.loads((run / "summary.json").read_text())["packing"].startswith("packed: 38 training examples into")


def test_train_py_packs_instructions_by_default(assets, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", instruction_rows())
    write_jsonl(tmp_path / "validation.jsonl", instruction_rows(8, seed=1))
    runs = {}
    for setting in ("null", "false"):
        run = tmp_path / setting
        train("lora_r4", *tiny_run(assets, run, steps=2), f"data.dataset={tmp_path}", "data.format=instruction",
              "data.validation_file=null", "data.template=plain", f"data.packing={setting}", "train.micro_batch_size=2")
        runs[setting] = json.loads((run / "summary.json").read_text())
    assert runs["null"]["packing"].startswith("packed: 38 training examples into")
    assert runs["false"]["packing"] == "not packed (data.packing is false)"
    assert runs["null"]["train_blocks"] < runs["false"]["train_blocks"] == 38
    # the same validation examples, scored the same before training, packed or not
    assert runs["null"]["initial_val_loss"] == pytest.approx(runs["false"]["initial_val_loss"], rel=1e-5)
    # two packed rows of 128 tokens carry more real tokens than two padded examples
    assert runs["null"]["train_tokens"] > 2 * runs["false"]["train_tokens"]
