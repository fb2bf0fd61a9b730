"""Regenerate ``examples/sample_chat.jsonl``, the demo and test dataset.

    .venv/bin/python examples/make_sample.py [OUT] [--rows N] [--seed S]

The rows come from ``worker.tiny_models.sample_chat_rows`` (deterministic: same N and seed, same
bytes) because the tiny models' tokenizer is trained on the same text; keeping one generator means
the committed file and the tokenizer cannot drift apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.tiny_models import write_sample

DEFAULT_OUT = Path(__file__).resolve().parent / "sample_chat.jsonl"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the file, print its path and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_sample(args.out, n=args.rows, seed=args.seed)
    print(f"{path} ({args.rows} rows, {path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
