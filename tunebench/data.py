"""A recipe's data section -> training examples: formats, templates, tokenization, masking, batches.

A recipe's data section names a data set (a registered name, a hub id, or local files) and a
format; tunebench/data_rows.py reads its rows, and here every format ends in token sequences with
labels, where label -100 is never scored. build() is the way in.

  text           documents joined with the end-of-text token and cut into blocks of data.max_length
                 tokens (packed); every token is scored. The last block may be shorter.
  instruction    a prompt and a response through a template (Alpaca's by default): the loss is on
                 the response and the end-of-text token after it (data.train_on_prompt: true scores
                 the prompt too). A response too long for data.max_length is cut at its end.
  summarization  like instruction with the "tldr" template (article, "\\nTL;DR:", summary); the
                 article is cut instead, so the summary always fits in data.max_length.
  prompt_completion  TRL's prompt and completion strings: the completion (and the end-of-text token)
                 follows the prompt as it is (template "completion"); the loss is on the completion.
                 Prompt and completion as lists of turns are one conversation through the chat
                 template, the loss on the completion's assistant turns.
  conversation   rows of turns (`messages` of role/content, or ShareGPT's `conversations` of
                 from/value) through the model's chat template (tunebench/chat.py); the loss is on
                 every assistant turn. OpenAssistant message trees: each assistant reply with the
                 prompter message it answers, through the "oasst" template.
  classification (task: classification) a text and a label; the text is cut to data.max_length.

Formatted examples are packed into rows of data.max_length tokens where that is exact
(tunebench/packing.py: position ids restart per example, attention stays inside each example; train.py
decides, see data.packing in the README); otherwise each is one row, and the collator pads a
batch to its longest row (dynamic padding) with label -100. Padding is never scored and no
example attends to another. Batches are drawn in the data loader's seeded random order, never bucketed by length:
bucketing would change which examples share a batch, and so the gradient noise, by method.

Tokenization is cached by the datasets library under a fingerprint of the data, the tokenizer and
every setting that shapes the examples.
"""
import hashlib
import os
import re

import numpy as np
import torch

from tunebench import chat, data_rows
from tunebench.errors import UserError
from tunebench.metrics import IGNORE_INDEX  # the label no loss scores
from tunebench.recipe import DataSettings

# Prompt templates: {prompt} and {response} stand for the mapped fields, {input} for the optional
# input field. A pair is (without input, with input), chosen per row by whether its input is empty.
_ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
TEMPLATES = {
    "alpaca": (
        _ALPACA_HEAD.format("") + "### Instruction:\n{prompt}\n\n### Response:\n{response}",
        _ALPACA_HEAD.format(", paired with an input that provides further context")
        + "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n{response}",
    ),
    "tldr": "{prompt}\nTL;DR: {response}",
    "oasst": "### Human: {prompt} ### Assistant: {response}",
    "plain": "{prompt}\n{response}",
    "completion": "{prompt}{response}",
}
PLACEHOLDERS = ("prompt", "input", "response")


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token}|{text}".encode()).hexdigest()[:16]


def _fingerprint(ds, tokenizer, *settings) -> str:
    """The cache key of a tokenized data set: its rows, the tokenizer and every setting that shapes it."""
    text = "|".join(map(str, (ds._fingerprint, tokenizer_fingerprint(tokenizer), *settings)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- text: packed -----------------------------------------------------------------------------------

def tokenize(ds, tokenizer, text_field: str, num_proc=None):
    """Token ids of every non-empty row; cached on disk by the datasets library."""
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_field]], batched=True, num_proc=num_proc)
    return ds.map(
        lambda batch: {"input_ids": tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]},
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        new_fingerprint=_fingerprint(ds, tokenizer, text_field),
        desc="tokenizing",
    )


class Examples(torch.utils.data.Dataset):
    """Token sequences with labels (per token, or one class per row); the collator pads them.
    Packed blocks are one case of it; formatted rows are read lazily from the tokenized table."""

    def __init__(self, input_ids, labels, label_names: list = None, packable: bool = False):
        self.input_ids, self.labels, self.label_names = input_ids, labels, label_names
        # One prompt/response example or conversation per row, labels per token: rows train.py may pack.
        self.packable = packable

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def num_tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))


def pack(token_ds, eos_id: int, max_length: int) -> Examples:
    """Join documents with the end-of-text token and cut the stream into max_length blocks."""
    docs = token_ds.with_format("numpy")["input_ids"]
    eos = np.array([eos_id], dtype=np.int64)
    stream = np.concatenate([part for doc in docs for part in (np.asarray(doc, dtype=np.int64), eos)])
    blocks = [torch.from_numpy(stream[i : i + max_length].copy()) for i in range(0, len(stream), max_length)]
    return Examples(blocks, blocks)


# ---- prompt and response: instruction, summarization, conversation -----------------------------------

def template_variants(template: str) -> tuple:
    """(without input, with input) for a built-in template's name or a template text."""
    value = TEMPLATES.get(template, template)
    variants = value if isinstance(value, tuple) else (value, value)
    for text in variants:
        names = re.findall(r"\{(\w*)\}", text)
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if "{" not in text:
            raise UserError(
                f"data.template '{template}' is neither a built-in template ({', '.join(TEMPLATES)}) nor a text "
                "with {prompt} and {response}, e.g. 'Question: {prompt}\\nAnswer: {response}'"
            )
        in_order = names.count("prompt") == names.count("response") == 1 and text.index("{prompt}") < text.index("{response}")
        if unknown or not in_order:
            raise UserError(
                f"data.template {template!r} must hold {{prompt}} once, then {{response}} once, and may hold {{input}}"
                + (f"; it names {', '.join('{' + n + '}' for n in unknown)}" if unknown else "")
            )
    return variants


def render(template: str, prompt: str, response: str, input_text: str = "") -> tuple:
    """A template filled in, as (text before the prompt, the prompt, text after it, target text).
    The target is the response with the template's text after it. The pieces are tokenized apart,
    so spaces that end a piece begin the next: GPT-2's tokens carry their leading space
    ("TL;DR:" + " The", not "TL;DR: " + "The")."""
    head, rest = template.split("{prompt}")
    middle, after = rest.split("{response}")
    head, middle, after = (part.replace("{input}", input_text) for part in (head, middle, after))
    head_end, middle_end = head.rstrip(" "), middle.rstrip(" ")
    return head_end, head[len(head_end):] + prompt, middle_end, middle[len(middle_end):] + response + after


def fit_prompt_side(head: list, prompt: list, middle: list, room: int) -> list:
    """The prompt side of a row (token ids of the template's head, the prompt, the template's text
    before the response) in `room` tokens: the prompt is cut at its end to fit. Training and
    evaluate.py build it with this one function."""
    return head + prompt[: max(0, room - len(head) - len(middle))] + middle


def tokenize_pairs(ds, tokenizer, template: str, data_cfg: DataSettings, cut_prompt: bool, num_proc=None):
    """input_ids = prompt side + target + end-of-text; labels = the target tokens, -100 elsewhere
    (or all tokens with data.train_on_prompt). Rows too long for data.max_length are cut: the
    prompt (cut_prompt: summarization's article) or else the target's end; a row where nothing of
    the target, or nothing of the prompt, would remain is dropped. Column "cut" marks cut rows."""
    variants = template_variants(template)
    max_length, eos = data_cfg.max_length, tokenizer.eos_token_id
    train_on_prompt = data_cfg.train_on_prompt

    def encode(texts):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def fn(batch):
        inputs = batch["input"] if "input" in batch else [None] * len(batch["prompt"])
        pieces = [
            render(variants[bool(i)], p or "", r, i or "") for p, r, i in zip(batch["prompt"], batch["response"], inputs)
        ]
        out = {"input_ids": [], "labels": [], "cut": []}
        for head, prompt, middle, target in zip(*(encode(column) for column in zip(*pieces))):
            target = target + [eos]
            over = len(head) + len(prompt) + len(middle) + len(target) - max_length
            if over > 0 and cut_prompt and over >= len(prompt):
                continue
            if over > 0 and not cut_prompt:
                if over >= len(target):
                    continue
                target = target[: len(target) - over]
            prompt_side = fit_prompt_side(head, prompt, middle, max_length - len(target))
            out["input_ids"].append(prompt_side + target)
            out["labels"].append(prompt_side + target if train_on_prompt else [IGNORE_INDEX] * len(prompt_side) + target)
            out["cut"].append(over > 0)
        return out

    settings = (variants, max_length, cut_prompt, train_on_prompt)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, *settings), desc="tokenizing")


def tokenize_conversations(ds, tokenizer, template: str, data_cfg: DataSettings, num_proc=None):
    """Rows of turn_rows -> input_ids = the conversation through the chat template; labels = every
    assistant turn's reply and end-of-turn token from first_scored on, -100 elsewhere (all tokens
    with data.train_on_prompt). A conversation longer than data.max_length keeps its turns up to
    the last assistant turn that fits (column "cut"); column "problem" says why a row gives no
    example ("" when it does): a bad row (chat.BadConversation), or "too long" when not even its
    first reply fits."""
    max_length, train_on_prompt = data_cfg.max_length, data_cfg.train_on_prompt

    def fn(batch):
        out = {"input_ids": [], "labels": [], "cut": [], "problem": []}
        for row, first in zip(batch["turns"], batch["first_scored"]):
            ids, spans, cut, problem = [], [], False, ""
            try:
                messages = chat.turns(row)
                scored = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
                if not scored:
                    raise chat.BadConversation("no assistant turn in the completion")
                ids, spans = chat.encode(tokenizer, template, messages, scored)
                ids, spans, cut = chat.fit(ids, spans, max_length)
                if ids is None:
                    ids, spans, problem = [], [], "too long"
            except chat.BadConversation as e:
                problem = str(e)
            out["input_ids"].append(ids)
            out["labels"].append(chat.labels_for(ids, spans, train_on_prompt))
            out["cut"].append(cut)
            out["problem"].append(problem)
        return out

    settings = ("chat", template, max_length, train_on_prompt)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, *settings), desc="tokenizing")


def usable_conversations(tokens, where: str, max_length: int):
    """The rows that gave an example. Bad rows are counted and skipped, as are conversations too
    long for even their first reply; a split where no row is left is an error."""
    problems = {}
    for problem in tokens["problem"]:
        if problem:
            problems[problem] = problems.get(problem, 0) + 1
    too_long = problems.pop("too long", 0)
    summary = ", ".join(f"{n:,} {p}" for p, n in sorted(problems.items(), key=lambda item: -item[1]))
    kept = tokens.filter(lambda batch: [not p for p in batch["problem"]], batched=True)
    if len(kept) == 0:
        if problems:
            raise UserError(f"{where} has no conversation to train on: of {len(tokens):,} rows, {summary}"
                            + (f", {too_long:,} too long for data.max_length {max_length}" if too_long else ""))
        raise UserError(f"{where} has no conversation whose first reply fits data.max_length {max_length}; raise it")
    if problems:
        print(f"data: {where}: skipped {sum(problems.values()):,} of {len(tokens):,} rows ({summary})")
    cut = sum(kept["cut"])
    if cut or too_long:
        print(f"data: {where}: of {len(tokens) - sum(problems.values()):,} conversations, {cut:,} cut to fit "
              f"data.max_length {max_length} (whole turns kept where possible), {too_long:,} dropped "
              "(not even the first reply fits)")
    return kept


# ---- classification ---------------------------------------------------------------------------------

def tokenize_labelled(ds, tokenizer, text_field: str, label_field: str, names: list, max_length: int, num_proc=None):
    """input_ids = the text's first max_length tokens, labels = the class id. The pad token is
    dropped from the text: GPT-2 pads with its end-of-text token, and its classifier reads each
    row at the last token that is not the pad token, which must be the text's own last token."""
    pad = tokenizer.pad_token_id
    class_id = {name: i for i, name in enumerate(names)}

    def fn(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {
            "input_ids": [[t for t in row if t != pad][:max_length] for row in ids],
            "labels": [class_id[v] if isinstance(v, str) else int(v) for v in batch[label_field]],
        }

    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_field]], batched=True, num_proc=num_proc)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                  new_fingerprint=_fingerprint(ds, tokenizer, text_field, label_field, names, max_length, pad),
                  desc="tokenizing")


# ---- build ------------------------------------------------------------------------------------------

def _lazy(token_ds, names=None, packable=False) -> Examples:
    token_ds = token_ds.with_format("torch", columns=["input_ids", "labels"])
    return Examples(token_ds["input_ids"], token_ds["labels"], names, packable)


def build(data_cfg: DataSettings, tokenizer, seed: int, task: str = "causal_lm") -> tuple:
    """(train Examples, validation Examples) for a recipe's data section; for classification both
    carry label_names. Conversations set tokenizer.chat_template to the template they use."""
    name = data_cfg.dataset
    raw, spec = data_rows.load_raw(data_cfg)
    train, val, _ = data_rows.split_rows(raw, data_cfg, spec, seed)
    fmt, fields, why = data_rows.resolve_format(data_cfg, task, spec, train.column_names)
    if why and fmt != "text":  # plain text, as ever, goes without saying
        print(f"data: {name} read as {fmt}: {why} (data.format sets another)")
    num_proc = data_cfg.num_proc or (min(8, os.cpu_count() or 1) if len(train) > 50_000 else None)
    splits = {"train": train, "validation": val}
    wheres = {"train": f"data set '{name}'", "validation": f"validation data of '{name}'"}

    if fmt == "classification":
        for split, ds in splits.items():
            data_rows.check_column(ds, fields["text_field"], "text_field", wheres[split])
            data_rows.check_column(ds, fields["label_field"], "label_field", wheres[split])
        names = data_rows.label_names(train, val, fields["label_field"], spec, wheres["train"])
        splits["train"] = data_rows.subsample(train, data_cfg.fraction, seed)
        out = []
        for split, ds in splits.items():
            tokens = tokenize_labelled(ds, tokenizer, fields["text_field"], fields["label_field"], names,
                                       data_cfg.max_length, num_proc)
            if len(tokens) == 0:
                raise UserError(f"{wheres[split]} has no text in field '{fields['text_field']}'")
            out.append(_lazy(tokens, names))
        return tuple(out)

    if fmt == "text":
        out = []
        for split, ds in splits.items():
            data_rows.check_column(ds, fields["text_field"], "text_field", wheres[split])
            if "text_rows" in spec:
                column, value = spec["text_rows"]
                ds = ds.filter(lambda batch: [v == value for v in batch[column]], batched=True)
            if split == "train":
                ds = data_rows.subsample(ds, data_cfg.fraction, seed)
            tokens = tokenize(ds, tokenizer, fields["text_field"], num_proc)
            if len(tokens) == 0:
                raise UserError(f"{wheres[split]} has no text in its {split} split (field '{fields['text_field']}')")
            out.append(pack(tokens, tokenizer.eos_token_id, data_cfg.max_length))
        return tuple(out)

    source = data_rows.turns_source(train, fmt, fields, f"data set '{name}'")
    if source is not None:
        return conversations(splits, tokenizer, source, fields, data_cfg, wheres, seed, num_proc)

    template_variants(fields["template"])  # a bad template fails before any tokenizing
    out = []
    for split, ds in splits.items():
        rows = data_rows.pair_rows(ds, fmt, fields, data_cfg, wheres[split])
        limit = data_cfg.max_response_chars
        rows = rows.filter(
            lambda batch: [bool(r and r.strip()) and (limit is None or len(r) <= limit) for r in batch["response"]],
            batched=True,
        )
        if len(rows) == 0:
            shorter = f" of at most data.max_response_chars {limit} characters" if limit else ""
            raise UserError(f"{wheres[split]} has no example with a response{shorter}")
        if split == "train":
            rows = data_rows.subsample(rows, data_cfg.fraction, seed)
        tokens = tokenize_pairs(rows, tokenizer, fields["template"], data_cfg, fmt == "summarization", num_proc)
        if len(tokens) == 0:
            raise UserError(
                f"{wheres[split]} has no example whose {'summary' if fmt == 'summarization' else 'prompt'} fits "
                f"data.max_length {data_cfg.max_length} with room for the response; raise data.max_length"
            )
        dropped, cut = len(rows) - len(tokens), sum(tokens["cut"])
        if dropped or cut:
            print(
                f"data: {name} {split}: of {len(rows):,} examples, {cut:,} cut to fit data.max_length "
                f"{data_cfg.max_length} (the {'article' if fmt == 'summarization' else 'response'}), "
                f"{dropped:,} dropped (too long to cut)"
            )
        out.append(_lazy(tokens, packable=True))
    return tuple(out)


def conversations(splits: dict, tokenizer, source, fields: dict, data_cfg: DataSettings, wheres: dict, seed: int,
                  num_proc=None) -> tuple:
    """(train Examples, validation Examples) of rows of turns through the chat template."""
    what = f"'{source}'" if isinstance(source, str) else f"'{source[0]}' and '{source[1]}' turns"
    for key in ("template", "max_response_chars"):
        if getattr(data_cfg, key) is not None:
            raise UserError(f"recipe key 'data.{key}' does not apply to conversations of turns ({what}): these use the "
                            "model's chat template, or data.chat_template (data.template is for OpenAssistant message "
                            "trees and prompt/completion strings)")
    template, how = chat.choose_template(tokenizer, fields.get("chat_template"))
    # The run saves its tokenizer in final/: with the template it trained on, the model brings it
    # to evaluate.py, transformers' pipelines and serving.
    tokenizer.chat_template = template
    print(f"data: conversations ({what}) through {how}; loss on "
          + ("every token" if data_cfg.train_on_prompt else "the assistant turns"))
    out = []
    for split, ds in splits.items():
        if split == "train":
            ds = data_rows.subsample(ds, data_cfg.fraction, seed)
        rows = data_rows.turn_rows(ds, source, wheres[split])
        tokens = tokenize_conversations(rows, tokenizer, template, data_cfg, num_proc)
        out.append(_lazy(usable_conversations(tokens, wheres[split], data_cfg.max_length), packable=True))
    return tuple(out)


def collate(pad_id: int):
    """Pad a batch to its longest example (right side); padded positions get label -100 and
    attention mask 0. A batch without padding gets no attention mask, so attention runs its plain
    causal path. Class labels (one per row) become a (batch,) tensor.

    Packed rows (with position_ids, see tunebench/packing.py) get no attention mask: transformers derives
    the block-diagonal causal mask from position ids that restart per example. Their padding
    continues with positions 0, 1, ..., a segment of its own that no example attends to; the
    batch's "num_tokens" counts the tokens that are not padding."""

    def fn(examples):
        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : lengths[row]] = torch.as_tensor(e["input_ids"])
        if torch.as_tensor(examples[0]["labels"]).ndim == 0:
            labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        else:
            labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
            for row, e in enumerate(examples):
                labels[row, : lengths[row]] = torch.as_tensor(e["labels"])
        batch = {"input_ids": input_ids, "labels": labels}
        if "position_ids" in examples[0]:
            position_ids = torch.arange(longest).repeat(len(examples), 1)
            for row, e in enumerate(examples):
                position_ids[row, : lengths[row]] = e["position_ids"]
                position_ids[row, lengths[row] :] -= lengths[row]
            batch.update(position_ids=position_ids, num_tokens=torch.tensor(sum(lengths)))
        elif min(lengths) < longest:
            batch["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch

    return fn
