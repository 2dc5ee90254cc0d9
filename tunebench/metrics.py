"""Quality metrics. Losses are sums over scored tokens, so every mean is over tokens, never batches."""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB in float32 (333 tokens of GPT-2's 50,257 vocabulary)


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed next-token NLL, number of scored tokens). Label -100 is never scored. Logits may carry
    extra leading positions (a soft prompt's virtual tokens): only the last len(labels) count.
    Half-precision logits are cast to float32 a chunk of tokens at a time, so the sum is float32:
    in bf16 the loss of 20,000 tokens is 0.4% off, in fp16 it overflows."""
    logits = logits[:, -labels.shape[1] :]
    # Shift the labels, not the logits: a slice of the logits would copy the largest tensor of the step.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    nll = sum(
        F.cross_entropy(part.to(dtype), part_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        for part, part_targets in zip(flat_logits.split(chunk), flat_targets.split(chunk))
    )
    return nll, (targets != IGNORE_INDEX).sum()


def model_inputs(batch: dict) -> dict:
    """What the model reads of a batch: the tokens, and the attention mask and position ids where the
    collator made them (padding; packed examples). No key-value cache: training never reads it, and
    transformers derives packed examples' attention from position ids only without one."""
    return {"use_cache": False, **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}}


def causal_loss(model, batch: dict) -> tuple:
    """(summed next-token NLL, scored tokens) of a causal LM on a batch, from its logits."""
    return causal_nll(model(**model_inputs(batch)).logits, batch["labels"])


def scored_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many targets a batch scores: one per row for class labels (batch,); for token labels
    (batch, length) every label after the first that is not -100, as causal_nll counts them."""
    if labels.ndim == 1:
        return torch.tensor(labels.numel(), device=labels.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def classification_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed cross-entropy, number of rows) for class logits (batch, classes) and labels (batch,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel(), device=labels.device)


def classification_loss(model, batch: dict) -> tuple:
    """(summed cross-entropy, rows) of a sequence classifier on a batch."""
    return classification_nll(model(**model_inputs(batch)).logits, batch["labels"])


def classification_scores(model, batch: dict) -> tuple:
    """(summed cross-entropy, rows, rows whose most likely class is their label) of a sequence classifier
    on a batch: its validation."""
    class_logits = model(**model_inputs(batch)).logits
    nll, rows = classification_nll(class_logits, batch["labels"])
    return nll, rows, (class_logits.argmax(-1) == batch["labels"]).sum()


# ---- perplexity over a long text ----------------------------------------------------------------

def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in float32, where targets[i, p] is the token logits[i, p] should predict
    (-100: not scored, NLL 0). Extra leading logits (a soft prompt's virtual tokens) are dropped."""
    logits = logits[:, -targets.shape[1] :]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed NLL per row in float32, scored tokens per row): causal_nll row by row, for statistics over
    examples."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return token_nll(logits, targets).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list:
    """(begin, end, first) per window over a stream s[0..T]: s[0] is a start token, s[1..T] the text.
    Window k reads s[b:e], b = k * stride, e = min(b + max_length, T), and scores s[first..e], the
    tokens no earlier window scored, each predicted from all of its left context inside the window
    (s[e] from the window's last position). Every text token is scored exactly once; with
    stride == max_length these are lm-evaluation-harness's rolling windows."""
    windows, scored_to, begin = [], 0, 0
    while scored_to < num_tokens:
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, scored_to + 1))
        scored_to = end
        begin += stride
    return windows


def padded(rows: list, pad_id: int, left: bool = False) -> tuple:
    """(ids, attention mask) for token lists of different lengths, padded on the right (or the left,
    for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def perplexity(model, token_ids: list, start_id: int, max_length: int, stride: int, batch_size: int, pad_id: int,
               desc: str = "perplexity") -> dict:
    """Summed NLL of every token of a text, scored once in sliding windows (see sliding_windows).
    Windows are batched; the last, shorter one is right-padded and its padding never scored, so
    the result does not depend on batch_size. Returns {"nll": summed NLL, "tokens", "windows", and per window
    "window_nll" and "window_tokens": the items a paired bootstrap resamples}."""
    stream = [start_id] + list(token_ids)
    windows = sliding_windows(len(token_ids), max_length, stride)
    device = next(model.parameters()).device
    window_nll = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
        batch = windows[i : i + batch_size]
        ids, mask = padded([stream[b:e] for b, e, _ in batch], pad_id)
        targets = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for row, (b, e, first) in enumerate(batch):
            # position p predicts s[b + p + 1]: the new tokens s[first..e] sit at positions first-1-b .. e-1-b
            targets[row, first - 1 - b : e - b] = torch.as_tensor(stream[first : e + 1])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        window_nll += token_nll(logits, targets.to(device)).sum(dim=1).double().tolist()
    return {"nll": math.fsum(window_nll), "tokens": len(token_ids), "windows": len(windows),
            "window_nll": window_nll, "window_tokens": [e - first + 1 for _, e, first in windows]}


def text_perplexities(nll: float, tokens: int, text: str) -> dict:
    """Token-, word- and byte-level figures for a summed NLL over a text. Words are the text's
    whitespace-separated words, as lm-evaluation-harness counts them for WikiText."""
    words, num_bytes = len(text.split()), len(text.encode("utf-8"))
    return {
        "ppl": math.exp(nll / tokens),
        "word_ppl": math.exp(nll / words) if words else None,
        "bits_per_byte": nll / num_bytes / math.log(2) if num_bytes else None,
        "tokens": tokens,
        "words": words,
        "bytes": num_bytes,
    }


# ---- last-word prediction (LAMBADA) -------------------------------------------------------------

@torch.no_grad()
def last_word(model, examples: list, max_length: int, batch_size: int, pad_id: int, desc: str = "last word") -> dict:
    """examples: (context ids, target ids). The target word counts as predicted when greedy decoding
    gives all of its tokens (argmax at every target position), as lm-evaluation-harness's
    lambada_openai "is_greedy"; ppl is exp of the mean target-word NLL over examples, as there.
    A context longer than max_length keeps its last tokens."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) + len(examples[i][1])))
    device = next(model.parameters()).device
    word_nll = torch.zeros(len(examples), dtype=torch.float64)
    correct = torch.zeros(len(examples), dtype=torch.bool)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        chosen = order[i : i + batch_size]
        rows = [(examples[j][0] + examples[j][1])[-(max_length + 1) : -1] for j in chosen]
        ids, mask = padded(rows, pad_id)
        targets = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for row, j in enumerate(chosen):
            target = examples[j][1]
            targets[row, len(rows[row]) - len(target) : len(rows[row])] = torch.as_tensor(target)
        targets = targets.to(device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, -targets.shape[1] :]
        scored = targets != IGNORE_INDEX
        word_nll[chosen] = token_nll(logits, targets).sum(dim=1).double().cpu()
        correct[chosen] = ((logits.argmax(dim=-1) == targets) | ~scored).all(dim=1).cpu()
    return {
        "acc": correct.double().mean().item(),
        "ppl": math.exp(word_nll.mean().item()),
        "examples": len(examples),
    }


# ---- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompts: list, batch_size: int, max_new_tokens: int, num_beams: int, pad_id: int, eos_id: int,
             desc: str = "generating") -> list:
    """Greedy (num_beams 1) or beam-search continuations of token-id prompts: the new token ids of each.
    Batches of prompts sorted by length, left-padded, decoded with the KV cache. A soft prompt (peft
    prompt learning) needs two exceptions: peft drops position ids, so its batches hold prompts of one
    length only, and its cached decoding re-inserts the virtual tokens at every step (peft 0.21 with
    transformers 5), so it decodes without the cache."""
    peft_config = getattr(model, "active_peft_config", None)
    soft_prompt = peft_config is not None and peft_config.is_prompt_learning
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (not soft_prompt or len(prompts[batches[-1][0]]) == len(prompts[i])):
            batches[-1].append(i)
        else:
            batches.append([i])
    device = next(model.parameters()).device
    outputs = [None] * len(prompts)
    for chosen in tqdm(batches, desc=desc, unit="batch"):
        ids, mask = padded([prompts[i] for i in chosen], pad_id, left=True)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=num_beams, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=not soft_prompt,
        )
        for row, i in enumerate(chosen):
            new = out[row, ids.shape[1] :].tolist()
            outputs[i] = new[: new.index(eos_id)] if eos_id in new else new  # what follows the end is padding
    return outputs


# ---- generated text against references ----------------------------------------------------------

def meteor(hypotheses: list, references: list) -> tuple:
    """(mean METEOR, None) with NLTK's WordNet data present, else (None, the reason). Words are
    whitespace-split: NLTK's word_tokenize would need its punkt data as well."""
    import nltk
    from nltk.translate.meteor_score import single_meteor_score

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return None, "NLTK's WordNet data is not installed; run: python -m tunebench.wordnet (make install does)"
    scores = [single_meteor_score(r.split(), h.split()) for h, r in zip(hypotheses, references)]
    return sum(scores) / len(scores), None


def generation_scores(hypotheses: list, references: list) -> dict:
    """Corpus scores of generated texts against one reference each, from the reference libraries:
    bleu       sacreBLEU corpus BLEU, 13a tokens, no smoothing: the classic BLEU (as NLTK's corpus_bleu
               or Hugging Face evaluate's "bleu", times 100); 0 when some n-gram order has no match
    sacrebleu  sacreBLEU's default signature (13a tokens, exponential smoothing of empty n-gram orders)
    rouge*     rouge-score F1 with Porter stemming, mean over examples; rougeLsum splits sentences at newlines
    ter, chrf  sacreBLEU's defaults.  BLEU, TER and chrF are on 0-100, ROUGE and METEOR on 0-1.
    per_example: ROUGE-L and sentence chrF of each example, the items of a paired bootstrap."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF, TER

    out = {}
    for name, metric in (("bleu", BLEU(smooth_method="none")), ("sacrebleu", BLEU()), ("ter", TER()), ("chrf", CHRF())):
        out[name] = metric.corpus_score(hypotheses, [references]).score
        out[f"{name}_signature"] = str(metric.get_signature())
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    for kind in kinds:
        out[kind] = sum(s[kind].fmeasure for s in scores) / len(scores)
    sentence_chrf = CHRF()
    out["per_example"] = {"rougeL": [s["rougeL"].fmeasure for s in scores],
                          "chrf": [sentence_chrf.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]}
    out["meteor"], reason = meteor(hypotheses, references)
    if reason:
        out["meteor_reason"] = reason
    out["examples"] = len(hypotheses)
    return out
