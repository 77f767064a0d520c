"""Bad input, run as a user would: every script (data.py, distill.py, sample.py, model.py,
ranker_eval.py, tools/bench_kernels.py) answers each bad flag, file or checkpoint with exit status 2 and ONE
line `error: ...` naming the cause, never a traceback and never a silent wrong result.

Each case is `python SCRIPT ARGS` with the script run as __main__. To keep the suite fast, the cases
of a script run one after another in one interpreter (tests/cli_harness.py: runpy, sys.argv, the
exit status and stderr exactly as `python SCRIPT ARGS` gives them, uncaught exceptions printed with
their traceback), so torch is imported once per batch, not once per case; test_real_processes runs
a few of them as separate processes too, to show that the harness says what the interpreter says.
Run: python -m pytest -q tests/test_bad_input.py   (~30-40 s on 2 CPU cores)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import save_model
from data import DataConfig, load_tokenizer, prepare
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
HARNESS = os.path.join(ROOT, "tests", "cli_harness.py")
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=64", "--seq_len=32",
        "--device_batch_size=2", "--total_batch_size=64", "--eval_interval=0", "--device=cpu", "--warmup_steps=1"]


def run_cases(cases, timeout=300):
    """cases: [(script, [args], [needles])] -> asserts each prints exactly one line, `error: ...`
    containing every needle, and exits with status 2. A needle "AFTER_WORK" marks a failure met
    while working (a loss that turns non-finite): the lines the run printed before it (its banner)
    may precede the one error line."""
    r = subprocess.run([sys.executable, HARNESS], input=json.dumps([[s, a] for s, a, _ in cases]), cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    bad = []
    for (script, args, needles), res in zip(cases, results):
        err = res["stderr"].strip()
        lines = err.splitlines()
        if "AFTER_WORK" in needles:
            needles = [n for n in needles if n != "AFTER_WORK"]
            lines = [line.split("\r")[-1] for line in lines if "error: " in line]
        ok = (res["rc"] == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: ")
              and all(n in lines[0] for n in needles))
        if not ok:
            bad.append(f"python {script} {' '.join(args)}\n  -> rc {res['rc']}, stderr: {err[-600:]!r}\n"
                       f"  wanted one 'error:' line containing {needles}")
    if os.environ.get("BAD_INPUT_TABLE"):   # the input -> message table of the README
        with open(os.environ["BAD_INPUT_TABLE"], "a") as f:
            for (script, args, _), res in zip(cases, results):
                shown = " ".join(a.split("=", 1)[0] + "=" + os.path.basename(a.split("=", 1)[1]) if "=" in a and "/" in a
                                 else os.path.basename(a) for a in args if not a.startswith(tuple(TINY)))
                f.write(f"| `{script} {shown}` | {res['rc']} | `{res['stderr'].strip().splitlines()[-1].split(chr(13))[-1]}` |\n")
    assert not bad, "\n".join(bad)
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny data world, a trained 2-step checkpoint, and broken copies of files."""
    d = tmp_path_factory.mktemp("bad")
    data = d / "data"
    prepare(DataConfig(out_dir=str(data), pretrain_tokens=8_000, pretrain_val_tokens=2_000, tokenizer_chars=30_000, vocab_size=640,
                       sft_train=10, sft_val=4, rl_train=4, val_per_k=2, test_per_k=2, test_chat=2))
    tok = load_tokenizer(str(data))
    (d / "a_file").write_text("not a folder\n")
    (d / "latin1.txt").write_bytes("a caf\xe9 line\nthe second line has \xff too\n".encode("latin-1"))

    def ckpt(name, edit=None, **kw):
        torch.manual_seed(0)
        m = Transformer(ModelConfig.llama(num_layers=1, vocab_size=tok.n_vocab, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **kw))
        if edit:
            with torch.no_grad():
                edit(m)
        save_model(m, str(d / name))
        tok.save(str(d / name))
        return d / name

    ckpt("good")
    ckpt("nan", lambda m: m.model.layers[0].mlp.up_proj.weight.__setitem__((0, 0), float("nan")))

    def huge(m):   # finite weights whose logits overflow float32: the loss is inf/NaN at step 0
        m.model.norm.weight.fill_(3e38)
        m.lm_head.weight.fill_(1e30)
    ckpt("huge", huge)
    cfg = json.loads((d / "good" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size"):
        (d / f"no_{key}").mkdir()
        (d / f"no_{key}" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != key}))
    # a run to resume: 2 of 4 steps
    r = subprocess.run([sys.executable, "distill.py", *TINY, f"--data_dir={data}", f"--out_dir={d / 'run'}",
                        "--max_steps=4", "--stop_after=2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    os.makedirs(d / "cut", exist_ok=True)   # the same run with a truncated trainer_state.pt
    for f in os.listdir(d / "run"):
        (d / "cut" / f).write_bytes((d / "run" / f).read_bytes())
    state = (d / "cut" / "trainer_state.pt").read_bytes()
    (d / "cut" / "trainer_state.pt").write_bytes(state[:len(state) // 2])
    other = d / "other_data"   # another data world (another seed) for --resume with another --data_dir
    prepare(DataConfig(out_dir=str(other), seed=2, pretrain_tokens=8_000, pretrain_val_tokens=2_000,
                       tokenizer_chars=30_000, vocab_size=640, sft_train=10, sft_val=4, rl_train=4, val_per_k=2, test_per_k=2,
                       test_chat=2))
    return d


def test_data_py(world):
    d = world
    out = f"--out_dir={d / 'data_out'}"
    run_cases([
        ("data.py", [out, "--chat_frac=2.0"], ["--chat_frac=2.0", "0 <= chat_frac <= 1"]),
        ("data.py", [out, "--parent_chat_frac=1.0"], ["--parent_chat_frac=1.0"]),
        ("data.py", [out, "--sft_train=1"], ["--sft_train=1", "even number >= 2"]),
        ("data.py", [out, "--sft_val=0"], ["--sft_val=0"]),
        ("data.py", [out, "--vocab_size=0"], ["--vocab_size=0", "512 <= vocab_size"]),
        ("data.py", [out, "--vocab_size=100000", "--tokenizer_chars=2000"],
         ["AFTER_WORK", "--vocab_size=100000", "corpus too small", "--tokenizer_chars"]),
        ("data.py", [out, "--k_min=5", "--k_max=3"], ["--k_max=3", "--k_min=5"]),
        ("data.py", [out, "--k_min=1"], ["--k_min=1"]),
        ("data.py", [out, "--eval_k_min=13"], ["--eval_k_min=13"]),
        ("data.py", [out, "--test_per_k=500"], ["--test_per_k=500", "k=3"]),
        ("data.py", [out, "--pretrain_tokens=0"], ["--pretrain_tokens=0"]),
        ("data.py", [out, "--seed=abc"], ["--seed", "not a valid int"]),
        ("data.py", [out, "--chat_fraction=0.5"], ["unknown key 'chat_fraction'", "valid keys"]),
        ("data.py", [f"--out_dir={d / 'a_file'}"], ["--out_dir=", "not a folder"]),
        ("data.py", [f"--out_dir={d / 'a_file' / 'sub'}"], ["--out_dir=", "is a file"]),
        ("data.py", ["--out_dir=/proc/nanonemotron"], ["--out_dir=/proc/nanonemotron", "not writable"]),
        ("data.py", [out, f"--tokenizer={d / 'data'}"], ["--tokenizer", "only with --tokenize_text"]),
        ("data.py", [out, f"--tokenize_text={d / 'latin1.txt'}", f"--tokenizer={d / 'data'}"],
         ["latin1.txt:1", "not UTF-8"]),
        ("data.py", [out, f"--tokenize_text={d / 'nope.txt'}", f"--tokenizer={d / 'data'}"],
         ["--tokenize_text=", "no such file"]),
        ("data.py", [out, f"--tokenize_text={d / 'latin1.txt'}"], ["--tokenize_text needs --tokenizer"]),
        ("data.py", [out, f"--tokenize_text={d / 'a_file'}", f"--tokenizer={d / 'good' / 'model.safetensors'}"],
         ["model.safetensors", "safetensors weights file", "not a tokenizer.model"]),
        ("data.py", [out, str(d / "missing_preset.py")], ["missing_preset.py", "does not exist"]),
    ])
    assert not os.path.exists(d / "data_out") or not os.listdir(d / "data_out")   # nothing written


def test_distill_py(world):
    d = world
    common = [*TINY, f"--data_dir={d / 'data'}"]
    out = f"--out_dir={d / 'distill_out'}"
    run_cases([
        ("distill.py", [*common, out, "--n_embd=128", "--n_head=3"], ["--n_head=3", "--n_embd=128"]),
        ("distill.py", [*common, out, "--n_head=4", "--n_kv_head=3"], ["--n_kv_head=3", "--n_head=4"]),
        ("distill.py", [*common, out, "--n_embd=36", "--n_head=4"], ["--n_head=4", "odd head_dim 9"]),
        ("distill.py", [*common, out, "--eval_batches=0"], ["--eval_batches=0"]),
        ("distill.py", [*common, out, "--device_batch_size=0"], ["--device_batch_size=0"]),
        ("distill.py", [*common, out, "--log_interval=0"], ["--log_interval=0"]),
        ("distill.py", [*common, out, "--max_steps=0"], ["--max_steps=0"]),
        ("distill.py", [*common, out, "--lr=-1"], ["--lr=-1"]),
        ("distill.py", [*common, out, "--min_lr_frac=1.5"], ["--min_lr_frac=1.5"]),
        ("distill.py", [*common, out, "--total_batch_size=100"], ["--total_batch_size=100", "multiple of"]),
        ("distill.py", [*common, out, "--device=tpu"], ["--device='tpu'", "auto, cpu, cuda"]),
        ("distill.py", [*common, out, "--layer_map=a-b"], ["--layer_map='a-b'"]),
        ("distill.py", [*common, f"--out_dir={d / 'a_file'}"], ["--out_dir=", "not a folder"]),
        ("distill.py", [*common, "--out_dir=/proc/nanonemotron"], ["--out_dir=/proc/nanonemotron", "not writable"]),
        ("distill.py", [*TINY, f"--data_dir={d / 'nope'}", out], ["--data_dir=", "no such folder"]),
        ("distill.py", [*common, out, f"--init_from={d / 'good' / 'model.safetensors'}"],
         ["--init_from=", "safetensors weights file", "expected a folder"]),
        ("distill.py", [*common, out, f"--teacher={d / 'nope'}"], ["--teacher=", "no such folder"]),
        ("distill.py", [*common, out, f"--init_from={d / 'nan'}"],
         ["model.layers.0.mlp.up_proj.weight", "non-finite"]),
        ("distill.py", [*common, out, f"--init_from={d / 'good'}", f"--teacher={d / 'nan'}"],
         ["model.layers.0.mlp.up_proj.weight", "non-finite"]),
        ("distill.py", [*common, out, f"--init_from={d / 'huge'}"],
         ["AFTER_WORK", "loss is not finite", "first step", "--init_from=", "not the learning rate"]),
        ("distill.py", [*common, out, f"--init_from={d / 'no_vocab_size'}"], ["config.json", "vocab_size"]),
        ("distill.py", [*common, f"--out_dir={d / 'run'}", "--max_steps=4", "--resume=True",
                        f"--data_dir={d / 'other_data'}"], ["--resume=True", "data_dir"]),
        ("distill.py", [*common, f"--out_dir={d / 'cut'}", "--max_steps=4", "--resume=True"],
         ["trainer_state.pt", "truncated"]),
        ("distill.py", [*common, f"--out_dir={d / 'distill_out'}", "--max_steps=4", "--resume=True"],
         ["trainer_state.pt does not exist"]),
    ])
    assert not os.path.exists(d / "distill_out" / "model.safetensors")


def test_sample_and_model_py(world):
    d = world
    weights = d / "good" / "model.safetensors"
    run_cases([
        ("sample.py", [f"--ckpt={weights}"], ["--ckpt=", "safetensors weights file", "expected a folder"]),
        ("sample.py", [f"--ckpt={d / 'nan'}", "--max_new_tokens=4"], ["model.layers.0.mlp.up_proj.weight", "non-finite"]),
        ("sample.py", [f"--ckpt={d / 'no_vocab_size'}"], ["config.json", "missing fields ['vocab_size']"]),
        ("sample.py", [f"--ckpt={d / 'no_hidden_size'}"], ["config.json", "missing fields ['hidden_size']"]),
        ("sample.py", [f"--ckpt={d / 'good'}", "--top_p=2"], ["--top_p=2"]),
        ("sample.py", [f"--ckpt={d / 'good'}", "--reasoning=maybe"], ["--reasoning='maybe'"]),
        ("model.py", [str(weights)], ["model.safetensors", "safetensors weights file", "not a config.json"]),
        ("model.py", [str(d / "nope")], ["nope", "no such file or folder"]),
        ("model.py", [str(d / "no_hidden_size")], ["config.json", "missing fields ['hidden_size']"]),
        ("model.py", [str(d / "latin1.txt")], ["latin1.txt", "not valid JSON"]),
        ("model.py", [], ["usage: python model.py PATH"]),
    ])


def test_ranker_eval_and_kernels_py(world):
    d = world
    out = f"--out_dir={d / 'ranker_out'}"
    letor = {"label": "x qid:1 1:0.5", "qid": "1 1:0.5 2:0.1", "feature": "1 qid:1 1=0.5", "nan": "nan qid:1 1:0.5",
             "inf_feature": "1 qid:1 1:inf", "repeat": "1 qid:1 1:0.5 1:0.7"}
    cases = []
    for name, line in letor.items():
        (d / f"{name}.letor").write_text(f"2 qid:1 1:0.5 2:0.1\n{line}\n")
        cases.append(("ranker_eval.py", [out, f"--data={d / f'{name}.letor'}"], [f"{name}.letor:2:"]))
    (d / "empty.letor").write_text("# only a comment\n")
    (d / "binary.letor").write_bytes(b"2 qid:1 1:0.5\n\xff\xfe qid:1\n")
    cases += [
        ("ranker_eval.py", [out, f"--data={d / 'empty.letor'}"], ["empty.letor", "no data lines"]),
        ("ranker_eval.py", [out, f"--data={d / 'binary.letor'}"], ["binary.letor:2:", "UTF-8"]),
        ("ranker_eval.py", [out, f"--data={d / 'nope.txt'}"], ["--data=", "no such file"]),
        ("ranker_eval.py", [out, "--n_queries=0"], ["--n_queries=0"]),
        ("ranker_eval.py", [out, "--mc_samples=0"], ["--mc_samples=0"]),
        ("ranker_eval.py", [out, "--K=0"], ["--K=0"]),
        ("ranker_eval.py", [out, "--docs_min=6", "--docs_max=3"], ["--docs_max=3", "--docs_min=6"]),
        ("ranker_eval.py", [out, "--eps=2"], ["--eps=2"]),
        ("ranker_eval.py", [out, "--log_sizes=10,x"], ["--log_sizes=10,x"]),
        ("ranker_eval.py", [out, "--estimators=ips"], ["--estimators=ips", "unknown"]),
        ("ranker_eval.py", [out, "--examination=0.5"], ["--examination=0.5"]),
        ("ranker_eval.py", [out, "--temprature=1"], ["unknown key 'temprature'"]),
        ("ranker_eval.py", [f"--out_dir={d / 'a_file'}"], ["--out_dir=", "not a folder"]),
        ("ranker_eval.py", ["--out_dir=/proc/nanonemotron"], ["--out_dir=/proc/nanonemotron", "not writable"]),
        ("kernels.py", ["--bench"], ["no command line", "tools/bench_kernels.py"]),   # moved: says where
        ("tools/bench_kernels.py", [], ["nothing to do"]),
        ("tools/bench_kernels.py", ["--compile_check", "--seqlens=1,x"], ["--seqlens="]),
        ("tools/bench_kernels.py", ["--bench", "--dtype=int8"], ["--dtype='int8'"]),
        ("tools/bench_kernels.py", ["--bench", "--tokens=0"], ["--tokens=0"]),
        ("tools/bench_kernels.py", ["--sequence=4"], ["unknown key 'sequence'"]),
    ]
    if not torch.cuda.is_available():
        cases.append(("tools/bench_kernels.py", ["--bench"], ["--bench needs a CUDA GPU"]))
    run_cases(cases)
    assert not os.path.exists(d / "ranker_out")


def test_real_processes(world):
    """A few cases as separate `python SCRIPT ARGS` processes: the same status, the same line."""
    d = world
    for script, args, needle in [("distill.py", [f"--data_dir={d / 'data'}", "--max_steps=0"], "--max_steps=0"),
                                 ("model.py", [str(d / "good" / "model.safetensors")], "safetensors weights file"),
                                 ("ranker_eval.py", [f"--data={d / 'label.letor'}", f"--out_dir={d / 'r'}"], "label.letor:2:")]:
        r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    scripts = ("data.py", "distill.py", "sample.py", "ranker_eval.py", "tools/bench_kernels.py")   # --help everywhere
    r = subprocess.run([sys.executable, HARNESS], input=json.dumps([[s, ["--help"]] for s in scripts]), cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    for script, res in zip(scripts, json.loads(r.stdout.strip().splitlines()[-1])):
        assert res["rc"] == 0 and "preset files as bare paths, then --key=value" in res["stdout"], (script, res)
