"""Bad input to train.py: one clear line on stderr, exit status 2, no traceback, no run touched."""
import pytest
import torch

from conftest import ROOT, assert_one_clear_line, run_script, snapshot

RECIPE = ROOT / "recipes" / "lora_r16.yaml"


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("existing") / "run"
    result = run_script("train.py", "--recipe", RECIPE, *base_args(assets, run), "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def base_args(assets, out):
    return [
        f"model.name={assets / 'gpt2'}",
        f"data.dataset={assets / 'train.txt'}",
        f"data.validation_file={assets / 'valid.txt'}",
        "data.max_length=64",
        "train.micro_batch_size=2",
        f"output_dir={out}",
    ]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# (case id, how to build the command line's extra pieces, a phrase the message must hold)
CASES = [
    ("unknown key in file", lambda a, t: ["--recipe", write(t, "r.yaml", "name: x\ntrain:\n  lrr: 1\n")], "unknown recipe key 'train.lrr'"),
    ("unknown key override", lambda a, t: ["train.learning_rate=1e-4"], "unknown recipe key 'train.learning_rate'"),
    ("unknown section", lambda a, t: ["optim.lr=1"], "unknown recipe key 'optim'"),
    ("wrong type", lambda a, t: ["train.lr=fast"], "'train.lr' must be float"),
    ("wrong type int", lambda a, t: ["train.max_steps=2.5"], "'train.max_steps' must be int"),
    ("bool for int", lambda a, t: ["train.micro_batch_size=true"], "'train.micro_batch_size' must be int"),
    ("section as value", lambda a, t: ["train=3"], "'train' must be a section"),
    ("bad choice", lambda a, t: ["train.optimizer=adam"], "choose one of adamw"),
    ("bad method", lambda a, t: ["method.type=qlora2"], "choose one of full"),
    ("zero rank", lambda a, t: ["method.r=0"], "'method.r' must be positive"),
    ("negative lr", lambda a, t: ["train.lr=-1e-4"], "'train.lr' must be positive"),
    ("zero lr", lambda a, t: ["train.lr=0"], "'train.lr' must be positive"),
    ("fraction above one", lambda a, t: ["data.fraction=1.5"], "between 0 and 1"),
    ("key of another method", lambda a, t: ["method.num_virtual_tokens=4"], "applies to method.type prompt_tuning"),
    ("override without =", lambda a, t: ["train.lr"], "is not KEY=VALUE"),
    ("missing recipe", lambda a, t: ["--recipe", t / "nope.yaml"], "does not exist"),
    ("invalid yaml", lambda a, t: ["--recipe", write(t, "bad.yaml", "name: [x\n")], "not valid YAML"),
    ("yaml not a mapping", lambda a, t: ["--recipe", write(t, "list.yaml", "- a\n- b\n")], "must hold a mapping"),
    ("both warmups", lambda a, t: ["train.warmup_steps=3", "train.warmup_ratio=0.1"], "not both"),
    ("bad tracker", lambda a, t: ["train.trackers=[mlflow2]"], "choose from tensorboard"),
    ("empty targets", lambda a, t: ["method.targets=[]"], "'method.targets' is empty"),
    ("missing data file", lambda a, t: [f"data.dataset={t / 'missing.txt'}"], "does not exist"),
    ("unsupported data type", lambda a, t: [f"data.dataset={write(t, 'notes.docx', 'x')}"], "unsupported type"),
    ("empty data set", lambda a, t: ["data.dataset=" + str(write(t, "empty.txt", "\n" * 5))], "no text"),
    ("missing text field", lambda a, t: ["data.dataset=" + str(write(t, "d.jsonl", '{"body": "hello there"}\n' * 40))], "has fields body, which match no shape"),
    ("unknown data set name", lambda a, t: ["data.dataset=wikitext9"], "neither registered"),
    ("missing validation file", lambda a, t: [f"data.validation_file={t / 'v.txt'}"], "does not exist"),
    ("missing model folder", lambda a, t: [f"model.name={t / 'no_model'}"], "does not exist"),
    ("missing gguf", lambda a, t: [f"model.name={t / 'm.gguf'}"], "does not exist"),
    ("target matches nothing", lambda a, t: ["method.targets=[q_proj]"], "matches no module"),
    ("length beyond context", lambda a, t: ["data.max_length=256"], "longer than the model's context of 128"),
    ("soft prompt beyond context", lambda a, t: ["--recipe", ROOT / "recipes/prompt_tuning.yaml", "data.max_length=125"], "minus 20 virtual tokens"),
    ("batch larger than data", lambda a, t: ["train.micro_batch_size=100000"], "fewer than one step"),
    ("top blocks beyond model", lambda a, t: ["--recipe", ROOT / "recipes/top2_blocks.yaml", "method.top_blocks=5"], "has 2 blocks"),
    ("name escaping runs/", lambda a, t: ["name=../../etc", "output_dir=null"], "recipe key 'name' is '../../etc'"),
    ("unknown flag", lambda a, t: ["--fast"], "unrecognized arguments"),
    ("paged optimizer on cpu", lambda a, t: ["train.optimizer=paged_adamw_8bit"], "use adamw_8bit on a CPU"),
    # the methods beyond plain LoRA: a key of one method given to another, a ratio or rank out of range
    ("dora key on ia3", lambda a, t: ["--recipe", ROOT / "recipes/ia3.yaml", "method.dora=true"], "'method.dora' applies to method.type lora or qlora, not ia3"),
    ("lora rank on prefix tuning", lambda a, t: ["--recipe", ROOT / "recipes/prefix_tuning.yaml", "method.r=8"], "'method.r' applies to method.type lora or qlora or vera, not prefix_tuning"),
    ("adalora key on lora", lambda a, t: ["method.target_r=4"], "'method.target_r' applies to method.type adalora, not lora"),
    ("loraplus ratio below one", lambda a, t: ["method.loraplus_lr_ratio=0.5"], "'method.loraplus_lr_ratio' is 0.5; LoRA+ trains B faster"),
    ("loraplus ratio zero", lambda a, t: ["method.loraplus_lr_ratio=0"], "'method.loraplus_lr_ratio' must be positive"),
    ("unknown lora init", lambda a, t: ["method.init=svd"], "'method.init' is 'svd'; choose one of default"),
    ("pissa with dora", lambda a, t: ["method.init=pissa", "method.dora=true"], "do not combine"),
    ("olora on gpt2 conv1d", lambda a, t: ["method.init=olora"], "olora gives wrong shapes on GPT-2's Conv1D"),
    ("vera rank zero", lambda a, t: ["--recipe", ROOT / "recipes/vera.yaml", "method.r=0"], "'method.r' must be positive"),
    ("adalora target above init", lambda a, t: ["--recipe", ROOT / "recipes/adalora.yaml", "method.target_r=16"], "method.target_r (16) is above method.init_r (12)"),
    ("adalora schedule beyond run", lambda a, t: ["--recipe", ROOT / "recipes/adalora.yaml", "train.max_steps=100"], "must be fewer than the run's 100 optimizer steps"),
    ("adalora schedule beyond epochs", lambda a, t: ["--recipe", ROOT / "recipes/adalora.yaml", "data.fraction=0.1", "method.tfinal=1000"], "optimizer steps (AdaLoRA prunes"),
    ("adalora beta of one", lambda a, t: ["--recipe", ROOT / "recipes/adalora.yaml", "method.beta1=1"], "strictly between 0 and 1"),
    ("qlora quant type", lambda a, t: ["--recipe", ROOT / "recipes/qlora.yaml", "method.quant_type=int4"], "choose one of nf4, fp4"),
    ("prefix beyond context", lambda a, t: ["--recipe", ROOT / "recipes/prefix_tuning.yaml", "data.max_length=120"], "minus 20 virtual tokens"),
    # numbers: non-finite, out of range, non-positive
    ("infinite lr", lambda a, t: ["train.lr=.inf"], "'train.lr' must be a finite number, got inf"),
    ("nan in recipe file", lambda a, t: ["--recipe", write(t, "nan.yaml", "name: x\ntrain:\n  weight_decay: .nan\n")], "'train.weight_decay' must be a finite number"),
    ("seed out of range", lambda a, t: ["train.seed=-1"], "'train.seed' must be a seed from 0 to 4294967295"),
    ("integer beyond 64 bits", lambda a, t: ["train.max_steps=99999999999999999999999"], "beyond what a 64-bit integer holds"),
    ("stop after zero steps", lambda a, t: ["--stop-after-steps", "0"], "--stop-after-steps: expected a positive whole number, got '0'"),
    ("stop after negative steps", lambda a, t: ["--stop-after-steps=-2"], "expected a positive whole number, got '-2'"),
    ("budget not a number", lambda a, t: ["--plan", "--budget-gb", "nan"], "--budget-gb: expected a positive number"),
    # paths: a folder for a file, a file for a folder, a file that is not text
    ("recipe is a folder", lambda a, t: ["--recipe", t], "is a folder; give a YAML file"),
    ("recipe not UTF-8", lambda a, t: ["--recipe", write_bytes(t, "bin.yaml", b"\xff\xfe\x00name: x")], "is not valid YAML"),
    ("output_dir is a file", lambda a, t: [f"output_dir={write(t, 'f.txt', 'x')}"], "f.txt' is a file; give a folder"),
    ("output_dir beneath a file", lambda a, t: [f"output_dir={write(t, 'f.txt', 'x') / 'run'}"], "f.txt', which is a file"),
]


def command(assets, tmp_path, build):
    extra = [str(x) for x in build(assets, tmp_path)]
    recipe = [] if "--recipe" in extra else ["--recipe", str(RECIPE)]
    return recipe + base_args(assets, tmp_path / "new_run") + extra


@pytest.mark.parametrize("case,build,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(assets, tmp_path, case, build, phrase):
    if case == "paged optimizer on cpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present: paged_adamw_8bit is allowed")
    result = run_script("train.py", *command(assets, tmp_path, build))
    assert_one_clear_line(result, phrase)
    assert not (tmp_path / "new_run").exists()


def test_missing_recipe_flag():
    result = run_script("train.py")
    assert_one_clear_line(result, "--recipe")


def test_other_run_in_output_dir_is_not_overwritten(assets, finished_run):
    before = snapshot(finished_run)
    result = run_script("train.py", "--recipe", RECIPE, *base_args(assets, finished_run), "train.max_steps=3")
    assert_one_clear_line(result, "holds another run (its recipe differs in train.max_steps)")
    assert snapshot(finished_run) == before


def test_bad_input_leaves_existing_run_untouched(assets, finished_run):
    # overwrite=true gets past the "holds another run" check, so each later check must still refuse
    # before the old run is replaced.
    before = snapshot(finished_run)
    for overrides, phrase in (
        (["train.lr=oops"], "'train.lr' must be float"),
        (["method.targets=[nothing]"], "LoRA target 'nothing' matches no module"),
        (["data.max_length=4096"], "longer than the model's context"),
    ):
        result = run_script("train.py", "--recipe", RECIPE, *base_args(assets, finished_run), *overrides, "overwrite=true")
        assert_one_clear_line(result, phrase)
    assert snapshot(finished_run) == before


def test_folder_that_is_not_a_run_is_refused(assets, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    result = run_script("train.py", "--recipe", RECIPE, *base_args(assets, folder))
    assert_one_clear_line(result, "not a tunebench run")
    assert (folder / "notes.txt").read_text() == "precious"
