"""The methods beyond plain LoRA, each through peft: what each adds to training checked on its own
(LoRA+'s parameter groups, AdaLoRA's orthogonality term and rank allocation, QLoRA's 4-bit base,
prefix tuning on a Llama cache), the GPT-2 small counts the recipes state, and the labels reports
show. The common checks of every method (counts, frozen weights, reload, resume) are rows of
tests/test_train.py."""
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import tiny
from conftest import ROOT, assert_one_clear_line, read_log, run_script, tiny_run, train
from test_train import end_of_training_model, initial_model, validation_loss
from tunebench.methods import METHODS, apply_method, count_params, label, quantization_kwargs
from tunebench.models import load_model, load_tokenizer
from tunebench.plan import Planner, Setup
from tunebench.recipe import ModelSettings, load_recipe
from train import make_optimizer, make_scheduler

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def recipe_of(name, *overrides):
    return load_recipe(ROOT / "recipes" / f"{name}.yaml", overrides)


# ---- the figures the recipes state, on the real GPT-2 small shape (meta device: no weights) -----------

def test_gpt2_small_parameter_counts_of_the_new_recipes():
    counts = {}
    for name in ("lora_dora", "lora_rslora", "lora_pissa", "lora_plus", "qlora", "ia3", "vera", "prefix_tuning", "adalora"):
        method = recipe_of(name).method
        with torch.device("meta"):
            model = apply_method(GPT2LMHeadModel(GPT2Config()), replace(method, **METHODS[method.type].plan_keys))
        counts[name] = count_params(model)[0]
    lora_r16 = 589_824
    assert counts == {
        "lora_dora": lora_r16 + 12 * 2304,  # a magnitude per output feature of c_attn
        "lora_rslora": lora_r16, "lora_pissa": lora_r16, "lora_plus": lora_r16, "qlora": lora_r16,
        "ia3": 73_728, "vera": 82_944, "prefix_tuning": 368_640, "adalora": 442_512,
    }
    for name, count in counts.items():  # the figure each recipe's opening comment gives
        assert f"{count:,}" in (ROOT / "recipes" / f"{name}.yaml").read_text().replace("589,824 + 2,304 x 12 = ", ""), name


def test_labels_name_the_method_and_its_settings():
    assert label(recipe_of("lora_r16").method) == "LoRA r16"
    assert label(recipe_of("lora_dora").method) == "LoRA r16 + DoRA"
    assert label(recipe_of("lora_r16", "method.rslora=true", "method.loraplus_lr_ratio=16").method) == "LoRA r16 + rsLoRA + LoRA+ x16"
    assert label(recipe_of("lora_pissa").method) == "LoRA r16 + PiSSA"
    assert label(recipe_of("qlora").method) == "QLoRA r16 (4-bit NF4)"
    assert label(recipe_of("adalora").method) == "AdaLoRA r12->8"
    assert label(recipe_of("vera").method) == "VeRA r256"
    assert label(recipe_of("ia3").method) == "IA3 (attn, mlp)"
    assert label(recipe_of("prefix_tuning").method) == "Prefix tuning 20 tokens"
    assert label(recipe_of("top2_blocks").method).startswith("Partial (top 2 blocks")


def test_shared_keys_take_each_methods_own_default():
    def method(*overrides):
        return load_recipe(None, ["name=x", "model.name=gpt2", "data.dataset=wikitext2", *overrides]).method

    assert method("method.type=vera").r == 256  # VeRA's default rank, not LoRA's 16
    assert method("method.type=lora").r == 16
    assert method("method.type=vera", "method.r=8").r == 8
    assert asdict(method("method.type=ia3")) == {"type": "ia3", "targets": ["attn", "mlp"]}


# ---- LoRA+ ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_loraplus_trains_b_matrices_at_lr_times_ratio(assets, optimizer):
    recipe = recipe_of("lora_plus", f"model.name={assets / 'gpt2'}", f"train.optimizer={optimizer}", "train.lr=1e-3",
                       "train.warmup_ratio=0", "train.warmup_steps=2", "train.max_steps=10")
    model = apply_method(load_model(recipe.model), recipe.method)
    opt = make_optimizer(model, recipe.train, torch.device("cpu"), recipe.method)
    scheduler = make_scheduler(opt, recipe.train, 10)
    lr_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in names.values()} == lr_of.keys()  # every trained tensor, once
    for _ in range(3):  # the schedule scales both groups alike
        opt.step(), scheduler.step()
        for name, p in names.items():
            expected = scheduler.get_last_lr()[0] * (16 if "lora_B" in name else 1)
            assert lr_of[id(p)]["lr"] == pytest.approx(expected), name


# ---- AdaLoRA -------------------------------------------------------------------------------------------

def adalora_args(assets, out, *extra):
    return tiny_run(assets, out, "train.lr=1e-2", "method.init_r=6", "method.target_r=4", "method.tinit=2",
                    "method.tfinal=4", "method.delta_t=2", *extra, model="gpt2_nodropout")


def test_adalora_orthogonality_term_is_peft_s(assets):
    """The term train.py adds is the one peft's AdaLoraModel adds to outputs.loss when given labels."""
    recipe = load_recipe(ROOT / "recipes" / "adalora.yaml", adalora_args(assets, "unused"))
    model = initial_model(recipe).eval()  # no dropout: the two forward passes below see the same network
    with torch.no_grad():  # away from the start (B = 0), so that both kinds of matrix count
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    with_term = model(input_ids=IDS, labels=IDS).loss  # AdaLoraModel.forward adds the term
    without = model.base_model.model(input_ids=IDS, labels=IDS).loss  # the transformers model alone
    term = METHODS["adalora"].loss_term(model)
    assert term.item() > 0.1
    torch.testing.assert_close(with_term - without, term)


def test_adalora_logs_its_term_and_prunes_to_the_budget(assets, tmp_path):
    # Step 1's logged loss is at the initial weights in both runs: it differs by the term exactly.
    with_term, without = tmp_path / "with", tmp_path / "without"
    train("adalora", *adalora_args(assets, with_term, "train.log_every=1"))
    train("adalora", *adalora_args(assets, without, "train.log_every=1", "method.orth_reg_weight=0"))
    recipe = load_recipe(ROOT / "recipes" / "adalora.yaml", adalora_args(assets, with_term, "train.log_every=1"))
    term = METHODS["adalora"].loss_term(initial_model(recipe)).item()
    step1 = {run: next(r["train_loss"] for r in read_log(run) if r["step"] == 1) for run in (with_term, without)}
    assert step1[with_term] - step1[without] == pytest.approx(term, rel=1e-5)
    assert [r["val_loss"] for r in read_log(without) if r["step"] == 0] == [r["val_loss"] for r in read_log(with_term) if r["step"] == 0]

    # Rank allocation ran: from step tinit + 1 ranks were pruned; after total - tfinal the final budget,
    # target_r per adapted layer on average, holds, and final/ reloads to the pruned sizes.
    config = json.loads((with_term / "final" / "adapter_config.json").read_text())
    kept = {name: sum(mask) for name, mask in config["rank_pattern"].items()}
    assert len(kept) == 2 and sum(kept.values()) == 4 * 2
    final = AutoPeftModelForCausalLM.from_pretrained(with_term / "final").eval()
    a = dict(final.named_parameters())
    for name, rank in kept.items():  # keyed by each layer's lora_E
        assert a[f"base_model.model.{name.removesuffix('.lora_E')}.lora_A.default"].shape[0] == rank
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=IDS).logits, end_of_training_model(with_term, recipe)(input_ids=IDS).logits)


# ---- prefix tuning on a Llama-style model (transformers' Cache objects) ---------------------------------

def test_prefix_tuning_trains_and_reloads_on_llama(assets, tmp_path):
    run = tmp_path / "prefix_llama"
    args = tiny_run(assets, run, "train.lr=3e-2", "method.num_virtual_tokens=8", model="llama")
    train("prefix_tuning", *args)
    val = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert val[-1] < val[0]
    recipe = load_recipe(ROOT / "recipes" / "prefix_tuning.yaml", args)
    final = PeftModel.from_pretrained(load_model(recipe.model), run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=IDS).logits, end_of_training_model(run, recipe)(input_ids=IDS).logits)
    summary = json.loads((run / "summary.json").read_text())
    assert validation_loss(final, recipe) == pytest.approx(summary["best_val_loss"], rel=1e-6)
    assert summary["trainable_params"] == 8 * 2 * 2 * 32  # tokens x layers x (key, value) x hidden


# ---- QLoRA ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_64(assets, tmp_path_factory):
    """A tiny GPT-2 whose layers are as wide as bitsandbytes' 64-weight quantization blocks."""
    folder = tmp_path_factory.mktemp("gpt2_64") / "gpt2_64"
    tiny.make_gpt2(folder, load_tokenizer(ModelSettings(name=str(assets / "gpt2"))), n_embd=64, dropout=0.0)
    return folder


def quantized_state_bytes(model) -> int:
    """The real bytes of every weight, a 4-bit weight's quantization state included."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code] if state.state2 is not None else []
            total += sum(t.numel() * t.element_size() for t in [state.absmax, state.code, state.offset, *nested] if torch.is_tensor(t))
    return total


def test_qlora_trains_on_a_4bit_base(assets, gpt2_64, tmp_path):
    import bitsandbytes as bnb

    run = tmp_path / "qlora"
    args = tiny_run(assets, run, f"model.name={gpt2_64}", "train.lr=1e-2", "train.eval_max_batches=4")
    train("qlora", *args)
    val = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert val[-1] < val[0]

    recipe = load_recipe(ROOT / "recipes" / "qlora.yaml", args)
    base = load_model(recipe.model, quantization=quantization_kwargs(recipe.method, recipe.model))
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 2 and all(m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" for m in quantized)

    # Quantizing is deterministic: two loads hold bitwise the same 4-bit weights (compared before any
    # forward pass, which repacks them for the CPU kernels), so an adapter on a fresh 4-bit base is the
    # trained model; final/ is the adapter alone and gives its logits.
    again = dict(load_model(recipe.model, quantization=quantization_kwargs(recipe.method, recipe.model)).named_parameters())
    assert all(torch.equal(p, again[name]) for name, p in base.named_parameters())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method_label"] == "QLoRA r16 (4-bit NF4)"
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter) and summary["trainable_params"] == sum(t.numel() for t in adapter.values())
    lora = recipe_of("lora_r16", *[a for a in args if not a.startswith("method.")])  # the same model, unquantized
    assert summary["total_params"] == count_params(initial_model(lora))[1]  # 4-bit weights by the shape they stand for
    assert summary["artifact_mb"] < 0.5 * sum(p.numel() * 4 for p in load_model(recipe.model).parameters()) / 2**20
    final = PeftModel.from_pretrained(base, run / "final").eval()
    trained_end = end_of_training_model(run, recipe)
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=IDS).logits, trained_end(input_ids=IDS).logits)

    # evaluate.py scores the adapter on the 4-bit base it was trained on: the validation text's
    # perplexity is below the untrained model's.
    result = run_script("evaluate.py", "--run", run, "--tasks", "ppl", "--data-file", assets / "valid.txt",
                        "--max-length", 64, "--stride", 64)
    assert result.returncode == 0, result.stderr[-2000:]
    ppl = json.loads((run / "eval.json").read_text())["tasks"]["ppl"]["ppl"]
    assert ppl < math.exp(val[0])

    # The checkpoint holds the adapter, not the 4-bit weights or their quantization state.
    checkpoint = load_file(run / "checkpoints" / "step-12" / "model.safetensors")
    assert checkpoint and all("lora_" in k for k in checkpoint)

    # The memory plan counts the 4-bit base's real bytes.
    planned = Planner(recipe, base.config, Setup()).predict()
    assert planned.weights == quantized_state_bytes(initial_model(recipe))


def test_qlora_without_4bit_support_is_one_line(assets, tmp_path):
    """Where bitsandbytes (or its 4-bit kernels) is missing, QLoRA is refused before anything is written."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None  # as if not installed\n")
    run = tmp_path / "run"
    env = {**__import__("os").environ, "PYTHONPATH": f"{blocker}:{ROOT}"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--recipe", str(ROOT / "recipes" / "qlora.yaml"),
                             *tiny_run(assets, run)], env=env, capture_output=True, text=True, timeout=600)
    assert_one_clear_line(result, "method.type qlora needs bitsandbytes' 4-bit NF4 support")
    assert "use method.type lora" in result.stderr
    assert not run.exists()


# ---- the memory plan covers every new method -------------------------------------------------------------

PLANNED = [("lora_dora", []), ("lora_pissa", []), ("lora_plus", []), ("ia3", []), ("vera", []), ("prefix_tuning", []),
           ("adalora", ["method.tinit=2", "method.tfinal=4"])]


@pytest.mark.parametrize("name,extra", PLANNED, ids=[p[0] for p in PLANNED])
def test_plan_covers_the_method(assets, tmp_path, name, extra):
    args = tiny_run(assets, tmp_path / "r", *extra)
    result = run_script("train.py", "--recipe", ROOT / "recipes" / f"{name}.yaml", *args, "--plan")
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", args)
    trainable = count_params(initial_model(recipe))[0]
    assert f"({trainable:,} of " in result.stdout
    assert not (tmp_path / "r").exists()


# ---- reports label each method with its settings ---------------------------------------------------------

def test_report_labels_methods_with_their_settings(assets, tmp_path):
    for name in ("lora_dora", "lora_r4"):
        train(name, *tiny_run(assets, tmp_path / name, "train.eval_max_batches=1", steps=2))
    result = run_script("evaluate.py", "report", tmp_path / "lora_dora", tmp_path / "lora_r4", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| LoRA r16 + DoRA | lora_dora |" in table and "| LoRA r4 | lora_r4 |" in table
    assert json.loads((tmp_path / "lora_dora" / "summary.json").read_text())["method_label"] == "LoRA r16 + DoRA"
