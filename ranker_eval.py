"""
ranker_eval.py: offline evaluation of a new search ranker from the click logs of the current one,
with inverse propensity weighting where the logging propensities are estimated parametrically.

Implements Vinay, Kilaru, Arbour, "Offline Evaluation of Ranked Lists using Parametric Estimation of
Propensities" (SIGIR 2022, arXiv 2206.02470) on top of the click-model estimators of Li et al.,
"Offline Evaluation of Ranking Policies with Click Models" (KDD 2018, arXiv 1804.10488).
Only the paper's abstract and introduction were available; the parametric model used here (a
Plackett-Luce policy over a learned scorer, fitted by ListMLE to the logged rankings) is the natural
reading of the abstract. Every such choice is marked *choice* below.

The question. A search engine logged, per request, the query q, the top-K list A = (a_1..a_K) its
"logging" ranker pi0 showed and the clicks c_1..c_K. How many clicks per list would a *new* ranker h
get,  V(h) = E_q E_{A ~ h(.|q)} sum_k P(click at k | A, q),  without an A/B test?

    naive            logged clicks per list (ignores h: the baseline every estimator must beat)
    list_ips         weight each logged list by h(A|q) / pi0(A|q)            (unbiased, huge variance)
    ip_<source>      item-position IPS: sum_k c_k h(a_k, k|q) / pi0(a_k, k|q) (unbiased under a
                     position-based click model when pi0 > 0 wherever h > 0)
    pbm, pbm_<src>   position-based-model weights sum_k' theta_k' h(d,k') / sum_k' theta_k' pi0(d,k')
    *_sn             self-normalised (divide by the mean weight, per position for ip)
    sources of pi0(d, k | q):
      oracle      the true logging propensities (known only in simulation)
      empirical   per-query frequency of (d at rank k) in the log: zero wherever the logger never
                  put d at k, which is exactly where a *different* ranker puts documents
      parametric  a Plackett-Luce model fitted to the logged rankings (ListMLE), whose rank marginals
                  are smooth and non-zero everywhere: the paper's idea

Run (defaults: a synthetic world, 150 queries of 5-9 documents, top-4 lists, position-based clicks,
10 new rankers x 2 logging temperatures x 4 log sizes x 10 seeds; about 70 s on 2 CPU cores):

    python ranker_eval.py
    python ranker_eval.py --data=MSLR-WEB10K/Fold1/test.txt --max_queries=300 --max_docs=50 --K=5
    python ranker_eval.py --click_model=cascade --temperatures=0.5 --log_sizes=2000,8000
    python ranker_eval.py my_preset.py --reps=3     # preset files (`key = literal` lines) first, as everywhere

Reads: nothing by default; --data=PATH reads a LETOR / SVMlight file (`label qid:ID 1:v ... # c`).
Writes, to --out_dir (default out/ranker/): results.json, results.md and results.png.
"""
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import (ConfigError, UserError, atomic_write, check, check_choice, check_positive, check_range,
                          check_readable, check_writable_dir, run_main)


class LetorError(UserError):
    """A malformed LETOR / SVMlight file: the message names the file and the line."""


# ----------------------------------------------------------------------------------------------
# Configuration: a dataclass of defaults, optional preset files, --key=value overrides
# (configurator.py, the parser every script of the repository uses; it imports nothing else).

@dataclass
class Config:
    data: str = ""                    # LETOR / SVMlight file; empty = built-in synthetic world
    out_dir: str = "out/ranker"
    seed: int = 0
    # synthetic world (ignored with --data)
    n_queries: int = 150
    docs_min: int = 5                 # candidates per query drawn uniformly in [docs_min, docs_max]
    docs_max: int = 9
    n_features: int = 10
    # LETOR (ignored without --data): 0 = keep all
    max_queries: int = 0              # keep the first N queries of the file
    max_docs: int = 0                 # keep a random subset of N documents per query
    # what the user sees and how they click
    K: int = 4                        # length of the shown list
    click_model: str = "pbm"          # pbm | cascade
    examination: str = "1/k"          # pbm examination theta_k: "1/k" or a comma list of >= K probs
    eps: float = 0.1                  # click-if-examined = eps + (1-eps)(2^rel-1)/(2^rel_max-1)
    cascade_stop: float = 1.0         # cascade: probability the user stops after a click
    # rankers
    ltr_steps: int = 150              # full-batch Adam steps of listwise learning-to-rank
    ltr_lr: float = 0.05
    mlp_hidden: int = 16
    prod_feature_frac: float = 0.6    # the production (logging) scorer sees this share of features
    prod_query_frac: float = 0.5      # ... and was trained on this share of the queries
    new_temperature: float = 0.5      # Plackett-Luce temperature of the new rankers; 0 = deterministic
    n_new_rankers: int = 10           # the first N of the candidate table in new_ranker_specs()
    # experiment
    temperatures: str = "1.0,0.25"    # logging temperatures: 1 = stochastic, 0.25 = nearly greedy
    log_sizes: str = "1000,4000,16000,64000"
    reps: int = 10                    # independent logs per (temperature, log size)
    estimators: str = "all"           # comma list of names from ESTIMATORS, or "all"
    clip: float = 0.0                 # cap on every importance weight; 0 = no clipping
    propensity_model: str = "linear"  # scorer of the fitted Plackett-Luce logging model: linear | mlp
    propensity_iters: int = 100       # L-BFGS iterations of the ListMLE fit
    propensity_l2: float = 1e-3       # keeps the fit finite when the logger is nearly deterministic
    exact_max_work: int = 2_000_000   # exact PL marginals when sum_{s<K} C(n,s) * n <= this
    mc_samples: int = 4000            # otherwise Gumbel-top-K samples per query
    plot: bool = True


    def validate(self):
        """Every flag, up front (before the experiment), with errors that name it."""
        if self.data:
            check_readable(self.data, "data")
        check_writable_dir(self.out_dir, "out_dir")
        check_positive(self, "K", "n_queries", "docs_min", "n_features", "mlp_hidden", "ltr_lr", "reps",
                       "propensity_iters", "mc_samples")
        check(self.docs_min <= self.docs_max, "docs_max", self.docs_max, f"must be >= --docs_min={self.docs_min}")
        for name in ("seed", "max_queries", "max_docs", "ltr_steps", "new_temperature", "clip", "propensity_l2",
                     "exact_max_work"):
            check_range(self, name, 0)
        for name in ("eps", "cascade_stop"):
            check_range(self, name, 0, 1)
        for name in ("prod_feature_frac", "prod_query_frac"):
            check_range(self, name, 0, 1, lo_open=True)
        check_choice(self, "click_model", ("pbm", "cascade"))
        check_choice(self, "propensity_model", ("linear", "mlp"))
        check(all(t > 0 for t in _float_list(self, "temperatures")), "temperatures", self.temperatures,
              "logging temperatures must be > 0")
        check(all(n >= 1 and n == int(n) for n in _float_list(self, "log_sizes")), "log_sizes", self.log_sizes,
              "expected positive integers")
        n_specs = len(new_ranker_specs(self, self.n_features))
        check(1 <= self.n_new_rankers <= n_specs, "n_new_rankers", self.n_new_rankers, f"between 1 and {n_specs}")
        examination(self)      # raises on a bad --examination
        estimator_names(self)  # raises on an unknown estimator


def _float_list(cfg, key):
    text = getattr(cfg, key)
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected a comma list of numbers") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"--{key}={text}: expected a non-empty comma list of finite numbers")
    return vals


def examination(cfg):
    """theta_k, k = 1..K: the probability the user looks at rank k (position-based model)."""
    if cfg.examination == "1/k":
        return 1.0 / np.arange(1, cfg.K + 1)
    try:
        theta = np.array([float(v) for v in cfg.examination.split(",")])
    except ValueError:
        raise ConfigError(f"--examination={cfg.examination}: expected '1/k' or a comma list of probabilities") from None
    if len(theta) < cfg.K or not np.all((theta >= 0) & (theta <= 1)):
        raise ConfigError(f"--examination={cfg.examination}: need at least K={cfg.K} probabilities in [0, 1], "
                          f"got {len(theta)}")
    return theta[: cfg.K]


# ----------------------------------------------------------------------------------------------
# Data: a world is a padded batch of queries: features X (Q, N, F), a mask of real documents,
# graded relevance labels. Queries have different numbers of candidates (LETOR: 1 to ~1000).

@dataclass
class World:
    X: np.ndarray        # (Q, N, F) float32, zero on padding
    mask: np.ndarray     # (Q, N) bool, True for a real document
    rel: np.ndarray      # (Q, N) int, graded relevance (0 on padding)
    rel_max: int         # the top grade (4 for MSLR / Yahoo)
    name: str

    def __post_init__(self):
        # the Plackett-Luce code slices logits[:, :n]: real documents must come first in each row
        n = self.mask.sum(1)
        if not np.array_equal(self.mask, np.arange(self.mask.shape[1])[None, :] < n[:, None]):
            raise ValueError("World.mask: each query's real documents must come first (left-aligned)")

    @property
    def n_docs(self):
        return self.mask.sum(1)


def make_synthetic_world(cfg):
    """Features -> graded relevance 0..4. Relevance mixes a linear part, an interaction (so an MLP
    can beat a linear ranker) and noise; grades by global quantiles give the skew of real data
    (about half the documents irrelevant, ~3% perfect)."""
    rng = np.random.default_rng(cfg.seed)
    Q, Nmax, Fdim = cfg.n_queries, cfg.docs_max, cfg.n_features
    n = rng.integers(cfg.docs_min, cfg.docs_max + 1, size=Q)
    mask = np.arange(Nmax)[None, :] < n[:, None]
    X = rng.standard_normal((Q, Nmax, Fdim)) + 0.5 * rng.standard_normal((Q, 1, Fdim))  # query offset
    beta = rng.standard_normal(Fdim) * np.linspace(1.0, 0.2, Fdim)  # early features matter more
    latent = X @ beta + 0.8 * X[..., 0] * X[..., 1] + 0.7 * rng.standard_normal((Q, Nmax))
    cuts = np.quantile(latent[mask], [0.5, 0.75, 0.9, 0.97])
    rel = np.searchsorted(cuts, latent).astype(np.int64)
    X = np.where(mask[..., None], X, 0.0).astype(np.float32)
    rel = np.where(mask, rel, 0)
    return World(X=X, mask=mask, rel=rel, rel_max=4, name="synthetic")


def read_letor(path, max_queries=0):
    """Parse a LETOR / SVMlight ranking file: `label qid:ID idx:value ... # comment` per line.
    Returns [(qid, labels (n,), [(feature indices, values) per document])] in file order, plus the
    feature count. Every malformed line raises LetorError (a ValueError) naming the file and the line number.
    max_queries > 0 stops reading when query max_queries+1 starts (LETOR files keep a query's lines
    together), so a 1.2M-line MSLR fold need not be parsed to use its first few hundred queries.
    Rows are kept as small arrays, not dicts: 136 MSLR features x 240k rows as dicts is ~3 GB."""
    queries, order = {}, []
    n_features = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LetorError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            tokens = line.split()
            try:
                label = float(tokens[0])
            except ValueError:
                raise LetorError(f"{where}: label {tokens[0]!r} is not a number")
            if not math.isfinite(label) or label < 0 or label != int(label):
                raise LetorError(f"{where}: label {tokens[0]!r} must be a non-negative integer grade")
            if len(tokens) < 2 or not tokens[1].startswith("qid:") or len(tokens[1]) == 4:
                got = tokens[1] if len(tokens) > 1 else "end of line"
                raise LetorError(f"{where}: expected 'qid:<id>' as the second field, got {got!r}")
            qid = tokens[1][4:]
            if max_queries > 0 and qid not in queries and len(order) == max_queries:
                break
            feats = {}
            for tok in tokens[2:]:
                idx, sep, val = tok.partition(":")
                try:
                    i, v = int(idx), float(val)
                except ValueError:
                    i = v = None
                if not sep or i is None:
                    raise LetorError(f"{where}: feature {tok!r} is not 'index:value'")
                if i < 1:
                    raise LetorError(f"{where}: feature index {i} must be >= 1")
                if not math.isfinite(v):
                    raise LetorError(f"{where}: feature {tok!r} is not finite")
                if i in feats:
                    raise LetorError(f"{where}: feature index {i} repeated")
                feats[i] = v
                n_features = max(n_features, i)
            if qid not in queries:
                queries[qid] = ([], [])
                order.append(qid)
            queries[qid][0].append(int(label))
            queries[qid][1].append((np.fromiter(feats.keys(), np.int32, len(feats)),
                                    np.fromiter(feats.values(), np.float32, len(feats))))
    if not order:
        raise LetorError(f"{path}: no data lines")
    return [(q, np.array(queries[q][0]), queries[q][1]) for q in order], n_features


def load_letor_world(path, cfg):
    """LETOR file -> World. Features are z-scored over all documents (*choice*: MSLR features span
    0..1e5, so raw values would make the learning-to-rank step size meaningless)."""
    rng = np.random.default_rng(cfg.seed)
    queries, Fdim = read_letor(path, cfg.max_queries)
    kept = []
    for qid, labels, rows in queries:
        idx = np.arange(len(labels))
        if cfg.max_docs > 0 and len(idx) > cfg.max_docs:
            idx = np.sort(rng.choice(len(idx), cfg.max_docs, replace=False))
        kept.append((labels[idx], [rows[i] for i in idx]))
    Q, Nmax = len(kept), max(len(l) for l, _ in kept)
    X = np.zeros((Q, Nmax, max(Fdim, 1)), np.float32)
    mask = np.zeros((Q, Nmax), bool)
    rel = np.zeros((Q, Nmax), np.int64)
    for q, (labels, rows) in enumerate(kept):
        mask[q, : len(labels)] = True
        rel[q, : len(labels)] = labels
        for d, (fi, fv) in enumerate(rows):
            X[q, d, fi - 1] = fv
    real = X[mask]
    mu, sd = real.mean(0), real.std(0)
    X = np.where(mask[..., None], (X - mu) / np.where(sd > 0, sd, 1.0), 0.0).astype(np.float32)
    return World(X=X, mask=mask, rel=rel, rel_max=max(int(rel.max()), 1), name=os.path.basename(path))


# ----------------------------------------------------------------------------------------------
# Rankers: linear or small-MLP scorers over (a subset of) the features, trained on relevance labels
# with a listwise loss. A scorer becomes a *policy* through Plackett-Luce: at each rank pick a
# remaining document with probability proportional to exp(score / temperature).

class Scorer(torch.nn.Module):
    def __init__(self, n_in, kind, hidden, feature_idx):
        super().__init__()
        self.register_buffer("feature_idx", torch.as_tensor(feature_idx, dtype=torch.long))
        if kind == "linear":
            self.net = torch.nn.Linear(n_in, 1)
        elif kind == "mlp":
            self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 1))
        else:
            raise ValueError(f"scorer kind {kind!r}: expected linear or mlp")

    def forward(self, X):  # (..., F) -> (...)
        return self.net(X[..., self.feature_idx]).squeeze(-1)


def listnet_loss(scores, rel, mask):
    """ListNet (Cao et al. 2007): cross-entropy between softmax(relevance) and softmax(scores)."""
    s = scores.masked_fill(~mask, -1e9)
    target = torch.softmax(rel.float().masked_fill(~mask, -1e9), -1)
    return -(target * torch.log_softmax(s, -1)).sum(-1).mean()


def plackett_luce_nll(scores, order, valid):
    """Negative log-likelihood of observed (prefix) rankings under Plackett-Luce (ListMLE, Xia et al.
    2008). scores (B, N) with -inf on padding; order (B, L) document indices; valid (B, L) bool."""
    # Placed and padded documents get a large *finite* negative score: with -inf, a row with nothing
    # left (a list shorter than K) has logsumexp -inf and a NaN gradient, even where it is masked.
    gone = ~torch.isfinite(scores)
    placed = torch.zeros_like(scores, dtype=torch.bool)
    nll = scores.new_zeros(())
    for k in range(order.shape[1]):
        s = scores.masked_fill(placed | gone, -1e30)
        pick = order[:, k].clamp(min=0)
        step = torch.logsumexp(s, -1) - s.gather(1, pick[:, None]).squeeze(1)
        nll = nll + torch.where(valid[:, k], step, torch.zeros_like(step)).sum()
        placed = placed | (F.one_hot(pick, scores.shape[1]).bool() & valid[:, k: k + 1])
    return nll / valid.shape[0]


def listmle_loss(scores, rel, mask, gen):
    """ListMLE on relevance: the likelihood of a relevance-sorted order, ties broken at random."""
    noise = torch.rand(rel.shape, generator=gen)
    key = (rel.float() + 0.5 * noise).masked_fill(~mask, -1.0)
    order = key.argsort(-1, descending=True)
    valid = mask.gather(1, order)
    return plackett_luce_nll(scores.masked_fill(~mask, float("-inf")), order, valid)


def train_scorer(world, kind, loss, feature_idx, query_idx, cfg, seed):
    """Full-batch Adam on a listwise loss over the chosen queries. Returns scores (Q, N) float64."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Scorer(len(feature_idx), kind, cfg.mlp_hidden, feature_idx)
    X = torch.from_numpy(world.X[query_idx])
    rel, mask = torch.from_numpy(world.rel[query_idx]), torch.from_numpy(world.mask[query_idx])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ltr_lr, weight_decay=1e-4)
    for _ in range(cfg.ltr_steps):
        s = model(X)
        lossv = listnet_loss(s, rel, mask) if loss == "listnet" else listmle_loss(s, rel, mask, gen)
        opt.zero_grad()
        lossv.backward()
        opt.step()
    with torch.no_grad():
        return model(torch.from_numpy(world.X)).double().numpy()


@dataclass
class Policy:
    """A ranking policy on a world: Plackett-Luce over `logits` (Q, N; -inf on padding), or, when
    deterministic, the argsort of the logits."""
    name: str
    logits: np.ndarray
    deterministic: bool = False


def policy_from_scores(name, scores, mask, temperature):
    """Scores are z-scored over all real documents first, so that a temperature means the same for
    every scorer (*choice*): logits = z / T; T -> 0 is the greedy ranking."""
    z = (scores - scores[mask].mean()) / max(scores[mask].std(), 1e-12)
    if temperature == 0:
        return Policy(name, np.where(mask, z, -np.inf), deterministic=True)
    return Policy(name, np.where(mask, z / temperature, -np.inf))


def new_ranker_specs(cfg, Fdim):
    """The candidate new rankers: other models, losses, feature sets and training subsets, plus one
    untrained random linear scorer (a bad ranker, so the true values spread out). Fdim: the world's
    feature count (from the LETOR file with --data, else --n_features)."""
    half = max(Fdim // 2, 1)
    return [
        dict(name="linear_listnet", kind="linear", loss="listnet", features="all", queries=1.0),
        dict(name="linear_listmle", kind="linear", loss="listmle", features="all", queries=1.0),
        dict(name="mlp_listnet", kind="mlp", loss="listnet", features="all", queries=1.0),
        dict(name="mlp_listmle", kind="mlp", loss="listmle", features="all", queries=1.0),
        dict(name="linear_first_half", kind="linear", loss="listnet", features=("first", half), queries=1.0),
        dict(name="linear_second_half", kind="linear", loss="listnet", features=("last", half), queries=1.0),
        dict(name="linear_10pct_queries", kind="linear", loss="listnet", features="all", queries=0.1),
        dict(name="mlp_random_features", kind="mlp", loss="listnet", features=("random", 0.5), queries=1.0),
        dict(name="linear_prod_features", kind="linear", loss="listmle", features="prod", queries=1.0),
        dict(name="random_linear", kind="linear", loss="none", features="all", queries=1.0),
    ]


def build_rankers(world, cfg):
    """Train the production scorer (what the logger ranks by) and the candidate new rankers.
    Returns (production scores (Q, N), [Policy] of the new rankers at cfg.new_temperature)."""
    rng = np.random.default_rng(cfg.seed + 1)
    Q, Fdim = world.X.shape[0], world.X.shape[2]
    n_prod = max(1, int(round(cfg.prod_feature_frac * Fdim)))
    prod_feats = np.arange(n_prod)
    prod_queries = np.sort(rng.permutation(Q)[: max(1, int(round(cfg.prod_query_frac * Q)))])
    prod = train_scorer(world, "linear", "listnet", prod_feats, prod_queries, cfg, cfg.seed + 2)
    policies = []
    for i, spec in enumerate(new_ranker_specs(cfg, Fdim)[: cfg.n_new_rankers]):
        f = spec["features"]
        if f == "all":
            feats = np.arange(Fdim)
        elif f == "prod":
            feats = prod_feats
        elif f[0] == "first":
            feats = np.arange(min(f[1], Fdim))
        elif f[0] == "last":
            feats = np.arange(Fdim - min(f[1], Fdim), Fdim)
        else:
            feats = np.sort(rng.permutation(Fdim)[: max(1, int(round(f[1] * Fdim)))])
        queries = np.sort(rng.permutation(Q)[: max(1, int(round(spec["queries"] * Q)))])
        if spec["loss"] == "none":  # untrained: random weights
            w = rng.standard_normal(len(feats))
            scores = world.X[..., feats].astype(np.float64) @ w
        else:
            scores = train_scorer(world, spec["kind"], spec["loss"], feats, queries, cfg, cfg.seed + 10 + i)
        policies.append(policy_from_scores(spec["name"], scores, world.mask, cfg.new_temperature))
    return prod, policies


# ----------------------------------------------------------------------------------------------
# Plackett-Luce rank marginals P(d at rank k | q), k < K: exact for short lists, sampled otherwise.
#
# Exact: the probability that a *set* S of size s fills ranks 1..s obeys the recursion
#   P(S) = sum_{j in S} P(S \ j) * w_j / W(not in S \ j),        w = exp(logits),
# and   P(d at rank s+1) = sum_{|S|=s, d not in S} P(S) * w_d / W(not in S).
# Only sets of size < K are needed: sum_{s<K} C(n, s) of them (93 for n = 8, K = 4) instead of the
# n!/(n-K)! ordered prefixes (1680).

def _binom_table(n):
    C = np.zeros((n + 1, n + 2), np.int64)
    for i in range(n + 1):
        C[i, 0] = 1
        for j in range(1, i + 1):
            C[i, j] = C[i - 1, j - 1] + C[i - 1, j]
    return C


_LAYER_CACHE = {}


def _subset_layers(n, K):
    """For s = 0..min(K, n)-1: the size-s subsets of range(n) as a (C_s, s) array, their
    complement indicator (C_s, n) and, for each member position i, the row of S minus S[i] in
    layer s-1 (found through the colexicographic rank, sum_i C(S_i, i+1))."""
    key = (n, K)
    if key in _LAYER_CACHE:
        return _LAYER_CACHE[key]
    C = _binom_table(n)
    layers, inverse = [], []
    for s in range(min(K, n)):
        combos = list(itertools.combinations(range(n), s))
        S = np.array(combos, np.int64).reshape(len(combos), s)
        colex = sum(C[S[:, i], i + 1] for i in range(s)) if s else np.zeros(len(S), np.int64)
        inv = np.empty(len(S), np.int64)
        inv[colex] = np.arange(len(S))
        parents = []
        for i in range(s):
            rest = np.delete(S, i, axis=1)
            rank = sum(C[rest[:, m], m + 1] for m in range(s - 1)) if s > 1 else np.zeros(len(S), np.int64)
            parents.append(inverse[s - 1][rank])
        notin = np.ones((len(S), n))
        for i in range(s):
            notin[np.arange(len(S)), S[:, i]] = 0.0
        layers.append((S, notin, parents))
        inverse.append(inv)
    _LAYER_CACHE[key] = layers
    return layers


def exact_work(n, K):
    return sum(math.comb(n, s) for s in range(min(K, n))) * n


def _weights(logits):
    """exp(logits - max), with logits floored 700 below the max so that no real document's weight
    underflows to 0 (which would make 'the remaining mass' 0/0 for a nearly greedy policy)."""
    z = logits - logits.max(-1, keepdims=True)
    return np.exp(np.maximum(z, -700.0))


def _prefix_dp(logits, K, factor=None):
    """Run the set recursion for a batch of queries with the same n (logits (B, n), all finite).
    Yields (s, R_s, notin_s, w) with R_s[b, S] = P(S fills ranks 1..s) / W(not in S); the caller
    turns R into marginals or values. `factor` (B, n) multiplies a path's probability by
    factor[a_j] for every placed document (the cascade model's 'did not stop' probability)."""
    w = _weights(logits)
    wf = w if factor is None else w * factor
    P = np.ones((w.shape[0], 1))
    for s, (S, notin, parents) in enumerate(_subset_layers(w.shape[1], K)):
        if s > 0:
            Pn = np.zeros((w.shape[0], len(S)))
            for i in range(s):
                par = parents[i]
                Pn += P[:, par] * wf[:, S[:, i]] / rem[:, par]
            P = Pn
        rem = w @ notin.T   # remaining mass as a sum of positives: no cancellation when nearly greedy
        yield s, P / rem, notin, w


def pl_marginals_exact(logits, K):
    """Exact P(d at rank k) for a batch of same-size queries: logits (B, n) -> (B, n, K)."""
    B, n = logits.shape
    out = np.zeros((B, n, K))
    for s, R, notin, w in _prefix_dp(logits, K):
        out[:, :, s] = (R @ notin) * w
    return out


def sample_pl(logits, K, n_samples, rng):
    """Gumbel-top-K: argsort(logits + Gumbel noise) is an exact Plackett-Luce sample.
    logits (B, N) with -inf on padding -> (B, n_samples, K) doc indices, -1 past a short list."""
    g = rng.gumbel(size=(logits.shape[0], n_samples, logits.shape[1]))
    keys = logits[:, None, :] + g
    k = min(K, logits.shape[1])
    top = np.argpartition(-keys, k - 1, axis=-1)[..., :k] if k < logits.shape[1] else \
        np.broadcast_to(np.arange(logits.shape[1]), keys.shape).copy()
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, -1), -1), -1)
    n = np.isfinite(logits).sum(-1)
    top = np.where(np.arange(k)[None, None, :] < n[:, None, None], top, -1)
    if k < K:
        top = np.concatenate([top, -np.ones(top.shape[:2] + (K - k,), np.int64)], -1)
    return top


def pl_marginals(policy, K, cfg, rng):
    """P(d at rank k | q) for every query of a policy: (Q, N, K), zero on padding and past short
    lists. Exact (set recursion) when the query is small enough, else Gumbel-top-K Monte Carlo."""
    logits = policy.logits
    Q, N = logits.shape
    n = np.isfinite(logits).sum(1)
    out = np.zeros((Q, N, K))
    if policy.deterministic:
        order = np.argsort(-logits, axis=1, kind="stable")
        for k in range(min(K, N)):
            ok = k < n
            out[np.arange(Q)[ok], order[ok, k], k] = 1.0
        return out
    for size in np.unique(n):
        qs = np.nonzero(n == size)[0]
        if exact_work(size, K) <= cfg.exact_max_work:
            out[qs, :size, :] = pl_marginals_exact(logits[qs, :size], K)
        else:
            for start in range(0, len(qs), 16):  # batches keep the (16, S, N) noise in memory
                qb = qs[start: start + 16]
                top = sample_pl(logits[qb], K, cfg.mc_samples, rng)
                for k in range(K):
                    d = top[:, :, k]
                    cnt = np.zeros((len(qb), N + 1))
                    np.add.at(cnt, (np.repeat(np.arange(len(qb)), d.shape[1]), d.reshape(-1)), 1.0)
                    out[qb, :, k] = cnt[:, :N] / cfg.mc_samples   # -1 lands in the last column
            # *choice*: a placement never sampled has probability below ~1/S, not 0; floor real
            # (document, rank) pairs at 0.5/S so a logged pair never gets an infinite IPS weight
            n_k = np.minimum(size, K)
            real = (np.arange(N)[None, :, None] < size) & (np.arange(K)[None, None, :] < n_k)
            out[qs] = np.where(real, np.maximum(out[qs], 0.5 / cfg.mc_samples), 0.0)
    return out


def pl_list_prob(policy, q, A):
    """Probability that the policy shows exactly the prefix A (T, K; -1 past a short list) for
    queries q (T,)."""
    logits = policy.logits[q]
    if policy.deterministic:
        order = np.argsort(-logits, axis=1, kind="stable")[:, : A.shape[1]]
        shown = A >= 0
        return np.all(np.where(shown, order == A, True), axis=1).astype(np.float64)
    real = np.isfinite(logits)
    w = np.where(real, _weights(logits), 0.0)
    placed = np.zeros(w.shape, bool)
    logp = np.zeros(len(q))
    rows = np.arange(len(q))
    for k in range(A.shape[1]):
        shown = A[:, k] >= 0
        d = A[:, k].clip(min=0)
        rem = np.where(placed, 0.0, w).sum(1)      # summed afresh: no cancellation when nearly greedy
        logp += np.where(shown, np.log(np.where(shown, w[rows, d], 1.0)) - np.log(np.where(shown, rem, 1.0)), 0.0)
        placed[rows[shown], d[shown]] = True
    return np.exp(logp)


# ----------------------------------------------------------------------------------------------
# Clicks: position-based model (click = examined(k) and attracted(d)) and cascade model (scan from
# the top, click with the attraction probability, stop after a click with probability cascade_stop).
# Attraction: eps + (1-eps) (2^rel - 1) / (2^rel_max - 1), the ULTRA / Open Bandit convention.

def attraction(world, cfg):
    r = cfg.eps + (1 - cfg.eps) * (2.0 ** world.rel - 1) / (2.0 ** world.rel_max - 1)
    return np.where(world.mask, r, 0.0)


def simulate_clicks(world, q, A, cfg, rng):
    """Click flags (T, K) for shown lists A (T, K) of queries q."""
    r = np.take_along_axis(attraction(world, cfg)[q], A.clip(min=0), 1) * (A >= 0)
    if cfg.click_model == "pbm":
        return (rng.random(A.shape) < examination(cfg)[None, :] * r).astype(np.float64)
    clicks = np.zeros(A.shape)
    looking = np.ones(len(q), bool)
    for k in range(A.shape[1]):
        clicks[:, k] = looking & (rng.random(len(q)) < r[:, k])
        looking &= ~((clicks[:, k] > 0) & (rng.random(len(q)) < cfg.cascade_stop))
    return clicks


def true_value(world, policy, marg, cfg, rng):
    """V(policy): expected clicks per list, queries uniform. Position-based: exact from the rank
    marginals (sum_{d,k} P(d at k) theta_k r_d). Cascade: the list matters as a whole, so the set
    recursion carries the 'has not stopped yet' probability prod (1 - stop * r) of the placed
    documents; queries too large for it are averaged over Gumbel samples of whole lists."""
    r = attraction(world, cfg)
    if cfg.click_model == "pbm":
        return float((marg * r[:, :, None] * examination(cfg)[None, None, :]).sum((1, 2)).mean())
    Q, K = world.X.shape[0], cfg.K
    n = world.n_docs
    vals = np.zeros(Q)

    def cascade_of_lists(qs, A):  # expected clicks of given lists (L, K)
        rr = np.take_along_axis(r[qs], A.clip(min=0), 1) * (A >= 0)
        cont = np.cumprod(1 - cfg.cascade_stop * rr, 1)
        seen = np.concatenate([np.ones((len(qs), 1)), cont[:, :-1]], 1)
        return (seen * rr).sum(1)

    if policy.deterministic:
        A = np.argsort(-policy.logits, 1, kind="stable")[:, :K]
        A = np.where(np.arange(A.shape[1])[None, :] < n[:, None], A, -1)
        return float(cascade_of_lists(np.arange(Q), A).mean())
    for size in np.unique(n):
        qs = np.nonzero(n == size)[0]
        if exact_work(size, K) <= cfg.exact_max_work:
            rs = r[qs, :size]
            for s, R, notin, w in _prefix_dp(policy.logits[qs, :size], K, factor=1 - cfg.cascade_stop * rs):
                vals[qs] += (R * ((w * rs) @ notin.T)).sum(1)
        else:
            for start in range(0, len(qs), 16):  # batches keep the (16, S, N) noise in memory
                qb = qs[start: start + 16]
                lists = sample_pl(policy.logits[qb], K, cfg.mc_samples, rng).reshape(-1, K)
                v = cascade_of_lists(np.repeat(qb, cfg.mc_samples), lists)
                vals[qb] = v.reshape(len(qb), cfg.mc_samples).mean(1)
    return float(vals.mean())


# ----------------------------------------------------------------------------------------------
# Logs and logging propensities.

@dataclass
class Logs:
    q: np.ndarray       # (T,) query of each logged impression
    A: np.ndarray       # (T, K) shown documents, -1 past a short list
    clicks: np.ndarray  # (T, K) 0/1


def sample_logs(world, logger, n, cfg, rng):
    """n impressions: a uniform query, a Plackett-Luce top-K list from the logger, simulated clicks."""
    q = rng.integers(0, world.X.shape[0], size=n)
    A = np.zeros((n, cfg.K), np.int64)
    for qq in np.unique(q):  # one Gumbel draw per impression, grouped by query
        idx = np.nonzero(q == qq)[0]
        A[idx] = sample_pl(logger.logits[qq: qq + 1], cfg.K, len(idx), rng)[0]
    return Logs(q=q, A=A, clicks=simulate_clicks(world, q, A, cfg, rng))


def empirical_propensities(logs, Q, N, K):
    """Per-query frequency of (d at rank k): count(q, d, k) / count(q). Zero for every placement the
    logger never made, so an IPS estimate silently drops the new ranker's mass there."""
    cnt = np.zeros((Q, N + 1, K))
    for k in range(K):
        np.add.at(cnt, (logs.q, logs.A[:, k], k), 1.0)   # -1 lands in the extra last row
    per_q = np.bincount(logs.q, minlength=Q).astype(np.float64)
    return cnt[:, :N] / np.maximum(per_q, 1)[:, None, None]


def fit_logging_policy(world, logs, cfg, seed):
    """The paper's parametric propensities (*choice* of model): a Plackett-Luce policy whose logits
    are a linear (or small-MLP) function of *all* query-document features, fitted by maximum
    likelihood on the logged top-K orderings (ListMLE on prefixes) with full-batch L-BFGS plus a small
    L2 penalty. A linear model is well specified here when the logger is Plackett-Luce over a linear
    production scorer (which it is in the synthetic world)."""
    torch.manual_seed(seed)
    Fdim = world.X.shape[2]
    model = Scorer(Fdim, cfg.propensity_model, cfg.mlp_hidden, np.arange(Fdim)).double()
    X = torch.from_numpy(world.X).double()
    mask = torch.from_numpy(world.mask)
    q = torch.from_numpy(logs.q)
    order = torch.from_numpy(logs.A)
    valid = order >= 0
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=cfg.propensity_iters,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        s = model(X).masked_fill(~mask, float("-inf"))
        loss = plackett_luce_nll(s[q], order, valid)
        loss = loss + cfg.propensity_l2 * sum((p ** 2).sum() for n_, p in model.named_parameters()
                                              if "weight" in n_)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = model(X).masked_fill(~mask, float("-inf")).numpy()
    return Policy("fitted_logger", logits)


# ----------------------------------------------------------------------------------------------
# Estimators of V(h) from the logs. Each returns one estimate per new ranker.

ESTIMATORS = ["naive", "list_ips", "list_ips_sn", "ip_oracle", "ip_oracle_sn", "ip_empirical",
              "ip_empirical_sn", "ip_parametric", "ip_parametric_sn", "pbm", "pbm_empirical",
              "pbm_parametric"]


def estimator_names(cfg):
    if cfg.estimators == "all":
        return list(ESTIMATORS)
    names = [e.strip() for e in cfg.estimators.split(",") if e.strip()]
    bad = [e for e in names if e not in ESTIMATORS]
    if bad or not names:
        raise ConfigError(f"--estimators={cfg.estimators}: unknown {bad}; valid: all or a comma list of "
                          f"{', '.join(ESTIMATORS)}")
    return names


def _clip(w, clip):
    return np.minimum(w, clip) if clip > 0 else w


def ip_estimate(logs, h_at, p_at, clip=0.0, self_normalise=False):
    """Item-position IPS. h_at, p_at (R, T, K) or (T, K): new-ranker and logging propensities of the
    logged (document, rank) pairs. Self-normalised: per rank, sum_t c w / sum_t w (each term <= 1, so
    the estimate lies in [0, K]). E[w] = sum_d h(d, k) = 1 per rank and list; a query with fewer
    than K documents leaves rank k empty under every ranker, and that empty placement counts with
    weight 1 (h = pi0 = 1) and no click, else the normaliser would undercount those lists."""
    shown = logs.A >= 0
    w = np.where(shown, _clip(h_at / np.where(shown, p_at, 1.0), clip), 0.0)
    cw = (logs.clicks * w).sum(-2)
    if not self_normalise:
        return cw.sum(-1) / len(logs.q)
    tot = w.sum(-2) + (~shown).sum(-2)
    return np.where(tot > 0, cw / np.where(tot > 0, tot, 1.0), 0.0).sum(-1)


def list_ips_estimate(logs, h_list, p_list, clip=0.0, self_normalise=False):
    """Whole-list IPS: weight h(A|q)/pi0(A|q) on each logged list's click count."""
    w = _clip(h_list / p_list, clip)
    c = logs.clicks.sum(1)
    if not self_normalise:
        return (w * c).mean(-1)
    tot = w.sum(-1)
    return np.where(tot > 0, (w * c).sum(-1) / np.where(tot > 0, tot, 1.0), 0.0)


def pbm_estimate(logs, h_marg, p_marg, theta, clip=0.0):
    """Position-based estimator (Li et al. 2018): a click on d counts with weight
    sum_k theta_k h(d,k) / sum_k theta_k pi0(d,k); unbiased under the position-based model whenever
    the logger shows d at *some* rank, a much weaker condition than item-position IPS needs.
    Examination theta is taken as known (*choice*; in practice it is estimated, e.g. by EM)."""
    hd = (h_marg * theta).sum(-1)        # (R, Q, N)
    pd = (p_marg * theta).sum(-1)        # (Q, N)
    A = logs.A.clip(min=0)
    h_at = hd[:, logs.q[:, None], A]     # (R, T, K)
    p_at = pd[logs.q[:, None], A]
    shown = logs.A >= 0
    w = np.where(shown, _clip(h_at / np.where(shown, p_at, 1.0), clip), 0.0)
    return (logs.clicks * w).sum((-1, -2)) / len(logs.q)


def estimate_all(names, logs, H_marg, h_policies, oracle, oracle_marg, emp_marg, par_marg, theta, clip):
    """All requested estimates for every new ranker: {name: (R,) array}."""
    A = logs.A.clip(min=0)
    K = logs.A.shape[1]
    ks = np.arange(K)[None, :]

    def at(marg):  # propensity of each logged (doc, rank): (..., T, K)
        return marg[..., logs.q[:, None], A, ks]

    h_at = at(H_marg)
    out = {}
    if "naive" in names:
        out["naive"] = np.full(len(h_policies), logs.clicks.sum(1).mean())
    if "list_ips" in names or "list_ips_sn" in names:
        p_list = pl_list_prob(oracle, logs.q, logs.A)
        h_list = np.stack([pl_list_prob(h, logs.q, logs.A) for h in h_policies])
        for sn in (False, True):
            name = "list_ips_sn" if sn else "list_ips"
            if name in names:
                out[name] = list_ips_estimate(logs, h_list, p_list, clip, sn)
    for source, marg in (("oracle", oracle_marg), ("empirical", emp_marg), ("parametric", par_marg)):
        for sn in (False, True):
            name = f"ip_{source}" + ("_sn" if sn else "")
            if name in names:
                out[name] = ip_estimate(logs, h_at, at(marg), clip, sn)
        name = "pbm" if source == "oracle" else f"pbm_{source}"
        if name in names:
            out[name] = pbm_estimate(logs, H_marg, marg, theta, clip)
    return out


def kendall_tau(x, y):
    """Kendall's tau-a between two score vectors: (concordant - discordant) / pairs."""
    x, y = np.asarray(x), np.asarray(y)
    i, j = np.triu_indices(len(x), 1)
    return float((np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])).sum() / max(len(i), 1))


# ----------------------------------------------------------------------------------------------
# The experiment: new rankers x logging temperatures x log sizes x seeds.

def run_experiment(cfg, world=None, show_progress=True):
    # The tensors here are tiny (150 queries x 9 documents): with 2 threads, synchronising them
    # costs more than the work, and on a shared 2-core machine one run took 29 s instead of 3 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_experiment(cfg, world, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(cfg, world, show_progress):
    t0 = time.time()
    if world is None:
        world = load_letor_world(cfg.data, cfg) if cfg.data else make_synthetic_world(cfg)
    Q, N = world.mask.shape
    K, theta = cfg.K, examination(cfg)
    names = estimator_names(cfg)
    rng = np.random.default_rng(cfg.seed + 3)
    prod, h_policies = build_rankers(world, cfg)
    H_marg = np.stack([pl_marginals(h, K, cfg, rng) for h in h_policies])            # (R, Q, N, K)
    V = np.array([true_value(world, h, m, cfg, rng) for h, m in zip(h_policies, H_marg)])
    temps = _float_list(cfg, "temperatures")
    sizes = [int(n) for n in _float_list(cfg, "log_sizes")]
    rows, errs = [], {e: [] for e in names}
    taus = {e: [] for e in names}
    logger_values = {}
    bar = tqdm(total=len(temps) * len(sizes) * cfg.reps, desc="logs", disable=not show_progress)
    for T in temps:
        oracle = policy_from_scores(f"logger_T{T}", prod, world.mask, T)
        oracle_marg = pl_marginals(oracle, K, cfg, rng)
        logger_values[str(T)] = true_value(world, oracle, oracle_marg, cfg, rng)
        for n in sizes:
            cond = {e: [] for e in names}
            unseen, par_err, emp_err = [], [], []
            for rep in range(cfg.reps):
                lrng = np.random.default_rng([cfg.seed, int(T * 1000), n, rep])
                logs = sample_logs(world, oracle, n, cfg, lrng)
                emp = empirical_propensities(logs, Q, N, K)
                fitted = fit_logging_policy(world, logs, cfg, cfg.seed + rep)
                par = pl_marginals(fitted, K, cfg, rng)
                est = estimate_all(names, logs, H_marg, h_policies, oracle, oracle_marg, emp, par, theta, cfg.clip)
                for e in names:
                    cond[e].append(est[e])
                    errs[e].append(est[e] - V)
                    taus[e].append(kendall_tau(est[e], V))
                # how much of the new rankers' placement mass the log never showed (per list)
                unseen.append(float((H_marg * (emp == 0)).sum((2, 3)).mean() / K))
                real = world.mask[:, :, None] & (np.arange(K)[None, None, :] < world.n_docs[:, None, None])
                par_err.append(float(np.abs(par - oracle_marg)[real].mean()))
                emp_err.append(float(np.abs(emp - oracle_marg)[real].mean()))
                bar.update(1)
            row = dict(temperature=T, log_size=n, unseen_mass=float(np.mean(unseen)),
                       propensity_mae_parametric=float(np.mean(par_err)),
                       propensity_mae_empirical=float(np.mean(emp_err)), estimators={})
            for e in names:
                est = np.array(cond[e])                            # (reps, R)
                row["estimators"][e] = dict(
                    mean_rel_error=float((np.abs(est - V) / V).mean()),
                    rmse=float(np.sqrt(((est - V) ** 2).mean())),
                    kendall_tau=float(np.mean([kendall_tau(x, V) for x in est])))
            rows.append(row)
    bar.close()
    summary = {}
    for e in names:
        err = np.array(errs[e])                                    # (conditions*reps, R)
        summary[e] = dict(mean_rel_error=float((np.abs(err) / V).mean()),
                          rmse=float(np.sqrt((err ** 2).mean())))
    return dict(
        config=asdict(cfg), world=dict(name=world.name, queries=int(Q), max_docs=int(N),
                                      mean_docs=float(world.n_docs.mean()), features=int(world.X.shape[2])),
        new_rankers={h.name: float(v) for h, v in zip(h_policies, V)},
        logger_values=logger_values,
        estimators=summary,
        kendall_tau={e: float(np.mean(taus[e])) for e in names},
        by_condition=rows,
        seconds=time.time() - t0)


def markdown(res):
    lines = [f"# Offline ranker evaluation ({res['world']['name']}, {res['world']['queries']} queries, "
             f"K={res['config']['K']}, {res['config']['click_model']} clicks)", "",
             "| estimator | mean rel. error | RMSE | Kendall tau |", "|---|---|---|---|"]
    for e, m in sorted(res["estimators"].items(), key=lambda kv: kv[1]["mean_rel_error"]):
        lines.append(f"| {e} | {m['mean_rel_error']:.4f} | {m['rmse']:.4f} | {res['kendall_tau'][e]:.3f} |")
    names = [e for e in ("naive", "ip_oracle", "ip_empirical", "ip_parametric", "pbm") if e in res["estimators"]]
    lines += ["", "Mean relative error per condition (unseen = share of the new rankers' placements "
              "the log never showed):", "",
              "| logging T | log size | unseen | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for r in res["by_condition"]:
        lines.append(f"| {r['temperature']} | {r['log_size']} | {r['unseen_mass']:.3f} | " +
                     " | ".join(f"{r['estimators'][e]['mean_rel_error']:.4f}" for e in names) + " |")
    lines += ["", "True values: " + ", ".join(f"{k} {v:.4f}" for k, v in res["new_rankers"].items())]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    temps = sorted({r["temperature"] for r in res["by_condition"]}, reverse=True)
    names = list(res["estimators"])
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps) + 2, 4.2), squeeze=False)
    for ax, T in zip(axes[0], temps):
        rows = [r for r in res["by_condition"] if r["temperature"] == T]
        for i, e in enumerate(names):   # the estimators the issue is about: solid and thick
            main = e in ("ip_parametric", "ip_empirical", "ip_oracle", "naive")
            ax.plot([r["log_size"] for r in rows], [r["estimators"][e]["mean_rel_error"] for r in rows],
                    "-" if main else ":", lw=2.2 if main else 1.2, marker="o", ms=3,
                    color=plt.cm.tab20(i % 20), label=e)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("logged lists")
        ax.set_ylabel("mean relative error")
        ax.set_title(f"logging temperature {T}")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg):
    res = run_experiment(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    atomic_write(os.path.join(cfg.out_dir, "results.json"), json.dumps(res, indent=1))
    md = markdown(res)
    atomic_write(os.path.join(cfg.out_dir, "results.md"), md)
    if cfg.plot:
        atomic_write(os.path.join(cfg.out_dir, "results.png"), lambda p: plot(res, p))
    print(md)
    print(f"wrote {cfg.out_dir}/results.json, results.md" + (", results.png" if cfg.plot else "") +
          f" in {res['seconds']:.1f} s")
    return res


if __name__ == "__main__":
    run_main(main, Config)
