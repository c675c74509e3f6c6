"""Online EM (Cappé and Moulines 2009) against batch EM."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from models import gmm_scale_tril, normal_mixture
from numpyro.distributions import constraints
from scipy import stats

import jaxem
from jaxem import EM, OnlineEM
from jaxem.online import power_decay

N, BATCH = 20000, 1000
INIT = {"mu": [[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]}


def _data():
    rng = np.random.default_rng(0)
    z = rng.choice(3, N, p=[0.5, 0.3, 0.2])
    centers = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    return rng.normal(size=(N, 2)) @ np.array([[1.0, 0.3], [0.0, 0.8]]) + centers[z]


def _epochs(x, num_epochs, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(num_epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH):
            yield jnp.asarray(x[order[start : start + BATCH]]), 3


def test_online_em_converges_to_the_batch_optimum(x64):
    """20 minibatches of 1000 points per epoch, 10 epochs (200 updates, step size
    (t + 1)^-0.6): within 5e-5 nats per point of the batch-EM optimum, parameters within
    0.02 (measured: 8.5e-6 nats per point, 4e-3)."""
    x = _data()
    init = {k: jnp.asarray(v) for k, v in INIT.items()}
    batch = EM(gmm_scale_tril).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 3, max_iter=300, tol=1e-12, init_params=init
    )
    assert bool(batch.converged)
    online = OnlineEM(gmm_scale_tril).run(jax.random.PRNGKey(0), _epochs(x, 10), init_params=init)
    assert online.log_likelihoods.shape == (200,)
    full = float(jaxem.log_likelihood(gmm_scale_tril, online.params, jnp.asarray(x), 3))
    gap = (float(batch.log_likelihood) - full) / N
    assert -1e-9 < gap < 5e-5, gap
    for name, value in batch.params.items():
        np.testing.assert_allclose(np.asarray(online.params[name]), np.asarray(value), atol=0.02)
    # The start was far: the first minibatches fit much worse than the last.
    lls = np.asarray(online.log_likelihoods)
    assert lls[:5].mean() < lls[-20:].mean() - 0.1 * BATCH


def test_first_update_is_a_batch_em_step_on_the_minibatch(x64):
    """gamma_0 = 1: the first update solves from the first minibatch's statistics alone,
    which is exactly one batch-EM step on that minibatch."""
    x = jnp.asarray(_data()[:BATCH])
    init = {k: jnp.asarray(v) for k, v in INIT.items()}
    online = OnlineEM(gmm_scale_tril)
    state, ll_online = online.update(
        online.init(jax.random.PRNGKey(0), x, 3, init_params=init), x, 3
    )
    em = EM(gmm_scale_tril)
    em_state, ll_em = em.update(em.init(jax.random.PRNGKey(0), x, 3, init_params=init), x, 3)
    np.testing.assert_allclose(float(ll_online), float(ll_em), rtol=1e-12)
    for name, value in em_state.params.items():
        np.testing.assert_allclose(np.asarray(state.params[name]), np.asarray(value), rtol=1e-10)
    # The running statistics are per-point averages: the weights' counts sum to 1.
    (counts,) = state.statistics["w"]
    np.testing.assert_allclose(float(jnp.sum(counts)), 1.0, rtol=1e-12)


def test_online_em_follows_the_step_size_schedule(x64):
    """s_t = (1 - gamma_t) s_{t-1} + gamma_t s_bar(Y_t; theta_{t-1}) with the user's
    schedule: with only the mixture weights free, w_t is s_t itself (the average
    responsibilities), replayed here with scipy over three minibatches."""
    rng = np.random.default_rng(8)
    batches = [rng.normal(rng.choice([-2.0, 0.0, 2.0], 100, p=[0.6, 0.3, 0.1])) for _ in range(3)]
    gammas = [1.0, 0.3, 0.2]
    mu, sigma = np.array([-2.0, 0.0, 2.0]), np.ones(3)
    init = {"mu": jnp.asarray(mu), "w": jnp.array([0.2, 0.3, 0.5])}
    online = OnlineEM(
        normal_mixture, step_size=lambda t: jnp.asarray(gammas)[t], frozen=("mu", "sigma")
    )
    result = online.run(
        jax.random.PRNGKey(0), [(jnp.asarray(b), 3) for b in batches], init_params=init
    )
    w, s = np.asarray(init["w"]), np.zeros(3)
    for gamma, x in zip(gammas, batches):
        joint = stats.norm.logpdf(x[:, None], mu, sigma) + np.log(w)
        resp = np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True))
        s = (1 - gamma) * s + gamma * resp.mean(0)
        w = s / s.sum()
    np.testing.assert_allclose(np.asarray(result.params["w"]), w, rtol=1e-10)


# Means mu_k = a + b k are affine in (a, b), a weighted least-squares closed form
# (jaxem.affine): m_step sends a and b to optax steps.
GRID_BY_GRADIENT = {"a": "gradient", "b": "gradient"}


def grid_means(x):
    """Means mu_k = a + b k: ``a`` and ``b`` take optax steps (GRID_BY_GRADIENT), w and
    sigma closed form."""
    w = numpyro.param("w", jnp.ones(3) / 3, constraint=constraints.simplex)
    a = numpyro.param("a", jnp.array(-1.0))
    b = numpyro.param("b", jnp.array(1.0))
    sigma = numpyro.param("sigma", jnp.ones(3), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        mu = a + b * jnp.arange(3)
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def test_online_em_with_gradient_parameters(x32):
    """Mixed closed-form and optax updates reach the batch-EM optimum: within 0.1 after 64
    minibatches (measured 0.06)."""
    rng = np.random.default_rng(2)
    x = rng.normal(np.array([-4.0, 0.0, 4.0])[rng.integers(0, 3, 4000)], 1.0).astype(np.float32)
    init = {"a": jnp.array(-3.0), "b": jnp.array(3.0)}
    batch = EM(grid_means, m_step=GRID_BY_GRADIENT).run(
        jax.random.PRNGKey(0), jnp.asarray(x), max_iter=300, init_params=init
    )
    paths = EM(grid_means, m_step=GRID_BY_GRADIENT).m_step_paths(jnp.asarray(x))
    assert paths["a"] == "gradient (m_step={'a': 'gradient'})"
    batches = [(jnp.asarray(x[i : i + 500]),) for i in range(0, 4000, 500)]
    online = OnlineEM(
        grid_means, optimizer=optax.adam(0.05), m_step_iters=5, m_step=GRID_BY_GRADIENT
    )
    result = online.run(jax.random.PRNGKey(0), itertools.chain(*[batches] * 8), init_params=init)
    for name, value in batch.params.items():
        np.testing.assert_allclose(np.asarray(result.params[name]), np.asarray(value), atol=0.1)


def test_online_gradient_step_is_per_data_point(x64):
    """The optax step of a parameter without a closed form follows the gradient of the
    expected complete-data log-likelihood per data point, so plain SGD takes the same step
    whatever the minibatch size: one update is lr times that gradient (here from scipy
    responsibilities, w and sigma frozen), and a minibatch repeated twice gives the same."""
    rng = np.random.default_rng(3)
    x = rng.normal(np.array([-4.0, 0.0, 4.0])[rng.integers(0, 3, 200)], 1.0)
    a0, b0, lr = -3.0, 3.0, 0.1
    init = {"a": jnp.array(a0), "b": jnp.array(b0)}
    online = OnlineEM(
        grid_means, optimizer=optax.sgd(lr), frozen=("w", "sigma"), m_step=GRID_BY_GRADIENT
    )

    def one_update(data):
        data = jnp.asarray(data)
        state = online.init(jax.random.PRNGKey(0), data, init_params=init)
        return online.update(state, data)[0].params

    mu = a0 + b0 * np.arange(3)
    joint = stats.norm.logpdf(x[:, None], mu, 1.0) + np.log(1 / 3)
    resp = np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True))
    # dQ/dmu_k per data point, chained through mu_k = a + b k.
    dmu = np.mean(resp * (x[:, None] - mu), axis=0)
    params = one_update(x)
    np.testing.assert_allclose(float(params["a"]), a0 + lr * dmu.sum(), rtol=1e-10)
    np.testing.assert_allclose(float(params["b"]), b0 + lr * (dmu * np.arange(3)).sum(), rtol=1e-10)
    doubled = one_update(np.concatenate([x, x]))
    for name in ("a", "b"):
        np.testing.assert_allclose(float(doubled[name]), float(params[name]), rtol=1e-12)


def test_bad_online_arguments():
    with pytest.raises(ValueError, match=r"kappa must be in \(0.5, 1\]"):
        power_decay(0.4)
    with pytest.raises(ValueError, match="OnlineEM.run got no minibatches"):
        OnlineEM(gmm_scale_tril).run(jax.random.PRNGKey(0), [])


def test_online_em_names_bad_data_and_initial_values():
    x = jnp.asarray(_data()[:200], jnp.float32)
    bad = x.at[150, 0].set(jnp.nan)
    online = OnlineEM(gmm_scale_tril)
    key = jax.random.PRNGKey(0)
    # NaN in the first minibatch (init) and in a later one (run) both name the site.
    with pytest.raises(jaxem.ModelError, match="observed site 'x' contains 1 NaN"):
        online.init(key, bad[100:], 3)
    with pytest.raises(jaxem.ModelError, match="observed site 'x' contains 1 NaN"):
        online.run(key, [(x[:100], 3), (bad[100:], 3)])
    with pytest.raises(jaxem.ModelError, match="value of param 'w' is not finite or lies outside"):
        online.init(key, x[:100], 3, init_params={"w": jnp.array([0.5, 0.6, 0.1])})


def test_non_finite_updates_are_rejected_and_reported(x32):
    """A first minibatch of zeros with reg_covar=0 collapses both variances to 0; every
    later minibatch's log-likelihood is then NaN. Zeros, not another constant: the
    statistics are sums of products with 0, exactly 0 whatever the compiler's rounding
    (with ones, -O0's rounding left a variance of ~1e-8 and the next updates finite).
    The running statistics used to turn NaN and the run reported nothing; now those
    updates are rejected, counted and warned."""
    rng = np.random.default_rng(0)
    good = jnp.asarray(np.concatenate([rng.normal(-3, 1, 20), rng.normal(3, 1, 20)]))
    online = OnlineEM(normal_mixture, reg_covar=0.0)
    batches = [(jnp.zeros(40), 2), (good, 2), (good, 2)]
    init = {"mu": jnp.array([-3.0, 3.0])}
    with pytest.warns(
        jaxem.ConvergenceWarning,
        match=r"OnlineEM diverged: 2 of 3 minibatch updates were rejected \(the first at "
        r"minibatch 1.*reg_covar > 0",
    ):
        result = online.run(jax.random.PRNGKey(0), batches, init_params=init)
    assert bool(result.diverged) and int(result.num_rejected) == 2
    assert int(result.state.num_rejected) == 2 and int(result.state.iteration) == 1
    for leaf in jax.tree.leaves((result.state.params, result.state.statistics)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # update: a rejected update hands the state back, num_rejected one higher.
    state, log_lik = online.update(result.state, good, 2)
    assert not np.isfinite(float(log_lik)) and int(state.num_rejected) == 3
    for before, after in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    # Going on from the state counts this run's rejections only.
    with pytest.warns(jaxem.ConvergenceWarning, match="1 of 1 minibatch"):
        again = online.run(jax.random.PRNGKey(0), [(good, 2)], state=state)
    assert int(again.num_rejected) == 1


def test_an_online_run_without_rejections_does_not_warn(x32):
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(np.concatenate([rng.normal(-3, 1, 20), rng.normal(3, 1, 20)])), 2)
        for _ in range(3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxem.ConvergenceWarning)
        result = OnlineEM(normal_mixture).run(
            jax.random.PRNGKey(0), batches, init_params={"mu": jnp.array([-3.0, 3.0])}
        )
    assert not bool(result.diverged) and int(result.num_rejected) == 0


# -- the checks after an online fit that EM.run makes too --------------------------------------


def scaled_probability(x):
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    c = numpyro.param("c", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Bernoulli(p * c), obs=x)


def test_online_fit_that_pushes_a_probability_above_one_is_an_error(x32):
    # All ones: the likelihood grows with p * c up to 1 and beyond, where NumPyro clamps
    # it; every update stays finite and used to be kept without a word.
    online = OnlineEM(scaled_probability, optimizer=optax.adam(0.2))
    match = (
        r"argument 'probs' of Bernoulli at site 'x' lies outside its support .* at the "
        r"fitted parameter values.*computed from param\(s\) \['c', 'p'\]"
    )
    with pytest.raises(jaxem.ModelError, match=match):
        online.run(jax.random.PRNGKey(0), [(jnp.ones(20),)] * 20)
    # Inside the support (p * c = 0.9 is the maximum) the same model fits.
    x = jnp.asarray((np.arange(20) % 10 != 0).astype(np.float32))
    result = online.run(jax.random.PRNGKey(0), [(x,)] * 20)
    assert float(result.params["p"] * result.params["c"]) <= 1.0


def test_online_variance_held_by_reg_covar_warns(x32):
    # Two clusters at scale 1e-4 (variance 1e-7): reg_covar=1e-6 holds both sigmas up.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3.0, 1.0, 60), rng.normal(3.0, 1.0, 60)]) * 1e-4
    batches = [(jnp.asarray(rng.permutation(x)[:40]), 2) for _ in range(5)]
    init = {"mu": jnp.array([-3e-4, 3e-4]), "sigma": jnp.full(2, 1e-4)}
    with pytest.warns(jaxem.NumericalWarning) as record:
        OnlineEM(normal_mixture).run(jax.random.PRNGKey(0), batches, init_params=init)
    messages = [str(w.message) for w in record if issubclass(w.category, jaxem.NumericalWarning)]
    assert any("reg_covar=1e-06 is not small against the data of site 'x'" in m for m in messages)
    assert any(
        "fitted variance of param 'sigma' (site 'x')" in m and "reg_covar=1e-06" in m
        for m in messages
    )


# -- MAP: global sites (parameters with priors) -------------------------------------


def map_gmm(x, K=2):
    """Conjugate priors (closed form): Dirichlet weights, Normal means; sigma a param."""
    w = numpyro.sample("w", dist.Dirichlet(jnp.array([30.0, 30.0])))
    with numpyro.plate("components", K):
        mu = numpyro.sample("mu", dist.Normal(jnp.array([-0.5, 1.5]), 0.15))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


def ml_gmm(x, K=2):
    """map_gmm without the priors (maximum likelihood)."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


def test_online_map_em_approaches_batch_map_em(x64):
    """Online MAP-EM: the running statistics per data point plus the priors'
    pseudo-statistics over num_data (the prior counts once for the data set) reach the
    batch MAP-EM fit. 400 points in minibatches of 40, 20 shuffled epochs, step size
    (t + 1)^-0.6: within 0.01 (measured 1.6e-3 for the means, 2e-4 for sigma, 2e-5 for
    the weights), while the maximum-likelihood fit is 0.03 to 0.3 away."""
    num, size = 400, 40
    rng = np.random.default_rng(0)
    x = np.where(rng.random(num) < 0.3, 2.0, -1.0) + rng.normal(size=num)
    init = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([-0.5, 0.5]), "sigma": jnp.asarray(1.0)}
    names = ("w", "mu")
    batch = EM(map_gmm, global_sites=names).run(
        jax.random.PRNGKey(0), jnp.asarray(x), max_iter=2000, tol=1e-12, init_params=init
    )
    assert bool(batch.converged)
    ml = EM(ml_gmm).run(
        jax.random.PRNGKey(0), jnp.asarray(x), max_iter=2000, tol=1e-12, init_params=init
    )

    def epochs(count, seed=1):
        order_rng = np.random.default_rng(seed)
        for _ in range(count):
            order = order_rng.permutation(num)
            for start in range(0, num, size):
                yield (jnp.asarray(x[order[start : start + size]]),)

    online = OnlineEM(map_gmm, global_sites=names, num_data=num)
    assert "conjugate prior" in EM(map_gmm, global_sites=names).m_step_paths(x[:size])["mu"]
    result = online.run(jax.random.PRNGKey(0), epochs(20), init_params=init)
    for name, value in batch.params.items():
        np.testing.assert_allclose(np.asarray(result.params[name]), np.asarray(value), atol=0.01)
        gap = np.max(np.abs(np.asarray(ml.params[name]) - np.asarray(value)))
        assert gap > 0.025, (name, gap)  # the prior matters at this tolerance
    # The minibatches' log-likelihoods are the data's, without the log prior.
    last = jnp.asarray(x[:size])
    state, log_lik = online.update(result.state, last)
    fitted = jaxem.with_global_sites(map_gmm, names)
    np.testing.assert_allclose(
        log_lik, jaxem.log_likelihood(fitted, result.state.params, last), rtol=1e-10
    )


def grid_prior(x):
    """grid_means with a Normal prior on ``a`` (a ridge term of the closed form, unless
    m_step sends a and b to optax steps)."""
    w = numpyro.param("w", jnp.ones(3) / 3, constraint=constraints.simplex)
    a = numpyro.sample("a", dist.Normal(-2.0, 0.5))
    b = numpyro.param("b", jnp.array(1.0))
    sigma = numpyro.param("sigma", jnp.ones(3), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        mu = a + b * jnp.arange(3)
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def test_online_map_gradient_step_weighs_the_prior_once(x64):
    """A global site without a closed form takes optax steps on Q per data point plus
    its log prior over num_data: one plain-SGD update is lr times that gradient."""
    rng = np.random.default_rng(3)
    x = rng.normal(np.array([-4.0, 0.0, 4.0])[rng.integers(0, 3, 200)], 1.0)
    a0, b0, lr, num = -3.0, 3.0, 0.1, 5000
    init = {"a": jnp.array(a0), "b": jnp.array(b0)}
    online = OnlineEM(
        grid_prior,
        optimizer=optax.sgd(lr),
        frozen=("w", "sigma"),
        global_sites=("a",),
        num_data=num,
        m_step=GRID_BY_GRADIENT,
    )
    assert online.m_step_paths(jnp.asarray(x))["a"] == "gradient (m_step={'a': 'gradient'})"
    state = online.init(jax.random.PRNGKey(0), jnp.asarray(x), init_params=init)
    params = online.update(state, jnp.asarray(x))[0].params
    mu = a0 + b0 * np.arange(3)
    joint = stats.norm.logpdf(x[:, None], mu, 1.0) + np.log(1 / 3)
    resp = np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True))
    dmu = np.mean(resp * (x[:, None] - mu), axis=0)
    d_prior = (-2.0 - a0) / 0.5**2  # d log N(a | -2, 0.5) / da
    np.testing.assert_allclose(
        float(params["a"]), a0 + lr * (dmu.sum() + d_prior / num), rtol=1e-10
    )


def test_online_map_needs_num_data():
    with pytest.raises(
        jaxem.ModelError, match=r"OnlineEM with global_sites \('w', 'mu'\) needs num_data"
    ):
        OnlineEM(map_gmm, global_sites=("w", "mu"))
    with pytest.raises(ValueError, match="num_data must be a positive number"):
        OnlineEM(map_gmm, global_sites=("w", "mu"), num_data=0)
    with pytest.raises(ValueError, match="num_data weighs the priors of global_sites"):
        OnlineEM(ml_gmm, num_data=400)
