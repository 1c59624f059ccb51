"""Text of the pieces of one response, such that the pieces concatenate to the response's text.

Decoding each segment alone loses what the tokenizer only renders in context: a SentencePiece
(Metaspace) tokenizer drops the leading space of a piece (`11isprime.Ithasnodivisors.` for
`11 is prime. It has no divisors.`), and a byte-level one splits a multi-byte character into
replacement characters. Decoding growing prefixes and taking differences keeps both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def segment_texts(tokenizer: Any, ids: Sequence[int], ends: Sequence[int], **decode_kwargs: Any) -> list[str]:
    """The text of `ids[0:ends[0]]`, `ids[ends[0]:ends[1]]`, ... (`ends` exclusive and increasing).

    The pieces concatenate to `tokenizer.decode(ids[:ends[-1]], **decode_kwargs)`. A piece boundary
    inside a character (a byte-level token holding part of it) moves to after that character.
    """
    ids = list(ids)
    ends = list(ends)
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)) or (ends and ends[-1] > len(ids)):
        raise ValueError(f"segment ends must be increasing and at most {len(ids)}, got {ends}")
    if not ends:
        return []
    whole = tokenizer.decode(ids[: ends[-1]], **decode_kwargs)
    cuts = [0]
    for end in ends[:-1]:
        prefix = tokenizer.decode(ids[:end], **decode_kwargs)
        # The longest common prefix: a prefix ending inside a character decodes it as U+FFFD.
        n = 0
        limit = min(len(prefix), len(whole))
        while n < limit and prefix[n] == whole[n]:
            n += 1
        cuts.append(max(n, cuts[-1]))
    cuts.append(len(whole))
    return [whole[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
