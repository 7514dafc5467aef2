"""The environment of a GPU check as JSON: Python and package versions, the devices, nvidia-smi, whether this JAX
deprecates Pallas' Triton backend, and that the checkout imports with what is installed.

Command:  python -m phi1_jax.bench.gpu_env --json=PATH [--require-gpu]     (the GPU checks' `env` step)
Exit status 3 with --require-gpu when JAX sees no GPU (the checks then skip their other steps).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys

from phi1_jax import cli, files

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain",
            "ml-collections", "jmp", "numpy", "torch", "transformers", "triton", "nvidia-cudnn-cu13",
            "nvidia-cudnn-cu12", "pytest")
NO_GPU = 3


def facts() -> dict:
    env = dict(python=sys.version.split()[0], executable=sys.executable, machine=platform.machine(),
               cores=os.cpu_count())
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    env["packages"] = packages
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        env["nvidia_smi"] = (q.stdout or q.stderr).strip()
    import jax

    env.update(jax_backend=jax.default_backend(), devices=[f"{d.platform}:{d.device_kind}" for d in jax.devices()])
    try:  # JAX 0.12 registers this deprecation (and warns at every Triton lowering); 0.10 does not have it
        from jax._src import deprecations

        env["pallas_triton_deprecated"] = "jax-pallas-triton" in deprecations._registered_deprecations
        env["pallas_triton_removed"] = (deprecations.is_accelerated("jax-pallas-triton")
                                        if env["pallas_triton_deprecated"] else False)
    except Exception as e:  # noqa: BLE001
        env["pallas_triton_deprecated"] = f"unknown ({type(e).__name__})"
    import phi1_jax.kernels.flash_attention  # noqa: F401  the checkout imports with what is installed
    import phi1_jax.model  # noqa: F401

    return env


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.gpu_env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the facts here, as one JSON object")
    p.add_argument("--require-gpu", action="store_true", help=f"exit {NO_GPU} when JAX sees no GPU")
    args = p.parse_args(argv)
    env = facts()
    files.write_text(args.json, json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    return NO_GPU if args.require_gpu and env["jax_backend"] != "gpu" else 0


if __name__ == "__main__":
    sys.exit(main())
