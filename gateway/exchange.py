"""The proxy's callback path: the common request served without a task.

In the proxy benchmark, latency under open-loop load is CPU per request, and most of what was
left of it was the machinery of a task per request: creating and scheduling it, one loop
iteration before the request could leave for a replica and another after the replica's answer
before it could go back, and the futures in between (``benchmarks/proxy/PROFILE.md``). So for
the common case — the body is here, nobody is queued for the model, the policy picks a replica
now and that replica has an idle keep-alive connection — ``Proxy.serve_now`` sends the request
from the client connection's ``data_received``, and an ``Exchange`` answers it from the replica
connection's callbacks:

* an SSE answer is relayed by the same ``SseRelay`` as on the task path, told of the end by a
  callback instead of a task waiting for it, with the client's ``resume_writing`` resuming it;
* a whole answer with a ``Content-Length`` within ``upstream.max_buffered_response_bytes`` is
  collected and written in one piece.

Everything else goes to the task path (``Proxy.run``) with the first attempt's state
(``Resume``), where retries, buffering, keep-alive commits and large bodies are handled by the
one implementation of each: no idle connection yet (it connects), a 502/503 that may be retried,
a failure before the first byte, any other kind of answer. The helpers both paths call
(``Proxy.dispatched``, ``attempt_done``, ``stream_start``/``stream_end``/``stream_accounted``,
``buffered_done``) are shared, so the two cannot drift in what they count or write.

Invariants (tests/gateway/test_exchange.py):

* The replica picked is released exactly once: by the exchange when it answers or its client
  leaves, or by the task path after a hand-over, never both.
* Every request taken ends in one answer, an error event ending its stream, or a closed
  connection for a client that left; and in one access line (``Host.finish`` or the task path).
* A client that leaves (``cancel``, called by its connection) aborts the replica's request so
  the replica stops generating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol

from gateway.errors import GatewayError, render
from gateway.http_server import Request, ResponseStream
from gateway.log import AccessRecord, request_id_var
from gateway.relay import SseRelay
from gateway.replica_client import ReplicaConnection, ReplicaResponse
from gateway.upstream import RETRY_STATUSES, error_reason
from policies.types import Decision, RequestInfo

if TYPE_CHECKING:
    from gateway.proxy import Proxy

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")


def _guarded(
    callback: Callable[Concatenate[Exchange, _P], None],
) -> Callable[Concatenate[Exchange, _P], None]:
    """A callback of the exchange that cannot leave its request behind: an unexpected error
    (a bug) is what the task path makes of one, a logged 500, with the replica released."""

    def guarded(self: Exchange, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            callback(self, *args, **kwargs)
        except Exception:
            self._crashed()

    return guarded


class Host(Protocol):
    """The request's owner in the app (``gateway/app.py``): its access line and its key."""

    def finish(self, *, cancelled: bool) -> None:
        """The request is over (answered, or its client left): log and count it, once."""

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Continue the request as a task running ``work`` (the task path renders its errors
        and writes its access line)."""


@dataclass(slots=True)
class Resume:
    """Where a request the callback path took continues as a task: its first attempt was
    dispatched to ``decision`` (bookkeeping done); ``up`` is that attempt's response if it came,
    ``error`` its failure if it failed, neither if it still has to be sent."""

    decision: Decision
    up: ReplicaResponse | None = None
    error: GatewayError | None = None


@dataclass(slots=True)
class Streaming:
    """A stream being relayed: the client's response, the relay, and its accounting."""

    resp: ResponseStream
    relay: SseRelay
    label: str
    ttft: float


class Exchange:
    """One request's first attempt, driven by the replica connection's callbacks. It is the
    client connection's ``Job`` (``cancel``/``done``), the replica connection's
    ``ResponseWaiter`` and, for a whole answer, its ``BodySink``."""

    __slots__ = (
        "_body",
        "_conn",
        "_decision",
        "_done",
        "_finished",
        "_headers",
        "_host",
        "_info",
        "_label",
        "_parts",
        "_path",
        "_proxy",
        "_rec",
        "_released",
        "_request",
        "_streaming",
        "_up",
    )

    def __init__(
        self,
        proxy: Proxy,
        request: Request,
        rec: AccessRecord,
        info: RequestInfo,
        path: str,
        headers: bytes,
        body: bytes,
        decision: Decision,
        host: Host,
    ) -> None:
        self._proxy = proxy
        self._request = request
        self._rec = rec
        self._info = info
        self._path = path
        self._headers = headers
        self._body = body
        self._decision = decision
        self._host = host
        self._label = proxy.model_label(info.model)
        self._done = False  # the callbacks have nothing left to do
        self._released = False  # the replica is released, or the task path owns its release
        self._finished = False  # the request is accounted, or the task path owns it
        self._conn: ReplicaConnection | None = None  # until the response head arrives
        self._up: ReplicaResponse | None = None
        self._streaming: Streaming | None = None
        self._parts: list[bytes] = []

    @_guarded
    def start(self) -> None:
        """Dispatch the first attempt: sent now if the replica has an idle connection, else
        handed to the task path to connect."""
        proxy, request, rid = self._proxy, self._request, self._decision.replica
        proxy.dispatched(self._rec, self._label, rid, 1, 0.0)  # it did not wait
        request.attach(self)
        self._conn = proxy.send_now(request, rid, self._path, self._headers, self._body, self)
        if self._conn is None:
            self._hand_over(Resume(self._decision))

    # -- Job (the client connection's side) ---------------------------------------------------

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """The client went away, or the shutdown drain time ran out: abort the replica's
        request (it stops generating), release the replica, log a 499."""
        if self._done:
            return False
        self._done = True
        self._request.when_writable(None)
        up = self._up
        if self._streaming is not None:
            self._proxy.stream_accounted(self._rec, self._streaming)
        self._abort_replica()
        self._release(ok=False, healthy=None if up is None else up.status < 500)
        self._finish(cancelled=True)
        return True

    # -- ResponseWaiter (the replica connection's side) ---------------------------------------

    @_guarded
    def set_result(self, up: ReplicaResponse, /) -> None:
        self._conn = None
        if self._done:  # not expected: cancel abandons the connection first
            up.close()
            return
        self._up = up
        proxy = self._proxy
        if up.status in RETRY_STATUSES and proxy.max_attempts > 1:
            self._hand_over(Resume(self._decision, up=up))
        elif up.content_type == "text/event-stream":
            self._stream(up)
        elif up.content_length is not None and up.content_length <= proxy.max_buffered_bytes:
            if up.status >= 500:
                proxy.count_upstream_error("http_5xx")
            self._parts = [up.first] if up.first else []
            up.relay_to(self)
        else:
            self._hand_over(Resume(self._decision, up=up))

    @_guarded
    def set_exception(self, exception: BaseException, /) -> None:
        self._conn = None
        if self._done:
            return
        error = (
            exception
            if isinstance(exception, GatewayError)
            else GatewayError(f"replica request failed: {exception!r}")
        )
        self._proxy.count_upstream_error(error_reason(error))
        self._hand_over(Resume(self._decision, error=error))

    # -- BodySink (a whole answer being collected) --------------------------------------------

    def body(self, payload: bytes, framed: bytes | None) -> None:
        self._parts.append(payload)  # bounded: the replica's Content-Length was checked

    @_guarded
    def end(self) -> None:
        up = self._up
        if self._done or up is None:
            return
        self._done = True
        parts = self._parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        ok = self._proxy.buffered_done(self._request, self._rec, up, body)
        up.close()
        self._release(ok=ok, healthy=ok)
        self._finish(cancelled=False)

    @_guarded
    def fail(self, error: GatewayError) -> None:
        """The body broke off before the client got a byte: the task path retries it."""
        up = self._up
        if self._done or up is None:
            return
        self._proxy.count_upstream_error("disconnect")
        up.close()
        self._up = None
        self._hand_over(Resume(self._decision, error=error))

    # -- streams ------------------------------------------------------------------------------

    def _stream(self, up: ReplicaResponse) -> None:
        proxy = self._proxy
        if up.status >= 500:
            proxy.count_upstream_error("http_5xx")
        try:
            s = proxy.stream_start(self._request, self._rec, up, None)
        except ConnectionResetError:
            self._client_gone()
            return
        self._streaming = s
        self._request.when_writable(s.relay.writable)
        s.relay.run_callbacks(self._stream_ended)
        up.relay_to(s.relay)

    @_guarded
    def _stream_ended(self) -> None:
        s, up = self._streaming, self._up
        if self._done or s is None or up is None:
            return
        try:
            error = s.relay.outcome()
        except ConnectionResetError:  # the client went away mid-stream
            self._client_gone()
            return
        self._done = True
        self._request.when_writable(None)
        proxy = self._proxy
        token = request_id_var.set(self._rec.request_id)  # for the warning of a broken stream
        try:
            ok = proxy.stream_end(self._rec, self._decision.replica, up, s, error)
        finally:
            request_id_var.reset(token)
        proxy.stream_accounted(self._rec, s)
        up.close()
        self._release(ok=ok, healthy=ok)
        self._finish(cancelled=False)

    # -- internals ----------------------------------------------------------------------------

    def _release(self, *, ok: bool, healthy: bool | None) -> None:
        if self._released:
            return
        self._released = True
        self._proxy.attempt_done(
            self._decision.replica, self._info, self._label, ok=ok, healthy=healthy
        )

    def _abort_replica(self) -> None:
        """Give up the replica's request (its connection is aborted: the replica stops)."""
        if self._up is not None:
            self._up.close()
        elif self._conn is not None:
            self._conn.abandon()

    def _client_gone(self) -> None:
        """Seen from our side before its connection said so: close it, then as ``cancel``."""
        self._request.abort()
        self.cancel()

    def _finish(self, *, cancelled: bool) -> None:
        if not self._finished:
            self._finished = True
            self._host.finish(cancelled=cancelled)

    def _crashed(self) -> None:
        """An unexpected error in a callback: logged with its traceback; the client gets a 500
        (or, past its first byte, a closed connection), the replica's request is aborted and
        the replica released, and the request is logged and counted, each once."""
        request, rec = self._request, self._rec
        token = request_id_var.set(rec.request_id)
        try:
            logger.exception("unhandled error in %s %s", request.method, request.path)
        finally:
            request_id_var.reset(token)
        if self._released and self._finished:  # e.g. handed over: the task path owns it all
            return
        self._abort_replica()
        self._release(ok=False, healthy=None)
        self._done = True
        if self._finished:
            return
        request.when_writable(None)
        error = GatewayError("internal error in the gateway")
        rec.error = error.code
        if request.answered:
            request.abort()
        else:
            request.respond(*render(error, rec.request_id))
        self._finish(cancelled=False)

    def _hand_over(self, resume: Resume) -> None:
        """The task path takes over from here; it releases the replica."""
        self._done = self._released = self._finished = True
        self._request.when_writable(None)
        work = self._proxy.run(
            self._request, self._rec, self._info, self._path, self._headers, self._body, resume
        )
        self._host.spawn(work)
