"""Config files that build on each other, loaded by path.

`configs/` is a folder of files, not an installed package: `--config=PATH` hands ml_collections a path, which it
loads by path. A config that starts from another (tiny.py from phi1.py) therefore cannot count on `import configs`
working, since that only resolves when the repository root is on sys.path (Python started there). `sibling` loads the
other file from beside the caller, so `--config=/abs/path/to/configs/tiny.py` works from any directory.
"""

import importlib.util
import pathlib
import sys
import types


def sibling(here: str, name: str) -> types.ModuleType:
    """The config module NAME.py in the folder of HERE (pass the calling config's __file__), loaded once per path."""
    path = pathlib.Path(here).resolve().parent / f"{name}.py"
    key = f"phi1_jax.config_files:{path}"
    if key in sys.modules:
        return sys.modules[key]
    if not path.is_file():
        raise FileNotFoundError(f"config {name!r}: no file {path} beside {here}")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
