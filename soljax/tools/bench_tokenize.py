"""``soljax bench tokenize``: throughput of the data pipeline's tokenization on the embedded corpora.

The texts are the seven public-domain novels ``soljax setup`` fetches (:data:`soljax.data.assets.CORPORA`),
the tokenizer is the embedded model's (SmolLM2, a ``tokenizers`` BPE). Each row tokenizes every
text with :func:`soljax.data.blocks.tokenize_texts` (no special tokens, concatenated), taking as
documents either the whole novels or their paragraphs (blank-line separated, the size of typical
web documents), batched as the pipeline does for ``hf:`` sources (:data:`TOKENIZE_BATCH` texts per
call of the batch encoder) or one ``encode`` call per document. Times are the median of
``repeats`` passes, as wall-clock seconds and as CPU seconds of the process (all its threads: the
batch encoder spreads a batch over the cores), which a machine shared with other jobs inflates less.
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


def _time(tokenizer, texts: list[str], batch_size: int, repeats: int) -> tuple[float, float, int]:
    wall, cpu, n = [], [], 0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = len(tokenize_texts(tokenizer, texts, batch_size))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu)), n


def bench_tokenize(repeats: int = 3, batch_size: int = TOKENIZE_BATCH, progress=None) -> dict:
    """``{"cpus", "load", "chars", "rows": [{"documents", "mode", "docs", "tokens", "seconds", "cpu_seconds",
    "tokens_per_s", "tokens_per_cpu_s"}]}`` (``load``: the 1-minute load average at the end)."""
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
            seconds, cpu, n = _time(tok, texts, batch_size, repeats)
            rows.append({"documents": documents, "mode": mode, "docs": len(texts), "tokens": n, "seconds": seconds,
                         "cpu_seconds": cpu, "tokens_per_s": n / seconds, "tokens_per_cpu_s": n / cpu})
    return {"cpus": os.cpu_count(), "load": os.getloadavg()[0], "chars": sum(map(len, novels)), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{'documents':>10} {'mode':>14} {'docs':>7} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} "
             f"{'CPU s':>7} {'tokens/CPU s':>13}"]
    for r in result["rows"]:
        lines.append(f"{r['documents']:>10} {r['mode']:>14} {r['docs']:>7} {r['tokens']:>9} {r['seconds']:>8.2f} "
                     f"{r['tokens_per_s']:>10.0f} {r['cpu_seconds']:>7.2f} {r['tokens_per_cpu_s']:>13.0f}")
    lines.append(f"({result['chars']} characters of text, {result['cpus']} CPUs, load average {result['load']:.1f})")
    return "\n".join(lines)
