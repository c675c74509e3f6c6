"""``jaxem.log_likelihood`` / ``jaxem.posterior`` / hard EM against brute-force enumeration.

For tiny models, every joint assignment of *all* latent variables across *all* plate
elements is listed with ``itertools.product``; log p(x, z) is computed with scipy.stats, then
log p(x) is its logsumexp and the posterior marginals are normalised sums. Nothing of the
model's factorisation is exploited, so the reference is independent of jaxem's contraction.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from models import normal_mixture
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from numpyro.distributions import constraints
from scipy import stats
from scipy.special import logsumexp

import jaxem
from jaxem import EM

RTOL64 = 1e-9
ATOL64 = 1e-10


def brute_force(latents, log_joint):
    """Enumerate all joint latent configurations.

    Args:
        latents: {site name: (batch shape, number of values)}.
        log_joint: maps {site name: int array (C, *batch shape)} to log p(x, z), shape (C,).

    Returns:
        (log p(x), {site: marginal probabilities (*batch shape, number of values)},
        max_z log p(x, z), the maximising assignment).
    """
    names = list(latents)
    sizes = [int(np.prod(latents[n][0], dtype=int)) for n in names]
    domains = [range(latents[n][1]) for n, s in zip(names, sizes) for _ in range(s)]
    configs = np.array(list(itertools.product(*domains)), dtype=np.int64).reshape(-1, sum(sizes))
    assignment, offset = {}, 0
    for n, s in zip(names, sizes):
        assignment[n] = configs[:, offset : offset + s].reshape((-1,) + tuple(latents[n][0]))
        offset += s
    lj = np.asarray(log_joint(assignment), dtype=np.float64)
    assert lj.shape == (configs.shape[0],)
    log_evidence = logsumexp(lj)
    weights = np.exp(lj - log_evidence)
    marginals = {}
    for n in names:
        shape, card = latents[n]
        flat = assignment[n].reshape(configs.shape[0], -1)
        m = np.stack([(weights[:, None] * (flat == k)).sum(0) for k in range(card)], axis=-1)
        marginals[n] = m.reshape(tuple(shape) + (card,))
    best = int(np.argmax(lj))
    return log_evidence, marginals, lj[best], {n: a[best] for n, a in assignment.items()}


def check_against_brute_force(model, params, args, latents, log_joint, rtol=RTOL64, atol=ATOL64):
    expected_ll, expected_post, _, _ = brute_force(latents, log_joint)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    jargs = tuple(jnp.asarray(a) for a in args)
    ll = jaxem.log_likelihood(model, jparams, *jargs)
    assert jnp.shape(ll) == ()
    np.testing.assert_allclose(float(ll), expected_ll, rtol=rtol)
    post = jaxem.posterior(model, jparams, *jargs)
    assert set(post) == set(latents)
    for name, expected in expected_post.items():
        got = np.asarray(post[name])
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        np.testing.assert_allclose(
            got, expected, rtol=0, atol=atol if atol else 10 * rtol, err_msg=name
        )


def _simplex(rng, *shape):
    p = rng.uniform(0.2, 1.0, size=shape)
    return p / p.sum(-1, keepdims=True)


# --- (a) two latent sites in one plate, the second depending on the first ---------------


def two_latents(x):
    w1 = numpyro.param("w1", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 3)) / 3, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((2, 3)))
    sigma = numpyro.param("sigma", jnp.ones(3), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z1 = numpyro.sample("z1", dist.Categorical(w1))
        z2 = numpyro.sample("z2", dist.Categorical(A[z1]))
        numpyro.sample("x", dist.Normal(mu[z1, z2], sigma[z2]), obs=x)


def _two_latents_case(rng):
    params = {
        "w1": np.array([0.35, 0.65]),
        "A": _simplex(rng, 2, 3),
        "mu": rng.normal(size=(2, 3)) * 2.0,
        "sigma": rng.uniform(0.5, 1.5, size=3),
    }
    x = np.array([0.3, -1.2, 2.5])

    def log_joint(z):
        z1, z2 = z["z1"], z["z2"]
        lp = np.log(params["w1"][z1]) + np.log(params["A"][z1, z2])
        lp += stats.norm.logpdf(x, params["mu"][z1, z2], params["sigma"][z2])
        return lp.sum(-1)

    latents = {"z1": ((3,), 2), "z2": ((3,), 3)}
    return params, (x,), latents, log_joint


def test_two_dependent_latents(x64, rng):
    params, args, latents, log_joint = _two_latents_case(rng)
    check_against_brute_force(two_latents, params, args, latents, log_joint)


def test_two_dependent_latents_float32(x32, rng):
    params, args, latents, log_joint = _two_latents_case(rng)
    params32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
    args32 = tuple(np.asarray(a, np.float32) for a in args)
    ll = jaxem.log_likelihood(
        two_latents, {k: jnp.asarray(v) for k, v in params32.items()}, jnp.asarray(args32[0])
    )
    assert ll.dtype == jnp.float32
    check_against_brute_force(
        two_latents, params32, args32, latents, log_joint, rtol=1e-5, atol=1e-5
    )


# --- (b) three latent sites, two observed sites --------------------------------------------


def three_latents(x, y):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
    B = numpyro.param("B", jnp.ones((2, 2, 3)) / 3, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(3))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    p = numpyro.param("p", jnp.full(2, 0.5), constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z1 = numpyro.sample("z1", dist.Categorical(w))
        z2 = numpyro.sample("z2", dist.Categorical(A[z1]))
        z3 = numpyro.sample("z3", dist.Categorical(B[z1, z2]))
        numpyro.sample("x", dist.Normal(mu[z3], sigma[z1]), obs=x)
        numpyro.sample("y", dist.Bernoulli(p[z2]), obs=y)


def test_three_latents(x64, rng):
    params = {
        "w": np.array([0.6, 0.4]),
        "A": _simplex(rng, 2, 2),
        "B": _simplex(rng, 2, 2, 3),
        "mu": np.array([-2.0, 0.5, 3.0]),
        "sigma": np.array([0.8, 1.7]),
        "p": np.array([0.2, 0.9]),
    }
    x = np.array([-1.5, 0.7, 2.2])
    y = np.array([1.0, 0.0, 1.0])

    def log_joint(z):
        z1, z2, z3 = z["z1"], z["z2"], z["z3"]
        lp = np.log(params["w"][z1]) + np.log(params["A"][z1, z2]) + np.log(params["B"][z1, z2, z3])
        lp += stats.norm.logpdf(x, params["mu"][z3], params["sigma"][z1])
        lp += stats.bernoulli.logpmf(y, params["p"][z2])
        return lp.sum(-1)

    latents = {"z1": ((3,), 2), "z2": ((3,), 2), "z3": ((3,), 3)}
    check_against_brute_force(three_latents, params, (x, y), latents, log_joint)


# --- (c) nested plates: a latent per group, a latent per item depending on it -----------


def nested_plates(x, counts):
    # x: (items, groups); counts: (groups,)
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 3)) / 3, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((2, 3)))
    sigma = numpyro.param("sigma", jnp.ones(3), constraint=constraints.positive)
    rate = numpyro.param("rate", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("groups", x.shape[1], dim=-1):
        g = numpyro.sample("g", dist.Categorical(w))
        numpyro.sample("counts", dist.Poisson(rate[g]), obs=counts)
        with numpyro.plate("items", x.shape[0], dim=-2):
            z = numpyro.sample("z", dist.Categorical(A[g]))
            numpyro.sample("x", dist.Normal(mu[g, z], sigma[z]), obs=x)


def test_nested_plates(x64, rng):
    params = {
        "w": np.array([0.3, 0.7]),
        "A": _simplex(rng, 2, 3),
        "mu": rng.normal(size=(2, 3)) * 2.0,
        "sigma": np.array([0.7, 1.0, 1.4]),
        "rate": np.array([1.5, 4.0]),
    }
    x = np.array([[0.1, 2.0], [-1.0, 1.5], [0.8, 3.1]])  # 3 items x 2 groups
    counts = np.array([1.0, 5.0])

    def log_joint(z):
        g, zz = z["g"], z["z"]  # (C, 2), (C, 3, 2)
        lp = (np.log(params["w"][g]) + stats.poisson.logpmf(counts, params["rate"][g])).sum(-1)
        gb = g[:, None, :]
        item = np.log(params["A"][gb, zz]) + stats.norm.logpdf(
            x, params["mu"][gb, zz], params["sigma"][zz]
        )
        return lp + item.sum((-1, -2))

    latents = {"g": ((2,), 2), "z": ((3, 2), 3)}
    check_against_brute_force(nested_plates, params, (x, counts), latents, log_joint)


# --- (d) a global latent outside any plate ----------------------------------------------------


def global_latent(x):
    w = numpyro.param("w", jnp.ones(3) / 3, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(3))
    sigma = numpyro.param("sigma", jnp.ones(3), constraint=constraints.positive)
    c = numpyro.sample("c", dist.Categorical(w))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu[c], sigma[c]), obs=x)


def test_global_latent(x64):
    params = {
        "w": np.array([0.2, 0.5, 0.3]),
        "mu": np.array([-1.0, 0.5, 2.0]),
        "sigma": np.array([1.0, 0.6, 2.0]),
    }
    x = np.array([0.2, 0.9, -0.3, 1.4])

    def log_joint(z):
        c = z["c"]  # (C,)
        return np.log(params["w"][c]) + stats.norm.logpdf(
            x, params["mu"][c][:, None], params["sigma"][c][:, None]
        ).sum(-1)

    check_against_brute_force(global_latent, params, (x,), {"c": ((), 3)}, log_joint)


def global_and_local_latents(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(2))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    c = numpyro.sample("c", dist.Categorical(w))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(A[c]))
        numpyro.sample("x", dist.Normal(mu[z], sigma[c]), obs=x)


def test_global_and_local_latents(x64, rng):
    params = {
        "w": np.array([0.45, 0.55]),
        "A": np.array([[0.9, 0.1], [0.25, 0.75]]),
        "mu": np.array([-1.0, 1.5]),
        "sigma": np.array([0.7, 1.3]),
    }
    x = np.array([-0.8, 1.1, 2.0, -1.9, 0.4])

    def log_joint(z):
        c, zz = z["c"], z["z"]  # (C,), (C, N)
        lp = np.log(params["w"][c]) + np.log(params["A"][c[:, None], zz]).sum(-1)
        return lp + stats.norm.logpdf(x, params["mu"][zz], params["sigma"][c][:, None]).sum(-1)

    latents = {"c": ((), 2), "z": ((5,), 2)}
    check_against_brute_force(global_and_local_latents, params, (x,), latents, log_joint)


# --- (e) Markov chain written with numpyro's scan (forward-backward vs all K^T paths) -----


def gaussian_hmm(x):
    pi = numpyro.param("pi", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(2))
    sigma = numpyro.param("sigma", jnp.ones(()), constraint=constraints.positive)
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(mu[z0], sigma), obs=x[0])

    def transition(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x_t)
        return z, None

    scan(transition, z0, x[1:])


def test_hmm_scan(x64):
    params = {
        "pi": np.array([0.7, 0.3]),
        "A": np.array([[0.8, 0.2], [0.35, 0.65]]),
        "mu": np.array([-1.0, 1.2]),
        "sigma": np.array(0.9),
    }
    x = np.array([-0.9, -1.3, 0.4, 1.5, 0.2, 1.1])
    T = x.shape[0]

    def log_joint(z):
        z0, zs = z["z0"], z["z"]  # (C,), (C, T-1)
        path = np.concatenate([z0[:, None], zs], axis=1)
        lp = np.log(params["pi"][z0]) + np.log(params["A"][path[:, :-1], path[:, 1:]]).sum(-1)
        return lp + stats.norm.logpdf(x, params["mu"][path], params["sigma"]).sum(-1)

    latents = {"z0": ((), 2), "z": ((T - 1,), 2)}
    check_against_brute_force(gaussian_hmm, params, (x,), latents, log_joint)


# --- hard EM: the max-product E-step and the classification M-step ---------------------------


def test_hard_em_first_update(x64):
    K = 3
    x = np.array([-2.1, -1.7, 0.2, 0.6, 3.0, 3.9])
    params = {
        "w": np.array([0.3, 0.3, 0.4]),
        "mu": np.array([-2.0, 0.0, 3.0]),
        "sigma": np.array([1.0, 1.2, 0.9]),
    }

    def log_joint(z):
        zz = z["z"]
        return (
            np.log(params["w"][zz]) + stats.norm.logpdf(x, params["mu"][zz], params["sigma"][zz])
        ).sum(-1)

    log_evidence, _, max_log_joint, best = brute_force({"z": ((x.shape[0],), K)}, log_joint)
    assert max_log_joint < log_evidence - 1e-3  # the two semirings really differ here

    em = EM(normal_mixture, hard=True, reg_covar=0.0)
    state = em.init(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        K,
        init_params={k: jnp.asarray(v) for k, v in params.items()},
    )
    state, ll = em.update(state, jnp.asarray(x), K)
    np.testing.assert_allclose(float(ll), max_log_joint, rtol=RTOL64)

    # Classification M-step: maximum-likelihood estimates given the MAP assignment.
    labels = best["z"]
    assert sorted(set(labels.tolist())) == list(range(K))
    new = em.get_params(state)
    counts = np.bincount(labels, minlength=K)
    np.testing.assert_allclose(np.asarray(new["w"]), counts / x.shape[0], rtol=RTOL64)
    means = np.array([x[labels == k].mean() for k in range(K)])
    np.testing.assert_allclose(np.asarray(new["mu"]), means, rtol=RTOL64)
    np.testing.assert_allclose(
        np.asarray(new["sigma"]), [x[labels == k].std() for k in range(K)], rtol=1e-7
    )


# --- exact-zero probabilities: impossible states get marginal 0, never NaN ------------------
#
# A zero probability makes a log factor -inf; a contraction in log space then holds messages
# that are exactly zero for impossible states, and the derivative of their log (the posterior
# marginals are gradients of log Z) multiplies a zero cotangent by an infinite slope.


def markov_factorial(y):
    init = numpyro.param("init", jnp.ones((2, 3)) / 3, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((2, 3, 3)) / 3, constraint=constraints.simplex)
    W = numpyro.param("W", jnp.zeros((2, 3)))
    states = [None, None]
    for t in markov(range(y.shape[0])):
        for c in range(2):
            probs = init[c] if states[c] is None else trans[c, states[c]]
            states[c] = numpyro.sample(f"z_{c}_{t}", dist.Categorical(probs))
        # A narrow emission: sums of terms far apart in log space underflow to exact zeros.
        numpyro.sample(f"y_{t}", dist.Normal(W[0, states[0]] + W[1, states[1]], 0.15), obs=y[t])


def test_markov_loop_with_exact_zero_probabilities(x64):
    params = {
        # Chain 0 never enters state 2; chain 1 starts in state 0 and never enters state 1.
        "init": np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]),
        "trans": np.array(
            [
                [[0.35, 0.65, 0.0], [0.75, 0.25, 0.0], [0.35, 0.65, 0.0]],
                [[0.6, 0.0, 0.4], [1.0, 0.0, 0.0], [0.8, 0.0, 0.2]],
            ]
        ),
        "W": np.array([[0.0, 2.7, -0.7], [-1.9, 0.7, 2.1]]),
    }
    y = np.array([2.0, 5.9])
    T = y.shape[0]

    def log_joint(z):
        paths = [np.stack([z[f"z_{c}_{t}"] for t in range(T)], axis=1) for c in range(2)]
        with np.errstate(divide="ignore"):
            lp = sum(
                np.log(params["init"][c][paths[c][:, 0]])
                + np.log(params["trans"][c][paths[c][:, :-1], paths[c][:, 1:]]).sum(-1)
                for c in range(2)
            )
        mean = params["W"][0][paths[0]] + params["W"][1][paths[1]]
        return lp + stats.norm.logpdf(y, mean, 0.15).sum(-1)

    latents = {f"z_{c}_{t}": ((), 3) for t in range(T) for c in range(2)}
    check_against_brute_force(markov_factorial, params, (y,), latents, log_joint)


def test_scan_hmm_with_exact_zero_probabilities(x64):
    params = {
        "pi": np.array([1.0, 0.0]),
        "A": np.array([[0.7, 0.3], [0.0, 1.0]]),  # state 1 is absorbing
        "mu": np.array([-1.0, 1.2]),
        "sigma": np.array(0.9),
    }
    x = np.array([-0.9, -1.3, 0.4, 1.5, 0.2])
    T = x.shape[0]

    def log_joint(z):
        path = np.concatenate([z["z0"][:, None], z["z"]], axis=1)
        with np.errstate(divide="ignore"):
            lp = np.log(params["pi"][path[:, 0]])
            lp = lp + np.log(params["A"][path[:, :-1], path[:, 1:]]).sum(-1)
        return lp + stats.norm.logpdf(x, params["mu"][path], params["sigma"]).sum(-1)

    latents = {"z0": ((), 2), "z": ((T - 1,), 2)}
    check_against_brute_force(gaussian_hmm, params, (x,), latents, log_joint)


def categorical_mixture(x):
    w = numpyro.param("w", jnp.ones(3) / 3, constraint=constraints.simplex)
    probs = numpyro.param("probs", jnp.ones((3, 4)) / 4, constraint=constraints.simplex)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Categorical(probs[z]), obs=x)


def test_mixture_with_exact_zero_probabilities(x64):
    params = {
        "w": np.array([0.5, 0.5, 0.0]),  # an empty component
        "probs": np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]]),
    }
    x = np.array([0, 1, 3, 2, 1])

    def log_joint(z):
        with np.errstate(divide="ignore"):
            return (np.log(params["w"][z["z"]]) + np.log(params["probs"][z["z"], x])).sum(-1)

    check_against_brute_force(categorical_mixture, params, (x,), {"z": ((5,), 3)}, log_joint)


# --- wide dynamic range: the terms that carry the mass lie far below each factor's max ------
#
# funsor's log-space einsum shifted each operand by its own max over the summed dims; when
# every term that matters sits more than ~745 (float64) or ~87 (float32) below the sum of
# the two maxima, each exp underflowed to 0 and log Z came out -inf with no error.


def _markov_wide_range_case():
    params = {
        "init": np.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]]),
        # Chain 1 never leaves state 0, where the narrow emission puts almost no mass.
        "trans": np.array(
            [
                [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]],
                [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]],
            ]
        ),
        "W": np.array([[0.0, 0.002, 5.0], [-10.0, 0.0, 7.0]]),
    }
    y = np.array([0.0, 0.001])

    def log_joint(z):
        T = y.shape[0]
        paths = [np.stack([z[f"z_{c}_{t}"] for t in range(T)], axis=1) for c in range(2)]
        with np.errstate(divide="ignore"):
            lp = sum(
                np.log(params["init"][c][paths[c][:, 0]])
                + np.log(params["trans"][c][paths[c][:, :-1], paths[c][:, 1:]]).sum(-1)
                for c in range(2)
            )
        mean = params["W"][0][paths[0]] + params["W"][1][paths[1]]
        return lp + stats.norm.logpdf(y, mean, 0.15).sum(-1)

    latents = {f"z_{c}_{t}": ((), 3) for t in range(y.shape[0]) for c in range(2)}
    return params, (y,), latents, log_joint


def test_markov_loop_with_wide_dynamic_range(x64):
    params, args, latents, log_joint = _markov_wide_range_case()
    expected_ll = brute_force(latents, log_joint)[0]
    assert -1e4 < expected_ll < -1e3  # finite, but far below every factor's maximum
    check_against_brute_force(markov_factorial, params, args, latents, log_joint)


def _two_latents_wide_range_case(scale):
    params = {
        "w1": np.array([0.35, 0.65]),
        # z2 = 2, the only value near the data, is impossible given z1.
        "A": np.array([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]),
        "mu": np.array([[-1.0, 1.0, 0.0], [-1.0, 1.01, 0.0]]),
        "sigma": np.full(3, scale),
    }
    x = np.array([0.0, 0.003, -0.002])

    def log_joint(z):
        z1, z2 = z["z1"], z["z2"]
        with np.errstate(divide="ignore"):
            lp = np.log(params["w1"][z1]) + np.log(params["A"][z1, z2])
        lp = lp + stats.norm.logpdf(x, params["mu"][z1, z2], params["sigma"][z2])
        return lp.sum(-1)

    latents = {"z1": ((3,), 2), "z2": ((3,), 3)}
    return params, (x,), latents, log_joint


def test_two_latents_sharing_a_factor_with_wide_dynamic_range(x64):
    params, args, latents, log_joint = _two_latents_wide_range_case(0.02)
    assert brute_force(latents, log_joint)[0] < -3000
    check_against_brute_force(two_latents, params, args, latents, log_joint)


def test_two_latents_with_wide_dynamic_range_float32(x32):
    # float32's exp underflows below -87: a moderate range already lost every term.
    params, args, latents, log_joint = _two_latents_wide_range_case(0.05)
    assert brute_force(latents, log_joint)[0] < -500
    params32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
    args32 = tuple(np.asarray(a, np.float32) for a in args)
    check_against_brute_force(
        two_latents, params32, args32, latents, log_joint, rtol=1e-5, atol=1e-4
    )


# A scan chain whose reachable states lie far below an unreachable one under a narrow
# emission: an emission shifted by its own max lost every reachable term, and the scan's
# forward pass returned log Z = -inf and all-zero posteriors with no error.
def _scan_hmm_narrow_emission_case(sigma):
    params = {
        "pi": np.array([1.0, 0.0]),
        "A": np.array([[1.0, 0.0], [0.5, 0.5]]),  # the chain never leaves state 0
        "mu": np.array([-1.0, 1.0]),
        "sigma": np.array(sigma),
    }
    x = np.array([-1.0, -0.98, 1.0, -1.02])
    T = x.shape[0]

    def log_joint(z):
        path = np.concatenate([z["z0"][:, None], z["z"]], axis=1)
        with np.errstate(divide="ignore"):
            lp = np.log(params["pi"][path[:, 0]])
            lp = lp + np.log(params["A"][path[:, :-1], path[:, 1:]]).sum(-1)
        return lp + stats.norm.logpdf(x, params["mu"][path], params["sigma"]).sum(-1)

    return params, (x,), {"z0": ((), 2), "z": ((T - 1,), 2)}, log_joint


def test_scan_hmm_with_a_narrow_emission(x64):
    params, args, latents, log_joint = _scan_hmm_narrow_emission_case(0.05)
    assert brute_force(latents, log_joint)[0] < -750
    check_against_brute_force(gaussian_hmm, params, args, latents, log_joint)


def test_scan_hmm_with_a_narrow_emission_float32(x32):
    params, args, latents, log_joint = _scan_hmm_narrow_emission_case(0.1)
    assert brute_force(latents, log_joint)[0] < -150
    params32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
    args32 = tuple(np.asarray(a, np.float32) for a in args)
    check_against_brute_force(
        gaussian_hmm, params32, args32, latents, log_joint, rtol=1e-5, atol=1e-4
    )
