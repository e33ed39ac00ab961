"""``metapeft serve``: adapter directories as a local HTTP JSON service.

One base model is loaded once; several adapter directories trained on it stay resident, each
under a name (its directory's basename, or ``NAME=DIR``), and a request picks one:

    POST /v1/classify   {"adapter": NAME, "texts": [...], "top_k": K (optional)}
                        -> {"adapter": NAME, "predictions": [{"label", "probabilities"}, ...]}
    GET  /v1/adapters   -> {"adapters": [{"name", "method", "labels", "base_model", ...}]}
    GET  /health        -> {"status": "ok", "adapters": N}

The predictions are ``metapeft predict``'s (``classify.predictions``, the same batches and the
same numbers), without the echoed text. Every error is JSON ``{"error": "..."}`` with a 4xx
status (5xx only for a bug), and the server keeps serving: malformed JSON, a missing, unknown
or ill-typed field, an unknown adapter, a body over ``max_body_bytes`` or more than
``max_texts`` texts, an unknown path.

Only the standard library serves (``http.server.ThreadingHTTPServer``, as ``mlx_lm.server``
does): the service is local and small, and a web framework would be a dependency for every
user of a toolkit whose other commands need none. One thread per connection parses and
answers; every MLX call (loading the adapters, then scoring) runs on one thread, the main one
under ``metapeft serve``, one request at a time in arrival order (``AdapterPool.work``): model
evaluation is serialised, MLX never runs in two threads at once, and a connection's answers
come back in the order it asked. (Scoring on a thread that exits before the process does made
MLX abort at exit now and then; the main thread never exits early.) SIGINT or SIGTERM stops
it cleanly: no new connections, the requests in progress are answered, then it exits 0. The
server writes nothing to disk: stopping it any way, ``kill -9`` included, loses nothing.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from metapeft import __version__
from metapeft.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8005
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_TEXTS = 256
IDLE_SECONDS = 60  # an idle keep-alive connection is closed after this
DRAIN_SECONDS = 30  # on shutdown, requests in progress get this long to finish
CLASSIFY_FIELDS = ("adapter", "texts", "top_k")


# --------------------------------------------------------------------------------------------
# The adapters, and the one thread that runs MLX
# --------------------------------------------------------------------------------------------

def parse_adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """``DIR`` or ``NAME=DIR`` arguments as (name, directory), the name defaulting to the
    directory's basename; duplicate names are refused in one line."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, rest = str(spec).partition("=")
        if sep and name and "/" not in name and not Path(spec).exists():
            path = Path(rest).expanduser()
        else:
            name, path = None, Path(spec).expanduser()
        name = (name or path.resolve().name).strip()
        if not name or any(c.isspace() for c in name):
            raise UserError(f"adapter name {name!r} must be non-empty with no spaces; name it "
                            f"with NAME=DIR", path=str(spec), field="adapter")
        if not path.is_dir():
            raise UserError("not an adapter directory (expected one written by `metapeft "
                            "adapt --out`)", path=str(path), field="adapter")
        if name in {n for n, _ in out}:
            raise UserError(f"two adapters are named {name!r}; name them with NAME=DIR",
                            path=str(path), field="adapter")
        out.append((name, path))
    if not out:
        raise UserError("no adapter directory given", field="adapter")
    return out


def check_one_base_model(named: list[tuple[str, Path]]) -> list[tuple[str, object]]:
    """The (name, ``AdapterInfo``) of each adapter, read from its header alone; adapters trained
    on different base models (their fingerprints, or their model ids where a directory records
    no fingerprint, differ) are refused in one line."""
    from metapeft.adapter_io import read_adapter_info

    infos = [(name, read_adapter_info(path)) for name, path in named]
    first_name, first = infos[0]
    for name, info in infos[1:]:
        same = (info.base_model_hash == first.base_model_hash
                if info.base_model_hash and first.base_model_hash
                else info.base_model == first.base_model)
        if not same:
            raise UserError(f"adapters {first_name!r} and {name!r} were trained on different base "
                            f"models ('{first.base_model}' fingerprint {first.base_model_hash}, "
                            f"'{info.base_model}' fingerprint {info.base_model_hash}); one server "
                            f"serves one base model", path=info.path, field="model")
    return infos


class ShuttingDown(Exception):
    """A request that arrived after the scoring loop stopped."""


class AdapterPool:
    """Classifiers for several adapter directories on one base model, loaded in the calling
    thread. ``classify`` (from any thread) queues its scoring; the thread that runs ``work``
    scores the queued requests one at a time, in arrival order. That must be the thread that
    loaded them: MLX streams belong to a thread (an array built lazily in one cannot be
    evaluated in another); ``pool_in_thread`` loads and works in a thread of its own."""

    def __init__(self, specs: list[str] | list[tuple[str, Path]], model: str | None = None, *,
                 dequantize: str = "auto"):
        from metapeft.classify import Classifier

        named = (parse_adapter_specs(specs) if specs and isinstance(specs[0], (str, Path))
                 else list(specs))
        infos = check_one_base_model(named)
        model = model or infos[0][1].base_model  # every adapter on the one model, loaded once
        self.classifiers = {name: Classifier.load(path, model, dequantize=dequantize)
                            for name, path in named}
        self._jobs: SimpleQueue = SimpleQueue()  # put() is safe in a signal handler
        self._lock = threading.Lock()
        self._closed = False

    @property
    def names(self) -> list[str]:
        return list(self.classifiers)

    @property
    def model_id(self) -> str:
        return next(iter(self.classifiers.values())).model_id

    def describe(self) -> list[dict]:
        """What ``GET /v1/adapters`` lists: per adapter its name, method, labels, base model."""
        return [{"name": name, "method": c.info.method, "labels": list(c.labels),
                 "base_model": c.model_id, "base_model_hash": c.adapter.base.fingerprint,
                 "path": str(Path(c.info.path).resolve().parent),
                 "final_accuracy": c.info.provenance.get("final_accuracy")}
                for name, c in self.classifiers.items()]

    def classify(self, name: str, texts: list[str], top_k: int | None = None) -> list[dict]:
        """``metapeft predict``'s predictions of ``texts`` with adapter ``name`` (label and
        probabilities; the text is not echoed), scored by the ``work`` thread. Raises
        ``ShuttingDown`` once the pool is closed."""
        from metapeft.classify import text_examples

        job = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown
            self._jobs.put((job, self.classifiers[name], text_examples(texts), top_k))
        preds = job.result()
        return [{"label": p["label"], "probabilities": p["probabilities"]} for p in preds]

    def work(self, until=None, timeout: float | None = None) -> None:
        """Score queued requests in this thread, one at a time in arrival order, until
        ``stop()`` is called, or (``until`` given) until ``until()`` holds or ``timeout``
        seconds have passed."""
        from metapeft import classify

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if until is not None and (until() or deadline is not None
                                      and time.monotonic() > deadline):
                return
            try:  # never block for long: a signal that lands on another thread (MLX's, the
                # HTTP ones) runs its Python handler only once this thread runs bytecode again
                item = self._jobs.get(timeout=0.25 if until is None else 0.05)
            except Empty:
                continue
            if item is None:  # stop()
                if until is None:
                    return
                continue
            job, clf, rows, top_k = item
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(classify.predictions(clf, rows, top_k=top_k))
            except BaseException as e:  # the request gets it; the loop goes on
                job.set_exception(e)
                if not isinstance(e, Exception):
                    raise

    def stop(self) -> None:
        """Make ``work()`` return after the request it is scoring (safe in a signal handler)."""
        self._jobs.put(None)

    def close(self) -> None:
        """Refuse new requests; those still queued get ``ShuttingDown``."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._jobs.get_nowait()
            except Empty:
                return
            if item is not None and item[0].set_running_or_notify_cancel():
                item[0].set_exception(ShuttingDown())


def pool_in_thread(specs, model: str | None = None, *, dequantize: str = "auto",
                   name: str = "metapeft-mlx") -> AdapterPool:
    """An ``AdapterPool`` loaded, then worked, by a new daemon thread (``pool.thread``), for a
    program whose main thread is busy elsewhere (the tests); a load error is raised here.
    ``pool.stop()`` ends the thread."""
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        try:
            box["pool"] = AdapterPool(specs, model, dequantize=dequantize)
        except BaseException as e:  # raised again in the caller
            box["error"] = e
            return
        finally:
            ready.set()
        box["pool"].work()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    box["pool"].thread = thread
    return box["pool"]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_texts: int = MAX_TEXTS


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer over an ``AdapterPool`` that counts the requests in progress, so
    a shutdown can let them finish."""

    daemon_threads = True  # an idle keep-alive connection never holds the process
    request_queue_size = 128  # listen backlog (socketserver's 5 drops SYNs: 1 s retries)

    def __init__(self, pool: AdapterPool | None, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, *, limits: Limits | None = None, quiet: bool = False):
        self.pool, self.limits, self.quiet = pool, limits or Limits(), quiet
        self.stopping = False  # set on shutdown: open connections get 503 and are closed
        self._busy, self._idle = 0, threading.Lock()
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise UserError(f"cannot resolve host {host!r}: {e.strerror}", field="host") from None
        self.address_family = family
        try:
            super().__init__(address, Handler)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            field="port") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def begin(self) -> None:
        with self._idle:
            self._busy += 1

    def end(self) -> None:
        with self._idle:
            self._busy -= 1

    def idle(self) -> bool:
        """No request is in progress."""
        with self._idle:
            return self._busy == 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a connection's requests answered in order
    server_version = f"metapeft/{__version__}"
    timeout = IDLE_SECONDS
    # the headers and the body go out in two writes; with Nagle's algorithm the body would wait
    # for the client's delayed ACK of the headers (40 ms on Linux) on every keep-alive request
    disable_nagle_algorithm = True
    server: Server

    # routes: path -> {method: handler}
    def _routes(self) -> dict:
        return {"/health": {"GET": self._health}, "/v1/adapters": {"GET": self._adapters},
                "/v1/classify": {"POST": self._classify}}

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        self.server.begin()
        try:
            path = urlsplit(self.path).path
            routes = self._routes()
            try:
                if self.server.stopping:
                    self.close_connection = True
                    raise HTTPError(503, "the server is shutting down")
                if path not in routes:
                    raise HTTPError(404, f"no such path: {path} (paths: "
                                         f"{', '.join(sorted(routes))})")
                if method not in routes[path]:
                    raise HTTPError(405, f"{path} takes {', '.join(routes[path])}, not {method}")
                status, obj = 200, routes[path][method]()
            except HTTPError as e:
                status, obj = e.status, {"error": e.message}
            except UserError as e:
                status, obj = 400, {"error": e.one_line()}
            except ShuttingDown:
                self.close_connection = True
                status, obj = 503, {"error": "the server is shutting down"}
            except Exception as e:  # a bug: say so, keep serving
                self.log_error("error answering %s %s: %r", method, path, e)
                status, obj = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
            if not self._body_read:
                self._discard_body()
            self._send(status, obj)
        finally:
            self.server.end()

    # -- the endpoints ---------------------------------------------------------------------

    def _health(self) -> dict:
        return {"status": "ok", "adapters": len(self.server.pool.names)}

    def _adapters(self) -> dict:
        return {"model": self.server.pool.model_id, "adapters": self.server.pool.describe()}

    def _classify(self) -> dict:
        pool, limits = self.server.pool, self.server.limits
        body = self._read_body()
        try:
            req = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HTTPError(400, f"body is not UTF-8: {e.reason} at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"malformed JSON: {e.msg} at line {e.lineno} column "
                                 f"{e.colno}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, 'expected a JSON object {"adapter": NAME, "texts": [...]}')
        unknown = sorted(set(req) - set(CLASSIFY_FIELDS))
        if unknown:
            raise HTTPError(400, f"unknown field {unknown[0]!r} (fields: "
                                 f"{', '.join(CLASSIFY_FIELDS)})")
        loaded = ", ".join(pool.names)
        name = req.get("adapter")
        if name is None and len(pool.names) == 1:
            name = pool.names[0]
        if name is None:
            raise HTTPError(400, f"missing field 'adapter' (loaded: {loaded})")
        if not isinstance(name, str):
            raise HTTPError(400, f"field 'adapter' must be a string, got {_kind(name)}")
        if name not in pool.classifiers:
            raise HTTPError(404, f"unknown adapter {name!r} (loaded: {loaded})")
        texts = req.get("texts")
        if texts is None:
            raise HTTPError(400, "missing field 'texts' (a list of strings)")
        if not isinstance(texts, list):
            raise HTTPError(400, f"field 'texts' must be a list of strings, got {_kind(texts)}")
        if len(texts) > limits.max_texts:
            raise HTTPError(413, f"{len(texts)} texts in one request; the limit is "
                                 f"{limits.max_texts} (split the request)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise HTTPError(400, f"texts[{i}] must be a string, got {_kind(t)}")
            if not t.strip():
                raise HTTPError(400, f"texts[{i}] is empty")
        top_k = req.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or top_k < 1):
            raise HTTPError(400, f"field 'top_k' must be an integer >= 1, got {top_k!r}")
        preds = pool.classify(name, texts, top_k) if texts else []
        return {"adapter": name, "predictions": preds}

    # -- bodies and answers ----------------------------------------------------------------

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "chunked bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, f"bad Content-Length {raw!r}") from None
        if n > self.server.limits.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise HTTPError(413, f"body of {n} bytes; the limit is "
                                 f"{self.server.limits.max_body_bytes}")
        return n

    def _read_body(self) -> bytes:
        self._body_read = True
        n = self._content_length()
        body = self.rfile.read(n) if n else b""
        if len(body) < n:
            self.close_connection = True
            raise HTTPError(400, f"body ended after {len(body)} of {n} bytes")
        return body

    def _discard_body(self) -> None:
        """Read and drop the body of a request answered without it, so the connection can
        carry the next request (or close it when the body is not worth reading)."""
        try:
            n = self._content_length()
            if n:
                self.rfile.read(n)
        except (HTTPError, OSError):
            self.close_connection = True

    def _send(self, status: int, obj: dict) -> None:
        from metapeft.reports import json_safe

        data = json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, ...) as JSON
        too, with a status line even when the request line was too broken to name a version."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - - [{self.log_date_time_string()}] "
                             f"{format % args}\n")


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    import ipaddress

    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def serve(adapters: list[str], *, model: str | None = None, dequantize: str = "auto",
          host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, limits: Limits | None = None,
          quiet: bool = False, on_ready=None) -> None:
    """Load the adapters, then serve until SIGINT or SIGTERM: HTTP on a background thread,
    every MLX call on this one. On the signal no new connection is accepted and the requests in
    progress are answered (for at most ``DRAIN_SECONDS``; a second signal stops at once).
    ``on_ready(server)`` is called once the server listens."""
    limits = limits or Limits()
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}", field="port")
    if limits.max_body_bytes < 1 or limits.max_texts < 1:
        raise UserError("--max-body-bytes and --max-texts must be >= 1", field="max_texts")
    named = parse_adapter_specs(adapters)
    check_one_base_model(named)  # before the port is taken and the model loaded
    server = Server(None, host, port, limits=limits, quiet=quiet)  # a port in use fails fast
    try:
        server.pool = pool = AdapterPool(named, model, dequantize=dequantize)
    except BaseException:
        server.server_close()
        raise
    signalled = []

    def on_signal(signum, frame):
        if signalled:  # a second Ctrl-C: stop now, without waiting for requests
            raise KeyboardInterrupt
        signalled.append(signum)
        pool.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.serve_forever, name="metapeft-http", daemon=True)
    http.start()
    try:
        if on_ready is not None:
            on_ready(server)
        pool.work()  # until a signal
        server.stopping = True  # open connections: 503 and closed
        server.shutdown()  # no new connections
        pool.work(until=server.idle, timeout=DRAIN_SECONDS)  # answer those in progress
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stopping = True
        pool.close()
        server.shutdown()
        server.server_close()
