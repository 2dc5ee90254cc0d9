"""Fine-tuning methods: one entry per method in METHODS, holding everything tunebench knows about it.

full           every parameter trains.
lora           low-rank adapters (peft) on target modules named by group or by name.
partial        only chosen parts train: the top N blocks (with the final norm), lm_head, norms.
prompt_tuning  a soft prompt of N virtual tokens (peft); the model stays frozen.

An entry (Method) gives the method's recipe keys (read by recipe.py's SCHEMA and validation), its
checks of a resolved recipe, how it wraps the model (apply_method, used by train.py and plan.py),
the context positions it takes (models.check_context) and what the memory plan changes before it
builds the model on fake tensors (plan.py). Adding a method is one entry here, one recipe and one
row of tests/test_train.py's METHODS. torch and peft are imported where used, so that recipe.py
can read the entries without them.

A classifier's head is new, so it trains with every method: peft's SEQ_CLS task keeps it in
modules_to_save (trained and saved with the adapter), and partial always unfreezes it.
"""
from dataclasses import dataclass, field
from typing import Callable

from tunebench.errors import UserError

# Target groups per architecture (config.model_type). Names are module-name suffixes, matched on
# whole dotted parts: GPT-2's "attn.c_proj" is the attention output, "mlp.c_proj" the MLP's.
_LLAMA_STYLE = {
    "attn": ["q_proj", "k_proj", "v_proj"],
    "attn_proj": ["o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "lm_head": ["lm_head"],
}
TARGET_GROUPS = {
    "gpt2": {"attn": ["attn.c_attn"], "attn_proj": ["attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"], "lm_head": ["lm_head"]},
    "gpt_neox": {
        "attn": ["query_key_value"],
        "attn_proj": ["attention.dense"],
        "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
        "lm_head": ["embed_out"],
    },
    "opt": {"attn": ["q_proj", "k_proj", "v_proj"], "attn_proj": ["out_proj"], "mlp": ["fc1", "fc2"], "lm_head": ["lm_head"]},
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "phi3": {"attn": ["qkv_proj"], "attn_proj": ["o_proj"], "mlp": ["gate_up_proj", "down_proj"], "lm_head": ["lm_head"]},
}
GROUPS = ("attn", "attn_proj", "mlp", "lm_head")


def unique_params(model):
    """Each parameter once, even when shared (GPT-2 ties lm_head to the input embedding)."""
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def count_params(model) -> tuple:
    """(trainable, total), counting tied parameters once (and whole under ZeRO-3, which leaves each
    process an empty placeholder and the full size in ds_numel)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in unique_params(model)]
    return sum(n for n, trained in sizes if trained), sum(n for n, _ in sizes)


def _matches(module_name: str, suffix: str) -> bool:
    return module_name == suffix or module_name.endswith("." + suffix)


def resolve_targets(model, targets: list) -> list:
    """Groups and module names -> the module-name suffixes to adapt; each must match a module."""
    import torch

    model_type = model.config.model_type
    names = [n for n, _ in model.named_modules()]
    resolved = []
    for target in targets:
        if target in GROUPS:
            if model_type not in TARGET_GROUPS:
                raise UserError(
                    f"LoRA target group '{target}' is not defined for model type '{model_type}'; "
                    f"name modules instead (e.g. method.targets=[{', '.join(sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})[:4])}])"
                )
            suffixes = TARGET_GROUPS[model_type][target]
        else:
            suffixes = [target]
        for suffix in suffixes:
            if not any(_matches(n, suffix) for n in names):
                raise UserError(
                    f"LoRA target '{target}' matches no module of this {model_type} model (looked for '{suffix}'); "
                    f"use a group ({', '.join(GROUPS)}) or an existing module name"
                )
            if suffix not in resolved:
                resolved.append(suffix)
    return resolved


def _blocks(model):
    """The model's list of transformer blocks and its final norm (or None)."""
    import torch

    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    blocks = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            blocks = module
            break
    if blocks is None:
        raise UserError(f"cannot find the transformer blocks of model type '{model.config.model_type}' for method partial")
    in_blocks = {id(m) for m in blocks.modules()}
    outer_norms = [m for m in model.modules() if _is_norm(m) and id(m) not in in_blocks]
    final_norm = outer_norms[-1] if outer_norms else None
    return blocks, final_norm


def _is_norm(module) -> bool:
    import torch

    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _train_everything(model, method: dict, tokenizer, task_type):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _add_lora(model, method: dict, tokenizer, task_type):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task_type,
        r=method["r"],
        lora_alpha=method["alpha"],
        lora_dropout=method["dropout"],
        target_modules=resolve_targets(model, method["targets"]),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )
    return get_peft_model(model, config)


def _unfreeze_parts(model, method: dict, tokenizer, task_type):
    from tunebench.models import classification_head, is_classifier

    for p in model.parameters():
        p.requires_grad_(False)
    blocks, final_norm = _blocks(model)
    n = method["top_blocks"]
    if n > len(blocks):
        raise UserError(f"method.top_blocks is {n} but the model has {len(blocks)} blocks")
    if n:
        for block in list(blocks)[-n:]:
            block.requires_grad_(True)
        if final_norm is not None:
            final_norm.requires_grad_(True)
    if method["lm_head"]:
        model.get_output_embeddings().requires_grad_(True)  # tied models train the shared embedding
    if method["layer_norms"]:
        for module in model.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    if is_classifier(model):
        classification_head(model).requires_grad_(True)
    return model


def _add_soft_prompt(model, method: dict, tokenizer, task_type):
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from tunebench.models import is_classifier

    n = method["num_virtual_tokens"]
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, config)
    if is_classifier(model):
        pool_last_real_token(peft_model)
    if method["init_text"]:
        if tokenizer is None:
            raise ValueError("prompt tuning from a text needs the tokenizer")
        ids = tokenizer(method["init_text"], add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("method.init_text is empty after tokenization; give some words or leave it null")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat or cut the text to N tokens
        with torch.no_grad():
            word_embeddings = model.get_input_embeddings().weight
            peft_model.prompt_encoder["default"].embedding.weight.copy_(word_embeddings[torch.tensor(ids)])
    return peft_model


def _check_lora(recipe: dict) -> None:
    if not recipe["method"]["targets"]:
        raise UserError("recipe key 'method.targets' is empty; name groups (attn, attn_proj, mlp, lm_head) or modules")


def _check_partial(recipe: dict) -> None:
    method = recipe["method"]
    if recipe["task"] == "classification":
        if method["lm_head"]:
            raise UserError(
                "method.lm_head applies to task causal_lm; with task classification the classification head always trains"
            )
        return  # a classifier's partial may train its head alone
    if not (method["top_blocks"] or method["lm_head"] or method["layer_norms"]):
        raise UserError("method.type partial trains nothing; set method.top_blocks, method.lm_head or method.layer_norms")


# ---- one entry per method ------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """Everything tunebench knows about one method.type."""
    # method.* recipe keys: name -> (default, type, allowed values or a check), as in recipe.SCHEMA.
    keys: dict
    # (model, method section, tokenizer or None, peft TaskType) -> the model to train, with only
    # what the method trains left requiring gradients.
    wrap: Callable
    # (resolved recipe) -> None; a UserError for a setting the method cannot train.
    check: Callable = lambda recipe: None
    # (method section) -> the context positions the method takes before the text (a soft prompt's).
    context_tokens: Callable = lambda method: 0
    # Keys the memory plan replaces before it builds the model on fake tensors (values that need
    # real weights and do not change any size).
    plan_keys: dict = field(default_factory=dict)


METHODS = {
    "full": Method(keys={}, wrap=_train_everything),
    "lora": Method(
        keys={
            "r": (16, int, "positive"),
            "alpha": (32.0, float, "positive"),
            "dropout": (0.0, float, "fraction"),
            "targets": (["attn"], list, None),
        },
        wrap=_add_lora,
        check=_check_lora,
    ),
    "partial": Method(
        keys={
            "top_blocks": (0, int, "non-negative"),
            "lm_head": (False, bool, None),
            "layer_norms": (False, bool, None),
        },
        wrap=_unfreeze_parts,
        check=_check_partial,
    ),
    "prompt_tuning": Method(
        keys={
            "num_virtual_tokens": (20, int, "positive"),
            "init_text": (None, str, None),
        },
        wrap=_add_soft_prompt,
        context_tokens=lambda method: method["num_virtual_tokens"],
        plan_keys={"init_text": None},  # the soft prompt's size does not depend on its first values
    ),
}


def apply_method(model, method: dict, tokenizer=None):
    """Freeze, wrap or leave the model as the method says. Returns the model to train."""
    from peft import TaskType

    from tunebench.models import is_classifier

    if method["type"] not in METHODS:
        raise UserError(f"unknown method.type '{method['type']}'")
    task_type = TaskType.SEQ_CLS if is_classifier(model) else TaskType.CAUSAL_LM
    return METHODS[method["type"]].wrap(model, method, tokenizer, task_type)


def context_tokens(method: dict) -> int:
    """Positions of the model's context the method takes before the text (a soft prompt's)."""
    return METHODS[method["type"]].context_tokens(method)


def pool_last_real_token(peft_model):
    """Make a prompt-tuned classifier read each row at its last real token.

    peft hands the classifier inputs_embeds (soft prompt + text), so GPT-2 cannot find the padding
    and reads the last position, a pad token on a shorter, right-padded row. Before the classifier
    runs, this moves each row's padding in front of its text (after the soft prompt) and sets
    position ids from the attention mask: every row is then read at its last real token, with the
    positions and attention it has without padding. Install it again after loading such a model."""
    import torch

    n = peft_model.peft_config[peft_model.active_adapter].num_virtual_tokens

    def left_align_padding(module, args, kwargs):
        if kwargs.get("attention_mask") is None:  # no padding in this batch
            return None
        mask = kwargs["attention_mask"].long()  # peft joins its float prompt mask to ours
        embeds = kwargs["inputs_embeds"]
        width = mask.shape[1] - n
        shift = width - mask[:, n:].sum(-1, keepdim=True)
        source = (torch.arange(width, device=mask.device)[None, :] - shift) % width
        text = embeds[:, n:].gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["inputs_embeds"] = torch.cat([embeds[:, :n], text], dim=1)
        kwargs["attention_mask"] = torch.cat([mask[:, :n], mask[:, n:].gather(1, source)], dim=1)
        kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    peft_model.base_model.register_forward_pre_hook(left_align_padding, with_kwargs=True)
