"""Where a process runs: device and precision choice, the torchrun process group, seeding and run
metadata. Set up once per process (`setup_runtime`) and handed to whatever trains, evaluates or
generates; nothing below this module chooses a device itself.
"""

from __future__ import annotations

import os
import platform
import contextlib
import random
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes in the environment; single process otherwise.

    nccl on GPUs, gloo on CPU: the same training code runs on both.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


@dataclass(frozen=True)
class Runtime:
    """The device, precision and process group of this process, resolved once."""

    device: torch.device
    precision: str
    ctx: DistContext = DistContext()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (bf16/fp16), or nothing under fp32."""
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def setup_runtime(device: str = "auto", precision: str = "fp32") -> Runtime:
    """Resolve `device` and `precision` and join torchrun's process group if there is one. Under
    torchrun each process takes the GPU of its local rank."""
    ctx = init_distributed(resolve_device(device).type)
    resolved = resolve_device(device, ctx.local_rank)
    return Runtime(device=resolved, precision=resolve_precision(precision, resolved), ctx=ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `values` over all ranks in place (a no-op in a single process); returns it."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def rank_batches(num_items: int, batch_size: int, num_batches: int, ctx: DistContext) -> Iterator[range]:
    """This rank's share of the first items of an evaluation set, in batches of item indices.

    The same items whatever the world size: num_batches * batch_size per process, so W processes
    with batch B see what one process with batch W * B sees. Every stage's evaluation uses it.
    """
    total = min(num_items, num_batches * batch_size * ctx.world_size)
    per_rank = total // ctx.world_size
    first = ctx.rank * per_rank
    for start in range(first, first + per_rank, batch_size):
        yield range(start, min(start + batch_size, first + per_rank))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 on CPU.

    CPU stays fp32 by default: bf16 autocast only pays off on CPUs with native bf16
    instructions, and fp32 keeps small CPU runs exactly reproducible.
    """
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bf16 asked for, but this GPU does not support it; use fp16")
        if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "bf16 on a CPU without native bf16 instructions (avx512_bf16 / AMX) is emulated and "
                "many times slower than fp32 (bench: about 47x on an AVX2 machine); prefer --precision fp32",
                stacklevel=2,
            )
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN can run bf16 matmuls natively on this CPU (avx512_bf16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device`: the GPU's, or for CPU (and MPS, whose memory is the RAM) the
    machine's RAM, capped by the container's cgroup limit when there is one; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_model_fits(config, device: torch.device, training: bool) -> None:
    """Refuse, before allocating anything, a model that cannot fit in `device`'s memory at all: fp32
    weights (4 bytes a parameter), and to train also gradients and AdamW's two moments (16 bytes)."""
    num_parameters = config.num_parameters()
    bytes_per_parameter = 16 if training else 4
    needed = num_parameters * bytes_per_parameter + 8 * config.max_seq_len * config.head_dim  # + RoPE tables
    available = device_memory_bytes(device)
    if available is None or needed <= available:
        return
    count = f"{num_parameters / 1e6:,.1f}M" if num_parameters < 1e9 else f"{num_parameters / 1e9:,.1f}B"
    what = "weights, gradients and AdamW states" if training else "fp32 weights"
    raise ValueError(
        f"model config: {count} parameters (hidden_size {config.hidden_size}, num_layers "
        f"{config.num_layers}, vocab_size {config.vocab_size}, max_seq_len {config.max_seq_len}) need about "
        f"{needed / 2**30:,.0f} GiB for {what}, more than the {available / 2**30:,.0f} GiB of "
        f"{device.type} memory here; choose a smaller model"
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch: the training loop calls it once per run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global generator seeded with `seed` inside the block (random weight
    initialisation: a model, LoRA adapters), leaving the generator's state outside it untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run_info(runtime: Runtime) -> dict:
    """What a report needs to say where and with what a run was made."""
    import tokenizers

    import xiaolm

    info = {
        "xiaolm": xiaolm.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(runtime.device),
        "device_name": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "num_threads": torch.get_num_threads(),
        "precision": runtime.precision,
        "world_size": runtime.ctx.world_size,
    }
    return info


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
