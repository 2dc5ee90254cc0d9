"""The fused linear cross-entropy (tunebench/fused_loss.py) is the plain loss without the logits:
equal loss and equal gradients of every trained tensor for every method, the plain loss wherever the
output layer is adapted or post-processed, and train.py says which path it took."""
import json

import pytest
import torch
from accelerate.utils import set_seed

from conftest import ROOT, assert_same_log, tiny_run, train
from tunebench import fused_loss
from tunebench.methods import apply_method
from tunebench.metrics import causal_loss
from tunebench.models import load_model, load_tokenizer
from tunebench.recipe import load_recipe

# Every shipped method recipe (a method added later is covered by its recipe), on the tiny GPT-2
# (output layer tied to the input embedding) and the tiny Llama (its own output layer).
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
ADAPTED_OUTPUT_LAYER = {"lora_all"}  # LoRA on lm_head: its output layer is a peft layer


def model_and_batch(assets, recipe_name, model_dir, chunk_tokens=5):
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml",
                         [f"model.name={assets / model_dir}", "model.dtype=float32", "method.dropout=0.0"]
                         if "lora" in recipe_name else [f"model.name={assets / model_dir}", "model.dtype=float32"])
    models = []
    for _ in range(2):
        base = load_model(recipe.model)
        set_seed(0)
        model = apply_method(base, recipe.method, load_tokenizer(recipe.model))
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give every trained tensor a gradient path
            if p.requires_grad and "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        models.append(model.train())
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 500, (3, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :12] = -100  # a prompt that is not scored
    return models, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("model_dir", ["gpt2_nodropout", "llama"])
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_fused_loss_equals_plain_loss_and_gradients(assets, recipe_name, model_dir, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 512 * 7)  # several chunks of 7 tokens
    (plain, fused), batch = model_and_batch(assets, recipe_name, model_dir)
    loss, path = fused_loss.choose(fused, wanted=True)
    if recipe_name in ADAPTED_OUTPUT_LAYER:
        assert loss is causal_loss and path.startswith("plain cross-entropy") and "not a torch.nn.Linear" in path
        return
    assert path.startswith("fused linear cross-entropy"), path
    with torch.no_grad():  # the output layer passes its input through: no logits are made
        assert fused(input_ids=batch["input_ids"]).logits.shape[-1] == fused.get_output_embeddings().in_features
    torch.manual_seed(3)
    nll_plain, count_plain = causal_loss(plain, batch)
    (nll_plain * 0.25).backward()  # train.py scales the summed loss before backward
    torch.manual_seed(3)
    nll_fused, count_fused = loss(fused, batch)
    (nll_fused * 0.25).backward()
    assert count_fused == count_plain
    assert nll_fused.item() == pytest.approx(nll_plain.item(), rel=2e-6)
    trained = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
    assert trained
    fused_params = dict(fused.named_parameters())
    for name, p in trained:
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_matches_the_plain_loss(assets):
    from accelerate.utils import convert_outputs_to_fp32

    (plain, fused), batch = model_and_batch(assets, "full", "llama")
    loss, _ = fused_loss.choose(fused, wanted=True)
    for model in (plain, fused):  # as accelerate prepares a model for mixed precision: its outputs in float32
        model.forward = convert_outputs_to_fp32(model.forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll_plain, _ = causal_loss(plain, batch)
        nll_fused, _ = loss(fused, batch)
    nll_plain.backward(), nll_fused.backward()
    assert nll_fused.item() == pytest.approx(nll_plain.item(), rel=1e-3)
    w_plain, w_fused = plain.get_output_embeddings().weight.grad, fused.get_output_embeddings().weight.grad
    assert torch.nn.functional.cosine_similarity(w_plain.flatten(), w_fused.flatten(), dim=0) > 0.999


def test_a_model_that_changes_its_logits_keeps_the_plain_loss(tmp_path):
    """Gemma 2 soft-caps its logits after the output layer: fusing would skip that, so it is not done."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=5.0))
    loss, path = fused_loss.choose(model, wanted=True)
    assert loss is causal_loss and "soft-capping" in path
    assert model(input_ids=torch.arange(6)[None]).logits.shape[-1] == 64  # the output layer is left as it was


def test_train_py_says_which_path_and_both_train_the_same(assets, tmp_path):
    runs = {}
    for fused in ("true", "false"):
        run = tmp_path / fused
        result = train("full", *tiny_run(assets, run, "train.lr=3e-3", f"train.fused_loss={fused}",
                                         model="gpt2_nodropout", steps=4))
        runs[fused] = json.loads((run / "summary.json").read_text())
        assert f"loss: {runs[fused]['loss']}" in result.stdout
    assert runs["true"]["loss"].startswith("fused linear cross-entropy")
    assert runs["false"]["loss"] == "plain cross-entropy on the logits (train.fused_loss is false)"
    assert_same_log(tmp_path / "true", tmp_path / "false")


def test_plan_models_both_losses(assets, tmp_path):
    import re

    from conftest import run_script

    args = [*tiny_run(assets, tmp_path / "never"), "data.max_length=128", "train.micro_batch_size=8", "--plan"]
    fused = run_script("train.py", "--recipe", ROOT / "recipes/full.yaml", *args)
    assert fused.returncode == 0, fused.stderr[-2000:]
    assert "optimizer adamw, fused loss" in fused.stdout
    peak = float(re.search(r"predicted peak\s+([\d,.]+) MB", fused.stdout)[1].replace(",", ""))
    plain = float(re.search(r"with the plain loss instead \(train.fused_loss=false\): ([\d,.]+) MB", fused.stdout)[1].replace(",", ""))
    # the plain loss keeps at least one (tokens x vocabulary) float32 tensor more: 8 x 128 x 512 x 4 bytes = 2 MB
    assert plain - peak > 8 * 128 * 512 * 4 / 2**20
    adapted = run_script("train.py", "--recipe", ROOT / "recipes/lora_all.yaml", *args)
    assert "plain loss on the logits" in adapted.stdout and "instead" not in adapted.stdout
