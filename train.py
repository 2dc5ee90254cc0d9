"""Fine-tune a causal language model as a recipe says, and write a run directory.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py --recipe recipes/lora_r16.yaml [KEY=VALUE ...]
    python train.py --recipe recipes/lora_r16.yaml train.max_steps=50      (one process, same code path)

recipe -> model + method -> data -> training loop -> runs/NAME/{recipe.yaml, log.jsonl, checkpoints/, final/, summary.json}
The hardware (CPU, GPUs, DeepSpeed ZeRO, mixed precision) comes from the accelerate config only.

Read top to bottom: the arguments; what a run holds (Progress, the loss since the last log line, Run);
setup, which makes the Run; start or resume; the training loop, then its parts in the order it calls
them (train_step is one optimizer step, whole); the end of a run; and main(), the outline of a run,
which calls these in turn. torch and the Hugging Face libraries are imported inside the functions that
use them, so that bad input is answered at once.
"""
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunebench import cache, rundir
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.inputs import positive, positive_number
from tunebench.recipe import NOT_BEFORE_TRAINING, MethodSettings, Recipe, TrainSettings, flatten, load_recipe, setting_without


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
TRACKERS_FILE = "trackers.json"  # the MLflow run a resumed run goes on in


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
    # Seconds spent besides the steps, over every process that worked on the run (summary.json's time_split_s,
    # which tunebench/forecast.py predicts); a checkpoint's own save is counted from the next one on.
    time_split_s: dict = field(default_factory=lambda: dict.fromkeys(("setup", "validation", "checkpoints", "final_saves"), 0.0))


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


# ---- the run: what every part of it works on -------------------------------------------------------

@dataclass
class SetupFacts:
    """What setup chose and measured besides the recipe; summary.json reports them."""
    model_config: Any  # the base model's config (its shape, for the FLOPs per token)
    threads: dict  # CPU threads per process, and who chose them
    memory_plan: dict  # the predicted peak memory (tunebench/plan.py)
    packing: str  # what the run printed about packing
    loss: str  # what the run printed about its loss
    params: tuple  # (trainable, total)
    label_names: list | None  # a classifier's classes, by class id
    train_blocks: int  # training rows: blocks, examples or packed rows


@dataclass
class Run:
    """What the parts of a run share, made once by set_up(): each part takes the run whole."""
    recipe: Recipe
    run_dir: Path
    accelerator: Any
    model: Any  # as accelerate prepared it (wrapped for several processes or DeepSpeed)
    method: Any  # the method's entry in tunebench.methods.METHODS: its hooks into the loop
    tokenizer: Any  # saved with final/
    optimizer: Any
    scheduler: Any
    loss: Callable  # loss(model, batch) -> (summed loss, scored targets); runs the model itself
    train_loader: Any
    val_loader: Any  # this process's share of the validation rows
    total_steps: int
    frozen: set  # the frozen weights' names, which a checkpoint leaves out (the base model's)
    since_log: SinceLastLog
    facts: SetupFacts
    progress: Progress = field(default_factory=Progress)
    bar: Any = None  # the progress bar, while the loop runs

    @property
    def classify(self) -> bool:
        """A classification head, scored by validation accuracy (recipe task: classification)."""
        return self.recipe.task == "classification"


def fail(run: Run, message: str):
    """A run that cannot go on (not bad input): one line, exit status 1, the run directory kept."""
    if run.bar is not None:
        run.bar.close()  # the progress bar would otherwise print after the message
    if run.accelerator.is_main_process:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# ---- setup -----------------------------------------------------------------------------------------

def set_up(recipe: Recipe, run_dir: Path) -> Run:
    """The run's parts, made in this order (which random numbers each one draws depends on it): the
    processes, the base model and the data, the loaders, the method, the loss, the optimizer."""
    from accelerate.utils import set_seed

    from tunebench import data, distributed, fused_loss, measure, plan
    from tunebench.methods import METHODS, apply_method, count_params
    from tunebench.metrics import classification_loss
    from tunebench.models import load_config, load_tokenizer

    train_cfg = recipe.train
    threads = distributed.use_every_core()
    accelerator = make_accelerator(train_cfg, run_dir)
    accelerator.print(f"cpu threads: {threads['threads_per_process']} per process ({threads['threads_set_by']})")
    set_seed(train_cfg.seed)

    config = load_config(recipe.model)
    check_setting(recipe, config, accelerator)
    memory_plan = plan.predict_for_summary(recipe, config, accelerator)  # before the model loads: see tunebench/plan.py
    measure.set_cpu_allocator(exact_rss=train_cfg.exact_cpu_rss)
    tokenizer = load_tokenizer(recipe.model)
    model, train_set, val_set, packing = load_model_and_data(recipe, tokenizer, accelerator)
    train_loader, val_loader, steps_per_epoch = make_loaders(
        train_set, val_set, data.collate(tokenizer.pad_token_id), train_cfg, recipe.data.max_length, accelerator)
    total_steps = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch

    set_seed(train_cfg.seed)  # the method's random init (LoRA A) must not depend on how loading drew numbers (ZeRO-3 does)
    model = apply_method(model, recipe.method, tokenizer, total_steps)  # AdaLoRA schedules by total_steps
    params = count_params(model)
    # The loss, chosen once: the causal one fused with the output layer where it can be (tunebench/fused_loss.py).
    loss, loss_note = ((classification_loss, "classification cross-entropy") if recipe.task == "classification"
                       else fused_loss.choose(model, train_cfg.fused_loss, distributed.why_no_fused_loss(accelerator)))
    accelerator.print(f"loss: {loss_note}")
    if train_cfg.compile:
        model.compile()  # in place: the same module and state_dict keys, compiled on the first batches

    optimizer = make_optimizer(model, train_cfg, accelerator.device, recipe.method)
    scheduler = make_scheduler(optimizer, train_cfg, total_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    frozen = checkpoint_trained_weights_only(model, accelerator)
    return Run(
        recipe=recipe, run_dir=run_dir, accelerator=accelerator, model=model, method=METHODS[recipe.method.type],
        tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, loss=loss, train_loader=train_loader,
        val_loader=val_loader, total_steps=total_steps, frozen=frozen,
        since_log=SinceLastLog(accelerator.device),
        facts=SetupFacts(model_config=config, threads=threads, memory_plan=memory_plan, packing=packing, loss=loss_note,
                         params=params, label_names=train_set.label_names, train_blocks=len(train_set)),
    )


def load_model_and_data(recipe: Recipe, tokenizer, accelerator) -> tuple:
    """(base model, training set, validation set, what the run prints about packing): the data as the
    recipe's task reads it, and the model it trains, ready for its method."""
    from tunebench import activations, data
    from tunebench.methods import quantization_kwargs
    from tunebench.models import enable_gradient_checkpointing, load_model

    with accelerator.main_process_first():  # the main process tokenizes and caches, the others read the cache
        train_set, val_set = data.build(recipe.data, tokenizer, recipe.train.seed, recipe.task)
    model = load_model(recipe.model, train_set.label_names, tokenizer.pad_token_id, quantization_kwargs(recipe.method, recipe.model))
    activations.use_fused_gelu(model)  # same function, fewer tensors kept for backward (tunebench/activations.py)
    if recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    train_set, val_set, packing = decide_packing(recipe, model, tokenizer, train_set, val_set)
    accelerator.print(f"data: {packing}")
    return model, train_set, val_set, packing


def make_accelerator(train_cfg: TrainSettings, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    from tunebench import distributed

    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=train_cfg.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg.seed),
        log_with=train_cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,
        **distributed.accelerator_kwargs(),
    )


def check_setting(recipe: Recipe, config, accelerator) -> None:
    """What the recipe cannot ask of this model and hardware, refused before anything loads."""
    import torch

    from tunebench import distributed
    from tunebench.methods import check_context, check_model

    check_context(config, recipe)
    check_model(config, recipe.method)
    if recipe.train.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        raise UserError("train.optimizer paged_adamw_8bit pages optimizer state to a GPU; use adamw_8bit on a CPU")
    if accelerator.state.deepspeed_plugin is not None:
        distributed.check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, recipe.train,
                                    accelerator.num_processes)


def decide_packing(recipe: Recipe, model, tokenizer, train_set, val_set) -> tuple:
    """(train set, validation set, what the run prints about packing): prompt/response examples and
    conversations packed into rows of data.max_length tokens where data.packing allows it and it is
    exact. Judged before the method is applied (AdaLoRA's schedule needs the packed step count): the
    base model must restart attention at position ids, and the method must add no context positions
    (a soft prompt or a prefix would be shared by a row)."""
    from tunebench import packing
    from tunebench.methods import context_tokens

    data_cfg = recipe.data
    if data_cfg.packing is False or not train_set.packable:
        why = "data.packing is false" if data_cfg.packing is False else (
            "one class per row" if train_set.label_names else "text already cut into full blocks")
        return train_set, val_set, f"not packed ({why})"
    if context_tokens(recipe.method):
        why = f"method {recipe.method.type} puts virtual tokens before the text, which a packed row would share"
    elif not packing.packing_is_exact(model, len(tokenizer)):
        why = "this model does not restart attention where position ids restart"
    else:
        packed = packing.pack_examples(train_set, data_cfg.max_length), packing.pack_examples(val_set, data_cfg.max_length)
        fill = packed[0].num_tokens() / (len(packed[0]) * data_cfg.max_length)
        return (*packed, f"packed: {len(train_set):,} training examples into {len(packed[0]):,} rows of up to "
                         f"{data_cfg.max_length} tokens ({fill:.0%} full), each example attending only to itself")
    if data_cfg.packing:
        raise UserError(f"data.packing is true but {why}; set data.packing=false (or leave it unset)")
    return train_set, val_set, f"not packed ({why})"


def make_loaders(train_set, val_set, collate, train_cfg: TrainSettings, max_length: int, accelerator) -> tuple:
    """(train loader, this process's validation loader, optimizer steps per epoch)."""
    import torch

    # The loader's own generator: starting an epoch's iterator must not draw from the global RNG,
    # or a resumed run would see other dropout masks than an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=train_cfg.micro_batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(train_cfg.seed),
    )
    # Each process scores its own share of the validation blocks, none twice (no padding of shards).
    val_share = torch.utils.data.Subset(val_set, range(accelerator.process_index, len(val_set), accelerator.num_processes))
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=train_cfg.micro_batch_size, collate_fn=collate)
    one_step = train_cfg.micro_batch_size * train_cfg.grad_accum * accelerator.num_processes
    steps_per_epoch = len(train_set) // one_step
    if steps_per_epoch == 0:
        raise UserError(
            f"the training data has {len(train_set)} blocks of {max_length} tokens, fewer than one step's "
            f"{one_step} (micro_batch_size x grad_accum x processes); use more data or a smaller batch"
        )
    return train_loader, val_loader, steps_per_epoch


def make_optimizer(model, train_cfg: TrainSettings, device, method: MethodSettings):
    """The optimizer over the trained parameters. With LoRA+ (method.loraplus_lr_ratio), peft's
    create_loraplus_optimizer makes the parameter groups: the B matrices at lr x ratio."""
    import torch

    from tunebench.methods import unique_params

    lr, betas = train_cfg.lr, (train_cfg.adam_beta1, train_cfg.adam_beta2)
    if train_cfg.optimizer == "adamw":
        # One fused kernel per step instead of a loop of elementwise passes (the Trainer's default too).
        optimizer_class, kwargs = torch.optim.AdamW, dict(betas=betas, fused=device.type in ("cpu", "cuda"))
    elif train_cfg.optimizer == "sgd":
        optimizer_class, kwargs = torch.optim.SGD, dict(momentum=0.9)
    else:
        import bitsandbytes as bnb

        paged = train_cfg.optimizer == "paged_adamw_8bit"
        optimizer_class, kwargs = (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit), dict(betas=betas)
    if getattr(method, "loraplus_lr_ratio", None):  # a key of lora and qlora only
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, optimizer_class, lr=lr, loraplus_lr_ratio=method.loraplus_lr_ratio,
                                         loraplus_weight_decay=train_cfg.weight_decay, **kwargs)
    params = [p for p in unique_params(model) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # no decay on biases and norms
    ]
    return optimizer_class([g for g in groups if g["params"]], lr=lr, **kwargs)


def make_scheduler(optimizer, train_cfg: TrainSettings, total_steps: int):
    from transformers import get_scheduler

    warmup = train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total_steps)
    schedule = {"constant": "constant_with_warmup"}.get(train_cfg.scheduler, train_cfg.scheduler)
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def checkpoint_trained_weights_only(model, accelerator) -> set:
    """A checkpoint holds what training changes: frozen weights are the base model's, loaded again on
    resume. A LoRA checkpoint of GPT-2 small is then a few MB instead of 500. (DeepSpeed and FSDP write
    their own shards.) Returns the names of the frozen weights left out."""
    from tunebench.distributed import under_fsdp

    if accelerator.state.deepspeed_plugin or under_fsdp(accelerator):
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


# ---- start or resume -------------------------------------------------------------------------------

def start_or_resume(run: Run, resuming: bool) -> None:
    """A fresh run directory, or the run as its latest checkpoint left it; then the trackers."""
    if resuming:
        resume(run)
    elif run.accelerator.is_main_process:
        rundir.start(run.run_dir, run.recipe)
    run.accelerator.wait_for_everyone()
    if run.recipe.train.trackers:
        start_trackers(run)


def start_trackers(run: Run) -> None:
    """The recipe's trackers, through accelerate, with the recipe as their configuration. TensorBoard
    writes under run_dir/tensorboard/; MLflow to MLFLOW_TRACKING_URI, or run_dir/mlflow.db when that
    is unset. A resumed run goes on in the same MLflow run, and TensorBoard hides what the stopped run
    logged after its checkpoint (purge_step), so that the curves match log.jsonl."""
    trackers, run_dir, step = run.recipe.train.trackers, run.run_dir, run.progress.step
    init = {}
    if "tensorboard" in trackers and step:
        init["tensorboard"] = {"purge_step": step + 1}
    if "mlflow" in trackers:
        init["mlflow"] = {"run_name": run_dir.name}
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            init["mlflow"]["logging_dir"] = str((run_dir / "mlflow-artifacts").resolve())
        if step and (run_dir / TRACKERS_FILE).is_file():
            init["mlflow"]["run_id"] = rundir.read_json(run_dir / TRACKERS_FILE).get("mlflow_run_id")
    run.accelerator.init_trackers(run.recipe.name, config={k: str(v) for k, v in flatten(run.recipe).items()},
                                  init_kwargs=init)
    if "mlflow" in trackers and run.accelerator.is_main_process:
        mlflow_run = run.accelerator.get_tracker("mlflow", unwrap=True)
        rundir.write_json(run_dir / TRACKERS_FILE, {"mlflow_run_id": mlflow_run.info.run_id,
                                                    "mlflow_tracking_uri": os.environ["MLFLOW_TRACKING_URI"]})


def resume(run: Run) -> None:
    """Load the latest checkpoint: the trained tensors, the optimizer, the schedule, the random states,
    the progress and the loss since its last log line."""
    accelerator, run_dir = run.accelerator, run.run_dir
    if accelerator.is_main_process:
        rundir.recover(run_dir)
        rundir.set_aside_damaged(run_dir)  # resume from the newest intact checkpoint
    accelerator.wait_for_everyone()
    checkpoint = rundir.latest_checkpoint(run_dir)
    accelerator.load_state(str(checkpoint), **({"strict": False} if run.frozen else {}))
    if run.method.load_extra_state:  # AdaLoRA's importance averages and rank pattern
        from safetensors.torch import load_file

        run.method.load_extra_state(accelerator.unwrap_model(run.model), load_file(checkpoint / METHOD_STATE_FILE))
    saved = rundir.read_json(checkpoint / rundir.STATE_FILE)
    run.scheduler.load_state_dict(saved.pop("scheduler"))  # kept as JSON: no pickle is ever loaded
    pending = saved.pop("pending", None)
    run.progress = Progress(**saved)
    if pending and accelerator.is_main_process:  # totals over all processes: one process carries them
        run.since_log.restore(pending)
    if accelerator.is_main_process:
        rundir.truncate_log(run_dir / "log.jsonl", run.progress.step)
        print(f"resuming {run_dir} from {checkpoint.name}")


# ---- the training loop -----------------------------------------------------------------------------

def train_loop(run: Run, stop_after_steps: int | None) -> str | int | None:
    """Train to run.total_steps, validating, logging and checkpointing as the recipe says; a fresh run
    is validated first, at step 0. Returns None when done, or what stopped it early, a checkpoint
    saved: "stop-after-steps" or the number of the signal received."""
    import torch
    from tqdm.auto import tqdm

    from tunebench import measure

    train_cfg, progress = run.recipe.train, run.progress
    signals = stop_on_signals()
    measure.reset_peak_gpu_mem()
    run.bar = tqdm(total=run.total_steps, initial=progress.step, disable=not run.accelerator.is_local_main_process,
                   desc=run.recipe.name)
    if progress.step == 0 and progress.initial_val_loss is None:
        record = {"step": 0, "epoch": 0.0, "tokens": 0, "train_loss": None, "lr": run.scheduler.get_last_lr()[0], "time": 0.0}
        evaluate_and_keep_best(run, record, validate_untrained(run))
        write_log_line(run, record)

    run.model.train()
    stopped_by = None
    step_start = time.perf_counter()
    for micro_batches in step_batches(run):
        train_step(run, micro_batches)
        run.bar.update(1)

        stopping = stop_requested(run, stop_after_steps, signals)
        evaluating = progress.step == run.total_steps or (train_cfg.eval_every and progress.step % train_cfg.eval_every == 0)
        logging = evaluating or progress.step % train_cfg.log_every == 0
        checkpointing = stopping or progress.step % train_cfg.save_every == 0 or progress.step == run.total_steps
        if not (logging or checkpointing):
            continue

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        progress.train_time_s += time.perf_counter() - step_start  # optimizer steps only, without what follows
        if logging:
            record = log_record(run)
            if evaluating:
                evaluate_and_keep_best(run, record)
            write_log_line(run, record)
        if checkpointing:
            started = time.perf_counter()
            save_checkpoint(run)
            run.progress.time_split_s["checkpoints"] += time.perf_counter() - started
        if stopping:
            stopped_by = signals[0] if signals else "stop-after-steps"
            break
        step_start = time.perf_counter()
    run.bar.close()
    return stopped_by


def stop_on_signals() -> list:
    """SIGTERM and Ctrl-C are noted in the returned list; the loop checkpoints and stops at the next step."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def step_batches(run: Run):
    """The micro-batches of each optimizer step to come (grad_accum of them), epoch after epoch, from
    where the run stands: a resumed run skips what it trained on. An incomplete accumulation at the end
    of an epoch is not trained on."""
    progress, grad_accum = run.progress, run.recipe.train.grad_accum
    while progress.step < run.total_steps:
        run.train_loader.set_epoch(progress.epoch)
        loader = run.train_loader
        if progress.batches_in_epoch:
            loader = run.accelerator.skip_first_batches(run.train_loader, progress.batches_in_epoch)
        batches = iter(loader)
        while progress.step < run.total_steps:
            micro_batches = [batch for _, batch in zip(range(grad_accum), batches)]
            if len(micro_batches) < grad_accum:
                break
            yield micro_batches
        if progress.step < run.total_steps:
            progress.epoch += 1
            progress.batches_in_epoch = 0


def train_step(run: Run, micro_batches: list) -> None:
    """One optimizer step over grad_accum micro-batches, then the schedule's step and the run's progress.
    The loss is the token-weighted mean over the whole global batch: each micro-batch's summed loss is
    divided by the number of scored targets in all micro-batches of all processes; plus the method's
    own term, if it has one."""
    from tunebench.metrics import scored_targets

    accelerator, model, train_cfg, since_log = run.accelerator, run.model, run.recipe.train, run.since_log
    step = run.progress.step + 1
    local_scored = sum(scored_targets(batch["labels"]) for batch in micro_batches)
    scored = accelerator.reduce(local_scored, "sum")
    undo_averaging = accelerator.num_processes * train_cfg.grad_accum  # accelerate divides by grad_accum, DDP averages
    for batch in micro_batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                summed_loss, _ = run.loss(model, batch)  # the model's output is not kept past it
            loss, term = summed_loss * undo_averaging / scored, method_loss_term(run)
            accelerator.backward(loss if term is None else loss + term)
            if accelerator.sync_gradients and train_cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            run.optimizer.step()
            if accelerator.sync_gradients and run.method.after_optimizer_step:  # AdaLoRA reads the gradients
                run.method.after_optimizer_step(accelerator.unwrap_model(model), step)
            run.optimizer.zero_grad(set_to_none=True)
        since_log.loss_sum += summed_loss.detach().double()
        if term is not None:  # logged as trained: the term once per scored target gives mean loss + term
            since_log.loss_sum += term.detach().double() * scored_targets(batch["labels"])
        since_log.tokens += batch_tokens(batch)
    since_log.loss_count += local_scored
    run.scheduler.step()
    run.progress.step = step
    run.progress.batches_in_epoch += len(micro_batches)


def method_loss_term(run: Run):
    """The method's own term of the training objective (AdaLoRA's orthogonality penalty), or None.
    It is the same in every micro-batch of a step, and accelerate's division by grad_accum and DDP's
    averaging make the step's gradient that of the term once."""
    if run.method.loss_term is None:
        return None
    with run.accelerator.autocast():
        return run.method.loss_term(run.accelerator.unwrap_model(run.model))


def batch_tokens(batch: dict):
    """The tokens of a batch that are not padding."""
    if "num_tokens" in batch:  # packed rows
        return batch["num_tokens"]
    return batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()



def stop_requested(run: Run, stop_after_steps: int | None, signals: list) -> bool:
    import torch

    stopping = run.progress.step == stop_after_steps or bool(signals)
    if run.accelerator.num_processes > 1:  # a signal reaches processes at different steps: stop together
        stopping = bool(run.accelerator.reduce(torch.tensor(int(stopping), device=run.accelerator.device), "sum").item())
    return stopping


def log_record(run: Run) -> dict:
    """The next log line's figures (without validation); stops the run if the loss is no number."""
    accelerator, progress, since_log = run.accelerator, run.progress, run.since_log
    mean_loss = (accelerator.reduce(since_log.loss_sum, "sum") / accelerator.reduce(since_log.loss_count, "sum")).item()
    progress.tokens += int(accelerator.reduce(since_log.tokens, "sum").item())
    since_log.clear()
    if not math.isfinite(mean_loss):
        accelerator.end_training()
        fail(run,
             f"training loss became {mean_loss} by step {progress.step}; stopped. The last checkpoint is "
             f"{rundir.latest_checkpoint(run.run_dir) or 'none'} (its weights may have diverged already); "
             f"{'final/ holds the model with the best validation loss' if progress.best_step else 'no step was validated, so there is no final/'}. "
             "Lower train.lr or set train.max_grad_norm")
    if progress.best_train_loss is None or mean_loss < progress.best_train_loss:
        progress.best_train_loss = mean_loss
    return {
        "step": progress.step,
        "epoch": round(progress.epoch + progress.batches_in_epoch / max(1, len(run.train_loader)), 4),
        "tokens": progress.tokens,
        "train_loss": mean_loss,
        "lr": run.scheduler.get_last_lr()[0],
        "time": round(progress.train_time_s, 3),
    }


def evaluate_and_keep_best(run: Run, record: dict, scores: tuple = None) -> None:
    """Validate (or take the scores given), note it in the log record, and save final/ when this is
    the best trained model yet: the lowest loss, or the most accurate classifier. The untrained model
    (step 0) is validated for the record but is never final/: a method's result is a model it trained,
    even one worse than where it started, and a search's trials skip writing a model nobody keeps."""
    progress = run.progress
    started = time.perf_counter()
    val, acc = scores or validation_loss(run)
    run.progress.time_split_s["validation"] += time.perf_counter() - started
    record["val_loss"] = val
    if acc is not None:
        record["val_acc"] = acc
    if progress.initial_val_loss is None:
        progress.initial_val_loss = val
    if progress.step == 0:
        if run.method.base_bits(run.recipe.method) == 4:
            # Found, not understood: on a bitsandbytes 4-bit base (0.50.2, CPU) the first training forward fails
            # ("a view of a leaf Variable that requires grad is being used in an in-place operation", in
            # matmul_4bit's `result += bias`) unless the model's state_dict() is taken here, after the untrained
            # validation; taken right after accelerator.prepare it does not help. The step-0 save of final/ took
            # it unseen until final/ stopped keeping step 0; this takes it and writes nothing.
            run.accelerator.get_state_dict(run.model)
        return
    if acc is not None:
        better = progress.best_val_acc is None or acc > progress.best_val_acc
    else:
        better = progress.best_val_loss is None or val < progress.best_val_loss
    if better:
        progress.best_val_loss, progress.best_val_acc, progress.best_step = val, acc, progress.step
        started = time.perf_counter()
        save_final(run)
        run.progress.time_split_s["final_saves"] += time.perf_counter() - started


def validation_loss(run: Run) -> tuple:
    """(mean validation loss over all processes, accuracy for classification or None). The loss is
    computed outside autocast: the prepared model runs its own forward under it in mixed precision."""
    import torch

    from tunebench.metrics import classification_scores

    accelerator, max_batches = run.accelerator, run.recipe.train.eval_max_batches
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.long)
    correct = torch.zeros((), device=accelerator.device, dtype=torch.long)
    own = min(len(run.val_loader), max_batches or len(run.val_loader))
    # A sharded model (FSDP, ZeRO-3) gathers its weights in every forward, with all processes at once: a
    # process whose share has fewer batches runs its first batch again and leaves the result out.
    forwards = int(accelerator.gather(torch.tensor([own], device=accelerator.device)).max().item())
    run.model.eval()
    with torch.no_grad(), untouched_rng(accelerator.device):
        batches, first = iter(run.val_loader), None
        for i in range(forwards):
            batch = next(batches) if i < own else first
            if batch is None:  # no share at all (fewer validation rows than processes): nothing to run again
                break
            first = first or batch
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if run.classify:
                summed_loss, n, right = classification_scores(run.model, batch)
            else:
                summed_loss, n = run.loss(run.model, batch)
            if i < own:
                loss_sum += summed_loss.double()
                count += n
                if run.classify:
                    correct += right
    run.model.train()
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    accuracy = (accelerator.reduce(correct, "sum") / count).item() if run.classify else None
    return (loss_sum / count).item(), accuracy


def validate_untrained(run: Run) -> tuple:
    """validation_loss(run) before the first step, computed once per model, method, data and validation
    setting on this machine and kept (tunebench/cache.py): every trial of a search starts from the same
    model and scores the same rows, so each would compute the same figure to the last digit."""
    if run.accelerator.num_processes > 1:
        return validation_loss(run)
    return tuple(cache.remembered("untrained", untrained_key(run), lambda: validation_loss(run)))


def untrained_key(run: Run) -> str:
    """What the untrained model's validation depends on: the recipe but its training-only keys, the
    model's files, the validation rows as batched, and the software and threads that compute it."""
    import torch
    import transformers

    setting = setting_without(run.recipe, NOT_BEFORE_TRAINING)
    model_dir = Path(run.recipe.model.name)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.iterdir() if f.is_file()) \
        if model_dir.is_dir() else None
    commit = getattr(run.facts.model_config, "_commit_hash", None)  # a hub model's snapshot
    runtime = (torch.__version__, transformers.__version__, str(run.accelerator.device), run.accelerator.mixed_precision,
               torch.get_num_threads(), run.facts.loss, run.facts.packing)
    digest = cache.digest(setting, files, commit, runtime)
    with untouched_rng(run.accelerator.device):
        for i, batch in enumerate(run.val_loader):
            if run.recipe.train.eval_max_batches and i >= run.recipe.train.eval_max_batches:
                break
            for name in sorted(batch):
                digest.update(name.encode())
                digest.update(batch[name].cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def untouched_rng(device):
    """Leaves torch's random state as it was: iterating a data loader draws a seed from it, so without this a
    validation (or one skipped because its scores were cached) would change the next steps' dropout."""
    import torch

    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def save_final(run: Run) -> None:
    """The model or adapter as it is now, in save_pretrained format, replacing final/ whole."""
    accelerator = run.accelerator
    state_dict = accelerator.get_state_dict(run.model)  # gathers ZeRO-3 shards; every process takes part
    if accelerator.is_main_process:
        tmp = rundir.temporary(run.run_dir / "final")
        unwrapped = accelerator.unwrap_model(run.model)
        # PiSSA: saved as a plain LoRA (rank 2r) on the unchanged base, from the adapter as initialised.
        initial = getattr(unwrapped, "initial_adapter_dir", None)
        try:
            if initial:  # peft reads both adapters from the model itself (no ZeRO-3 gathering needed for LoRA)
                unwrapped.save_pretrained(tmp, safe_serialization=True, path_initial_model_for_weight_conversion=initial)
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
        except Exception as e:
            if not failed_write(e):
                raise
            stop_unsaved(run, f"final/ of step {run.progress.step}",
                         f"{str(e).splitlines()[0]}; {rundir.free_mb(run.run_dir):.0f} MB free", tmp)
        rundir.publish(tmp, run.run_dir / "final")
    accelerator.wait_for_everyone()


def write_log_line(run: Run, record: dict) -> None:
    """log.jsonl, the trackers and the progress bar."""
    if run.accelerator.is_main_process:
        rundir.append_log(run.run_dir / "log.jsonl", record)
    run.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
    val = {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}
    if record["train_loss"] is not None:  # the untrained model's line, at step 0, has only its validation
        run.bar.set_postfix(loss=f"{record['train_loss']:.3f}", **val)


def save_checkpoint(run: Run) -> None:
    """Write checkpoints/step-N whole or not at all; stop with a clear line when the disk is short."""
    from tunebench import measure
    from tunebench.methods import unique_params

    accelerator, run_dir, step = run.accelerator, run.run_dir, run.progress.step
    pending = run.since_log.totals(accelerator)  # the loss since the last log line, over all processes
    last = rundir.latest_checkpoint(run_dir)
    needed = measure.dir_size_mb(last) if last else 3 * sum(p.numel() * p.element_size() for p in unique_params(run.model)) / 2**20
    tmp = rundir.temporary(run_dir / "checkpoints" / f"step-{step}")
    problem = None
    if rundir.free_mb(run_dir) < 1.1 * needed:
        problem = f"about {needed:.0f} MB needed, {rundir.free_mb(run_dir):.0f} MB free"
    else:
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every process writes its own files (random states, ZeRO shards)
            if accelerator.is_main_process:
                if run.method.extra_state:
                    from safetensors.torch import save_file

                    save_file({k: t.contiguous() for k, t in run.method.extra_state(accelerator.unwrap_model(run.model)).items()},
                              tmp / METHOD_STATE_FILE)
                state = {**asdict(run.progress), "pending": pending, "scheduler": run.scheduler.state_dict()}
                rundir.seal(tmp, state)
                rundir.publish(tmp, tmp.with_name(f"step-{step}"))
                rundir.prune(run_dir, run.recipe.train.keep_checkpoints)
        except Exception as e:
            if not failed_write(e):
                raise
            problem = str(e).splitlines()[0]
    accelerator.wait_for_everyone()
    if problem:
        stop_unsaved(run, f"the checkpoint of step {step}", problem, tmp)


def failed_write(error: Exception) -> bool:
    """A write that failed: an OSError, or safetensors' own error type, which it raises for a full disk."""
    return isinstance(error, OSError) or "No space left" in str(error)


def stop_unsaved(run: Run, what: str, problem: str, tmp: Path) -> None:
    """One line when `what` could not be written (its half-written folder removed), and how to go on."""
    shutil.rmtree(tmp, ignore_errors=True)
    fail(run, f"cannot save {what} to {run.run_dir} ({problem}); stopped. The last good checkpoint is "
              f"{rundir.latest_checkpoint(run.run_dir) or 'none'}: free disk space and run the same command to resume")


# ---- the end of a run ------------------------------------------------------------------------------

def exit_stopped(run: Run, stopped_by, args) -> None:
    """Stopped early (a checkpoint saved): say how to resume, and exit."""
    run.accelerator.end_training()
    asked = stopped_by == "stop-after-steps"
    why = "stopped as asked" if asked else f"interrupted by {signal.Signals(stopped_by).name}"
    run.accelerator.print(
        f"{why} at step {run.progress.step}/{run.total_steps}; checkpoint saved. "
        f"Resume with the same command: python train.py --recipe {args.recipe} {' '.join(args.overrides)}".rstrip()
    )
    sys.exit(0 if asked else 128 + int(stopped_by))


def finish(run: Run, wall_time_s: float) -> None:
    """summary.json, and the run's last line."""
    result = summary(run, wall_time_s)
    if run.accelerator.is_main_process:
        rundir.write_json(run.run_dir / "summary.json", result)
        print(
            f"done: {run.run_dir}  val loss {result['initial_val_loss']:.4f} -> best {result['best_val_loss']:.4f} "
            f"(step {result['best_step']}{', accuracy %.4f' % result['best_val_acc'] if run.classify else ''}), "
            f"{result['tokens_per_s']:.0f} tokens/s, "
            f"{result['trainable_params']:,} of {result['total_params']:,} parameters trained"
        )
    run.accelerator.end_training()


def summary(run: Run, wall_time_s: float) -> dict:
    """summary.json: the run's figures, measured (see DESIGN.md for the keys that are contract)."""
    from tunebench import measure
    from tunebench.methods import label

    recipe, progress, facts, accelerator = run.recipe, run.progress, run.facts, run.accelerator
    trainable, total = facts.params
    train_cfg, world = recipe.train, accelerator.num_processes
    unwrapped = accelerator.unwrap_model(run.model)
    return {
        "name": recipe.name,
        "method": recipe.method.type,
        "method_label": label(recipe.method),
        "task": recipe.task,
        "model": recipe.model.name,
        "dataset": recipe.data.dataset,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "artifact_mb": measure.dir_size_mb(run.run_dir / "final"),
        "train_time_s": progress.train_time_s,
        "wall_time_s": wall_time_s,
        "time_split_s": {"steps": progress.train_time_s, **{k: round(v, 3) for k, v in progress.time_split_s.items()}},
        "train_tokens": progress.tokens,
        "tokens_per_s": progress.tokens / progress.train_time_s if progress.train_time_s else None,
        "peak_gpu_mem_mb": measure.peak_gpu_mem_mb(),
        "peak_cpu_rss_mb": measure.peak_cpu_rss_mb(),
        "optimizer_state_mb": measure.optimizer_state_mb(run.optimizer),
        "loss": facts.loss,
        "packing": facts.packing,
        "predicted_peak_mb": facts.memory_plan.get("predicted_peak_mb"),
        "memory_plan": facts.memory_plan,
        "initial_val_loss": progress.initial_val_loss,
        "best_train_loss": progress.best_train_loss,
        "best_val_loss": progress.best_val_loss,
        "best_val_acc": progress.best_val_acc,
        "label_names": facts.label_names,  # a classifier's classes, by class id; rebuild its head with them
        "best_step": progress.best_step,
        "final_step": progress.step,
        "max_length": recipe.data.max_length,
        "global_batch": train_cfg.micro_batch_size * train_cfg.grad_accum * world,
        "train_blocks": facts.train_blocks,
        "model_flops_per_token": measure.train_flops_per_token(
            getattr(unwrapped, "config", facts.model_config), trainable, total, recipe.data.max_length
        ),
        "hardware": {**measure.hardware(world, accelerator.mixed_precision, accelerator.distributed_type.value), **facts.threads},
        "versions": measure.versions(),
    }


# ---- main: the outline of a run --------------------------------------------------------------------

@command
def main(argv=None):
    args = parse_args(argv)
    # ---- recipe and run directory: every check before anything is written --------------------
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan:
        from tunebench import plan

        plan.show(recipe, plan.setup_from_config_file(args.config_file), args.budget_gb)
        return
    if args.budget_gb is not None or args.config_file is not None:
        raise UserError("--budget-gb and --config-file go with --plan; to train with a config: accelerate launch --config_file ACCEL train.py ...")
    run_dir = Path(recipe.output_dir)
    run_status = rundir.status(run_dir, recipe)
    if run_status == rundir.FINISHED:
        print(f"run {run_dir} already finished (summary.json); nothing to do. Add overwrite=true to train it again.")
        return

    # ---- the run: set up (torch and the Hugging Face libraries load from here on), train, sum up ----
    setup_start = time.perf_counter()
    run = set_up(recipe, run_dir)
    start_or_resume(run, resuming=run_status == rundir.RESUME)
    run.progress.time_split_s["setup"] += time.perf_counter() - setup_start
    wall_start = time.perf_counter()
    stopped_by = train_loop(run, args.stop_after_steps)
    if stopped_by is not None:
        exit_stopped(run, stopped_by, args)
    finish(run, wall_time_s=time.perf_counter() - wall_start)


if __name__ == "__main__":
    main()
