"""The OpenAI-compatible HTTP layer (FastAPI on uvicorn): /v1/chat/completions, /v1/completions (streamed as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), /v1/models, /health, /metrics.

Requests are validated by pydantic models: bad JSON, a wrong type or an out-of-range value answers 400 with the
field named; a prompt longer than the engine's max-seq answers 400; a full queue 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from qwen3export.graphs.sampling import SamplingParams, SamplingVocab

from ..artifact import Artifact
from ..chat import load_tokenizer, render_chat
from ..errors import InputError, Qwen3ExportError
from ..generation import SlotDecoder
from ..parallel_artifact import ParallelEngine
from ..runner import open_engine, sampling_pair
from ..memory_plan import DEFAULT_SERVING_SEQ
from .reasoning import OutputSplitter, ids_text
from .scheduler import QueueFull, Request, Scheduler, StepSlots

RETRY_AFTER_S = 1


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    stream: StrictBool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 = off (vLLM), as 0
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(None, ge=-1)
    ignore_eos: StrictBool = False  # vLLM's: generate max_tokens whatever the model wants
    return_token_ids: StrictBool = False  # vLLM's: each choice carries its generated token ids


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_TextPart] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: StrictBool = False


# ---------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in the app's own registry (several servers in one process, as tests start them)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen3export_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwen3export_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("qwen3export_generation_tokens", "Tokens generated", registry=r)
        self.queue = Gauge("qwen3export_queue_depth", "Requests waiting for a slot", registry=r)
        self.occupancy = Gauge("qwen3export_batch_occupancy", "Slots in use / max batch", registry=r)
        self.running = Gauge("qwen3export_running_requests", "Requests holding a slot", registry=r)
        buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("qwen3export_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("qwen3export_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=buckets, registry=r)

    def gauges(self, queued: int, active: int, max_batch: int) -> None:
        self.queue.set(queued)
        self.running.set(active)
        self.occupancy.set(active / max_batch)

    def token(self, req: Request, now: float) -> None:
        self.generation_tokens.inc()
        if len(req.times) == 1:
            self.ttft.observe(now - req.submitted)
        else:
            self.itl.observe(now - req.times[-2])


# ---------------------------------------------------------------------- errors
def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
    kind = {429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class BadRequest(InputError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------- the server
@dataclass
class ServeConfig:
    max_queue: int = 64
    max_batch: int | None = None  # default: the artifact's serving max_batch
    model_name: str | None = None


class Server:
    """The artifact's engine and sampler behind a Scheduler, and the FastAPI app that feeds it."""

    def __init__(self, artifact: Artifact, engine, sampler, config: ServeConfig):
        m = artifact.manifest
        self.artifact, self.engine, self.config = artifact, engine, config
        self.spec = engine.spec
        self.vocab = SamplingVocab.from_spec(self.spec)
        self.defaults = m["sampling"]["defaults"]
        self.max_seq = min(getattr(engine, "max_seq", None) or (m.get("serving") or {}).get("max_seq", DEFAULT_SERVING_SEQ),
                           self.spec.max_positions)
        self.name = config.model_name or artifact.path.name
        self.tokenizer = load_tokenizer(artifact) if "tokenizer.json" in m["sampling"].get("tokenizer_files", []) \
            else None
        self.metrics = Metrics()
        if config.max_batch is not None and config.max_batch > engine.max_batch:
            if getattr(engine, "max_seq", None) is None or isinstance(engine, StepSlots):
                raise InputError(f"--max-batch {config.max_batch}: this artifact's engine serves "
                                 f"{engine.max_batch} request(s) at a time")
            engine.reserve(config.max_batch, engine.max_seq)
        self.scheduler = Scheduler(engine, sampler, self.vocab, config.max_queue, self.metrics)
        if config.max_batch is not None:
            self.scheduler.max_batch = config.max_batch
        self.created = int(time.time())
        self.app = self._build_app()

    # -------------------------------------------------------------- text
    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ids_text(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_ids(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise BadRequest(f"{field} is empty: give at least one token", field)
        bad = next((i for i in ids if not 0 <= i < self.spec.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"{field}: token id {bad} is out of range 0..{self.spec.vocab_size - 1}", field)
        return ids

    def _encode(self, text: str, field: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest(f"artifact {self.artifact.path.name} has no tokenizer (built from a preset): give "
                             f"{field} as a list of token ids to /v1/completions", field)
        return self._check_ids(self.tokenizer.encode(text, add_special_tokens=False).ids, field)

    # -------------------------------------------------------------- requests
    def _make(self, body: _Body, prompt: list[int], thinking: bool, split: bool, max_tokens: int | None) -> Request:
        if len(prompt) >= self.max_seq:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; this engine holds {self.max_seq} per sequence "
                             "(prompt + completion): shorten it or rebuild with a larger --max-seq", "messages"
                             if split else "prompt")
        room = self.max_seq - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise BadRequest(f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens exceed this engine's "
                             f"{self.max_seq} per sequence: ask for at most {room}", "max_tokens")
        overrides = {k: getattr(body, k) for k in ("temperature", "top_p", "min_p", "presence_penalty",
                                                   "repetition_penalty") if getattr(body, k) is not None}
        if body.top_k is not None:
            overrides["top_k"] = max(body.top_k, 0)
        if body.thinking_budget is not None:
            overrides["thinking_budget"] = body.thinking_budget
        try:
            params = SamplingParams.recommended(thinking, self.defaults, **overrides)
        except InputError as e:
            raise BadRequest(str(e), next((k for k in overrides if k in str(e)), None)) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        splitter = OutputSplitter(self.decode, stops, self.vocab.think_id, self.vocab.end_think_id,
                                  _opens_think(prompt, self.vocab), split, skip=self.spec.eos_token_ids)
        stop_ids = frozenset() if body.ignore_eos else frozenset(self.spec.eos_token_ids)
        return Request(prompt, params, max_tokens or room, body.seed, stop_ids, splitter)

    def chat_request(self, body: ChatBody) -> Request:
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", True)
        if not isinstance(thinking, bool):
            raise BadRequest("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
        if self.tokenizer is None:
            raise BadRequest(f"artifact {self.artifact.path.name} has no tokenizer or chat template (built from a "
                             "preset): use /v1/completions with the prompt as a list of token ids", "messages")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in body.messages]
        prompt = self._encode(render_chat(self.artifact, messages, thinking), "messages")
        return self._make(body, prompt, thinking, True, body.max_completion_tokens or body.max_tokens)

    def completion_request(self, body: CompletionBody) -> Request:
        p = body.prompt
        if isinstance(p, str):
            prompt = self._encode(p, "prompt")
        elif p and isinstance(p[0], int):
            prompt = self._check_ids(list(p), "prompt")
        elif len(p) == 1:  # a batch of one
            prompt = self._encode(p[0], "prompt") if isinstance(p[0], str) else self._check_ids(list(p[0]), "prompt")
        else:
            raise BadRequest("prompt: give one prompt (a string or a list of token ids); batches of prompts are "
                             "not supported, send one request each", "prompt")
        thinking = (body.chat_template_kwargs or {}).get("enable_thinking", True)
        if not isinstance(thinking, bool):
            raise BadRequest("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
        return self._make(body, prompt, thinking, False, body.max_tokens)

    # -------------------------------------------------------------- the app
    def _build_app(self) -> FastAPI:
        server = self

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            server.scheduler.start()
            yield
            server.scheduler.stop()

        app = FastAPI(title="qwen3export serve", lifespan=lifespan)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: HttpRequest, exc: RequestValidationError):
            err = exc.errors()[0] if exc.errors() else {}
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            field = ".".join(loc) or "body"
            msg = "the body is not valid JSON" if err.get("type") == "json_invalid" else err.get("msg", "invalid")
            self.metrics.requests.labels(request.url.path, "400").inc()
            return _error(400, f"{field}: {msg}", field)

        @app.get("/health")
        async def health():
            if server.scheduler.error is not None:
                return _error(503, f"the engine loop stopped: {server.scheduler.error}")
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                                "owned_by": "qwen3export", "max_model_len": server.max_seq}]}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, request: HttpRequest):
            return await server.answer(request, body, lambda: server.chat_request(body), chat=True)

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, request: HttpRequest):
            return await server.answer(request, body, lambda: server.completion_request(body), chat=False)

        return app

    async def answer(self, http: HttpRequest, body: _Body, make, chat: bool):
        endpoint = http.url.path
        try:
            req = make()
        except BadRequest as e:
            self.metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(e), e.param)
        except Qwen3ExportError as e:
            self.metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(e))
        req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            self.metrics.requests.labels(endpoint, "429").inc()
            return _error(429, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
        except Qwen3ExportError as e:
            return _error(503, str(e))
        self.metrics.prompt_tokens.inc(len(req.prompt))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(self._stream(http, req, rid, chat, body), media_type="text/event-stream")
        reasoning, content, finish = [], [], None
        try:
            while finish is None:
                try:
                    ev = await asyncio.wait_for(req.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancel()
                        return _error(499, "client disconnected")
                    continue
                if "error" in ev:
                    self.metrics.requests.labels(endpoint, "500").inc()
                    return _error(500, ev["error"])
                reasoning.append(ev.get("reasoning", ""))
                content.append(ev.get("content", ""))
                finish = ev.get("finish_reason")
        finally:
            req.cancel()  # a no-op once finished; frees the slot when the handler was cancelled
        self.metrics.requests.labels(endpoint, "200").inc()
        usage = self._usage(req)
        text = "".join(content)
        if chat:
            message = {"role": "assistant", "content": text, "reasoning_content": "".join(reasoning) or None}
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if body.return_token_ids:
            choice["token_ids"] = list(req.tokens)
        answer = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                  "model": self.name, "choices": [choice], "usage": usage}
        if body.return_token_ids:
            answer["prompt_token_ids"] = list(req.prompt)
        return answer

    def _usage(self, req: Request) -> dict[str, Any]:
        n = len(req.tokens)
        return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n,
                "completion_tokens_details": {"reasoning_tokens": req.splitter.reasoning_tokens}}

    async def _stream(self, http: HttpRequest, req: Request, rid: str, chat: bool, body: _Body):
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | None = None, text: str | None = None, finish=None, extra=None):
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text or ""
            if extra:
                choice.update(extra)
            return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': self.name, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await req.events.get()
                if "error" in ev:
                    yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                    break
                if "finish_reason" in ev:
                    yield chunk(finish=ev["finish_reason"])
                    break
                extra = {"token_ids": [ev["token"]]} if body.return_token_ids else None
                if chat:
                    delta = {}
                    if ev["reasoning"]:
                        delta["reasoning_content"] = ev["reasoning"]
                    if ev["content"]:
                        delta["content"] = ev["content"]
                    if delta or extra:
                        yield chunk(delta, extra=extra)
                elif ev["content"] or extra:
                    yield chunk(text=ev["content"], extra=extra)
            usage = self._usage(req)
            yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': self.name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the client went away (the generator is closed) or the answer is complete


def _opens_think(prompt: list[int], vocab: SamplingVocab) -> bool:
    if not vocab.has_thinking:
        return False
    opens = max((i for i, t in enumerate(prompt) if t == vocab.think_id), default=-1)
    closes = max((i for i, t in enumerate(prompt) if t == vocab.end_think_id), default=-1)
    return opens > closes


def open_server(artifact: Artifact, threads: int | None, config: ServeConfig) -> Server:
    """The artifact's engine (a SlotDecoder; a Step-style engine as one slot) and sampling graph, served."""
    serving = artifact.manifest.get("serving") or {}
    if "parallel" in artifact.manifest:  # tp x ep rank parts: N gloo processes stepped as one decoder
        engine = ParallelEngine(artifact, threads)
    else:
        engine = open_engine(artifact, threads)
    _, sampler = sampling_pair(artifact, threads, engine)
    if not isinstance(engine, SlotDecoder):
        engine = StepSlots(engine, min(serving.get("max_seq", DEFAULT_SERVING_SEQ), engine.spec.max_positions))
    return Server(artifact, engine, sampler, config)


def serve(server: Server, host: str, port: int) -> None:
    """Run uvicorn in the foreground until interrupted."""
    uvicorn.run(server.app, host=host, port=port, log_level="warning")
