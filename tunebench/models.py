"""Load a causal LM (or, for classification, the same model with a sequence-classification head) and
its tokenizer from a hub id, a local folder or a .gguf file. `model_cfg` below is a recipe's model section
(recipe.ModelSettings: model_cfg.name, model_cfg.dtype); recipe.py sits above this module, which names
it without importing it."""
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tunebench import inputs
from tunebench.errors import UserError
from tunebench.quiet import no_model_file_bars

no_model_file_bars()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_source(name: str, gguf_file: str = None) -> tuple:
    """Return (hub id or folder, gguf file name or None) for model.name / model.gguf_file."""
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"model file '{name}' does not exist; give an existing .gguf file, a folder or a hub id")
        inputs.check_gguf(path)
        return str(path.parent), path.name
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path '{name}' is neither a folder nor a .gguf file")
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise UserError(f"model.gguf_file '{gguf_file}' is not in folder '{name}'")
            inputs.check_gguf(path / gguf_file)
        elif not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"model folder '{name}' has no config.json; save a model there with save_pretrained")
        return str(path), gguf_file
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder '{name}' does not exist")
    return name, gguf_file


def _hub_call(what: str, name: str, load, local: bool = False):
    """load(), its failure one line: a local folder or file is untrusted, so whatever its reader
    raises names it; for a hub id, an OSError means not cached and out of reach."""
    try:
        return load()
    except Exception as e:
        if local:
            raise UserError(f"{what} '{name}' cannot be loaded: {inputs.first_line(e)}") from None
        if not isinstance(e, OSError):
            raise
        if "does not appear to have a file" in str(e) or "is not a valid" in str(e):
            raise UserError(f"{what} '{name}' cannot be loaded: {str(e).splitlines()[0]}") from None
        raise UserError(
            f"{what} '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
            "run once with network access to cache it, or point model.name at a local folder or .gguf file "
            "(make demo runs fully offline)"
        ) from None


def is_local(source: str) -> bool:
    return Path(source).is_dir()


def _source(model_cfg) -> tuple:
    """(hub id or folder, from_pretrained keywords every load shares: revision, remote code, GGUF file)."""
    source, gguf = resolve_source(model_cfg.name, model_cfg.gguf_file)
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    return source, kwargs


def load_config(model_cfg):
    """The model's config; a local folder's files are checked first (config, shard index, whole weights
    files), so a damaged copy fails here, before any data is read."""
    source, kwargs = _source(model_cfg)
    if "gguf_file" not in kwargs and is_local(source):
        inputs.check_model_folder(source, model_cfg.name)
    return _hub_call("model", model_cfg.name, lambda: AutoConfig.from_pretrained(source, **kwargs), is_local(source))


def load_tokenizer(model_cfg):
    """The model's tokenizer. A model without a pad token (GPT-2) pads with its end-of-text token;
    nothing is added to the vocabulary, and padded positions are masked from every loss."""
    source, kwargs = _source(model_cfg)
    tokenizer = _hub_call("tokenizer", model_cfg.name, lambda: AutoTokenizer.from_pretrained(source, **kwargs),
                          is_local(source))
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer of '{model_cfg.name}' has no end-of-text token; tunebench needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg, label_names: list = None, pad_token_id: int = None, quantization: dict = None):
    """The causal LM; with label_names, the model with a new classification head of that many
    classes instead of its LM head. A classifier reads each row at its last token that is not
    pad_token_id (the id the collator pads with), so that id is set on its config. With a method
    that quantizes the base (qlora), quantization holds the from_pretrained keywords that load it
    so (methods.quantization_kwargs)."""
    source, kwargs = _source(model_cfg)
    kwargs.update(dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation)
    kwargs.update(quantization or {})
    auto = AutoModelForCausalLM
    if label_names:
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    model = _hub_call("model", model_cfg.name, lambda: auto.from_pretrained(source, **kwargs), is_local(source))
    if "gguf_file" in kwargs:
        # GGUF weights are de-quantized to plain tensors on load, yet the model stays marked as
        # quantized, which would make save_pretrained refuse it and PEFT treat it as k-bit.
        model.hf_quantizer.remove_quantization_config(model)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_adapter_config(folder):
    """The PEFT config of an adapter folder (a run's final/), its failure one line."""
    from peft import PeftConfig

    inputs.check_model_folder(folder, str(folder))
    return _hub_call("adapter", str(folder), lambda: PeftConfig.from_pretrained(str(folder)), local=True)


def load_adapter(model, folder):
    from peft import PeftModel

    return _hub_call("adapter", str(folder), lambda: PeftModel.from_pretrained(model, str(folder)), local=True)


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def classification_head(model):
    """The classification head module: "score" in GPT-2, Llama and most decoders."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise UserError(f"cannot find the classification head of {type(model).__name__}")


def context_length(config) -> int:
    """The longest sequence the model's position embeddings allow (None if unbounded)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them. Non-reentrant
    checkpointing (torch.utils.checkpoint, use_reentrant=False) gives gradients to parameters inside a
    block even when its inputs need none, so a frozen base model with LoRA or a soft prompt trains."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
