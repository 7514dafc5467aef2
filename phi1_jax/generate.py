"""Moved to `phi1_jax.decoding` (issue #23: no two modules share a name). This re-export stays only until the
serving modules import from there; new code imports `phi1_jax.decoding`."""

from phi1_jax.decoding import PROMPT_BUCKET, for_decoding, generate, last_logits, sample  # noqa: F401
