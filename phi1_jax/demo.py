"""The main job until the trainer lands: build a random model from a config and run a forward pass.

Command:  python -m phi1_jax.demo --config=configs/tiny.py [--config.model.num_layers=4] [--batch=2] [--seq=32]
Expect:   a few seconds on CPU for configs/tiny.py; prints the parameter count, the logits' shape and statistics,
          and checks that KV-cache decoding reproduces the full forward pass.
"""

import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from phi1_jax import cli
from phi1_jax.model import KVCache, Phi, PhiConfig, count_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config (configs/*.py)")
_BATCH = flags.DEFINE_integer("batch", 2, "batch size of the random input")
_SEQ = flags.DEFINE_integer("seq", 32, "sequence length of the random input")


def main(argv):
    del argv
    config = _CONFIG.value
    cfg = PhiConfig.from_dict(config.model)
    t0 = time.perf_counter()
    model = Phi(cfg, rngs=nnx.Rngs(config.seed))
    print(f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads of {cfg.head_dim}, "
          f"vocab {cfg.vocab_size}: {count_params(model):,} parameters ({time.perf_counter() - t0:.1f}s to init)")

    batch, seq = _BATCH.value, min(_SEQ.value, cfg.max_seq_len)
    ids = jax.random.randint(jax.random.key(config.seed), (batch, seq), 0, cfg.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))
    logits = forward(model, ids)
    print(f"forward pass: input_ids {tuple(ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype}, "
          f"mean {float(logits.mean()):+.4f}, std {float(logits.std()):.4f}")

    half = seq // 2
    cache = KVCache.init(cfg, batch, seq)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    prefix, cache = step(model, ids[:, :half], cache)
    decoded = [prefix]
    for i in range(half, seq):
        out, cache = step(model, ids[:, i:i + 1], cache)
        decoded.append(out)
    err = float(jnp.abs(jnp.concatenate(decoded, axis=1) - logits).max())
    print(f"KV-cache decoding (prefill {half}, then 1 token at a time) vs full forward: max |diff| = {err:.2e}")
    if not err < 1e-3:
        print("error: cached decoding disagrees with the full forward pass", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
