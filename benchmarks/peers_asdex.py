"""The asdex (JAX) half of ``benchmarks/peers.py``: run by the peer interpreter, not imported.

    PEER_PYTHON benchmarks/peers_asdex.py '{"cases": [...], "repeats": 5}'
    PEER_PYTHON benchmarks/peers_asdex.py --serve '{"name": ..., "job": ..., "size": ...}'

``--serve`` sets one case up, prints its JSON line (no ``repeated``), then
times one jitted evaluation per ``time`` line read from stdin, printing its
seconds: ``benchmarks/peers.py`` interleaves those with its own calls, so
both sides meet the same machine at the same moments. Otherwise it prints
one JSON line: per case, detection seconds, colours, the first
Jacobian (detection + colouring + ``jax.jit`` compile + one evaluation) and
the median repeated jitted evaluation, float64 on the CPU. The functions are
the same maths as ``benchmarks/peers.py``'s torch ones (same points).
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _functions(jnp):  # noqa: ANN001, ANN202 - JAX lives only in the peer interpreter
    def heat(N):  # noqa: ANN001, ANN202
        h = 1.0 / (N + 1)

        def fn(u):  # noqa: ANN001, ANN202
            g = u + 0.5 * u**3 / 3
            p = jnp.pad(g, 1)
            lap = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g) / h**2
            return u - 1e-4 * lap

        return fn, (N, N)

    def brusselator(N):  # noqa: ANN001, ANN202
        h = 1.0 / N

        def lap(u):  # noqa: ANN001, ANN202
            near = (jnp.roll(u, 1, 0) + jnp.roll(u, -1, 0) + jnp.roll(u, 1, 1)
                    + jnp.roll(u, -1, 1))
            return (near - 4 * u) / h**2

        def fn(x):  # noqa: ANN001, ANN202
            u, v = x[: N * N].reshape(N, N), x[N * N:].reshape(N, N)
            du = 1 + u**2 * v - 4.4 * u + 10.0 * lap(u)
            dv = 3.4 * u - u**2 * v + 10.0 * lap(v)
            return jnp.concatenate([du.reshape(-1), dv.reshape(-1)])

        return fn, (2 * N * N,)

    def rosenbrock(n):  # noqa: ANN001, ANN202
        return (lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()), (n,)

    def arwhead(n):  # noqa: ANN001, ANN202
        return (lambda x: (-4 * x[:-1] + 3).sum() + ((x[:-1] ** 2 + x[-1] ** 2) ** 2).sum()), (n,)

    def broydn3d(n):  # noqa: ANN001, ANN202
        def fn(x):  # noqa: ANN001, ANN202
            p = jnp.pad(x, 1)
            r = (3 - 2 * x) * x - p[:-2] - 2 * p[2:] + 1
            return (r**2).sum()

        return fn, (n,)

    return {"heat": heat, "brusselator": brusselator, "rosenbrock": rosenbrock,
            "arwhead": arwhead, "broydn3d": broydn3d}


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import asdex
    import jax.numpy as jnp
    import numpy as np

    functions = _functions(jnp)
    if sys.argv[1] == "--serve":
        _serve(json.loads(sys.argv[2]), functions, jax, jnp, asdex, np)
        return
    request = json.loads(sys.argv[1])
    results = []
    for case in request["cases"]:
        try:
            results.append(_measure(case, functions, request["repeats"], jax, jnp, asdex, np))
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result too
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            results.append({"case": case["name"], "error": f"{type(exc).__name__}: {first}"})
    print(json.dumps({"jax": jax.__version__, "asdex": _version("asdex"), "results": results}))


def _serve(case, functions, jax, jnp, asdex, np):  # noqa: ANN001, ANN202
    """Set ``case`` up, print it, then time one evaluation per ``time`` line on stdin."""
    try:
        evaluate, x, result = _setup(case, functions, jax, jnp, asdex, np)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        result, evaluate = {"case": case["name"], "error": f"{type(exc).__name__}: {first}"}, None
    print(json.dumps({"jax": jax.__version__, "asdex": _version("asdex"), "result": result}),
          flush=True)
    for line in sys.stdin:
        if line.strip() != "time" or evaluate is None:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate(x))
        print(time.perf_counter() - t0, flush=True)


def _setup(case, functions, jax, jnp, asdex, np):  # noqa: ANN001, ANN202
    """Detection, colours, ``jit`` and one evaluation: (evaluate, x, the case's facts)."""
    fn, shape = functions[case["job"]](case["size"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(0.5 + 0.1 * rng.standard_normal(shape))
    hessian = case["kind"] == "hessian"
    began = time.perf_counter()
    pattern = (asdex.hessian_sparsity if hessian else asdex.jacobian_sparsity)(fn, x)
    detected = time.perf_counter()
    coloring = (asdex.hessian_coloring_from_sparsity(pattern) if hessian
                else asdex.jacobian_coloring_from_sparsity(pattern))
    evaluate = jax.jit((asdex.hessian_from_coloring if hessian
                        else asdex.jacobian_from_coloring)(fn, coloring))
    jax.block_until_ready(evaluate(x))
    first = time.perf_counter() - began
    return evaluate, x, {"case": case["name"], "detection": detected - began,
                         "colors": int(coloring.num_colors), "first": first}


def _measure(case, functions, repeats, jax, jnp, asdex, np):  # noqa: ANN001, ANN202
    """One case: detection, colours, first Jacobian (jit included), repeated evaluation."""
    evaluate, x, result = _setup(case, functions, jax, jnp, asdex, np)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate(x))
        times.append(time.perf_counter() - t0)
    return {**result, "repeated": statistics.median(times)}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
