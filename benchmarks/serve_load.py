"""Load test for `metapeft serve` (issue 16, item 4): latency and throughput under concurrent
clients, and that nothing is dropped or changed.

Trains one LoRA adapter (a few steps on a 5-way synthetic topic task) on --model (default the
embedded tiny model, so it runs without ../shared), starts `metapeft serve` on it in a
subprocess (port 0, --quiet), and for each client count in --clients runs that many threads,
each with one keep-alive connection, posting --texts texts per request in a closed loop for
--duration seconds (at most --max-requests requests per level). Every answer is checked against
`api.predict` on the same texts, so a wrong or missing answer fails the run (exit 1). Reports
p50/p90/p99/max latency, requests/s and texts/s per level, the in-process baseline (the same
scoring call, `classify.predictions`, with no HTTP), and the server's start-up time; the server
is stopped with SIGTERM and must exit 0.

    uv run python benchmarks/serve_load.py [--model ../shared/models/stories260K]
        [--clients 1,4,16] [--duration 10] [--texts 8] [--max-requests 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, write_json

import numpy as np

from metapeft.data.synthetic import generate_task


def make_adapter(model: str, steps: int, root: Path) -> tuple[Path, list[str]]:
    """A LoRA adapter trained for ``steps`` on a 5-way topic task, and a pool of texts to ask
    about (the task's query texts and shuffled-word variants of them)."""
    from metapeft import api
    from metapeft.quickstart import write_task_dir

    task = generate_task(7, family="topic", ways=5, shots=4, query=8)
    task_dir = write_task_dir(task, root / "task")
    out = root / "adapter"
    api.adapt(task_dir, model=model, steps=steps, out=out)
    rng = random.Random(0)
    texts = [e.text for e in task.query]
    for e in task.query:
        words = e.text.split()
        rng.shuffle(words)
        texts.append(" ".join(words))
    return out, texts


def start_server(adapter: Path, model: str) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "metapeft.cli", "serve", str(adapter),
                             "--model", model, "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "400"})
    for line in proc.stderr:
        if "http://" in line:
            url = line.split(" at ", 1)[1].split()[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it drained
            return proc, url, time.perf_counter() - t0
    proc.wait()
    sys.exit(f"the server exited before it was ready (exit {proc.returncode})")


def run_level(url: str, clients: int, requests: list[dict], expected: list[list[dict]],
              duration: float, max_requests: int) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lock = threading.Lock()
    latencies: list[float] = []
    stats = {"sent": 0, "ok": 0, "dropped": 0, "mismatched": 0, "texts": 0}
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        j = 0
        while time.perf_counter() < deadline:
            with lock:
                if stats["sent"] >= max_requests:
                    break
                stats["sent"] += 1
            k = (c * 7 + j) % len(requests)
            j += 1
            body = json.dumps(requests[k]).encode()
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                answer = json.loads(r.read())
                status = r.status
            except (OSError, http.client.HTTPException, ValueError) as e:
                with lock:
                    stats["dropped"] += 1
                    errors.append(f"client {c}: {type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                continue
            dt = time.perf_counter() - t0
            with lock:
                if status != 200:
                    stats["dropped"] += 1
                    errors.append(f"client {c}: HTTP {status}: {answer}")
                elif answer.get("predictions") != expected[k]:
                    stats["mismatched"] += 1
                    errors.append(f"client {c}: request {k} answered differently")
                else:
                    stats["ok"] += 1
                    stats["texts"] += len(requests[k]["texts"])
                    latencies.append(dt)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"clients": clients, **stats, "seconds": round(seconds, 2),
            "requests_per_s": round(stats["ok"] / seconds, 1),
            "texts_per_s": round(stats["texts"] / seconds, 1),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 90, 99)},
            "max_ms": round(float(lat.max()), 1), "errors": errors[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (default) or e.g. "
                    "../shared/models/stories260K")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per client count")
    ap.add_argument("--max-requests", type=int, default=5000, help="per client count")
    ap.add_argument("--texts", type=int, default=8, help="texts per request")
    ap.add_argument("--distinct", type=int, default=24, help="distinct requests (each checked "
                    "against api.predict)")
    ap.add_argument("--steps", type=int, default=5, help="adapter training steps")
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.duration <= 0 or args.max_requests < 1 \
            or not 1 <= args.texts <= 256 or args.distinct < 1:
        ap.error("--clients >= 1, --duration > 0, --max-requests >= 1, --texts in 1..256")
    os.environ.setdefault("METAPEFT_HOME", tempfile.mkdtemp(prefix="metapeft-serve-load-"))
    os.environ.setdefault("METAPEFT_EXPERIENCE", "off")

    from metapeft import api
    from metapeft.classify import Classifier, predictions, text_examples

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        adapter, pool = make_adapter(args.model, args.steps, Path(tmp))
        rng = random.Random(1)
        requests = [{"texts": rng.sample(pool, min(args.texts, len(pool)))
                     if args.texts <= len(pool) else rng.choices(pool, k=args.texts)}
                    for _ in range(args.distinct)]
        expected = []
        for req in requests:
            preds = api.predict(adapter, req["texts"], model=args.model).predictions
            expected.append([{"label": p["label"], "probabilities": p["probabilities"]}
                             for p in preds])
        clf = Classifier.load(adapter, args.model)  # the in-process baseline: no HTTP
        rows = [text_examples(r["texts"]) for r in requests]
        for r in rows:  # warm: the first call of each shape is slower
            predictions(clf, r)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min(args.duration, 5.0):
            predictions(clf, rows[n % len(rows)])
            n += 1
        baseline = n * args.texts / (time.perf_counter() - t0)

        proc, url, startup = start_server(adapter, args.model)
        try:
            results = [run_level(url, c, requests, expected, args.duration, args.max_requests)
                       for c in levels]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 60 s"

    print(f"metapeft serve load test: model {args.model}, {args.texts} texts/request, "
          f"{args.distinct} distinct requests, {args.duration:g} s per level "
          f"(server start-up {startup:.1f} s; in-process predict {baseline:.0f} texts/s)")
    print()
    print("| clients | requests | texts/s | requests/s | p50 ms | p90 ms | p99 ms | max ms "
          "| dropped | mismatched |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['ok']} | {r['texts_per_s']:.0f} | "
              f"{r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['dropped']} | {r['mismatched']} |")
    for r in results:
        for e in r["errors"]:
            print("  " + e)
    print(f"\nserver exit status after SIGTERM: {code}")
    write_json(args.json, {"model": args.model, "texts_per_request": args.texts,
                           "startup_s": round(startup, 2), "baseline_texts_per_s":
                           round(baseline, 1), "levels": results, "exit_status": code})
    bad = sum(r["dropped"] + r["mismatched"] + (r["sent"] - r["ok"] - r["dropped"]
                                                - r["mismatched"]) for r in results)
    if bad or code != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
