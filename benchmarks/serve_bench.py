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
   ``--max-batch``, the same weights and image size as the bundle: images per second,
   measured before every level and after the last (the load of a shared machine drifts);
2. for each concurrency (1, 8, 32): that many clients on keep-alive connections POST real
   photos until ``--requests`` answers or ``--max-seconds``; throughput, p50/p95/p99
   latency, errors, and the mean batch size the server formed (from /metrics);
3. the ratio of served throughput to the bare batched rate measured around that level.

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


SERVER_SUMS = ("fruitdask_serve_batch_size_sum", "fruitdask_serve_batch_size_count", "fruitdask_serve_inference_duration_seconds_sum")


def parse_sums(text: str) -> dict[str, float]:
    """The batch-size and inference-time totals of a /metrics text."""
    out = {}
    for name in SERVER_SUMS:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def server_sums(port: int) -> dict[str, float]:
    return parse_sums(get(port, "/metrics")[1].decode())


class BareVGG16:
    """The bundle's inference runtime alone (its preprocessing and VGG16) on pre-decoded photos,
    in batches of ``batch``: the baseline."""

    def __init__(self, model: str, photos: list[bytes], batch: int) -> None:
        import numpy as np

        from fruitdask.classifier.bundle import ModelBundle
        from fruitdask.features import featurize
        from fruitdask.features.model import cached_runtime

        bundle = ModelBundle.load(model)
        featurizer = bundle.featurizer()
        self.image_size, self.batch = bundle.spec.image_size, batch
        self.runtime = cached_runtime(featurizer.weights, featurizer.spec)
        self.x = np.stack([featurize.decode_image(photos[i % len(photos)], bundle.spec.image_size) for i in range(batch)])
        for _ in range(3):
            self.runtime.featurize(self.x)

    def measure(self, seconds: float) -> dict:
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            self.runtime.featurize(self.x)
            calls += 1
        elapsed = time.perf_counter() - start
        return {"images_per_s": calls * self.batch / elapsed, "ms_per_batch": 1000 * elapsed / calls, "calls": calls}


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


async def load_level(port: int, probe_port: int, photos: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    # Warm-up: a few requests so connection set-up is not in the numbers.
    await asyncio.gather(*(client(port, photos, list(range(2)), time.perf_counter() + 30, [], []) for _ in range(min(concurrency, 4))))
    before = server_sums(probe_port)
    todo = list(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(port, photos, todo, start + max_seconds, latencies, errors) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = server_sums(probe_port)
    d = {k: after[k] - before[k] for k in SERVER_SUMS}
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(wall, 3),
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
        "mean_batch": d["fruitdask_serve_batch_size_sum"] / max(1.0, d["fruitdask_serve_batch_size_count"]),
        # Where the gap to the bare rate goes: the share of the wall time the server's model
        # was busy, and its images per busy second (the model's own rate under this load).
        "model_busy": d["fruitdask_serve_inference_duration_seconds_sum"] / wall,
        "model_images_per_busy_s": d["fruitdask_serve_batch_size_sum"] / max(1e-9, d["fruitdask_serve_inference_duration_seconds_sum"]),
    }


def print_table(doc: dict) -> None:
    """The result as text and a Markdown table (docs/serving.md quotes it)."""
    baseline, levels, ready_s = doc["baseline"], doc["levels"], doc["server_ready_s"]
    baselines = baseline["measurements"]
    print(f"server ready after {ready_s:.1f} s; {doc['photos']} photos at {baseline['image_size']} px; "
          f"load average {doc['loadavg'][0]:.1f} on {doc['cpus']} CPUs")
    print(f"bare VGG16, batches of {baseline['batch']}: " + ", ".join(f"{b['images_per_s']:.1f}" for b in baselines)
          + " images/s (before each level and after the last)")
    print("| clients | answers | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | mean batch | model busy "
          "| model images/busy s | bare (images/s) | served / bare |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        print(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['throughput']:.1f} | {lv['p50_ms']:.1f} | "
              f"{lv['p95_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['mean_batch']:.1f} | {lv['model_busy']:.0%} | "
              f"{lv['model_images_per_busy_s']:.1f} | {lv['bare_images_per_s']:.1f} | "
              f"{lv['ratio_to_bare']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a bundle written by `fruitdask train`")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="a folder tree of .jpg photos (default: the shared Test sample)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=256, help="answers per concurrency level (default: 256)")
    p.add_argument("--max-seconds", type=float, default=60, help="time cap per level (default: 60)")
    p.add_argument("--baseline-seconds", type=float, default=4,
                   help="time of each bare VGG16 measurement, before every level and after the last (default: 4)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch and the baseline's batch (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5, help="the server's --max-wait-ms (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)

    photos = [f.read_bytes() for f in sorted(Path(args.photos).rglob("*.jpg"))]
    if not photos:
        print(f"no .jpg photos under {args.photos}", file=sys.stderr)
        return 1
    port, probe_port = free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "fruitdask", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--probe-port", str(probe_port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--quiet",
           # Every client of the benchmark is one address: let all of them upload at once.
           "--max-uploads-per-client", str(max(int(x) for x in args.concurrency.split(",")))]
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
                if get(probe_port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print(f"server not ready in 300 s: see {log.name}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        bare = BareVGG16(args.model, photos, args.max_batch)
        # The machine's load drifts: each level is compared with the bare rate measured just
        # before and just after it (the mean of the two), not with one number from the start.
        baselines = [bare.measure(args.baseline_seconds)]
        levels = []
        for c in (int(x) for x in args.concurrency.split(",")):
            level = asyncio.run(load_level(port, probe_port, photos, c, args.requests, args.max_seconds))
            baselines.append(bare.measure(args.baseline_seconds))
            level["bare_images_per_s"] = (baselines[-2]["images_per_s"] + baselines[-1]["images_per_s"]) / 2
            level["ratio_to_bare"] = level["throughput"] / level["bare_images_per_s"]
            levels.append(level)
    finally:
        server.send_signal(signal.SIGINT)  # no --drain-seconds wait: nothing routes traffic here
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    baseline = {"batch": bare.batch, "image_size": bare.image_size, "measurements": baselines,
                "images_per_s": statistics.mean(b["images_per_s"] for b in baselines),
                "ms_per_batch": statistics.mean(b["ms_per_batch"] for b in baselines)}
    doc = {"model": args.model, "photos": len(photos), "server_ready_s": round(ready_s, 2), "baseline": baseline,
           "levels": levels, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if all(lv["errors"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
