"""Run the bad inputs of issue 22 against the scripts and classify what each does:

  error-line/exit2        one `error: ...` line on stderr, exit status 2 (the README's promise)
  130                     Ctrl-C: exit 130 and the one `interrupted ...` line
  refused-byte-identical  a case that could lose data: refused, its folder byte-identical
  traceback               a Python traceback (a bug)
  hang                    still running after --timeout seconds (30)
  silent                  exit 0 on bad input (a silent wrong result)
  data-loss               the guarded folder changed
  other                   anything else (printed)

    python tools/sweep_bad_inputs.py [--world=/tmp/nn_sweep] [--timeout=30] [--only=SUBSTRING] [--list]

The world (a tiny data world, a checkpoint, a finished run, a Puzzle folder, a report tree) is
built in --world on the first run (~1-3 min) and reused. Every float flag of every script is tried
with 1e999; the cases the issue lists by name follow."""
import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=4", "--n_kv_head=2", "--ffn_hidden=64", "--seq_len=32",
        "--device_batch_size=2", "--total_batch_size=64", "--eval_interval=0", "--device=cpu", "--warmup_steps=1"]
PUZZLE = ["--seq_len=32", "--device_batch_size=4", "--bld_batch_size=4", "--bld_tokens=512", "--bld_warmup_steps=1",
          "--calib_tokens=256", "--bld_eval_tokens=256", "--score_tokens=256", "--cost_batch_size=2",
          "--cost_prompt_len=4", "--cost_new_tokens=4", "--cost_repeats=1", "--compile=False", "--ffn_round=8",
          "--target_speedup=0", f"--max_memory_bytes={1 << 40}", "--device=cpu"]


def sh(*args, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        sys.exit(f"building the world failed: {' '.join(args)}\n{r.stderr[-2000:]}")


def build_world(w):
    """Idempotent: each piece is made once."""
    import torch
    from data import DataConfig, load_tokenizer, prepare
    from model import ModelConfig, Transformer
    from checkpoint import save_model
    os.makedirs(w, exist_ok=True)
    if not os.path.exists(f"{w}/data/test_problems.jsonl"):
        prepare(DataConfig(out_dir=f"{w}/data", vocab_size=640, pretrain_tokens=8_000, pretrain_val_tokens=2_000,
                           tokenizer_chars=30_000, sft_train=10, sft_val=4, rl_train=4, val_per_k=2, test_per_k=2,
                           test_chat=2))
    tok = load_tokenizer(f"{w}/data")
    if not os.path.exists(f"{w}/good/model.safetensors"):
        torch.manual_seed(0)
        m = Transformer(ModelConfig.llama(num_layers=2, vocab_size=tok.n_vocab, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128))
        save_model(m, f"{w}/good")
        tok.save(f"{w}/good")
    if not os.path.exists(f"{w}/run/trainer_state.pt"):   # a finished 2-step distill run
        sh("distill.py", *TINY, f"--data_dir={w}/data", f"--out_dir={w}/run", "--max_steps=2")
    if not os.path.exists(f"{w}/pz/assemble.json"):
        sh("puzzle.py", f"--parent={w}/good", f"--data_dir={w}/data", f"--out_dir={w}/pz", *PUZZLE)
    if not os.path.exists(f"{w}/report/eval/bench.json"):
        fake_report_tree(f"{w}/report")


def fake_report_tree(root):
    from model import ModelConfig
    cfg = ModelConfig.llama(num_layers=1, vocab_size=64, hidden_size=16, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    ev = {"accuracy": 0.5, "think_rate": 1.0, "by_k": {"3": 0.5}, "by_task": {"addmod10": 0.5, "count": 1.0}, "n_by_task": {"addmod10": 4, "count": 2}, "n": 6}
    for d in ("eval", "puzzle", "logs"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    for m in ("parent", "child", "sft", "grpo"):
        os.makedirs(f"{root}/{m}", exist_ok=True)
        open(f"{root}/{m}/config.json", "w").write(json.dumps(cfg.to_dict()))
        open(f"{root}/{m}/metrics.jsonl", "w").write('{"run_marker": {"continues": false}}\n{"step": 1, "train_loss": 1}\n')
        for mode in ("on", "off"):
            open(f"{root}/eval/{m}_{mode}.json", "w").write(json.dumps(ev))
    speed = {"decode_tokens_per_s": 150.0, "prefill_tokens_per_s": 1000.0}
    open(f"{root}/eval/bench.json", "w").write(json.dumps({**speed, "baseline": speed}))
    child = {"predicted_speedup": 1.6, "kl": 0.1, "score": 0.2, "attention": ["gqa_kv1"], "ffn": ["swiglu_16"]}
    open(f"{root}/puzzle/assemble.json", "w").write(json.dumps({"child": child, "control": None}))
    open(f"{root}/puzzle/layout.txt", "w").write("layers\n")
    open(f"{root}/logs/data.seconds", "w").write("5\n")


def digest(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def copy(w, src, name, edit=None):
    """A fresh copy of world folder `src` as `name` (under w/cases), damaged by edit(path)."""
    dst = f"{w}/cases/{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(f"{w}/{src}", dst)
    if edit:
        edit(dst)
    return dst


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)


def jedit(path, fn):
    d = json.load(open(path))
    d = fn(d) or d
    json.dump(d, open(path, "w"))


# ------------------------------------------------------------------------------------------------

SCRIPTS = {"distill.py": ("distill", "DistillConfig"), "sft.py": ("sft", "SFTConfig"), "grpo.py": ("grpo", "GRPOConfig"),
           "puzzle.py": ("puzzle", "PuzzleConfig"), "sample.py": ("sample", "SampleConfig"),
           "data.py": ("data", "DataConfig"), "report.py": ("report", "ReportConfig"),
           "ranker_eval.py": ("ranker_eval", "RankerConfig")}


def float_flags(script):
    mod, cls = SCRIPTS[script]
    try:
        c = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError):
        return []
    hints = typing.get_type_hints(c)
    return [f.name for f in dataclasses.fields(c) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


def cases(w):
    """[(name, kind, script, args, guard folder or None, setup or None)]"""
    cs = []
    base = {"distill.py": [*TINY, f"--data_dir={w}/data", f"--out_dir={w}/cases/o_distill", "--max_steps=1"],
            "sft.py": [f"--init_from={w}/good", f"--data={w}/data/sft_train.jsonl", f"--val_data={w}/data/sft_val.jsonl",
                       f"--out_dir={w}/cases/o_sft", "--max_steps=1"],
            "grpo.py": [f"--init_from={w}/good", f"--data={w}/data/rl_train.jsonl", f"--out_dir={w}/cases/o_grpo",
                        "--max_steps=1"],
            "puzzle.py": [f"--parent={w}/good", f"--data_dir={w}/data", f"--out_dir={w}/cases/o_pz", *PUZZLE],
            "sample.py": [f"--ckpt={w}/good", "--max_new_tokens=2"],
            "data.py": [f"--out_dir={w}/cases/o_data"], "ranker_eval.py": [f"--out_dir={w}/cases/o_rank"]}
    for script, args in base.items():
        for flag in float_flags(script):
            for v in ("1e999", "-1e999"):
                cs.append((f"{script} --{flag}={v}", "error", script, [*args, f"--{flag}={v}"], None, None))
    d, g, r = f"{w}/data", f"{w}/good", f"{w}/run"
    sft, grpo, pz = base["sft.py"], base["grpo.py"], base["puzzle.py"]
    # data loss: the guarded folder must stay byte-identical
    loss = [
        ("distill --teacher=P --out_dir=P", "distill.py", [*TINY, f"--data_dir={d}", f"--teacher={r}", f"--out_dir={r}",
                                                           "--cosine_weight=0", "--max_steps=1"], r),
        ("distill --init_from=D --out_dir=D", "distill.py", [*TINY, f"--data_dir={d}", f"--init_from={g}",
                                                             f"--out_dir={g}", "--max_steps=1"], g),
        ("distill --init_from=D (default out_dir)", "distill.py", [*TINY, f"--data_dir={d}", f"--init_from={g}",
                                                                   "--max_steps=1"], g),
        ("distill into a finished run", "distill.py", [*TINY, f"--data_dir={d}", f"--out_dir={r}", "--max_steps=1"], r),
        ("distill --out_dir=data_dir", "distill.py", [*TINY, f"--data_dir={d}", f"--out_dir={d}", "--max_steps=1"], d),
        ("distill --out_dir inside data_dir", "distill.py", [*TINY, f"--data_dir={d}", f"--out_dir={d}/x",
                                                             "--max_steps=1"], d),
        ("puzzle --parent=D --out_dir=D", "puzzle.py", [f"--parent={g}", f"--data_dir={d}", f"--out_dir={g}", *PUZZLE], g),
        ("puzzle --out_dir inside parent", "puzzle.py", [f"--parent={g}", f"--data_dir={d}", f"--out_dir={g}/pz",
                                                         *PUZZLE], g),
        ("sft --init_from=D --out_dir=D", "sft.py", [*sft, f"--out_dir={g}"], g),
        ("sft into a finished run", "sft.py", [*sft, f"--out_dir={r}"], r),
        ("sft --out_dir containing --data", "sft.py", [*sft, f"--out_dir={d}"], d),
        ("grpo --init_from=D --out_dir=D", "grpo.py", [*grpo, f"--out_dir={g}"], g),
        ("grpo into a finished run", "grpo.py", [*grpo, f"--out_dir={r}"], r),
        ("grpo --out_dir inside --init_from", "grpo.py", [*grpo, f"--out_dir={g}/sub"], g),
        ("sample --out inside --ckpt", "sample.py", [f"--ckpt={g}", "--eval=True", "--n=2", "--max_new_tokens=2",
                                                     f"--out={g}/eval.json"], g),
        ("sample --out = --problems", "sample.py", [f"--ckpt={g}", "--eval=True", f"--problems={d}/test_problems.jsonl",
                                                    "--max_new_tokens=2", f"--out={d}/test_problems.jsonl"], d),
    ]
    cs += [(n, "dataloss", s, a, guard, None) for n, s, a, guard in loss]
    # named in the issue: hangs, tracebacks, misleading messages, silent results
    c = lambda *a: copy(w, *a)
    cs += [
        ("sample --eval --n=100000000", "error", "sample.py", [f"--ckpt={g}", "--eval=True", "--n=100000000"], None, None),
        ("sft --eval_problems=100000000", "error", "sft.py", [*sft, "--eval_problems=100000000"], None, None),
        ("sample --bench --batch_size=10000000", "error", "sample.py",
         [f"--ckpt={g}", "--bench=True", "--batch_size=10000000000", "--compile=False"], None, None),
        ("puzzle --stage=mip --no_op=False --linear=False", "error", "puzzle.py",
         [f"--parent={g}", f"--data_dir={d}", f"--out_dir={w}/cases/pz_space", *PUZZLE, "--stage=mip", "--no_op=False",
          "--linear=False"], None, lambda: c("pz", "pz_space")),
        ("puzzle scores.json = []", "error", "puzzle.py", [*pz[:2], f"--out_dir={w}/cases/pz_scores", *PUZZLE,
                                                          "--stage=mip"], None,
         lambda: c("pz", "pz_scores", lambda p: write(f"{p}/scores.json", "[]"))),
        ("puzzle costs.json without settings", "error", "puzzle.py", [*pz[:2], f"--out_dir={w}/cases/pz_costs", *PUZZLE,
                                                                      "--stage=mip"], None,
         lambda: c("pz", "pz_costs", lambda p: jedit(f"{p}/costs.json", lambda x: x.pop("settings") and None))),
        ("puzzle binary library.json", "error", "puzzle.py", [*pz[:2], f"--out_dir={w}/cases/pz_libjson", *PUZZLE,
                                                              "--stage=mip"], None,
         lambda: c("pz", "pz_libjson", lambda p: write(f"{p}/library.json", os.urandom(300), "wb"))),
        ("puzzle truncated library.safetensors", "error", "puzzle.py",
         [*pz[:2], f"--out_dir={w}/cases/pz_libst", *PUZZLE, "--stage=mip"], None,
         lambda: c("pz", "pz_libst", lambda p: write(f"{p}/library.safetensors",
                                                      open(f"{p}/library.safetensors", "rb").read()[:500], "wb"))),
        ("puzzle --bld_lr=1e30", "error", "puzzle.py", [*pz, "--bld_lr=1e30"], None, None),
        ("puzzle empty search space", "error", "puzzle.py", [*pz, "--kv_heads=none", "--ffn_fractions=none",
                                                             "--linear=False", "--no_op=False"], None, None),
        ("sft --resume broken train_config.json", "error", "sft.py",
         [f"--init_from={r}", f"--data={d}/sft_train.jsonl", "--val_data=", f"--out_dir={w}/cases/tc_sft", "--resume=True",
          "--seq_len=32", "--total_batch_size=64", "--device_batch_size=2", "--max_steps=4"], None,
         lambda: c("run", "tc_sft", lambda p: write(f"{p}/train_config.json", "{ not json"))),
        ("grpo --resume broken train_config.json", "error", "grpo.py",
         [f"--init_from={r}", f"--data={d}/rl_train.jsonl", f"--out_dir={w}/cases/tc_grpo", "--resume=True",
          "--max_new_tokens=4", "--max_steps=4"], None,
         lambda: c("run", "tc_grpo", lambda p: write(f"{p}/train_config.json", "[1, 2]"))),
        ("distill --resume broken train_config.json", "error", "distill.py",
         [*TINY, f"--data_dir={d}", f"--out_dir={w}/cases/tc_distill", "--resume=True", "--max_steps=4"], None,
         lambda: c("run", "tc_distill", lambda p: write(f"{p}/train_config.json", "{"))),
        ("config.json intermediate_size -5 (HF)", "error", "sample.py", [f"--ckpt={w}/cases/hf_neg"], None,
         lambda: (os.makedirs(f"{w}/cases/hf_neg", exist_ok=True), write(f"{w}/cases/hf_neg/config.json", json.dumps(
             {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 640, "hidden_size": 32,
              "intermediate_size": -5, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 1e4, "hidden_act": "silu"})))),
        ("config.json block intermediate_size -5", "error", "sample.py", [f"--ckpt={w}/cases/neg_native"], None,
         lambda: c("good", "neg_native", lambda p: jedit(f"{p}/config.json", lambda x: x["block_configs"][0].__setitem__(
             "intermediate_size", -5)))),
        ("tokenizer_meta.json non-integer id", "error", "sample.py", [f"--ckpt={w}/cases/tok_id", "--max_new_tokens=2"],
         None, lambda: c("good", "tok_id", lambda p: jedit(f"{p}/tokenizer_meta.json", lambda x: x["special_tokens"].__setitem__(
             "<|eot_id|>", "abc")))),
        ("tokenizer_meta.json unbalanced pattern", "error", "sample.py", [f"--ckpt={w}/cases/tok_pat",
                                                                          "--max_new_tokens=2"], None,
         lambda: c("good", "tok_pat", lambda p: jedit(f"{p}/tokenizer_meta.json", lambda x: x.__setitem__("pattern",
                                                                                                          "(\\p{L}+")))),
        ("grpo --data 100k-token prompt on line 3", "error", "grpo.py",
         [f"--init_from={g}", f"--data={w}/cases/long.jsonl", f"--out_dir={w}/cases/o_long", "--max_new_tokens=4"], None,
         lambda: write(f"{w}/cases/long.jsonl", "\n".join([json.dumps({"prompt": "Add mod 10: 1+2", "answer": "3"})] * 2
                                                          + [json.dumps({"prompt": "cat " * 100_000, "answer": "x"})]))),
        ("model.safetensors is a folder", "error", "sample.py", [f"--ckpt={w}/cases/st_dir"], None,
         lambda: c("good", "st_dir", lambda p: (os.remove(f"{p}/model.safetensors"), os.mkdir(f"{p}/model.safetensors")))),
        ("distill --lr=1e999", "error", "distill.py", [*base["distill.py"], "--lr=1e999"], None, None),
        ("sample --temperature=1e999", "error", "sample.py", [f"--ckpt={g}", "--temperature=1e999"], None, None),
    ]
    rep = lambda name, edit: (f"report: {name}", "error", "report.py", [f"--out_dir={w}/cases/rep_{len(name)}_{abs(hash(name)) % 997}"],
                              None, lambda: c("report", f"rep_{len(name)}_{abs(hash(name)) % 997}", edit))
    cs += [
        rep("bad eval JSON", lambda p: write(f"{p}/eval/sft_on.json", "{oops")),
        rep("an eval JSON that is a list", lambda p: write(f"{p}/eval/sft_on.json", "[]")),
        rep("logs/sft.seconds = abc", lambda p: write(f"{p}/logs/sft.seconds", "abc")),
        rep("bench.json without baseline", lambda p: jedit(f"{p}/eval/bench.json", lambda x: x.pop("baseline") and None)),
        rep("a half-written metrics line (not the last)", lambda p: write(f"{p}/sft/metrics.jsonl", '{"step": 1, "tr\n{"step": 2}\n')),
        rep("grpo/metrics.jsonl missing", lambda p: os.remove(f"{p}/grpo/metrics.jsonl")),
        rep("eval file missing", lambda p: os.remove(f"{p}/eval/child_off.json")),
        rep("puzzle/assemble.json missing", lambda p: os.remove(f"{p}/puzzle/assemble.json")),
        rep("accuracy not a number", lambda p: jedit(f"{p}/eval/grpo_on.json", lambda x: x.__setitem__("accuracy", "x"))),
    ]
    # Ctrl-C: SIGINT once the run is under way
    cs += [
        ("Ctrl-C in distill.py", "sigint", "distill.py", [*TINY, f"--data_dir={d}", f"--out_dir={w}/cases/int_distill",
                                                         "--max_steps=100000", "--log_interval=1"], None,
         lambda: shutil.rmtree(f"{w}/cases/int_distill", ignore_errors=True)),
        ("Ctrl-C in sft.py", "sigint", "sft.py", [*sft[:3], f"--out_dir={w}/cases/int_sft", "--max_steps=100000",
                                                  "--eval_interval=0", "--eval_problems=0", "--log_interval=1"], None,
         lambda: shutil.rmtree(f"{w}/cases/int_sft", ignore_errors=True)),
        ("Ctrl-C in grpo.py", "sigint", "grpo.py", [*grpo[:2], f"--out_dir={w}/cases/int_grpo", "--max_steps=100000",
                                                    "--eval_problems=0", "--max_new_tokens=8",
                                                    # the tiny world's few RL prompts: no prefilter to drop them
                                                    "--prefilter_samples=0", "--curriculum=False",
                                                    "--prompts_per_step=2", "--group_size=2", "--gen_groups=1"], None,
         lambda: shutil.rmtree(f"{w}/cases/int_grpo", ignore_errors=True)),
        ("Ctrl-C in the chat REPL", "sigint", "sample.py", [f"--ckpt={g}", "--chat_repl=True", "--device=cpu"], None, None),
        ("Ctrl-C in puzzle.py", "sigint", "puzzle.py", [*pz[:2], f"--out_dir={w}/cases/int_pz", *PUZZLE,
                                                        "--bld_tokens=10000000"], None,
         lambda: shutil.rmtree(f"{w}/cases/int_pz", ignore_errors=True)),
    ]
    return cs


def classify(kind, rc, err, timed_out, changed):
    lines = [x.split("\r")[-1] for x in err.strip().splitlines()]
    if changed:
        return "data-loss"
    if timed_out:
        return "hang"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if kind == "sigint":
        return "130" if rc == 130 and lines and lines[-1].startswith("interrupted") else "other"
    one_line = rc == 2 and sum(x.startswith("error: ") for x in lines) == 1 and lines[-1].startswith("error: ")
    if kind == "dataloss":
        return "refused-byte-identical" if rc != 0 else "silent"
    if one_line:
        return "error-line/exit2"
    return "silent" if rc == 0 else "other"


def run_case(case, timeout):
    name, kind, script, args, guard, setup = case
    if setup:
        setup()
    before = digest(guard) if guard else None
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        if kind == "sigint":
            time.sleep(min(timeout / 2, 12))    # under way: imports done, a few steps run
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
    changed = guard is not None and digest(guard) != before
    return classify(kind, p.returncode, err or "", timed_out, changed), p.returncode, (err or "").strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="/tmp/nn_sweep")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    build_world(a.world)
    os.makedirs(f"{a.world}/cases", exist_ok=True)
    todo = [c for c in cases(a.world) if a.only in c[0]]
    if a.list:
        print("\n".join(c[0] for c in todo))
        return
    counts = Counter()
    for i, case in enumerate(todo, 1):
        verdict, rc, err = run_case(case, a.timeout)
        counts[verdict] += 1
        last = err.splitlines()[-1].split("\r")[-1][:160] if err else ""
        print(f"[{i}/{len(todo)}] {verdict:24s} rc={rc} {case[0]}  | {last}", flush=True)
    print("\nverdicts over", len(todo), "cases:")
    for v, n in counts.most_common():
        print(f"  {v:24s} {n}")


if __name__ == "__main__":
    main()
