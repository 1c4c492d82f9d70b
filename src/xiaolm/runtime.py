"""Where a process runs: device and precision choice, the torchrun process group, seeding and run
metadata. Set up once per process (`setup_runtime`) and handed to whatever trains, evaluates or
generates; nothing below this module chooses a device itself.

What the machine can do is measured, not assumed, and cached per machine (CPU model and flags or
GPU name, thread count, torch version) in `$XIAOLM_CACHE/machine.json`: the matmul peak of each
precision (the denominator of MFU) and, for `--precision auto` on a CPU, whether bf16 autocast
trains the model at hand faster than fp32 (a few timed steps of each; bf16 is 1.7-2.3x faster on
CPUs with AMX or AVX512-BF16 and about 40x slower on CPUs without them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from xiaolm.config import default_cache_dir


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
    precision_reason: str = ""
    """Why this precision: asked for, the GPU's support, or the CPU measurement that chose it."""

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
    chosen = resolve_precision(precision, resolved)
    if precision != "auto":
        reason = "asked for"
    elif resolved.type == "cuda":
        reason = "bf16: this GPU supports it" if chosen == "bf16" else "fp16 with loss scaling: this GPU lacks bf16"
    else:
        reason = f"fp32: auto on {resolved.type} (a training run on a CPU measures bf16 against it)"
    return Runtime(device=resolved, precision=chosen, ctx=ctx, precision_reason=reason)


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


def evaluation_sums(runtime: Runtime, num_items: int, batch_size: int, num_batches: int, num_sums: int,
                    batch_sums: Callable[[range], torch.Tensor]) -> torch.Tensor:
    """Sums over the first items of an evaluation set, all ranks together (`rank_batches`: each
    takes its share). `batch_sums(indices)` gives one batch's `num_sums` float64 sums (nats, tokens,
    ...) on the runtime's device; it runs under the runtime's autocast. Every stage's validation
    and `xiaolm eval ppl` go through it; call it on every rank (it all-reduces)."""
    totals = torch.zeros(num_sums, dtype=torch.float64, device=runtime.device)
    for indices in rank_batches(num_items, batch_size, num_batches, runtime.ctx):
        with runtime.autocast():
            sums = batch_sums(indices)
        totals += sums
    return all_reduce_sum(totals, runtime.ctx)


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
    """auto: bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 elsewhere
    until measured: a training run on a CPU then calls `choose_training_precision`, which
    switches to bf16 where the CPU has native bf16 and a timed probe shows it faster.
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
        "precision_reason": runtime.precision_reason,
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


# ---------------------------------------------------------------------------------------------
# What this machine can do, measured once and cached per machine


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (/proc/cpuinfo; empty where there is none)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


# the flags that decide matmul speed by precision
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine_fingerprint(device: torch.device) -> dict[str, Any]:
    """What a measurement depends on: the device model, its relevant flags, threads, torch."""
    if device.type == "cuda":
        return {"device": "cuda", "name": torch.cuda.get_device_name(device),
                "capability": list(torch.cuda.get_device_capability(device)), "torch": torch.__version__}
    name, flags = cpu_model_and_flags()
    return {"device": device.type, "name": name, "flags": [f for f in SPEED_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


class MachineCache:
    """Measurements of this machine in a JSON file, one section per fingerprint; written whole
    through a temporary file, so a concurrent reader never sees half a file."""

    def __init__(self, device: torch.device, path: Path | None = None) -> None:
        self.path = path or default_cache_dir() / "machine.json"
        self.fingerprint = machine_fingerprint(device)
        self.key = hashlib.sha1(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]

    def _read_all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, section: str, name: str) -> Any:
        return self._read_all().get(self.key, {}).get(section, {}).get(name)

    def put(self, section: str, name: str, value: Any) -> None:
        data = self._read_all()
        entry = data.setdefault(self.key, {"fingerprint": self.fingerprint})
        entry.setdefault(section, {})[name] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a read-only home only costs a new measurement next time
            pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, precision: str, size: int | None = None) -> float:
    """Best FLOP/s of a square matmul in `precision` on `device` (best of several, so that load
    from other work on a shared machine lowers it as little as possible). A CPU without native
    fp16/bf16 emulates them hundreds of times slower: a small matrix keeps that measurement short."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if size is None:
        native = device.type != "cpu" or precision == "fp32" or (precision == "bf16" and cpu_has_native_bf16())
        size = 8192 if device.type == "cuda" else 2048 if native else 256
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm up (kernel choice, caches)
    _synchronize(device)
    best, deadline = 0.0, time.perf_counter() + 2.0
    for repeat in range(20):
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
        if repeat >= 2 and time.perf_counter() > deadline:
            break
    return best


def matmul_peak(device: torch.device, precision: str, cache: MachineCache | None = None) -> float:
    """The measured matmul peak (FLOP/s) of `precision` on this machine, measured on first use."""
    cache = cache or MachineCache(device)
    peak = cache.get("matmul_peak_flops", precision)
    if not peak:
        peak = measure_matmul_peak(device, precision)
        cache.put("matmul_peak_flops", precision, peak)
    return float(peak)


def raise_matmul_peak(device: torch.device, precision: str, flops_per_second: float,
                      cache: MachineCache | None = None) -> float:
    """Record `flops_per_second` as this machine's matmul peak when it beats the cached one, and
    return the peak. A model's training step is all matmul FLOPs by the count MFU uses, so what it
    reached is a lower bound of the peak: a peak first measured while other work loaded the machine
    (a shared CI box) is corrected by the first run that does better, instead of MFU above 1."""
    cache = cache or MachineCache(device)
    peak = float(cache.get("matmul_peak_flops", precision) or 0.0)
    if flops_per_second > peak:
        peak = flops_per_second
        cache.put("matmul_peak_flops", precision, peak)
    return peak


def time_training_steps(model: torch.nn.Module, batch_size: int, seq_len: int, rounds: int) -> dict[str, float]:
    """Median seconds of forward + cross-entropy + backward in fp32 and bf16 autocast, interleaved
    (A B, B A, ...) on a copy of `model`, so the real model and the RNG stay untouched."""
    probe = copy.deepcopy(model).train()
    vocab_size = probe.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)

    def step(precision: str) -> float:
        start = time.perf_counter()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with context:
            logits = probe(inputs)  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        probe.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):
        step("fp32"), step("bf16")  # warm up both
        for round_index in range(rounds):
            for precision in (("fp32", "bf16") if round_index % 2 == 0 else ("bf16", "fp32")):
                times[precision].append(step(precision))
    return {precision: statistics.median(values) for precision, values in times.items()}


BF16_MIN_SPEEDUP = 1.1
"""bf16 must be this much faster than fp32 to be chosen: fp32 is exact and reproducible, so a gain
within the noise of a short probe is not worth giving that up."""


def choose_cpu_precision(
    model: torch.nn.Module, batch_size: int, seq_len: int, *, cache: MachineCache | None = None,
    native_bf16: bool | None = None, rounds: int = 3,
) -> tuple[str, str]:
    """(precision, reason) for training `model` at batch_size x seq_len on this CPU: bf16 autocast
    where the CPU has native bf16 instructions and a timed probe shows it at least
    BF16_MIN_SPEEDUP times faster, else fp32. The measurement is cached per machine and shape."""
    native_bf16 = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if not native_bf16:
        return "fp32", "fp32: this CPU has no native bf16 (avx512_bf16 / amx_bf16); bf16 would be emulated"
    cache = cache or MachineCache(torch.device("cpu"))
    config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(getattr(model, "config", None)) else {}
    shape = json.dumps({"model": config, "batch_size": batch_size, "seq_len": seq_len,
                        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}, sort_keys=True)
    name = hashlib.sha1(shape.encode()).hexdigest()[:16]
    measured = cache.get("precision_probe", name)
    source = f"cached in {cache.path}"
    if not measured:
        measured = time_training_steps(model, batch_size, seq_len, rounds)
        cache.put("precision_probe", name, measured)
        source = "measured now"
    speedup = measured["fp32"] / measured["bf16"]
    precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return precision, (f"{precision}: bf16 autocast trains {speedup:.2f}x as fast as fp32 at {batch_size} x "
                       f"{seq_len} on this CPU (native bf16; threshold {BF16_MIN_SPEEDUP}x; {source})")


def choose_training_precision(
    runtime: Runtime, asked: str, model: torch.nn.Module, batch_size: int, seq_len: int,
    measure: Callable[..., tuple[str, str]] = choose_cpu_precision,
) -> Runtime:
    """The runtime a training run uses: as set up, unless precision is auto on a CPU; then the
    main process measures (`choose_cpu_precision`) and every process takes its choice."""
    if asked != "auto" or runtime.device.type != "cpu":
        return runtime
    choice = [None, None]
    if runtime.ctx.is_main:
        choice = list(measure(model, batch_size, seq_len))
    if runtime.ctx.enabled:
        dist.broadcast_object_list(choice, src=0)
    return dataclasses.replace(runtime, precision=choice[0], precision_reason=choice[1])
