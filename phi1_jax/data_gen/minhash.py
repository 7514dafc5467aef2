"""Shingles, their hash, and MinHash signatures: datasketch's MinHash one record at a time (`minhash`, the
reference) or numpy over many records at once (`signatures`, bit for bit the same); LSH bands and each band's key.

A record's shingles are its token 5-grams (tokens: words and single punctuation marks, lower-cased). `dedup` finds
near-duplicates with these; `NearDuplicateIndex` (in `dedup`) indexes datasketch MinHashes for the generator's online
rejection.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasketch import MinHash

TOKEN = re.compile(r"\w+|[^\w\s]")


def shingles(text: str, n: int = 5) -> set[bytes]:
    toks = TOKEN.findall(text.lower())
    if len(toks) < n:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i:i + n]).encode() for i in range(len(toks) - n + 1)}


# --- the shingle hash ------------------------------------------------------------------------------------------------
#
# A shingle's 32-bit hash (what MinHash permutes) is built from its tokens' hashes: a token's hash is a polynomial in
# its bytes (sum of (byte + 1) * P^k, mod 2^64) through MurmurHash3's 64-bit finaliser, and a shingle chains its
# tokens' hashes (g = fmix64(g * MIX + h)) and keeps the low 32 bits. The same value comes from two places:
# `shingle_hash32`, one shingle's bytes in plain Python (datasketch's `MinHash(hashfunc=...)`, so `minhash` is
# datasketch's own MinHash), and `signatures`, every shingle of many records in a few numpy passes over their bytes.
# datasketch's default hash (sha1 of each shingle) cost one Python call per shingle: two thirds of the dedup's CPU.

_M64 = (1 << 64) - 1
_POLY = 0x100000001B3  # odd, so the polynomial never loses a byte to the modulus
GRAM_MIX = 0x9E3779B97F4A7C15


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD & _M64
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 & _M64
    return x ^ (x >> 33)


def fmix64(x):
    """`_fmix64_int` over a uint64 array."""
    import numpy as np

    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


@functools.lru_cache(maxsize=1 << 16)
def _token_hash(token: bytes) -> int:
    s, p = 0, 1
    for c in token:
        s = (s + (c + 1) * p) & _M64
        p = p * _POLY & _M64
    return _fmix64_int(s)


def shingle_hash32(shingle: bytes) -> int:
    """A shingle's hash from its bytes (tokens joined by single spaces; b"" for a text with no tokens)."""
    g = None
    for token in shingle.split(b" "):
        h = _token_hash(token)
        g = h if g is None else _fmix64_int((g * GRAM_MIX + h) & _M64)
    return g & 0xFFFFFFFF


def minhash(text: str, num_perm: int = 128, n: int = 5) -> MinHash:
    """datasketch's MinHash of the text's shingles, with `shingle_hash32` as its hash function."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1, hashfunc=shingle_hash32)
    m.update_batch(list(shingles(text, n)))
    return m


def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(b, r): datasketch's MinHashLSH parameters for `threshold` (equal weights on false positives and negatives)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def text_key(data: bytes) -> int:
    """A normalised text's key in the exact-text band: 64 bits of blake2b, signed (the other bands' keys are int64)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


_SHINGLES_PER_STEP = 1 << 12  # shingles per numpy step: 2 MB of uint32 at 128 permutations, in L2 (16 MB: 1.5x slower)


_PERMUTATIONS: dict = {}


def datasketch_permutations(num_perm: int):
    """datasketch's own permutations for `num_perm` (seed 1), as two uint32 arrays (a, b)."""
    import numpy as np

    if num_perm not in _PERMUTATIONS:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=1).permutations  # datasketch's own (affine32: uint32 a, b)
        _PERMUTATIONS[num_perm] = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
    return _PERMUTATIONS[num_perm]


def token_hashes(buf):
    """The hash of every token of `buf` (uint8: tokens joined by spaces, any number of them between two tokens), in
    order: `_token_hash` of each, computed over all bytes at once."""
    import numpy as np

    word = buf != 32
    first = word.copy()
    first[1:] &= ~word[:-1]
    starts = np.flatnonzero(first)
    if not len(starts):
        return np.zeros(0, np.uint64)
    s0 = starts[0]  # from the first token on
    word, buf, first, starts = word[s0:], buf[s0:], first[s0:], starts - s0
    at = np.arange(len(buf), dtype=np.int32 if len(buf) < 2**31 else np.int64)
    k = at - np.maximum.accumulate(np.where(first, at, 0))  # each byte's place in its token
    k[~word] = 0
    powers = np.full(int(k.max()) + 1, _POLY, np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers)  # P^0, P^1, ... (uint64 wraps: mod 2^64)
    terms = (buf + np.uint64(1)) * powers[k]
    terms[~word] = 0
    return fmix64(np.add.reduceat(terms, starts))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser over a uint32 array: datasketch's pre-mix of each hash before its permutations."""
    import numpy as np

    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(texts: list[str], num_perm: int = 128, n: int = 5, permutations=None):
    """`minhash(text).hashvalues` for every text at once, bit for bit (tests/test_ray_pipeline.py checks it): the same
    shingles and `shingle_hash32`, datasketch's MurmurHash3 pre-mix and affine32 permutations, but a few numpy passes
    over the bytes of many records instead of a MinHash object per record. Returns (the signatures, a
    [records, num_perm] uint32 array; each record's normalised text as bytes, the exact-text band's key).
    `permutations`: `datasketch_permutations(num_perm)`, given by the driver so that Ray's workers never import datasketch
    (it imports scipy: ~0.5 s more for every worker process a job starts)."""
    import numpy as np

    norms, counts = [], []
    for text in texts:
        toks = TOKEN.findall(text.lower())
        norms.append(" ".join(toks).encode())
        counts.append(len(toks))
    th = token_hashes(np.frombuffer(b" ".join(norms), np.uint8))  # tokens hold no spaces: the joins are exact
    counts = np.asarray(counts, np.int64)
    first = np.zeros(len(texts), np.int64)  # each record's first token
    np.cumsum(counts[:-1], out=first[1:])
    left = np.repeat(first + counts, counts) - np.arange(len(th))  # tokens from each token to its record's end
    # chains[m - 1][i]: the hash of the m tokens from token i (as shingle_hash32 chains them), m = 1..n
    chains, mix = [th], np.uint64(GRAM_MIX)
    for m in range(2, n + 1):
        chains.append(fmix64(chains[-1][:-1] * mix + th[m - 1:]))
    whole = np.flatnonzero(left[:len(chains[-1])] >= n)  # where a whole shingle starts
    per_record = np.maximum(counts - n + 1, 1)
    hv = np.empty(int(per_record.sum()), np.uint64)
    long = counts >= n
    at = np.zeros(len(texts), np.int64)  # each record's first shingle in hv
    np.cumsum(per_record[:-1], out=at[1:])
    hv[np.repeat(long, per_record)] = chains[-1][whole]
    for c in range(0, n):  # a record of c < n tokens: one shingle, all of them (c = 0: the empty token, hash 0)
        short = np.flatnonzero(counts == c)
        if len(short):
            hv[at[short]] = chains[c - 1][first[short]] if c else np.uint64(_fmix64_int(0))
    hv = _fmix32((hv & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    a, b = (np.asarray(x, np.uint32) for x in (permutations or datasketch_permutations(num_perm)))  # uint32: wraps mod 2^32
    offs = np.append(at, len(hv))
    sig = np.empty((len(texts), num_perm), np.uint32)
    d0 = 0
    while d0 < len(texts):  # whole records per step, about _SHINGLES_PER_STEP shingles each
        d1 = max(d0 + 1, int(np.searchsorted(offs, offs[d0] + _SHINGLES_PER_STEP, side="right")) - 1)
        phv = hv[offs[d0]:offs[d1], None] * a + b  # uint32: the wraparound is datasketch's modulo 2^32
        sig[d0:d1] = np.minimum.reduceat(phv, offs[d0:d1] - offs[d0], axis=0)
        d0 = d1
    return sig, norms


def band_keys(sig, b: int, r: int):
    """[records, b] int64: band i's key, its r hash values chained (as shingles chain tokens). Equal keys for equal
    bands; for unequal ones a collision has a chance of ~2^-64 (the exact-text key is a separate column)."""
    import numpy as np

    v = sig[:, :b * r].reshape(len(sig), b, r).astype(np.uint64)
    g, mix = fmix64(v[:, :, 0]), np.uint64(GRAM_MIX)
    for j in range(1, r):
        g = fmix64(g * mix + v[:, :, j])
    return g.view(np.int64)


def bucket_keys(text: str, b: int, r: int, num_perm: int = 128) -> list[int]:
    """The record's b band buckets then its exact-text bucket (b + 1 signed 64-bit keys; key k belongs to band k)."""
    sig, norms = signatures([text], num_perm)
    return [*band_keys(sig, b, r)[0].tolist(), text_key(norms[0])]
