"""Checks a generated reply must pass before it becomes a record; each failure has a short reason that is counted.

- refusals and assistant boilerplate ("As an AI language model", "I'm sorry, but I can't") are dropped; a chatty first
  line ("Sure! Here is ...") is stripped from an otherwise good textbook;
- every ```python code block must parse (`ast`); a textbook needs at least one;
- an exercise is exactly one function with the requested name (imports before it allowed; example calls or tests
  after it are cut off), a docstring, and a body that does something (not only `pass` / `...`); its record keeps the
  signature + docstring as `prompt` (what finetuning conditions on);
- lengths are bounded (characters), so empty and runaway replies are dropped.
"""

from __future__ import annotations

import ast
import dataclasses
import re

REFUSAL = re.compile(
    r"as an ai( language)? model|i('| a)m (sorry|unable|not able)|i can(no|')t (help|assist|provide|write)|"
    r"i cannot (help|assist|provide|write|fulfil)|openai('s)? (policy|guidelines)", re.I)
CHATTY_OPENER = re.compile(r"^(sure|certainly|of course|absolutely|here('s| is))\b[^\n]*\n+", re.I)
CODE_BLOCK = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)```", re.S)


@dataclasses.dataclass(frozen=True)
class Limits:
    min_chars: int = 200
    max_chars: int = 20_000


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    text: str = ""
    prompt: str = ""  # exercises: the signature and docstring that `text` starts with


def _reject(reason: str) -> Verdict:
    return Verdict(False, reason)


def python_blocks(text: str) -> list[str]:
    """The ```python (or unlabelled) code blocks of a reply."""
    return [body for lang, body in CODE_BLOCK.findall(text) if lang.lower() in ("", "python", "py", "python3")]


def _common(text: str, limits: Limits) -> str | None:
    if not text or not text.strip():
        return "empty"
    if REFUSAL.search(text):
        return "refusal or boilerplate"
    if len(text) < limits.min_chars:
        return "too short"
    if len(text) > limits.max_chars:
        return "too long"
    return None


def check_textbook(text: str, limits: Limits = Limits()) -> Verdict:
    text = CHATTY_OPENER.sub("", text.strip(), count=1).strip()
    if (why := _common(text, limits)) is not None:
        return _reject(why)
    if text.count("```") % 2:
        return _reject("unclosed code block")
    blocks = python_blocks(text)
    if not blocks:
        return _reject("no python code block")
    for block in blocks:
        try:
            ast.parse(block)
        except (SyntaxError, ValueError):
            return _reject("code block does not parse")
    return Verdict(True, text=text + "\n")


def _is_trivial(body: list[ast.stmt]) -> bool:
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in body)


def check_exercise(text: str, name: str, limits: Limits = Limits(min_chars=80, max_chars=6_000)) -> Verdict:
    blocks = python_blocks(text)
    code = (blocks[0] if len(blocks) == 1 else text if not blocks and "```" not in text else "").strip("\n")
    if len(blocks) > 1:
        return _reject("more than one code block")
    if (why := _common(code or text, limits)) is not None:
        return _reject(why)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return _reject("code does not parse")
    defs = [s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if len(defs) != 1 or not isinstance(defs[0], ast.FunctionDef):
        return _reject("not exactly one top-level function")
    fn = defs[0]
    if any(not isinstance(s, (ast.Import, ast.ImportFrom)) for s in tree.body[: tree.body.index(fn)]):
        return _reject("code before the function")
    code = "\n".join(code.split("\n")[: fn.end_lineno]).rstrip()  # usage examples or tests after it are cut
    if fn.name != name:
        return _reject("wrong function name")
    doc = fn.body[0] if fn.body else None
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        return _reject("no docstring")
    if _is_trivial(fn.body[1:]):
        return _reject("empty body")
    lines = code.split("\n")
    prompt = "\n".join(lines[: doc.end_lineno]) + "\n"
    return Verdict(True, text=code + "\n", prompt=prompt)


def check(kind: str, text: str, factors: dict) -> Verdict:
    return check_textbook(text) if kind == "textbooks" else check_exercise(text, factors["name"])
