"""The one base class of the errors a user fixes; every `python -m` entry point reports them the same way.

A `UserError` means the user must change something (a file, a flag, a config field, a server), and its message names
that thing. Each module keeps its own subclass with a second base for what it is (`class ShardError(UserError,
ValueError)`), so `except ValueError` and `pytest.raises(ShardError)` hold as before. Entry points catch `UserError`
once: `phi1_jax.cli.run` for absl mains, `@phi1_jax.cli.reports_user_errors` for argparse mains; both print
`error: <message>` on stderr, with no traceback.

Not UserErrors: bugs (the traceback is the report); `phi1_jax.serve.ApiError` (a 4xx answer to an HTTP client, and
the server goes on); `phi1_jax.data_gen.llm.BudgetExceeded` (a planned stop: exit 3, a rerun continues); the kernel's own
checks in `phi1_jax/kernels/`, plain `ValueError`s, because phi1_jax/kernels/ imports nothing of the project.
"""


class UserError(Exception):
    """Something the user must change; the message names it (the file, flag, config field or server)."""
