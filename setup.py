"""Build of deltakern and its compiled extension ``deltakern._C``.

The extension is compiled against the torch that is *installed* in the environment, so install
with ``pip install --no-build-isolation -e .`` (an isolated build would fetch another torch and
produce a library that does not load).

Environment switches:
  DELTAKERN_BUILD_CPP=0   pure-Python install (the reference backend only).
  DELTAKERN_BUILD_CUDA=0  skip the CUDA sources even when a toolkit is present.
  FORCE_CUDA=1            fail loudly when the CUDA sources cannot be compiled.
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (torch's own variable). When unset
                          and no GPU is visible, "8.0;9.0+PTX" (A100, H100/H200) is used.
  MAX_JOBS                parallel compile jobs (torch's own variable).

The extension links the shared libstdc++ by name, and a build that still carries its own copy
of it is refused (see ``_shared_cxx_runtime``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


# Symbols only a copy of the C++ standard library defines (std::locale::classic() and the
# ostream inserter of double): an extension that defines them carries its own libstdc++.
STATIC_RUNTIME_SENTINELS = ("_ZNSt6locale7classicEv", "_ZNSo9_M_insertIdEERSoT_")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _shared_cxx_runtime() -> list[str]:
    """The shared libstdc++ named explicitly on the link line (Linux; empty where not found).

    The extension must use the C++ runtime the process already has (torch's). Where the
    toolchain would link the static archive instead (an image without the libstdc++.so
    development link, or -static-libstdc++ in LDFLAGS), the extension carries a second copy
    whose locale facets disagree with the shared one's, and formatting a number in an error
    message crashes the process (seen on a GPU image: every TORCH_CHECK with a number in its
    message segfaulted) or prints nothing. Named before the compiler driver's own -lstdc++, the
    shared library resolves every reference; on a normal toolchain it changes nothing.
    """
    compiler = _compiler()
    if not sys.platform.startswith("linux") or compiler is None:
        return []
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [os.path.normpath(found)] if os.path.isabs(found) and os.path.exists(found) else []


def check_cxx_runtime(library: str) -> None:
    """Refuse a built extension that carries its own copy of libstdc++ (see
    :func:`_shared_cxx_runtime`); skipped where binutils' ``nm`` is missing."""
    nm = shutil.which("nm")
    if nm is None or not os.path.exists(library):
        return
    listing = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True, text=True).stdout
    carried = [symbol for symbol in STATIC_RUNTIME_SENTINELS if symbol in listing]
    if carried:
        raise RuntimeError(
            f"{library} defines {', '.join(carried)}: it was linked with a static copy of the C++ "
            "standard library, which crashes when an error message formats a number. Install the "
            "toolchain's shared libstdc++ (libstdc++-dev) or drop -static-libstdc++ from LDFLAGS."
        )


def _sources(pattern: str) -> list[str]:
    # Relative paths keep the build reproducible from any checkout location.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _locate_cuda_home() -> None:
    """Point torch at the real toolkit when ``nvcc`` on PATH is a wrapper script.

    torch guesses CUDA_HOME as the parent of nvcc's directory; for a wrapper such as
    /usr/local/bin/nvcc that gives /usr/local, which has no CUDA libraries to link. Only fills
    the variable when the user has not set CUDA_HOME/CUDA_PATH.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    guessed = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if guessed and os.path.exists(os.path.join(guessed, "include", "cuda_runtime.h")):
        return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            print(f"deltakern: using the CUDA toolkit in {candidate} (nvcc on PATH is a wrapper)")
            return


def _extensions():
    if not _flag("DELTAKERN_BUILD_CPP", "1"):
        print("deltakern: DELTAKERN_BUILD_CPP=0, installing without the compiled extension")
        return [], {}
    _locate_cuda_home()  # before cpp_extension, which reads CUDA_HOME at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - a build-environment problem
        raise RuntimeError(
            "deltakern's extension builds against the installed torch; install torch first and "
            "use `pip install --no-build-isolation .` (or set DELTAKERN_BUILD_CPP=0)"
        ) from exc

    force_cuda = _flag("FORCE_CUDA", "0")
    cuda_sources = _sources("csrc/cuda/*.cu")
    want_cuda = _flag("DELTAKERN_BUILD_CUDA", "1") and bool(cuda_sources)
    cuda_reason = None
    if not torch.version.cuda:
        cuda_reason = "the installed torch is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        cuda_reason = "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    elif not want_cuda:
        cuda_reason = "DELTAKERN_BUILD_CUDA=0" if cuda_sources else "no CUDA sources"
    if cuda_reason and force_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {cuda_reason}")
    with_cuda = cuda_reason is None

    torch_version = torch.__version__.split("+")[0]
    define_version = f'-DDELTAKERN_TORCH_VERSION="{torch_version}"'
    # The C++ standard is left to torch (C++17 up to 2.x, C++20 for newer releases).
    cxx_flags = ["-O3", "-fopenmp", define_version]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(
        name="deltakern._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp", *_shared_cxx_runtime()],
    )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = False
            try:
                visible = torch.cuda.is_available()
            except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
                visible = False
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
                print(f"deltakern: no GPU visible, compiling CUDA for {DEFAULT_ARCH_LIST}")
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DDELTAKERN_WITH_CUDA"],
                "nvcc": ["-O3", "-lineinfo", "-DDELTAKERN_WITH_CUDA", define_version],
            },
            **kwargs,
        )
    else:
        if cuda_reason and cuda_sources:
            print(f"deltakern: building CPU kernels only ({cuda_reason})")
        ext = cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extension(self, extension) -> None:
            super().build_extension(extension)
            check_cxx_runtime(self.get_ext_fullpath(extension.name))

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
