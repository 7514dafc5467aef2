"""A stand-in "LLM" for the local OpenAI server: it writes textbooks and exercises that follow the prompts.

Replies are a pure function of the request, so a repeated request gets the same reply. About a fifth of them are bad
on purpose, in the ways real models are: the wrong function name, code that does not parse, no code at all, and
near-copies of one fixed text (which dedup must catch).
"""

from __future__ import annotations

import hashlib
import json
import random
import re

WORDS = ("array index value loop count total result list string number function return variable element sorted "
         "order recursion base case stack queue node tree graph edge vertex path search binary linear window pointer "
         "prime divisor sum product average maximum minimum key map set tuple slice step range input output test "
         "check valid error exception state update merge split join compare swap reverse rotate digit letter word "
         "line file record field table row column matrix grid cell neighbour distance cost weight greedy dynamic "
         "memo cache hash bucket collision heap priority level depth width height left right middle start end "
         "first last next previous current parent child leaf root branch cycle visit mark queue frontier").split()
IDENT = ("items values nums text words total count acc best cur prev nxt left right mid lo hi idx pos size limit "
         "seen result answer stack queue table grid row col key val").split()


def _rng(body: dict) -> tuple[random.Random, int]:
    h = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(), 16)
    return random.Random(h), h % 20


def _prose(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _function(rng: random.Random, name: str, doc: str) -> str:
    a, b, c = rng.sample(IDENT, 3)
    op = rng.choice(["+", "-", "*", "//", "%"])
    return (f"def {name}({a}: list[int], {b}: int) -> int:\n"
            f'    """{doc}\n\n    >>> {name}([1, 2, 3], {rng.randint(1, 9)})\n    """\n'
            f"    {c} = {rng.randint(0, 99)}\n"
            f"    for x in {a}:\n"
            f"        if x {rng.choice(['>', '<', '==', '!='])} {b}:\n"
            f"            {c} = {c} {op} x\n"
            f"    return {c}\n")


DUPLICATE_DOC = "Return the running total of the values above the limit, skipping every value below it entirely."


def respond(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    rng, fate = _rng(body)
    if (m := re.search(r"function named `(\w+)`", prompt)) is not None:
        name = m.group(1)
        if fate == 0:
            return f"```python\n{_function(rng, name + '_v2', _prose(rng, 20))}```"
        if fate == 1:
            return f"```python\ndef {name}(x:\n    return x\n```"
        if fate == 2:
            return f"```python\n{_function(random.Random(0), name, DUPLICATE_DOC)}```"
        return f"Here is the exercise:\n```python\n{_function(rng, name, _prose(rng, 25))}```"
    if fate == 0:
        return _prose(rng, 80) + "\n\n```python\nfor i in range(3)\n    print(i)\n```\n"
    if fate == 1:
        return _prose(rng, 120)
    if fate == 2:
        r = random.Random(1)
        return _prose(r, 60) + f"\n\n```python\n{_function(r, 'example', _prose(r, 10))}```\n\n" + _prose(r, 40)
    sub = re.search(r'on "([^"]+)"', prompt).group(1)
    return (f"Sure! Here is a section on {sub}.\n\n## {sub.title()}\n\n{_prose(rng, 70)}\n\n"
            f"```python\n{_function(rng, 'demo_' + rng.choice(IDENT), _prose(rng, 12))}```\n\n{_prose(rng, 50)}\n")
