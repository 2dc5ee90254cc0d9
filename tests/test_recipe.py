"""The recipe loader: every shipped recipe is valid, overrides parse as YAML, and no input at all
makes the loader or the override parser fail with anything but a UserError."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from tunebench.errors import UserError
from tunebench.methods import METHODS
from tunebench.recipe import SCHEMA, flatten, load_recipe, parse_override, to_yaml

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
RECIPES = [p for p in RECIPES if "suites" not in p.parts]


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.output_dir == f"runs/{path.stem}"


def test_overrides_are_typed_and_win():
    recipe = load_recipe(ROOT / "recipes/lora_r16.yaml", ["train.lr=1e-4", "method.targets=[attn, mlp]", "train.max_steps=7",
                                                          "data.max_length=128", "model.name=gpt2-medium"])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.method.targets == ["attn", "mlp"]
    assert recipe.train.max_steps == 7
    assert recipe.model.name == "gpt2-medium"
    assert recipe.train.epochs == 1  # a default filled in


def test_parse_override_reads_yaml_values():
    assert parse_override("train.max_steps=5") == ("train.max_steps", 5)
    assert parse_override("overwrite=true") == ("overwrite", True)
    assert parse_override("eval.tasks=wikitext2,lambada") == ("eval.tasks", "wikitext2,lambada")
    assert parse_override("model.name=a=b") == ("model.name", "a=b")
    assert parse_override("data.validation_file=") == ("data.validation_file", None)


def test_comma_list_becomes_a_list():
    recipe = load_recipe(ROOT / "recipes/full.yaml", ["eval.tasks=wikitext2,lambada"])
    assert recipe.eval.tasks == ["wikitext2", "lambada"]


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(ROOT / "recipes/prompt_tuning.yaml", ["train.seed=3"])
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(recipe))
    assert load_recipe(path) == recipe


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UserError, match="did you mean 'train.max_steps'"):
        load_recipe(ROOT / "recipes/full.yaml", ["train.max_step=3"])


def another_value(dotted: str, field: tuple):
    """A valid value of a schema key that is not its default."""
    default, kind, allowed = field
    if dotted == "train.trackers":
        return ["tensorboard"]
    special = {"method.init": "pissa", "method.loraplus_lr_ratio": 16.0}  # checked beyond their type
    if dotted in special:
        return special[dotted]
    if isinstance(allowed, tuple):
        return next(v for v in allowed if v != default)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return 0.25 if default != 0.25 else 0.5
    if kind is list:
        return ["attn"] if default == ["attn", "mlp"] else ["attn", "mlp"]
    return "set-by-test"


def as_override(dotted: str, value) -> str:
    text = f"[{', '.join(value)}]" if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{dotted}={text}"


def schema_keys(schema, prefix=""):
    for key, value in schema.items():
        if isinstance(value, dict):
            yield from schema_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_schema_key_is_settable():
    """Each key of the schema, set alone by an override to a value other than its default, comes back
    with that value, and nothing else in the resolved recipe changes (method keys under their method)."""
    required = ["name=base", "output_dir=runs/base", "model.name=some-model", "data.dataset=some-data"]
    settings = [(key, field, []) for key, field in schema_keys({k: v for k, v in SCHEMA.items() if k != "method"})]
    for method_type, method in METHODS.items():
        as_method = [f"method.type={method_type}"] + (["method.top_blocks=1"] if method_type == "partial" else [])
        assert load_recipe(None, required + as_method).method.type == method_type
        settings += [(f"method.{key}", field, as_method) for key, field in method.keys.items()]
    assert {key for key, _, _ in settings} == {key for key, _ in schema_keys(SCHEMA)} - {"method.type"}
    for dotted, field, as_method in settings:
        value = another_value(dotted, field)
        before = flatten(load_recipe(None, required + as_method))
        assert before[dotted] != value
        after = flatten(load_recipe(None, required + as_method + [as_override(dotted, value)]))
        assert after == {**before, dotted: value}, dotted


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)), max_leaves=8)
keys = st.sampled_from(["name", "model", "method", "data", "train", "eval", "task", "output_dir", "train.lr", "x"]) | st.text(max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, values, max_size=5))
def test_fuzz_recipe_documents(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_fuzz_overrides(overrides):
    try:
        load_recipe(ROOT / "recipes/full.yaml", overrides)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzz_raw_bytes(tmp_path, raw):
    path = tmp_path / "raw.yaml"
    path.write_bytes(raw)
    try:
        load_recipe(path)
    except UserError as e:
        assert str(e)
