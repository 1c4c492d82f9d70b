"""The compiled decode step (`--compile` of generate, chat and serve): the decode forward as one
torch.compile graph with static shapes.

Batch-1 decoding on a CPU is bound by how fast the weights stream through the matrix-vector
products (a 26M model reads 104 MB per token), and ATen's fp32 matmul reaches about half the
memory bandwidth at these shapes. Compiled with Inductor's weight freezing and its C++ GEMM
template (chosen against ATen by autotuning on the machine at hand), the same products run
2-3x faster, and every elementwise op between them fuses into a few C++ loops
(docs/benchmarks.md, section 11).

Two graphs, each compiled once at its first use: one for a single row (generate and chat, whose
engines have one slot), one for several rows (2 up to the engine's slots), the number of rows being
a dynamic size in it (Dynamo will not make a size of 1 dynamic). An engine of several slots (a
server) runs a lone request through the several-row graph too, beside a free row, so it compiles
and holds one graph, not two (measured about 5% slower than the one-row graph for that request).
In both the attention window, the longest row's length, is a dynamic size too, so a growing reply
never recompiles. The weights are frozen into the compiled code: an engine decodes the weights it
had when it compiled. Compiling takes tens of seconds on a 2-core CPU (printed; Inductor's disk
cache makes later processes faster), so it pays for a server or a chat session, not a one-line
`generate`. Where compiling fails (no C++ compiler, a model the graph cannot hold) the engine says why once and decodes
eagerly. Routed Mixture-of-Experts layers, whose eager dispatch has per-expert token counts (data),
gather each token's experts' weights in the graph instead (`moe.gathered_dispatch`).

The cache goes in as one tensor per layer (views of the engine's cache) and the new keys and
values are written into each whole tensor by index, which Inductor does in place; written into
a slice of rows of one (L, B, ...) tensor, the graph copied the whole cache every step, which
made a server's compiled decoding slower than eager (docs/benchmarks.md, sections 11-12).
Its many short parallel kernels also want the thread that did the process's other tensor work:
run from a second thread they took 2-3x as long (OpenMP, see serve/app.py), so `xiaolm serve`
decodes on its main thread.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from torch import nn

from xiaolm.model.kv_cache import KVCache
from xiaolm.model.transformer import Transformer


def inductor_options(device: torch.device) -> dict:
    """Inductor settings for the step: frozen weights (so they can be packed), and on CPU the C++
    GEMM template as a candidate of the autotuned matmuls."""
    options = {"freezing": True}
    if device.type == "cpu":
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    # quiet: no table of benchmarked kernels per matmul on stderr
    options.update(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
    return options


class DecodeStep(nn.Module):
    """One decode forward: tokens (n, 1), the rows [0, n) of the cache `keys`/`values` (one tensor
    (B, KVH, S, D) per layer), each at its position in `positions` (B, 1), attending to the first
    `window.shape[0]` positions; the next-token logits (n, V). Writes the new keys and values into
    the cache in place. The rows of the forward are sliced here, from the sizes of `tokens`, so they
    are one symbol when dynamic."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], window: torch.Tensor) -> torch.Tensor:
        num_rows, end = tokens.shape[0], window.shape[0]
        positions = positions[:num_rows]
        cache = KVCache.at_positions(keys, values, positions, end)
        x = self.model.run_blocks(tokens, positions, end, cache, None)
        return self.model.lm_head(x[:, -1])


class CompiledDecoder:
    """The compiled step over one engine's cache, compiled at its first call. `__call__` returns the
    next-token logits of rows [0, n), or None when compiling failed (the caller then decodes
    eagerly; the reason was printed once).

    The cache has one spare row and one spare position beyond what the engine uses, so the dynamic
    sizes (rows 2..slots, window 2..context) never reach the tensors' full sizes, which Dynamo would
    specialise on."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.cache = cache
        self.options = inductor_options(cache.keys.device)
        self.step = torch.compile(DecodeStep(model).eval(), dynamic=False, fullgraph=True)
        self.positions = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.keys.device)
        # the graph's cache inputs: a view of each layer's keys and values (see KVCache.at_positions)
        self.keys, self.values = list(cache.keys.unbind(0)), list(cache.values.unbind(0))
        self.failed = False
        self.compiled_for: set[bool] = set()  # compiled for one row (False) / several (True)
        self.pad_one_row = cache.batch_size > 2  # several slots: a lone row goes with a free one

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        num_rows = num_real = tokens.shape[0]
        cache = self.cache
        end = int(cache.lengths[:num_real].max()) + 1
        if end >= cache.max_len or num_real >= cache.batch_size:
            raise ValueError(f"the compiled step's cache holds {cache.batch_size - 1} rows of "
                             f"{cache.max_len - 1} positions; {num_real} rows to {end} were asked for")
        self.positions[:num_real, 0] = cache.lengths[:num_real]
        if num_real == 1 and self.pad_one_row:
            # row 1 is free (the running rows are [0, n)): its token goes to its position 0, which
            # the row's next prefill overwrites, and its logits are dropped
            tokens, num_rows = torch.cat([tokens, tokens.new_zeros(1)]), 2
            self.positions[1, 0] = 0
        tokens = tokens[:, None]  # (n, 1)
        window = torch.empty(end, device=cache.keys.device)  # only its size counts
        torch._dynamo.mark_dynamic(window, 0, min=2, max=cache.max_len - 1)
        several = num_rows > 1  # one row is its own graph: Dynamo will not make a size of 1 dynamic
        if several:
            torch._dynamo.mark_dynamic(tokens, 0, min=2, max=cache.batch_size - 1)
        new = several not in self.compiled_for
        if new:
            print(f"xiaolm: compiling the decode step for {'several rows' if several else 'one row'} "
                  "(tens of seconds on a small CPU)", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            with torch._inductor.config.patch(self.options), warnings.catch_warnings():
                # Inductor's autotuning still calls tensor.storage(): a deprecation warning per matmul
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                logits = self.step(tokens, self.positions, self.keys, self.values, window)
        except Exception as error:  # noqa: BLE001 - any failure to compile means: decode eagerly
            if not new:
                raise
            self.failed = True
            lines = str(error).strip().splitlines()
            print(f"xiaolm: compiling the decode step failed, decoding eagerly ({type(error).__name__}: "
                  f"{lines[0] if lines else ''})", file=sys.stderr)
            return None
        if new:
            self.compiled_for.add(several)
            print(f"xiaolm: decode step compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        cache.lengths[:num_real] += 1
        return logits[:num_real]
