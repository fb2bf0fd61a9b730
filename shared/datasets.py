"""JSONL dataset parsing and validation, shared by the upload route and the training engine.

Pure Python (no torch) so the API can refuse a bad file at upload time with the same rules the
engine applies later. Every error names the 1-based line and what is wrong with it.

Formats, one JSON object a line (the file's first line decides; every line must agree):
- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
  "weight": 0|1?}, ...]}``; loss on assistant messages (``weight: 0`` skips one).
- completion: ``{"prompt": str, "completion": str}``; loss on the completion.
- alpaca: ``{"instruction": str, "input": str?, "output": str}``; loss on the output.
- text: ``{"text": str}``; loss on every token.
- preference (DPO pairs), two spellings, one format:
  OpenAI's ``{"input": {"messages": [...]}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]}``, and TRL's ``{"prompt", "chosen", "rejected"}``
  with plain strings (``prompt`` may be empty) or message lists (``prompt`` may be left out:
  the messages ``chosen`` and ``rejected`` begin with in common are the prompt, as TRL's implicit
  prompt). A pair is two ordinary examples sharing a prompt, ``chosen`` and ``rejected``: chat
  examples for messages, completion examples for strings, rendered and masked like any other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

Format = Literal["chat", "completion", "alpaca", "text", "preference"]
FORMATS: tuple[Format, ...] = ("chat", "completion", "alpaca", "text", "preference")
# The format of pairs for preference tuning (DPO); every other format is for supervised training.
PREFERENCE: Format = "preference"
ROLES = ("system", "user", "assistant", "tool", "developer")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class DatasetError(ValueError):
    """A dataset problem; ``line`` is 1-based (0 when it concerns the whole file)."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.problem = message
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool


@dataclass(frozen=True)
class Example:
    """One normalised training example.

    ``messages`` is set for chat rows; otherwise ``segments`` holds (text, trained) pieces in order.
    A preference row holds neither: ``chosen`` and ``rejected`` are the two answers, each a whole
    chat or completion example with the shared prompt untrained.
    """

    format: Format
    messages: tuple[Message, ...] = ()
    segments: tuple[tuple[str, bool], ...] = ()
    chosen: Example | None = None
    rejected: Example | None = None

    def pair(self) -> tuple[Example, Example]:
        """(chosen, rejected) of a preference row."""
        if self.chosen is None or self.rejected is None:
            raise ValueError(f"a {self.format} row is not a preference pair")
        return self.chosen, self.rejected


@dataclass
class DatasetSummary:
    """What the upload route stores about a validated file."""

    format: Format
    rows: int
    bytes: int
    sha256: str
    examples_preview: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    max_rows: int = 1_000_000
    max_line_bytes: int = 4 * 1024 * 1024
    max_bytes: int = 1 << 40


def detect_format(obj: dict[str, Any]) -> Format | None:
    """The format a row's keys announce, or None."""
    if any(key in obj for key in _PREFERENCE_KEYS):
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


_PREFERENCE_KEYS = ("preferred_output", "non_preferred_output", "chosen", "rejected")


def _text_content(value: Any, where: str) -> str:
    """OpenAI allows content as a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"{where}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: a text part needs a string 'text'")
            parts.append(text)
        return "".join(parts)
    raise ValueError(f"{where} must be a string")


def _require_str(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def parse_row(obj: Any, expected: Format | None = None) -> Example:
    """Validate one decoded JSON value; raises ValueError describing the problem (no line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    fmt = detect_format(obj)
    if fmt is None:
        raise ValueError(
            "unknown row format: expected 'messages', 'prompt'+'completion', "
            "'instruction'+'output', 'text', or a preference pair ('input'+'preferred_output'"
            "+'non_preferred_output', or 'prompt'+'chosen'+'rejected')"
        )
    if expected is not None and fmt != expected:
        raise ValueError(f"row is {fmt} but the file is {expected} (line 1 decides)")
    if fmt == "chat":
        return _parse_chat(obj)
    if fmt == "preference":
        return _parse_preference(obj)
    if fmt == "completion":
        prompt = _require_str(obj, "prompt", allow_empty=True)
        completion = _require_str(obj, "completion")
        return Example("completion", segments=((prompt, False), (completion, True)))
    if fmt == "alpaca":
        instruction = _require_str(obj, "instruction")
        extra = obj.get("input", "")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        output = _require_str(obj, "output")
        template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
        prompt = template.format(instruction=instruction, input=extra)
        return Example("alpaca", segments=((prompt, False), (output, True)))
    text = _require_str(obj, "text")
    return Example("text", segments=((text, True),))


def _parse_messages(raw: Any, where: str, *, trained: bool = True) -> list[Message]:
    """Validate a list of messages; ``trained`` False marks none of them for the loss (a prompt).

    ``where`` names the list in errors (``messages``, ``input.messages``, ``chosen``...)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'{where}' must be a non-empty list")
    messages = []
    for i, msg in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{at} must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content_value = msg.get("content")
        if content_value is None and role == "assistant":
            raise ValueError(f"{at}.content is missing (tool calls are not supported)")
        content = _text_content(content_value, f"{at}.content")
        weight = msg.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"{at}.weight must be 0 or 1")
        messages.append(Message(role, content, trained and role == "assistant" and weight == 1))
    return messages


def _parse_chat(obj: dict[str, Any]) -> Example:
    messages = _parse_messages(obj["messages"], "messages")
    if not any(m.train and m.content.strip() for m in messages):
        raise ValueError("no assistant message with content to train on")
    return Example("chat", messages=tuple(messages))


def _answer_messages(raw: Any, where: str, *, single: bool) -> list[Message]:
    """One side of a pair as messages: ``single`` (OpenAI) wants exactly one assistant message."""
    messages = _parse_messages(raw, where)
    if single and (len(messages) != 1 or messages[0].role != "assistant"):
        raise ValueError(f"'{where}' must be a list of exactly one assistant message")
    if not any(m.train and m.content.strip() for m in messages):
        raise ValueError(f"'{where}' has no assistant message with content to train on")
    return messages


def _chat_pair(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> Example:
    return Example(
        "preference",
        chosen=Example("chat", messages=tuple(prompt + chosen)),
        rejected=Example("chat", messages=tuple(prompt + rejected)),
    )


def _parse_preference(obj: dict[str, Any]) -> Example:
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return _parse_openai_preference(obj)
    return _parse_trl_preference(obj)


def _parse_openai_preference(obj: dict[str, Any]) -> Example:
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise ValueError(
                f"'{key}' is missing: a preference row has 'input' ({{'messages': [...]}}), "
                "'preferred_output' and 'non_preferred_output'"
            )
    source = obj["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise ValueError("'input' must be an object with 'messages'")
    prompt = _parse_messages(source["messages"], "input.messages", trained=False)
    chosen = _answer_messages(obj["preferred_output"], "preferred_output", single=True)
    rejected = _answer_messages(obj["non_preferred_output"], "non_preferred_output", single=True)
    return _chat_pair(prompt, chosen, rejected)


def _parse_trl_preference(obj: dict[str, Any]) -> Example:
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"'{key}' is missing: a preference row has 'chosen' and 'rejected'")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(
                "'prompt' must be a string when 'chosen' and 'rejected' are strings"
                if "prompt" in obj
                else "'prompt' is missing (a string; it may be empty)"
            )
        sides: list[Example] = []
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise ValueError(f"'{key}' must be a string like 'prompt' (or every one a list)")
            if not value.strip():
                raise ValueError(f"'{key}' is empty")
            sides.append(Example("completion", segments=((prompt, False), (value, True))))
        return Example("preference", chosen=sides[0], rejected=sides[1])
    if "prompt" in obj:
        prompt_raw = obj["prompt"]
        if isinstance(prompt_raw, str):
            raise ValueError("'prompt' must be a list of messages like 'chosen' and 'rejected'")
        prompt = _parse_messages(prompt_raw, "prompt", trained=False)
        return _chat_pair(
            prompt,
            _answer_messages(chosen, "chosen", single=False),
            _answer_messages(rejected, "rejected", single=False),
        )
    # TRL's implicit prompt: what both conversations begin with.
    chosen_all = _parse_messages(chosen, "chosen")
    rejected_all = _parse_messages(rejected, "rejected")
    shared = 0
    for a, b in zip(chosen_all, rejected_all, strict=False):
        if (a.role, a.content) != (b.role, b.content):
            break
        shared += 1
    prompt = [Message(m.role, m.content, False) for m in chosen_all[:shared]]
    answers: list[list[Message]] = []
    for key, rest in (("chosen", chosen_all[shared:]), ("rejected", rejected_all[shared:])):
        if not any(m.train and m.content.strip() for m in rest):
            raise ValueError(
                f"'{key}' has no assistant message with content after the messages both "
                "answers share (give 'prompt' explicitly, or make the answers differ)"
            )
        answers.append(rest)
    return _chat_pair(prompt, answers[0], answers[1])


def iter_lines(stream: IO[bytes], limits: Limits) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line) of non-blank lines, enforcing byte limits while reading.

    Reads in bounded chunks so a hostile single 50 MB line is refused without being held whole.
    """
    number = 0
    total = 0
    buffer = b""
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_bytes:
            raise DatasetError(0, f"file is larger than the limit of {limits.max_bytes} bytes")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            number += 1
            if len(line) > limits.max_line_bytes:
                raise DatasetError(number, f"line longer than {limits.max_line_bytes} bytes")
            if line.strip():
                yield number, line
        if len(buffer) > limits.max_line_bytes:
            raise DatasetError(number + 1, f"line longer than {limits.max_line_bytes} bytes")
    if buffer.strip():
        yield number + 1, buffer


def decode_line(number: int, raw: bytes) -> Any:
    """Decode one raw line to JSON, with errors that name the line."""
    if b"\x00" in raw:
        raise DatasetError(number, "contains a NUL byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(number, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        # "[[[[...]]]]" a few thousand deep exhausts the decoder's stack: a hostile line, not a
        # server fault.
        raise DatasetError(number, "invalid JSON: nested too deeply") from None
    # Escapes can smuggle in what the raw-byte checks above refuse: "\u0000" (NUL) and lone
    # surrogates ("\ud800"), which no tokenizer can encode. Only lines with escapes need the walk.
    if "\\u" in text:
        problem = _unencodable(value)
        if problem:
            raise DatasetError(number, problem)
    return value


def _unencodable(value: Any) -> str | None:
    """Why a decoded value holds text no tokenizer or database can take, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "contains a NUL character (\\u0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "contains a lone UTF-16 surrogate escape (e.g. \\ud800): not valid text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def iter_examples(stream: IO[bytes], limits: Limits | None = None) -> Iterator[Example]:
    """Parse and validate a JSONL stream, yielding examples; raises DatasetError on the first bad
    line."""
    limits = limits or Limits()
    fmt: Format | None = None
    rows = 0
    for number, raw in iter_lines(stream, limits):
        obj = decode_line(number, raw)
        try:
            example = parse_row(obj, fmt)
        except ValueError as exc:
            raise DatasetError(number, str(exc)) from None
        fmt = example.format
        rows += 1
        if rows > limits.max_rows:
            raise DatasetError(number, f"more than the limit of {limits.max_rows} rows")
        yield example
    if rows == 0:
        raise DatasetError(0, "the file holds no rows (empty dataset)")


class _HashingReader:
    """Wraps a binary stream, hashing and counting what is read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def summarize(stream: IO[bytes], limits: Limits | None = None) -> DatasetSummary:
    """Validate a whole stream and return rows, format, size and sha256 in one pass."""
    reader = _HashingReader(stream)
    rows = 0
    fmt: Format = "text"
    for example in iter_examples(reader, limits):  # type: ignore[arg-type]
        rows += 1
        fmt = example.format
    return DatasetSummary(
        format=fmt, rows=rows, bytes=reader.bytes, sha256=reader.sha256.hexdigest()
    )


def load_examples(path: str, limits: Limits | None = None) -> list[Example]:
    """Read a whole local JSONL file (engine side)."""
    with open(path, "rb") as stream:
        return list(iter_examples(stream, limits))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def examples_from_objects(objs: Iterable[Any]) -> list[Example]:
    """Validate in-memory rows (tests, tooling); line numbers count from 1."""
    fmt: Format | None = None
    out = []
    for number, obj in enumerate(objs, start=1):
        try:
            example = parse_row(obj, fmt)
        except ValueError as exc:
            raise DatasetError(number, str(exc)) from None
        fmt = example.format
        out.append(example)
    return out
