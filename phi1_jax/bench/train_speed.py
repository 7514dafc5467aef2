"""Training throughput (tokens/s, MFU) for any config, side by side with Hugging Face's PyTorch PhiForCausalLM.

Command:  python -m phi1_jax.bench.train_speed --config=configs/tiny.py [--config.model.d_model=256 ...] [--steps=20]
          [--peer=transformers|none] [--json=PATH]
Expect:   a minute or two on CPU for a small shape.

Both sides train the same shape on random token batches (batch `config.batch_size` x `config.seq_len`, no data
pipeline, so the figure is compute only) with AdamW and the config's dropout: ours is the trainer's own jitted step
(phi1_jax.train.build) on the configured mesh; the peer is `transformers.PhiForCausalLM` in fp32 with `torch.optim.AdamW`
(eager attention), on all CPU threads. After warm-up steps, both are timed over the same number of steps. MFU uses the
FLOP formula of docs/flops.md and the device's peak (null where none is known, e.g. CPUs). `--json=PATH` also writes
the figures as one JSON object ({"machine", "shape", "phi1_jax": {tokens_per_s, mfu, loss}, "transformers"}); a run
that runs out of device memory writes {"out_of_memory": true, "error": ...} there and exits 1.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from phi1_jax import cli, data, files
from phi1_jax import flops as flops_lib
from phi1_jax.step import build, init_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config (configs/*.py)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps on each side")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation, allocator warm-up)")
_PEER = flags.DEFINE_enum("peer", "transformers", ["transformers", "none"], "what to run beside phi1_jax")
_JSON = flags.DEFINE_string("json", None, "also write the figures here, as one JSON object")


def random_batch(config, rng):
    """One document per row, every target learned: the batch contract (phi1_jax.data.DEVICE_BATCH), random ids."""
    shape = (config.batch_size, config.seq_len)
    ids = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1), dtype=np.int32)
    values = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones(shape),
              "positions": np.broadcast_to(np.arange(shape[1]), shape), "loss_mask": np.ones(shape)}
    return {k: np.asarray(values[k], dtype) for k, dtype in data.DEVICE_BATCH.items()}


def bench_phi1_jax(config, steps, warmup):
    b = build(config)
    state = b.start(init_params(b, config.seed))
    batch = jax.device_put(random_batch(config, np.random.default_rng(0)), b.shardings(b.batch))
    for _ in range(warmup):
        state, m = b.step_fn(state, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = b.step_fn(state, batch)
    jax.block_until_ready(m["loss"])
    return config.batch_size * config.seq_len * steps / (time.perf_counter() - t0), float(m["loss"])


def bench_transformers(config, steps, warmup):
    import torch
    import transformers

    from phi1_jax.convert import hf_config_dict
    from phi1_jax.model import PhiConfig

    cfg = PhiConfig.from_dict(config.model)
    hf_cfg = transformers.PhiConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")},
                                    attn_implementation="eager")
    torch.manual_seed(config.seed)
    model = transformers.PhiForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.learning_rate, betas=(config.optimizer.b1, config.optimizer.b2),
                            eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay)
    batch = random_batch(config, np.random.default_rng(0))
    inputs, targets = torch.tensor(batch["inputs"], dtype=torch.long), torch.tensor(batch["targets"], dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return config.batch_size * config.seq_len * steps / (time.perf_counter() - t0), float(loss.detach())


def _quiet_library_logs():
    """As the trainer does: library INFO lines (JAX's backend probing, ...) are off unless --verbosity/-v was given,
    so the output is the figures alone."""
    import logging

    from absl import logging as absl_logging

    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "jax", "grain", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv):
    del argv
    _quiet_library_logs()
    config = _CONFIG.value
    device = jax.devices()[0]
    peak = flops_lib.peak_flops(device)
    flops = flops_lib.flops_per_token(config.model, config.seq_len)
    m = config.model
    result = dict(machine=dict(machine=platform.machine(), cores=os.cpu_count(), jax=jax.__version__,
                               devices=jax.device_count(), device_kind=device.device_kind),
                  shape=dict(num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                             vocab_size=m.vocab_size, batch_size=config.batch_size, seq_len=config.seq_len,
                             dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl),
                  steps=_STEPS.value, warmup=_WARMUP.value)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.device_count()} x "
          f"{device.device_kind}")
    print(f"shape: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, mlp {m.mlp_dim}, vocab "
          f"{m.vocab_size}; batch {config.batch_size} x seq {config.seq_len}; dtype {m.dtype}; remat {m.remat}")
    try:
        ours, our_loss = bench_phi1_jax(config, _STEPS.value, _WARMUP.value)
    except Exception as e:  # noqa: BLE001  out of device memory is a finding (gpu_checks' ladder ends there)
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        _write_json(dict(result, out_of_memory=True, error=str(e).splitlines()[0][:300]))
        print(f"out of memory: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        sys.exit(1)
    mfu = flops_lib.mfu(ours, flops, peak, jax.device_count())
    result["phi1_jax"] = dict(tokens_per_s=ours, mfu=mfu, loss=our_loss)
    _write_json(result)
    mfu = f"{mfu:.1%}" if mfu is not None else "n/a (no known peak for this device)"
    print(f"phi1_jax:      {ours:12,.0f} tokens/s   MFU {mfu}   (loss {our_loss:.3f})")
    if _PEER.value == "transformers":
        theirs, their_loss = bench_transformers(config, _STEPS.value, _WARMUP.value)
        result["transformers"] = dict(tokens_per_s=theirs, loss=their_loss, ratio=ours / theirs)
        _write_json(result)
        print(f"transformers:  {theirs:12,.0f} tokens/s   (loss {their_loss:.3f})")
        print(f"ratio phi1_jax / transformers: {ours / theirs:.2f}x")


def _write_json(result: dict) -> None:
    if _JSON.value:
        files.write_text(_JSON.value, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    cli.run(main)
