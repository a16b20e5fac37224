"""The OpenAI-compatible backend against real local servers: a controllable stub (every failure
mode) and ``transformers serve`` with the tiny model (a real completion, end to end)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai_stub import LOGPROBS, StubServer

from wowlib.llm.base import GREEDY_32, Decoding, Request
from wowlib.llm.cache import CachedLLM
from wowlib.llm.models import load_llm
from wowlib.llm.openai_compat import (
    MalformedResponse,
    OpenAIChat,
    parse_completion,
    request_seed,
)

SECRET = "sk-test-Zq81-NOT-A-REAL-KEY-4f2c9d"
FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5.0}


@pytest.fixture(scope="module", autouse=True)
def served(tmp_path_factory, tiny_dir):
    """Starts ``transformers serve`` at once and in the background: its ~15-30 s start-up
    overlaps the stub tests; ``real_server`` waits for it."""
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"`transformers serve` needs {missing}: pip install fastapi uvicorn openai (see requirements.txt)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([cli, "serve", str(tiny_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    yield {"proc": proc, "url": f"http://127.0.0.1:{port}/v1", "log": log_path, "model": str(tiny_dir)}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def real_server(served) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if served["proc"].poll() is not None:
            pytest.fail(f"transformers serve exited ({served['proc'].returncode}):\n{served['log'].read_text()[-3000:]}")
        try:
            if httpx.get(served["url"].removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"transformers serve not up after 180 s:\n{served['log'].read_text()[-3000:]}")


@pytest.fixture
def stub():
    with StubServer(slow_s=2.0) as server:
        yield server


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(text: str, decoding: Decoding = GREEDY_32, sample_idx: int = 0) -> Request:
    return Request.chat([{"role": "user", "content": text}], decoding, sample_idx=sample_idx, seed=0)


# ---------------------------------------------------------------------- configuration

def test_key_and_url_from_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIChat("gpt-4o")                          # the real API needs a key
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        load_llm("gpt-4o")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    llm = OpenAIChat("local-model")                   # a local server may need none
    assert (llm.name, llm.key) == ("local-model", "openai:http://127.0.0.1:9/v1:local-model")
    other = load_llm("openai:m", base_url="http://localhost:8000/v1", concurrency=2)
    assert isinstance(other, OpenAIChat) and other.key == "openai:http://localhost:8000/v1:m"
    with pytest.raises(ValueError, match="credentials"):
        OpenAIChat("m", base_url="http://user:pw@localhost/v1")


def test_plan_and_payload():
    llm = OpenAIChat("m", base_url="http://127.0.0.1:9/v1", concurrency=3)
    requests = [ask(f"q{i}") for i in range(7)]
    assert llm.plan(requests) == [[0, 1, 2], [3, 4, 5], [6]] == llm.plan(requests)
    body = llm.payload(ask("q", Decoding(temperature=1.0, max_new_tokens=64, top_p=0.9), sample_idx=2))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 1.0,
                    "top_p": 0.9, "max_tokens": 64, "seed": body["seed"], "logprobs": True}
    seeds = {request_seed(ask("q", sample_idx=i)) for i in range(10)}
    assert len(seeds) == 10 and all(0 <= s < 2**31 for s in seeds)
    assert request_seed(ask("q", sample_idx=3)) == request_seed(ask("q", sample_idx=3))
    assert "logprobs" not in OpenAIChat("m", base_url="http://127.0.0.1:9/v1", logprobs=False).payload(ask("q"))


def test_logprob_modes_need_a_local_backend():
    llm = OpenAIChat("m", base_url="http://127.0.0.1:9/v1")
    chat = [{"role": "user", "content": "q"}]
    with pytest.raises(NotImplementedError, match="mode='text'"):
        llm.choice_logprobs([chat], "Preferred output: ", ["1", "2"])
    with pytest.raises(NotImplementedError, match="local backend"):
        llm.score([chat], ["answer"])


def test_parse_completion_fallbacks():
    body = {"choices": [{"message": {"content": " hi "}, "finish_reason": "length"}]}
    c = parse_completion(json.dumps(body).encode())
    assert (c.text, c.n_tokens, c.mean_logprob, c.finish, c.status) == ("hi", 0, None, "length", "ok")
    body["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": -1.0}, {"token": "b", "logprob": -3.0}]}
    c = parse_completion(json.dumps(body).encode())
    assert (c.n_tokens, c.mean_logprob) == (2, -2.0)
    for bad in (b"not json", b"[]", b'{"choices": [{"message": {"content": null}}]}', b'{"choices": [{}]}'):
        with pytest.raises(MalformedResponse):
            parse_completion(bad)


# ---------------------------------------------------------------------- the stub server

def test_completion_order_and_fields(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = OpenAIChat("ok", base_url=stub.url, concurrency=4, **FAST)
    requests = [ask(f"question {i}") for i in range(10)]
    out = [c for batch in llm.plan(requests) for c in llm.run_batch([requests[i] for i in batch])]
    assert [c.text for c in out] == [f"echo: question {i}" for i in range(10)]
    assert all(c.status == "ok" and c.n_tokens == 3 and c.finish == "stop" for c in out)
    assert out[0].mean_logprob == pytest.approx(sum(LOGPROBS) / 3)
    sent = stub.requests[0]
    assert sent["authorization"] is None              # no key in the environment: no header
    assert sent["body"]["max_tokens"] == 32 and sent["body"]["temperature"] == 0 and sent["body"]["logprobs"]


def test_retries_after_500_and_429(stub, tmp_path):
    llm = OpenAIChat("flaky", base_url=stub.url, max_retries=3, **FAST)
    [c] = CachedLLM(llm, tmp_path).generate([ask("q")])
    assert c.status == "ok" and c.text == "echo: q" and stub.n_calls("flaky") == 3
    [c] = OpenAIChat("ratelimit", base_url=stub.url, max_retries=1, **FAST).run_batch([ask("q")])
    assert c.status == "ok" and stub.n_calls("ratelimit") == 2


def test_persistent_500_is_an_uncached_error(stub, tmp_path):
    llm = OpenAIChat("down", base_url=stub.url, max_retries=2, **FAST)
    cached = CachedLLM(llm, tmp_path)
    [c] = cached.generate([ask("q")])
    assert (c.status, c.finish, c.text) == ("error", "error", "")
    assert "3 attempts" in c.error and "HTTP 500" in c.error
    assert stub.n_calls("down") == 3 and len(cached) == 0 and cached.stats["errors"] == 1
    [again] = CachedLLM(llm, tmp_path).generate([ask("q")])     # a rerun retries it
    assert again.status == "error" and stub.n_calls("down") == 6


def test_timeout_is_retried_then_an_error(stub):
    llm = OpenAIChat("slow", base_url=stub.url, max_retries=1, backoff=0.01, timeout=0.3)
    start = time.monotonic()
    [c] = llm.run_batch([ask("q")])
    assert c.status == "error" and "timeout" in c.error and "2 attempts" in c.error
    assert stub.n_calls("slow") == 2 and time.monotonic() - start < 1.9    # did not wait for the 2 s server


def test_connection_refused_is_retried_then_an_error():
    llm = OpenAIChat("m", base_url=f"http://127.0.0.1:{_free_port()}/v1", max_retries=2, **FAST)
    [c] = llm.run_batch([ask("q")])
    assert c.status == "error" and "connection error" in c.error and "3 attempts" in c.error


@pytest.mark.parametrize("model, message", [("garbage", "not JSON"), ("nochoices", "choices")])
def test_malformed_body_is_an_error(stub, model, message):
    [c] = OpenAIChat(model, base_url=stub.url, **FAST).run_batch([ask("q")])
    assert c.status == "error" and "malformed" in c.error and message in c.error
    assert stub.n_calls(model) == 1


def test_client_error_is_not_retried(stub):
    [c] = OpenAIChat("bad", base_url=stub.url, max_retries=5, **FAST).run_batch([ask("q")])
    assert c.status == "error" and "HTTP 400" in c.error and "max_tokens is too large" in c.error
    assert stub.n_calls("bad") == 1


def test_api_key_never_leaks(stub, secret_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)                    # every logger, httpx included
    llms = {m: OpenAIChat(m, base_url=stub.url, max_retries=1, **FAST) for m in ("ok", "down", "unauthorized", "garbage")}
    records = []
    for llm in llms.values():
        cached = CachedLLM(llm, tmp_path)
        records += [c.as_json() for c in cached.generate([ask("q"), ask("r")])]
        assert SECRET not in llm.key and SECRET not in repr(llm) and SECRET not in str(vars(cached))
    assert stub.requests[0]["authorization"] == f"Bearer {SECRET}"     # the key is used...
    echoed = [r for r in records if r["error"] and ("HTTP 401" in r["error"] or "malformed" in r["error"])]
    assert len(echoed) == 4 and all("Bearer ***" in r["error"] for r in echoed)  # ...the server's echo is redacted
    assert SECRET not in json.dumps(records)
    assert SECRET not in caplog.text and "sk-test" not in caplog.text
    assert all(SECRET not in p.read_text() for p in tmp_path.iterdir())


# ---------------------------------------------------------------------- transformers serve

@pytest.mark.slow
def test_real_completion_through_transformers_serve(real_server, tmp_path):
    """A real answer of the tiny model through HTTP, cached; a second call is a cache hit."""
    llm = OpenAIChat(real_server["model"], base_url=real_server["url"], timeout=120, max_retries=1, backoff=0.01)
    requests = [ask("Question: which edge?\nOptions:\nA. one\nB. two\n"),
                ask("Question: which path is shortest?", Decoding(temperature=0.0, max_new_tokens=3))]
    cached = CachedLLM(llm, tmp_path)
    first = cached.generate(requests)
    assert all(c.status == "ok" and c.text for c in first), [c.error for c in first]
    assert first[0].n_tokens > 0 and first[0].finish in ("stop", "length")
    assert (first[1].finish, first[1].n_tokens) == ("length", 3)       # max_tokens reached the server
    assert first[0].mean_logprob is None       # transformers serve ignores `logprobs`: None, never a fake
    again = CachedLLM(llm, tmp_path)
    second = again.generate(requests)
    assert again.stats == {"cached": 2, "computed": 0, "errors": 0}
    assert [c.as_json() for c in second] == [c.as_json() for c in first]
