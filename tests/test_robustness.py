"""Nothing lost: kills at any moment, kills during a save, SIGTERM, divergence."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_clear_line, read_log, run_script, snapshot

RECIPE = ROOT / "recipes" / "lora_r16.yaml"


def args(assets, out, steps=12):
    return [
        "--recipe", str(RECIPE),
        f"model.name={assets / 'gpt2'}",
        f"data.dataset={assets / 'train.txt'}",
        f"data.validation_file={assets / 'valid.txt'}",
        "data.max_length=64", "data.fraction=0.05",
        "train.micro_batch_size=4", f"train.max_steps={steps}",
        "train.eval_every=4", "train.eval_max_batches=4", "train.log_every=1", "train.save_every=1", "train.lr=1e-2",
        f"output_dir={out}",
    ]


def start(cmd_args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cmd_args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_log(run)]


def wait_for(predicate, process, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def logged_steps(run):
    log = Path(run) / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    result = run_script("train.py", *args(assets, run))
    assert result.returncode == 0, result.stderr[-2000:]
    return losses(run)


def assert_same_as_straight(run, straight):
    got = losses(run)
    assert [g[0] for g in got] == [s[0] for s in straight]
    for g, s in zip(got, straight):
        for a, b in zip(g[1:], s[1:]):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-6)), (g, s)


def test_sigkill_at_random_points_resumes_to_the_same_losses(assets, tmp_path, straight):
    run = tmp_path / "run"
    rng = random.Random(7)
    for target in (3, 7, 10):  # kill once the log reaches these lines, plus a random delay
        process = start(args(assets, run))
        reached = wait_for(lambda: logged_steps(run) >= target, process)
        if reached:
            time.sleep(rng.uniform(0, 0.2))
            process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert reached, err[-3000:]
    result = run_script("train.py", *args(assets, run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_as_straight(run, straight)


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(assets, tmp_path, straight):
    run = tmp_path / "run"
    process = start(args(assets, run))
    saving = lambda: any(p.name.endswith(".tmp") for p in (run / "checkpoints").glob(".step-*")) and logged_steps(run) >= 3
    caught = wait_for(saving, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert caught, "the save was never seen in progress"
    complete = [p for p in (run / "checkpoints").glob("step-*")]
    assert complete, "the previous checkpoint is gone"
    result = run_script("train.py", *args(assets, run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {run}" in result.stdout
    assert not list((run / "checkpoints").glob(".*"))
    assert_same_as_straight(run, straight)


def test_sigterm_saves_and_exits_cleanly(assets, tmp_path, straight):
    run = tmp_path / "run"
    process = start(args(assets, run) + ["train.save_every=100"])  # only the signal makes a checkpoint
    assert wait_for(lambda: logged_steps(run) >= 4, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "interrupted by SIGTERM" in out + err and "Resume with the same command" in out + err
    step = int((out + err).split("interrupted by SIGTERM at step ")[1].split("/")[0])
    assert (run / "checkpoints" / f"step-{step}").is_dir()
    result = run_script("train.py", *args(assets, run) + ["train.save_every=100"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_as_straight(run, straight)


# train.py with a disk that fills up once checkpoint step-5 is written: from then on nothing is free.
FULL_DISK_AFTER_STEP_5 = """
import sys
from pathlib import Path
import tunebench.rundir as rundir
real_free_mb = rundir.free_mb
rundir.free_mb = lambda path: 0.0 if (Path(path) / "checkpoints" / "step-5").is_dir() else real_free_mb(path)
sys.argv = ["train.py"] + sys.argv[1:]
import train
train.main()
"""


def test_full_disk_stops_with_a_message_and_resumes(assets, tmp_path, straight):
    run = tmp_path / "run"
    full = subprocess.run([sys.executable, "-c", FULL_DISK_AFTER_STEP_5, *args(assets, run)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert full.returncode == 1, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot save the checkpoint of step 6 to {run} (about "), last
    assert f"0 MB free); stopped. The last good checkpoint is {run / 'checkpoints' / 'step-5'}" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-5"]  # nothing half-written
    assert not (run / "summary.json").exists()

    result = run_script("train.py", *args(assets, run))  # space freed: the same command resumes
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {run} from step-5" in result.stdout
    assert_same_as_straight(run, straight)


# train.py on a disk that is full when final/ of step 8 is written: safetensors raises its own error type then.
FULL_DISK_AT_FINAL_OF_STEP_8 = """
import sys
import peft.peft_model
import safetensors.torch
import transformers.modeling_utils
real_save_file = safetensors.torch.save_file
LOG = sys.argv[-1] + "/log.jsonl"
def save_file(tensors, filename, *args, **kwargs):
    if "final" in str(filename) and '"step": 4,' in open(LOG).read():  # step 4's line: written after its final/
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return real_save_file(tensors, filename, *args, **kwargs)
peft.peft_model.safe_save_file = transformers.modeling_utils.safe_save_file = save_file
sys.argv = ["train.py"] + sys.argv[1:-1]
import train
train.main()
"""


def test_full_disk_while_saving_final_is_one_line_and_resumes(assets, tmp_path, straight):
    run = tmp_path / "run"
    full = subprocess.run([sys.executable, "-c", FULL_DISK_AT_FINAL_OF_STEP_8, *args(assets, run), str(run)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot save final/ of step 8 to {run} (Error while serializing: I/O error: No space "), last
    assert last.endswith(f"The last good checkpoint is {run / 'checkpoints' / 'step-7'}: free disk space and run the "
                         "same command to resume"), last
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no half-written final/ left behind
    result = run_script("train.py", *args(assets, run))  # space freed: the same command resumes
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_as_straight(run, straight)


def test_divergence_stops_with_a_message_and_keeps_final(assets, tmp_path):
    run = tmp_path / "run"
    result = run_script("train.py", *args(assets, run), "train.lr=1e30", "train.max_grad_norm=0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    said = result.stdout + result.stderr
    diverged_at = re.search(r"training loss became (nan|inf) by step (\d+)", said)
    assert diverged_at, said[-2000:]
    assert max(step for step, _, _ in losses(run)) < int(diverged_at[2])  # the diverged step is not logged
    assert not (run / "final").exists()  # diverged before its first validation: no trained model to keep
    assert "no step was validated, so there is no final/" in said
    assert not (run / "summary.json").exists()


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


# (kind of damage done to a checkpoint folder, what the skip line says)
CHECKPOINT_DAMAGE = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors has "),
    "missing optimizer state": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "corrupt trainer state": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "truncated weights, no manifest": (
        lambda c: ((c / "manifest.json").unlink(), truncate(c / "model.safetensors")), "model.safetensors is truncated"),
}


def copy_run(source, run):
    """A copy of a stopped run, moved: its recipe's output_dir follows it."""
    shutil.copytree(source, run)
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(f"output_dir: {source}", f"output_dir: {run}"))
    return run


@pytest.fixture(scope="module")
def stopped_at_8(assets, tmp_path_factory):
    """A run stopped after step 8 of 12, checkpoints step-7 and step-8 kept."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    result = run_script("train.py", *args(assets, run), "--stop-after-steps", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-7", "step-8"]
    return run


@pytest.mark.parametrize("kind", CHECKPOINT_DAMAGE)
def test_damaged_latest_checkpoint_resumes_from_the_one_before(assets, tmp_path, stopped_at_8, straight, kind):
    damage, why = CHECKPOINT_DAMAGE[kind]
    run = copy_run(stopped_at_8, tmp_path / "run")
    damage(run / "checkpoints" / "step-8")
    result = run_script("train.py", *args(assets, run))
    assert result.returncode == 0, result.stderr[-2000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("checkpoint step-8 is damaged")]
    assert len(said) == 1 and why in said[0], result.stdout[-2000:]
    assert f"kept as {run / 'checkpoints' / 'damaged-step-8'}" in said[0]
    assert f"resuming {run} from step-7" in result.stdout
    assert_same_as_straight(run, straight)  # resuming from the older checkpoint is still exact


def test_no_intact_checkpoint_is_one_line_and_nothing_changes(assets, tmp_path, stopped_at_8):
    run = copy_run(stopped_at_8, tmp_path / "run")
    (run / "checkpoints" / "step-8" / "optimizer.bin").unlink()
    truncate(run / "checkpoints" / "step-7" / "model.safetensors")
    before = snapshot(run)
    result = run_script("train.py", *args(assets, run))
    assert_one_clear_line(result, f"run '{run}' cannot resume: every checkpoint is damaged (step-8: optimizer.bin is missing; step-7: model.safetensors has ")
    assert "add overwrite=true" in result.stderr
    assert snapshot(run) == before
