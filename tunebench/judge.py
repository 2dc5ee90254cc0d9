"""A judge model through any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama,
`transformers serve`, a hosted API): off unless `evaluate.py --judge URL --judge-model NAME` asks for it.

- Absolute: each generated answer gets a score from 0 to 100 against the reference
  (recipes/judge/absolute.txt, or --judge-prompt FILE).
- Pairwise: each answer is compared with the baseline's answer to the same prompt, twice, with the
  order swapped (recipes/judge/pairwise.txt, or --judge-pairwise-prompt FILE). A record counts only what
  both orders agree on: a win (1), a loss (0) or a tie (1/2); two orders that disagree ("A" both times is
  position bias, not a preference) count as a tie and are counted as inconsistent. A record whose either
  order failed (no verdict after the retries) is unscored: left out of the win rate, never half a win, and
  counted as unscored. The win rate is the mean over the scored records.
- The reply is read from its labelled field, as the prompts ask: "Score: N" (N in 0..100, "/100" or
  "out of 100" allowed) or "Winner: A|B|tie", anywhere in the reply, the value running to the end of its
  line; a reply that is nothing but the value ("85", "B") reads the same. Anything else is malformed: no
  label, two labels that disagree, a value that is not plainly one (a negative number, a score above 100 or
  on another scale, "A or B").
- Every judgement is cached on disk (default .cache/judge/), keyed by the endpoint (without credentials or
  query), the judge model, its temperature and reply limit, and the whole message (the prompt file's text
  with the texts filled in): a rerun asks nothing twice, a changed prompt or another server asks again.
- Timeouts, rate limits, server errors, lost connections and answers that are not a verdict are retried
  a bounded number of times, then counted by reason; they never become a score.
- The key is read from an environment variable (--judge-key-env, default OPENAI_API_KEY; local servers
  need none) and is never written to a file or printed.
"""
import hashlib
import json
import os
import re
import statistics
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunebench import rundir
from tunebench.errors import UserError

PROMPTS = Path(__file__).resolve().parent.parent / "recipes" / "judge"
# Placeholders a prompt file must hold; {prompt} (the text the model read, its template included) is optional.
ABSOLUTE_FIELDS = ("reference", "output")
PAIRWISE_FIELDS = ("reference", "answer_a", "answer_b")
MAX_TOKENS = 64  # the judge's reply: a verdict, not an essay
BACKOFF_S = 1.0  # first wait after a rate limit, a server error or a lost connection; doubles each retry


@dataclass
class Prompt:
    file: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def fill(self, **values) -> str:
        """The text with {name} placeholders filled in one pass (braces inside the values stay as they are)."""
        return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m[1]], self.text)


def load_prompt(path, fields: tuple, option: str) -> Prompt:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{option} '{path}' does not exist; give a prompt file (see recipes/judge/)") from None
    except UnicodeDecodeError:
        raise UserError(f"{option} '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{option} '{path}' cannot be read: {e.strerror or e}") from None
    missing = [f"{{{name}}}" for name in fields if f"{{{name}}}" not in text]
    if missing:
        raise UserError(f"{option} '{path}' lacks the placeholder(s) {', '.join(missing)}; a judge prompt holds "
                        f"{', '.join('{' + f + '}' for f in fields)} (see recipes/judge/README.md)")
    return Prompt(str(path), text)


# ---- reading the judge's answer ----------------------------------------------------------------------

SCORE_VALUE = re.compile(r"[*\s]*(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+))?[*\s.!]*", re.IGNORECASE)
VERDICT_VALUE = re.compile(r"[*\"'\[(\s]*(?:answer\s+)?(A|B|tie)[*\"'\]).!\s]*", re.IGNORECASE)


def read_labelled(reply, label: str, read_value):
    """The one value the reply gives under `label:` (each field runs to the end of its line), or the whole
    reply read as a bare value when it has no such label; None when a field is unreadable or two disagree."""
    fields = re.findall(rf"\b{label}\**\s*:(.*)", reply or "", re.IGNORECASE) or [reply or ""]
    values = {read_value(text.strip()) for text in fields}
    return values.pop() if len(values) == 1 else None  # {None} stays None


def score_value(text: str):
    match = SCORE_VALUE.fullmatch(text)
    if match is None or (match[2] is not None and int(match[2]) != 100):
        return None
    score = float(match[1])
    return score if score <= 100 else None


def verdict_value(text: str):
    match = VERDICT_VALUE.fullmatch(text)
    if match is None:
        return None
    return "tie" if match[1].lower() == "tie" else match[1].upper()


def parse_score(reply):
    """The score of "Score: 85" ("85/100", "85 out of 100", or a bare "85"), 0..100; else None."""
    return read_labelled(reply, "score", score_value)


def parse_verdict(reply):
    """"A", "B" or "tie" from "Winner: A" (or a bare A, B, tie); else None."""
    return read_labelled(reply, "winner", verdict_value)


# ---- the judge ------------------------------------------------------------------------------------------

def shown_endpoint(url: str) -> str:
    """The endpoint without credentials or query, as eval.json records it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return urllib.parse.urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


@dataclass
class Judge:
    endpoint: str
    model: str
    absolute: Prompt
    pairwise: Prompt
    temperature: float = 0.0
    timeout_s: float = 60.0
    retries: int = 2
    cache_dir: Path = Path(".cache/judge")
    key_env: str = "OPENAI_API_KEY"
    examples: int | None = None  # judge the first N examples of each task (None: all)
    requests: int = 0  # sent to the endpoint, retries included
    cache_hits: int = 0
    _client: object = field(default=None, repr=False)

    def client(self):
        if self._client is None:
            from openai import OpenAI

            # Local servers take any key; the openai client needs a non-empty one.
            self._client = OpenAI(base_url=self.endpoint, api_key=os.environ.get(self.key_env) or "EMPTY",
                                  timeout=self.timeout_s, max_retries=0)
        return self._client

    def check_reachable(self) -> None:
        """One request before anything else runs: a judge that cannot be reached stops the evaluation at once."""
        import openai

        where = shown_endpoint(self.endpoint)
        try:
            self.client().models.list()
        except openai.APITimeoutError:
            raise UserError(f"the judge endpoint {where} did not answer within {self.timeout_s:g} s; "
                            "check the server or give a longer --judge-timeout") from None
        except openai.APIConnectionError:
            raise UserError(f"the judge endpoint {where} cannot be reached (is the server running?); "
                            "start it or fix --judge, e.g. --judge http://127.0.0.1:8000/v1") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError):
            raise UserError(f"the judge endpoint {where} refused the key in ${self.key_env}; set that variable "
                            "to a valid key (or name another with --judge-key-env)") from None
        except openai.APIStatusError:
            pass  # some servers have no model list; the first judgement will tell

    def cache_path(self, content: str) -> Path:
        # The endpoint too: two servers may serve different models under one name.
        key = json.dumps({"endpoint": shown_endpoint(self.endpoint).rstrip("/"), "model": self.model,
                          "temperature": self.temperature, "max_tokens": MAX_TOKENS, "content": content}, sort_keys=True)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def ask(self, content: str, parse) -> tuple:
        """(parsed verdict, None) or (None, the reason it failed after the retries)."""
        import openai

        cached = self.cache_path(content)
        if cached.is_file():
            try:
                value = parse(json.loads(cached.read_text(encoding="utf-8"))["reply"])
            except (OSError, ValueError, KeyError, TypeError):
                value = None  # a damaged cache entry is asked again
            if value is not None:
                self.cache_hits += 1
                return value, None
        failure = None
        for attempt in range(self.retries + 1):
            if attempt and failure in ("rate_limit", "server_error", "connection"):
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            self.requests += 1
            try:
                response = self.client().chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}],
                    temperature=self.temperature, max_tokens=MAX_TOKENS)
            except openai.APITimeoutError:
                failure = "timeout"
            except openai.RateLimitError:
                failure = "rate_limit"
            except openai.APIConnectionError:
                failure = "connection"
            except openai.InternalServerError:
                failure = "server_error"
            except (openai.AuthenticationError, openai.PermissionDeniedError):
                raise UserError(f"the judge endpoint {shown_endpoint(self.endpoint)} refused the key in ${self.key_env}") from None
            except openai.NotFoundError:
                raise UserError(f"the judge endpoint {shown_endpoint(self.endpoint)} has no model '{self.model}' "
                                "(or no chat completions); check --judge and --judge-model") from None
            except openai.APIStatusError as e:
                failure = f"http_{e.status_code}"  # e.g. a prompt beyond the judge's context
            else:
                choices = response.choices or []
                reply = (choices[0].message.content if choices else None) or ""
                value = parse(reply)
                if value is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    rundir.write_json(cached, {"endpoint": shown_endpoint(self.endpoint), "model": self.model,
                                               "reply": reply})
                    return value, None
                failure = "malformed"
        return None, failure

    def settings(self, pairwise_against) -> dict:
        """What eval.json records of the judge: never the key, only the name of its variable."""
        return {
            "endpoint": shown_endpoint(self.endpoint), "model": self.model, "temperature": self.temperature,
            "max_tokens": MAX_TOKENS, "timeout_s": self.timeout_s, "retries": self.retries, "key_env": self.key_env,
            "examples": self.examples, "cache_dir": str(self.cache_dir),
            "prompts": {"absolute": {"file": self.absolute.file, "sha256": self.absolute.sha256, "text": self.absolute.text},
                        **({"pairwise": {"file": self.pairwise.file, "sha256": self.pairwise.sha256, "text": self.pairwise.text}}
                           if pairwise_against else {})},
            "pairwise_against": str(pairwise_against) if pairwise_against else None,
            "requests": self.requests, "cache_hits": self.cache_hits,
        }


# ---- scoring a task's generations --------------------------------------------------------------------

def _failures(counts: Counter) -> dict:
    return {"judge_failures": dict(sorted(counts.items()))} if counts else {}


def score_absolute(judge: Judge, records: list) -> dict:
    """Mean 0-100 score of the judged records; each record gets its judge_score (or judge_failure)."""
    scores, failures = [], Counter()
    for record in records:
        content = judge.absolute.fill(prompt=record["prompt"], reference=record["reference"], output=record["output"])
        value, failure = judge.ask(content, parse_score)
        record["judge_score"] = value
        if failure:
            record["judge_failure"] = failure
            failures[failure] += 1
        else:
            scores.append(value)
    out = {"judge_score": statistics.fmean(scores) if scores else None, "judge_model": judge.model,
           "judge_prompt": judge.absolute.file, "judge_temperature": judge.temperature, "judge_examples": len(records),
           "judge_scored": len(scores), "judge_failed": sum(failures.values()), **_failures(failures)}
    if not scores:
        out["judge_score_reason"] = "the judge gave no valid score" + (f" ({', '.join(f'{k} {v}' for k, v in failures.items())})" if failures else "")
    return out


def preference(verdict: str, ours_first: bool) -> str:
    """"ours", "theirs" or "tie": a verdict ("A", "B", "tie") read back through the order it was asked in."""
    if verdict == "tie":
        return "tie"
    return "ours" if (verdict == "A") == ours_first else "theirs"


OUTCOME = {"ours": 1.0, "tie": 0.5, "theirs": 0.0}


def win_rate(judge: Judge, records: list, baseline: list) -> dict:
    """Mean outcome of the records' answers against the baseline's answers to the same prompts, each pair
    asked in both orders (see the module's docstring for what a record counts); each record gets its
    judge_vs_baseline, and judge_vs_baseline_inconsistent or judge_vs_baseline_failure where they apply."""
    theirs = {(r["prompt"], r["reference"]): r["output"] for r in baseline}
    outcomes, failures, unmatched, inconsistent, unscored, verdicts = [], Counter(), 0, 0, 0, 0
    for record in records:
        other = theirs.get((record["prompt"], record["reference"]))
        if other is None:
            unmatched += 1
            continue
        preferences, failure = [], None
        for ours_first in (True, False):
            a, b = (record["output"], other) if ours_first else (other, record["output"])
            verdict, failed = judge.ask(judge.pairwise.fill(prompt=record["prompt"], reference=record["reference"],
                                                            answer_a=a, answer_b=b), parse_verdict)
            if failed:
                failures[failed] += 1
                failure = failure or failed
            else:
                verdicts += 1
                preferences.append(preference(verdict, ours_first))
        if failure:
            record["judge_vs_baseline"], record["judge_vs_baseline_failure"] = None, failure
            unscored += 1
            continue
        if preferences[0] == preferences[1]:
            record["judge_vs_baseline"] = OUTCOME[preferences[0]]
        else:
            record["judge_vs_baseline"], record["judge_vs_baseline_inconsistent"] = OUTCOME["tie"], True
            inconsistent += 1
        outcomes.append(record["judge_vs_baseline"])
    out = {"judge_win_rate": statistics.fmean(outcomes) if outcomes else None, "judge_pairwise_prompt": judge.pairwise.file,
           "judge_pairwise_scored": len(outcomes), "judge_pairwise_inconsistent": inconsistent,
           "judge_pairwise_unscored": unscored, "judge_pairwise_verdicts": verdicts,
           "judge_pairwise_failed": sum(failures.values()),
           **({"judge_pairwise_failures": dict(sorted(failures.items()))} if failures else {})}
    if unmatched:
        out["judge_pairwise_unmatched"] = unmatched
    if not outcomes:
        out["judge_win_rate_reason"] = ("the baseline's generations hold none of these prompts" if unmatched == len(records)
                                        else "the judge gave no record a valid verdict in both orders")
    return out
