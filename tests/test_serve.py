"""``metapeft serve`` (issue 16, item 4): a real server on a free loopback port, in a thread of
this process, with two adapters (two methods, two label sets) on the tiny model, asked over
real HTTP. Its answers equal ``api.predict``'s; every bad request is a 4xx with a JSON error and
the server goes on answering; concurrent clients all get their own right answers; a
connection's pipelined requests come back in order. One subprocess test runs the command
itself and stops it with SIGTERM."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from metapeft.cli import app

TEXTS = ["rain forecast storm umbrella", "album guitar song", "a very long text about travel " * 5,
         "history of the old kings", "seeds soil and flowers"]
MAX_BODY, MAX_TEXTS = 4096, 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapter directories on the tiny model: LoRA on a 3-way topic task, prompt tuning on
    a 2-way sentiment task."""
    from metapeft import api
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    root = tmp_path_factory.mktemp("serve")
    out = {}
    for name, seed, family, ways, method in (("topics", 4, "topic", 3, None),
                                             ("mood", 5, "sentiment", 2, "prompt")):
        task = write_task_dir(generate_task(seed, family=family, ways=ways, shots=2, query=2),
                              root / f"task-{name}")
        api.adapt(task, steps=2, out=root / name, **({"method": method} if method else {}))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def server(adapters):
    from metapeft.serve import Limits, Server, pool_in_thread

    pool = pool_in_thread([str(adapters["topics"]), f"mood={adapters['mood']}"])
    srv = Server(pool, "127.0.0.1", 0, limits=Limits(max_body_bytes=MAX_BODY,
                                                     max_texts=MAX_TEXTS), quiet=True)
    http = threading.Thread(target=srv.serve_forever, daemon=True)
    http.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    pool.stop()
    pool.thread.join(30)
    pool.close()


@pytest.fixture(scope="module")
def expected(adapters):
    """``api.predict``'s answers, without the echoed text: what /v1/classify must return."""
    from metapeft import api

    def answer(name, texts, top_k=None):
        preds = api.predict(adapters[name], texts, top_k=top_k).predictions
        return [{"label": p["label"], "probabilities": p["probabilities"]} for p in preds]

    return {(name, k): answer(name, TEXTS, k) for name in adapters for k in (None, 1, 2)}


def call(server, method, path, body=None, *, raw=None, headers=None):
    """(status, JSON answer) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"].startswith("application/json")
        return e.code, json.loads(e.read())


def classify(server, **body):
    return call(server, "POST", "/v1/classify", body)


def test_answers_equal_predict(server, expected):
    for (name, top_k), want in expected.items():
        body = {"adapter": name, "texts": TEXTS, **({} if top_k is None else {"top_k": top_k})}
        status, got = classify(server, **body)
        assert status == 200 and got == {"adapter": name, "predictions": want}
    # one text at a time: adapt's batches give the same labels
    status, got = classify(server, adapter="mood", texts=TEXTS[:1])
    assert got["predictions"][0]["label"] == expected["mood", None][0]["label"]
    assert classify(server, adapter="topics", texts=[]) == (200, {"adapter": "topics",
                                                                  "predictions": []})


def test_adapters_and_health(server, adapters):
    from metapeft.adapter_io import read_adapter_info

    assert call(server, "GET", "/health") == (200, {"status": "ok", "adapters": 2})
    status, listing = call(server, "GET", "/v1/adapters")
    assert status == 200 and listing["model"] == "tiny"
    assert [a["name"] for a in listing["adapters"]] == ["topics", "mood"]
    for entry in listing["adapters"]:
        info = read_adapter_info(adapters[entry["name"]])
        assert entry["method"] == info.method and entry["labels"] == info.labels
        assert entry["base_model"] == "tiny" and entry["base_model_hash"] == info.base_model_hash
    assert {a["method"] for a in listing["adapters"]} == {"lora", "prompt"}


BAD_REQUESTS = [  # (what is sent, status, a piece of the error)
    ({"raw": b'{"adapter": "topics", "texts": ['}, 400, "malformed JSON"),
    ({"raw": b"\xff\xfe"}, 400, "not UTF-8"),
    ({"body": ["topics"]}, 400, "expected a JSON object"),
    ({"body": {"adapter": "topics", "text": ["a"]}}, 400, "unknown field 'text'"),
    ({"body": {"texts": ["a"]}}, 400, "missing field 'adapter'"),
    ({"body": {"adapter": 3, "texts": ["a"]}}, 400, "'adapter' must be a string"),
    ({"body": {"adapter": "nope", "texts": ["a"]}}, 404, "unknown adapter 'nope'"),
    ({"body": {"adapter": "topics"}}, 400, "missing field 'texts'"),
    ({"body": {"adapter": "topics", "texts": "a"}}, 400, "must be a list"),
    ({"body": {"adapter": "topics", "texts": ["a", 2]}}, 400, "texts[1] must be a string"),
    ({"body": {"adapter": "topics", "texts": ["a", " "]}}, 400, "texts[1] is empty"),
    ({"body": {"adapter": "topics", "texts": ["a"], "top_k": 0}}, 400, "top_k"),
    ({"body": {"adapter": "topics", "texts": ["a"], "top_k": "2"}}, 400, "top_k"),
    ({"body": {"adapter": "topics", "texts": ["a"], "top_k": True}}, 400, "top_k"),
    ({"body": {"adapter": "topics", "texts": ["a"] * (MAX_TEXTS + 1)}}, 413, "the limit is 8"),
    ({"body": {"adapter": "topics", "texts": ["x" * MAX_BODY]}}, 413, "the limit is 4096"),
]


@pytest.mark.parametrize("sent,status,needle", BAD_REQUESTS,
                         ids=[n for _, _, n in BAD_REQUESTS])
def test_bad_requests_are_4xx_json(server, expected, sent, status, needle):
    got = call(server, "POST", "/v1/classify", sent.get("body"), raw=sent.get("raw"))
    assert got[0] == status and needle in got[1]["error"], got
    # ... and the server goes on answering, correctly
    assert classify(server, adapter="mood", texts=TEXTS) == (
        200, {"adapter": "mood", "predictions": expected["mood", None]})


def test_unknown_paths_and_methods(server):
    for method, path, status in (("GET", "/nope", 404), ("POST", "/v1/nope", 404),
                                 ("GET", "/v1/classify", 405), ("PUT", "/health", 405),
                                 ("DELETE", "/v1/adapters", 405)):
        got = call(server, method, path, {"adapter": "topics"} if method != "GET" else None)
        assert got[0] == status and got[1]["error"], (method, path, got)
    assert call(server, "GET", "/health")[0] == 200


def _read_response(f) -> tuple[int, dict, dict]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status, headers, json.loads(f.read(int(headers["content-length"])))


def _post(path, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_one_connection_answers_in_order(server, expected):
    """Pipelined on one keep-alive connection, an error among them: answers in the order
    asked, and a refused request (its body still read) does not break the connection."""
    asks = [("topics", None), ("mood", 2), ("nope", None), ("topics", 1), ("mood", None)]
    payload = b"".join(_post("/v1/classify", json.dumps(
        {"adapter": a, "texts": TEXTS, **({"top_k": k} if k else {})}).encode())
        for a, k in asks)
    payload += b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(payload)
        f = s.makefile("rb")
        for a, k in asks:
            status, _, got = _read_response(f)
            if a == "nope":
                assert status == 404 and "unknown adapter" in got["error"]
            else:
                assert status == 200 and got["predictions"] == expected[a, k]
        assert _read_response(f)[0] == 200


def test_oversized_body_closes_only_its_connection(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(_post("/v1/classify", b"{" * 10).replace(b"Length: 10", b"Length: 99999999"))
        f = s.makefile("rb")
        status, headers, got = _read_response(f)
        assert status == 413 and headers.get("connection") == "close"
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(b"GET /health HTTP/x\r\n\r\n")  # http.server's own error, as JSON too
        status, _, got = _read_response(s.makefile("rb"))
        assert status == 400 and got["error"]
    assert call(server, "GET", "/health")[0] == 200


def test_concurrent_clients_get_their_own_answers(server, expected, monkeypatch):
    """6 clients at once, both adapters: every answer right, and the scoring ran one call at a
    time, always on the one MLX thread."""
    import metapeft.classify

    real, state, lock = metapeft.classify.predictions, {"now": 0, "most": 0, "threads": set()}, \
        threading.Lock()

    def watched(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["threads"].add(threading.current_thread().name)
        try:
            time.sleep(0.002)  # widen the window in which an overlap would show
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(metapeft.classify, "predictions", watched)
    keys = list(expected)
    failures, done = [], []

    def client(i):
        for j in range(4):
            name, k = keys[(i + j) % len(keys)]
            body = {"adapter": name, "texts": TEXTS, **({} if k is None else {"top_k": k})}
            got = classify(server, **body)
            if got != (200, {"adapter": name, "predictions": expected[name, k]}):
                failures.append((i, j, got))
            done.append(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == [] and len(done) == 24
    assert state["most"] == 1 and len(state["threads"]) == 1
    assert state["threads"] == {"metapeft-mlx"}


# -- the command ----------------------------------------------------------------------------

runner = CliRunner()


def one_line_error(args, needle):
    r = runner.invoke(app, ["serve", "--port", "0", *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_command_refuses_bad_adapter_sets(adapters, tmp_path):
    from metapeft.artifacts import load_safetensors, save_safetensors

    other = tmp_path / "other"
    shutil.copytree(adapters["topics"], other)
    arrays, meta = load_safetensors(other / "adapters.safetensors")
    save_safetensors(other / "adapters.safetensors", arrays,
                     {**meta, "base_model": "elsewhere", "base_model_hash": "0123456789abcdef"})
    one_line_error([adapters["topics"], other], "different base models")
    one_line_error([adapters["topics"], f"topics={adapters['mood']}"], "two adapters are named")
    one_line_error([tmp_path / "missing"], "not an adapter directory")
    one_line_error([adapters["topics"], "--port", "70000"], "--port")
    one_line_error([adapters["topics"], "--max-texts", "0"], "--max-texts")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["serve", str(adapters["topics"]), "--port", str(port)])
        assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    one_line_error([f"a b={adapters['mood']}"], "no spaces")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_command_serves_until_signalled(adapters, tmp_path, signum):
    """The real command on port 0: it says where it listens, answers, stops cleanly on SIGTERM
    or Ctrl-C (exit 0), and writes nothing (its working directory stays empty, the adapter
    unchanged)."""
    work = tmp_path / "cwd"
    work.mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in adapters["mood"].iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "metapeft.cli", "serve",
                             f"m={adapters['mood']}", "--port", "0"], cwd=work,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the server exited before it was ready"
            if "http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "/v1/classify", json.dumps(
                {"texts": TEXTS[:2]}).encode(), timeout=30) as r:  # one adapter: name optional
            assert [p["label"] for p in json.loads(r.read())["predictions"]]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in err and "POST /v1/classify" in err
    assert list(work.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in adapters["mood"].iterdir()} == before
