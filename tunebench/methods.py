"""Fine-tuning methods: one entry per method in METHODS, holding everything tunebench knows about it.

full           every parameter trains.
lora           low-rank adapters (peft) on target modules named by group or by name.
partial        only chosen parts train: the top N blocks (with the final norm), lm_head, norms.
prompt_tuning  a soft prompt of N virtual tokens (peft); the model stays frozen.
prefix_tuning  trained keys and values of N virtual tokens at every layer (peft); the model stays frozen.
ia3            learned vectors that rescale the attention's keys and values and the MLP's inputs (peft).
vera           one frozen random pair of low-rank matrices shared by all layers, trained scaling vectors (peft).
adalora        LoRA in SVD form whose ranks are pruned to a budget during training (peft).
qlora          LoRA on a base model held in 4-bit NF4 (bitsandbytes), prepared as peft recommends.

LoRA's options (keys of lora and qlora): dora (weight-decomposed LoRA), rslora (scale alpha/sqrt(r)),
init (pissa / pissa_niter_K: principal singular vectors; the final adapter is converted to a plain
LoRA of rank 2r on the unchanged base) and loraplus_lr_ratio (LoRA+: the B matrices train at lr x ratio).

An entry (Method) gives the method's recipe keys (read by recipe.py's SCHEMA and validation), its
checks of a resolved recipe, how it wraps the model (apply_method, used by train.py and plan.py),
the context positions it takes (check_context) and what the memory plan changes before it
builds the model on fake tensors (plan.py). Adding a method is one entry here, one recipe and one
row of tests/test_train.py's METHODS. Methods may share a key (lora and qlora share all of LoRA's);
a shared key has one type and check, and each method its own default. torch and peft are imported where used, so that recipe.py
can read the entries without them.

Settings arrive typed and are read as attributes: `method` below is a recipe's method section (a
recipe.MethodSettings of that method's class: method.r, method.targets), `recipe` a resolved
recipe.Recipe (recipe.train.max_steps), `model_cfg` its model section (recipe.ModelSettings). recipe.py
builds those classes from the entries here, so this module names them without importing them.

A classifier's head is new, so it trains with every method: peft's SEQ_CLS task keeps it in
modules_to_save (trained and saved with the adapter), and partial always unfreezes it.
"""
import re
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
    process an empty placeholder and the full size in ds_numel; and a 4-bit weight, packed two to a
    byte, by the shape it stands for)."""
    def numel(p):
        quant_state = getattr(p, "quant_state", None)
        return quant_state.shape.numel() if quant_state is not None else getattr(p, "ds_numel", p.numel())

    sizes = [(numel(p), p.requires_grad) for p in unique_params(model)]
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


def _train_everything(model, method, tokenizer, task_type, total_steps=None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora_config(model, method, task_type):
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=resolve_targets(model, method.targets),
        fan_in_fan_out=_is_conv1d_model(model),
        bias="none",
        use_dora=method.dora,
        use_rslora=method.rslora,
        init_lora_weights=True if method.init == "default" else method.init,
    )


def _add_lora(model, method, tokenizer, task_type, total_steps=None):
    from peft import get_peft_model

    peft_model = get_peft_model(model, _lora_config(model, method, task_type))
    if method.init.startswith("pissa"):
        _keep_initial_adapter(peft_model)
    return peft_model


def _keep_initial_adapter(peft_model) -> None:
    """PiSSA moves the principal part of each weight into the adapter and leaves the residual in the
    base. To give final/ as a plain LoRA on the unchanged base, peft needs the adapter as initialised:
    it is kept in a temporary folder (re-created the same on resume: the init is seeded) and named in
    peft_model.initial_adapter_dir, which save_final hands to save_pretrained."""
    import atexit
    import shutil
    import tempfile

    parent = tempfile.mkdtemp(prefix="tunebench-")
    atexit.register(shutil.rmtree, parent, True)
    folder = f"{parent}/pissa_initial"  # peft loads it as an adapter named so: a name with '-' fails there
    peft_model.save_pretrained(folder)
    peft_model.initial_adapter_dir = folder


def _is_conv1d_model(model) -> bool:
    """GPT-2 style models store their linear layers as transformers' Conv1D (weights transposed)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _add_quantized_lora(model, method, tokenizer, task_type, total_steps=None):
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # the memory plan's meta model is not quantized
        # Casts the remaining float16/bfloat16 weights (norms, embeddings) to float32 and makes the
        # inputs require gradients; train.py enables gradient checkpointing itself.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _add_lora(model, method, tokenizer, task_type)


def _add_ia3(model, method, tokenizer, task_type, total_steps=None):
    from peft import IA3Config, get_peft_model

    targets = resolve_targets(model, method.targets)
    # The MLP's layers are IA3's feed-forward modules: their inputs are rescaled, not their outputs.
    mlp = TARGET_GROUPS.get(model.config.model_type, {}).get("mlp", [])
    config = IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=[t for t in targets if t in mlp],
                       fan_in_fan_out=_is_conv1d_model(model))
    return get_peft_model(model, config)


def _add_vera(model, method, tokenizer, task_type, total_steps=None):
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(task_type=task_type, r=method.r, target_modules=resolve_targets(model, method.targets),
                        vera_dropout=method.dropout, d_initial=method.d_initial,
                        fan_in_fan_out=_is_conv1d_model(model), save_projection=True)
    return get_peft_model(model, config)


def _add_prefix(model, method, tokenizer, task_type, total_steps=None):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)
    return get_peft_model(model, config)


def _add_adalora(model, method, tokenizer, task_type, total_steps=None):
    from peft import AdaLoraConfig, get_peft_model

    if total_steps is None:
        total_steps = method.tinit + method.tfinal + 1  # the memory plan: sizes do not depend on it
    _check_adalora_schedule(method, total_steps)
    config = AdaLoraConfig(
        task_type=task_type, init_r=method.init_r, target_r=method.target_r, lora_alpha=method.alpha,
        lora_dropout=method.dropout, target_modules=resolve_targets(model, method.targets),
        tinit=method.tinit, tfinal=method.tfinal, deltaT=method.delta_t, beta1=method.beta1,
        beta2=method.beta2, orth_reg_weight=method.orth_reg_weight, total_step=total_steps,
        fan_in_fan_out=_is_conv1d_model(model),
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if ".ranknum." in name:  # a constant (the rank); peft leaves it trainable when built on the meta device
            p.requires_grad_(False)
    return peft_model


def _check_adalora_schedule(method, total_steps: int) -> None:
    if method.tinit + method.tfinal >= total_steps:
        raise UserError(
            f"method.tinit ({method.tinit}) + method.tfinal ({method.tfinal}) must be fewer than the run's "
            f"{total_steps} optimizer steps (AdaLoRA prunes ranks in between); lower them or train longer"
        )


def _unfreeze_parts(model, method, tokenizer, task_type, total_steps=None):
    from tunebench.models import classification_head, is_classifier

    for p in model.parameters():
        p.requires_grad_(False)
    blocks, final_norm = _blocks(model)
    n = method.top_blocks
    if n > len(blocks):
        raise UserError(f"method.top_blocks is {n} but the model has {len(blocks)} blocks")
    if n:
        for block in list(blocks)[-n:]:
            block.requires_grad_(True)
        if final_norm is not None:
            final_norm.requires_grad_(True)
    if method.lm_head:
        model.get_output_embeddings().requires_grad_(True)  # tied models train the shared embedding
    if method.layer_norms:
        for module in model.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    if is_classifier(model):
        classification_head(model).requires_grad_(True)
    return model


def _add_soft_prompt(model, method, tokenizer, task_type, total_steps=None):
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from tunebench.models import is_classifier

    n = method.num_virtual_tokens
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, config)
    if is_classifier(model):
        pool_last_real_token(peft_model)
    if method.init_text:
        if tokenizer is None:
            raise ValueError("prompt tuning from a text needs the tokenizer")
        ids = tokenizer(method.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("method.init_text is empty after tokenization; give some words or leave it null")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat or cut the text to N tokens
        with torch.no_grad():
            word_embeddings = model.get_input_embeddings().weight
            peft_model.prompt_encoder["default"].embedding.weight.copy_(word_embeddings[torch.tensor(ids)])
    return peft_model


PISSA_INIT = re.compile(r"pissa(_niter_[1-9][0-9]*)?")
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")


def _check_lora(recipe) -> None:
    method = recipe.method
    if not method.targets:
        raise UserError("recipe key 'method.targets' is empty; name groups (attn, attn_proj, mlp, lm_head) or modules")
    if method.init not in LORA_INITS[:2] + ("olora",) and not PISSA_INIT.fullmatch(method.init):
        raise UserError(f"recipe key 'method.init' is {method.init!r}; choose one of {', '.join(LORA_INITS)} "
                        "(K: power iterations of the fast SVD, e.g. pissa_niter_4)")
    ratio = method.loraplus_lr_ratio
    if ratio is not None and ratio < 1:
        raise UserError(f"recipe key 'method.loraplus_lr_ratio' is {ratio}; LoRA+ trains B faster than A: "
                        "give 1 or more (the paper uses 16), or null for plain LoRA")
    if method.dora and method.init.startswith("pissa"):
        raise UserError("method.dora and method.init pissa do not combine: peft cannot convert a PiSSA-initialised "
                        "DoRA adapter back to the unchanged base; choose one")


def _check_lora_on_model(config, method) -> None:
    if method.init == "olora" and config.model_type == "gpt2":
        raise UserError("method.init olora gives wrong shapes on GPT-2's Conv1D layers (peft's OLoRA assumes "
                        "nn.Linear); use init pissa or default on this model, or olora on a Llama-style model")


def _check_qlora_on_model(config, method) -> None:
    _check_lora_on_model(config, method)
    check_4bit_support()


def check_4bit_support() -> None:
    """QLoRA needs bitsandbytes and its 4-bit kernels on this machine: quantize a small tensor to find out."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnb_functional

        weights = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)  # no random numbers drawn
        packed, state = bnb_functional.quantize_4bit(weights, quant_type="nf4")
        if not (bnb_functional.dequantize_4bit(packed, state) - weights).abs().max() < 0.2:
            raise ValueError("4-bit round trip is wrong")
    except Exception as e:  # noqa: BLE001 - a missing package, library or kernel alike
        raise UserError(f"method.type qlora needs bitsandbytes' 4-bit NF4 support on {device}, which is missing here "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                        "install a bitsandbytes with 4-bit kernels for this device (0.50 has them for CUDA and CPU) or use method.type lora") from None


def _check_partial(recipe) -> None:
    method = recipe.method
    if recipe.task == "classification":
        if method.lm_head:
            raise UserError(
                "method.lm_head applies to task causal_lm; with task classification the classification head always trains"
            )
        return  # a classifier's partial may train its head alone
    if not (method.top_blocks or method.lm_head or method.layer_norms):
        raise UserError("method.type partial trains nothing; set method.top_blocks, method.lm_head or method.layer_norms")


def _check_ia3(recipe) -> None:
    if not recipe.method.targets:
        raise UserError("recipe key 'method.targets' is empty; name groups (attn, attn_proj, mlp) or modules")


def _check_adalora(recipe) -> None:
    method = recipe.method
    _check_ia3(recipe)
    if method.target_r > method.init_r:
        raise UserError(f"method.target_r ({method.target_r}) is above method.init_r ({method.init_r}); "
                        "AdaLoRA prunes ranks from init_r down to target_r")
    for key in ("beta1", "beta2"):
        if not 0 < getattr(method, key) < 1:
            raise UserError(f"recipe key 'method.{key}' is {getattr(method, key)}; give a number strictly between 0 and 1")
    if recipe.train.max_steps:
        _check_adalora_schedule(method, recipe.train.max_steps)


def _check_prefix_on_model(config, method) -> None:
    if config.model_type not in TARGET_GROUPS:
        raise UserError(f"method.type prefix_tuning hands each layer a cache of past keys and values, which "
                        f"tunebench has checked on {', '.join(sorted(TARGET_GROUPS))}, not on '{config.model_type}'; "
                        "use prompt_tuning or lora on this model")


# ---- what a method adds to training: AdaLoRA's rank allocation and orthogonality term -------------

def _adalora_allocate(model, step: int) -> None:
    """After each optimizer step, before the gradients are cleared: AdaLoRA scores each rank's
    importance from the gradients and prunes to the step's budget (peft's update_and_allocate)."""
    model.base_model.update_and_allocate(step)


def _adalora_orthogonality(model):
    """AdaLoRA's orthogonality term, weight x the mean over its A and B matrices of ||P P^T - I||_F
    (A) and ||P^T P - I||_F (B), as peft's AdaLoraModel adds it to outputs.loss (train.py computes
    its own loss, so peft's addition does not happen by itself)."""
    import torch

    config = model.peft_config[model.active_adapter]
    norms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = p @ p.T if ".lora_A." in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    return config.orth_reg_weight * torch.stack(norms).mean()


def _adalora_state(model) -> dict:
    """What AdaLoRA keeps outside the weights, as tensors: the importance averages and the rank pattern."""
    import torch

    allocator, config = model.base_model.rankallocator, model.peft_config[model.active_adapter]
    state = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        state.update({f"{kind}/{name}": t for name, t in getattr(allocator, kind).items()})
    for name, kept in (config.rank_pattern or {}).items():
        state[f"rank_pattern/{name}"] = torch.as_tensor(kept, dtype=torch.bool)
    return state


def _adalora_load_state(model, state: dict) -> None:
    allocator, config = model.base_model.rankallocator, model.peft_config[model.active_adapter]
    allocator.reset_ipt()
    pattern = {}
    for key, t in state.items():
        kind, name = key.split("/", 1)
        if kind == "rank_pattern":
            pattern[name] = t.tolist()
        else:
            getattr(allocator, kind)[name] = t
    config.rank_pattern = pattern or None


# ---- labels ----------------------------------------------------------------------------------------

def _lora_label(method, name: str = "LoRA") -> str:
    parts = [f"{name} r{method.r}"]
    if method.targets != ["attn"]:
        parts[0] += f" ({', '.join(method.targets)})"
    if method.dora:
        parts.append("DoRA")
    if method.rslora:
        parts.append("rsLoRA")
    if method.init.startswith("pissa"):
        parts.append("PiSSA")
    elif method.init != "default":
        parts.append(f"{method.init} init")
    if method.loraplus_lr_ratio:
        parts.append(f"LoRA+ x{method.loraplus_lr_ratio:g}")
    return " + ".join(parts)


def _partial_label(method) -> str:
    parts = [f"top {method.top_blocks} blocks"] if method.top_blocks else []
    parts += [name for name in ("lm_head", "layer_norms") if getattr(method, name)]
    return f"Partial ({', '.join(parts) or 'head'})"


# ---- one entry per method ------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """Everything tunebench knows about one method.type."""
    # method.* recipe keys: name -> (default, type, allowed values or a check), as in recipe.SCHEMA.
    keys: dict
    # (model, method section, tokenizer or None, peft TaskType, total optimizer steps or None) -> the
    # model to train, with only what the method trains left requiring gradients.
    wrap: Callable
    # (method section) -> the label reports show, e.g. "LoRA r16 + DoRA".
    label: Callable
    # (resolved recipe) -> None; a UserError for a setting the method cannot train.
    check: Callable = lambda recipe: None
    # (model config, method section) -> None; a UserError for a model the method cannot train.
    check_model: Callable = lambda config, method: None
    # (method section) -> the context positions the method takes before the text (a soft prompt's).
    context_tokens: Callable = lambda method: 0
    # Keys the memory plan replaces before it builds the model on fake tensors (values that need
    # real weights and do not change any size).
    plan_keys: dict = field(default_factory=dict)
    # (method section) -> the base model's bits per quantized weight, or None: loaded as it is.
    base_bits: Callable = lambda method: None
    # Called with (peft model, optimizer steps done) after each optimizer step, before the
    # gradients are cleared; None: nothing.
    after_optimizer_step: Callable = None
    # (peft model) -> a term added to the training loss (and to the logged training loss); None: nothing.
    loss_term: Callable = None
    # (peft model) -> tensors a checkpoint must hold besides the weights, and the way back.
    extra_state: Callable = None
    load_extra_state: Callable = None


LORA_KEYS = {
    "r": (16, int, "positive"),
    "alpha": (32.0, float, "positive"),
    "dropout": (0.0, float, "fraction"),
    "targets": (["attn"], list, None),
    "dora": (False, bool, None),
    "rslora": (False, bool, None),
    "init": ("default", str, None),
    "loraplus_lr_ratio": (None, float, "positive"),
}

METHODS = {
    "full": Method(keys={}, wrap=_train_everything, label=lambda method: "Full fine-tuning"),
    "lora": Method(
        keys=LORA_KEYS,
        wrap=_add_lora,
        label=_lora_label,
        check=_check_lora,
        check_model=_check_lora_on_model,
        plan_keys={"init": "default"},  # PiSSA's SVD needs real weights; the shapes are LoRA's
    ),
    "qlora": Method(
        keys={**LORA_KEYS, "quant_type": ("nf4", str, ("nf4", "fp4")), "double_quant": (True, bool, None)},
        wrap=_add_quantized_lora,
        label=lambda method: _lora_label(method, "QLoRA") + f" (4-bit {method.quant_type.upper()})",
        check=_check_lora,
        check_model=_check_qlora_on_model,
        plan_keys={"init": "default"},
        base_bits=lambda method: 4,
    ),
    "partial": Method(
        keys={
            "top_blocks": (0, int, "non-negative"),
            "lm_head": (False, bool, None),
            "layer_norms": (False, bool, None),
        },
        wrap=_unfreeze_parts,
        label=_partial_label,
        check=_check_partial,
    ),
    "prompt_tuning": Method(
        keys={
            "num_virtual_tokens": (20, int, "positive"),
            "init_text": (None, str, None),
        },
        wrap=_add_soft_prompt,
        label=lambda method: f"Prompt tuning {method.num_virtual_tokens} tokens",
        context_tokens=lambda method: method.num_virtual_tokens,
        plan_keys={"init_text": None},  # the soft prompt's size does not depend on its first values
    ),
    "prefix_tuning": Method(
        keys={"num_virtual_tokens": (20, int, "positive")},
        wrap=_add_prefix,
        label=lambda method: f"Prefix tuning {method.num_virtual_tokens} tokens",
        check_model=_check_prefix_on_model,
        context_tokens=lambda method: method.num_virtual_tokens,  # the text's positions start after the prefix
    ),
    "ia3": Method(
        keys={"targets": (["attn", "mlp"], list, None)},
        wrap=_add_ia3,
        label=lambda method: f"IA3 ({', '.join(method.targets)})",
        check=_check_ia3,
    ),
    "vera": Method(
        keys={
            "r": (256, int, "positive"),
            "targets": (["attn", "mlp"], list, None),
            "dropout": (0.0, float, "fraction"),
            "d_initial": (0.1, float, "positive"),
        },
        wrap=_add_vera,
        label=lambda method: f"VeRA r{method.r}",
        check=_check_ia3,
    ),
    "adalora": Method(
        keys={
            "init_r": (12, int, "positive"),
            "target_r": (8, int, "positive"),
            "alpha": (32.0, float, "positive"),
            "dropout": (0.0, float, "fraction"),
            "targets": (["attn"], list, None),
            "tinit": (0, int, "non-negative"),
            "tfinal": (0, int, "non-negative"),
            "delta_t": (1, int, "positive"),
            "beta1": (0.85, float, "fraction"),
            "beta2": (0.85, float, "fraction"),
            "orth_reg_weight": (0.5, float, "non-negative"),
        },
        wrap=_add_adalora,
        label=lambda method: f"AdaLoRA r{method.init_r}->{method.target_r}",
        check=_check_adalora,
        after_optimizer_step=_adalora_allocate,
        loss_term=_adalora_orthogonality,
        extra_state=_adalora_state,
        load_extra_state=_adalora_load_state,
    ),
}


def label(method) -> str:
    """The method and its key settings, as reports show it: "LoRA r16 + DoRA", "IA3 (attn, mlp)"."""
    return METHODS[method.type].label(method)


def check_model(config, method) -> None:
    """Refuse, before anything is written, a model the method cannot train."""
    METHODS[method.type].check_model(config, method)


def apply_method(model, method, tokenizer=None, total_steps=None):
    """Freeze, wrap or leave the model as the method says. Returns the model to train. total_steps:
    the run's optimizer steps (AdaLoRA's schedule needs them)."""
    from peft import TaskType

    from tunebench.models import is_classifier

    if method.type not in METHODS:
        raise UserError(f"unknown method.type '{method.type}'")
    task_type = TaskType.SEQ_CLS if is_classifier(model) else TaskType.CAUSAL_LM
    return METHODS[method.type].wrap(model, method, tokenizer, task_type, total_steps)


def context_tokens(method) -> int:
    """Positions of the model's context the method takes before the text (a soft prompt's)."""
    return METHODS[method.type].context_tokens(method)


def quantization_kwargs(method, model_cfg) -> dict:
    """from_pretrained keywords that load the base quantized as the method says (QLoRA: 4-bit NF4 or
    FP4 weights, computed in the model's dtype, on this process's device); {} for other methods."""
    if METHODS[method.type].base_bits(method) != 4:
        return {}
    import torch
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    from tunebench.models import DTYPES

    dtype = DTYPES[model_cfg.dtype]
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                                bnb_4bit_use_double_quant=method.double_quant, bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": config, "device_map": {"": PartialState().device}}


def check_context(config, recipe) -> None:
    """Refuse a data.max_length (plus the positions the method takes: a soft prompt's virtual tokens)
    longer than the model's context."""
    from tunebench.models import context_length

    limit = context_length(config)
    max_length = recipe.data.max_length
    extra = context_tokens(recipe.method)
    if limit and max_length + extra > limit:
        room = f" minus {extra} virtual tokens" if extra else ""
        raise UserError(
            f"data.max_length {max_length} is longer than the model's context of {limit} positions{room}; "
            f"set data.max_length={limit - extra} or less"
        )


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
