"""
grpo_io.py: GRPO's plumbing, so that grpo.py holds the method: the prompts file and its checks,
the inputs of a run (policy, tokenizer, frozen reference, the file's digest for --resume), the
prefilter's file and report (the starting policy's pass@1 / pass@G per chain length), the
difficulty buckets of the learning curves, a step's metrics row and the curves drawn at the end.

What grpo.py writes under --out_dir besides its checkpoint:
    prefilter.jsonl        every prefiltered prompt with its pass rate and whether it was kept
                           (a valid --data file: its rows skip the sampling)
    metrics.jsonl          the prefilter's stats, one row per step, the held-out evals
    reward.png             rollout accuracy per mode, held-out accuracy
    reward_by_bucket.png   rollout accuracy per difficulty bucket, reasoning on (what shows learning:
                           the curriculum makes the batches harder as the run goes on)
    eval.png               held-out accuracy and think rates, by chain length k
"""
import hashlib
import json
import os

import numpy as np

from checkpoint import load_model
from configurator import ConfigError, atomic_write
from data import DataError, load_rl_jsonl, load_tokenizer
from runtime import check_vocab, plot_curves


def load_prompts(path):
    """data.load_rl_jsonl (errors name file, line and field) + an empty file is an error."""
    rows = load_rl_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def check_context(cfg, tok, rows, context):
    """Every prompt and its longest response fit the model's context: the bad row or flag named."""
    lengths = [len(tok.render_prompt(r["prompt"], "on")) for r in rows]
    longest = max(lengths)
    if longest + cfg.max_new_tokens - 1 > context:
        from data import _read_jsonl
        lineno = [n for n, _ in _read_jsonl(cfg.data)][lengths.index(longest)]
        if longest >= context:   # the prompt alone fills the context: the row is bad
            raise DataError(f"{cfg.data}:{lineno}: the prompt is {longest} tokens, longer than the model's "
                            f"context of {context} (--init_from={cfg.init_from})")
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens}: the longest prompt of {cfg.data} (line {lineno}) "
                          f"has {longest} tokens, and the model's context is {context}")


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inputs(cfg, device):
    """The policy and its tokenizer, the frozen reference (only with kl_weight > 0), the prompts
    and their file's digest (a resumed run must read the same file)."""
    tok = load_tokenizer(cfg.init_from)
    model = load_model(cfg.init_from)
    check_vocab(tok, model.config, f"--init_from={cfg.init_from}")
    rows = load_prompts(cfg.data)
    check_context(cfg, tok, rows, model.config.max_position_embeddings)
    reference = None
    if cfg.kl_weight > 0:  # the frozen starting policy; with kl_weight 0 it is never loaded
        reference = load_model(cfg.init_from, device=device).eval().requires_grad_(False)
    return tok, model, reference, rows, file_digest(cfg.data)


def pass_at_k(rows, scanned, n_samples):
    """What the starting policy can do on the RL prompts, from the prefilter's samples: pass@1 (the
    mean pass rate) and pass@n (the share of prompts solved at least once in n samples), over all
    scanned prompts and per chain length k. RL with verifiable rewards mostly turns pass@n into
    pass@1 (Yue et al. 2025): a wide gap is the room it has; a pass@n near 0 is none."""
    by_k = {}
    for i, rate, _ in scanned:
        if rate is not None and "pass_rate" not in rows[i]:
            by_k.setdefault(rows[i].get("k"), []).append(rate)
    out = {}
    for k, rates in [(None, [r for v in by_k.values() for r in v])] + sorted(
            (k, v) for k, v in by_k.items() if isinstance(k, int)):
        if rates:
            tag = "" if k is None else f"_k{k}"
            out[f"pass_at_1{tag}"] = float(np.mean(rates))
            out[f"pass_at_{n_samples}{tag}"] = float(np.mean([r > 0 for r in rates]))
    return out


def report_prefilter(pool, stats, cfg, say, log, clock):
    """What the prefilter found: how many prompts were kept, the starting policy's pass@1 / pass@G
    per chain length (stderr and metrics.jsonl)."""
    kept_rates = [r for _, r in pool if r is not None]
    say(f"prefilter: {stats['prefilter_scanned']} prompts scanned ({stats['prefilter_sampled']} sampled x "
        f"{cfg.prefilter_samples}), {stats['prefilter_dropped']} dropped (pass rate outside [{cfg.min_pass_rate}, "
        f"{cfg.max_pass_rate})), "
        f"{len(pool)} kept (mean pass rate {np.mean(kept_rates) if kept_rates else float('nan'):.3f}) "
        f"in {clock.last['prefilter_s']:.1f} s")
    G = cfg.prefilter_samples
    by_k = sorted({int(k.rsplit("_k", 1)[1]) for k in stats if k.startswith("pass_at_1_k")})
    if by_k:
        say("starting policy on the scanned prompts: pass@1 / pass@{}: ".format(G) + ", ".join(
            f"k={k} {stats[f'pass_at_1_k{k}']:.2f} / {stats[f'pass_at_{G}_k{k}']:.2f}" for k in by_k))
    log.log(step=0, **stats, **clock.last,
            pass_rate_hist=np.histogram(kept_rates, bins=8, range=(0, 1))[0].tolist() if kept_rates else [])


def write_prefilter(path, rows, scanned):
    """Every scanned prompt with its pass rate and whether it was kept: a valid --data file (rows
    carry pass_rate, so a new run skips their sampling)."""
    lines = []
    for i, rate, keep in scanned:
        row = dict(rows[i])
        if rate is not None:
            row["pass_rate"] = rate
        lines.append(json.dumps({**row, "kept": keep}, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))


def check_pool(pool, cfg):
    """An empty pool is an error (nothing to learn from, said before any training). A pool smaller
    than a batch is trained on with batches drawn with replacement (grpo.draw_batch): returns the
    warning to print, else None. A strong SFT policy gets there: seed 1337's prefiltering kept 20-33
    of 2,000 prompts scanned, against --prompts_per_step=16."""
    why = (f"prefiltering (pass rate in [--min_pass_rate={cfg.min_pass_rate}, --max_pass_rate={cfg.max_pass_rate}))")
    if not pool:
        raise DataError(f"{cfg.data}: 0 prompts left after {why}: every pass rate is outside that range, "
                        "nothing to learn from")
    if cfg.curriculum and any(r is None for _, r in pool):
        raise ConfigError("--curriculum=True needs a pass rate for every prompt: set --prefilter_samples > 0 or give "
                          "the rows a pass_rate (or --curriculum=False)")
    if len(pool) < cfg.prompts_per_step:
        return (f"warning: {len(pool)} prompts left after {why}, fewer than --prompts_per_step={cfg.prompts_per_step}: "
                "each batch draws them with replacement (a prompt may fill several groups)")
    return None


def rollout_bucket(row, start_rate):
    """The difficulty bucket of a prompt for the learning curves: its chain length k when the row
    has one (the nano world), else the starting policy's pass rate in quarters. The curriculum moves
    the batches from easy to hard, so the batch reward falls as RL goes on even when the policy
    improves; the reward within a bucket is what shows learning."""
    if isinstance(row.get("k"), int):
        return f"k{row['k']}"
    if start_rate is None:
        return "all"
    q = min(int(start_rate * 4), 3)
    return f"p{25 * q}_{25 * q + 25}"


def bucket_order(b):
    return (b[0], int(b[1:].split("_")[0])) if b[1:2].isdigit() else (b, 0)


def rollout_sums(samples, buckets, cfg):
    """This process's sums over its rollouts, per mode and per bucket (the same keys on every
    process, for all_sum)."""
    out = {}
    for mode in ("on", "off"):
        of = [s for s in samples if s["mode"] == mode]
        out[f"n_{mode}"] = len(of)
        out[f"acc_{mode}"] = sum(s["accuracy"] for s in of)
        out[f"fmt_{mode}"] = sum(s["format"] for s in of)
    for b in buckets:
        of = [s for s in samples if s["bucket"] == b and s["mode"] == "on"]
        out[f"n_{b}"], out[f"acc_{b}"] = len(of), sum(s["accuracy"] for s in of)
    out.update(n=len(samples), accuracy=sum(s["accuracy"] for s in samples),
               format=sum(s["format"] for s in samples),
               reward=sum(s["reward"] for s in samples),
               response_tokens=sum(len(s["response"]) for s in samples),
               truncated=sum(s["truncated"] for s in samples))
    return out


def step_row(step, g, same, timed, cfg, batch_rates, modes, buckets, mu, with_reference):
    """The step's metrics.jsonl row from the global sums `g` and the values every process shares."""
    tokens = same["trained_tokens"]
    per_token = lambda k: g[k] / tokens if tokens else None  # noqa: E731  (no trained token: no value)
    # the starting model's pass rates of this batch's prompts (measured in "on" mode unless
    # a row says otherwise): what the rollout accuracy is to be compared with, since the
    # curriculum makes the batches harder step by step
    rates = [r for r in batch_rates if r is not None]
    rates_on = [r for r, m in zip(batch_rates, modes) if m == "on" and r is not None]
    row = {"step": step + 1, "lr": same["lr"], "reward": g["reward"] / g["n"],
           "reward_accuracy": g["accuracy"] / g["n"], "reward_format": g["format"] / g["n"],
           **{f"reward_accuracy_{m}": g[f"acc_{m}"] / g[f"n_{m}"] for m in ("on", "off") if g[f"n_{m}"]},
           **{f"reward_format_{m}": g[f"fmt_{m}"] / g[f"n_{m}"] for m in ("on", "off") if g[f"n_{m}"]},
           **{f"reward_accuracy_on_{b}": g[f"acc_{b}"] / g[f"n_{b}"] for b in buckets if g[f"n_{b}"]},
           "response_len": g["response_tokens"] / g["n"], "truncated": g["truncated"] / g["n"],
           "skipped_groups": int(g["skipped_groups"]), "groups": cfg.prompts_per_step,
           "updates": same["updates"], "trained_tokens": int(same["trained_tokens"]),
           "loss": g["loss"], "clip_frac": per_token("clipped"), "kl_old": per_token("kl_old_sum"),
           "entropy": per_token("entropy_sum"),
           "grad_norm": float(np.mean(same["grad_norm"])) if same["grad_norm"] else None,
           "batch_pass_rate": float(np.mean(rates)) if rates else None,
           "batch_pass_rate_on": float(np.mean(rates_on)) if rates_on else None,
           **timed}
    if mu is not None:
        row["curriculum_mu"] = mu
    if with_reference:
        row["kl_ref"] = per_token("kl_ref_sum")
    return row


def draw_curves(cfg, rows_m, buckets, problems):
    """reward.png (rollout accuracy per mode, held-out accuracy), reward_by_bucket.png (rollout
    accuracy per difficulty bucket, reasoning on: the curves that show learning), eval.png."""
    title = f"grpo.py: {cfg.out_dir}"
    plot_curves(os.path.join(cfg.out_dir, "reward.png"), rows_m,
                ["reward_accuracy_on", "reward_accuracy_off", "reward_format", "accuracy_on", "accuracy_off"],
                title=title)
    # rollout accuracy per difficulty bucket ("on" mode): the curves that show learning
    plot_curves(os.path.join(cfg.out_dir, "reward_by_bucket.png"), rows_m,
                [f"reward_accuracy_on_{b}" for b in buckets], title=title + " (rollouts, reasoning on)",
                smooth=max(1, min(10, cfg.max_steps // 10)))
    if problems:
        ks = sorted({k for r in rows_m for k in r if k.startswith("acc_on_k")}, key=lambda k: int(k[8:]))
        plot_curves(os.path.join(cfg.out_dir, "eval.png"), rows_m,
                    ["accuracy_on", "accuracy_off", "think_rate_on", "think_rate_off"] + ks,
                    title=title + " (held-out val, greedy)")
