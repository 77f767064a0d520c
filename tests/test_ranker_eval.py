"""Tests for ranker_eval.py: Plackett-Luce marginals, click-model values, estimator (un)biasedness,
the parametric propensity fit, the LETOR reader and the experiment end to end.
Run: python -m pytest -q tests/test_ranker_eval.py   (about 30 s on 2 CPU cores)"""
import itertools
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ranker_eval as rk  # noqa: E402
from configurator import ConfigError, parse_config  # noqa: E402


def brute_marginals(logits, K):
    """P(d at rank k) by enumerating every ordered prefix."""
    n = len(logits)
    w = np.exp(logits - logits.max())
    M = np.zeros((n, min(K, n)))
    for perm in itertools.permutations(range(n), min(K, n)):
        p, rem = 1.0, w.sum()
        for d in perm:
            p *= w[d] / rem
            rem -= w[d]
        for k, d in enumerate(perm):
            M[d, k] += p
    return M


def small_world(seed=0, n_queries=30, docs_min=4, docs_max=6, n_features=5):
    cfg = rk.Config(n_queries=n_queries, docs_min=docs_min, docs_max=docs_max, n_features=n_features,
                    seed=seed, K=3)
    return cfg, rk.make_synthetic_world(cfg)


def random_policy(world, rng, scale=1.0, name="p"):
    return rk.Policy(name, np.where(world.mask, scale * rng.standard_normal(world.mask.shape), -np.inf))


# ---------------------------------------------------------------- Plackett-Luce marginals

@pytest.mark.parametrize("n,K", [(5, 3), (6, 6), (4, 1), (3, 5), (7, 4)])
def test_exact_marginals_equal_brute_force(n, K):
    rng = np.random.default_rng(n * 10 + K)
    logits = 2.0 * rng.standard_normal((3, n))
    exact = rk.pl_marginals_exact(logits, K)
    for b in range(3):
        np.testing.assert_allclose(exact[b, :, : min(K, n)], brute_marginals(logits[b], K), atol=1e-12)
    assert np.all(exact[:, :, min(K, n):] == 0)


def test_marginals_nearly_greedy_stay_finite_and_normalised():
    logits = np.array([[0.0, -300.0, -800.0, -2000.0, 5.0]])   # weights spanning e^-2000
    M = rk.pl_marginals_exact(logits, 3)
    assert np.all(np.isfinite(M))
    np.testing.assert_allclose(M.sum(1), 1.0, atol=1e-12)    # each rank holds exactly one document
    assert M[0, 4, 0] > 0.99 and M[0, 0, 1] > 0.99


def test_monte_carlo_marginals_match_exact_and_padding():
    cfg, world = small_world()
    rng = np.random.default_rng(1)
    pol = random_policy(world, rng)
    exact = rk.pl_marginals(pol, cfg.K, cfg, rng)
    mc = rk.pl_marginals(pol, cfg.K, replace(cfg, exact_max_work=0, mc_samples=20000), rng)
    assert np.abs(exact - mc).max() < 0.02
    assert np.all(exact[~world.mask] == 0) and np.all(mc[~world.mask] == 0)
    np.testing.assert_allclose(exact.sum(1), 1.0, atol=1e-12)


def test_deterministic_policy_and_list_probabilities():
    cfg, world = small_world()
    rng = np.random.default_rng(2)
    pol = random_policy(world, rng)
    det = rk.Policy("d", pol.logits, deterministic=True)
    Md = rk.pl_marginals(det, cfg.K, cfg, rng)
    order = np.argsort(-pol.logits, 1)
    assert np.all(Md[np.arange(len(order)), order[:, 0], 0] == 1) and Md.sum() == len(order) * cfg.K
    # list probabilities over all prefixes of one query sum to 1 and agree with the marginals
    q = 0
    n = world.n_docs[q]
    prefixes = np.array(list(itertools.permutations(range(n), cfg.K)))
    p = rk.pl_list_prob(pol, np.full(len(prefixes), q), prefixes)
    assert abs(p.sum() - 1) < 1e-10
    M = rk.pl_marginals(pol, cfg.K, cfg, rng)[q]
    for k in range(cfg.K):
        np.testing.assert_allclose(np.bincount(prefixes[:, k], weights=p, minlength=n), M[:n, k], atol=1e-12)
    pd = rk.pl_list_prob(det, np.full(len(prefixes), q), prefixes)
    assert pd.sum() == 1 and np.all(prefixes[pd == 1][0] == order[q, : cfg.K])


# ---------------------------------------------------------------- click models and true values

def test_pbm_true_value_matches_simulated_clicks():
    cfg, world = small_world()
    rng = np.random.default_rng(3)
    pol = random_policy(world, rng)
    V = rk.true_value(world, pol, rk.pl_marginals(pol, cfg.K, cfg, rng), cfg, rng)
    logs = rk.sample_logs(world, pol, 40000, cfg, rng)
    c = logs.clicks.sum(1)
    assert abs(c.mean() - V) < 4 * c.std() / np.sqrt(len(c))


@pytest.mark.parametrize("stop", [1.0, 0.5])
def test_cascade_value_exact_equals_enumeration_and_sampling(stop):
    cfg, world = small_world(n_queries=6)
    cfg = replace(cfg, click_model="cascade", cascade_stop=stop)
    rng = np.random.default_rng(4)
    pol = random_policy(world, rng, scale=1.5)
    r = rk.attraction(world, cfg)
    brute = []
    for q in range(world.mask.shape[0]):
        n = world.n_docs[q]
        prefixes = np.array(list(itertools.permutations(range(n), cfg.K)))
        p = rk.pl_list_prob(pol, np.full(len(prefixes), q), prefixes)
        rr = r[q][prefixes]
        seen = np.concatenate([np.ones((len(rr), 1)), np.cumprod(1 - stop * rr, 1)[:, :-1]], 1)
        brute.append((p * (seen * rr).sum(1)).sum())
    V = rk.true_value(world, pol, None, cfg, rng)
    assert abs(V - np.mean(brute)) < 1e-12
    Vmc = rk.true_value(world, pol, None, replace(cfg, exact_max_work=0, mc_samples=20000), rng)
    assert abs(Vmc - V) < 0.01
    logs = rk.sample_logs(world, pol, 40000, cfg, rng)     # the simulator agrees with the value
    c = logs.clicks.sum(1)
    assert abs(c.mean() - V) < 4 * c.std() / np.sqrt(len(c))


# ---------------------------------------------------------------- estimators

def _setup(logger_scale=1.0, seed=5, docs_min=4):
    cfg, world = small_world(seed=seed, docs_min=docs_min)
    rng = np.random.default_rng(seed)
    logger = random_policy(world, rng, logger_scale, "logger")
    news = [random_policy(world, rng, 1.0, f"h{i}") for i in range(3)]
    news.append(rk.Policy("greedy", news[0].logits, deterministic=True))
    H = np.stack([rk.pl_marginals(h, cfg.K, cfg, rng) for h in news])
    V = np.array([rk.true_value(world, h, m, cfg, rng) for h, m in zip(news, H)])
    P0 = rk.pl_marginals(logger, cfg.K, cfg, rng)
    return cfg, world, logger, news, H, V, P0


def _estimates(cfg, world, logger, news, H, P0, logs, names):
    Q, N = world.mask.shape
    emp = rk.empirical_propensities(logs, Q, N, cfg.K)
    return rk.estimate_all(names, logs, H, news, logger, P0, emp, P0, rk.examination(cfg), cfg.clip)


def _many_logs(cfg, world, logger, news, H, P0, names, R, n):
    est = {e: [] for e in names}
    for seed in range(R):
        logs = rk.sample_logs(world, logger, n, cfg, np.random.default_rng(100 + seed))
        for e, v in _estimates(cfg, world, logger, news, H, P0, logs, names).items():
            est[e].append(v)
    return {e: np.array(v) for e, v in est.items()}                     # (R, rankers)


def test_item_position_ips_with_true_propensities_is_unbiased():
    cfg, world, logger, news, H, V, P0 = _setup(logger_scale=3.0)   # a fairly greedy logger
    R = 200
    est = _many_logs(cfg, world, logger, news, H, P0, ["ip_oracle", "pbm", "ip_empirical"], R, 300)
    for e in ["ip_oracle", "pbm"]:
        x = est[e]
        assert np.all(np.abs(x.mean(0) - V) <= 3 * x.std(0) / np.sqrt(R)), e
    # the same check has power: per-query frequencies miss placements the logger rarely makes
    x = est["ip_empirical"]
    assert np.any(np.abs(x.mean(0) - V) > 3 * x.std(0) / np.sqrt(R))
    assert np.all(x.mean(0) < V)


def test_list_ips_is_unbiased_for_a_stochastic_logger():
    # whole-list weights are heavy-tailed: with a greedy logger 200 logs rarely see the big ones,
    # so unbiasedness is checked where the weights are moderate
    cfg, world, logger, news, H, V, P0 = _setup(logger_scale=1.0)
    R = 200
    x = _many_logs(cfg, world, logger, news[:3], H[:3], P0, ["list_ips"], R, 300)["list_ips"]
    assert np.all(np.abs(x.mean(0) - V[:3]) <= 3 * x.std(0) / np.sqrt(R))


def test_evaluating_the_logger_returns_the_on_policy_mean():
    cfg, world, logger, news, H, V, P0 = _setup()
    rng = np.random.default_rng(6)
    V0 = rk.true_value(world, logger, P0, cfg, rng)
    names = ["naive", "ip_oracle", "ip_oracle_sn", "list_ips", "list_ips_sn", "pbm"]
    means = []
    for seed in range(30):
        logs = rk.sample_logs(world, logger, 2000, cfg, np.random.default_rng(seed))
        est = rk.estimate_all(names, logs, P0[None], [logger], logger, P0, P0, P0, rk.examination(cfg), 0.0)
        for e in names[1:]:
            assert abs(est[e][0] - est["naive"][0]) < 1e-12, e    # every weight is exactly 1
        means.append(est["naive"][0])
    assert abs(np.mean(means) - V0) < 4 * np.std(means) / np.sqrt(len(means))


def test_self_normalised_ip_with_queries_shorter_than_K():
    """Queries with 1-2 documents leave ranks empty (K = 3): on-policy, the self-normalised
    item-position estimate must still equal the logged CTR (every weight is 1)."""
    cfg, world, logger, news, H, V, P0 = _setup(docs_min=1)
    assert (world.mask.sum(1) < cfg.K).any()
    logs = rk.sample_logs(world, logger, 3000, cfg, np.random.default_rng(0))
    est = rk.estimate_all(["naive", "ip_oracle", "ip_oracle_sn"], logs, P0[None], [logger], logger, P0, P0, P0,
                          rk.examination(cfg), 0.0)
    assert abs(est["ip_oracle_sn"][0] - est["naive"][0]) < 1e-12
    assert abs(est["ip_oracle"][0] - est["naive"][0]) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_normalised_estimates_stay_in_0_K(seed):
    cfg, world, logger, news, H, V, P0 = _setup(logger_scale=6.0, seed=seed)   # extreme weights
    names = ["ip_oracle_sn", "ip_empirical_sn", "ip_parametric_sn", "list_ips_sn"]
    logs = rk.sample_logs(world, logger, 50, cfg, np.random.default_rng(seed))
    est = _estimates(cfg, world, logger, news, H, P0, logs, names)
    for e in names:
        assert np.all(est[e] >= 0) and np.all(est[e] <= cfg.K), (e, est[e])
    clipped = rk.estimate_all(["ip_oracle"], logs, H, news, logger, P0, P0, P0, rk.examination(cfg), 2.0)
    assert np.all(clipped["ip_oracle"] <= 2.0 * logs.clicks.sum(1).mean() + 1e-12)


def _hand_logs():
    """3 logged lists, K = 2: query 0 has 3 documents, query 1 one (its rank 2 stays empty)."""
    return rk.Logs(q=np.array([0, 0, 1]), A=np.array([[0, 1], [2, 0], [0, -1]]),
                   clicks=np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))


def test_self_normalised_estimators_by_hand_off_policy():
    """A new policy other than the logger (weights != 1), values worked out by hand. Item-position
    weights w = h/p: [[0.5, 2], [3, 0.5], [1, -]]; clicks [[1, 1], [0, 1], [1, 0]].
      ip      = sum c w / T = (0.5 + 2 + 0.5 + 1) / 3 = 4/3
      ip_sn   = per rank sum_t c w / sum_t w (+1 per empty rank): (0.5 + 1) / 4.5 + (2 + 0.5) / (2.5 + 1)
              = 1/3 + 5/7 = 22/21   (normalising per list, or over everything, gives other numbers)
    List weights h(A)/p(A) = [0.5, 3, 1], clicks per list [2, 1, 1]:
      list_ips = (1 + 3 + 1) / 3 = 5/3,  list_ips_sn = 5 / 4.5 = 10/9."""
    logs = _hand_logs()
    p_at = np.array([[0.5, 0.25], [0.2, 0.4], [1.0, 0.7]])
    h_at = np.array([[0.25, 0.5], [0.6, 0.2], [1.0, 0.3]])
    assert rk.ip_estimate(logs, h_at, p_at) == pytest.approx(4 / 3)
    assert rk.ip_estimate(logs, h_at, p_at, self_normalise=True) == pytest.approx(22 / 21)
    both = rk.ip_estimate(logs, np.stack([h_at, p_at]), p_at, self_normalise=True)   # (R, T, K) -> (R,)
    assert both == pytest.approx([22 / 21, 4 / 3])           # on-policy: every weight 1, the click mean
    h_list, p_list = np.array([0.1, 0.3, 0.5]), np.array([0.2, 0.1, 0.5])
    assert rk.list_ips_estimate(logs, h_list, p_list) == pytest.approx(5 / 3)
    assert rk.list_ips_estimate(logs, h_list, p_list, self_normalise=True) == pytest.approx(10 / 9)
    assert rk.list_ips_estimate(logs, np.stack([h_list, p_list]), p_list, self_normalise=True) == pytest.approx([10 / 9, 4 / 3])
    # clipping caps each weight before normalising: w = [[0.5, 1], [1, 0.5], [1, -]]
    assert rk.ip_estimate(logs, h_at, p_at, clip=1.0, self_normalise=True) == pytest.approx(1.5 / 2.5 + 1.5 / 2.5)
    # small weights (their sum below 1) and a rank whose weights are all 0 (the new policy never puts
    # a logged document there): w = [[0.05, 0], [0.3, 0]] -> 0.05 / 0.35 + 0 (no weight, no estimate)
    full = rk.Logs(q=np.array([0, 0]), A=np.array([[0, 1], [2, 0]]), clicks=np.array([[1.0, 1.0], [0.0, 1.0]]))
    h_small = np.array([[0.025, 0.0], [0.06, 0.0]])
    assert rk.ip_estimate(full, h_small, p_at[:2], self_normalise=True) == pytest.approx(1 / 7)
    assert rk.list_ips_estimate(full, np.array([0.02, 0.01]), np.array([0.2, 0.1]), self_normalise=True) == pytest.approx(1.5)
    assert rk.list_ips_estimate(full, np.zeros(2), np.array([0.2, 0.1]), self_normalise=True) == 0.0


def test_estimate_all_wires_the_self_normalised_estimators():
    """The same hand-made log through estimate_all: propensities looked up per (query, document,
    rank), list probabilities from Plackett-Luce. Logger weights (1, 2, 1) on query 0, new policy
    (2, 1, 1): P0(A) = [1/4 * 2/3, 1/4 * 1/3, 1] = [1/6, 1/12, 1], h(A) = [1/2 * 1/2, 1/4 * 2/3, 1]
    = [1/4, 1/6, 1]; list weights [3/2, 2, 1] on clicks [2, 1, 1]: list_ips = 6/3 = 2,
    list_ips_sn = 6/4.5 = 4/3."""
    logs = _hand_logs()
    with np.errstate(divide="ignore"):   # log 0 = -inf on the padding of query 1
        logger = rk.Policy("logger", np.log(np.array([[1.0, 2.0, 1.0], [1.0, 0.0, 0.0]])))
        new = rk.Policy("new", np.log(np.array([[2.0, 1.0, 1.0], [1.0, 0.0, 0.0]])))
    P0 = np.zeros((2, 3, 2))
    H = np.zeros((2, 3, 2))
    for (q, d, k), p, h in [((0, 0, 0), 0.5, 0.25), ((0, 1, 1), 0.25, 0.5), ((0, 2, 0), 0.2, 0.6),
                            ((0, 0, 1), 0.4, 0.2), ((1, 0, 0), 1.0, 1.0)]:
        P0[q, d, k], H[q, d, k] = p, h
    names = ["naive", "ip_oracle", "ip_oracle_sn", "list_ips", "list_ips_sn", "ip_parametric_sn", "ip_empirical_sn"]
    est = rk.estimate_all(names, logs, H[None], [new], logger, P0, P0, P0, np.array([1.0, 0.5]), 0.0)
    assert est["naive"] == pytest.approx([4 / 3])
    assert est["ip_oracle"] == pytest.approx([4 / 3])          # sum c w / T (hand weights as above)
    for name in ("ip_oracle_sn", "ip_parametric_sn", "ip_empirical_sn"):
        assert est[name] == pytest.approx([22 / 21]), name
    assert est["list_ips"] == pytest.approx([2.0])
    assert est["list_ips_sn"] == pytest.approx([4 / 3])


def test_empirical_propensities_are_per_query_frequencies():
    logs = rk.Logs(q=np.array([0, 0, 0, 1]), A=np.array([[2, 0], [2, 1], [0, 2], [1, -1]]),
                   clicks=np.zeros((4, 2)))
    emp = rk.empirical_propensities(logs, 2, 3, 2)
    np.testing.assert_allclose(emp[0], [[1 / 3, 1 / 3], [0, 1 / 3], [2 / 3, 1 / 3]])
    np.testing.assert_allclose(emp[1], [[0, 0], [1, 0], [0, 0]])   # the short list adds nothing at rank 2


def test_kendall_tau():
    x = np.array([0.1, 0.5, 0.3, 0.9])
    assert rk.kendall_tau(x, x) == 1.0 and rk.kendall_tau(x, -x) == -1.0
    assert rk.kendall_tau(x, [0.1, 0.3, 0.5, 0.9]) == pytest.approx(4 / 6)


# ---------------------------------------------------------------- parametric propensities

def test_fitted_plackett_luce_recovers_true_marginals_as_log_grows():
    cfg, world = small_world(n_queries=40)
    rng = np.random.default_rng(7)
    beta = rng.standard_normal(world.X.shape[2])
    logger = rk.Policy("logger", np.where(world.mask, 1.5 * world.X.astype(float) @ beta, -np.inf))
    P0 = rk.pl_marginals(logger, cfg.K, cfg, rng)
    errs = []
    for n in (100, 20000):
        logs = rk.sample_logs(world, logger, n, cfg, np.random.default_rng(n))
        fitted = rk.fit_logging_policy(world, logs, replace(cfg, propensity_l2=0.0), 0)
        errs.append(np.abs(rk.pl_marginals(fitted, cfg.K, cfg, rng) - P0).max())
    assert errs[1] < 0.03 and errs[1] < errs[0] / 2, errs


# ---------------------------------------------------------------- LETOR files

def write_letor(world, path, comment=True):
    with open(path, "w") as f:
        for q in range(world.mask.shape[0]):
            for d in np.nonzero(world.mask[q])[0]:
                feats = " ".join(f"{i + 1}:{v:.5f}" for i, v in enumerate(world.X[q, d]) if v != 0)
                f.write(f"{world.rel[q, d]} qid:{1000 + q} {feats}" + (f" # doc{d}\n" if comment else "\n"))


def test_read_letor_groups_queries_and_keeps_labels(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("# header comment\n2 qid:7 1:0.5 3:1.5 # docA\n0 qid:7 2:-1\n\n1 qid:3 1:2 2:0 3:4\n")
    queries, F = rk.read_letor(str(p))
    assert F == 3 and [q for q, _, _ in queries] == ["7", "3"]
    assert list(queries[0][1]) == [2, 0]
    assert queries[0][2][0][0].tolist() == [1, 3] and queries[0][2][0][1].tolist() == [0.5, 1.5]
    assert [q for q, _, _ in rk.read_letor(str(p), max_queries=1)[0]] == ["7"]
    world = rk.load_letor_world(str(p), rk.Config())
    assert world.mask.tolist() == [[True, True], [True, False]] and world.rel_max == 2
    raw = (world.X * 1.0)[world.mask]   # z-scored columns keep the file's values up to scale
    assert np.corrcoef(raw[:, 2], [1.5, 0, 4])[0, 1] > 0.999
    np.testing.assert_allclose(world.X[world.mask].mean(0), 0, atol=1e-6)


@pytest.mark.parametrize("line,msg", [
    ("x qid:1 1:0.5", "label"),
    ("1.5 qid:1 1:0.5", "integer"),
    ("1 1:0.5 2:0.1", "qid"),
    ("1 qid:1 1=0.5", "index:value"),
    ("1 qid:1 0:0.5", ">= 1"),
    ("1 qid:1 1:abc", "index:value"),
    ("1 qid:1 1:0.5 1:0.7", "repeated"),
    ("1", "qid"),
    ("nan qid:1 1:0.5", "integer"),
    ("inf qid:1 1:0.5", "integer"),
])
def test_malformed_letor_line_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.txt"
    p.write_text("2 qid:1 1:0.5 2:0.1\n# comment\n" + line + "\n1 qid:2 1:0.3\n")
    with pytest.raises(ValueError) as e:
        rk.read_letor(str(p))
    assert f"{p}:3:" in str(e.value) and msg in str(e.value)


def test_letor_bytes_that_are_not_utf8_name_the_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"2 qid:1 1:0.5\n1 qid:1 1:0.2 # caf\xe9\n")
    with pytest.raises(ValueError, match=f"{p}:2: not valid UTF-8"):
        rk.read_letor(str(p))


def test_runs_end_to_end_on_an_unseen_letor_file(tmp_path):
    # another feature count, ragged queries and a query shorter than the list length K
    cfg = rk.Config(n_queries=25, docs_min=2, docs_max=12, n_features=7, seed=11)
    write_letor(rk.make_synthetic_world(cfg), tmp_path / "unseen.txt")
    out = tmp_path / "out"
    res = rk.main(parse_config(rk.Config, [
        f"--data={tmp_path / 'unseen.txt'}", f"--out_dir={out}", "--K=5", "--reps=1", "--log_sizes=300",
        "--temperatures=0.5", "--ltr_steps=20", "--n_new_rankers=4", "--exact_max_work=3000", "--mc_samples=500",
        "--plot=false"]))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["estimators"]) == set(rk.ESTIMATORS) and set(saved["kendall_tau"]) == set(rk.ESTIMATORS)
    for m in saved["estimators"].values():
        assert np.isfinite(m["mean_rel_error"]) and np.isfinite(m["rmse"])
    assert saved["world"]["features"] == 7 and saved["world"]["max_docs"] == 12
    assert (out / "results.md").read_text().startswith("# Offline ranker evaluation (unseen.txt")
    assert res["estimators"]["ip_oracle"]["mean_rel_error"] < res["estimators"]["naive"]["mean_rel_error"]


# ---------------------------------------------------------------- the experiment and the CLI

def test_parametric_beats_empirical_when_new_rankers_go_where_the_logger_rarely_did(tmp_path):
    cfg = parse_config(rk.Config, ["--temperatures=0.25", "--log_sizes=1000,4000", "--reps=2", "--ltr_steps=60",
                                   "--estimators=naive,ip_oracle,ip_empirical,ip_parametric"])
    res = rk.run_experiment(cfg, show_progress=False)
    e = res["estimators"]
    assert all(r["unseen_mass"] > 0.1 for r in res["by_condition"])
    assert e["ip_parametric"]["mean_rel_error"] < 0.75 * e["ip_empirical"]["mean_rel_error"], e
    assert e["ip_parametric"]["mean_rel_error"] < e["naive"]["mean_rel_error"]
    for r in res["by_condition"]:   # the fitted propensities are closer to the truth than counts
        assert r["propensity_mae_parametric"] < r["propensity_mae_empirical"]
    path = tmp_path / "plot.png"
    rk.plot(res, str(path))
    assert path.stat().st_size > 1000 and "| ip_parametric |" in rk.markdown(res)


def test_cli_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'temprature'; valid keys: .*temperatures"):
        parse_config(rk.Config, ["--temprature=1"])
    with pytest.raises(ConfigError, match="--K: K='abc' is not a valid int"):
        parse_config(rk.Config, ["--K=abc"])
    with pytest.raises(ConfigError, match="unknown \\['ips'\\]"):
        parse_config(rk.Config, ["--estimators=ips,naive"])
    with pytest.raises(ConfigError, match="--examination"):
        parse_config(rk.Config, ["--examination=0.5,0.2"])
    with pytest.raises(ConfigError, match="--temperatures"):
        parse_config(rk.Config, ["--temperatures=0"])
    cfg = parse_config(rk.Config, ["--K=3", "--plot=false", "--clip=5", "--examination=0.9,0.5,0.2,0.1"])
    assert cfg.K == 3 and cfg.plot is False and cfg.clip == 5.0
    np.testing.assert_allclose(rk.examination(cfg), [0.9, 0.5, 0.2])
    preset = tmp_path / "p.py"   # preset files, as every script takes them
    preset.write_text("K = 2\nreps = 3\n")
    assert parse_config(rk.Config, [str(preset), "--reps=4"]) == rk.Config(K=2, reps=4)
