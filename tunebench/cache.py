"""Figures computed once per setting on this machine and kept for the next run that needs them: the
untrained model's validation scores (every trial of a search starts from it) and the memory plan's
prediction (the same for every rate). Each is keyed by a hash of everything it depends on. The folder
is TUNEBENCH_CACHE, else ~/.cache/tunebench; a cache that cannot be read or written costs only the time
to compute the figure again."""
import hashlib
import json
import os
from pathlib import Path


def folder() -> Path:
    return Path(os.environ.get("TUNEBENCH_CACHE") or Path.home() / ".cache" / "tunebench")


def digest(*parts) -> "hashlib._Hash":
    """A sha256 of the parts as sorted JSON, to which a caller may add raw bytes (update) before keying."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())


def remembered(kind: str, key: str, compute):
    """compute()'s JSON value for this key, computed here only when no earlier run kept it."""
    path = folder() / kind / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"value": value}), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass
    return value
