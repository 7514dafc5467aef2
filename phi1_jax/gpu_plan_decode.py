"""Compiling phi-1's decoding for a GPU this host lacks: per-device memory of the decode programs, from a CPU machine.

    python -m phi1_jax.gpu_plan decode --config=configs/phi1.py --target=h100_sxm --rows=16,64 [--programs=...]

The decode step of `phi1_jax.decoding.generate` (what evals and the in-training code evals run), the serving engine's
decode program and generate's prefill, each compiled by XLA:GPU for one GPU of a target with a KV cache of --rows rows
x --cache-len slots, every argument abstract (nothing is allocated): weights, cache, arguments, aliased outputs,
temporaries, peak, whether it fits; the last stdout line is one JSON object (`decode_plans`). The target, the CUDA
plugin and the memory figures are phi1_jax.gpu_plan's (the train step's plan); this module is its decoding half.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from phi1_jax import files
from phi1_jax.errors import UserError
from phi1_jax.gpu_plan import (DECODE_PROGRAMS, GIB, PREALLOCATE, GpuPlanError, Target, allocated_peak,
                               captured_stderr, parse_target, topology_devices)


@dataclasses.dataclass
class DecodePlan:
    """One decode program compiled for one GPU of a target, with a KV cache of `rows` rows x `cache_len` slots."""

    target: str
    program: str  # "generate": phi1_jax.decoding's decode chunk (evals); "serve": the serving engine's decode program;
    # "prefill": generate's prompt pass (rows x prompt_len tokens into a cache of cache_len slots)
    rows: int
    cache_len: int
    param_dtype: str
    compute_dtype: str
    weight_bytes: int  # the parameters, as the program takes them
    cache_bytes: int  # keys and values of every layer (+ the slots' segment ids)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (the cache)
    temp_bytes: int
    peak_bytes: int
    device_bytes: int
    fits: bool  # peak under JAX's default preallocation (75% of the memory)
    fits_whole_memory: bool
    compiles: bool
    xla_warnings: list
    compile_seconds: float
    jax_version: str
    prompt_len: int = 0  # "prefill" only: the prompt's tokens (cache_len - new_tokens)


def load_config(path: str):
    """The ConfigDict of a configs/*.py file (its get_config()), for the commands that take --config=PATH."""
    import importlib.util as iu

    file = Path(path)
    if not file.is_file():
        raise GpuPlanError(f"--config={path}: no such config file (e.g. configs/phi1.py)")
    spec = iu.spec_from_file_location(f"_gpu_plan_config_{file.stem}", file)
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise GpuPlanError(f"--config={path}: has no get_config() (configs/*.py define one)")
    return module.get_config()


def _on(device_sharding, tree):
    """`tree`'s arrays or ShapeDtypeStructs as ShapeDtypeStructs placed by `device_sharding`."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding), tree)


def compile_decode(model_cfg, target: Target, program: str, rows: int, cache_len: int, *,
                   new_tokens: int = 0) -> DecodePlan:
    """`program`'s decode step compiled by XLA:GPU for one GPU of `target`, every argument abstract (the weights in
    model_cfg.param_dtype, the cache in its compute dtype): nothing is allocated.

    "generate" is phi1_jax.decoding's jitted decode chunk (what `generate` runs after the prefill, so what evals and
    the in-training code evals run: greedy, a `new_tokens` token buffer (0: min(384, cache_len // 2); 384 is the code
    evals' max_new_tokens), the cache donated); "serve" is the serving
    engine's own decode program for (rows, window cache_len), built by its `Engine.compile` on an engine whose cache
    and weights are abstract (no tokenizer, no server; its chunk of steps and everything else as `serve` sets them);
    "prefill" is `generate`'s prompt pass, its jitted `_prefill`, at a prompt of cache_len - new_tokens tokens (the
    cache is its output, the prompt's [rows, heads, prompt, prompt] fp32 scores per layer its largest temporary)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from phi1_jax.model import KVCache, abstract_model

    if program not in DECODE_PROGRAMS:
        raise GpuPlanError(f"decode program {program!r}: choose one of {', '.join(DECODE_PROGRAMS)}")
    if target.count != 1:
        raise GpuPlanError(f"--target={target}: decoding is compiled for one GPU (the model and its cache on each; "
                           "give NAME without :N)")
    if not 1 <= cache_len <= model_cfg.max_seq_len:
        raise GpuPlanError(f"--cache-len={cache_len}: between 1 and the model's max_seq_len {model_cfg.max_seq_len}")
    new_tokens = new_tokens or min(384, cache_len // 2)
    if program in ("generate", "prefill") and not 1 <= new_tokens < cache_len:
        raise GpuPlanError(f"--new-tokens={new_tokens}: between 1 and the cache length {cache_len} less one (the "
                           "cache holds the prompt and the new tokens)")
    devices = topology_devices(target, "--target")
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    on = NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(abstract_model(model_cfg))
    state = _on(on, state)
    cache = _on(on, jax.eval_shape(lambda: KVCache.init(model_cfg, rows, cache_len)))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v, cache.segment_ids)))
    log: list[str] = []
    t0 = time.perf_counter()
    with captured_stderr(log), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
        i32 = jnp.int32
        if program == "generate":
            from phi1_jax.decoding import _decode_chunk

            key = _on(on, jax.eval_shape(lambda: jax.random.key(0)))
            sampling = (0.0, 0, 1.0, None)  # greedy, as the evals' pass@1
            compiled = _decode_chunk.lower(
                graphdef, sampling, state, cache, spec((rows, model_cfg.vocab_size), jnp.float32),
                spec((rows, new_tokens), i32), spec((rows,), i32), spec((rows,), jnp.bool_), spec((), i32),
                spec((), i32), key, spec((), i32)).compile()
        elif program == "prefill":
            from phi1_jax.decoding import _prefill

            prompt = spec((rows, cache_len - new_tokens), i32)  # ids, segment ids, positions
            compiled = _prefill.lower(graphdef, state, prompt, prompt, prompt, cache_len).compile()
        else:
            compiled = _serving_decode(graphdef, state, model_cfg, on, rows, cache_len)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak, device_bytes = allocated_peak(mem), target.device_bytes
    return DecodePlan(
        target=str(target), program=program, rows=rows, cache_len=cache_len, param_dtype=model_cfg.param_dtype,
        compute_dtype=model_cfg.dtype, weight_bytes=int(weight_bytes), cache_bytes=int(cache_bytes),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes), peak_bytes=peak,
        device_bytes=device_bytes, fits=peak <= PREALLOCATE * device_bytes, fits_whole_memory=peak <= device_bytes,
        compiles=True,
        xla_warnings=[line for line in log if "memory" in line.lower() or "rematerializ" in line.lower()],
        compile_seconds=round(seconds, 1), jax_version=jax.__version__,
        prompt_len=cache_len - new_tokens if program == "prefill" else 0)


def _serving_decode(graphdef, state, model_cfg, on, rows: int, cache_len: int):
    """The serving engine's ("decode", rows, cache_len) program, compiled by the engine's own `compile` on an engine
    made without `__init__` (which allocates the cache and needs a tokenizer): its weights, cache and logits are
    abstract and placed on the target's device; every other attribute `compile` reads is what `__init__` sets."""
    import jax.numpy as jnp

    from phi1_jax.serving import batching

    engine = batching.Engine.__new__(batching.Engine)
    engine.cfg, engine.graphdef, engine.state = model_cfg, graphdef, state
    engine.slots, engine.max_len = rows, cache_len
    engine.chunk_tokens = batching.Engine.__init__.__kwdefaults__["chunk_tokens"]
    shape = (rows, model_cfg.num_heads, cache_len, model_cfg.head_dim)
    layer = jax_struct(shape, model_cfg.compute_dtype, on)
    engine.k = engine.v = tuple(layer for _ in range(model_cfg.num_layers))
    engine.seg = jax_struct((rows, cache_len), jnp.int32, on)
    engine.logits = jax_struct((rows, model_cfg.vocab_size), jnp.float32, on)
    engine.compiled, engine.compile_s = {}, {}
    shape = ("decode", rows, cache_len)
    try:
        engine.compile(shape)
        return engine.compiled[shape]
    except (AttributeError, KeyError) as e:  # the engine's compile reads an attribute set here no more
        raise GpuPlanError(f"the serving engine's decode program could not be built without its __init__ ({e!r}): "
                           "gpu_plan_decode._serving_decode needs the attribute too") from None


def jax_struct(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def decode_report(plan: DecodePlan, out=None) -> None:
    out = out or sys.stdout
    t = parse_target(plan.target)
    what = {"generate": "phi1_jax.decoding's decode chunk (generate, evals)",
            "serve": "the serving engine's decode program",
            "prefill": f"phi1_jax.decoding's prefill (generate's prompt pass, {plan.prompt_len} tokens)"}[plan.program]
    print(f"decode: {what} compiled by XLA:GPU for one {t.description} ({plan.target}) in {plan.compile_seconds:.0f} "
          f"s, JAX {plan.jax_version}: {plan.rows} rows x {plan.cache_len} cache slots, weights {plan.param_dtype}, "
          f"cache {plan.compute_dtype}", file=out)
    rows = [("weights", plan.weight_bytes), ("KV cache", plan.cache_bytes), ("arguments", plan.argument_bytes),
            ("outputs", plan.output_bytes), ("  (aliased to args)", plan.alias_bytes),
            ("temporaries", plan.temp_bytes), ("peak", plan.peak_bytes)]
    for name, v in rows:
        print(f"  {name:>20}: {_size(v)}", file=out)
    pre = PREALLOCATE * plan.device_bytes
    print(f"  {'fits':>20}: {'yes' if plan.fits else 'NO'} under JAX's default preallocation ({pre / GIB:.1f} GiB = "
          f"{PREALLOCATE:.0%}); {'yes' if plan.fits_whole_memory else 'NO'} under the whole "
          f"{plan.device_bytes / GIB:.1f} GiB", file=out)
    for line in plan.xla_warnings:
        print(f"  XLA: {line.strip()}", file=out)


def _size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.2f} MiB"


def decode_plans(config, target: Target, rows: list[int], programs: list[str], cache_len: int | None = None,
                 new_tokens: int = 0, param_dtype: str | None = None) -> dict:
    """Every (program, rows) compiled and reported; returns the JSON object the command prints last."""
    from phi1_jax.model import PhiConfig

    model = dict(config.model)
    if param_dtype:
        model["param_dtype"] = param_dtype
    try:
        cfg = PhiConfig.from_dict(model)
    except UserError as e:
        raise GpuPlanError(f"--config: {e}") from None
    cache_len = cache_len or cfg.max_seq_len
    plans = []
    for program in programs:
        for r in rows:
            plan = compile_decode(cfg, target, program, r, cache_len, new_tokens=new_tokens)
            decode_report(plan)
            plans.append(dataclasses.asdict(plan))
    return {"target": str(target), "devices": 1, "cache_len": cache_len, "fits": all(p["fits"] for p in plans),
            "plans": plans}


def main(args) -> int:
    """`python -m phi1_jax.gpu_plan decode` after its arguments are parsed (phi1_jax.gpu_plan.main)."""
    target = parse_target(args.target, "--target")
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise GpuPlanError(f"--rows={args.rows!r}: positive row counts, comma-separated (e.g. 16,64)")
    programs = [x.strip() for x in args.programs.split(",") if x.strip()]
    for x in programs or [""]:
        if x not in DECODE_PROGRAMS:
            raise GpuPlanError(f"--programs={args.programs!r}: {x!r} is not one of {', '.join(DECODE_PROGRAMS)}")
    result = decode_plans(load_config(args.config), target, rows, programs, args.cache_len or None,
                          args.new_tokens, args.param_dtype or None)
    line = json.dumps(result)
    if args.json:
        files.write_text(Path(args.json), line + "\n")
    print(line, flush=True)
    return 0
