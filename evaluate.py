"""Evaluate a finished run, or a model as it is (the baseline row), on perplexity, LAMBADA and generation tasks.

    python evaluate.py --run runs/NAME [--tasks wikitext2,lambada]      writes runs/NAME/eval.json
    python evaluate.py --model gpt2 --tasks wikitext2 [--out runs/baseline]
    python evaluate.py --model M --tasks ppl --data-file text.txt --max-length 512 --stride 256
    python evaluate.py report runs/A runs/B ... --out reports/NAME       (tables and plots: tunebench/report.py)

Tasks (--tasks; a run's default is its recipe's eval.tasks):
  wikitext2, wikitext103, imdb, ppl   perplexity of the test split (or --data-file) read as one text, tokenized
                                      once, every token scored exactly once in windows of --max-length tokens
                                      that start every --stride tokens (tunebench.metrics.sliding_windows); the
                                      first token is predicted from the BOS token (end-of-text without one), as
                                      lm-evaluation-harness does. ppl, word_ppl (per whitespace word), bits_per_byte.
                                      A conversation or prompt/completion file is scored example by example as
                                      training builds it; --assistant-only scores the tokens training scores.
  lambada                             last-word accuracy (greedy, whole word) and target-word perplexity.
  continuation, summarization,        batched greedy (or --num-beams) generation, scored with BLEU, sacreBLEU,
  instruction, conversation           ROUGE-1/2/L/Lsum, TER, chrF and METEOR (tunebench.metrics.generation_scores).
  lm_eval:NAME                        a task of lm-evaluation-harness (or of --lm-eval-include DIR), run through its own
                                      API on the model as loaded: figures with their standard errors, version, few-shot.
A run's final/ is a full model, or an adapter / soft prompt loaded on the recipe's base model. Results go to
eval.json (merged with the other tasks an earlier evaluation of the same model wrote) and print as a table.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from tunebench.errors import ArgumentParser, UserError, command
from tunebench.inputs import positive, seed
from tunebench.recipe import DataSettings, ModelSettings, Recipe, load_recipe

TASKS = {
    "wikitext2": "perplexity on the WikiText-2 (raw) test split",
    "wikitext103": "perplexity on the WikiText-103 (raw) test split",
    "imdb": "perplexity on the IMDB test reviews",
    "ppl": "perplexity on --data-file",
    "lambada": "last-word accuracy and perplexity on LAMBADA (OpenAI) test, or on --data-file lines",
    "continuation": "a text's first --prompt-tokens tokens in, its next --max-new-tokens tokens as reference "
                    "(WikiText-2 test paragraphs, or --data-file)",
    "summarization": "article + 'TL;DR:' in, the highlights as reference: CNN/DailyMail 3.0.0 test, a run's own "
                     "summarization data, or --data-file (article, highlights)",
    "instruction": "Alpaca prompt in, the response as reference: Alpaca's held-out share, a run's own instruction or "
                   "prompt/completion data, or --data-file (instruction, input, output; or prompt, completion)",
    "conversation": "a conversation up to its last assistant turn in, through the chat template training uses, that turn "
                    "as reference: a run's own conversation data, or --data-file (messages, or ShareGPT conversations)",
}
PERPLEXITY_TASKS = ("wikitext2", "wikitext103", "imdb", "ppl")
GENERATION_TASKS = ("continuation", "summarization", "instruction", "conversation")
DATA_FILE_TASKS = ("ppl", "lambada", "continuation", "summarization", "instruction", "conversation")
# The formats of tunebench.data whose rows a generation task reads.
TASK_FORMATS = {"instruction": ("instruction", "prompt_completion"), "summarization": ("summarization",)}
# Default perplexity batch: as many windows as make this many tokens. A CPU gains nothing from
# larger batches (measured: bench/README.md) while a GPU needs them to be busy.
TOKENS_PER_BATCH = {"cuda": 8192, "cpu": 2048}

# Where instruction and summarization read when neither a run's recipe nor --data-file names the data.
DEFAULT_DATA = {"instruction": "alpaca", "summarization": "cnn_dailymail"}
STOP = {"instruction": "###"}  # Alpaca's next section: a model that goes on past its response starts one


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog="tasks: " + "; ".join(f"{k}: {v}" for k, v in TASKS.items()),
                            usage_hint="evaluate.py --run RUN_DIR | --model NAME [--tasks a,b] ...")
    parser.add_argument("--run", help="a run directory with final/ (its recipe gives the base model and eval.tasks)")
    parser.add_argument("--model", help="hub id, local folder or .gguf file, evaluated as it is")
    parser.add_argument("--out", help="with --model: write DIR/eval.json and a baseline DIR/summary.json")
    parser.add_argument("--tasks", help=f"comma-separated, from: {', '.join(TASKS)}, or lm_eval:NAME (an lm-eval task)")
    parser.add_argument("--data-file", help=f"local text/jsonl file for the tasks {', '.join(DATA_FILE_TASKS)}")
    parser.add_argument("--assistant-only", action="store_true",
                        help="ppl of a conversation or prompt/completion file: score only the assistant turns (the "
                             "completions), the tokens training scores; default: every token")
    parser.add_argument("--also-ppl", action="append", default=[], metavar="NAME=FILE",
                        help="also the perplexity of FILE (like task ppl), stored in eval.json as task NAME, e.g. general=general.txt")
    parser.add_argument("--max-length", type=positive, help="window / prompt+generation length (default: model context)")
    parser.add_argument("--stride", type=positive, help="perplexity window step (default: half of --max-length)")
    parser.add_argument("--max-tokens", type=positive, help="perplexity over the first N tokens of the text only")
    parser.add_argument("--batch-size", type=positive,
                        help=f"windows or examples per forward pass (default: windows of {TOKENS_PER_BATCH['cuda']} tokens on a GPU, {TOKENS_PER_BATCH['cpu']} on a CPU; 8 examples)")
    parser.add_argument("--limit", type=positive, help="lambada and generation tasks: the first N examples only")
    parser.add_argument("--num-beams", type=positive, default=1, help="1: greedy decoding (default); more: beam search")
    parser.add_argument("--max-new-tokens", type=positive, default=64, help="generation length limit (default 64)")
    parser.add_argument("--prompt-tokens", type=positive, default=64, help="continuation: prompt length in tokens (default 64)")
    parser.add_argument("--seed", type=seed, default=42, help="generation seed; without a run's recipe, also the seed of "
                        "the test share held out of a data set that has no test split (train.seed's default, 42)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast dtype; auto: bf16 (or fp16) on a GPU, fp32 on a CPU")
    add_lm_eval_args(parser)
    add_judge_args(parser)
    parser.add_argument("--check-args", action="store_true",
                        help="check these arguments and exit (a suite does so with its eval_args before training)")
    return parser.parse_args(argv)



# ---- the request: every check on the arguments before a model loads --------------------------------

@dataclass
class Request:
    run_dir: Path | None  # a trained run, or None for --model
    recipe: Recipe | None  # the run's recipe
    tasks: list
    out_dir: Path | None  # where eval.json goes (None: printed only)
    name: str  # whose results eval.json holds
    earlier: dict  # the eval.json an earlier evaluation of the same model wrote
    also: list  # [(NAME, FILE)]: more texts scored like task ppl (--also-ppl)
    harness: object = None  # lm-eval's TaskManager when lm_eval: tasks are asked for (their data loaded and checked)
    harness_types: frozenset = frozenset()  # their request types: multiple_choice, loglikelihood, generate_until, ...


def check_request(args) -> Request:
    from tunebench import inputs

    if bool(args.run) == bool(args.model):
        raise UserError("give either --run RUN_DIR (a trained run) or --model NAME_OR_PATH (a model as it is)")
    if args.run and args.out:
        raise UserError("--out is for --model; a run's results go to RUN_DIR/eval.json")
    run_dir = Path(args.run) if args.run else None
    if run_dir is not None:
        if not (run_dir / "recipe.yaml").is_file():
            raise UserError(f"'{run_dir}' is not a run directory (no recipe.yaml); give runs/NAME of a train.py run")
        if not (run_dir / "final").is_dir():
            raise UserError(f"run '{run_dir}' has no final/ model yet; train it first (python train.py --recipe {run_dir}/recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml") if run_dir else None
    if recipe and recipe.task != "causal_lm":
        raise UserError(f"run '{run_dir}' is a {recipe.task} run: its accuracy is best_val_acc in summary.json; "
                        "evaluate.py scores causal language models")
    tasks = requested_tasks(args, recipe, run_dir)
    harness, harness_types = harness_tasks(args, tasks)
    if args.data_file:
        inputs.existing_file(args.data_file, "--data-file")
        if not any(t in DATA_FILE_TASKS for t in tasks):
            raise UserError(f"--data-file is read by the tasks {', '.join(DATA_FILE_TASKS)}; none of them is in --tasks")
    also = [text.partition("=")[::2] for text in args.also_ppl]
    for also_name, file in also:
        if not also_name or not file or also_name in TASKS or also_name in tasks:
            raise UserError(f"--also-ppl '{also_name}={file}': give NAME=FILE with a NAME that is not a task, e.g. general=general.txt")
        inputs.existing_file(file, "--also-ppl file")
    if "ppl" in tasks and not args.data_file:
        raise UserError(f"task ppl needs --data-file FILE ({TASKS['ppl']})")
    if "conversation" in tasks and not args.data_file and not recipe:
        raise UserError("task conversation needs --data-file (rows of messages, ShareGPT conversations, or prompt and "
                        "completion as turns) with --model")
    out_dir = run_dir or (inputs.writable_folder(args.out, "--out") if args.out else None)
    name = str(run_dir) if run_dir else args.model
    damaged = "; delete it to evaluate again"
    if args.out and (out_dir / "summary.json").is_file() and inputs.read_json_object(out_dir / "summary.json", advice=damaged).get("method") != "baseline":
        raise UserError(f"--out '{out_dir}' holds a training run; give a new folder for the baseline")
    earlier = inputs.read_json_object(out_dir / "eval.json", advice=damaged) if out_dir and (out_dir / "eval.json").is_file() else {}
    if args.out and earlier and earlier.get("model") != name:
        raise UserError(f"'{out_dir / 'eval.json'}' holds results of '{earlier.get('model')}', not '{name}'; give another --out")
    return Request(run_dir, recipe, tasks, out_dir, name, earlier, also, harness, harness_types)


def requested_tasks(args, recipe: Recipe | None, run_dir) -> list:
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    elif recipe and recipe.eval.tasks:
        tasks = list(recipe.eval.tasks)
    elif args.lm_eval or args.forgetting_lm_eval:
        tasks = []
    else:
        where = f"the recipe of '{run_dir}' has empty eval.tasks" if recipe else "--model has no default tasks"
        raise UserError(f"no tasks: {where}; give --tasks, e.g. --tasks wikitext2,lambada")
    from tunebench.lm_eval_tasks import KEY_PREFIX, names

    tasks += [KEY_PREFIX + name for name in names(args.lm_eval) + names(args.forgetting_lm_eval)
              if KEY_PREFIX + name not in tasks]
    for task in tasks:
        if task not in TASKS and not (task.startswith(KEY_PREFIX) and task != KEY_PREFIX):
            raise UserError(f"unknown task '{task}'; choose from {', '.join(TASKS)}, or lm_eval:NAME for a task of "
                            "lm-evaluation-harness (--lm-eval NAME does the same)")
    return tasks


# ---- the model and how every task runs it ----------------------------------------------------------

@dataclass
class Scorer:
    """The model under evaluation and the settings every task runs it with."""
    model: object
    tokenizer: object
    device: object
    precision: str  # fp32, bf16 or fp16 (autocast)
    max_length: int  # perplexity window; prompt + generated tokens
    stride: int  # perplexity window step
    virtual_tokens: int  # a soft prompt's, which take positions of the context

    def autocast(self):
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    @property
    def start_id(self) -> int:
        """What the first token is predicted from: BOS, or end-of-text without one."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def window(args, context, virtual_tokens: int) -> tuple:
    """(--max-length, --stride) with their defaults, checked against the model's context."""
    room = f" minus {virtual_tokens} virtual tokens of the soft prompt" if virtual_tokens else ""
    if context is None and not args.max_length:
        raise UserError("the model's context length is unknown; give --max-length")
    if args.max_length and context and args.max_length + virtual_tokens > context:
        raise UserError(f"--max-length {args.max_length} is beyond the model's context of {context} positions{room}; "
                        f"use {context - virtual_tokens} or less")
    max_length = args.max_length or context - virtual_tokens
    stride = args.stride or max(1, max_length // 2)
    if stride > max_length:
        limit = f"--max-length {max_length}" if args.max_length else f"the window of {max_length} tokens (the model's context{room})"
        raise UserError(f"--stride {stride} is larger than {limit}: tokens between windows would never be scored; "
                        "use a stride of at most the window length")
    return max_length, stride


def load_scorer(args, request: Request) -> Scorer:
    """A run's full model, its adapter or soft prompt on the recipe's base model, or a model as it is."""
    import torch

    from tunebench.methods import quantization_kwargs
    from tunebench.models import context_length, load_adapter, load_adapter_config, load_config, load_model, load_tokenizer

    run_dir, recipe = request.run_dir, request.recipe
    if run_dir:
        final = run_dir / "final"
        adapter = (final / "adapter_config.json").is_file()
        final_model = replace(recipe.model, name=str(final), gguf_file=None, revision=None)
        model_cfg = recipe.model if adapter else final_model
        tokenizer_cfg = final_model  # train.py saves the tokenizer beside the model or adapter
        peft_config = load_adapter_config(final) if adapter else None
        if not (run_dir / "summary.json").is_file():
            print(f"note: run '{run_dir}' has no summary.json (not finished); evaluating its best model so far")
    else:
        model_cfg = tokenizer_cfg = ModelSettings(name=args.model)
        peft_config = None
    # A soft prompt's virtual tokens take positions of the context: the text gets the rest.
    virtual_tokens = peft_config.num_virtual_tokens if peft_config is not None and peft_config.is_prompt_learning else 0
    max_length, stride = window(args, context_length(load_config(model_cfg)), virtual_tokens)
    tokenizer = load_tokenizer(tokenizer_cfg)
    # A QLoRA adapter is evaluated on the 4-bit base it was trained on.
    model = load_model(model_cfg, quantization=quantization_kwargs(recipe.method, model_cfg) if run_dir and peft_config is not None else None)
    if peft_config is not None:
        model = load_adapter(model, run_dir / "final")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    return Scorer(model, tokenizer, device, precision, max_length, stride, virtual_tokens)


# ---- where a task's rows come from -----------------------------------------------------------------

def section(dataset: str, **keys) -> DataSettings:
    """A recipe data section that reads `dataset` with tunebench.data."""
    return DataSettings(dataset=dataset, **keys)


def test_rows(data_cfg: DataSettings) -> tuple:
    """(rows, where they come from): all rows of a local file (--data-file), or a registered or hub
    data set's test split."""
    from tunebench import data_rows

    raw, _ = data_rows.load_raw(data_cfg)
    if Path(data_cfg.dataset).is_file():
        return raw["train"], data_cfg.dataset
    if "test" not in raw:
        raise UserError(f"data set '{data_cfg.dataset}' has no test split; it has {', '.join(raw)}")
    return raw["test"], f"{data_cfg.dataset} test"


def held_out_rows(data_cfg: DataSettings, seed: int, data_file) -> tuple:
    """Rows no run trained or validated on: --data-file's, or else the test rows of the run's data
    set, its test split or the test share train.py holds out (the same rows for the same recipe and seed)."""
    from tunebench import data_rows

    if data_file:
        return test_rows(data_cfg)
    raw, spec = data_rows.load_raw(data_cfg)
    *_, test = data_rows.split_rows(raw, data_cfg, spec, seed)
    if "test" in raw and test is raw["test"]:
        return test, f"{data_cfg.dataset} test"
    return test, f"{data_cfg.dataset} test (share {data_cfg.validation_share}, seed {seed})"


def column(rows, name: str, source: str) -> list:
    if name not in rows.column_names:
        raise UserError(f"'{source}' has no field '{name}'; its fields are {', '.join(rows.column_names)}")
    return rows[name]


# ---- the tasks: one function each, (scorer, args) -> the task's results ----------------------------

def perplexity_task(task: str, scorer: Scorer, args, data_file=None) -> dict:
    """wikitext2, wikitext103, imdb, ppl (of data_file, default --data-file): the text read as one
    string, every token scored once."""
    from tunebench import data_rows, metrics

    data_file = data_file or args.data_file
    examples_format = file_format(data_file) if task == "ppl" else None
    if examples_format in ("conversation", "prompt_completion"):
        return example_perplexity(scorer, args, data_file, examples_format)
    if args.assistant_only and task == "ppl":
        raise UserError(f"--assistant-only scores conversation or prompt/completion files; '{data_file}' is read as "
                        f"{examples_format or 'text'}")
    if task == "ppl" and Path(data_file).suffix.lower() in (".txt", ".text"):
        source = data_file
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--data-file '{source}' is not UTF-8 text") from None
    else:
        # A data set's documents become one text joined by blank lines (Hugging Face's perplexity recipe).
        rows, source = test_rows(section(data_file if task == "ppl" else task))
        field = "text" if task == "ppl" else data_rows.REGISTRY[task]["text_field"]
        text = "\n\n".join(column(rows, field, source))
    tokenizer = scorer.tokenizer
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast, verbose=False)
    ids = encoding["input_ids"]
    if not ids:
        raise UserError(f"'{source}' holds no text to score")
    if args.max_tokens and args.max_tokens < len(ids):
        ids = ids[: args.max_tokens]
        text = text[: encoding["offset_mapping"][len(ids) - 1][1]] if tokenizer.is_fast else tokenizer.decode(ids)
    batch_size = args.batch_size or max(1, TOKENS_PER_BATCH[scorer.device.type] // scorer.max_length)
    scoring = time.perf_counter()
    with scorer.autocast():
        result = metrics.perplexity(scorer.model, ids, scorer.start_id, scorer.max_length, scorer.stride, batch_size,
                                    tokenizer.pad_token_id, desc=task)
    return {
        **metrics.text_perplexities(result["nll"], result["tokens"], text),
        "max_length": scorer.max_length, "stride": scorer.stride, "windows": result["windows"],
        "tokens_per_s": len(ids) / (time.perf_counter() - scoring),
        "batch_size": batch_size, "precision": scorer.precision, "data": source,
        ITEMS_KEY: {"unit": "window", "nll": result["window_nll"], "tokens": result["window_tokens"]},
    }


def lambada_task(scorer: Scorer, args) -> dict:
    """lm-evaluation-harness's lambada_openai: context up to the last space, target " " + the last
    word, the target's tokens being those the whole text has beyond the context's."""
    from tunebench import metrics

    rows, source = test_rows(section(args.data_file or "lambada"))
    texts = [t.strip() for t in column(rows, "text", source) if t and t.strip()]
    examples = []
    for text in texts[: args.limit]:
        context_ids = scorer.encode(text.rpartition(" ")[0])
        examples.append((context_ids or [scorer.start_id], scorer.encode(text)[len(context_ids) :]))
    batch_size = args.batch_size or 8
    with scorer.autocast():
        result = metrics.last_word(scorer.model, examples, scorer.max_length, batch_size, scorer.tokenizer.pad_token_id,
                                   desc="lambada")
    return {**result, "batch_size": batch_size, "precision": scorer.precision, "data": source}


def continuation_examples(scorer: Scorer, args, room: int) -> tuple:
    """A text's first --prompt-tokens tokens, and its next --max-new-tokens tokens as the reference."""
    if args.prompt_tokens > room:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} + --max-new-tokens {args.max_new_tokens} "
                        f"exceed the {scorer.max_length} tokens of --max-length")
    rows, source = test_rows(section(args.data_file or "wikitext2"))
    examples = []
    for text in column(rows, "text", source):
        ids = scorer.encode(text.strip()) if text else []
        if len(ids) >= args.prompt_tokens + args.max_new_tokens:
            reference = scorer.tokenizer.decode(ids[args.prompt_tokens : args.prompt_tokens + args.max_new_tokens])
            examples.append((ids[: args.prompt_tokens], reference))
        if len(examples) == args.limit:
            break
    if not examples:
        raise UserError(f"'{source}' has no text of at least {args.prompt_tokens + args.max_new_tokens} tokens "
                        "(--prompt-tokens + --max-new-tokens)")
    return examples, source


def file_format(data_file) -> str | None:
    """The format tunebench.data_rows reads a local file in by its shape, or None (text, or no known shape)."""
    from tunebench import data_rows

    if Path(data_file).suffix.lower() in (".txt", ".text"):
        return None
    rows, _ = test_rows(section(data_file))
    try:
        return data_rows.recognise_shape(rows.column_names, str(data_file))[0]
    except UserError:
        return None


def run_format(recipe: Recipe) -> tuple:
    """(format, fields) of the data a run trained on, resolved as train.py resolved it (a local file
    without a format is read by its shape; a hub set named by its id alone is taken as text here)."""
    from tunebench import data_rows

    data_cfg = recipe.data
    spec = data_rows.REGISTRY.get(data_cfg.dataset, {})
    columns = None
    if recipe.task == "causal_lm" and not (spec or data_cfg.format) and Path(data_cfg.dataset).exists():
        raw, _ = data_rows.load_raw(data_cfg)
        columns = next(iter(raw.values())).column_names
    fmt, fields, _ = data_rows.resolve_format(data_cfg, recipe.task, spec, columns)
    return fmt, fields


def conversation_rows(args, recipe: Recipe | None) -> tuple:
    """(data section, rows, where from, where their turns are: tunebench.data_rows.turns_source) of the
    conversations task conversation reads: --data-file's, or the rows a run trained on them held out."""
    from tunebench import data_rows

    if args.data_file:
        data_cfg, seed = section(args.data_file), args.seed
        fmt = file_format(args.data_file)
        fields = dict(data_rows.FORMAT_DEFAULTS.get(fmt, {}))
    elif recipe:
        data_cfg, seed = recipe.data, recipe.train.seed
        fmt, fields = run_format(recipe)
    else:
        data_cfg = fmt = fields = None
    if fmt in ("conversation", "prompt_completion"):
        rows, source = held_out_rows(data_cfg, seed, args.data_file)
        turns = data_rows.turns_source(rows, fmt, fields, f"'{source}'")
        if turns is not None:
            return replace(data_cfg, chat_template=fields.get("chat_template")), rows, source, turns
    raise UserError("task conversation reads conversations of turns: give --data-file (rows of messages, ShareGPT "
                    "conversations, or prompt and completion as turns) or --run of a run trained on them")


def example_perplexity(scorer: Scorer, args, data_file, fmt: str) -> dict:
    """Perplexity of a conversation or prompt/completion file, each example built as training builds
    it (cut to --max-length the same way) and scored alone: every token, or with --assistant-only
    the assistant turns (completions) and their end-of-turn tokens only."""
    import torch

    from tunebench import chat, data, data_rows, metrics

    data_cfg = section(data_file, max_length=scorer.max_length, train_on_prompt=not args.assistant_only)
    rows, source = test_rows(data_cfg)
    fields = dict(data_rows.FORMAT_DEFAULTS[fmt])
    turns = data_rows.turns_source(rows, fmt, fields, f"'{source}'")
    if turns is not None:
        template, how = chat.choose_template(scorer.tokenizer, data_cfg.chat_template)
        tokens = data.tokenize_conversations(data_rows.turn_rows(rows, turns, f"'{source}'"), scorer.tokenizer, template, data_cfg)
        tokens = data.usable_conversations(tokens, f"'{source}'", scorer.max_length)
        source = f"{source}, {how}"
    else:
        pairs = data_rows.pair_rows(rows, fmt, fields, data_cfg, f"'{source}'")
        tokens = data.tokenize_pairs(pairs, scorer.tokenizer, fields["template"], data_cfg, False)
    if args.limit:
        tokens = tokens.select(range(min(args.limit, len(tokens))))
    examples = tokens.with_format("torch", columns=["input_ids", "labels"])
    batch_size = args.batch_size or 8
    collate = data.collate(scorer.tokenizer.pad_token_id)
    example_nll, example_tokens = [], []
    with torch.no_grad(), scorer.autocast():
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            batch = {k: v.to(scorer.device) for k, v in batch.items()}
            logits = scorer.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            batch_nll, batch_scored = metrics.row_nll(logits, batch["labels"])
            example_nll += batch_nll.double().tolist()
            example_tokens += batch_scored.tolist()
    nll, scored = math.fsum(example_nll), sum(example_tokens)
    return {"ppl": math.exp(nll / scored) if scored else None, "nll_per_token": nll / scored if scored else None,
            "tokens": scored, "examples": len(examples), "scored": "assistant turns" if args.assistant_only else "every token",
            "max_length": scorer.max_length, "batch_size": batch_size, "precision": scorer.precision, "data": source,
            ITEMS_KEY: {"unit": "example", "nll": example_nll, "tokens": example_tokens}}


def conversation_examples(scorer: Scorer, args, recipe: Recipe | None, room: int) -> tuple:
    """A conversation up to its last assistant turn, through the chat template training uses (the
    same tokens, tunebench.chat.encode), and that turn as the reference. A prompt longer than the
    room the generated tokens leave keeps its end."""
    from tunebench import chat, data_rows

    data_cfg, rows, source, turns = conversation_rows(args, recipe)
    template, how = chat.choose_template(scorer.tokenizer, data_cfg.chat_template)
    examples, skipped = [], 0
    for row in data_rows.turn_rows(rows, turns, f"'{source}'")["turns"]:
        try:
            messages = chat.turns(row)
            ids, spans = chat.encode(scorer.tokenizer, template, messages)
        except chat.BadConversation:
            skipped += 1
            continue
        examples.append((ids[: spans[-1][0]][-room:], messages[-1]["content"]))
        if len(examples) == args.limit:
            break
    if skipped:
        print(f"conversation: skipped {skipped} rows of '{source}' that cannot be rendered (see train.py's data lines)")
    return examples, f"{source}, {how}"


def prompt_response_examples(task: str, scorer: Scorer, args, recipe: Recipe | None, room: int) -> tuple:
    """Instruction or summarization prompts through the template training uses (tunebench.data):
    a run trained in this format brings its own data set, fields and template, and is scored on
    the rows it did not train on; otherwise the registered set with the format's defaults. The
    prompt side is built as training builds it (data.fit_prompt_side) in the room the generated
    tokens leave; if the template and input alone are too long, the side keeps its end."""
    from tunebench import data, data_rows

    trained_format = None
    if recipe:
        trained_format, run_fields = run_format(recipe)
    if trained_format in TASK_FORMATS[task]:
        data_cfg, fields, seed = recipe.data, run_fields, recipe.train.seed
    else:
        data_cfg, fields, seed = section(DEFAULT_DATA[task]), dict(data_rows.FORMAT_DEFAULTS[task]), args.seed
    if args.data_file:
        data_cfg = section(args.data_file)
    rows, source = held_out_rows(data_cfg, seed, args.data_file)
    if args.data_file and task == "instruction" and {"prompt", "completion"} <= set(rows.column_names) \
            and "instruction" not in rows.column_names:
        fields = dict(data_rows.FORMAT_DEFAULTS["prompt_completion"])
        if len(rows) and isinstance(rows[0]["prompt"], list):
            raise UserError(f"'{source}' holds prompt and completion as lists of turns: evaluate them with --tasks conversation")
    rows = data_rows.pair_rows(rows, task, fields, data_cfg, f"'{source}'")
    limit = data_cfg.max_response_chars
    rows = rows.filter(lambda row: bool(row["response"] and row["response"].strip())
                       and (limit is None or len(row["response"]) <= limit))
    if args.limit:
        rows = rows.select(range(min(args.limit, len(rows))))
    variants = data.template_variants(fields["template"])
    examples = []
    for row in rows:
        pieces = data.render(variants[bool(row.get("input"))], row["prompt"], "", row.get("input") or "")
        head, prompt, middle, _ = (scorer.encode(piece) for piece in pieces)
        examples.append((data.fit_prompt_side(head, prompt, middle, room)[-room:], row["response"]))
    return examples, f"{source}, template {fields['template']!r}"


def generation_task(task: str, scorer: Scorer, args, recipe: Recipe | None = None) -> dict:
    """continuation, summarization, instruction: batched generation scored against the references."""
    from transformers import set_seed

    from tunebench import metrics

    room = scorer.max_length - args.max_new_tokens
    if room <= 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {scorer.max_length} tokens")
    if task == "continuation":
        examples, source = continuation_examples(scorer, args, room)
    elif task == "conversation":
        examples, source = conversation_examples(scorer, args, recipe, room)
    else:
        examples, source = prompt_response_examples(task, scorer, args, recipe, room)
    if not examples:
        raise UserError(f"'{source}' has no example for task {task}")
    set_seed(args.seed)
    batch_size = args.batch_size or 8
    tokenizer = scorer.tokenizer
    with scorer.autocast():
        generated = metrics.generate(scorer.model, [p for p, _ in examples], batch_size, args.max_new_tokens, args.num_beams,
                                     tokenizer.pad_token_id, tokenizer.eos_token_id, desc=task)
    hypotheses = tokenizer.batch_decode(generated, skip_special_tokens=True)
    if task in STOP:
        hypotheses = [h.split(STOP[task])[0] for h in hypotheses]
    scores = metrics.generation_scores([h.strip() for h in hypotheses], [r.strip() for _, r in examples])
    per_example = scores.pop("per_example")
    return {
        **scores, "decoding": "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams",
        "max_new_tokens": args.max_new_tokens, "batch_size": batch_size, "precision": scorer.precision, "data": source,
        **({"prompt_tokens": args.prompt_tokens} if task == "continuation" else {}),
        GENERATIONS_KEY: generation_records(scorer, examples, hypotheses),
        ITEMS_KEY: {"unit": "example", **per_example},
    }


# ---- generations.jsonl: what each model wrote, for the report's side-by-side view and the judge ------

GENERATIONS_KEY = "_generations"  # carried in a generation task's result until main() takes it out


def generation_records(scorer: Scorer, examples: list, hypotheses: list) -> list:
    """One record per example: the prompt as the model read it, the reference and the output as scored."""
    return [{"id": i, "prompt": scorer.tokenizer.decode(prompt, skip_special_tokens=True), "reference": reference.strip(),
             "output": output.strip()} for i, ((prompt, reference), output) in enumerate(zip(examples, hypotheses))]


def take_generations(results: dict) -> dict:
    """{task: records} taken out of the task results (eval.json holds scores; generations.jsonl the texts)."""
    return {task: values.pop(GENERATIONS_KEY) for task, values in results.items() if GENERATIONS_KEY in values}


# Per-item losses and scores (windows of a text, examples), kept in eval.json's "items" for the report's
# paired bootstrap: every run is scored on the same items, so differences are paired item by item.
ITEMS_KEY = "_items"


def take_items(results: dict) -> dict:
    return {task: values.pop(ITEMS_KEY) for task, values in results.items() if ITEMS_KEY in values}


def write_generations(out_dir: Path, generations: dict) -> None:
    """generations.jsonl beside eval.json: one line per example ({task, id, prompt, reference, output}
    and the judge's verdicts when asked); the lines of tasks not evaluated this time are kept."""
    import json

    from tunebench import rundir

    kept = [r for r in rundir.read_generations(out_dir) if r.get("task") not in generations]
    records = kept + [{"task": task, **record} for task, task_records in generations.items() for record in task_records]
    rundir.write_atomic(out_dir / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---- lm-evaluation-harness tasks (tunebench/lm_eval_tasks.py) ---------------------------------------

def add_lm_eval_args(parser) -> None:
    group = parser.add_argument_group("lm-evaluation-harness tasks (tunebench/lm_eval_tasks.py)")
    group.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks (or groups), e.g. "
                       "hellaswag,arc_easy; stored in eval.json as lm_eval:NAME (same as --tasks lm_eval:NAME)")
    group.add_argument("--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAMLs (with local "
                       "data files: offline)")
    group.add_argument("--lm-eval-fewshot", type=int, metavar="N", help="few-shot examples per prompt (default: each task's own)")
    group.add_argument("--lm-eval-limit", type=positive, metavar="N", help="the first N documents of each task only "
                       "(default: all)")
    group.add_argument("--forgetting-lm-eval", metavar="TASKS", help="lm-eval tasks that are the forgetting measure "
                       "(a suite's forgetting: {lm_eval: [...]}): run like --lm-eval and marked so in eval.json")
    group.add_argument("--forgetting-metric", default="acc", help="the figure of those tasks that forgetting is "
                       "measured on (default acc)")


def harness_tasks(args, tasks: list) -> tuple:
    """(lm-eval's TaskManager, the tasks' request types) for the lm_eval: tasks asked for ((None, {}) without
    any): every name checked and every task's data loaded, before a model loads (so a failure writes nothing)
    and, with --check-args, before a suite trains (a hub task offline fails the suite at once)."""
    from tunebench import lm_eval_tasks

    wanted = [task.removeprefix(lm_eval_tasks.KEY_PREFIX) for task in tasks if task.startswith(lm_eval_tasks.KEY_PREFIX)]
    if not wanted:
        if args.lm_eval_include or args.lm_eval_fewshot is not None or args.lm_eval_limit:
            raise UserError("--lm-eval-include, --lm-eval-fewshot and --lm-eval-limit are for lm-eval tasks; name some "
                            "with --lm-eval NAME")
        return None, frozenset()
    if args.lm_eval_fewshot is not None and args.lm_eval_fewshot < 0:
        raise UserError(f"--lm-eval-fewshot {args.lm_eval_fewshot}: give 0 or more examples")
    manager = lm_eval_tasks.task_manager(wanted, args.lm_eval_include)
    return manager, frozenset(task.OUTPUT_TYPE for task in lm_eval_tasks.load_tasks(manager, wanted).values())


def harness_results(scorer: Scorer, args, request: Request) -> tuple:
    """({eval.json key: figures}, {key: per-document items}) of every lm_eval: task, in one harness run."""
    from tunebench import lm_eval_tasks

    wanted = [t.removeprefix(lm_eval_tasks.KEY_PREFIX) for t in request.tasks if t.startswith(lm_eval_tasks.KEY_PREFIX)]
    if scorer.virtual_tokens and "generate_until" in request.harness_types:
        raise UserError("lm-eval generation tasks do not run on a soft prompt (peft repeats its virtual tokens when "
                        "generating with a cache); its loglikelihood and multiple-choice tasks do")
    batch_size = args.batch_size or 8
    lm = lm_eval_tasks.harness_model(scorer.model, scorer.tokenizer, scorer.max_length, batch_size)
    with scorer.autocast():
        figures, items = lm_eval_tasks.run(lm, request.harness, wanted, args.lm_eval_limit, args.lm_eval_fewshot)
    for record in figures.values():
        record.update(batch_size=batch_size, precision=scorer.precision)
    return figures, items


def run_task(task: str, scorer: Scorer, args, recipe: Recipe | None = None) -> dict:
    if task in PERPLEXITY_TASKS:
        return perplexity_task(task, scorer, args)
    if task == "lambada":
        return lambada_task(scorer, args)
    return generation_task(task, scorer, args, recipe)


# ---- the judge: generated answers scored by a model behind an OpenAI-compatible endpoint (tunebench/judge.py) --

def add_judge_args(parser) -> None:
    group = parser.add_argument_group("judge (off unless --judge is given; see tunebench/judge.py)")
    group.add_argument("--judge", metavar="URL", help="OpenAI-compatible endpoint of a judge model, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--judge-model", help="the judge's model name at that endpoint")
    group.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the key "
                       "(default OPENAI_API_KEY; unset is fine for a local server); the key is never written or printed")
    group.add_argument("--judge-prompt", help="absolute-score prompt file (default recipes/judge/absolute.txt)")
    group.add_argument("--judge-pairwise-prompt", help="pairwise prompt file (default recipes/judge/pairwise.txt)")
    group.add_argument("--judge-against", metavar="DIR", help="the baseline's evaluation folder (its generations.jsonl): "
                       "also the win rate against its answers, each pair asked in both orders")
    group.add_argument("--judge-examples", type=positive, help="judge the first N examples of each generation task (default: all)")
    group.add_argument("--judge-temperature", type=float, default=0.0, help="the judge's sampling temperature (default 0)")
    group.add_argument("--judge-timeout", type=float, default=60.0, help="seconds to wait for one answer (default 60)")
    group.add_argument("--judge-retries", type=int, default=2, help="retries of a timed-out, rate-limited, failed or "
                       "malformed answer before it is counted as failed (default 2)")
    group.add_argument("--judge-cache", default=".cache/judge", help="folder of cached judgements (default .cache/judge)")


def judge_from_args(args, request: Request):
    """The judge the arguments ask for (None without --judge), every argument checked before a model loads."""
    from tunebench import inputs, judge

    if not args.judge:
        given = [name for name in ("judge_model", "judge_prompt", "judge_pairwise_prompt", "judge_against", "judge_examples")
                 if getattr(args, name) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --judge URL (the judge is off unless --judge is given)")
        return None
    if not args.judge.startswith(("http://", "https://")):
        raise UserError(f"--judge '{args.judge}' is not an http(s) URL; give the endpoint, e.g. http://127.0.0.1:8000/v1")
    if not args.judge_model:
        raise UserError("--judge needs --judge-model NAME (the judge's model name at that endpoint)")
    if not any(task in GENERATION_TASKS for task in request.tasks):
        raise UserError(f"--judge scores generated answers; --tasks has none of the generation tasks {', '.join(GENERATION_TASKS)}")
    if not (0 <= args.judge_temperature <= 2) or args.judge_timeout <= 0 or not (0 <= args.judge_retries <= 10):
        raise UserError("--judge-temperature must lie in 0..2, --judge-timeout above 0, --judge-retries in 0..10")
    if args.judge_against and not (Path(args.judge_against) / "generations.jsonl").is_file():
        raise UserError(f"--judge-against '{args.judge_against}' has no generations.jsonl; give the baseline's folder "
                        "after evaluating it on the same generation task (evaluate.py --model ... --out DIR)")
    inputs.writable_folder(args.judge_cache, "--judge-cache")
    absolute = judge.load_prompt(args.judge_prompt or judge.PROMPTS / "absolute.txt", judge.ABSOLUTE_FIELDS, "--judge-prompt")
    pairwise = judge.load_prompt(args.judge_pairwise_prompt or judge.PROMPTS / "pairwise.txt", judge.PAIRWISE_FIELDS,
                                 "--judge-pairwise-prompt")
    return judge.Judge(args.judge, args.judge_model, absolute, pairwise, temperature=args.judge_temperature,
                       timeout_s=args.judge_timeout, retries=args.judge_retries, cache_dir=Path(args.judge_cache),
                       key_env=args.judge_key_env, examples=args.judge_examples)


def judge_generations(the_judge, args, generations: dict, results: dict) -> None:
    """Each generation task's first --judge-examples answers scored, and with --judge-against compared
    with the baseline's; the figures join the task's results, the verdicts its generations.jsonl lines."""
    from tunebench import judge, rundir

    baseline = rundir.read_generations(args.judge_against) if args.judge_against else []
    for task, records in generations.items():
        chosen = records[: the_judge.examples]
        results[task].update(judge.score_absolute(the_judge, chosen))
        if args.judge_against:
            results[task].update(judge.win_rate(the_judge, chosen, [r for r in baseline if r.get("task") == task]))
        print(f"judge {task}: score {results[task]['judge_score']}, win rate {results[task].get('judge_win_rate')}, "
              f"{results[task]['judge_failed']} failed; {the_judge.requests} requests, {the_judge.cache_hits} cached")


# ---- eval.json and the table -----------------------------------------------------------------------

def evaluation_record(args, request: Request, scorer: Scorer, results: dict, times: dict) -> dict:
    from tunebench import measure

    recipe = request.recipe
    return {
        "model": request.name,
        "base_model": recipe.model.name if recipe else args.model,
        "method": recipe.method.type if recipe else "baseline",
        "tasks": results,
        "settings": {"device": str(scorer.device), "precision": scorer.precision,
                     "model_dtype": str(scorer.model.dtype).removeprefix("torch."), "seed": args.seed,
                     "max_length": scorer.max_length, "stride": scorer.stride, "max_tokens": args.max_tokens,
                     "limit": args.limit, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                     "data_file": args.data_file, "context_token": scorer.tokenizer.convert_ids_to_tokens(scorer.start_id),
                     "virtual_tokens": scorer.virtual_tokens},
        "time_s": times,
        "hardware": measure.hardware(),
        "versions": measure.versions(),
    }


def forgetting_record(args, results: dict) -> dict:
    """Which lm-eval tasks and figure are the forgetting measure (tunebench/verdict.py reads it)."""
    from tunebench.lm_eval_tasks import KEY_PREFIX, names

    tasks = [KEY_PREFIX + name for name in names(args.forgetting_lm_eval)]
    for task in tasks:
        if args.forgetting_metric not in results[task]:
            figures = [k for k, v in results[task].items() if isinstance(v, float) and not k.endswith("_stderr")]
            raise UserError(f"--forgetting-metric {args.forgetting_metric}: lm-eval task '{task.removeprefix(KEY_PREFIX)}' "
                            f"reports {', '.join(figures)}; pick one of them")
    higher = {results[t]["higher_is_better"].get(args.forgetting_metric, True) for t in tasks}
    return {"measure": "lm-eval", "tasks": tasks, "metric": args.forgetting_metric, "higher_is_better": all(higher)}


def write_results(evaluation: dict, request: Request, args, model) -> None:
    """eval.json, merged with the tasks an earlier evaluation of the same model wrote; for --model
    also a baseline summary.json."""
    from tunebench import rundir
    from tunebench.methods import count_params

    out_dir = request.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation["tasks"] = {**request.earlier.get("tasks", {}), **evaluation["tasks"]}
    evaluation["time_s"] = {**request.earlier.get("time_s", {}), **evaluation["time_s"]}
    evaluation["items"] = {**request.earlier.get("items", {}), **evaluation["items"]}
    if "forgetting" not in evaluation and "forgetting" in request.earlier:
        evaluation["forgetting"] = request.earlier["forgetting"]
    rundir.write_json(out_dir / "eval.json", evaluation)
    if args.model:
        _, total = count_params(model)
        rundir.write_json(out_dir / "summary.json", {"name": out_dir.name, "method": "baseline", "model": args.model,
                                                     "trainable_params": 0, "total_params": total})


def print_table(name: str, scorer: Scorer, results: dict) -> None:
    print(f"\n{name} ({scorer.precision} on {scorer.device})")
    print(f"{'task':<14} {'metric':<20} value")
    for task, values in results.items():
        for i, (metric, value) in enumerate(values.items()):
            shown = f"{value:.4f}" if isinstance(value, float) else "null" if value is None else str(value)
            print(f"{task if i == 0 else '':<14} {metric:<20} {shown}")


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from tunebench import report

        return report.main(argv[1:])
    args = parse_args(argv)
    if args.check_args:
        if args.tasks or args.lm_eval or args.forgetting_lm_eval:  # a suite passes its tasks; --model m loads nothing
            harness_tasks(args, requested_tasks(args, None, None))
        return
    request = check_request(args)
    the_judge = judge_from_args(args, request)
    if the_judge is not None:
        the_judge.check_reachable()

    from tunebench import distributed, measure

    threads = distributed.use_every_core()
    measure.set_cpu_allocator(exact_rss=False)
    started = time.perf_counter()
    scorer = load_scorer(args, request)
    results, times = {}, {"load_model": round(time.perf_counter() - started, 3)}
    for task in request.tasks:
        if task in TASKS:
            started = time.perf_counter()
            results[task] = run_task(task, scorer, args, request.recipe)
            times[task] = round(time.perf_counter() - started, 3)
    harness_items = {}
    if request.harness is not None:
        started = time.perf_counter()
        figures, harness_items = harness_results(scorer, args, request)
        results.update(figures)
        times["lm_eval"] = round(time.perf_counter() - started, 3)
    for name, file in request.also:
        started = time.perf_counter()
        results[name] = perplexity_task("ppl", scorer, args, file)
        times[name] = round(time.perf_counter() - started, 3)

    generations = take_generations(results)
    items = {**take_items(results), **harness_items}
    if the_judge is not None:
        judge_generations(the_judge, args, generations, results)
    evaluation = evaluation_record(args, request, scorer, results, times)
    evaluation["items"] = items
    if args.forgetting_lm_eval:
        evaluation["forgetting"] = forgetting_record(args, results)
    if the_judge is not None:
        evaluation["judge"] = the_judge.settings(args.judge_against)
    evaluation["hardware"].update(threads)
    if request.out_dir is not None:
        write_results(evaluation, request, args, scorer.model)
        if generations:
            write_generations(request.out_dir, generations)
    print_table(request.name, scorer, results)
    if request.out_dir is not None:
        print(f"\nwritten: {request.out_dir / 'eval.json'}")


if __name__ == "__main__":
    main()
