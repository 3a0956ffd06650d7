"""Benchmark (not a test): `fruitdask serve` under load, against the bare batched VGG16 rate.

Usage::

    python -m fruitdask run --image-size 32 --weights random --output /tmp/fd-run
    python -m fruitdask train --features /tmp/fd-run --test-input ../shared/data/fruits360-sample/Test \\
        --model-out /tmp/fd-model
    python benchmarks/serve_bench.py --model /tmp/fd-model [--requests 256] [--max-seconds 60] [--json]

Starts ``python -m fruitdask serve`` on 127.0.0.1 (a free port; loopback only), waits for
/readyz, then:

1. baseline, in this process while the server idles: the bare VGG16 forward pass
   (``predict_on_batch`` on already decoded and preprocessed photos) in batches of
   ``--max-batch``, the same weights and image size as the bundle: images per second;
2. for each concurrency (1, 8, 32): that many clients on keep-alive connections POST real
   photos until ``--requests`` answers or ``--max-seconds``; throughput, p50/p95/p99
   latency, errors, and the mean batch size the server formed (from /metrics);
3. the ratio of served throughput to the bare batched rate.

Everything the server does per request (HTTP parsing, JPEG decode, resize, preprocessing,
PCA, the classifier, JSON) is in the served number and not in the baseline. The clients run
in this process (one asyncio loop), on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fruitdask.config import TF_ENV  # noqa: E402

for _k, _v in TF_ENV.items():
    os.environ.setdefault(_k, _v)

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "fruits360-sample" / "Test"
HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def batch_stats(port: int) -> tuple[float, float]:
    text = get(port, "/metrics")[1].decode()
    values = {}
    for name in ("fruitdask_serve_batch_size_sum", "fruitdask_serve_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        values[name] = float(m.group(1)) if m else 0.0
    return values["fruitdask_serve_batch_size_sum"], values["fruitdask_serve_batch_size_count"]


def bare_rate(model: str, photos: list[bytes], batch: int, seconds: float) -> dict:
    """Images/s of VGG16 alone on pre-decoded, preprocessed photos, in batches of ``batch``."""
    import numpy as np

    from fruitdask import featurize
    from fruitdask.bundle import ModelBundle
    from fruitdask.model import cached_model

    bundle = ModelBundle.load(model)
    featurizer = bundle.featurizer()
    vgg = cached_model(bundle.spec.weights_sha256, featurizer.weights, bundle.spec.image_size)
    decoded = np.stack([featurize.decode_image(photos[i % len(photos)], bundle.spec.image_size) for i in range(batch)])
    x = featurize.preprocess(decoded)
    for _ in range(3):
        vgg.predict_on_batch(x)
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        vgg.predict_on_batch(x)
        calls += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": calls * batch / elapsed, "batch": batch, "calls": calls, "ms_per_batch": 1000 * elapsed / calls,
            "image_size": bundle.spec.image_size}


async def client(port: int, photos: list[bytes], todo: list[int], deadline: float, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while todo and time.perf_counter() < deadline:
            i = todo.pop()
            body = photos[i % len(photos)]
            head = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            header = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", header, re.I).group(1))
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            status = int(header.split(b" ", 2)[1])
            if status != 200:
                errors.append(f"{status} {payload[:200]!r}")
    finally:
        writer.close()


async def load_level(port: int, photos: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    # Warm-up: a few requests so connection set-up is not in the numbers.
    await asyncio.gather(*(client(port, photos, list(range(2)), time.perf_counter() + 30, [], []) for _ in range(min(concurrency, 4))))
    before = batch_stats(port)
    todo = list(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(port, photos, todo, start + max_seconds, latencies, errors) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = batch_stats(port)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(wall, 3),
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
        "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a bundle written by `fruitdask train`")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="a folder tree of .jpg photos (default: the shared Test sample)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=256, help="answers per concurrency level (default: 256)")
    p.add_argument("--max-seconds", type=float, default=60, help="time cap per level (default: 60)")
    p.add_argument("--baseline-seconds", type=float, default=10, help="time of the bare VGG16 measurement (default: 10)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch and the baseline's batch (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5, help="the server's --max-wait-ms (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)

    photos = [f.read_bytes() for f in sorted(Path(args.photos).rglob("*.jpg"))]
    if not photos:
        print(f"no .jpg photos under {args.photos}", file=sys.stderr)
        return 1
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "fruitdask", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                print(f"server exited {server.returncode}: see {log.name}", file=sys.stderr)
                return 1
            try:
                if get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print(f"server not ready in 300 s: see {log.name}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        baseline = bare_rate(args.model, photos, args.max_batch, args.baseline_seconds)
        levels = []
        for c in (int(x) for x in args.concurrency.split(",")):
            level = asyncio.run(load_level(port, photos, c, args.requests, args.max_seconds))
            level["ratio_to_bare"] = level["throughput"] / baseline["images_per_s"]
            levels.append(level)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    doc = {"model": args.model, "photos": len(photos), "server_ready_s": round(ready_s, 2), "baseline": baseline,
           "levels": levels, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"server ready after {ready_s:.1f} s; {len(photos)} photos at {baseline['image_size']} px; "
          f"load average {doc['loadavg'][0]:.1f} on {doc['cpus']} CPUs")
    print(f"bare VGG16, batches of {baseline['batch']}: {baseline['images_per_s']:.1f} images/s "
          f"({baseline['ms_per_batch']:.1f} ms per batch)")
    print("| clients | answers | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | mean batch | served / bare |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        print(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['throughput']:.1f} | {lv['p50_ms']:.1f} | "
              f"{lv['p95_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['mean_batch']:.1f} | {lv['ratio_to_bare']:.2f} |")
    return 0 if all(lv["errors"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
