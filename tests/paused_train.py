"""`python -m phi1_jax.train` that waits SECONDS after each checkpoint it saves, so a test can kill it between two
checkpoints (through the trainer's `on_checkpoint` callback; the product has no test hook):

    python -m tests.paused_train SECONDS --config=configs/tiny.py --workdir=DIR [--config.a.b=v ...]
"""

import functools
import sys
import time

from phi1_jax import cli, train

if __name__ == "__main__":
    seconds = float(sys.argv.pop(1))
    cli.run(functools.partial(train.main, on_checkpoint=lambda step: time.sleep(seconds)))
