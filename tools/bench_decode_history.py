"""
tools/bench_decode_history.py: greedy decoding of one checkpoint with the model.py of an earlier
commit (the "before" of the fast-decoding work) and with today's, eager and compiled, side by side
in one process: the same prompts, interleaved repeats, medians, the ratios, and whether the greedy
tokens are equal. The one-time compilation is reported apart.

    python tools/bench_decode_history.py --ckpt=out/parent                   # batch 1 and 32
    python tools/bench_decode_history.py --ckpt=out/parent --before=54def3c --batch_sizes=1,8,32

The earlier model.py and kernels.py are read from git (`git show COMMIT:model.py`) into a temporary
folder and imported under other names, so the repository needs its history (a clone, not an export).
"""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_model  # noqa: E402
from configurator import ConfigError, UserError, check_positive, check_readable, run_main  # noqa: E402


@dataclass
class HistoryBenchConfig:
    ckpt: str = "out/parent"
    before: str = "54def3c"     # the commit whose model.py is "before" (the one-op-at-a-time decode loop)
    batch_sizes: str = "1,32"
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 5

    def validate(self):
        check_readable(self.ckpt, "ckpt", "dir")
        check_positive(self, "prompt_len", "new_tokens", "repeats")
        try:
            sizes = [int(b) for b in self.batch_sizes.split(",")]
        except ValueError:
            raise ConfigError(f"--batch_sizes={self.batch_sizes}: give comma-separated integers, e.g. 1,32") from None
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"--batch_sizes={self.batch_sizes}: every batch size must be >= 1")


def import_old_model(commit, folder):
    """model.py and kernels.py of `commit` (and its checkpoint.py, where load_model lives since that
    file was split off model.py), imported as `model_before` / `kernels_before` / `checkpoint_before`.
    Returns a function loading a checkpoint folder with that commit's code."""
    names = ["model.py", "kernels.py"]
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}:checkpoint.py"],
                      capture_output=True).returncode == 0:
        names.append("checkpoint.py")
    for name in names:
        r = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{name}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"--before={commit}: git cannot show {name} of that commit ({r.stderr.strip()})")
        with open(os.path.join(folder, name.replace(".py", "_before.py")), "w") as f:
            f.write(r.stdout)
    mods = {}
    saved = {k: sys.modules.get(k) for k in ("kernels", "model")}
    try:
        for name in [n.replace(".py", "_before") for n in names]:
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
            mods[name] = importlib.util.module_from_spec(spec)
            if name == "model_before":  # its `from kernels import ...` must get the old kernels
                sys.modules["kernels"] = mods["kernels_before"]
            if name == "checkpoint_before":  # and the old checkpoint.py the old model
                sys.modules["model"] = mods["model_before"]
            spec.loader.exec_module(mods[name])
    finally:
        for k, v in saved.items():
            if v is not None:
                sys.modules[k] = v
            else:
                sys.modules.pop(k, None)
    return mods.get("checkpoint_before", mods["model_before"]).load_model


def main(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        before = import_old_model(cfg.before, tmp)(cfg.ckpt).eval()
    now = load_model(cfg.ckpt).eval()
    V = now.config.vocab_size
    paths = {f"before ({cfg.before})": lambda p: before.generate(p, cfg.new_tokens, temperature=0),
             "now, eager": lambda p: now.generate(p, cfg.new_tokens, temperature=0),
             "now, compiled": lambda p: now.generate(p, cfg.new_tokens, temperature=0, compile=True)}
    print(f"{cfg.ckpt}: greedy, {cfg.prompt_len}-token prompts, {cfg.new_tokens} new tokens, medians of "
          f"{cfg.repeats} interleaved repeats, {torch.get_num_threads()} CPU threads")
    for B in [int(b) for b in cfg.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, V, (B, cfg.prompt_len), generator=g).tolist()
        warm, tokens, times = {}, {}, {k: [] for k in paths}
        for name, fn in paths.items():  # warm-up: the compiled path compiles here
            t0 = time.perf_counter()
            tokens[name] = fn(prompts)
            warm[name] = time.perf_counter() - t0
        with torch.no_grad():
            for _ in range(cfg.repeats):
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    fn(prompts)
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        first = next(iter(paths))
        for name in paths:
            print(f"batch {B:3d}  {name:22s} {B * cfg.new_tokens / med[name]:9.0f} tokens/s   "
                  f"x{med[first] / med[name]:5.2f}   same greedy tokens as before: {tokens[name] == tokens[first]}")
        print(f"batch {B:3d}  compile (one-time, not in the medians): "
              f"{max(warm['now, compiled'] - med['now, compiled'], 0):.1f} s")


if __name__ == "__main__":
    run_main(main, HistoryBenchConfig)
