"""Iterations and seconds to the optimum: plain EM, SQUAREM and Anderson EM, NumPyro SVI.

All methods fit the same overlapping Gaussian mixture (``common.sample_gmm``,
``--mean-scale`` small) from the same initial parameters
(``common.initial_params``). For each the script records the log-likelihood
before every iteration (``EMResult.history`` of a ``tol=0`` run; SVI's
``-losses``) and reports the iterations, EM steps (E-step plus M-step; a
SQUAREM cycle is three, an Anderson iteration one) and seconds from which on
the log-likelihood stays within ``--rel-tol`` (default 1e-6) relative of the
optimum, the optimum being the best final log-likelihood of long plain-EM,
SQUAREM and Anderson runs. Seconds =
iterations x warm time per iteration (best of ``--repeats`` runs of
``--timing-steps`` iterations, compilation excluded).

The hand-written JAX EM of ``gmm.py`` is timed per iteration on the same data
(``--hand``), the reference for jaxem's per-iteration cost on large sizes,
e.g. on a GPU::

    python benchmarks/convergence.py --n 1000000 --d 32 --k 32 --cov full,diag \\
        --dtype float32 --no-svi --hand --em-iters 200 --timing-steps 20

and ``--online-points`` measures the throughput of :class:`jaxem.OnlineEM`
streaming minibatches of ``--online-batch`` points from host memory.

Usage::

    python benchmarks/convergence.py                   # N=10 000, D=2, K=3, full, float64
    python benchmarks/convergence.py --json out.json   # also write every trajectory

The HMM row (``--models hmm``) fits a full-covariance Gaussian HMM written with
``numpyro.contrib.control_flow.scan`` (``common.gaussian_hmm``; ``--hmm-*`` set T,
N, K, D, the mean spread and the stickiness). Its SVI loss is the exact
enumerated log-density of ``numpyro.contrib.funsor`` (see
``_exact_log_likelihood_loss``): NumPyro's ``TraceEnum_ELBO`` gives wrong values
over ``scan``.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

DATA_SEED = 2
INIT_SEED = 1


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=str, default="gmm,hmm", help="'gmm', 'hmm' or both")
    parser.add_argument("--n", type=int, default=10_000, help="number of data points N")
    parser.add_argument("--d", type=int, default=2, help="dimension D")
    parser.add_argument("--k", type=int, default=3, help="number of components K")
    parser.add_argument("--cov", type=str, default="full", help="'full', 'diag' or 'full,diag'")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument(
        "--mean-scale", type=float, default=1.0, help="spread of the true means (small: overlap)"
    )
    parser.add_argument("--hmm-steps", type=int, default=2000, help="HMM sequence length T")
    parser.add_argument("--hmm-seqs", type=int, default=1, help="number of HMM sequences")
    parser.add_argument("--hmm-states", type=int, default=4, help="number of HMM states K")
    parser.add_argument("--hmm-d", type=int, default=2, help="HMM emission dimension D")
    parser.add_argument(
        "--hmm-mean-scale", type=float, default=1.0, help="spread of the HMM state means"
    )
    parser.add_argument(
        "--hmm-stay", type=float, default=0.9, help="HMM transition matrix: this x identity + rest"
    )
    parser.add_argument("--rel-tol", type=float, default=1e-6, help="relative gap to the optimum")
    parser.add_argument("--em-iters", type=int, default=3000, help="plain EM iterations recorded")
    parser.add_argument("--squarem-iters", type=int, default=300, help="SQUAREM cycles recorded")
    parser.add_argument(
        "--anderson-iters", type=int, default=1000, help="Anderson iterations recorded"
    )
    parser.add_argument("--lrs", type=str, default="0.01,0.05,0.1", help="SVI Adam rates")
    parser.add_argument("--svi-steps", type=int, default=3000, help="SVI steps recorded per rate")
    parser.add_argument("--no-svi", action="store_true", help="skip SVI")
    parser.add_argument("--hand", action="store_true", help="time the hand-written JAX EM too")
    parser.add_argument("--timing-steps", type=int, default=100, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="warm timed runs; best is kept")
    parser.add_argument(
        "--online-points", type=float, default=0, help="points streamed through OnlineEM"
    )
    parser.add_argument("--online-batch", type=int, default=100_000, help="OnlineEM batch size")
    parser.add_argument("--json", type=str, default=None, help="write results to this file")
    return parser.parse_args(argv)


def _iterations_to(log_liks, optimum, rel_tol):
    """First t from which on log_liks[s] >= optimum - rel_tol |optimum| for all s >= t."""
    gap = (optimum - np.asarray(log_liks, dtype=np.float64)) / abs(optimum)
    gap = np.where(np.isnan(gap), np.inf, gap)
    worst_from_here = np.maximum.accumulate(gap[::-1])[::-1]
    hits = np.flatnonzero(worst_from_here <= rel_tol)
    return int(hits[0]) if hits.size else None


def _exact_log_likelihood_loss(max_plate_nesting):
    """An SVI loss for scan HMMs: minus the exact log-likelihood, the latents summed out
    by ``numpyro.contrib.funsor.log_density`` (the enumeration NumPyro's NUTS uses for
    scan HMMs). With no latents in the guide this is the negative ELBO.

    NumPyro's ``TraceEnum_ELBO`` is not usable here: with ``control_flow.scan`` it
    returns a wrong value for T >= 3 (a 2-state HMM, T = 10: -21.16 where funsor,
    jaxem and an unrolled ``markov`` loop agree on -14.63) and raises a KeyError for
    T = 2.
    """
    from numpyro.contrib.funsor import config_enumerate, enum, log_density
    from numpyro.infer.elbo import ELBO

    class ExactLogLikelihood(ELBO):
        can_infer_discrete = True

        def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
            enumerated = enum(config_enumerate(model), -max_plate_nesting - 1)
            value, _ = log_density(enumerated, args, kwargs, param_map)
            return {"loss": -value, "mutable_state": None}

    return ExactLogLikelihood()


def _compare(args, model, model_args, init, svi_loss, extra=()):
    """Plain EM, SQUAREM, Anderson, the ``extra`` rows and SVI from ``init``.

    Args:
        model: the NumPyro model, called as ``model(*model_args)``.
        init: ``{param name: constrained value}``, the start of every method.
        svi_loss: the NumPyro ELBO whose value is minus the log-likelihood.
        extra: ``(name, log-likelihood per iteration, EM steps per iteration, function
            running ``iterations`` iterations, iterations)`` rows of other methods.

    Returns:
        (optimum, one record per method).
    """
    import jax
    import numpyro
    from common import first_call, warm_call
    from numpyro.contrib.funsor import config_enumerate
    from numpyro.infer import SVI

    import jaxem

    key = jax.random.PRNGKey(0)
    rows = []  # (name, log-likelihood per iteration, EM steps per iteration)
    timed = {}  # name: (function running `iterations` iterations, iterations)

    for name, acceleration, num_iters, steps_per_iter in (
        ("EM", None, args.em_iters, 1),
        ("EM + SQUAREM", "squarem", args.squarem_iters, 3),
        ("EM + Anderson", "anderson", args.anderson_iters, 1),
    ):
        em = jaxem.EM(model, acceleration=acceleration)
        result = em.run(key, *model_args, max_iter=num_iters, tol=0.0, init_params=init)
        history = np.append(np.asarray(result.history), float(result.log_likelihood))
        # Timed over the same number of EM steps for both.
        timing_iters = max(1, args.timing_steps // steps_per_iter)
        timed[name] = (
            lambda em=em, n=timing_iters: em.run(
                key, *model_args, max_iter=n, tol=0.0, init_params=init
            ),
            timing_iters,
        )
        rows.append((name, history, steps_per_iter))
        print(f"{name}: final log-lik {history[-1]:.10f}", flush=True)

    for name, history, steps_per_iter, fn, timing_iters in extra:
        timed[name] = (fn, timing_iters)
        rows.append((name, history, steps_per_iter))
        print(f"{name}: final log-lik {history[-1]:.10f}", flush=True)

    if not args.no_svi:

        def guide(*_, **__):
            pass

        for lr in (float(v) for v in args.lrs.split(",")):
            svi = SVI(config_enumerate(model), guide, numpyro.optim.Adam(lr), svi_loss)
            svi_result = svi.run(
                key, args.svi_steps, *model_args, progress_bar=False, init_params=init
            )
            # -losses[t] is the log-likelihood before step t + 1; append the final value.
            final = float(jaxem.log_likelihood(model, svi_result.params, *model_args))
            history = np.append(-np.asarray(svi_result.losses), final)
            state = svi.init(key, *model_args, init_params=init)
            steps = jax.jit(
                lambda s, svi=svi: jax.lax.scan(
                    lambda c, _: svi.update(c, *model_args), s, None, length=args.timing_steps
                )
            )
            name = f"SVI Adam lr={lr:g}"
            timed[name] = (lambda steps=steps, state=state: steps(state), args.timing_steps)
            rows.append((name, history, 1))
            print(f"SVI lr={lr:g}: final log-lik {final:.10f}", flush=True)

    # Warm runs interleaved (one of each per round), so that load from elsewhere on the
    # machine hits every method alike; each keeps its best round.
    compile_s = {name: first_call(fn)[1] for name, (fn, _) in timed.items()}
    best = dict.fromkeys(timed, np.inf)
    for _ in range(args.repeats):
        for name, (fn, _) in timed.items():
            best[name] = min(best[name], warm_call(fn)[0])

    optimum = max(float(r[1][-1]) for r in rows if r[0].startswith("EM"))
    records = []
    for name, history, steps_per_iter in rows:
        seconds_per_iter = best[name] / timed[name][1]
        iters = _iterations_to(history, optimum, args.rel_tol)
        records.append(
            {
                "method": name,
                "iters": iters,
                "em_steps": None if iters is None else iters * steps_per_iter,
                "seconds": None if iters is None else iters * seconds_per_iter,
                "ms_per_iter": 1e3 * seconds_per_iter,
                "compile_s": compile_s[name],
                "final_rel_gap": (optimum - float(history[-1])) / abs(optimum),
                "recorded": len(history) - 1,
                "log_likelihood_per_iter": history.tolist(),
            }
        )
    return optimum, records


def _fit_mixture(args, cov_type):
    import jax
    import jax.numpy as jnp
    from common import MODELS, initial_params, sample_gmm
    from gmm import _hand_written_em
    from numpyro.infer import TraceEnum_ELBO

    dtype = jnp.dtype(args.dtype)
    x_np = sample_gmm(DATA_SEED, args.n, args.d, args.k, mean_scale=args.mean_scale)
    init_np = initial_params(INIT_SEED, x_np, args.k, cov_type)
    x = jnp.asarray(x_np, dtype)
    init = {name: jnp.asarray(value, dtype) for name, value in init_np.items()}
    extra = []
    if args.hand:
        fit = _hand_written_em()
        scale = init["L" if cov_type == "full" else "sigma"]
        hand_args = (x, init["w"], init["mu"], scale)
        _, hand_ll, hand_history = jax.block_until_ready(
            fit(*hand_args, cov_type=cov_type, num_iters=args.em_iters)
        )
        history = np.append(np.asarray(hand_history), float(hand_ll))
        extra.append(
            (
                "hand-written EM",
                history,
                1,
                lambda: fit(*hand_args, cov_type=cov_type, num_iters=args.timing_steps),
                args.timing_steps,
            )
        )
    return _compare(args, MODELS[cov_type], (x, args.k), init, TraceEnum_ELBO(), extra)


def _fit_hmm(args):
    import jax.numpy as jnp
    from common import gaussian_hmm, hmm_initial_params, sample_hmm

    dtype = jnp.dtype(args.dtype)
    x_np = sample_hmm(
        DATA_SEED,
        args.hmm_steps,
        args.hmm_seqs,
        args.hmm_states,
        args.hmm_d,
        mean_scale=args.hmm_mean_scale,
        stay=args.hmm_stay,
    )
    init_np = hmm_initial_params(INIT_SEED, x_np, args.hmm_states)
    init = {name: jnp.asarray(value, dtype) for name, value in init_np.items()}
    model_args = (jnp.asarray(x_np, dtype), args.hmm_states)
    return _compare(
        args, gaussian_hmm, model_args, init, _exact_log_likelihood_loss(max_plate_nesting=1)
    )


def _online_throughput(args, cov_type):
    """Points per second of OnlineEM streaming --online-points points from host memory."""
    import jax
    import jax.numpy as jnp
    from common import MODELS, initial_params, sample_gmm

    import jaxem

    dtype = np.dtype(args.dtype)
    pool = sample_gmm(DATA_SEED, 4 * args.online_batch, args.d, args.k, mean_scale=args.mean_scale)
    pool = pool.astype(dtype)
    init = {
        n: jnp.asarray(v, dtype)
        for n, v in initial_params(INIT_SEED, pool, args.k, cov_type).items()
    }
    online = jaxem.OnlineEM(MODELS[cov_type])
    num_batches = max(1, int(args.online_points) // args.online_batch)

    def batches():
        for i in range(num_batches):
            start = (i % 4) * args.online_batch
            yield pool[start : start + args.online_batch], args.k  # host (NumPy) arrays

    warm = online.run(jax.random.PRNGKey(0), [next(batches())], init_params=init)
    jax.block_until_ready(warm.state)
    start = time.perf_counter()
    result = online.run(jax.random.PRNGKey(0), batches(), state=warm.state)
    jax.block_until_ready(result.log_likelihoods)
    seconds = time.perf_counter() - start
    points = num_batches * args.online_batch
    return {
        "points": points,
        "batch": args.online_batch,
        "seconds": seconds,
        "points_per_s": points / seconds,
    }


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import jax

    jax.config.update("jax_enable_x64", args.dtype == "float64")
    from common import metadata

    meta = metadata()
    print(f"load average: {meta['load_average'][0]:.2f}, devices: {jax.devices()}", flush=True)
    output = {"meta": meta, "config": vars(args), "results": {}}
    configs = []
    if "gmm" in args.models.split(","):
        configs += [
            (cov_type, f"N={args.n} D={args.d} K={args.k} {cov_type} {args.dtype}")
            for cov_type in args.cov.split(",")
        ]
    if "hmm" in args.models.split(","):
        configs.append(
            (
                "hmm",
                f"HMM T={args.hmm_steps} N={args.hmm_seqs} D={args.hmm_d} K={args.hmm_states} "
                f"full {args.dtype}",
            )
        )
    for name, label in configs:
        optimum, records = _fit_hmm(args) if name == "hmm" else _fit_mixture(args, name)
        print()
        print(f"{label}: optimum {optimum:.10f}; iterations to within {args.rel_tol:g} relative")
        header = (
            f"{'method':<18} {'iters':>7} {'EM steps':>9} {'seconds':>9} {'ms/iter':>9} "
            f"{'compile s':>9} {'final rel gap':>13}"
        )
        print(header + "\n" + "-" * len(header))
        for r in records:
            iters = f">{r['recorded']}" if r["iters"] is None else str(r["iters"])
            steps = "-" if r["em_steps"] is None else str(r["em_steps"])
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.3f}"
            print(
                f"{r['method']:<18} {iters:>7} {steps:>9} {secs:>9} {r['ms_per_iter']:>9.3f} "
                f"{r['compile_s']:>9.2f} {r['final_rel_gap']:>13.2e}"
            )
        result = {"label": label, "optimum": optimum, "methods": records}
        if args.online_points and name != "hmm":
            online = _online_throughput(args, name)
            print(
                f"OnlineEM: {online['points']:.3g} points in batches of {online['batch']} from "
                f"host memory: {online['seconds']:.2f} s, {online['points_per_s']:.3g} points/s"
            )
            result["online"] = online
        output["results"][name] = result
    print(
        "\niters: first t with loglik_s >= optimum - rel_tol |optimum| for all s >= t (a SQUAREM"
        " iteration is one cycle of 3 EM steps, an Anderson one 1); seconds = iters x ms/iter"
        " (warm, no compile)."
    )
    if args.json:
        output["meta"]["load_average_end"] = os.getloadavg()
        with open(args.json, "w") as f:
            json.dump(output, f, indent=1)


if __name__ == "__main__":
    main()
