"""Hugging Face interop, both ways: `from_hf(dir) -> Phi` and `to_hf(model, dir)`.

Command:
  python -m phi1_jax.convert import --hf-dir=HF_DIR --out=CKPT_DIR   # Hugging Face -> phi1_jax checkpoint
  python -m phi1_jax.convert export --checkpoint=CKPT_DIR --out=HF_DIR  # phi1_jax checkpoint -> Hugging Face

Three on-disk layouts are read (phi-1 was published in each over time):
  phi          transformers' `PhiForCausalLM`: model.embed_tokens, model.layers.{i}.self_attn.{q,k,v}_proj/dense,
               model.layers.{i}.mlp.fc{1,2}, model.layers.{i}.input_layernorm, model.final_layernorm, lm_head.
  mixformer    `MixFormerSequentialForCausalLM`: layers.0.wte, layers.{1..L}.{ln, mixer.Wqkv, mixer.out_proj,
               mlp.fc1, mlp.fc2}, head at layers.{L+1}.{ln, linear}.
  phi-msft     remote-code `PhiForCausalLM`: transformer.embd.wte, transformer.h.{i}.*, lm_head.{ln, linear}.
Fused `Wqkv` rows are q, then k, then v (each d_model rows). Every layout is first renamed into the `phi` key space;
then one strict check compares names and shapes with what the config implies, and only then is a model built.
Nothing is half-loaded: any missing, unexpected or misshapen tensor raises `ConversionError` naming it.

torch `Linear` weights are [out, in]; phi1_jax kernels are [in, ...out] (see the table `_PARAM_MAP`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from phi1_jax import cli, files
from phi1_jax.errors import UserError
from phi1_jax.model import Phi, PhiConfig, abstract_model


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


# Buffers some exporters saved that carry no weights (recomputed from the config).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------------------------------
# Reading a directory
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (a Hugging Face checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no 'weight_map' object")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ConversionError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ConversionError(f"{directory}: no *.safetensors (or pytorch_model*.bin) weight files")


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 through ml_dtypes), keyed by name."""
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(directory):
        if f.suffix == ".bin":
            try:
                import torch
            except ImportError:
                raise ConversionError(f"{f}: reading .bin checkpoints needs torch; convert it to safetensors") from None
            state = torch.load(f, map_location="cpu", weights_only=True)
            items = {k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
                     for k, v in state.items()}
        else:
            try:
                with safe_open(f, framework="numpy") as fh:
                    items = {k: fh.get_tensor(k) for k in fh.keys()}
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise ConversionError(f"{f}: cannot read safetensors file ({e})") from None
        for k, v in items.items():
            if k in tensors:
                raise ConversionError(f"{f}: tensor {k!r} also appears in another weight file")
            tensors[k] = v
    return tensors


# ---------------------------------------------------------------------------------------------------------------------
# Layouts: config.json -> PhiConfig, and renaming into the `phi` key space
# ---------------------------------------------------------------------------------------------------------------------


def _get(hf: dict, *names, default=None, where=""):
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    if default is not None:
        return default
    raise ConversionError(f"{where}config.json has none of {list(names)}")


def _detect_layout(hf_config: dict, keys) -> str:
    model_type = hf_config.get("model_type")
    if model_type == "phi":
        return "phi"
    if model_type == "mixformer-sequential":
        return "mixformer"
    if model_type == "phi-msft":
        return "phi-msft"
    keys = set(keys)
    if "model.embed_tokens.weight" in keys and "model.final_layernorm.weight" in keys:
        return "phi"
    if "layers.0.wte.weight" in keys:
        return "mixformer"
    if "transformer.embd.wte.weight" in keys:
        return "phi-msft"
    sample = sorted(keys)[:5]
    raise ConversionError(
        f"not a Phi checkpoint: model_type={model_type!r} and tensor names like {sample} match none of the layouts "
        "phi (transformers PhiForCausalLM), mixformer-sequential, phi-msft"
    )


def _phi_config(hf: dict, layout: str) -> PhiConfig:
    """PhiConfig from a config.json of any of the three layouts."""
    where = f"[{layout}] "
    if layout == "phi":
        d = _get(hf, "hidden_size", where=where)
        n = _get(hf, "num_attention_heads", where=where)
        kv = hf.get("num_key_value_heads") or n
        if kv != n:
            raise ConversionError(f"config.json: num_key_value_heads={kv} != num_attention_heads={n}; "
                                  "grouped-query attention is not supported (phi-1 does not use it)")
        if hf.get("qk_layernorm"):
            raise ConversionError("config.json: qk_layernorm=true is not supported (phi-1 does not use it)")
        if hf.get("tie_word_embeddings"):
            raise ConversionError("config.json: tie_word_embeddings=true is not supported (phi-1's head is untied)")
        act = hf.get("hidden_act", "gelu_new")
        rope = hf.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ConversionError(f"config.json: rope scaling {rope or hf.get('rope_scaling')} is not supported")
        layers, mlp, vocab = hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
        eps, max_len = hf.get("layer_norm_eps", 1e-5), hf.get("max_position_embeddings", 2048)
        drops = dict(embed_dropout=hf.get("embd_pdrop", 0.0), resid_dropout=hf.get("resid_pdrop", 0.0),
                     attn_dropout=hf.get("attention_dropout") or 0.0)
    else:  # mixformer and phi-msft share the GPT-2-style names
        arch = hf.get("architecture") or {}
        mixer = arch.get("mixer", {}) if isinstance(arch, dict) else {}
        d = _get(hf, "n_embd", where=where)
        n = _get(hf, "n_head", where=where)
        kv = hf.get("n_head_kv") or n
        if kv != n:
            raise ConversionError(f"config.json: n_head_kv={kv} != n_head={n}; grouped-query attention is not supported")
        act = hf.get("activation_function", "gelu_new")
        factor = None
        rot = hf.get("rotary_dim", mixer.get("rotary_dim"))
        if rot is None:
            raise ConversionError(f"{where}config.json has no rotary_dim")
        theta = hf.get("rotary_base", mixer.get("rotary_base", 10000.0))
        layers = _get(hf, "n_layer", where=where)
        mlp = hf.get("n_inner") or 4 * d
        pad = hf.get("pad_vocab_size_multiple", 64)
        vocab = -(-_get(hf, "vocab_size", where=where) // pad) * pad  # their embedding rows are padded up
        eps, max_len = hf.get("layer_norm_epsilon", 1e-5), hf.get("n_positions", 2048)
        drops = dict(embed_dropout=hf.get("embd_pdrop", 0.0), resid_dropout=hf.get("resid_pdrop", 0.0),
                     attn_dropout=hf.get("attn_pdrop", 0.0))
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ConversionError(f"config.json: activation {act!r} is not supported (phi-1 uses gelu_new)")
    head_dim = d // n
    rotary_dim = int(head_dim * factor) if factor is not None else int(rot)
    try:
        return PhiConfig(
            vocab_size=int(vocab), num_layers=int(layers), d_model=int(d), num_heads=int(n), head_dim=head_dim,
            mlp_dim=int(mlp), rotary_dim=rotary_dim, rope_theta=float(theta), max_seq_len=int(max_len),
            layer_norm_eps=float(eps), **{k: float(v) for k, v in drops.items()},
        )
    except ValueError as e:
        raise ConversionError(f"config.json describes no valid Phi model: {e}") from None


def _fused_renames(cfg: PhiConfig, prefix_of_layer, embed, final_ln, head):
    """{source name: phi name, or ('Wqkv', i, kind)} for the two layouts with a fused Wqkv."""
    m = {f"{embed}.weight": "model.embed_tokens.weight"}
    for i in range(cfg.num_layers):
        p, q = prefix_of_layer(i), f"model.layers.{i}"
        for kind in ("weight", "bias"):
            m[f"{p}.ln.{kind}"] = f"{q}.input_layernorm.{kind}"
            m[f"{p}.mixer.Wqkv.{kind}"] = ("Wqkv", i, kind)
            m[f"{p}.mixer.out_proj.{kind}"] = f"{q}.self_attn.dense.{kind}"
            m[f"{p}.mlp.fc1.{kind}"] = f"{q}.mlp.fc1.{kind}"
            m[f"{p}.mlp.fc2.{kind}"] = f"{q}.mlp.fc2.{kind}"
    for kind in ("weight", "bias"):
        m[f"{final_ln}.{kind}"] = f"model.final_layernorm.{kind}"
        m[f"{head}.{kind}"] = f"lm_head.{kind}"
    return m


def _renames(cfg: PhiConfig, layout: str) -> dict:
    if layout == "phi":
        return {k: k for k in expected_shapes(cfg)}
    if layout == "mixformer":
        last = cfg.num_layers + 1
        return _fused_renames(cfg, lambda i: f"layers.{i + 1}", "layers.0.wte", f"layers.{last}.ln", f"layers.{last}.linear")
    return _fused_renames(cfg, lambda i: f"transformer.h.{i}", "transformer.embd.wte", "lm_head.ln", "lm_head.linear")


def expected_shapes(cfg: PhiConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of a transformers PhiForCausalLM with this config."""
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}"
        shapes.update({f"{q}.input_layernorm.weight": (d,), f"{q}.input_layernorm.bias": (d,)})
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes.update({f"{q}.self_attn.{proj}.weight": (d, d), f"{q}.self_attn.{proj}.bias": (d,)})
        shapes.update({f"{q}.mlp.fc1.weight": (f, d), f"{q}.mlp.fc1.bias": (f,),
                       f"{q}.mlp.fc2.weight": (d, f), f"{q}.mlp.fc2.bias": (d,)})
    shapes.update({"model.final_layernorm.weight": (d,), "model.final_layernorm.bias": (d,),
                   "lm_head.weight": (v, d), "lm_head.bias": (v,)})
    return shapes


def _source_shape(target, cfg: PhiConfig):
    if isinstance(target, tuple):  # fused Wqkv
        return (3 * cfg.d_model, cfg.d_model) if target[2] == "weight" else (3 * cfg.d_model,)
    return expected_shapes(cfg)[target]


def to_phi_layout(tensors: dict[str, np.ndarray], cfg: PhiConfig, layout: str) -> dict[str, np.ndarray]:
    """Checks names and shapes strictly, then renames (and splits fused Wqkv) into the `phi` key space."""
    renames = _renames(cfg, layout)
    present = {k for k in tensors if not _IGNORED.match(k)}
    problems = []
    for k in sorted(set(renames) - present):
        problems.append(f"missing tensor {k!r} (expected shape {_source_shape(renames[k], cfg)})")
    for k in sorted(present - set(renames)):
        problems.append(f"unexpected tensor {k!r} with shape {tuple(tensors[k].shape)}")
    for k in sorted(present & set(renames)):
        want, got = _source_shape(renames[k], cfg), tuple(tensors[k].shape)
        if want != got:
            problems.append(f"tensor {k!r} has shape {got}, expected {want}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"checkpoint ({layout} layout) does not match its config.json:\n  " + "\n  ".join(shown))
    out = {}
    for src, target in renames.items():
        if isinstance(target, tuple):
            _, i, kind = target
            q, k, v = np.split(tensors[src], 3, axis=0)  # rows: q, then k, then v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"model.layers.{i}.self_attn.{name}.{kind}"] = part
        else:
            out[target] = tensors[src]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# phi key space <-> phi1_jax parameters
# ---------------------------------------------------------------------------------------------------------------------


def _param_map(cfg: PhiConfig):
    """[(phi name, phi1_jax path, hf->jax, jax->hf)]: the one table both directions use."""
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    transpose = (lambda w: w.T, lambda w: w.T)  # torch [out, in] <-> [in, out]
    qkv_w = (lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T)  # [N*H, D] <-> [D, N, H]
    qkv_b = (lambda b: b.reshape(n, h), lambda b: b.reshape(n * h))
    dense_w = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)  # [D, N*H] <-> [N, H, D]
    rows = [("model.embed_tokens.weight", ("embed",), *same)]
    for i in range(cfg.num_layers):
        q, p = f"model.layers.{i}", ("layers", i)
        rows += [
            (f"{q}.input_layernorm.weight", p + ("ln", "scale"), *same),
            (f"{q}.input_layernorm.bias", p + ("ln", "bias"), *same),
            *[(f"{q}.self_attn.{proj}.weight", p + ("attn", proj, "kernel"), *qkv_w) for proj in ("q_proj", "k_proj", "v_proj")],
            *[(f"{q}.self_attn.{proj}.bias", p + ("attn", proj, "bias"), *qkv_b) for proj in ("q_proj", "k_proj", "v_proj")],
            (f"{q}.self_attn.dense.weight", p + ("attn", "dense", "kernel"), *dense_w),
            (f"{q}.self_attn.dense.bias", p + ("attn", "dense", "bias"), *same),
            (f"{q}.mlp.fc1.weight", p + ("mlp", "fc1", "kernel"), *transpose),
            (f"{q}.mlp.fc1.bias", p + ("mlp", "fc1", "bias"), *same),
            (f"{q}.mlp.fc2.weight", p + ("mlp", "fc2", "kernel"), *transpose),
            (f"{q}.mlp.fc2.bias", p + ("mlp", "fc2", "bias"), *same),
        ]
    rows += [
        ("model.final_layernorm.weight", ("final_ln", "scale"), *same),
        ("model.final_layernorm.bias", ("final_ln", "bias"), *same),
        ("lm_head.weight", ("lm_head", "kernel"), *transpose),
        ("lm_head.bias", ("lm_head", "bias"), *same),
    ]
    return rows


def model_from_phi_tensors(phi_tensors: dict[str, np.ndarray], cfg: PhiConfig) -> Phi:
    """Builds the model from tensors already checked against `expected_shapes(cfg)`; no random init is run."""
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    for name, path, to_jax, _ in _param_map(cfg):
        var = flat[path]
        value = to_jax(np.asarray(phi_tensors[name]))
        assert value.shape == var.shape, (name, value.shape, var.shape)
        flat[path] = var.replace(jnp.asarray(value, dtype=var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_to_phi_tensors(model: Phi, dtype=None) -> dict[str, np.ndarray]:
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for name, path, _, to_hf_fn in _param_map(model.cfg):
        value = np.asarray(jax.device_get(flat[path][...]))
        if dtype is not None:
            value = value.astype(dtype)
        out[name] = np.ascontiguousarray(to_hf_fn(value))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def from_hf(path: str | os.PathLike, *, dtype: str = "float32", attention_impl: str = "xla") -> Phi:
    """Reads a Hugging Face Phi checkpoint directory (any of the three layouts) and returns the phi1_jax model.

    `path` is a local directory (`phi1_jax.loader.open` takes hub ids and fetches them first). `dtype` is the compute
    dtype; the weights are stored in fp32 whatever the file holds, so a bf16 checkpoint is upcast exactly.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    hf_config = _read_json(directory / "config.json")
    tensors = read_tensors(directory)
    layout = _detect_layout(hf_config, tensors.keys())
    cfg = _phi_config(hf_config, layout)
    cfg = PhiConfig(**{**cfg.to_dict(), "dtype": dtype, "param_dtype": "float32", "attention_impl": attention_impl})
    return model_from_phi_tensors(to_phi_layout(tensors, cfg, layout), cfg)


def hf_config_dict(cfg: PhiConfig, torch_dtype: str = "float32") -> dict:
    factor = cfg.rotary_dim / cfg.head_dim
    if int(cfg.head_dim * factor) != cfg.rotary_dim:  # transformers recovers rotary_dim as int(head_dim * factor)
        raise ConversionError(f"rotary_dim={cfg.rotary_dim} of head_dim={cfg.head_dim} has no exact partial_rotary_factor")
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu_new",
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embed_dropout,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "qk_layernorm": False,
        # transformers >= 5 reads rope_parameters; 4.x reads the two top-level keys.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
        "partial_rotary_factor": factor,
        "rope_theta": cfg.rope_theta,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def to_hf(model: Phi, path: str | os.PathLike, *, dtype: str = "float32") -> None:
    """Writes a directory that `transformers.PhiForCausalLM.from_pretrained` loads (config.json + model.safetensors).

    Each file is whole or absent (`phi1_jax.files`): an interrupted export leaves no file that looks complete.
    """
    if dtype not in _NP_DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = model_to_phi_tensors(model, _NP_DTYPES[dtype])
    config = hf_config_dict(model.cfg, torch_dtype=dtype)
    with files.replacing(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    files.write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phi1_jax.convert",
        description="Convert between Hugging Face Phi checkpoints and phi1_jax checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory (phi, mixformer or phi-msft layout) -> phi1_jax checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="phi1_jax checkpoint directory to create (must not exist)")
    exp = sub.add_parser("export", help="phi1_jax checkpoint -> Hugging Face PhiForCausalLM directory")
    exp.add_argument("--checkpoint", required=True, help="phi1_jax checkpoint directory")
    exp.add_argument("--out", required=True, help="output directory for config.json + model.safetensors")
    exp.add_argument("--dtype", default="float32", choices=sorted(_NP_DTYPES), help="dtype of the exported weights")
    args = parser.parse_args(argv)

    from phi1_jax import checkpoint  # Orbax is only needed by the command line

    if args.command == "import":
        model = from_hf(args.hf_dir)
        checkpoint.save_model(args.out, model)
        print(f"wrote phi1_jax checkpoint {args.out} ({model.cfg.num_layers} layers, d_model {model.cfg.d_model})")
    else:
        model = checkpoint.load_model(args.checkpoint)
        to_hf(model, args.out, dtype=args.dtype)
        print(f"wrote Hugging Face checkpoint {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
