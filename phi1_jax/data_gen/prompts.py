"""Prompt templates and the diversity factors they are sampled with (arXiv 2306.11644 §2.2).

The paper gets diversity "by constraining the topic and target audience" for textbooks and "by constraining the
function names" for exercises, without publishing its lists or prompts. These are ours (documented in docs/data.md):

- TOPICS: a two-level tree of Python and computer-science topics (area -> subtopics);
- AUDIENCES and STYLES: who the textbook section is for and how it is written;
- exercise function names are built as verb_noun (or verb_adjective_noun) from VERBS, ADJECTIVES and NOUNS, and each
  exercise also gets a topic and a difficulty, so the same name is not asked for twice with the same constraints.

`factors(kind, seed, k)` is a pure function of its arguments: attempt k of a run always draws the same factors and so
sends the same request. That is what lets a killed job resume from its request cache without paying twice.
"""

from __future__ import annotations

import random

TOPICS: dict[str, list[str]] = {
    "Python basics": ["variables and assignment", "integers and floats", "strings and string methods",
                      "boolean logic", "if statements", "while loops", "for loops and range", "functions and return values",
                      "default and keyword arguments", "scope and namespaces"],
    "Data structures": ["lists and slicing", "tuples and unpacking", "dictionaries", "sets", "stacks", "queues and deques",
                        "linked lists", "binary trees", "heaps and priority queues", "hash tables", "graphs as adjacency lists",
                        "tries"],
    "Algorithms": ["linear search", "binary search", "bubble and insertion sort", "merge sort", "quicksort",
                   "recursion", "memoization", "dynamic programming", "greedy algorithms", "two pointers",
                   "sliding windows", "breadth-first search", "depth-first search", "shortest paths", "backtracking"],
    "Strings and text": ["palindromes", "anagrams", "parsing numbers from text", "regular expressions", "string formatting",
                         "counting characters and words", "caesar and substitution ciphers", "run-length encoding"],
    "Mathematics in code": ["prime numbers", "greatest common divisor", "modular arithmetic", "fibonacci numbers",
                            "factorials and combinations", "number bases", "digits of a number", "matrices as nested lists",
                            "statistics: mean, median, mode", "geometry with coordinates"],
    "Object-oriented programming": ["classes and instances", "methods and attributes", "inheritance", "composition",
                                    "special methods", "properties", "dataclasses", "abstract interfaces"],
    "Functional programming": ["lambda expressions", "map, filter and reduce", "list comprehensions", "generators",
                               "iterators", "closures", "decorators", "higher-order functions"],
    "Errors and testing": ["exceptions and try/except", "raising exceptions", "assertions", "unit tests",
                           "debugging strategies", "input validation"],
    "Working with data": ["reading and writing files", "CSV data", "JSON data", "dates and times", "sorting with keys",
                          "grouping and counting", "bit manipulation"],
    "Computer science concepts": ["time complexity and big-O", "space complexity", "immutability", "invariants",
                                  "state machines", "simulation", "randomness and seeds", "caching"],
}
AUDIENCES = ["a high-school student meeting programming for the first time", "a first-year computer science undergraduate",
             "a self-taught programmer preparing for interviews", "a data analyst moving from spreadsheets to Python",
             "a scientist who needs Python for experiments", "a teacher preparing a lesson", "a bootcamp student",
             "an experienced programmer new to Python", "a mathematics student", "a curious twelve-year-old"]
STYLES = ["a textbook section with worked examples", "a step-by-step tutorial", "a lecture note with exercises at the end",
          "a question-and-answer walkthrough", "a problem followed by its solution and a discussion",
          "a concise reference with one example per idea"]
VERBS = ["count", "find", "sum", "merge", "split", "filter", "sort", "reverse", "rotate", "compress", "encode", "decode",
         "validate", "normalize", "flatten", "group", "rank", "match", "parse", "format", "compute", "check", "build",
         "remove", "insert", "collect", "pair", "partition", "scale", "shift", "transpose", "convert", "detect", "trim"]
ADJECTIVES = ["longest", "shortest", "unique", "common", "nested", "sorted", "even", "odd", "prime", "missing",
              "duplicate", "balanced", "consecutive", "largest", "smallest", "distinct", "adjacent", "weighted"]
NOUNS = ["words", "digits", "intervals", "pairs", "brackets", "vowels", "primes", "substrings", "elements", "peaks",
         "scores", "segments", "matrix", "grid", "path", "ranges", "tokens", "keys", "values", "runs", "letters",
         "numbers", "dates", "points", "coins", "stairs", "islands", "anagrams", "palindromes", "subsets"]
DIFFICULTIES = ["easy", "medium", "hard"]
KINDS = ("textbooks", "exercises")

# Bump when a template below changes: the run identity includes it, so a folder made with another template is refused.
TEMPLATE_VERSION = 1

TEXTBOOK_TEMPLATE = """Write {style} on "{subtopic}" (part of {topic}) for {audience}.
Explain the idea clearly in prose, and interleave short, correct, runnable Python code blocks (```python ... ```) that
illustrate it. Prefer reasoning and small algorithmic examples over library trivia. Do not mention that you are an AI."""

EXERCISE_TEMPLATE = """Write one {difficulty} Python exercise about {subtopic} as a single function named `{name}`.
Give the function signature and a docstring that states the task precisely (inputs, output, an example), then a
correct implementation. Reply with only one ```python code block containing that function; no tests, no prose."""


def _rng(kind: str, seed: int, k: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{k}")  # str seeds hash deterministically (sha512), across processes


def function_name(rng: random.Random) -> str:
    parts = [rng.choice(VERBS)] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []) + [rng.choice(NOUNS)]
    return "_".join(parts)


def factors(kind: str, seed: int, k: int) -> dict:
    """The diversity factors of attempt k of a run with this seed."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = _rng(kind, seed, k)
    topic = rng.choice(sorted(TOPICS))
    out = {"topic": topic, "subtopic": rng.choice(TOPICS[topic])}
    if kind == "textbooks":
        out |= {"audience": rng.choice(AUDIENCES), "style": rng.choice(STYLES)}
    else:
        out |= {"name": function_name(rng), "difficulty": rng.choice(DIFFICULTIES)}
    return out


def render(kind: str, f: dict) -> str:
    return (TEXTBOOK_TEMPLATE if kind == "textbooks" else EXERCISE_TEMPLATE).format(**f)


def space_size(kind: str) -> int:
    """How many distinct factor combinations exist: a run asking for far more records than this will repeat itself."""
    subtopics = sum(len(v) for v in TOPICS.values())
    if kind == "textbooks":
        return subtopics * len(AUDIENCES) * len(STYLES)
    names = len(VERBS) * len(NOUNS) * (1 + len(ADJECTIVES))
    return subtopics * names * len(DIFFICULTIES)
