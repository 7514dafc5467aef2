"""A CPU-sized Phi for demos and tests: 2 layers, d_model 64, 4 heads of 16, rotary on 8 dims, vocab 2048.

Data: the embedded corpus (the running interpreter's standard library, phi1_jax.embedded_corpus), built and cached
on first use (seconds), with its own SentencePiece tokenizer of 2048 pieces.

Command:   python -m phi1_jax.train --config=configs/tiny.py --workdir=workdirs/tiny
Expect:    about 4 minutes on a 2-core CPU (13-16k tokens/s; the first run also builds the corpus, ~15 s); the
           held-out loss falls from ~7.6 to ~4.3 nats/token over 2000 steps; WORKDIR/loss.png shows the curve.

Everything else is configs/phi1.py, scaled down to run in seconds.
"""

import ml_collections

from phi1_jax.config_files import sibling

phi1 = sibling(__file__, "phi1")


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
    c.model.attention_impl = "xla"  # on a CPU the kernel runs as its interpreter: slower, and tests pick it by name
    c.seq_len = 128
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.steps = 2000  # about four minutes on a 2-core CPU
    c.optimizer.warmup_steps = 100
    c.log_every = 50
    c.checkpoint_every = 500
    c.eval_every = 250
    c.eval_batches = 8
    c.code_eval.every = 0  # off: see configs/tiny_fig2_1.py for the tiny run that measures HumanEval as it trains
    c.code_eval.max_new_tokens = 64  # at most half the 128-token context
    c.data.holdout_every = 50  # 2% of the stdlib files are held out
    c.data.use_embedded_corpus = True
    c.data.embedded_vocab_size = 2048
    with c.unlocked():
        c.data.sources = ml_collections.ConfigDict()
    return c
