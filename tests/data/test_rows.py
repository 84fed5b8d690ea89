"""Tests for soljax.data.rows: the reference's WikiText-2 reading rules on local sources."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tokenizer_json, require
from soljax.data.rows import eval_batches, read_rows, tokenize_rows
from soljax.errors import SoljaxError
from soljax.lm.tokenizer import Tokenizer

TOK = Tokenizer(make_tokenizer_json(97))  # word level: "w1" -> 1 ... "w96" -> 96


def _rows_with_a_marker(n: int = 2100) -> list[str]:
    """``n`` rows: every third one empty or whitespace, the others words w1..w50; from row 2000 on,
    every row is the marker word w90 (which the 2,000-row cap must leave out)."""
    rows = []
    for i in range(n):
        if i >= 2000:
            rows.append("w90\n")
        elif i % 3 == 0:
            rows.append("" if i % 2 else "   \n")
        else:
            rows.append(f"w{1 + i % 50} w{1 + (i * 7) % 50}\n")
    return rows


def test_a_text_file_is_read_as_lines_capped_at_2000_rows_with_empty_rows_skipped(tmp_path):
    rows = _rows_with_a_marker()
    path = tmp_path / "t.txt"
    path.write_text("".join(r if r else "\n" for r in rows))
    got = read_rows(path)
    assert got.rows_read == 2000 and not got.wikitext2 and "text file" in got.description
    want = [r for r in rows[:2000] if r.strip()]
    assert list(got.rows) == want  # in order, line ends kept, empty and whitespace-only rows dropped
    ids = tokenize_rows(TOK, got.rows)
    assert 90 not in ids and len(ids) == 2 * len(want)
    assert read_rows(path, max_rows=2100).rows[-1] == "w90\n"


def test_rows_are_tokenized_one_by_one_without_separators_in_any_batching():
    rows = ["w1 w2", "w3", "w4 w5 w6", "w7", "w8"]
    # "w2" + "w3" would read "w2w3" (unknown) if the rows were joined before tokenizing
    assert tokenize_rows(TOK, rows).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert tokenize_rows(TOK, rows, batch=2).tolist() == tokenize_rows(TOK, rows).tolist()
    assert tokenize_rows(TOK, rows).dtype == np.int32


def test_blocks_are_unshuffled_whole_batches_of_m_t_1_capped_at_7_by_16():
    L = 16 + 8 + 1
    ids = np.arange(130 * L + 7, dtype=np.int32)
    blocks = eval_batches(ids, L, 16, 7)
    assert blocks.shape == (112, L)
    np.testing.assert_array_equal(blocks, ids[:112 * L].reshape(112, L))  # first blocks, in order, no overlap
    short = eval_batches(ids[:40 * L], L, 16, 7)  # 40 blocks: two whole batches, the partial one dropped
    assert short.shape == (32, L) and short[0, 0] == 0 and short[-1, -1] == 32 * L - 1
    with pytest.raises(SoljaxError, match="fewer than one batch of 16"):
        eval_batches(ids[:15 * L], L, 16, 7)


def test_dataset_directories_follow_the_same_rules_and_are_identified(tmp_path):
    datasets = require("datasets")
    rows = _rows_with_a_marker()
    want = [r for r in rows[:2000] if r.strip()]
    wiki = datasets.DatasetInfo(dataset_name="wikitext", config_name="wikitext-2-raw-v1")
    ds = datasets.Dataset.from_dict({"text": rows}, info=wiki, split="validation")
    ds.save_to_disk(str(tmp_path / "saved"))
    got = read_rows(tmp_path / "saved")
    assert got.wikitext2 and got.rows_read == 2000 and list(got.rows) == want
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert read_rows(tmp_path / "dict").rows == got.rows
    with pytest.raises(SoljaxError, match="no 'train' split"):
        read_rows(tmp_path / "dict", split="train")
    other = datasets.Dataset.from_dict({"text": rows[:10]})
    other.save_to_disk(str(tmp_path / "other"))
    assert not read_rows(tmp_path / "other").wikitext2
    # a copy of the hub's data files: the directory of the config, the split's parquet files
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    ds.to_parquet(str(tmp_path / "wikitext-2-raw-v1" / "validation-00000-of-00001.parquet"))
    got = read_rows(tmp_path / "wikitext-2-raw-v1")
    assert got.wikitext2 and list(got.rows) == want
    with pytest.raises(SoljaxError, match="no field 'body'"):
        read_rows(tmp_path / "saved", field="body")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoljaxError, match="neither a text file"):
        read_rows(tmp_path / "empty")


def test_wikitext2_offline_and_other_bad_sources_say_what_to_pass(tmp_path):
    require("datasets")
    with pytest.raises(SoljaxError, match="WikiText-2 validation .* is not available .*pass --data PATH"):
        read_rows(None)  # the tests run with HF_DATASETS_OFFLINE=1 and no local copy
    with pytest.raises(SoljaxError, match="not an existing file or directory"):
        read_rows(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(SoljaxError, match="no non-empty text"):
        read_rows(tmp_path / "blank.txt")
    with pytest.raises(SoljaxError, match="positive integer"):
        read_rows(tmp_path / "blank.txt", max_rows=0)
