"""The decoding engine: base models kept loaded, many adapters on each, requests decoded in batches.

One thread owns torch. Requests arrive from the HTTP handlers (already tokenised, their adapter
already fetched and verified) into a pending list; the engine thread takes the requests of one
base model, up to ``max_batch``, and decodes them as one batch:

- every row names its adapter (the bare base is ``__base__``), so requests for different adapters
  share each forward pass: a batch on one adapter runs peft's ordinary forward, a mixed one the
  gathered LoRA path of ``mixed_lora`` (per layer, each row's A and B gathered from a stack of the
  batch's adapters, two ``bmm``), which gives what peft's ``adapter_names=`` gives, faster;
- prompts are left-padded, positions counted per row, and a KV cache kept for the batch;
- a request arriving while a batch runs joins it at the next step (its prompt is prefilled alone,
  then its cache is left-padded to the batch's length and stacked onto it), so nobody waits for
  the slowest row of the batch before starting; a finished row leaves the batch at once;
- greedy rows take the argmax of the fp32 logits, the very choice of peft's
  ``generate(do_sample=False)``; sampled rows draw from their own seeded generator, so a seed
  repeats whatever else shares the batch.

Base models are loaded with the training engine's own loaders (``worker.training.model``), their
linear weights re-laid out for few-row matmuls on CPU (``decode_layout``), and kept while they
fit ``memory_bytes`` together, least recently used evicted first. Adapters are attached with
peft's ``load_adapter`` (kept up to ``max_adapters`` per base, LRU).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, DynamicCache

from shared.inference_shapes import GenerationParams
from worker.inference.mixed_lora import BASE, Router, install
from worker.training.model import load_base_model, load_tokenizer

log = logging.getLogger("lorafleet.inference")


class EngineError(Exception):
    """A request cannot be decoded (a broken adapter, a model that does not load)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


class Sink:
    """Where a request's output goes; the HTTP layer implements it (called from the engine
    thread, so implementations must be thread-safe).

    ``streaming``: whether the text is wanted as it comes. When not (and the request has no stop
    strings), the engine decodes the text once, at the end, instead of at every step.
    """

    streaming = True

    def delta(self, text: str) -> None:
        raise NotImplementedError

    def finish(self, reason: str, usage: Usage) -> None:
        raise NotImplementedError

    def fail(self, message: str) -> None:
        raise NotImplementedError


@dataclass
class Request:
    """One completion to decode."""

    base_model: str  # the name (a models-dir folder or hub id)
    base_path: str  # where it loads from
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    adapter: str | None = None  # stable adapter id (its cache name) or None for the bare base
    adapter_path: Path | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)


def peft_name(adapter_id: str) -> str:
    """A peft adapter name for an adapter id (module-dict keys allow no dots)."""
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", adapter_id)


@dataclass
class Loaded:
    """A base model in memory, with its tokenizer and attached adapters."""

    name: str
    model: Any  # PreTrainedModel, or a PeftModel once an adapter is attached
    tokenizer: Any
    nbytes: int
    stop_ids: frozenset[int]
    context_length: int | None
    adapters: OrderedDict[str, Path] = field(default_factory=OrderedDict)
    # Which adapter each row of the next forward uses; read by the routed LoRA layers.
    router: Router = field(default_factory=Router)
    active: str | None = None  # the adapter peft's ordinary forward applies

    def route(self, names: list[str]) -> None:
        """Make the next forward apply ``names[i]`` to row ``i``.

        One adapter for every row takes peft's ordinary path (the active adapter, exactly what
        ``PeftModel.generate`` runs); different ones take the gathered mixed-batch path of
        ``mixed_lora``. The rows reach the LoRA layers through the router that the layers'
        installed forwards read, rather than through ``adapter_names=``, for which peft walks
        every module twice per forward.
        """
        if not isinstance(self.model, PeftModel):
            return
        if len(set(names)) == 1 and names[0] != BASE:
            if self.active != names[0]:
                self.model.set_adapter(names[0])
                self.active = names[0]
            self.router.single()
        else:
            self.router.mixed(names, self.model.device)

    def adapters_changed(self) -> None:
        """After an adapter is attached or deleted: route the LoRA layers it created and rebuild
        the mixed-batch stacks."""
        install(self.model, self.router)
        self.router.invalidate()


def decode_layout(model: torch.nn.Module, device: torch.device) -> None:
    """On CPU, store each ``nn.Linear`` weight as the transpose of a contiguous [in, out] tensor
    (the same values, shape and bytes; ``weight`` becomes a strided view).

    ``F.linear(x, w)`` then runs as ``x @ w_t`` on contiguous operands, which MKL's sgemm does
    2.3-2.5x faster for the few rows of a decoding step (8 rows x 512 x 1536: 385 -> 160 us on
    the AVX-512 machine the benchmark ran on; 1 row: 1.0-1.3x; 160 rows, a prefill: 0.8-1.0x).
    A decoding step is mostly these matmuls, so batched decoding gains ~20-25% per step. The
    values are those of the model as loaded; only the summation order inside a dot product may
    differ, as it already does between batch sizes.

    The other parameters are copied too: the loaded ones are views of the safetensors file's
    memory map, which stays mapped (and resident, once read) while any of them is alive; copying
    all of them lets it go, so the process holds the weights once. GPUs: left alone (cuBLAS
    takes either layout at the same speed, and the weights were copied onto the device).
    """
    if device.type != "cpu":
        return
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if type(module) is torch.nn.Linear and param is module.weight:
                param.data = param.data.t().contiguous().t()
            else:
                param.data = param.data.clone()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU; fp32 on CPU (bf16 is 20x slower than fp32 on AVX2-only CPUs, and
    greedy answers compared with peft's reference are only exact in fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)  # type: ignore[no-any-return]


def default_memory_bytes(device: torch.device) -> int:
    """Half the RAM on CPU (the rest is the KV cache, activations and the OS); 80% of a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    from worker.host_memory import host_memory_bytes

    return int((host_memory_bytes() or 8 * 1024**3) * 0.5)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end an answer: the generation config's EOS (a list for chat models whose
    turns end with their own marker) and the tokenizer's EOS; what ``generate`` stops at."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(int(i) for i in ids)


class _Row:
    """A request being decoded: its tokens so far and the text already sent."""

    def __init__(self, request: Request, loaded: Loaded, max_new: int) -> None:
        self.request = request
        self.loaded = loaded
        self.max_new = max_new
        self.adapter_name = peft_name(request.adapter) if request.adapter else BASE
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.done = False
        self.generator: torch.Generator | None = None
        self.longest_stop = max((len(s) for s in request.params.stop), default=0)

    def finish(self, reason: str) -> None:
        self.done = True
        usage = Usage(len(self.request.prompt_ids), len(self.tokens))
        self.request.sink.finish(reason, usage)

    def take(self, token: int) -> None:
        """Account for one generated token: send new text, decide whether the row ends."""
        if self.request.cancelled.is_set():
            self.done = True
            return
        self.tokens.append(token)
        if token in self.loaded.stop_ids:
            self._flush()
            self.finish("stop")
            return
        stops = self.request.params.stop
        if not (self.request.sink.streaming or stops):  # the text is decoded once, at the end
            if len(self.tokens) >= self.max_new:
                self._flush()
                self.finish("length")
            return
        text = self.loaded.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if stops:
            start = max(0, self.sent - self.longest_stop)
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > self.sent:
                    self.request.sink.delta(text[self.sent : cut])
                self.sent = cut
                self.finish("stop")
                return
        end = len(text)
        if end and text[-1] == "\ufffd":  # a multi-byte character still incomplete
            end = len(text.rstrip("\ufffd"))
        end = min(end, _safe_end(text, stops))
        if end > self.sent:
            self.request.sink.delta(text[self.sent : end])
            self.sent = end
        if len(self.tokens) >= self.max_new:
            self._flush()
            self.finish("length")

    def _flush(self) -> None:
        """Send what was held back (for a stop string that never came, or a partial character)."""
        text = self.loaded.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.request.sink.delta(text[self.sent :])
            self.sent = len(text)


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent: all but a tail that may be the start of a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return len(text) - k
    return len(text)


class _Batch:
    """The rows being decoded together, with their KV cache and attention mask."""

    def __init__(self, loaded: Loaded, device: torch.device) -> None:
        self.loaded = loaded
        self.device = device
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cached positions]
        self.positions: torch.Tensor | None = None  # [rows, 1]: the last position of each row
        self.logits: torch.Tensor | None = None  # [rows, vocab]: next-token logits

    def _route(self, rows: list[_Row]) -> None:
        self.loaded.route([r.adapter_name for r in rows])

    def prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts of ``rows`` (left-padded): their cache, mask, positions, logits."""
        width = max(len(r.request.prompt_ids) for r in rows)
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.loaded.model.config)
        self._route(rows)
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, positions[:, -1:], out.logits[:, -1].float()

    def admit(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` and add them to the batch."""
        cache, mask, positions, logits = self.prefill(rows)
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.positions, self.logits = positions, logits
            return
        assert self.mask is not None and self.positions is not None and self.logits is not None
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = _stack_caches(self.cache, self.mask.shape[1], cache, mask.shape[1], width)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    def step(self) -> None:
        """Choose each row's next token, hand it over, drop finished rows, run the next forward."""
        assert self.logits is not None and self.mask is not None and self.positions is not None
        chosen = _choose(self.rows, self.logits)
        for row, token in zip(self.rows, chosen, strict=True):
            row.take(token)
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            self.rows = []
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.positions = self.positions[index]
            chosen = [chosen[i] for i in keep]
            self.rows = [self.rows[i] for i in keep]
        ids = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions + 1
        self._route(self.rows)
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
        )
        self.logits = out.logits[:, -1].float()

    def fail(self, message: str) -> None:
        for row in self.rows:
            if not row.done:
                row.done = True
                row.request.sink.fail(message)
        self.rows = []


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a cache tensor [rows, heads, seq, dim] with zeros to ``width`` positions."""
    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    zeros = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([zeros, t], dim=-2)


def joinable(cache: Any) -> bool:
    """Whether rows can be stacked onto this cache (plain full-attention layers only; sliding
    window or linear-attention layers keep state that left-padding would corrupt)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _stack_caches(old: Any, old_width: int, new: Any, new_width: int, width: int) -> Any:
    for a, b in zip(old.layers, new.layers, strict=True):
        a.keys = torch.cat([_pad_seq(a.keys, width), _pad_seq(b.keys, width)])
        a.values = torch.cat([_pad_seq(a.values, width), _pad_seq(b.values, width)])
    return old


def _choose(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Greedy rows: argmax (as ``generate(do_sample=False)``); sampled rows: temperature, top-p,
    then a draw from the row's own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    chosen: list[int] = []
    for i, row in enumerate(rows):
        params = row.request.params
        if params.greedy:
            chosen.append(int(greedy[i]))
            continue
        if row.generator is None:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8))
            row.generator = torch.Generator(device=logits.device)
            row.generator.manual_seed(seed % 2**64)
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        if params.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            cumulative = ordered.cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (at least the most likely token).
            cut = cumulative - ordered >= params.top_p
            ordered[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        token = torch.multinomial(probs, 1, generator=row.generator)
        chosen.append(int(token.item()))
    return chosen


class Engine:
    """Loaded base models, attached adapters and the decoding thread."""

    def __init__(
        self,
        memory_bytes: int | None = None,
        max_batch: int = 32,
        batch_wait_s: float = 0.01,
        max_adapters: int = 64,
        dtype: str = "auto",
        device: torch.device | None = None,
    ) -> None:
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.memory_bytes = memory_bytes or default_memory_bytes(self.device)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_adapters = max_adapters
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self._models_lock = threading.Lock()  # the heartbeat thread reads what is loaded
        self._tokenizers: dict[str, tuple[Any, int | None]] = {}
        self._tokenizer_lock = threading.Lock()
        self._pending: list[Request] = []
        self._taken: list[Request] = []  # taken from _pending, their adapters not attached yet
        self._wake = threading.Condition()
        self._stopping = False
        self.active_rows = 0
        self.batches = 0  # forward passes run, for tests and the benchmark
        self.max_rows_seen = 0  # the most rows one forward pass carried
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def held(self) -> tuple[list[str], int]:
        """The base models loaded and the number of adapters attached (for the heartbeat)."""
        with self._models_lock:
            loaded = list(self.models.values())
        return [m.name for m in loaded], sum(len(m.adapters) for m in loaded)

    def in_use(self) -> set[Path]:
        """The adapter folders the engine still needs (any thread): those of queued requests, of
        requests being attached, and of attached adapters. The adapter cache never evicts them
        (``AdapterStore(in_use=engine.in_use)``)."""
        with self._wake:
            requests = self._pending + self._taken
        with self._models_lock:
            attached = [path for m in self.models.values() for path in m.adapters.values()]
        return {r.adapter_path for r in requests if r.adapter_path is not None} | set(attached)

    def memory(self) -> dict[str, int]:
        """Resident and peak memory of this process (bytes); the device's when it is a GPU."""
        import psutil

        info = psutil.Process().memory_info()
        out = {"rss_bytes": int(info.rss)}
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        out["peak_rss_bytes"] = int(line.split()[1]) * 1024
        except OSError:
            pass
        if self.device.type == "cuda":
            out["device_allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
            out["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out

    # ------------------------------------------------------------------ request side
    def tokenizer(self, name: str, path: str) -> tuple[Any, int | None]:
        """The base model's tokenizer and context length (loaded once; any thread)."""
        with self._tokenizer_lock:
            found = self._tokenizers.get(name)
            if found is None:
                tokenizer = load_tokenizer(path)
                config = AutoConfig.from_pretrained(path)
                context = getattr(config, "max_position_embeddings", None)
                found = (tokenizer, context if isinstance(context, int) else None)
                self._tokenizers[name] = found
            return found

    def submit(self, request: Request) -> None:
        """Queue a request; its sink hears from the engine thread."""
        with self._wake:
            self._pending.append(request)
            self._wake.notify_all()

    # ------------------------------------------------------------------ engine thread
    def _take(self, base: str | None, room: int) -> list[Request]:
        """Pending requests for ``base`` (the oldest request's base when None), at most ``room``."""
        with self._wake:
            live = [r for r in self._pending if not r.cancelled.is_set()]
            if len(live) < len(self._pending):
                self._pending = live
            if not self._pending or room <= 0:
                return []
            base = base or self._pending[0].base_model
            taken = [r for r in self._pending if r.base_model == base][:room]
            self._pending = [r for r in self._pending if r not in taken]
            self._taken = taken
            return taken

    def _attached(self) -> None:
        """The requests last taken are attached (or failed): ``in_use`` no longer names them."""
        with self._wake:
            self._taken = []

    def _others_waiting(self, base: str) -> bool:
        with self._wake:
            return any(r.base_model != base for r in self._pending)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for request in self._pending:
                        request.sink.fail("the inference server is shutting down")
                    return
            if self.batch_wait_s:  # let requests sent together arrive together
                time.sleep(self.batch_wait_s)
            requests = self._take(None, self.max_batch)
            if requests:
                self._decode(requests)

    def _decode(self, requests: list[Request]) -> None:
        base = requests[0].base_model
        try:
            loaded = self._load(requests[0])
        except Exception as exc:
            log.exception("loading %s failed", base)
            for request in requests:
                request.sink.fail(f"base model {base} could not be loaded: {exc}")
            self._attached()
            return
        batch = _Batch(loaded, self.device)
        incoming = requests
        try:
            while True:
                rows = self._rows(loaded, incoming, batch)
                self._attached()
                if rows:
                    batch.admit(rows)
                if not batch.rows:
                    return
                self.active_rows = len(batch.rows)
                self.max_rows_seen = max(self.max_rows_seen, len(batch.rows))
                self.batches += 1
                batch.step()
                incoming = []
                room = self.max_batch - len(batch.rows)
                # Join a running batch only when no other base model waits (no starvation).
                if batch.rows and joinable(batch.cache) and not self._others_waiting(base):
                    incoming = self._take(base, room)
        except Exception as exc:  # the batch fails, the server carries on
            log.exception("decoding a batch of %s failed", base)
            batch.fail(f"decoding failed: {type(exc).__name__}: {exc}")
            for request in incoming:
                request.sink.fail(f"decoding failed: {type(exc).__name__}: {exc}")
        finally:
            self.active_rows = 0
            self._attached()

    def _rows(self, loaded: Loaded, requests: list[Request], batch: _Batch) -> list[_Row]:
        """Rows for ``requests`` whose adapter attaches (the others fail alone)."""
        rows: list[_Row] = []
        busy = {r.request.adapter for r in batch.rows}
        for request in requests:
            try:
                if request.adapter is not None:
                    self._attach(loaded, request, busy | {r.request.adapter for r in rows})
            except Exception as exc:
                log.exception("attaching adapter %s failed", request.adapter)
                request.sink.fail(f"adapter {request.adapter} could not be loaded: {exc}")
                continue
            room = (loaded.context_length or 1 << 30) - len(request.prompt_ids)
            rows.append(_Row(request, loaded, max(1, min(request.params.max_tokens, room))))
        return rows

    def _load(self, request: Request) -> Loaded:
        """The base model, loaded if needed (evicting the least recently used to fit)."""
        name = request.base_model
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        tokenizer, context = self.tokenizer(name, request.base_path)
        model: Any = load_base_model(request.base_path, self.dtype)
        model = model.to(self.device).eval()
        decode_layout(model, self.device)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
        while self.models and sum(m.nbytes for m in self.models.values()) + nbytes > (
            self.memory_bytes
        ):
            with self._models_lock:
                evicted, _ = self.models.popitem(last=False)
            gc.collect()  # the routed layers make a reference cycle: free the weights now
            log.info("evicting base model %s (memory bound %d bytes)", evicted, self.memory_bytes)
        if nbytes > self.memory_bytes:
            log.warning(
                "base model %s takes %d bytes, above LORAFLEET_INFERENCE_MEMORY_BYTES (%d): "
                "serving it alone",
                name,
                nbytes,
                self.memory_bytes,
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        loaded = Loaded(name, model, tokenizer, nbytes, stop_token_ids(model, tokenizer), context)
        with self._models_lock:
            self.models[name] = loaded
        return loaded

    def _attach(self, loaded: Loaded, request: Request, busy: set[str | None]) -> None:
        """Attach the request's adapter to its base (peft ``load_adapter``), LRU-bounded."""
        assert request.adapter is not None and request.adapter_path is not None
        name = peft_name(request.adapter)
        if request.adapter in loaded.adapters:
            with self._models_lock:
                loaded.adapters.move_to_end(request.adapter)
            return
        while len(loaded.adapters) >= self.max_adapters:
            victim = next((a for a in loaded.adapters if a not in busy), None)
            if victim is None:
                break
            with self._models_lock:  # in_use() reads the attached adapters from other threads
                del loaded.adapters[victim]
            loaded.model.delete_adapter(peft_name(victim))
            loaded.adapters_changed()
            if loaded.active == peft_name(victim):
                loaded.active = None  # peft activated another one: set it again when needed
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(request.adapter_path), adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(
                loaded.model, str(request.adapter_path), adapter_name=name
            )
            loaded.active = name
        loaded.model.eval()
        loaded.adapters_changed()
        with self._models_lock:
            loaded.adapters[request.adapter] = request.adapter_path


def run_until_done(engine: Engine, requests: list[Request], timeout: float = 300) -> None:
    """Submit ``requests`` together and wait until each has finished or failed (tests, bench)."""
    done = threading.Semaphore(0)
    for request in requests:
        request.sink = _Signal(request.sink, done.release)
    for request in requests:
        engine.submit(request)
    deadline = time.monotonic() + timeout
    for _ in requests:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("requests did not finish in time")


class _Signal(Sink):
    def __init__(self, inner: Sink, then: Callable[[], None]) -> None:
        self.inner = inner
        self.then = then
        self.streaming = inner.streaming

    def delta(self, text: str) -> None:
        self.inner.delta(text)

    def finish(self, reason: str, usage: Usage) -> None:
        self.inner.finish(reason, usage)
        self.then()

    def fail(self, message: str) -> None:
        self.inner.fail(message)
        self.then()
