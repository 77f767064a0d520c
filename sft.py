r"""
sft.py: reasoning SFT with the "detailed thinking on/off" toggle (paper sec. 4).

Llama-Nemotron learns to reason (`<think>...</think>`, then the answer) when the system prompt says
`detailed thinking on` and to answer directly when it says `detailed thinking off` from paired
data: the same prompts with both kinds of response. The loss is token-level cross-entropy on the
assistant tokens only, over packed sequences, with a cosine schedule and ~10% warmup (the paper's
LN-Nano: 4 epochs at 1e-4, global batch 256 samples, 32k-token packed rows).

    python sft.py config/nano_sft_cpu.py                  # nano recipe: out/child + out/data -> out/sft
    python sft.py --init_from=out/parent --out_dir=out/sft_parent
    python sft.py --init_from=hf/Llama-3.2-1B-Instruct --data=math.jsonl:0.7,chat.jsonl:0.3 --val_data=val.jsonl \
        --seq_len=2048 --total_batch_size=32768 --device_batch_size=4 --epochs=1 --lr=1e-5 --eval_problems=0
    torchrun --standalone --nproc_per_node=8 sft.py --device_batch_size=4 ...   # the same run on 8 processes
    python sft.py --resume=True                           # continue an interrupted (or --stop_after) run exactly

Data: JSONL files in the Llama-Nemotron-Post-Training-Dataset schema (`input` a message list or a
string with Llama 3 chat markup; `output`; `reasoning` on|off), read by data.load_sft_jsonl and
rendered with the chat template of the starting checkpoint's own tokenizer (a Hugging Face folder
brings its own). Several files are mixed by weight: `--data=a.jsonl:0.7,b.jsonl:0.3` (one file
needs no weight): each epoch holds as many samples as all files together, 70% of them from a
(repeated or subsampled as needed) and 30% from b. Samples are never truncated:
  - longer than --seq_len: dropped, and counted per file (stderr and metrics.jsonl);
  - an output whose format contradicts its `reasoning` field (data.check_format: "on" needs one
    leading think block and an answer, "off" no think tags): dropped and counted, with the first
    line, since training on it would teach the wrong side of the toggle;
  - a token id outside the model's vocabulary, an empty output, a conversation that does not end
    with a user turn, an unknown `reasoning`, invalid JSON: an error naming file and line.

Packing: the samples of an epoch (shuffled) go into rows of --seq_len tokens, first fit over the
last 64 open rows; every sample is its own document (doc_ids: no attention across samples) with
RoPE positions restarting at 0; the tail of a row is a pad document whose targets are ignored.
Position gaps (--pos_gap, not in the paper; off by default, 24 in the nano recipe's preset
config/nano_sft_cpu.py): each turn's positions start a random 0..24 past the end of the turn
before it, so the nano model looks operands up by their letters, not by how far back they are, and
its traces carry on past the longest chains it was taught (k = 9..12, left to GRPO).

Reads: --init_from (any checkpoint model.py loads, with its tokenizer), --data, --val_data, the
held-out "val" split of data.py's task world for the generation evals. Writes to --out_dir:
config.json + model.safetensors + tokenizer (a checkpoint sample.py can load), trainer_state.pt
(for --resume=True), train_config.json, metrics.jsonl, loss.png, accuracy.png, accuracy_by_k.png.
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_config, load_model
from configurator import (ConfigError, check, check_choice, check_positive, check_range, check_readable)
from data import RowStream, Source, load_tokenizer, pack, parse_data_spec, tokenizer_file
from evaluate import convergence, describe_eval, generation_eval, stage_eval_problems
from model import CheckpointError, NonFiniteError, count_params
from runtime import (all_sum, auto_eval_interval, auto_seq_len, auto_total_batch, autocast, check_heldout_size,
                     check_out_dir, chunked_cross_entropy, ckpt_due, clip_and_step, grad_accum_steps, grad_sync,
                     interruptible, load_for_resume, log_due, lr_at, MetricsLog, plot_curves, PRECISIONS,
                     prepare_for_training, read_metrics, run_main, save_checkpoint, set_lr, start_stage,
                     teardown_dist, Throughput)


@dataclass
class SFTConfig:
    # data (data.py writes the nano world's: 40k rows, ~2M tokens, each prompt once "on", once "off")
    data: str = "out/data/sft_train.jsonl"     # path[:weight],path[:weight],...
    val_data: str = "out/data/sft_val.jsonl"   # held-out loss ("" = none)
    seq_len: int = 0                           # packed row length; 0 = the longest sample rounded up to a
                                               # power of two >= 256, at most the model's context
    # model
    init_from: str = "out/child"               # the Puzzle child after KD (any model.py checkpoint)
    # optimisation
    epochs: float = 2.0                        # passes over the data (nano: 40k rows, ~1,000 steps, ~6 min on
                                               # 2 EPYC cores). Held-out val chains k = 3..12 at 2/3 of the steps
                                               # -> the end, Puzzle children of seed 1337 unless said: 20k rows
                                               # x 2 epochs 32.5 -> 87.2% (+54.7: not converged); 20k x 4: +1.1,
                                               # but +4.7 and +3.6 for two later children, and seed 2's traces ran
                                               # away at k = 11-12 (99.47% think blocks on test); 20k x 6: +3.1,
                                               # test 96.8% vs 99.0% at 4 (repeats hurt k > 8). 40k x 2, the same
                                               # steps with half the repeats: val loss 0.0572 vs 0.0618, +1.9,
                                               # +1.4 (seed 2), +2.2 (seed 3), test think blocks 100 / 99.87 /
                                               # 100%. Seed 3: 80k x 1 +8.9, 40k x 3 +2.5 with 98.8% think (README)
    pos_gap: int = 0                           # > 0: RoPE positions of each turn start 0..pos_gap past the turn
                                               # before it (not in the paper; the nano recipe's preset
                                               # config/nano_sft_cpu.py sets 24 and says why). 0 for a real
                                               # checkpoint: its positions stay those it will be served with
    max_steps: int = 0                         # > 0: run this many steps instead of --epochs
    total_batch_size: int = 0                  # tokens per optimizer step; 0 = ~4096 (16 rows x 256, ~75
                                               # samples) rounded to a multiple of device_batch_size x seq_len
    device_batch_size: int = 16                # rows per micro-step per process
    stop_after: int = 0                        # end this invocation after N more steps (then --resume)
    lr: float = 3e-3                           # nano: 1e-3 reached the same accuracy in ~2x the steps
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.1                   # the paper's ~10% warmup
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_chunk: int = 0                       # tokens per chunk of the vocabulary-sized loss; 0 = 4096, fewer
                                               # for a large vocabulary (runtime.logits_chunk: <= 256 MiB of logits)
    # evaluation
    eval_interval: int | None = None           # every N steps (and at start and end); None: only at 2/3 of the
                                               # steps and the end (none at all for 1-2 steps); 0: the same
    eval_rows: int = 256                       # packed rows of --val_data for the held-out loss (0 = all)
    eval_problems: int = 600                   # held-out "val" problems per mode (0 = no generation eval):
                                               # 360 chains, so the convergence check (accuracy at 2/3 of
                                               # the steps vs the end) has a standard error of ~2.5 points
    eval_max_new_tokens: int = 128             # a k=8 chain with reasoning is ~80 tokens
    # runtime
    device: str = "auto"                       # auto | cpu | cuda
    compile: bool = False
    precision: str = "auto"                   # auto | bf16 | fp32: bf16 autocast where it is faster (runtime.resolve_precision)
    seed: int = 1337
    out_dir: str = "out/sft"
    resume: bool = False
    overwrite: bool = False                    # replace a finished checkpoint in --out_dir (else refused)
    ckpt_interval: int = 0                     # also checkpoint every N steps (0 = only at the end)
    log_interval: int = 10

    def validate(self):
        sources = parse_data_spec(self.data)
        for path, _ in sources:
            check_readable(path, "data")
        if self.val_data:
            check_readable(self.val_data, "val_data")
        check_readable(self.init_from, "init_from", "dir")
        try:
            context = load_config(self.init_from).max_position_embeddings
        except CheckpointError as e:
            raise ConfigError(f"--init_from={self.init_from}: {e}") from None
        check(tokenizer_file(self.init_from) is not None, "init_from", self.init_from,
              "the checkpoint has no tokenizer (tokenizer.model at its root or under original/); the "
              "rows are rendered with the starting model's own tokenizer, so copy the one it was trained with into it")
        if self.seq_len:   # 0: resolved from the data in main (auto_seq_len), recorded in train_config.json
            check_range(self, "seq_len", 8, context)
        check_positive(self, "epochs", "device_batch_size", "lr", "grad_clip", "eval_max_new_tokens", "log_interval")
        for name in ("vocab_chunk", "max_steps", "stop_after", "eval_interval", "eval_rows", "eval_problems", "ckpt_interval",
                     "weight_decay", "total_batch_size", "pos_gap"):
            if getattr(self, name) is not None:
                check_range(self, name, 0)
        check_range(self, "min_lr_frac", 0, 1)
        check_range(self, "warmup_frac", 0, 1, hi_open=True)
        if self.seq_len and self.total_batch_size:
            check(self.total_batch_size % (self.device_batch_size * self.seq_len) == 0, "total_batch_size",
                  self.total_batch_size, f"must be a multiple of device_batch_size * seq_len = "
                  f"{self.device_batch_size} * {self.seq_len}")
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        check_choice(self, "precision", PRECISIONS)
        check_heldout_size("eval_problems", self.eval_problems, "val")
        check_out_dir(self.out_dir, [("init_from", self.init_from), *(("data", p) for p, _ in sources),
                                     ("val_data", self.val_data)], resume=self.resume, overwrite=self.overwrite)


# ------------------------------------------------------------------------------------------------
# The samples (data.Source: rendered with the chat template, checked, as (ids, targets) arrays,
# the loss on the assistant's tokens only) and the global stream of packed rows (data.RowStream:
# a pure function of (data, seed), so resume and any number of processes see the same rows).
# make_batch turns rows into the model's inputs.

def load_data(cfg, tok, mcfg, world_size, say):
    """The training sources and their row stream, the validation rows (in file order, packed the
    same way; the first eval_rows). Defaults that fit any checkpoint are resolved into cfg (and so
    into train_config.json): rows as long as the data needs (not the model's context), a global
    batch of ~4096 tokens in whole micro-steps."""
    V, context = mcfg.vocab_size, mcfg.max_position_embeddings
    sources = [Source(p, w, tok, cfg.seq_len or context, V) for p, w in parse_data_spec(cfg.data)]
    if not cfg.seq_len:
        cfg.seq_len = auto_seq_len(context, max(s.longest for s in sources))
    if not cfg.total_batch_size:
        cfg.total_batch_size = auto_total_batch(4096, cfg.device_batch_size, cfg.seq_len, world_size)
    val_sources = [Source(cfg.val_data, 1.0, tok, cfg.seq_len, V)] if cfg.val_data else []
    for s in sources + val_sources:
        say(s.report())
    val_rows = []
    if val_sources:
        val_rows = [[(0, j) for j in row] for row in pack(val_sources[0].lengths, cfg.seq_len)]
        val_rows = val_rows[:cfg.eval_rows] if cfg.eval_rows else val_rows
    return sources, val_sources, RowStream(sources, cfg.seq_len, cfg.seed), val_rows


def make_batch(rows, sources, seq_len, pad_id, device, pos_gap=0, seed=0, turn_id=None):
    """Packed rows -> x, y (targets, -100 = no loss), doc_ids, positions, each (B, seq_len).
    Sample d of a row is document d, with positions 0..len-1; the rest of the row is a pad
    document (id = number of samples) whose targets are ignored. pos_gap > 0: every turn after the
    first (a turn_id token: the chat template's start-of-header) starts 0..pos_gap positions after
    the turn before it ended, drawn from the seed and the rows (a resume replays the same gaps)."""
    rng = np.random.default_rng([seed] + [i * 1_000_003 + j for row in rows for i, j in row]) if pos_gap else None
    B = len(rows)
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), -100, dtype=np.int64)
    doc = np.zeros((B, seq_len), dtype=np.int64)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for d, (i, j) in enumerate(row):
            ids, tgt = sources[i].ids[j], sources[i].targets[j]
            n = len(ids)
            x[b, t:t + n], y[b, t:t + n - 1], doc[b, t:t + n], pos[b, t:t + n] = ids, tgt, d, np.arange(n)
            if pos_gap:
                for h in np.flatnonzero(np.asarray(ids) == turn_id)[1:]:
                    pos[b, t + h:t + n] += int(rng.integers(0, pos_gap + 1))
            t += n
        doc[b, t:], pos[b, t:] = len(row), np.arange(seq_len - t)
    return tuple(torch.from_numpy(a).to(device) for a in (x, y, doc, pos))


def loss_sum(model, x, y, doc, pos, vocab_chunk):
    """Sum over the batch of the assistant-token cross-entropy (the caller divides by the global
    count of assistant targets)."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    h = model(x, doc, pos, head=False)
    return chunked_cross_entropy(h, raw.lm_head.weight, y, vocab_chunk)


def step_gradients(model, rows, n_targets, sources, accum, cfg, dist, pad_id, turn_id=None):
    """Gradients of one step over its global batch of packed rows; returns the step's loss.
    The loss is the mean over the assistant tokens of the whole global batch: each process
    divides its sum by the global count (known to all: the stream is), and DDP averages
    gradients over processes, hence the factor world_size. A sample's weight is its number of
    assistant tokens, however the batch is split into processes and micro-steps."""
    logged = torch.zeros((), device=dist.device)
    for m in range(accum):
        first = (m * dist.world_size + dist.rank) * cfg.device_batch_size
        x, y, doc, pos = make_batch(rows[first:first + cfg.device_batch_size], sources, cfg.seq_len,
                                    pad_id, dist.device, cfg.pos_gap, cfg.seed, turn_id)
        with grad_sync(model, m == accum - 1):
            with autocast(dist.device, cfg.precision):
                part = loss_sum(model, x, y, doc, pos, cfg.vocab_chunk) / n_targets
            (part * dist.world_size).backward()
        logged += part.detach()
    all_sum(dist, logged)   # every process holds its share of the global mean
    return float(logged)


# ------------------------------------------------------------------------------------------------
# Evaluation: held-out loss, and generation in both modes with the verifier (evaluate.py: the same
# function sample.py --eval uses). The problems are a fixed sample of data.py's "val" split, so
# runs with other seeds or settings are compared on the same problems.

@torch.no_grad()
def val_loss(model, val_rows, val_sources, cfg, pad_id, device):
    """Mean cross-entropy per assistant target token over the packed rows of --val_data."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(val_rows), cfg.device_batch_size):
        rows = val_rows[i:i + cfg.device_batch_size]
        x, y, doc, pos = make_batch(rows, val_sources, cfg.seq_len, pad_id, device)
        with autocast(device, cfg.precision):
            total += float(loss_sum(model, x, y, doc, pos, cfg.vocab_chunk))
        n += int((y != -100).sum())
    model.train()
    return total / n


def evaluate(model, tok, val_rows, val_sources, problems, cfg, device, pad_id):
    row = {}
    if val_rows:
        row["val_loss"] = val_loss(model, val_rows, val_sources, cfg, pad_id, device)
    if problems:
        row.update(generation_eval(model, tok, problems, cfg.eval_max_new_tokens, cfg.compile))
    return row


def final_eval(raw, tok, val_rows, val_sources, problems, cfg, device, pad_id, log, two_thirds, end, say):
    """The last evaluation, and convergence: held-out chain accuracy at 2/3 of the steps and at
    the end (if it still rises, a later stage's gain could be more SFT's)."""
    row = evaluate(raw, tok, val_rows, val_sources, problems, cfg, device, pad_id)
    log.log(step=end, **row)
    say(f"step {end}: {describe_eval(row)}")
    conv = convergence(read_metrics(log.path), two_thirds, end)
    if conv:
        log.log(step=end, **conv)
        say(f"held-out chains, reasoning on: {conv['chain_accuracy_on_two_thirds']:.3f} at step {two_thirds}, "
            f"{conv['chain_accuracy_on_end']:.3f} at step {end} ({100 * conv['chain_gain_last_third']:+.1f} points "
            f"in the last third)")


def draw_curves(cfg, rows, problems):
    """loss.png (train / held-out loss); with generation evals accuracy.png and accuracy_by_k.png."""
    title = f"sft.py: {cfg.out_dir}"
    plot_curves(os.path.join(cfg.out_dir, "loss.png"), rows, ["train_loss", "val_loss"], title=title)
    if problems:
        plot_curves(os.path.join(cfg.out_dir, "accuracy.png"), rows,
                    ["accuracy_on", "accuracy_off", "think_rate_on", "think_rate_off"], title=title)
        ks = sorted({k for r in rows for k in r if k.startswith("acc_on_k")}, key=lambda k: int(k[8:]))
        plot_curves(os.path.join(cfg.out_dir, "accuracy_by_k.png"), rows, ks, title=title + " (reasoning on)")


def plan_steps(cfg, stream, sources, mcfg, world_size, say, t0):
    """Steps, micro-steps and warmup from --epochs / --max_steps; sets cfg.eval_interval to 0 when
    it was left to the default (the generation evals cost ~10 s each: at 2/3 and the end only)."""
    rows_per_step = cfg.total_batch_size // cfg.seq_len
    accum = grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, world_size)
    max_steps = cfg.max_steps or stream.rows_in_epochs(cfg.epochs) // rows_per_step
    if max_steps < 1:
        raise ConfigError(f"--epochs={cfg.epochs} of {cfg.data} is {stream.rows_in_epochs(cfg.epochs)} rows, fewer "
                          f"than one step of --total_batch_size={cfg.total_batch_size} ({rows_per_step} rows)")
    evals = cfg.eval_interval is not None or auto_eval_interval(max_steps) is not None   # none for 1-2 steps
    if cfg.eval_interval is None:
        cfg.eval_interval = 0
    epoch_rows = len(stream.epoch(0))
    fill = sum(s.lengths.mean() * c for s, c in zip(sources, stream.counts))  # sample tokens per epoch
    warmup = round(cfg.warmup_frac * max_steps)
    say(f"{count_params(mcfg):,} params ({cfg.init_from}); epoch = {int(sum(stream.counts)):,} samples in "
        f"{epoch_rows:,} rows of {cfg.seq_len} ({fill / (epoch_rows * cfg.seq_len):.1%} filled); "
        f"{max_steps} steps = {max_steps * rows_per_step / epoch_rows:.2f} epochs; data ready in {time.time() - t0:.1f} s")
    return {"rows_per_step": rows_per_step, "accum": accum, "max_steps": max_steps, "evals": evals,
            "warmup": warmup, "epoch_rows": epoch_rows}


# ------------------------------------------------------------------------------------------------
# What a resumed run must share with the run it continues: the data stream and the LR schedule.
RESUME_KEYS = ("init_from", "data", "seed", "seq_len", "total_batch_size", "epochs", "max_steps", "lr",
               "warmup_frac", "min_lr_frac", "weight_decay", "pos_gap")


def main(cfg):
    dist, say = start_stage(cfg, "sft")   # processes, device, --precision, seed
    device, master = dist.device, dist.master

    # The starting model and its own tokenizer: the rows are rendered with it.
    model = load_model(cfg.init_from)
    mcfg = model.config
    tok = load_tokenizer(cfg.init_from)
    pad_id = tok.pad_id if tok.pad_id < mcfg.vocab_size else 0  # any id: the pad document is masked, no targets
    t0 = time.time()
    sources, val_sources, stream, val_rows = load_data(cfg, tok, mcfg, dist.world_size, say)
    problems = [] if cfg.eval_interval is None and 0 < cfg.max_steps <= 2 else stage_eval_problems(cfg.eval_problems)

    plan = plan_steps(cfg, stream, sources, mcfg, dist.world_size, say, t0)
    rows_per_step, accum, max_steps, warmup, epoch_rows, evals = (
        plan[k] for k in ("rows_per_step", "accum", "max_steps", "warmup", "epoch_rows", "evals"))
    problems = problems if evals else []
    data_stats = {s.path: s.stats() for s in sources}

    start_step, state = 0, None
    if cfg.resume:
        model, state = load_for_resume(cfg, mcfg, RESUME_KEYS, max_steps, ("the data files", "data", data_stats),
                                       paths=("init_from",))
        start_step = state["step"]
    model, raw, opt = prepare_for_training(model, cfg, dist, state)   # device, compile, DDP, AdamW
    end = min(max_steps, start_step + cfg.stop_after) if cfg.stop_after else max_steps
    # Converged or not: held-out chain accuracy at 2/3 of the steps and at the end (if it still rises,
    # a later stage's gain could be more SFT's)
    two_thirds = round(2 * max_steps / 3)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master, append=cfg.resume)
    if not cfg.resume:
        log.log(step=0, data={s.path: s.stats() for s in sources + val_sources})
    say(f"{dist.world_size} process(es) on {device}; {accum} micro-steps x {cfg.device_batch_size} rows x "
        f"{cfg.seq_len} tokens = {cfg.total_batch_size} tokens/step; lr {cfg.lr} (warmup {warmup} steps, cosine); "
        f"steps {start_step}->{end}")
    if master and start_step == 0 and cfg.eval_interval:  # where the curves start
        row = evaluate(raw, tok, val_rows, val_sources, problems, cfg, device, pad_id)
        log.log(step=0, **row)
        say(f"step 0: {describe_eval(row)}")

    bar = tqdm(range(start_step, end), disable=not master, desc="sft", initial=start_step, total=end)
    speed, real_since = Throughput(), 0
    save = lambda s: master and save_checkpoint(cfg.out_dir, raw, opt, s, cfg, tok, extra={"data": data_stats})  # noqa: E731
    for step in interruptible(bar, save):   # Ctrl-C: save the last finished step, exit 130
        due = (cfg.eval_interval and step % cfg.eval_interval == 0) or (problems and step == two_thirds)
        if due and step > start_step and master:
            row = evaluate(raw, tok, val_rows, val_sources, problems, cfg, device, pad_id)
            log.log(step=step, **row)
            bar.write(f"[sft] step {step}: {describe_eval(row)}", file=sys.stderr)
        with speed.step(cfg.total_batch_size):
            lr = lr_at(step, max_steps, cfg.lr, warmup, cfg.min_lr_frac)
            set_lr(opt, lr)
            rows = stream.rows(step * rows_per_step, rows_per_step)
            loss = step_gradients(model, rows, stream.n_targets(rows), sources, accum, cfg, dist, pad_id,
                                  tok.start_header_id)
            if not math.isfinite(loss):
                raise NonFiniteError(f"step {step}: the SFT loss is not finite ({loss}); lower --lr")
            grad_norm = clip_and_step(raw.parameters(), opt, cfg.grad_clip,
                                      lambda g: f"step {step}: the gradient norm is {g}; lower --lr")
        real_since += sum(int(sources[i].lengths[j]) for row in rows for i, j in row)
        if master and log_due(step, cfg.log_interval, end):
            row = {"step": step + 1, "lr": lr, "grad_norm": grad_norm, "train_loss": loss,
                   "epoch": (step + 1) * rows_per_step / epoch_rows, "fill": real_since / speed.tokens,
                   "tokens_per_s": speed.take()}
            log.log(**row)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            real_since = 0
        if ckpt_due(step, cfg.ckpt_interval, end):
            save(step + 1)
    if master:
        save(end)
        if end == max_steps and evals:
            final_eval(raw, tok, val_rows, val_sources, problems, cfg, device, pad_id, log, two_thirds, end, say)
        draw_curves(cfg, read_metrics(log.path), problems)
        say(f"saved {cfg.out_dir} at step {end}")
    teardown_dist(dist)


if __name__ == "__main__":
    run_main(main, SFTConfig)
