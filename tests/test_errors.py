"""One kind of error a user fixes (phi1_jax.errors.UserError), reported once per entry point as `error: <message>`.

Every exception class the project defines derives from UserError unless it is listed in NOT_USER_ERRORS with the
reason; the walk finds the classes by reading the modules, so a new class that forgets its base fails here. Every
`python -m` entry point goes through the one catch: `cli.run` (absl) or `@cli.reports_user_errors` (argparse)."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phi1_jax import cli
from phi1_jax.errors import UserError

ROOT = Path(__file__).parents[1]
PACKAGE = "phi1_jax"

# Exception classes that are deliberately not UserErrors, and why.
NOT_USER_ERRORS = {
    # An OpenAI-style 4xx/5xx answer to an HTTP client; the server goes on, no process exits.
    "phi1_jax.serving.api.ApiError",
    # A planned stop, not a mistake: "stopped: budget reached", exit 3, and a rerun continues.
    "phi1_jax.data_gen.llm.BudgetExceeded",
}
# Entry points that cannot take the one catch.
NOT_GUARDED = {
    "phi1_jax.evals.sandbox_server",  # runs as `python -I -S -c <file>` inside the sandbox: standard library only, by design
}


def _modules():
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), str(path))


def _exception_classes():
    """(qualified name, class) of every exception class defined at the top level of a project module."""
    found = []
    for name, tree in _modules():
        class_names = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        if not class_names:
            continue
        module = importlib.import_module(name)
        for cls_name in class_names:
            cls = getattr(module, cls_name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append((f"{name}.{cls_name}", cls))
    return found


def test_every_error_class_is_a_user_error():
    classes = dict(_exception_classes())
    assert len(classes) >= 20 and "phi1_jax.cli.UsageError" in classes  # the walk sees the real classes
    missing = sorted(n for n, c in classes.items() if not issubclass(c, UserError) and n not in NOT_USER_ERRORS)
    assert not missing, f"derive these from phi1_jax.errors.UserError, or list them in NOT_USER_ERRORS: {missing}"
    listed_wrongly = sorted(n for n in NOT_USER_ERRORS if n not in classes or issubclass(classes[n], UserError))
    assert not listed_wrongly, f"NOT_USER_ERRORS names classes that are gone or are UserErrors: {listed_wrongly}"


def _main_block(tree):
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", '__name__ == "__main__"'):
            return node
    return None


def test_every_entry_point_reports_user_errors_once():
    unguarded = []
    for name, tree in _modules():
        block = _main_block(tree)
        if block is None or name in NOT_GUARDED:
            continue
        if "cli.run(" in ast.unparse(block):
            continue
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        if not any("cli.reports_user_errors" in ast.unparse(d) for m in mains for d in m.decorator_list):
            unguarded.append(name)
    assert not unguarded, f"entry points without cli.run or @cli.reports_user_errors: {unguarded}"


class _Mistake(UserError, RuntimeError):
    pass


def test_the_argparse_decorator_returns_the_exit_code(capsys):
    @cli.reports_user_errors
    def two(argv=None):
        raise _Mistake("--out=x: is a file")

    @cli.reports_user_errors
    def bug(argv=None):
        raise RuntimeError("a bug keeps its traceback")

    assert two([]) == 2 == cli.USER_ERROR and capsys.readouterr().err == "error: --out=x: is a file\n"
    with pytest.raises(RuntimeError, match="a bug"):
        bug([])


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_an_argparse_main_reports_a_user_error(tmp_path):
    r = _run("-m", "phi1_jax.data_gen.shards", f"--input={tmp_path / 'missing'}", f"--tokenizer={tmp_path / 'nope.model'}",
             f"--out={tmp_path / 'out'}")
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'nope.model'}: tokenizer file not found\n")


def test_absl_mains_report_a_user_error():
    r = _run("-m", "phi1_jax.train", "--config=configs/tiny.py")  # a UsageError: the flags hint follows
    assert r.returncode == 2 and r.stderr.splitlines() == ["error: --workdir is required (rerunning on the same "
                                                           "workdir resumes)", "Run with --helpfull to see every flag."]
    script = ("from phi1_jax import cli, errors\n"
              "class StopError(errors.UserError, RuntimeError): pass\n"
              "def main(argv): raise StopError('loss is nan at step 3; lower --config.optimizer.learning_rate')\n"
              "cli.run(main)\n")
    r = _run("-c", script)
    assert (r.returncode, r.stderr) == (2, "error: loss is nan at step 3; lower --config.optimizer.learning_rate\n")


@pytest.mark.parametrize("fields,says", [
    ({"model.attention_impl": "pallas", "model.num_heads": 4, "model.head_dim": 24, "model.d_model": 96},
     "attention_impl='pallas' runs head_dim 16, 32, 64, 128, 256; this model's is 24"),
    ({"model.attention_impl": "cudnn", "model.attn_dropout": 0.1}, "attention_impl='cudnn' has no attention dropout"),
], ids=["pallas-head_dim", "cudnn-dropout"])
def test_an_attention_the_model_cannot_train_with_is_refused_at_build(fields, says):
    """Before: a traceback from the kernel (or from cuDNN's path) while the train step compiled."""
    from configs import tiny
    from phi1_jax import step

    c = tiny.get_config()
    for path, value in fields.items():
        group, name = path.split(".")
        c[group][name] = value
    with pytest.raises(step.BuildError, match=re.escape(says)) as e:
        step.build(c)
    assert isinstance(e.value, UserError)
