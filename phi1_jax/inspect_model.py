"""Look inside checkpoints without the trainer: for notebooks (notebooks/inspect_checkpoint.ipynb) and quick checks.

    from phi1_jax import inspect_model as pi
    run = pi.load("workdirs/tiny")                 # newest checkpoint; pi.load(dir, step=500) for another
    pi.param_table(run.model)                      # path, shape, dtype, RMS of every parameter
    pi.compare(pi.load(d, step=500).model, run.model)   # relative change of each parameter
    pi.top_next_tokens(run, "def fibonacci(n):")   # the model's next-token distribution
    print(pi.format_next_tokens(pi.top_next_tokens(run, "def f(x):\n")))  # whitespace tokens told apart
    pi.greedy_continue(run, "import os\n", 40)     # greedy text continuation on the KV cache

Command:  python -m phi1_jax.inspect WORKDIR|HF_DIR|ORG/NAME [--step=S] [--revision=R] [--prompt=TEXT] [--tokens=N]

The command keeps its name, `phi1_jax.inspect`, while this file is not called inspect.py: a file named like the
standard library's `inspect` shadows it for any Python started inside phi1_jax/ (`import jax` there failed), so the
package maps the command's name to this module (`phi1_jax.COMMANDS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi1_jax import cli, loader
from phi1_jax.checkpoint import checkpoint_steps
from phi1_jax.decoding import generate
from phi1_jax.model import Phi
from phi1_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Run:
    workdir: Path
    step: int | None
    model: Phi
    tokenizer: Tokenizer | None
    format: str = loader.PHI1_JAX


def load(source, step: int | None = None, revision: str | None = None) -> Run:
    """A trainer workdir's model (newest readable checkpoint unless `step`: a broken newer one is skipped with a note
    on stderr naming the step used) and its tokenizer; or a Hugging Face directory's or hub id's (no steps there).
    `phi1_jax.loader.open` does the loading."""
    loaded = loader.open(source, revision, step=step)
    return Run(loaded.path, loaded.step, loaded.model, loaded.tokenizer, loaded.format)


def _flat_params(model: Phi) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(jax.device_get(v[...]))
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_table(model: Phi) -> list[dict]:
    """One row per parameter: path, shape, dtype, RMS (a quick health check: nothing exploded or collapsed)."""
    return [{"path": k, "shape": tuple(v.shape), "dtype": str(v.dtype), "rms": float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))}
            for k, v in _flat_params(model).items()]


def compare(a: Phi, b: Phi) -> list[dict]:
    """Per parameter: ||b - a|| / ||a||, and the largest absolute difference. Models must have the same shapes."""
    pa, pb = _flat_params(a), _flat_params(b)
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        raise ValueError("the two models have different parameter shapes")
    rows = []
    for k in pa:
        d = pb[k].astype(np.float64) - pa[k].astype(np.float64)
        rows.append({"path": k, "relative_change": float(np.linalg.norm(d) / max(np.linalg.norm(pa[k]), 1e-30)),
                     "max_abs_diff": float(np.abs(d).max())})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def _require_tokenizer(run: Run) -> Tokenizer:
    if run.tokenizer is None:
        raise ValueError(f"{run.workdir} has no tokenizer.model or tokenizer.json; pass token ids instead of text")
    return run.tokenizer


def top_next_tokens(run: Run, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text`, with their probabilities."""
    tok = _require_tokenizer(run)
    logits = run.model(jnp.asarray([tok.encode(text)], jnp.int32)).logits[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    best = np.argsort(-probs)[:k]
    return [(tok.decode([int(i)]), float(probs[i])) for i in best]


def shown(token: str) -> str:
    """A token as it can be told apart from any other: Python's repr (newlines and tabs escaped, the quotes showing
    where spaces end), and for a whitespace-only token what it holds, in words ('   ' -> "'   ' (3 spaces)")."""
    text = repr(token)
    if token and token.isspace():
        names = {" ": ("space", "spaces"), "\n": ("newline", "newlines"), "\t": ("tab", "tabs")}
        runs = []
        for ch in token:
            if runs and runs[-1][0] == ch:
                runs[-1][1] += 1
            else:
                runs.append([ch, 1])
        words = [f"{n} {names[ch][n > 1]}" if ch in names else f"{n} x {ch!r}" for ch, n in runs]
        text += f" ({', '.join(words)})"
    return text


def format_next_tokens(pairs: list[tuple[str, float]]) -> str:
    """top_next_tokens' list as lines of probability and token (`shown`): whitespace tokens stay distinct."""
    return "\n".join(f"{p:8.4f}  {shown(t)}" for t, p in pairs)


def greedy_continue(run: Run, text: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `text` (phi1_jax.decoding.generate on the KV cache), stopping at EOS."""
    tok = _require_tokenizer(run)
    return tok.decode(generate(run.model, [tok.encode(text)], max_new_tokens, eos_id=tok.eos_id,
                               vocab=tok.vocab_size)[0])


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.inspect",
                                description="Summarize a model: a trainer workdir's checkpoint, a Hugging Face directory "
                                            "or a hub id ORG/NAME.")
    p.add_argument("workdir", help="trainer workdir, phi1_jax checkpoint, Hugging Face directory or hub id")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--revision", default=None, help="hub id only: branch, tag or commit (default: main)")
    p.add_argument("--prompt", default="def ", help="text to continue greedily")
    p.add_argument("--tokens", type=int, default=40)
    args = p.parse_args(argv)
    if args.tokens < 1:
        raise cli.UsageError(f"--tokens={args.tokens}: the continuation's length, at least 1")
    run = load(args.workdir, args.step, args.revision)
    if run.tokenizer is not None:
        n, context = len(run.tokenizer.encode(args.prompt)), run.model.cfg.max_seq_len
        if n + args.tokens > context:
            raise cli.UsageError(f"--prompt ({n} tokens) + --tokens={args.tokens} exceed the model's context of "
                                 f"{context} tokens; shorten one")
    if run.step is not None:
        where = f"step {run.step} of {checkpoint_steps(run.workdir)}"
    else:
        where = "Hugging Face model" if run.format == loader.HUGGINGFACE else "phi1_jax model checkpoint"
    print(f"{run.workdir}: {where}\n")
    print(format_table(param_table(run.model)))
    if run.tokenizer is not None:
        print(f"\n{args.prompt!r} ->\n{args.prompt}{greedy_continue(run, args.prompt, args.tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
