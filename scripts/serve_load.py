"""Load for an OpenAI-compatible server (tern serve, llama-server): N concurrent streaming clients
on /v1/completions, through the official client (PyPI `openai`, AsyncOpenAI).

    python scripts/serve_load.py --base http://127.0.0.1:8080/v1 --clients 8 --requests 4 \
        [--prompt-words 48] [--max-tokens 64] [--duration S] [--malformed 0.1] [--disconnect 0.1] \
        [--pid PID] [--api-key K] [--temperature T]

Each client sends its requests one after another (a distinct prompt each, temperature 0 unless
--temperature says otherwise, the server's other sampling defaults,
`ignore_eos` for servers that know it); with --duration it keeps going until then. Measured: time
to first token (first streamed text), completion tokens (the usage the server reports in its last
chunk), aggregate completion tokens per second over the whole run's wall time. Soak options:
--malformed F sends that fraction of requests as broken JSON (a 400 is the right answer),
--disconnect F closes that fraction of streams after their first chunk; --pid samples the
server's RSS every second. Prints one JSON object.
"""
import argparse
import asyncio
import json
import random
import statistics
import time
import urllib.parse
import urllib.request

import openai

WORDS = (
    "the compiler translates a program into machine code while the kernel schedules processes "
    "and the network carries packets between hosts as the cache stores recent data for the "
    "stack that holds values of every call the queue orders jobs by priority so the system "
    "stays responsive under load"
).split()


def prompt(i, n):
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def health(base):
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=5) as r:
        return json.loads(r.read())


async def malformed(args):
    """POSTs broken JSON over a plain socket (HTTP/1.0); returns the status code."""
    url = urllib.parse.urlsplit(args.base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    body = b'{"prompt": "broken'
    writer.write(f"POST {url.path}/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {args.api_key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def one_request(client, args, i, rng, stats):
    if rng.random() < args.malformed:
        stats["malformed"] += 1
        status = await malformed(args)
        stats["malformed_ok"] += int(status == 400)
        stats["malformed_status"][str(status)] = stats["malformed_status"].get(str(status), 0) + 1
        return
    leave = rng.random() < args.disconnect
    t0 = time.perf_counter()
    first = None
    usage = None
    stream = await client.completions.create(
        model="m", prompt=prompt(i, args.prompt_words), max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
            if leave:
                await stream.close()
                stats["disconnected"] += 1
                return
        if chunk.usage:
            usage = chunk.usage
    stats["ok"] += 1
    if first is not None:
        stats["ttft"].append(first)
    if usage:
        stats["completion_tokens"] += usage.completion_tokens
        stats["prompt_tokens"] += usage.prompt_tokens


async def client_loop(c, args, stats, deadline):
    rng = random.Random(c)
    client = openai.AsyncOpenAI(base_url=args.base, api_key=args.api_key, max_retries=0, timeout=600)
    k = 0
    while (deadline is None and k < args.requests) or (deadline is not None and time.time() < deadline):
        try:
            await one_request(client, args, c * 1000 + k, rng, stats)
        except Exception as e:  # a failed request is counted, the client goes on
            stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
        k += 1


async def sample_rss(pid, out, stop):
    while not stop.is_set():
        out.append(rss_kib(pid))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--malformed", type=float, default=0.0)
    ap.add_argument("--disconnect", type=float, default=0.0)
    ap.add_argument("--pid", type=int)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    stats = {"ok": 0, "malformed": 0, "malformed_ok": 0, "malformed_status": {}, "disconnected": 0, "errors": [],
             "ttft": [], "completion_tokens": 0, "prompt_tokens": 0}
    rss, stop = [], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(args.pid, rss, stop)) if args.pid else None
    deadline = time.time() + args.duration if args.duration else None
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c, args, stats, deadline) for c in range(args.clients)))
    wall = time.perf_counter() - t0
    stop.set()
    if sampler:
        await sampler
    ttft = sorted(stats.pop("ttft"))
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None
    res = dict(stats, clients=args.clients, wall_s=round(wall, 2),
               completion_tok_per_s=round(stats["completion_tokens"] / wall, 2),
               ttft_p50_s=pct(0.50), ttft_p99_s=pct(0.99), ttft_mean_s=statistics.mean(ttft) if ttft else None,
               errors=stats["errors"][:5], error_count=len(stats["errors"]))
    if rss:
        vals = [r for r in rss if r]
        # RSS after warm-up (the first tenth) against its end: "flat" means the end is not higher.
        warm = vals[max(0, len(vals) // 10):] or vals
        res.update(rss_kib_start=warm[0], rss_kib_end=vals[-1], rss_kib_max=max(vals))
    try:
        res["health_after"] = health(args.base)
    except Exception as e:  # llama-server's /health has other fields; tern's has the KV count
        res["health_after"] = str(e)
    print(json.dumps(res))


asyncio.run(main())
