"""Figure 2.1 at CPU scale: the tiny model of configs/tiny.py trained on two data regimes, HumanEval measured as it trains.

The paper's Figure 2.1 plots HumanEval pass@1 against training tokens for one model trained on different data (The
Stack alone, CodeTextbook, CodeTextbook then CodeExercises). Here the two regimes are the embedded stdlib corpus
alone ("stdlib", the default) and the same corpus with the exercise-shaped records of phi1_jax.data_gen.stdlib_exercises mixed
in ("exercises": signature + docstring -> body, as CodeExercises). At this size pass@1 stays near zero: the run shows
the path (in-training eval, metrics, figure) end to end, not the paper's effect.

Commands (scripts/fig2_1_demo.sh runs them all and draws docs/figures/fig2_1_tiny.png):
  python -m phi1_jax.train --config=configs/tiny_fig2_1.py --workdir=workdirs/fig2_1/stdlib
  python -m phi1_jax.data_gen.stdlib_exercises --out=workdirs/fig2_1/exercises.jsonl
  python -m phi1_jax.data_gen.shards --input=workdirs/fig2_1/exercises.jsonl --prompt-field=prompt \\
      --tokenizer=workdirs/fig2_1/stdlib/tokenizer.model --out=workdirs/fig2_1/exercises
  python -m phi1_jax.train --config=configs/tiny_fig2_1.py:exercises --workdir=workdirs/fig2_1/exercises-run
  python -m phi1_jax.figures fig2_1 --runs=stdlib=workdirs/fig2_1/stdlib,stdlib+exercises=workdirs/fig2_1/exercises-run \\
      --out=docs/figures/fig2_1_tiny.png
Expect:    the script about 6 minutes on a 2-core CPU (each run ~2.5 minutes; its eight code evals, all 164 HumanEval
           problems with 64 new tokens each, ~11 s of it); pass@1 0.0 throughout. docs/reproduce.md shows the figure,
           docs/benchmarks.md the measured cost of the evals.
"""

import ml_collections

from phi1_jax.config_files import sibling

tiny = sibling(__file__, "tiny")

REGIMES = ("stdlib", "exercises")


def get_config(regime: str = "stdlib"):
    if regime not in REGIMES:
        raise ValueError(f"configs/tiny_fig2_1.py:{regime}: the regime is one of {REGIMES}")
    c = tiny.get_config()
    c.code_eval.every = 250
    c.code_eval.task = "humaneval"
    c.code_eval.problems = 0  # all 164
    c.code_eval.max_new_tokens = 64  # half the tiny model's context; prompts keep their last 64 tokens
    c.code_eval.batch_size = 32
    if regime == "exercises":
        with c.unlocked():
            c.data.sources = ml_collections.ConfigDict(
                dict(exercises=dict(path="workdirs/fig2_1/exercises", weight=0.25, loss_on="all")))
    return c
