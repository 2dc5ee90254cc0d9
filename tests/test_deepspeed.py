"""DeepSpeed ZeRO through accelerate, on the CPU with two processes (DeepSpeed's CPU accelerator, gloo):
ZeRO-2 and ZeRO-3 train exactly as one process does with the same global batch, ZeRO-3 saves real
weights (a gathered full model, a LoRA adapter that reloads), and settings DeepSpeed would silently
override are refused with one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ROOT, assert_same_log, read_log, run_script, tiny_run
from tunebench.distributed import check_deepspeed
from tunebench.errors import UserError
from tunebench.models import load_model
from tunebench.recipe import ModelSettings, TrainSettings

pytest.importorskip("deepspeed")


def overrides(assets, out, micro_batch, lr, lora=False):
    # no dropout: each process would draw its own masks
    return tiny_run(assets, out, f"train.micro_batch_size={micro_batch}", "train.eval_every=3", "train.eval_max_batches=4",
                    "train.log_every=1", f"train.lr={lr}", *(["method.dropout=0"] if lora else []),
                    model="gpt2_nodropout", steps=6)


def launch(config, recipe, args):
    """accelerate launch with two processes, as a user would (from the repository root)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}.yaml",
               "--num_processes", "2", "--main_process_port", "0", "train.py", "--recipe", f"recipes/{recipe}.yaml", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def summary(run):
    return json.loads((Path(run) / "summary.json").read_text())


def assert_same_training(one, two):
    """Two processes of micro-batch 2 and one of micro-batch 4 see the same global batches."""
    assert summary(two)["hardware"]["num_processes"] == 2
    assert summary(two)["hardware"]["distributed_type"] == "DEEPSPEED"
    assert summary(two)["global_batch"] == summary(one)["global_batch"] == 4
    assert_same_log(one, two)
    assert read_log(one)[-1]["val_loss"] < read_log(one)[0]["val_loss"]


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """Reference runs on one plain process, global batch 4."""
    base = tmp_path_factory.mktemp("single")
    runs = {"full": base / "full", "lora_r16": base / "lora"}
    for recipe, run in runs.items():
        result = run_script("train.py", "--recipe", ROOT / "recipes" / f"{recipe}.yaml",
                            *overrides(assets, run, 4, "3e-3" if recipe == "full" else "1e-2", lora=recipe != "full"))
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def test_zero2_two_processes_train_as_one(assets, tmp_path, single):
    run = tmp_path / "zero2"
    launch("deepspeed_zero2", "full", overrides(assets, run, 2, "3e-3"))
    assert_same_training(single["full"], run)
    # Each process holds half the optimizer state (ZeRO's point), measured from the optimizer's tensors,
    # as the plan predicts it (the plan also counts DeepSpeed's float32 master weights, 4 bytes each).
    measured = summary(run)["optimizer_state_mb"]
    assert measured < 0.55 * summary(single["full"])["optimizer_state_mb"]
    master_mb = summary(run)["trainable_params"] * 4 / 2 / 2**20
    assert summary(run)["memory_plan"]["optimizer_state_mb"] - master_mb == pytest.approx(measured, rel=0.01)


def test_zero3_saves_the_gathered_full_model(assets, tmp_path, single):
    run = tmp_path / "zero3_full"
    launch("deepspeed_zero3", "full", overrides(assets, run, 2, "3e-3"))
    assert_same_training(single["full"], run)
    assert summary(run)["total_params"] == summary(single["full"])["total_params"]
    assert "ZeRO-3" in summary(run)["memory_plan"]["setup"] and summary(run)["predicted_peak_mb"] > 0
    saved, expected = load_file(run / "final" / "model.safetensors"), load_file(single["full"] / "final" / "model.safetensors")
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].shape == expected[key].shape, key  # not ZeRO-3's empty per-process placeholders
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-3, atol=1e-5)


def test_zero3_lora_adapter_reloads_with_the_trained_weights(assets, tmp_path, single):
    run = tmp_path / "zero3_lora"
    launch("deepspeed_zero3", "lora_r16", overrides(assets, run, 2, "1e-2", lora=True))
    assert_same_training(single["lora_r16"], run)
    adapter, expected = load_file(run / "final" / "adapter_model.safetensors"), load_file(single["lora_r16"] / "final" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and adapter
    for key in expected:
        assert adapter[key].numel() > 0, key
        torch.testing.assert_close(adapter[key], expected[key], rtol=1e-3, atol=1e-5)
    assert any(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # trained away from B = 0

    base = load_model(ModelSettings(name=str(assets / "gpt2_nodropout"), dtype="float32", attn_implementation="sdpa"))
    reloaded = PeftModel.from_pretrained(base, run / "final").eval()
    weights = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert len(weights) == len(adapter)
    for key, value in weights.items():
        torch.testing.assert_close(value, adapter[key.replace(".default", "")])


# ---- refused ------------------------------------------------------------------------------------------

TRAIN = {"micro_batch_size": 2, "grad_accum": 1, "max_grad_norm": 1.0, "optimizer": "adamw"}


def ds_config(**fields):
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config.update(fields)
    return config


@pytest.mark.parametrize("fields,train,words", [
    ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu=8 but the recipe's train.micro_batch_size gives 2"),
    ({"gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps=4 but the recipe's train.grad_accum gives 1"),
    ({"train_batch_size": 64}, {}, "train_batch_size=64"),
    ({"gradient_clipping": 0.5}, {}, "gradient_clipping=0.5 but the recipe's train.max_grad_norm gives 1.0"),
    ({"optimizer": {"type": "AdamW"}}, {}, "has an 'optimizer' section"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, {"optimizer": "adamw_8bit"},
     "DeepSpeed would replace it with its own CPU Adam"),
])
def test_settings_deepspeed_would_override_are_refused(fields, train, words):
    with pytest.raises(UserError) as refused:
        check_deepspeed(ds_config(**fields), TrainSettings(**{**TRAIN, **train}), num_processes=2)
    assert words in str(refused.value)


def test_clipping_follows_the_recipe():
    config = ds_config()
    check_deepspeed(config, TrainSettings(**{**TRAIN, "max_grad_norm": 0.3}), num_processes=2)
    assert config["gradient_clipping"] == 0.3  # accelerate would fill "auto" with 1.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_env(tmp_path, ds_json, **extra):
    """The environment accelerate launch gives each DeepSpeed process (here: one process)."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json),
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **extra}


@pytest.mark.parametrize("setting", ["8bit_with_offload", "micro_batch_in_json", "accumulation_in_both"])
def test_refused_run_says_one_line_and_writes_nothing(assets, tmp_path, setting):
    out = tmp_path / "run"
    args = overrides(assets, out, 2, "1e-3")
    ds_json, extra = ROOT / "ds_configs" / "zero3_offload.json", {}
    if setting == "8bit_with_offload":
        args.append("train.optimizer=adamw_8bit")
        expected = "offload"
    elif setting == "micro_batch_in_json":
        ds_json = tmp_path / "zero2.json"
        ds_json.write_text(json.dumps(ds_config(train_micro_batch_size_per_gpu=16)))
        expected = "train_micro_batch_size_per_gpu=16"
    else:  # gradient_accumulation_steps in the accelerate config beside deepspeed_config_file
        extra = {"ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,gradient_accumulation_steps",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
        expected = "sets gradient_accumulation_steps beside deepspeed_config_file"
    result = run_script("train.py", "--recipe", ROOT / "recipes/full.yaml", *args, env=launched_env(tmp_path, ds_json, **extra))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()
