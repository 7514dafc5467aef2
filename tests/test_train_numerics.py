"""Training numerics against references computed here, not by the code under test: gradient accumulation, the
AdamW weight-decay mask, global-norm clipping, the learning-rate schedule (arXiv 2306.11644 §2.3), and finetuning with
the loss on solutions only.

References: gradients from plain `jax.grad` of a cross-entropy written here (log_softmax, take_along_axis, mean over
the learned tokens of the whole batch); AdamW's first step and clipping in numpy float64; the schedule as its
closed-form formula. The step under test is the one a config compiles to (`phi1_jax.step.build`), or
`step.make_train_step` with an optimizer that hands back the gradients it is given.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import phi1, phi1_finetune, tiny
from phi1_jax import optim, step

ROOT = Path(__file__).parents[1]
SEQ, BATCH = 16, 8


# configs/tiny.py's model shape, without dropout (so one batch and k microbatches see the same function).
TINY_MODEL = {f"model.{k}": tiny.get_config().model[k] for k in (
    "vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim", "rotary_dim", "max_seq_len", "dtype",
    "remat", "attention_impl")} | {"model.resid_dropout": 0.0, "model.attn_dropout": 0.0, "model.embed_dropout": 0.0}


def _override(c, fields):
    """Sets "a.b" paths of a locked config, as `--config.a.b=value` does."""
    for path, value in fields.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _tiny_config(base=phi1, **fields):
    """`base` (configs/phi1.py or phi1_finetune.py) at the tiny model shape and short sequences, plus `fields`."""
    return _override(base.get_config(), TINY_MODEL | {"seq_len": SEQ, "batch_size": BATCH, "grad_accum_steps": 1}
                     | fields)


def _random_params(b, seed=0, std=0.5):
    """Every parameter random and nonzero (the model's own init has zero biases, which decay could not change)."""
    leaves, treedef = jax.tree.flatten(b.state.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _batch(vocab, loss_rows, seed=1):
    """A packed batch [BATCH, SEQ]: two documents per row, row r learning its first loss_rows[r] targets."""
    rs = np.random.RandomState(seed)
    inputs = rs.randint(0, vocab, (BATCH, SEQ)).astype(np.int32)
    targets = rs.randint(0, vocab, (BATCH, SEQ)).astype(np.int32)
    cut = 1 + rs.randint(1, SEQ - 2, BATCH)
    t = np.arange(SEQ)[None, :]
    segment_ids = (1 + (t >= cut[:, None])).astype(np.int32)
    positions = np.where(t >= cut[:, None], t - cut[:, None], t).astype(np.int32)
    loss_mask = (t < np.asarray(loss_rows)[:, None]).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


# Learned tokens per row: microbatches get very different counts whichever way the rows are split (strided or
# contiguous, 2 or 4 microbatches), and one row learns nothing. A per-microbatch mean would weigh them wrongly.
LOSS_ROWS = [16, 1, 9, 3, 14, 0, 5, 2]


def _reference_loss(graphdef, params, batch):
    """Mean cross-entropy over every learned token of the batch, written without phi1_jax.step."""
    logits = nnx.merge(graphdef, params)(jnp.asarray(batch["inputs"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                                         positions=jnp.asarray(batch["positions"]), deterministic=True).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
    mask = jnp.asarray(batch["loss_mask"])
    return jnp.sum(nll * mask) / jnp.sum(mask)


def _reference_grads(b, params, batch):
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _reference_loss(b.graphdef, p, batch)))(params)
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def _global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def _assert_tree_close(got, want, rel, what):
    """Per leaf: max |got - want| <= rel * max |want| (each leaf against its own scale)."""
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        g, w = np.asarray(g, np.float64), np.asarray(flat_want[path], np.float64)
        err, scale = np.abs(g - w).max(), np.abs(w).max()
        assert err <= rel * scale, f"{what}{jax.tree_util.keystr(path)}: max error {err:.3g}, scale {scale:.3g}"


def _name(path):
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _leaf(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", k)]
    return tree


# The paper's AdamW (§2.3) with the split the project declares (optim.py docstring): weight decay on the matrices
# (every projection kernel, lm_head, the token embedding), none on biases or LayerNorm. Spelled out by name, so a
# change to the mask rule shows up here.
DECAYED = {"embed", "lm_head.kernel"} | {
    f"layers.{i}.{m}.kernel" for i in range(2)
    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.dense", "mlp.fc1", "mlp.fc2")}
NOT_DECAYED = {"final_ln.scale", "final_ln.bias", "lm_head.bias"} | {
    f"layers.{i}.{m}" for i in range(2)
    for m in ("ln.scale", "ln.bias", "attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias", "attn.dense.bias",
              "mlp.fc1.bias", "mlp.fc2.bias")}


def _adam_state(opt_state):
    """(mu, nu) of the AdamW inside the optimizer state (the fp16 path nests it under "tx")."""
    return optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")


# --- 1. gradient accumulation -----------------------------------------------------------------------------------------


def _grad_capture():
    """An optimizer that changes nothing and keeps the gradients it was given as its state."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.fixture(scope="module")
def reference():
    """The tiny model at init, a batch with unequal learned tokens per row, and its reference loss and gradient."""
    b = step.build(_tiny_config())
    params = step.init_params(b, seed=0)
    batch = _batch(b.cfg.vocab_size, LOSS_ROWS)
    return (b, params, batch, *_reference_grads(b, params, batch))


@pytest.mark.parametrize("accum,loss_scale", [(1, None), (2, None), (4, None), (4, 2.0**15)],
                         ids=["1", "2", "4", "4-loss_scaled"])
def test_accumulated_gradients_equal_the_whole_batch_gradient(reference, accum, loss_scale):
    """k microbatches with unequal numbers of learned tokens give the gradient of the whole batch's per-token mean.

    The loss-scaled path is the fp16 one (scale, divide by the microbatch size, unscale), run here in fp32 so any
    factor left over is visible at fp32 precision.
    """
    b, params, batch, ref_loss, ref_grads = reference
    tx = _grad_capture()
    scale_cfg = None if loss_scale is None else tiny.get_config().loss_scale
    if scale_cfg is not None:
        scale_cfg.initial = loss_scale
    train_step = jax.jit(step.make_train_step(b.graphdef, tx, grad_accum=accum, seed=0, dropout=False,
                                              loss_scale=scale_cfg))
    state, metrics = train_step(step.TrainState(jnp.int32(0), params, step.make_opt_init(tx, scale_cfg)(params)), batch)
    grads = state.opt_state if scale_cfg is None else state.opt_state["tx"]
    _assert_tree_close(grads, ref_grads, 1e-5, "gradient")
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    assert float(metrics["tokens"]) == sum(LOSS_ROWS)
    assert float(metrics["grad_norm"]) == pytest.approx(_global_norm(ref_grads), rel=1e-5)
    if scale_cfg is not None:
        assert int(metrics["skipped"]) == 0


@pytest.mark.parametrize("accum", [1, 4])
def test_the_configured_step_accumulates_and_clips_like_the_reference(reference, accum):
    """configs/phi1.py's optimizer with grad_accum_steps=k, clip set below the gradient norm: Adam's first moment after
    one step is (1 - b1) * g * clip / |g| for the reference gradient g of the whole batch."""
    _, params, batch, ref_loss, ref_grads = reference
    norm = _global_norm(ref_grads)
    clip = norm / 3  # the clip is active: the update is scaled by 1/3

    b = step.build(_tiny_config(**{"grad_accum_steps": accum, "optimizer.grad_clip_norm": clip}))
    params_copy = jax.tree.map(jnp.array, params)  # the step donates its inputs
    state, metrics = b.step_fn(b.start(params_copy), batch)
    mu, nu = _adam_state(state.opt_state)
    b1, b2 = phi1.get_config().optimizer.b1, phi1.get_config().optimizer.b2
    clipped = jax.tree.map(lambda g: g * clip / norm, ref_grads)
    _assert_tree_close(mu, jax.tree.map(lambda g: (1 - b1) * g, clipped), 1e-5, "mu")
    _assert_tree_close(nu, jax.tree.map(lambda g: (1 - b2) * g * g, clipped), 2e-5, "nu")
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)  # reported before clipping
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-6)


# --- 2. the weight-decay mask -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [phi1, phi1_finetune], ids=["phi1", "phi1_finetune"])
def test_weight_decay_applies_to_exactly_the_declared_parameters(base):
    """Zero gradient (no learned token), lr > 0 from the first step: decayed parameters become p * (1 - lr * wd) with
    the config's weight decay, all others stay bit for bit."""
    wd = base.get_config().optimizer.weight_decay
    assert wd == {phi1: 0.1, phi1_finetune: 0.01}[base]  # the paper's numbers
    lr = 0.5  # large, so that lr * wd * p is far above fp32 rounding
    b = step.build(_tiny_config(base, **{"optimizer.learning_rate": lr, "optimizer.warmup_steps": 0}))
    params = _random_params(b)
    before = jax.tree.map(lambda x: np.array(x, copy=True), params)  # the step donates params
    batch = _batch(b.cfg.vocab_size, [0] * BATCH)  # nothing learned: the gradient is exactly zero
    state, metrics = b.step_fn(b.start(params), batch)
    new_params = state.params
    assert float(metrics["grad_norm"]) == 0.0
    names = set()
    for path, new in jax.tree_util.tree_flatten_with_path(new_params)[0]:
        name, old, new = _name(path), _leaf(before, path), np.asarray(new)
        names.add(name)
        if name in DECAYED:
            np.testing.assert_allclose(new, old * (1 - lr * wd), rtol=2e-6, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(new, old, err_msg=f"{name} is not to be decayed")
    assert names == DECAYED | NOT_DECAYED  # every parameter classified, none unknown


# --- 3. global-norm clipping, and AdamW's first step ------------------------------------------------------------------


@pytest.mark.parametrize("grad_norm", [7.0, 0.25])
def test_clipping_and_first_adamw_update_match_numpy(grad_norm):
    """configs/phi1.py's optimizer on gradients of a chosen global norm: clipped to g * clip / |g| above the clip,
    untouched below; the update is AdamW's first step, -lr * (g_c / (|g_c| + eps) + wd * p on decayed parameters)."""
    c = _tiny_config(**{"optimizer.warmup_steps": 0})
    o = c.optimizer
    assert o.grad_clip_norm == 1.0
    b = step.build(c)
    params = _random_params(b, seed=3)
    raw = _random_params(b, seed=4, std=1.0)
    grads = jax.tree.map(lambda g: g * (grad_norm / _global_norm(raw)), raw)
    tx = optim.make_optimizer(o, c.steps)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)

    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    factor = min(1.0, o.grad_clip_norm / grad_norm)
    assert _global_norm(jax.tree.map(lambda x: x * factor, g)) == pytest.approx(min(grad_norm, o.grad_clip_norm))
    mu, nu = _adam_state(state)
    _assert_tree_close(mu, jax.tree.map(lambda x: (1 - o.b1) * x * factor, g), 1e-6, "mu")
    _assert_tree_close(nu, jax.tree.map(lambda x: (1 - o.b2) * (x * factor) ** 2, g), 1e-6, "nu")
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        gc = _leaf(g, path) * factor
        p = np.asarray(_leaf(params, path), np.float64)
        want = -o.learning_rate * (gc / (np.abs(gc) + o.eps) + (o.weight_decay * p if _name(path) in DECAYED else 0))
        np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-5, atol=1e-10, err_msg=_name(path))


# --- 4. the learning-rate schedule ------------------------------------------------------------------------------------


def _paper_lr(t, peak, warmup, total, end):
    """§2.3: linear warmup from 0 to the peak over `warmup` steps, then linear decay to `end` at `total`."""
    if t < warmup:
        return peak * t / warmup
    return peak + (end - peak) * (t - warmup) / (total - warmup)


SCHEDULES = [(phi1, 1e-3, 750, 36_000), (phi1_finetune, 1e-4, 50, 6_000)]  # the paper's numbers


@pytest.mark.parametrize("base,peak,warmup,total", SCHEDULES, ids=["phi1", "phi1_finetune"])
def test_schedule_is_linear_warmup_then_linear_decay(base, peak, warmup, total):
    c = base.get_config()
    o = c.optimizer
    assert (o.learning_rate, o.warmup_steps, c.steps, o.end_learning_rate) == (peak, warmup, total, 0.0)
    lr = optim.learning_rate_schedule(o, c.steps)
    mid = warmup + (total - warmup) // 2
    exact = {0: 0.0, warmup // 2: peak * (warmup // 2) / warmup, warmup: peak, mid: peak / 2, total: 0.0}
    tol = dict(rel=1e-6, abs=1e-6 * peak)  # optax computes in fp32: peak - peak * (1 - t / warmup) near t = 0
    for t, want in exact.items():  # the landmarks, by hand
        assert float(lr(t)) == pytest.approx(want, **tol), t
    for t in (1, warmup - 1, warmup + 1, mid + 1, 24_000 % total, total - 1):  # and the formula in between
        assert float(lr(t)) == pytest.approx(_paper_lr(t, peak, warmup, total, 0.0), **tol), t


@pytest.mark.parametrize("base,peak,warmup,total", SCHEDULES, ids=["phi1", "phi1_finetune"])
def test_the_step_applies_the_scheduled_learning_rate(base, peak, warmup, total):
    """The optimizer the step runs follows the schedule: with zero gradient a decayed parameter shrinks by
    lr(t) * wd at update t (the optimizer's own count; the trainer logs step s with lr(s - 1)). The weight decay is
    raised to 0.1 / peak so the shrink is well above fp32 rounding."""
    wd = 0.1 / peak
    c = _tiny_config(base, **{"optimizer.weight_decay": wd})
    b = step.build(c)
    params = _random_params(b, seed=5)
    embed = np.array(params["embed"], np.float64)
    batch = _batch(b.cfg.vocab_size, [0] * BATCH)
    for t in (0, warmup // 2, warmup, warmup + (total - warmup) // 2, total - (total - warmup) // 10, total):
        opt_state = optax.tree_utils.tree_set(b.opt_init(params), count=jnp.asarray(t, jnp.int32))
        opt_state = jax.tree.map(jnp.array, opt_state)  # one buffer per count (the step donates its inputs)
        new = b.step_fn(step.TrainState(jnp.int32(t), jax.tree.map(jnp.array, params), opt_state), batch)[0].params
        shrink = np.mean((embed - np.asarray(new["embed"], np.float64)) / embed)
        want = _paper_lr(t, peak, warmup, total, 0.0) * wd
        if want == 0:
            np.testing.assert_array_equal(new["embed"], params["embed"])
        else:
            assert shrink == pytest.approx(want, rel=1e-4), (t, shrink, want)


# --- 5. finetuning: configs/phi1_finetune.py end to end, the loss on solutions only -----------------------------------


def _exercises(n):
    """CodeExercises-like records: `prompt` (signature and docstring) is where `text` starts; every one distinct."""
    for i in range(n):
        prompt = f'def scale_{i}(xs, k):\n    """Return each number in xs times {i} plus k ({i} items)."""\n'
        body = f"    out_{i} = []\n" + f"    for x in xs:\n        out_{i}.append(x * {i} + k)\n" * (1 + i % 3)
        yield {"prompt": prompt, "text": prompt + body + f"    return out_{i}\n"}


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, embedded):
    """Exercise shards (phi1_jax.data_gen.shards --prompt-field=prompt), a tiny model checkpoint, and the finetune config's
    overrides at the tiny shape, as one dict that gives both the command line and the in-process config."""
    from phi1_jax.data_gen import shards
    from phi1_jax import checkpoint
    from phi1_jax.model import Phi, PhiConfig

    root = tmp_path_factory.mktemp("finetune")
    records = list(_exercises(40))
    (root / "exercises.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert shards.main([f"--input={root / 'exercises.jsonl'}", f"--tokenizer={embedded.tokenizer_path}",
                        f"--out={root / 'shards'}", "--prompt-field=prompt", "--source-name=exercises"]) == 0
    model_fields = {k.split(".", 1)[1]: v for k, v in TINY_MODEL.items()}
    checkpoint.save_model(root / "base", Phi(PhiConfig.from_dict(phi1.model_config().to_dict() | model_fields),
                                             rngs=nnx.Rngs(7)))
    overrides = TINY_MODEL | {
        "seq_len": 128, "batch_size": 4, "grad_accum_steps": 2, "steps": 4, "log_every": 1, "checkpoint_every": 4,
        "eval_every": 0, "code_eval.every": 0, "init_from": str(root / "base"), "data.tokenizer": str(embedded.tokenizer_path),
        "data.sources.exercises.path": str(root / "shards")}
    return root, records, overrides


def _solution_mask(batch, records, tok):
    """The loss mask a finetuning batch must have, found from the exercises themselves: locate each document piece of
    each row in the tokenized exercises (prompt tokens, then solution tokens, then EOS), and learn a target exactly
    when it is a solution token or the EOS of the same document. Returns (mask, number of targets it could place)."""
    docs = []
    for r in records:
        prompt, body = tok.encode(r["prompt"]), tok.encode(r["text"][len(r["prompt"]):])
        docs.append((np.asarray(prompt + body + [tok.eos_id]), len(prompt)))
    inputs, targets, seg = batch["inputs"], batch["targets"], batch["segment_ids"]
    mask = np.full(inputs.shape, np.nan)
    for row in range(inputs.shape[0]):
        starts = [0] + [t for t in range(1, inputs.shape[1]) if seg[row, t] != seg[row, t - 1]] + [inputs.shape[1]]
        for a, e in zip(starts[:-1], starts[1:]):
            piece = inputs[row, a:e]
            answers = set()
            for stream, prompt_len in docs:  # every place the piece occurs, in every exercise
                for o in range(len(stream) - len(piece) + 1):
                    if np.array_equal(stream[o:o + len(piece)], piece):
                        nxt = o + 1 + np.arange(len(piece))  # index in the document of each target
                        inside = nxt < len(stream)
                        want = np.where(inside, stream[np.minimum(nxt, len(stream) - 1)], -1)
                        if np.array_equal(want[inside], targets[row, a:e][inside]):
                            answers.add(tuple((inside & (nxt >= prompt_len)).astype(float)))
            if len(answers) == 1:  # placed without ambiguity
                mask[row, a:e] = answers.pop()
    return mask, int(np.sum(~np.isnan(mask)))


def test_finetune_config_end_to_end_learns_only_solutions(finetune):
    """`python -m phi1_jax.train --config=configs/phi1_finetune.py` at the tiny shape from a saved checkpoint: it
    starts from those parameters with a fresh schedule, the loader's mask is the solution mask found independently,
    and the first logged loss is the reference cross-entropy over the solution tokens of the first batch."""
    from phi1_jax import checkpoint, data
    from phi1_jax.metrics import read_metrics

    root, records, overrides = finetune
    workdir = root / "run"
    cmd = [sys.executable, "-m", "phi1_jax.train", "--config=configs/phi1_finetune.py", f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialized parameters from {overrides['init_from']}" in r.stdout
    rows = read_metrics(workdir)[0]
    c = _override(phi1_finetune.get_config(), overrides)
    warmup = min(c.optimizer.warmup_steps, c.steps)  # the schedule squeezes warmup into a run shorter than it
    assert sorted(rows) == [1, 2, 3, 4]
    for s in rows:
        assert rows[s]["lr"] == pytest.approx(_paper_lr(s - 1, 1e-4, warmup, c.steps, 0.0), rel=1e-5, abs=1e-12)
    assert all(np.isfinite(rows[s]["loss"]) for s in rows)
    assert (workdir / "checkpoints" / "4").is_dir()

    # The trainer's first batch is the config's first batch (one process); its mask against the exercises.
    ds, tokenizer = data.from_config(c, process_index=0, process_count=1)
    batch = next(iter(ds))
    want, placed = _solution_mask(batch, records, tokenizer)
    assert placed >= 0.9 * batch["loss_mask"].size, placed
    known = ~np.isnan(want)
    np.testing.assert_array_equal(batch["loss_mask"][known], want[known])
    assert 0.2 < batch["loss_mask"].mean() < 0.8  # prompts and solutions both present

    # Step 1 runs at lr 0 on the initial parameters: its loss is the reference loss of the checkpoint on that batch.
    b = step.build(c)
    params = checkpoint.load_params(overrides["init_from"], b.cfg)
    ref = float(_reference_loss(b.graphdef, params, batch))
    assert rows[1]["loss"] == pytest.approx(ref, rel=1e-5)
    all_tokens = float(_reference_loss(b.graphdef, params, {**batch, "loss_mask": (batch["segment_ids"] > 0) * 1.0}))
    assert abs(all_tokens - ref) > 1e-3  # the mask matters to the loss


def test_prompt_targets_get_no_gradient(finetune):
    """The step's loss and gradient do not depend on the targets at prompt positions (loss_mask 0): replace them all
    with other tokens and nothing changes, bit for bit; replace one solution target and the loss moves."""
    from phi1_jax import checkpoint, data

    _, _, overrides = finetune
    c = _override(phi1_finetune.get_config(), overrides)
    batch = next(iter(data.from_config(c, process_index=0, process_count=1)[0]))
    b = step.build(c)
    params = checkpoint.load_params(overrides["init_from"], b.cfg)
    tx = _grad_capture()
    train_step = jax.jit(step.make_train_step(b.graphdef, tx, grad_accum=c.grad_accum_steps, seed=0, dropout=False))

    def run(targets):
        state, metrics = train_step(step.TrainState(jnp.int32(0), params, tx.init(params)), {**batch, "targets": targets})
        return float(metrics["loss"]), state.opt_state

    prompt = batch["loss_mask"] == 0
    assert prompt.sum() > 100
    loss, grads = run(batch["targets"])
    other = np.where(prompt, (batch["targets"] + 1 + np.arange(batch["targets"].size).reshape(prompt.shape) % 97)
                     % c.model.vocab_size, batch["targets"]).astype(np.int32)
    assert (other[prompt] != batch["targets"][prompt]).all()
    loss2, grads2 = run(other)
    assert loss2 == loss
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(g, g2)
    learned = np.argwhere(~prompt)[0]
    moved = batch["targets"].copy()
    moved[tuple(learned)] = (moved[tuple(learned)] + 1) % c.model.vocab_size
    assert run(moved)[0] != loss
