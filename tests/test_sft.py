"""sft.py: packed rows == samples one by one, 2 processes == 1, resume == straight run, the data
stream (mixture, packing), the evaluation it logs, and clear errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import sft
from checkpoint import load_model, save_model
from configurator import ConfigError
from data import DataConfig, DataError, load_sft_jsonl, load_tokenizer, prepare
from model import ModelConfig, Transformer
from runtime import parse_config, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses run the script as a user would: on CPU with the PyTorch references, not with the
# Triton interpreter that tests/conftest.py switches on for the kernel tests.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
CONTEXT = 128


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(DataConfig(out_dir=str(d), pretrain_tokens=20_000, pretrain_val_tokens=4_000, tokenizer_chars=40_000, vocab_size=640,
                       sft_train=64, sft_val=12, rl_train=10, val_per_k=2, test_per_k=2, test_chat=2))
    return str(d)


def tiny_model(vocab, seed=0, scale=1.0):
    """A heterogeneous child like Puzzle's: GQA with 2 and 4 KV heads, an attention no-op, linear
    sub-blocks, FFNs of two widths. scale > 1: weights far from the init, so that attention is
    sharp and mixing documents would show."""
    torch.manual_seed(seed)
    blocks = [dict(attention="gqa", n_heads_in_group=2, ffn="swiglu", intermediate_size=64),
              dict(attention="no_op", ffn="swiglu", intermediate_size=32),
              dict(attention="linear", ffn="linear"),
              dict(attention="gqa", n_heads_in_group=1, ffn="no_op")]
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, num_attention_heads=4, block_configs=blocks,
                                    max_position_embeddings=CONTEXT))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.fixture(scope="module")
def init_dir(data_dir, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("init"))
    save_model(tiny_model(768), d)
    load_tokenizer(data_dir).save(d)
    return d


def flags(data_dir, init_dir, out_dir, *extra):
    return [f"--data={data_dir}/sft_train.jsonl", f"--val_data={data_dir}/sft_val.jsonl", f"--init_from={init_dir}",
            f"--out_dir={out_dir}", "--device=cpu", "--seq_len=128", "--device_batch_size=2",
            "--total_batch_size=1024", "--lr=3e-3", "--log_interval=1", "--eval_interval=0", "--eval_problems=0",
            "--seed=7", "--pos_gap=24", *extra]   # the nano recipe's gaps: 2 processes and a resume replay them


def run(*argv):
    cfg = parse_config(sft.SFTConfig, list(argv))
    sft.main(cfg)
    return load_file(os.path.join(cfg.out_dir, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_packed_rows_equal_samples_one_by_one(data_dir):
    """Document masks + restarted positions: the loss and gradients of packed rows equal the sums
    over the same samples run alone (no doc_ids, positions 0..n-1)."""
    tok = load_tokenizer(data_dir)
    src = data.Source(f"{data_dir}/sft_train.jsonl", 1.0, tok, CONTEXT, 768)
    T = 2 * CONTEXT  # rows of several samples (positions restart, so each stays inside the context)
    rows = [[(0, j) for j in row] for row in data.pack(src.lengths[:12], T)]
    assert len(rows) >= 3 and sum(len(r) >= 2 for r in rows) >= 2         # really packed
    x, y, doc, pos = sft.make_batch(rows, [src], T, tok.pad_id, "cpu")
    n = int(src.n_targets[:12].sum())
    assert int((y != -100).sum()) == n
    first = rows[0]
    assert pos[0, src.lengths[first[0][1]]] == 0 and doc[0, src.lengths[first[0][1]]] == 1  # 2nd sample restarts
    model = tiny_model(768, scale=5.0)
    packed = sft.loss_sum(model, x, y, doc, pos, vocab_chunk=100) / n   # chunked over the vocabulary too
    g_packed = torch.autograd.grad(packed, list(model.parameters()))

    def alone(j):  # the sample as its own batch: no doc_ids, positions 0..n-1
        tgt = torch.from_numpy(np.append(src.targets[j], -100))
        return F.cross_entropy(model(torch.from_numpy(src.ids[j])[None])[0], tgt, ignore_index=-100, reduction="sum")
    ref = sum(alone(j) for j in range(12)) / n
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert abs(float(packed.detach()) - float(ref.detach())) <= 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(g_packed, g_ref)) <= 1e-5
    # without the document mask the same rows give another loss: the test can fail
    with torch.no_grad():
        assert abs(float(sft.loss_sum(model, x, y, None, pos, 100) / n) - float(ref)) > 1e-3  # 100x the tolerance
    # and the loss is on assistant tokens only: a target is either -100 or the next input token
    masked = torch.from_numpy(np.concatenate(src.targets[:12]))
    assert 0 < (masked != -100).float().mean() < 0.8


def test_stream_mixture_and_packing(data_dir, tmp_path):
    tok = load_tokenizer(data_dir)
    a = data.Source(f"{data_dir}/sft_train.jsonl", 3.0, tok, CONTEXT, 768)
    b = data.Source(f"{data_dir}/sft_val.jsonl", 1.0, tok, CONTEXT, 768)
    assert list(data.mixture_counts([64, 12], [3.0, 1.0])) == [57, 19]   # 76 samples, 3:1
    ca, cb = data.mixture_counts([len(a), len(b)], [3.0, 1.0])
    assert ca + cb == len(a) + len(b) and abs(ca - 3 * cb) <= 3
    s1, s2 = data.RowStream([a, b], CONTEXT, seed=5), data.RowStream([a, b], CONTEXT, seed=5)
    assert s1.rows(3, 7) == s2.rows(3, 7)                                # a function of (data, seed)
    assert s1.rows(0, 10) != data.RowStream([a, b], CONTEXT, seed=6).rows(0, 10)
    for e in range(3):
        ep = s1.epoch(e)
        picks = [p for row in ep for p in row]
        assert sum(i == 0 for i, _ in picks) == ca and sum(i == 1 for i, _ in picks) == cb
        assert all(sum(s1.sources[i].lengths[j] for i, j in row) <= CONTEXT for row in ep)
    # b is repeated (weight 1/4 of the epoch > its share of the samples), from fresh permutations
    # of its samples: over len(b) epochs each of them appears exactly cb times
    seen = np.bincount([j for e in range(len(b)) for row in s1.epoch(e) for i, j in row if i == 1], minlength=len(b))
    assert cb > len(b) and (seen == cb).all()
    n = sum(len(s1.epoch(e)) for e in range(2))
    assert s1.rows(n - 2, 4) == s1.epoch(1)[-2:] + s1.epoch(2)[:2]        # crosses the epoch boundary
    single = data.RowStream([a], CONTEXT, seed=5)
    assert sorted(j for row in single.epoch(0) for _, j in row) == list(range(len(a)))  # one pass = each once
    lengths = np.random.default_rng(0).integers(20, 120, size=500)
    rows = data.pack(lengths, 256)
    assert sorted(j for r in rows for j in r) == list(range(500))
    assert lengths.sum() / (256 * len(rows)) > 0.95                       # first fit leaves little padding
    assert sft.parse_data_spec("x.jsonl") == [("x.jsonl", 1.0)]
    assert sft.parse_data_spec("a.jsonl:0.7,b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert sft.parse_data_spec("dir:x/a.jsonl") == [("dir:x/a.jsonl", 1.0)]


def test_ddp_two_processes_equal_one(data_dir, init_dir, tmp_path):
    """2 gloo processes x 2 micro-steps (no gradient sync on the first) == 1 process x 4."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    common = flags(data_dir, init_dir, "") + ["--max_steps=4"]
    outs = {}
    for name, launcher in (("A", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]), ("B", [])):
        r = subprocess.run([sys.executable, *launcher, "sft.py", *common, f"--out_dir={tmp_path / name}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = r.stderr
    assert "2 process(es)" in outs["A"] and "2 micro-steps" in outs["A"]
    assert "1 process(es)" in outs["B"] and "4 micro-steps" in outs["B"]
    a, b = load_file(str(tmp_path / "A" / "model.safetensors")), load_file(str(tmp_path / "B" / "model.safetensors"))
    assert max_diff(a, b) <= 1e-4
    assert max_diff(a, load_file(os.path.join(init_dir, "model.safetensors"))) > 1e-3  # and they trained
    rows_a = [json.loads(x) for x in open(tmp_path / "A" / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(tmp_path / "B" / "metrics.jsonl")]
    la, lb = ([r["train_loss"] for r in rows if "train_loss" in r] for rows in (rows_a, rows_b))
    assert len(la) == 4 and np.allclose(la, lb, atol=1e-5)  # the logged loss is the global mean


def test_resume_equals_straight_run_and_evaluates(data_dir, init_dir, tmp_path):
    train = tmp_path / "train.jsonl"  # a copy, changed below
    shutil.copy(f"{data_dir}/sft_train.jsonl", train)
    straight = run(*flags(data_dir, init_dir, tmp_path / "S", "--max_steps=6", f"--data={train}"))
    run(*flags(data_dir, init_dir, tmp_path / "R", "--max_steps=6", "--stop_after=3", f"--data={train}"))
    half = load_file(str(tmp_path / "R" / "model.safetensors"))
    resumed = run(*flags(data_dir, init_dir, tmp_path / "R", "--max_steps=6", "--resume=True", f"--data={train}"))
    assert max_diff(straight, resumed) <= 1e-5
    assert max_diff(straight, half) > 1e-3  # the first invocation really stopped early
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "R" / "metrics.jsonl")) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="already at step 6"):
        run(*flags(data_dir, init_dir, tmp_path / "R", "--max_steps=6", "--resume=True", f"--data={train}"))
    with pytest.raises(ConfigError, match=r"settings changed: \['seed: 7 -> 8'\]"):
        run(*flags(data_dir, init_dir, tmp_path / "R", "--max_steps=6", "--resume=True", f"--data={train}", "--seed=8"))
    train.write_text("".join(open(train).readlines()[:-1]))
    with pytest.raises(ConfigError, match="the data files changed"):
        run(*flags(data_dir, init_dir, tmp_path / "R", "--max_steps=6", "--resume=True", f"--data={train}"))
    # --epochs: the run length follows from the data; evaluation (held-out loss, both modes) and plots
    out = tmp_path / "E"
    run(*flags(data_dir, init_dir, out, "--epochs=2", "--eval_interval=2", "--eval_problems=6",
               "--eval_max_new_tokens=16"))
    rows = read_metrics(str(out / "metrics.jsonl"))
    train = [r for r in rows if "train_loss" in r]
    assert len(train) >= 3 and 1.8 < train[-1]["epoch"] <= 2.0 and all(0.5 < r["fill"] <= 1 for r in train)
    evals = [r for r in rows if "accuracy_on" in r]
    end = train[-1]["step"]   # every 2 steps, at 2/3 of the run (the convergence check) and at the end
    assert [r["step"] for r in evals] == sorted(set(range(0, end, 2)) | {round(2 * end / 3), end})
    conv = [r for r in rows if "chain_gain_last_third" in r]
    assert len(conv) == 1 and conv[0]["chain_gain_last_third"] == pytest.approx(
        conv[0]["chain_accuracy_on_end"] - conv[0]["chain_accuracy_on_two_thirds"])
    for r in evals:
        assert all(0 <= r[k] <= 1 for k in ("accuracy_on", "accuracy_off", "think_rate_on", "think_rate_off"))
        assert r["val_loss"] > 0 and "acc_on_k3" in r and "acc_off_k3" in r
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    counts = rows[0]["data"][f"{data_dir}/sft_train.jsonl"]  # every row of the file is accounted for
    assert counts["samples"] + counts["dropped_long"] + counts["dropped_format"] == 64 and counts["samples"] > 40
    for png in ("loss.png", "accuracy.png", "accuracy_by_k.png"):
        assert os.path.getsize(out / png) > 1000
    assert load_tokenizer(str(out)).n_vocab == 640 and load_model(str(out)).config == load_model(init_dir).config


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"input": [{"role": "user", "content": "Add mod 10: 1+2"}], "output": "3", "reasoning": "off"}
MARKUP = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking off<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "reasoning": "maybe"}, r"field 'reasoning' must be 'on' or 'off'"),
    ({**GOOD, "output": ""}, r"field 'output' is empty"),
    ({**GOOD, "output": "  <|eot_id|>"}, r"field 'output' is empty"),
    ({"input": [{"role": "user", "content": "Hi"}], "reasoning": "off"}, r"missing field 'output'"),
    # message list: the conversation's last turn is the assistant's, so `output` has no prompt to answer
    ({**GOOD, "input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     r"field 'input' must end with a user turn"),
    # chat markup: no user turn at all; the assistant's answer inside the markup with an empty output
    ({**GOOD, "input": MARKUP.split("<|start_header_id|>user")[0]}, r"field 'input' must end with a user turn"),
    ({**GOOD, "input": MARKUP + "Yo<|eot_id|>", "output": ""}, r"field 'input' must end with a user turn"),
    ({**GOOD, "input": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                        {"role": "user", "content": "Hi"}]}, r"message 2: role must be user or assistant"),
    ("{\"input\": [", r"malformed JSON"),
])
def test_bad_records_name_file_and_line(data_dir, bad, message, tmp_path):
    tok = load_tokenizer(data_dir)
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "input": MARKUP}, bad])
    assert len(load_sft_jsonl(write_rows(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "input": MARKUP}]), tok)) == 2
    with pytest.raises(DataError, match=r"bad\.jsonl:3: " + message):
        data.Source(path, 1.0, tok, CONTEXT, 768)


def test_counted_skips_and_vocabulary(data_dir, tmp_path):
    tok = load_tokenizer(data_dir)
    on = {**GOOD, "reasoning": "on", "output": "<think>\n1+2\n3\n</think>\n\n3"}
    rows = [GOOD, on, {**GOOD, "output": on["output"]}, {**on, "output": "3"}, {**GOOD, "output": "9 " * 200}]
    src = data.Source(write_rows(tmp_path / "mix.jsonl", rows), 1.0, tok, CONTEXT, 768)
    assert len(src) == 2 and src.dropped_format == 2 and src.dropped_long == 1 and src.first_format_line == 3
    assert "dropped 1 longer than seq_len" in src.report() and "2 with a format" in src.report()
    with pytest.raises(DataError, match=r"mix\.jsonl:1: token id [0-9]+ \('<\|eot_id\|>'\) is outside the "
                                        r"model's vocabulary of 300"):
        data.Source(str(tmp_path / "mix.jsonl"), 1.0, tok, CONTEXT, 300)
    with pytest.raises(DataError, match="no usable samples"):
        data.Source(write_rows(tmp_path / "none.jsonl", [rows[2]]), 1.0, tok, CONTEXT, 768)


def test_flags_are_validated(data_dir, init_dir, tmp_path):
    base = flags(data_dir, init_dir, tmp_path / "x")
    for extra, message in [
        ([f"--data={data_dir}/sft_train.jsonl:0"], "must be a positive number"),
        ([f"--data={data_dir}/sft_train.jsonl,{data_dir}/sft_val.jsonl"], "give each a weight"),
        ([f"--data={tmp_path}/nope.jsonl:1,{data_dir}/sft_val.jsonl:1"], "nope.jsonl: no such file"),
        (["--seq_len=256"], r"seq_len <= 128"),
        (["--total_batch_size=1000"], "must be a multiple of"),
        (["--lr=0"], "lr"), (["--warmup_frac=1"], "warmup_frac"), (["--epochs=-1"], "epochs"),
        ([f"--out_dir={init_dir}"], "is the same as --init_from"),
        ([f"--init_from={tmp_path}"], "config.json"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(sft.SFTConfig, base + extra)
    assert parse_config(sft.SFTConfig, base[:5] + ["--seq_len=0"]).seq_len == 0   # 0: derived from the data at run time
    # a Hugging Face folder: its own tokenizer under original/, or a clear error when it has none
    hf = tmp_path / "hf"
    save_model(tiny_model(768), str(hf), fmt="hf")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        parse_config(sft.SFTConfig, base + [f"--init_from={hf}"])
    load_tokenizer(data_dir).save(str(hf / "original"))
    run(*base, f"--init_from={hf}", "--max_steps=1", "--val_data=")
    with pytest.raises(ConfigError, match=r"fewer than one step"):
        run(*base, "--epochs=0.01", "--overwrite=True")


def test_cli_reports_errors_in_one_line(data_dir, init_dir, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "output": ""}])
    r = subprocess.run([sys.executable, "sft.py", *flags(data_dir, init_dir, tmp_path / "x"), f"--data={bad}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'output' is empty: the sample has no assistant response"


def test_position_gaps_between_turns(data_dir):
    """--pos_gap: every turn after the first (system, then user, then assistant) starts 0..pos_gap
    positions after the turn before it, inside a turn positions step by one; the same rows get the
    same gaps (a resume replays them) and gaps vary over turns; inputs and targets do not change."""
    tok = load_tokenizer(data_dir)
    src = data.Source(f"{data_dir}/sft_train.jsonl", 1.0, tok, CONTEXT, 768)
    T = 2 * CONTEXT
    rows = [[(0, j) for j in row] for row in data.pack(src.lengths[:40], T)]
    plain = sft.make_batch(rows, [src], T, tok.pad_id, "cpu")
    gapped = sft.make_batch(rows, [src], T, tok.pad_id, "cpu", pos_gap=24, seed=3, turn_id=tok.start_header_id)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], gapped[:3]))       # x, y, doc unchanged
    again = sft.make_batch(rows, [src], T, tok.pad_id, "cpu", pos_gap=24, seed=3, turn_id=tok.start_header_id)
    assert torch.equal(gapped[3], again[3])
    gaps = []
    for b, row in enumerate(rows):
        t = 0
        for i, j in row:
            n, ids = src.lengths[j], np.asarray(src.ids[j])
            heads = list(np.flatnonzero(ids == tok.start_header_id))
            assert len(heads) == 3 and heads[0] == 1                             # system, user, assistant
            step = np.diff(gapped[3][b, t:t + n].numpy())
            assert gapped[3][b, t] == 0 and set(np.flatnonzero(step != 1) + 1) <= set(heads[1:])
            gaps += [int(step[h - 1]) - 1 for h in heads[1:]]
            t += n
    assert min(gaps) >= 0 and max(gaps) <= 24 and len(set(gaps)) >= 15          # drawn, not one shift
