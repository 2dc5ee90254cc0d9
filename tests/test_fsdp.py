"""FSDP2 through accelerate (accelerate_configs/fsdp2*.yaml): refused without a GPU, where accelerate
would silently train every process on the whole model; the memory plan of a sharded run. Training
under FSDP2 is checked on a GPU by `make gpu-check` (bench/gpu_check.py)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_clear_line, run_script, tiny_run
from tunebench.methods import unique_params
from tunebench.models import load_model
from tunebench.plan import Planner, Setup, optimizer_state_bytes, setup_from_config_file
from tunebench.recipe import load_recipe

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP is refused only without a GPU")


def test_fsdp_without_a_gpu_is_refused_in_one_line(assets, tmp_path):
    """As accelerate launch starts train.py with an FSDP config: one line, exit 2, nothing written."""
    out = tmp_path / "run"
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false"}
    result = run_script("train.py", "--recipe", ROOT / "recipes/full.yaml", *tiny_run(assets, out), env=env)
    assert_one_clear_line(result, "FSDP needs GPUs")
    assert "deepspeed_zero3.yaml" in result.stderr
    assert not out.exists()


def test_fsdp2_config_is_refused_through_accelerate_launch(assets, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp2.yaml",
               "--num_processes", "1", "--main_process_port", "0", "train.py", "--recipe", "recipes/lora_r16.yaml",
               *tiny_run(assets, out)]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0  # the launcher reports its failed process with 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        line for line in result.stderr.splitlines() if line.startswith("error: FSDP needs GPUs")] != []
    assert not out.exists()


def test_accelerate_configs_describe_fsdp2():
    configs = ROOT / "accelerate_configs"
    assert setup_from_config_file(configs / "fsdp2.yaml") == Setup(device="cpu", processes=2, mixed_precision="bf16",
                                                                    fsdp=True)
    assert setup_from_config_file(configs / "fsdp2_offload.yaml") == Setup(
        device="cpu", processes=2, mixed_precision="bf16", fsdp=True, offload_params=True)
    assert "FSDP2 full shard" in setup_from_config_file(configs / "fsdp2.yaml").describe()


@pytest.mark.parametrize("recipe_name", ["full", "lora_r16"])
def test_plan_divides_by_processes_and_adds_the_gathered_block(assets, recipe_name):
    """Each process holds 1/N of every weight, gradient and optimizer moment, plus the root's own
    weights and the largest block's, gathered; the loss is the plain one (FSDP shards the output layer)."""
    recipe = load_recipe(ROOT / f"recipes/{recipe_name}.yaml", [f"model.name={assets / 'gpt2'}", "data.dataset=x",
                                                                "data.max_length=32"])
    model = load_model(recipe.model)
    single = Planner(recipe, model.config, Setup()).predict()
    sharded = Planner(recipe, model.config, Setup(processes=2, fsdp=True)).predict()

    from tunebench.methods import apply_method

    model = apply_method(model, recipe.method, None, 10)
    params = list(unique_params(model))
    blocks = [m for m in model.modules() if type(m).__name__ == "GPT2Block"]
    assert len(blocks) == model.config.n_layer
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_blocks)
    block = sum(p.numel() for p in blocks[0].parameters())
    block_trained = sum(p.numel() for p in blocks[0].parameters() if p.requires_grad)
    shard = sum((p.numel() + 1) // 2 for p in params)
    trained_shards = [((p.numel() + 1) // 2, 4) for p in params if p.requires_grad]

    assert sharded.weights == 4 * (shard + root + block)
    assert sharded.optimizer_state == optimizer_state_bytes(trained_shards, "adamw")
    assert sharded.optimizer_state == pytest.approx(single.optimizer_state / 2, rel=0.01)
    assert sharded.gradients == 4 * (sum(n for n, _ in trained_shards) + block_trained)
    assert sharded.loss == "plain"
