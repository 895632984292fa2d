"""HTTP judge: an OpenAI-compatible chat-completions endpoint, logprob or text-score mode.

Each judge prompt is sent as one user message at temperature 0.
- mode "logprob" (EM repository): max_tokens=1, top_logprobs=20; the first
  token's top logprobs are aggregated (numbers.score_from_top_logprobs); a score
  is missing (status "low_mass") when the integers hold < min_mass.
- mode "text" (the study): max_tokens small (20); the reply is parsed by
  numbers.parse_text_score (first integer 0..100; REFUSAL / CODE / empty /
  unparsable become statuses).
Every result is {score, status, raw}. Requests run on a bounded
thread pool, retry with exponential backoff on connection errors, timeouts, 429
and 5xx, and every answer is appended to an on-disk JSONL cache, so a rerun
(or a run resumed after the endpoint failed) pays nothing twice.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Sequence

from jaxlab.evals.number_scores import MIN_MASS, OK, parse_text_score, score_from_top_logprobs
from jaxlab.evals.records import append_jsonl, read_jsonl

MODES = ("logprob", "text")

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
  """The judge could not score (endpoint unreachable after retries, bad response, bad config)."""


class HttpJudge:
  """Scores judge prompts through `{base_url}/chat/completions`."""

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               concurrency: int = 8, max_retries: int = 5, backoff_s: float = 1.0,
               timeout_s: float = 60.0, cache_path: str | None = None, top_logprobs: int = 20,
               min_mass: float = MIN_MASS, mode: str = "logprob", max_tokens: int = 20):
    if mode not in MODES:
      raise JudgeError(f"config key judge.mode={mode!r}: expected one of {MODES}")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model, self.top_logprobs, self.min_mass = model, top_logprobs, min_mass
    self.mode, self.max_tokens = mode, max_tokens
    self.concurrency, self.max_retries = concurrency, max_retries
    self.backoff_s, self.timeout_s = backoff_s, timeout_s
    self.api_key = None
    if api_key_env:
      self.api_key = os.environ.get(api_key_env)
      if not self.api_key:
        raise JudgeError(f"HTTP judge: environment variable {api_key_env} (config key "
                         "judge.api_key_env) is not set; export the API key or set it to '' "
                         "for an endpoint without authentication")
    self.cache_path = cache_path
    self.requests_sent = 0
    self._lock = threading.Lock()
    self._cache: dict[str, object] = {}
    for row in read_jsonl(cache_path) if cache_path else []:
      self._cache[row["key"]] = row.get("top", row.get("text"))

  def _key(self, prompt: str) -> str:
    what = ([self.url, self.model, self.top_logprobs, prompt] if self.mode == "logprob" else
            [self.url, self.model, "text", self.max_tokens, prompt])
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()

  def _post(self, prompt: str) -> dict:
    body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "seed": 0}
    if self.mode == "logprob":
      body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
    else:
      body.update(max_tokens=self.max_tokens)
    body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    with self._lock:
      self.requests_sent += 1
    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
      status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    text = raw.decode("utf-8", errors="replace")
    try:
      return json.loads(text)
    except ValueError:  # an HTML page (login, proxy, wrong base_url), plain text, a cut body
      raise JudgeError(f"HTTP judge {self.url}: status {status}: the response is not JSON "
                       f"(Content-Type {ctype!r}; is config key judge.base_url an "
                       f"OpenAI-compatible API?); body starts {text[:200]!r}") from None

  def _request(self, prompt: str):
    """Top logprobs {token: logprob} of the first answer token (or the reply text), with retries."""
    last = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      try:
        data = self._post(prompt)
      except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        if e.code not in RETRY_STATUS:
          raise JudgeError(f"HTTP judge {self.url}: status {e.code}: {detail}") from None
        last = f"status {e.code}: {detail}"
        continue
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        continue
      if self.mode == "text":
        try:
          return data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
          raise JudgeError(f"HTTP judge {self.url}: response has no choices[0].message: "
                           f"{json.dumps(data)[:300]}") from None
      try:
        items = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
      except (KeyError, IndexError, TypeError):
        raise JudgeError(f"HTTP judge {self.url}: response has no choices[0].logprobs.content[0]"
                         f".top_logprobs (does the endpoint support logprobs?): "
                         f"{json.dumps(data)[:300]}") from None
      top: dict[str, float] = {}
      for it in items:
        top[it["token"]] = max(top.get(it["token"], -1e30), float(it["logprob"]))
      return top
    raise JudgeError(f"HTTP judge {self.url} failed after {self.max_retries + 1} tries "
                     f"(last error: {last}); answers scored so far are kept in the cache")

  def reply_for(self, prompt: str):
    """Cached top logprobs (logprob mode) or reply text (text mode) for one judge prompt."""
    key = self._key(prompt)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    reply = self._request(prompt)
    with self._lock:
      self._cache[key] = reply
      if self.cache_path:
        append_jsonl(self.cache_path, [{"key": key, ("top" if self.mode == "logprob" else
                                                     "text"): reply}])
    return reply

  def judge_texts(self, texts: Sequence[str]) -> list[dict]:
    """{score, status, raw} per judge prompt; raises JudgeError when the endpoint fails."""
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(self.reply_for, t) for t in texts]
      try:
        replies = [f.result() for f in futures]
      except BaseException:
        for f in futures:
          f.cancel()
        raise
    out = []
    for r in replies:
      if self.mode == "text":
        score, status = parse_text_score(r)
        out.append({"score": score, "status": status, "raw": r})
      else:
        score = score_from_top_logprobs(r, self.min_mass)
        out.append({"score": score, "status": OK if score is not None else "low_mass",
                    "raw": json.dumps(r)})
    return out

  def score_texts(self, texts: Sequence[str]) -> list[float | None]:
    """Scores 0..100 (None when missing or not ok)."""
    return [r["score"] for r in self.judge_texts(texts)]
