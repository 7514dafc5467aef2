"""Exercise-shaped records from the embedded corpus, so the finetuning path runs on a CPU with nothing downloaded.

phi-1's finetuning set, CodeExercises (arXiv 2306.11644 §2.2), is Python functions given as a signature and a
docstring (the prompt) to be completed by a body (the solution). This writes records of that shape, with no LLM,
from the functions in the embedded corpus (the stdlib files phi1_jax.embedded_corpus keeps: filtered, and
decontaminated against HumanEval): every function or method that has a docstring and a body of 1 to MAX_BODY_LINES
lines after it, dedented. It is a stand-in that lets configs/tiny_finetune.py run as written, not a data set to
learn from: the tiny model of configs/tiny.py has already seen these functions in pretraining.

Command:  python -m phi1_jax.data_gen.stdlib_exercises --out=workdirs/exercises.jsonl [--limit=N]
Output:   one JSON line per function, in corpus order: {"prompt": signature + docstring, "text": prompt + body,
          "where": "file:line"}; `python -m phi1_jax.data_gen.shards --prompt-field=prompt` turns it into shards whose loss
          can be restricted to the body (a source's loss_on="solution").
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

from phi1_jax.data_gen import ast_match
from phi1_jax import cli, files

MAX_BODY_LINES = 20


def exercises_from_source(text: str, where: str = "") -> Iterator[dict]:
    """Every function of `text` with a docstring and a short body, as {"prompt", "text", "where"}."""
    try:
        tree = ast_match.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.split("\n")  # ast counts "\n" lines; str.splitlines would also split at form feeds
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc_end, end = node.body[0].end_lineno, node.end_lineno
        if len(node.body) < 2 or not 1 <= end - doc_end <= MAX_BODY_LINES:
            continue
        # The def line up to the docstring's last line is the prompt; dedent keeps the line structure, so the
        # prompt's lines stay a prefix of the whole function's.
        function = textwrap.dedent("\n".join(lines[node.lineno - 1:end]) + "\n")
        prompt = "".join(line + "\n" for line in function.split("\n")[:doc_end - node.lineno + 1])
        if function[len(prompt):].strip():
            yield {"prompt": prompt, "text": function, "where": f"{where}:{node.lineno}"}


def exercises(documents: Iterable, limit: int | None = None) -> Iterator[dict]:
    """Exercises from phi1_jax.shard_format Documents (their `text` and `where`), at most `limit` of them."""
    count = 0
    for doc in documents:
        for record in exercises_from_source(doc.text, doc.where):
            if limit is not None and count >= limit:
                return
            count += 1
            yield record


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.stdlib_exercises", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write (its folder is created)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many exercises")
    args = p.parse_args(argv)

    from phi1_jax import embedded_corpus

    documents, report = embedded_corpus.collect_documents()
    out = Path(args.out)
    n = 0
    with files.replacing(out) as tmp, open(tmp, "w", encoding="utf-8") as f:  # a kill leaves no half-written file
        for record in exercises(documents, args.limit):
            f.write(json.dumps(record) + "\n")
            n += 1
    print(f"{n} exercises from {report['files_kept']} stdlib files -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
