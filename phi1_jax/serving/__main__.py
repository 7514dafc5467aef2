"""`python -m phi1_jax.serving` is `python -m phi1_jax.serve` (the documented name)."""

import sys

from phi1_jax.serving.server import main

sys.exit(main())
