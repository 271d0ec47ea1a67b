"""`qwen3export serve` against the official `openai` client on 127.0.0.1: chat and completions, streamed and not,
thinking on/off/budget, stop strings, seeds, 16 concurrent clients each given the tokens `run` gives, a
disconnected client's slot reused, 429 on a full queue, 400s naming the field.

One artifact for the module: the tiny preset with Qwen3's tokenizer and chat template, --max-batch 8 (16 clients
share 8 slots), the build test_run_sampling uses."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from qwen3export.artifact import load_artifact
from qwen3export.chat import load_tokenizer
from qwen3export.cli import main
from qwen3export.model import load_model
from qwen3export.generation import sample_generate
from qwen3export.graphs.sampling import SamplingParams, initial_state
from qwen3export.runner import open_engine, sampling_pair
from qwen3export.serve.app import ServeConfig, Server, open_server
from qwen3export.serve.reasoning import OutputSplitter
from qwen3export.serve.scheduler import StepSlots
from qwen3export.tokens import END_THINK, ENDOFTEXT, IM_END, THINK

@pytest.fixture(scope="module")
def text_artifact(built_artifact):
    """The tiny preset (Qwen3's real tokenizer and chat template), the build test_run_sampling shares."""
    art = built_artifact("--model", "tiny", "--seed", "1")
    ids = {"<think>": THINK, "</think>": END_THINK, "<|im_end|>": IM_END, "<|endoftext|>": ENDOFTEXT}
    return art, load_tokenizer(load_artifact(art)), ids, "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server on 127.0.0.1 in a thread of this process."""

    def __init__(self, art, server=None, **config):
        self.server = server or open_server(load_artifact(art), 1, ServeConfig(**config))
        self.port = _free_port()
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(text_artifact):
    s = Running(text_artifact[0])
    yield s
    s.close()


def run_tokens(capsys, art, prompt: list[int], n: int, seed: int, *flags) -> list[int]:
    capsys.readouterr()
    assert main(["run", str(art), "--json", "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(n),
                 "--seed", str(seed), "--no-stop", "--threads", "1", *flags]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list().data] == [server.server.name]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    server.client.completions.create(model="x", prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ("qwen3export_requests_total", "qwen3export_generation_tokens_total", "qwen3export_queue_depth",
                 "qwen3export_batch_occupancy", "qwen3export_time_to_first_token_seconds_bucket",
                 "qwen3export_inter_token_latency_seconds_bucket"):
        assert name in text, name
    done = [l for l in text.splitlines() if l.startswith("qwen3export_time_to_first_token_seconds_count")]
    assert done and float(done[0].split()[-1]) >= 1


def test_chat_thinking_split_streaming_agrees(server, text_artifact):
    _, tok, ids, _ = text_artifact
    c = server.client
    kw = dict(model="m", messages=[{"role": "user", "content": "hello world"}], max_tokens=20, seed=3,
              temperature=0.0)
    whole = c.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    choice = whole.choices[0]
    toks = choice.model_extra["token_ids"]
    assert whole.usage.completion_tokens == len(toks) and whole.usage.prompt_tokens > 0
    # the split on token ids: what lies between <think> and </think> is reasoning, the rest content
    if ids["<think>"] in toks:
        a = toks.index(ids["<think>"])
        b = toks.index(ids["</think>"]) if ids["</think>"] in toks else len(toks)
        want_reasoning, rest = toks[a + 1:b], toks[:a] + toks[b + 1:]
    else:
        want_reasoning, rest = [], toks
    assert (choice.message.model_extra.get("reasoning_content") or "") == tok.decode(want_reasoning)
    assert choice.message.content == tok.decode([t for t in rest if t not in (ids["<|im_end|>"], ids["<|endoftext|>"])])
    assert whole.usage.completion_tokens_details.reasoning_tokens == len(want_reasoning)
    # streamed: the same text in pieces, the same finish
    parts, reasoning, finish = [], [], None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            reasoning.append((ch.delta.model_extra or {}).get("reasoning_content") or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == choice.message.content
    assert "".join(reasoning) == (choice.message.model_extra.get("reasoning_content") or "")
    assert finish == choice.finish_reason


def test_thinking_off_and_budget(server, text_artifact, capsys):
    art, tok, ids, _ = text_artifact
    c = server.client
    # thinking off: the template closes an empty block and the graph masks <think>; the tokens are those of
    # `run --thinking off` (its defaults per mode, the same graph) for the rendered prompt and seed
    for seed in range(2):
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                      seed=seed, extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                             "return_token_ids": True, "ignore_eos": True})
        toks, prompt = r.choices[0].model_extra["token_ids"], r.model_extra["prompt_token_ids"]
        assert prompt[-4:] == tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False).ids
        assert toks == run_tokens(capsys, art, prompt, 12, seed, "--thinking", "off")
        assert ids["<think>"] not in toks and not r.choices[0].message.model_extra.get("reasoning_content")
    # a prompt that opened <think>, budget 2: two thinking tokens, then Qwen's early-stop text closes the block,
    # the tokens `run --thinking-budget 2` gives
    prompt = tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>").ids
    early = load_artifact(art).manifest["sampling"]["early_stop_ids"]
    r = c.completions.create(model="m", prompt=prompt, max_tokens=len(early) + 4, seed=3,
                             extra_body={"thinking_budget": 2, "ignore_eos": True, "return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    assert got == run_tokens(capsys, art, prompt, len(early) + 4, 3, "--thinking-budget", "2")
    if ids["</think>"] not in got[:2]:
        assert got[2:2 + len(early)] == early
    assert "Considering the limited time by the user" in r.choices[0].text


def test_seed_and_stop(server):
    c = server.client
    kw = dict(model="m", prompt="the quick brown fox", max_tokens=24, temperature=1.5, top_p=1.0,
              extra_body={"ignore_eos": True, "top_k": 0})
    a, b = (c.completions.create(**kw, seed=11).choices[0].text for _ in range(2))
    other = c.completions.create(**kw, seed=12).choices[0].text
    assert a == b and a != other
    # a stop string taken from the middle of the text: the answer is the text before it, finish "stop"
    stop = a[len(a) // 2:len(a) // 2 + 3]
    assert stop.strip(), a
    r = c.completions.create(**kw, seed=11, stop=[stop])
    assert r.choices[0].text == a[:a.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, seed=11, stop=[stop], stream=True)
                       if ch.choices)
    assert streamed == r.choices[0].text


def test_sixteen_concurrent_clients_each_get_runs_tokens(server, text_artifact, capsys):
    """16 clients, 4 slots: every request answered; each row's tokens are `run`'s for its prompt and seed, so
    nothing was mixed between rows of different lengths decoding together."""
    art = text_artifact[0]
    jobs = [([5 + i, 40 + 3 * i, 7, 100 + i][:2 + i % 3], 8 + i % 5, 100 + i,
             dict(temperature=0.9 + 0.1 * (i % 3), top_k=[0, 5, 20][i % 3], top_p=[1.0, 0.9, 0.8][i % 3]))
            for i in range(16)]

    def ask(job):
        prompt, n, seed, sampling = job
        r = server.client.completions.create(model="m", prompt=prompt, max_tokens=n, seed=seed,
                                             temperature=sampling["temperature"], top_p=sampling["top_p"],
                                             extra_body={"ignore_eos": True, "return_token_ids": True,
                                                         "top_k": sampling["top_k"]})
        return r.choices[0].model_extra["token_ids"]

    before = server.server.scheduler.steps
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert server.server.scheduler.steps - before < sum(j[1] for j in jobs) / 2  # rows decoded together
    # the reference: `run`'s own generation loop (generation.sample_generate, one prompt at a time on a fresh
    # engine, the artifact's sampling graph, run's defaults and seeding); the first job through the CLI itself
    artifact = load_artifact(art)
    engine = open_engine(artifact, 1)
    graph, sampler = sampling_pair(artifact, 1, engine)
    for i, ((prompt, n, seed, sampling), tokens) in enumerate(zip(jobs, got)):
        if i == 0:
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()]
            assert tokens == run_tokens(capsys, art, prompt, n, seed, *flags)
        params = SamplingParams.recommended(True, artifact.manifest["sampling"]["defaults"], **sampling)
        want, _ = sample_generate(engine, engine.empty_cache(1), sampler, prompt, params.to_tensors(1),
                                  initial_state([prompt], graph.vocab), n, np.random.default_rng(seed))
        assert tokens == want, (prompt, seed)


def test_disconnect_frees_the_slot(server):
    sched = server.server.scheduler
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": [5, 6, 7], "max_tokens": 60, "stream": True, "ignore_eos": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))  # generating: it holds a slot
        assert sched.active() == 1
    deadline = time.time() + 20
    while sched.active() and time.time() < deadline:
        time.sleep(0.02)
    assert sched.active() == 0, "the disconnected request still holds its slot"
    # the freed slot serves the next request
    r = server.client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_full_queue_answers_429(text_artifact):
    s = Running(text_artifact[0], max_queue=1, max_batch=1)
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60) for _ in range(6)]
            answers = [f.result() for f in futures]
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 429 in codes, codes
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.headers["Retry-After"] and "max-queue" in busy.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):  # the client sees OpenAI's rate-limit error
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: s.client.completions.create(model="m", prompt=[5], max_tokens=50,
                                                                     extra_body={"ignore_eos": True}), range(4)))
    finally:
        s.close()


@pytest.mark.parametrize("body, field", [
    ({"prompt": [5], "max_tokens": "many"}, "max_tokens"),
    ({"prompt": [5], "temperature": -1}, "temperature"),
    ({"prompt": [5], "top_p": 1.5}, "top_p"),
    ({"prompt": [5], "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": [5], "thinking_budget": -2}, "thinking_budget"),
    ({"prompt": [5], "stream": "yes"}, "stream"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "MAXSEQ"}, "prompt"),  # as long as max-seq: no room
    ({"prompt": [5], "max_tokens": "MAXSEQ"}, "max_tokens"),
    ({"prompt": [5], "chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs"),
])
def test_bad_input_is_400_naming_the_field(server, body, field):
    n = server.server.max_seq
    body = {k: ([5] * n if k == "prompt" else n) if v == "MAXSEQ" else v for k, v in body.items()}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] and err["param"].startswith(field) and field in err["message"], err


def test_bad_json_and_chat_messages(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    long = " ".join(["hello world"] * server.server.max_seq)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and "per sequence" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="m", messages=[], max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_step_engines_serve_one_request_at_a_time(text_artifact, capsys):
    """A decoder with the Step signature (aoti, standard-ops onnx, --tp/--ep engines carry one cache between
    calls), here eager PyTorch over the same checkpoint, is served as one slot: concurrent requests wait their
    turn and each gets the greedy tokens of the artifact's `run`."""
    art, _, _, model = text_artifact
    artifact = load_artifact(art)
    engine = StepSlots(load_model(model, seed=1), 64)
    s = Running(art, Server(artifact, engine, sampling_pair(artifact, 1)[1], ServeConfig()))
    try:
        assert s.server.scheduler.max_batch == 1
        prompts = [[5, 6, 7], [9, 30, 31, 32, 33], [100]]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model="m", prompt=p, max_tokens=10, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"],
                prompts))
        for p, tokens in zip(prompts, got):
            assert tokens == run_tokens(capsys, art, p, 10, 0, "--greedy")
    finally:
        s.close()


@pytest.mark.parametrize("text, opened, stops, want_reasoning, want_content", [
    ("<think>Let me think: 2 + 2 = 4, 大概.</think>\n\nThe answer is 4 ✅.", False, [],
     "Let me think: 2 + 2 = 4, 大概.", "\n\nThe answer is 4 ✅."),
    ("the prompt opened it</think>مرحبا answer", True, [], "the prompt opened it", "مرحبا answer"),
    ("<think>x</think>The answer is 4.", False, ["is 4"], "x", "The answer "),
    ("no thinking at all", False, [], "", "no thinking at all"),
])
def test_reasoning_split_on_tokens(text_artifact, text, opened, stops, want_reasoning, want_content):
    """The <think> split (vLLM's Qwen3 parser's result) per token: the deltas add up to the whole split, and a
    stop string cuts the text before it."""
    tok = text_artifact[1]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - as the server decodes
    splitter = OutputSplitter(decode, stops, THINK, END_THINK, opened, True)
    reasoning, content = [], []
    for t in tok.encode(text, add_special_tokens=False).ids:
        r, c = splitter.add(t)
        reasoning.append(r)
        content.append(c)
        if splitter.stopped:
            break
    r, c = splitter.flush()
    assert ("".join(reasoning) + r, "".join(content) + c) == (want_reasoning, want_content)
    assert splitter.stopped == bool(stops)
