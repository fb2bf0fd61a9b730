"""Prepared data: made once per (dataset, tokenizer, settings), shared by ranks and attempts."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from shared.datasets import DatasetError, load_examples
from tests.worker.conftest import write_jsonl
from worker.tiny_models import sample_chat_rows
from worker.training import data, datacache
from worker.training.model import load_tokenizer


def _prepare(model: str, path: str, cache: str, queue: multiprocessing.Queue) -> None:
    tokenizer = load_tokenizer(model)
    prepared = datacache.prepare_rows(
        path, tokenizer, max_seq_length=128, packing=True, cache_dir=Path(cache)
    )
    queue.put((prepared.reused, prepared.key, int(prepared.rows.real_tokens.sum())))


def test_ranks_share_one_preparation(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    """Three processes at once: one prepares, the others wait on the lock and reuse it."""
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_prepare, args=(str(tiny_model), str(chat_file), str(tmp_path), queue))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert sorted(reused for reused, _, _ in results) == [False, True, True]
    assert len({(key, tokens) for _, key, tokens in results}) == 1
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [results[0][1]]  # no temporary folder left behind


def test_cached_rows_equal_fresh_ones_and_key_follows_settings(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    tok = load_tokenizer(str(tiny_model))

    def prepare(**kw: object) -> datacache.PreparedRows:
        settings: dict = {"max_seq_length": 128, "packing": True, "cache_dir": tmp_path, **kw}
        return datacache.prepare_rows(str(chat_file), tok, **settings)

    first = prepare()
    again = prepare()
    assert not first.reused and again.reused and again.key == first.key
    tokenized, stats = data.tokenize_examples(tok, load_examples(str(chat_file)), 128)
    fresh = data.pack(tokenized, 128)
    for name, array in fresh.arrays().items():
        assert np.array_equal(again.rows.arrays()[name], array), name
    assert again.stats == stats
    assert prepare(max_seq_length=64).key != first.key
    assert prepare(packing=False).key != first.key
    other = write_jsonl(tmp_path / "other.jsonl", sample_chat_rows(30, seed=1))
    assert (
        datacache.prepare_rows(
            str(other), tok, max_seq_length=128, packing=True, cache_dir=tmp_path
        ).key
        != first.key
    )
    meta = json.loads((first.folder / "meta.json").read_text())
    assert meta["rows"] == len(fresh) and meta["version"] == datacache.PREP_VERSION


def test_tokenizer_change_changes_the_key(tiny_model: Path, tiny_plain_model: Path) -> None:
    with_template = datacache.tokenizer_fingerprint(load_tokenizer(str(tiny_model)))
    without = datacache.tokenizer_fingerprint(load_tokenizer(str(tiny_plain_model)))
    assert with_template != without
    assert with_template == datacache.tokenizer_fingerprint(load_tokenizer(str(tiny_model)))


def test_invalid_file_caches_nothing(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(DatasetError, match="line 2"):
        datacache.prepare_rows(
            str(bad),
            load_tokenizer(str(tiny_model)),
            max_seq_length=64,
            packing=True,
            cache_dir=tmp_path / "cache",
        )
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_an_empty_row_set_round_trips(tmp_path: Path) -> None:
    """Zero rows (every example without a target) is a valid cache entry: empty files cannot be
    memory-mapped, so they are read plainly; the engine then refuses the job by name."""
    empty = np.zeros(0, dtype=np.int32)
    rows = data.RowSet(empty, empty, empty, np.zeros(1, dtype=np.int64))
    datacache._write(
        tmp_path / "k", rows, {"stats": {"examples": 2, "truncated": 0, "dropped_no_labels": 2}}
    )
    loaded, stats = datacache._load(tmp_path / "k")
    assert len(loaded) == 0 and stats.dropped_no_labels == 2
