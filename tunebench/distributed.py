"""How the training processes are set up: several processes on a CPU, and DeepSpeed ZeRO checks.

accelerate decides by itself what kind of run this is, and on a machine without a GPU it gets two
cases wrong silently: processes started by torchrun (or `accelerate launch` with a multi-GPU config)
each believe they are alone unless told they run on a CPU, and DeepSpeed's CPU accelerator joins a
gloo process group that accelerate then does not count. Both would train N copies of the same model
on the same data. accelerator_kwargs() tells accelerate what it cannot see. FSDP it cannot do at all
without a GPU: accelerate turns an FSDP config on a CPU into plain data parallel (every process holds
the whole model), silently, so that is refused.

The DeepSpeed JSON files leave batch size, accumulation and clipping "auto", for accelerate to fill
from the recipe. A number there that disagrees with the recipe would quietly win over it (and an
optimizer offload would replace an 8-bit optimizer with DeepSpeed's own CPU Adam), so
check_deepspeed() refuses those with one line instead.
"""
import os
from pathlib import Path

import torch

from tunebench.errors import UserError
from tunebench.recipe import TrainSettings

# The accelerate config keys that accelerate refuses beside a deepspeed_config_file (they belong in the JSON).
_JSON_ONLY_FIELDS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                     "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                     "zero3_save_16bit_model", "mixed_precision")
OPTIMIZERS_DEEPSPEED_REPLACES = ("adamw_8bit", "paged_adamw_8bit", "sgd")


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def using_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


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
    if using_fsdp():
        raise UserError(
            "FSDP needs GPUs: without one accelerate would train every process on the whole model, unsharded; "
            "on a CPU shard with accelerate_configs/deepspeed_zero3.yaml (DeepSpeed's CPU accelerator) instead"
        )
    if using_deepspeed():
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def under_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.value == "FSDP"


def why_no_fused_loss(accelerator) -> str | None:
    """Why the fused loss cannot run under this setup: FSDP shards the output layer's weight, which the
    fused loss reads outside the layer's forward (ZeRO-3 is found on the model itself); None if it can."""
    if under_fsdp(accelerator):
        return "FSDP shards the output layer's weight across processes"
    return None


def _number(value):
    return None if value in (None, "auto") else value


def check_deepspeed(ds_config: dict, train: TrainSettings, num_processes: int) -> None:
    """Refuse DeepSpeed settings that would silently override the recipe; fill clipping from it.

    ds_config is the DeepSpeed plugin's config dict before accelerator.prepare() (changed in place)."""
    wanted = {
        "train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
        "train_batch_size": (train.micro_batch_size * train.grad_accum * num_processes,
                             "train.micro_batch_size x train.grad_accum x processes"),
        "gradient_clipping": (train.max_grad_norm, "train.max_grad_norm"),
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
    if offload not in (None, "none") and train.optimizer in OPTIMIZERS_DEEPSPEED_REPLACES \
            and ds_config.get("zero_force_ds_cpu_optimizer", True):
        raise UserError(
            f"train.optimizer {train.optimizer} cannot run with DeepSpeed's optimizer offload (offload_optimizer "
            f"device {offload}): DeepSpeed would replace it with its own CPU Adam; use train.optimizer=adamw "
            "with this config, or a config without optimizer offload (e.g. accelerate_configs/deepspeed_zero3.yaml)"
        )
    # accelerate fills an "auto" gradient_clipping with 1.0, whatever the recipe says; DeepSpeed clips by it.
    ds_config["gradient_clipping"] = train.max_grad_norm


# ---- threads per process ---------------------------------------------------------------------------
# Launchers that set OMP_NUM_THREADS for the processes they start when the user's environment has
# none: accelerate launch (1 unless its config says use_cpu), torchrun (1 with several processes),
# DeepSpeed's launcher (only with --bind_cores_to_rank). Each reads its own environment to decide, so
# the trace is the launcher's environment as it was started (/proc/PID/environ, which later changes
# made inside the launcher do not alter). Launcher arguments that set the count on purpose:
_LAUNCHERS = {"accelerate launch": ("--num_cpu_threads_per_process",), "torchrun": (), "deepspeed": ("--bind_cores_to_rank",)}
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _launcher(pid: int):
    """(launcher name, its command line, its starting environment) of process pid, or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or not allowed to read it
        return None
    line = " ".join(argv)
    name = ("accelerate launch" if "accelerate" in line and "launch" in argv[1:] or "accelerate.commands.launch" in line
            else "torchrun" if "torchrun" in line or "torch.distributed.run" in line or "torch.distributed.launch" in line
            else "deepspeed" if "deepspeed.launcher" in line else None)
    if name is None:
        return None
    return name, argv, {kv.split("=", 1)[0]: kv.split("=", 1)[1] for kv in environ if "=" in kv}


def _cores() -> int:
    import psutil

    return max(1, min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, len(os.sched_getaffinity(0))))


def use_every_core() -> dict:
    """Set this process's CPU threads: cores / local processes where a launcher chose the count by
    default (or nobody chose it and several processes share the machine); a count the user set
    (OMP_NUM_THREADS in their environment, or a launcher argument) is kept. Call at start-up.
    Returns {"threads_per_process", "threads_set_by"} for summary.json's hardware."""
    local = next((int(os.environ[v]) for v in _LOCAL_SIZE_VARS if os.environ.get(v, "").isdigit()), 1)
    given = os.environ.get("OMP_NUM_THREADS")
    launcher = _launcher(os.getppid())
    by_default = given is None and local > 1
    if given is not None and launcher is not None:
        name, argv, start_env = launcher
        chosen_by_argument = any(a.split("=")[0] in _LAUNCHERS[name] for a in argv)
        by_default = "OMP_NUM_THREADS" not in start_env and not chosen_by_argument
    if by_default:
        threads = max(1, _cores() // local)
        why = (f"{_cores()} cores / {local} local process{'es' if local > 1 else ''}"
               + (f"; OMP_NUM_THREADS={given} was {launcher[0]}'s default" if given is not None else ""))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything this process starts
        torch.set_num_threads(threads)
    else:
        why = "OMP_NUM_THREADS set by the user" if given is not None else "PyTorch's default (one process)"
    return {"threads_per_process": torch.get_num_threads(), "threads_set_by": why}
