"""The demo under load: concurrent ``gradio_client`` clients against the app served on 127.0.0.1.

    python benchmarks/load_demo.py                                # 400 requests, 8 clients -> results/demo-load.json
    python benchmarks/load_demo.py --requests 40 --clients 4 --output /tmp/load.json
    python benchmarks/load_demo.py --checkpoint outputs/sample-tiny/best

The app runs in its own process (``demo/app.py``, as a user starts it), so its memory is measured alone: resident
size sampled every 0.2 s after a warm-up (3 requests per client), growth = median of the last quarter of the run
minus that of the first quarter, against the spread within the first half (``MIN_MEMORY_NOISE_MIB``). Each
client sends, in a fixed pattern, 70 % real images (the bundled Kvasir-SEG sample), 10 % huge ones (6.6 megapixels,
downscaled by the app) and 20 % garbage (text, a truncated JPEG, a decompression bomb, a 1x1 image, random bytes,
an empty file). A valid image must come back segmented, garbage with the app's message; anything else, a client
exception included, is a failure. After the run one more request checks that the app still answers.
Without ``--checkpoint`` a small random-weight STPNet is built (the one the tests use).
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, command_line, load_average, machine_info, write_results  # noqa: E402

SAMPLE = ROOT / "sample" / "kvasir-seg-mini" / "images"
PATTERN = ["image", "image", "image", "huge", "image", "image", "garbage", "image", "image", "garbage"]
# Growth counts as noise up to the spread of the resident size within the run's first half (where nothing could have
# accumulated yet), and never less than this: allocator fragments and Gradio's caches move that much on their own.
MIN_MEMORY_NOISE_MIB = 32.0


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(folder: Path) -> dict[str, list[Path]]:
    """The uploads, by kind: real images, a huge one and one file of each kind of garbage."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_predict import png_header  # the decompression bomb the tests use

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    huge = folder / "huge.jpg"
    y, x = np.mgrid[0:2200, 0:3000]
    picture = np.stack([(x // 12) % 256, (y // 9) % 256, ((x + y) // 20) % 256], -1).astype(np.uint8)
    Image.fromarray(picture).save(huge, quality=85)
    garbage = {
        "notes.txt": b"not an image\n",
        "truncated.jpg": sorted(SAMPLE.glob("*.jpg"))[0].read_bytes()[:2500],
        "bomb.png": png_header(30_000, 30_000),
        "random.png": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
    }
    for name, data in garbage.items():
        (folder / name).write_bytes(data)
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    return {
        "image": sorted(SAMPLE.glob("*.jpg")),
        "huge": [huge],
        "garbage": [folder / name for name in (*garbage, "tiny.png")],
    }


def tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_predict import tiny_checkpoint as build

    return build(folder)


# ---------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(checkpoint: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "demo" / "app.py"), "--checkpoint", str(checkpoint)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the app did not answer within 180 s: {log.read_text()[-2000:]}")


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append((time.time(), rss_mib(self.pid)))
            except OSError:
                return
            self.stopped.wait(self.every)


# ---------------------------------------------------------------------------------------------- the clients
def judge(kind: str, outputs: Sequence[Any]) -> str | None:
    """None when the answer is right for its kind, else what is wrong."""
    description, details = outputs[2], outputs[5]
    if kind == "garbage":
        if details and set(details) == {"error"} and description.startswith("### Cannot use"):
            return None
        return f"garbage not answered with its message: {str(details)[:200]}"
    if details and "lesion_pixels" in details and outputs[1]:
        if kind == "huge" and not any("downscaled" in n for n in details.get("notes", [])):
            return "huge image without the downscaling note"
        return None
    return f"{kind} not segmented: {str(details)[:200]}"


def one_request(client: Any, kind: str, path: Path, checkpoint: str) -> dict[str, Any]:
    from gradio_client import handle_file

    started = time.perf_counter()
    try:
        outputs = client.predict(handle_file(str(path)), checkpoint, 0.5, api_name="/segment")
        problem = judge(kind, outputs)
    except Exception as error:  # a failed request is a result here, not the end of the benchmark
        problem = f"{type(error).__name__}: {error}"[:300]
    return {"kind": kind, "file": path.name, "seconds": time.perf_counter() - started, "problem": problem}


def new_client(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)  # results stay on the server: no copies to disk


def run_clients(
    url: str, inputs: dict[str, list[Path]], clients: int, requests: int, max_seconds: float, checkpoint: str
) -> list[dict]:
    """``clients`` threads, each with its own gradio_client, send ``requests`` in all (or until ``max_seconds``)."""
    numbers, results, lock = itertools.count(), [], threading.Lock()
    deadline = time.time() + max_seconds

    def work(client_id: int) -> None:
        client = new_client(url)
        for turn in itertools.count():
            number = next(numbers)
            if number >= requests or time.time() > deadline:
                return
            kind = PATTERN[(turn + 3 * client_id) % len(PATTERN)]
            files = inputs[kind]
            result = one_request(client, kind, files[(turn + client_id) % len(files)], checkpoint)
            result["started"] = time.time() - result["seconds"]
            with lock:
                results.append(result)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# ---------------------------------------------------------------------------------------------- figures
def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_s": round(p50, 3), "p95_s": round(p95, 3), "p99_s": round(p99, 3), "max_s": round(max(values), 3)}


def memory_figures(samples: list[tuple[float, float]], start: float, end: float, peak: float) -> dict[str, Any]:
    quarter = (end - start) / 4
    first = [m for t, m in samples if start <= t <= start + quarter]
    last = [m for t, m in samples if end - quarter <= t <= end]
    during = [m for t, m in samples if start <= t <= end]
    growth = statistics.median(last) - statistics.median(first) if first and last else float("nan")
    tenths = [[m for t, m in samples if start + k * (end - start) / 10 <= t <= start + (k + 1) * (end - start) / 10]
              for k in range(10)]  # fmt: skip
    medians = [statistics.median(x) for x in tenths if x]
    first_half = medians[: len(medians) // 2]
    noise = max(MIN_MEMORY_NOISE_MIB, max(first_half) - min(first_half)) if first_half else MIN_MEMORY_NOISE_MIB
    return {
        "server_rss_median_per_tenth_of_the_run_mib": [round(statistics.median(x), 1) if x else None for x in tenths],
        "server_rss_first_quarter_median_mib": round(statistics.median(first), 1) if first else None,
        "server_rss_last_quarter_median_mib": round(statistics.median(last), 1) if last else None,
        "server_rss_growth_mib": round(growth, 1),
        "noise_band_mib": round(noise, 1),
        "server_rss_peak_during_run_mib": round(max(during), 1) if during else None,
        "server_peak_rss_mib": round(peak, 1),
        "samples": len(during),
    }


def summarise(results: list[dict], start: float, end: float) -> dict[str, Any]:
    by_kind = {}
    for kind in ("image", "huge", "garbage"):
        rows = [r for r in results if r["kind"] == kind]
        by_kind[kind] = {"requests": len(rows), "failures": sum(r["problem"] is not None for r in rows)}
        by_kind[kind].update(percentiles([r["seconds"] for r in rows]))
    problems = [f"{r['kind']} {r['file']}: {r['problem']}" for r in results if r["problem"]]
    return {
        "requests": len(results),
        "failures": len(problems),
        "failed_valid_images": by_kind["image"]["failures"] + by_kind["huge"]["failures"],
        "garbage_answered_with_message": by_kind["garbage"]["requests"] - by_kind["garbage"]["failures"],
        "latency": percentiles([r["seconds"] for r in results]),
        "throughput_requests_per_s": round(len(results) / (end - start), 2),
        "seconds": round(end - start, 1),
        "by_kind": by_kind,
        "first_problems": problems[:10],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests in all (default 400)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long (default 900)")
    parser.add_argument("--warmup", type=int, default=None, help="requests before the measured run (3 per client)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a small random-weight STPNet")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "demo-load.json")
    args = parser.parse_args(argv)
    args.warmup = 3 * args.clients if args.warmup is None else args.warmup
    import torch

    with tempfile.TemporaryDirectory(prefix="stpnet-load-") as scratch:
        work = Path(scratch)
        checkpoint = args.checkpoint or tiny_checkpoint(work / "checkpoint")
        inputs = make_inputs(work / "inputs")
        load_start = load_average()
        server, url = start_server(checkpoint, work / "server.log")
        sampler = MemorySampler(server.pid)
        try:
            sampler.start()
            # Warm-up first (each kind of upload, every client): what it allocates once is not growth.
            warmup = run_clients(url, inputs, args.clients, args.warmup, args.max_seconds, str(checkpoint))
            start = time.time()
            results = run_clients(url, inputs, args.clients, args.requests, args.max_seconds, str(checkpoint))
            end = time.time()
            after = one_request(new_client(url), "image", inputs["image"][0], str(checkpoint))
            peak = rss_mib(server.pid, "VmHWM")
        finally:
            sampler.stopped.set()
            server.terminate()
            server.wait(timeout=30)
    import demo.app as app

    summary = summarise(results, start, end)
    payload = {
        "command": command_line(),
        "clients": args.clients,
        "requests_asked": args.requests,
        "max_seconds": args.max_seconds,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random-weight STPNet, base_channels 8, 128 px",
        "mix": {kind: PATTERN.count(kind) / len(PATTERN) for kind in ("image", "huge", "garbage")},
        "queue": {"concurrency_limit": app.CONCURRENCY, "max_size": app.QUEUE_SIZE, "max_pixels": app.MAX_PIXELS},
        "warmup": {"requests": len(warmup), "failures": sum(r["problem"] is not None for r in warmup)},
        **summary,
        "memory": memory_figures(sampler.samples, start, end, peak),
        "answers_after_the_run": after["problem"] is None,
        "load_average_1_5_15_min": {"at_start": load_start, "at_end": load_average()},
        "machine": machine_info(torch.device("cpu")),
    }
    growth = payload["memory"]["server_rss_growth_mib"]
    payload["targets_met"] = {
        "at_least_400_requests": payload["requests"] >= 400,
        "at_least_8_clients": args.clients >= 8,
        "no_failed_valid_image": summary["failed_valid_images"] == 0 and payload["warmup"]["failures"] == 0,
        "every_garbage_upload_answered": summary["by_kind"]["garbage"]["failures"] == 0,
        "no_memory_growth_beyond_noise": bool(growth <= payload["memory"]["noise_band_mib"]),
        "answers_after_the_run": payload["answers_after_the_run"],
    }
    write_results(args.output, payload)
    print(
        f"{summary['requests']} requests from {args.clients} clients in {summary['seconds']} s: "
        f"{summary['failures']} failures, p50 {summary['latency'].get('p50_s')} s, p99 "
        f"{summary['latency'].get('p99_s')} s, {summary['throughput_requests_per_s']} req/s, server peak "
        f"{payload['memory']['server_peak_rss_mib']} MiB, growth {growth} MiB -> {args.output}"
    )
    ok = all(v for k, v in payload["targets_met"].items() if not k.startswith("at_least"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
