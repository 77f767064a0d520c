"""
runtime.py: what every stage script shares and none of them is about: devices, DDP, the
learning-rate schedule, metrics logging and trainer checkpoints. Configuration parsing and the
one error path live in configurator.py (re-exported here for the stage scripts).
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from configurator import (PROGRESS, ConfigError, Interrupted, UserError, append_line, atomic_write,  # noqa: F401
                          check, check_out_dir, parse_config, read_json_object, remove_tmp_files, run_main, write_json)   # (re-exported)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------
# Devices and DDP. One command runs on 1 process, N GPUs or N nodes:
#   python distill.py ...                                      (single process)
#   torchrun --standalone --nproc_per_node=8 distill.py ...    (one node)
#   torchrun --nnodes=2 --node_rank=R --master_addr=A --nproc_per_node=8 distill.py ...

@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world_size > 1


def pick_device(device="auto"):
    """--device: auto (cuda when there is a GPU), cpu or cuda."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"flag --device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("flag --device=cuda: no CUDA device is available")
    return device


def setup_dist(device="auto"):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; pick cuda (one GPU per local rank) or cpu;
    start the process group (nccl on GPU, gloo on CPU)."""
    import torch.distributed as td
    device = pick_device(device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local, world, device)


def teardown_dist(dist):
    import torch.distributed as td
    if dist.ddp and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def all_sum(dist, x):
    """x summed over processes: a tensor (in place, through the process's device: NCCL reduces
    CUDA tensors only) or a dict of numbers (every process passes the same keys). One process: x."""
    if not dist.ddp:
        return x
    if isinstance(x, dict):
        keys = sorted(x)
        t = all_sum(dist, torch.tensor([float(x[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, t.tolist()))
    on_device = x.to(dist.device)
    torch.distributed.all_reduce(on_device)
    if on_device is not x:
        x.copy_(on_device)
    return x


def all_sum_grads(params, dist):
    """Sum the gradients of `params` over processes, one flat all-reduce (for trainers that divide
    each process's loss by global counts themselves instead of using the DDP wrapper: grpo.py,
    puzzle.py's BLD). A parameter without a gradient gets zeros first, so every process reduces
    the same tensors even when one of them had nothing to train on in this update."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dist.ddp:
        flat = torch.cat([p.grad.flatten() for p in params])
        all_sum(dist, flat)
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()


def grad_sync(model, last_micro_step):
    """Around forward + backward of one micro-step: DDP all-reduces gradients during backward,
    which only the last micro-step of an optimizer step needs; the others accumulate locally
    inside no_sync() (it must wrap the forward too, or newer PyTorch syncs anyway)."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel) and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(device, precision="auto"):
    """--precision: "bf16" (autocast: matmuls in bf16, weights, optimizer and losses in fp32),
    "fp32", or "auto": bf16 on a GPU; on a CPU bf16 only where cpu_bf16_speedup() measures bf16
    matmuls faster. CPUs differ: with AVX512-BF16 or AMX a bf16 matmul is 3-8x an fp32 one (an
    AMD EPYC with avx512_bf16: 100 -> 310 GFLOP/s at 8192 x 128 x 384; the nano parent's training
    step 7.6k -> 9.8k tokens/s), without them bf16 is emulated and slower."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_bf16_speedup() >= 1.3 else "fp32"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(m=4096, k=128, n=384, repeats=5):
    """Time of an fp32 (m x k) @ (k x n) matmul over the same under bf16 autocast, best of
    `repeats` each, on this CPU (~50 ms). The shape is the nano models' (tokens x hidden x FFN).
    The times are this process's CPU time, not the wall clock: on a busy machine (a niced run
    beside another job) the wall clock times the waits for a core, and a sft.py run chose bf16 on
    an AVX2-only CPU where bf16 autocast matmuls are ~20x slower than fp32 (a step: 13 s -> 190 s)."""
    a, b = torch.randn(m, k), torch.randn(k, n)

    def best(f):
        f()  # warm-up (oneDNN picks its kernel on the first call)
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            f()
            times.append(time.process_time() - t0)
        return max(min(times), 1e-9)
    t32 = best(lambda: a @ b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t16 = best(lambda: a @ b)
    return t32 / t16


def autocast(device, precision=None):
    """The forward pass's autocast for a resolved precision (resolve_precision): "bf16" (bf16
    matmuls, fp32 weights) or "fp32" (nothing). None: bf16 on a GPU, fp32 on a CPU (what the
    stages without a --precision flag run: puzzle.py's scores and costs)."""
    if precision is None:
        precision = "bf16" if device.startswith("cuda") else "fp32"
    if precision == "bf16":
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step, derived from the global batch in tokens:
    e.g. 16 sequences * 256 tokens * 1 process * 2 micro-steps = 8,192 tokens per step."""
    per_micro = device_batch_size * seq_len * world_size
    if total_batch_size % per_micro:
        raise ConfigError(f"--total_batch_size={total_batch_size} must be a multiple of device_batch_size * "
                          f"seq_len * world_size = {device_batch_size} * {seq_len} * {world_size} = {per_micro}")
    return total_batch_size // per_micro


def auto_seq_len(context, longest, floor=256):
    """A row length that fits any checkpoint: the longest sample rounded up to a power of two (at
    least `floor`), never more than the model's context (a 131,072-token Llama 3 context does not
    make 131,072-token rows for 300-token samples)."""
    want = max(floor, 1 << max(0, int(longest) - 1).bit_length())
    return max(1, min(int(context), want))


def auto_total_batch(target_tokens, device_batch_size, seq_len, world_size=1):
    """A global batch of ~target_tokens, rounded to the nearest multiple (at least one) of what one
    micro-step of every process holds (device_batch_size x seq_len x world_size)."""
    per_micro = device_batch_size * seq_len * world_size
    return per_micro * max(1, round(target_tokens / per_micro))


def auto_eval_interval(max_steps, interval=100):
    """Evaluations that scale with the run: none at all for runs of 1-2 steps (an evaluation costs
    more than such a run), else every `interval` steps, and at least one in the middle of a short run."""
    if max_steps <= 2:
        return None
    return max(1, min(interval, max_steps // 2))


def lr_at(step, max_steps, lr, warmup_steps, min_lr_frac=0.1):
    """Linear warmup over steps 0..warmup-1, then cosine decay that reaches min_lr_frac * lr at
    the last step (max_steps - 1)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), device="cpu", eps=1e-8):
    """AdamW; matrices decay, vectors (norm weights) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.startswith("cuda"))


def check_vocab(tok, model_config, where):
    """A tokenizer with more tokens than the model's vocabulary would index past its embedding."""
    if tok.n_vocab > model_config.vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary is "
                          f"{model_config.vocab_size}")


def prepare_for_training(model, cfg, dist, state=None, **adam):
    """The model on its device, compiled (--compile) and wrapped in DDP when launched by torchrun,
    and its AdamW optimizer (resumed from state["optimizer"] when resuming). Returns (model, raw,
    opt): `model` is what the forward/backward runs through, `raw` the plain module that is saved
    and evaluated (a compiled or DDP-wrapped module prefixes its state_dict keys)."""
    device = dist.device
    raw = model.to(device)
    if cfg.compile:
        model = torch.compile(raw)
    if dist.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None,
                    broadcast_buffers=False)
    opt = make_optimizer(raw, cfg.lr, cfg.weight_decay, device=device, **adam)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    return model, raw, opt


def start_stage(cfg, name):
    """The preamble every stage's main shares: processes and device (setup_dist), --precision
    resolved ("auto" -> what runs, so train_config.json records it), the seed, and `say`, a print
    to stderr on the master process tagged with the stage's name. Returns (dist, say)."""
    dist = setup_dist(cfg.device)
    if hasattr(cfg, "precision"):
        cfg.precision = resolve_precision(dist.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    return dist, stage_say(name, dist.master)


def stage_say(name, master=True):
    return (lambda msg: print(f"[{name}] {msg}", file=sys.stderr)) if master else (lambda msg: None)


def clip_and_step(params, opt, grad_clip, nonfinite):
    """Clip the gradient norm, refuse a non-finite one before the update writes NaN into the
    weights (NonFiniteError(nonfinite(norm)): the caller names the likely cause), step, zero the
    gradients. Returns the norm before clipping."""
    from model import NonFiniteError
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if not math.isfinite(grad_norm):
        raise NonFiniteError(nonfinite(grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def log_due(step, interval, end):
    """After step `step` (0-based) of a run ending at `end`: is a log row due (every `interval`
    steps, and at the end)?"""
    return (step + 1) % interval == 0 or step + 1 == end


def ckpt_due(step, interval, end):
    """An intermediate checkpoint after step `step` (--ckpt_interval; the last one is saved anyway)."""
    return bool(interval) and (step + 1) % interval == 0 and step + 1 < end


class Throughput:
    """Tokens per second of training time only (evals and checkpoints are not counted), over the
    steps since the last `take`."""

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0

    @contextlib.contextmanager
    def step(self, tokens):
        t0 = time.time()
        yield
        self.seconds += time.time() - t0
        self.tokens += tokens

    def take(self):
        rate = self.tokens / self.seconds
        self.seconds, self.tokens = 0.0, 0
        return rate


class PhaseClock:
    """Seconds per phase of the run (prefilter, rollout, train, eval), wall clock and CPU time of
    this process. On a machine shared with other jobs the wall clock stretches and the CPU time
    does not: with one thread (OMP_NUM_THREADS=1) it is what the wall clock would read alone."""

    def __init__(self, totals=None):
        self.totals, self.last = dict(totals or {}), {}

    @contextlib.contextmanager
    def __call__(self, phase):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.last = {f"{phase}_s": time.perf_counter() - wall, f"{phase}_cpu_s": time.process_time() - cpu}
        for k, v in self.last.items():
            self.totals[k] = self.totals.get(k, 0.0) + v

    def describe(self):
        phases = [k[:-2] for k in self.totals if not k.endswith("_cpu_s")]
        return ", ".join(f"{p} {self.totals[p + '_s']:.1f} s (cpu {self.totals[p + '_cpu_s']:.1f})" for p in phases)


RUN_MARKER = "run_marker"   # the first line a run writes to its metrics.jsonl


class MetricsLog:
    """Append-only JSONL of metrics (master process only), read back for plots and reports.
    Nothing is ever deleted or truncated: a run appends a marker line {"run_marker": {...}} and then
    its rows, each one whole line written, flushed and fsynced (configurator.append_line). A fresh
    run's marker has "continues": False, so readers (read_metrics) take the rows after the last one;
    a resumed run (append=True) continues the run before it."""

    def __init__(self, path, enabled=True, append=False):
        self.path, self.enabled = path, enabled
        # the marker goes in with the first row: a run that fails before logging anything (a bad
        # flag found late, a missing stage result) leaves its folder as it was
        self._marker = {RUN_MARKER: {"time": round(time.time(), 3), "continues": bool(append)}}

    def log(self, **row):
        if self.enabled:
            if self._marker is not None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                _repair_torn_tail(self.path)
                append_line(self.path, json.dumps(self._marker))
                self._marker = None
            append_line(self.path, json.dumps(row))


def _repair_torn_tail(path):
    """A log whose last line was cut by a kill gets a newline, so the next line starts whole."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            append_line(path, "")


def read_metrics(path, all_runs=False):
    """The rows of a metrics.jsonl: those of its last run (after the last marker of a fresh run;
    all_runs=True: every row), markers left out. A torn line (a run killed mid-write: the last
    line, or a line that a later run's first line followed) is skipped with one warning; any other
    line that is not a JSON object is an error naming the file and line."""
    runs, torn = [[]], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            nxt = next((x for x in lines[n:] if x.strip()), None)
            if nxt is None or RUN_MARKER in nxt:   # the last line of a run that was killed
                torn.append(n)
                continue
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); the metrics log is damaged") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        if RUN_MARKER in row:
            if not (row[RUN_MARKER] or {}).get("continues"):
                runs.append([])
            continue
        runs[-1].append(row)
    if torn:
        print(f"warning: {path}: skipped {len(torn)} torn line(s) (line {', '.join(map(str, torn))}) of a run "
              f"that was killed while writing", file=sys.stderr)
    return [r for run in runs for r in run] if all_runs else runs[-1]


def moving_average(values, window):
    """Trailing mean over up to `window` points (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(path_png, rows, keys, xkey="step", title="", smooth=1):
    """Draw metric curves (one line per key present) to a PNG, each a trailing moving average of
    `smooth` points (1: as logged). matplotlib is imported lazily and with the non-interactive
    backend, so a machine without a display can plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r[xkey], r[k]) for r in rows if k in r and r[k] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, moving_average(list(ys), smooth), label=k, marker="." if len(pts) < 30 else None)
    ax.set_xlabel(xkey + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:   # none of the keys logged yet (a 1-step run): no legend
        ax.legend()
    fig.tight_layout()
    atomic_write(path_png, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Trainer checkpoints: the model in its native folder format (model.py's save_model), plus
# trainer_state.pt (optimizer, step) read back with weights_only=True, plus the resolved config.

def save_checkpoint(out_dir, model, optimizer, step, cfg, tokenizer=None, extra=None):
    """Every file through configurator.atomic_write (save_model and Tokenizer.save use it too);
    `.tmp-*` leftovers of a save that was killed are removed first. trainer_state.pt is written
    after the weights and carries the same step, so load_trainer_state can tell a checkpoint whose
    save was interrupted between the two."""
    from checkpoint import save_model
    save_model(model, out_dir, metadata={"step": step})   # also clears .tmp-* leftovers
    if tokenizer is not None:
        tokenizer.save(out_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "extra": extra or {}}
    atomic_write(os.path.join(out_dir, "trainer_state.pt"), lambda p: torch.save(state, p))
    atomic_write(os.path.join(out_dir, "train_config.json"), json.dumps(config_dict(cfg), indent=2))


def interruptible(steps, save):
    """The training loop's steps, with a clean Ctrl-C: `for step in interruptible(bar, save)`.
    The first Ctrl-C lets the step in progress finish, then save(step) writes the checkpoint of
    the last finished step (atomically; a Ctrl-C during the save is ignored) and Interrupted(step)
    ends the run: run_main prints `interrupted at step N; --resume=True continues`, exit 130. A
    second Ctrl-C stops at once (the folder keeps its last saved checkpoint: `interrupted`)."""
    import signal
    hits = []

    def on_sigint(signum, frame):
        hits.append(1)
        if len(hits) > 1:
            raise KeyboardInterrupt
        print("\n[Ctrl-C: saving after this step; Ctrl-C again stops now without saving]", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:   # not the main thread: Ctrl-C is not ours to handle
        previous = None
    first, done = None, None
    try:
        for step in steps:
            first = step if first is None else first
            if hits:
                done = step     # steps first .. step-1 finished
                break
            yield step
            done = step + 1
        if not hits:
            return
        if done is None or done <= first:   # nothing finished in this invocation: nothing to save
            raise KeyboardInterrupt
        if previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        save(done)
        PROGRESS["step"] = done
        raise Interrupted(done)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def load_trainer_state(out_dir):
    """trainer_state.pt of a checkpoint folder (weights_only=True: no code runs), checked against
    the step of model.safetensors. Clears `.tmp-*` leftovers of an interrupted save."""
    from model import CheckpointError
    from safetensors import SafetensorError, safe_open
    path = os.path.join(out_dir, "trainer_state.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume=True but {path} does not exist")
    remove_tmp_files(out_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        # torch.load's errors for a truncated / foreign file: "PytorchStreamReader failed reading
        # zip archive", "Weights only load failed", EOFError, ...
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a trainer state written by save_checkpoint ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise CheckpointError(f"{path}: not a trainer state (expected a dict with 'step' and 'optimizer')")
    weights = os.path.join(out_dir, "model.safetensors")
    try:
        with safe_open(weights, "pt") as f:
            saved_step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    if saved_step != state["step"]:
        raise ConfigError(f"{out_dir}: model.safetensors is from step {saved_step} but trainer_state.pt "
                          f"from step {state['step']}: the checkpoint was interrupted while being written")
    return state


def heldout_capacity(split, k_min=None, k_max=None, chat_share=0.4, exact=True):
    """Upper bounds on the distinct problems data.heldout_problems can draw from a held-out split:
    (chains, chat tasks). Chains: half of each k's distinct chains in the split (chains_per_k's cap;
    k > 6 estimated from the split's fraction of 10^k; exact=False: data.split_capacity_floor for
    k <= 6, no counting); chat: the split's fraction of the distinct prompts of the chat tasks
    (ordered word lists of 1-5 of the words, numbers for "next")."""
    import math as _m
    import data
    frac = data.SPLIT_FRACTIONS[split]
    k_min = data.EVAL_K_MIN if k_min is None else k_min
    k_max = data.EVAL_K_MAX if k_max is None else k_max
    count = data.split_capacity if exact else data.split_capacity_floor
    chains = sum((count(split, k) if k <= 6 else int(frac * 10 ** k)) // 2 for k in range(k_min, k_max + 1))
    lists = sum(_m.perm(len(data.WORDS), r) for r in range(1, 6))
    chat = int(frac * (len(data.CHAT_TASKS) - 1) * lists + frac * 9999) // 2
    return chains, chat


MAX_EVAL_PROBLEMS = 1_000_000   # beyond this the problem generator alone runs for many minutes


def check_heldout_size(flag, n, split, chat_share=0.4):
    """--n / --eval_problems against what the split holds, before any work (not after the generator
    has spun through 200 n tries)."""
    if not n:
        return
    import data
    n_chat = round(n * chat_share)
    chains, chat = heldout_capacity(split, exact=False)   # floors: no counting of 10^6 prompts
    if n - n_chat > chains:
        chains, chat = heldout_capacity(split)             # counted before refusing
    if n > MAX_EVAL_PROBLEMS or n - n_chat > chains or n_chat > chat:
        raise ConfigError(f"--{flag}={n}: the {split} split holds at most {min(chains + chat, MAX_EVAL_PROBLEMS):,} "
                          f"distinct problems for an evaluation ({chains:,} chains k={data.EVAL_K_MIN}..{data.EVAL_K_MAX}, "
                          f"{chat:,} chat tasks, "
                          f"at most {MAX_EVAL_PROBLEMS:,} in all); use a smaller --{flag}")


def memory_budget(device):
    """Bytes a run may plan to allocate on `device`: 80% of the free GPU memory, or of the
    physical memory (available pages where the OS reports them) on a CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pages = os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * pages * os.sysconf("SC_PAGE_SIZE"))


def decode_bytes(mcfg, batch, context, bytes_per_element=4):
    """What a generate call of `batch` rows over `context` positions allocates: the KV cache
    (2 x KV heads x head_dim per attention layer and position), the logits, the sampling noise and
    the vocabulary mask (B x V fp32 each), and one layer's activations."""
    kv = sum(2 * mcfg.kv_heads(i) * mcfg.head_dim for i, b in enumerate(mcfg.block_configs) if b.attention == "gqa")
    per_row = context * kv * bytes_per_element + 4 * mcfg.vocab_size * 4 + context * mcfg.hidden_size * 4 * 4
    return batch * per_row


def check_decode_fits(flag, batch, mcfg, context, device, bytes_per_element=4):
    """--batch_size against the memory of the device, before any allocation."""
    need, have = decode_bytes(mcfg, batch, context, bytes_per_element), memory_budget(device)
    if need > have:
        fit = max(1, batch * have // max(need, 1))
        raise ConfigError(f"--{flag}={batch}: {batch} rows x {context} positions need ~{need / 2**30:.1f} GiB "
                          f"(KV cache, logits), more than the {have / 2**30:.1f} GiB this {device} has free; "
                          f"at most ~{fit} rows fit")


def read_train_config(out_dir):
    """train_config.json of a checkpoint folder (for --resume=True): a JSON object, or an error
    line naming the file."""
    path = os.path.join(out_dir, "train_config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume=True: {path} does not exist (not a checkpoint written by save_checkpoint)")
    return read_json_object(path, context="--resume=True: ", expected="the object of settings save_checkpoint writes")


def load_for_resume(cfg, model_cfg, keys, max_steps, data, paths=()):
    """--resume=True: the checkpoint in cfg.out_dir, checked against this run before any step, in
    the order a user would fix them: the same architecture as this run's model (`model_cfg`), the
    same settings (`keys` of train_config.json; a key an earlier run's config lacks had its
    default then; `paths` are compared as paths: out/data == ./out/data/), the same data, and steps
    left of `max_steps`. `data` is (what, key, now): the trainer state's extra[key] must equal
    `now` (a checkpoint written before the check has no key: not compared); `what` names the data
    in the error. Returns (model, trainer state)."""
    from checkpoint import load_config, load_model
    out = cfg.out_dir
    state = load_trainer_state(out)
    before = read_train_config(out)   # a broken one: an error line naming it
    saved = load_config(out)
    if saved != model_cfg:
        diff = [k for k in config_dict(model_cfg) if getattr(saved, k) != getattr(model_cfg, k)]
        raise ConfigError(f"--resume=True: the checkpoint in {out} has another architecture than this run's "
                          f"model (--init_from={cfg.init_from}; fields that differ: {diff})")

    def same(k, then, now):
        if k in paths and isinstance(then, str) and isinstance(now, str) and then and now:
            return os.path.normpath(then) == os.path.normpath(now)
        return then == now
    defaults = type(cfg)
    changed = [f"{k}: {before.get(k, getattr(defaults, k))!r} -> {getattr(cfg, k)!r}" for k in keys
               if not same(k, before.get(k, getattr(defaults, k)), getattr(cfg, k))]
    if changed:
        raise ConfigError(f"--resume=True must continue the same run, but these settings changed: {changed}")
    what, key, now = data
    then = state.get("extra", {}).get(key)
    if then is not None and then != now:
        raise ConfigError(f"--resume=True: {what} changed since the checkpoint in {out} was written"
                          + (f" (then: {then}, now: {now})" if isinstance(now, dict) else ""))
    if state["step"] >= max_steps:
        raise ConfigError(f"--resume=True: {out} is already at step {state['step']} of max_steps={max_steps}")
    return load_model(out), state


# ------------------------------------------------------------------------------------------------
# Losses over the vocabulary, computed chunk by chunk. With a 128k vocabulary, B=8, T=4096 the
# logits alone are 8*4096*128256*4 bytes = 16.8 GB in fp32; KD needs the teacher's too. Each chunk
# of rows applies lm_head, takes the fp32 log-softmax and reduces to a scalar inside
# torch.utils.checkpoint, so nothing of size chunk x V is kept for backward: backward recomputes
# one chunk at a time, and memory holds a few chunk x V fp32 temporaries (logits, log-probs and
# their gradients) instead of B x T x V of each.

LOGITS_CHUNK_ELEMENTS = 2 ** 26   # at most 256 MiB of fp32 logits per chunk (and per model)


def logits_chunk(vocab_size, chunk=0, tokens=4096):
    """Tokens per chunk of a vocabulary-sized loss: `chunk` when given (> 0), else 4096 tokens,
    fewer for a large vocabulary so that a chunk's logits stay under LOGITS_CHUNK_ELEMENTS (a
    768-token vocabulary: 4096; Llama 3's 128,256: 523, where 4096 would be 2.1 GB per
    temporary and a KD step of a tiny model held ~11 GB)."""
    if chunk:
        return int(chunk)
    return max(1, min(tokens, LOGITS_CHUNK_ELEMENTS // max(1, int(vocab_size))))


def _ce_chunk(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100, reduction="sum")


def _kl_chunk(hs, ws, ht, wt, temperature):
    log_ps = F.log_softmax(F.linear(hs, ws).float() / temperature, dim=-1)
    log_pt = F.log_softmax(F.linear(ht, wt).float() / temperature, dim=-1)
    # KL(teacher || student) = sum_v p_t (log p_t - log p_s), times T^2 so gradients keep their
    # scale across temperatures (Hinton et al.).
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") * temperature ** 2


def _chunks(n, chunk):
    return [(i, min(n, i + chunk)) for i in range(0, n, chunk)]


def chunked_cross_entropy(h, weight, targets, chunk=0):
    """Sum over tokens of CE(lm_head(h), targets); targets == -100 are ignored.
    h (..., H) final normed hidden states, weight (V, H) the lm_head matrix; chunk: tokens per
    chunk, 0 = logits_chunk(V)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk = logits_chunk(weight.shape[0], chunk)
    if h.shape[0] <= chunk:  # one chunk: nothing to save by recomputing
        return _ce_chunk(h, weight, targets)
    total = h.new_zeros((), dtype=torch.float32)
    for a, b in _chunks(h.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h[a:b], weight, targets[a:b], use_reentrant=False)
    return total


def chunked_kl(h_student, w_student, h_teacher, w_teacher, temperature=1.0, chunk=0):
    """Sum over tokens of KL(teacher || student) on the next-token distributions (chunk as in
    chunked_cross_entropy)."""
    hs, ht = h_student.reshape(-1, h_student.shape[-1]), h_teacher.reshape(-1, h_teacher.shape[-1])
    chunk = logits_chunk(w_student.shape[0], chunk)
    if hs.shape[0] <= chunk:
        return _kl_chunk(hs, w_student, ht, w_teacher, temperature)
    total = hs.new_zeros((), dtype=torch.float32)
    for a, b in _chunks(hs.shape[0], chunk):
        total = total + checkpoint(_kl_chunk, hs[a:b], w_student, ht[a:b], w_teacher, temperature,
                                   use_reentrant=False)
    return total


def doc_ids_and_positions(x, bos_id):
    """For packed windows x (B, T) whose documents start with BOS: document ids (a new id at
    every BOS) and RoPE positions that restart at 0 on each document's BOS."""
    B, T = x.shape
    is_bos = x == bos_id
    doc_ids = is_bos.long().cumsum(1)
    idx = torch.arange(T, device=x.device).expand(B, T)
    start = torch.where(is_bos, idx, torch.zeros_like(idx)).cummax(1).values
    return doc_ids, idx - start


# ------------------------------------------------------------------------------------------------
# The global stream of training windows (distill.py, puzzle.py). Window j of step s starts at an
# offset drawn from a generator seeded by (seed, s) alone, so the stream is the same for 1 process
# or 64, and a resumed run continues it exactly. Process r's micro-step m takes windows
# [(m * world + r) * dbs, ... + dbs).

def step_offsets(n_tokens, seed, step, n_windows, seq_len):
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len - 1, size=n_windows)


def windows(data, offsets, seq_len, bos_id, device, mask=None):
    """Token windows -> (x, y, doc_ids, positions). Targets that are a BOS (the start of the next
    packed document, unpredictable from this one) are ignored (-100), and so are those whose loss
    mask (the shards' mask_*.bin, data.write_token_shards) is 0."""
    buf = np.stack([np.asarray(data[o:o + seq_len + 1], dtype=np.int64) for o in offsets])
    buf = torch.from_numpy(buf).to(device)
    x, y = buf[:, :-1], buf[:, 1:].clone()
    y[y == bos_id] = -100
    if mask is not None:
        keep = np.stack([np.asarray(mask[o + 1:o + seq_len + 1], dtype=bool) for o in offsets])
        y[~torch.from_numpy(keep).to(device)] = -100
    doc_ids, positions = doc_ids_and_positions(x, bos_id)
    return x, y, doc_ids, positions


# ------------------------------------------------------------------------------------------------
# The windows' lengths when left to the data (--seq_len=0, --total_batch_size=0), and the data's
# identity for --resume.

def check_batch(cfg, resolved=False):
    """resolved: seq_len came from --seq_len=0, so the message says where it came from (a user who
    never set it would otherwise read of a seq_len of 256)."""
    how = (f" (--seq_len=0 resolved to {cfg.seq_len}: the longest document rounded up to a power of two, at "
           f"most the models' contexts and total_batch_size / device_batch_size; set --seq_len)" if resolved else "")
    check(cfg.total_batch_size % (cfg.device_batch_size * cfg.seq_len) == 0, "total_batch_size",
          cfg.total_batch_size, f"must be a multiple of device_batch_size * seq_len = "
          f"{cfg.device_batch_size} * {cfg.seq_len} = {cfg.device_batch_size * cfg.seq_len}{how}")


DEFAULT_BATCH_TOKENS = 4096


def longest_document(data, bos_id, cap, block=1 << 24):
    """Length of the longest document (BOS to BOS) of a token stream, or `cap` as soon as one
    reaches it: read in blocks, so a large memmapped corpus is not loaded whole."""
    longest, start = 0, 0
    for a in range(0, len(data), block):
        for p in np.flatnonzero(np.asarray(data[a:a + block]) == bos_id) + a:
            longest, start = max(longest, int(p) - start), int(p)
        if max(longest, min(len(data), a + block) - start) >= cap:
            return cap
    return max(longest, len(data) - start)


def resolve_lengths(cfg, train, bos_id, contexts, world_size):
    """--seq_len=0 and --total_batch_size=0: windows as long as the documents need, never longer
    than a model's context (a 131,072-token Llama 3 context does not make 131,072-token windows)
    nor than a micro-step's share of the batch; a batch of ~4096 tokens in whole micro-steps.
    Resolved into cfg, so train_config.json records what ran."""
    resolved = not cfg.seq_len
    if resolved:
        cap = min(contexts + [(cfg.total_batch_size or DEFAULT_BATCH_TOKENS) // cfg.device_batch_size])
        cfg.seq_len = auto_seq_len(cap, longest_document(train, bos_id, max(1, cap)))
    if not cfg.total_batch_size:
        cfg.total_batch_size = auto_total_batch(DEFAULT_BATCH_TOKENS, cfg.device_batch_size, cfg.seq_len, world_size)
    check_batch(cfg, resolved)


def data_fingerprint(data):
    """A cheap identity of a token stream (length + 4096 tokens spread over it), stored in the
    checkpoint so that --resume=True refuses to continue on other data at the same path."""
    idx = np.linspace(0, len(data) - 1, num=min(4096, len(data))).astype(np.int64)
    sample = np.asarray(data[idx], dtype=np.int64)
    return f"{len(data)}:{hashlib.sha256(sample.tobytes()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------------
# Model FLOPs utilisation (logged on a GPU) and a non-finite step named with its likely cause.

def estimate_flops_per_token(mcfg, seq_len):
    """6 N (matmul weights, fwd + bwd) + 12 * attention-layers * heads * head_dim * T (scores and
    values), the PaLM appendix B estimate. The embedding lookup is no matmul; lm_head is, even
    when it shares its matrix with the embedding."""
    from model import count_params
    n = count_params(mcfg) - mcfg.vocab_size * mcfg.hidden_size * (0 if mcfg.tie_word_embeddings else 1)
    n_attn = sum(b.attention == "gqa" for b in mcfg.block_configs)
    return 6 * n + 12 * n_attn * mcfg.num_attention_heads * mcfg.head_dim * seq_len


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def gpu_peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)


def nonfinite_message(what, step, start_step, model, cfg):
    """Name a non-finite loss or gradient with its likely cause: weights that went non-finite
    during this run (divergence: the learning rate), or a first step with finite weights (the
    input: the --init_from / --teacher checkpoint or the data, which no --lr can fix)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return (f"step {step}: {what}; the weights hold non-finite values (NaN or inf): training diverged, "
                f"lower --lr={cfg.lr} or raise --warmup_steps={cfg.warmup_steps}")
    if step == start_step:
        source = ", ".join(f"--{k}={getattr(cfg, k)}" for k in ("init_from", "teacher") if getattr(cfg, k)) or "--init_from=scratch"
        return (f"step {step}: {what} at the first step of this run, with finite weights: the input causes it "
                f"({source} or the data in --data_dir={cfg.data_dir}), not the learning rate")
    return (f"step {step}: {what} with finite weights: training diverged; lower --lr={cfg.lr} or raise "
            f"--warmup_steps={cfg.warmup_steps}")
