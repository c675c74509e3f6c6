"""Shared pieces of the benchmarks: data, initial parameters, models, timing.

Every implementation in a benchmark receives the same data and the same initial
parameters (mixture weights, means and covariance Cholesky factors, or standard
deviations for diagonal covariances; for HMMs also the initial distribution and
the transition matrix), all built here with NumPy from fixed seeds.
"""

import hashlib
import importlib.metadata
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

COV_TYPES = ("full", "diag")


def sample_gmm(seed, num_samples, num_features, num_components, *, mean_scale=2.0):
    """Draws data from a random Gaussian mixture.

    Args:
        seed: NumPy seed; the mixture and the sample both depend only on it.
        num_samples: N.
        num_features: D.
        num_components: K.
        mean_scale: standard deviation of the component means around the origin;
            the component covariances have eigenvalues of order one, so a small
            value gives overlapping components (slow EM).

    Returns:
        x, shape (N, D), float64.
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = rng.normal(scale=mean_scale, size=(num_components, num_features))
    a = rng.normal(size=(num_components, num_features, num_features)) / np.sqrt(num_features)
    covariances = a @ np.swapaxes(a, -1, -2) + 0.3 * np.eye(num_features)
    chol = np.linalg.cholesky(covariances)
    z = rng.choice(num_components, size=num_samples, p=weights)
    noise = rng.normal(size=(num_samples, num_features))
    x = np.empty((num_samples, num_features))
    for k in range(num_components):
        members = z == k
        x[members] = means[k] + noise[members] @ chol[k].T
    return x


def initial_params(seed, x, num_components, cov_type):
    """Initial parameters shared by all implementations.

    Uniform weights, means at K distinct data points, and every component's
    covariance equal to the data covariance (its diagonal for ``"diag"``).

    Returns:
        dict with ``w`` (K,), ``mu`` (K, D) and either ``L`` (K, D, D) lower
        Cholesky factors (``"full"``) or ``sigma`` (K, D) standard deviations
        (``"diag"``), all float64 NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    num_samples, num_features = x.shape
    params = {
        "w": np.full(num_components, 1.0 / num_components),
        "mu": x[rng.choice(num_samples, size=num_components, replace=False)],
    }
    if cov_type == "full":
        chol = np.linalg.cholesky(np.cov(x, rowvar=False).reshape(num_features, num_features))
        params["L"] = np.broadcast_to(chol, (num_components, num_features, num_features)).copy()
    elif cov_type == "diag":
        params["sigma"] = np.broadcast_to(x.std(0), (num_components, num_features)).copy()
    else:
        raise ValueError(f"cov_type must be one of {COV_TYPES}, got {cov_type!r}")
    return params


def gmm_full(x, K):
    """Full-covariance Gaussian mixture as a NumPyro program (jaxem and SVI)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    L = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x)


def gmm_diag(x, K):
    """Diagonal-covariance Gaussian mixture as a NumPyro program (jaxem and SVI)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


MODELS = {"full": gmm_full, "diag": gmm_diag}


def sample_hmm(seed, num_steps, num_seqs, num_states, num_features, *, mean_scale=2.0, stay=0.9):
    """Sequences of a random full-covariance Gaussian HMM.

    Args:
        seed: NumPy seed; the HMM and the sample both depend only on it.
        num_steps: T.
        num_seqs: N sequences.
        num_states: K.
        num_features: D.
        mean_scale: standard deviation of the state means around the origin;
            the covariances have eigenvalues of order one, so a small value
            gives overlapping emissions (slow EM).
        stay: weight of the identity in the transition matrix, the rest a random
            Dirichlet row; near 1, long runs in one state make the states easy to
            tell apart even where the emissions overlap.

    Returns:
        x, shape (T, N, D), float64.
    """
    rng = np.random.default_rng(seed)
    transition = stay * np.eye(num_states) + (1 - stay) * rng.dirichlet(
        np.ones(num_states), num_states
    )
    means = rng.normal(scale=mean_scale, size=(num_states, num_features))
    a = rng.normal(size=(num_states, num_features, num_features)) / np.sqrt(num_features)
    chol = np.linalg.cholesky(a @ np.swapaxes(a, -1, -2) + 0.3 * np.eye(num_features))
    states = np.empty((num_steps, num_seqs), int)
    states[0] = rng.integers(num_states, size=num_seqs)
    uniform = rng.uniform(size=(num_steps, num_seqs))
    cumulative = np.cumsum(transition, axis=1)
    for t in range(1, num_steps):
        states[t] = np.minimum(
            (uniform[t, :, None] > cumulative[states[t - 1]]).sum(-1), num_states - 1
        )
    noise = rng.normal(size=(num_steps, num_seqs, num_features))
    return means[states] + np.einsum("tnde,tne->tnd", chol[states], noise)


def hmm_initial_params(seed, x, num_states):
    """Initial HMM parameters shared by all implementations.

    Uniform initial distribution, sticky transitions (half the mass on
    staying), means at K distinct data points, every state's covariance equal
    to the data covariance.

    Returns:
        dict with ``pi`` (K,), ``A`` (K, K), ``mu`` (K, D) and ``L`` (K, D, D)
        lower Cholesky factors of the covariances, float64 NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    num_features = x.shape[-1]
    flat = x.reshape(-1, num_features)
    chol = np.linalg.cholesky(np.cov(flat, rowvar=False).reshape(num_features, num_features))
    return {
        "pi": np.full(num_states, 1.0 / num_states),
        "A": np.full((num_states, num_states), 0.5 / num_states) + 0.5 * np.eye(num_states),
        "mu": flat[rng.choice(flat.shape[0], num_states, replace=False)],
        "L": np.broadcast_to(chol, (num_states, num_features, num_features)).copy(),
    }


def gaussian_hmm(x, K):
    """Full-covariance Gaussian HMM over x of shape (T, N, D) as a NumPyro program: a
    ``scan`` over time, the N sequences in a plate (jaxem and SVI)."""
    D = x.shape[-1]
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    L = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("seqs", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.MultivariateNormal(mu[z0], scale_tril=L[z0]), obs=x[0])

    def step(z_prev, x_t):
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def metadata():
    """What the numbers depend on: versions, machine, XLA flags, load, and the jaxem sources."""
    sources = sorted(pathlib.Path(__file__).resolve().parent.parent.glob("jaxem/**/*.py"))
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    versions = {}
    for package in (
        "jax",
        "jaxlib",
        "numpyro",
        "funsor",
        "optax",
        "scikit-learn",
        "numpy",
        "scipy",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxem_sources_sha256": digest.hexdigest()[:16] if sources else None,
        "versions": versions,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def block(tree):
    """Waits for every array in a pytree (JAX dispatch is asynchronous)."""
    return jax.tree_util.tree_map(
        lambda leaf: leaf.block_until_ready() if hasattr(leaf, "block_until_ready") else leaf, tree
    )


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def first_call(fn):
    """Runs ``fn()`` once, cold.

    The compilation time is the sum of the durations JAX reports through
    ``jax.monitoring`` for tracing to a jaxpr, lowering to MLIR and XLA
    compilation, over every computation compiled during the call. Unlike "cold
    minus warm wall time" it is not blurred by the run-to-run noise of long
    runs.

    Returns:
        (seconds, compilation seconds, value).
    """
    compile_durations = []

    def listener(event, duration, **kwargs):
        if event in _COMPILE_EVENTS:
            compile_durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        start = time.perf_counter()
        value = block(fn())
        seconds = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return seconds, sum(compile_durations), value


def warm_call(fn):
    """Returns (seconds, value) of one call of ``fn()``, waiting for its arrays."""
    start = time.perf_counter()
    value = block(fn())
    return time.perf_counter() - start, value


def time_call(fn, *, num_repeats):
    """Times ``fn()`` once cold and ``num_repeats`` times warm.

    Returns:
        (first call seconds, best warm seconds, compilation seconds of the
        first call, value of the last call).
    """
    first, compile_s, value = first_call(fn)
    best = np.inf
    for _ in range(num_repeats):
        seconds, value = warm_call(fn)
        best = min(best, seconds)
    return first, best, compile_s, value
