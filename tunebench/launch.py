"""Starting train.py, evaluate.py and search workers as child processes, as a user would run them.

A suite (compare.py) and a learning-rate search (search.py) both start runs this way: the same command
line a user types, the output streamed to the terminal, the last lines kept for error.txt. A Python
script starts warm where it can: forked from this process, its imports paid once (warm.py).
"""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tunebench import warm

ROOT = Path(__file__).resolve().parent.parent
ERROR_LINES = 20
PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm: "name: 40%|####  | 4/10 [00:01<00:02, ...]"
# train.py exits 128 + SIGINT / SIGTERM after saving a checkpoint; a Python killed by them gives -2 / -15.
INTERRUPTED = {130, 143, -2, -15}


def override_text(key: str, value) -> str:
    """KEY=VALUE as train.py reads it (the value is read back as YAML)."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def start(command: list, env: dict):
    """The child that runs `command`, its stdout and stderr together on child.stdout: forked from this
    process with its imports paid where warm.py allows it (`python SCRIPT ...`), else a new process."""
    if warm.can_fork(command, env):
        return warm.start(command, env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def follow(child) -> tuple:
    """Stream a started child's output to the terminal until it exits: (exit status, last lines of output)."""
    tail = collections.deque(maxlen=64 * 1024)
    try:
        while chunk := os.read(child.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail.extend(chunk)
    except KeyboardInterrupt:
        pass  # the child got the SIGINT too: train.py saves a checkpoint and stops
    status = child.wait()
    text = bytes(tail).decode("utf-8", errors="replace")
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS_BAR.search(line)]
    return status, lines[-ERROR_LINES:]


def run_logged(command: list, env: dict) -> tuple:
    """Run a command, its output streamed to the terminal; returns (exit status, last lines of output)."""
    return follow(start(command, env))


def child_env() -> dict:
    """This environment, with the project on PYTHONPATH (train.py and evaluate.py import tunebench)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def launch_prefix(accel) -> list:
    """The start of a training command: python, or accelerate launch with the config the user gave."""
    python = sys.executable
    return [python, "-m", "accelerate.commands.launch", "--config_file", accel] if accel else [python]


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0
