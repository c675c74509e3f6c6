"""MAP-EM: global sites (sample sites that are parameters with priors).

The reference is a scipy maximization of log p(x | theta) + log p(theta), the
first term jaxem's enumerated marginal (``jaxem.log_likelihood`` of the model
with the global sites conditioned on, minus their prior), the second the
priors' ``log_prob``; both in float64, in unconstrained coordinates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

import jaxem
from jaxem import EM
from jaxem.closed_form import registered_closed_forms
from jaxem.conjugate import add_prior_statistics, conjugate_statistics_fn
from jaxem.exceptions import ModelError
from jaxem.gaussian_stats import mvn_loc_solve


def gmm(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(3.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


def poisson_mixture(c, K=2):
    w = numpyro.sample("w", dist.Dirichlet(jnp.array([2.0, 5.0])))
    with numpyro.plate("components", K):
        rate = numpyro.sample("rate", dist.Gamma(jnp.array([2.0, 8.0]), 0.5))
    with numpyro.plate("data", c.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("c", dist.Poisson(rate[z]), obs=c)


def scan_hmm(x, K=2):
    with numpyro.plate("states", K):
        A = numpyro.sample("A", dist.Dirichlet(jnp.array([4.0, 2.0])))
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    z0 = numpyro.sample("z0", dist.Categorical(jnp.ones(K) / K))
    numpyro.sample("x0", dist.Normal(mu[z0], 1.0), obs=x[0])

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def _log_posterior(model, names, params, *args):
    """log p(x | theta) + log p(theta): the model with its global sites conditioned
    on (their prior counted as an observed site's), minus nothing: jaxem's log
    likelihood of that model is the log joint of the data and the global values."""
    fixed = {n: params[n] for n in names}
    free = {n: v for n, v in params.items() if n not in names}
    conditioned = handlers.condition(model, data=fixed)
    if free:
        return jaxem.log_likelihood(conditioned, free, *args)

    def with_a_param(*args):
        # jaxem.log_likelihood evaluates a model with params: one that reaches nothing.
        numpyro.param("unused", jnp.zeros(()))
        conditioned(*args)

    return jaxem.log_likelihood(with_a_param, {"unused": jnp.zeros(())}, *args)


def _log_prior(model, names, params, *args):
    trace = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=params)).get_trace(
        *args
    )
    return sum(jnp.sum(trace[n]["fn"].log_prob(trace[n]["value"])) for n in names)


def _scipy_map(model, names, result, constraints_, *args):
    """Maximize the log posterior with scipy from EM's estimate, perturbed."""
    keys = sorted(result.params)
    shapes = {k: jnp.shape(result.params[k]) for k in keys}
    transforms = {k: biject_to(constraints_[k]) for k in keys}
    unconstrained = [np.ravel(transforms[k].inv(result.params[k])) for k in keys]
    sizes = [u.size for u in unconstrained]
    start = np.concatenate(unconstrained)

    def unpack(vector):
        params, offset = {}, 0
        for k, size in zip(keys, sizes):
            piece = vector[offset : offset + size]
            shape = transforms[k].inverse_shape(shapes[k]) if size else shapes[k]
            params[k] = transforms[k](jnp.reshape(piece, shape))
            offset += size
        return params

    value_and_grad = jax.jit(
        jax.value_and_grad(lambda v: -_log_posterior(model, names, unpack(v), *args))
    )

    def fun(v):
        value, grad = value_and_grad(jnp.asarray(v))
        return float(value), np.asarray(grad, np.float64)

    perturbed = start + 0.05 * np.cos(np.arange(start.size))
    found = scipy.optimize.minimize(
        fun, perturbed, jac=True, method="BFGS", options={"gtol": 1e-10}
    )
    return unpack(jnp.asarray(found.x)), -found.fun


def _check_against_scipy(model, names, result, constraints_, *args):
    reference, best = _scipy_map(model, names, result, constraints_, *args)
    for name, value in reference.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(result.log_posterior, best, rtol=1e-9)
    log_prior = _log_prior(model, names, result.params, *args)
    np.testing.assert_allclose(result.log_prior, log_prior, rtol=1e-10)
    np.testing.assert_allclose(result.log_likelihood, best - log_prior, rtol=1e-9)


def test_gmm_dirichlet_weights_normal_means_match_scipy(x64):
    x = jnp.concatenate(
        [jnp.linspace(-3.0, -1.0, 15), jnp.linspace(1.5, 3.5, 10), jnp.array([0.0])]
    )
    names = ("w", "mu")
    em = EM(gmm, global_sites=names)
    paths = em.m_step_paths(x)
    assert "conjugate prior" in paths["w"] and "conjugate prior" in paths["mu"], paths
    assert paths["sigma"].startswith("closed-form"), paths
    result = em.run(jax.random.PRNGKey(1), x, max_iter=2000, tol=1e-13)
    assert bool(result.converged)
    assert result.params["mu"][0] * result.params["mu"][1] < 0  # the two clusters
    assert np.all(np.diff(result.history[: int(result.num_iters)]) > -1e-9)  # monotone
    constraints_ = {
        "w": constraints.simplex,
        "mu": constraints.real,
        "sigma": constraints.positive,
    }
    _check_against_scipy(gmm, names, result, constraints_, x)
    # The public functions evaluate the model with its global sites as params.
    fitted = jaxem.with_global_sites(gmm, names)
    np.testing.assert_allclose(
        jaxem.log_likelihood(fitted, result.params, x), result.log_likelihood, rtol=1e-10
    )
    responsibilities = jaxem.posterior(fitted, result.params, x)["z"]
    np.testing.assert_allclose(responsibilities.sum(-1), 1.0, rtol=1e-10)
    # Per observation: the priors belong to no data point.
    per_point = jaxem.log_likelihood(fitted, result.params, x, per_observation=True)
    assert per_point.shape == x.shape
    np.testing.assert_allclose(jnp.sum(per_point), result.log_likelihood, rtol=1e-10)
    # BIC under MAP: the data's log-likelihood at the MAP estimate; w counts K - 1,
    # mu K, sigma 1; the global sites are no observations.
    bic = jaxem.bic(gmm, result.params, x, global_sites=names)
    np.testing.assert_allclose(bic, -2 * result.log_likelihood + 4 * np.log(x.shape[0]))
    aic = jaxem.aic(gmm, result.params, x, global_sites=names)
    np.testing.assert_allclose(aic, -2 * result.log_likelihood + 2 * 4)


def test_poisson_mixture_gamma_priors_match_scipy(x64):
    c = jnp.array([0, 1, 2, 1, 0, 3, 9, 12, 10, 8, 11, 15, 7, 1, 2], jnp.float64)
    names = ("w", "rate")
    em = EM(poisson_mixture, global_sites=names)
    paths = em.m_step_paths(c)
    assert all("conjugate prior" in paths[n] for n in names), paths
    result = em.run(jax.random.PRNGKey(0), c, max_iter=2000, tol=1e-13)
    assert bool(result.converged)
    constraints_ = {"w": constraints.simplex, "rate": constraints.positive}
    _check_against_scipy(poisson_mixture, names, result, constraints_, c)


def test_scan_hmm_dirichlet_transition_rows_match_scipy(x64):
    x = jnp.array([-1.2, -0.8, -1.1, 0.9, 1.3, 1.0, 1.1, -0.9, -1.4, -1.0, 1.2, 0.7])
    em = EM(scan_hmm, global_sites=("A",))
    paths = em.m_step_paths(x)
    assert "conjugate prior" in paths["A"], paths
    result = em.run(jax.random.PRNGKey(0), x, max_iter=2000, tol=1e-13)
    assert bool(result.converged)
    constraints_ = {"A": constraints.simplex, "mu": constraints.real}
    _check_against_scipy(scan_hmm, ("A",), result, constraints_, x)


def _mixture_data():
    return jnp.concatenate([jnp.linspace(-3.0, -1.0, 6), jnp.linspace(1.5, 3.5, 6)])


def test_a_continuous_site_not_named_lists_the_choices():
    with pytest.raises(ModelError, match=r"global_sites=\('w',\).*jaxem\.MCEM or jaxem\.SAEM"):
        EM(gmm, global_sites=("mu",)).run(jax.random.PRNGKey(0), _mixture_data())


def test_an_unknown_global_site_is_named():
    with pytest.raises(ModelError, match="global_sites names 'mus', which is not a sample site"):
        EM(gmm, global_sites=("w", "mus")).run(jax.random.PRNGKey(0), _mixture_data())


def test_a_param_named_as_global_site():
    with pytest.raises(ModelError, match="'sigma', which is a numpyro.param site"):
        EM(gmm, global_sites=("w", "mu", "sigma")).run(jax.random.PRNGKey(0), _mixture_data())


def test_a_global_site_inside_the_data_plate():
    def model(x):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        with numpyro.plate("data", x.shape[0]):
            shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(jnp.array([-2.0, 2.0])[z] + shift, 1.0), obs=x)

    with pytest.raises(ModelError, match="global site 'shift' is inside plate 'data'"):
        EM(model, global_sites=("w", "shift")).run(jax.random.PRNGKey(0), _mixture_data())


def _poisson_mixture_with_param(c, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    with numpyro.plate("components", K):
        rate = numpyro.sample("rate", dist.Gamma(jnp.array([2.0, 8.0]), 0.5))
    with numpyro.plate("data", c.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("c", dist.Poisson(rate[z]), obs=c)


# VariationalBayesEM started a fit from such a value and returned a NaN ELBO (a
# negative Gamma draw), or took a Dirichlet point off the simplex without a word.
@pytest.mark.parametrize("fitter", [EM, jaxem.VariationalBayesEM])
@pytest.mark.parametrize(
    "model, global_sites, init_params, message",
    [
        (
            poisson_mixture,
            ("w", "rate"),
            {"rate": jnp.array([-1.0, 5.0])},
            r"global site 'rate' .* outside the support of its prior, Positive",
        ),
        (
            poisson_mixture,
            ("w", "rate"),
            {"w": jnp.array([0.7, 0.7])},
            r"global site 'w' .* outside the support of its prior, Simplex",
        ),
        (
            _poisson_mixture_with_param,
            ("rate",),
            {"w": jnp.array([1.5, -0.5])},
            r"param 'w' .* outside its constraint Simplex",
        ),
    ],
)
def test_an_initial_value_outside_the_prior_support(
    fitter, model, global_sites, init_params, message
):
    c = jnp.array([0.0, 1.0, 9.0, 12.0])
    with pytest.raises(ModelError, match=message):
        fitter(model, global_sites=global_sites).run(
            jax.random.PRNGKey(0), c, init_params=init_params
        )


def test_an_improper_prior_on_a_global_site_is_named():
    # NumPyro cannot draw from it: a bare NotImplementedError from numpyro.sample.
    def model(c):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        with numpyro.plate("components", 2):
            rate = numpyro.sample("rate", dist.ImproperUniform(constraints.positive, (), ()))
        with numpyro.plate("data", c.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("c", dist.Poisson(rate[z]), obs=c)

    c = jnp.array([0.0, 1.0, 9.0, 12.0])
    with pytest.raises(
        ModelError, match=r"global site 'rate' has an improper prior .*numpyro.param\('rate'"
    ):
        EM(model, global_sites=("w", "rate")).run(
            jax.random.PRNGKey(0), c, init_params={"rate": jnp.array([1.0, 9.0])}
        )


def test_a_factor_prior_points_to_global_sites():
    def model(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        numpyro.factor("prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    with pytest.raises(ModelError, match="global_sites"):
        EM(model).run(jax.random.PRNGKey(0), _mixture_data())


def test_a_non_conjugate_prior_takes_gradient_steps_on_the_log_posterior(x64):
    def model(x):
        w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(2)))
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], scale), obs=x)

    x = _mixture_data()
    em = EM(model, global_sites=("w", "scale"))
    paths = em.m_step_paths(x)
    assert paths["scale"].startswith("gradient (its prior (LogNormal at site 'scale') has no "), (
        paths
    )
    result = em.run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    assert bool(result.converged)

    # Stationary for the log posterior (written out, independently of jaxem).
    def log_posterior(log_scale):
        w, mu = result.params["w"], result.params["mu"]
        scale = jnp.exp(log_scale)
        per_component = jnp.log(w) + dist.Normal(mu, scale).log_prob(x[:, None])
        log_prior = dist.Dirichlet(2.0 * jnp.ones(2)).log_prob(w) + dist.LogNormal(
            0.0, 1.0
        ).log_prob(scale)
        return jax.nn.logsumexp(per_component, axis=-1).sum() + log_prior

    log_scale = jnp.log(result.params["scale"])
    np.testing.assert_allclose(jax.grad(log_posterior)(log_scale), 0.0, atol=1e-6)
    np.testing.assert_allclose(result.log_posterior, log_posterior(log_scale), rtol=1e-10)
    assert result.log_prior < 0 and np.isclose(
        result.log_posterior, result.log_likelihood + result.log_prior
    )


def test_variational_em_fits_global_sites(x64):
    x = _mixture_data()
    vem = jaxem.VariationalEM(gmm, global_sites=("w", "mu"))
    result = vem.run(jax.random.PRNGKey(1), x, max_iter=300, tol=1e-12)
    assert bool(result.converged)
    # Mean field is exact for a mixture (one latent per point): the ELBO is the log
    # posterior, the data's log-likelihood plus the log prior, reported apart.
    log_prior = _log_prior(gmm, ("w", "mu"), result.params, x)
    np.testing.assert_allclose(result.log_prior, log_prior, rtol=1e-10)
    np.testing.assert_allclose(result.elbo, result.log_likelihood + log_prior, rtol=1e-8)
    fitted = jaxem.with_global_sites(gmm, ("w", "mu"))
    np.testing.assert_allclose(
        result.log_likelihood, jaxem.log_likelihood(fitted, result.params, x), rtol=1e-10
    )


def test_online_em_global_sites_need_num_data():
    # Online MAP-EM itself is tested against batch MAP-EM in test_online.py.
    with pytest.raises(ModelError, match=r"needs num_data=N, the number of data points"):
        jaxem.OnlineEM(gmm, global_sites=("w", "mu"))


def test_a_prior_wider_than_the_argument_support():
    def model(x):
        s = numpyro.sample("s", dist.Normal(1.0, 0.1))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], s), obs=x)

    with pytest.raises(
        ModelError,
        match="global site 's' has a prior whose support .* must satisfy constraints.positive",
    ):
        EM(model, global_sites=("s",)).run(jax.random.PRNGKey(0), _mixture_data())


@pytest.mark.parametrize(
    "prior, likelihood, stats, q",
    [
        # (sum w x, sum w) of a Bernoulli: Q(p) = s1 log p + (s0 - s1) log(1 - p).
        (
            dist.Beta(2.5, 4.0),
            (dist.BernoulliProbs, "probs"),
            (3.2, 7.5),
            lambda p, s: s[0] * jnp.log(p) + (s[1] - s[0]) * jnp.log1p(-p),
        ),
        # (sum w, sum w x) of an Exponential: Q(rate) = s0 log rate - rate s1.
        (
            dist.Gamma(3.0, 2.0),
            (dist.Exponential, "rate"),
            (4.0, 6.5),
            lambda r, s: s[0] * jnp.log(r) - r * s[1],
        ),
        # (sum w alpha, sum w x) of a Gamma's rate: Q(rate) = s0 log rate - rate s1.
        (
            dist.Gamma(1.5, 0.5),
            (dist.Gamma, "rate"),
            (9.0, 4.0),
            lambda r, s: s[0] * jnp.log(r) - r * s[1],
        ),
    ],
    ids=["beta-bernoulli", "gamma-exponential", "gamma-gamma"],
)
def test_a_conjugate_solve_maximizes_q_plus_the_log_prior(x64, prior, likelihood, stats, q):
    stats = tuple(jnp.array([v]) for v in stats)
    pseudo = conjugate_statistics_fn(type(prior), {likelihood})
    update = registered_closed_forms()[likelihood[0]][likelihood[1]]
    solved = update.solve_fn(add_prior_statistics(pseudo, stats, prior), jnp.array([0.5]), 0.0)
    to_value = biject_to(prior.support)
    found = scipy.optimize.minimize_scalar(
        lambda u: -float(q(to_value(u), stats).sum() + prior.log_prob(to_value(u)))
    )
    np.testing.assert_allclose(solved[0], to_value(found.x), rtol=1e-6)


@pytest.mark.parametrize("prior_cls", [dist.Normal, dist.MultivariateNormal])
def test_a_gaussian_prior_on_a_multivariate_loc_is_its_posterior_mode(x64, prior_cls):
    # Expected statistics (sum w P x, sum w P) of a MultivariateNormal loc, and the
    # Gaussian prior's pseudo-statistics: the solve is the Gaussian posterior's mode.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 2))
    den = jnp.asarray(a @ a.T + 2 * np.eye(2))[None]
    num = jnp.asarray(rng.normal(size=(1, 2)))
    m0, s0 = jnp.array([0.5, -1.0]), jnp.array([2.0, 3.0])
    if prior_cls is dist.Normal:
        prior = dist.Normal(m0, s0).to_event(1)
    else:
        prior = dist.MultivariateNormal(m0, jnp.diag(s0**2))
    pseudo = conjugate_statistics_fn(prior_cls, {(dist.MultivariateNormal, "loc")})
    stats = add_prior_statistics(pseudo, (num, den), prior)
    mode = mvn_loc_solve(stats, jnp.zeros((1, 2)), 0.0)
    precision = np.diag(1 / np.asarray(s0) ** 2)
    expected = np.linalg.solve(den[0] + precision, num[0] + precision @ np.asarray(m0))
    np.testing.assert_allclose(mode[0], expected, rtol=1e-12)


# -- priors on variances: Wishart / InverseWishart closed forms, the rest gradient -----


def _mvn_mixture_data():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 2)) @ np.array([[1.0, 0.4], [0.0, 0.7]]) + [2.0, 1.0]
    b = rng.normal(size=(9, 2)) * 0.6 - [1.5, 1.0]
    return jnp.asarray(np.concatenate([a, b]))


def mvn_wishart(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    mu = numpyro.param("mu", jnp.array([[1.0, 0.5], [-1.0, -0.5]]))
    with numpyro.plate("components", K):
        lam = numpyro.sample(
            "lam", dist.Wishart(5.0, scale_matrix=jnp.array([[0.5, 0.1], [0.1, 0.4]]))
        )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=lam[z]), obs=x)


def mvn_inverse_wishart(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    mu = numpyro.param("mu", jnp.array([[1.0, 0.5], [-1.0, -0.5]]))
    with numpyro.plate("components", K):
        sigma = numpyro.sample(
            "sigma", dist.InverseWishart(4.0, jnp.array([[0.8, 0.2], [0.2, 1.2]]))
        )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], covariance_matrix=sigma[z]), obs=x)


@pytest.mark.slow  # a full fit and a scipy maximization per prior (about 30 s); fast below
@pytest.mark.parametrize(
    "model, site",
    [(mvn_wishart, "lam"), (mvn_inverse_wishart, "sigma")],
    ids=["wishart", "inverse-wishart"],
)
def test_a_wishart_prior_on_a_precision_or_covariance_is_closed_form(x64, model, site):
    """A Wishart prior on a MultivariateNormal's precision_matrix, an InverseWishart
    on its covariance_matrix: closed form, and the MAP of a scipy maximization."""
    x = _mvn_mixture_data()
    names = ("w", site)
    em = EM(model, global_sites=names, reg_covar=0.0)
    paths = em.m_step_paths(x)
    assert "conjugate prior" in paths[site] and paths[site].startswith("closed-form"), paths
    result = em.run(jax.random.PRNGKey(0), x, max_iter=1000, tol=1e-13)
    assert bool(result.converged)
    constraints_ = {
        "w": constraints.simplex,
        "mu": constraints.real_vector,
        site: constraints.positive_definite,
    }
    _check_against_scipy(model, names, result, constraints_, x)


@pytest.mark.parametrize(
    "prior, argument",
    [
        (dist.Wishart(5.0, scale_matrix=jnp.array([[0.5, 0.1], [0.1, 0.4]])), "precision_matrix"),
        (dist.InverseWishart(4.0, jnp.array([[0.8, 0.2], [0.2, 1.2]])), "covariance_matrix"),
    ],
    ids=["wishart-precision", "inverse-wishart-covariance"],
)
def test_a_wishart_solve_maximizes_q_plus_the_log_prior(x64, prior, argument):
    """The closed form from the expected statistics (scatter, count) plus the prior's
    pseudo-statistics is the maximum of Q + log prior found by scipy."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 2))
    scatter, count = jnp.asarray(a @ a.T + np.eye(2))[None], jnp.full((1, 2, 2), 3.5)
    pseudo = conjugate_statistics_fn(type(prior), {(dist.MultivariateNormal, argument)})
    update = registered_closed_forms()[dist.MultivariateNormal][argument]
    stats = add_prior_statistics(pseudo, (scatter, count), prior)
    solved = update.solve_fn(stats, jnp.eye(2)[None], 0.0)[0]

    def q(matrix):  # Q of a Gaussian's precision or covariance from (scatter, count)
        precision = matrix if argument == "precision_matrix" else jnp.linalg.inv(matrix)
        return 0.5 * count[0, 0, 0] * jnp.linalg.slogdet(precision)[1] - 0.5 * jnp.trace(
            scatter[0] @ precision
        )

    to_value = biject_to(constraints.positive_definite)
    objective = jax.jit(
        jax.value_and_grad(lambda u: -(q(to_value(u)) + prior.log_prob(to_value(u))))
    )
    found = scipy.optimize.minimize(
        lambda u: tuple(np.asarray(v, np.float64) for v in objective(jnp.asarray(u))),
        np.zeros(3),
        jac=True,
        method="BFGS",
        options={"gtol": 1e-10},
    )
    np.testing.assert_allclose(solved, to_value(jnp.asarray(found.x)), rtol=1e-6)


def test_wishart_priors_on_gaussian_covariances_are_closed_form_paths(x64):
    x = _mvn_mixture_data()
    for model, site in ((mvn_wishart, "lam"), (mvn_inverse_wishart, "sigma")):
        paths = EM(model, global_sites=("w", site)).m_step_paths(x)
        assert paths[site].startswith("closed-form (conjugate prior:"), paths
