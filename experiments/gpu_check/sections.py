"""The sections of the GPU check, one per process: ``python -m experiments.gpu_check.sections NAME
--json PATH --size gpu|tiny``.

Each section writes its JSON after every measurement (:class:`Recorder`), so a section killed by
its timeout keeps what it had, and records a failing measurement as an error and goes on
(:meth:`Recorder.attempt`), so one failure hides nothing. ``gpu`` sizes are the issue's
realistic ones; ``tiny`` sizes run the same code on the CPU (kernels in Pallas interpret mode),
where the numbers mean nothing but every path is exercised.

The kernel sections reuse the GPU benchmarks (:mod:`experiments.bench.kernels`,
:mod:`experiments.bench.dispatch`): their timings, their roofline floor (copy bandwidth and
special-function rate for the scan; a dense matmul of equal FLOPs for the grouped matmul) and
their errors against the ``jnp`` paths, outputs and gradients.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

PACKAGES = (
    "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
    "jax-cuda13-pjrt", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "ml-collections",
    "tensorboardX", "nvidia-ml-py", "triton", "pytest", "tokamax", "pydantic", "qwix",
)  # fmt: skip
SCAN_SIZE = {"gpu": ["--batch", "8", "--dims", "1536", "--lengths", "2048", "--state", "16"]}
DISPATCH_SIZE = {
    "gpu": ["--experts", "8", "--tokens", "16384", "--dims", "1024", "--ffn", "4096"],
}


class Recorder:
    """A section's results and errors, rewritten to ``path`` after every change."""

    def __init__(self, path: str, name: str, size: str):
        self.path, self.t0 = path, time.time()
        self.data = {"section": name, "size": size, "results": {}, "errors": {}}
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.t0, 2)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.save()

    def attempt(self, key: str, fn, *args):
        """``fn(*args)`` recorded under ``key`` (unless None), or its error; never raises."""
        start = time.time()
        try:
            value = fn(*args)
        except Exception as error:  # one failure never hides the rest
            self.data["errors"][key] = {
                "error": f"{type(error).__name__}: {str(error)[:2000]}",
                "traceback": traceback.format_exc()[-4000:],
            }
            self.save()
            print(f"[{key}] ERROR {type(error).__name__}: {str(error)[:300]}", flush=True)
            return None
        if value is not None:
            self.put(key, value)
        print(f"[{key}] ok in {time.time() - start:.1f} s: {json.dumps(value, default=str)[:300]}")
        return value


# --------------------------------------------------------------------------------------------


def env(rec: Recorder, size: str) -> None:
    """Versions, devices, the Pallas GPU lowering JAX would pick, tiles, what "auto" resolves to."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas import moe_dispatch, selective_scan, selftest
    from kernels_pallas.moe_dispatch import tokamax_ops

    def versions():
        out = {"python": platform.python_version(), "executable": sys.executable}
        for name in PACKAGES:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
        return out

    def devices():
        return {
            "default_backend": jax.default_backend(),
            "devices": [
                {
                    "platform": d.platform,
                    "kind": d.device_kind,
                    "compute_capability": getattr(d, "compute_capability", None),
                }
                for d in jax.local_devices()
            ],
        }

    def pallas_gpu_backend():
        """JAX's choice of Pallas GPU lowering (jax >= 0.11 defaults to Mosaic GPU); the kernels
        here ask for Triton through their compiler params."""
        flag = getattr(jax.config, "jax_pallas_use_mosaic_gpu", None)
        return {"jax_pallas_use_mosaic_gpu": flag, "kernels_ask_for": "triton"}

    def tiles():
        out = {"smem_limit_bytes": moe_dispatch.smem_limit_bytes()}
        for dtype in (jnp.bfloat16, jnp.float32):
            for product in ("gmm", "tgmm"):
                out[f"{product}/{jnp.dtype(dtype).name}"] = str(
                    moe_dispatch.tiles_for(product, dtype)
                )
        return out

    def auto():
        return {
            "allow_list": {kind: sorted(k) for kind, k in selftest.PROVEN.items()},
            "device_kind": selftest.device_kind(),
            "selective_scan": selective_scan.resolve_backend("auto"),
            "moe_dispatch": moe_dispatch.resolve_backend("auto"),
        }

    def tokamax():
        """The optional dispatch backend under evaluation: its version and the implementations
        it tries here (it is timed in the dispatch section where installed)."""
        return {"version": tokamax_ops.version(), "implementation": tokamax_ops.implementation()}

    def nvidia_smi():
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        command = [smi, f"--query-gpu={query}", "--format=csv,noheader"]
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()

    for key, fn in (("versions", versions), ("devices", devices), ("nvidia_smi", nvidia_smi)):
        rec.attempt(key, fn)
    for key, fn in (
        ("pallas_gpu_backend", pallas_gpu_backend),
        ("tiles", tiles),
        ("auto", auto),
        ("tokamax", tokamax),
    ):
        rec.attempt(key, fn)


def selftests(rec: Recorder, size: str) -> None:
    """Each kernel's self-test, run whatever the allow-list says: the verdicts a GPU session
    needs before adding this device kind to ``kernels_pallas.selftest.PROVEN``."""
    import jax.numpy as jnp

    from kernels_pallas import moe_dispatch, selective_scan, selftest

    def verdict(fn, dtype):
        try:
            fn(dtype)
        except selftest.SelfTestError as error:
            return {"passed": False, "reason": str(error)}
        return {"passed": True}

    rec.put("device_kind", selftest.device_kind())
    for dtype in _dtypes(size):
        for name, fn in (
            ("selective_scan", selective_scan.self_test),
            ("moe_dispatch", moe_dispatch.self_test),
        ):
            rec.attempt(f"{name}/{jnp.dtype(dtype).name}", verdict, fn, dtype)


# The speed targets for the kernels (a GPU's figures; meaningless at tiny sizes).
SCAN_MAX_X_FLOOR = {"fwd": 1.5, "fwd+bwd": 3.0}  # time / roofline floor
GMM_MIN_OF_DENSE = 0.85  # grouped matmul rate / dense matmul rate at equal useful FLOPs


def _kernel_rows(rows: list[dict], tolerance: float) -> list[dict]:
    """The benchmark's rows, JSON-ready, with time / floor, a verdict on the error and, for the
    kernel's rows, whether it meets the issue's speed target."""
    out = []
    for row in rows:
        row = {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
        if row.get("seconds") and row.get("floor"):
            row["x_floor"] = row["seconds"] / row["floor"]
        if row.get("error") is not None:
            row["error_ok"] = bool(row["error"] <= tolerance)
        if row["backend"].startswith("pallas") and row.get("x_floor") is not None:
            row["meets_target"] = bool(row["x_floor"] <= SCAN_MAX_X_FLOOR[row["pass"]])
        if row["backend"] == "pallas" and row.get("part") == "gmm" and row.get("of_dense"):
            row["meets_target"] = bool(row["of_dense"] >= GMM_MIN_OF_DENSE)
        out.append(row)
    return out


def _dtypes(size: str) -> tuple[str, ...]:
    """bfloat16 and float32 on a GPU; float32 alone at tiny sizes."""
    # The tiny run checks the code paths once; the dtypes share them.
    return ("bfloat16", "float32") if size == "gpu" else ("float32",)


def scan(rec: Recorder, size: str) -> None:
    """The selective scan at (B, L, D, N) = (8, 2048, 1536, 16): the kernel (with the ``jnp``
    backward, and with the kernel backward: ``pallas_bwd``) vs ``lax.scan``, fwd and fwd+bwd,
    with the errors judged by the self-test's bounds (``selftest.TOLERANCE``)."""
    from experiments.bench import kernels
    from kernels_pallas import selftest

    for dtype in _dtypes(size):
        backends = ["--backends", "pallas,pallas_bwd,scan"]
        argv = SCAN_SIZE.get(size, ["--smoke"]) + ["--dtype", dtype, *backends]

        def run(argv=argv, dtype=dtype):
            header, rows = kernels.run(kernels.parse_args(argv))
            return {"header": header, "rows": _kernel_rows(rows, selftest.TOLERANCE[dtype])}

        rec.attempt(dtype, run)


def tokamax_vs_ours(rows: list[dict]) -> dict:
    """Per (part, pass) where tokamax was timed: its time over the fastest of ours (``pallas``,
    ``ragged``) in the same run; ``faster`` when below 1 and its error is within bounds (where
    its time or ours is missing, ``ratio`` is None)."""
    out = {}
    for part in ("gmm", "dispatch"):
        for passname in ("fwd", "fwd+bwd"):
            same = [r for r in rows if r.get("part") == part and r["pass"] == passname]
            theirs = next((r for r in same if r["backend"] == "tokamax"), None)
            if theirs is None:
                continue
            ours = [r for r in same if r["backend"] in ("pallas", "ragged") and r["seconds"]]
            best = min(ours, key=lambda r: r["seconds"], default=None)
            ratio = None
            if best is not None and theirs["seconds"]:
                ratio = theirs["seconds"] / best["seconds"]
            out[f"{part}/{passname}"] = {
                "tokamax_s": theirs["seconds"],
                "best_ours": None if best is None else best["backend"],
                "best_ours_s": None if best is None else best["seconds"],
                "ratio": ratio,
                "faster": bool(ratio is not None and ratio < 1 and theirs.get("error_ok", True)),
                "lowering": theirs.get("lowering"),
            }
    return out


def dispatch(rec: Recorder, size: str) -> None:
    """The expert dispatch (E 8, T 16384, top-2, D 1024, F 4096): grouped matmul and the whole
    SwiGLU dispatch, kernel vs ``ragged_dot`` vs dense, fwd and fwd+bwd; where the optional
    tokamax package is installed, its ``ragged_dot`` kernels too (:func:`tokamax_vs_ours`)."""
    from experiments.bench import dispatch as bench
    from kernels_pallas import selftest

    for dtype in _dtypes(size):
        argv = DISPATCH_SIZE.get(size, ["--smoke"]) + ["--top-k", "2"]

        def run(argv=argv, dtype=dtype):
            args = bench.parse_args(argv)
            args.dtype = dtype  # --smoke sets float32
            header, rows = bench.run(args)
            rows = _kernel_rows(rows, selftest.TOLERANCE[dtype])
            out = {"header": header, "rows": rows}
            if "tokamax" in args.gmm_backends + args.dispatch_backends:
                out["tokamax_vs_ours"] = tokamax_vs_ours(rows)
            return out

        rec.attempt(dtype, run)


def models(rec: Recorder, size: str) -> None:
    """One loss-and-gradient step of each GPU-sized model: the ``forecasting:gpu`` Perceiver
    (a pretraining batch), and, kernel vs ``jnp`` path, the ``energy_moe`` MoE model and the
    ATTD Mamba at ``attd_lra:lra_full`` sizes (ListOps, L = 2000)."""
    import jax
    import numpy as np
    import optax

    from experiments import attd_lra
    from experiments.bench.timing import median_seconds
    from experiments.energy_moe import runtime

    gpu = size == "gpu"

    def step(apply, params, loss_of):
        grad = jax.jit(jax.value_and_grad(lambda p: loss_of(apply(p))))
        start = time.perf_counter()
        value, grads = jax.block_until_ready(grad(params))
        first = time.perf_counter() - start
        norm = float(optax.tree.norm(grads))
        return {
            "loss": float(value),
            "grad_norm": norm,
            "finite": bool(np.isfinite(float(value)) and np.isfinite(norm)),
            "compile_and_first_s": first,
            "median_s": median_seconds(grad, params, repeats=5 if gpu else 2),
        }

    def mamba(backend):
        from attd.mamba import init_mamba
        from configs.attd_lra import get_config

        cfg = get_config("lra_full" if gpu else "tiny")
        cfg.model.scan_backend = backend
        apply, params = init_mamba(attd_lra.model_config(cfg, 20, 10), seed=0)
        batch, length = (int(cfg.pretrain.batch), 2000) if gpu else (4, 24)
        keys = jax.random.split(jax.random.key(0))
        tokens = jax.random.randint(keys[0], (batch, length), 0, 20)
        labels = jax.random.randint(keys[1], (batch,), 0, 10)
        ce = optax.softmax_cross_entropy_with_integer_labels
        out = step(lambda p: apply(p, tokens), params, lambda y: ce(y, labels).mean())
        return {"B_L": [batch, length], **out}

    def moe(backend):
        from configs.energy_moe import get_config
        from metattt.models.moe import init_moe

        cfg = get_config(None if gpu else "tiny")
        mcfg = runtime.model_config(cfg)._replace(backend=backend)
        apply, params = init_moe(mcfg, seed=0)
        shape = (int(cfg.train.batch), int(cfg.data.length))
        tokens = jax.random.randint(jax.random.key(1), shape, 0, mcfg.vocab_size)
        ce = optax.softmax_cross_entropy_with_integer_labels
        out = step(
            lambda p: apply(p, tokens),
            params,
            lambda y: ce(y.logits[:, :-1], tokens[:, 1:]).mean(),
        )
        return {"B_L": list(shape), **out}

    def perceiver():
        import jax.numpy as jnp

        from configs.forecasting import get_config
        from experiments.forecasting import configure
        from metattt.models.perceiver import init_perceiver

        cfg = get_config("gpu" if gpu else "tiny")
        pcfg = configure.perceiver_config(cfg)
        apply, params = init_perceiver(pcfg, seed=0)
        b, n = int(cfg.pretrain.batch), int(cfg.data.max_neurons)
        keys = jax.random.split(jax.random.key(2), 4)
        batch = {
            "context": jax.random.normal(keys[0], (b, n, pcfg.context)),
            "unit_ids": jax.random.randint(keys[1], (b, n), 0, pcfg.max_units),
            "session_id": jax.random.randint(keys[2], (b,), 0, pcfg.max_sessions),
            "mask": jnp.ones((b, n), bool),
        }
        target = jax.random.normal(keys[3], (b, n, pcfg.horizon))
        out = step(lambda p: apply(p, batch), params, lambda y: jnp.mean((y - target) ** 2))
        return {"B_N": [b, n], **out}

    rec.attempt("forecasting_gpu/pretrain", perceiver)
    for name, fn, backends in (
        ("energy_moe", moe, ("pallas", "ragged")),
        ("attd_lra_full", mamba, ("pallas", "reference")),
    ):
        kernel, plain = (rec.attempt(f"{name}/{b}", fn, b) for b in backends)
        if kernel and plain:  # the kernel's step against the jnp path's
            rec.attempt(f"{name}/agreement", _agreement, kernel, plain)


def _agreement(kernel: dict, plain: dict) -> dict:
    """Relative differences of loss and gradient norm, judged by the float32 self-test bound."""
    from kernels_pallas import selftest

    out = {
        key: abs(kernel[key] - plain[key]) / max(abs(plain[key]), 1e-30)
        for key in ("loss", "grad_norm")
    }
    out["ok"] = bool(max(out.values()) <= selftest.TOLERANCE["float32"])
    return out


SECTIONS = {
    "env": env,
    "selftest": selftests,
    "scan": scan,
    "dispatch": dispatch,
    "models": models,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("name", choices=sorted(SECTIONS))
    parser.add_argument("--json", required=True, help="where the section writes its results")
    parser.add_argument("--size", choices=("gpu", "tiny"), required=True)
    args = parser.parse_args(argv)
    rec = Recorder(args.json, args.name, args.size)
    rec.attempt("section", SECTIONS[args.name], rec, args.size)
    sys.exit(1 if rec.data["errors"] else 0)


if __name__ == "__main__":
    main()
