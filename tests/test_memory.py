"""Fitting in little memory: 8-bit AdamW, gradient checkpointing with every method, the memory plan,
and the settings train.py refuses. (DeepSpeed ZeRO: tests/test_deepspeed.py.)"""
import json
import re

import bitsandbytes as bnb
import pytest
import torch
from transformers import GPT2Config

from conftest import ROOT, assert_one_clear_line, read_log, run_script, tiny_run, train, train_observed
from tunebench.methods import apply_method
from tunebench.metrics import causal_nll
from tunebench.models import enable_gradient_checkpointing, load_model, load_tokenizer
from tunebench.plan import Planner, Setup, cheapest_fits, setup_from_config_file
from tunebench.recipe import load_recipe


def overrides(assets, out, model="gpt2", steps=12):
    return tiny_run(assets, out, "train.eval_max_batches=4", model=model, steps=steps)


# ---- 8-bit AdamW ---------------------------------------------------------------------------------

def test_adamw_8bit_trains_and_keeps_8bit_state(assets, tmp_path):
    run = tmp_path / "full_8bit"
    train("full_8bit", *overrides(assets, run), "train.lr=3e-3")
    records = read_log(run)
    train_losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert train_losses[-1] < train_losses[0] - 0.05
    assert records[-1]["val_loss"] < records[0]["val_loss"]

    # The optimizer's own tensors, as the checkpoint holds them: one byte per moment for tensors of
    # 4096 elements or more, float32 below that (bitsandbytes' min_8bit_size).
    saved = torch.load(run / "checkpoints" / "step-12" / "optimizer.bin", weights_only=False)["state"]
    state = {i: s["__bnb_optimizer_quant_state__"] for i, s in saved.items()}  # how bitsandbytes saves its tensors
    eight_bit = [s for s in state.values() if s["state1"].numel() >= 4096]
    small = [s for s in state.values() if s["state1"].numel() < 4096]
    assert eight_bit and small
    for s in eight_bit:
        assert s["state1"].dtype == s["state2"].dtype == torch.uint8
        assert s["absmax1"].numel() == -(-s["state1"].numel() // 256)  # one float32 scale per 256-element block
    for s in small:
        assert s["state1"].dtype == s["state2"].dtype == torch.float32

    summary = json.loads((run / "summary.json").read_text())
    measured = sum(t.numel() * t.element_size() for s in state.values() for k, t in s.items()
                   if torch.is_tensor(t) and not k.startswith("qmap")) + 2 * 256 * 4  # the two shared qmaps once
    assert summary["optimizer_state_mb"] * 2**20 == pytest.approx(measured)
    assert summary["memory_plan"]["optimizer_state_mb"] == pytest.approx(summary["optimizer_state_mb"])


def test_adamw_8bit_decays_weights_like_adamw():
    """Decoupled weight decay (p *= 1 - lr * wd), not an L2 term in the gradient: with a zero gradient
    the moments stay zero and only the decay moves the weights, exactly as in torch AdamW."""
    after_decay, after_update = [], []
    for optimizer_class in (torch.optim.AdamW, bnb.optim.AdamW8bit):
        p = torch.nn.Parameter(torch.ones(64, 128))
        optimizer = optimizer_class([{"params": [p], "weight_decay": 0.5}], lr=0.1)
        p.grad = torch.zeros_like(p)
        optimizer.step()
        after_decay.append(p.detach().clone())
        p.grad = torch.full_like(p, 0.3)
        optimizer.step()
        after_update.append(p.detach().clone())
    for decayed in after_decay:
        torch.testing.assert_close(decayed, torch.full((64, 128), 1 - 0.1 * 0.5))
    torch.testing.assert_close(after_update[1], after_update[0], rtol=1e-3, atol=1e-3)


# ---- gradient checkpointing ------------------------------------------------------------------------

METHOD_OVERRIDES = {
    "full": [],
    "lora_r16": [],
    "prompt_tuning": ["method.num_virtual_tokens=8"],
}


@pytest.mark.parametrize("recipe_name", METHOD_OVERRIDES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(assets, recipe_name):
    """Same loss and gradients with and without checkpointing (dropout on: checkpointing replays the
    random state), every trained parameter gets a gradient, and the forward pass keeps far fewer
    tensors for the backward pass (the blocks' insides are recomputed)."""
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml",
                         [f"model.name={assets / 'gpt2'}", "data.dataset=x", *METHOD_OVERRIDES[recipe_name]])
    tokenizer = load_tokenizer(recipe.model)
    paragraphs = (assets / "train.txt").read_text().split("\n")[:2]
    ids = tokenizer(paragraphs, return_tensors="pt", truncation=True, max_length=48, padding="max_length")["input_ids"]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(recipe.model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model = apply_method(model, recipe.method, tokenizer)
        with torch.no_grad():  # LoRA starts with B = 0, which leaves A no gradient: start from a trained-like B
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model.train()
        kept = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            nll, count = causal_nll(model(input_ids=ids).logits, ids)
        (nll / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((nll.item(), grads, sum(kept)))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results
    assert kept_b < 0.6 * kept_a
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_in_train_py_gives_the_same_losses(assets, tmp_path):
    runs, kept = {}, {}
    for checkpointing in ("false", "true"):
        runs[checkpointing] = tmp_path / f"lora_{checkpointing}"
        notes = train_observed(tmp_path, "lora_r16", *overrides(assets, runs[checkpointing], steps=4), "train.lr=1e-2",
                               f"model.gradient_checkpointing={checkpointing}")
        kept[checkpointing] = notes["kept_for_backward_bytes"]
    # The switch took effect: the checkpointed run kept far fewer tensors for its backward passes.
    assert kept["true"] < 0.6 * kept["false"], kept
    plain, checkpointed = read_log(runs["false"]), read_log(runs["true"])
    assert [r["step"] for r in plain] == [r["step"] for r in checkpointed]
    for a, b in zip(plain, checkpointed):
        for key in ("train_loss", "val_loss"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


# ---- the memory plan ---------------------------------------------------------------------------------

def test_plan_prints_a_breakdown_that_sums_to_its_total(assets, tmp_path):
    out = tmp_path / "never_written"
    result = run_script("train.py", "--recipe", ROOT / "recipes/lora_r16.yaml", *overrides(assets, out), "--plan")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(re.findall(r"^\s+(weights|gradients|optimizer state|activations|runtime|predicted peak)\s+([\d,.]+) MB",
                              result.stdout, re.M))
    assert set(figures) == {"weights", "gradients", "optimizer state", "activations", "runtime", "predicted peak"}
    values = {k: float(v.replace(",", "")) for k, v in figures.items()}
    parts = sum(v for k, v in values.items() if k != "predicted peak")
    assert values["predicted peak"] == pytest.approx(parts, abs=0.3)  # each line rounds to 0.1 MB
    assert values["weights"] > 0 and values["activations"] > 0
    assert "fits" not in result.stdout
    assert not out.exists()

    roomy = run_script("train.py", "--recipe", ROOT / "recipes/lora_r16.yaml", *overrides(assets, out),
                       "--plan", "--budget-gb", "1000")
    assert "budget 1000 GB: fits as it is" in roomy.stdout


def test_plan_optimizer_state_matches_the_optimizers_tensors(assets):
    """The plan's optimizer state is the optimizer's real tensors, byte for byte, for every optimizer."""
    for optimizer, make in (("adamw", torch.optim.AdamW), ("adamw_8bit", bnb.optim.AdamW8bit),
                            ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))):
        recipe = load_recipe(ROOT / "recipes/full.yaml", [f"model.name={assets / 'gpt2'}", "data.dataset=x",
                                                          "data.max_length=32", f"train.optimizer={optimizer}"])
        model = load_model(recipe.model)
        params = list(dict.fromkeys(model.parameters()))
        real = make(params) if optimizer != "adamw" else make(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        real.step()
        tensors = {t.data_ptr(): t for s in real.state.values() for t in s.values() if torch.is_tensor(t)}
        measured = sum(t.numel() * t.element_size() for t in tensors.values())
        predicted = Planner(recipe, model.config, Setup()).predict().optimizer_state
        assert predicted == measured, optimizer


def test_budget_search_finds_cheaper_settings_that_fit(assets, tmp_path):
    """A small model with a large vocabulary: at micro-batch 8 the logits dominate, so the cheapest
    settings that fit 60% of the memory halve the micro-batch (same global batch), nothing dearer."""
    folder = tmp_path / "wide_vocab"
    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=8192, n_positions=256).save_pretrained(folder)
    recipe = load_recipe(ROOT / "recipes/full.yaml", [f"model.name={folder}", "data.dataset=x", "data.max_length=256",
                                                      "train.micro_batch_size=8"])
    planner = Planner(recipe, GPT2Config.from_pretrained(folder), Setup())
    planner.runtime = 0  # tensors only: the budget below is about the model, not this test process
    as_is = planner.predict()
    budget = int(as_is.peak * 0.6)
    found = cheapest_fits(planner, budget)
    assert found
    assert all(p.peak <= budget for _, p in found)
    assert found[0][0] == ["train.micro_batch_size=4", "train.grad_accum=2"]


def test_accelerate_configs_describe_their_setups(monkeypatch):
    monkeypatch.chdir(ROOT)  # accelerate reads deepspeed_config_file from the working directory
    configs = ROOT / "accelerate_configs"
    assert setup_from_config_file(configs / "cpu.yaml") == Setup(device="cpu")
    zero2 = setup_from_config_file(configs / "deepspeed_zero2.yaml")
    assert (zero2.zero_stage, zero2.processes, zero2.offload_optimizer) == (2, 2, False)
    offload = setup_from_config_file(configs / "deepspeed_zero3_offload.yaml")
    assert (offload.zero_stage, offload.offload_optimizer, offload.offload_params) == (3, True, True)
    assert setup_from_config_file(configs / "multi_gpu.yaml").mixed_precision == "bf16"


# ---- refused -----------------------------------------------------------------------------------------

def test_budget_without_plan_is_refused(assets, tmp_path):
    result = run_script("train.py", "--recipe", ROOT / "recipes/full.yaml", *overrides(assets, tmp_path / "x"),
                        "--budget-gb", "4")
    assert_one_clear_line(result, "go with --plan")
