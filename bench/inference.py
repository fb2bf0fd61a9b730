"""Inference benchmark: the inference server's batched multi-adapter decoding against serving the
same requests one at a time with peft.

    python -m bench.inference                                  # 40m model, 8 requests, 4 adapters
    python -m bench.inference --size 5m --max-tokens 32        # quick look

In one invocation, on a temporary data directory (every process started here is stopped here):

1. adapters: random LoRA weights (r 8, alpha 16, q_proj + v_proj, ``bench.common.LORA``) saved
   by peft, packed as the worker packs a finished job (``adapter.tar.gz`` with ``manifest.json``)
   into local object storage;
2. ``lorafleet inference`` (the real server process, its own port): a first request loads the base
   model and one adapter; resident memory (and device memory on a GPU) with 1 adapter attached,
   then with 16;
3. **batched**: ``--requests`` concurrent requests over ``--adapters`` adapters (request i uses
   adapter i mod K, prompts differ), all adapters already attached: decode tokens per second,
   wall clock from the first request sent to the last answer;
4. **server, one at a time**: the same requests to the same server, each sent when the previous
   answered (batching off, everything else equal);
5. **peft one at a time** (a subprocess): what a user serving adapters with peft does: the base
   loaded once, then per request ``PeftModel.from_pretrained`` (load the adapter), ``generate``
   (greedy), ``unload``; ratio batched / peft (target >= 3 on the 40m model);
6. time to first token (streamed): an adapter attached already, and one only in storage
   (download, sha256 checks, attach, prefill).

Requests are greedy ``/v1/completions`` with a raw prompt and the same ``max_tokens``: every
contender generates the same tokens (the tests check this equivalence), so tokens/s compare the
same work. The server and the peft subprocess each use all cores, never at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import common

TOKEN = "bench-" + secrets.token_hex(8)
MEMORY_ADAPTERS = 16


# ------------------------------------------------------------------------------ adapters
def make_adapters(base: Path, out: Path, count: int) -> list[Path]:
    """``count`` peft adapters with random weights (so each changes the answers differently)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.training.manifest import write_manifest

    folders = []
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = common.LORA
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    for i in range(count):
        torch.manual_seed(1000 + i)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data.normal_(0, 0.02)
        folder = out / f"adapter-{i}"
        peft_model.save_pretrained(str(folder))
        write_manifest(folder, {"bench": True})
        folders.append(folder)
    return folders


def store_adapter(storage: Any, folder: Path, job_id: str) -> dict[str, str]:
    """Upload as the worker uploads a finished job; the headers a request for it carries."""
    from worker.adapter_files import make_adapter_tarball
    from worker.job_runner import adapter_key

    tarball = folder.parent / f"{folder.name}.tar.gz"
    sha, _ = make_adapter_tarball(folder, tarball)
    key = adapter_key(job_id)
    storage.put_file(key, tarball)
    return {
        "X-Lorafleet-Adapter": job_id,
        "X-Lorafleet-Adapter-Key": key,
        "X-Lorafleet-Adapter-Sha256": sha,
        "X-Lorafleet-Adapter-Layout": "archive",
    }


# ------------------------------------------------------------------------------ the server
def threads_env(threads: int | None) -> dict[str, str]:
    """``--threads``: the same intra-op thread count for every contender (all cores if unset)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def start_server(data: Path, log: Path, threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    from worker.training.launch import free_port

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")},
        "LORAFLEET_DATA_DIR": str(data),
        "LORAFLEET_INFERENCE_API_KEY": TOKEN,
        "LORAFLEET_INFERENCE_MAX_TOKENS": "4096",
        "PYTHONPATH": str(common.REPO),
        **threads_env(threads),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "inference", "--port", str(port)],
            env=env,
            cwd=common.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the inference server exited:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the inference server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def complete(
    url: str, headers: dict[str, str], prompt: str, max_tokens: int
) -> tuple[float, int, str]:
    """One greedy completion: (seconds, completion tokens, text)."""
    body = {"model": "bench-base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = httpx.post(
        url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}", "X-Lorafleet-Base-Model": "bench-base"}
        | headers,
        timeout=600,
    )
    response.raise_for_status()
    answer = response.json()
    return (
        time.perf_counter() - started,
        answer["usage"]["completion_tokens"],
        answer["choices"][0]["text"],
    )


def first_token(url: str, headers: dict[str, str], prompt: str) -> float:
    """Seconds from sending a streamed request to its first text chunk."""
    body = {"model": "bench-base", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body["stream"] = True
    all_headers = {"Authorization": f"Bearer {TOKEN}", "X-Lorafleet-Base-Model": "bench-base"}
    started = time.perf_counter()
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers=all_headers | headers, timeout=600
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                return time.perf_counter() - started
    raise RuntimeError("no token arrived")


def memory(url: str) -> dict[str, int]:
    health = httpx.get(url + "/healthz", timeout=30).json()
    return {k: v for k, v in health.items() if k.endswith("_bytes")}


# ------------------------------------------------------------------------------ peft baseline
def peft_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve the requests one at a time with peft: load adapter, generate, unload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base: Any = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=dtype)
    base = base.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    tokens = 0
    texts = []
    started = time.perf_counter()
    with torch.no_grad():
        for prompt, adapter in spec["requests"]:
            model = PeftModel.from_pretrained(base, adapter).to(device).eval()
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=spec["max_tokens"],
            )
            new = out[0, ids.shape[1] :].tolist()
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
            base = model.unload()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "texts": texts}


def run_peft(
    base: Path, requests: list[tuple[str, str]], max_tokens: int, threads: int | None
) -> dict[str, Any]:
    spec = {"base": str(base), "requests": requests, "max_tokens": max_tokens}
    out = subprocess.run(
        [sys.executable, "-m", "bench.inference", "--child", json.dumps(spec)],
        cwd=common.REPO,
        env={**os.environ, "PYTHONPATH": str(common.REPO), **threads_env(threads)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------ main
def concurrently(
    url: str, cases: list[tuple[dict[str, str], str]], max_tokens: int
) -> tuple[float, int, list[str]]:
    """All ``cases`` at once: (wall seconds, tokens, texts)."""
    results: list[tuple[float, int, str] | None] = [None] * len(cases)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = complete(url, cases[i][0], cases[i][1], max_tokens)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    return wall, sum(r[1] for r in done), [r[2] for r in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="40m", choices=["5m", "40m"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every contender (default: all cores; 1 on a crowded machine, "
        "where OpenMP threads spinning for busy cores cost more than they bring)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peft_child(json.loads(args.child))))
        return

    from shared.storage import LocalStorage

    base = common.model_dir(args.size)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-inference-"))
    proc = None
    try:
        data = work / "data"
        (data / "models").mkdir(parents=True)
        (data / "models" / "bench-base").symlink_to(base, target_is_directory=True)
        count = max(args.adapters, MEMORY_ADAPTERS) + 1  # + one left in storage for TTFT
        print(f"[bench] {count} adapters for {base.name}", file=sys.stderr)
        folders = make_adapters(base, work / "adapters", count)
        storage = LocalStorage(data / "storage")
        headers = [store_adapter(storage, f, f"ftjob-{i:024x}") for i, f in enumerate(folders)]
        adapter_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
        proc, url = start_server(data, work / "inference.log", args.threads)
        print(f"[bench] server {url}", file=sys.stderr)

        prompts = [common._SENTENCES[i % len(common._SENTENCES)] for i in range(args.requests)]
        complete(url, headers[0], prompts[0], 4)  # loads the base model and adapter 0
        one_adapter = memory(url)
        for h in headers[1:MEMORY_ADAPTERS]:
            complete(url, h, prompts[0], 1)
        many_adapters = memory(url)

        cases = [(headers[i % args.adapters], prompts[i]) for i in range(args.requests)]
        batched_wall, batched_tokens, batched_texts = concurrently(url, cases, args.max_tokens)
        started = time.perf_counter()
        serial = [complete(url, h, p, args.max_tokens) for h, p in cases]
        serial_wall = time.perf_counter() - started
        ttft_cached = min(first_token(url, headers[0], prompts[0]) for _ in range(3))
        ttft_storage = first_token(url, headers[-1], prompts[0])
        stop(proc)
        proc = None

        requests = [(p, str(folders[i % args.adapters])) for i, p in enumerate(prompts)]
        peft = run_peft(base, requests, args.max_tokens, args.threads)
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    serial_tokens = sum(r[1] for r in serial)
    rates = {
        "batched": batched_tokens / batched_wall,
        "server one at a time": serial_tokens / serial_wall,
        "peft one at a time": peft["tokens"] / peft["seconds"],
    }
    same = batched_texts == [r[2] for r in serial] == peft["texts"]
    rows = [
        ["batched (server)", f"{batched_tokens}", f"{batched_wall:.2f}", f"{rates['batched']:.1f}"],
        [
            "one at a time (server)",
            f"{serial_tokens}",
            f"{serial_wall:.2f}",
            f"{rates['server one at a time']:.1f}",
        ],
        [
            "one at a time (peft)",
            f"{peft['tokens']}",
            f"{peft['seconds']:.2f}",
            f"{rates['peft one at a time']:.1f}",
        ],
    ]
    print(
        f"\n{args.requests} concurrent greedy requests over {args.adapters} adapters, "
        f"{args.max_tokens} tokens each, model {base.name}, "
        f"{args.threads or os.cpu_count()} thread(s)\n"
    )
    print(common.table(["contender", "tokens", "seconds", "tokens/s"], rows))
    ratio = rates["batched"] / rates["peft one at a time"]
    print(f"\nbatched / peft one at a time: {ratio:.2f}x (target >= 3)")
    print(
        f"batched / server one at a time: {rates['batched'] / rates['server one at a time']:.2f}x"
    )
    print(f"same answers from all three: {same}")
    print(
        f"time to first token: cached adapter {ttft_cached * 1000:.0f} ms, "
        f"adapter from storage {ttft_storage * 1000:.0f} ms"
    )
    key = "device_allocated_bytes" if "device_allocated_bytes" in one_adapter else "rss_bytes"
    growth = many_adapters[key] / one_adapter[key] - 1
    print(
        f"memory ({key}): 1 adapter {one_adapter[key] / 2**20:.1f} MiB, "
        f"{MEMORY_ADAPTERS} adapters {many_adapters[key] / 2**20:.1f} MiB "
        f"(+{100 * growth:.1f}%, target < 5%); one adapter's weights {adapter_bytes / 1024:.0f} KiB"
    )
    path = common.save_results(
        "inference",
        {
            "args": vars(args),
            "machine": common.machine(),
            "versions": common.versions(),
            "tokens_per_second": rates,
            "ratio_batched_vs_peft": ratio,
            "same_answers": same,
            "ttft_seconds": {"cached": ttft_cached, "from_storage": ttft_storage},
            "memory": {"one_adapter": one_adapter, "many_adapters": many_adapters},
            "adapter_bytes": adapter_bytes,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
