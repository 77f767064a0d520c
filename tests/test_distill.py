"""distill.py and the training runtime: DDP = single process, resume = straight run, the KD loss
against direct computations, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import distill
import runtime
from checkpoint import save_model
from data import DataConfig, load_token_shards, load_tokenizer, prepare
from model import ModelConfig, Transformer
from runtime import read_metrics, ConfigError, Dist, chunked_cross_entropy, chunked_kl, doc_ids_and_positions, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses run the scripts as a user would: on CPU with the PyTorch references, not with the
# Triton interpreter that tests/conftest.py switches on for the kernel tests.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=64", "--seq_len=32",
        "--device_batch_size=4", "--total_batch_size=256", "--eval_interval=0", "--seed=7",
        "--device=cpu", "--log_interval=1", "--warmup_steps=2", "--lr=3e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(DataConfig(out_dir=str(d), pretrain_tokens=30_000, pretrain_val_tokens=4_000, tokenizer_chars=40_000, vocab_size=640,
                       sft_train=40, sft_val=10, rl_train=10, val_per_k=2, test_per_k=2, test_chat=2))
    return str(d)


def run(data_dir, out_dir, *flags):
    cfg = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags])
    distill.main(cfg)
    return load_file(os.path.join(out_dir, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ddp_two_processes_equal_one(data_dir, tmp_path):
    """2 gloo processes x 2 micro-steps (no gradient sync on the first) == 1 process x 4."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    common = TINY + [f"--data_dir={data_dir}", "--max_steps=6", "--total_batch_size=512", "--tie_embeddings=True"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "distill.py", *common, f"--out_dir={tmp_path / 'A'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and "2 micro-steps" in r.stderr
    r = subprocess.run([sys.executable, "distill.py", *common, f"--out_dir={tmp_path / 'B'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 process(es)" in r.stderr and "4 micro-steps" in r.stderr
    a, b = load_file(str(tmp_path / "A" / "model.safetensors")), load_file(str(tmp_path / "B" / "model.safetensors"))
    assert max_diff(a, b) <= 1e-4
    torch.manual_seed(7)  # the weights both runs started from
    init = distill.build_student(parse_config(distill.DistillConfig, common + [f"--out_dir={tmp_path / 'C'}"]),
                                 load_tokenizer(data_dir).n_vocab)
    assert max_diff(a, {k: v for k, v in init.state_dict().items() if k in a}) > 1e-3  # and they trained
    rows = read_metrics(str(tmp_path / "A" / "metrics.jsonl"))
    logged = read_metrics(str(tmp_path / "B" / "metrics.jsonl"))
    assert all(r["tokens_per_s"] > 0 for r in rows)  # throughput is logged
    for ra, rb in zip(rows, logged):  # the logged loss is the global mean, not rank 0's share
        assert abs(ra["train_lm"] - rb["train_lm"]) < 1e-4


def test_resume_equals_straight_run(data_dir, tmp_path):
    straight = run(data_dir, tmp_path / "S", "--max_steps=6")
    run(data_dir, tmp_path / "R", "--max_steps=6", "--stop_after=3")
    half = load_file(str(tmp_path / "R" / "model.safetensors"))
    resumed = run(data_dir, tmp_path / "R", "--max_steps=6", "--resume=True")
    assert max_diff(straight, resumed) <= 1e-5
    assert max_diff(straight, half) > 1e-3  # the first invocation really stopped early
    steps = [r["step"] for r in read_metrics(str(tmp_path / "R" / "metrics.jsonl"), all_runs=True) if "train_lm" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run appended to the same log
    with pytest.raises(ConfigError, match="already at step 6"):
        run(data_dir, tmp_path / "R", "--max_steps=6", "--resume=True")
    with pytest.raises(ConfigError, match=r"settings changed: \['seed: 7 -> 8'\]"):
        run(data_dir, tmp_path / "R", "--max_steps=6", "--resume=True", "--seed=8")


def test_kd_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    ht = torch.randn(3, 11, 16, generator=g)
    ws = torch.randn(37, 16, generator=g, requires_grad=True)
    wt = torch.randn(37, 16, generator=g)
    T = 2.0
    ref = sum(F.softmax(ht[b, t] @ wt.T / T, -1) @ (F.log_softmax(ht[b, t] @ wt.T / T, -1)
                                                    - F.log_softmax(hs[b, t] @ ws.T / T, -1))
              for b in range(3) for t in range(11)) * T * T
    full = chunked_kl(hs, ws, ht, wt, T, chunk=10_000)
    chunked = chunked_kl(hs, ws, ht, wt, T, chunk=4)  # 33 rows in 9 chunks, the last one short
    assert torch.allclose(full, ref, rtol=1e-5) and torch.allclose(chunked, ref, rtol=1e-5)
    g_full = torch.autograd.grad(full, (hs, ws))
    g_chunk = torch.autograd.grad(chunked, (hs, ws))
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, atol=1e-5)
    y = torch.randint(0, 37, (3, 11), generator=g)
    y[0, :4] = -100
    ce = chunked_cross_entropy(hs, ws, y, chunk=5)
    assert torch.allclose(ce, F.cross_entropy((hs @ ws.T).flatten(0, 1), y.flatten(), reduction="sum"), rtol=1e-5)


def test_kd_moves_student_toward_teacher(data_dir, tmp_path):
    run(data_dir, tmp_path / "parent", "--max_steps=8", "--lr=2e-2")  # a teacher far from uniform
    child = tmp_path / "child"
    run(data_dir, child, "--max_steps=1", "--n_layer=1", "--lr=1e-9")  # a fresh 1-layer student
    kd = ["--teacher=" + str(tmp_path / "parent"), "--init_from=" + str(child), "--n_layer=1",
          "--eval_interval=4", "--lr=1e-2"]
    run(data_dir, tmp_path / "kd", "--max_steps=8", *kd)
    rows = read_metrics(str(tmp_path / "kd" / "metrics.jsonl"))
    val = [r for r in rows if "val_kl" in r]
    assert len(val) == 2 and val[-1]["val_kl"] < 0.8 * val[0]["val_kl"]
    assert "val_cos" in val[0] and all(k in rows[0] for k in ("train_kl", "train_cos"))
    assert distill.parse_layer_map("auto", 1, 2) == {0: 1}
    assert distill.parse_layer_map("auto", 4, 8) == {0: 1, 1: 3, 2: 5, 3: 7}
    assert distill.parse_layer_map("auto", 5, 2) == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}  # never layer -1
    assert distill.parse_layer_map("0:1,2:0", 3, 2) == {0: 1, 2: 0}
    with pytest.raises(ConfigError, match="out of range"):
        distill.parse_layer_map("0:2", 3, 2)


def test_kd_terms_of_a_step_match_direct_computation(data_dir, tmp_path):
    """loss_sums + normalisers against the formulas written out on full logits."""
    cfg = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}",
                                                      "--lm_weight=0.5", "--kd_temperature=2.0"])
    torch.manual_seed(0)
    student, teacher = distill.build_student(cfg, 768), distill.build_student(cfg, 768)
    x = torch.randint(0, 768, (2, 9))
    y = torch.randint(0, 768, (2, 9))
    y[0, 0] = -100
    doc, pos = torch.ones_like(x), torch.arange(9).expand(2, 9)
    parts = distill.loss_sums(student, teacher, x, y, doc, pos, cfg, {0: 1, 1: 0})
    (ls, hs), (lt, ht) = student(x, return_hidden=True), teacher(x, return_hidden=True)
    kl = (F.softmax(lt / 2, -1) * (F.log_softmax(lt / 2, -1) - F.log_softmax(ls / 2, -1))).sum() * 4
    cos = (1 - F.cosine_similarity(hs[0], ht[1], dim=-1)).sum() + (1 - F.cosine_similarity(hs[1], ht[0], dim=-1)).sum()
    lm = F.cross_entropy(ls.flatten(0, 1), y.flatten(), reduction="sum")
    for k, ref in (("kl", kl), ("cos", cos), ("lm", lm)):
        assert torch.allclose(parts[k], ref, rtol=1e-4), k
    assert distill.loss_weights(cfg, teacher) == {"kl": 1.0, "cos": 1.0, "lm": 0.5}
    assert distill.normalisers(18, 17) == {"kl": 18, "cos": 18, "lm": 17}


def test_windows_never_target_the_next_documents_bos():
    """A BOS target would ask the model to predict where the next packed document starts, which
    nothing in this document tells: such targets are ignored (-100); inputs keep every token."""
    bos = 5
    data = np.array([5, 1, 2, 3, 5, 4, 6, 5, 7, 8, 9], dtype=np.uint16)
    x, y, doc, pos = distill.windows(data, [0, 2], 6, bos, "cpu")
    assert x.tolist() == [[5, 1, 2, 3, 5, 4], [2, 3, 5, 4, 6, 5]]
    assert y.tolist() == [[1, 2, 3, -100, 4, 6], [3, -100, 4, 6, -100, 7]]
    assert doc.tolist() == [[1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 2]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 2, 0]]


def _direct_step_loss(model, train, offsets, seq_len, bos, mask=None):
    """The mean next-token loss over a step's windows in one pass, written out without
    distill.windows: targets that are a BOS, or that the shards' loss mask drops, do not count."""
    buf = torch.from_numpy(np.stack([np.asarray(train[o:o + seq_len + 1], dtype=np.int64) for o in offsets]))
    x, y = buf[:, :-1], buf[:, 1:]
    doc, pos = doc_ids_and_positions(x, bos)
    logits = model(x, doc, pos)
    keep = y != bos
    if mask is not None:
        keep &= torch.from_numpy(np.stack([np.asarray(mask[o + 1:o + seq_len + 1], dtype=bool) for o in offsets]))
    return F.cross_entropy(logits[keep], y[keep], reduction="sum") / keep.sum()


def test_step_gradient_is_the_token_mean_over_the_global_batch(data_dir, tmp_path):
    """The gradient accumulated over 4 micro-steps is the gradient of the token-mean loss over all
    16 windows of the step (AdamW and clipping would hide a factor such as the number of
    micro-steps, so the gradient itself is compared); and 2 processes x 2 micro-steps, averaged as
    DDP does, give the same gradient."""
    cfg = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}",
                                                      "--total_batch_size=512"])
    tok = load_tokenizer(data_dir)
    train = load_token_shards(os.path.join(data_dir, "pretrain_train"), n_vocab=tok.n_vocab)
    torch.manual_seed(0)
    model = distill.build_student(cfg, tok.n_vocab)
    params = list(model.parameters())
    step = 3
    offsets = distill.step_offsets(len(train), cfg.seed, step, 512 // cfg.seq_len, cfg.seq_len)
    ref_loss = _direct_step_loss(model, train, offsets, cfg.seq_len, tok.bos_id)
    ref = torch.autograd.grad(ref_loss, params)
    assert sum(int((np.asarray(train[o + 1:o + cfg.seq_len + 1]) == tok.bos_id).sum()) for o in offsets) > 0

    def grads(rank, world, accum):
        model.zero_grad(set_to_none=True)
        logged = distill.step_gradients(model, None, train, step, cfg, Dist(rank, rank, world, "cpu"), accum,
                                        tok.bos_id, {}, {"lm": 1.0})
        return [p.grad.clone() for p in params], float(logged["lm"])

    one, lm = grads(0, 1, 4)
    assert lm == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for a, b in zip(one, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), float((a - b).abs().max() / b.abs().max())
    (g0, lm0), (g1, lm1) = grads(0, 2, 2), grads(1, 2, 2)
    assert lm0 + lm1 == pytest.approx(float(ref_loss.detach()), rel=1e-5)   # each rank holds its share of the mean
    for a, b, r in zip(g0, g1, ref):
        assert torch.allclose((a + b) / 2, r, rtol=1e-4, atol=1e-7)
    # KD: KL and cosine terms are means over all positions of the global batch
    kd = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'k'}",
                                                     "--total_batch_size=512", "--kd_weight=0.7", "--cosine_weight=0.3"])
    torch.manual_seed(1)
    teacher = distill.build_student(kd, tok.n_vocab).requires_grad_(False)
    x, y, doc, pos = distill.windows(train, offsets, kd.seq_len, tok.bos_id, "cpu")
    layer_map = {0: 1, 1: 0}
    parts = distill.loss_sums(model, teacher, x, y, doc, pos, kd, layer_map)
    ref_kd = torch.autograd.grad(0.7 * parts["kl"] / x.numel() + 0.3 * parts["cos"] / x.numel(), params)
    model.zero_grad(set_to_none=True)
    logged = distill.step_gradients(model, teacher, train, step, kd, Dist(), 4, tok.bos_id, layer_map,
                                    distill.loss_weights(kd, teacher))
    assert float(logged["kl"]) == pytest.approx(float(parts["kl"].detach()) / x.numel(), rel=1e-5)
    for p, r in zip(params, ref_kd):
        assert torch.allclose(p.grad, r, rtol=1e-4, atol=1e-7)
    # end to end: the gradient norm distill.py logs for its first step (before clipping) is the
    # norm of the direct gradient, so no factor can hide between the micro-steps and the optimizer
    # fp32: the reference below is fp32, and "auto" picks bf16 on CPUs where it measures faster
    run(data_dir, tmp_path / "one", "--total_batch_size=512", "--max_steps=1", "--warmup_steps=0", "--precision=fp32")
    row = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))[0]
    torch.manual_seed(cfg.seed)   # the weights distill.py started from
    init = distill.build_student(cfg, tok.n_vocab)
    offsets = distill.step_offsets(len(train), cfg.seed, 0, 512 // cfg.seq_len, cfg.seq_len)
    _, train_mask = load_token_shards(os.path.join(data_dir, "pretrain_train"), n_vocab=tok.n_vocab, with_mask=True)
    assert not np.asarray(train_mask).all()   # the parent's conversations carry loss on their answers only
    loss0 = _direct_step_loss(init, train, offsets, cfg.seq_len, tok.bos_id, train_mask)
    g = torch.autograd.grad(loss0, list(init.parameters()))
    assert row["train_lm"] == pytest.approx(float(loss0.detach()), rel=1e-5)
    assert row["grad_norm"] == pytest.approx(float(torch.sqrt(sum((x ** 2).sum() for x in g))), rel=1e-4)


def test_bad_input_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        run(data_dir, tmp_path / "x", "--train_data=nope")
    small = Transformer(ModelConfig.llama(num_layers=1, vocab_size=100, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64))
    save_model(small, str(tmp_path / "small"))
    with pytest.raises(ConfigError, match="tokenizer .* has 640 tokens but the model"):
        run(data_dir, tmp_path / "x", "--max_steps=1", f"--init_from={tmp_path / 'small'}")
    run(data_dir, tmp_path / "p", "--max_steps=1")
    with pytest.raises(ConfigError, match="teacher .* vocabulary of 100"):
        run(data_dir, tmp_path / "x", "--max_steps=1", f"--teacher={tmp_path / 'small'}")
    with pytest.raises(ConfigError, match="teacher's hidden size is 32 and the student's 64"):
        run(data_dir, tmp_path / "x", "--max_steps=1", f"--teacher={tmp_path / 'p'}", "--n_embd=64")
    with pytest.raises(ConfigError, match="another architecture .*block_configs"):
        run(data_dir, tmp_path / "p", "--max_steps=2", "--resume=True", "--n_layer=3")
    with pytest.raises(ConfigError, match="trainer_state.pt does not exist"):
        run(data_dir, tmp_path / "none", "--max_steps=2", "--resume=True")
    with pytest.raises(ConfigError, match="unknown key 'n_layers'; valid keys: .*n_layer"):
        parse_config(distill.DistillConfig, ["--n_layers=3"])
    with pytest.raises(ConfigError, match="pretrain_val holds .* fewer than one window of --seq_len=8192"):
        run(data_dir, tmp_path / "x", "--seq_len=8192", "--total_batch_size=32768", "--max_steps=1")
    with pytest.raises(ConfigError, match="multiple of"):
        run(data_dir, tmp_path / "x", "--total_batch_size=100")
    # --seq_len=0 (the default): rows of at most total_batch_size / device_batch_size tokens, and a
    # batch that does not fit the resolved rows says where their length came from
    with pytest.raises(ConfigError, match="--total_batch_size=16: leaves fewer than 8 tokens for each of the "
                                          "--device_batch_size=4 rows"):
        parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}",
                                                   "--seq_len=0", "--total_batch_size=16"])
    with pytest.raises(ConfigError, match=r"--total_batch_size=5000: must be a multiple of .* \(--seq_len=0 resolved to \d+: the longest document"):
        run(data_dir, tmp_path / "x", "--seq_len=0", "--total_batch_size=5000", "--max_steps=1")
    cfg = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}",
                                                     "--seq_len=0", "--total_batch_size=0"])
    runtime.resolve_lengths(cfg, load_token_shards(os.path.join(data_dir, "pretrain_train")),
                            load_tokenizer(data_dir).bos_id, [64], 2)
    assert (cfg.seq_len, cfg.total_batch_size) == (64, 4096)   # a 64-token context; 16 rows of 2 processes x 4


def test_cli_reports_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "distill.py", f"--data_dir={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_flops_per_token_for_mfu():
    """6N + 12 L_attn H D T: tying the embedding saves memory, not lm_head compute."""
    kw = dict(num_layers=2, vocab_size=1000, hidden_size=64, num_attention_heads=4, intermediate_size=96)
    untied, tied = ModelConfig.llama(**kw), ModelConfig.llama(tie_word_embeddings=True, **kw)
    per_layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64  # q,k,v,o + SwiGLU + 2 norms
    n = 2 * per_layer + 64 + 1000 * 64               # layers + final norm + lm_head
    assert runtime.estimate_flops_per_token(untied, 128) == 6 * n + 12 * 2 * 4 * 16 * 128
    assert runtime.estimate_flops_per_token(tied, 128) == runtime.estimate_flops_per_token(untied, 128)


def test_a_step_without_loss_targets_is_zero_not_nan(data_dir, tmp_path):
    """A batch whose targets the loss mask drops entirely (prompts of conversations, first copies)
    has an LM mean of 0 and a zero gradient, not 0 / 0 = NaN (a tiny run diverged at step 18)."""
    cfg = parse_config(distill.DistillConfig, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}"])
    tok = load_tokenizer(data_dir)
    train = load_token_shards(os.path.join(data_dir, "pretrain_train"), n_vocab=tok.n_vocab)
    torch.manual_seed(0)
    model = distill.build_student(cfg, tok.n_vocab)
    none = np.zeros(len(train), dtype=bool)
    logged = distill.step_gradients(model, None, train, 0, cfg, Dist(), 1, tok.bos_id, {}, {"lm": 1.0}, none)
    assert float(logged["lm"]) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
