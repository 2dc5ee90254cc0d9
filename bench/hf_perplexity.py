"""The plain baseline of evaluate.py's perplexity (part of make bench): one window per forward pass,
the loop of the Hugging Face perplexity guide, over the windows evaluate.py scores.

    python bench/hf_perplexity.py --model DIR --data-file text.txt --max-length 512 --max-tokens N --out DIR

Like evaluate.py with --stride equal to --max-length: the text is tokenized once, a start token
(BOS, or end-of-text without one) goes in front, and window k reads tokens [k*L, k*L + L) of that
stream and scores the next token of each position, so every text token is scored exactly once.
Writes DIR/result.json: tokens, seconds (tokenizing and scoring, as evaluate.py's time_s), perplexity.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()

    started = time.perf_counter()
    text = Path(args.data_file).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = torch.tensor([start_id] + ids, device=device)
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids), args.max_length):
            end = min(begin + args.max_length, len(ids))
            logits = model(input_ids=stream[None, begin:end]).logits[0]
            nll += F.cross_entropy(logits.float(), stream[begin + 1 : end + 1], reduction="sum").item()
    seconds = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"tokens": len(ids), "seconds": seconds, "tokens_per_s": len(ids) / seconds, "ppl": math.exp(nll / len(ids))}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
