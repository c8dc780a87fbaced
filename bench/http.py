"""End-to-end HTTP benchmark at 16 concurrent clients, three ways, in one run:

1. the in-process engine (same prompts, experts and limits, no HTTP, no Ray);
2. the service: Ray Serve ingress + ExpertPool on 127.0.0.1 with the shipped experts and router, driven over
   HTTP by 16 concurrent clients;
3. a plain baseline: a FastAPI app calling transformers `generate` per request with peft `set_adapter`
   (one request at a time, as such a server must serialise adapter switches).

    python -m bench.http [--requests 64] [--clients 16] [--max-tokens 32] [--repeats 3]

Tokens/s counts completion tokens over wall time. The engine and the service (forced expert) run --repeats
times each: one pass is ~20 s, and on this shared machine single passes moved the service/engine ratio
between 0.75 and 0.90 from run to run. Headline figures are each variant's best pass (timeit's convention:
interference only ever slows a pass), medians beside them. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel

from core.device import release_openmp_pool
from core.settings import Settings
from experts.backbone import load_backbone
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.seed import DEFAULT_ADAPTERS_DIR, DEFAULT_DOMAINS, seed_prompts

DOMAINS = sorted(DEFAULT_DOMAINS)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(n: int) -> list[tuple[str, str]]:
    per = {d: seed_prompts(d)[1] for d in DOMAINS}
    return [(DOMAINS[i % 4], per[DOMAINS[i % 4]][i // 4 % len(per[DOMAINS[i % 4]])]) for i in range(n)]


async def drive(url: str, work: list[tuple[str, str]], clients: int, max_tokens: int, model_for) -> tuple[int, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    tokens = 0
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            domain, text = queue.get_nowait()
            response = await http.post(url, json={"model": model_for(domain), "max_tokens": max_tokens,
                                                  "temperature": 0,
                                                  "messages": [{"role": "user", "content": text}]})
            if response.status_code != 200:
                failures += 1
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    assert failures == 0, f"{failures} failed requests"
    return tokens, elapsed


def plain_baseline_app(backbone, bare_model, max_tokens: int) -> FastAPI:
    """`bare_model`: an untouched copy of the backbone (the engine wraps `backbone.model` in place)."""
    model = PeftModel.from_pretrained(bare_model, DEFAULT_ADAPTERS_DIR / DOMAINS[0],
                                      adapter_name=DOMAINS[0])
    for domain in DOMAINS[1:]:
        model.load_adapter(str(DEFAULT_ADAPTERS_DIR / domain), adapter_name=domain)
    model.eval()
    # set_adapter switches global state: one request at a time, all on one thread (one OpenMP pool, as the
    # engine has; a pool per server worker thread would oversubscribe the cores, see core.device)
    worker = ThreadPoolExecutor(max_workers=1)
    app = FastAPI()

    def generate(body: dict) -> int:
        ids = backbone.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)
        with torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False,
                                 pad_token_id=backbone.tokenizer.pad_token_id)
        return int(out.shape[1] - ids["input_ids"].shape[1])

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        tokens = await asyncio.get_running_loop().run_in_executor(worker, generate, body)
        return {"usage": {"completion_tokens": tokens}}

    return app


def main() -> None:
    # long: a benchmark script, one pass after another, read top to bottom
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes of the engine and of the forced service")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    settings = Settings(home=home, port=free_port(), max_batch_size=args.clients)
    backbone = load_backbone(settings)
    work = workload(args.requests)
    report: dict = {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens}

    # 1. in-process engine, same experts
    from experts.adapters import load_lora_weights

    bare_model = copy.deepcopy(backbone.model)  # for the plain baseline, before the engine wraps the layers
    engine = GenerationEngine(backbone, settings).start()
    for domain in DOMAINS:
        engine.add_adapter(load_lora_weights(DEFAULT_ADAPTERS_DIR / domain, domain))
    tok = backbone.tokenizer
    prompts = [(d, tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]) for d, t in work]
    release_openmp_pool()  # adapters were loaded on this thread; the engine thread does the decoding
    engine_passes = []
    for _ in range(args.repeats):
        requests = [GenerationRequest(ids, [(d, 1.0)], SamplingParams(max_tokens=args.max_tokens, temperature=0))
                    for d, ids in prompts]
        started = time.perf_counter()
        results = engine.generate_many(requests)
        engine_passes.append(sum(r.completion_tokens for r in results) / (time.perf_counter() - started))
    engine.stop()
    report["engine_tokens_per_s"] = round(max(engine_passes), 1)
    report["engine_passes"] = [round(x, 1) for x in engine_passes]

    # 3. plain baseline (before Ray, so the two never share the CPU)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(plain_baseline_app(backbone, bare_model, args.max_tokens), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    tokens, elapsed = asyncio.run(drive(f"http://127.0.0.1:{port}/v1/chat/completions", work, args.clients,
                                        args.max_tokens, lambda d: d))
    server.should_exit = True
    thread.join(timeout=10)
    report["plain_baseline_tokens_per_s"] = round(tokens / elapsed, 1)

    # 2. the service over HTTP
    import ray
    from ray import serve

    from api.serve_app import APP_NAME, build_app
    from pipelines.bootstrap import ensure_defaults
    from registry.db import session_factory
    from serving.local_ray import LOCAL_ENV, wait_healthy

    os.environ.update(LOCAL_ENV)
    ensure_defaults(settings, session_factory(settings), backbone)
    del backbone, engine
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{settings.port}"
    wait_healthy(url, 300)
    asyncio.run(drive(url + "/v1/chat/completions", work[:4], 4, 4, lambda d: d))  # warm-up
    service_passes = []
    for _ in range(args.repeats):
        tokens, elapsed = asyncio.run(drive(url + "/v1/chat/completions", work, args.clients, args.max_tokens,
                                            lambda d: d))
        service_passes.append(tokens / elapsed)
    report["service_tokens_per_s"] = round(max(service_passes), 1)
    report["service_passes"] = [round(x, 1) for x in service_passes]
    tokens, elapsed = asyncio.run(drive(url + "/v1/chat/completions", work, args.clients, args.max_tokens,
                                        lambda d: "auto"))
    report["service_auto_tokens_per_s"] = round(tokens / elapsed, 1)
    serve.shutdown()
    ray.shutdown()
    report["ratios"] = {
        "service_vs_engine": round(report["service_tokens_per_s"] / report["engine_tokens_per_s"], 3),
        "service_vs_engine_medians": round(statistics.median(service_passes) / statistics.median(engine_passes), 3),
        "service_vs_plain": round(report["service_tokens_per_s"] / report["plain_baseline_tokens_per_s"], 3),
        "service_auto_vs_plain": round(report["service_auto_tokens_per_s"] / report["plain_baseline_tokens_per_s"], 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
