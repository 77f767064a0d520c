"""grpo.py: the GRPO loss pieces against hand-computed values on small fixed tensors (advantages,
clipping on both sides with separate epsilons, masking, token-level normalisation), the reward
function on crafted responses, the curriculum, zero-variance groups, 2 processes == 1, resume ==
straight run, and one-line errors on bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import grpo
import runtime
from checkpoint import save_model
from configurator import ConfigError, parse_config, run_main
from data import DataConfig, load_tokenizer, prepare, generate_problems
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ------------------------------------------------------------------------------------------------
# The loss, by hand

def test_group_advantages_hand_computed():
    # group 1: mean 2, sample std sqrt(((3-2)^2 + (1-2)^2 + 0) / (3-1)) = 1  -> A = (1, -1, 0)
    # group 2: all equal -> A = 0 (std 0, eps keeps it finite)
    r = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.5, 0.5])
    assert torch.allclose(grpo.group_advantages(r, 3, eps=0.0)[:3], torch.tensor([1.0, -1.0, 0.0]))
    assert grpo.group_advantages(r, 3, eps=1e-4)[3:].abs().max() == 0
    # binary rewards of 4: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> A = +-0.866025
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.0)
    assert torch.allclose(a, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-6)
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.1)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.57735027 + 0.1), atol=1e-6)
    zv = grpo.zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 3)
    assert zv.tolist() == [False, False, True]


def test_clipped_surrogate_both_sides_separate_eps():
    ratios = torch.tensor([0.5, 0.75, 0.9, 1.0, 1.25, 1.5])
    old = torch.zeros(6)
    logp = ratios.log().requires_grad_()
    # A = +1: -min(r, clip(r, 0.8, 1.28)); clipped only above 1 + eps_high (1.25 is inside: clip-higher)
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor(1.0), 0.2, 0.28)
    assert torch.allclose(loss, -torch.tensor([0.5, 0.75, 0.9, 1.0, 1.25, 1.28]))
    assert clipped.tolist() == [False, False, False, False, False, True]
    # with symmetric eps 0.2, 1.25 would be clipped
    assert grpo.clipped_surrogate(logp, old, torch.tensor(1.0), 0.2, 0.2)[1].tolist()[4]
    # A = -2: -min(-2r, -2 clip(r)) = 2 max(r, clip(r)); clipped only below 1 - eps_low
    loss_n, clipped_n = grpo.clipped_surrogate(logp, old, torch.tensor(-2.0), 0.2, 0.28)
    assert torch.allclose(loss_n, 2 * torch.tensor([0.8, 0.8, 0.9, 1.0, 1.25, 1.5]))
    assert clipped_n.tolist() == [True, True, False, False, False, False]
    # gradients: d loss / d logp = -A * r where the unclipped branch is active, 0 where clipped
    g, = torch.autograd.grad(loss.sum(), logp)
    assert torch.allclose(g, torch.tensor([-0.5, -0.75, -0.9, -1.0, -1.25, 0.0]))
    g, = torch.autograd.grad(loss_n.sum(), logp)
    assert torch.allclose(g, torch.tensor([0.0, 0.0, 1.8, 2.0, 2.5, 3.0]))
    # ratio 1 (first update on fresh rollouts): the loss is -A, the gradient -A d logp
    l1, c1 = grpo.clipped_surrogate(torch.zeros(3), torch.zeros(3), torch.tensor([0.5, -1.0, 0.0]), 0.2, 0.28)
    assert l1.tolist() == [-0.5, 1.0, 0.0] and not c1.any()


def test_k3_and_token_level_normalisation_hand_computed():
    assert float(grpo.k3(torch.tensor(0.0))) == 0.0
    assert math.isclose(float(grpo.k3(torch.tensor(math.log(2)))), 2 - math.log(2) - 1, rel_tol=1e-6)
    assert math.isclose(float(grpo.k3(torch.tensor(-math.log(2)))), 0.5 + math.log(2) - 1, rel_tol=1e-6)
    # Two responses: 1 token with loss 4, 3 tokens with loss 1 each (padding carries junk 100s).
    per_token = torch.tensor([[4.0, 100.0, 100.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # token-level: (4 + 1 + 1 + 1) / 4 = 1.75 (per-sequence averaging would give (4 + 1) / 2 = 2.5)
    assert float(grpo.token_level_loss(per_token, mask, 4)) == 1.75
    # split over two micro-steps (or processes), each divided by the global count: the same sum
    parts = grpo.token_level_loss(per_token[:1], mask[:1], 4) + grpo.token_level_loss(per_token[1:], mask[1:], 4)
    assert float(parts) == 1.75


def test_micro_batch_layout_and_logprobs():
    samples = [{"prompt": [1, 2, 3], "response": [4, 5], "advantage": 0.5},
               {"prompt": [7, 8], "response": [9], "advantage": -1.0}]
    (x, y, mask, adv), = grpo.micro_batches(samples, 8, pad_id=0, device="cpu")
    assert x.tolist() == [[1, 2, 3, 4], [7, 8, 0, 0]]
    assert y.tolist() == [[2, 3, 4, 5], [8, 9, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]  # targets that are response tokens
    assert adv.tolist() == [[0.5], [-1.0]]
    assert len(grpo.micro_batches(samples, 1, 0, "cpu")) == 2
    torch.manual_seed(0)
    cfg = ModelConfig.llama(num_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=32, vocab_size=12, max_position_embeddings=16)
    m = Transformer(cfg)
    logp, ent = grpo.sequence_logprobs(m, x, y, n_vocab=10, entropy=True)
    ref = F.log_softmax(m(x)[..., :10], -1)  # over the tokenizer's 10 ids, as generate(vocab_limit=10) samples
    assert torch.allclose(logp[0, 2], ref[0, 2, 4]) and torch.allclose(logp[1, 1], ref[1, 1, 9])
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-6)


def test_logprobs_in_row_chunks_equal_one_chunk(monkeypatch):
    """A 128k vocabulary makes the log-probs a few rows at a time, recomputed in backward
    (runtime.LOGITS_CHUNK_ELEMENTS): here 2 x 6 tokens x 10 ids = 120 elements, so 5 rows make 3
    chunks of 2, 2 and 1 rows. Values, entropies and every parameter's gradient equal one chunk's."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.llama(num_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=32, vocab_size=12, max_position_embeddings=16))
    x, y = torch.randint(0, 10, (5, 6)), torch.randint(0, 10, (5, 6))
    weights = torch.randn(5, 6)

    def run():
        m.zero_grad()
        logp, ent = grpo.sequence_logprobs(m, x, y, n_vocab=10, temperature=0.7, entropy=True)
        ((logp + 0.1 * ent) * weights).sum().backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    whole = run()
    calls = []
    real = grpo._logprobs_chunk
    monkeypatch.setattr(grpo, "_logprobs_chunk", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    monkeypatch.setattr(grpo, "LOGITS_CHUNK_ELEMENTS", 2 * 6 * 10)
    chunked = run()
    assert calls[:3] == [2, 2, 1]   # (then recomputed in backward)
    assert torch.allclose(chunked[0], whole[0], atol=1e-6) and torch.allclose(chunked[1], whole[1], atol=1e-6)
    for n, g in whole[2].items():
        assert torch.allclose(chunked[2][n], g, atol=1e-6), n


# ------------------------------------------------------------------------------------------------
# Rewards on crafted responses

@pytest.mark.parametrize("text, mode, acc, fmt", [
    ("<think>\n3+2\n5\n</think>\n\n5", "on", 1, 1),   # right answer, right format
    ("<think>\n3+2\n6\n</think>\n\n6", "on", 0, 1),   # wrong answer
    ("<think>\n3+2\n5\n</think>\n\n", "on", 0, 0),    # no answer: 5 only inside the think block
    ("<think>\n3+2\n5", "on", 0, 0),                  # cut off inside the think block
    ("<think>\n5\n</think>\n\n5 5", "on", 0, 1),      # two answers (even both right)
    ("<think>\n5\n</think>\n\n5\n6", "on", 0, 1),     # two answers on two lines
    ("<think>\n5\n</think>\n\n6 5", "on", 0, 1),
    ("5", "on", 0, 0),                                # missing think block in "on" mode
    ("<think>a</think>5<think>b</think>5", "on", 0, 0),  # two think blocks
    ("5", "off", 1, 1),                               # off: the bare answer
    ("  5 \n", "off", 1, 1),                          # whitespace is not an answer
    ("6", "off", 0, 1),
    ("5 5", "off", 0, 1),
    ("5\n6", "off", 0, 1),
    ("<think>\n3+2\n</think>\n\n5", "off", 0, 0),     # think block in "off" mode: no accuracy
    ("</think>5", "off", 0, 0),                       # stray tag in "off" mode
    ("", "off", 0, 0),                                # nothing at all
])
def test_reward_on_crafted_responses(text, mode, acc, fmt):
    assert grpo.reward({"answer": "5"}, text, mode) == {"accuracy": acc, "format": fmt}


def test_reward_multiline_answer_and_total():
    prob = {"answer": "- cat\n- dog"}
    assert grpo.reward(prob, "- cat\n-  dog ", "off")["accuracy"] == 1
    assert grpo.reward(prob, "- cat\n- dog\n- cat", "off")["accuracy"] == 0
    assert grpo.total_reward({"accuracy": 1.0, "format": 1.0}, 0.5) == 1.5
    assert grpo.total_reward({"accuracy": 0.0, "format": 1.0}, 0.5) == 0.5


# ------------------------------------------------------------------------------------------------
# Curriculum and batches

def test_curriculum_moves_from_easy_to_hard_and_batches_are_deterministic():
    import numpy as np
    rates = np.array([0.0, 0.125, 0.25, 0.5, 0.625])
    p0, mu0 = grpo.curriculum_weights(rates, 0.0, 0.15)
    p1, mu1 = grpo.curriculum_weights(rates, 1.0, 0.15)
    assert mu0 == 0.625 and mu1 == 0.0 and math.isclose(p0.sum(), 1) and math.isclose(p1.sum(), 1)
    assert p0.argmax() == 4 and p1.argmax() == 0
    # the weights are the Gaussian's: p(0.5) / p(0.625) at mu = 0.625 is exp(-0.5 (0.125 / 0.15)^2)
    assert math.isclose(p0[3] / p0[4], math.exp(-0.5 * (0.125 / 0.15) ** 2), rel_tol=1e-6)
    rows = [{"prompt": f"p{i}", "answer": "1"} for i in range(40)] + [{"prompt": "q", "answer": "1", "reasoning": "off"}]
    pool = [(i, (i % 6) / 8) for i in range(41)]
    cfg = grpo.GRPOConfig(prompts_per_step=8, max_steps=10, on_fraction=0.75)
    a, b = grpo.draw_batch(pool, rows, 3, cfg), grpo.draw_batch(pool, rows, 3, cfg)
    assert a == b and len(set(a[0])) == 8 and a != grpo.draw_batch(pool, rows, 4, cfg)
    free = [m for i, m in zip(*a[:2]) if i != 40]  # row 40 carries its own mode
    assert free.count("off") == round(len(free) * 0.25)
    # early batches are easier than late ones
    early = np.mean([r for s in range(3) for r in (pool[i][1] for i in grpo.draw_batch(pool, rows, s, cfg)[0])])
    late = np.mean([r for s in range(7, 10) for r in (pool[i][1] for i in grpo.draw_batch(pool, rows, s, cfg)[0])])
    assert early > late + 0.1
    # a row's own "reasoning" wins over the mix
    for s in range(10):
        idx, modes, _ = grpo.draw_batch(pool, rows, s, cfg)
        assert all(m == "off" for i, m in zip(idx, modes) if i == 40)


# ------------------------------------------------------------------------------------------------
# A tiny policy that can earn rewards: after any non-digit token it says a digit, after a digit
# <|eot_id|> (a bigram table planted in the embedding and lm_head), so "off"-mode answers to
# addition chains are right 1 time in 10 and groups have reward variance from the first step.

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    data_dir = str(d / "data")
    prepare(DataConfig(out_dir=data_dir, pretrain_tokens=20_000, pretrain_val_tokens=2_000, tokenizer_chars=30_000, vocab_size=640,
                       sft_train=20, sft_val=10, rl_train=10, val_per_k=2, test_per_k=2, test_chat=2))
    tok = load_tokenizer(data_dir)
    torch.manual_seed(0)
    cfg = ModelConfig.llama(num_layers=2, num_key_value_heads=2, intermediate_size=64, vocab_size=tok.n_vocab,
                            hidden_size=32, num_attention_heads=4, max_position_embeddings=128)
    m = Transformer(cfg)
    digits = [tok.encode(str(k))[0] for k in range(10)]
    with torch.no_grad():
        for p in (m.model.embed_tokens.weight, m.lm_head.weight, *(l.self_attn.o_proj.weight for l in m.model.layers),
                  *(l.mlp.down_proj.weight for l in m.model.layers)):
            p.mul_(0.05)
        E, W = m.model.embed_tokens.weight, m.lm_head.weight
        E[:, 0] += 1.0
        E[digits, 0] -= 1.0
        E[digits, 1] += 1.0
        W[digits, 0] += 2.0
        W[tok.eot_id, 1] += 2.0
    policy = str(d / "policy")
    save_model(m, policy)
    tok.save(policy)
    # unique: the prefilter test maps prompt -> given pass rate, so a prompt may appear only once
    probs = generate_problems("addmod10", "train", 60, seed=5, k_min=2, k_max=4, unique=True)
    rl = str(d / "rl.jsonl")
    with open(rl, "w") as f:
        for i, p in enumerate(probs):
            row = {"prompt": p["prompt"], "answer": p["answer"], "reasoning": "off"}
            if i % 5 == 0:
                row["pass_rate"] = 0.9 if i % 10 == 0 else 0.25  # given: not sampled; 0.9 is dropped
            f.write(json.dumps(row) + "\n")
    return {"dir": d, "policy": policy, "rl": rl, "tok": tok}


TINY = ["--prompts_per_step=8", "--group_size=4", "--gen_groups=2", "--prefilter_samples=4", "--max_new_tokens=4",
        "--device_batch_size=5", "--updates_per_rollout=2", "--lr=1e-2", "--warmup_steps=0", "--eval_problems=6",
        "--eval_max_new_tokens=6", "--compile=False", "--device=cpu", "--seed=3",
        "--pool_size=0"]   # a pool of prompts_per_step x max_steps: each kept prompt drawn about once


def args(world, out, *flags):
    return TINY + [f"--init_from={world['policy']}", f"--data={world['rl']}", f"--out_dir={out}", *flags]


def run(world, out, *flags):
    grpo.main(parse_config(grpo.GRPOConfig, args(world, out, *flags)))
    return load_file(os.path.join(out, "model.safetensors"))


def metrics(out):
    from runtime import read_metrics   # the last run's rows, run markers left out
    return read_metrics(os.path.join(out, "metrics.jsonl"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_zero_variance_groups_skipped_and_first_update_has_ratio_one(world):
    tok = world["tok"]
    from checkpoint import load_model
    model = load_model(world["policy"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = grpo.GRPOConfig(group_size=2, updates_per_rollout=1, format_weight=0.0, max_steps=1, warmup_steps=0)
    p = tok.render_prompt("Add mod 10: 1+2", "off")
    eot = tok.eot_id
    d = [tok.encode(str(k))[0] for k in range(10)]
    mk = lambda resp, acc: {"prompt": p, "response": resp, "accuracy": acc, "format": 1.0}  # noqa: E731
    # group 0: rewards (1, 0), responses of 2 and 4 tokens; group 1: (1, 1), skipped
    samples = [mk([d[3], eot], 1.0), mk([d[4], d[4], d[4], eot], 0.0), mk([d[3], eot], 1.0), mk([d[3], eot], 1.0)]
    sums, same = grpo.train_on_rollouts(model, None, opt, samples, [0, 1], 0, cfg, runtime.setup_dist("cpu"), tok, "cpu")
    assert sums["skipped_groups"] == 1 and same["trained_tokens"] == 6 and same["updates"] == 1
    assert sums["kl_old_sum"] == 0 and sums["clipped"] == 0  # the same forward as the old log-probs: ratio 1
    a = 0.5 / (math.sqrt(0.5) + cfg.adv_eps)  # A = +-0.5 / sample std of (1, 0)
    assert math.isclose(sums["loss"], -(2 * a - 4 * a) / 6, rel_tol=1e-5)  # token-weighted -A
    # every group skipped: no optimizer step at all (AdamW would still move weights by momentum)
    sums, same = grpo.train_on_rollouts(model, None, opt, samples[2:], [1], 0, cfg, runtime.setup_dist("cpu"), tok, "cpu")
    assert same["updates"] == 0 and same["trained_tokens"] == 0


def test_run_prefilter_logs_and_learns_signal(world, tmp_path):
    out = str(tmp_path / "a")
    before = load_file(os.path.join(world["policy"], "model.safetensors"))
    after = run(world, out, "--max_steps=3")
    assert max_diff(before, after) > 1e-3
    rows = metrics(out)
    pre = rows[0]
    assert pre["pool"] == 24 and pre["prefilter_dropped"] >= 1  # the row with a given pass rate 0.9
    scanned = [json.loads(x) for x in open(os.path.join(out, "prefilter.jsonl"))]
    assert len(scanned) == pre["prefilter_scanned"] and all("pass_rate" in r and "kept" in r for r in scanned)
    assert all(r["kept"] == (r["pass_rate"] < 0.75) for r in scanned)
    given = {r["prompt"]: r["pass_rate"] for r in map(json.loads, open(world["rl"])) if "pass_rate" in r}
    n_given = sum(r["prompt"] in given for r in scanned)
    assert n_given and pre["prefilter_sampled"] == len(scanned) - n_given  # rows with a pass rate are not sampled
    assert all(r["pass_rate"] == given[r["prompt"]] for r in scanned if r["prompt"] in given)
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward_accuracy", "reward_format", "response_len", "clip_frac", "kl_old", "entropy",
                "skipped_groups", "rollout_s", "train_s", "curriculum_mu", "batch_pass_rate"):
        assert key in steps[-1], key
    assert any(r["updates"] == 2 for r in steps)
    evals = [r for r in rows if "accuracy_on" in r]
    assert [r["step"] for r in evals] == [0, 3] and "think_rate_off" in evals[0]
    assert os.path.isfile(os.path.join(out, "reward.png")) and os.path.isfile(os.path.join(out, "tokenizer.model"))
    # the output is a checkpoint folder sample.py and a new run can start from
    assert load_tokenizer(out).n_vocab == world["tok"].n_vocab


def test_prefilter_max_scan_stops_the_scan_once_a_batch_is_kept(world):
    """--prefilter_max_scan ends the scan after that many prompts (whole chunks of one generate call:
    2 prompts here) once --prompts_per_step are kept; with fewer kept it scans on."""
    from checkpoint import load_model
    from data import load_rl_jsonl
    model, tok, rows = load_model(world["policy"]), world["tok"], load_rl_jsonl(world["rl"])
    base = dict(prefilter_samples=4, gen_groups=2, group_size=4, max_new_tokens=4, compile=False, seed=3,
                pool_size=40)

    def scan(**kw):
        return grpo.prefilter(model, tok, rows, grpo.GRPOConfig(**base, **kw), runtime.setup_dist("cpu"),
                              lambda msg: None)
    pool, scanned, stats = scan(prefilter_max_scan=10, prompts_per_step=4)
    assert len(scanned) == stats["prefilter_scanned"] == 10 and len(pool) >= 4
    whole_pool, whole, _ = scan(prefilter_max_scan=0, prompts_per_step=4)
    assert len(whole) > 10 and whole[:10] == scanned and whole_pool[:len(pool)] == pool  # the same seeded scan
    more_pool, more, _ = scan(prefilter_max_scan=10, prompts_per_step=len(pool) + 2)
    assert len(more) > 10 and len(more_pool) >= len(pool) + 2 and more == whole[:len(more)]


def test_pool_smaller_than_a_batch_draws_with_replacement(world, tmp_path, capsys):
    """A strong policy may leave fewer prompts than --prompts_per_step after prefiltering: the run
    says so and trains, each batch drawing the pool with replacement; an empty pool is an error."""
    rows = [{"prompt": f"p{i}", "answer": "1"} for i in range(3)]
    pool = [(i, 0.25 * i) for i in range(3)]
    cfg = grpo.GRPOConfig(prompts_per_step=8, max_steps=4)
    idx, modes, _ = grpo.draw_batch(pool, rows, 1, cfg)
    assert len(idx) == len(modes) == 8 and set(idx) <= {0, 1, 2} and grpo.draw_batch(pool, rows, 1, cfg)[0] == idx
    small = tmp_path / "small.jsonl"
    with open(small, "w") as f:
        for r in [json.loads(x) for x in open(world["rl"])][:3]:
            f.write(json.dumps({**r, "pass_rate": 0.25}) + "\n")
    out = str(tmp_path / "small")
    run(world, out, f"--data={small}", "--max_steps=2")
    said = "".join(capsys.readouterr())
    assert "3 prompts left after prefiltering" in said and "with replacement" in said
    assert [r["step"] for r in metrics(out) if "reward" in r] == [1, 2]


def test_two_processes_equal_one(world, tmp_path):
    """2 gloo processes (each generating and training half of the generate calls) == 1 process."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    outs = {n: str(tmp_path / f"p{n}") for n in (1, 2)}
    # adam_eps: the two sum their gradients in different orders; entries where the group advantages
    # cancel are float rounding (~1e-9), and with AdamW's eps = 1e-8 its first step moves them by up to
    # lr = 1e-2 in whichever direction the rounding took (measured: weights 1.5e-2 apart after 3 steps;
    # with eps = 1e-5 1.3e-5 on the world before, 5.9e-4 on the prompts that close with `+z.`; 1e-4 passes)
    flags = ("--max_steps=3", "--eval_problems=0", "--adam_eps=1e-4")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "grpo.py", *args(world, outs[2], *flags)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    run(world, outs[1], *flags)  # the same command in this process (what `python grpo.py` runs)
    a, b = (load_file(os.path.join(outs[n], "model.safetensors")) for n in (2, 1))
    assert max_diff(a, b) <= 1e-4
    before = load_file(os.path.join(world["policy"], "model.safetensors"))
    assert max_diff(a, before) > 1e-3  # and they trained
    ra, rb = ([r for r in metrics(outs[n]) if "reward" in r] for n in (2, 1))
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):  # the logged values are global, not rank 0's share
        for k in ("reward", "reward_accuracy", "skipped_groups", "trained_tokens", "response_len"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), k
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert open(os.path.join(outs[2], "prefilter.jsonl")).read() == open(os.path.join(outs[1], "prefilter.jsonl")).read()


def test_resume_equals_straight_run(world, tmp_path):
    straight = run(world, str(tmp_path / "S"), "--max_steps=4", "--eval_problems=0")
    out = str(tmp_path / "R")
    half = run(world, out, "--max_steps=4", "--stop_after=2", "--eval_problems=0")
    resumed = run(world, out, "--max_steps=4", "--resume=True", "--eval_problems=0")
    assert max_diff(straight, resumed) <= 1e-6
    assert max_diff(straight, half) > 1e-3
    assert [r["step"] for r in metrics(out) if "reward" in r] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="already at step 4"):
        run(world, out, "--max_steps=4", "--resume=True", "--eval_problems=0")
    with pytest.raises(ConfigError, match=r"settings changed: \['eps_high: 0.28 -> 0.3'\]"):
        run(world, out, "--max_steps=4", "--resume=True", "--eps_high=0.3")


# ------------------------------------------------------------------------------------------------
# Bad input: one line `error: ...` naming the file / line / flag, exit status 2, no traceback.

def user_error(world, tmp_path, capsys, *flags):
    with pytest.raises(SystemExit) as e:
        run_main(grpo.main, grpo.GRPOConfig, args(world, str(tmp_path / "out"), *flags))
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the progress lines of the work done before the problem showed
    assert e.value.code == 2 and last.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    return last


def test_bad_input_errors(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Add mod 10: 1+2", "answer": "3"}\n{"prompt": "Add mod 10: 2+2"}\n')
    assert f"{bad}:2: missing field 'answer'" in user_error(world, tmp_path, capsys, f"--data={bad}")
    bad.write_text('{"prompt": "Add mod 10: 1+2", "answer": "3"}\n\n{"prompt": "x", "answer": \n')
    assert f"{bad}:3: malformed JSON" in user_error(world, tmp_path, capsys, f"--data={bad}")
    bad.write_text('{"prompt": "Add mod 10: 1+2", "answer": "3", "reasoning": "maybe"}\n')
    assert f"{bad}:1: field 'reasoning'" in user_error(world, tmp_path, capsys, f"--data={bad}")
    bad.write_text('{"prompt": "Add mod 10: 1+2", "answer": "3", "pass_rate": 2}\n')
    assert f"{bad}:1: field 'pass_rate'" in user_error(world, tmp_path, capsys, f"--data={bad}")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes(open(os.path.join(world["policy"], f), "rb").read())
    err = user_error(world, tmp_path, capsys, f"--init_from={no_tok}")
    assert f"--init_from={str(no_tok)!r}" in err and "no tokenizer" in err
    assert "--data=" in user_error(world, tmp_path, capsys, f"--data={tmp_path / 'nope.jsonl'}")
    assert "--eps_low=1.5" in user_error(world, tmp_path, capsys, "--eps_low=1.5")
    assert "--group_size=1" in user_error(world, tmp_path, capsys, "--group_size=1")
    assert "--out_dir" in user_error(world, tmp_path, capsys, f"--out_dir={world['policy']}")
    # every prompt solved: nothing left to learn from, said before any training
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"prompt": f"Add mod 10: {k}+1", "answer": str((k + 1) % 10),
                                        "pass_rate": 1.0}) + "\n" for k in range(10)))
    assert "0 prompts left after prefiltering" in user_error(world, tmp_path, capsys, f"--data={easy}")
    # the curriculum orders prompts by pass rate: without sampling, every row must carry one
    err = user_error(world, tmp_path, capsys, "--prefilter_samples=0", "--curriculum=True")
    assert "--curriculum=True needs a pass rate for every prompt" in err
