"""phi-1 = phi-1-base finetuned on CodeExercises (arXiv 2306.11644 §2.3).

Command:   python -m phi1_jax.train --config=configs/phi1_finetune.py --workdir=/path/to/workdir \
               --config.init_from=/path/to/phi1_base_workdir
Expect:    ~7 more A100-hours in the paper; 50.6% HumanEval pass@1, 55.5% MBPP for the best of the checkpoints
           saved every 1k steps.

Everything else is configs/phi1.py; the finetuning stage changes batch, schedule, weight decay and steps.
"""

import ml_collections

from phi1_jax.config_files import sibling

phi1 = sibling(__file__, "phi1")


def get_config():
    c = phi1.get_config()
    c.batch_size = 256
    c.steps = 6000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.01
    c.checkpoint_every = 1000  # "best of checkpoints saved every 1k steps"
    with c.unlocked():
        # CodeExercises: loss only on the solution, after each exercise's signature and docstring.
        c.data.sources = ml_collections.ConfigDict(dict(exercises=dict(path="", weight=1.0, loss_on="solution")))
    return c
