"""Issue 22: no command loses data, every bad input is one line, Ctrl-C is a clean stop, defaults
that fit any checkpoint. Unit tests of the shared pieces (configurator.check_out_dir, non-finite
floats, MetricsLog / read_metrics, interruptible, the auto defaults) and report.py on a synthetic
out/ tree. The command-line cases are in tests/test_bad_input.py.
Run: python -m pytest -q tests/test_safety.py"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import runtime
from configurator import ConfigError, Interrupted, UserError, check_out_dir, parse_config, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------
# configurator

def test_check_out_dir_refuses_inputs_and_saved_checkpoints(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is the same as --init_from"):
        check_out_dir(str(inp), {"init_from": str(inp)})
    with pytest.raises(ConfigError, match="lies inside --init_from"):
        check_out_dir(str(inp / "sub"), {"init_from": str(inp)})
    with pytest.raises(ConfigError, match="contains --data"):
        check_out_dir(str(tmp_path), [("data", str(inp / "rows.jsonl"))])
    with pytest.raises(ConfigError, match="same as --teacher"):   # links resolved
        os.symlink(inp, tmp_path / "link")
        check_out_dir(str(tmp_path / "link"), {"init_from": "scratch", "teacher": str(inp)})
    with pytest.raises(ConfigError, match="already holds a saved checkpoint .*--resume=True.*--overwrite=True"):
        check_out_dir(str(inp), {})
    check_out_dir(str(inp), {}, resume=True)
    check_out_dir(str(inp), {}, overwrite=True)
    check_out_dir(str(tmp_path / "new"), {"init_from": str(inp), "teacher": ""})
    check_out_dir(str(tmp_path / "in2"), {"init_from": str(inp)})   # a name that merely starts alike


@dataclasses.dataclass
class Floats:
    lr: float = 1.0
    temperature: float | None = None


@pytest.mark.parametrize("arg", ["--lr=1e999", "--lr=-1e999", "--temperature=1e999", "--lr=10**400"])
def test_every_float_flag_rejects_non_finite_values(arg):
    flag = arg.split("=")[0]
    with pytest.raises(ConfigError, match=f"{flag}.*(not a finite number|not a valid float)"):
        parse_config(Floats, [arg])
    assert parse_config(Floats, ["--lr=1e300"]).lr == 1e300


def test_non_finite_in_a_json_preset(tmp_path):
    p = tmp_path / "p.json"
    p.write_text('{"lr": Infinity}')
    with pytest.raises(ConfigError, match="p.json.*lr=inf is not a finite number"):
        parse_config(Floats, [str(p)])


# ------------------------------------------------------------------------------------------------
# metrics: appended under run markers, never deleted; torn lines skipped

def test_metrics_log_keeps_old_runs_and_readers_take_the_last(tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    a = runtime.MetricsLog(path)
    a.log(step=1, loss=3.0)
    a.log(step=2, loss=2.0)
    b = runtime.MetricsLog(path)            # a new run: the old rows stay in the file
    b.log(step=1, loss=9.0)
    assert [r["loss"] for r in runtime.read_metrics(path)] == [9.0]
    assert [r["loss"] for r in runtime.read_metrics(path, all_runs=True)] == [3.0, 2.0, 9.0]
    c = runtime.MetricsLog(path, append=True)   # a resume continues the last run
    c.log(step=2, loss=8.0)
    assert [r["loss"] for r in runtime.read_metrics(path)] == [9.0, 8.0]
    with open(path, "a") as f:              # a kill in the middle of a line
        f.write('{"step": 3, "lo')
    assert [r["loss"] for r in runtime.read_metrics(path)] == [9.0, 8.0]
    assert capsys.readouterr().err.count("warning:") == 1
    d = runtime.MetricsLog(path, append=True)   # the next run starts on a line of its own
    d.log(step=3, loss=7.0)
    assert [r["loss"] for r in runtime.read_metrics(path)] == [9.0, 8.0, 7.0]
    lines = open(path).read().splitlines()
    lines.insert(2, "{broken")               # damage in the middle: an error naming the line
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl:3: not valid JSON"):
        runtime.read_metrics(path)


# ------------------------------------------------------------------------------------------------
# Ctrl-C

def _sigint_default():
    """A child of a backgrounded pytest (nohup, &) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt: give the child the terminal's default, as an interactive user has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interruptible_saves_the_last_finished_step(capsys):
    saved = []
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when pytest runs in the background (nohup, &)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def body():
        for step in runtime.interruptible(range(5, 20), saved.append):
            if step == 7:
                os.kill(os.getpid(), signal.SIGINT)   # arrives during step 7: it finishes, then the save
            time.sleep(0.01)
    with pytest.raises(Interrupted) as e:
        body()
    assert saved == [8] and e.value.step == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored after the loop
    signal.signal(signal.SIGINT, before)

    def main(cfg):
        body()
    with pytest.raises(SystemExit) as e:
        run_main(main, Floats, [])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted at step 8; --resume=True continues"

    def plain(cfg):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(plain, Floats, [])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


# ------------------------------------------------------------------------------------------------
# defaults that fit any checkpoint

def test_auto_defaults():
    assert runtime.auto_seq_len(512, 100) == 256
    assert runtime.auto_seq_len(512, 300) == 512
    assert runtime.auto_seq_len(131072, 300) == 512       # a Llama 3 context: no 131,072-token rows
    assert runtime.auto_seq_len(128, 100) == 128          # never above the context
    assert runtime.auto_total_batch(4096, 16, 512) == 8192   # one micro-step of 16 x 512
    assert runtime.auto_total_batch(4096, 16, 256) == 4096
    assert runtime.auto_total_batch(4096, 4, 256, 2) == 4096
    assert runtime.auto_eval_interval(1) is None and runtime.auto_eval_interval(2) is None
    assert runtime.auto_eval_interval(10) == 5 and runtime.auto_eval_interval(450) == 100


# ------------------------------------------------------------------------------------------------
# report.py: each missing or broken input named in one line; report.md / report.json atomic

def fake_out(root):
    """The files report.py reads, as the stages write them, with made-up numbers."""
    from model import ModelConfig
    cfg = ModelConfig.llama(num_layers=1, vocab_size=64, hidden_size=16, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    ev = {"accuracy": 0.5, "think_rate": 1.0, "by_k": {"3": 0.5}, "by_task": {"addmod10": 0.5, "count": 1.0}, "n_by_task": {"addmod10": 4, "count": 2}, "n": 6}
    for m in ("parent", "child", "sft", "grpo"):
        os.makedirs(root / m, exist_ok=True)
        (root / m / "config.json").write_text(json.dumps(cfg.to_dict()))
        (root / m / "metrics.jsonl").write_text('{"run_marker": {"continues": false}}\n{"step": 1, "train_loss": 1.0}\n')
        for mode in ("on", "off"):
            os.makedirs(root / "eval", exist_ok=True)
            (root / "eval" / f"{m}_{mode}.json").write_text(json.dumps(ev))
    speed = {"decode_tokens_per_s": 150.0, "prefill_tokens_per_s": 1000.0}
    (root / "eval" / "bench.json").write_text(json.dumps({**speed, "baseline": {**speed, "decode_tokens_per_s": 100.0}}))
    os.makedirs(root / "puzzle", exist_ok=True)
    child = {"predicted_speedup": 1.6, "kl": 0.1, "score": 0.2, "attention": ["gqa_kv1"], "ffn": ["swiglu_16"]}
    (root / "puzzle" / "assemble.json").write_text(json.dumps({"child": child, "control": None}))
    (root / "puzzle" / "layout.txt").write_text("layer table\n")
    os.makedirs(root / "logs", exist_ok=True)
    for s in ("data", "parent", "sft"):
        (root / "logs" / f"{s}.seconds").write_text("5\n")


def report_cli(out):
    r = subprocess.run([sys.executable, "report.py", f"--out_dir={out}"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stderr.strip()


def test_report_names_each_broken_input(tmp_path):
    import configurator
    good = tmp_path / "good"
    fake_out(good)
    breaks = {
        "bad eval JSON": (lambda o: (o / "eval" / "sft_on.json").write_text("{oops"), ["sft_on.json:1", "not valid JSON"]),
        "a list": (lambda o: (o / "eval" / "grpo_off.json").write_text("[1, 2]"), ["grpo_off.json", "JSON list"]),
        "seconds abc": (lambda o: (o / "logs" / "sft.seconds").write_text("abc"), ["sft.seconds", "'abc'"]),
        "no baseline": (lambda o: (o / "eval" / "bench.json").write_text('{"decode_tokens_per_s": 1.0, '
                                                                         '"prefill_tokens_per_s": 1.0}'),
                        ["bench.json", "'baseline'"]),
        "no grpo metrics": (lambda o: os.remove(o / "grpo" / "metrics.jsonl"), ["grpo/metrics.jsonl", "missing"]),
        "damaged metrics line": (lambda o: (o / "sft" / "metrics.jsonl").write_text('{"step": 1, "tr\n{"step": 2}\n'),
                                 ["sft/metrics.jsonl:1", "not valid JSON"]),
        "no eval": (lambda o: os.remove(o / "eval" / "child_on.json"), ["child_on.json", "missing"]),
        "accuracy text": (lambda o: (o / "eval" / "parent_on.json").write_text('{"accuracy": "high", "think_rate": 1}'),
                          ["parent_on.json", "'accuracy'", "not a number"]),
    }
    for name, (damage, needles) in breaks.items():
        out = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, out)
        damage(out)
        rc, err = report_cli(out)
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
        assert all(n in err for n in needles), (name, err)
        assert not os.path.exists(out / "report.md") and not os.path.exists(out / "report.json"), name
    # a torn last line (a kill mid-write): one warning, the report is made
    with open(good / "grpo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')
    rc, err = report_cli(good)
    assert rc == 0, err
    assert err.count("warning:") == 1 and "torn" in err
    assert json.loads((good / "report.json").read_text())["child"]["measured_speedup"] == 1.5
    assert "nanoNemotron speedrun report" in (good / "report.md").read_text()
    assert not [n for n in os.listdir(good) if n.startswith(configurator.TMP_PREFIX)]


# ------------------------------------------------------------------------------------------------
# Ctrl-C of a real training run and of the chat REPL

def _wait_for(pred, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from data import DataConfig, prepare
    d = tmp_path_factory.mktemp("ctrlc")
    prepare(DataConfig(out_dir=str(d / "data"), vocab_size=640, pretrain_tokens=8_000, pretrain_val_tokens=2_000,
                       tokenizer_chars=30_000, sft_train=10, sft_val=4, rl_train=4, val_per_k=2, test_per_k=2,
                       test_chat=2))
    return d


TINY = ["--n_layer=1", "--n_embd=32", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=64", "--seq_len=32",
        "--device_batch_size=2", "--total_batch_size=64", "--eval_interval=0", "--device=cpu", "--warmup_steps=1",
        "--log_interval=1"]


def test_ctrl_c_saves_and_resumes(small_world):
    """Ctrl-C a few steps into distill.py: one line, exit 130, a checkpoint of the last finished step
    that --resume=True continues; metrics.jsonl keeps every line it had."""
    d = small_world
    out = d / "run"
    args = [sys.executable, "distill.py", *TINY, f"--data_dir={d / 'data'}", f"--out_dir={out}", "--max_steps=100000"]
    log = open(d / "ctrlc.err", "w+")   # a file, not a pipe: tqdm's output must never block the run
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log, text=True,
                         preexec_fn=_sigint_default)
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.read_text().count('"step"') >= 3, 300), "no steps logged"
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    err = (d / "ctrlc.err").read_text()
    assert p.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith("; --resume=True continues") and "Traceback" not in err
    step = int(last.split()[3].rstrip(";"))
    state = runtime.load_trainer_state(str(out))
    assert state["step"] == step
    logged = [r["step"] for r in runtime.read_metrics(str(metrics)) if "train_lm" in r]
    assert logged and max(logged) == step
    # without --resume the folder is refused (the checkpoint is kept) ...
    r = subprocess.run(args[:-1] + ["--max_steps=100000", "--stop_after=1"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "already holds a saved checkpoint" in r.stderr
    # ... and --resume=True continues it
    r = subprocess.run(args + ["--resume=True", "--stop_after=1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert runtime.load_trainer_state(str(out))["step"] == step + 1
    assert [r["step"] for r in runtime.read_metrics(str(metrics)) if "train_lm" in r] == logged + [step + 1]


def test_ctrl_c_in_puzzle_keeps_the_saved_stages(small_world):
    """Ctrl-C while puzzle.py redoes its library: one line, exit 130, and the library and scores an
    earlier run saved are byte-identical (a stage's files are written only when it is done)."""
    import torch
    from checkpoint import save_model
    from data import load_tokenizer
    from model import ModelConfig, Transformer
    d = small_world
    tok = load_tokenizer(str(d / "data"))
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.llama(num_layers=2, vocab_size=tok.n_vocab, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
               str(d / "pz_parent"))
    tok.save(str(d / "pz_parent"))
    out = d / "pz"
    args = [sys.executable, "puzzle.py", f"--parent={d / 'pz_parent'}", f"--data_dir={d / 'data'}", f"--out_dir={out}",
            "--seq_len=32", "--device_batch_size=2", "--bld_batch_size=2", "--calib_tokens=64", "--bld_eval_tokens=64",
            "--score_tokens=64", "--ffn_round=8", "--bld_warmup_steps=0", "--device=cpu", "--until=score",
            "--cost_prompt_len=4", "--cost_new_tokens=4"]
    r = subprocess.run(args + ["--bld_tokens=128"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = {f: (out / f).read_bytes() for f in ("library.json", "library.safetensors", "scores.json")}
    log = open(d / "pz.err", "w+")
    p = subprocess.Popen(args + ["--bld_tokens=100000000"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log,
                         text=True, preexec_fn=_sigint_default)
    assert _wait_for(lambda: "BLD:" in (d / "pz.err").read_text(), 300), (d / "pz.err").read_text()[-2000:]
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    err = (d / "pz.err").read_text()
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].split("\r")[-1] == "interrupted", err[-500:]
    assert {f: (out / f).read_bytes() for f in saved} == saved
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_ctrl_c_in_the_chat_repl(small_world):
    import torch
    from data import load_tokenizer
    from model import ModelConfig, Transformer
    from checkpoint import save_model
    d = small_world
    tok = load_tokenizer(str(d / "data"))
    m = Transformer(ModelConfig.llama(num_layers=1, vocab_size=tok.n_vocab, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))
    save_model(m, str(d / "chat"))
    tok.save(str(d / "chat"))
    p = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={d / 'chat'}", "--chat_repl=True", "--device=cpu"],
                         cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_sigint_default)
    import threading
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stderr.readline, "")), daemon=True)
    reader.start()
    assert _wait_for(lambda: any("[chat with" in x for x in lines), timeout=120)   # loaded, waiting at input()
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted"
    del torch
