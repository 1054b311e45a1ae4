"""The one client every model call goes through: an OpenAI-compatible chat-completions endpoint.

An :class:`~preftune.endpoint.Endpoint` is base_url + model + the *name* of where its key lives
(an env var or a Prefect Secret block) — never the key itself. :class:`ChatClient` sends through
the ``openai`` SDK's HTTP client (its aiohttp transport when installed), with the URL and headers
``openai.AsyncOpenAI`` would use, and adds what a long pipeline needs:

* a concurrency limit per endpoint (an ``asyncio.Semaphore``, not held while backing off);
* our own retries (every retry counted and capped the same way): exponential backoff with full jitter on 429, 408, 5xx, timeouts, dropped connections and
  malformed bodies, honouring ``Retry-After`` (seconds or an HTTP date, capped);
* a per-request deadline covering the whole request, not just each socket read — for a remote
  endpoint. A local server preftune started (``Endpoint.server_pid``) is waited on instead: a
  request it has not answered is neither timed out nor sent again while its process is alive and
  it answers something (any request) within ``stall_timeout``. transformers serve never cancels a
  non-streaming request whose client has gone, so a deadline shorter than its queue only piles
  re-sent copies onto it (seen: 692 requests received for 160 needed, 54 finished); a dead server
  fails the request at once;
* usage accounting (tokens, requests, retries, cache hits) from the responses;
* an on-disk cache keyed by a sha256 of the canonical request, so a re-run never pays twice;
  a reply the caller does not ``accept`` (e.g. a judge reply with no verdict) is cached as *not
  final*: a later run asks again, at most ``max_reasks`` times per request across runs (counted in
  the cache entry), so a model that never answers properly does not loop forever;
* a cost ledger (``preftune.ledger``): each request is reserved there at its worst case before it
  leaves (refused, with nothing sent, when that would pass the run's spending cap) and settled with
  the reply's usage; a cache hit sends and records nothing;
* replies within bounds: a body over ``max_reply_bytes`` (read no further than that), or a ``usage``
  that cannot be true (not a whole number, negative, non-finite, more prompt tokens than the request
  could hold or more completion tokens than its ``max_tokens``) is a bad reply: a ``ChatError``
  (counted, never retried, never cached), whose reservation stands at its worst case;
* an authentication failure (HTTP 401/403) stops the endpoint at once: no further request is
  sent, and every call raises :class:`AuthError` (a ``UserError``: one line, naming where the key
  lives, never the key).

Keys are read only when a request is about to be sent, kept in memory only, and scrubbed from any
error message before it can reach a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.keys import note_secret, read_key_file, redact
from preftune.ledger import Ledger
from preftune.response_cache import MAX_REPLY_BYTES, ResponseCache, request_key

AUTH_STATUS = frozenset({401, 403})
MAX_REASKS = 2  # re-asks of a request whose cached reply was not accepted, across runs
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
NO_KEY_PLACEHOLDER = "not-needed"  # local servers ignore the key, the SDK insists on one
# Prompt tokens a request can be billed for: at most one per byte of its body (every tokenizer's token
# covers at least a byte) plus what a chat template adds around it (system prompt, role markers, tools).
PROMPT_ALLOWANCE = 512
STALL_TIMEOUT = 900.0  # a local server that answers nothing for this long is stalled
PATIENT_POLL = 1.0  # seconds between looks at a local server's process while a request waits
_PROGRESS: dict[str, float] = {}  # base URL of a local server -> monotonic time of its last reply


def _server_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    attempts: int = 1  # HTTP requests this result took; 0 when served from the cache


class ChatError(Exception):
    """A request that failed for good (after its retries, or at once when retrying cannot help)."""

    def __init__(self, message: str, *, reason: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.reason = reason  # short category: "http 429", "timeout", "connection", "malformed", ...
        self.attempts = attempts
        self.status = status


class AuthError(UserError):
    """The endpoint refused our credentials (HTTP 401/403): the phase stops, the CLI exits 2."""


def auth_message(endpoint: Endpoint) -> str:
    """`authentication failed for MODEL at URL: check $KEY_ENV` — where the key lives, never the key."""
    if endpoint.api_key_env:
        where = f"check ${endpoint.api_key_env}"
    elif endpoint.api_key_block:
        where = f"check the Prefect Secret block {endpoint.api_key_block!r}"
    else:
        where = "no API key was given (set an api_key_env or api_key_block)"
    return f"authentication failed for {endpoint.model} at {endpoint.base_url}: {where}"


@dataclass
class Usage:
    """What one endpoint consumed. Tokens count paid (non-cached) responses only."""

    requests: int = 0  # HTTP requests sent, retries included
    succeeded: int = 0
    failed: int = 0  # calls that raised ChatError
    bad_replies: int = 0  # replies too large or with impossible usage (among the failed)
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.status, self.retry_after = reason, status, retry_after


def parse_retry_after(headers: Any, cap: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP date), capped."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000.0, 0.0), cap)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return min(max(float(raw), 0.0), cap)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(max(when.timestamp() - time.time(), 0.0), cap)


class _BadReply(Exception):
    """A reply that cannot be believed (too large, impossible usage): not retried, never billed as received."""


def checked_usage(usage: Any, prompt_bound: int, max_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((prompt, completion) tokens the reply reports, (prompt, completion) tokens to bill). A figure the
    reply leaves out reports 0 and is billed at its bound; one that cannot be true raises _BadReply."""
    if usage is None:
        usage = {}
    if not isinstance(usage, dict):
        raise _BadReply(f"usage is a {type(usage).__name__}, not an object")
    reported, billed = [], []
    for name, bound in (("prompt_tokens", prompt_bound), ("completion_tokens", max_tokens)):
        value = usage.get(name)
        if value is None:
            reported.append(0)
            billed.append(bound)
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or value != int(value) or not 0 <= value <= bound):
            raise _BadReply(f"usage {name} = {str(value)[:24]} is not a token count in 0..{bound}")
        reported.append(int(value))
        billed.append(int(value))
    return (reported[0], reported[1]), (billed[0], billed[1])


def _parse_completion(body: str, prompt_bound: int, max_tokens: int) -> tuple[ChatResult, tuple[int, int]]:
    """Text, finish_reason and usage of a chat.completion body, and the tokens to bill for it;
    anything else is malformed."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content")
        if text is not None and not isinstance(text, str):
            raise TypeError("content is not a string")
        usage = data.get("usage")
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise _Retryable("malformed", f"malformed response body ({type(err).__name__})") from None
    (prompt, completion), billed = checked_usage(usage, prompt_bound, max_tokens)
    return ChatResult(text=text or "", finish_reason=finish, prompt_tokens=prompt,
                      completion_tokens=completion), billed


@dataclass(frozen=True)
class _Conn:
    """What one event loop sends through: the SDK's HTTP client, the URL and the request headers.

    The ``openai`` SDK supplies all three — its HTTP client (on its aiohttp transport when the
    ``openai[aiohttp]`` extra is installed, else httpx2), the normalised base URL, and the headers
    it would send (auth, user agent, platform) — but requests are posted on that client directly.
    At 32+ requests in flight the client is CPU-bound, and the SDK's per-request pipeline (request
    options, header merging, URL re-parsing) cost about as much CPU as the HTTP exchange itself
    (bench/bench_pairs.py measures the client's cost per request; past figures: docs/benchmarks.md).
    """

    http: Any
    url: str
    headers: dict[str, str] = field(repr=False)  # holds the key: never printed

    @classmethod
    def open(cls, base_url: str, api_key: str, concurrency: int, timeout: float) -> _Conn:
        import openai

        # No more connections than requests in flight: a pool probes every idle one per request.
        limits = _http().Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        try:
            http = openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
        except RuntimeError:  # the aiohttp extra is not installed
            http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
        sdk = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout,
                                 http_client=http)
        headers = {k: v for k, v in {**sdk.default_headers, **sdk.auth_headers}.items() if isinstance(v, str)}
        return cls(http=http, url=str(sdk.base_url).rstrip("/") + "/chat/completions", headers=headers)


class ChatClient:
    """Async chat client for one endpoint; see the module docstring for what it adds to the SDK."""

    def __init__(self, endpoint: Endpoint, *, concurrency: int = 16, max_retries: int = 6,
                 timeout: float = 60.0, cache_dir: str | Path | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, retry_after_cap: float = 60.0, ledger: Ledger | None = None,
                 max_reasks: int = MAX_REASKS, stall_timeout: float = STALL_TIMEOUT,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        if concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {concurrency}")
        if endpoint.is_local:  # a folder has no URL until preftune.server serves it
            raise UserError(f"endpoint {endpoint}: a local model folder must be served first "
                            "(preftune.server.resolve_endpoints)")
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_cap = retry_after_cap
        self.cache = ResponseCache(Path(cache_dir)) if cache_dir is not None else None
        self.ledger = ledger  # requests are reserved and settled here (callers may switch its phase)
        self.max_reply_bytes = max_reply_bytes
        self.max_reasks = max_reasks
        # A local server preftune started: wait on it while it lives and progresses (module docstring).
        self.server_pid = endpoint.server_pid
        self.stall_timeout = stall_timeout
        self.usage = Usage()
        self._auth_failed = False  # set on the first 401/403: nothing more is sent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Conn | None = None
        self._sem: asyncio.Semaphore | None = None
        self._secret: str | None = None  # a Prefect Secret's value, loaded once, memory only

    def __repr__(self) -> str:
        return f"ChatClient({self.endpoint!s}, concurrency={self.concurrency})"

    # -- keys --------------------------------------------------------------------------------
    async def _api_key(self) -> str:
        ep = self.endpoint
        if ep.api_key_env:
            key = os.environ.get(ep.api_key_env)
            if not key:
                raise UserError(f"endpoint {ep}: environment variable {ep.api_key_env} is not set")
            return key
        if ep.api_key_block:
            if self._secret is None:
                from prefect.blocks.system import Secret

                try:
                    block = await Secret.aload(ep.api_key_block)
                except ValueError as err:
                    raise UserError(f"endpoint {ep}: Prefect Secret block {ep.api_key_block!r} "
                                    "could not be loaded") from err
                self._secret = str(block.get())
                note_secret(self._secret)
            return self._secret
        if ep.api_key_file:  # a server preftune started: its per-server key
            self._secret = read_key_file(ep.api_key_file)
            return self._secret
        return NO_KEY_PLACEHOLDER

    def _redact(self, text: str) -> str:
        return redact(text, self._secret, os.environ.get(self.endpoint.api_key_env or ""))

    # -- per event loop state ----------------------------------------------------------------
    async def _state(self) -> tuple[_Conn, asyncio.Semaphore]:
        """The connection and semaphore bound to the running loop (the sync helpers make new loops)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            key = await self._api_key()  # may await a Prefect block: re-check the loop after it
        if self._loop is not loop:
            # Patient: the transport's own timeout must not cut a queued request short either.
            http_timeout = max(self.timeout, 2 * self.stall_timeout) if self.server_pid else self.timeout
            self._conn = _Conn.open(self.endpoint.base_url, key, self.concurrency, http_timeout)
            self._sem = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        assert self._conn is not None and self._sem is not None
        return self._conn, self._sem

    async def aclose(self) -> None:
        if self._conn is not None and self._loop is asyncio.get_running_loop():
            await self._conn.http.aclose()
        self._conn, self._loop, self._sem = None, None, None

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the call ----------------------------------------------------------------------------
    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 256, temperature: float = 0.0,
                   accept: Callable[[ChatResult], bool] | None = None, **extra: Any) -> ChatResult:
        """One chat completion, from the cache when this exact request finished before.

        ``accept`` judges a reply: one it rejects is returned (the caller counts it) but cached as not
        final, so a later call asks again, up to ``max_reasks`` times for this request across runs."""
        params = {"max_tokens": max_tokens, "temperature": temperature, **extra}
        key = request_key(self.endpoint, messages, params) if self.cache is not None else ""
        rejected = 0  # replies to this request rejected before (recorded in the cache entry)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                rejected = int(hit.get("rejected") or 0)
                if accept is None or not rejected or rejected > self.max_reasks:
                    self.usage.cache_hits += 1
                    return ChatResult(text=self._redact(hit["text"]), finish_reason=hit.get("finish_reason"),
                                      prompt_tokens=hit.get("prompt_tokens", 0),
                                      completion_tokens=hit.get("completion_tokens", 0), cached=True, attempts=0)
        result = await self._with_retries(messages, params)
        if self.cache is not None:
            entry = {"text": result.text, "finish_reason": result.finish_reason,
                     "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
            if accept is not None and not accept(result):
                entry["rejected"] = rejected + 1  # not final: asked again next time, within max_reasks
            self.cache.put(key, entry)
        return result

    async def _with_retries(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> ChatResult:
        if self._auth_failed:
            raise AuthError(auth_message(self.endpoint))
        conn, sem = await self._state()
        payload = json.dumps({"model": self.endpoint.model, "messages": messages, **params},
                             ensure_ascii=False).encode()
        bounds = (len(payload) + PROMPT_ALLOWANCE, int(params["max_tokens"]))  # the most it can be billed
        attempt = 0
        while True:
            attempt += 1
            try:
                async with sem:
                    if self._auth_failed:  # another request was refused while this one waited
                        raise AuthError(auth_message(self.endpoint))
                    if self.server_pid is not None and not _server_alive(self.server_pid):
                        raise ChatError(f"{self.endpoint}: the local model server (pid {self.server_pid}) "
                                        "has exited", reason="server exited", attempts=attempt)
                    result = await self._attempt(conn, payload, bounds)
            except _Retryable as err:
                if attempt > self.max_retries:
                    self.usage.failed += 1
                    raise ChatError(self._redact(f"{self.endpoint}: {err} (gave up after {attempt} attempts)"),
                                    reason=err.reason, attempts=attempt, status=err.status) from None
                self.usage.retries += 1
                await asyncio.sleep(self._backoff(attempt, err.retry_after))
                continue
            except ChatError as err:
                self.usage.failed += 1
                err.attempts = attempt
                if err.status in AUTH_STATUS:
                    self._auth_failed = True
                    raise AuthError(auth_message(self.endpoint)) from None
                raise
            self.usage.succeeded += 1
            self.usage.prompt_tokens += result.prompt_tokens
            self.usage.completion_tokens += result.completion_tokens
            return ChatResult(result.text, result.finish_reason, result.prompt_tokens,
                              result.completion_tokens, cached=False, attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (AWS architecture blog): uniform(0, min(max, base * 2^(attempt-1)))."""
        delay = random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, retry_after)  # the server's wish is a floor, already capped
        return delay

    async def _attempt(self, conn: _Conn, payload: bytes, bounds: tuple[int, int]) -> ChatResult:
        """One HTTP request, on the ledger from before it leaves (reserved at its worst case; BudgetReached
        at the cap, nothing sent) until its reply settles it; an HTTP error status releases it."""
        hold = self.ledger.reserve(self.endpoint, *bounds) if self.ledger is not None else None
        self.usage.requests += 1
        try:
            result, billed = await self._send_once(conn, payload, bounds)
        except (_Retryable, ChatError) as err:
            if hold is not None and err.status is not None:
                hold.release(f"http {err.status}")  # the server refused it: nothing billed
            raise  # no reply (timeout, dropped) or a bad one: the reservation stands, money possibly spent
        except _BadReply as err:
            self.usage.bad_replies += 1
            raise ChatError(self._redact(f"{self.endpoint}: bad reply: {err}"), reason="bad reply",
                            attempts=1) from None
        if hold is not None:
            hold.settle(self.endpoint, *billed)
        return result

    async def _read(self, conn: _Conn, payload: bytes) -> tuple[int, str, Any, bytes]:
        """POST and read the reply: (status, reason phrase, headers, body), never more than
        ``max_reply_bytes`` of body (_BadReply past it, the rest left unread)."""
        limit = self.max_reply_bytes
        async with conn.http.stream("POST", conn.url, content=payload, headers=conn.headers) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _BadReply(f"the reply is {int(declared):,} bytes, over the limit of {limit:,}")
            body = bytearray()
            async for chunk in response.aiter_bytes():  # decoded: a compressed bomb is counted as it expands
                body += chunk
                if len(body) > limit:
                    raise _BadReply(f"the reply is over the limit of {limit:,} bytes")
            return response.status_code, response.reason_phrase, response.headers, bytes(body)

    async def _send_once(self, conn: _Conn, payload: bytes, bounds: tuple[int, int]
                         ) -> tuple[ChatResult, tuple[int, int]]:
        http = _http()
        try:
            if self.server_pid is not None:
                status, phrase, headers, raw = await self._post_patiently(conn, payload)
            else:
                async with asyncio.timeout(self.timeout):
                    status, phrase, headers, raw = await self._read(conn, payload)
        except TimeoutError:
            raise _Retryable("timeout", f"no reply within {self.timeout:g}s") from None
        except http.TransportError as err:
            if _is_timeout(err, http):
                raise _Retryable("timeout", f"no reply within {self.timeout:g}s") from None
            raise _Retryable("connection", f"connection failed ({type(err.__cause__ or err).__name__})") from None
        if self.server_pid is not None:
            _PROGRESS[self.endpoint.base_url] = time.monotonic()
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            detail = f"HTTP {status}: {_short(_error_text(text, phrase))}"
            if status in RETRY_STATUS or status >= 500:
                raise _Retryable(f"http {status}", detail, status=status,
                                 retry_after=parse_retry_after(headers, self.retry_after_cap))
            raise ChatError(self._redact(f"{self.endpoint}: {detail}"), reason=f"http {status}", attempts=1,
                            status=status)
        result, billed = _parse_completion(text, *bounds)
        # A reply quoting a key (ours or another endpoint's) is redacted before a cache or a caller sees it.
        return dataclasses.replace(result, text=self._redact(result.text)), billed

    async def _post_patiently(self, conn: _Conn, payload: bytes) -> tuple[int, str, Any, bytes]:
        """POST to a local server with no deadline of its own: wait while the server process lives
        and has answered something (this request or another) within ``stall_timeout``."""
        sent = time.monotonic()
        task = asyncio.ensure_future(self._read(conn, payload))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PATIENT_POLL)
                if done:
                    return task.result()
                assert self.server_pid is not None
                if not _server_alive(self.server_pid):
                    raise ChatError(f"{self.endpoint}: the local model server (pid {self.server_pid}) exited "
                                    "while a request waited", reason="server exited", attempts=1)
                idle = time.monotonic() - max(sent, _PROGRESS.get(self.endpoint.base_url, sent))
                if idle > self.stall_timeout:
                    raise _Retryable("stalled", f"the local model server answered nothing for {idle:.0f}s")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # -- conveniences ------------------------------------------------------------------------
    async def chat_many(self, conversations: list[list[dict[str, Any]]], **kwargs: Any
                        ) -> list[ChatResult | ChatError]:
        """All conversations at once (the semaphore limits them); failures come back in place."""
        async def one(msgs: list[dict[str, Any]]) -> ChatResult | ChatError:
            try:
                return await self.chat(msgs, **kwargs)
            except ChatError as err:
                return err

        return list(await asyncio.gather(*(one(m) for m in conversations)))

    def chat_sync(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatResult:
        """Blocking ``chat`` for scripts and the CLI (not from inside a running event loop)."""
        async def go() -> ChatResult:
            try:
                return await self.chat(messages, **kwargs)
            finally:
                await self.aclose()

        return asyncio.run(go())

    def usage_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"endpoint": str(self.endpoint), **self.usage.as_dict()}
        cost = self.endpoint.cost(self.usage.prompt_tokens, self.usage.completion_tokens)
        if cost is not None:
            report["cost_usd"] = round(cost, 6)
        return report


def _is_timeout(err: Exception, http: Any) -> bool:
    """A transport error that is really a timeout. The aiohttp transport maps every dropped
    connection to httpx's ConnectTimeout; the aiohttp error it came from says which it was."""
    cause = err.__cause__
    if isinstance(cause, TimeoutError):
        return True
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        return False
    return isinstance(err, http.TimeoutException)


def _http() -> Any:
    """The HTTP library the installed openai SDK is built on (httpx2 from openai 3.x, httpx before)."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # pragma: no cover - older SDKs
        import httpx

        return httpx


def _error_text(body: str, reason: str) -> str:
    """The server's own error message when its JSON body has one ({"error": {"message": ...}}), else
    the body itself, else the HTTP reason phrase."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip() or reason
    inner = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(inner, dict) and inner.get("message"):
        return str(inner["message"])
    if isinstance(inner, str) and inner:
        return inner
    return body.strip() or reason


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
