"""phi-1-small pretraining (arXiv 2306.11644 §2.3): 350M parameters, 20 layers, d_model 1024, 16 heads of 64.

Command:   python -m phi1_jax.train --config=configs/phi1_small.py --workdir=/path/to/workdir
Expect:    the paper's phi-1-small reaches 45% HumanEval pass@1 after finetuning.
Params:    356,794,368.

Everything else is configs/phi1.py; only the shape changes.
"""

from phi1_jax.config_files import sibling

phi1 = sibling(__file__, "phi1")


def get_config():
    c = phi1.get_config()
    c.model.num_layers = 20
    c.model.d_model = 1024
    c.model.num_heads = 16
    c.model.mlp_dim = 4096
    return c
