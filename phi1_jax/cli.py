"""Command-line helpers shared by the `python -m` entry points: each reports a `phi1_jax.errors.UserError` once, as
`error: <message>` on stderr with no traceback, and exits USER_ERROR (2, argparse's own status for a bad command
line): absl mains through `run`, argparse mains through `reports_user_errors`. Every CLI of the project exits 2 for a
user error (a flag, a path, a file's content to change) and 0 on success; a few name other outcomes in their help
(e.g. 3: stopped at a budget, rerun to continue).
"""

import functools
import sys

from phi1_jax.errors import UserError

USER_ERROR = 2  # the exit status of every CLI for an error the user fixes


class UsageError(UserError, ValueError):
    """A command line that cannot run as given; the message says what to change."""


def parse_flags(argv):
    """absl flag parsing with errors as one clear message and exit code 2 instead of a traceback.

    A misspelled `--config.a.b=v` raises deep inside ml_collections; the message it carries ("Did you mean ...") is
    the useful part, so that is what the user sees.
    """
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        key = msg.split()[0].strip("'\"") if msg else ""
        culprits = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        if culprits:
            hint = msg.split(None, 1)[1] if len(msg.split(None, 1)) > 1 else ""  # ml_collections' "Did you mean ..."
            _fail(f"{culprits[0]}: the config has no field {culprits[0][len('--config.'):]!r}. {hint}".rstrip())
        _fail(f"bad --config or --config.* flag: {msg}")


def run(main):
    """`absl.app.run(main)` with clean flag errors, and every `UserError` as one `error: <message>` line and exit 2.

    A `UsageError` or a model `ConfigError` (a flag or a `--config.*` field to change) adds a pointer to --helpfull.
    """
    from absl import app

    from phi1_jax.model import ConfigError

    def guarded(argv):
        try:
            return main(argv)
        except (ConfigError, UsageError) as e:
            _fail(str(e))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(USER_ERROR)
        except OSError as e:
            # ml_collections defers a config file that failed to load until its first use.
            if "Configuration is not available" not in str(e):
                raise
            _fail(str(e).replace("\n", " ").replace("  ", " "))

    app.run(guarded, flags_parser=parse_flags)


def reports_user_errors(main):
    """Decorates an argparse `main(argv=None) -> int`: a `UserError` it raises becomes `error: <message>` on stderr
    and the return value USER_ERROR (2), so `sys.exit(main())` exits with it and a test's `main([...])` sees it.

        @cli.reports_user_errors
        def main(argv=None) -> int: ...
    """

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return USER_ERROR

    return guarded


def _fail(msg):
    print(f"error: {msg}\nRun with --helpfull to see every flag.", file=sys.stderr)
    sys.exit(USER_ERROR)
