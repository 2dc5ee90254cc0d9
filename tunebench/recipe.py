"""Recipes: YAML files of nested keys, dotted KEY=VALUE overrides, strict validation.

Every key a recipe may hold is declared in SCHEMA with its default and type. An unknown key,
a value of the wrong type or an impossible value is a UserError naming the key and what would
be right; nothing is ever silently ignored.
"""
import copy
import difflib
import math
import re
from pathlib import Path

import yaml

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.methods import METHODS

# key: (default, type, allowed values or a check). Types: int, float, str, bool, list (of str).
# A default of None means "not set"; such keys also accept null.


def _method_keys() -> dict:
    """Every method's keys in one section. Methods may share a key (lora and qlora share LoRA's): it
    then has one type and check; its default is each method's own (load_recipe applies it)."""
    keys = {}
    for name, method in METHODS.items():
        for key, spec in method.keys.items():
            if key in keys and keys[key][1:] != spec[1:]:
                raise AssertionError(f"method key '{key}' of {name} differs in type or check from another method's")
            keys.setdefault(key, spec)
    return keys


SCHEMA = {
    "name": (None, str, None),
    "output_dir": (None, str, None),
    "overwrite": (False, bool, None),
    # causal_lm: next-token loss; classification: a sequence-classification head on the last real
    # token, trained on data.text_field -> data.label_field and chosen by validation accuracy.
    "task": ("causal_lm", str, ("causal_lm", "classification")),
    "model": {
        "name": (None, str, None),
        "gguf_file": (None, str, None),
        "revision": (None, str, None),
        "dtype": ("float32", str, ("float32", "bfloat16", "float16", "auto")),
        "trust_remote_code": (False, bool, None),
        "gradient_checkpointing": (False, bool, None),
        "attn_implementation": ("sdpa", str, ("sdpa", "eager", "flash_attention_2")),
    },
    # method.type and each method's own keys: one entry per method in tunebench/methods.py.
    "method": {
        "type": ("full", str, tuple(METHODS)),
        **_method_keys(),
    },
    "data": {
        "dataset": (None, str, None),
        "config": (None, str, None),
        "files": (None, str, None),
        "format": (None, str, ("text", "instruction", "summarization", "prompt_completion", "conversation")),
        "text_field": (None, str, None),
        "prompt_field": (None, str, None),
        "input_field": (None, str, None),
        "response_field": (None, str, None),
        "label_field": (None, str, None),
        "template": (None, str, None),
        # conversations: a built-in chat template (zephyr, chatml), a .jinja file or a template
        # text; null: the model's own, else zephyr (tunebench/chat.py)
        "chat_template": (None, str, None),
        "train_on_prompt": (False, bool, None),
        "max_response_chars": (None, int, "positive"),
        "train_split": ("train", str, None),
        "validation_split": (None, str, None),
        "validation_file": (None, str, None),
        "validation_share": (0.05, float, "fraction"),
        "fraction": (1.0, float, "fraction"),
        "max_length": (512, int, "positive"),
        "num_proc": (None, int, "positive"),
        # Pack instruction, summarization and conversation examples into rows of max_length tokens,
        # each example attending only to itself: null packs where train.py finds it exact for the
        # model and method (not with a soft prompt or prefix), true requires it, false never packs.
        "packing": (None, bool, None),
    },
    "train": {
        "epochs": (1, int, "positive"),
        "max_steps": (None, int, "positive"),
        "micro_batch_size": (8, int, "positive"),
        "grad_accum": (1, int, "positive"),
        "lr": (5e-5, float, "positive"),
        "optimizer": ("adamw", str, ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")),
        "weight_decay": (0.0, float, "non-negative"),
        "adam_beta1": (0.9, float, "fraction"),
        "adam_beta2": (0.999, float, "fraction"),
        "max_grad_norm": (1.0, float, "non-negative"),
        "scheduler": ("linear", str, ("linear", "cosine", "constant")),
        "warmup_steps": (0, int, "non-negative"),
        "warmup_ratio": (0.0, float, "fraction"),
        "seed": (42, int, "seed"),
        "eval_every": (50, int, "non-negative"),
        "eval_max_batches": (None, int, "positive"),
        "save_every": (100, int, "positive"),
        "keep_checkpoints": (2, int, "positive"),
        "log_every": (10, int, "positive"),
        "compile": (False, bool, None),
        "exact_cpu_rss": (False, bool, None),
        # The causal LM loss from the hidden states in chunks, without the logits, where it is exact
        # (tunebench/fused_loss.py); false: always the plain loss on the logits.
        "fused_loss": (True, bool, None),
        "trackers": ([], list, None),
    },
    "eval": {
        "tasks": ([], list, None),
    },
}

METHOD_KEYS = {name: set(method.keys) for name, method in METHODS.items()}

TRACKERS = ("tensorboard", "wandb")


def defaults() -> dict:
    def build(schema):
        return {k: build(v) if isinstance(v, dict) else copy.deepcopy(v[0]) for k, v in schema.items()}

    return build(SCHEMA)


def _field(dotted: str):
    node = SCHEMA
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _all_keys(schema=SCHEMA, prefix=""):
    for k, v in schema.items():
        if isinstance(v, dict):
            yield from _all_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _unknown_key(dotted: str, where: str) -> UserError:
    close = difflib.get_close_matches(dotted, list(_all_keys()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see the README for the recipe keys"
    return UserError(f"unknown recipe key '{dotted}'{where}{hint}")


def _coerce(dotted: str, value, field: tuple, where: str):
    default, kind, allowed = field
    if value is None:
        if default is None or kind is list:
            return [] if kind is list else None
        raise UserError(f"recipe key '{dotted}' cannot be null; give a {kind.__name__}{where}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "5e-5" as a string
        except ValueError:
            pass
    if kind is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"recipe key '{dotted}' must be a list of names, got {value!r}{where}")
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"recipe key '{dotted}' must be {kind.__name__}, got {type(value).__name__} {value!r}{where}"
        )
    if kind is float and not math.isfinite(value):
        raise UserError(f"recipe key '{dotted}' must be a finite number, got {value!r}{where}")
    if kind is int and not -(2**63) < value < 2**63:
        raise UserError(f"recipe key '{dotted}' is {value}, beyond what a 64-bit integer holds{where}")
    if isinstance(allowed, tuple) and value not in allowed:
        raise UserError(f"recipe key '{dotted}' is {value!r}{where}; choose one of {', '.join(allowed)}")
    if allowed == "positive" and not value > 0:
        raise UserError(f"recipe key '{dotted}' must be positive, got {value!r}{where}")
    if allowed == "non-negative" and not value >= 0:
        raise UserError(f"recipe key '{dotted}' must be zero or more, got {value!r}{where}")
    if allowed == "fraction" and not 0 <= value <= 1:
        raise UserError(f"recipe key '{dotted}' must lie between 0 and 1, got {value!r}{where}")
    if allowed == "seed" and not 0 <= value < inputs.SEEDS:
        raise UserError(f"recipe key '{dotted}' must be a seed from 0 to {inputs.SEEDS - 1}, got {value!r}{where}")
    return value


def _merge(recipe: dict, given: dict, where: str, prefix: str = "", explicit: set = None) -> None:
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        field = _field(dotted)
        if field is None:
            raise _unknown_key(dotted, where)
        if isinstance(field, dict):
            if not isinstance(value, dict):
                raise UserError(f"recipe key '{dotted}' must be a section of keys, got {value!r}{where}")
            _merge(recipe[key], value, where, f"{dotted}.", explicit)
        else:
            recipe[key] = _coerce(dotted, value, field, where)
            explicit.add(dotted)


def parse_override(text: str) -> tuple:
    """'train.lr=1e-4' -> ('train.lr', 1e-4), the value read as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE, e.g. train.max_steps=50")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has no key before '=', e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, set)) or (value is not None and not isinstance(value, (str, int, float, bool, list))):
        value = raw
    return key, value


def _nest(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_recipe(path, overrides=()) -> dict:
    """Read a recipe file, apply overrides, fill defaults and validate. Returns a nested dict."""
    recipe = defaults()
    explicit = set()
    if path is not None:
        path = Path(path)
        given = inputs.read_yaml_mapping(path, "recipe file", "pick one under recipes/, e.g. recipes/lora_r16.yaml")
        _merge(recipe, given, f" in {path}", explicit=explicit)
    for text in overrides:
        key, value = parse_override(text)
        _merge(recipe, _nest(key, value), f" (override '{text}')", explicit=explicit)
    _check(recipe, explicit)
    return recipe


def _check(recipe: dict, explicit: set) -> None:
    method = recipe["method"]["type"]
    for dotted in sorted(explicit):
        section, _, name = dotted.partition(".")
        if section == "method" and name != "type" and name not in METHOD_KEYS[method]:
            owners = [t for t, keys in METHOD_KEYS.items() if name in keys]
            raise UserError(f"recipe key '{dotted}' applies to method.type {' or '.join(owners)}, not {method}")
    # Keep only the chosen method's keys (so the resolved recipe reloads), unset ones at its own defaults.
    recipe["method"] = {"type": method, **{k: recipe["method"][k] if f"method.{k}" in explicit else copy.deepcopy(spec[0])
                                           for k, spec in METHODS[method].keys.items()}}
    if not recipe["model"]["name"]:
        raise UserError("recipe key 'model.name' is not set; give a hub id (gpt2), a local folder or a .gguf file")
    if not recipe["data"]["dataset"]:
        raise UserError("recipe key 'data.dataset' is not set; give a registered name (wikitext2), a hub id or a file")
    if not recipe["name"]:
        if recipe["output_dir"]:
            recipe["name"] = Path(recipe["output_dir"]).name
        else:
            raise UserError("recipe key 'name' is not set; every run needs a name (it names runs/NAME)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe["name"]):
        raise UserError(f"recipe key 'name' is {recipe['name']!r}; use letters, digits, '.', '_' and '-' (it names runs/NAME)")
    if not recipe["output_dir"]:
        recipe["output_dir"] = f"runs/{recipe['name']}"
    METHODS[method].check(recipe)
    if recipe["task"] == "classification" and recipe["data"]["format"]:
        raise UserError(
            "recipe key 'data.format' applies to task causal_lm; task classification reads data.text_field and data.label_field"
        )
    for tracker in recipe["train"]["trackers"]:
        if tracker not in TRACKERS:
            raise UserError(f"recipe key 'train.trackers' names '{tracker}'; choose from {', '.join(TRACKERS)}")
    if recipe["train"]["warmup_steps"] and recipe["train"]["warmup_ratio"]:
        raise UserError("set train.warmup_steps or train.warmup_ratio, not both")


def to_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)


def flatten(recipe: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in recipe.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
