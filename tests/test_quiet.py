"""Third-party start-up notices stay out of the way; other warnings still reach the user."""
import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_run, train
from tunebench.quiet import NOISE

IMPORTS = "import tunebench, accelerate, peft, transformers, bitsandbytes, deepspeed"


def imports_output(**env):
    result = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_importing_the_libraries_prints_nothing():
    # DeepSpeed announces a CPU accelerator on every machine without a GPU; bitsandbytes >= 0.50
    # a missing optional kernel on CPUs with AVX-512 bf16.
    assert imports_output() == ""


def test_verbose_keeps_the_notices():
    import torch

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU and has nothing to announce")
    assert "Setting accelerator to CPU" in imports_output(TUNEBENCH_VERBOSE="1")


def test_only_the_named_messages_are_dropped():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, prefix in NOISE:
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(prefix + " and the rest of the notice")
            logger.warning("something true about the run")
        finally:
            logger.removeHandler(handler)
    assert seen == ["something true about the run"] * len(NOISE)


def test_a_training_run_prints_its_own_lines_only(assets, tmp_path):
    # 8-bit AdamW imports bitsandbytes; final/ is saved three times (steps 0, 6, 12).
    result = train("lora_r16", *tiny_run(assets, tmp_path / "run", "train.optimizer=adamw_8bit"))
    output = result.stdout + result.stderr
    for notice in [prefix for _, prefix in NOISE] + ["Writing model shards", "Loading weights", "FutureWarning"]:
        assert notice not in output
    assert result.stdout.strip().splitlines()[-1].startswith("done: ")
