"""The yardsticks: evaluate.py's accuracy / think rate against the verifier by hand, the compiled
decode step against the eager one, the benchmark's code paths, and sample.py's errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
from checkpoint import save_model
from data import DataConfig, has_think_block, heldout_problems, load_tokenizer, prepare, verify
from model import ModelConfig, NonFiniteError, Transformer, sample_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare(DataConfig(out_dir=str(d), pretrain_tokens=20_000, pretrain_val_tokens=4_000, tokenizer_chars=40_000, vocab_size=640,
                       sft_train=20, sft_val=10, rl_train=10, val_per_k=2, test_per_k=2, test_chat=2))
    return str(d)


def tiny_model(vocab, seed=0, scale=1.0, **kw):
    torch.manual_seed(seed)
    blocks = [dict(attention="gqa", n_heads_in_group=2, ffn="swiglu", intermediate_size=64),
              dict(attention="no_op", ffn="swiglu", intermediate_size=32),
              dict(attention="linear", ffn="linear"),
              dict(attention="gqa", n_heads_in_group=1, ffn="no_op")]
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, num_attention_heads=4, block_configs=blocks,
                                    max_position_embeddings=128, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


class ScriptedModel:
    """Stands in for a Transformer: 'generates' a fixed response per prompt (by prompt tokens)."""

    def __init__(self, tok, script):
        self.tok, self.script, self.training, self.calls = tok, script, False, []
        self.config = ModelConfig.llama(1, vocab_size=tok.n_vocab, max_position_embeddings=512)

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def generate(self, prompts, max_new_tokens, **kw):
        self.calls.append(len(prompts))
        outs = []
        for p in prompts:
            text, stop = self.script[tuple(p)]
            ids = self.tok.encode(text)[:max_new_tokens]
            outs.append(ids + [self.tok.eot_id] if stop and len(ids) < max_new_tokens else ids)
        return outs


def test_evaluation_equals_the_verifier_by_hand(data_dir):
    tok = load_tokenizer(data_dir)
    problems = heldout_problems("test", 14, seed=3, k_min=3, k_max=5)
    responses = []
    for i, p in enumerate(problems):  # right, wrong, reasoned, two answers, cut off, empty...
        kind = i % 6
        if kind == 0:
            responses.append((p["answer"], True))
        elif kind == 1:
            responses.append(("<think>\nstep\n</think>\n\n" + p["answer"], True))
        elif kind == 2:
            responses.append(("<think>\nstep\n</think>\n\n" + p["answer"] + "x", True))
        elif kind == 3:
            responses.append((p["answer"] + " " + p["answer"], True))
        elif kind == 4:
            responses.append(("<think>\nnever closed " + "a " * 80, False))
        else:
            responses.append(("  " + p["answer"] + "\n", True))
    script = {tuple(tok.render_prompt(p["prompt"], "on")): r for p, r in zip(problems, responses)}
    model = ScriptedModel(tok, script)
    res = evaluate.evaluate_problems(model, tok, problems, "on", max_new_tokens=40, batch_size=4)
    texts = [t if stop else tok.decode(tok.encode(t)[:40]) for t, stop in responses]  # as the model returns them
    by_hand = [verify(p, t) for p, t in zip(problems, texts)]
    assert res["correct"] == by_hand
    assert res["accuracy"] == pytest.approx(sum(by_hand) / len(by_hand))
    assert 0 < res["accuracy"] < 1
    assert res["think_rate"] == pytest.approx(sum(has_think_block(t) for t in texts) / len(texts))
    assert res["truncated"] == sum(not stop for _, stop in responses)
    ks = sorted({p["k"] for p in problems if p["task"] == "addmod10"})
    for k in ks:
        rows = [ok for p, ok in zip(problems, by_hand) if p["task"] == "addmod10" and p["k"] == k]
        assert res["by_k"][k] == pytest.approx(sum(rows) / len(rows))
    assert set(model.calls) == {4}  # every batch has the same size (the last one is filled up)
    assert res["responses"] == texts  # in the problems' order


def test_heldout_problems_composition_and_seeds():
    a = heldout_problems("test", 500, seed=1)
    assert len(a) == 500 and len({p["prompt"] for p in a}) == 500
    assert sum(p["task"] == "addmod10" for p in a) == 300
    assert {p["k"] for p in a if p["task"] == "addmod10"} == set(range(3, 13))
    b = heldout_problems("test", 500, seed=2)
    assert {p["prompt"] for p in a} != {p["prompt"] for p in b}


def test_compiled_decode_equals_eager():
    """One torch.compile graph for the whole step; same greedy tokens, and the same samples for the
    same seed (the noise is drawn outside the graph from the same generator)."""
    model = tiny_model(97, scale=8.0)
    prompts = [[5, 17, 3, 60, 2, 9, 11], [40, 41], [7, 7, 8, 1, 2]]
    eager = model.generate(prompts, 20, temperature=0)
    compiled = model.generate(prompts, 20, temperature=0, compile=True)
    assert compiled == eager and any(len(set(o)) > 3 for o in eager)
    a = model.generate(prompts, 20, temperature=1.0, top_p=0.9, seed=4)
    b = model.generate(prompts, 20, temperature=1.0, top_p=0.9, seed=4, compile=True)
    assert a == b
    stop = eager[0][5]
    cut = model.generate(prompts, 20, temperature=0, stop_ids=[stop], compile=True)
    for full, c in zip(eager, cut):
        assert c == full[:full.index(stop) + 1] if stop in full else c == full


def test_benchmark_runs_the_path_it_names(monkeypatch):
    model = tiny_model(97)
    calls = {"eager": 0, "compiled": 0}
    eager_step = model.decode_step

    def counting(name):
        def step(*a):
            calls[name] += 1
            return eager_step(*a)
        return step
    monkeypatch.setattr(model, "decode_step", counting("eager"))
    monkeypatch.setattr(model, "compiled_decode_step", lambda: counting("compiled"))
    res = evaluate.bench_decode_many({"m": model}, batch_size=3, prompt_len=5, new_tokens=6, compile=True, repeats=2)["m"]
    assert res["path"] == "compiled" and calls == {"eager": 0, "compiled": 3 * 5}  # warm-up + 2 repeats
    res = evaluate.bench_decode_many({"m": model}, batch_size=3, prompt_len=5, new_tokens=6, compile=False, repeats=2)["m"]
    assert res["path"] == "eager" and calls["eager"] == 3 * 5
    assert res["context"] == 11 and res["decode_tokens_per_s"] > 0 and res["prefill_tokens_per_s"] > 0
    res = evaluate.bench_compare(model, batch_size=2, prompt_len=5, new_tokens=6, repeats=2)
    assert res["same_tokens"] and res["decode_speedup"] > 0


def test_bench_calmest_measures_again_while_the_machine_looks_busy(monkeypatch, capsys):
    """A benchmark whose repeats disagree (spread > max_spread) is taken again up to `retries`
    times and the calmest kept; a calm one is taken once."""
    spreads = iter([0.9, 0.4, 0.6])
    real = evaluate.bench_decode_many

    def fake(models, *a, **k):
        res = real(models, *a, **k)
        s = next(spreads)
        return {name: {**r, "spread": s, "compile_s": s} for name, r in res.items()}
    monkeypatch.setattr(evaluate, "bench_decode_many", fake)
    models = {"a": tiny_model(97), "b": tiny_model(97)}
    res, calmest, attempts = evaluate.bench_calmest(models, 2, 4, 4, False, 2, max_spread=0.25, retries=2)
    assert attempts == [0.9, 0.4, 0.6] and calmest == 0.4 and res["a"]["spread"] == 0.4 and set(res) == {"a", "b"}
    assert res["b"]["compile_s"] == 0.9   # the one-time compile is the first attempt's
    err = capsys.readouterr().err
    assert err.count("the machine looks busy; measuring again") == 2 and "keeping the calmest measurement" in err
    spreads = iter([0.1])
    _, calmest, attempts = evaluate.bench_calmest(models, 2, 4, 4, False, 2, max_spread=0.25, retries=2)
    assert attempts == [0.1] and "looks busy" not in capsys.readouterr().err


def test_top_p_threshold_and_exponential_race():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, 1.0, None, 0.5, g)) for _ in range(4000)]
    assert set(draws) == {0, 1}                      # 0.4 < 0.5 keeps token 1; 0.7 >= 0.5 drops token 2
    assert abs(draws.count(0) / 4000 - 4 / 7) < 0.03
    draws = [int(sample_next(logits, 1.0, None, 0.75, g)) for _ in range(4000)]
    assert set(draws) == {0, 1, 2}
    draws = [int(sample_next(logits, 1.0, None, None, g)) for _ in range(8000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4) / 8000
    assert torch.allclose(freq, probs[0], atol=0.02)  # the exponential race samples p
    draws = [int(sample_next(logits, 0.5, None, None, g)) for _ in range(8000)]
    sharp = probs[0] ** 2 / (probs[0] ** 2).sum()   # temperature 0.5 squares the probabilities
    assert torch.allclose(torch.bincount(torch.tensor(draws), minlength=4) / 8000, sharp, atol=0.02)


def test_stream_and_nonfinite_logits():
    model = tiny_model(97, scale=8.0)
    seen = []
    out = model.generate([[1, 2, 3]], 10, temperature=0, stream=lambda t: seen.append(int(t[0])))
    assert seen == out[0]
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        model.generate([[1, 2, 3]], 5, temperature=0)


def test_per_row_seeds_and_stream_finishes_rows():
    """serve.py's two needs of generate: a row sampled in a batch with its own seed equals that
    row sampled alone with the seed, and the stream callback can end rows early
    (they keep the tokens they have) while greedy decoding of the other rows is unchanged."""
    model = tiny_model(97, scale=4.0)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4]]
    # (eager only: the noise is drawn outside the step, so the compiled path shares this code)
    alone = [model.generate([p], 12, temperature=1.0, top_p=0.9, seed=s)[0] for p, s in zip(prompts, (11, 22, 33))]
    assert model.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=[11, 22, 33]) == alone
    assert model.generate(prompts, 12, temperature=1.0, seed=[11, 22, 99])[:2] == alone[:2]
    greedy = model.generate(prompts, 12, temperature=0)
    steps = []

    def stream(tok):
        steps.append(tok.tolist())
        return [1] if len(steps) == 3 else None  # row 1 ends after its 3rd token
    out = model.generate(prompts, 12, temperature=0, stream=stream)
    assert out[1] == greedy[1][:3] and out[0] == greedy[0] and out[2] == greedy[2]
    assert all(s[1] == 0 for s in steps[3:])  # a finished row emits pad_id
    calls = []
    out = model.generate(prompts, 12, temperature=0, stream=lambda t: calls.append(1) or [0, 1, 2])
    assert out == [g[:1] for g in greedy] and len(calls) == 1  # every row done: the call ends
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        model.generate(prompts, 4, seed=[1, 2])


def run_sample(*flags, timeout=120):
    return subprocess.run([sys.executable, "sample.py", *flags], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, r.stderr


def test_sample_eval_bench_prompts_and_errors(data_dir, tmp_path):
    tok = load_tokenizer(data_dir)
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model(tok.n_vocab), str(ckpt))
    tok.save(str(ckpt))
    r = run_sample(f"--ckpt={ckpt}", "--eval=True", "--n=12", "--reasoning=off", "--compile=False",
                   "--max_new_tokens=8", f"--out={tmp_path / 'e.json'}")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ") for line in r.stdout.strip().splitlines())
    assert set(lines) == {"accuracy", "think_rate"} and 0 <= float(lines["accuracy"]) <= 1
    assert "by task:" in r.stderr and "by chain length:" in r.stderr
    full = json.load(open(tmp_path / "e.json"))
    assert full["n"] == 12
    # --tasks: the same 12 problems, filtered (5 chat, 7 chains), answered as in the full run
    for tasks, want in (("chat", lambda t: t != "addmod10"), ("chains", lambda t: t == "addmod10")):
        r = run_sample(f"--ckpt={ckpt}", "--eval=True", "--n=12", "--reasoning=off", "--compile=False",
                       "--max_new_tokens=8", f"--tasks={tasks}", f"--out={tmp_path / (tasks + '.json')}")
        assert r.returncode == 0, r.stderr
        part = json.load(open(tmp_path / (tasks + ".json")))
        assert part["n_by_task"] == {t: n for t, n in full["n_by_task"].items() if want(t)}
        assert part["by_task"] == {t: a for t, a in full["by_task"].items() if want(t)}
        assert part["by_k"] == (full["by_k"] if tasks == "chains" else {})
    one_line_error(run_sample(f"--ckpt={ckpt}", "--eval=True", "--tasks=maths"), "--tasks=", "maths", "chains")
    r = run_sample(f"--ckpt={ckpt}", "--bench=True", "--batch_size=2", "--prompt_len=4", "--bench_tokens=5",
                   "--repeats=1", "--compile=False")
    assert r.returncode == 0, r.stderr
    assert {l.split(":")[0] for l in r.stdout.splitlines()} == {"prefill_tokens_per_s", "decode_tokens_per_s", "context"}
    (tmp_path / "p.txt").write_text("Repeat: cat dog\n\nCount the words: a b\n")
    r = run_sample(f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.txt'}", "--reasoning=off", "--max_new_tokens=6",
                   "--compile=False")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 and all(isinstance(json.loads(l), str) for l in r.stdout.splitlines())
    (tmp_path / "p.jsonl").write_text('{"prompt": "Repeat: cat", "reasoning": "on"}\n{"prompt": "Last word: a b"}\n')
    r = run_sample(f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.jsonl'}", "--max_new_tokens=6", "--compile=False")
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [x["reasoning"] for x in rows] == ["on", "on"] and all("response" in x for x in rows)
    # errors: one line naming the cause, exit status 2
    one_line_error(run_sample(f"--ckpt={tmp_path / 'nope'}"), "--ckpt=", "no such folder")
    one_line_error(run_sample(f"--ckpt={ckpt}", "--nope=1"), "unknown key 'nope'", "valid keys")
    one_line_error(run_sample(f"--ckpt={ckpt}", "--eval=True", "--n=0"), "--n=0")
    one_line_error(run_sample(f"--ckpt={ckpt}", "--eval=True", f"--problems={tmp_path / 'missing.jsonl'}"),
                   "--problems=", "no such file")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "y"\n')
    one_line_error(run_sample(f"--ckpt={ckpt}", "--eval=True", f"--problems={tmp_path / 'bad.jsonl'}"),
                   "bad.jsonl:2")
    bare = tmp_path / "bare"
    save_model(tiny_model(tok.n_vocab), str(bare))
    one_line_error(run_sample(f"--ckpt={bare}"), "no tokenizer")
    nan = tiny_model(tok.n_vocab)
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_model(nan, str(tmp_path / "nan"))
    tok.save(str(tmp_path / "nan"))
    one_line_error(run_sample(f"--ckpt={tmp_path / 'nan'}"), "model.layers.0.mlp.up_proj.weight", "non-finite")


def test_top_p_threshold_is_pinned():
    """probs 0.5 / 0.3 / 0.2, top_p 0.7: a token is dropped when the more likely ones already cover
    0.7, so tokens 0 and 1 survive (0.5 < 0.7) and token 2 does not (0.8 > 0.7). With the threshold
    halved (0.35) token 1 would be dropped too. The noise makes token 1 win whenever it survives."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    favour = lambda i: torch.tensor([[1.0, 1.0, 1.0]]).index_fill_(1, torch.tensor([i]), 1e-6)
    assert int(sample_next(logits, 1.0, None, 0.7, noise=favour(1))[0]) == 1   # survives
    assert int(sample_next(logits, 1.0, None, 0.7, noise=favour(2))[0]) == 0   # dropped: the best token wins
    assert int(sample_next(logits, 1.0, None, 0.49, noise=favour(1))[0]) == 0  # 0.5 > 0.49: only token 0
    assert int(sample_next(logits, 1.0, None, 0.81, noise=favour(2))[0]) == 2  # 0.8 < 0.81: all three
