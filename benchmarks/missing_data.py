"""Cost of missing data: time per EM iteration of a full-covariance Gaussian mixture.

Three runs of the same model on the same draws (``common.sample_gmm``) and the same
initial parameters (``common.initial_params``): the plain model on complete data,
``jaxem.nan_as_missing(model)`` on the same complete data, and the wrapped model with a
fraction of the entries deleted completely at random. Each runs ``--iters`` iterations
(``tol=0``) inside ``EM.run``; the table gives the best warm time per iteration and the
compilation time of the first call.

Run from the repository root::

    python benchmarks/missing_data.py [--samples 2000 --features 3 --components 3]
"""

import argparse
import os
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--missing", type=float, default=0.3, help="fraction of entries")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    # The benchmarks measure the checkout they live in, installed or not.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import jax
    import jax.numpy as jnp
    from common import gmm_full, initial_params, metadata, sample_gmm, time_call

    from jaxem import EM, nan_as_missing

    meta = metadata()

    x = sample_gmm(0, args.samples, args.features, args.components)
    init = {
        k: jnp.asarray(v, jnp.float32)
        for k, v in initial_params(0, x, args.components, "full").items()
    }
    deleted = np.where(np.random.default_rng(1).random(x.shape) < args.missing, np.nan, x)
    runs = [
        ("plain model, complete data", gmm_full, x),
        ("nan_as_missing, complete data", nan_as_missing(gmm_full), x),
        (f"nan_as_missing, {args.missing:.0%} missing", nan_as_missing(gmm_full), deleted),
    ]
    print(
        f"N={args.samples} D={args.features} K={args.components}, {args.iters} iterations, "
        f"{jax.devices()[0].platform}, CPUs: {meta['cpu_count']}, "
        f"load average: {meta['load_average'][0]:.2f}"
    )
    print(f"{'run':<32} {'ms/iteration':>12} {'compile s':>9}")
    for label, model, data in runs:
        em, data = EM(model), jnp.asarray(data, jnp.float32)

        def fit(em=em, data=data):
            return em.run(
                jax.random.PRNGKey(0),
                data,
                K=args.components,
                max_iter=args.iters,
                tol=0,
                init_params=init,
            )

        _, best, compile_s, _ = time_call(fit, num_repeats=args.repeats)
        print(f"{label:<32} {1e3 * best / args.iters:12.2f} {compile_s:9.2f}")


if __name__ == "__main__":
    main()
