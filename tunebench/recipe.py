"""Recipes: YAML files of nested keys, dotted KEY=VALUE overrides, strict validation.

Every key a recipe may hold is declared below, a section a class (TrainSettings: recipe.train.lr),
with its type, default and allowed values; a method's own keys are declared by its entry in
methods.py. load_recipe merges a file and overrides into those keys and returns a typed Recipe. An
unknown key, a value of the wrong type or an impossible value is a UserError naming the key and what
would be right; nothing is ever silently ignored.
"""
import copy
import difflib
import importlib.util
import math
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

import yaml

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.methods import METHODS


def key(default, allowed=None):
    """A recipe key: its default (None: not set) and what it allows: a tuple of choices, or one of the
    checks "positive", "non-negative", "fraction", "seed"."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"allowed": allowed})
    return field(default=default, metadata={"allowed": allowed})


@dataclass
class Settings:
    """A section of a recipe: typed keys, read as attributes (recipe.train.lr)."""


@dataclass
class ModelSettings(Settings):
    name: str | None = key(None)  # a hub id, a local folder, or a folder holding gguf_file
    gguf_file: str | None = key(None)
    revision: str | None = key(None)
    dtype: str = key("float32", ("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = key(False)
    gradient_checkpointing: bool = key(False)
    attn_implementation: str = key("sdpa", ("sdpa", "eager", "flash_attention_2"))


@dataclass
class DataSettings(Settings):
    dataset: str | None = key(None)  # a registered name (wikitext2), a hub id, a file or a folder
    config: str | None = key(None)
    files: str | None = key(None)
    format: str | None = key(None, ("text", "instruction", "summarization", "prompt_completion", "conversation"))
    text_field: str | None = key(None)
    prompt_field: str | None = key(None)
    input_field: str | None = key(None)
    response_field: str | None = key(None)
    label_field: str | None = key(None)
    template: str | None = key(None)
    # conversations: a built-in chat template (zephyr, chatml), a .jinja file or a template text;
    # null: the model's own, else zephyr (tunebench/chat.py)
    chat_template: str | None = key(None)
    train_on_prompt: bool = key(False)
    max_response_chars: int | None = key(None, "positive")
    train_split: str = key("train")
    validation_split: str | None = key(None)
    validation_file: str | None = key(None)
    validation_share: float = key(0.05, "fraction")
    fraction: float = key(1.0, "fraction")
    max_length: int = key(512, "positive")
    num_proc: int | None = key(None, "positive")
    # Pack instruction, summarization and conversation examples into rows of max_length tokens, each
    # example attending only to itself: null packs where train.py finds it exact for the model and
    # method (not with a soft prompt or prefix), true requires it, false never packs.
    packing: bool | None = key(None)


@dataclass
class TrainSettings(Settings):
    epochs: int = key(1, "positive")
    max_steps: int | None = key(None, "positive")
    micro_batch_size: int = key(8, "positive")
    grad_accum: int = key(1, "positive")
    lr: float = key(5e-5, "positive")
    optimizer: str = key("adamw", ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"))
    weight_decay: float = key(0.0, "non-negative")
    adam_beta1: float = key(0.9, "fraction")
    adam_beta2: float = key(0.999, "fraction")
    max_grad_norm: float = key(1.0, "non-negative")
    scheduler: str = key("linear", ("linear", "cosine", "constant"))
    warmup_steps: int = key(0, "non-negative")
    warmup_ratio: float = key(0.0, "fraction")
    seed: int = key(42, "seed")
    eval_every: int = key(50, "non-negative")
    eval_max_batches: int | None = key(None, "positive")
    save_every: int = key(100, "positive")
    keep_checkpoints: int = key(2, "positive")
    log_every: int = key(10, "positive")
    compile: bool = key(False)
    exact_cpu_rss: bool = key(False)
    # The causal LM loss from the hidden states in chunks, without the logits, where it is exact
    # (tunebench/fused_loss.py); false: always the plain loss on the logits.
    fused_loss: bool = key(True)
    trackers: list[str] = key([])


@dataclass
class EvalSettings(Settings):
    tasks: list[str] = key([])


@dataclass
class MethodSettings(Settings):
    """method.type and that method's own keys (declared by its entry in tunebench/methods.py): each
    method has a class of its own, made by method_settings_class."""
    type: str = key("full", tuple(METHODS))


def method_settings_class(name: str) -> type:
    """The settings class of one method, its fields made from the method's keys in METHODS."""
    fields = [("type", str, key(name, tuple(METHODS)))]  # METHOD_SETTINGS["lora"]() is a LoRA section
    fields += [(k, list[str] if kind is list else (kind | None if default is None else kind), key(default, allowed))
               for k, (default, kind, allowed) in METHODS[name].keys.items()]
    cls = make_dataclass(f"{name.title().replace('_', '')}Settings", fields, bases=(MethodSettings,))
    cls.__doc__ = f"method.type {name} and its keys (tunebench/methods.py)"
    return cls


METHOD_SETTINGS = {name: method_settings_class(name) for name in METHODS}


@dataclass
class Recipe(Settings):
    """A resolved recipe: every key set, checked, typed. load_recipe makes one; to_dict turns it back."""
    name: str | None = key(None)
    output_dir: str | None = key(None)
    overwrite: bool = key(False)
    # causal_lm: next-token loss; classification: a sequence-classification head on the last real
    # token, trained on data.text_field -> data.label_field and chosen by validation accuracy.
    task: str = key("causal_lm", ("causal_lm", "classification"))
    model: ModelSettings = field(default_factory=ModelSettings)
    method: MethodSettings = field(default_factory=METHOD_SETTINGS["full"])
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


def _spec(cls) -> dict:
    """A settings class as the loader reads it: key -> (default, type, allowed), sections nested."""
    hints = typing.get_type_hints(cls)
    spec = {}
    for f in fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Settings):
            spec[f.name] = _spec(kind)
            continue
        if typing.get_origin(kind) is list:
            kind = list
        elif typing.get_args(kind):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        spec[f.name] = (default, kind, f.metadata.get("allowed"))
    return spec


def _method_keys() -> dict:
    """Every method's keys in one section. Methods may share a key (lora and qlora share LoRA's): it
    then has one type and check; its default is each method's own (load_recipe applies it)."""
    keys = {}
    for name, method in METHODS.items():
        for k, spec in method.keys.items():
            if k in keys and keys[k][1:] != spec[1:]:
                raise AssertionError(f"method key '{k}' of {name} differs in type or check from another method's")
            keys.setdefault(k, spec)
    return keys


# What the strict loader checks against: every key a recipe may hold, with its default and type.
SCHEMA = {**_spec(Recipe), "method": {**_spec(MethodSettings), **_method_keys()}}

METHOD_KEYS = {name: set(method.keys) for name, method in METHODS.items()}

# Each tracker accelerate can send the curves to, and the package it needs (requirements.txt has the first two).
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}


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
    hint = f"; did you mean '{close[0]}'?" if close else "; the recipe keys are listed in docs/recipe-keys.md"
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


def load_recipe(path, overrides=()) -> Recipe:
    """Read a recipe file, apply overrides, fill defaults and validate. Returns the typed Recipe."""
    recipe = defaults()
    explicit = set()
    if path is not None:
        path = Path(path)
        given = inputs.read_yaml_mapping(path, "recipe file", "pick one under recipes/, e.g. recipes/lora_r16.yaml")
        _merge(recipe, given, f" in {path}", explicit=explicit)
    for text in overrides:
        key, value = parse_override(text)
        _merge(recipe, _nest(key, value), f" (override '{text}')", explicit=explicit)
    return _check(recipe, explicit)


def _check(recipe: dict, explicit: set) -> Recipe:
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
    typed = from_dict(recipe)
    METHODS[method].check(typed)
    if typed.task == "classification" and typed.data.format:
        raise UserError(
            "recipe key 'data.format' applies to task causal_lm; task classification reads data.text_field and data.label_field"
        )
    for tracker in typed.train.trackers:
        if tracker not in TRACKERS:
            raise UserError(f"recipe key 'train.trackers' names '{tracker}'; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(tracker) is None:
            raise UserError(f"recipe key 'train.trackers' names {tracker}, which is not installed; "
                            f"pip install {TRACKERS[tracker]}, or leave it out of train.trackers")
    if typed.train.warmup_steps and typed.train.warmup_ratio:
        raise UserError("set train.warmup_steps or train.warmup_ratio, not both")
    return typed


def from_dict(recipe: dict) -> Recipe:
    """The typed Recipe of a resolved recipe's nested keys (load_recipe has checked them)."""
    method = METHOD_SETTINGS[recipe["method"]["type"]]
    sections = {"model": ModelSettings, "data": DataSettings, "train": TrainSettings, "eval": EvalSettings}
    return Recipe(**{k: sections[k](**v) if k in sections else v for k, v in recipe.items() if k != "method"},
                  method=method(**recipe["method"]))


def to_dict(recipe: Recipe) -> dict:
    """A recipe's nested keys, as recipe.yaml holds them."""
    return asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


# Which recipe keys can change what, in one place: settings compared or cached without them (setting_without).
# Keys that cannot change what a run trains or measures: names, folders, how often it saves and logs, how
# many checkpoints it keeps, where its curves are also sent, how many processes tokenize. A search's winning
# trial that differs from the comparison run only in these is that run (tunebench/search.py adopt).
RESULT_NEUTRAL = ("name", "output_dir", "overwrite", "train.save_every", "train.keep_checkpoints", "train.log_every",
                  "train.trackers", "data.num_proc")
# Keys that cannot change a run's memory: its rate and schedule, seed, length, and when it logs and saves
# (tunebench/plan.py keeps its prediction per setting without them).
NOT_IN_MEMORY = ("name", "output_dir", "overwrite", "train.lr", "train.seed", "train.max_steps", "train.epochs",
                 "train.scheduler", "train.warmup_steps", "train.warmup_ratio", "train.eval_every", "train.save_every",
                 "train.keep_checkpoints", "train.log_every", "train.trackers")
# Keys that cannot change the model before its first step, nor what validation scores: runs that differ
# only in these share train.py's cached untrained validation (and tunebench/forecast.py predicts that).
NOT_BEFORE_TRAINING = ("name", "output_dir", "overwrite", "train.lr", "train.optimizer", "train.weight_decay",
                       "train.adam_beta1", "train.adam_beta2", "train.max_grad_norm", "train.scheduler",
                       "train.warmup_steps", "train.warmup_ratio", "train.eval_every", "train.save_every",
                       "train.keep_checkpoints", "train.log_every", "train.trackers", "train.exact_cpu_rss")


def setting_without(recipe, keys) -> dict:
    """{dotted key: value} of the recipe but the given keys."""
    return {k: v for k, v in flatten(recipe).items() if k not in keys}


def flatten(recipe, prefix: str = "") -> dict:
    """{dotted key: value} of a Recipe or of nested keys."""
    out = {}
    for k, v in (to_dict(recipe) if isinstance(recipe, Recipe) else recipe).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
