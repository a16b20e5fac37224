"""The OpenAI-compatible HTTP backend: GPT-3.5/GPT-4o (the paper's API models) or any server that
speaks ``POST /chat/completions`` (vLLM, ``transformers serve``, llama.cpp, ...).

- The API key comes only from the environment variable named by ``api_key_env``. It is sent in
  the ``Authorization`` header and nowhere else: not in ``key``, ``repr``, records or logs, and
  it is redacted from any server text we keep (OpenAI's 401 message echoes a masked key).
- Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with capped
  exponential backoff and seeded jitter; another 4xx fails at once. A request that still fails,
  or whose body is malformed, becomes ``Completion.failed(...)``: the cache does not store it,
  so a rerun retries it. Never an empty answer that looks like a success.
- Seeds: each request sends a seed hashed from (messages, decoding, sample index, seed), so two
  samples of one prompt differ and a rerun asks for the same thing. OpenAI's ``seed`` is
  best-effort (the same seed may still give different text); the call cache is what makes a
  rerun reproduce its answers.
- ``mean_logprob`` is the mean of ``choices[0].logprobs.content[*].logprob``; ``None`` when the
  server returns no log-probs (``transformers serve`` ignores ``logprobs``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import httpx

from .base import Completion, Message, Request, batches_of

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 429})          # plus every 5xx
LOGPROB_MODES_UNSUPPORTED = ("log-prob verdict mode needs a local backend (hf or vllm); "
                             "use mode='text' with API judges")
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")        # OpenAI echoes masked keys


class MalformedResponse(ValueError):
    """A 200 response whose body is not a chat completion."""


class OpenAIChat:
    """Chat completions from an OpenAI-compatible server, one HTTP call per request."""

    # A chat API can neither prefill the assistant's reply nor restrict its tokens: constrained
    # final answers need a local backend (``SampleConfig.extraction_fallback`` allows text mode).
    supports_constraints = False

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int = 4, logprobs: bool = True) -> None:
        self.model = model
        self.base_url = _clean_url(base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL)
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None and httpx.URL(self.base_url).host == httpx.URL(OPENAI_URL).host:
            raise RuntimeError(f"no API key for {self.base_url}: set the environment variable {api_key_env} "
                               "(keys are read from the environment only)")
        if max_retries < 0 or concurrency < 1 or timeout <= 0:
            raise ValueError("max_retries >= 0, concurrency >= 1 and timeout > 0 are required")
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self.logprobs = logprobs
        self.name = model
        # Answers without log-probs are cached apart: their records differ (mean_logprob None).
        self.key = f"openai:{self.base_url}:{model}" + ("" if logprobs else ":nologprobs")
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:                    # never shows the key
        return f"OpenAIChat(model={self.model!r}, base_url={self.base_url!r}, key env={self.api_key_env!r})"

    # ------------------------------------------------------------------ protocol
    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Batches of ``concurrency`` requests in order: each batch runs in parallel and is
        cached as soon as it finishes."""
        return batches_of(list(range(len(requests))), self.concurrency)

    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        if len(requests) <= 1:
            return [self._complete(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._complete, requests))

    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str | Sequence[str],
                        choices: Sequence[str]) -> list[dict[str, float]]:
        """Not offered: a chat API cannot continue an assistant prefix faithfully, and asking for
        top-20 first-token log-probs after an instruction measures a different thing."""
        raise NotImplementedError(f"{self.name} (OpenAI-compatible API): {LOGPROB_MODES_UNSUPPORTED}")

    def score(self, prompts: Sequence[Sequence[Message]], continuations: Sequence[str]) -> list[list[float]]:
        """Not offered: chat APIs do not return log-probs of a given (not sampled) reply."""
        raise NotImplementedError(f"{self.name} (OpenAI-compatible API): teacher-forced scoring and "
                                  f"{LOGPROB_MODES_UNSUPPORTED}")

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one request
    def payload(self, request: Request) -> dict[str, Any]:
        """The JSON body for one request."""
        d = request.decoding
        if d.stop_on_repeat:
            raise ValueError(f"{self.name} (OpenAI-compatible API): stop_on_repeat is a rule of the local engine")
        if d.constraint is not None or request.prefix:
            raise ValueError(f"{self.name} (OpenAI-compatible API) cannot prefill a reply or constrain its "
                             "tokens: use extraction 'text' for API models")
        body: dict[str, Any] = {"model": self.model, "messages": request.message_dicts,
                                "temperature": d.temperature, "top_p": d.top_p,
                                "max_tokens": d.max_new_tokens, "seed": request_seed(request)}
        if self.logprobs:
            body["logprobs"] = True
        return body

    def _complete(self, request: Request) -> Completion:
        body = self.payload(request)
        rng = random.Random(body["seed"])          # jitter: reproducible, independent per request
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                response = self._http().post("/chat/completions", json=body)
            except httpx.TimeoutException as err:
                last = f"timeout after {self.timeout:g} s ({type(err).__name__})"
                wait = None
            except httpx.TransportError as err:
                last = f"connection error: {type(err).__name__}: {self._redact(str(err))}"
                wait = None
            else:
                if response.status_code == 200:
                    try:
                        return parse_completion(response.content)
                    except MalformedResponse as err:
                        reason = self._redact(str(err))
                        log.warning("%s: malformed response: %s", self.name, reason)
                        return Completion.failed(f"malformed response from {self.base_url}: {reason}")
                last = f"HTTP {response.status_code}: {self._redact(_error_text(response))}"
                if not _retryable(response.status_code):
                    log.warning("%s: request failed, not retried: %s", self.name, last)
                    return Completion.failed(last)
                wait = _retry_after(response)
            if attempt + 1 < attempts:
                delay = self._delay(attempt, rng, wait)
                log.info("%s: %s; retry %d/%d in %.2f s", self.name, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        log.warning("%s: request failed after %d attempts: %s", self.name, attempts, last)
        return Completion.failed(f"failed after {attempts} attempts: {last}")

    def _delay(self, attempt: int, rng: random.Random, retry_after: float | None) -> float:
        """Capped exponential backoff with jitter in [50%, 100%]; a server's Retry-After wins
        (still capped)."""
        if retry_after is not None:
            return min(self.max_backoff, retry_after)
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + 0.5 * rng.random())

    def _http(self) -> httpx.Client:
        """One pooled client shared by the worker threads (httpx clients are thread-safe)."""
        with self._client_lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                            limits=httpx.Limits(max_connections=self.concurrency))
            return self._client

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _KEY_LIKE.sub("***", text)


# ---------------------------------------------------------------------- helpers

def request_seed(request: Request) -> int:
    """A 31-bit seed from the whole request (so ``seed=1, sample 0`` and ``seed=0, sample 1``
    differ); 31 bits because some servers reject larger integers."""
    payload = json.dumps(request.as_json(), sort_keys=True)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:4], "little") & (2**31 - 1)


def parse_completion(content: bytes) -> Completion:
    """A Completion from a chat-completion body; raises MalformedResponse with the reason."""
    try:
        body = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedResponse(f"body is not JSON: {content[:120]!r}") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("no 'choices' in the body")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise MalformedResponse("choices[0].message.content is missing (a refusal or tool call?)")
    logprobs = _token_logprobs(choice.get("logprobs"))
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    n_tokens = usage.get("completion_tokens")
    if not isinstance(n_tokens, int):
        n_tokens = len(logprobs) if logprobs is not None else 0
        if logprobs is None:
            log.warning("the server reported no token count (usage.completion_tokens): n_tokens = 0")
    return Completion(text=message["content"].strip(), n_tokens=n_tokens,
                      mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
                      finish="length" if choice.get("finish_reason") == "length" else "stop",
                      token_logprobs=logprobs)


def _token_logprobs(logprobs: Any) -> list[float] | None:
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    values = [t.get("logprob") for t in logprobs["content"] if isinstance(t, dict)]
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return [float(v) for v in values]


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error_text(response: httpx.Response) -> str:
    """The server's error message (OpenAI: {"error": {"message": ...}}), shortened."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            text = error.get("message") or error.get("detail") or json.dumps(error)
        else:
            text = str(error)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = response.text
    return " ".join(str(text).split())[:300]


def _clean_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.userinfo:
        raise ValueError("credentials in the base URL are not allowed: put the key in the environment")
    return url.rstrip("/")
