"""From validated examples to training rows: tokenise, mask, truncate, pack, and plan batches.

Decisions recorded here:
- Targets are shifted per example *before* packing, so no example ever predicts the first token of
  the next one; the model gets position_ids that restart at 0 for every example, which transformers
  turns into a block-diagonal causal mask (needs ``use_cache=False``; tested for isolation).
- Chat rows use the tokenizer's chat template when it has one. The answer spans are found by
  rendering growing prefixes of the conversation and tokenising the full text once with offsets,
  so the tokens are exactly those the template gives at inference time.
- Without a template we use a documented plain format (``DEFAULT_CHAT_FORMAT``).
- The batch plan is a pure function of (rows, seed, epoch, step): every rank can compute every
  rank's slice and the global token count of a step without communication, and a resumed run
  sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.datasets import Example

IGNORE = -100

DEFAULT_CHAT_FORMAT = (
    "Without a chat template each message renders as '<Role>: <content>' followed by a blank "
    "line ('System', 'User', 'Assistant', 'Tool'); an assistant answer ends with the EOS token. "
    "Loss falls on the assistant content and its EOS only."
)
_ROLE_LABEL = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    targets: list[int]  # already shifted: targets[t] is the label for predicting after input t

    @property
    def label_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


@dataclass
class Row:
    """One sequence fed to the model: one example, or several packed ones."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    real_tokens: int  # non-pad tokens

    @property
    def label_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """BOS for models that expect it (Llama); skipped when BOS == EOS (GPT-2) or absent (Qwen2)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or bos == eos:
        return []
    return [int(bos)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _segments_to_ids(
    tokenizer: Any, segments: Sequence[tuple[str, bool]], *, eos_after_trained: bool
) -> tuple[list[int], list[bool]]:
    """Tokenise pieces separately; trained pieces are followed by EOS (the model learns to stop)."""
    ids = _bos_prefix(tokenizer)
    mask = [False] * len(ids)
    eos = tokenizer.eos_token_id
    for text, trained in segments:
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [trained] * len(piece)
        if trained and eos_after_trained and eos is not None:
            ids.append(int(eos))
            mask.append(True)
    return ids, mask


def _default_chat_segments(example: Example) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for i, message in enumerate(example.messages):
        label = _ROLE_LABEL.get(message.role, message.role.title())
        sep = "\n\n" if i else ""
        if message.role == "assistant":
            segments.append((f"{sep}{label}: ", False))
            segments.append((message.content, message.train))
        else:
            segments.append((f"{sep}{label}: {message.content}", False))
    return segments


def _template_spans(
    tokenizer: Any, messages: list[dict[str, str]], trained: list[bool]
) -> tuple[str, list[tuple[int, int]]] | None:
    """Render with the chat template; return the text and the character spans to train on.

    Returns None when the template does not render conversation prefixes as prefixes of the whole
    (some templates rewrite earlier turns); the caller then falls back to locating the contents.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, train in enumerate(trained):
        if not train:
            continue
        prompt = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            return None
        end = len(upto)
        # Trailing whitespace after the end-of-turn marker is formatting, not the answer.
        while end > len(prompt) and upto[end - 1] in "\n ":
            end -= 1
        spans.append((len(prompt), end))
    return full, spans


def _content_spans(
    full: str, messages: list[dict[str, str]], trained: list[bool]
) -> list[tuple[int, int]]:
    spans = []
    cursor = 0
    for message, train in zip(messages, trained, strict=True):
        at = full.find(message["content"], cursor)
        if at < 0:
            continue
        cursor = at + len(message["content"])
        if train:
            spans.append((at, cursor))
    return spans


def _chat_template_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[bool]]:
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    trained = [m.train for m in example.messages]
    try:
        rendered = _template_spans(tokenizer, messages, trained)
    except Exception:  # templates may refuse prefixes (e.g. demand a final user turn)
        rendered = None
    if rendered is None:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = _content_spans(full, messages, trained)
    else:
        full, spans = rendered
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for start, end in enc["offset_mapping"]:
        inside = any(s <= start < e or (start == end and s < start <= e) for s, e in spans)
        mask.append(inside and end > start)
    return ids, mask


def tokenize_example(
    tokenizer: Any, example: Example, max_seq_length: int
) -> tuple[TokenizedExample, bool]:
    """Token ids and shifted targets of one example; the bool says whether it was truncated."""
    if example.format == "chat" and getattr(tokenizer, "chat_template", None):
        ids, mask = _chat_template_ids(tokenizer, example)
    elif example.format == "chat":
        ids, mask = _segments_to_ids(
            tokenizer, _default_chat_segments(example), eos_after_trained=True
        )
    else:
        ids, mask = _segments_to_ids(tokenizer, example.segments, eos_after_trained=True)
    truncated = len(ids) > max_seq_length
    if truncated and not any(mask[1:max_seq_length]):
        # Cutting the tail would leave nothing to learn (a long prompt): keep the end instead.
        ids, mask = ids[-max_seq_length:], mask[-max_seq_length:]
    else:
        ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    targets = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return TokenizedExample(ids, targets), truncated


def tokenize_all(
    tokenizer: Any, examples: Sequence[Example], max_seq_length: int
) -> tuple[list[TokenizedExample], TokenizeStats]:
    stats = TokenizeStats()
    out = []
    for example in examples:
        tokenized, truncated = tokenize_example(tokenizer, example, max_seq_length)
        stats.examples += 1
        stats.truncated += int(truncated)
        if tokenized.label_tokens == 0:
            stats.dropped_no_labels += 1
            continue
        stats.tokens += len(tokenized.input_ids)
        stats.label_tokens += tokenized.label_tokens
        out.append(tokenized)
    return out, stats


def pack(examples: Sequence[TokenizedExample], capacity: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing bin packing without splitting examples; pads each row to capacity.

    Padding is its own pseudo-document (positions restart) with ignored targets.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        length = len(examples[index].input_ids)
        for b, space in enumerate(free):
            if space >= length:
                bins[b].append(index)
                free[b] -= length
                break
        else:
            bins.append([index])
            free.append(capacity - length)
    rows = []
    for members in bins:
        ids: list[int] = []
        targets: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            ids += example.input_ids
            targets += example.targets
            positions += list(range(len(example.input_ids)))
        real = len(ids)
        pad = capacity - real
        ids += [pad_id] * pad
        targets += [IGNORE] * pad
        positions += list(range(pad))
        rows.append(Row(ids, targets, positions, real))
    return rows


def unpacked_rows(examples: Sequence[TokenizedExample]) -> list[Row]:
    return [
        Row(list(e.input_ids), list(e.targets), list(range(len(e.input_ids))), len(e.input_ids))
        for e in examples
    ]


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each (step, micro-step, rank) trains on. Pure, so resume is step-exact."""

    num_rows: int
    batch_size: int
    world_size: int
    accumulation: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / self.global_batch))

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def step_rows(self, step: int) -> list[int]:
        """Global row indices of optimizer step ``step`` (0-based), in micro/rank slice order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = index * self.global_batch
        return order[start : start + self.global_batch]

    def slice_for(self, step: int, micro: int, rank: int) -> list[int]:
        rows = self.step_rows(step)
        start = (micro * self.world_size + rank) * self.batch_size
        return rows[start : start + self.batch_size]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def total_steps(plan: BatchPlan, epochs: int, max_steps: int | None) -> int:
    """``max_steps`` wins; otherwise whole epochs (no hidden cap)."""
    return max_steps if max_steps is not None else epochs * plan.steps_per_epoch
