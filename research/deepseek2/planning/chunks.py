"""How the attention's work is cut into static pieces: query chunks of the training/prefill attention, head blocks of
the absorbed attention against the latent cache, and the calls of a chunked prefill. Read by the model (``mla.py``,
``deepseek2.py``) and by the memory plan, which counts the buffers a piece holds. Plain Python.
"""
from typing import List, Tuple

__all__ = ["chunk_bounds", "chunk_scores", "head_blocks", "prefill_chunks"]


def chunk_bounds(seq: int, chunk: int) -> List[Tuple[int, int]]:
    """The (start, stop) query rows of each attention chunk of a seq-long sequence (attention_chunk_size; the
    chunk's queries see keys [0, stop)); one chunk when chunk is 0 or >= seq."""
    if not chunk or chunk >= seq:
        return [(0, seq)]
    return [(start, min(start + chunk, seq)) for start in range(0, seq, chunk)]


def chunk_scores(seq: int, chunk: int) -> List[int]:
    """The scores (query rows x keys) each attention chunk of ``chunk_bounds`` computes: (stop - start) x stop."""
    return [(stop - start) * stop for start, stop in chunk_bounds(seq, chunk)]


def head_blocks(heads: int, tokens: int, chunk: int) -> List[Tuple[int, int]]:
    """The (first, stop) heads of each block of the absorbed attention (a prefill chunk or a decode step of
    ``tokens`` tokens against the latent cache): whole heads, about ``chunk`` (head, token) score rows a block
    (attention_chunk_size; at least one head), so a block's scores are (b, heads in it, tokens, cache slots);
    one block when chunk is 0 or covers every head."""
    return chunk_bounds(heads, max(1, chunk // tokens) if chunk else 0)


def prefill_chunks(prompt_length: int, chunk: int, seq_length: int) -> List[Tuple[int, int]]:
    """The (start, end) positions of each call of a chunked prefill: ``chunk`` tokens a call, the last one ending at
    seq_length at the latest (it may then recompute a few cached positions, which rewrites the same entries). A call
    attends over the cache's first ``end`` slots, its own included: its work grows with its position, not with
    seq_length."""
    if not 0 < prompt_length <= seq_length or not 0 < chunk <= seq_length:
        raise ValueError(f"a chunked prefill needs a prompt of 1..seq_length ({seq_length}) tokens and a chunk of "
                         f"1..seq_length tokens (prefill_chunk_size); got prompt {prompt_length}, chunk {chunk}")
    return [(min(start, seq_length - chunk), min(start, seq_length - chunk) + chunk)
            for start in range(0, prompt_length, chunk)]
