"""``soljax bench tokenize``: throughput of the data pipeline's tokenization on the embedded corpora.

The texts are the seven public-domain novels ``soljax setup`` fetches (:data:`soljax.data.assets.CORPORA`),
the tokenizer is the embedded model's (SmolLM2, a ``tokenizers`` BPE). Each row tokenizes every
text with :func:`soljax.data.blocks.tokenize_texts` (no special tokens, concatenated), taking as
documents either the whole novels or their paragraphs (blank-line separated, the size of typical
web documents), batched as the pipeline does for ``hf:`` sources (:data:`TOKENIZE_BATCH` texts per
call of the batch encoder) or one ``encode`` call per document. Times are the median of
``repeats`` passes.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np

from soljax.data import assets
from soljax.data.blocks import TOKENIZE_BATCH, read_texts, tokenize_texts


class _OneAtATime:
    """The tokenizer without its batch encoder: the pipeline then encodes each document alone."""

    def __init__(self, tokenizer):
        self.encode, self.fingerprint = tokenizer.encode, tokenizer.fingerprint


def _time(tokenizer, texts: list[str], batch_size: int, repeats: int) -> tuple[float, int]:
    seconds, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(tokenize_texts(tokenizer, texts, batch_size))
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)), n


def bench_tokenize(repeats: int = 3, batch_size: int = TOKENIZE_BATCH, progress=None) -> dict:
    """``{"cpus", "chars", "rows": [{"documents", "mode", "docs", "tokens", "seconds", "tokens_per_s"}]}``."""
    from soljax.data.embedded import ensure_embedded_model
    from soljax.lm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(ensure_embedded_model() / "tokenizer.json")
    novels = [t for name in assets.CORPORA for t in read_texts(name)]
    paragraphs = [p for t in novels for p in re.split(r"\n\s*\n", t) if p.strip()]
    rows = []
    for documents, texts in (("novels", novels), ("paragraphs", paragraphs)):
        for mode, tok in ((f"batch {batch_size}", tokenizer), ("one at a time", _OneAtATime(tokenizer))):
            if progress:
                progress(f"{documents}, {mode}")
            seconds, n = _time(tok, texts, batch_size, repeats)
            rows.append({"documents": documents, "mode": mode, "docs": len(texts), "tokens": n,
                         "seconds": seconds, "tokens_per_s": n / seconds})
    return {"cpus": os.cpu_count(), "chars": sum(map(len, novels)), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{'documents':>10} {'mode':>14} {'docs':>7} {'tokens':>9} {'seconds':>8} {'tokens/s':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['documents']:>10} {r['mode']:>14} {r['docs']:>7} {r['tokens']:>9} {r['seconds']:>8.2f} "
                     f"{r['tokens_per_s']:>10.0f}")
    lines.append(f"({result['chars']} characters of text, {result['cpus']} CPUs)")
    return "\n".join(lines)
