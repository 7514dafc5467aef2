"""Finetuning at CPU scale: configs/tiny.py's model continued on exercises, the loss on the solutions only.

The path of configs/phi1_finetune.py (parameters from `init_from`; optimizer, schedule and step start fresh; the
source's loss_on="solution" leaves each exercise's signature and docstring out of the loss) at the size of
configs/tiny.py, on the stand-in exercises of phi1_jax.data_gen.stdlib_exercises (stdlib functions: signature + docstring ->
body). It checks the plumbing; it does not make the tiny model better at anything the paper measures.

Commands (after configs/tiny.py has trained workdirs/tiny; the paths below are this config's defaults):
  python -m phi1_jax.data_gen.stdlib_exercises --out=workdirs/exercises.jsonl
  python -m phi1_jax.data_gen.shards --input=workdirs/exercises.jsonl --prompt-field=prompt \\
      --tokenizer=workdirs/tiny/tokenizer.model --out=workdirs/exercises
  python -m phi1_jax.train --config=configs/tiny_finetune.py --workdir=workdirs/tiny-ft --config.init_from=workdirs/tiny
Expect:    well under a minute of training on a 2-core CPU; the training loss (solution tokens only) starts near the
           tiny model's held-out loss and falls a little over 200 steps.
"""

import ml_collections

from phi1_jax.config_files import sibling

tiny = sibling(__file__, "tiny")


def get_config():
    c = tiny.get_config()
    c.init_from = "workdirs/tiny"
    c.steps = 200
    c.optimizer.learning_rate = 1e-4  # a tenth of pretraining's, as configs/phi1_finetune.py
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 100
    c.data.use_embedded_corpus = False
    c.data.tokenizer = "workdirs/tiny/tokenizer.model"  # the trainer copies the pretraining tokenizer into its workdir
    with c.unlocked():
        c.data.sources = ml_collections.ConfigDict(
            dict(exercises=dict(path="workdirs/exercises", weight=1.0, loss_on="solution")))
    return c
