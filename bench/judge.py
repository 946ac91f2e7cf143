"""Judge throughput: the OpenAI-compatible judge against a local fake server.

The fake server (tests/fake_openai.py) answers every request after a fixed
latency, as a remote API would, from its own process (a remote server does not
compete with the judge for this machine's interpreter lock). The bench judges N comparisons at each
concurrency from an empty cache, then reruns the last one with its cache full
(which must send no request). Usage:

    python bench/judge.py [--n 1000] [--latency 0.05] [--concurrency 1 16]

Requests go out in batches of the judge step's default size, as the step sends them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sacpo_steps.evaluation.judge import ORDERS  # noqa: E402
from sacpo_steps.evaluation.judges import JudgeRequest  # noqa: E402
from sacpo_steps.evaluation.judges.registry import make_judge  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

BATCH = 256  # the judge step's default --batch-size
KEY_ENV = "SACPO_BENCH_JUDGE_KEY"  # a throwaway key, so the bench never reads a real one


def comparisons(n: int) -> list[JudgeRequest]:
    """n comparisons shaped like the step's: prompts x orders x 2 repetitions."""
    out: list[JudgeRequest] = []
    prompt = 0
    while len(out) < n:
        a, b = f"candidate answer {prompt} #q={prompt % 9 + 1}", f"baseline answer {prompt} #q=5"
        for rep in range(2):
            for order in ORDERS:
                first, second = (a, b) if order == "a_first" else (b, a)
                out.append(JudgeRequest("helpfulness", f"p{prompt}", f"Question {prompt}?",
                                        first, second, rep))
        prompt += 1
    return out[:n]


def _serve(latency: float, conn: Connection) -> None:
    """Child process: run the fake server, answer "requests" with its count until "stop"."""
    with FakeOpenAI(latency=latency) as server:
        conn.send(server.url)
        while (command := conn.recv()) != "stop":
            assert command == "requests"
            conn.send(server.requests)


class RemoteServer:
    """The fake server in a child process, with its request count."""

    def __init__(self, latency: float) -> None:
        self._conn, child = multiprocessing.Pipe()
        self._proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(latency, child), daemon=True)
        self._proc.start()
        self.url: str = self._conn.recv()

    @property
    def requests(self) -> int:
        self._conn.send("requests")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(10)


def run(server: RemoteServer, cache: Path, concurrency: int,
        requests: list[JudgeRequest]) -> tuple[float, float, int, dict]:
    judge = make_judge({"backend": "openai", "base_url": server.url, "cache": str(cache),
                        "concurrency": concurrency, "api_key_env": KEY_ENV,
                        "model": "fake-judge"})
    sent = server.requests
    start, cpu_start = time.perf_counter(), _cpu()
    replies = []
    for i in range(0, len(requests), BATCH):
        replies += judge.judge_many(requests[i:i + BATCH])
    wall, cpu = time.perf_counter() - start, _cpu() - cpu_start
    judge.close()
    errors = sum(r.verdict == "error" for r in replies)
    if errors:
        raise SystemExit(f"{errors} judgments failed")
    return wall, cpu, server.requests - sent, judge.usage()


def _cpu() -> float:
    """CPU seconds of this process (the judge), not of the server's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="judgments per run")
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds/request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-not-a-secret"
    requests = comparisons(args.n)
    load = os.getloadavg()[0]  # the concurrent run is CPU-bound on a busy machine

    rows = []
    server = RemoteServer(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for concurrency in args.concurrency:
                cache = Path(tmp) / f"cache-{concurrency}.jsonl"
                wall, cpu, sent, _ = run(server, cache, concurrency, requests)
                rows.append((concurrency, wall, cpu, sent))
            rerun_wall, _, rerun_sent, usage = run(server, cache, args.concurrency[-1],
                                                   requests)
    finally:
        server.stop()

    print(f"{args.n} judgments, server latency {args.latency * 1000:.0f} ms, "
          f"batches of {BATCH}, empty cache each run; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs at the start\n")
    print("| concurrency | wall s | requests | judgments/s | judge CPU ms/judgment |")
    print("|---:|---:|---:|---:|---:|")
    for concurrency, wall, cpu, sent in rows:
        print(f"| {concurrency} | {wall:.2f} | {sent} | {args.n / wall:.1f} "
              f"| {cpu / args.n * 1000:.1f} |")
    if len(rows) > 1:
        print(f"\nspeed-up {rows[-1][0]} vs {rows[0][0]}: {rows[0][1] / rows[-1][1]:.1f}x "
              "(goal >= 8x)")
    print(f"fully cached rerun: {rerun_sent} requests (goal 0), {rerun_wall:.2f} s, "
          f"{usage['cached']} cache hits")


if __name__ == "__main__":
    main()
