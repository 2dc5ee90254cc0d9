"""Files and numbers a user names are untrusted: check them cheaply, and say what is wrong in one line.

Every check here raises UserError (one `error:` line, exit status 2) naming the file, the line where
there is one, and what would be right. They read no more than needed: a safetensors header, a zip
directory, and a data file's lines only after the datasets library has failed to read it.
"""
import argparse
import csv
import json
import math
import os
import struct
import zipfile
from pathlib import Path

from tunebench.errors import UserError


# ---- paths ---------------------------------------------------------------------------------------------

def existing_file(path, what: str) -> Path:
    """The path of a file that exists and holds something: a UserError for a missing path, a folder
    or an empty file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a file")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty")
    return path


def read_yaml_mapping(path, what: str, pick: str) -> dict:
    """A YAML file of keys (a recipe, a suite, an accelerate config): {} when empty; one line when it is
    a folder, missing, unreadable, not UTF-8 YAML (with the line where the parser stopped) or not a
    mapping. `pick` says where to find a good one."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a YAML file ({pick})")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; {pick}")
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} '{path}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise UserError(f"{what} '{path}' must hold a mapping of keys, got {type(given).__name__}")
    return given


def writable_folder(path, what: str) -> Path:
    """A folder that exists or can be made: nothing on the way to it is a file, and it is not a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file; give a folder")
    parent = path
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{what} '{path}' lies beneath '{parent}', which is a file; give a folder path")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}' cannot be created: '{parent}' is not writable")
    return path


def read_json(path, what: str = "", advice: str = ""):
    """A JSON file's content; a UserError naming the file (and line) when it is unreadable or not JSON.
    what: words before the file's name; advice: what to do, after the problem."""
    path = Path(path)
    label = f"{what} '{path}'" if what else f"'{path}'"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{label} is not UTF-8 text (a damaged or binary file){advice}") from None
    except json.JSONDecodeError as e:
        where = f"{e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}"
        raise UserError(f"{label} is not valid JSON ({where}){advice}") from None
    except OSError as e:
        raise UserError(f"{label} cannot be read: {e.strerror or e}{advice}") from None


def read_json_object(path, what: str = "", advice: str = "") -> dict:
    value = read_json(path, what, advice)
    if not isinstance(value, dict):
        label = f"{what} '{path}'" if what else f"'{path}'"
        raise UserError(f"{label} holds a JSON {type(value).__name__}, not an object{advice}")
    return value


def read_jsonl_records(path, advice: str = "") -> list:
    """A JSON-lines file of objects (generations.jsonl); a UserError naming the file and line otherwise."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text (a damaged or binary file){advice}") from None
    except OSError as e:
        raise UserError(f"'{path}' cannot be read: {e.strerror or e}{advice}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"'{path}', line {number} is not valid JSON ({e.msg}){advice}") from None
        if not isinstance(record, dict):
            raise UserError(f"'{path}', line {number} holds a JSON {type(record).__name__}, not an object{advice}")
        records.append(record)
    return records


# ---- numbers on command lines -------------------------------------------------------------------------

def positive(text):
    """argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return value


def positive_number(text):
    """argparse type: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return value


SEEDS = 2**32  # a seed is 0 to 2**32 - 1: what numpy and torch accept


def seed(text):
    """argparse type: a random seed."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {SEEDS - 1}, got '{text}'")
    return value


# ---- weights -------------------------------------------------------------------------------------------

def weights_problem(path) -> str:
    """Why a weights file cannot be whole (None when its structure is sound): a safetensors file must be
    exactly as long as its header says, a PyTorch .bin (a zip) must have its directory at its end."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return f"{path.name} is truncated or not a safetensors file ({size:,} bytes, header says more)"
            try:
                header = json.loads(f.read(header_len))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError):
                return f"{path.name} has a damaged header"
        expected = 8 + header_len + end
        if size != expected:
            return f"{path.name} is {'truncated' if size < expected else 'longer than its header says'} ({size:,} of {expected:,} bytes)"
    elif path.suffix in (".bin", ".pt", ".pth"):
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"  # torch.save's format since 1.6; its directory is at the end
        if size == 0 or (zipped and not zipfile.is_zipfile(path)):
            return f"{path.name} is truncated or damaged ({size:,} bytes, not a complete PyTorch file)"
    return None


def check_model_folder(folder, name: str) -> None:
    """Its JSON files (config, tokenizer, shard index) parse, the weights files a shard index names
    exist, and every weights file is whole. Cheap: JSON, headers and sizes only."""
    folder = Path(folder)
    for config in sorted(folder.glob("*.json")):
        read_json_object(config, f"model folder '{name}':")
    for index in folder.glob("*.index.json"):
        shards = set((read_json_object(index, f"model folder '{name}':").get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (folder / str(s)).is_file())
        if missing:
            raise UserError(f"model folder '{name}' is incomplete: {index.name} names {missing[0]}, which is missing")
    for weights in sorted(folder.iterdir()):
        if weights.is_file() and weights.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            problem = weights_problem(weights)
            if problem:
                raise UserError(f"model folder '{name}': {problem}; copy or save the model again")


def check_gguf(path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"model file '{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")


def first_line(error: BaseException, innermost: bool = False) -> str:
    """An exception's type and first line; innermost: its root cause's (where a library wraps every
    failure in one message that says less, as the datasets library does)."""
    while innermost and (error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__)):
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


# ---- data files ---------------------------------------------------------------------------------------

def data_file_problem(path) -> str:
    """Where a local data file is broken, as 'line N: what' (None when no line is at fault). Run when
    the datasets library has failed to read it: its own message does not name the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return None
    lines = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                return f"line {number} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
    if suffix in (".json", ".jsonl"):
        text = "".join(lines)
        if suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(text)
                return None
            except json.JSONDecodeError as e:
                if e.lineno > 1 or len(lines) < 2:  # one JSON document (not JSON lines) that is broken
                    return f"line {e.lineno} is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object of fields"
    elif suffix == ".csv":
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
            for row in reader:
                if row and len(row) != len(header):
                    return f"line {reader.line_num} has {len(row)} fields, the header has {len(header)} (a comma or quote out of place?)"
        except csv.Error as e:
            return f"line {reader.line_num}: {e} (an unclosed or stray quote?)"
    return None
