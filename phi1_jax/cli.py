"""Command-line helpers shared by the `python -m phi1_jax.*` entry points."""

import sys

from absl import flags


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to change."""


def parse_flags(argv):
    """absl flag parsing with errors as one clear message and exit code 2 instead of a traceback.

    A misspelled `--config.a.b=v` raises deep inside ml_collections; the message it carries ("Did you mean ...") is
    the useful part, so that is what the user sees.
    """
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
    """`absl.app.run(main)` with clean flag errors, and a config that describes no valid model as a clear error."""
    from absl import app

    from phi1_jax.model import ConfigError

    def guarded(argv):
        try:
            return main(argv)
        except (ConfigError, UsageError) as e:
            _fail(str(e))
        except OSError as e:
            # ml_collections defers a config file that failed to load until its first use.
            if "Configuration is not available" not in str(e):
                raise
            _fail(str(e).replace("\n", " ").replace("  ", " "))

    app.run(guarded, flags_parser=parse_flags)


def _fail(msg):
    print(f"error: {msg}\nRun with --helpfull to see every flag.", file=sys.stderr)
    sys.exit(2)
