"""The judge against a real OpenAI-compatible server: `transformers serve` with SmolLM2-135M-Instruct on
127.0.0.1. Generated answers get a 0-100 score and a win rate against the baseline, a rerun is answered
from the cache, and a slow answer, an answer that is not a score and a server that is down are counted
or refused, never turned into a score. The small model is a weak judge: the tests check the plumbing and
the honesty of the counts, not the wisdom of its verdicts."""
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import run_script
from test_evaluate import assert_user_error, evaluate
from tunebench import judge

# Short prompts that a 135M model can follow (the shipped ones, recipes/judge/, are for real judges);
# that they replace the shipped ones is part of what is tested. SmolLM2-135M writes no labelled field
# whatever it is asked ("The answer is 100."), which is malformed; asked to complete a line, it answers
# some prompts with a bare number, which reads as the score.
ABSOLUTE = ("Score from 0 to 100 how well the answer matches the reference.\nReference: {reference}\n"
            "Answer: {output}\nComplete the line below with the number only.\nScore:")
PAIRWISE = ("Reference: {reference}\nAnswer A: {answer_a}\nAnswer B: {answer_b}\n"
            "Which answer is closer to the reference? Reply with \"Winner: A\" or \"Winner: B\" only.")
ECHO = "Repeat this text exactly, and nothing else: {output}\n\n(Question: {prompt} Reference: {reference})"
ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {"instruction": "Translate 'thank you' into Spanish.", "input": "", "output": "Gracias."},
]
SECRET = "sk-tunebench-test-never-written-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    """`transformers serve` on a free port of 127.0.0.1, offline, with the local SmolLM2 folder; stopped after."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(smollm2),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"transformers serve did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url + "/v1", "model": str(smollm2), "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with pytest.raises(OSError):  # stopped: nothing answers there any more
        urllib.request.urlopen(url + "/health", timeout=2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    for name, text in (("absolute.txt", ABSOLUTE), ("pairwise.txt", PAIRWISE), ("echo.txt", ECHO)):
        (folder / name).write_text(text, encoding="utf-8")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return folder


def judge_args(server, prompts, cache, *extra):
    return ["--judge", server["url"], "--judge-model", server["model"], "--judge-prompt", prompts / "absolute.txt",
            "--judge-pairwise-prompt", prompts / "pairwise.txt", "--judge-cache", cache, "--judge-retries", 1, *extra]


def lines(folder):
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


def read(path):
    return json.loads(path.read_text())


def test_scores_win_rate_and_cache_on_a_real_server(server, prompts, smollm2, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNEBENCH_JUDGE_KEY", SECRET)
    cache = tmp_path / "cache"
    task = ["--tasks", "instruction", "--data-file", prompts / "questions.jsonl", "--max-new-tokens", 16]
    key = ["--judge-key-env", "TUNEBENCH_JUDGE_KEY"]
    # The baseline: SmolLM2 answers, and is scored by the judge.
    evaluate("--model", smollm2, "--out", tmp_path / "baseline", *task, *judge_args(server, prompts, cache, *key))
    # The model under test (a tiny GPT-2 that writes nonsense), also compared with the baseline's answers.
    runs = []
    for attempt in (1, 2):  # the second time, every judgement that succeeded comes from the cache
        capsys.readouterr()
        evaluate("--model", assets / "gpt2", "--out", tmp_path / "tiny", *task,
                 *judge_args(server, prompts, cache, *key, "--judge-against", tmp_path / "baseline"))
        printed = capsys.readouterr().out
        runs.append((read(tmp_path / "tiny" / "eval.json"), lines(tmp_path / "tiny"), printed))
        print(f"run {attempt}:", json.dumps({k: v for k, v in runs[-1][0]["tasks"]["instruction"].items() if k.startswith("judge")}),
              "requests", runs[-1][0]["judge"]["requests"], "cache hits", runs[-1][0]["judge"]["cache_hits"], file=sys.__stdout__)

    (first, first_lines, _), (second, second_lines, printed) = runs
    results, settings = first["tasks"]["instruction"], first["judge"]
    # What judged, with what, in eval.json beside the scores; the key itself nowhere.
    assert settings["model"] == server["model"] and settings["endpoint"] == server["url"] and settings["temperature"] == 0
    assert settings["prompts"]["absolute"]["text"] == ABSOLUTE and settings["prompts"]["pairwise"]["text"] == PAIRWISE
    assert settings["key_env"] == "TUNEBENCH_JUDGE_KEY" and settings["pairwise_against"] == str(tmp_path / "baseline")
    assert results["judge_examples"] == 3 and results["judge_model"] == server["model"]
    # Every answer has a score or a counted failure; every pair of answers was asked in both orders.
    assert results["judge_scored"] + results["judge_failed"] == 3
    assert results["judge_pairwise_verdicts"] + results["judge_pairwise_failed"] == 6
    assert results["judge_pairwise_scored"] + results["judge_pairwise_unscored"] == 3
    assert all((r["judge_vs_baseline"] is None) == ("judge_vs_baseline_failure" in r) for r in first_lines)
    scores = [r["judge_score"] for r in first_lines if r["judge_score"] is not None]
    assert len(scores) == results["judge_scored"] and all(0 <= s <= 100 for s in scores)
    assert all((r["judge_score"] is None) == ("judge_failure" in r) for r in first_lines)
    if scores:
        assert results["judge_score"] == pytest.approx(sum(scores) / len(scores))
    if results["judge_win_rate"] is not None:
        assert 0 <= results["judge_win_rate"] <= 1
    baseline = read(tmp_path / "baseline" / "eval.json")["tasks"]["instruction"]
    assert baseline["judge_scored"] >= 1  # SmolLM2's own answers get at least one real score from it
    # The rerun: the same figures, what succeeded answered from the cache, only the failures asked again.
    assert second["tasks"]["instruction"] == results
    succeeded = results["judge_scored"] + results["judge_pairwise_verdicts"]
    failed = results["judge_failed"] + results["judge_pairwise_failed"]
    assert second["judge"]["cache_hits"] == succeeded and succeeded > 0
    assert second["judge"]["requests"] == failed * 2  # retried once (--judge-retries 1)
    assert f"{second['judge']['cache_hits']} cached" in printed
    for folder in (tmp_path, cache):
        for path in folder.rglob("*"):
            assert not path.is_file() or SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in printed and SECRET not in server["log"].read_text()


def test_slow_answer_is_a_counted_timeout(server, prompts, assets, tmp_path):
    started = time.monotonic()
    evaluate("--model", assets / "gpt2", "--out", tmp_path, "--tasks", "instruction", "--data-file", prompts / "questions.jsonl",
             "--max-new-tokens", 4, "--judge-examples", 1,
             *judge_args(server, prompts, tmp_path / "cache", "--judge-timeout", 0.01))
    results, settings = read(tmp_path / "eval.json")["tasks"]["instruction"], read(tmp_path / "eval.json")["judge"]
    assert results["judge_score"] is None and results["judge_failures"] == {"timeout": 1}
    assert "timeout 1" in results["judge_score_reason"] and settings["requests"] == 2 and settings["timeout_s"] == 0.01
    assert lines(tmp_path)[0]["judge_failure"] == "timeout" and "judge_score" not in lines(tmp_path)[1]  # only 1 judged
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))  # nothing cached
    assert time.monotonic() - started < 60


def test_answer_that_is_not_a_score_is_counted_malformed(server, prompts, smollm2, tmp_path):
    # The judge is asked to echo the answer instead of scoring it: SmolLM2's answers here hold no number.
    evaluate("--model", smollm2, "--out", tmp_path, "--tasks", "instruction", "--data-file", prompts / "questions.jsonl",
             "--max-new-tokens", 12, "--judge-examples", 2,
             *judge_args(server, prompts, tmp_path / "cache", "--judge-prompt", prompts / "echo.txt"))
    written = lines(tmp_path)
    assert not any(ch.isdigit() for r in written[:2] for ch in r["output"])  # the echo cannot be read as a score
    results = read(tmp_path / "eval.json")["tasks"]["instruction"]
    assert results["judge_score"] is None and results["judge_failures"] == {"malformed": 2}
    assert results["judge_score_reason"] == "the judge gave no valid score (malformed 2)"
    assert [r["judge_failure"] for r in written[:2]] == ["malformed", "malformed"]
    assert read(tmp_path / "eval.json")["judge"]["requests"] == 4


def test_server_down_is_one_line_before_anything_runs(prompts, assets, tmp_path):
    port = free_port()  # nothing listens there
    result = run_script("evaluate.py", "--model", assets / "gpt2", "--out", tmp_path / "out", "--tasks", "instruction",
                        "--data-file", prompts / "questions.jsonl", "--judge", f"http://127.0.0.1:{port}/v1", "--judge-model", "m")
    assert_user_error(result.stderr, result.returncode, f"127.0.0.1:{port}", "cannot be reached")
    assert not (tmp_path / "out").exists()
    # A server lost in the middle of a run: each judgement is retried a bounded number of times, then counted.
    lost = judge.Judge(f"http://127.0.0.1:{port}/v1", "m", judge.Prompt("a", ABSOLUTE), judge.Prompt("p", PAIRWISE),
                       retries=2, cache_dir=tmp_path / "cache")
    started = time.monotonic()
    out = judge.score_absolute(lost, [{"prompt": "q", "reference": "r", "output": "o"}])
    assert out["judge_score"] is None and out["judge_failures"] == {"connection": 1} and lost.requests == 3
    assert time.monotonic() - started < 3 * judge.BACKOFF_S + 10  # waits 1 s, then 2 s


def test_judge_arguments_are_checked_before_a_model_loads(prompts, assets, tmp_path):
    data = ["--tasks", "instruction", "--data-file", prompts / "questions.jsonl"]
    (tmp_path / "bad.txt").write_text("Score {output} against nothing.")
    cases = [
        (["--judge-model", "m", *data], "--judge-model needs --judge URL"),
        (["--judge", "127.0.0.1:8000", "--judge-model", "m", *data], "not an http(s) URL"),
        (["--judge", "http://127.0.0.1:9/v1", *data], "--judge-model"),
        (["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--tasks", "ppl", "--data-file", assets / "valid.txt"],
         "generation tasks"),
        (["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-prompt", tmp_path / "bad.txt", *data],
         "{reference}, {output}"),
        (["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-against", tmp_path, *data], "no generations.jsonl"),
    ]
    for args, phrase in cases:
        result = run_script("evaluate.py", "--model", assets / "gpt2", *args)
        assert_user_error(result.stderr, result.returncode, phrase)


# ---- reading the reply: a labelled field, or a reply that is nothing but the value ----------------------

@pytest.mark.parametrize("reply, score", [
    ("Score: 85", 85), ("score: 85/100", 85), ("**Score:** 70", 70), ("Score: 60 out of 100.", 60), ("Score: 7.5", 7.5),
    ("The answer names Paris, as the reference does.\nScore: 90", 90), ("Score: 40\nHalf of it is right.\nScore: 40", 40),
    ("85", 85), ("85/100", 85), ("Score: 0", 0), ("Score: 100", 100),
])
def test_score_is_read_from_its_label(reply, score):
    assert judge.parse_score(reply) == score


@pytest.mark.parametrize("reply", [
    "On a scale of 0 to 100: 85",  # no label: the first number is the scale's
    "Score: -5", "Score: 101", "Score: 8/10", "Score: about 80", "Score: 60\nScore: 80", "Score: 60 or 70",
    "The answer is 100.", "no number here", "", None,
])
def test_score_without_one_plain_labelled_value_is_malformed(reply):
    assert judge.parse_score(reply) is None


@pytest.mark.parametrize("reply, verdict", [
    ("Winner: A", "A"), ("winner: **B**", "B"), ("Winner: tie", "tie"), ("**Winner:** Answer B.", "B"),
    ("Answer B is worse than Answer A. Winner: A", "A"), ("Winner: B\nAnswer A misses the reference.", "B"),
    ("B", "B"), ('"A"', "A"), ("Tie.", "tie"),
])
def test_verdict_is_read_from_its_label(reply, verdict):
    assert judge.parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", [
    "The better answer is B.", 'The answer is "A"',  # no label
    "Winner: A\nWinner: B", "Winner: A or B", "Winner: neither", "Winner:",
    "A is a primary color.", "The answer is a good one", "A: A\n\nA: A", "", None,
])
def test_verdict_without_one_plain_labelled_value_is_malformed(reply):
    assert judge.parse_verdict(reply) is None


# ---- a scripted endpoint: a real OpenAI-compatible server whose replies the test chooses -------------------

@contextlib.contextmanager
def scripted_endpoint(reply_to):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers each message with reply_to(message)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send({"object": "list", "data": []})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = reply_to(body["messages"][-1]["content"])
            self.send({"id": "scripted", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": reply}}]})

        def send(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def scripted_judge(url, cache):
    return judge.Judge(url, "judge", judge.Prompt("absolute.txt", ABSOLUTE), judge.Prompt("pairwise.txt", PAIRWISE),
                       retries=0, cache_dir=cache)


# Each case: the reply with our answer as A, the reply with our answer as B, what the record counts for ours
# (None: unscored), whether the two orders disagree.
ORDER_CASES = {
    "wins in both orders": ("Winner: A", "Winner: B", 1.0, False),
    "loses in both orders": ("Winner: B", "Winner: A", 0.0, False),
    "tie in both orders": ("Winner: tie", "Winner: tie", 0.5, False),
    "always the first answer": ("Winner: A", "Winner: A", 0.5, True),
    "always the second answer": ("Winner: B", "Winner: B", 0.5, True),
    "a win, then a tie": ("Winner: A", "Winner: tie", 0.5, True),
    "one order malformed": ("Winner: A", "Both answers have merit.", None, False),
}


def test_each_record_counts_only_what_both_orders_agree_on(tmp_path):
    def reply_to(message):
        case = next(name for name in ORDER_CASES if f"Reference: {name}\n" in message)
        ours_as_a = "Answer A: ours\n" in message
        return ORDER_CASES[case][0 if ours_as_a else 1]

    records = [{"prompt": "q", "reference": name, "output": "ours"} for name in ORDER_CASES]
    baseline = [{"prompt": "q", "reference": name, "output": "theirs"} for name in ORDER_CASES]
    with scripted_endpoint(reply_to) as url:
        out = judge.win_rate(scripted_judge(url, tmp_path / "cache"), records, baseline)
    for record in records:
        _, _, outcome, inconsistent = ORDER_CASES[record["reference"]]
        assert record["judge_vs_baseline"] == outcome, record["reference"]
        assert record.get("judge_vs_baseline_inconsistent", False) == inconsistent, record["reference"]
    assert records[-1]["judge_vs_baseline_failure"] == "malformed"
    # Position bias is a tie, never a win for either answer; a record with a failed order is no half win.
    assert out["judge_win_rate"] == pytest.approx((1 + 0 + 0.5 * 4) / 6)
    assert (out["judge_pairwise_scored"], out["judge_pairwise_inconsistent"], out["judge_pairwise_unscored"]) == (6, 3, 1)
    assert (out["judge_pairwise_verdicts"], out["judge_pairwise_failed"]) == (13, 1)
    assert out["judge_pairwise_failures"] == {"malformed": 1}


def test_no_record_judged_in_both_orders_gives_no_win_rate(tmp_path):
    replies = iter(["Winner: A", "I cannot tell."])  # ours as A wins, then ours as B gets no verdict
    with scripted_endpoint(lambda message: next(replies)) as url:
        out = judge.win_rate(scripted_judge(url, tmp_path / "cache"), [{"prompt": "q", "reference": "r", "output": "ours"}],
                             [{"prompt": "q", "reference": "r", "output": "theirs"}])
    assert out["judge_win_rate"] is None and out["judge_pairwise_unscored"] == 1
    assert out["judge_win_rate_reason"] == "the judge gave no record a valid verdict in both orders"


def test_verdicts_of_one_endpoint_are_never_served_for_another(tmp_path):
    record = {"prompt": "q", "reference": "r", "output": "o"}
    cache = tmp_path / "cache"
    with scripted_endpoint(lambda message: "Score: 90") as first, scripted_endpoint(lambda message: "Score: 10") as second:
        # Two servers under the same model name, one cache folder.
        assert judge.score_absolute(scripted_judge(first, cache), [dict(record)])["judge_score"] == 90
        other = scripted_judge(second, cache)
        assert judge.score_absolute(other, [dict(record)])["judge_score"] == 10
        assert (other.requests, other.cache_hits) == (1, 0)
        again = scripted_judge(first + "/", cache)  # the same endpoint, spelled with a trailing slash
        assert judge.score_absolute(again, [dict(record)])["judge_score"] == 90
        assert (again.requests, again.cache_hits) == (0, 1)
