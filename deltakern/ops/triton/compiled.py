"""What the compiled Triton kernels look like on a GPU target, read without a GPU.

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` runs Triton's whole pipeline
(TTIR, TTGIR, LLVM, PTX and ptxas, which Triton bundles) on a machine with no GPU. This module
compiles the fused scoring kernel and its plain-GEMM control (:mod:`.gemm`) for sm_90 and sm_80
and reads off what a GPU run depends on:

- **operand buffers**: how many copies of the X and W tiles the software pipeliner keeps in
  shared memory (the leading dimension of the multi-buffered ``local_alloc``); 1 means every
  step waits for its own loads;
- **tensor-core instructions** (``HGMMA``/``wgmma`` on sm_90, ``HMMA``/``mma.sync`` on sm_80),
  asynchronous copies (``LDGSTS``), local-memory traffic;
- **registers and spills** from ptxas ``-v``;
- **shared memory** against the target's per-block limit.

What is compiled is what a launch compiles: :func:`specialize` derives the signature, the
constants and the divisibility attributes from real (CPU) tensors of the launch shape exactly
as Triton's launcher does (pointers 16-byte aligned, integers divisible by 16, unit strides
folded to the constant 1). That matters: without the attributes (a bare signature) no load can
be vectorised into ≥ 4-byte asynchronous copies, the pipeliner leaves every operand
single-buffered and the register picture changes, which is not what a GPU would run.

``python -m deltakern.ops.triton.compiled`` prints the side-by-side table (bench/RESULTS.md);
``tests/test_triton_compile.py`` asserts on it. Uses Triton internals that exist in 3.6 and 3.8
(``native_specialize_impl``, ``BaseBackend.parse_attr``, ``knobs.nvidia.dump_ptxas_log``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deltakern.ops.triton import fused_score, gemm

# Per-block shared memory a kernel may use (opt-in maximum). The sm_80 tile configs also run on
# sm_86/sm_89 (consumer Ampere and Ada), whose limit is 99 KB, so that is the one checked.
SHARED_LIMIT = {90: 227 * 1024, 80: 99 * 1024}
TENSOR_CORE_SASS = {90: "HGMMA", 80: "HMMA"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Launch shape whose divisibility the check reproduces: D and the row strides a multiple of 16
# (every CLIP width: 512, 768, 1024, 1280), N and K not (the general case).
LAUNCH_SHAPE = dict(n=1001, k=1000, d=512)


@dataclass(frozen=True)
class CompiledReport:
    """What one compiled kernel shows (see the module docstring)."""

    kernel: str  # "fused" | "gemm"
    target: int  # compute capability × 10
    dtype: str
    c: int
    tiles: str  # BLOCK_M x BLOCK_N x BLOCK_K, warps, stages asked for
    shared_bytes: int
    shared_limit: int
    operand_buffers: int
    dot_loop_depth: int  # loops around the tile product: 1 = one loop, so loads run ahead across tiles
    registers: int
    spill_stores: int
    spill_loads: int
    sass_instructions: int
    tensor_core_instructions: int
    async_copies: int
    local_memory_instructions: int
    compile_s: float


def specialize(fn, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, derived from launch arguments exactly as
    Triton's launcher derives them for the CUDA backend."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    bound = dict(zip(fn.arg_names, args))
    bound.update(meta)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _sass_counts(cubin: bytes, capability: int) -> tuple[int, int, int, int]:
    """(instructions, tensor-core instructions, LDGSTS, local loads/stores) of the SASS."""
    nvdisasm = triton.knobs.nvidia.nvdisasm.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([nvdisasm, str(path)], check=True, capture_output=True, text=True).stdout
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    ops = [re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s*(@!?U?P\w+\s+)?", "", line).split(" ", 1)[0] for line in lines]
    tensor = sum(op.startswith(TENSOR_CORE_SASS[capability]) for op in ops)
    ldgsts = sum(op.startswith("LDGSTS") for op in ops)
    local = sum(op.split(".")[0] in ("LDL", "STL") for op in ops)
    return len(ops), tensor, ldgsts, local


def _operand_buffers(ttgir: str, dtype: torch.dtype) -> int:
    """Copies of the operand tiles in shared memory: the leading dimension of the pipeliner's
    multi-buffered allocations (1 when the tiles are only staged once per step)."""
    elem = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    stages = [int(m) for m in re.findall(rf"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x{elem}\b", ttgir)]
    return max(stages, default=1)


def _dot_loop_depth(ttgir: str) -> int:
    """How many ``scf.for`` loops enclose the tile product (the deepest, if several)."""
    stack: list[bool] = []
    depth = 0
    for line in ttgir.splitlines():
        if re.search(r"\b(ttng\.warp_group_dot|tt\.dot)\b", line):
            depth = max(depth, sum(stack))
        net = line.count("{") - line.count("}")
        if net > 0:
            stack += [bool(re.search(r"\bscf\.for\b", line))] + [False] * (net - 1)
        elif net < 0:
            del stack[net:]
    return depth


def compile_for(fn, args: tuple, meta: dict, config: fused_score.TileConfig, capability: int,
                *, kernel: str, dtype: torch.dtype, c: int) -> CompiledReport:
    """Compile ``fn`` for ``sm_<capability>`` with the launch's specialization and read it."""
    meta = dict(meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    signature, constexprs, attrs = specialize(fn, args, meta)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    began = time.perf_counter()
    # ptxas -v runs on every compile, but Triton only prints its log when asked, and a cached
    # kernel skips ptxas: compile afresh so the register and spill counts are always there.
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.perf_counter() - began
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    if spills is None or registers is None:
        raise RuntimeError(f"no ptxas -v report in the compile output of {fn.__name__}: {text[-500:]!r}")
    sass, tensor, ldgsts, local = _sass_counts(compiled.asm["cubin"], capability)
    return CompiledReport(
        kernel=kernel, target=capability, dtype=str(dtype).removeprefix("torch."), c=c,
        tiles=f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}",
        shared_bytes=int(compiled.metadata.shared), shared_limit=SHARED_LIMIT[capability],
        operand_buffers=_operand_buffers(compiled.asm["ttgir"], dtype),
        dot_loop_depth=_dot_loop_depth(compiled.asm["ttgir"]),
        registers=int(registers.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        sass_instructions=sass, tensor_core_instructions=tensor, async_copies=ldgsts,
        local_memory_instructions=local, compile_s=round(seconds, 2),
    )


def _inputs(dtype: torch.dtype, n: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Uninitialised CPU tensors: only their dtype, shape, strides and alignment matter here.
    return torch.empty((n, d), dtype=dtype), torch.empty((k, d), dtype=dtype)


def fused_report(capability: int, dtype: torch.dtype, c: int, *, normalize: bool = True,
                 config: fused_score.TileConfig | None = None, negatives: int = 0, groups: int = 1,
                 **shape) -> CompiledReport:
    """The fused scoring kernel as a launch on ``sm_<capability>`` compiles it; with
    ``negatives`` > 0, the NegLabel variant with that many negative labels in ``groups`` groups."""
    shape = {**LAUNCH_SHAPE, **shape}
    X, W = _inputs(dtype, shape["n"], shape["k"], shape["d"])
    W_neg = _inputs(dtype, 1, negatives, shape["d"])[1] if negatives else None
    args, meta, dot_dtype = fused_score.kernel_arguments(X, W, 100.0, c, normalize, False, W_neg, groups)
    cfg = config or fused_score.tile_config((capability // 10, capability % 10), dot_dtype, c, negatives > 0)
    return compile_for(fused_score._fused_score_kernel, args, meta, cfg, capability, kernel="fused", dtype=dtype, c=c)


def gemm_report(capability: int, dtype: torch.dtype, c: int, *, config: fused_score.TileConfig | None = None,
                **shape) -> CompiledReport:
    """The plain-GEMM control with the tiles the fused kernel uses for this dtype and c."""
    shape = {**LAUNCH_SHAPE, **shape}
    X, W = _inputs(dtype, shape["n"], shape["k"], shape["d"])
    out = torch.empty((shape["n"], shape["k"]), dtype=dtype)
    args, meta = gemm.kernel_arguments(X, W, out)
    cfg = config or fused_score.tile_config((capability // 10, capability % 10), fused_score._dot_dtype(X, W), c)
    return compile_for(gemm._gemm_kernel, args, meta, cfg, capability, kernel="gemm", dtype=dtype, c=c)


def format_table(pairs: list[tuple[CompiledReport, CompiledReport]]) -> str:
    """Markdown table: each fused kernel beside its plain-GEMM control (fused / gemm per cell)."""
    head = ("| target | dtype | c | tiles | shared KB (limit) | operand buffers | registers | spill B | "
            "dot loops | SASS instr. | tensor-core instr. | LDGSTS | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f, g in pairs:
        lines.append(
            f"| sm_{f.target} | {f.dtype} | {f.c} | {f.tiles} | {f.shared_bytes // 1024} / {g.shared_bytes // 1024} "
            f"({f.shared_limit // 1024}) | {f.operand_buffers} / {g.operand_buffers} | {f.registers} / {g.registers} | "
            f"{f.spill_stores} / {g.spill_stores} | {f.dot_loop_depth} / {g.dot_loop_depth} | {f.sass_instructions} / {g.sass_instructions} | "
            f"{f.tensor_core_instructions} / {g.tensor_core_instructions} | {f.async_copies} / {g.async_copies} | "
            f"{f.compile_s:.1f} / {g.compile_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compile the matrix and print the table; exit status 1 when a check of the module
    docstring fails (single-buffered operands, no tensor cores, spills, shared memory)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--c", type=int, nargs="+", default=[1, 3, 16])
    p.add_argument("--json", help="also write the reports to this JSON file")
    args = p.parse_args(argv)
    pairs, problems = [], []
    for cap in args.targets:
        for name in args.dtypes:
            for c in args.c:
                f = fused_report(cap, DTYPES[name], c)
                g = gemm_report(cap, DTYPES[name], c)
                pairs.append((f, g))
                problems += [f"sm_{cap} {name} c={c}: {msg}" for msg in problems_of(f)]
                print(format_table([(f, g)]).splitlines()[-1], flush=True)
    print(f"\nTriton {triton.__version__}; each cell: fused / plain GEMM of the same tiles\n")
    print(format_table(pairs))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([[asdict(f), asdict(g)] for f, g in pairs], indent=1))
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


def problems_of(report: CompiledReport) -> list[str]:
    """What in ``report`` a GPU run would suffer from (empty when nothing)."""
    out = []
    if report.operand_buffers < 2:
        out.append(f"operand tiles single-buffered ({report.operand_buffers})")
    if report.dot_loop_depth != 1:
        out.append(f"tile product inside {report.dot_loop_depth} loops: the pipeline refills at every class tile")
    if report.tensor_core_instructions == 0:
        out.append(f"no {TENSOR_CORE_SASS[report.target]} instructions")
    if report.spill_stores or report.spill_loads or report.local_memory_instructions:
        out.append(f"register spills: {report.spill_stores} B stored, {report.spill_loads} B loaded")
    if report.shared_bytes > report.shared_limit:
        out.append(f"shared memory {report.shared_bytes} B over the limit {report.shared_limit} B")
    return out


if __name__ == "__main__":
    sys.exit(main())
