"""Pinned CPU kernels and fixed thread counts: the same numbers on every x86-64 machine.

torch, MKL, oneDNN and OpenBLAS each pick their kernels from the instruction sets the
CPU offers (AVX2, AVX-512, AMX); different kernels sum in different orders, so the
same training run ends with other weights on another machine, and the demo's tables
move in their third decimal. A step process whose setting is `pinned` (the schema's
default, `reproducibility.cpu_kernels`) sets, before torch is imported, every library
to its AVX2 code path, which all x86-64 machines of the last decade run:

- `ATEN_CPU_CAPABILITY=avx2`: torch's own vectorised kernels;
- `MKL_CBWR=AVX2`: MKL's conditional numerical reproducibility on its AVX2 path;
- `ONEDNN_MAX_CPU_ISA=AVX2`: oneDNN's kernels;
- `OPENBLAS_CORETYPE=Haswell`: numpy's OpenBLAS (Elo fits, bootstrap).

Thread counts are part of the numbers too (a parallel sum splits by thread); pinned
jobs use the configured `threads.<kind>` even where Snakemake scales a job's threads
down to the machine's cores.

The settings reach a step through environment variables that the workflow sets for
every job (`SACPO_CPU_KERNELS`, `SACPO_GPU_DETERMINISTIC`); `python -m sacpo_steps`
applies them before it imports the step, so a step run by hand can be pinned the
same way. On a machine that is not x86-64 pinning does nothing (and says so).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("sacpo.reproducibility")

#: the variables a pinned step process sets (x86-64 only), and their values
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
#: an AVX2-only machine, imitated on a newer one: MKL's dispatch capped too
AVX2_MACHINE_ENV = {**PINNED_ENV, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
#: cuBLAS needs a fixed workspace for deterministic GEMMs
GPU_DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

KERNELS_VAR = "SACPO_CPU_KERNELS"
GPU_VAR = "SACPO_GPU_DETERMINISTIC"
CPU_KERNELS = ("pinned", "native")
X86 = {"x86_64", "amd64"}


def job_env(setting: dict[str, Any]) -> dict[str, str]:
    """The variables the workflow exports for every job, from `reproducibility:`."""
    kernels = setting.get("cpu_kernels", "pinned")
    if kernels not in CPU_KERNELS:
        raise ValueError(f"reproducibility.cpu_kernels must be one of {CPU_KERNELS}, "
                         f"got {kernels!r}")
    env = {KERNELS_VAR: kernels}
    if setting.get("gpu_deterministic"):
        env[GPU_VAR] = "1"
    return env


def apply(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the library variables a step's `SACPO_*` settings ask for; return those set.

    Must run before torch (or numpy) is imported: the libraries read them once, when
    they load. A variable the user set already is kept (an explicit choice wins).
    """
    environ = os.environ if environ is None else environ
    wanted: dict[str, str] = {}
    if environ.get(KERNELS_VAR, "native") == "pinned":
        if platform.machine().lower() in X86:
            wanted.update(PINNED_ENV)
        else:
            log.warning("cpu_kernels: pinned has no effect on %s (x86-64 only)",
                        platform.machine())
    if environ.get(GPU_VAR) == "1":
        wanted.update(GPU_DETERMINISTIC_ENV)
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied


def deterministic_torch() -> None:
    """With `gpu_deterministic`: torch refuses non-deterministic CUDA kernels."""
    if os.environ.get(GPU_VAR) != "1":
        return
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo (Linux), its value."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> list[str]:
    """The instruction-set flags that choose kernels."""
    flags = (_cpuinfo("flags") or "").split()
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def runtime_record(*, measure_torch: bool = False) -> dict[str, Any]:
    """What decides this process's kernels: the settings and variables (the same on every
    run of a config), and under `measured` what this machine made of them: torch's kernel
    choice and threads, the GPU (only with `measure_torch`; a step without torch does
    not load it for this)."""
    measured: dict[str, Any] = {"machine": platform.machine()}
    if measure_torch:
        import torch

        measured.update(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                        torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            measured.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return {
        "cpu_kernels": os.environ.get(KERNELS_VAR, "native"),
        "gpu_deterministic": os.environ.get(GPU_VAR) == "1",
        "env": {k: os.environ[k] for k in (*AVX2_MACHINE_ENV, *GPU_DETERMINISTIC_ENV)
                if k in os.environ},
        "measured": measured,
    }
