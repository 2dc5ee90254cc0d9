"""Tokenization is batched and cached: a second build of the same data does not tokenize again."""
import subprocess
import sys

from conftest import ROOT

BUILD = """
import sys
from tunebench import data
from tunebench.models import load_tokenizer
from tunebench.recipe import load_recipe
recipe = load_recipe(None, sys.argv[1:])
train, val = data.build(recipe.data, load_tokenizer(recipe.model), 0)
print(len(train), len(val), train.num_tokens())
"""


def cache_files(cache):
    return sorted(p.name for p in cache.rglob("cache-*.arrow"))


def test_second_build_reads_the_tokenized_cache(assets, tmp_path):
    cache = tmp_path / "cache"
    overrides = ["name=x", f"model.name={assets / 'gpt2'}", f"data.dataset={assets / 'train.txt'}",
                 f"data.validation_file={assets / 'valid.txt'}", "data.max_length=64"]
    env = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-c", BUILD, *overrides], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    written = cache_files(cache)
    assert written, "the first build wrote no tokenized cache"
    second = subprocess.run([sys.executable, "-c", BUILD, *overrides], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout  # the same blocks
    assert cache_files(cache) == written  # nothing tokenized (written) again
    assert "tokenizing" in first.stderr and "tokenizing" not in second.stderr
