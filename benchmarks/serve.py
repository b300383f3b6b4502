"""`anomap serve` under load, against offline prediction on the same images.

    python benchmarks/serve.py --data ../shared/data --category glass_fabric --pictures

Fits (once, cached under runs/) a PatchCore model (efficientnet_lite0, 256 px) on the category and
starts `anomap serve` on 127.0.0.1. Then, in rounds that alternate so that a change in the
machine's load hits both sides alike: offline throughput in this process (`Detector.predict` over
the test images, and with --pictures also the work of `anomap predict`: scores plus a heatmap and a
mask PNG per image), then the server at each concurrency, the test images sent from an async
client, a bounded number of requests under a time limit. Prints throughput, its ratio to the same
round's offline throughput (median over rounds), p50/p95/p99 latency, errors, the mean batch the
server formed, and the server's RSS at start, after a warm-up of every setting, and after each round;
--out writes it all as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PICTURES = "?mask=1&heatmap=1"


def cached_model(args: argparse.Namespace) -> Path:
    from anomap import PatchCore
    from anomap.data import MVTecAD

    path = Path(args.cache) / f"{args.category}_lite0_{args.image_size}.anomap"
    if not path.exists():
        start = time.perf_counter()
        det = PatchCore(backbone="efficientnet_lite0", image_size=args.image_size, device="cpu")
        det.fit(MVTecAD(args.data, args.category).train).save(path)
        print(f"fitted {path} in {time.perf_counter() - start:.1f} s")
    return path


def offline(det, paths: list[Path], repeats: int, pictures: bool) -> dict[str, float]:
    """Images per second in this process: `Detector.predict` over the images `repeats` times
    (decoding included) under "", and with `pictures` the work of `anomap predict` once (the
    same plus a heatmap and a mask PNG per image, and scores.csv) under PICTURES."""
    from anomap.runs import predict_paths

    start = time.perf_counter()
    det.predict(paths * repeats)
    out = {"": len(paths) * repeats / (time.perf_counter() - start)}
    if pictures:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            predict_paths(det, paths, Path(folder))
            out[PICTURES] = len(paths) / (time.perf_counter() - start)
    return out


def start_server(model: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "anomap.cli",
        "serve",
        str(model),
        "--port",
        "0",
        "--device",
        "cpu",
        "--max-batch",
        str(max_batch),
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    for _ in range(1200):
        lines = [line for line in log.read_text().splitlines() if line.startswith("anomap: serving")]
        if lines:
            return proc, lines[0].split(" on ")[1].split()[0]
        if proc.poll() is not None:
            raise SystemExit(f"anomap serve exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("anomap serve printed no address in 120 s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


async def load_test(url: str, bodies: list[bytes], concurrency: int, requests: int, limit_s: float, query: str) -> dict:
    """`requests` POSTs from `concurrency` workers, stopping early after `limit_s` seconds."""
    import httpx

    latencies, batches, errors, sent = [], [], [], 0
    deadline = time.perf_counter() + limit_s

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            try:
                answer = await client.post(
                    f"/v1/predict{query}", content=body, headers={"Content-Type": "application/octet-stream"}
                )
            except httpx.HTTPError as err:
                errors.append(type(err).__name__)
                continue
            if answer.status_code != 200:
                errors.append(str(answer.status_code))
                continue
            latencies.append(time.perf_counter() - start)
            batches.append(answer.json()["batch_size"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"latencies": latencies, "batches": batches, "errors": errors, "seconds": seconds}


def summary(concurrency: int, query: str, rounds: list[dict]) -> dict:
    """One table row from a setting's rounds (each with its own `offline` throughput)."""
    lat = np.array([x for r in rounds for x in r["latencies"]]) * 1000
    ok, seconds = len(lat), sum(r["seconds"] for r in rounds)
    ratios = [len(r["latencies"]) / r["seconds"] / r["offline"] for r in rounds]
    errors = [e for r in rounds for e in r["errors"]]
    return {
        "concurrency": concurrency,
        "pictures": bool(query),
        "requests": ok + len(errors),
        "seconds": seconds,
        "images_per_s": ok / seconds,
        "ratio_median": float(np.median(ratios)),
        "ratios": ratios,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "mean_batch": float(np.mean([b for r in rounds for b in r["batches"]])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="root of the MVTec-layout categories")
    parser.add_argument("--category", default="glass_fabric")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--cache", default="runs/serve-bench", help="folder for the fitted model and the server log")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="requests per setting, over all rounds")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per setting at most, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--pictures",
        action="store_true",
        help="also the highest concurrency asking for the mask "
        "and the heatmap, against the work of `anomap predict`, which writes both",
    )
    parser.add_argument("--offline-repeats", type=int, default=2, help="passes over the test images per round")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    from anomap import load
    from anomap.data import MVTecAD

    model = cached_model(args)
    det = load(model, device="cpu")
    paths = [Path(s.path) for s in MVTecAD(args.data, args.category).test]
    det.predict(paths[:2])  # warm-up
    bodies = [p.read_bytes() for p in paths]
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = [(c, "") for c in levels] + ([(max(levels), PICTURES)] if args.pictures else [])
    proc, url = start_server(model, args.max_batch, Path(args.cache) / "server.log")
    try:
        rss = {"start": rss_mb(proc.pid)}
        for c, query in settings:  # warm-up: every setting once, so the batch shapes it forms have buffers
            asyncio.run(load_test(url, bodies, c, 4 * args.max_batch, 300, query))
        rss["after warm-up"] = rss_mb(proc.pid)
        rss["after each round"] = []
        rounds = {s: [] for s in settings}
        for _ in range(args.rounds):
            base = offline(det, paths, args.offline_repeats, args.pictures)
            for c, query in settings:
                run = asyncio.run(
                    load_test(url, bodies, c, args.requests // args.rounds, args.time_limit / args.rounds, query)
                )
                rounds[(c, query)].append({**run, "offline": base[query]})
            rss["after each round"].append(rss_mb(proc.pid))
        rss["end"] = rss["after each round"][-1]
    finally:
        proc.terminate()
        proc.wait(60)
    rows = [summary(c, q, rounds[(c, q)]) for c, q in settings]
    offline_ips = {q or "scores": [r["offline"] for r in rounds[(max(levels), q)]] for q in {q for _, q in settings}}
    print(
        f"offline img/s per round on the {len(paths)} test images: "
        + "; ".join(f"{k}: {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in offline_ips.items())
    )
    print(
        "\n| concurrency | pictures | requests | seconds | img/s | vs offline (median of rounds) | p50 ms | p95 ms "
        "| p99 ms | errors | mean batch |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['concurrency']} | {'yes' if r['pictures'] else 'no'} | {r['requests']} | {r['seconds']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['ratio_median']:.2f}x | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} {' '.join(r['error_kinds'])} | {r['mean_batch']:.1f} |"
        )
    growth = rss["end"] / rss["after warm-up"] - 1
    print(
        f"\nserver RSS: {rss['start']:.0f} MB at start, {rss['after warm-up']:.0f} MB after the warm-up, "
        f"{rss['end']:.0f} MB at the end ({growth:+.1%} over the measured load); after each round: "
        + ", ".join(f"{v:.0f}" for v in rss["after each round"])
        + " MB"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"offline": offline_ips, "rows": rows, "rss_mb": rss}, indent=2))


if __name__ == "__main__":
    main()
