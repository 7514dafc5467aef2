"""phi1_jax.data_gen.stdlib_exercises: which functions become exercises, and the exact prompt/text split."""

from phi1_jax.shard_format import Document
from phi1_jax.data_gen.stdlib_exercises import MAX_BODY_LINES, exercises, exercises_from_source

SOURCE = '''\
import os


def no_docstring(x):
    return x


def only_docstring():
    """Nothing after it."""


class Box:
    \x0c
    def area(self, scale=1):
        """The area,
        scaled."""
        w, h = self.size
        return w * h * scale


def long_one():
    """Too long a body."""
''' + "    x = 1\n" * (MAX_BODY_LINES + 1)


def test_only_documented_functions_with_a_short_body_dedented():
    got = list(exercises_from_source(SOURCE, "box.py"))
    prompt = 'def area(self, scale=1):\n    """The area,\n    scaled."""\n'
    assert got == [{"prompt": prompt, "text": prompt + "    w, h = self.size\n    return w * h * scale\n",
                    "where": "box.py:14"}]


def test_unparsable_source_gives_nothing_and_limit_stops():
    assert list(exercises_from_source("def f(:\n", "bad.py")) == []
    docs = [Document(SOURCE, "", "a.py"), Document(SOURCE, "", "b.py")]
    assert [r["where"] for r in exercises(docs)] == ["a.py:14", "b.py:14"]
    assert [r["where"] for r in exercises(docs, limit=1)] == ["a.py:14"]
