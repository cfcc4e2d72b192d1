"""lmcompress's own CPU kernels (csrc/native.cpp): matrix kernels that read 1-, 2-, 4- and 8-bit packed
codes without widening the weight, with AVX-512 AMX (prefill on Intel's tile unit), AVX-512 VNNI, AVX2 and
portable paths chosen at run time.

`NativeRows` (kernel="native") holds a weight in the fewest of 1/2/4/8 bits its levels fit through an
affine map c = a * u - b of unsigned codes u (binary a=2, b=1 -> 1 bit; ternary and symmetric int2 -> 2
bits; ParetoQ's stretched 2-bit grid {-3,-1,1,3}: a=2, b=3 -> 2 bits; int3/int4 -> 4 bits; wider -> 8), with
per-row scales or groups of a multiple of 64 inputs. Activations are rounded to int8 per token (the A8 of
XTC and QuantGPT), so outputs match a float matmul within that rounding.

The extension is compiled by torch.utils.cpp_extension on first use (about a minute; cached under
~/.cache/lmcompress/native) and needs a C++ compiler and ninja (the `ninja` wheel is a dependency); without
them `available()` is False, the automatic kernel choice uses PyTorch's kernels, and asking for
kernel="native" says why it cannot run.
`set_isa` forces an instruction path (tests run every path on one machine); so does the environment
variable LMCOMPRESS_ISA (avx512-amx, avx512-vnni, avx2 or portable) for a whole process.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.infer.kernels import Kernel, register_kernel
from lmcompress.quant.codes import IntWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "native.cpp"
STORAGE_BITS = (1, 2, 4, 8)
CHUNK = 64  # codes per packed chunk; groups must be a multiple of it
ISAS = ("avx512-amx", "avx512-vnni", "avx2", "portable")  # best first


def _find_ninja() -> str | None:
    """The ninja binary torch's extension builder runs: on PATH, or the `ninja` wheel's (a dependency), whose
    folder is put on PATH for the build (a venv's bin folder is not on PATH unless it is activated)."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI wheel ships the binary
    except ImportError:
        return None
    binary = Path(ninja.BIN_DIR) / "ninja"
    if not binary.is_file():
        return None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(binary)


def missing_tools() -> list[str]:
    """What building the extension needs and this machine lacks."""
    missing = [] if shutil.which("c++") else ["c++"]
    return missing if _find_ninja() else [*missing, "ninja"]


@functools.cache
def available() -> bool:
    """The extension builds (or is built) here: a C++ compiler and ninja are present, and the build works."""
    if missing_tools():
        return False
    try:
        extension()
    except Exception as exc:  # a failed build means "not here": the caller falls back and says so
        log.warning("lmcompress native kernels could not be built (%s); using PyTorch's kernels", exc)
        return False
    return True


@functools.cache
def extension():
    """Build once (cached by torch under ~/.cache/torch_extensions) and return the extension module."""
    missing = missing_tools()
    if missing:
        raise LmcompressError(f"the native kernels need {' and '.join(missing)} to compile; install them "
                              "(e.g. `apt install g++`, `pip install ninja`) or use kernel='auto'")
    # torch's extension builder is imported only when the native kernels are used.
    from torch.utils.cpp_extension import load

    log.info("compiling lmcompress native kernels (first use, about a minute)")
    build = Path(os.environ.get("LMCOMPRESS_BUILD_DIR", Path.home() / ".cache" / "lmcompress" / "native"))
    build.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build)
    ext = load("lmc_native", sources=[str(SOURCE)], build_directory=str(build), verbose=False,
               extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    note = path_note(ext.detected_isa())
    if note:
        log.warning(note)
    forced = os.environ.get("LMCOMPRESS_ISA")
    if forced:  # like oneDNN's ONEDNN_MAX_CPU_ISA: a slower path on purpose (A/B runs, a CPU that misbehaves)
        try:
            ext.set_isa(forced)
        except RuntimeError as exc:
            raise LmcompressError(f"LMCOMPRESS_ISA={forced}: {str(exc).splitlines()[0]}") from None
        log.info("lmcompress native kernels: the %s path, as LMCOMPRESS_ISA asks", forced)
    return ext


STALE_LOCK_SECONDS = 600  # a build takes about a minute; a lock this old has no live builder


def clear_stale_lock(build: Path, now: float | None = None) -> bool:
    """Remove the `lock` torch's builder leaves when a first compile is interrupted: every later load would
    wait on it forever without a word. True if one was removed (and said so)."""
    lock = build / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    log.warning("removing a stale build lock %s (%.0f min old: an interrupted compile left it)", lock, age / 60)
    lock.unlink(missing_ok=True)
    return True


def path_note(detected: str) -> str | None:
    """What a user should know about the instruction path this CPU gets (None for the fastest one)."""
    if detected in ISAS[:2]:  # AMX speeds prefill up further where the CPU has it; VNNI is the kernels' design point
        return None
    lacks = "AVX-512 VNNI" if detected == "avx2" else "AVX-512 VNNI and AVX2/FMA"
    return (f"lmcompress native kernels: this CPU has no {lacks}; running the {detected} path, which is "
            "correct but slower (prefill most of all)")


def status() -> str:
    """What `lmcompress env` reports, without compiling: built (and the path it runs), or why not."""
    missing = missing_tools()
    if missing:
        return f"cannot build here: no {' or '.join(missing)}"
    if extension.cache_info().currsize:
        return f"built, {isa()} path"
    return "compiles on first use"


def isa() -> str:
    """The instruction path the kernels use: one of ISAS."""
    return extension().isa()


def set_isa(name: str | None) -> None:
    """Force an instruction path (one of ISAS) the CPU has; None goes back to the best one."""
    ext = extension()
    ext.set_isa(ext.detected_isa() if name is None else name)


def storage(levels: torch.Tensor) -> tuple[int, int, int]:
    """(bits, a, b): the fewest storage bits whose unsigned codes u give every level as a * u - b, with b
    fixed by (bits, a) — centred grids, so that weights of one width are stored alike and can be fused."""
    if levels.numel() == 0:
        return 1, 2, 1
    # min, max and one bit test, not unique(): on a tied head's 28M codes that sorted a 64-bit copy
    low, high = int(levels.min()), int(levels.max())
    odd = bool((levels & 1).all())
    for bits in STORAGE_BITS:
        if odd and -(2**bits - 1) <= low and high <= 2**bits - 1:  # odd levels: a = 2 (binary, seq grids)
            return bits, 2, 2**bits - 1
        if bits > 1 and -(2 ** (bits - 1)) <= low and high <= 2 ** (bits - 1) - 1:
            return bits, 1, 2 ** (bits - 1)
    raise LmcompressError(f"levels {low}..{high} do not fit 8-bit codes")


class NativeRows(Kernel):
    """Packed 1/2/4/8-bit codes read by the native kernels (see the module docstring)."""

    name = "native"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        return weight.per_row or weight.group_size % CHUNK == 0

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        if not self.supports(weight):
            raise LmcompressError(f"the native kernels take per-row scales or groups of a multiple of {CHUNK} "
                                  f"inputs; got group size {weight.group_size}")
        codes, scale, offset = weight.signed()
        bits, a, b = storage(codes)
        units = torch.div(codes.to(torch.int16) + b, a, rounding_mode="floor").to(torch.uint8)
        ext = extension()
        data = ext.pack_codes(units.contiguous(), bits)
        self.handle = ext.make_linear(data, scale.float().contiguous(),
                                      None if offset is None else offset.float().contiguous(),
                                      None if bias is None else bias.detach().float().contiguous(),
                                      weight.in_features, weight.group_size or 0, bits, a, b)
        self.out_features, self.in_features, self.storage_bits = weight.out_features, weight.in_features, bits
        self.name = f"native-{bits}bit"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.handle(x)

    def __deepcopy__(self, memo: dict) -> NativeRows:
        # the extension's linear is not picklable: copy its tensors into a new one
        copy = object.__new__(NativeRows)
        copy.__dict__.update(self.__dict__)
        h = self.handle
        copy.handle = extension().make_linear(
            h.data.clone(), h.scale.clone(), None if h.offset is None else h.offset.clone(),
            None if h.bias is None else h.bias.clone(), h.in_features, h.group, h.bits, h.a, h.b)
        return copy

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as floats: a tied embedding reads the head's codes instead of a copy."""
        return extension().lookup_rows(self.handle, ids)

    @property
    def nbytes(self) -> int:
        return self.handle.nbytes


def _auto(weight: IntWeight, prefer: str) -> bool:
    # "accuracy" keeps activations in bf16, which these kernels round to int8
    return prefer != "accuracy" and NativeRows.supports(weight) and available()


register_kernel("native", auto=_auto)(NativeRows)


def handle_of(module: torch.nn.Module):
    """The native linear computing `module`: its NativeRows kernel's, or a float linear sharing an
    nn.Linear's weight. LmcompressError naming the kernel for a module another kernel runs."""
    kernel = getattr(module, "kernel", None)
    if isinstance(kernel, NativeRows):
        return kernel.handle
    if kernel is None and isinstance(module, torch.nn.Linear):
        bias = None if module.bias is None else module.bias.detach().float()
        return extension().make_float_linear(module.weight.detach().float(), bias)
    found = getattr(kernel, "name", type(module).__name__)
    raise LmcompressError(f"lean decoding reads native kernels; this {type(module).__name__} runs {found} "
                          "(load with kernel='native' or 'auto' where the native kernels build)")


def _same_storage(kernels: list[NativeRows]) -> bool:
    first = kernels[0].handle
    return all(k.handle.bits == first.bits and k.handle.a == first.a and k.handle.b == first.b
               and k.handle.group == first.group and k.in_features == first.in_features
               and (k.handle.offset is None) == (first.offset is None) for k in kernels)


def fuse(modules: list[torch.nn.Module]) -> list:
    """Native linears computing `modules`' outputs concatenated: one linear holding all their rows when
    their codes are stored alike (one activation pass and one parallel loop instead of several), else one
    per module. Fusing re-points each module's kernel at row views of the fused buffers, so the weights
    stay resident once."""
    kernels = [getattr(m, "kernel", None) for m in modules]
    if len(modules) < 2 or not all(isinstance(k, NativeRows) for k in kernels) or not _same_storage(kernels):
        return [handle_of(m) for m in modules]
    ext, handles = extension(), [k.handle for k in kernels]
    first = handles[0]
    data = torch.cat([h.data for h in handles])
    scale = torch.cat([h.scale for h in handles])
    offset = None if first.offset is None else torch.cat([h.offset for h in handles])
    with_bias = any(h.bias is not None for h in handles)
    bias = torch.cat([h.bias if h.bias is not None else torch.zeros(h.out_features) for h in handles]) if with_bias else None
    fused = ext.make_linear(data, scale, offset, bias, first.in_features, first.group, first.bits, first.a, first.b)
    start = 0
    for kernel, old in zip(kernels, handles, strict=True):
        rows = slice(start, start + old.out_features)
        kernel.handle = ext.make_linear(data[rows], scale[rows], None if offset is None else offset[rows],
                                        None if old.bias is None else bias[rows], old.in_features, old.group,
                                        old.bits, old.a, old.b)
        start += old.out_features
    return [fused]
