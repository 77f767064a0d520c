"""
distill.py: pretraining, knowledge distillation and continued pretraining (paper sec. 2.2).

Llama-Nemotron heals the child that Puzzle assembles with knowledge distillation from the parent
(LN-Super: 40B tokens; LN-Ultra: 65B) and then continued pretraining (LN-Ultra: 88B more). Puzzle's
global KD loss is, per token,
    L = cosine_weight * sum_l (1 - cos(h_child_l, h_parent_map(l))) + kd_weight * KL(parent || child)
with no LM loss (adding it hurt in the Puzzle paper; --lm_weight is there to try).
Without a teacher the same script is plain LM pretraining: in the offline nano recipe it
pretrains the parent itself from scratch on the built-in corpus.

    python distill.py                                            # nano parent: out/data -> out/parent
    python distill.py --init_from=out/child --teacher=out/parent --out_dir=out/child_kd
    python distill.py --init_from=out/parent --out_dir=out/cpt   # continued pretraining
    torchrun --standalone --nproc_per_node=8 distill.py config/parent_1gpu.py config/parent_multi_gpu.py

Reads: token shards + tokenizer from --data_dir (data.py), optional --init_from / --teacher
checkpoint folders. Writes to --out_dir: config.json + model.safetensors (native format), the
tokenizer, trainer_state.pt (for --resume=True), train_config.json, metrics.jsonl, loss.png.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_config, load_model
from configurator import (check, check_choice, check_positive, check_range, check_readable)
from data import load_token_shards, load_tokenizer
from model import ModelConfig, NonFiniteError, Transformer, count_params
from runtime import (all_sum, auto_eval_interval, autocast, check_batch, check_out_dir, chunked_cross_entropy,
                     chunked_kl, ckpt_due, clip_and_step, ConfigError, data_fingerprint, estimate_flops_per_token,
                     gpu_peak_flops, grad_accum_steps, grad_sync, interruptible, load_for_resume, log_due, lr_at,
                     MetricsLog, nonfinite_message, plot_curves, PRECISIONS, prepare_for_training, read_metrics,
                     resolve_lengths, run_main, save_checkpoint, set_lr, start_stage, step_offsets, teardown_dist,
                     Throughput, windows)


@dataclass
class DistillConfig:
    # data (data.py writes these)
    data_dir: str = "out/data"
    train_data: str = "pretrain_train"   # token shard folder, relative to data_dir or absolute
    val_data: str = "pretrain_val"
    seq_len: int = 0                     # window length; 0 = the longest document rounded up to a power
                                         # of two >= 256, at most the student's and teacher's context and
                                         # total_batch_size / device_batch_size (256 by default)
    # student: "scratch" builds a Llama from the sizes below; else a checkpoint folder
    init_from: str = "scratch"
    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    ffn_hidden: int = 384                # SwiGLU width (3 x 128: ~ the 8/3 rule, rounded to 64)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    # teacher (knowledge distillation when set)
    teacher: str = ""
    kd_weight: float = 1.0               # KL(teacher || student) on logits
    kd_temperature: float = 1.0
    cosine_weight: float = 1.0           # per-layer hidden-state cosine loss (Puzzle's global KD)
    layer_map: str = "auto"              # "auto" (proportional) or "s:t,s:t,..." student->teacher
    lm_weight: float = 0.0               # LM loss weight when a teacher is set (Puzzle: 0)
    vocab_chunk: int = 0                 # tokens per chunk of the vocabulary-sized losses; 0 = 4096, fewer
                                         # for a large vocabulary (runtime.logits_chunk: <= 256 MiB of logits)
    # optimisation
    total_batch_size: int = 0            # tokens per optimizer step; 0 = ~4096 (16 seqs x 256) in whole
                                         # micro-steps (runtime.auto_total_batch): many small steps form the
                                         # copy circuit sooner (README, "The nano world")
    device_batch_size: int = 16          # sequences per micro-step per process
    max_steps: int = 1200                # length of the run and of the LR schedule (4.9M tokens, ~5 min here)
    stop_after: int = 0                  # end this invocation after this many more steps (0 = run
                                         # to max_steps); continue later with --resume=True
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # runtime
    device: str = "auto"                 # auto | cpu | cuda
    compile: bool = False
    precision: str = "auto"              # auto | bf16 | fp32: bf16 autocast where it is faster (runtime.resolve_precision)
    seed: int = 1337
    out_dir: str = ""                    # "": out/parent (pretraining from scratch), out/child (KD with a
                                         # --teacher); required when --init_from is given without a teacher
    resume: bool = False
    overwrite: bool = False              # replace a finished checkpoint in --out_dir (else refused)
    eval_interval: int | None = None     # validation loss every N steps (and at the end); 0 = never;
                                         # None = 100 (at most half the run), none for runs of 1-2 steps
    eval_batches: int = 4
    ckpt_interval: int = 0               # also checkpoint every N steps (0 = only at the end)
    log_interval: int = 10

    def validate(self):
        """Every flag, before any work: types are checked by the parser, ranges and relations here."""
        check_readable(self.data_dir, "data_dir", "dir")
        check_positive(self, "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "rope_theta",
                       "kd_temperature", "device_batch_size", "max_steps", "lr", "grad_clip", "eval_batches",
                       "log_interval")
        for name in ("seq_len", "total_batch_size", "vocab_chunk"):   # 0: resolved in main (train_config.json)
            check_range(self, name, 0)
        check(self.n_embd % self.n_head == 0, "n_head", self.n_head,
              f"must divide --n_embd={self.n_embd} (head_dim = n_embd / n_head)")
        check(self.n_head % self.n_kv_head == 0, "n_kv_head", self.n_kv_head,
              f"must divide --n_head={self.n_head} (each KV head serves a group of query heads)")
        check((self.n_embd // self.n_head) % 2 == 0, "n_head", self.n_head,
              f"gives an odd head_dim {self.n_embd // self.n_head} (RoPE rotates pairs of dimensions)")
        if self.seq_len and self.total_batch_size:
            check_batch(self)
        elif self.total_batch_size:   # --seq_len=0: rows of at most total_batch_size / device_batch_size tokens
            check(self.total_batch_size >= 8 * self.device_batch_size, "total_batch_size", self.total_batch_size,
                  f"leaves fewer than 8 tokens for each of the --device_batch_size={self.device_batch_size} rows "
                  f"of a micro-step (--seq_len=0 makes rows of at most total_batch_size / device_batch_size)")
        if self.eval_interval is None:   # evaluations scale with the run (recorded in train_config.json)
            self.eval_interval = auto_eval_interval(self.max_steps) or 0
        for name in ("kd_weight", "cosine_weight", "lm_weight", "weight_decay", "warmup_steps", "stop_after",
                     "eval_interval", "ckpt_interval", "seed"):
            check_range(self, name, 0)
        check_range(self, "min_lr_frac", 0, 1)
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        check_choice(self, "precision", PRECISIONS)
        if self.init_from != "scratch":
            check_readable(self.init_from, "init_from", "dir")
        if self.teacher:
            check_readable(self.teacher, "teacher", "dir")
            check(self.kd_weight + self.cosine_weight + self.lm_weight > 0, "kd_weight", self.kd_weight,
                  "with --cosine_weight=0 and --lm_weight=0 there is no loss to train on")
        if self.layer_map != "auto":
            check(all(len(p.split(":")) == 2 and all(v.strip().isdigit() for v in p.split(":"))
                      for p in self.layer_map.split(",")), "layer_map", self.layer_map,
                  "must be auto or student:teacher pairs such as 0:0,1:2")
        if not self.out_dir:   # never a silent default that could be an input of a second phase
            check(self.init_from == "scratch" or self.teacher, "out_dir", self.out_dir,
                  f"is required with --init_from={self.init_from} (a second phase writes a new folder, e.g. "
                  f"--out_dir=out/cpt)")
            self.out_dir = "out/child" if self.teacher else "out/parent"
        path = lambda p: p if os.path.isabs(p) else os.path.join(self.data_dir, p)
        check_out_dir(self.out_dir, [("init_from", self.init_from), ("teacher", self.teacher),
                                     ("data_dir", self.data_dir), ("train_data", path(self.train_data)),
                                     ("val_data", path(self.val_data))],
                      resume=self.resume, overwrite=self.overwrite)


def parse_layer_map(spec, n_student, n_teacher):
    """Student layer -> teacher layer whose hidden states the cosine loss compares.
    'auto': same index when depths agree (a Puzzle child keeps the parent's depth), else
    proportional (student layer i <-> teacher layer round((i+1) * Lt / Ls) - 1)."""
    if spec == "auto":
        return {i: max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)}
    out = {}
    for pair in spec.split(","):
        try:
            s, t = (int(v) for v in pair.split(":"))
        except ValueError:
            raise ConfigError(f"--layer_map: {pair!r} is not 'student:teacher'") from None
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ConfigError(f"--layer_map: {pair!r} out of range (student has {n_student} layers, "
                              f"teacher {n_teacher})")
        out[s] = t
    return out


def loss_sums(model, teacher, x, y, doc_ids, positions, cfg, layer_map, need_lm=False):
    """Per-token sums of the loss terms of one micro-batch (the caller divides each by its global
    count, see `normalisers`): "lm" cross-entropy, and with a teacher "kl" = KL(teacher||student)
    and "cos" = sum over mapped layers of (1 - cosine similarity) of hidden states."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    if teacher is None:
        h = model(x, doc_ids, positions, head=False)
        return {"lm": chunked_cross_entropy(h, raw.lm_head.weight, y, cfg.vocab_chunk)}
    h, hid_s = model(x, doc_ids, positions, return_hidden=True, head=False)
    with torch.no_grad():
        ht, hid_t = teacher(x, doc_ids, positions, return_hidden=True, head=False)
    out = {}
    if cfg.kd_weight:
        out["kl"] = chunked_kl(h, raw.lm_head.weight, ht, teacher.lm_head.weight, cfg.kd_temperature,
                               cfg.vocab_chunk)
    if cfg.cosine_weight:
        out["cos"] = sum((1 - F.cosine_similarity(hid_s[s].float(), hid_t[t].float(), dim=-1)).sum()
                         for s, t in layer_map.items())
    if cfg.lm_weight or need_lm:
        out["lm"] = chunked_cross_entropy(h, raw.lm_head.weight, y, cfg.vocab_chunk)
    return out


def loss_weights(cfg, teacher):
    if teacher is None:
        return {"lm": 1.0}
    return {"kl": cfg.kd_weight, "cos": cfg.cosine_weight, "lm": cfg.lm_weight}


def normalisers(n_tokens, n_lm_targets):
    """KD terms are means over all positions; the LM term over the targets that are not a BOS (and
    that the loss mask keeps). A batch may hold no such target (the default world's conversations
    and copy exercises carry loss on their answers only: two 32-token windows of prompts did, at
    step 18 of a tiny run): its LM sum is 0 and so is its mean, not 0 / 0 = NaN."""
    return {"kl": n_tokens, "cos": n_tokens, "lm": max(1, n_lm_targets)}


def build_student(cfg, n_vocab):
    if cfg.init_from == "scratch":
        mcfg = ModelConfig.llama(num_layers=cfg.n_layer, num_key_value_heads=cfg.n_kv_head,
                                 intermediate_size=cfg.ffn_hidden, vocab_size=n_vocab,
                                 hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                                 rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                                 max_position_embeddings=cfg.seq_len)
        return Transformer(mcfg)
    return load_model(cfg.init_from)


@torch.no_grad()
def evaluate(model, teacher, val, cfg, bos_id, device, layer_map, mask=None):
    """Mean per-token losses on fixed validation windows (the same windows at every eval); the LM
    loss over the targets the shards' loss mask keeps."""
    model.eval()
    n_win = cfg.eval_batches * cfg.device_batch_size
    offsets = step_offsets(len(val), cfg.seed, 2**32 - 1, n_win, cfg.seq_len)
    sums, n_tok, n_lm = {}, 0, 0
    for i in range(0, n_win, cfg.device_batch_size):
        x, y, doc, pos = windows(val, offsets[i:i + cfg.device_batch_size], cfg.seq_len, bos_id, device, mask)
        with autocast(device, cfg.precision):
            for k, v in loss_sums(model, teacher, x, y, doc, pos, cfg, layer_map, need_lm=True).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n_tok += x.numel()
        n_lm += int((y != -100).sum())
    model.train()
    norm = normalisers(n_tok, n_lm)
    return {f"val_{k}": v / norm[k] for k, v in sums.items()}


def step_gradients(model, teacher, train, step, cfg, dist, accum, bos_id, layer_map, weights, mask=None):
    """Forward + backward of optimizer step `step`: this process's share of the step's global
    batch in `accum` micro-steps, gradients accumulated in .grad. Each loss term is divided by its
    count over the whole global batch (every process can count: the stream is known to all), so
    the accumulated gradient is that of the token mean over the global batch however it is split
    into processes and micro-steps. DDP averages gradients over the processes, hence the factor
    world_size. The LM term counts the targets that are no BOS and that the shards' loss mask keeps
    (text whole, a conversation's answers, a copy exercise's second copies). Returns {term: this
    process's share of its global mean} (tensors)."""
    n_windows = cfg.total_batch_size // cfg.seq_len
    offsets = step_offsets(len(train), cfg.seed, step, n_windows, cfg.seq_len)
    n_lm = sum(int(((np.asarray(train[o + 1:o + cfg.seq_len + 1]) != bos_id)
                    & (True if mask is None else np.asarray(mask[o + 1:o + cfg.seq_len + 1], dtype=bool))).sum())
               for o in offsets)
    norm = normalisers(n_windows * cfg.seq_len, n_lm)
    device = dist.device
    logged = {}
    for m in range(accum):
        first = (m * dist.world_size + dist.rank) * cfg.device_batch_size
        x, y, doc, pos = windows(train, offsets[first:first + cfg.device_batch_size], cfg.seq_len, bos_id, device,
                                 mask)
        with grad_sync(model, m == accum - 1):
            with autocast(device, cfg.precision):
                parts = loss_sums(model, teacher, x, y, doc, pos, cfg, layer_map)
                loss = sum(weights[k] * v / norm[k] for k, v in parts.items()) * dist.world_size
            loss.backward()
        for k, v in parts.items():
            logged[k] = logged.get(k, 0.0) + v.detach() / norm[k]
    return logged


# What a resumed run must share with the run it continues: the data stream and the LR schedule.
RESUME_KEYS = ("seed", "seq_len", "total_batch_size", "data_dir", "train_data", "max_steps", "lr",
               "warmup_steps", "min_lr_frac", "teacher", "kd_weight", "cosine_weight", "lm_weight", "layer_map")


def load_data(cfg, world_size):
    """The tokenizer and the (tokens, loss mask) of the training and validation shards; resolves
    --seq_len / --total_batch_size (resolve_lengths) and checks a window fits in each."""
    path = lambda p: p if os.path.isabs(p) else os.path.join(cfg.data_dir, p)  # noqa: E731
    tok = load_tokenizer(cfg.data_dir)
    train = load_token_shards(path(cfg.train_data), n_vocab=tok.n_vocab, with_mask=True)
    val = load_token_shards(path(cfg.val_data), n_vocab=tok.n_vocab, with_mask=True)
    contexts = [load_config(p).max_position_embeddings for p in (cfg.init_from, cfg.teacher) if p and p != "scratch"]
    resolve_lengths(cfg, train[0], tok.bos_id, contexts, world_size)
    for name, (arr, _) in ((cfg.train_data, train), (cfg.val_data, val)):
        if len(arr) < cfg.seq_len + 2:
            raise ConfigError(f"{path(name)} holds {len(arr)} tokens, fewer than one window of --seq_len={cfg.seq_len}")
    return tok, train, val


def load_teacher(cfg, mcfg, device):
    """The frozen teacher (None without --teacher) and the student -> teacher layer map of the
    cosine term, checked against the student: the same vocabulary, the same width for hidden states."""
    if not cfg.teacher:
        return None, {}
    teacher = load_model(cfg.teacher, device=device).eval().requires_grad_(False)
    if teacher.config.vocab_size != mcfg.vocab_size:
        raise ConfigError(f"teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size}, "
                          f"the student {mcfg.vocab_size}: KL needs the same vocabulary")
    if cfg.cosine_weight and teacher.config.hidden_size != mcfg.hidden_size:
        raise ConfigError(f"--cosine_weight={cfg.cosine_weight} compares hidden states, but the teacher's "
                          f"hidden size is {teacher.config.hidden_size} and the student's {mcfg.hidden_size} "
                          f"(a Puzzle child keeps the parent's width); use --cosine_weight=0")
    return teacher, parse_layer_map(cfg.layer_map, mcfg.num_hidden_layers, teacher.config.num_hidden_layers)


def report(cfg, rows, end):
    """loss.png (every train_ / val_ curve) and the last interval's numbers (throughput, MFU, losses)."""
    keys = sorted({k for r in rows for k in r if k.startswith(("train_", "val_"))})
    plot_curves(os.path.join(cfg.out_dir, "loss.png"), rows, keys, title=f"distill.py: {cfg.out_dir}")
    last_train = [r for r in rows if "tokens_per_s" in r][-1:]
    last_val = [r for r in rows if any(k.startswith("val_") for k in r)][-1:]
    print(f"[distill] saved {cfg.out_dir} at step {end}: {json.dumps(last_train + last_val)}", file=sys.stderr)


def main(cfg):
    dist, say = start_stage(cfg, "distill")   # processes, device, --precision, seed
    device, master = dist.device, dist.master
    tok, (train, train_mask), (val, val_mask) = load_data(cfg, dist.world_size)

    model = build_student(cfg, tok.n_vocab)
    mcfg = model.config
    if mcfg.vocab_size < tok.n_vocab:
        raise ConfigError(f"the tokenizer in {cfg.data_dir} has {tok.n_vocab} tokens but the model "
                          f"({cfg.init_from}) has a vocabulary of {mcfg.vocab_size}")
    teacher, layer_map = load_teacher(cfg, mcfg, device)
    for who, m in (("model", model), ("teacher", teacher)):
        if m is not None and cfg.seq_len > m.config.max_position_embeddings:
            raise ConfigError(f"--seq_len={cfg.seq_len} exceeds the {who}'s context of {m.config.max_position_embeddings}")
    start_step, state = 0, None
    extra = {"train_data_fingerprint": data_fingerprint(train)}
    if cfg.resume:
        model, state = load_for_resume(cfg, mcfg, RESUME_KEYS, cfg.max_steps,
                                       (f"the training data in {cfg.data_dir}", "train_data_fingerprint",
                                        extra["train_data_fingerprint"]), paths=("data_dir", "train_data", "teacher"))
        start_step = state["step"]
    model, raw, opt = prepare_for_training(model, cfg, dist, state)   # device, compile, DDP, AdamW

    accum = grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, dist.world_size)
    flops_tok, peak = estimate_flops_per_token(mcfg, cfg.seq_len), gpu_peak_flops(device)
    end = min(cfg.max_steps, start_step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    weights = loss_weights(cfg, teacher)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master, append=cfg.resume)
    say(f"{'KD from ' + cfg.teacher if teacher is not None else 'LM pretraining'}; student {count_params(mcfg):,} "
        f"params ({cfg.init_from}); {dist.world_size} process(es) on {device}; {accum} micro-steps x "
        f"{cfg.device_batch_size} seqs x {cfg.seq_len} tokens = {cfg.total_batch_size} tokens/step; steps {start_step}->{end}")

    bar = tqdm(range(start_step, end), disable=not master, desc="distill", initial=start_step, total=end)
    speed = Throughput()
    save = lambda s: master and save_checkpoint(cfg.out_dir, raw, opt, s, cfg, tok, extra)  # noqa: E731
    for step in interruptible(bar, save):   # Ctrl-C: save the last finished step, exit 130
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step > start_step and master:
            log.log(step=step, **evaluate(raw, teacher, val, cfg, tok.bos_id, device, layer_map, val_mask))
        with speed.step(cfg.total_batch_size):
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
            set_lr(opt, lr)
            logged = step_gradients(model, teacher, train, step, cfg, dist, accum, tok.bos_id, layer_map, weights,
                                    train_mask)
            logged = all_sum(dist, {k: float(v) for k, v in logged.items()})   # each process: its share of the mean
            if not all(np.isfinite(v) for v in logged.values()):
                raise NonFiniteError(nonfinite_message(f"the loss is not finite ({logged})", step, start_step, raw, cfg))
            grad_norm = clip_and_step(raw.parameters(), opt, cfg.grad_clip, lambda g: nonfinite_message(
                f"the gradient norm is {g} (loss {logged})", step, start_step, raw, cfg))
        if master and log_due(step, cfg.log_interval, end):
            row = {"step": step + 1, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": speed.take(),
                   **{f"train_{k}": v for k, v in logged.items()}}
            if peak:
                row["mfu"] = flops_tok * row["tokens_per_s"] / (peak * dist.world_size)
            log.log(**row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items()} | {"tok/s": f"{row['tokens_per_s']:.0f}"})
        if ckpt_due(step, cfg.ckpt_interval, end):
            save(step + 1)
    if master:
        save(end)
        if end == cfg.max_steps and cfg.eval_interval:
            log.log(step=end, **evaluate(raw, teacher, val, cfg, tok.bos_id, device, layer_map, val_mask))
        report(cfg, read_metrics(log.path), end)
    teardown_dist(dist)


if __name__ == "__main__":
    run_main(main, DistillConfig)
