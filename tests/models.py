"""NumPyro models shared by several test modules.

Only models that several tests write identically live here; a model that one module
uses, or that differs in a detail that matters (an initial value, a default argument),
stays next to its tests. Module-level functions, so jit caches keyed on the model are
shared between tests. The models from ``latent_class`` on are members of the zoo of
``test_properties.py`` too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

import jaxem


def normal_mixture(x, K):
    """Univariate Gaussian mixture; means start at 0, scales at 1, weights uniform."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def normal_mixture_spread(x, K=2):
    """As :func:`normal_mixture`, but the means start spread over [-1, 1] (so the
    default start is not a symmetric fixed point) and K defaults to 2."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


# The (K, D, D) param of a full-covariance mixture, by the MultivariateNormal
# argument it is: its name in the model and its constraint.
_FULL_COVARIANCE = {
    "scale_tril": ("L", constraints.lower_cholesky),
    "covariance_matrix": ("cov", constraints.positive_definite),
    "precision_matrix": ("prec", constraints.positive_definite),
}


def full_gmm(matrix_arg):
    """A full-covariance Gaussian mixture whose (K, D, D) param, starting at the
    identity, is the MultivariateNormal's ``matrix_arg``: ``scale_tril`` (param
    ``L``), ``covariance_matrix`` (``cov``) or ``precision_matrix`` (``prec``)."""
    name, constraint = _FULL_COVARIANCE[matrix_arg]

    def model(x, K):
        D = x.shape[-1]
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.zeros((K, D)))
        matrix = numpyro.param(name, jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraint)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.MultivariateNormal(mu[z], **{matrix_arg: matrix[z]}), obs=x)

    return model


# Full-covariance Gaussian mixture parameterised by Cholesky factors L (K, D, D).
gmm_scale_tril = full_gmm("scale_tril")


def gmm_diag(x, K):
    """Diagonal-covariance Gaussian mixture: per-component standard deviations sigma (K, D)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def gmm_diag_kmeans(x, K):
    """``gmm_diag`` with k-means++ initial locations (a new draw per key)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jaxem.init.kmeans_plusplus(x, K))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def poisson_mixture(x, K):
    """Poisson mixture; rates start at 1, weights uniform."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(rate[z]), obs=x)


def latent_class(x, K):
    """Latent class model: J binary items, independent given the class; x of shape (N, J)."""
    J = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    p = numpyro.param("p", jnp.full((K, J), 0.5), constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Bernoulli(p[z]).to_event(1), obs=x)


def student_t_mixture(x, K):
    """Student-t mixture with a free degrees-of-freedom per component: no closed form for
    any of ``mu``, ``sigma``, ``df``, so they all take gradient M-steps."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    df = numpyro.param("df", jnp.full(K, 5.0), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.StudentT(df[z], mu[z], sigma[z]), obs=x)


def tied_student_t_data():
    """tests/test_properties.py's student_t draw of seed 58487 (float64, scale 1, no
    offset, ties): 48 points from a 2-component t_3 mixture, the first 12 tied."""
    rng = np.random.default_rng(58487)
    w = rng.dirichlet(np.full(2, 3.0))
    centers = rng.uniform(-4.0, 4.0, (2, 1))
    spreads = np.exp(rng.uniform(-1.0, 0.5, (2, 1)))
    z = rng.choice(2, 48, p=w)
    x = centers[z] + spreads[z] * rng.standard_t(3.0, (48, 1))
    x[:12] = x[0]
    return x[:, 0]


def poisson_regression_mixture(c, x, K):
    """Mixture of Poisson regressions of counts ``c`` on a covariate ``x`` with a softplus
    link: the coefficients take gradient M-steps."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    a = numpyro.param("a", jnp.linspace(-0.5, 0.5, K))
    b = numpyro.param("b", jnp.zeros(K))
    with numpyro.plate("data", c.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        rate = jax.nn.softplus(a[z] + b[z] * x)
        numpyro.sample("c", dist.Poisson(rate), obs=c)


def gaussian_hmm(x, K, mask=None):
    """Univariate Gaussian HMM over one sequence ``x`` of shape (T,), written with scan;
    ``mask`` (T,) marks the real steps (True for the first one) of a padded sequence."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param(
        "A", jnp.full((K, K), 0.2 / K) + 0.8 * jnp.eye(K), constraint=constraints.simplex
    )
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(mu[z0], sigma[z0]), obs=x[0])

    def step(z_prev, inputs):
        x_t, m_t = inputs
        with numpyro.handlers.mask(mask=m_t):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x_t)
        return z, None

    mask = jnp.ones(x.shape[0], bool) if mask is None else mask
    scan(step, z0, (x[1:], mask[1:]))


def logistic_glmm(group, x, y, num_groups):
    """A random-intercept logistic regression: the GLMM benchmarks/mixed_models.py fits
    (it imports it from here)."""
    intercept = numpyro.param("intercept", 0.0)
    slope = numpyro.param("slope", 0.0)
    sd = numpyro.param("sd", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        u = numpyro.sample("u", dist.Normal(intercept, sd))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=u[group] + slope * x), obs=y)


def sleepstudy_model(days, subject, y, num_subjects=18):
    """sleepstudy's linear mixed model, ``Reaction ~ Days + (Days | Subject)``: the model
    tests/test_mcem.py and benchmarks/drift_calibration_fits.py fit (imported from here).
    Random effects centred at the fixed effects (saemix's parametrization): the M-step
    for ``beta`` is then the mean of the draws, and EM is fast."""
    beta = numpyro.param("beta", jnp.array([200.0, 5.0]))
    sd = numpyro.param("sd_re", jnp.array([10.0, 3.0]), constraint=constraints.positive)
    corr = numpyro.param("corr", jnp.eye(2), constraint=constraints.corr_cholesky)
    sigma = numpyro.param("sigma", 30.0, constraint=constraints.positive)
    with numpyro.plate("subject", num_subjects):
        phi = numpyro.sample("phi", dist.MultivariateNormal(beta, scale_tril=sd[:, None] * corr))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(phi[subject, 0] + phi[subject, 1] * days, sigma), obs=y)


def one_factor_analysis(x):
    """Factor analysis with one continuous latent factor per row (SAEM, MCEM)."""
    n, p = x.shape
    mean = numpyro.param("mean", jnp.zeros(p))
    loadings = numpyro.param("loadings", jnp.full((p, 1), 0.5))
    noise = numpyro.param("noise", jnp.ones(p), constraint=constraints.positive)
    with numpyro.plate("rows", n):
        scores = numpyro.sample("scores", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        numpyro.sample("x", dist.Normal(mean + scores @ loadings.T, noise).to_event(1), obs=x)


def shifted_regressions(X, y):
    """Two components with intercepts ``mu[z]`` and one slope vector ``beta`` for all: loc is
    affine in (mu, beta) jointly, the components' precisions differ."""
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    beta = numpyro.param("beta", jnp.zeros(X.shape[1]))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Normal(mu[z] + X @ beta, sigma[z]), obs=y)


def weighted_factor_draws(seed=0):
    """Data, weighted draws of the scores and params for `one_factor_analysis`'s
    Monte Carlo M-step: x (30, 4), draws (5, 30, 1), weights summing to 1."""
    rng = np.random.default_rng(seed)
    n, p, num_draws = 30, 4, 5
    x = rng.normal(size=(n, p)) + 1.0
    draws = rng.normal(size=(num_draws, n, 1))
    weights = rng.uniform(size=num_draws)
    weights /= weights.sum()
    params = {
        "mean": jnp.asarray(rng.normal(size=p)),
        "loadings": jnp.asarray(rng.normal(size=(p, 1))),
        "noise": jnp.asarray(rng.uniform(0.5, 1.5, p)),
    }
    return x, draws, weights, params
