"""Every command in docs/*.md's ```bash blocks (and unlabeled ``` blocks, which hold commands too) is accounted
for, as tests/test_readme.py does for the README: run by a named test (RUN_BY: the test that runs it, as written or
on a free port / written data), or skipped with the reason (SKIPPED: placeholders, GPUs, an LLM server, the 1.3B
model). A command matched by neither, or by several, fails here, so a new docs command arrives with its check; a
RUN_BY test that is renamed or removed fails here too. Inline commands in the prose are not read.

What is checked beyond that: docs/serve.md's data_gen.generate example names a model whose context holds its
prompts (not the tiny model's 128 tokens).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_readme import block_commands

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# pattern (re.search on "FILE: command") -> "tests/FILE.py::test_name" that runs the command.
RUN_BY = {
    r"^gpu\.md: bash scripts/gpu_checks\.sh --dry$": "tests/test_gpu_checks.py::test_dry_run_writes_a_complete_report",
    r"^gpu\.md: \.venv/bin/python -m pytest -q tests/test_gpu_checks\.py$":
        "tests/test_gpu_checks.py::test_dry_run_writes_a_complete_report",
    r"^serve\.md: python -m phi1_jax\.serve --checkpoint=workdirs/tiny ":
        "tests/test_serve.py::test_no_compilation_under_mixed_traffic",  # the tiny server, on a free port
    r"^serve\.md: lm_eval --model local-completions ":
        "tests/test_serve.py::test_lm_evaluation_harness_runs_both_kinds_of_task_against_the_server",
    r"^data\.md: ray start --(head|address)":
        "tests/test_ray_pipeline.py::test_dedup_across_two_nodes_equals_the_single_process_reference",
    r"^data\.md: python -m phi1_jax\.data_gen\.dedup a\.jsonl b\.jsonl --out=dedup/ --ray-address=auto$":
        "tests/test_ray_pipeline.py::test_dedup_across_two_nodes_equals_the_single_process_reference",
}

SKIPPED = {
    r"^gpu\.md: bash scripts/gpu_wheels\.sh$": "downloads CUDA wheels for a GPU host",
    r"^gpu\.md: \.venv-gpu-plan/bin/python -m phi1_jax\.(train|gpu_plan) ": "phi-1 compiled for a GPU: minutes a "
        "compile, in the opt-in gpu-plan environment; tests/test_gpu_target.py runs the same for tiny",
    r"^evals\.md: python -m phi1_jax\.evals --task=(humaneval|mbpp)_plus --data=(HumanEval|Mbpp)Plus\.jsonl\.gz ":
        "needs EvalPlus's release file (not in its PyPI package); tests/test_evalplus.py runs both forms (--samples, "
        "--checkpoint) on written EvalPlus-format files",
    r"^reproduce\.md: python -m phi1_jax\.data_gen\.(shards|filter|dedup|decontaminate) ": "the paper's data pipeline "
        "on placeholders (STACK, TOK, URL, NAME, MBPP); tests/test_filter.py, test_ray_pipeline.py, "
        "test_decontaminate.py and test_readme.py's finetuning flow run each tool on real small files",
    r"^reproduce\.md: python -m phi1_jax\.data_gen\.generate ": "needs an LLM server (URL, NAME)",
    r"^reproduce\.md: COMMON=": "a shell variable of placeholder paths for the training commands below it",
    r"^reproduce\.md: python -m phi1_jax\.train --config=configs/phi1(_small|_finetune)?\.py ": "350M/1.3B training "
        "on GPUs and the shards above",
    r"^reproduce\.md: python -m phi1_jax\.evals --task=(humaneval|mbpp) --(data=MBPP --)?checkpoint=(runs/|microsoft/)":
        "a trained 1.3B run or the hub's phi-1 (tests/test_readme.py runs the same command on the tiny checkpoint)",
    r"^reproduce\.md: python -m phi1_jax\.figures (fig2_1|table3) ": "inputs are the runs and reports above; "
                                                                     "tests/test_figures.py draws both from real rows",
    r"^reproduce\.md: bash scripts/fig2_1_demo\.sh$": "two tiny runs with evals, ~6 minutes (tests/test_readme.py "
                                                      "skips the README's copy for the same reason)",
}


def _blocks(text: str, langs) -> list[list[str]]:
    """The lines of each fenced block whose language is one of `langs` (fences paired in order)."""
    blocks, current, lang = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in langs:
                    blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def docs_commands() -> list[str]:
    """'FILE: command' for every command of docs/*.md's bash and unlabeled blocks (continuations joined, comments
    dropped)."""
    commands = []
    for path in sorted(DOCS.glob("*.md")):
        for block in _blocks(path.read_text(), ("bash", "sh", "")):
            commands += [path.name + ": " + command for command in block_commands(block)]
    return commands


def test_every_docs_command_is_run_by_a_named_test_or_skipped_with_its_reason():
    commands = docs_commands()
    assert len(commands) > 20, commands  # the reader sees the blocks
    problems = []
    for command in commands:
        runs = [t for p, t in RUN_BY.items() if re.search(p, command)]
        skips = [r for p, r in SKIPPED.items() if re.search(p, command)]
        if len(runs) + len(skips) != 1:
            problems.append(f"{command[:120]!r}: run by {runs}, skipped by {skips}")
    assert not problems, "docs commands neither run by RUN_BY nor skipped by SKIPPED:\n" + "\n".join(problems)
    for pattern in list(RUN_BY) + list(SKIPPED):
        assert any(re.search(pattern, c) for c in commands), f"{pattern!r} matches no docs command any more"
    for test in set(RUN_BY.values()):
        file, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO / file).read_text(), re.M), f"{test}: no such test"


def test_serve_md_data_gen_example_names_a_model_whose_context_holds_its_prompts():
    """data_gen.generate's prompts (90-165 tokens of the tiny tokenizer) do not fit the tiny model's 128-token context:
    the example must not send them to workdirs/tiny."""
    text = (DOCS / "serve.md").read_text()
    example = re.search(r"`(python -m phi1_jax\.data_gen\.generate [^`]*)`", text).group(1)
    model = re.search(r"--model=(\S+)", example).group(1)
    assert model != "workdirs/tiny" and "..." not in example, example
    assert f"python -m phi1_jax.serve --checkpoint={model}" in text, "the example's model is the one served"
