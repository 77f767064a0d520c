"""puzzle.py: the search space, the candidates' initialisations, BLD, replace-1-block scores, the
MIP against brute force, assembly, FFN Fusion, the stages end to end (resume, re-solve, a crashed
stage), DDP == one process, and one-line errors for bad input."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ffn_fusion
import puzzle
import puzzle_io
import runtime
from checkpoint import load_config, load_model, save_model
from data import DataConfig, load_tokenizer, prepare
from model import BlockConfig, ModelConfig, Transformer, count_params, kv_bytes_per_token
from runtime import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny models gain nothing from a second thread, and on a machine shared with other jobs the
# threads' barriers make every small op wait: these tests run single-threaded (restored after).
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
TINY = ["--seq_len=32", "--device_batch_size=4", "--bld_batch_size=4", "--bld_tokens=1536", "--calib_tokens=256",
        "--bld_eval_tokens=256", "--score_tokens=256", "--cost_batch_size=2", "--cost_prompt_len=4",
        "--cost_new_tokens=4", "--cost_repeats=1", "--compile=False", "--device=cpu", "--ffn_round=8",
        "--bld_warmup_steps=1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_parent(layers=3, heads=4, kv=2, hidden=32, ffn=64, seed=0, vocab=768):
    torch.manual_seed(seed)
    cfg = ModelConfig.llama(num_layers=layers, num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                            hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=64)
    m = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and larger residual writes than the init's, so swaps matter
        for name, p in m.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(8)
    return m.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("puzzle")
    data = str(d / "data")
    prepare(DataConfig(out_dir=data, pretrain_tokens=30_000, pretrain_val_tokens=6_000, tokenizer_chars=40_000, vocab_size=640,
                       sft_train=40, sft_val=10, rl_train=10, val_per_k=2, test_per_k=2, test_chat=2))
    parent = str(d / "parent")
    save_model(tiny_parent(), parent)
    load_tokenizer(data).save(parent)
    hf_parent = str(d / "parent_hf")  # the same weights as a Hugging Face LlamaForCausalLM folder
    save_model(load_model(parent), hf_parent, fmt="hf")
    load_tokenizer(data).save(hf_parent)
    return {"data": data, "parent": parent, "hf_parent": hf_parent, "root": d}


def cfg_for(world, out_dir, *flags, parent=None):
    return parse_config(puzzle.PuzzleConfig, TINY + [f"--parent={parent or world['parent']}",
                                                     f"--data_dir={world['data']}", f"--out_dir={out_dir}", *flags])


def run_cli(*flags, timeout=240, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "puzzle.py"), *flags], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------------------------------------
# Search space

def test_search_space_from_the_parent():
    pcfg = tiny_parent(layers=1).config
    space = puzzle.search_space(pcfg, puzzle.PuzzleConfig(ffn_round=8))
    assert [s["name"] for s in space["attention"]] == ["gqa_kv2", "gqa_kv1", "linear", "no_op"]
    # 0.87 * 64 = 55.7 -> 56, 0.75 -> 48, 0.5 -> 32, 0.25 -> 16, 0.1 -> 6.4 -> 8
    assert [s["name"] for s in space["ffn"]] == ["swiglu_64", "swiglu_56", "swiglu_48", "swiglu_32", "swiglu_16",
                                                 "swiglu_8", "linear", "no_op"]
    big = ModelConfig.llama(num_layers=1, num_key_value_heads=8, intermediate_size=1024, num_attention_heads=32,
                            hidden_size=256)
    s = puzzle.search_space(big, puzzle.PuzzleConfig(ffn_fractions="0.5,0.999", ffn_round=256, linear=False))
    assert [x["name"] for x in s["attention"]] == ["gqa_kv8", "gqa_kv4", "gqa_kv2", "gqa_kv1", "no_op"]
    assert [x["name"] for x in s["ffn"]] == ["swiglu_1024", "swiglu_512", "no_op"]  # 0.999 rounds to the parent's
    for flags, msg in ((dict(kv_heads="4"), "must be 1 to 1, fewer than the parent's 2"),
                       (dict(kv_heads="2"), "fewer than the parent's 2"),
                       (dict(kv_heads="1,x"), "comma-separated ints"),
                       (dict(ffn_fractions="0.5,1.2"), "1.2 is outside (0, 1)"),
                       (dict(ffn_fractions="0"), "outside (0, 1)")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            puzzle.search_space(pcfg, puzzle.PuzzleConfig(**flags))
    six = ModelConfig.llama(num_layers=1, num_key_value_heads=6, intermediate_size=64, num_attention_heads=6,
                            hidden_size=48)
    with pytest.raises(ConfigError, match="4 KV heads do not divide the parent's 6 query heads"):
        puzzle.search_space(six, puzzle.PuzzleConfig(kv_heads="4"))
    assert [x["kv_heads"] for x in puzzle.search_space(six, puzzle.PuzzleConfig())["attention"][:4]] == [6, 3, 2, 1]


# ------------------------------------------------------------------------------------------------
# Initialisations and the parent's activations

def _input(parent, B=2, T=12, seed=0, same_token=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, parent.config.vocab_size, (B, T), generator=g)
    if same_token:
        x = x[:, :1].expand(B, T).contiguous()
    return x, torch.ones_like(x), torch.arange(T).expand(B, T)


def test_parent_pass_is_the_forward():
    parent = tiny_parent()
    x, doc, pos = _input(parent)
    rope, acts, h = puzzle.parent_pass(parent, x, doc, pos)
    assert torch.allclose(h, parent(x, doc, pos, head=False), atol=1e-6)
    layer = parent.model.layers[1]
    h_in, a = acts[1]["attention"]
    h_mid, f = acts[1]["ffn"]
    assert torch.allclose(layer.attention_block(h_in, rope, doc), h_mid, atol=1e-6)
    assert torch.allclose(layer.ffn_block(h_mid), h_mid + f, atol=1e-6)


def test_initialisations():
    parent = tiny_parent(layers=1)
    pcfg, layer = parent.config, parent.model.layers[0]
    space = puzzle.search_space(pcfg, puzzle.PuzzleConfig(ffn_round=8))
    spec = {s["name"]: s for sub in puzzle.SUBS for s in space[sub]}
    x, doc, pos = _input(parent, same_token=True)
    rope, acts, _ = puzzle.parent_pass(parent, x, doc, pos)
    stats = puzzle.calibrate(parent, [(x, doc, pos)], lstsq=False)
    h_in, a = acts[0]["attention"]
    h_mid, f = acts[0]["ffn"]
    # Linear attention = W_o W_v (V expanded over groups): exact when every token sees copies of itself.
    lin = puzzle.init_candidate(pcfg, layer, "attention", spec["linear"], stats[0], "product")
    assert torch.allclose(puzzle.contribution(lin, "attention", h_in, rope, doc), a, atol=1e-5)
    # Mean-pooled KV heads: exact when the heads of a group were equal already.
    with torch.no_grad():
        for w in (layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight):
            w.view(2, 8, -1)[1] = w.view(2, 8, -1)[0]
    x2, doc2, pos2 = _input(parent, seed=1)
    rope2, acts2, _ = puzzle.parent_pass(parent, x2, doc2, pos2)
    kv1 = puzzle.init_candidate(pcfg, layer, "attention", spec["gqa_kv1"], stats[0], "product")
    assert torch.allclose(puzzle.contribution(kv1, "attention", acts2[0]["attention"][0], rope2, doc2),
                          acts2[0]["attention"][1], atol=1e-5)
    w = torch.randn(4 * 8, 5)  # 4 KV heads of 8 dims, 8 query heads: pooling to 2 = mean of heads {0,1}, {2,3}
    pooled = puzzle.pool_kv_heads(w, 8, 4, 2).view(2, 8, 5)
    assert torch.allclose(pooled[1], w.view(4, 8, 5)[2:].mean(0), atol=1e-6)
    # FFN pruning keeps the channels of highest contribution: with channels that contribute nothing
    # (zero columns of W_down) the pruned FFN equals the parent's.
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 1::2] = 0
    stats = puzzle.calibrate(parent, [(x2, doc2, pos2)], lstsq=False)
    assert set(torch.topk(stats[0]["chan"], 32).indices.tolist()) == set(range(0, 64, 2))
    half = puzzle.init_candidate(pcfg, layer, "ffn", spec["swiglu_32"], stats[0], "product")
    _, acts2, _ = puzzle.parent_pass(parent, x2, doc2, pos2)
    h_mid, f = acts2[0]["ffn"]
    assert torch.allclose(puzzle.contribution(half, "ffn", h_mid, None, None), f, atol=1e-5)
    lin_ffn = puzzle.init_candidate(pcfg, layer, "ffn", spec["linear"], stats[0], "product")
    assert torch.allclose(lin_ffn.mlp.linear_mlp.weight, layer.mlp.down_proj.weight @ layer.mlp.up_proj.weight)
    # Least squares recovers a linear map exactly.
    X, A = torch.randn(200, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(puzzle.lstsq_weight(X.T @ X, X.T @ (X @ A.T)).double(), A, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# BLD and scores

def test_bld_lowers_every_candidates_loss(world, tmp_path):
    cfg = cfg_for(world, tmp_path, "--bld_tokens=4096", "--bld_lr=5e-4")
    pcfg = load_config(world["parent"])
    parent = load_model(world["parent"]).eval().requires_grad_(False)
    tok = puzzle_io.parent_tokenizer(cfg, pcfg)
    data = puzzle_io.load_data(cfg, pcfg, tok)
    space = puzzle.search_space(pcfg, cfg)
    log = puzzle.MetricsLog(str(tmp_path / "m.jsonl"))
    cands, init, final, info = puzzle.train_library(cfg, pcfg, parent, space, data["train"], data["val"],
                                                    tok.bos_id, runtime.setup_dist("cpu"), log)
    assert info["steps"] == 4096 // (4 * 32) and len(cands) == 3 * (2 + 6)
    assert all(final[k] < init[k] for k in cands), {k: (init[k], final[k]) for k in cands if final[k] >= init[k]}
    rec = puzzle.library_record(space, init, final, 3)
    assert rec["attention"][0]["no_op"] == {"init_loss": 1.0, "final_loss": 1.0, "trained": False}
    assert rec["ffn"][2]["swiglu_64"]["final_loss"] == 0.0
    # The normalised MSE is the bld_loss of the outputs: recompute one by hand.
    x, doc, pos = puzzle.heldout_batches(data["val"], cfg, 64, 5, tok.bos_id, "cpu")[0]
    rope, acts, _ = puzzle.parent_pass(parent, x, doc, pos)
    key = (1, "ffn", "swiglu_32")
    out = puzzle.contribution(cands[key], "ffn", acts[1]["ffn"][0], rope, doc)
    assert abs(puzzle.evaluate_bld(parent, {key: cands[key]}, [(x, doc, pos)])[key]
               - puzzle.bld_loss(acts[1]["ffn"][1], out)) < 1e-9
    assert puzzle.bld_loss(acts[1]["ffn"][1], torch.zeros_like(out)) == 1.0


def test_replace1_score_is_the_kl_of_the_swapped_model(world):
    parent = tiny_parent()
    pcfg = parent.config
    space = puzzle.search_space(pcfg, puzzle.PuzzleConfig(ffn_round=8))
    stats = puzzle.calibrate(parent, [_input(parent)], lstsq=False)
    cfg = puzzle.PuzzleConfig(ffn_round=8)
    mods = puzzle.build_candidates(cfg, pcfg, parent, space, stats)
    batches = [_input(parent, seed=s) for s in (3, 4)]
    kl = puzzle.replace1_kl_scores(parent, space, mods, batches, runtime.setup_dist("cpu"))
    tensors = {f"layers.{l}.{sub}.{n}.{p}": t for (l, sub, n), m in mods.items() for p, t in m.state_dict().items()}
    L = pcfg.num_hidden_layers
    for key in ((1, "attention", "gqa_kv1"), (0, "ffn", "swiglu_16"), (2, "attention", "no_op"), (1, "ffn", "linear")):
        l, sub, name = key
        choice = {s: [space[s][0]["name"]] * L for s in puzzle.SUBS}
        choice[sub][l] = name
        swapped = puzzle.assemble_model(parent, space, tensors, choice)
        full = puzzle.model_kl(swapped, parent, batches, "cpu")
        assert full > 1e-6 and abs(kl[key] - full) <= 1e-5 * max(1.0, full), (key, kl[key], full)
    same = puzzle.assemble_model(parent, space, tensors, {s: [space[s][0]["name"]] * L for s in puzzle.SUBS})
    assert puzzle.model_kl(same, parent, batches, "cpu") < 1e-9  # the parent's own choices reassemble the parent


# ------------------------------------------------------------------------------------------------
# MIP

def _brute_force(slots, time_budget, memory_budget, exclude=(), max_shared=None):
    best = None
    for combo in itertools.product(*[range(len(s)) for s in slots]):
        if time_budget is not None and sum(slots[i][j]["time"] for i, j in enumerate(combo)) > time_budget:
            continue
        if memory_budget is not None and sum(slots[i][j]["memory"] for i, j in enumerate(combo)) > memory_budget:
            continue
        if any(sum(a == b for a, b in zip(combo, prev)) > max_shared for prev in exclude):
            continue
        score = sum(slots[i][j]["score"] for i, j in enumerate(combo))
        if best is None or score < best[0]:
            best = (score, list(combo))
    return best


def test_mip_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(12):
        # 3 layers x (3 attention, 3 FFN) options, the first of each the "parent" (score 0, dearest)
        slots = []
        for _ in range(6):
            slots.append([{"score": 0.0, "time": 1.0, "memory": 1.0}]
                         + [{"score": float(rng.uniform(0.01, 1)), "time": float(rng.uniform(0, 0.9)),
                             "memory": float(rng.uniform(0, 0.9))} for _ in range(2)])
        time_budget = float(rng.uniform(1.5, 5)) if trial % 3 != 1 else None
        memory_budget = float(rng.uniform(1.5, 5)) if trial % 3 != 0 else None
        sols = puzzle.solve_mip(slots, time_budget, memory_budget, n_solutions=2, diversity=0.5)
        ref = _brute_force(slots, time_budget, memory_budget)
        if ref is None:
            assert sols == []
            continue
        assert sols[0] == ref[1], (trial, sols[0], ref)
        if len(sols) > 1:  # the second: the best sharing at most floor(0.5 * 6) = 3 choices with the first
            second = _brute_force(slots, time_budget, memory_budget, exclude=[sols[0]], max_shared=3)
            assert sols[1] == second[1]
            assert sum(a == b for a, b in zip(sols[0], sols[1])) <= 3
    # infeasible: nothing fits a budget below the cheapest options
    slots = [[{"score": 0.0, "time": 1.0, "memory": 1.0}, {"score": 1.0, "time": 0.5, "memory": 0.5}]] * 2
    assert puzzle.solve_mip(slots, time_budget=0.9) == []
    assert puzzle.solve_mip(slots, time_budget=1.0) == [[1, 1]]
    assert puzzle.solve_mip(slots, time_budget=1.0, objective="time") == [[1, 1]]


def test_predicted_memory_counts_what_the_model_holds():
    pcfg = tiny_parent().config
    space = puzzle.search_space(pcfg, puzzle.PuzzleConfig(ffn_round=8))
    cands = {sub: {s["name"]: dict(zip(("params", "kv_elements_per_token"), puzzle.candidate_sizes(pcfg, sub, s)),
                                   decode_step_s=0.0) for s in space[sub]} for sub in puzzle.SUBS}
    costs = {"fixed": {"decode_step_s": 0.0, "params": puzzle.layer_free_params(pcfg)}, "candidates": cands,
             "batch_size": 3, "context": 10}
    choice = {"attention": ["gqa_kv2", "no_op", "linear"], "ffn": ["swiglu_56", "linear", "no_op"]}
    specs = {sub: {s["name"]: s for s in space[sub]} for sub in puzzle.SUBS}
    child = puzzle.arch_config(pcfg, [specs["attention"][n] for n in choice["attention"]],
                               [specs["ffn"][n] for n in choice["ffn"]])
    p = puzzle.predict(costs, choice, 2)
    assert p["params"] == count_params(child) and p["kv_bytes_per_token"] == kv_bytes_per_token(child, 2)
    assert p["memory_bytes"] == 2 * count_params(child) + 3 * 10 * kv_bytes_per_token(child, 2)
    parent = puzzle.predict(costs, {s: [space[s][0]["name"]] * 3 for s in puzzle.SUBS}, 2)
    assert parent["params"] == count_params(pcfg)


# ------------------------------------------------------------------------------------------------
# FFN Fusion

def test_ffn_fusion_identity_and_the_fused_model_works(world, tmp_path):
    torch.manual_seed(0)
    blocks = [BlockConfig("gqa", 2, "swiglu", None, 48), BlockConfig("no_op", None, "swiglu", None, 32),
              BlockConfig("no_op", None, "no_op", None, None), BlockConfig("no_op", None, "swiglu", None, 16),
              BlockConfig("gqa", 1, "swiglu", None, 24), BlockConfig("linear", None, "swiglu", None, 40)]
    cfg = ModelConfig(vocab_size=768, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                      block_configs=blocks)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    assert ffn_fusion.ffn_runs(cfg) == [[0, 1, 3]]
    assert ffn_fusion.ffn_runs(ModelConfig(block_configs=[BlockConfig("no_op", None, "swiglu", None, 8)] * 2
                                       + [BlockConfig("no_op", None, "linear", None, None)]
                                       + [BlockConfig("no_op", None, "swiglu", None, 8)] * 2)) == [[0, 1], [3, 4]]
    fused = ffn_fusion.fuse_ffns(model, [[0, 1, 3]])
    assert fused.config.num_hidden_layers == 3  # layers 1, 2, 3 disappear into layer 0
    b0 = fused.config.block_configs[0]
    assert (b0.attention, b0.ffn, fused.config.ffn_width(0)) == ("gqa", "swiglu", 48 + 32 + 16)
    x = torch.randn(2, 5, 32)
    want = sum(puzzle.contribution(model.model.layers[j], "ffn", x, None, None) for j in (0, 1, 3))
    got = puzzle.contribution(fused.model.layers[0], "ffn", x, None, None)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.equal(fused.model.layers[0].post_attention_layernorm.weight, torch.ones(32))
    # the layers after the group are the old layers 4 and 5, unchanged
    idx = torch.randint(0, 768, (1, 7))
    assert torch.equal(fused.model.layers[2].mlp.down_proj.weight, model.model.layers[5].mlp.down_proj.weight)
    save_model(fused, str(tmp_path / "fused"))
    again = load_model(str(tmp_path / "fused"))
    assert torch.allclose(again(idx), fused(idx), atol=1e-6)
    out = again.generate([[1, 2, 3]], 5, temperature=0.0)
    assert len(out[0]) == 5
    # the dependency measure: 0 for a block reading the run's first input (itself), in [0, 2] otherwise
    inputs = ffn_fusion.ffn_inputs(model, [_input(model)])
    assert abs(ffn_fusion.ffn_dependency(model, inputs, 0, 0)) < 1e-6
    assert 0 <= ffn_fusion.ffn_dependency(model, inputs, 0, 3) <= 2
    groups, deps = ffn_fusion.choose_fusion_groups(model, [_input(model)], threshold=2.0)
    assert groups == [[0, 1, 3]] and set(deps) == {"0->1", "0->3"}
    assert ffn_fusion.choose_fusion_groups(model, [_input(model)], threshold=0.0)[0] == []


# ------------------------------------------------------------------------------------------------
# The stages end to end, re-solving, crashes, DDP, errors

def _memory(pcfg, frac):
    return int(frac * (2 * count_params(pcfg) + 2 * 8 * kv_bytes_per_token(pcfg, 2)))


def test_end_to_end_resolve_and_errors(world, tmp_path):
    """All stages in a subprocess from a Hugging Face Llama folder, then --stage=mip re-solves."""
    out = tmp_path / "p"
    pcfg = load_config(world["hf_parent"])
    common = TINY + [f"--parent={world['hf_parent']}", f"--data_dir={world['data']}", f"--out_dir={out}"]
    r = run_cli(*common, "--target_speedup=0", f"--max_memory_bytes={_memory(pcfg, 0.85)}", "--export_hf=True",
                "--ffn_fusion=True", "--fusion_threshold=2.0")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("library.json", "library.safetensors", "scores.json", "costs.json", "mip.json", "assemble.json",
              "layout.txt", "layout.png", "bld.txt", "bld_loss.png", "metrics.jsonl"):
        assert (out / f).is_file(), f
    lib, mip, asm = (json.load(open(out / f)) for f in ("library.json", "mip.json", "assemble.json"))
    assert lib["bld"]["steps"] == 1536 // 128
    sol = mip["solutions"][0]
    assert sol["memory_bytes"] <= _memory(pcfg, 0.85) and len(mip["solutions"]) >= 2
    assert asm["child"]["kl"] > 0 and asm["control"]["memory_bytes"] <= _memory(pcfg, 0.85)
    assert asm["control"]["predicted_speedup"] >= sol["predicted_speedup"] * (1 - 1e-9)
    assert len(set(asm["control"]["attention"])) == 1 and len(set(asm["control"]["ffn"])) == 1
    child = load_model(str(out / "child"))  # native, with the tokenizer: sample.py / distill.py read it
    assert load_tokenizer(str(out / "child")).n_vocab == 640
    # the child was timed against the parent before acceptance (no target: one round)
    assert len(asm["retime"]) == 1 and asm["child"]["measured_speedup"] == asm["retime"][0]["measured_speedup"] > 0
    assert child.config.num_hidden_layers == 3 - sum(len(g) - 1 for g in asm["fusion"]["groups"])
    hf = load_model(str(out / "child_hf"))  # the DeciLM export: the same layers, the same function
    assert puzzle_io.layout_rows(hf.config) == puzzle_io.layout_rows(child.config)
    assert torch.allclose(hf(torch.tensor([[1, 2, 3]])), child(torch.tensor([[1, 2, 3]])), atol=1e-6)
    assert len(child.generate([[1, 2, 3]], 4, temperature=0.0)[0]) == 4
    assert load_model(str(out / "homogeneous")).config.num_hidden_layers == 3
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert any("bld_train_loss" in r for r in rows) and any(r.get("stage") == "score" for r in rows)

    # --stage=mip: a new constraint re-solves from the saved stages and re-assembles.
    r = run_cli(*common, "--stage=mip", "--target_speedup=0", f"--max_memory_bytes={_memory(pcfg, 0.72)}")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("library", "score", "cost"):
        assert f"{name}: using the saved result" in r.stderr
    mip2 = json.load(open(out / "mip.json"))
    assert mip2["solutions"][0]["memory_bytes"] <= _memory(pcfg, 0.72) < sol["memory_bytes"]
    assert json.load(open(out / "library.json"))["id"] == lib["id"]
    asm2 = json.load(open(out / "assemble.json"))
    assert asm2["settings"]["inputs"]["mip"] == mip2["id"] and "fusion" not in asm2
    assert load_model(str(out / "child")).config.num_hidden_layers == 3
    # --stage=all with nothing changed redoes nothing
    flags = ["--target_speedup=0", f"--max_memory_bytes={_memory(pcfg, 0.72)}"]
    state = puzzle.main(cfg_for(world, out, *flags, parent=world["hf_parent"]))
    assert state["assemble"]["id"] == asm2["id"] and state["library"]["id"] == lib["id"]

    # Infeasible constraints: the best achievable value; the saved MIP stays as it was.
    with pytest.raises(ConfigError, match="--max_memory_bytes=1,000: .* the smallest predicted memory is"):
        puzzle.main(cfg_for(world, out, "--stage=mip", "--target_speedup=0", "--max_memory_bytes=1000",
                            parent=world["hf_parent"]))
    # (1e9x: out of reach whatever the tiny eager probes measured on a busy machine)
    with pytest.raises(ConfigError, match=r"--target_speedup=1000000000.0: .* best predicted decode speed-up "
                                          r"within --max_memory_bytes=.* is \d"):
        puzzle.main(cfg_for(world, out, "--stage=mip", "--target_speedup=1e9", *flags[1:], parent=world["hf_parent"]))
    r = run_cli(*common, "--stage=mip", "--target_speedup=1e9")
    one_line_error(r, "--target_speedup=1000000000.0", "best predicted decode speed-up is")
    assert json.load(open(out / "mip.json"))["id"] == mip2["id"]
    load_model(str(out / "child"))


def test_bad_input_errors(world, tmp_path):
    bad = tmp_path / "bad"
    (tmp_path / "notadecoder").mkdir()
    (tmp_path / "notadecoder" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    base = [f"--data_dir={world['data']}", f"--out_dir={bad}"]
    parse = lambda *f: parse_config(puzzle.PuzzleConfig, [*base, *f])
    from model import CheckpointError
    with pytest.raises(ConfigError, match="--parent=.*nope: no such folder"):
        parse(f"--parent={tmp_path / 'nope'}")
    with pytest.raises(CheckpointError, match="no config.json"):
        parse(f"--parent={world['data']}")
    with pytest.raises(CheckpointError, match="missing field"):
        parse(f"--parent={tmp_path / 'notadecoder'}")
    ok = f"--parent={world['parent']}"
    for flags, msg in ((["--kv_heads=3"], "fewer than the parent's 2"),
                       (["--ffn_fractions=0.5,1.5"], "1.5 is outside"),
                       (["--stage=train"], "all, library, score, cost, mip, assemble"),
                       (["--stage=mip", "--until=score"], "comes before --stage=mip"),
                       (["--seq_len=128"], "exceeds the parent's context of 64"),
                       (["--bld_batch_size=6", "--device_batch_size=4"], "multiple of --device_batch_size"),
                       (["--target_speedup=0"], "needs a constraint"),
                       (["--diversity=0"], "diversity"),
                       (["--linear_init=lsq"], "product, lstsq")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            parse(ok, *flags)
    with pytest.raises(ConfigError, match="--stage=mip needs the library stage's results"):
        puzzle.main(cfg_for(world, bad, "--stage=mip"))
    hetero = tmp_path / "hetero"
    m = Transformer(ModelConfig(vocab_size=768, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                                block_configs=[BlockConfig("gqa", 2, "swiglu", None, 64),
                                               BlockConfig("no_op", None, "swiglu", None, 64)]))
    save_model(m, str(hetero))
    with pytest.raises(ConfigError, match="plain Llama .* layer 1 is no_op"):
        parse(f"--parent={hetero}")
    # the command line: one line, exit code 2, nothing written
    one_line_error(run_cli(f"--parent={tmp_path / 'notadecoder'}", *base), "missing field")
    one_line_error(run_cli(ok, "--kv_heads=4", *base), "--kv_heads='4'", "fewer than the parent's 2")
    assert not bad.exists() or not os.listdir(bad)


def test_a_crashed_stage_leaves_the_previous_one_loadable(world, tmp_path, monkeypatch):
    out = tmp_path / "c"
    flags = ["--until=score", "--bld_tokens=512"]

    def crash(*a, **k):
        raise RuntimeError("killed during scoring")
    monkeypatch.setattr(puzzle, "replace1_kl_scores", crash)
    with pytest.raises(RuntimeError, match="killed"):
        puzzle.main(cfg_for(world, out, *flags))
    lib = json.load(open(out / "library.json"))
    assert not (out / "scores.json").exists() and not [f for f in os.listdir(out) if f.startswith(".tmp")]
    monkeypatch.undo()
    state = puzzle.main(cfg_for(world, out, *flags))  # resumes: the library is loaded, not retrained
    assert state["library"]["id"] == lib["id"] and (out / "scores.json").is_file()
    tensors = load_file(str(out / "library.safetensors"))
    assert tensors.keys() == state["library"]["tensors"].keys()
    # a changed BLD budget makes the saved library stale: --stage=all redoes it (and the scores)
    state = puzzle.main(cfg_for(world, out, "--until=score", "--bld_tokens=1024"))
    assert state["library"]["id"] != lib["id"] and state["score"]["settings"]["inputs"]["library"] == state["library"]["id"]


def test_ddp_two_processes_equal_one(world, tmp_path):
    env = ENV
    common = TINY + [f"--parent={world['parent']}", f"--data_dir={world['data']}", "--until=score",
                     "--bld_batch_size=8", "--device_batch_size=2", "--bld_tokens=2048", "--score_tokens=512"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "puzzle.py", *common, f"--out_dir={tmp_path / 'A'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 micro-step(s) x 2 process(es)" in r.stderr
    r = run_cli(*common, f"--out_dir={tmp_path / 'B'}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 micro-step(s) x 1 process(es)" in r.stderr
    a, b = load_file(str(tmp_path / "A" / "library.safetensors")), load_file(str(tmp_path / "B" / "library.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    sa, sb = (json.load(open(tmp_path / d / "scores.json"))["scores"] for d in "AB")
    for sub in puzzle.SUBS:
        for ra, rb in zip(sa[sub], sb[sub]):
            assert all(abs(ra[k] - rb[k]) <= 1e-4 * max(1e-3, abs(rb[k])) for k in ra)


def test_accept_child_resolves_when_measured_falls_short(monkeypatch):
    """A child measured slower than accept_frac x target makes the MIP solve again with the target
    raised by predicted / measured; the fastest measured child is kept."""
    cfg = puzzle.PuzzleConfig(target_speedup=1.6, accept_frac=0.94, retime_rounds=3)
    measured = iter([1.2, 1.55])            # the first child falls short, the second passes
    targets = []
    monkeypatch.setattr(puzzle, "assemble_model", lambda parent, space, tensors, sol: sol["name"])
    monkeypatch.setattr(puzzle, "time_child", lambda cfg, parent, child: {
        "measured_speedup": next(measured), "parent_decode_tokens_per_s": 1.0, "child_decode_tokens_per_s": 1.0,
        "spread": 0.01})

    def fake_mip(c, space, scores, costs, L, n):
        targets.append(c.target_speedup)
        return [{"name": "second", "predicted_speedup": c.target_speedup}], {}
    monkeypatch.setattr(puzzle, "mip_solutions", fake_mip)
    pcfg = type("P", (), {"num_hidden_layers": 2})()
    sol, child, rounds = puzzle.accept_child(cfg, pcfg, None, None, {"tensors": None}, None, None,
                                             {"name": "first", "predicted_speedup": 1.6})
    assert targets == [pytest.approx(1.6 * 1.6 / 1.2)]
    assert child == "second" and [r["measured_speedup"] for r in rounds] == [1.2, 1.55]
    # never reaching the bar, each re-solved child measured faster: all rounds are tried, the fastest kept
    measured = iter([1.2, 1.3, 1.4])
    targets.clear()
    sol, child, rounds = puzzle.accept_child(cfg, pcfg, None, None, {"tensors": None}, None, None,
                                             {"name": "first", "predicted_speedup": 1.6})
    assert len(rounds) == 3 and child == "second" and len(targets) == 2 and rounds[2]["measured_speedup"] == 1.4
    # a child predicted faster but measured slower: the timings are noise, the rounds stop, the fastest is kept
    measured = iter([1.3, 1.1, 1.2])
    targets.clear()
    sol, child, rounds = puzzle.accept_child(cfg, pcfg, None, None, {"tensors": None}, None, None,
                                             {"name": "first", "predicted_speedup": 1.6})
    assert len(rounds) == 2 and child == "first" and len(targets) == 1
