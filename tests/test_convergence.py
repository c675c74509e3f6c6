"""``converged`` and ``diverged`` are true statements; warnings say when a fit is doubtful."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from models import poisson_regression_mixture, student_t_mixture, tied_student_t_data
from numpyro.distributions import constraints
from scipy import stats
from scipy.optimize import minimize
from scipy.special import logsumexp

import jaxem
from jaxem import EM, VariationalEM
from jaxem.estep import e_step
from jaxem.exceptions import ConvergenceWarning, ModelError, NumericalWarning
from jaxem.inspection import model_structure
from jaxem.loop import JUMP_FACTOR, STATIONARITY_FACTOR, best_restart, credible
from jaxem.stationarity import stationarity


def mixture(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


X = jnp.concatenate([jnp.linspace(-4.0, -2.0, 20), jnp.linspace(2.0, 4.0, 20)])


def test_a_converged_fit_is_stationary_and_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=100)
    assert bool(result.converged) and not bool(result.diverged)
    # The gradient of the log-likelihood is rounding noise next to its scale (N = 40).
    for value in result.gradient.values():
        assert np.all(np.abs(np.asarray(value)) < 1e-2)
    assert result.restart_converged.shape == (1,) and bool(result.restart_converged[0])


def test_the_output_of_the_last_update_is_checked():
    # Constant data, no regularization: one update collapses the variances to 0.
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = EM(mixture, reg_covar=0.0).run(jax.random.PRNGKey(0), jnp.ones(10), max_iter=1)
    assert bool(result.diverged) and not bool(result.converged)
    assert np.isfinite(float(result.log_likelihood))
    assert all(np.all(np.isfinite(v)) for v in result.params.values())


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_rejected_gradient_steps_are_not_convergence(engine):
    # Steps of 5.0 overshoot from the start: every one is rejected, the params never
    # move, and the log-likelihood repeats.
    fit = engine(mixture, m_step="gradient", optimizer=optax.sgd(5.0))
    with pytest.warns(ConvergenceWarning, match="not at a stationary point"):
        result = fit.run(jax.random.PRNGKey(0), X, max_iter=50)
    assert not bool(result.converged) and not bool(result.diverged)
    np.testing.assert_array_equal(result.params["mu"], [-1.0, 1.0])


def zero_inflated(x):
    # Poisson(rate * 0) at the enumerated value s = 1: the log-probability has no
    # finite derivative in rate there.
    pi = numpyro.param("pi", 0.3, constraint=constraints.unit_interval)
    rate = numpyro.param("rate", 2.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        s = numpyro.sample("s", dist.Bernoulli(pi))
        numpyro.sample("x", dist.Poisson(rate * (1 - s)), obs=x)


COUNTS = jnp.array([0.0, 0.0, 1.0, 3.0, 2.0, 0.0, 4.0, 1.0])
NON_FINITE_GRADIENT = (
    r"gradient of the {objective} with respect to the params \['rate'\] is not finite {at}.*"
    r"use dist\.ZeroInflatedPoisson.*differentiable in these params"
)


@pytest.mark.parametrize(
    "engine, objective", [(EM, "log-likelihood"), (VariationalEM, "ELBO")], ids=["EM", "VEM"]
)
def test_a_non_finite_gradient_names_the_param(engine, objective):
    # VariationalEM used to warn where EM raised: one error, one message.
    message = NON_FINITE_GRADIENT.format(objective=objective, at="at the values the fit")
    with pytest.raises(ModelError, match=message):
        engine(zero_inflated).run(jax.random.PRNGKey(0), COUNTS, max_iter=20)


@pytest.mark.parametrize(
    "engine, objective", [(EM, "log-likelihood"), (VariationalEM, "ELBO")], ids=["EM", "VEM"]
)
def test_init_checks_the_gradient_at_the_initial_values(engine, objective):
    # A user stepping with init/update used to get no error: update rejected every
    # gradient step silently.
    message = NON_FINITE_GRADIENT.format(objective=objective, at="at the initial values")
    with pytest.raises(ModelError, match=message):
        engine(zero_inflated).init(jax.random.PRNGKey(0), COUNTS)
    # A model with finite gradients initializes as before.
    engine(mixture, m_step="gradient").init(jax.random.PRNGKey(0), X)


def test_max_iter_reached_warns_and_tol_zero_does_not():
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=3.*Raise max_iter"):
        result = EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=3)
    assert not bool(result.converged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=3, tol=0.0)


def test_a_log_likelihood_above_zero_for_discrete_data_is_a_divergence():
    # Categorical probs that are not normalized (exp of a free param: a param selected
    # straight into probs is a ModelError at planning): the gradient M-step pushes them
    # up without bound, and log p(x) passes 0, which no probability can.
    def unnormalized(x):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        log_probs = numpyro.param("log_probs", jnp.full((2, 3), -jnp.log(3.0)))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Categorical(jnp.exp(log_probs)[z]), obs=x)

    x = jnp.array([0, 1, 2, 2, 1, 0, 0, 2])
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = EM(unnormalized, m_step="gradient").run(jax.random.PRNGKey(0), x, max_iter=200)
    assert bool(result.diverged)
    assert float(result.log_likelihood) <= 1e-3


def test_credible_values():
    ok = credible(jnp.array(-10.0), jnp.array(-11.0), jnp.array(5.0))
    assert bool(ok)
    jump = credible(jnp.array(-11.0 + 2 * JUMP_FACTOR), jnp.array(-11.0), jnp.array(1.0))
    assert not bool(jump)
    assert not bool(credible(jnp.array(0.5), jnp.array(-1.0), jnp.array(5.0), upper_bound=0.0))
    assert not bool(credible(jnp.array(jnp.nan), jnp.array(-1.0), jnp.array(5.0)))


def test_best_restart_keeps_the_best_restart_that_did_not_diverge():
    def fit(key):
        score = jax.random.normal(key)
        return {"score": score, "diverged": score > 0.5}

    key = jax.random.PRNGKey(0)
    best, fits = best_restart(fit, key, 8, lambda r: r["score"], lambda r: r["diverged"])
    scores, diverged = np.asarray(fits["score"]), np.asarray(fits["diverged"])
    assert diverged.any() and not diverged.all()
    assert float(best["score"]) == scores[~diverged].max() < scores.max()
    # Every restart diverged: the best of them all.
    best, _ = best_restart(fit, key, 8, lambda r: r["score"], lambda r: jnp.array(True))
    assert float(best["score"]) == scores.max()


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_every_restart_reports_converged_diverged_and_num_iters(engine):
    def random_start(x):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        mu = numpyro.param("mu", lambda key: 3.0 * jax.random.normal(key, (2,)))
        sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)

    result = engine(random_start).run(jax.random.PRNGKey(1), X, max_iter=200, num_restarts=3)
    for field in (result.restart_converged, result.restart_diverged, result.restart_num_iters):
        assert field.shape == (3,)
    best = int(np.argmax(np.where(result.restart_diverged, -np.inf, _scores(result))))
    assert int(result.num_iters) == int(result.restart_num_iters[best])
    assert bool(result.converged) == bool(result.restart_converged[best])


def _scores(result):
    if hasattr(result, "restart_elbos"):
        return np.asarray(result.restart_elbos)
    return np.asarray(result.restart_log_likelihoods)


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_run_cannot_be_differentiated(engine):
    # The log-likelihood's gradient in the data used to come back as zeros, silently.
    fit = engine(mixture)
    field = "log_likelihood" if engine is EM else "elbo"
    with pytest.raises(TypeError, match="cannot be differentiated"):
        jax.grad(lambda x: getattr(fit.run(jax.random.PRNGKey(0), x, max_iter=5), field))(X)


def test_a_density_broken_down_in_float32_is_a_divergence(x32):
    """The audit's case: a Student-t mixture whose free ``df`` ran off to 5e6 in float32,
    where NumPyro's log-density loses every digit (a difference of two gammaln near 4e7):
    the fit reported ll = +179 (scipy: -99.9), converged. Here the fit starts at those
    values (frozen, so it stays), and the float64 re-evaluation after the fit catches it."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(3.0, 0.6, 12), 3.5 + 2.4 * rng.standard_t(50.0, 36)])
    params = {
        "w": np.array([0.3, 0.7]),
        "mu": np.array([3.0, 3.5]),
        "sigma": np.array([0.6, 2.45]),
        "df": np.array([2.19, 4.98e6]),
    }
    init = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    fit = EM(student_t_mixture, frozen=("mu", "sigma", "df"))
    with pytest.warns(
        NumericalWarning, match=r"in float64: the float32 log-density of site 'x' \(StudentT\)"
    ):
        result = fit.run(
            jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), 2, init_params=init, max_iter=5
        )
    assert bool(result.diverged) and not bool(result.converged)
    assert bool(result.restart_diverged[0]) and not bool(result.restart_converged[0])
    w = np.asarray(result.params["w"], np.float64)
    reference = logsumexp(
        np.log(w) + stats.t.logpdf(x[:, None], params["df"], params["mu"], params["sigma"]), -1
    ).sum()
    np.testing.assert_allclose(float(result.log_likelihood), reference, rtol=1e-5)
    np.testing.assert_allclose(float(result.restart_log_likelihoods[0]), reference, rtol=1e-5)


def test_an_accurate_float32_fit_is_not_flagged(x32):
    # The same mixture at a moderate df: float32 agrees with float64 to rounding.
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-2.0, 1.0, 30), rng.normal(2.0, 1.0, 30)]))
    init = {"mu": jnp.array([-2.0, 2.0]), "df": jnp.array([4.0, 30.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        result = EM(student_t_mixture, frozen=("mu", "sigma", "df")).run(
            jax.random.PRNGKey(0), x, 2, init_params=init, max_iter=5, tol=0.0
        )
    assert not bool(result.diverged)


def _newton_gain(model, params, constraints_, args):
    """The gain of a Newton step on the float64 log-likelihood in unconstrained
    coordinates, ``g^T (-H)^-1 g / 2`` (inf where -H is not positive definite)."""
    with jax.enable_x64(True):
        from jax.flatten_util import ravel_pytree
        from numpyro.distributions.transforms import biject_to

        u = {
            k: biject_to(constraints_[k]).inv(jnp.asarray(v, jnp.float64))
            for k, v in params.items()
        }
        flat, unravel = ravel_pytree(u)
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)

        def ll(v):
            p = {k: biject_to(constraints_[k])(x) for k, x in unravel(v).items()}
            return jaxem.log_likelihood(model, p, *args)

        g, h = np.asarray(jax.grad(ll)(flat)), np.asarray(jax.hessian(ll)(flat))
    eigenvalues = np.linalg.eigvalsh(-h)
    if eigenvalues.min() <= 0:
        return np.inf
    return 0.5 * float(g @ np.linalg.solve(-h, g))


def test_a_stop_at_a_non_stationary_point_is_not_convergence(x32):
    """The audit's case: a mixture of softplus Poisson regressions on a covariate at
    scale 1e7 with an offset of -1e9 stopped after 73 iterations with converged=True, its
    log-likelihood still changing along the gradient. converged must mean stationary."""
    rng = np.random.default_rng(2)
    u = rng.uniform(-1.0, 1.0, 48)
    alpha, beta = rng.uniform(0.0, 3.0, 2), rng.uniform(-2.0, 2.0, 2)
    z = rng.choice(2, 48, p=rng.dirichlet(np.full(2, 3.0)))
    c = rng.poisson(np.logaddexp(0.0, alpha[z] + beta[z] * u)).astype(np.float64)
    x = -1e9 + 1e7 * u
    init = {
        "w": jnp.array([0.5, 0.5]),
        "a": jnp.asarray(np.log(np.expm1(c.mean() + 0.5)) + np.array([-0.2, 0.2]), jnp.float32),
        "b": jnp.zeros(2),
    }
    args = (jnp.asarray(c, jnp.float32), jnp.asarray(x, jnp.float32))
    model = functools.partial(poisson_regression_mixture, K=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = EM(model).run(jax.random.PRNGKey(2), *args, max_iter=80, init_params=init)
    if bool(result.converged):
        cons = {"w": constraints.simplex, "a": constraints.real, "b": constraints.real}
        gain = _newton_gain(model, result.params, cons, args)
        assert gain <= 100 * 1e-5 * abs(float(result.log_likelihood)), gain
    else:
        assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_the_stationarity_gain_lies_between_the_exact_gains_along_g_and_of_newton(x64, offset):
    """stationarity.stationarity's gain, at least ||g||^4 / (2 |g^T H g|) (its curvature a
    central difference of one compiled gradient), against g^T H g from jax.hessian of the same
    expected complete-data log-likelihood, in the unconstrained coordinates. The
    offset puts the locations at 1e8 next to log-scales near 0: a step sized by the
    locations would overflow the scales."""
    from numpyro.distributions.transforms import biject_to

    from jaxem.gradient import expected_log_joint

    x = X + offset
    params = {
        "w": jnp.array([0.3, 0.7]),
        "mu": jnp.array([-2.5, 3.5]) + offset,
        "sigma": jnp.array([0.8, 1.3]),
    }
    structure = model_structure(mixture, (x,), {})
    nesting = structure.max_plate_nesting
    marginals = e_step(mixture, params, (x,), {}, nesting).marginals
    names = list(params)
    gradient, gain, unbounded, _ = stationarity(
        mixture, params, marginals, names, structure.constraints, (x,), {}, nesting
    )
    assert not any(bool(v) for v in unbounded.values())
    transforms = {n: biject_to(structure.constraints[n]) for n in names}
    sizes = [int(np.size(transforms[n].inv(params[n]))) for n in names]

    def q(flat):
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        values = {n: transforms[n](u) for n, u in zip(names, parts)}
        return expected_log_joint(mixture, values, marginals, (x,), {}, nesting)

    u = jnp.concatenate([jnp.ravel(transforms[n].inv(params[n])) for n in names])
    g = jax.grad(q)(u)
    hessian = jax.hessian(q)(u)
    np.testing.assert_allclose(
        np.concatenate([np.ravel(gradient[n]) for n in names]), g, rtol=1e-10
    )
    along_g = float(jnp.vdot(g, g) ** 2 / (2.0 * jnp.abs(g @ hessian @ g)))
    # The gain is the larger of the exact line search along g and the best step, within
    # the trust region, along the preconditioned gradient: at least the first, and at
    # most Newton's on the same quadratic model where that is concave (offset 0; at 1e8
    # the data, float32, lie on a grid of 8 and Q is not concave in (mu, log sigma) at
    # these params). The step moves each coordinate by eps^(1/3) of its size: at 1e8 a
    # location moves by 600 standard deviations, and Q's third derivatives cost a few
    # 1e-5 (a test of orders of magnitude needs far less). Measured: offset 0: along g
    # 14.92, gain 19.38, Newton 88.41; offset 1e8: along g 53.24, gain 59.62.
    rtol = 1e-3 if offset else 1e-6
    assert float(gain) >= along_g * (1 - rtol), (along_g, float(gain))
    if np.all(np.linalg.eigvalsh(-np.asarray(hessian)) > 0):
        newton = float(g @ jnp.linalg.solve(-hessian, g)) / 2.0
        assert float(gain) <= newton * (1 + rtol), (float(gain), newton)
    else:
        assert offset, "Q is concave at these params without the offset"


def test_a_component_collapsing_onto_ties_is_not_convergence(x64):
    """A free-df Student-t mixture on data with 12 tied points: a component collapses
    onto the ties (sigma 3.4e-12, df 1.4e-9 after 9 iterations), where the likelihood
    has no maximum: each halving of its scale adds 12 log 2. EM's gain per step had
    fallen below tol and the gain along the gradient was 6e-9 (the collapsed location's
    curvature, ~1e24, dominating g^T H g), so it was reported converged without a
    warning. The gain along the preconditioned gradient sees the linear rise."""
    x = jnp.asarray(tied_student_t_data())
    with pytest.warns(ConvergenceWarning, match=r"rises along the params \['sigma'\].*unbounded"):
        result = EM(student_t_mixture).run(jax.random.PRNGKey(487), x, 2, max_iter=80, tol=1e-5)
    assert not bool(result.converged) and not bool(result.diverged)
    assert bool(result.unbounded["sigma"])
    collapsed = int(np.argmin(result.params["sigma"]))
    assert float(result.params["sigma"][collapsed]) < 1e-6
    # The independent check that this is no maximum: with the collapsed location on the
    # ties (its maximum along mu; the fit may leave it an ulp off, where the rise along
    # sigma alone ends once sigma is about that ulp: tests/test_unbounded_attribution.py),
    # halving the collapsed scale raises the log-likelihood by 12 log 2, the 12 tied
    # points' -log sigma each.
    on_ties = {**result.params, "mu": result.params["mu"].at[collapsed].set(x[0])}
    sigma = result.params["sigma"]
    halved = {**on_ties, "sigma": sigma.at[collapsed].set(sigma[collapsed] / 2)}
    rise = float(jaxem.log_likelihood(student_t_mixture, halved, x, 2)) - float(
        jaxem.log_likelihood(student_t_mixture, on_ties, x, 2)
    )
    np.testing.assert_allclose(rise, 12 * np.log(2.0), rtol=1e-3)


def test_a_float32_student_t_location_far_from_its_data_is_not_convergence(x32):
    """tests/test_properties.py's student_t draw of seed 0 (float32, scale 1e3, no offset
    or ties, the model's own initial values). With XLA's default CPU options L-BFGS
    moves the locations from +-1 to -0.54 and 1.47 while the log-scales (curvature ~50
    against the locations' 1.7e-6) fit a spread of 3.8e3, the log-likelihood's change
    falls below tol after 5 iterations, and it was reported converged: the locations'
    own block of the gradient, its Newton step evaluated, gains 18.7. Where L-BFGS
    stalls is a rounding edge: compiled at LLVM -O0 it stalls after 19 iterations with
    the locations near the data but still 2 nats short. So the test states the
    guarantee, checked in float64 by scipy: a fit is converged only where no move of
    the locations gains more than the stationarity check allows; one that stopped
    short of that is not converged and says so, naming 'mu'."""
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(2, 3.0))
    centers = rng.uniform(-4.0, 4.0, (2, 1))
    spreads = np.exp(rng.uniform(-1.0, 0.5, (2, 1)))
    z = rng.choice(2, 48, p=w)
    x = 1e3 * (centers[z] + spreads[z] * rng.standard_t(3.0, (48, 1)))[:, 0]
    tol = 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = EM(student_t_mixture).run(
            jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), 2, max_iter=80, tol=tol
        )
    params = {k: np.asarray(v, np.float64) for k, v in result.params.items()}

    def log_likelihood(mu):
        terms = stats.t.logpdf(x[:, None], params["df"], mu, params["sigma"])
        return float(np.sum(logsumexp(terms + np.log(params["w"]), axis=1)))

    # The most a move of the locations alone gains (in units of 1e3, the data's scale).
    best = minimize(lambda u: -log_likelihood(1e3 * u), params["mu"] / 1e3, method="Powell")
    gain = -best.fun - log_likelihood(params["mu"])
    allowed = STATIONARITY_FACTOR * tol * abs(float(result.log_likelihood))
    messages = [str(c.message) for c in caught if issubclass(c.category, ConvergenceWarning)]
    # (Under XLA's defaults the gain is 18.7 nats, at -O0 2.0, against 0.46 and 0.42 allowed.)
    if gain > allowed:
        assert not bool(result.converged), (gain, allowed, params)
        stalled = [m for m in messages if "not at a stationary point" in m]
        assert stalled and "'mu'" in stalled[-1], messages


# Where the fits stalled (their float32 params under XLA's default CPU options).
STALLED_STUDENT_T = {
    # seed 0, scale 1e5, ties: mu's gradient 6.3e-5 moved by 2e-12 within h_b
    (0, 5, True): {
        "w": [0.5006304, 0.49936962],
        "mu": [-0.9970915, 1.0029505],
        "sigma": [352928.3, 352533.72],
        "df": [1814.6385, 1828.2764],
    },
    # seed 1, scale 1e8, no ties: unresolved at the trust region's bound too (expanded)
    (1, 8, False): {
        "w": [0.49999994, 0.50000012],
        "mu": [-1.0000063, 0.9999789],
        "sigma": [134867424.0, 134859456.0],
        "df": [4.6074605, 4.6072659],
    },
}


@pytest.mark.parametrize("seed, log_scale, ties", list(STALLED_STUDENT_T))
def test_a_float32_student_t_location_unresolved_by_its_difference_is_not_convergence(
    x32, seed, log_scale, ties
):
    """tests/test_properties.py's student_t draw of seed 0 at scale 1e5 with ties (float32,
    the model's own initial values). The locations stay near their defaults +-1 while the
    scales fit 3.5e5, the log-likelihood's change falls below tol after 7 iterations, and
    it was reported converged, 20 nats short along mu alone. The locations' block Newton
    step came from a central difference moving mu by 0.01, which changed its gradient
    (6.3e-5) by 2e-12, below its ulp: curvature 0, a step of the trust region 1 + |u| = 2,
    a rise of 3e-4. The secant step, from the curvature between u and that step (resolved
    there), evaluates Q ~3e5 along mu. Checked in float64 by scipy: at the point where the
    fit stalled, the gain stationarity reports is a true one (at most what a move of mu
    alone gains) and above what convergence allows; a fit that stops short is not
    converged and names 'mu'. At scale 1e8 (seed 1, no ties) the gradient's change at
    the trust region's bound is rounding too: the secant step is taken 1e3 times farther,
    where it resolves, and the next secant step is the Newton step."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(2, 3.0))
    centers = rng.uniform(-4.0, 4.0, (2, 1))
    spreads = np.exp(rng.uniform(-1.0, 0.5, (2, 1)))
    z = rng.choice(2, 48, p=w)
    x = centers[z] + spreads[z] * rng.standard_t(3.0, (48, 1))
    if ties:
        x[:12] = x[0]
    scale = 10.0**log_scale
    x = scale * x[:, 0]
    tol = 1e-5

    def mu_gain(params):
        """The most a move of the locations alone gains (float64, scipy)."""
        params = {k: np.asarray(v, np.float64) for k, v in params.items()}

        def log_likelihood(mu):
            terms = stats.t.logpdf(x[:, None], params["df"], mu, params["sigma"])
            return float(np.sum(logsumexp(terms + np.log(params["w"]), axis=1)))

        best = minimize(lambda u: -log_likelihood(scale * u), params["mu"] / scale, method="Powell")
        return -best.fun - log_likelihood(params["mu"]), log_likelihood(params["mu"])

    stalled = {
        k: jnp.asarray(v, jnp.float32) for k, v in STALLED_STUDENT_T[seed, log_scale, ties].items()
    }
    args, kwargs = (jnp.asarray(x, jnp.float32),), {"K": 2}
    structure = model_structure(student_t_mixture, args, kwargs)
    nesting = structure.max_plate_nesting
    marginals = e_step(student_t_mixture, stalled, args, kwargs, nesting).marginals
    _, gain, unbounded, gains = stationarity(
        student_t_mixture,
        stalled,
        marginals,
        list(stalled),
        structure.constraints,
        args,
        kwargs,
        nesting,
    )
    best, value = mu_gain(stalled)
    allowed = STATIONARITY_FACTOR * tol * abs(value)
    assert allowed < float(gain) <= best * (1 + 1e-3), (float(gain), best, allowed)
    assert float(gains["mu"]) == float(gain), gains
    assert not any(bool(v) for v in unbounded.values()), unbounded

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = EM(student_t_mixture).run(
            jax.random.PRNGKey(seed), jnp.asarray(x, jnp.float32), 2, max_iter=80, tol=tol
        )
    best, value = mu_gain(result.params)
    messages = [str(c.message) for c in caught if issubclass(c.category, ConvergenceWarning)]
    if best > STATIONARITY_FACTOR * tol * abs(value):
        assert not bool(result.converged), (best, result.params)
        # Where it stops short: a warning that names 'mu', or (the seed-0 fit since the
        # flat L-BFGS: df runs off to 1e7 and float32's Student-t density breaks down at
        # iteration 6) `diverged` and the NumericalWarning that says so.
        broke_down = [str(c.message) for c in caught if issubclass(c.category, NumericalWarning)]
        named = any("not at a stationary point" in m and "'mu'" in m for m in messages)
        assert named or (bool(result.diverged) and any("broke down" in m for m in broke_down)), (
            messages,
            broke_down,
        )
