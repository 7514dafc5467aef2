"""The data-pipeline tests' real two-node Ray cluster on this machine: a head with 1 CPU and a second node with 1 CPU
and resource `node2` (phi1_jax.data_gen.ray_nodes: each node its own `ray start`, stopped by its process ids)."""

from __future__ import annotations

from phi1_jax.data_gen.ray_nodes import LocalCluster


class TwoNodeCluster(LocalCluster):
    def __init__(self):
        super().__init__(head_cpus=1, nodes=[{"cpus": 1, "resources": {"node2": 1}}])
