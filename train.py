"""Fine-tune a causal language model as a recipe says, and write a run directory.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py --recipe recipes/lora_r16.yaml [KEY=VALUE ...]
    python train.py --recipe recipes/lora_r16.yaml train.max_steps=50      (one process, same code path)

recipe -> model + method -> data -> training loop -> runs/NAME/{recipe.yaml, log.jsonl, checkpoints/, final/, summary.json}
The hardware (CPU, GPUs, DeepSpeed ZeRO, mixed precision) comes from the accelerate config only.
"""
import argparse
import math
import shutil
import signal
import sys
import time
from pathlib import Path

from tunebench.errors import UserError, exit_with
from tunebench.inputs import positive, positive_number


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        exit_with(UserError(f"{message} (usage: train.py --recipe RECIPE.yaml [KEY=VALUE ...])"))


def parse_args(argv=None):
    parser = _Parser(description=__doc__.splitlines()[0])
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


def main(argv=None):
    args = parse_args(argv)
    from tunebench import rundir
    from tunebench.recipe import flatten, load_recipe

    # ---- recipe and run directory: every check before anything is written --------------------
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.plan:
            from tunebench import plan

            plan.show(recipe, plan.setup_from_config_file(args.config_file), args.budget_gb)
            return
        if args.budget_gb is not None or args.config_file is not None:
            raise UserError("--budget-gb and --config-file go with --plan; to train with a config: accelerate launch --config_file ACCEL train.py ...")
        run_dir = Path(recipe["output_dir"])
        state = rundir.status(run_dir, recipe)
    except UserError as e:
        exit_with(e)
    if state == rundir.FINISHED:
        print(f"run {run_dir} already finished (summary.json); nothing to do. Add overwrite=true to train it again.")
        return

    # Heavy imports only once the recipe is known to be good, so bad input is answered at once.
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from tunebench import data, distributed, measure, plan
    from tunebench.methods import apply_method, count_params, unique_params
    from tunebench.metrics import causal_nll, classification_nll, scored_targets
    from tunebench.models import check_context, enable_gradient_checkpointing, load_config, load_model, load_tokenizer

    m, d, t = recipe["model"], recipe["data"], recipe["train"]
    classify = recipe["task"] == "classification"  # a classification head, scored by validation accuracy
    nll_of = classification_nll if classify else causal_nll

    try:
        process_kwargs = distributed.accelerator_kwargs()
    except UserError as e:
        exit_with(e)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t["grad_accum"], sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t["seed"]),
        log_with=t["trackers"] or None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
        **process_kwargs,
    )
    main_process = accelerator.is_main_process
    set_seed(t["seed"])

    # ---- model, method, data ---------------------------------------------------------------------
    try:
        config = load_config(m)
        check_context(config, recipe)
        if t["optimizer"] == "paged_adamw_8bit" and not torch.cuda.is_available():
            raise UserError("train.optimizer paged_adamw_8bit pages optimizer state to a GPU; use adamw_8bit on a CPU")
        if accelerator.state.deepspeed_plugin is not None:
            distributed.check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, t, accelerator.num_processes)
        memory_plan = plan.predict_for_summary(recipe, config, accelerator)  # before the model loads: see tunebench/plan.py
        measure.set_cpu_allocator(exact_rss=t["exact_cpu_rss"])
        tokenizer = load_tokenizer(m)
        with accelerator.main_process_first():  # the main process tokenizes and caches, the others read the cache
            train_set, val_set = data.build(d, tokenizer, t["seed"], recipe["task"])
        model = load_model(m, train_set.label_names, tokenizer.pad_token_id)
        if m["gradient_checkpointing"]:
            enable_gradient_checkpointing(model)
        set_seed(t["seed"])  # the method's random init (LoRA A) must not depend on how loading drew numbers (ZeRO-3 does)
        model = apply_method(model, recipe["method"], tokenizer)
        trainable, total = count_params(model)
        if t["compile"]:
            model.compile()  # in place: the same module and state_dict keys, compiled on the first batches

        collate = data.collate(tokenizer.pad_token_id)
        # The loader's own generator: starting an epoch's iterator must not draw from the global RNG,
        # or a resumed run would see other dropout masks than an uninterrupted one.
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=t["micro_batch_size"], shuffle=True, drop_last=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(t["seed"]),
        )
        # Each process scores its own share of the validation blocks, none twice (no padding of shards).
        val_share = torch.utils.data.Subset(val_set, range(accelerator.process_index, len(val_set), accelerator.num_processes))
        val_loader = torch.utils.data.DataLoader(val_share, batch_size=t["micro_batch_size"], collate_fn=collate)
        batches_per_process = len(train_set) // (t["micro_batch_size"] * accelerator.num_processes)
        steps_per_epoch = batches_per_process // t["grad_accum"]
        if steps_per_epoch == 0:
            raise UserError(
                f"the training data has {len(train_set)} blocks of {d['max_length']} tokens, fewer than one step's "
                f"{t['micro_batch_size'] * t['grad_accum'] * accelerator.num_processes} "
                "(micro_batch_size x grad_accum x processes); use more data or a smaller batch"
            )
    except UserError as e:
        exit_with(e)
    total_steps = t["max_steps"] or t["epochs"] * steps_per_epoch

    # ---- optimizer and schedule --------------------------------------------------------------------
    params = [p for p in unique_params(model) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # no decay on biases and norms
    ]
    groups = [g for g in groups if g["params"]]
    betas = (t["adam_beta1"], t["adam_beta2"])
    if t["optimizer"] == "adamw":
        # One fused kernel per step instead of a loop of elementwise passes (the Trainer's default too).
        optimizer = torch.optim.AdamW(groups, lr=t["lr"], betas=betas, fused=accelerator.device.type in ("cpu", "cuda"))
    elif t["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t["lr"], momentum=0.9)
    else:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.PagedAdamW8bit if t["optimizer"] == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        optimizer = optimizer_class(groups, lr=t["lr"], betas=betas)
    warmup = t["warmup_steps"] or math.ceil(t["warmup_ratio"] * total_steps)
    schedule = {"constant": "constant_with_warmup"}.get(t["scheduler"], t["scheduler"])
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # A checkpoint holds what training changes: frozen weights are the base model's, loaded again on
    # resume. A LoRA checkpoint of GPT-2 small is then a few MB instead of 500. (DeepSpeed writes its own.)
    frozen = set() if accelerator.state.deepspeed_plugin else {
        name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad
    }
    if frozen:
        def drop_frozen_weights(models, weights, output_dir):
            for state in weights:
                for name in frozen & state.keys():
                    del state[name]

        accelerator.register_save_state_pre_hook(drop_frozen_weights)

    # ---- start fresh or resume ---------------------------------------------------------------------
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "train_time_s": 0.0,
                "best_val_loss": None, "best_step": None, "best_train_loss": None, "initial_val_loss": None,
                "best_val_acc": None}
    if state == rundir.RESUME:
        if main_process:
            rundir.recover(run_dir)
            rundir.set_aside_damaged(run_dir)  # resume from the newest intact checkpoint
        accelerator.wait_for_everyone()
        checkpoint = rundir.latest_checkpoint(run_dir)
        accelerator.load_state(str(checkpoint), **({"strict": False} if frozen else {}))
        progress = rundir.read_json(checkpoint / rundir.STATE_FILE)
        scheduler.load_state_dict(progress.pop("scheduler"))  # kept as JSON: no pickle is ever loaded
        if main_process:
            rundir.truncate_log(run_dir / "log.jsonl", progress["step"])
            print(f"resuming {run_dir} from {checkpoint.name}")
    elif main_process:
        rundir.start(run_dir, recipe)
    accelerator.wait_for_everyone()
    if t["trackers"]:
        accelerator.init_trackers(recipe["name"], config={k: str(v) for k, v in flatten(recipe).items()})

    def fail(message):
        """A run that cannot go on (not bad input): one line, exit status 1, the run directory kept."""
        bar.close()  # the progress bar would otherwise print after the message
        if main_process:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def validation_loss():
        """(mean validation loss, accuracy for classification or None)."""
        model.eval()
        nll_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        count = torch.zeros((), device=accelerator.device, dtype=torch.long)
        correct = torch.zeros((), device=accelerator.device, dtype=torch.long)
        with torch.no_grad():
            for i, batch in enumerate(val_loader):
                if t["eval_max_batches"] and i >= t["eval_max_batches"]:
                    break
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
                nll, n = nll_of(logits, batch["labels"])
                nll_sum += nll.double()
                count += n
                if classify:
                    correct += (logits.argmax(-1) == batch["labels"]).sum()
        model.train()
        nll_sum, count = accelerator.reduce(nll_sum, "sum"), accelerator.reduce(count, "sum")
        accuracy = (accelerator.reduce(correct, "sum") / count).item() if classify else None
        return (nll_sum / count).item(), accuracy

    def save_final():
        """The model or adapter as it is now, in save_pretrained format, replacing final/ whole."""
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process takes part
        if main_process:
            tmp = rundir.temporary(run_dir / "final")
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            rundir.publish(tmp, run_dir / "final")
        accelerator.wait_for_everyone()

    def save_checkpoint():
        """Write checkpoints/step-N whole or not at all; stop with a clear line when the disk is short."""
        last = rundir.latest_checkpoint(run_dir)
        needed = measure.dir_size_mb(last) if last else 3 * sum(p.numel() * p.element_size() for p in unique_params(model)) / 2**20
        tmp = rundir.temporary(run_dir / "checkpoints" / f"step-{progress['step']}")
        problem = None
        if rundir.free_mb(run_dir) < 1.1 * needed:
            problem = f"about {needed:.0f} MB needed, {rundir.free_mb(run_dir):.0f} MB free"
        else:
            try:
                accelerator.save_state(str(tmp))
                accelerator.wait_for_everyone()  # every process writes its own files (random states, ZeRO shards)
                if main_process:
                    rundir.seal(tmp, {**progress, "scheduler": scheduler.state_dict()})
                    rundir.publish(tmp, tmp.with_name(f"step-{progress['step']}"))
                    rundir.prune(run_dir, t["keep_checkpoints"])
            except OSError as e:
                problem = str(e)
        accelerator.wait_for_everyone()
        if problem:
            shutil.rmtree(tmp, ignore_errors=True)
            fail(
                f"cannot save the checkpoint of step {progress['step']} to {run_dir} ({problem}); stopped. "
                f"The last good checkpoint is {last or 'none'}: free disk space and run the same command to resume"
            )

    def evaluate_and_keep_best(record):
        val, acc = validation_loss()
        record["val_loss"] = val
        if classify:
            record["val_acc"] = acc
        if progress["initial_val_loss"] is None:
            progress["initial_val_loss"] = val
        if classify:  # the best model is the most accurate one
            better = progress["best_val_acc"] is None or acc > progress["best_val_acc"]
        else:
            better = progress["best_val_loss"] is None or val < progress["best_val_loss"]
        if better:
            progress["best_val_loss"], progress["best_val_acc"], progress["best_step"] = val, acc, progress["step"]
            save_final()

    # ---- training loop -----------------------------------------------------------------------------
    measure.reset_peak_gpu_mem()
    log_path = run_dir / "log.jsonl"
    world = accelerator.num_processes
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)  # since the last log line
    loss_count = torch.zeros((), device=accelerator.device, dtype=torch.long)
    tokens_seen = torch.zeros((), device=accelerator.device, dtype=torch.long)
    pending = progress.pop("pending", None)
    if pending and main_process:  # totals over all processes: one process carries them
        loss_sum += pending["loss_sum"]
        loss_count += pending["loss_count"]
        tokens_seen += pending["tokens"]
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not accelerator.is_local_main_process, desc=recipe["name"])
    wall_start = time.perf_counter()
    interrupted = None

    if progress["step"] == 0 and progress["best_val_loss"] is None:
        record = {"step": 0, "epoch": 0.0, "tokens": 0, "train_loss": None, "lr": scheduler.get_last_lr()[0], "time": 0.0}
        evaluate_and_keep_best(record)
        if main_process:
            rundir.append_log(log_path, record)

    model.train()
    step_start = time.perf_counter()
    while progress["step"] < total_steps and interrupted is None:
        train_loader.set_epoch(progress["epoch"])
        loader = train_loader
        if progress["batches_in_epoch"]:
            loader = accelerator.skip_first_batches(train_loader, progress["batches_in_epoch"])
        batches = iter(loader)
        while progress["step"] < total_steps:
            micro = [b for _, b in zip(range(t["grad_accum"]), batches)]
            if len(micro) < t["grad_accum"]:
                break  # an incomplete accumulation at the end of an epoch is not trained on
            # Token-weighted mean over the whole global batch: each micro-batch's summed NLL is
            # divided by the number of scored tokens in all micro-batches of all processes.
            local_scored = sum(scored_targets(b["labels"]) for b in micro)
            scored = accelerator.reduce(local_scored, "sum")
            for b in micro:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
                        nll, _ = nll_of(logits, b["labels"])
                        del logits  # not kept past the loss: at the next forward it would be a second copy
                    # accelerate divides by grad_accum and DDP averages over processes: undo both.
                    accelerator.backward(nll * (world * t["grad_accum"]) / scored)
                    if accelerator.sync_gradients and t["max_grad_norm"]:
                        accelerator.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += nll.detach().double()
                tokens_seen += b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
            loss_count += local_scored
            scheduler.step()
            progress["step"] += 1
            progress["batches_in_epoch"] += t["grad_accum"]
            bar.update(1)

            stopping = progress["step"] == args.stop_after_steps or bool(stop_signal)
            if world > 1:  # a signal reaches processes at different steps: stop together
                stopping = bool(accelerator.reduce(torch.tensor(int(stopping), device=accelerator.device), "sum").item())
            evaluating = progress["step"] == total_steps or (t["eval_every"] and progress["step"] % t["eval_every"] == 0)
            logging = evaluating or progress["step"] % t["log_every"] == 0
            checkpointing = stopping or progress["step"] % t["save_every"] == 0 or progress["step"] == total_steps
            if not (logging or checkpointing):
                continue

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            progress["train_time_s"] += time.perf_counter() - step_start
            if logging:
                mean_loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(loss_count, "sum")).item()
                progress["tokens"] += int(accelerator.reduce(tokens_seen, "sum").item())
                loss_sum.zero_(), loss_count.zero_(), tokens_seen.zero_()
                if not math.isfinite(mean_loss):
                    accelerator.end_training()
                    fail(
                        f"training loss became {mean_loss} by step {progress['step']}; stopped. The last checkpoint is "
                        f"{rundir.latest_checkpoint(run_dir) or 'none'} (its weights may have diverged already); final/ "
                        "holds the model with the best validation loss. Lower train.lr or set train.max_grad_norm"
                    )
                if progress["best_train_loss"] is None or mean_loss < progress["best_train_loss"]:
                    progress["best_train_loss"] = mean_loss
                record = {
                    "step": progress["step"],
                    "epoch": round(progress["epoch"] + progress["batches_in_epoch"] / max(1, len(train_loader)), 4),
                    "tokens": progress["tokens"],
                    "train_loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "time": round(progress["train_time_s"], 3),
                }
                if evaluating:
                    evaluate_and_keep_best(record)
                if main_process:
                    rundir.append_log(log_path, record)
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=progress["step"])
                bar.set_postfix(loss=f"{mean_loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            if checkpointing:
                # The loss and tokens since the last log line travel with the checkpoint, so that a resumed
                # run writes the same next log line as an uninterrupted one.
                progress["pending"] = {
                    "loss_sum": accelerator.reduce(loss_sum, "sum").item(),
                    "loss_count": int(accelerator.reduce(loss_count, "sum").item()),
                    "tokens": int(accelerator.reduce(tokens_seen, "sum").item()),
                }
                save_checkpoint()
            if stopping:
                interrupted = stop_signal[0] if stop_signal else "stop-after-steps"
                break
            step_start = time.perf_counter()
        if progress["step"] < total_steps and interrupted is None:
            progress["epoch"] += 1
            progress["batches_in_epoch"] = 0
    bar.close()

    if interrupted is not None:
        accelerator.end_training()
        why = "stopped as asked" if interrupted == "stop-after-steps" else f"interrupted by {signal.Signals(interrupted).name}"
        accelerator.print(
            f"{why} at step {progress['step']}/{total_steps}; checkpoint saved. "
            f"Resume with the same command: python train.py --recipe {args.recipe} {' '.join(args.overrides)}".rstrip()
        )
        sys.exit(0 if interrupted == "stop-after-steps" else 128 + int(interrupted))

    # ---- summary -----------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "name": recipe["name"],
        "method": recipe["method"]["type"],
        "task": recipe["task"],
        "model": m["name"],
        "dataset": d["dataset"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "artifact_mb": measure.dir_size_mb(run_dir / "final"),
        "train_time_s": progress["train_time_s"],
        "wall_time_s": time.perf_counter() - wall_start,
        "train_tokens": progress["tokens"],
        "tokens_per_s": progress["tokens"] / progress["train_time_s"] if progress["train_time_s"] else None,
        "peak_gpu_mem_mb": measure.peak_gpu_mem_mb(),
        "peak_cpu_rss_mb": measure.peak_cpu_rss_mb(),
        "optimizer_state_mb": measure.optimizer_state_mb(optimizer),
        "predicted_peak_mb": memory_plan.get("predicted_peak_mb"),
        "memory_plan": memory_plan,
        "initial_val_loss": progress["initial_val_loss"],
        "best_train_loss": progress["best_train_loss"],
        "best_val_loss": progress["best_val_loss"],
        "best_val_acc": progress["best_val_acc"],
        "label_names": train_set.label_names,  # a classifier's classes, by class id; rebuild its head with them
        "best_step": progress["best_step"],
        "final_step": progress["step"],
        "max_length": d["max_length"],
        "global_batch": t["micro_batch_size"] * t["grad_accum"] * world,
        "train_blocks": len(train_set),
        "model_flops_per_token": measure.train_flops_per_token(
            getattr(unwrapped, "config", config), trainable, total, d["max_length"]
        ),
        "hardware": measure.hardware(world, accelerator.mixed_precision, accelerator.distributed_type.value),
        "versions": measure.versions(),
    }
    if main_process:
        rundir.write_json(run_dir / "summary.json", summary)
        print(
            f"done: {run_dir}  val loss {summary['initial_val_loss']:.4f} -> best {summary['best_val_loss']:.4f} "
            f"(step {summary['best_step']}{', accuracy %.4f' % summary['best_val_acc'] if classify else ''}), "
            f"{summary['tokens_per_s']:.0f} tokens/s, "
            f"{trainable:,} of {total:,} parameters trained"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
