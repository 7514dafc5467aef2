"""`python -m phi1_jax.data_gen.shards` whose Ray workers wait SECONDS after each shard they write, so a test can kill
it between two shards (the product has no test hook: this wraps `shard_format.write_shard` in every worker through
Ray's `worker_process_setup_hook`, a function of this __main__ that Ray ships to the workers by value):

    python -m tests.slow_shards SECONDS --input=... --tokenizer=... --out=...
"""

import functools
import os
import sys
import time

from phi1_jax.data_gen import shards


def _slow_writer() -> None:
    from phi1_jax import shard_format

    seconds, write = float(os.environ["SLOW_SHARDS_SECONDS"]), shard_format.write_shard

    def slow(*args, **kwargs):
        out = write(*args, **kwargs)
        time.sleep(seconds)
        return out

    shard_format.write_shard = slow


if __name__ == "__main__":
    import ray

    ray.init = functools.partial(ray.init, runtime_env={
        "worker_process_setup_hook": _slow_writer, "env_vars": {"SLOW_SHARDS_SECONDS": sys.argv.pop(1)}})
    sys.exit(shards.main())
