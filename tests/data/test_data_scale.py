"""Data at the paper's scale: the document cap on hf: sources, streaming, batched tokenization, and
the number of updates an epoch gives under the reference's arithmetic (SOL_REFERENCE_SPEC.md
sections 7.5, 7.6 and 8), computed by hand here from a synthetic document stream."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_lm
from soljax.config import TrainConfig
from soljax.data import blocks as data
from soljax.errors import SoljaxError
from soljax.train.trainer import Trainer

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"


class Stream:
    """A fake streamed dataset: row i is ``text(i)``; counts how many rows were pulled."""

    def __init__(self, n_rows: int, text):
        self.n_rows, self.text, self.pulled = n_rows, text, 0
        self.loads = []

    def load_dataset(self, name, config, split, streaming):
        self.loads.append((name, config, split, streaming))
        return self._rows()

    def _rows(self):
        for i in range(self.n_rows):
            self.pulled += 1
            yield {"text": self.text(i)}


class BatchTokenizer:
    """One token per UTF-8 byte; records each batch's size and how many rows the stream had
    delivered when the batch was encoded."""

    fingerprint = "bytes-batch-v1"

    def __init__(self, stream: Stream | None = None):
        self.stream, self.batches, self.pulled_at = stream, [], []

    def encode(self, text):
        raise AssertionError("documents must be encoded in batches")

    def encode_batch(self, texts):
        self.batches.append(len(texts))
        if self.stream is not None:
            self.pulled_at.append(self.stream.pulled)
        return [list(t.encode("utf-8")) for t in texts]


def _install(monkeypatch, stream: Stream) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=stream.load_dataset))


def test_reader_stops_at_the_cap_and_skips_empty_documents(monkeypatch):
    stream = Stream(50, lambda i: ["", "  \n\t", None][i % 3] if i % 5 == 0 else f"doc{i}")
    _install(monkeypatch, stream)
    texts = list(data.iter_hf_texts("hf:org/ds:cfg", max_docs=20))
    # rows 0..19; rows 0, 5, 10, 15 are empty, whitespace or not text
    assert texts == [f"doc{i}" for i in range(20) if i % 5]
    assert stream.pulled == 20  # nothing is read past the cap
    assert stream.loads == [("org/ds", "cfg", "train", True)]  # streamed
    stream.pulled = 0
    assert len(list(data.iter_hf_texts("hf:org/ds:cfg", max_docs=None))) == 40  # no cap: the whole split
    assert stream.pulled == 50
    for bad in (0, -1, 2.5, True):
        with pytest.raises(SoljaxError, match="max_docs"):
            list(data.iter_hf_texts("hf:org/ds", max_docs=bad))


def test_default_cap_is_the_references_million_documents(monkeypatch):
    assert data.HF_MAX_DOCS == 1_000_000
    assert TrainConfig().data_max_docs == 1_000_000
    for path in PAPER.glob("*.yaml"):
        assert TrainConfig.load(path).data_max_docs == 1_000_000, path.name
    stream = Stream(1_000_003, lambda i: "" if i % 4 == 3 else "ab")
    _install(monkeypatch, stream)
    assert sum(1 for _ in data.iter_hf_texts("hf:dolma")) == 750_000  # 1,000,000 rows, a quarter empty
    assert stream.pulled == 1_000_000


def test_config_key_validation():
    assert TrainConfig.load(None, ["data_max_docs=null"]).data_max_docs is None
    assert TrainConfig.load(None, ["data_max_docs=5"]).data_max_docs == 5
    for bad in ("0", "-3", "1.5", "true", "many"):
        with pytest.raises(SoljaxError, match="data_max_docs"):
            TrainConfig.load(None, [f"data_max_docs={bad}"])


def test_streamed_documents_are_tokenized_in_batches_of_512_as_they_arrive(monkeypatch, tmp_path):
    stream = Stream(1300, lambda i: f"d{i % 10}")
    _install(monkeypatch, stream)
    tok = BatchTokenizer(stream)
    ids = data.load_token_ids("hf:org/ds", tok, cache=tmp_path, max_docs=1200)
    assert tok.batches == [512, 512, 176]
    # the stream is consumed batch by batch (one row of look-ahead at most), never read ahead
    assert tok.pulled_at == [512, 1024, 1200]
    want = b"".join(f"d{i % 10}".encode() for i in range(1200))
    np.testing.assert_array_equal(ids, np.frombuffer(want, np.uint8).astype(np.int32))
    assert ids.dtype == np.int32
    # the token cache is keyed by the source and its cap
    again = data.load_token_ids("hf:org/ds", tok, cache=tmp_path, max_docs=1200)
    assert tok.batches == [512, 512, 176] and np.array_equal(again, ids)
    data.load_token_ids("hf:org/ds", tok, cache=tmp_path, max_docs=10)
    assert tok.batches[3:] == [10]


def test_updates_per_epoch_follow_the_reference_arithmetic_for_the_3b_config(monkeypatch, tmp_path):
    """configs/paper/llama3b.yaml (B=4, K=16, T=16, M=512, grad_accum 16, train_fraction 0.2) with
    ``data_max_docs=4000`` on a synthetic stream of 4,010 rows, each 1,000 byte tokens except every
    fourth row, which is empty.

    The reference: the first 4,000 rows -> 3,000 documents -> 3,000,000 tokens -> blocks of
    M + T + 1 = 529 tokens: floor(3,000,000 / 529) = 5671 blocks -> floor(0.2 * 5671 / 4) = 283
    data batches. Each batch gives T * B * K = 1024 advantage entries, so the buffer (2048) fills
    every 2 batches with 128 episodes, split into minibatches of 512 // 16 = 32 episodes: 4 per
    buffer, an optimizer step every 16 minibatches, i.e. every 8 batches -> floor(283 / 8) = 35
    updates (141 full buffers x 4 minibatches = 564 minibatches, // 16 = 35).
    """
    monkeypatch.setenv("SOLJAX_CACHE_DIR", str(tmp_path))  # the token cache starts empty
    stream = Stream(4010, lambda i: "" if i % 4 == 3 else "abcd" * 250)
    _install(monkeypatch, stream)
    cfg = TrainConfig.load(PAPER / "llama3b.yaml", ["data_max_docs=4000"])
    lm_cfg, params = tiny_lm()
    tok = BatchTokenizer()
    tr = Trainer(cfg, lm=(lm_cfg, params, tok))
    assert stream.pulled == 4000
    assert tok.batches == [512] * 5 + [440]
    assert tr.blocks.shape == (5671, 529)
    assert tr.num_batches == 283
    assert (tr.batches_per_buffer, tr.capacity, tr.mb_size, tr.num_minibatches) == (2, 128, 32, 4)
    assert tr.total_updates == 35 == math.floor(283 / 8)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1  # the token ids were cached

