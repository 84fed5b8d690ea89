"""Tests for soljax.data.blocks: sources, tokenization, block cutting, shuffling and the token cache."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from soljax.data import assets
from soljax.data import blocks as data
from soljax.errors import SoljaxError


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte; counts how often it encodes."""

    def __init__(self, fingerprint: str = "bytes-v1"):
        self.fingerprint = fingerprint
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding a short fake text for every corpus ("<name>:" repeated)."""
    root = tmp_path / "cache"
    for name in assets.CORPORA:
        path = assets.text_path(name, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name}:" * 20, encoding="utf-8")
    monkeypatch.setenv("SOLJAX_CACHE_DIR", str(root))
    return root


# ----------------------------------------------------------------------------- blocks


def test_make_blocks_exact_values_and_remainder_dropped():
    blocks = data.make_blocks(np.arange(11), 3)
    assert blocks.dtype == np.int32
    np.testing.assert_array_equal(blocks, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(data.make_blocks(np.arange(4), 4), [[0, 1, 2, 3]])


@pytest.mark.parametrize("block_len", [0, -3, 2.0, True, None])
def test_make_blocks_rejects_bad_block_len(block_len):
    with pytest.raises(SoljaxError, match="block_len"):
        data.make_blocks(np.arange(10), block_len)


def test_make_blocks_needs_one_full_block():
    with pytest.raises(SoljaxError, match="at least one block of 5 tokens.*only 4"):
        data.make_blocks(np.arange(4), 5)
    with pytest.raises(SoljaxError, match="1-D"):
        data.make_blocks(np.zeros((2, 6), np.int32), 3)


def test_shuffle_blocks_is_a_seeded_permutation():
    blocks = data.make_blocks(np.arange(200), 4)  # 50 blocks
    a = data.shuffle_blocks(blocks, 0)
    np.testing.assert_array_equal(a, data.shuffle_blocks(blocks, 0))
    assert not np.array_equal(a, data.shuffle_blocks(blocks, 1))
    assert not np.array_equal(a, blocks)
    np.testing.assert_array_equal(np.sort(a[:, 0]), blocks[:, 0])  # same rows, new order
    np.testing.assert_array_equal(blocks, data.make_blocks(np.arange(200), 4))  # input untouched
    with pytest.raises(SoljaxError, match="seed"):
        data.shuffle_blocks(blocks, -1)


def test_tokenize_texts_concatenates_without_separators():
    ids = data.tokenize_texts(ByteTokenizer(), ["ab", "", "c"])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [97, 98, 99])
    assert data.tokenize_texts(ByteTokenizer(), []).shape == (0,)


# ----------------------------------------------------------------------------- sources


def test_split_and_corpus_names_resolve_to_cached_texts(cache):
    train = data.read_texts("train")
    assert train == [f"{n}:" * 20 for n in data.SPLITS["train"]]
    assert data.read_texts("eval") == ["persuasion:" * 20]
    assert data.read_texts("ood") == ["mobydick:" * 20]
    assert data.read_texts("emma", cache) == ["emma:" * 20]
    assert set(data.SPLITS["train"]) | {"persuasion", "mobydick"} == set(assets.CORPORA)


def test_file_and_directory_sources(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("héllo", encoding="utf-8")
    assert data.read_texts(f) == ["héllo"]
    assert data.read_texts(str(f)) == ["héllo"]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("B", encoding="utf-8")
    (d / "a.txt").write_text("A", encoding="utf-8")
    (d / "skip.md").write_text("no", encoding="utf-8")
    assert data.read_texts(d) == ["A", "B"]


def test_missing_sources_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLJAX_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(SoljaxError, match="persuasion.txt.*fetch_corpora"):
        data.read_texts("eval")
    with pytest.raises(SoljaxError, match="not a split"):
        data.read_texts(tmp_path / "nope.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SoljaxError, match="no .txt files"):
        data.read_texts(tmp_path / "emptydir")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SoljaxError, match="not UTF-8"):
        data.read_texts(bad)


def test_parse_hf_source():
    assert data.parse_hf_source("hf:roneneldan/TinyStories") == (
        "roneneldan/TinyStories", None, "train", "text")
    assert data.parse_hf_source("hf:wikitext:wikitext-2-raw-v1:test") == (
        "wikitext", "wikitext-2-raw-v1", "test", "text")
    assert data.parse_hf_source("hf:ds::validation:story") == ("ds", None, "validation", "story")
    for bad in ("hf:", "hf::cfg", "hf:a:b:c:d:e"):
        with pytest.raises(SoljaxError, match="hf:DATASET"):
            data.parse_hf_source(bad)


def test_hf_source_with_a_fake_datasets_module(monkeypatch):
    seen = []

    def load_dataset(name, config, split, streaming):
        seen.append((name, config, split, streaming))
        return [{"text": "one"}, {"text": "  "}, {"text": "two"}, {"text": "three"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.read_texts("hf:some/ds", max_docs=3) == ["one", "two"]  # 3 rows read, one of them blank
    assert seen == [("some/ds", None, "train", True)]
    with pytest.raises(SoljaxError, match="no field 'story'"):
        data.read_texts("hf:some/ds:::story")


def test_hf_source_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(SoljaxError, match="pip install datasets"):
        data.read_texts("hf:some/ds")

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SoljaxError, match="no network.*local datasets cache"):
        data.read_texts("hf:some/ds")


# ----------------------------------------------------------------------------- load_blocks


def test_load_blocks_cuts_shuffles_and_truncates(cache):
    tok = ByteTokenizer()
    ids = data.tokenize_texts(tok, data.read_texts("eval"))
    plain = data.load_blocks("eval", tok, context_len=5, rollout_len=2)
    assert plain.shape == (len(ids) // 8, 8)
    np.testing.assert_array_equal(plain, data.make_blocks(ids, 8))
    shuffled = data.load_blocks("eval", tok, context_len=5, rollout_len=2, seed=3)
    np.testing.assert_array_equal(shuffled, data.shuffle_blocks(plain, 3))
    first = data.load_blocks("eval", tok, context_len=5, rollout_len=2, seed=3, max_blocks=4)
    np.testing.assert_array_equal(first, shuffled[:4])
    assert len(data.load_blocks("eval", tok, context_len=5, rollout_len=2, max_blocks=10**6)) == len(plain)


@pytest.mark.parametrize("kwargs, word", [
    (dict(context_len=0, rollout_len=2), "context_len"),
    (dict(context_len=4, rollout_len=-1), "rollout_len"),
    (dict(context_len=4.5, rollout_len=2), "context_len"),
    (dict(context_len=4, rollout_len=2, max_blocks=0), "max_blocks"),
    (dict(context_len=4, rollout_len=2, seed=-2), "seed"),
    (dict(context_len=4, rollout_len=2, seed="x"), "seed"),
    (dict(context_len=10**6, rollout_len=2), "at least one block"),
])
def test_load_blocks_validates_arguments(cache, kwargs, word):
    with pytest.raises(SoljaxError, match=word):
        data.load_blocks("eval", ByteTokenizer(), **kwargs)


def test_token_cache_is_reused_and_invalidated(cache):
    tok = ByteTokenizer()
    a = data.load_blocks("train", tok, context_len=3, rollout_len=1)
    assert tok.calls == 5  # one encode per novel
    b = data.load_blocks("train", tok, context_len=7, rollout_len=2, seed=1)
    assert tok.calls == 5  # token ids came from <cache>/tokens
    assert len(list((cache / "tokens").glob("*.npy"))) == 1
    ids = data.tokenize_texts(ByteTokenizer(), data.read_texts("train"))
    np.testing.assert_array_equal(a, data.make_blocks(ids, 5))
    np.testing.assert_array_equal(b, data.shuffle_blocks(data.make_blocks(ids, 10), 1))

    other = ByteTokenizer("other-vocab")
    data.load_blocks("train", other, context_len=3, rollout_len=1)
    assert other.calls == 5  # a different vocabulary is tokenized afresh

    assets.text_path("emma", cache).write_text("changed " * 10, encoding="utf-8")
    data.load_blocks("train", tok, context_len=3, rollout_len=1)
    assert tok.calls == 10  # edited text is tokenized afresh

    for f in (cache / "tokens").glob("*.npy"):
        f.write_bytes(b"garbage")
    again = data.load_blocks("train", tok, context_len=3, rollout_len=1)
    assert tok.calls == 15 and again.shape[1] == 5  # unreadable cache entries are rebuilt


def test_tokenizer_without_fingerprint_is_rejected(cache):
    class NoPrint:
        def encode(self, text):
            return [1, 2, 3]

    with pytest.raises(SoljaxError, match="fingerprint"):
        data.load_blocks("eval", NoPrint(), context_len=1, rollout_len=1)
