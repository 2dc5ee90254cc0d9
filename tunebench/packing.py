"""Packing prompt/response examples: several examples in one row of at most data.max_length tokens,
position ids restarting at each, and the check that a model (with its method) scores a packed row
exactly as it scores each example alone. train.py decides whether to pack (see data.packing in the
README); tunebench/data.py's collator pads packed rows.
"""
import torch

from tunebench.metrics import IGNORE_INDEX  # the label no loss scores


class PackedExamples(torch.utils.data.Dataset):
    """Examples (anything whose items hold input_ids and per-token labels) packed into rows of at
    most max_length tokens. A row holds its examples one after another, with position ids that
    restart at each example and the first label of each example set to -100: in a row of its own
    that label is never a target either, and here it would be the previous example's last target."""

    def __init__(self, examples, rows: list, tokens: int):
        self.examples, self.rows, self.tokens, self.label_names = examples, rows, tokens, None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        parts = [self.examples[j] for j in self.rows[i]]
        labels = []
        for part in parts:
            own = torch.as_tensor(part["labels"]).clone()
            own[0] = IGNORE_INDEX
            labels.append(own)
        return {
            "input_ids": torch.cat([torch.as_tensor(p["input_ids"]) for p in parts]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(p["input_ids"])) for p in parts]),
        }

    def num_tokens(self) -> int:
        return self.tokens


OPEN_ROWS = 64  # rows pack_examples keeps open for later examples


def pack_examples(examples, max_length: int) -> PackedExamples:
    """Pack examples into rows of at most max_length tokens, first fit in the data's order: each
    example goes into the first of the last OPEN_ROWS rows with room for it. The result depends on the data and
    max_length only, so every method trains the same rows in the same order."""
    lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
    rows, room, open_rows = [], [], []  # open_rows: rows that still have room for the shortest example
    shortest = min(lengths, default=1)
    for i, length in enumerate(lengths):
        row = next((r for r in open_rows if room[r] >= length), None)
        if row is None:
            rows.append([]), room.append(max_length)
            row = len(rows) - 1
            open_rows.append(row)
        rows[row].append(i)
        room[row] -= length
        if room[row] < shortest:
            open_rows.remove(row)
        elif len(open_rows) > OPEN_ROWS:
            open_rows.pop(0)  # the oldest row stays as it is: bounded time per example
    return PackedExamples(examples, rows, sum(lengths))


# Packed and alone may differ by this many units in the last place of the largest logit, in the
# logits' dtype. On SmolLM2-135M rounding makes 10 in float32; attending across examples makes
# 8 million in float32 and 94 in bfloat16.
ROUNDING_ULPS = 32


def packing_is_exact(model, vocab_size: int) -> bool:
    """Whether this model (with its method) scores two examples packed in one row exactly as it
    scores each alone: position ids must restart the attention too, and nothing the method adds
    (a soft prompt, a prefix) may be shared across the row. Checked by running it, in eval mode.
    Packed and alone, the logits differ by rounding only (SmolLM2-135M in float32: 4e-5 on logits near
    36, ten units in the last place of the largest); attending across examples changes them by tens."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # DeepSpeed ZeRO-3 holds a share of each weight until it runs: judge by the method instead.
        config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
        return not getattr(config, "is_prompt_learning", False)
    device = next(model.parameters()).device
    first, second = torch.arange(5, device=device) % vocab_size, torch.arange(7, 11, device=device) % vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=ids[None], use_cache=False).logits[0, -len(ids) :] for ids in (first, second)]
            positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)
            packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions[None],
                           use_cache=False).logits[0, -9:]
    finally:
        model.train(was_training)
    alone = torch.cat(alone).float()
    rounding = ROUNDING_ULPS * torch.finfo(packed.dtype).eps * alone.abs().max()
    return packed.shape[0] == 9 and bool((packed.float() - alone).abs().max() <= rounding)
