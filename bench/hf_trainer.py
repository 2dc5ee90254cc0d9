"""The Hugging Face baseline of bench/speed.py: the training train.py does, written the way a user
would write it with transformers.Trainer (and peft for LoRA).

    python bench/hf_trainer.py --model DIR --data-file train.txt --validation-file valid.txt \
        --max-length 512 --micro-batch-size 8 --steps 6 --method full --precision fp32 --out DIR

The data are the very blocks train.py trains on (tunebench.data.build with the same files, length
and seed) through the same collator, so both sides do the same work. --defaults leaves every
TrainingArguments setting at its default apart from output_dir and max_steps (its default batch is
8, like the recipes'); otherwise batch, learning rate, schedule, clipping and precision are set as
the recipe sets them for train.py. Writes DIR/result.json: the time at the end of every optimizer
step, tokens per step, peak memory, parameter counts and model FLOPs per token.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from tunebench import data, measure
from tunebench.methods import count_params, resolve_targets
from tunebench.recipe import load_recipe


class StepTimes(TrainerCallback):
    """perf_counter() when training starts and at the end of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--validation-file", required=True)
    parser.add_argument("--recipe", required=True, help="the train.py recipe whose method and training settings to copy")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--defaults", action="store_true", help="TrainingArguments at their defaults")
    parser.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    recipe = load_recipe(args.recipe, [f"model.name={args.model}", f"data.dataset={args.data_file}"])
    method, train = recipe.method, recipe.train

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data_cfg = dataclasses.replace(recipe.data, validation_file=args.validation_file, max_length=args.max_length)
    train_set, _ = data.build(data_cfg, tokenizer, train.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # SDPA attention by default
    if method.type == "lora":
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=resolve_targets(model, method.targets), fan_in_fan_out=True,  # GPT-2 Conv1D
        ))
    trainable, total = count_params(model)

    if args.defaults:
        training_args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps)
    else:
        training_args = TrainingArguments(
            output_dir=str(out / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=train.grad_accum,
            learning_rate=train.lr,
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            max_grad_norm=train.max_grad_norm,
            lr_scheduler_type=train.scheduler,
            warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the steps
            bf16=args.precision == "bf16",
            use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 on a CPU without it
            torch_compile=args.compile,
            seed=train.seed,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
        )
    step_times = StepTimes()
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set,
        data_collator=data.collate(tokenizer.pad_token_id), callbacks=[step_times],
    )
    measure.reset_peak_gpu_mem()
    output = trainer.train()

    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    result = {
        "step_end_times": [b - step_times.times[0] for b in step_times.times[1:]],
        "tokens_per_step": batch * args.max_length,
        "train_runtime_s": output.metrics["train_runtime"],
        "micro_batch_size": training_args.per_device_train_batch_size,
        "precision": "bf16" if training_args.bf16 else "fp32",
        "optimizer": str(training_args.optim.value),
        "trainable_params": trainable,
        "total_params": total,
        "model_flops_per_token": measure.train_flops_per_token(model.config, trainable, total, args.max_length),
        "peak_cpu_rss_mb": measure.peak_cpu_rss_mb(),
        "peak_gpu_mem_mb": measure.peak_gpu_mem_mb(),
        "final_loss": output.training_loss,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
