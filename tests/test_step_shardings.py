"""The train state's shardings (phi1_jax.step.build) on an 8-device CPU mesh: Adam's moments are sharded exactly like
the parameters they track, and what is not a copy of the parameters (counts, the fp16 loss scale) is replicated.

A regression here is silent in every loss test (a replicated optimizer state trains the same, with 2/3 of the memory
FSDP saves thrown away), so the specs are read directly. Runs in a subprocess: the device count is fixed at JAX's start.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, sys
import jax
from configs import tiny
from phi1_jax import step

c = tiny.get_config()
c.model.dtype = sys.argv[1]
c.mesh.update(json.loads(sys.argv[2]))
b = step.build(c)
def spec(x):  # the mesh axes per dimension, trailing unsharded dimensions dropped: "()" is replicated
    axes = list(x.sharding.spec)
    while axes and axes[-1] is None:
        axes.pop()
    return repr(tuple(axes))
params = {jax.tree_util.keystr(p): spec(x) for p, x in jax.tree_util.tree_flatten_with_path(b.state.params)[0]}
opt = {jax.tree_util.keystr(p): spec(x) for p, x in jax.tree_util.tree_flatten_with_path(b.state.opt_state)[0]}
print(json.dumps({"params": params, "opt": opt, "step": spec(b.state.step)}))
"""


@pytest.mark.parametrize("dtype,mesh", [("float32", {"data": 1, "fsdp": 4, "tensor": 2}),
                                        ("float16", {"data": 2, "fsdp": 2, "tensor": 2})], ids=["fp32", "fp16"])
def test_adam_moments_are_sharded_like_the_parameters(dtype, mesh):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", PROBE, dtype, json.dumps(mesh)], env=env, capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    params, opt = got["params"], got["opt"]
    assert sum(spec != "()" for spec in params.values()) > len(params) // 2  # the mesh shards most
    moments = {"mu": 0, "nu": 0}
    for path, spec in opt.items():
        kind = next((k for k in moments if f".{k}" in path), None)
        if kind is None:  # counts, and under fp16 the loss scale and its counter
            assert spec == "()", (path, spec)
            continue
        suffix = path[path.index(f".{kind}") + len(kind) + 1:]  # the parameter's own path inside the moment
        assert suffix in params, (path, suffix)
        assert spec == params[suffix], (path, spec, params[suffix])
        moments[kind] += 1
    assert moments == {"mu": len(params), "nu": len(params)}
    if dtype == "float16":
        assert any("loss_scale" in path for path in opt)
    assert got["step"] == "()"
