"""The speed switches of the config (PERF.*, SOLVER.AMP, TEST.KNN_BACKEND), checked before any
data is read and applied to torch's backends and the model.

Every check here raises ValueError with one sentence naming the key: a run that cannot use a
setting on this machine says so at once instead of failing after the dataset is indexed.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil

import torch

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger("xbm")


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of SOLVER.AMP on `device`, or None; ValueError where it cannot run."""
    name = str(cfg.SOLVER.AMP).lower()
    if name not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP {cfg.SOLVER.AMP!r} is not one of {tuple(AMP_DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"SOLVER.AMP fp16 needs a CUDA device and this run is on {device}; "
                         "use bf16 (supported on the CPU) or none")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"SOLVER.AMP bf16 is not supported by {torch.cuda.get_device_name(device)} "
                         "(bfloat16 needs an Ampere or newer GPU); use fp16 or none")
    return AMP_DTYPES[name]


def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU computes bfloat16 natively, its vector capability as torch reports it).

    Native: AVX512-BF16 or AMX instructions (torch.cpu's checks, which read CPUID). Without them, as on
    an AVX2-only AMD EPYC, oneDNN and torch emulate bfloat16 through float32 conversions: a Glyphs
    iteration took about 1 s and an evaluation batch of 256 images about 10 s, ~20x float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    capability = torch.backends.cpu.get_cpu_capability()
    if not any(callable(check) for check in checks):
        return True, capability  # a torch without the checks: assume native rather than refuse
    return any(callable(check) and check() for check in checks), capability


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16(capability: str) -> None:
    """Once per process: SOLVER.AMP bf16 on a CPU that emulates bfloat16."""
    logger.warning(f"SOLVER.AMP bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX; torch reports "
                   f"{capability}): bfloat16 is emulated here, about 20x slower than float32. Training runs "
                   "in bf16 as asked, evaluation in float32; set SOLVER.AMP none to train in float32 too")


def evaluation_amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of evaluation: training's, where `device` can run it, and float32 where it
    could only emulate it (bf16 on a CPU without native bfloat16: it changes only the rounding of the
    embeddings, at ~20x the time). A checkpoint trained with fp16 on a GPU and evaluated on a CPU
    embeds in float32."""
    try:
        dtype = amp_dtype(cfg, device)
    except ValueError:
        return None
    if dtype == torch.bfloat16 and device.type == "cpu":
        native, capability = cpu_bf16_support()
        if not native:
            _warn_emulated_bf16(capability)
            return None
    return dtype


def check_compile(cfg, device: torch.device) -> None:
    """PERF.COMPILE must name a backend torch.compile has, and inductor needs its compilers."""
    backend = str(cfg.PERF.COMPILE)
    if not backend:
        return
    import torch._dynamo

    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise ValueError(f"PERF.COMPILE {backend!r} is not a torch.compile backend here; "
                         f"choose one of {sorted(available)} or '' (off)")
    if backend != "inductor":
        return
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise ValueError("PERF.COMPILE inductor on the CPU needs a C++ compiler (g++, or $CXX) and none was "
                         "found; install one, choose another backend, or set PERF.COMPILE ''")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor generates Triton kernels for CUDA)
        except ImportError:
            raise ValueError("PERF.COMPILE inductor on CUDA needs the triton package, which is not "
                             "installed; pip install triton, or set PERF.COMPILE ''") from None


def check_knn_backend(cfg) -> None:
    """TEST.KNN_BACKEND faiss needs an importable faiss; auto falls back to torch, and says so."""
    from .evaluation.search import BACKENDS, faiss_import_error

    backend = str(cfg.TEST.KNN_BACKEND)
    if backend not in BACKENDS:
        raise ValueError(f"TEST.KNN_BACKEND {backend!r} is not one of {BACKENDS}")
    both = installed_faiss_packages()
    if len(both) > 1:
        logger.warning(f"{' and '.join(both)} are both installed and overwrite each other's `faiss` module; "
                       "uninstall all but one (pip uninstall -y " + " ".join(both) + ", then pip install -e '.[cpu]' "
                       "or '.[gpu]')")
    error = faiss_import_error()
    if error is None:
        return
    if backend == "faiss":
        raise ValueError(f"TEST.KNN_BACKEND faiss, but faiss cannot be imported ({error}); install it with "
                         "pip install -e '.[cpu]' (or '.[gpu]'), or set TEST.KNN_BACKEND torch")
    if backend == "auto":
        logger.info(f"faiss cannot be imported ({error}): evaluation searches with torch")


def installed_faiss_packages() -> list[str]:
    """The faiss distributions pip installed here (more than one is a broken install)."""
    from importlib import metadata

    names = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss")
    found = []
    for name in names:
        try:
            metadata.distribution(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def check_runtime(cfg, device: torch.device) -> torch.dtype | None:
    """All checks of the speed settings against this machine; returns the autocast dtype (and warns,
    once, when it is bf16 on a CPU that emulates it)."""
    dtype = amp_dtype(cfg, device)
    evaluation_amp_dtype(cfg, device)  # the warning, before any data is read
    check_compile(cfg, device)
    check_knn_backend(cfg)
    if cfg.DATA.PREFETCH_FACTOR < 1:
        raise ValueError(f"DATA.PREFETCH_FACTOR must be at least 1, got {cfg.DATA.PREFETCH_FACTOR}")
    return dtype


def configure_backends(cfg) -> None:
    """cuDNN autotuning, TF32 and determinism, as PERF asks (process-wide torch flags)."""
    deterministic = bool(cfg.PERF.DETERMINISTIC)
    if deterministic:
        # cuBLAS reproducibility needs a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic CUDA kernel warns (naming itself) instead of ending
    # the run; the GPU check compares a resumed run with an uninterrupted one bit for bit.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = bool(cfg.PERF.CUDNN_BENCHMARK) and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.PERF.TF32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.PERF.TF32)


def memory_format(cfg) -> torch.memory_format:
    return torch.channels_last if cfg.PERF.CHANNELS_LAST else torch.contiguous_format


def compiled(network: torch.nn.Module, cfg) -> torch.nn.Module:
    """`network` compiled with PERF.COMPILE's backend (the same module when it is off).

    The compiled module shares the parameters and buffers of `network`: checkpoints and
    evaluation keep using the plain model.
    """
    backend = str(cfg.PERF.COMPILE)
    return torch.compile(network, backend=backend) if backend else network
