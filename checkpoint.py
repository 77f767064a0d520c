"""
checkpoint.py: checkpoint IO for model.py's decoder, one module for every stage.

Three folder formats, read and written both ways:
    native:  config.json {"model_type": "nano-nemotron", ...ModelConfig} + model.safetensors
    Llama:   config.json {"architectures": ["LlamaForCausalLM"], ...} + model.safetensors
             (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    DeciLM:  config.json {"model_type": "nemotron-nas", "block_configs": [...]} (Llama-Nemotron's
             released LN-Nano/Super/Ultra) + safetensors
load_config(path) -> ModelConfig, load_model(path) -> Transformer, save_model(model, folder).
Weights are only ever read with safetensors and configs with json: loading a folder never runs code
from it. Every file is written atomically (configurator.atomic_write), so a killed save leaves the
previous checkpoint, never half of one. Training state (optimizer, step, RNG) is runtime.py's.

    python model.py PATH     # per-layer table of a config.json or checkpoint folder
"""
import json
import os
from dataclasses import fields

import torch

from configurator import atomic_write, read_json_object, remove_tmp_files, sniff_file
from model import BlockConfig, CheckpointError, ModelConfig, Transformer, ffn_mult_to_intermediate_size

# ------------------------------------------------------------------------------------------------
# Checkpoint formats
#   native:    config.json {"model_type": "nano-nemotron", ...ModelConfig} + model.safetensors
#   Llama:     config.json {"architectures": ["LlamaForCausalLM"], ...}    + model.safetensors
#              (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
#   DeciLM:    config.json {"model_type": "nemotron-nas", "block_configs": [...]} + safetensors
# All three use the same tensor names (our module names are Hugging Face's), so only the config
# differs. Weights are only ever read with safetensors (no pickle, no code from the folder).

def _rope_from_hf(d):
    """Both config.json styles: top-level rope_theta/rope_scaling (transformers < 5, the released
    Llama-Nemotron files) and the newer `rope_parameters` dict."""
    rp = d.get("rope_parameters")
    if rp:
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta, scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def config_from_dict(d, where="config.json"):
    """Any of the three formats -> ModelConfig. `where` names the file in error messages."""
    try:
        if d.get("model_type") == "nano-nemotron":
            keys = {f.name for f in fields(ModelConfig)}
            unknown = set(d) - keys - {"model_type"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            # a saved config states every size: a missing one must not fall back to a default
            missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "block_configs") if k not in d]
            if missing:
                raise ValueError(f"missing fields {missing}")
            return ModelConfig(**{k: v for k, v in d.items() if k in keys})
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
            if d.get(key) is None:
                raise ValueError(f"missing field {key!r}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias = true is not a Llama layout this model supports")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r}: only silu (SwiGLU) is supported")
        H, heads = d["hidden_size"], d["num_attention_heads"]
        theta, scaling = _rope_from_hf(d)
        common = dict(vocab_size=d["vocab_size"], hidden_size=H, num_attention_heads=heads,
                      head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                      rope_theta=theta, rope_scaling=scaling,
                      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                      max_position_embeddings=d.get("max_position_embeddings", 2048))
        if "block_configs" in d:  # DeciLM / nemotron-nas
            bcs = d["block_configs"]
            if len(bcs) != d["num_hidden_layers"]:
                raise ValueError(f"num_hidden_layers={d['num_hidden_layers']} but there are "
                                 f"{len(bcs)} block_configs")
            return ModelConfig(block_configs=[_block_from_decilm(b, i) for i, b in enumerate(bcs)], **common)
        kv = d.get("num_key_value_heads")
        kv = heads if kv is None else kv
        if kv <= 0 or heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        blocks = [BlockConfig("gqa", heads // kv, "swiglu", None, d["intermediate_size"])
                  for _ in range(d["num_hidden_layers"])]
        return ModelConfig(block_configs=blocks, **common)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _block_from_decilm(b, i):
    a, f = b.get("attention", {}), b.get("ffn", {})
    known_a = {"n_heads_in_group", "no_op", "replace_with_linear", "num_sink_tokens", "sparsify",
               "unshifted_sink", "use_prefill_window_in_sink_attention", "window_length"}
    for k in set(a) - known_a:
        raise ValueError(f"block_configs[{i}].attention: unknown key {k!r}")
    for k in ("window_length", "num_sink_tokens", "sparsify"):
        if a.get(k) is not None:
            raise ValueError(f"block_configs[{i}].attention.{k}={a[k]!r}: not supported (null in the released models)")
    if a.get("no_op"):
        attn, group = "no_op", None
    elif a.get("replace_with_linear"):
        attn, group = "linear", None
    else:
        attn, group = "gqa", a.get("n_heads_in_group")
    known_f = {"ffn_mult", "no_op", "replace_with_linear", "sparsify", "intermediate_size"}
    for k in set(f) - known_f:
        raise ValueError(f"block_configs[{i}].ffn: unknown key {k!r}")
    if f.get("sparsify") is not None:
        raise ValueError(f"block_configs[{i}].ffn.sparsify={f['sparsify']!r}: not supported (null in the released models)")
    if f.get("no_op"):
        ffn = "no_op"
    elif f.get("replace_with_linear"):
        ffn = "linear"
    else:
        ffn = "swiglu"
    return BlockConfig(attn, group, ffn, f.get("ffn_mult") if ffn == "swiglu" else None,
                       f.get("intermediate_size") if ffn == "swiglu" else None)


def config_to_hf_dict(cfg):
    """A uniform model exports as LlamaForCausalLM, a heterogeneous one as DeciLM."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                  num_hidden_layers=cfg.num_hidden_layers, rms_norm_eps=cfg.rms_norm_eps,
                  rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                  tie_word_embeddings=cfg.tie_word_embeddings,
                  max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
                  attention_bias=False, mlp_bias=False, torch_dtype="float32")
    b0 = cfg.block_configs[0]
    uniform = all(b.attention == "gqa" and b.ffn == "swiglu" and b.n_heads_in_group == b0.n_heads_in_group
                  and cfg.ffn_width(i) == cfg.ffn_width(0) for i, b in enumerate(cfg.block_configs))
    if uniform:
        return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                    num_key_value_heads=cfg.kv_heads(0), intermediate_size=cfg.ffn_width(0), **common)
    blocks = []
    for i, b in enumerate(cfg.block_configs):
        attn = {"no_op": b.attention == "no_op", "replace_with_linear": b.attention == "linear",
                "n_heads_in_group": b.n_heads_in_group if b.attention == "gqa" else None}
        ffn = {"no_op": b.ffn == "no_op", "replace_with_linear": b.ffn == "linear", "ffn_mult": None}
        if b.ffn == "swiglu":
            ffn["ffn_mult"] = b.ffn_mult
            # DeciLM's ffn_mult rounds widths up to multiples of 256. A width that is not such a
            # multiple (every nano width) is written as `intermediate_size` as well: this file
            # reads it back exactly, but tools that derive the width from ffn_mult alone (the
            # released DeciLM code, vLLM, llama.cpp) would build a wider FFN and fail to load it.
            if b.ffn_mult is None or ffn_mult_to_intermediate_size(b.ffn_mult, cfg.hidden_size) != cfg.ffn_width(i):
                ffn["ffn_mult"] = round(1.5 * cfg.ffn_width(i) / cfg.hidden_size, 6)
                ffn["intermediate_size"] = cfg.ffn_width(i)
        blocks.append({"attention": attn, "ffn": ffn})
    return dict(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", intermediate_size=None,
                num_key_value_heads=None, block_configs=blocks, **common)


def load_config(path):
    """path: a config.json file or a checkpoint folder containing one."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        what = "no such file or folder" if not os.path.exists(path) else "no config.json in it"
        raise CheckpointError(f"checkpoint {path}: {what}")
    kind = sniff_file(f)
    if kind not in ("a JSON file", "a text file"):
        raise CheckpointError(f"{f}: is {kind}, not a config.json; give the checkpoint folder (config.json + "
                              f"model.safetensors) or its config.json")
    return config_from_dict(read_json_object(f, CheckpointError), f)


def _weight_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isdir(single):
        raise CheckpointError(f"{single}: is a folder, not a safetensors weights file")
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' object ({e})") from None
        missing = [x for x in files if not os.path.isfile(os.path.join(folder, x))]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return [os.path.join(folder, x) for x in files]
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors weights are loaded, never pickles)")


def load_model(path, device="cpu", dtype=torch.float32):
    """Build the model on the meta device, check every tensor name and shape against the
    checkpoint, and only then materialise: a bad checkpoint never loads partially."""
    from safetensors import SafetensorError, safe_open
    cfg = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    found, where = {}, {}
    for f in _weight_files(path):
        try:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    if k in found:
                        raise CheckpointError(f"tensor {k} is in both {os.path.basename(where[k])} and "
                                         f"{os.path.basename(f)}")
                    found[k], where[k] = tuple(sf.get_slice(k).get_shape()), f
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        found.pop("lm_head.weight")  # some exports store the tied copy too; it is the same tensor
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    for k in sorted(set(expected) & set(found)):
        if expected[k] != found[k]:
            problems.append(f"{k}: shape {list(found[k])} in {os.path.basename(where[k])}, "
                            f"config expects {list(expected[k])}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))
    state = {}
    for f in _weight_files(path):
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    if k in expected:
                        t = sf.get_tensor(k)
                        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            bad = int((~torch.isfinite(t)).sum())
                            raise CheckpointError(f"{f}: tensor {k} holds {bad} non-finite values (NaN or inf)")
                        state[k] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    return model


def save_model(model, folder, fmt="native", max_shard_bytes=None, metadata=None):
    """Write config.json + model.safetensors (or shards + index when the weights exceed
    max_shard_bytes). fmt: "native" or "hf" (LlamaForCausalLM if uniform, else DeciLM).
    Each file goes through configurator.atomic_write (temporary name, fsync, rename), so a crash
    never leaves a half file; leftovers of an earlier save that was killed are removed first."""
    from safetensors.torch import save_file
    if fmt not in ("native", "hf"):
        raise ValueError(f"save_model: fmt must be 'native' or 'hf', got {fmt!r}")
    os.makedirs(folder, exist_ok=True)
    remove_tmp_files(folder)
    cfg = model.config
    conf = cfg.to_dict() if fmt == "native" else config_to_hf_dict(cfg)
    state = {k.removeprefix("_orig_mod."): v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # one storage, saved once (as Hugging Face does)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    written = []
    if len(shards) == 1:
        written.append("model.safetensors")
        atomic_write(os.path.join(folder, written[0]), lambda p: save_file(shards[0], p, meta))
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(os.path.join(folder, name), lambda p: save_file(shard, p, meta))
            weight_map.update({k: name for k in shard})
            written.append(name)
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append("model.safetensors.index.json")
        atomic_write(os.path.join(folder, written[-1]), json.dumps(index, indent=2))
    for stale in os.listdir(folder):  # weights of an earlier save must not mix with these
        if stale not in written and stale.startswith("model") and stale.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(folder, stale))
    atomic_write(os.path.join(folder, "config.json"), json.dumps(conf, indent=2))
