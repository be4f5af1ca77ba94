"""Compile-only checks of dmq's Triton kernels for an NVIDIA GPU, on a machine without one.

Inside :func:`compile_only`, calls of the Triton launchers (``dmq.kernels.triton.*``, on CPU tensors) record each
kernel specialization they would launch instead of running it — an autotuned launch records every config that its
pruning keeps — and :meth:`CompileOnly.build` compiles a recorded launch for the target with Triton's own compiler
and the ptxas its wheel ships, then reads the cubin: registers, stack (spills), shared memory, programs per SM, and
the SASS instruction mix (tensor-core MMAs, TMA copies, load and store widths). The interpreter (the CPU tests)
checks what the kernels compute; this shows what it cannot: a config that does not compile or does not fit the SM,
that spills, or that leaves the tensor cores.

It relies on Triton's JIT cache hook and ``JITFunction.preload`` (Triton 3.6 and 3.9 checked) and swaps Triton's
active driver while open: use it in a process that does not also run kernels (``benchmarks/aot_report.py``).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dmq.kernels import _common

__all__ = ["Launch", "Build", "CompileOnly", "compile_only", "sass_mix", "programs_per_sm", "SHARED_LIMIT"]

# Largest dynamic shared memory one program may use, bytes, per compute capability (CUDA programming guide).
SHARED_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}
# Per SM (same source): shared memory bytes, resident warps, resident programs; 65,536 registers everywhere,
# allocated per warp in units of 256, and 1 KB of shared memory reserved per program.
_SM = {(8, 0): (167936, 64, 32), (8, 6): (102400, 48, 16), (8, 9): (102400, 48, 24), (9, 0): (233472, 64, 32),
       (10, 0): (233472, 64, 32), (12, 0): (102400, 48, 32)}

_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Launch:
    """One kernel specialization a launcher would have run: ``meta`` holds its constexprs and the scalar
    arguments Triton specialized, ``num_warps`` and ``num_stages`` its config."""

    kernel: str
    meta: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    fn: Any = field(compare=False, repr=False)
    spec: str = field(compare=False, repr=False)


@dataclass
class Build:
    """A launch compiled for the target: ``error`` is None when it compiled, ``fits`` when its shared memory fits
    the target's limit; ``stack_bytes`` (per-thread stack and local memory) > 0 means register spills; ``sass``:
    :func:`sass_mix` of its code; ``programs_per_sm``: how many of its programs one SM holds at once, by the
    register, shared memory, warp and program limits (:func:`programs_per_sm`)."""

    launch: Launch
    error: str | None = None
    registers: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    fits: bool = False
    programs_per_sm: int = 0
    sass: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat results-file row."""
        meta = ",".join(f"{k}={v}" for k, v in self.launch.meta)
        row = dict(kernel=self.launch.kernel, meta=meta, num_warps=self.launch.num_warps,
                   num_stages=self.launch.num_stages, error=self.error, registers=self.registers,
                   stack_bytes=self.stack_bytes, shared_bytes=self.shared_bytes, fits=self.fits,
                   programs_per_sm=self.programs_per_sm)
        row.update({f"sass_{k}": v for k, v in sorted(self.sass.items())})
        return row


def programs_per_sm(cap: tuple[int, int], num_warps: int, registers: int, shared_bytes: int) -> int:
    """Programs of ``num_warps`` warps using ``registers`` per thread and ``shared_bytes`` that one SM of compute
    capability ``cap`` holds at once (0: it does not fit)."""
    smem, max_warps, max_programs = _SM.get(cap, _SM[(8, 0)])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_smem = smem // (shared_bytes + 1024)
    return min(by_regs, by_smem, max_warps // num_warps, max_programs)


def sass_mix(sass: str) -> dict[str, int]:
    """Instruction counts of an ``nvdisasm`` listing: ``total``; every opcode among the tensor-core MMAs
    (``HGMMA``/``IGMMA``/``QGMMA`` warpgroup, ``HMMA``/``IMMA`` warp), TMA copies (``UTMALDG``/``UTMASTG``),
    local memory (``LDL``/``STL``: spills), conversions (``I2F``, ``I2FP``, ``F2F``, ``F2FP``, ``F2I``) and shared
    memory (``LDS``, ``STS``, ``LDSM``, ``LDGSTS``: asynchronous copies from global), the special-function unit
    (``MUFU``: reciprocals, square roots, exponentials; an IEEE division is one ``MUFU.RCP`` plus a check and a
    slow-path call); global loads and stores by access width in bits (``LDG.128``, ``STG.8``, ...)."""
    kept = {"HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "UTMALDG", "UTMASTG", "LDL", "STL", "I2F", "I2FP", "F2F",
            "F2FP", "F2I", "LDS", "STS", "LDSM", "LDGSTS", "BAR", "MUFU"}
    mix: collections.Counter[str] = collections.Counter()
    for m in _SASS_OP.finditer(sass):
        op, mods = m.group(1), m.group(2).split(".")[1:]
        mix["total"] += 1
        if op in ("LDG", "STG"):
            widths = [_WIDTH[x] for x in mods if x in _WIDTH]
            mix[f"{op}.{widths[0] if widths else 32}"] += 1
        elif op in kept:
            mix[op] += 1
    return dict(mix)


class _TargetDriver:
    """The parts of a Triton driver that compiling needs, for a GPU that is not there."""

    def __init__(self, cap: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class CompileOnly:
    """A compile-only session (see :func:`compile_only`): ``launches`` in recording order, without duplicates."""

    def __init__(self, cap: tuple[int, int]):
        self.cap = cap
        self.launches: list[Launch] = []
        self._seen: set[tuple[Any, str]] = set()
        self.recording = True

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        if not self.recording:
            return None          # a build: let Triton compile
        jit = fn.jit_function
        if (jit, str(key)) not in self._seen:
            self._seen.add((jit, str(key)))
            names = jit.arg_names
            meta = tuple(sorted((names[p[0]], _plain(v)) for p, v in compile["constants"].items()))
            self.launches.append(Launch(f"{fn.module.rsplit('.', 1)[-1]}.{fn.name}", meta, compile["num_warps"],
                                        compile["num_stages"], jit, compile["specialization_data"]))
        return True              # recorded: do not compile or launch

    def build(self, launch: Launch) -> Build:
        """Compile ``launch`` for the session's target and read its cubin."""
        from triton import knobs

        out = Build(launch)
        self.recording = False
        try:
            compiled = launch.fn.preload(launch.spec)
        except Exception as e:   # noqa: BLE001 - a failed compile is a result
            out.error = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            return out
        finally:
            self.recording = True
        out.shared_bytes = int(compiled.metadata.shared)
        out.fits = out.shared_bytes <= SHARED_LIMIT.get(self.cap, SHARED_LIMIT[(8, 0)])
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            res = _run(knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin))
            m = _RES.search(res)
            if m:
                out.registers, out.stack_bytes = int(m.group(1)), int(m.group(2)) + int(m.group(4))
            out.sass = sass_mix(_run(knobs.nvidia.nvdisasm.path, "-c", str(cubin)))
        out.programs_per_sm = programs_per_sm(self.cap, launch.num_warps, out.registers, out.shared_bytes)
        return out


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _plain(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


@contextlib.contextmanager
def compile_only(cap: tuple[int, int] = (9, 0)) -> Iterator[CompileOnly]:
    """Record the Triton launches made inside (tensors on the CPU; nothing runs) as for a GPU of compute
    capability ``cap``; build them with :meth:`CompileOnly.build` before leaving. On exit, Triton's driver,
    hooks, JIT caches and autotuner choices are as they were."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    if _common.interpreting():
        raise RuntimeError("compile_only needs Triton's compiler: unset TRITON_INTERPRET (the interpreter turns "
                           "@triton.jit functions into Python at import time)")
    if torch.cuda.is_available():
        raise RuntimeError("compile_only is for a machine without a GPU: it replaces Triton's active driver")
    session = CompileOnly(cap)
    before = {id(a): dict(a.cache) for a in gc.get_objects() if issubclass(type(a), Autotuner)}
    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active   # (None: not created yet)
    driver.set_active(_TargetDriver(cap))
    knobs.runtime.jit_cache_hook = session._hook
    _common.COMPILE_ONLY_TARGET = cap
    try:
        yield session
    finally:
        _common.COMPILE_ONLY_TARGET = None
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver
        for fn in {launch.fn for launch in session.launches}:
            fn.device_caches.clear()     # binders and kernels made for the compile-only target
        for a in (a for a in gc.get_objects() if issubclass(type(a), Autotuner)):
            a.cache.clear()              # choices from compile-only "timings"
            a.cache.update(before.get(id(a), {}))
