"""Restarts: jaxem's ``num_restarts`` (one ``vmap``) vs the same fits one by one, and
scikit-learn's ``n_init``.

A diagonal Gaussian mixture with k-means++ initial locations (``jaxem.init.kmeans_plusplus``
as the callable ``numpyro.param`` init, a new draw per restart key), a fixed number
of EM iterations, float32. Rows:

* ``jaxem restarts``: ``EM(model).run(key, x, K, max_iter, tol=0, num_restarts=R)``.
* ``jaxem one by one``: ``run`` once for each of the ``R`` keys that ``num_restarts``
  splits from ``key`` (the same fits: the log-likelihoods must agree).
* ``sklearn n_init``: ``GaussianMixture(covariance_type="diag", n_init=R,
  init_params="k-means++", max_iter, tol=0)``: its own k-means++ draws, so only its
  time per restart-iteration compares.

Usage::

    python benchmarks/restarts.py                       # (200 000, 32, 32), R = 4
    python benchmarks/restarts.py --n 100000 --d 16 --k 16 --restarts 8
"""

import argparse
import os
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30, help="EM iterations per restart")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs; the best is kept")
    parser.add_argument("--no-sklearn", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from common import metadata, sample_gmm, time_call
    from numpyro.distributions import constraints

    import jaxem

    meta = metadata()
    print(f"load average: {meta['load_average'][0]:.2f}, devices: {jax.devices()}")
    x_np = sample_gmm(0, args.n, args.d, args.k).astype(np.float32)
    x = jnp.asarray(x_np)
    K, R, iters = args.k, args.restarts, args.iters

    def model(x, K):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        mu = numpyro.param("mu", jaxem.init.kmeans_plusplus(x, K))
        sigma = numpyro.param("sigma", jnp.ones((K, x.shape[1])), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)

    em = jaxem.EM(model)
    key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, R)
    rows = []

    def batched():
        return em.run(key, x, K, max_iter=iters, tol=0.0, num_restarts=R).restart_log_likelihoods

    def one_by_one():
        return jnp.stack([em.run(k, x, K, max_iter=iters, tol=0.0).log_likelihood for k in keys])

    for name, fn in (("jaxem restarts", batched), ("jaxem one by one", one_by_one)):
        _, best, compile_s, value = time_call(fn, num_repeats=args.repeats)
        rows.append((name, best, compile_s, np.asarray(value)))

    if not args.no_sklearn:
        import time

        from sklearn.mixture import GaussianMixture

        best = np.inf
        for _ in range(args.repeats):
            gm = GaussianMixture(
                K, covariance_type="diag", n_init=R, init_params="k-means++",
                max_iter=iters, tol=0.0, random_state=0,
            )  # fmt: skip
            start = time.perf_counter()
            gm.fit(x_np)
            best = min(best, time.perf_counter() - start)
        rows.append(("sklearn n_init", best, 0.0, np.array([gm.score(x_np) * args.n])))

    print(f"\n(N, D, K) = ({args.n}, {args.d}, {K}), {R} restarts x {iters} iterations, float32")
    print(f"{'':18s} {'s':>8s} {'ms / restart-iter':>18s} {'compile s':>10s}  log-likelihoods")
    for name, seconds, compile_s, lls in rows:
        per = seconds * 1e3 / (R * iters)
        values = " ".join(f"{v:.6g}" for v in lls)
        print(f"{name:18s} {seconds:8.3f} {per:18.2f} {compile_s:10.2f}  {values}")
    batched_lls, single_lls = rows[0][3], rows[1][3]
    print(f"max relative difference, restarts vs one by one: "
          f"{np.max(np.abs(batched_lls - single_lls) / np.abs(single_lls)):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
