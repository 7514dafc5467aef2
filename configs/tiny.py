"""A CPU-sized Phi for demos and tests: 2 layers, d_model 64, 4 heads of 16, rotary on 8 dims, vocab 2048.

Data: the embedded corpus (the running interpreter's standard library, phi1_jax.embedded_corpus), built and cached
on first use (seconds), with its own SentencePiece tokenizer of 2048 pieces.

Command:   python -m phi1_jax.demo --config=configs/tiny.py
Expect:    seconds on a laptop CPU.

Everything else is configs/phi1.py, scaled down to run in seconds.
"""

import ml_collections

from configs import phi1


def get_config():
    c = phi1.get_config()
    c.model.vocab_size = 2048
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.head_dim = 16
    c.model.mlp_dim = 256
    c.model.rotary_dim = 8
    c.model.max_seq_len = 128
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.seq_len = 128
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.steps = 200
    c.optimizer.warmup_steps = 20
    c.log_every = 10
    c.checkpoint_every = 50
    c.data.use_embedded_corpus = True
    c.data.embedded_vocab_size = 2048
    with c.unlocked():
        c.data.sources = ml_collections.ConfigDict()
    return c
