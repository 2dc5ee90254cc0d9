"""Every file a user names is untrusted: a damaged model folder, a malformed data file, a corrupt
eval.json or summary.json gets one `error:` line naming the file (and the line where there is one),
exit status 2, and nothing is written or changed."""
import json
import os
import shutil
from dataclasses import replace

import pytest

from conftest import ROOT, assert_one_clear_line, run_script, snapshot

RECIPE = ROOT / "recipes" / "lora_r16.yaml"


def train_args(assets, out, model=None):
    return [
        "--recipe", RECIPE,
        f"model.name={model or assets / 'gpt2'}",
        f"data.dataset={assets / 'train.txt'}",
        f"data.validation_file={assets / 'valid.txt'}",
        "data.max_length=64", "train.micro_batch_size=2", "train.max_steps=2",
        f"output_dir={out}",
    ]


def model_copy(assets, tmp_path, damage):
    """A copy of the tiny GPT-2 folder, damaged by damage(folder)."""
    folder = tmp_path / "model"
    shutil.copytree(assets / "gpt2", folder)
    damage(folder)
    return folder


def truncate(path, keep=0.5):
    os.truncate(path, int(path.stat().st_size * keep))


def rewrite(path, old, new):
    path.write_text(path.read_text().replace(old, new))


# (case, damage done to a copy of the model folder, phrase of the message)
MODEL_DAMAGE = [
    ("truncated weights", lambda f: truncate(f / "model.safetensors"), "model.safetensors is truncated ("),
    ("weights missing", lambda f: (f / "model.safetensors").unlink(), "cannot be loaded"),
    ("config not JSON", lambda f: (f / "config.json").write_text('{"model_type": "gpt2",'), "config.json' is not valid JSON"),
    ("unknown architecture", lambda f: rewrite(f / "config.json", '"gpt2"', '"gpt9"'), "model type `gpt9`"),
    ("tokenizer not JSON", lambda f: truncate(f / "tokenizer.json", 0.3), "tokenizer.json' is not valid JSON"),
]


@pytest.mark.parametrize("case,damage,phrase", MODEL_DAMAGE, ids=[c[0] for c in MODEL_DAMAGE])
def test_damaged_model_folder_is_one_line(assets, tmp_path, case, damage, phrase):
    """What train.py and evaluate.py load, in the order they load it: the first failure is a UserError."""
    from tunebench.errors import UserError
    from tunebench.models import load_config, load_model, load_tokenizer
    from tunebench.recipe import ModelSettings

    model_cfg = ModelSettings(name=str(model_copy(assets, tmp_path, damage)))
    with pytest.raises(UserError) as error:
        load_config(model_cfg), load_tokenizer(model_cfg), load_model(model_cfg)
    assert phrase in str(error.value) and "\n" not in str(error.value)


def test_file_named_gguf_that_is_not_gguf(tmp_path):
    from tunebench.errors import UserError
    from tunebench.models import load_config
    from tunebench.recipe import ModelSettings

    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        load_config(ModelSettings(name=str(fake)))


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


# (case, file name, content, phrase): the file is the training data; the message names it and its line.
DATA_FILES = [
    ("jsonl broken line", "d.jsonl", b'{"text": "one two"}\n{"text": "cut off\n{"text": "x"}\n', "d.jsonl', line 2 is not valid JSON"),
    ("jsonl line not an object", "d.jsonl", b'{"text": "one two"}\n["a", "b"]\n', "d.jsonl', line 2 is a JSON list, not an object"),
    ("json document broken", "d.json", b'[\n{"text": "a"},\n{"text": }\n]\n', "d.json', line 3 is not valid JSON"),
    ("csv unclosed quote", "d.csv", b'text,label\nfine,1\n"never closed,0\n', "d.csv', line 3: unexpected end of data"),
    ("csv extra field", "d.csv", b'text,label\nfine,1\na,b,c\n', "d.csv', line 3 has 3 fields, the header has 2"),
    ("text not UTF-8", "d.txt", b"fine line\ncaf\xe9 in Latin-1\n", "d.txt', line 2 is not UTF-8 text (byte 0xe9"),
    ("empty file", "d.jsonl", b"", "d.jsonl' is empty"),
    ("no usable rows", "d.jsonl", b'{"text": ""}\n{"text": "  "}\n', "has no text"),
]


@pytest.mark.parametrize("case,name,content,phrase", DATA_FILES, ids=[c[0] for c in DATA_FILES])
def test_malformed_data_file_names_its_line(assets, tmp_path, case, name, content, phrase):
    from tunebench import data
    from tunebench.errors import UserError
    from tunebench.models import load_tokenizer
    from tunebench.recipe import DataSettings, ModelSettings

    tokenizer = load_tokenizer(ModelSettings(name=str(assets / "gpt2")))
    data_cfg = DataSettings(dataset=str(write_bytes(tmp_path / name, content)), max_length=64,
                            validation_file=str(assets / "valid.txt"))
    with pytest.raises(UserError) as error:
        data.build(data_cfg, tokenizer, seed=0)
    assert phrase in str(error.value), str(error.value)


def test_malformed_data_file_through_train_py(assets, tmp_path):
    data = write_bytes(tmp_path / "d.jsonl", b'{"text": "one two"}\n{"text": "cut off\n')
    result = run_script("train.py", *train_args(assets, tmp_path / "run"), f"data.dataset={data}")
    assert_one_clear_line(result, "d.jsonl', line 2 is not valid JSON")
    assert "An error occurred while generating the dataset" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["dataset", "validation_file"])
def test_folder_or_empty_file_given_for_a_file(assets, tmp_path, key):
    from tunebench import data_rows
    from tunebench.errors import UserError
    from tunebench.recipe import DataSettings

    base = DataSettings(dataset=str(assets / "train.txt"), validation_file=str(assets / "valid.txt"))
    if key == "validation_file":
        with pytest.raises(UserError, match="data.validation_file '.*' is a folder; give a file"):
            data_rows.load_raw(replace(base, **{key: str(tmp_path)}))
    with pytest.raises(UserError, match="e.txt' is empty"):
        data_rows.load_raw(replace(base, **{key: str(write_bytes(tmp_path / "e.txt", b""))}))


def test_bad_model_leaves_a_stopped_run_untouched(assets, tmp_path):
    """The model folder of a stopped run is damaged before it resumes: one line, and the run folder
    is byte for byte as it was (no checkpoint set aside, no log cut)."""
    model = model_copy(assets, tmp_path, lambda f: None)
    run = tmp_path / "run"
    stopped = run_script("train.py", *train_args(assets, run, model), "train.save_every=1", "--stop-after-steps", "1")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    before = snapshot(run)
    truncate(model / "model.safetensors")
    result = run_script("train.py", *train_args(assets, run, model), "train.save_every=1")
    assert_one_clear_line(result, "model.safetensors is truncated")
    assert snapshot(run) == before


# ---- evaluate.py and its report -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    result = run_script("train.py", *train_args(assets, run))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def run_copy(finished, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    return run


EVAL_CASES = [
    ("data file is a folder", lambda a, t: ["--data-file", t], "--data-file '"),
    ("data file empty", lambda a, t: ["--data-file", write_bytes(t / "e.txt", b"")], "e.txt' is empty"),
    ("data file broken line", lambda a, t: ["--data-file", write_bytes(t / "b.jsonl", b'{"text": "a"}\n{"text": \n')],
     "b.jsonl', line 2 is not valid JSON"),
    ("out beneath a file", lambda a, t: ["--out", write_bytes(t / "f", b"x") / "out"], "f', which is a file"),
    ("negative seed", lambda a, t: ["--seed", "-1"], "--seed: expected a seed from 0"),
]


@pytest.mark.parametrize("case,build,phrase", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_evaluate_bad_input_is_one_line(assets, tmp_path, case, build, phrase):
    extra = [str(x) for x in build(assets, tmp_path)]
    if "--data-file" not in extra:
        extra += ["--data-file", str(assets / "valid.txt")]
    result = run_script("evaluate.py", "--model", assets / "gpt2", "--tasks", "ppl", *extra)
    assert_one_clear_line(result, phrase)


# (case, damage done to a copy of a finished run, phrase)
RUN_DAMAGE = [
    ("eval.json corrupt", lambda r: (r / "eval.json").write_text('{"tasks": {'), "eval.json' is not valid JSON"),
    ("adapter truncated", lambda r: truncate(r / "final" / "adapter_model.safetensors"), "adapter_model.safetensors is truncated"),
    ("adapter config corrupt", lambda r: (r / "final" / "adapter_config.json").write_text("[1, 2"), "adapter_config.json' is not valid JSON"),
]


@pytest.mark.parametrize("case,damage,phrase", RUN_DAMAGE, ids=[c[0] for c in RUN_DAMAGE])
def test_evaluate_damaged_run_is_one_line_and_untouched(assets, finished, tmp_path, case, damage, phrase):
    run = run_copy(finished, tmp_path, damage)
    before = snapshot(run)
    result = run_script("evaluate.py", "--run", run, "--tasks", "ppl", "--data-file", assets / "valid.txt")
    assert_one_clear_line(result, phrase)
    assert snapshot(run) == before


REPORT_DAMAGE = [
    ("eval.json corrupt", lambda r: (r / "eval.json").write_text('{"tasks": {"ppl": '), "eval.json' is not valid JSON"),
    ("summary.json not an object", lambda r: (r / "summary.json").write_text("[1, 2]\n"), "summary.json' holds a JSON list"),
    ("summary.json not UTF-8", lambda r: (r / "summary.json").write_bytes(b"\xff\xfe{}"), "summary.json' is not UTF-8"),
]


@pytest.mark.parametrize("case,damage,phrase", REPORT_DAMAGE, ids=[c[0] for c in REPORT_DAMAGE])
def test_report_of_a_damaged_run_is_one_line(finished, tmp_path, case, damage, phrase):
    (finished / "eval.json").exists() or (finished / "eval.json").write_text(json.dumps({"tasks": {}}))
    run = run_copy(finished, tmp_path, damage)
    result = run_script("evaluate.py", "report", run, "--out", tmp_path / "report")
    assert_one_clear_line(result, phrase)
    assert not (tmp_path / "report").exists()


def test_report_out_beneath_a_file(finished, tmp_path):
    blocker = write_bytes(tmp_path / "file", b"x")
    result = run_script("evaluate.py", "report", finished, "--out", blocker / "report")
    assert_one_clear_line(result, "--out")
    assert "which is a file" in result.stderr
