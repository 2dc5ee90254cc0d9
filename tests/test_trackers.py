"""train.trackers: the training curves in TensorBoard's event files and in an MLflow store, read back
with each tool's own reader, equal to the run's log.jsonl, across a resume."""
import importlib.util
import json
import shutil

import pytest

from conftest import ROOT, assert_one_clear_line, read_log, run_script, tiny_run, train

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def logged(run, key):
    return {r["step"]: r[key] for r in read_log(run) if r.get(key) is not None}


def test_tensorboard_and_mlflow_hold_the_runs_own_numbers(assets, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "tracked"
    args = tiny_run(assets, run, "train.save_every=4", "train.keep_checkpoints=3", "train.trackers=[tensorboard,mlflow]",
                    "train.eval_every=4", "train.lr=3e-3")
    train("full", *args)
    # As if the run had died after step 8, having logged steps 10 and 12 to the trackers: it resumes
    # from step 8 and logs them again.
    shutil.rmtree(run / "checkpoints" / "step-12")
    (run / "summary.json").unlink()
    resumed = train("full", *args)
    assert "resuming" in resumed.stdout + resumed.stderr

    train_loss, val_loss = logged(run, "train_loss"), logged(run, "val_loss")
    assert sorted(train_loss) == [2, 4, 6, 8, 10, 12] and sorted(val_loss) == [0, 4, 8, 12]

    events = EventAccumulator(str(run / "tensorboard" / "full")).Reload()
    for key, expected in (("train_loss", train_loss), ("val_loss", val_loss)):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == sorted(expected), key  # val_loss from step 0, the untrained model
        for s in scalars:
            assert s.value == pytest.approx(expected[s.step], rel=1e-6), (key, s.step)  # float32 in event files

    saved = json.loads((run / "trackers.json").read_text())
    assert saved["mlflow_tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=saved["mlflow_tracking_uri"])
    mlflow_run = client.get_run(saved["mlflow_run_id"])
    assert mlflow_run.info.run_name == "tracked" and mlflow_run.data.params["train.lr"] == "0.003"
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1  # the resumed run went on in the same one
    for key, expected in (("train_loss", train_loss), ("val_loss", val_loss)):
        history = client.get_metric_history(saved["mlflow_run_id"], key)
        assert {m.step for m in history} == set(expected), key
        for m in history:  # steps 10 and 12 twice: logged before the "crash" and again, the same numbers
            assert m.value == pytest.approx(expected[m.step], rel=1e-12), (key, m.step)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused_in_one_line(assets, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--recipe", ROOT / "recipes/full.yaml", *tiny_run(assets, out), "train.trackers=[wandb]")
    assert_one_clear_line(result, "names wandb, which is not installed; pip install wandb")
    assert not out.exists()
