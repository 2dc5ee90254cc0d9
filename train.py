"""Fine-tune a causal language model as a recipe says, and write a run directory.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py --recipe recipes/lora_r16.yaml [KEY=VALUE ...]
    python train.py --recipe recipes/lora_r16.yaml train.max_steps=50      (one process, same code path)

recipe -> model + method -> data -> training loop -> runs/NAME/{recipe.yaml, log.jsonl, checkpoints/, final/, summary.json}
The hardware (CPU, GPUs, DeepSpeed ZeRO, mixed precision) comes from the accelerate config only.

Read top to bottom: the arguments, the run's progress, the helpers of the loop (each a function of
what it is given), then main(), which sets up and runs the loop. torch and the Hugging Face
libraries are imported inside the functions that use them, so that bad input is answered at once.
"""
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tunebench import rundir
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.inputs import positive, positive_number


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                            usage_hint="train.py --recipe RECIPE.yaml [KEY=VALUE ...]")
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/lora_r16.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted recipe keys, e.g. train.max_steps=50 data.max_length=128")
    parser.add_argument("--stop-after-steps", type=positive, default=None, metavar="N",
                        help="save a checkpoint and stop after N optimizer steps (resume by running the same command)")
    parser.add_argument("--plan", action="store_true",
                        help="print the predicted peak memory of this run (per process) and train nothing")
    parser.add_argument("--budget-gb", type=positive_number, default=None, metavar="G",
                        help="with --plan: also list the cheapest settings whose predicted peak fits in G GB")
    parser.add_argument("--config-file", default=None, metavar="ACCEL",
                        help="with --plan: the accelerate config the run will use (default: one process on this machine)")
    return parser.parse_intermixed_args(argv)


# ---- the run's progress: what a checkpoint holds besides the tensors ------------------------------

METHOD_STATE_FILE = "method_state.safetensors"  # a method's own tensors besides the weights (AdaLoRA's)


@dataclass
class Progress:
    """Where a run stands. Saved with every checkpoint as checkpoints/step-N/trainer_state.json (with
    the scheduler and the loss since the last log line): these fields are that file's keys, so
    checkpoints written before stay resumable."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_train_loss: float | None = None
    initial_val_loss: float | None = None
    best_val_acc: float | None = None


class SinceLastLog:
    """The training loss and tokens of this process since the last log line, kept on the device."""

    def __init__(self, device):
        import torch

        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.loss_count = torch.zeros((), device=device, dtype=torch.long)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)

    def totals(self, accelerator) -> dict:
        """Summed over all processes: what a checkpoint carries, so that a resumed run writes the
        same next log line as an uninterrupted one."""
        return {
            "loss_sum": accelerator.reduce(self.loss_sum, "sum").item(),
            "loss_count": int(accelerator.reduce(self.loss_count, "sum").item()),
            "tokens": int(accelerator.reduce(self.tokens, "sum").item()),
        }

    def restore(self, totals: dict) -> None:
        self.loss_sum += totals["loss_sum"]
        self.loss_count += totals["loss_count"]
        self.tokens += totals["tokens"]

    def clear(self) -> None:
        self.loss_sum.zero_(), self.loss_count.zero_(), self.tokens.zero_()


def fail(message: str, accelerator, bar=None):
    """A run that cannot go on (not bad input): one line, exit status 1, the run directory kept."""
    if bar is not None:
        bar.close()  # the progress bar would otherwise print after the message
    if accelerator.is_main_process:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# ---- setup -----------------------------------------------------------------------------------------

def make_accelerator(train_cfg: dict, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    from tunebench import distributed

    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=train_cfg["grad_accum"], sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
        log_with=train_cfg["trackers"] or None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
        **distributed.accelerator_kwargs(),
    )


def check_setting(recipe: dict, config, accelerator) -> None:
    """What the recipe cannot ask of this model and hardware, refused before anything loads."""
    import torch

    from tunebench import distributed
    from tunebench.methods import check_model
    from tunebench.models import check_context

    check_context(config, recipe)
    check_model(config, recipe["method"])
    if recipe["train"]["optimizer"] == "paged_adamw_8bit" and not torch.cuda.is_available():
        raise UserError("train.optimizer paged_adamw_8bit pages optimizer state to a GPU; use adamw_8bit on a CPU")
    if accelerator.state.deepspeed_plugin is not None:
        distributed.check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, recipe["train"],
                                    accelerator.num_processes)


def decide_packing(recipe: dict, model, tokenizer, train_set, val_set) -> tuple:
    """(train set, validation set, what the run prints about packing): prompt/response examples and
    conversations packed into rows of data.max_length tokens where data.packing allows it and it is
    exact. Judged before the method is applied (AdaLoRA's schedule needs the packed step count): the
    base model must restart attention at position ids, and the method must add no context positions
    (a soft prompt or a prefix would be shared by a row)."""
    from tunebench import data
    from tunebench.methods import context_tokens

    data_cfg = recipe["data"]
    if data_cfg["packing"] is False or not train_set.packable:
        why = "data.packing is false" if data_cfg["packing"] is False else (
            "one class per row" if train_set.label_names else "text already cut into full blocks")
        return train_set, val_set, f"not packed ({why})"
    if context_tokens(recipe["method"]):
        why = f"method {recipe['method']['type']} puts virtual tokens before the text, which a packed row would share"
    elif not data.packing_is_exact(model, len(tokenizer)):
        why = "this model does not restart attention where position ids restart"
    else:
        packed = data.pack_examples(train_set, data_cfg["max_length"]), data.pack_examples(val_set, data_cfg["max_length"])
        fill = packed[0].num_tokens() / (len(packed[0]) * data_cfg["max_length"])
        return (*packed, f"packed: {len(train_set):,} training examples into {len(packed[0]):,} rows of up to "
                         f"{data_cfg['max_length']} tokens ({fill:.0%} full), each example attending only to itself")
    if data_cfg["packing"]:
        raise UserError(f"data.packing is true but {why}; set data.packing=false (or leave it unset)")
    return train_set, val_set, f"not packed ({why})"


def make_loaders(train_set, val_set, collate, train_cfg: dict, max_length: int, accelerator) -> tuple:
    """(train loader, this process's validation loader, optimizer steps per epoch)."""
    import torch

    # The loader's own generator: starting an epoch's iterator must not draw from the global RNG,
    # or a resumed run would see other dropout masks than an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=train_cfg["micro_batch_size"], shuffle=True, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(train_cfg["seed"]),
    )
    # Each process scores its own share of the validation blocks, none twice (no padding of shards).
    val_share = torch.utils.data.Subset(val_set, range(accelerator.process_index, len(val_set), accelerator.num_processes))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=train_cfg["micro_batch_size"], collate_fn=collate)
    one_step = train_cfg["micro_batch_size"] * train_cfg["grad_accum"] * accelerator.num_processes
    steps_per_epoch = len(train_set) // one_step
    if steps_per_epoch == 0:
        raise UserError(
            f"the training data has {len(train_set)} blocks of {max_length} tokens, fewer than one step's "
            f"{one_step} (micro_batch_size x grad_accum x processes); use more data or a smaller batch"
        )
    return train_loader, val_loader, steps_per_epoch


def make_optimizer(model, train_cfg: dict, device, method: dict):
    """The optimizer over the trained parameters. With LoRA+ (method.loraplus_lr_ratio), peft's
    create_loraplus_optimizer makes the parameter groups: the B matrices at lr x ratio."""
    import torch

    from tunebench.methods import unique_params

    lr, betas = train_cfg["lr"], (train_cfg["adam_beta1"], train_cfg["adam_beta2"])
    if train_cfg["optimizer"] == "adamw":
        # One fused kernel per step instead of a loop of elementwise passes (the Trainer's default too).
        optimizer_class, kwargs = torch.optim.AdamW, dict(betas=betas, fused=device.type in ("cpu", "cuda"))
    elif train_cfg["optimizer"] == "sgd":
        optimizer_class, kwargs = torch.optim.SGD, dict(momentum=0.9)
    else:
        import bitsandbytes as bnb

        paged = train_cfg["optimizer"] == "paged_adamw_8bit"
        optimizer_class, kwargs = (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit), dict(betas=betas)
    if method.get("loraplus_lr_ratio"):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, optimizer_class, lr=lr, loraplus_lr_ratio=method["loraplus_lr_ratio"],
                                         loraplus_weight_decay=train_cfg["weight_decay"], **kwargs)
    params = [p for p in unique_params(model) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # no decay on biases and norms
    ]
    return optimizer_class([g for g in groups if g["params"]], lr=lr, **kwargs)


def make_scheduler(optimizer, train_cfg: dict, total_steps: int):
    from transformers import get_scheduler

    warmup = train_cfg["warmup_steps"] or math.ceil(train_cfg["warmup_ratio"] * total_steps)
    schedule = {"constant": "constant_with_warmup"}.get(train_cfg["scheduler"], train_cfg["scheduler"])
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def checkpoint_trained_weights_only(model, accelerator) -> set:
    """A checkpoint holds what training changes: frozen weights are the base model's, loaded again on
    resume. A LoRA checkpoint of GPT-2 small is then a few MB instead of 500. (DeepSpeed writes its
    own.) Returns the names of the frozen weights left out."""
    if accelerator.state.deepspeed_plugin:
        return set()
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if frozen:
        def of_frozen_weight(name: str) -> bool:
            """The weight itself, or a tensor of its own under its name (a 4-bit weight's quantization state)."""
            while name not in frozen and "." in name:
                name = name.rsplit(".", 1)[0]
            return name in frozen

        def drop_frozen_weights(models, weights, output_dir):
            for weights_of_one_model in weights:
                for name in [name for name in weights_of_one_model if of_frozen_weight(name)]:
                    del weights_of_one_model[name]

        accelerator.register_save_state_pre_hook(drop_frozen_weights)
    return frozen


def resume(run_dir: Path, accelerator, model, scheduler, frozen: set, method) -> tuple:
    """Load the latest checkpoint: (Progress, the loss totals since its last log line or None)."""
    if accelerator.is_main_process:
        rundir.recover(run_dir)
        rundir.set_aside_damaged(run_dir)  # resume from the newest intact checkpoint
    accelerator.wait_for_everyone()
    checkpoint = rundir.latest_checkpoint(run_dir)
    accelerator.load_state(str(checkpoint), **({"strict": False} if frozen else {}))
    if method.load_extra_state:  # AdaLoRA's importance averages and rank pattern
        from safetensors.torch import load_file

        method.load_extra_state(accelerator.unwrap_model(model), load_file(checkpoint / METHOD_STATE_FILE))
    saved = rundir.read_json(checkpoint / rundir.STATE_FILE)
    scheduler.load_state_dict(saved.pop("scheduler"))  # kept as JSON: no pickle is ever loaded
    pending = saved.pop("pending", None)
    progress = Progress(**saved)
    if accelerator.is_main_process:
        rundir.truncate_log(run_dir / "log.jsonl", progress.step)
        print(f"resuming {run_dir} from {checkpoint.name}")
    return progress, pending


def stop_on_signals() -> list:
    """SIGTERM and Ctrl-C are noted in the returned list; the loop checkpoints and stops at the next step."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


# ---- the loop's parts ------------------------------------------------------------------------------

def batch_tokens(batch: dict):
    """The tokens of a batch that are not padding."""
    if "num_tokens" in batch:  # packed rows
        return batch["num_tokens"]
    return batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()


def train_step(model, micro_batches: list, optimizer, accelerator, loss_of, train_cfg: dict, since_log: SinceLastLog,
               method, step: int):
    """One optimizer step (number `step`) over grad_accum micro-batches. The loss is the token-weighted
    mean over the whole global batch: each micro-batch's summed NLL is divided by the number of scored
    tokens in all micro-batches of all processes; plus the method's own term, if it has one."""
    from tunebench.metrics import scored_targets

    local_scored = sum(scored_targets(batch["labels"]) for batch in micro_batches)
    scored = accelerator.reduce(local_scored, "sum")
    undo_averaging = accelerator.num_processes * train_cfg["grad_accum"]  # accelerate divides by grad_accum, DDP averages
    for batch in micro_batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                nll, _ = loss_of(model, batch)  # the model's output is not kept past it
            loss, term = nll * undo_averaging / scored, method_loss_term(model, method, accelerator)
            accelerator.backward(loss if term is None else loss + term)
            if accelerator.sync_gradients and train_cfg["max_grad_norm"]:
                accelerator.clip_grad_norm_(model.parameters(), train_cfg["max_grad_norm"])
            optimizer.step()
            if accelerator.sync_gradients and method.after_optimizer_step:  # AdaLoRA reads the gradients
                method.after_optimizer_step(accelerator.unwrap_model(model), step)
            optimizer.zero_grad(set_to_none=True)
        since_log.loss_sum += nll.detach().double()
        if term is not None:  # logged as trained: the term once per scored token gives mean NLL + term
            since_log.loss_sum += term.detach().double() * scored_targets(batch["labels"])
        since_log.tokens += batch_tokens(batch)
    since_log.loss_count += local_scored


def method_loss_term(model, method, accelerator):
    """The method's own term of the training objective (AdaLoRA's orthogonality penalty), or None.
    It is the same in every micro-batch of a step, and accelerate's division by grad_accum and DDP's
    averaging make the step's gradient that of the term once."""
    if method.loss_term is None:
        return None
    with accelerator.autocast():
        return method.loss_term(accelerator.unwrap_model(model))


def stop_requested(step: int, stop_after_steps, signals: list, accelerator) -> bool:
    import torch

    stopping = step == stop_after_steps or bool(signals)
    if accelerator.num_processes > 1:  # a signal reaches processes at different steps: stop together
        stopping = bool(accelerator.reduce(torch.tensor(int(stopping), device=accelerator.device), "sum").item())
    return stopping


def validation_loss(model, val_loader, accelerator, loss_of, max_batches: int, classify: bool) -> tuple:
    """(mean validation loss over all processes, accuracy for classification or None). The loss is
    computed outside autocast: the prepared model runs its own forward under it in mixed precision."""
    import torch

    from tunebench.metrics import classification_scores

    model.eval()
    nll_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.long)
    correct = torch.zeros((), device=accelerator.device, dtype=torch.long)
    with torch.no_grad():
        for i, batch in enumerate(val_loader):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if classify:
                nll, n, right = classification_scores(model, batch)
                correct += right
            else:
                nll, n = loss_of(model, batch)
            nll_sum += nll.double()
            count += n
    model.train()
    nll_sum, count = accelerator.reduce(nll_sum, "sum"), accelerator.reduce(count, "sum")
    accuracy = (accelerator.reduce(correct, "sum") / count).item() if classify else None
    return (nll_sum / count).item(), accuracy


def save_final(model, tokenizer, accelerator, run_dir: Path) -> None:
    """The model or adapter as it is now, in save_pretrained format, replacing final/ whole."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process takes part
    if accelerator.is_main_process:
        tmp = rundir.temporary(run_dir / "final")
        unwrapped = accelerator.unwrap_model(model)
        # PiSSA: saved as a plain LoRA (rank 2r) on the unchanged base, from the adapter as initialised.
        initial = getattr(unwrapped, "initial_adapter_dir", None)
        if initial:  # peft reads both adapters from the model itself (no ZeRO-3 gathering needed for LoRA)
            unwrapped.save_pretrained(tmp, safe_serialization=True, path_initial_model_for_weight_conversion=initial)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        rundir.publish(tmp, run_dir / "final")
    accelerator.wait_for_everyone()


def evaluate_and_keep_best(record: dict, progress: Progress, validate, keep) -> None:
    """Validate (validate() -> (loss, accuracy or None for a language model)), note it in the log
    record, and call keep() when this is the best model yet: the lowest loss, or the most accurate
    classifier."""
    val, acc = validate()
    record["val_loss"] = val
    if acc is not None:
        record["val_acc"] = acc
    if progress.initial_val_loss is None:
        progress.initial_val_loss = val
    if acc is not None:
        better = progress.best_val_acc is None or acc > progress.best_val_acc
    else:
        better = progress.best_val_loss is None or val < progress.best_val_loss
    if better:
        progress.best_val_loss, progress.best_val_acc, progress.best_step = val, acc, progress.step
        keep()


def log_record(progress: Progress, since_log: SinceLastLog, accelerator, learning_rate: float,
               batches_per_epoch: int, run_dir: Path, bar) -> dict:
    """The next log line's figures (without validation); stops the run if the loss is no number."""
    mean_loss = (accelerator.reduce(since_log.loss_sum, "sum") / accelerator.reduce(since_log.loss_count, "sum")).item()
    progress.tokens += int(accelerator.reduce(since_log.tokens, "sum").item())
    since_log.clear()
    if not math.isfinite(mean_loss):
        accelerator.end_training()
        fail(
            f"training loss became {mean_loss} by step {progress.step}; stopped. The last checkpoint is "
            f"{rundir.latest_checkpoint(run_dir) or 'none'} (its weights may have diverged already); final/ "
            "holds the model with the best validation loss. Lower train.lr or set train.max_grad_norm",
            accelerator, bar,
        )
    if progress.best_train_loss is None or mean_loss < progress.best_train_loss:
        progress.best_train_loss = mean_loss
    return {
        "step": progress.step,
        "epoch": round(progress.epoch + progress.batches_in_epoch / max(1, batches_per_epoch), 4),
        "tokens": progress.tokens,
        "train_loss": mean_loss,
        "lr": learning_rate,
        "time": round(progress.train_time_s, 3),
    }


def write_log_line(record: dict, accelerator, run_dir: Path, bar) -> None:
    """log.jsonl, the trackers and the progress bar."""
    if accelerator.is_main_process:
        rundir.append_log(run_dir / "log.jsonl", record)
    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
    val = {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", **val)


def save_checkpoint(progress: Progress, pending: dict, model, scheduler, accelerator, run_dir: Path,
                    keep_checkpoints: int, method, bar=None) -> None:
    """Write checkpoints/step-N whole or not at all; stop with a clear line when the disk is short."""
    from tunebench import measure
    from tunebench.methods import unique_params

    last = rundir.latest_checkpoint(run_dir)
    needed = measure.dir_size_mb(last) if last else 3 * sum(p.numel() * p.element_size() for p in unique_params(model)) / 2**20
    tmp = rundir.temporary(run_dir / "checkpoints" / f"step-{progress.step}")
    problem = None
    if rundir.free_mb(run_dir) < 1.1 * needed:
        problem = f"about {needed:.0f} MB needed, {rundir.free_mb(run_dir):.0f} MB free"
    else:
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every process writes its own files (random states, ZeRO shards)
            if accelerator.is_main_process:
                if method.extra_state:
                    from safetensors.torch import save_file

                    save_file({k: t.contiguous() for k, t in method.extra_state(accelerator.unwrap_model(model)).items()},
                              tmp / METHOD_STATE_FILE)
                state = {**asdict(progress), "pending": pending, "scheduler": scheduler.state_dict()}
                rundir.seal(tmp, state)
                rundir.publish(tmp, tmp.with_name(f"step-{progress.step}"))
                rundir.prune(run_dir, keep_checkpoints)
        except OSError as e:
            problem = str(e)
    accelerator.wait_for_everyone()
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(
            f"cannot save the checkpoint of step {progress.step} to {run_dir} ({problem}); stopped. "
            f"The last good checkpoint is {last or 'none'}: free disk space and run the same command to resume",
            accelerator, bar,
        )


def exit_stopped(stopped_by, progress: Progress, total_steps: int, args, accelerator) -> None:
    accelerator.end_training()
    asked = stopped_by == "stop-after-steps"
    why = "stopped as asked" if asked else f"interrupted by {signal.Signals(stopped_by).name}"
    accelerator.print(
        f"{why} at step {progress.step}/{total_steps}; checkpoint saved. "
        f"Resume with the same command: python train.py --recipe {args.recipe} {' '.join(args.overrides)}".rstrip()
    )
    sys.exit(0 if asked else 128 + int(stopped_by))


def summary(recipe: dict, progress: Progress, run_dir: Path, model, config, optimizer, accelerator, train_set,
            params: tuple, memory_plan: dict, wall_time_s: float, threads: dict, loss_path: str, packing: str) -> dict:
    """summary.json: the run's figures, measured (see DESIGN.md for the keys that are contract)."""
    from tunebench import measure
    from tunebench.methods import label

    trainable, total = params
    train_cfg, world = recipe["train"], accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    return {
        "name": recipe["name"],
        "method": recipe["method"]["type"],
        "method_label": label(recipe["method"]),
        "task": recipe["task"],
        "model": recipe["model"]["name"],
        "dataset": recipe["data"]["dataset"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "artifact_mb": measure.dir_size_mb(run_dir / "final"),
        "train_time_s": progress.train_time_s,
        "wall_time_s": wall_time_s,
        "train_tokens": progress.tokens,
        "tokens_per_s": progress.tokens / progress.train_time_s if progress.train_time_s else None,
        "peak_gpu_mem_mb": measure.peak_gpu_mem_mb(),
        "peak_cpu_rss_mb": measure.peak_cpu_rss_mb(),
        "optimizer_state_mb": measure.optimizer_state_mb(optimizer),
        "loss": loss_path,
        "packing": packing,
        "predicted_peak_mb": memory_plan.get("predicted_peak_mb"),
        "memory_plan": memory_plan,
        "initial_val_loss": progress.initial_val_loss,
        "best_train_loss": progress.best_train_loss,
        "best_val_loss": progress.best_val_loss,
        "best_val_acc": progress.best_val_acc,
        "label_names": train_set.label_names,  # a classifier's classes, by class id; rebuild its head with them
        "best_step": progress.best_step,
        "final_step": progress.step,
        "max_length": recipe["data"]["max_length"],
        "global_batch": train_cfg["micro_batch_size"] * train_cfg["grad_accum"] * world,
        "train_blocks": len(train_set),
        "model_flops_per_token": measure.train_flops_per_token(
            getattr(unwrapped, "config", config), trainable, total, recipe["data"]["max_length"]
        ),
        "hardware": {**measure.hardware(world, accelerator.mixed_precision, accelerator.distributed_type.value), **threads},
        "versions": measure.versions(),
    }


# ---- main ------------------------------------------------------------------------------------------

@command
def main(argv=None):
    args = parse_args(argv)
    from tunebench.recipe import flatten, load_recipe

    # ---- recipe and run directory: every check before anything is written --------------------
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan:
        from tunebench import plan

        plan.show(recipe, plan.setup_from_config_file(args.config_file), args.budget_gb)
        return
    if args.budget_gb is not None or args.config_file is not None:
        raise UserError("--budget-gb and --config-file go with --plan; to train with a config: accelerate launch --config_file ACCEL train.py ...")
    run_dir = Path(recipe["output_dir"])
    run_status = rundir.status(run_dir, recipe)
    if run_status == rundir.FINISHED:
        print(f"run {run_dir} already finished (summary.json); nothing to do. Add overwrite=true to train it again.")
        return

    # Heavy imports only once the recipe is known to be good, so bad input is answered at once.
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from tunebench import activations, data, distributed, fused_loss, measure, plan
    from tunebench.methods import METHODS, apply_method, count_params
    from tunebench.metrics import classification_loss
    from tunebench.models import enable_gradient_checkpointing, load_config, load_model, load_tokenizer

    model_cfg, data_cfg, train_cfg = recipe["model"], recipe["data"], recipe["train"]
    classify = recipe["task"] == "classification"  # a classification head, scored by validation accuracy
    threads = distributed.use_every_core()
    accelerator = make_accelerator(train_cfg, run_dir)
    accelerator.print(f"cpu threads: {threads['threads_per_process']} per process ({threads['threads_set_by']})")
    set_seed(train_cfg["seed"])

    # ---- model, method, data ---------------------------------------------------------------------
    config = load_config(model_cfg)
    check_setting(recipe, config, accelerator)
    memory_plan = plan.predict_for_summary(recipe, config, accelerator)  # before the model loads: see tunebench/plan.py
    measure.set_cpu_allocator(exact_rss=train_cfg["exact_cpu_rss"])
    tokenizer = load_tokenizer(model_cfg)
    with accelerator.main_process_first():  # the main process tokenizes and caches, the others read the cache
        train_set, val_set = data.build(data_cfg, tokenizer, train_cfg["seed"], recipe["task"])
    method = METHODS[recipe["method"]["type"]]
    model = load_model(model_cfg, train_set.label_names, tokenizer.pad_token_id, method=recipe["method"])
    activations.use_fused_gelu(model)  # same function, fewer tensors kept for backward (tunebench/activations.py)
    if model_cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    train_set, val_set, packing = decide_packing(recipe, model, tokenizer, train_set, val_set)
    accelerator.print(f"data: {packing}")
    train_loader, val_loader, steps_per_epoch = make_loaders(
        train_set, val_set, data.collate(tokenizer.pad_token_id), train_cfg, data_cfg["max_length"], accelerator)
    total_steps = train_cfg["max_steps"] or train_cfg["epochs"] * steps_per_epoch
    set_seed(train_cfg["seed"])  # the method's random init (LoRA A) must not depend on how loading drew numbers (ZeRO-3 does)
    model = apply_method(model, recipe["method"], tokenizer, total_steps)  # AdaLoRA schedules by total_steps
    params = count_params(model)
    # The causal loss is fused with the output layer where it can be (tunebench/fused_loss.py).
    loss_of, loss_path = ((classification_loss, "classification cross-entropy") if classify
                          else fused_loss.choose(model, train_cfg["fused_loss"]))
    accelerator.print(f"loss: {loss_path}")
    if train_cfg["compile"]:
        model.compile()  # in place: the same module and state_dict keys, compiled on the first batches

    # ---- optimizer, schedule, start fresh or resume ---------------------------------------------
    optimizer = make_optimizer(model, train_cfg, accelerator.device, recipe["method"])
    scheduler = make_scheduler(optimizer, train_cfg, total_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    frozen = checkpoint_trained_weights_only(model, accelerator)
    progress, pending = Progress(), None
    if run_status == rundir.RESUME:
        progress, pending = resume(run_dir, accelerator, model, scheduler, frozen, method)
    elif accelerator.is_main_process:
        rundir.start(run_dir, recipe)
    accelerator.wait_for_everyone()
    if train_cfg["trackers"]:
        accelerator.init_trackers(recipe["name"], config={k: str(v) for k, v in flatten(recipe).items()})
    signals = stop_on_signals()

    validate = partial(validation_loss, model, val_loader, accelerator, loss_of, train_cfg["eval_max_batches"], classify)
    keep_as_final = partial(save_final, model, tokenizer, accelerator, run_dir)

    # ---- training loop -----------------------------------------------------------------------------
    measure.reset_peak_gpu_mem()
    since_log = SinceLastLog(accelerator.device)
    if pending and accelerator.is_main_process:  # totals over all processes: one process carries them
        since_log.restore(pending)
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc=recipe["name"])
    wall_start = time.perf_counter()
    stopped_by = None

    if progress.step == 0 and progress.best_val_loss is None:
        record = {"step": 0, "epoch": 0.0, "tokens": 0, "train_loss": None, "lr": scheduler.get_last_lr()[0], "time": 0.0}
        evaluate_and_keep_best(record, progress, validate, keep_as_final)
        if accelerator.is_main_process:
            rundir.append_log(run_dir / "log.jsonl", record)

    model.train()
    step_start = time.perf_counter()
    while progress.step < total_steps and stopped_by is None:
        train_loader.set_epoch(progress.epoch)
        loader = train_loader
        if progress.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
        batches = iter(loader)
        while progress.step < total_steps:
            micro_batches = [batch for _, batch in zip(range(train_cfg["grad_accum"]), batches)]
            if len(micro_batches) < train_cfg["grad_accum"]:
                break  # an incomplete accumulation at the end of an epoch is not trained on
            train_step(model, micro_batches, optimizer, accelerator, loss_of, train_cfg, since_log, method, progress.step + 1)
            scheduler.step()
            progress.step += 1
            progress.batches_in_epoch += train_cfg["grad_accum"]
            bar.update(1)

            stopping = stop_requested(progress.step, args.stop_after_steps, signals, accelerator)
            evaluating = progress.step == total_steps or (train_cfg["eval_every"] and progress.step % train_cfg["eval_every"] == 0)
            logging = evaluating or progress.step % train_cfg["log_every"] == 0
            checkpointing = stopping or progress.step % train_cfg["save_every"] == 0 or progress.step == total_steps
            if not (logging or checkpointing):
                continue

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            progress.train_time_s += time.perf_counter() - step_start  # optimizer steps only, without what follows
            if logging:
                record = log_record(progress, since_log, accelerator, scheduler.get_last_lr()[0], len(train_loader), run_dir, bar)
                if evaluating:
                    evaluate_and_keep_best(record, progress, validate, keep_as_final)
                write_log_line(record, accelerator, run_dir, bar)
            if checkpointing:
                save_checkpoint(progress, since_log.totals(accelerator), model, scheduler, accelerator, run_dir,
                                train_cfg["keep_checkpoints"], method, bar)
            if stopping:
                stopped_by = signals[0] if signals else "stop-after-steps"
                break
            step_start = time.perf_counter()
        if progress.step < total_steps and stopped_by is None:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    if stopped_by is not None:
        exit_stopped(stopped_by, progress, total_steps, args, accelerator)

    # ---- summary -----------------------------------------------------------------------------------
    result = summary(recipe, progress, run_dir, model, config, optimizer, accelerator, train_set, params, memory_plan,
                     wall_time_s=time.perf_counter() - wall_start, threads=threads, loss_path=loss_path, packing=packing)
    if accelerator.is_main_process:
        rundir.write_json(run_dir / "summary.json", result)
        print(
            f"done: {run_dir}  val loss {result['initial_val_loss']:.4f} -> best {result['best_val_loss']:.4f} "
            f"(step {result['best_step']}{', accuracy %.4f' % result['best_val_acc'] if classify else ''}), "
            f"{result['tokens_per_s']:.0f} tokens/s, "
            f"{params[0]:,} of {params[1]:,} parameters trained"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
