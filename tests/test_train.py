"""train.py end to end on a tiny real GPT-2: every method trains, freezes what it should, counts
parameters exactly, saves a final/ that reloads to the same logits, and resumes exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from accelerate.utils import set_seed

from conftest import ROOT, assert_same_log, read_log, run_script, tiny_run, train, train_observed
from tunebench import data
from tunebench.methods import apply_method, count_params, quantization_kwargs
from tunebench.metrics import causal_nll
from tunebench.models import load_model, load_tokenizer
from tunebench.recipe import METHOD_SETTINGS, load_recipe


# (recipe, extra overrides, trainable-parameter formula for the tiny GPT-2: n_layer 2, n_embd 32)
METHODS = [
    ("full", ["train.lr=3e-3"], lambda cfg, total: total),
    ("lora_r16", ["train.lr=1e-2"], lambda cfg, total: cfg.n_layer * 16 * (cfg.n_embd + 3 * cfg.n_embd)),
    (
        "lora_all",
        ["train.lr=1e-2", "method.r=4"],
        # c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d), mlp.c_proj (4d -> d), lm_head (d -> vocab)
        lambda cfg, total: cfg.n_layer * 4 * ((cfg.n_embd + 3 * cfg.n_embd) + 2 * cfg.n_embd + 5 * cfg.n_embd + 5 * cfg.n_embd)
        + 4 * (cfg.n_embd + cfg.vocab_size),
    ),
    ("top2_blocks", ["train.lr=3e-3", "method.top_blocks=1"], None),
    ("lm_head_only", ["train.lr=3e-3"], lambda cfg, total: cfg.vocab_size * cfg.n_embd),
    ("prompt_tuning", ["train.lr=3e-1", "method.num_virtual_tokens=8"], lambda cfg, total: 8 * cfg.n_embd),
    # DoRA adds a magnitude per output feature of each adapted layer (c_attn: 3d)
    ("lora_dora", ["train.lr=1e-2"], lambda cfg, total: cfg.n_layer * (16 * (cfg.n_embd + 3 * cfg.n_embd) + 3 * cfg.n_embd)),
    ("lora_rslora", ["train.lr=1e-2"], lambda cfg, total: cfg.n_layer * 16 * (cfg.n_embd + 3 * cfg.n_embd)),
    ("lora_pissa", ["train.lr=1e-2"], lambda cfg, total: cfg.n_layer * 16 * (cfg.n_embd + 3 * cfg.n_embd)),
    ("lora_plus", ["train.lr=3e-3"], lambda cfg, total: cfg.n_layer * 16 * (cfg.n_embd + 3 * cfg.n_embd)),
    # c_attn's output (3d), and the MLP's inputs: c_fc (d) and mlp.c_proj (4d)
    ("ia3", ["train.lr=1e-1"], lambda cfg, total: cfg.n_layer * (3 * cfg.n_embd + cfg.n_embd + 4 * cfg.n_embd)),
    # per adapted layer: lambda_d (r) and lambda_b (its outputs): c_attn 3d, c_fc 4d, mlp.c_proj d
    ("vera", ["train.lr=1e-1", "method.r=16"], lambda cfg, total: cfg.n_layer * (3 * 16 + 3 * cfg.n_embd + 4 * cfg.n_embd + cfg.n_embd)),
    # keys and values of 8 virtual tokens at every layer
    ("prefix_tuning", ["train.lr=3e-2", "method.num_virtual_tokens=8"], lambda cfg, total: 8 * cfg.n_layer * 2 * cfg.n_embd),
    # per layer: A (init_r x d), E (init_r), B (3d x init_r)
    ("adalora", ["train.lr=1e-2", "method.init_r=6", "method.target_r=4", "method.tinit=2", "method.tfinal=4", "method.delta_t=2"],
     lambda cfg, total: cfg.n_layer * 6 * (cfg.n_embd + 1 + 3 * cfg.n_embd)),
]


def end_of_training_model(run, recipe):
    """The model as it was at the last step: the base model with the last checkpoint's tensors, which
    must be exactly the trained ones (frozen weights are not written; a resume loads them from the base,
    and applies the method after set_seed as train.py does: PiSSA's fast SVD draws random numbers)."""
    model = initial_model(recipe)
    checkpoint = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    saved = load_file(checkpoint / "model.safetensors")
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not [k for k in saved if k in params and not params[k].requires_grad]
    names_of = {}  # tied weights are one tensor under several names: one of them is saved
    for name, p in params.items():
        if p.requires_grad:
            names_of.setdefault(p.data_ptr(), set()).add(name)
    assert all(names & saved.keys() for names in names_of.values())
    _, unexpected = model.load_state_dict(saved, strict=False)
    assert not unexpected
    return model.eval()


def initial_model(recipe):
    """The model train.py starts from: the base (4-bit for QLoRA), then the method applied right after
    set_seed(train.seed)."""
    model = load_model(recipe.model, quantization=quantization_kwargs(recipe.method, recipe.model))
    set_seed(recipe.train.seed)
    return apply_method(model, recipe.method, load_tokenizer(recipe.model))


def base_name(name: str) -> str:
    """A parameter's name in the base model's own file: peft's prefixes and wrappers taken off."""
    for prefix in ("base_model.model.", "base_model."):
        name = name.removeprefix(prefix)
    name = name.replace(".base_layer.", ".")
    # GPT-2 ties lm_head to the token embeddings (saved once); a soft prompt keeps a reference to them too
    return {"lm_head.weight": "transformer.wte.weight", "word_embeddings.weight": "transformer.wte.weight"}.get(name, name)


def validation_loss(model, recipe) -> float:
    """The mean validation loss over the recipe's validation blocks, computed the plain way."""
    tokenizer = load_tokenizer(recipe.model)
    _, val_set = data.build(recipe.data, tokenizer, recipe.train.seed, recipe.task)
    loader = torch.utils.data.DataLoader(val_set, batch_size=recipe.train.micro_batch_size,
                                         collate_fn=data.collate(tokenizer.pad_token_id))
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            nll, n = causal_nll(model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits,
                                batch["labels"])
            nll_sum, count = nll_sum + nll.double().item(), count + n.item()
    return nll_sum / count


@pytest.mark.parametrize("recipe_name,extra,formula", METHODS, ids=[m[0] for m in METHODS])
def test_method_trains_freezes_counts_and_reloads(assets, tmp_path, recipe_name, extra, formula):
    run = tmp_path / recipe_name
    args = tiny_run(assets, run) + extra
    train(recipe_name, *args)

    val_losses = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert val_losses[-1] < val_losses[0]

    summary = json.loads((run / "summary.json").read_text())
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", args)
    initial = initial_model(recipe)
    trainable, total = count_params(initial)
    assert (summary["trainable_params"], summary["total_params"]) == (trainable, total)
    if formula is not None:
        assert trainable == formula(initial.config if hasattr(initial.config, "n_embd") else initial.base_model.config, total)
    else:  # top block + final layer norm
        base = load_model(recipe.model)
        expected = sum(p.numel() for p in base.transformer.h[-1].parameters()) + sum(p.numel() for p in base.transformer.ln_f.parameters())
        assert trainable == expected

    # final/ holds the best model by validation loss; here the last step is the best one.
    assert summary["best_step"] == summary["final_step"] == 12
    if (run / "final" / "adapter_config.json").is_file():
        final = PeftModel.from_pretrained(load_model(recipe.model), run / "final").eval()
    else:
        final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, end_of_training_model(run, recipe)(input_ids=ids).logits)

    # final/ as a user reloads it is the model train.py validated last (and best): so no weight moved
    # in training without being saved, frozen ones included.
    assert validation_loss(final, recipe) == pytest.approx(summary["best_val_loss"], rel=1e-6)

    # Frozen weights are bitwise the base model's file; every trained tensor moved from where train.py
    # started it (the seeded initial adapter or soft prompt; for full and partial, the base's file).
    on_disk = load_file(assets / "gpt2" / "model.safetensors")
    end_params = dict(final.named_parameters(remove_duplicate=False))
    trained = {name for name, p in initial.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert trained and trained <= end_params.keys()
    start = dict(initial.named_parameters(remove_duplicate=False))
    # (a frozen tensor the method adds, AdaLoRA's ranknum, stays as the method made it)
    frozen_changed = [n for n, p in end_params.items()
                      if n not in trained and not torch.equal(p, on_disk[base_name(n)] if base_name(n) in on_disk else start[n])]
    assert frozen_changed == []
    for name in trained:
        if base_name(name) in on_disk:
            assert torch.equal(start[name], on_disk[base_name(name)]), name
    unchanged = [name for name in trained if torch.equal(start[name], end_params[name])]
    assert unchanged == []
    if (run / "final" / "adapter_config.json").is_file():
        # The adapter holds every trained tensor, and base weights only as the base's file has them (peft
        # saves a LoRA-wrapped lm_head's base weight too, which then replaces the base's on reload).
        adapter = load_file(run / "final" / "adapter_model.safetensors")
        of_base = {k for k in adapter if base_name(k) in on_disk}
        shared_projections = {k for k in adapter if k.endswith(("vera_A", "vera_B"))}  # VeRA's frozen random pair
        assert len(adapter) - len(of_base) - len(shared_projections) == len(trained)
        assert [k for k in of_base if not torch.equal(adapter[k], on_disk[base_name(k)])] == []

    for key in ("artifact_mb", "train_time_s", "train_tokens", "tokens_per_s", "peak_cpu_rss_mb", "optimizer_state_mb"):
        assert summary[key] > 0, key
    assert summary["peak_gpu_mem_mb"] is None
    assert summary["train_tokens"] == 12 * 4 * 64


def test_gpt2_small_parameter_counts():
    """The exact figures of docs/recipe-keys.md, on the real GPT-2 small shape (meta device: no weights)."""
    counts = {}
    for name, method in [
        ("full", METHOD_SETTINGS["full"]()),
        ("lora_r16", load_recipe(ROOT / "recipes" / "lora_r16.yaml").method),
        ("prompt_tuning", METHOD_SETTINGS["prompt_tuning"](num_virtual_tokens=20, init_text=None)),
        ("lm_head_only", METHOD_SETTINGS["partial"](top_blocks=0, lm_head=True, layer_norms=False)),
    ]:
        with torch.device("meta"):
            counts[name] = count_params(apply_method(GPT2LMHeadModel(GPT2Config()), method))[0]
    assert counts == {"full": 124_439_808, "lora_r16": 589_824, "prompt_tuning": 15_360, "lm_head_only": 38_597_376}


RESUMED = [
    ("full", []),
    ("lora_r16", []),
    ("lora_dora", []),
    ("lora_pissa", []),  # the residual base is made again on resume (seeded fast SVD)
    ("lora_plus", ["train.optimizer=adamw_8bit"]),  # B's group at lr x 16, in 8-bit state
    ("ia3", []),
    ("vera", ["method.r=16"]),
    ("prefix_tuning", ["method.num_virtual_tokens=8"]),
    # stopped while ranks are pruned: the importance averages and rank pattern come back from the checkpoint
    ("adalora", ["method.init_r=6", "method.target_r=4", "method.tinit=2", "method.tfinal=8", "method.delta_t=2"]),
]


@pytest.mark.parametrize("recipe_name,method_extra", RESUMED, ids=[r[0] for r in RESUMED])
def test_resume_mid_epoch_equals_straight_run(assets, tmp_path, recipe_name, method_extra):
    # fraction 0.03 makes an epoch about 14 steps: the stop at 5 is mid-epoch, the run crosses an epoch end.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["data.fraction=0.03", "train.lr=3e-3", "train.save_every=4", *method_extra]
    train(recipe_name, *tiny_run(assets, straight, steps=20), *extra)
    first = train(recipe_name, *tiny_run(assets, resumed, steps=20), *extra, "--stop-after-steps", "5")
    assert "Resume with the same command" in first.stdout + first.stderr
    assert not (resumed / "summary.json").exists()
    train(recipe_name, *tiny_run(assets, resumed, steps=20), *extra)

    assert_same_log(straight, resumed, keys=("train_loss", "val_loss", "tokens", "lr"), rel=1e-6)
    sa = load_file(next((straight / "final").glob("*.safetensors")))
    sb = load_file(next((resumed / "final").glob("*.safetensors")))
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)


def test_figures_from_the_cache_change_nothing(assets, tmp_path):
    """The untrained model's validation and the memory prediction are computed once per setting and
    kept: a run that takes them from the cache writes the log, dropout included, and the prediction of
    one that computed them; another validation setting is scored afresh."""
    cache = tmp_path / "cache"
    env = {"TUNEBENCH_CACHE": str(cache)}
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        result = run_script("train.py", "--recipe", ROOT / "recipes" / "full.yaml",
                            *tiny_run(assets, out, "train.lr=3e-3", "train.eval_every=2", steps=4), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        if out == first:
            kept = sorted(cache.rglob("*.json"))
            assert [path.parent.name for path in kept] == ["memory_plan", "untrained"]
            written = [path.stat().st_mtime_ns for path in kept]
    assert [path.stat().st_mtime_ns for path in kept] == written  # read, not computed and written again
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in read_log(run)] for run in (first, second)]
    assert untimed[0] == untimed[1]
    plans = [json.loads((run / "summary.json").read_text())["memory_plan"] for run in (first, second)]
    process_own = ("runtime_mb", "predicted_peak_mb")  # each process measures its own runtime
    assert plans[0]["activations_mb"] > 0
    assert {k: v for k, v in plans[0].items() if k not in process_own} == {k: v for k, v in plans[1].items() if k not in process_own}
    result = run_script("train.py", "--recipe", ROOT / "recipes" / "full.yaml",
                        *tiny_run(assets, tmp_path / "third", "train.eval_max_batches=1", steps=2), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((cache / "untrained").glob("*.json"))) == 2


def test_fast_allocator_trains_as_exact_one(assets, tmp_path):
    """By default train.py has glibc keep freed blocks for the next step (reused memory holds old
    data); train.exact_cpu_rss returns every block of 1 MB or more at once (fresh pages are zero).
    With logits of 4 MB per micro-batch the two differ in where every large tensor lives; the
    losses must not."""
    fast, exact = tmp_path / "fast", tmp_path / "exact"
    big = ["data.max_length=128", "train.micro_batch_size=16", "train.lr=3e-3"]
    fast_notes = train_observed(tmp_path, "full", *tiny_run(assets, fast, model="gpt2_nodropout", steps=4), *big)
    exact_notes = train_observed(tmp_path, "full", *tiny_run(assets, exact, model="gpt2_nodropout", steps=4), *big,
                                 "train.exact_cpu_rss=true")
    assert_same_log(fast, exact, rel=1e-6)
    # The switch took effect: only the exact run's large tensors live in blocks mapped for them alone.
    growth = {name: max(notes["mmapped_bytes"]) - notes["mmapped_bytes"][0]
              for name, notes in (("fast", fast_notes), ("exact", exact_notes))}
    assert growth["fast"] <= 0 and growth["exact"] >= 4 * 2**20, growth  # a logits tensor is 4 MB


def test_finished_run_is_not_trained_again(assets, tmp_path):
    run = tmp_path / "done"
    train("lora_r4", *tiny_run(assets, run, steps=4))
    before = (run / "summary.json").read_text()
    again = train("lora_r4", *tiny_run(assets, run, steps=4))
    assert "already finished" in again.stdout
    assert (run / "summary.json").read_text() == before


def test_two_processes_match_one(assets, tmp_path):
    """Two CPU processes (torchrun, gloo) with the same global batch as one process give the same losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = tiny_run(assets, one, model="gpt2_nodropout", steps=6)
    train("full", *args, "train.lr=3e-3")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py")]
    overrides = tiny_run(assets, two, model="gpt2_nodropout", steps=6) + ["train.lr=3e-3", "train.micro_batch_size=2"]
    result = subprocess.run(torchrun + ["--recipe", str(ROOT / "recipes/full.yaml"), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["hardware"]["num_processes"] == 2
    assert summary["global_batch"] == 4
    assert_same_log(one, two)
    assert read_log(one)[-1]["tokens"] == read_log(two)[-1]["tokens"]
