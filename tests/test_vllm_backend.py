"""The vLLM backend: request -> SamplingParams and RequestOutput -> Completion mappings, tested
with small fake objects (vLLM is an optional extra and is not installed in the test
environment); the whole ``VLLMModel`` driven through a fake engine; and a real-vLLM test that is
skipped unless vLLM and a GPU are present."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from wowlib.llm import vllm_backend as vb
from wowlib.llm.base import Completion, Decoding, Request
from wowlib.llm.cache import CachedLLM

SAMPLING = Decoding(temperature=1.0, max_new_tokens=20)
GREEDY = Decoding(temperature=0.0, max_new_tokens=8, min_new_tokens=2)


def _req(text: str, sample_idx: int = 0, decoding: Decoding = SAMPLING, seed: int = 0) -> Request:
    return Request.chat([{"role": "user", "content": text}], decoding, sample_idx, seed)


# ---------------------------------------------------------------------------- fakes

@dataclass
class Logprob:                       # vllm.sequence.Logprob
    logprob: float
    rank: int = 1


@dataclass
class Output:                        # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


def _output(index: int, text: str, token_ids: list[int], lps: list[float], **kw) -> Output:
    return Output(index, text, token_ids, [{t: Logprob(lp), 999: Logprob(-0.01)} for t, lp in zip(token_ids, lps)], **kw)


# ---------------------------------------------------------------------------- request -> vLLM

def test_sample_groups_one_request_per_prompt_with_consecutive_samples() -> None:
    requests = [_req("a", 0), _req("b", 0), _req("a", 1), _req("a", 2), _req("b", 1),
                _req("a", 5),                          # a gap: its own vLLM request
                _req("a", 0, GREEDY),                  # other decoding: another prompt
                _req("a", 3, seed=1)]                  # other seed: another prompt
    groups = vb.sample_groups(requests)
    assert groups == [[0, 2, 3], [5], [1, 4], [6], [7]]
    assert sorted(i for g in groups for i in g) == list(range(len(requests)))


def test_sampling_kwargs_map_decoding_n_seed_logprobs_and_stops() -> None:
    group = [_req("a", 3), _req("a", 4), _req("a", 5)]
    kwargs = vb.sampling_kwargs(group, stop_strings=("\nUser:",))
    assert kwargs == {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 20, "min_tokens": 0,
                      "seed": vb.base_seed(group[0]) + 3, "logprobs": 1, "skip_special_tokens": True,
                      "stop": ["\nUser:"]}
    greedy = vb.sampling_kwargs([_req("a", 0, GREEDY)])
    assert (greedy["temperature"], greedy["max_tokens"], greedy["min_tokens"], greedy["n"]) == (0.0, 8, 2, 1)
    assert "stop" not in greedy
    assert 0 <= vb.base_seed(group[0]) < 2**31
    with pytest.raises(ValueError, match="consecutive"):
        vb.sampling_kwargs([_req("a", 0), _req("a", 2)])
    with pytest.raises(ValueError, match="share"):
        vb.sampling_kwargs([_req("a", 0), _req("b", 1)])


def test_sample_seed_does_not_depend_on_grouping() -> None:
    """vLLM seeds the k-th output of an n-sample request with seed + k: sample i of a prompt is
    drawn with base + i whether it is sent alone or with its neighbours."""
    alone = vb.sampling_kwargs([_req("q", 4)])["seed"]
    grouped = vb.sampling_kwargs([_req("q", 2), _req("q", 3), _req("q", 4)])["seed"] + 2
    assert alone == grouped
    assert vb.base_seed(_req("q", 0, seed=0)) != vb.base_seed(_req("q", 0, seed=1))
    assert vb.base_seed(_req("q", 0)) != vb.base_seed(_req("r", 0))


def test_engine_kwargs_tensor_parallel_lora_and_validation() -> None:
    kwargs = vb.engine_kwargs("/models/llama", tensor_parallel_size=4, dtype="bfloat16", adapter_rank=12,
                              max_model_len=4096, quantization="bitsandbytes", swap_space=8)
    assert kwargs["model"] == "/models/llama" and kwargs["tensor_parallel_size"] == 4
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 1)
    assert kwargs["trust_remote_code"] is False
    assert (kwargs["max_model_len"], kwargs["quantization"], kwargs["swap_space"]) == (4096, "bitsandbytes", 8)
    assert "enable_lora" not in vb.engine_kwargs("m")
    assert vb.lora_rank(16) == 16 and vb.lora_rank(17) == 32
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vb.engine_kwargs("m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="rank"):
        vb.lora_rank(1000)


# ---------------------------------------------------------------------------- vLLM -> records

def test_completion_excludes_the_eos_token_from_the_answer() -> None:
    out = _output(0, " The answer is B. ", [5, 6, 7, 2], [-1.0, -2.0, -3.0, -0.5])
    c = vb.completion_from_output(out)
    assert (c.text, c.n_tokens, c.finish, c.status) == ("The answer is B.", 3, "stop", "ok")
    assert c.mean_logprob == pytest.approx(-2.0)
    assert c.token_logprobs == [-1.0, -2.0, -3.0, -0.5]


def test_completion_at_the_length_limit_and_after_a_stop_string() -> None:
    length = vb.completion_from_output(_output(0, "abc", [5, 6], [-1.0, -3.0], finish_reason="length"))
    assert (length.n_tokens, length.finish, length.mean_logprob) == (2, "length", pytest.approx(-2.0))
    stopped = vb.completion_from_output(_output(0, "Yes\nUser: more", [5, 6, 7], [-1.0, -1.0, -4.0],
                                                stop_reason="\nUser:"), stop_strings=("\nUser:",))
    assert (stopped.text, stopped.n_tokens, stopped.mean_logprob) == ("Yes", 3, pytest.approx(-2.0))


def test_an_empty_answer_keeps_the_stop_token_logprob() -> None:
    c = vb.completion_from_output(_output(0, "", [2], [-0.25]))
    assert (c.text, c.n_tokens, c.mean_logprob) == ("", 0, pytest.approx(-0.25))
    assert math.exp(c.mean_logprob) <= 1


def test_missing_logprobs_give_no_confidence_not_an_error() -> None:
    c = vb.completion_from_output(Output(0, "x", [5, 2], None))
    assert (c.status, c.mean_logprob, c.n_tokens) == ("ok", None, 1)
    partial = Output(0, "x", [5, 2], [{5: Logprob(-1.0)}, {7: Logprob(-1.0)}])     # token 2 not reported
    assert vb.completion_from_output(partial).mean_logprob is None


@pytest.mark.parametrize("output", [
    Output(0, "half", [5], None, finish_reason="abort"),
    Output(0, "half", [5], None, finish_reason=None),
    SimpleNamespace(finish_reason="stop"),                       # no text, no tokens
])
def test_failed_outputs_are_errors_never_answers(output) -> None:
    c = vb.completion_from_output(output)
    assert (c.status, c.finish, c.text, c.mean_logprob) == ("error", "error", "", None)
    assert c.error


def test_request_output_in_sample_order_and_count_checked() -> None:
    outs = [_output(1, "second", [6, 2], [-1.0, -1.0]), _output(0, "first", [5, 2], [-1.0, -1.0])]
    got = vb.completions_from_request_output(SimpleNamespace(outputs=outs), n=2)
    assert [c.text for c in got] == ["first", "second"]
    short = vb.completions_from_request_output(SimpleNamespace(outputs=outs[:1]), n=2)
    assert [c.status for c in short] == ["error", "error"] and "1 outputs for a request of n=2" in short[0].error
    assert [c.status for c in vb.completions_from_request_output(SimpleNamespace(), n=1)] == ["error"]


def test_prompt_token_logprobs() -> None:
    ids = [1, 5, 6, 7]
    plp = [None, {5: Logprob(-1.0)}, {6: Logprob(-2.0), 9: Logprob(-0.1)}, {7: Logprob(-3.0)}]
    assert vb.prompt_token_logprobs(plp, ids, 2) == [-2.0, -3.0]
    assert vb.prompt_token_logprobs(plp, ids, 4) == []
    with pytest.raises(ValueError, match="too few"):
        vb.prompt_token_logprobs(plp[:2], ids, 2)
    with pytest.raises(ValueError, match="start"):
        vb.prompt_token_logprobs(plp, ids, 0)
    assert vb.scoring_kwargs()["prompt_logprobs"] == 1 and vb.scoring_kwargs()["max_tokens"] == 1


# ---------------------------------------------------------------------------- the model, on a fake engine

class FakeTokenizer:
    """One token per character (ids = code points), a ChatML-like template."""

    eos = 3

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@dataclass
class FakeEngine:
    """Answers deterministically from each output's seed (seed + k for the k-th of n, as vLLM V1);
    scores a prompt token j as -j/1000."""

    fail: bool = False
    calls: list = field(default_factory=list)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, params, lora_request))
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        results = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            if p.kw.get("prompt_logprobs"):
                plp = [None] + [{t: Logprob(-j / 1000)} for j, t in enumerate(ids) if j > 0]
                results.append(SimpleNamespace(outputs=[_output(0, "", [3], [0.0])], prompt_logprobs=plp))
                continue
            outs = []
            for k in range(p.kw["n"]):
                seed = p.kw["seed"] + k
                outs.append(_output(k, f"answer {seed}", [10 + seed % 7, FakeTokenizer.eos], [-0.5, -0.1]))
            results.append(SimpleNamespace(outputs=outs[::-1], prompt_logprobs=None))    # any order
        return results


class FakeParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    api = SimpleNamespace(LLM=None, SamplingParams=FakeParams,
                          LoRARequest=lambda name, idx, path: SimpleNamespace(name=name, id=idx, path=path))
    monkeypatch.setattr(vb, "_vllm_api", lambda: api)
    return api


def test_model_answers_are_independent_of_grouping_and_cached(fake_vllm, tmp_path) -> None:
    engine = FakeEngine()
    model = vb.VLLMModel("tiny", "/unused", engine=engine, max_batch=4)
    assert model.key == "vllm:tiny" and model.name == "tiny"
    requests = [_req(q, i) for q in ("q1", "q2") for i in range(3)]
    plan = model.plan(requests)
    assert plan == [[0, 1, 2], [3, 4, 5]]                    # groups never split across batches
    full = model.run_batch(requests)
    assert all(c.status == "ok" and c.n_tokens == 1 and c.mean_logprob == -0.5 for c in full)
    prompts, params, lora = engine.calls[0]
    assert [p.kw["n"] for p in params] == [3, 3] and lora is None
    assert prompts[0]["prompt_token_ids"] == [ord(c) for c in "<user>q1\n<assistant>"]
    # sample 2 alone gets the same seed, hence the same answer, as inside its group
    assert model.run_batch([requests[2]])[0].text == full[2].text
    assert len({c.text for c in full}) == len(full)
    cached = CachedLLM(model, tmp_path)
    first = cached.generate(requests)
    again = CachedLLM(model, tmp_path).generate(requests)
    assert [c.text for c in first] == [c.text for c in again] == [c.text for c in full]


def test_engine_failure_is_an_error_status_and_not_cached(fake_vllm, tmp_path) -> None:
    model = vb.VLLMModel("tiny", "/unused", engine=FakeEngine(fail=True))
    out = CachedLLM(model, tmp_path).generate([_req("q", 0), _req("q", 1)])
    assert [c.status for c in out] == ["error", "error"]
    assert "CUDA out of memory" in out[0].error
    assert not any(tmp_path.iterdir())                       # nothing cached: a rerun retries


def test_score_and_choice_logprobs_read_prompt_logprobs(fake_vllm) -> None:
    model = vb.VLLMModel("tiny", "/unused", engine=FakeEngine())
    chat = [{"role": "user", "content": "hi"}]
    head = len(model.encode(model.render(chat)))
    scores = model.score([chat], ["ab"])
    assert scores == [[-head / 1000, -(head + 1) / 1000]]
    got = model.choice_logprobs([chat, chat], "Preferred output: ", ["1", "2"])
    n = len(model.encode(model.render(chat, "Preferred output: ")))
    assert got == [{"1": -n / 1000, "2": -n / 1000}] * 2
    with pytest.raises(ValueError, match="single token"):
        model.choice_logprobs([chat], "", ["12"])


def test_adapter_becomes_a_lora_request_and_part_of_the_key(fake_vllm, tmp_path) -> None:
    adapter = tmp_path / "dpo-oracle"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    engine = FakeEngine()
    model = vb.VLLMModel("tiny", "/unused", adapter=adapter, engine=engine)
    assert model.name == "tiny+dpo-oracle" and model.key.startswith("vllm:tiny+adapter:")
    model.run_batch([_req("q")])
    assert engine.calls[0][2].path == str(adapter)


def test_without_vllm_the_error_says_how_to_install() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"\.\[vllm\]"):
            vb.VLLMModel("tiny", "/unused")
    else:
        pytest.skip("vLLM is installed here")


# ---------------------------------------------------------------------------- real vLLM (GPU machines)

def test_real_vllm_matches_hf_greedy_on_the_tiny_model() -> None:
    pytest.importorskip("vllm", reason="vLLM is an optional extra (pip install -e '.[vllm]'), absent here")
    import torch
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU; none here")
    from wowlib.llm.engine.hf import HFModel
    from wowlib.llm.tiny import tiny_model_dir
    tiny_dir = tiny_model_dir()
    model = vb.VLLMModel("tiny", tiny_dir, gpu_memory_utilization=0.3, enforce_eager=True, dtype="float32")
    hf = HFModel("tiny", tiny_dir)
    requests = [_req(q, 0, Decoding(temperature=0.0, max_new_tokens=16)) for q in ("Question: a?", "Question: b?")]
    ours, theirs = model.run_batch(requests), hf.run_batch(requests)
    assert [c.status for c in ours] == ["ok", "ok"]
    assert [c.text for c in ours] == [c.text for c in theirs]
    sampled = model.run_batch([_req("Question: c?", i) for i in range(4)])
    assert all(isinstance(c, Completion) and c.mean_logprob is not None for c in sampled)
    chat = [requests[0].message_dicts]
    assert model.score(chat, ["The answer is A."])[0] == pytest.approx(hf.score(chat, ["The answer is A."])[0], abs=1e-3)
