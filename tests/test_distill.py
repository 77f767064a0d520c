"""distill.py and the training runtime: DDP = single process, resume = straight run, the KD loss
against direct computations, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import distill
from data import DataConfig, load_tokenizer, prepare
from model import ModelConfig, Transformer, save_model
from runtime import ConfigError, chunked_cross_entropy, chunked_kl, parse_config

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
    prepare(DataConfig(out_dir=str(d), pretrain_tokens=30_000, pretrain_val_tokens=4_000, tokenizer_chars=40_000,
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
    init = distill.build_student(parse_config(distill.DistillConfig, common), load_tokenizer(data_dir).n_vocab)
    assert max_diff(a, {k: v for k, v in init.state_dict().items() if k in a}) > 1e-3  # and they trained
    rows = [json.loads(x) for x in open(tmp_path / "A" / "metrics.jsonl")]
    logged = [json.loads(x) for x in open(tmp_path / "B" / "metrics.jsonl")]
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
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "R" / "metrics.jsonl")) if "train_lm" in r]
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
    rows = [json.loads(x) for x in open(tmp_path / "kd" / "metrics.jsonl")]
    val = [r for r in rows if "val_kl" in r]
    assert len(val) == 2 and val[-1]["val_kl"] < 0.8 * val[0]["val_kl"]
    assert "val_cos" in val[0] and all(k in rows[0] for k in ("train_kl", "train_cos"))
    assert distill.parse_layer_map("auto", 1, 2) == {0: 1}
    assert distill.parse_layer_map("auto", 4, 8) == {0: 1, 1: 3, 2: 5, 3: 7}
    assert distill.parse_layer_map("auto", 5, 2) == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}  # never layer -1
    assert distill.parse_layer_map("0:1,2:0", 3, 2) == {0: 1, 2: 0}
    with pytest.raises(ConfigError, match="out of range"):
        distill.parse_layer_map("0:2", 3, 2)


def test_kd_terms_of_a_step_match_direct_computation(data_dir):
    """loss_sums + normalisers against the formulas written out on full logits."""
    cfg = parse_config(distill.DistillConfig, TINY + ["--lm_weight=0.5", "--kd_temperature=2.0"])
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


def test_bad_input_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        run(data_dir, tmp_path / "x", "--train_data=nope")
    small = Transformer(ModelConfig.llama(num_layers=1, vocab_size=100, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64))
    save_model(small, str(tmp_path / "small"))
    with pytest.raises(ConfigError, match="tokenizer .* has 768 tokens but the model"):
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
        run(data_dir, tmp_path / "x", "--seq_len=8192", "--max_steps=1")
    with pytest.raises(ConfigError, match="multiple of"):
        run(data_dir, tmp_path / "x", "--total_batch_size=100")


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
    assert distill.estimate_flops_per_token(untied, 128) == 6 * n + 12 * 2 * 4 * 16 * 128
    assert distill.estimate_flops_per_token(tied, 128) == distill.estimate_flops_per_token(untied, 128)
