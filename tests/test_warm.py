"""Warm starts (tunebench/warm.py): a run forked from a process whose imports are paid writes the same
log, checkpoints and final weights, to the last digit, as the same command started cold, resumed
runs and evaluations included; runs forked one after another see nothing of each other."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="warm starts fork: Linux only")

# What compare and search do: launch.run_logged on each command, in one process, one after another,
# after something in it showed a progress bar.
DRIVER = """
import json, sys
from tqdm.auto import tqdm
from tunebench import launch, warm
list(tqdm(range(3)))  # a progress bar starts tqdm's monitor thread, as datasets' does in a suite
results = []
env = launch.child_env()  # once, before the first child, as compare does
for command in json.loads(sys.argv[1]):
    cold = warm.why_cold(command, env)
    status, _ = launch.run_logged(command, env)
    results.append({"forked": cold is None, "why_cold": cold, "status": status})
print("RESULTS " + json.dumps(results))
"""


def drive(commands, cold: bool) -> list:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TUNEBENCH_COLD", None)
    if cold:
        env["TUNEBENCH_COLD"] = "1"
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULTS ", 1)[1])


def commands(assets, root) -> list:
    """A LoRA run stopped at step 3 and resumed to 6, a full fine-tuning of another model, and an
    evaluation of the first: three kinds of child, one after another."""
    def train(recipe, out, model="gpt2"):
        return [sys.executable, str(ROOT / "train.py"), "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"),
                *tiny_run(assets, out, "train.eval_every=3", "train.save_every=3", model=model, steps=6)]

    lora, full = root / "lora", root / "full"
    return [train("lora_r4", lora) + ["--stop-after-steps", "3"], train("lora_r4", lora),
            train("full", full, model="llama"),
            [sys.executable, str(ROOT / "evaluate.py"), "--run", str(lora), "--tasks", "ppl",
             "--data-file", str(assets / "valid.txt"), "--max-length", "64"]]


def untimed(path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def test_a_warm_run_writes_what_a_cold_run_writes(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))  # each side scores the untrained model itself
    cold = drive(commands(assets, tmp_path / "cold"), cold=True)
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache-warm"))
    warm = drive(commands(assets, tmp_path / "warm"), cold=False)
    assert [r["status"] for r in cold] == [r["status"] for r in warm] == [0, 0, 0, 0]
    assert not any(r["forked"] for r in cold)
    import torch

    if not torch.cuda.is_available():  # the case warm starts are made for: every command forked
        assert all(r["forked"] for r in warm), [r["why_cold"] for r in warm]
    for run in ("lora", "full"):
        assert untimed(tmp_path / "warm" / run / "log.jsonl") == untimed(tmp_path / "cold" / run / "log.jsonl")
        for name in ("adapter_model.safetensors", "model.safetensors"):
            cold_file = tmp_path / "cold" / run / "final" / name
            if cold_file.exists():
                assert (tmp_path / "warm" / run / "final" / name).read_bytes() == cold_file.read_bytes()
    scores = [json.loads((tmp_path / side / "lora" / "eval.json").read_text())["tasks"]["ppl"] for side in ("cold", "warm")]
    assert scores[0]["ppl"] == scores[1]["ppl"] and scores[0]["tokens"] == scores[1]["tokens"]
