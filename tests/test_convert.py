"""Hugging Face parity: random transformers PhiForCausalLM models, converted both ways, in all three layouts."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

_OTHER_LANE = ("the transformers parity tests need torch, which only the Python 3.11 lane of .ci/run installs "
               "(this machine has a CPU torch for 3.11 only)")
torch = pytest.importorskip("torch", reason=_OTHER_LANE)
transformers = pytest.importorskip("transformers", reason=_OTHER_LANE)

from safetensors.numpy import save_file  # noqa: E402

from phi1_jax import checkpoint, loader  # noqa: E402
from phi1_jax.convert import ConversionError, from_hf, read_tensors, to_hf  # noqa: E402

# (vocab, d_model, heads, layers, mlp, partial_rotary_factor): an odd vocab, head counts that are not powers of two,
# a full-rotary and a 3/8-rotary head.
SHAPES = {
    "3heads": (101, 48, 3, 2, 96, 0.5),
    "odd_vocab": (257, 64, 4, 3, 128, 0.25),
    "5heads_full_rotary": (64, 40, 5, 2, 72, 1.0),
    "6heads_3of8": (50, 96, 6, 1, 200, 0.375),
}


def random_hf_model(vocab, d, heads, layers, mlp, factor, seed=0):
    """A PhiForCausalLM whose every weight (LayerNorms and biases included) is random, so no mapping hides."""
    torch.manual_seed(seed)
    config = transformers.PhiConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        partial_rotary_factor=factor, max_position_embeddings=64, attn_implementation="eager",
    )
    model = transformers.PhiForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def ids_for(vocab, shape=(2, 19), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_dir(request, tmp_path_factory):
    model = random_hf_model(*SHAPES[request.param])
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return d, model, SHAPES[request.param][0]


def test_fp32_logits_match_transformers(hf_dir):
    d, hf, vocab = hf_dir
    ids = ids_for(vocab)
    ours = np.asarray(from_hf(d)(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_fp32_logits_match_transformers_by_hub_id(hf_dir, tmp_path, monkeypatch):
    """The same directory as a hub id, from a Hugging Face cache laid out on disk with the hub off."""
    from tests.hub_cache import add_to_cache, offline_env

    d, hf, vocab = hf_dir
    add_to_cache(tmp_path / "hf", "test-org/phi", d)
    for k, v in offline_env(tmp_path / "hf").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ids = ids_for(vocab)
    np.testing.assert_allclose(np.asarray(loader.open("test-org/phi").model(jnp.asarray(ids)).logits), hf_logits(hf, ids), atol=1e-4,
                               rtol=0)


def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(hf_dir):
    """Tolerance: both bf16 runs round every activation to 8 mantissa bits, in different places (we rotate in fp32,
    transformers in bf16), so they cannot agree bit for bit. What matters is accuracy: our bf16 error against the fp32
    reference must be no worse than twice transformers' own bf16 error, plus 1e-2 absolute slack."""
    d, hf, vocab = hf_dir
    ids = ids_for(vocab)
    ref = hf_logits(hf, ids)
    hf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids)
    ours16 = np.asarray(from_hf(d, dtype="bfloat16")(jnp.asarray(ids)).logits)
    hf_err, our_err = np.abs(hf16 - ref).max(), np.abs(ours16 - ref).max()
    assert our_err <= 2 * hf_err + 1e-2, (our_err, hf_err)
    assert our_err > 0  # it really ran in bf16


def test_export_to_hf_and_reload_gives_same_logits(hf_dir, tmp_path):
    d, hf, vocab = hf_dir
    ids = ids_for(vocab, seed=1)
    model = from_hf(d)
    to_hf(model, tmp_path / "export")
    reloaded = transformers.PhiForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    for name, p in hf.state_dict().items():  # weights come back bit for bit
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_export_bf16(tmp_path):
    hf = random_hf_model(*SHAPES["3heads"])
    hf.save_pretrained(tmp_path / "src")
    to_hf(from_hf(tmp_path / "src"), tmp_path / "bf16", dtype="bfloat16")
    reloaded = transformers.PhiForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.lm_head.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        reloaded.lm_head.weight.detach().float().numpy(), hf.lm_head.weight.detach().to(torch.bfloat16).float().numpy()
    )


def test_sharded_safetensors_with_index(tmp_path):
    hf = random_hf_model(*SHAPES["odd_vocab"])
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = ids_for(257)
    np.testing.assert_allclose(np.asarray(from_hf(tmp_path)(jnp.asarray(ids)).logits), hf_logits(hf, ids), atol=1e-4)


# --- the older layouts ----------------------------------------------------------------------------------------------


def _fused(sd, i, kind):
    """MixFormer's Wqkv: rows of q, then k, then v."""
    return torch.cat([sd[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)


def write_old_layout(hf, directory: Path, layout: str):
    """Writes hf's weights in the MixFormer or phi-msft layout, with that layout's config.json."""
    sd, cfg = hf.state_dict(), hf.config
    L = cfg.num_hidden_layers
    if layout == "mixformer":
        layer, embed, final, head = (lambda i: f"layers.{i + 1}"), "layers.0.wte", f"layers.{L + 1}.ln", f"layers.{L + 1}.linear"
        extra = {"model_type": "mixformer-sequential", "architectures": ["MixFormerSequentialForCausalLM"]}
    else:
        layer, embed, final, head = (lambda i: f"transformer.h.{i}"), "transformer.embd.wte", "lm_head.ln", "lm_head.linear"
        extra = {"model_type": "phi-msft", "architectures": ["PhiForCausalLM"], "n_head_kv": None}
    out = {f"{embed}.weight": sd["model.embed_tokens.weight"]}
    for i in range(L):
        p, q = layer(i), f"model.layers.{i}"
        for kind in ("weight", "bias"):
            out[f"{p}.ln.{kind}"] = sd[f"{q}.input_layernorm.{kind}"]
            out[f"{p}.mixer.Wqkv.{kind}"] = _fused(sd, i, kind)
            out[f"{p}.mixer.out_proj.{kind}"] = sd[f"{q}.self_attn.dense.{kind}"]
            out[f"{p}.mlp.fc1.{kind}"] = sd[f"{q}.mlp.fc1.{kind}"]
            out[f"{p}.mlp.fc2.{kind}"] = sd[f"{q}.mlp.fc2.{kind}"]
        out[f"{p}.mixer.rotary_emb.inv_freq"] = torch.zeros(4)  # a buffer old exporters saved; must be ignored
    for kind in ("weight", "bias"):
        out[f"{final}.{kind}"] = sd[f"model.final_layernorm.{kind}"]
        out[f"{head}.{kind}"] = sd[f"lm_head.{kind}"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    config = {
        **extra, "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": L, "n_head": cfg.num_attention_heads,
        "n_inner": cfg.intermediate_size, "rotary_dim": int(head_dim * cfg.rope_parameters["partial_rotary_factor"]),
        "n_positions": 64, "layer_norm_epsilon": cfg.layer_norm_eps, "activation_function": "gelu_new",
        "pad_vocab_size_multiple": 1, "tie_word_embeddings": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().numpy() for k, v in out.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["mixformer", "phi-msft"])
def test_older_layouts_import(tmp_path, layout):
    hf = random_hf_model(*SHAPES["3heads"])
    write_old_layout(hf, tmp_path, layout)
    assert "model.embed_tokens.weight" not in read_tensors(tmp_path)
    ids = ids_for(101)
    np.testing.assert_allclose(np.asarray(from_hf(tmp_path)(jnp.asarray(ids)).logits), hf_logits(hf, ids), atol=1e-4)


def test_mixformer_vocab_padding_is_applied(tmp_path):
    """MixFormer pads the embedding rows up to pad_vocab_size_multiple; the config's vocab_size is the unpadded one."""
    hf = random_hf_model(128, 48, 3, 1, 96, 0.5)
    write_old_layout(hf, tmp_path, "mixformer")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100, "pad_vocab_size_multiple": 64}))
    assert from_hf(tmp_path).cfg.vocab_size == 128


# --- bad checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    random_hf_model(*SHAPES["3heads"]).save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _rewrite(directory, edit):
    tensors = read_tensors(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(good_dir):
    _rewrite(good_dir, lambda t: t.pop("model.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"missing tensor 'model.layers.1.mlp.fc2.bias' \(expected shape \(48,\)\)"):
        from_hf(good_dir)


def test_unexpected_tensor_is_named(good_dir):
    _rewrite(good_dir, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((2, 3), np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model.layers.0.extra.weight' with shape \(2, 3\)"):
        from_hf(good_dir)


def test_wrong_shape_names_both_shapes(good_dir):
    _rewrite(good_dir, lambda t: t.update({"model.layers.0.mlp.fc1.weight": np.zeros((95, 48), np.float32)}))
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.fc1.weight' has shape \(95, 48\), expected \(96, 48\)"):
        from_hf(good_dir)


def test_not_a_phi_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"model.layers.0.self_attn.o_proj.weight": np.zeros((8, 8), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="not a Phi checkpoint: model_type='llama'"):
        from_hf(tmp_path)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        from_hf(tmp_path / "nope")
    with pytest.raises(ConversionError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        from_hf(tmp_path)


def test_truncated_safetensors_is_named(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="model.safetensors: cannot read"):
        from_hf(good_dir)


def test_unsupported_variants_are_refused(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    for edit, msg in (({"num_key_value_heads": 1}, "grouped-query"), ({"qk_layernorm": True}, "qk_layernorm"),
                      ({"hidden_act": "relu"}, "activation 'relu'")):
        (good_dir / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ConversionError, match=msg):
            from_hf(good_dir)


# --- command line -------------------------------------------------------------------------------------------------


def test_cli_import_then_export_round_trips(good_dir, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "phi1_jax.convert", *a], capture_output=True, text=True)  # noqa: E731
    r = run("import", f"--hf-dir={good_dir}", f"--out={tmp_path / 'ckpt'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ckpt" / checkpoint.CONFIG_FILE).exists()
    r = run("export", f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    a, b = read_tensors(good_dir), read_tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    r = run("import", f"--hf-dir={good_dir}", f"--out={tmp_path / 'ckpt'}")  # never overwrites a checkpoint
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("import", f"--hf-dir={tmp_path / 'missing'}", f"--out={tmp_path / 'x'}")
    assert r.returncode == 2 and "missing: not a directory" in r.stderr
