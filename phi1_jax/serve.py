"""`python -m phi1_jax.serve`: the documented command of the OpenAI-compatible server, kept where users and outside
checks call it. The server itself is the sub-package `phi1_jax.serving` (server, api, batching); this module only runs
its `main`. A module rather than a `phi1_jax/serve/` package: one import name for the command and one for the code,
and nothing else to keep in step."""

import sys

from phi1_jax import cli
from phi1_jax.serving import server


@cli.reports_user_errors
def main(argv=None) -> int:
    return server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
