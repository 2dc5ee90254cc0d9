"""How the training processes are set up: several processes on a CPU, and DeepSpeed ZeRO checks.

accelerate decides by itself what kind of run this is, and on a machine without a GPU it gets two
cases wrong silently: processes started by torchrun (or `accelerate launch` with a multi-GPU config)
each believe they are alone unless told they run on a CPU, and DeepSpeed's CPU accelerator joins a
gloo process group that accelerate then does not count. Both would train N copies of the same model
on the same data. accelerator_kwargs() tells accelerate what it cannot see.

The DeepSpeed JSON files leave batch size, accumulation and clipping "auto", for accelerate to fill
from the recipe. A number there that disagrees with the recipe would quietly win over it (and an
optimizer offload would replace an 8-bit optimizer with DeepSpeed's own CPU Adam), so
check_deepspeed() refuses those with one line instead.
"""
import os

import torch

from tunebench.errors import UserError

# The accelerate config keys that accelerate refuses beside a deepspeed_config_file (they belong in the JSON).
_JSON_ONLY_FIELDS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                     "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                     "zero3_save_16bit_model", "mixed_precision")
OPTIMIZERS_DEEPSPEED_REPLACES = ("adamw_8bit", "paged_adamw_8bit", "sgd")


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs() -> dict:
    """Extra Accelerator() arguments so that every process started is counted, with or without a GPU."""
    from accelerate.utils import InitProcessGroupKwargs

    if using_deepspeed() and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        both = [f for f in os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f in _JSON_ONLY_FIELDS]
        if both:  # accelerate would stop with a ValueError and a traceback
            raise UserError(
                f"the accelerate config sets {', '.join(both)} beside deepspeed_config_file; remove it there and "
                "set it in the DeepSpeed JSON file (leave it \"auto\" there to follow the recipe)"
            )
    if torch.cuda.is_available():
        return {}
    if using_deepspeed():
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def _number(value):
    return None if value in (None, "auto") else value


def check_deepspeed(ds_config: dict, train: dict, num_processes: int) -> None:
    """Refuse DeepSpeed settings that would silently override the recipe; fill clipping from it.

    ds_config is the DeepSpeed plugin's config dict before accelerator.prepare() (changed in place)."""
    wanted = {
        "train_micro_batch_size_per_gpu": (train["micro_batch_size"], "train.micro_batch_size"),
        "gradient_accumulation_steps": (train["grad_accum"], "train.grad_accum"),
        "train_batch_size": (train["micro_batch_size"] * train["grad_accum"] * num_processes,
                             "train.micro_batch_size x train.grad_accum x processes"),
        "gradient_clipping": (train["max_grad_norm"], "train.max_grad_norm"),
    }
    for key, (value, recipe_key) in wanted.items():
        given = _number(ds_config.get(key))
        if given is not None and given != value:
            raise UserError(
                f"the DeepSpeed config sets {key}={given} but the recipe's {recipe_key} gives {value}; "
                f"set {key} to \"auto\" in the DeepSpeed config so that the recipe decides (or change the recipe)"
            )
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise UserError(
                f"the DeepSpeed config has an '{section}' section; remove it: the recipe's train.{section} "
                f"(and its settings) decide, and DeepSpeed wraps the {section} train.py builds"
            )
    offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and train["optimizer"] in OPTIMIZERS_DEEPSPEED_REPLACES \
            and ds_config.get("zero_force_ds_cpu_optimizer", True):
        raise UserError(
            f"train.optimizer {train['optimizer']} cannot run with DeepSpeed's optimizer offload (offload_optimizer "
            f"device {offload}): DeepSpeed would replace it with its own CPU Adam; use train.optimizer=adamw "
            "with this config, or a config without optimizer offload (e.g. accelerate_configs/deepspeed_zero3.yaml)"
        )
    # accelerate fills an "auto" gradient_clipping with 1.0, whatever the recipe says; DeepSpeed clips by it.
    ds_config["gradient_clipping"] = train["max_grad_norm"]
