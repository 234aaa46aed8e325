"""``deltakern env``: what is installed and which backend runs on which device."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env",
        help="show versions, the compiled extension's ops and the active backend per device",
        description="Report versions, whether deltakern._C is built (and its ops' dispatch keys), "
        "CUDA/Triton availability and the backend `auto` picks on each device.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """The environment report as a dict (also used by the benchmarks' result rows)."""
    import torch

    from deltakern._version import __version__
    from deltakern.clip.preprocess import one_pass_status
    from deltakern.ops import extension as _ext
    from deltakern.ops import registry as _ops
    from deltakern.runtime.heap import keep_freed_memory_status
    from deltakern.scoring import backend_status, resolve_backend

    ext = _ext.load()
    report = {
        "deltakern": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "open_clip_torch": _version("open_clip_torch"),
        "numpy": _version("numpy"),
        "faiss": _version("faiss-gpu") or _version("faiss-cpu"),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "score_encode_heap": keep_freed_memory_status(),  # deltakern.runtime.heap, applied by score/encode
        "image_preprocess": one_pass_status(),  # deltakern.clip.preprocess, used by score/encode/train
        "extension": {
            "loaded": ext is not None,
            "reason": _ext.unavailable_reason(),
            "built_with_cuda": bool(ext and ext.built_with_cuda()),
            "built_with_openmp": bool(ext and ext.built_with_openmp()),
            "built_against_torch": ext.torch_version() if ext else None,
            "cpu_half_gemm": _half_gemms() if ext else None,
            "ops": _ops.registered_ops(),
        },
        "cuda_available": torch.cuda.is_available(),
        "devices": {},
    }
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        status = backend_status(dev)
        auto = resolve_backend("auto", dev)
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor() or "cpu"
        report["devices"][dev] = {"name": name, "auto": auto, "backends": status}
    return report


def _half_gemms() -> dict[str, str]:
    """Which GEMM the CPU ops use for bfloat16 and float16 inputs here (an invalid
    DELTAKERN_CPU_HALF_GEMM is reported, not raised)."""
    from deltakern.ops import extension as _ext

    gemms = {}
    for dtype in ("bfloat16", "float16"):
        try:
            gemms[dtype] = _ext.cpu_half_gemm(dtype) or "none"
        except RuntimeError as exc:
            gemms[dtype] = f"error: {str(exc).splitlines()[0]}"
    return gemms


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ext = report["extension"]
    print(f"deltakern {report['deltakern']}  (python {report['python']}, {report['platform']})")
    for key in ("torch", "torch_cuda", "triton", "open_clip_torch", "numpy", "faiss"):
        print(f"  {key:<16} {report[key] or 'not installed'}")
    print(f"  {'cpu':<16} {report['cpu_threads']} threads, {report['cpu_capability']}")
    print(f"  {'freed heap kept':<16} {report['score_encode_heap']} (by deltakern score and encode)")
    print(f"  {'image transform':<16} {report['image_preprocess']}")
    if ext["loaded"]:
        print(
            f"extension deltakern._C: loaded (built against torch {ext['built_against_torch']}, "
            f"CUDA kernels: {'yes' if ext['built_with_cuda'] else 'no'}, "
            f"OpenMP: {'yes' if ext['built_with_openmp'] else 'no'})"
        )
        gemms = ", ".join(f"{dtype} -> {gemm}" for dtype, gemm in ext["cpu_half_gemm"].items())
        print(f"  CPU half-precision GEMM: {gemms}")
        for op, keys in ext["ops"].items():
            print(f"  deltakern::{op:<28} {', '.join(keys) or '(no kernels)'}")
    else:
        print(f"extension deltakern._C: NOT loaded ({ext['reason']}); falling back to the reference backend")
    print(f"CUDA available: {report['cuda_available']}")
    for dev, info in report["devices"].items():
        print(f"device {dev} ({info['name']}): auto -> {info['auto']}")
        for backend, why in info["backends"].items():
            print(f"  {backend:<10} {'available' if why is None else 'unavailable: ' + why}")
    return 0
