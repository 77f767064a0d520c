"""
grpo.py: large-scale reasoning RL with GRPO and verifiable rewards (paper sec. 5, "Reasoning RL").

LN-Ultra surpasses its teacher on reasoning through Group Relative Policy Optimization (GRPO,
DeepSeekMath): for each prompt of a rollout batch the policy samples a group of G responses
(paper: 72 prompts x 16 samples, temperature 1, top-p 1, 2 gradient steps per rollout batch);
each response gets a verifiable reward (accuracy + format); its advantage is its reward normalised
within its group,
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps),
and the policy maximises, on every response token t, the PPO clipped surrogate against the policy
that sampled (pi_old),
    min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i),   ratio_t = pi(y_t) / pi_old(y_t),
averaged over all response tokens of the global batch (token-level, DAPO: no length bias), with an
optional k3 KL penalty to the frozen starting model. Before RL the prompts are prefiltered with the
starting model (8 samples each; those it solves >= 75% of the time teach nothing and are dropped),
and a curriculum draws each batch around a pass rate that moves from easy to hard.

    python grpo.py                                   # nano recipe: out/sft + out/data/rl_train.jsonl -> out/grpo
    python grpo.py --init_from=out/sft --data=my_prompts.jsonl --group_size=16 --prompts_per_step=72
    torchrun --standalone --nproc_per_node=8 grpo.py --prompts_per_step=64 ...   # same run, 8 processes
    python grpo.py --resume=True                     # continue an interrupted (or --stop_after) run exactly
    python sample.py --ckpt=out/grpo --eval=True --reasoning=on --n=500   # what RL changed

A step of the run:
  1. draw the step's prompts (curriculum) and their modes ("detailed thinking on" / "off");
  2. rollouts: G samples per prompt with model.generate (static KV cache, the decode step compiled
     once: every generate call has the same number of rows, --gen_groups groups x G);
  3. rewards (`reward`, one function: swap it for your own verifier), group advantages; groups
     whose rewards are all equal carry no signal and are skipped (counted in the log);
  4. the sampling policy's log-probs ("old") from one forward pass, in the padded layout the loss
     uses; then --updates_per_rollout optimizer steps, each on its share of the groups (paper:
     72 x 16 = 1,152 responses, global batch 576, so 2 steps).

Data (--data): JSONL rows {"prompt", "answer", optional "reasoning": "on"|"off" (the mode to train
the prompt in), optional "pass_rate" (skips its prefiltering)}; data.py writes the nano world's
out/data/rl_train.jsonl (4,000 addition chains, k = 9..12). The rollout accuracy is data.verify on
the answer part (after </think>), so any task whose answer is checkable by exact match works.

Scale: each group is generated and trained on one process; generate calls ("chunks" of
--gen_groups groups) are dealt to processes round-robin, each seeded by (seed, step, chunk), and
every loss is divided by global counts, so 1 process and N processes compute the same update.
Processes sum their gradients with one all-reduce per optimizer step (not the DDP wrapper: a
process may hold no trainable group in an update when all of its groups were skipped).

Reads: --init_from (a checkpoint folder with its tokenizer: the prompts are rendered with it), --data,
the held-out "val" split of data.py's task world for the periodic evaluations. Writes to --out_dir:
config.json + model.safetensors + tokenizer (sample.py loads it), trainer_state.pt (--resume),
train_config.json, prefilter.jsonl (every prefiltered prompt with its pass rate and whether it was
kept: a valid --data file that skips the sampling), metrics.jsonl, reward.png (rollout rewards and
held-out accuracy per step), eval.png (held-out accuracy and think rates, by chain length k).
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from checkpoint import load_config
from configurator import (check, check_choice, check_positive, check_range, check_readable)
from data import check_format, tokenizer_file, verify
from evaluate import describe_eval, generation_eval, stage_eval_problems
from grpo_io import (bucket_order, check_pool, draw_curves, load_inputs, pass_at_k, report_prefilter, rollout_bucket,
                     rollout_sums, step_row, write_prefilter)
from model import count_params
from runtime import (all_sum, all_sum_grads, auto_eval_interval, check_heldout_size, check_out_dir, ckpt_due,
                     clip_and_step, interruptible, load_for_resume, log_due, LOGITS_CHUNK_ELEMENTS, lr_at,
                     make_optimizer, MetricsLog, PhaseClock, pick_device, read_metrics, run_main, save_checkpoint,
                     set_lr, start_stage, teardown_dist)


@dataclass
class GRPOConfig:
    # data and model
    data: str = "out/data/rl_train.jsonl"   # {"prompt", "answer", optional "reasoning", "pass_rate"}
    init_from: str = "out/sft"              # the starting policy (paper: an earlier SFT checkpoint)
    out_dir: str = "out/grpo"
    # prefiltering with the starting model (paper: 8 samples per prompt, drop pass rate >= 0.75)
    prefilter_samples: int = 8              # 0 = no prefiltering (rows keep a pass_rate they carry)
    max_pass_rate: float = 0.75
    min_pass_rate: float = 0.0              # also drop prompts solved less often than this. 0.1 (solved at
                                            # least once in 8) keeps only groups with a success, but on the
                                            # nano world SFT solves k <= 6 always and k = 7..8 ~6% greedy:
                                            # prefiltering then kept 1.2 prompts/s (13 min for 960)
    pool_size: int = 240                    # prompts to keep (prefiltering stops there); 0 = prompts_per_step *
                                            # max_steps (each drawn about once). 240: each drawn ~twice in the
                                            # 30 x 16 draws; keeping 480 scanned 2,392 prompts (280 s) when SFT
                                            # already solved 80% of them
    prefilter_max_scan: int = 2000          # ...or once this many prompts are scanned and at least
                                            # prompts_per_step kept (0 = no limit). A policy that already
                                            # solves most prompts scans the whole file for a pool it cannot
                                            # fill: seed 1337 on a 2-core EPYC without AMX scanned all 4,000
                                            # in 476 s for 144 kept (seeds 2, 3 on the AMX machine: 206 s)
    # rollouts (paper: 72 prompts x 16 samples, temperature 1, top-p 1)
    prompts_per_step: int = 16              # groups per rollout batch
    group_size: int = 8                     # G samples per prompt
    gen_groups: int = 8                     # groups per generate call: 64 rows, the unit dealt to a process
    max_new_tokens: int = 128               # a k=12 chain's trace + answer is ~112 tokens
    temperature: float = 1.0
    top_p: float = 1.0
    on_fraction: float = 0.75               # share of "on" groups among prompts without a reasoning field
    # rewards
    format_weight: float = 0.5              # reward = accuracy + format_weight * format
    # the GRPO loss
    eps_low: float = 0.2                    # clip ratio below at 1 - eps_low
    eps_high: float = 0.28                  # and above at 1 + eps_high (DAPO "clip-higher")
    adv_eps: float = 1e-4                   # advantage = (r - mean) / (std + adv_eps)
    kl_weight: float = 0.0                  # k3 KL to the frozen starting model (0: none loaded)
    updates_per_rollout: int = 2            # optimizer steps per rollout batch, each on 1/U of the groups
    device_batch_size: int = 64             # sequences per forward/backward micro-step
    # curriculum (paper: the batch's pass-rate mix follows a Gaussian moving from easy to hard)
    curriculum: bool = True
    curriculum_sigma: float = 0.15          # width of the Gaussian over pass rates
    # optimisation
    max_steps: int = 30                     # rollout batches
    stop_after: int = 0                     # end this invocation after N more steps (then --resume)
    lr: float = 3e-5                        # nano: 1e-4 and above lowered greedy accuracy with reasoning on
                                            # by 7-11 points in 15-30 steps; 2e-5 to 5e-5 left it within
                                            # +-1 point (an earlier world: README at bc6c650)
    warmup_steps: int = 2                   # optimizer steps
    min_lr_frac: float = 1.0                # 1.0 = constant after warmup (cosine down to lr * frac otherwise)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8                  # AdamW's eps. Group-centred advantages make many gradient entries
                                            # cancel (a token sampled in winning and losing responses) to ~1e-9,
                                            # the size of float rounding; Adam's first steps divide by
                                            # sqrt(v) + eps, so with eps = 1e-8 such an entry moves by up to lr
                                            # in the direction the rounding picked (tests use 1e-5)
    grad_clip: float = 1.0
    # evaluation: held-out "val" problems in both modes, greedy
    eval_interval: int | None = None        # every N steps (and at start and end); 0 or None = start and end
                                            # only; None: none at all for runs of 1-2 steps
    eval_problems: int = 120                # 0 = no generation eval
    eval_max_new_tokens: int = 128
    # runtime
    device: str = "auto"                    # auto | cpu | cuda
    compile: bool | None = None             # the decode step of rollouts and evals as one compiled graph;
                                            # None: on a GPU (CUDA graphs), not on a CPU, where at 64 rows
                                            # it saved only ~15% of decode time (2.05 vs 2.4 s for 96 steps)
                                            # for >= 20 s of compiling per graph (rollouts, eval: two)
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False                 # replace a finished checkpoint in --out_dir (else refused)
    ckpt_interval: int = 0                  # also checkpoint every N steps (0 = only at the end)
    log_interval: int = 1

    def validate(self):
        check_readable(self.data, "data")
        check_readable(self.init_from, "init_from", "dir")
        check(tokenizer_file(self.init_from) is not None, "init_from", self.init_from,
              "the checkpoint has no tokenizer (tokenizer.model at its root or under original/); the prompts "
              "are rendered with the policy's own tokenizer, so copy the one it was trained with into it")
        load_config(self.init_from)  # a folder without a readable config: one line, before any work
        check_positive(self, "prompts_per_step", "gen_groups", "max_new_tokens", "temperature", "lr",
                       "device_batch_size", "updates_per_rollout", "max_steps", "grad_clip", "eval_max_new_tokens",
                       "log_interval", "adv_eps", "curriculum_sigma", "adam_eps")
        check_range(self, "group_size", 2)  # one sample has no group to be compared with
        if self.eval_interval is None:   # evaluations scale with the run (recorded in train_config.json)
            self.eval_interval = 0
            self.eval_problems = self.eval_problems if auto_eval_interval(self.max_steps) else 0
        for name in ("prefilter_samples", "pool_size", "prefilter_max_scan", "stop_after", "warmup_steps", "eval_interval",
                     "eval_problems", "ckpt_interval", "kl_weight", "format_weight", "weight_decay"):
            check_range(self, name, 0)
        check_range(self, "prefilter_samples", 0, self.gen_groups * self.group_size)
        check_range(self, "max_pass_rate", 0, 1, lo_open=True)
        check_range(self, "min_pass_rate", 0, self.max_pass_rate, hi_open=True)
        check_range(self, "top_p", 0, 1, lo_open=True)
        check_range(self, "on_fraction", 0, 1)
        check_range(self, "eps_low", 0, 1, lo_open=True, hi_open=True)
        check_range(self, "eps_high", 0, lo_open=True)
        check_range(self, "min_lr_frac", 0, 1)
        check(self.updates_per_rollout <= self.prompts_per_step, "updates_per_rollout", self.updates_per_rollout,
              f"each update trains on its share of the groups: at most --prompts_per_step={self.prompts_per_step}")
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        if self.compile is None:  # resolved here, so train_config.json records what ran
            self.compile = pick_device(self.device) == "cuda"
        check_heldout_size("eval_problems", self.eval_problems, "val")
        check_out_dir(self.out_dir, {"init_from": self.init_from, "data": self.data}, resume=self.resume,
                      overwrite=self.overwrite)


# ------------------------------------------------------------------------------------------------
# Rewards (paper: accuracy + format). One function, readable and swappable: replace `reward` with
# your own verifier; the trainer only needs {"accuracy", "format"} in [0, 1] per response.

def reward(problem, response_text, reasoning):
    """The verifiable rewards of one response in mode `reasoning` ("on" | "off").

    format = 1 iff the response has its mode's layout (data.check_format): "on" exactly one
      <think>...</think> block at the start and a non-empty answer after it; "off" no think tags.
    accuracy = 1 iff the format is right AND the answer part equals the reference (data.verify:
      the text after </think>, compared whole, up to whitespace). So no accuracy for
      - a think block in "off" mode, or none in "on" mode (the toggle is part of being right);
      - no parsable answer: an answer only inside the think block, an unclosed <think>;
      - two answers: "5 5", "5\\n6" or "6 5" are not "5" (the whole answer part must match,
        so a policy cannot hedge by listing candidates);
    and text cannot game it: the reward reads the answer part only, never the reasoning."""
    fmt = check_format(response_text, reasoning)
    acc = fmt and verify(problem, response_text)
    return {"accuracy": float(acc), "format": float(fmt)}


def total_reward(parts, format_weight):
    return parts["accuracy"] + format_weight * parts["format"]


# ------------------------------------------------------------------------------------------------
# The GRPO loss, piece by piece (tests/test_grpo.py checks each against hand-computed values).

def group_advantages(rewards, group_size, eps=1e-4):
    """rewards (N,) of N / group_size consecutive groups -> advantages (N,):
    A_i = (r_i - mean(group)) / (std(group) + eps), with the sample std (divide by G - 1; as TRL and
    DeepSeekMath's reference code use torch.std). A group whose rewards are all equal gets A = 0."""
    r = rewards.view(-1, group_size)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def zero_variance_groups(rewards, group_size):
    """(N,) rewards -> (N / group_size,) bool: True where every reward of the group is equal (all
    right, all wrong): A = 0 for all of them, no signal; the trainer skips them."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high):
    """PPO's clipped objective per token, as a loss to minimise:
        -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A),  ratio = exp(logp - old_logp).
    Returns (loss (B, T), clipped (B, T) bool: the clipped branch is the smaller one, so the token
    gives no gradient: A > 0 and ratio > 1 + eps_high, or A < 0 and ratio < 1 - eps_low).
    advantages broadcast against logp, e.g. (B, 1)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3(log_ratio):
    """Schulman's k3 estimator of KL(p || q) from samples x ~ p, log_ratio = log q(x) - log p(x):
    exp(log_ratio) - log_ratio - 1, never negative, unbiased, low variance when p ~ q."""
    return torch.exp(log_ratio) - log_ratio - 1


def token_level_loss(per_token, mask, n_tokens):
    """DAPO's token-level normalisation: this micro-batch's sum of per-token losses over the response
    tokens (mask = 1) divided by n_tokens, the number of response tokens in the WHOLE global batch
    (every micro-step of every process). Every token weighs the same: a long response does not
    get a smaller per-token weight than a short one (the length bias of per-sequence averaging),
    and 1 process or N processes give the same gradient."""
    return (per_token * mask).sum() / n_tokens


def _logprobs_chunk(h, w, y, temperature, entropy):
    logp_all = F.log_softmax(F.linear(h, w).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, y[..., None])[..., 0]
    if entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp


def sequence_logprobs(model, x, y, n_vocab, temperature=1.0, entropy=False):
    """log pi(y_t | x_<=t) (B, T) of the targets under the policy that samples: the model's logits
    over the tokenizer's n_vocab ids (what generate(vocab_limit=n_vocab) samples from) divided by
    the sampling temperature [and the entropy (B, T) of each next-token distribution]. The logits
    are made a few rows at a time (at most runtime.LOGITS_CHUNK_ELEMENTS each, recomputed in
    backward), so a 128k vocabulary never holds B x T x V fp32 logits: 64 rows x 130 tokens x
    128,256 would be 4.3 GB per temporary."""
    h = model(x, head=False)
    w = model.lm_head.weight[:n_vocab]
    rows = max(1, LOGITS_CHUNK_ELEMENTS // (x.shape[1] * n_vocab))
    if rows >= x.shape[0]:
        return _logprobs_chunk(h, w, y, temperature, entropy)
    run = _logprobs_chunk if not torch.is_grad_enabled() else (
        lambda *a: checkpoint(_logprobs_chunk, *a, use_reentrant=False))
    parts = [run(h[a:a + rows], w, y[a:a + rows], temperature, entropy) for a in range(0, x.shape[0], rows)]
    if entropy:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------
# Prompts: loading, prefiltering by the starting model's pass rate, the curriculum.

def chunk_seed(seed, *keys):
    """The generation seed of one generate call, from the run's seed and the call's place in the
    run: the same on every process and after a resume."""
    return int(np.random.default_rng([seed, *keys]).integers(2 ** 62))


@torch.no_grad()
def sample_groups(model, tok, problems, modes, n_samples, rows_per_call, cfg, seed):
    """n_samples responses for each problem in its mode, in ONE generate call of exactly
    rows_per_call rows (filled up with copies of the first row, whose outputs are dropped), so the
    compiled decode step, specialised to its batch shape, is reused by every call of the run.
    Returns a list of dicts (problem-major): prompt / response token ids, text, mode, truncated,
    accuracy, format."""
    prompts = [tok.render_prompt(p["prompt"], m) for p, m in zip(problems, modes) for _ in range(n_samples)]
    batch = prompts + [prompts[0]] * (rows_per_call - len(prompts))
    outs = model.generate(batch, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          stop_ids=tok.stop_ids, seed=seed, pad_id=tok.pad_id, vocab_limit=tok.n_vocab,
                          compile=cfg.compile)
    samples = []
    for i, out in enumerate(outs[:len(prompts)]):
        problem, mode = problems[i // n_samples], modes[i // n_samples]
        text, stopped = tok.decode_response(out)
        # The response's tokens include the stop token: ending the turn is one of the policy's choices.
        samples.append({"prompt": prompts[i], "response": out, "text": text, "mode": mode,
                        "truncated": not stopped, **reward(problem, text, mode)})
    return samples


def prefilter(model, tok, rows, cfg, dist, say):
    """The paper's data filtering: sample --prefilter_samples answers per prompt from the starting
    model, pass rate = share with accuracy 1, drop prompts with pass rate >= --max_pass_rate (they
    are already solved: their groups would mostly be all-correct, zero-variance, skipped).

    Only what the run needs is sampled: candidates are taken in a seeded order, in chunks of as many
    prompts as fill one generate call, until --pool_size prompts are kept, or --prefilter_max_scan
    are scanned with at least --prompts_per_step kept, or the file ends. Rows
    that carry "pass_rate" are not sampled. A prompt is sampled in its row's "reasoning" mode, else
    "on": the pass rate with reasoning is what RL is to raise. Chunk c runs on process c % world
    (seeded by (seed, c)), and the kept pool is the same prefix of chunks for any number of
    processes. Returns (pool: list of (row index, pass rate)), scanned: [(row index, pass rate,
    kept)], stats)."""
    need = cfg.pool_size or cfg.prompts_per_step * cfg.max_steps
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(rows))
    rows_per_call = cfg.gen_groups * cfg.group_size
    per_chunk = rows_per_call // cfg.prefilter_samples if cfg.prefilter_samples else len(rows)
    n_chunks = math.ceil(len(rows) / per_chunk)
    pool, scanned, n_sampled = [], [], 0
    cap = cfg.prefilter_max_scan
    done = lambda: len(pool) >= need or (cap and len(scanned) >= cap and len(pool) >= cfg.prompts_per_step)  # noqa: E731
    bar = tqdm(total=need, desc="prefilter", disable=not dist.master, unit="kept")
    for first in range(0, n_chunks, dist.world_size):  # one round: a chunk per process
        span = range(first, min(first + dist.world_size, n_chunks))
        passes = torch.zeros(len(span), per_chunk, dtype=torch.float64)
        for j, c in enumerate(span):
            if c % dist.world_size != dist.rank:
                continue
            idx = order[c * per_chunk:(c + 1) * per_chunk]
            todo = [i for i in idx if "pass_rate" not in rows[i]]
            if todo and cfg.prefilter_samples:
                probs = [rows[i] for i in todo]
                out = sample_groups(model, tok, probs, [r.get("reasoning", "on") for r in probs],
                                    cfg.prefilter_samples, rows_per_call, cfg, chunk_seed(cfg.seed, 0, c))
                acc = np.array([s["accuracy"] for s in out]).reshape(len(todo), -1).mean(1)
                rate = dict(zip(todo, acc))
            else:
                rate = {}
            for k, i in enumerate(idx):
                passes[j, k] = rows[i].get("pass_rate", rate.get(i, float("nan")))
        all_sum(dist, passes)   # every process learns every chunk's pass rates (others hold zeros there)
        for j, c in enumerate(span):
            idx = order[c * per_chunk:(c + 1) * per_chunk]
            for k, i in enumerate(idx):
                rate = float(passes[j, k])
                rate = rows[i]["pass_rate"] if "pass_rate" in rows[i] else (None if math.isnan(rate) else rate)
                n_sampled += "pass_rate" not in rows[i] and cfg.prefilter_samples > 0
                keep = rate is None or cfg.min_pass_rate <= rate < cfg.max_pass_rate
                scanned.append((int(i), rate, keep))
                if keep:
                    pool.append((int(i), rate))
            if done():  # this chunk completes the pool (or the scan): later chunks are not used
                break
        bar.update(min(len(pool), need) - bar.n)
        if done():
            break
    bar.close()
    pool = pool[:need]
    stats = {"prefilter_scanned": len(scanned), "prefilter_sampled": n_sampled,
             "prefilter_dropped": sum(not k for _, _, k in scanned), "pool": len(pool),
             **pass_at_k(rows, scanned, cfg.prefilter_samples)}
    return pool, scanned, stats


def prefilter_pool(model, tok, rows, cfg, dist, say, log, clock):
    """prefilter, its file (prefilter.jsonl: a valid --data file) and its report."""
    with clock("prefilter"):
        pool, scanned, stats = prefilter(model, tok, rows, cfg, dist, say)
    if dist.master:
        write_prefilter(os.path.join(cfg.out_dir, "prefilter.jsonl"), rows, scanned)
    report_prefilter(pool, stats, cfg, say, log, clock)
    return pool


def curriculum_weights(pass_rates, progress, sigma):
    """The paper's curriculum: the batch's pass-rate mix follows a Gaussian whose centre moves from
    easy to hard over training. Centre mu = easiest + progress * (hardest - easiest) over the pool's
    pass rates (progress 0 at the first step, 1 at the last); each prompt is drawn with probability
    proportional to exp(-(p - mu)^2 / (2 sigma^2)) (plus 1e-12, so every prompt stays possible).
    Returns (probabilities, mu)."""
    easy, hard = float(pass_rates.max()), float(pass_rates.min())
    mu = easy + progress * (hard - easy)
    logw = -0.5 * ((pass_rates - mu) / sigma) ** 2
    w = np.exp(logw - logw.max()) + 1e-12
    return w / w.sum(), mu


def draw_batch(pool, rows, step, cfg):
    """The prompts and modes of rollout step `step`: a pure function of (pool, seed, step), so every
    process draws the same batch and a resumed run continues the same sequence.
    - prompts_per_step distinct pool entries, drawn without replacement with the curriculum's
      probabilities (uniformly with --curriculum=False); with replacement when the pool is smaller
      than a batch (a prompt then fills several groups, each with its own advantages);
    - modes: a row's "reasoning" field if it has one; the others are "off" for
      round(n * (1 - on_fraction)) of them (a seeded choice), else "on".
    Returns (row indices, modes, curriculum centre or None)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    probs, mu = None, None
    if cfg.curriculum:
        rates = np.array([r for _, r in pool], dtype=np.float64)
        probs, mu = curriculum_weights(rates, step / max(1, cfg.max_steps - 1), cfg.curriculum_sigma)
    pick = rng.choice(len(pool), size=cfg.prompts_per_step, replace=len(pool) < cfg.prompts_per_step, p=probs)
    idx = [pool[j][0] for j in pick]
    free = [g for g, i in enumerate(idx) if "reasoning" not in rows[i]]
    n_off = round(len(free) * (1 - cfg.on_fraction))
    off = {free[j] for j in rng.permutation(len(free))[:n_off]}
    modes = [rows[i].get("reasoning", "off" if g in off else "on") for g, i in enumerate(idx)]
    return idx, modes, mu


# ------------------------------------------------------------------------------------------------
# Training on a rollout batch.

def rollouts(model, tok, rows, pool_rate, idx, modes, step, cfg, dist):
    """This process's share of the step's groups (generate call c -> process c % world), each
    sample tagged with its bucket: what the starting policy did on its prompt."""
    samples, group_ids = [], []
    for c in range(dist.rank, math.ceil(cfg.prompts_per_step / cfg.gen_groups), dist.world_size):
        groups = list(range(c * cfg.gen_groups, min((c + 1) * cfg.gen_groups, cfg.prompts_per_step)))
        out = sample_groups(model, tok, [rows[idx[g]] for g in groups], [modes[g] for g in groups],
                            cfg.group_size, cfg.gen_groups * cfg.group_size, cfg, chunk_seed(cfg.seed, 1, step, c))
        for j, s in enumerate(out):
            prompt = idx[groups[j // cfg.group_size]]
            s["bucket"] = rollout_bucket(rows[prompt], pool_rate[prompt])
        samples += out
        group_ids += groups
    return samples, group_ids


def micro_batches(samples, size, pad_id, device):
    """Samples -> list of (x, y, mask, advantages) micro-batches of `size` sequences, prompt +
    response right-padded (causal attention: padding on the right changes nothing before it).
    mask = 1 where the target y_t is a response token."""
    out = []
    for a in range(0, len(samples), size):
        part = samples[a:a + size]
        T = max(len(s["prompt"]) + len(s["response"]) for s in part) - 1
        x = torch.full((len(part), T), pad_id, dtype=torch.long)
        y = torch.full((len(part), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(part), T)
        for b, s in enumerate(part):
            seq = torch.tensor(s["prompt"] + s["response"])
            n, p = len(seq), len(s["prompt"])
            x[b, :n - 1], y[b, :n - 1] = seq[:-1], seq[1:]
            mask[b, p - 1:n - 1] = 1
        adv = torch.tensor([s["advantage"] for s in part], dtype=torch.float32)[:, None]
        out.append(tuple(t.to(device) for t in (x, y, mask, adv)))
    return out


def train_on_rollouts(model, reference, opt, samples, group_ids, step, cfg, dist, tok, device):
    """Steps 3-4 of a rollout step on this process's groups: rewards -> group advantages (zero-
    variance groups skipped) -> old log-probs -> updates_per_rollout optimizer steps. Returns
    (sums to add over processes, values that are the same on every process) for the log."""
    G, U = cfg.group_size, cfg.updates_per_rollout
    rewards = torch.tensor([total_reward(s, cfg.format_weight) for s in samples], dtype=torch.float64)
    skip = zero_variance_groups(rewards, G) if samples else torch.zeros(0, dtype=torch.bool)
    adv = group_advantages(rewards, G, cfg.adv_eps) if samples else rewards
    for s, r, a in zip(samples, rewards.tolist(), adv.tolist()):
        s["reward"], s["advantage"] = r, a
    # Update u trains on the groups whose global index g has g % U == u: every update mixes groups
    # of every generate call (and process), and the split does not depend on the process count.
    pad_id = tok.pad_id if tok.pad_id < model.config.vocab_size else 0
    updates = []
    for u in range(U):
        mine = [s for j, g in enumerate(group_ids) if g % U == u and not skip[j]
                for s in samples[j * G:(j + 1) * G]]
        updates.append(micro_batches(mine, cfg.device_batch_size, pad_id, device))
    # sums: this process's share (summed over processes by the caller); same: values every process
    # computes identically (global counts, the learning rate, gradient norms after the all-reduce).
    sums = {"skipped_groups": float(skip.sum()), "entropy_sum": 0.0, "clipped": 0.0, "kl_old_sum": 0.0,
            "kl_ref_sum": 0.0, "loss": 0.0}
    same = {"trained_tokens": 0.0, "updates": 0, "grad_norm": [],
            "lr": lr_at(step * U, cfg.max_steps * U, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)}
    # The sampling policy's log-probs (and the reference's), before any update, in the very layout
    # the loss will use: the first update's ratio is exactly 1 (the "loss is ~0 at step 1" of every
    # GRPO FAQ: with ratio 1 the loss is minus the token-weighted mean advantage, near 0).
    old, ref = [], []
    model.eval()
    with torch.no_grad():
        for mbs in updates:
            old.append([]), ref.append([])
            for x, y, mask, _ in mbs:
                logp, ent = sequence_logprobs(model, x, y, tok.n_vocab, cfg.temperature, entropy=True)
                old[-1].append(logp)
                sums["entropy_sum"] += float((ent * mask).sum())
                if reference is not None:
                    ref[-1].append(sequence_logprobs(reference, x, y, tok.n_vocab, cfg.temperature))
    model.train()
    for u, mbs in enumerate(updates):
        n_tokens = all_sum(dist, {"n": sum(float(m[2].sum()) for m in mbs)})["n"]
        same["trained_tokens"] += n_tokens
        if n_tokens == 0:  # every group of this update was skipped, on every process: no step
            continue
        opt_step = step * U + u
        lr = lr_at(opt_step, cfg.max_steps * U, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)
        set_lr(opt, lr)
        for m, (x, y, mask, a) in enumerate(mbs):
            logp = sequence_logprobs(model, x, y, tok.n_vocab, cfg.temperature)
            per_token, clipped = clipped_surrogate(logp, old[u][m], a, cfg.eps_low, cfg.eps_high)
            if reference is not None:
                kl_ref = k3(ref[u][m] - logp)  # KL(pi || pi_ref), samples from (nearly) pi
                per_token = per_token + cfg.kl_weight * kl_ref
                sums["kl_ref_sum"] += float((kl_ref.detach() * mask).sum())
            loss = token_level_loss(per_token, mask, n_tokens)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["clipped"] += float((clipped * mask).sum())
            sums["kl_old_sum"] += float((k3(logp.detach() - old[u][m]) * mask).sum())  # KL(pi_old || pi)
        all_sum_grads(model.parameters(), dist)   # the global batch's gradient: losses are divided by global counts
        grad_norm = clip_and_step(model.parameters(), opt, cfg.grad_clip, lambda g: (
            f"step {step}, update {u}: the gradient norm is not finite ({g}); lower --lr"))
        same["updates"] += 1
        same["grad_norm"].append(grad_norm)
    return sums, same


# ------------------------------------------------------------------------------------------------
# What a step logs, and the curves drawn from the log at the end.

# ------------------------------------------------------------------------------------------------
# What a resumed run must share with the run it continues: the prompt stream, the rollouts and the
# update rule. Everything random is a function of (seed, step), so nothing else needs saving.
RESUME_KEYS = ("init_from", "data", "seed", "prefilter_samples", "max_pass_rate", "min_pass_rate", "pool_size",
               "prefilter_max_scan",
               "prompts_per_step",
               "group_size", "gen_groups", "max_new_tokens", "temperature", "top_p", "on_fraction", "format_weight",
               "eps_low", "eps_high", "adv_eps", "kl_weight", "updates_per_rollout", "curriculum",
               "curriculum_sigma", "max_steps", "lr", "warmup_steps", "min_lr_frac", "weight_decay", "adam_eps", "grad_clip")


def main(cfg):
    dist, say = start_stage(cfg, "grpo")   # processes, device, seed
    device, master = dist.device, dist.master
    t_start = time.time()

    tok, model, reference, rows, digest = load_inputs(cfg, device)
    mcfg = model.config
    start_step, state = 0, None
    if cfg.resume:
        model, state = load_for_resume(cfg, mcfg, RESUME_KEYS, cfg.max_steps, (cfg.data, "data_sha256", digest),
                                       paths=("init_from", "data"))
        start_step = state["step"]
    model.to(device)   # no DDP wrapper: train_on_rollouts sums the gradients of variable-length rollouts itself
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, device=device, eps=cfg.adam_eps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), master, append=cfg.resume)
    say(f"{count_params(mcfg):,} params ({cfg.init_from}); {len(rows):,} prompts in {cfg.data}; "
        f"{dist.world_size} process(es) on {device}; {cfg.prompts_per_step} prompts x {cfg.group_size} samples per "
        f"step, {cfg.updates_per_rollout} updates per step; steps {start_step}->{cfg.max_steps}")

    # Prefiltering (a resumed run reads the pool it started with).
    clock = PhaseClock(state["extra"].get("timing") if state is not None else None)
    if state is not None:
        pool = [tuple(p) for p in state["extra"]["pool"]]
    else:
        pool = prefilter_pool(model, tok, rows, cfg, dist, say, log, clock)
    short = check_pool(pool, cfg)
    if short:
        say(short)
    problems = stage_eval_problems(cfg.eval_problems)

    def run_eval(step):
        with clock("eval"):
            row = generation_eval(model, tok, problems, cfg.eval_max_new_tokens, cfg.compile)
            model.train()
        log.log(step=step, **row, **clock.last)
        return row

    if master and problems and start_step == 0:  # where the curves start: the starting model
        say(f"step 0: {describe_eval(run_eval(0))}")

    pool_rate = dict(pool)
    buckets = sorted({rollout_bucket(rows[i], r) for i, r in pool}, key=bucket_order)
    end = min(cfg.max_steps, start_step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    bar = tqdm(range(start_step, end), disable=not master, desc="grpo", initial=start_step, total=cfg.max_steps)
    save = lambda s: master and save_checkpoint(cfg.out_dir, model, opt, s, cfg, tok,  # noqa: E731
                                                extra={"pool": pool, "data_sha256": digest, "timing": clock.totals})
    for step in interruptible(bar, save):   # Ctrl-C: save the last finished step, exit 130
        if master and problems and cfg.eval_interval and step % cfg.eval_interval == 0 and step > start_step:
            bar.write(f"[grpo] step {step}: {describe_eval(run_eval(step))}", file=sys.stderr)
        # 1-2. the step's prompts, then this process's generate calls (chunk c -> process c % world)
        idx, modes, mu = draw_batch(pool, rows, step, cfg)
        model.eval()
        with clock("rollout"):
            samples, group_ids = rollouts(model, tok, rows, pool_rate, idx, modes, step, cfg, dist)
        timed = dict(clock.last)
        # 3-4. rewards, advantages, updates
        with clock("train"):
            sums, same = train_on_rollouts(model, reference, opt, samples, group_ids, step, cfg, dist, tok, device)
        timed.update(clock.last)  # this process's times (processes run their share in parallel)
        sums.update(rollout_sums(samples, buckets, cfg))
        g = all_sum(dist, dict(sums))
        if master and log_due(step, cfg.log_interval, end):
            row = step_row(step, g, same, timed, cfg, [pool_rate[i] for i in idx], modes, buckets, mu,
                           reference is not None)
            log.log(**row)
            bar.set_postfix(acc=f"{row['reward_accuracy']:.3f}", fmt=f"{row['reward_format']:.3f}",
                            skip=row["skipped_groups"], len=f"{row['response_len']:.0f}")
        if ckpt_due(step, cfg.ckpt_interval, end):
            save(step + 1)
    bar.close()
    if master:
        save(end)
        if end == cfg.max_steps and problems:
            say(f"step {end}: {describe_eval(run_eval(end))}")
        log.log(step=end, **{f"total_{k}": v for k, v in clock.totals.items()}, wall_s=time.time() - t_start)
        draw_curves(cfg, read_metrics(log.path), buckets, problems)
        say(f"saved {cfg.out_dir} at step {end}; {clock.describe()}; this invocation {time.time() - t_start:.1f} s")
    teardown_dist(dist)


if __name__ == "__main__":
    run_main(main, GRPOConfig)
