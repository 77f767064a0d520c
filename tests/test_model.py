"""model.py: the heterogeneous decoder against Hugging Face's Llama, the KV cache against
recomputation, the LN-Super / LN-Ultra layouts, and bad checkpoints."""
import base64
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import config_from_dict, load_config, load_model, save_model
from model import (BlockConfig, CheckpointError, ModelConfig, Transformer, count_params, kv_bytes_per_token,
                   sample_next)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses run the scripts as a user would: on CPU with the PyTorch references, not with the
# Triton interpreter that tests/conftest.py switches on for the kernel tests.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
ASSETS = os.path.join(ROOT, "..", "shared", "assets")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def write_byte_tokenizer(folder):
    """A valid tiktoken ranks file: the 256 single bytes (Llama 3's specials follow at 256+)."""
    with open(os.path.join(folder, "tokenizer.model"), "w") as f:
        for i in range(256):
            f.write(f"{base64.b64encode(bytes([i])).decode()} {i}\n")


def hf_llama(folder, kv_heads=2, tied=False, old_style=False, seed=0):
    """Save a random LlamaForCausalLM with transformers; optionally rewrite its config.json in the
    older style (top-level rope_theta / rope_scaling) that transformers < 5 wrote."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=500000.0,
                                 rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=256,
                                 tie_word_embeddings=tied, initializer_range=0.15, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(c).eval()
    hf.save_pretrained(folder)
    if old_style:
        p = os.path.join(folder, "config.json")
        d = json.load(open(p))
        rp = d.pop("rope_parameters")
        d["rope_theta"] = rp.pop("rope_theta")
        d["rope_scaling"] = rp
        json.dump(d, open(p, "w"))
    return hf


@pytest.mark.parametrize("kv_heads,tied,old_style", [(2, False, False), (4, True, False),
                                                     (1, False, True), (2, True, True)])
def test_matches_transformers_logits_and_greedy_generation(tmp_path, kv_heads, tied, old_style):
    """Logits to 1e-5, greedy tokens of model.generate (batched, different prompt lengths) and of
    the sample.py command line equal transformers' for GQA / MHA, tied / untied, both configs."""
    hf = hf_llama(tmp_path, kv_heads, tied, old_style)
    check_sample_cli(hf, tmp_path)
    cfg = load_config(str(tmp_path))
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.tie_word_embeddings == tied
    assert cfg.kv_heads(0) == kv_heads
    model = load_model(str(tmp_path)).eval()
    idx = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(idx).logits, model(idx)
    assert (ref - ours).abs().max() < 1e-5
    prompts = [idx[0, :9].tolist(), idx[1, :3].tolist()]  # different lengths in one batch
    ours = model.generate(prompts, 24, temperature=0)
    for p, o in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o == ref
        assert len(set(o)) > 3  # the comparison is not between two constant sequences


def check_sample_cli(hf, folder, n=20):
    from data import load_tokenizer
    write_byte_tokenizer(folder)
    tok = load_tokenizer(str(folder))
    ids, _ = tok.render_chat([{"role": "user", "content": "3+5+2="}], reasoning="on", add_generation_prompt=True)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=tok.stop_ids)[0, len(ids):].tolist()
    if ref and ref[-1] in tok.stop_ids:
        ref = ref[:-1]
    assert len(set(ref)) > 3
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={folder}", "--prompt=3+5+2=", "--reasoning=on",
                        "--temperature=0", f"--max_new_tokens={n}", "--seed=1", "--dtype=float32"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(ref)
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={folder}", "--dtype=fp8"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--dtype='fp8': must be one of auto, float32, bfloat16, float16" in r.stderr, r.stderr


def test_export_uniform_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig.llama(num_layers=2, num_key_value_heads=2, intermediate_size=80, vocab_size=300,
                            hidden_size=64, num_attention_heads=4, rope_scaling=dict(LLAMA3_SCALING),
                            max_position_embeddings=128)
    model = Transformer(cfg).eval()
    save_model(model, str(tmp_path), fmt="hf", max_shard_bytes=200_000)  # forces several shards
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-5
    again = load_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def hetero_config(**kw):
    blocks = [BlockConfig("gqa", 1, "swiglu", None, 72),       # MHA
              BlockConfig("no_op", None, "swiglu", None, 40),  # attention removed
              BlockConfig("gqa", 4, "linear"),                 # 1 KV head, linear FFN
              BlockConfig("linear", None, "no_op"),            # linear attention, no FFN
              BlockConfig("gqa", 2, "swiglu", None, 56)]
    return ModelConfig(vocab_size=97, hidden_size=48, num_attention_heads=4, block_configs=blocks,
                       max_position_embeddings=96, **kw)


def test_cached_generation_equals_recomputation_heterogeneous():
    torch.manual_seed(0)
    model = Transformer(hetero_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # larger weights: varied, input-dependent greedy continuations
    prompts = [[5, 17, 3, 60, 2, 9, 11], [40, 41], [7, 7, 8, 1, 2]]
    outs = model.generate(prompts, 25, temperature=0)
    for p, o in zip(prompts, outs):
        seq = list(p)
        with torch.no_grad():
            for _ in range(25):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq[len(p):]
    assert any(len(set(o)) > 3 for o in outs)


def test_stop_tokens_per_row_and_seeded_sampling():
    torch.manual_seed(0)
    model = Transformer(hetero_config()).eval()
    prompts = [[1, 2, 3]] * 6
    a = model.generate(prompts, 30, temperature=1.0, seed=123)
    b = model.generate(prompts, 30, temperature=1.0, seed=123)
    c = model.generate(prompts, 30, temperature=1.0, seed=124)
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # rows sample independently from one prompt
    stop = a[0][4]
    s = model.generate(prompts, 30, temperature=1.0, seed=123, stop_ids=[stop])
    for full, cut in zip(a, s):  # same stream until each row's own first stop token
        k = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:k]


def test_sample_next_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, 0, None, None, g), greedy)
    assert torch.equal(sample_next(logits, 1.0, 1, None, g), greedy)
    assert torch.equal(sample_next(logits, 1.0, None, 1e-6, g), greedy)
    draws = torch.stack([sample_next(logits, 1.0, 3, None, g) for _ in range(200)])
    top3 = logits.topk(3, -1).indices
    assert all(bool((top3[r] == draws[:, r, None]).any(-1).all()) for r in range(4))


def test_kv_bytes_scale_with_attention_layers():
    cfg = hetero_config()
    # gqa layers: 4, 1 and 2 KV heads of dim 12; K and V at 2 bytes
    assert kv_bytes_per_token(cfg) == (4 + 1 + 2) * 12 * 2 * 2
    cfg.block_configs[0] = BlockConfig("no_op", None, "swiglu", None, 72)
    assert kv_bytes_per_token(cfg) == (1 + 2) * 12 * 2 * 2


def test_heterogeneous_roundtrip_native_and_decilm(tmp_path):
    torch.manual_seed(0)
    model = Transformer(hetero_config(tie_word_embeddings=True)).eval()
    idx = torch.randint(0, 97, (2, 20))
    for fmt in ("native", "hf"):
        folder = tmp_path / fmt
        save_model(model, str(folder), fmt=fmt)
        d = json.load(open(folder / "config.json"))
        assert d["model_type"] == ("nano-nemotron" if fmt == "native" else "nemotron-nas")
        again = load_model(str(folder))
        assert count_params(again.config) == sum(p.numel() for p in again.parameters())
        with torch.no_grad():
            assert torch.equal(again(idx), model(idx))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith("model.layers.1.self_attn") or n.startswith("model.layers.1.input_layernorm")
                   for n in names)  # a no_op sub-block has no tensors at all
    assert "model.layers.3.self_attn.linear_attn.weight" in names
    assert "model.layers.2.mlp.linear_mlp.weight" in names


@pytest.mark.skipif(not os.path.exists(os.path.join(ASSETS, "nemotron-super-49b-v1.config.json")),
                    reason="LN-Super config not in ../shared/assets")
def test_released_layouts():
    r = subprocess.run([sys.executable, "model.py", os.path.join(ASSETS, "nemotron-super-49b-v1.config.json")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "params: 49867145216" in lines and "attention_layers: 49" in lines
    assert "kv_bytes_per_token: 200704" in lines  # 49 layers * 8 heads * 128 * 2 (K,V) * 2 bytes
    ultra = load_config(os.path.join(ASSETS, "nemotron-ultra-253b-v1.config.json"))
    assert count_params(ultra) == 253_401_268_224
    assert ultra.num_hidden_layers == 162
    with torch.device("meta"):  # the modules agree with the closed-form count
        m = Transformer(load_config(os.path.join(ASSETS, "nemotron-super-49b-v1.config.json")))
    assert sum(p.numel() for p in m.parameters()) == 49_867_145_216


def decilm_dict(**over):
    d = {"model_type": "nemotron-nas", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4,
         "num_hidden_layers": 2, "rope_theta": 10000.0,
         "block_configs": [{"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
                            "ffn": {"ffn_mult": 1.5, "no_op": False, "replace_with_linear": False}}] * 2}
    d.update(over)
    return d


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="num_hidden_layers=3 but there are 2 block_configs"):
        config_from_dict(decilm_dict(num_hidden_layers=3))
    with pytest.raises(ValueError, match="unknown kind 'mamba'"):
        ModelConfig(block_configs=[BlockConfig("mamba")])
    with pytest.raises(ValueError, match="unknown key 'window_size'"):
        config_from_dict(decilm_dict(block_configs=[{"attention": {"window_size": 3}, "ffn": {"ffn_mult": 1.0}}] * 2))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        config_from_dict({"vocab_size": 10, "num_attention_heads": 2, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_dict(decilm_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_bad_checkpoints_never_load_partially(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    save_model(Transformer(hetero_config()), str(tmp_path))
    w = tmp_path / "model.safetensors"
    good = load_file(str(w))

    def expect(state, pattern):
        save_file(state, str(w))
        with pytest.raises(ValueError, match=pattern):
            load_model(str(tmp_path))

    expect({k: v for k, v in good.items() if k != "model.layers.2.self_attn.k_proj.weight"},
           r"missing tensors \(1\): \['model.layers.2.self_attn.k_proj.weight'\]")
    expect({**good, "model.layers.1.self_attn.q_proj.weight": torch.zeros(48, 48)},
           r"unexpected tensors \(1\): \['model.layers.1.self_attn.q_proj.weight'\]")
    expect({**good, "model.layers.4.mlp.up_proj.weight": torch.zeros(57, 48)},
           r"model.layers.4.mlp.up_proj.weight: shape \[57, 48\]")
    os.remove(w)
    torch.save(good, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never pickles"):
        load_model(str(tmp_path))


def test_prompt_longer_than_context():
    model = Transformer(hetero_config()).eval()
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        model.generate([[1] * 90], 10)


def test_cached_prefill_respects_doc_ids_of_left_padding():
    """A left-padded row must give the same continuation as the same prompt alone."""
    torch.manual_seed(0)
    model = Transformer(hetero_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    alone = model.generate([[3, 4, 5]], 12, temperature=0)
    padded = model.generate([[3, 4, 5], list(range(1, 20))], 12, temperature=0)
    assert padded[0] == alone[0]


def test_sampling_arguments_are_checked():
    model = Transformer(hetero_config()).eval()
    for kw, msg in ((dict(top_k=0), "top_k must be >= 1"), (dict(top_p=0.0), "top_p must be in"),
                    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(max_new_tokens=0), "positive")):
        args = dict(max_new_tokens=4, temperature=1.0) | kw
        with pytest.raises(ValueError, match=msg):
            model.generate([[1, 2]], **args)


def test_vocab_limit_and_global_rng_untouched():
    torch.manual_seed(0)
    model = Transformer(hetero_config()).eval()
    outs = model.generate([[1, 2, 3]] * 8, 20, temperature=2.0, seed=0, vocab_limit=10)
    assert all(t < 10 for o in outs for t in o)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model.generate([[1, 2]], 3, temperature=1.0)  # seed=None: a fresh seed, not the global RNG's
    assert torch.equal(torch.rand(3), expected)


def test_top_k_keeps_exactly_k_on_ties():
    logits = torch.zeros(1, 6)
    g = torch.Generator().manual_seed(0)
    assert len({int(sample_next(logits, 1.0, 1, None, g)) for _ in range(30)}) == 1  # one survivor


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    torch.manual_seed(0)
    model = Transformer(hetero_config())
    save_model(model, str(tmp_path))

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_model(Transformer(hetero_config()), str(tmp_path))
    monkeypatch.undo()
    again = load_model(str(tmp_path))  # the earlier checkpoint is whole
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_more_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    save_model(Transformer(hetero_config()), str(tmp_path), max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    first, second = sorted(set(index["weight_map"].values()))[:2]
    a, b = load_file(str(tmp_path / first)), load_file(str(tmp_path / second))
    dup = next(iter(a))
    save_file({**b, dup: a[dup]}, str(tmp_path / second))
    with pytest.raises(ValueError, match=f"tensor {dup} is in both"):
        load_model(str(tmp_path))
    (tmp_path / second).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"ffn: unknown key 'weird'"):
        config_from_dict(decilm_dict(block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0, "weird": 1}}] * 2))
    with pytest.raises(ValueError, match=r"llama3 scaling needs \['low_freq_factor'\]"):
        config_from_dict(decilm_dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}))
    with pytest.raises(ValueError, match="head_dim must be positive and even"):
        ModelConfig(head_dim=7, block_configs=[BlockConfig()])
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
        ModelConfig(max_position_embeddings=0, block_configs=[BlockConfig(intermediate_size=8)])


def test_hf_config_without_kv_heads_is_multi_head(tmp_path):
    """A Llama config.json without num_key_value_heads is plain multi-head attention (as in
    transformers): one KV head per query head, not a default or an error."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
         "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 48}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = load_config(str(tmp_path))
    assert all(b.attention == "gqa" for b in cfg.block_configs)
    assert kv_bytes_per_token(cfg) == kv_bytes_per_token(load_config_dict({**d, "num_key_value_heads": 4}, tmp_path))
    assert kv_bytes_per_token(cfg) == 2 * kv_bytes_per_token(load_config_dict({**d, "num_key_value_heads": 2}, tmp_path))


def load_config_dict(d, tmp_path):
    folder = tmp_path / f"kv{d['num_key_value_heads']}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return load_config(str(folder))
