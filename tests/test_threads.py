"""Every core however train.py is launched: a thread count a launcher set by default is replaced by
cores / local processes; one the user set is kept; summary.json's hardware records it."""
import json
import os
import subprocess
import sys

import psutil

from conftest import ROOT, tiny_run

CORES = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))


def accelerate_launch(assets, run, env_omp, *launch_args):
    """`accelerate launch [ARGS] train.py` (no config file: accelerate then sets OMP_NUM_THREADS=1 for the
    script unless the user's environment has it), as a user starts it from a shell."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), **({"OMP_NUM_THREADS": env_omp} if env_omp else {}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *launch_args,
               str(ROOT / "train.py"), "--recipe", str(ROOT / "recipes" / "lora_r4.yaml"),
               *tiny_run(assets, run, steps=2)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((run / "summary.json").read_text())["hardware"]


def test_accelerate_launch_default_is_replaced_by_every_core(assets, tmp_path):
    stdout, hardware = accelerate_launch(assets, tmp_path / "run", None)
    assert hardware["threads_per_process"] == CORES
    assert "accelerate launch's default" in hardware["threads_set_by"]
    assert f"cpu threads: {CORES} per process" in stdout


def test_a_count_the_user_set_is_kept(assets, tmp_path):
    _, in_environment = accelerate_launch(assets, tmp_path / "env", "1")
    assert in_environment["threads_per_process"] == 1
    assert in_environment["threads_set_by"] == "OMP_NUM_THREADS set by the user"
    _, as_argument = accelerate_launch(assets, tmp_path / "arg", None, "--num_cpu_threads_per_process", "1")
    assert as_argument["threads_per_process"] == 1
