"""HTTP judge: an OpenAI-compatible chat-completions endpoint with top-20 logprobs.

Each judge prompt is sent as one user message with max_tokens=1, temperature
0 and top_logprobs=20; the first token's top logprobs are aggregated as in the
EM repository (numbers.score_from_top_logprobs). Requests run on a bounded
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

from jaxlab.evals.numbers import MIN_MASS, score_from_top_logprobs

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
  """The judge could not score (endpoint unreachable after retries, bad response, bad config)."""


class HttpJudge:
  """Scores judge prompts through `{base_url}/chat/completions`."""

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               concurrency: int = 8, max_retries: int = 5, backoff_s: float = 1.0,
               timeout_s: float = 60.0, cache_path: str | None = None, top_logprobs: int = 20,
               min_mass: float = MIN_MASS):
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model, self.top_logprobs, self.min_mass = model, top_logprobs, min_mass
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
    self._cache: dict[str, dict[str, float]] = {}
    if cache_path and os.path.exists(cache_path):
      with open(cache_path, encoding="utf-8") as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
          self._cache[row["key"]] = row["top"]

  def _key(self, prompt: str) -> str:
    blob = json.dumps([self.url, self.model, self.top_logprobs, prompt])
    return hashlib.sha256(blob.encode()).hexdigest()

  def _post(self, prompt: str) -> dict:
    body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 1, "temperature": 0, "logprobs": True,
                       "top_logprobs": self.top_logprobs, "seed": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    with self._lock:
      self.requests_sent += 1
    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
      return json.loads(resp.read().decode())

  def _request(self, prompt: str) -> dict[str, float]:
    """Top logprobs {token: logprob} of the first answer token, with retries."""
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

  def top_logprobs_for(self, prompt: str) -> dict[str, float]:
    """Cached top logprobs for one judge prompt."""
    key = self._key(prompt)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    top = self._request(prompt)
    with self._lock:
      self._cache[key] = top
      if self.cache_path:
        with open(self.cache_path, "a", encoding="utf-8") as f:
          f.write(json.dumps({"key": key, "top": top}) + "\n")
    return top

  def score_texts(self, texts: Sequence[str]) -> list[float | None]:
    """Scores 0..100 (None when the integers hold < min_mass); raises JudgeError on failure."""
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(self.top_logprobs_for, t) for t in texts]
      try:
        tops = [f.result() for f in futures]
      except BaseException:
        for f in futures:
          f.cancel()
        raise
    return [score_from_top_logprobs(t, self.min_mass) for t in tops]
