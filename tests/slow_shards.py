"""`python -m phi1_jax.data_gen.shards` that waits SECONDS after each shard it writes (through write_shards'
`on_shard` callback; the product has no test hook), so a test can kill it between two shards:

    python -m tests.slow_shards SECONDS --input=... --tokenizer=... --out=...
"""

import functools
import sys
import time

from phi1_jax import shard_format
from phi1_jax.data_gen import shards

if __name__ == "__main__":
    seconds = float(sys.argv.pop(1))
    shards.write_shards = functools.partial(shard_format.write_shards, on_shard=lambda stats: time.sleep(seconds))
    sys.exit(shards.main())
