"""Serving: an OpenAI-compatible HTTP server with continuous batching, run as `python -m phi1_jax.serve`.

- `batching`: the engine, the device side: one KV cache of slots, every shape compiled before the first request, continuous batching,
  sampling (phi1_jax.decoding.sample), log-probabilities.
- `api`: the OpenAI API on the engine: completions (echo, logprobs), chat, tokenize; errors as OpenAI-style bodies.
- `server`: Starlette routes, the command line, JAX's persistent compilation cache.
"""
