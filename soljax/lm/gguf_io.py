"""Reading GGUF files: model config from metadata, dequantized tensors under HF names, tokenizer.

llama.cpp stores the Q and K projections of ``llama`` models with rows permuted for its RoPE
layout; they are permuted back here so the weights work with rotate-half RoPE.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from soljax.errors import SoljaxError
from soljax.lm.config import LMConfig, RopeScaling
from soljax.lm.keymap import gguf_name_to_hf

_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def open_gguf(path: Path):
    """Opens a GGUF file, turning any parse failure into a one-line :class:`SoljaxError`."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise SoljaxError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises a variety of errors on damaged files
        raise SoljaxError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader) -> LMConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise SoljaxError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise SoljaxError("GGUF files with rope_freqs (llama3 rope scaling) are not supported; "
                          "convert the Hugging Face checkpoint instead")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise SoljaxError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    scaling = RopeScaling()
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(need("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise SoljaxError(f"unsupported GGUF rope scaling type {kind!r} in {arch}.rope.scaling.type "
                          "(supported: none, linear)")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise SoljaxError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens "
                              "(the vocabulary size is unknown)")
        vocab = len(tokens.data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LMConfig(
        arch=_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head interleaving of the rows of a Q or K projection (or bias)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """Maps HF tensor names to dequantized float32 arrays, computed on access a block of rows at a
    time (:meth:`rows`); the file's pages read for a block are released after it, so converting
    never keeps more of the file resident than one block."""

    def __init__(self, reader, cfg: LMConfig):
        self._cfg = cfg
        self._by_hf = {}
        for t in reader.tensors:
            hf = gguf_name_to_hf(t.name)
            if hf is None:
                raise SoljaxError(f"unexpected tensor {t.name!r} in GGUF file")
            self._by_hf[hf] = t
        self._mmap = getattr(reader.data, "_mmap", None)

    def keys(self):
        return self._by_hf.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._by_hf[name].shape))

    def _heads(self, name: str) -> int | None:
        """Heads whose rows llama.cpp interleaved in tensor ``name`` (None: rows as stored)."""
        if self._cfg.arch != "llama":
            return None
        if ".q_proj." in name:
            return self._cfg.num_heads
        return self._cfg.num_kv_heads if ".k_proj." in name else None

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name`` (HF layout), dequantized to float32."""
        from gguf.quants import dequantize

        t, shape = self._by_hf[name], self.shape(name)
        heads = self._heads(name)
        lo, hi = start, stop
        if heads is not None:  # un-interleave whole heads
            per_head = shape[0] // heads
            lo, hi = lo - lo % per_head, -(-hi // per_head) * per_head
        try:
            w = np.asarray(dequantize(t.data[lo:hi], t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise SoljaxError(f"cannot dequantize GGUF tensor {t.name!r}: {e}") from None
        finally:
            self._release()
        w = w.reshape((hi - lo, *shape[1:]))
        if heads is not None:
            w = unpermute_rows(w, (hi - lo) // (shape[0] // heads))
        return w[start - lo: stop - lo]

    def _release(self) -> None:
        """Drops the file pages read so far from this process's memory (they are re-read if needed)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def __getitem__(self, name: str) -> np.ndarray:
        return self.rows(name, 0, self.shape(name)[0])


def tokenizer_json_from_gguf(reader) -> str:
    """Builds a ``tokenizers`` JSON (byte-level BPE) from GGUF tokenizer metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SoljaxError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE "
                          "'gpt2'); convert from a Hugging Face directory with tokenizer.json")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise SoljaxError("GGUF metadata has no tokenizer.ggml.tokens (the tokenizer's vocabulary)")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    control = 3
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])
    return tok.to_str()
