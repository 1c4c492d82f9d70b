"""The xiaolm decoder: a Llama-style transformer in one file.

Choices, top to bottom:
- token embedding, no absolute positions;
- pre-norm blocks with RMSNorm (weight only; the one bias in the model is the optional one on
  the query/key/value projections, Qwen2's `qkv_bias`);
- attention with rotary position embeddings in the rotate-half convention (the layout of
  Llama / Qwen2 / Qwen3 in transformers, so weights map 1:1), optionally scaled to run past the
  trained context (`rope_scaling`: linear, NTK-aware fixed or dynamic, YaRN, Llama 3's; computed
  as transformers' modeling_rope_utils does), grouped-query attention (num_kv_heads key/value
  heads shared by num_heads query heads) with heads `head_dim` wide (hidden_size / num_heads
  unless set, as Qwen3 does), optional QK-norm (RMSNorm over each head's queries and keys
  before RoPE, Qwen3's), computed by `scaled_dot_product_attention` so the fused / flash
  kernels run where they exist;
- the query/key/value projections, and the gate/up projections, each run as one matmul on their
  weights stacked (`fused_projections`; state-dict keys unchanged, LoRA-wrapped layers run apart;
  a model prepared for decoding keeps the stack until a weight changes);
- a SwiGLU feed-forward, down(silu(gate(x)) * up(x)); each block builds its feed-forward through
  `make_feed_forward`, the single place a Mixture-of-Experts layer (model/moe.py) replaces the
  dense one when the config has experts;
- a final RMSNorm and an output projection tied to the embedding (configurable); given targets,
  the forward returns the mean next-token loss of the projection and cross-entropy fused a chunk
  of rows at a time (model/loss.py), so the batch's fp32 logits never exist whole;
- optional activation checkpointing (`activation_checkpointing`): each block's activations are
  recomputed in backward instead of kept, for less memory at about a third more compute;
- a preallocated KV cache for decoding (model/kv_cache.py), filled in place, each row at its own
  position so sequences of different lengths decode together in one batch.
All initialisation lives in `init_weights`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xiaolm.config import ModelConfig
from xiaolm.model.kv_cache import KVCache
from xiaolm.model.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 sums of squares lose too much precision
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)


def fused_projections(owner: nn.Module, x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """x through several Linear layers that read the same input (or one), as one matmul on their
    stacked weights: one larger matmul (and one in backward) runs faster than three small ones, and
    the parameters stay separate, so checkpoints, LoRA targets and transformers' names are unchanged.
    Training stacks the weights every call (they change every step, and the copy is small next to
    the matmul). A model prepared for decoding (`Transformer.prepare_for_decoding`) keeps the stack
    on `owner`, transposed to (in, out): a decoded token is one row, and for one row
    `x @ weight_t` streams the weights in memory order, measured 1.3-2x faster than
    `F.linear(x, weight)` on CPU (docs/benchmarks.md, section 9). The kept stack is rebuilt when a
    weight's version counter moves (load_state_dict, merging LoRA) and dropped when the model trains
    again; any other forward without gradients (validation during training: fused AdamW and FSDP
    write weights without moving their version) runs the projections apart."""
    if not all(type(linear) is nn.Linear for linear in linears):  # e.g. peft's LoRA wrappers
        return tuple(linear(x) for linear in linears)
    params = [t for linear in linears for t in (linear.weight, linear.bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        weight, bias = _stack(linears)
        if len(linears) == 1:
            return (F.linear(x, weight, bias),)
        return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)
    if not getattr(owner, "keep_stacked_weights", False) or torch.compiler.is_compiling():
        # (the compiled decode step, inference/compiled.py, freezes the weights and packs each its own way)
        return tuple(linear(x) for linear in linears)
    # id of the first linear -> (version key, weight_t, bias)
    kept = owner.__dict__.setdefault("_stacked_weights", {})
    key = tuple((id(t), t._version, t.device, t.dtype) for t in params)
    cached = kept.get(id(linears[0]))
    if cached is None or cached[0] != key:
        weight, bias = _stack(linears)
        cached = kept[id(linears[0])] = (key, weight.t().contiguous(), bias)  # weight_t: (in, sum of outputs)
    out = x @ cached[1]
    if cached[2] is not None:
        out = out + cached[2]
    if len(linears) == 1:
        return (out,)
    return out.split([linear.out_features for linear in linears], dim=-1)


def _stack(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    weight = torch.cat([linear.weight for linear in linears])  # (sum of outputs, C)
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    return weight, bias


def rope_frequencies(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in float64 and the factor cos/sin are scaled by, for a sequence of
    `seq_len` positions under `config.rope_scaling` (the formulas of transformers' modeling_rope_utils,
    so an exported model computes what xiaolm computes)."""
    dim, base = config.head_dim, config.rope_theta
    kind, factor, original = config.rope_scaling, config.rope_scaling_factor, config.original_max_seq_len
    if kind == "ntk":  # NTK-aware: a larger base stretches the low frequencies, keeps the high ones
        base = base * factor ** (dim / (dim - 2))
    elif kind == "dynamic" and seq_len > original:  # the same, grown with the length past the trained one
        base = base * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (D/2,)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "yarn":
        return _yarn_frequencies(config, inv_freq)
    if kind == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low_wavelength = original / config.rope_low_freq_factor  # longer waves: interpolated by the factor
        high_wavelength = original / config.rope_high_freq_factor  # shorter waves: kept
        smooth = (original / wavelength - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
        medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
        return torch.where(medium, blended, scaled), 1.0
    return inv_freq, 1.0


def _yarn_frequencies(config: ModelConfig, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the trained
    context are interpolated by the factor, those that turn more than beta_fast times are kept, a
    linear ramp in between; cos/sin are scaled by 0.1 * ln(factor) + 1 unless set."""
    dim, base, factor, original = (config.head_dim, config.rope_theta, config.rope_scaling_factor,
                                   config.original_max_seq_len)

    def dimension_of(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension_of(config.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(dimension_of(config.rope_yarn_beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)  # (D/2,)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = config.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_factor


def rope_tables(config: ModelConfig, num_positions: int, seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (num_positions, head_dim), halves repeated as in rotate-half RoPE, for
    a sequence of `seq_len` positions (only dynamic scaling depends on it; 0: within the trained context)."""
    inv_freq, scale = rope_frequencies(config, seq_len)
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float64), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) when rows sit at different positions.
    Rotate-half: pairs are (i, i + D/2), as in Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal, and only within one document, the
    `attn_mask` that keeps documents packed into one row (SFT) from attending to each other.
    Padding (-1) attends to padding, so no query row is empty (an empty row gives NaN)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: KVCache | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = fused_projections(self, x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KVH, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KVH, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KVH, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KVH, S, D) with S = cached + T
        is_causal = attn_mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,  # KV heads shared without copying
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return fused_projections(self, y, (self.o_proj,))[0]


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_projections(self, x, (self.gate_proj, self.up_proj))
        return fused_projections(self, F.silu(gate) * up, (self.down_proj,))[0]


def make_feed_forward(config: ModelConfig, layer: int) -> nn.Module:
    """The feed-forward of block `layer`: dense, or Mixture-of-Experts (model/moe.py) when the
    config has experts and the block is past the first `first_k_dense`."""
    if config.num_experts > 0 and layer >= config.first_k_dense:
        from xiaolm.model.moe import MoEFeedForward  # moe.py builds its experts from FeedForward above

        return MoEFeedForward(config)
    return FeedForward(config.hidden_size, config.intermediate_size)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = make_feed_forward(config, layer)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache, attn_mask):
        x = x + self.dropout(self.attn(self.input_norm(x), cos, sin, self.layer, cache, attn_mask))
        return x + self.dropout(self.mlp(self.post_attn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config, config.max_seq_len)
        # not persistent: derived from the config, so never stored in checkpoints
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # set by the training loop (--activation-checkpointing)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for every matrix; output projections of each block scaled by
        1/sqrt(2 * num_layers) (GPT-2) so the residual stream's variance does not grow with depth;
        norms start at 1."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("o_proj") or name.endswith("down_proj")
                module.weight.normal_(0.0, residual_std if is_residual_out else std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context `seq_len`, as PaLM counts them:
        6 x the weights a token is multiplied by (every projection and the output head; the
        embedding lookup is no matmul; of an MoE layer's routed experts only the top-k a token goes
        to) + 12 x layers x attention width x seq_len (scores and weighted values, causal mask not
        discounted). MFU = this x tokens/s / the device's measured matmul peak."""
        matmul_weights = 0
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                matmul_weights += module.weight.numel()
            num_experts = getattr(module, "num_experts", 0)
            if num_experts and hasattr(module, "experts"):  # routed experts: only top-k of them run
                expert_weights = sum(p.numel() for p in module.experts.parameters())
                matmul_weights -= expert_weights * (1 - module.top_k / num_experts)
        matmul_weights += self.lm_head.weight.numel()
        attention = 12 * self.config.num_layers * self.config.num_heads * self.config.head_dim * seq_len
        return 6 * matmul_weights + attention

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_aux_loss: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T), the mean cross-entropy of the
        targets that are not -100 instead (fp32 scalar; logits never materialised whole). With
        `return_aux_loss`, (that, aux_loss).

        With a cache, each row's positions start at its filled length and the cache advances by T.
        `attn_mask` (bool, broadcastable to (B, H, T, S), True = may attend) overrides the causal
        mask, e.g. to keep packed documents apart. `aux_loss` is what the training loss adds for
        this forward: the MoE load-balancing loss times moe_aux_loss_coef; None for a dense model,
        in eval mode, or with the loss off.
        """
        x = self.hidden_states(input_ids, cache, attn_mask)
        if targets is not None and type(self.lm_head) is nn.Linear:  # not under a LoRA wrapper
            out = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        elif targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            out = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        else:
            out = fused_projections(self, x, (self.lm_head,))[0]  # (B, T, V)
        if not return_aux_loss:
            return out
        # each MoE layer's load-balancing loss of this forward (model/moe.py; None in eval mode)
        balance = [block.mlp.last_aux_loss for block in self.layers
                   if getattr(block.mlp, "last_aux_loss", None) is not None]
        if not balance or not self.config.moe_aux_loss_coef:
            return out, None
        return out, self.config.moe_aux_loss_coef * torch.stack(balance).sum()

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The forward up to the output head: input_ids (B, T) -> final-norm hidden states (B, T, C)."""
        T = input_ids.shape[1]
        end = T + (int(cache.lengths.max()) if cache is not None else 0)  # the longest row's new length
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}")
        start = cache.begin(T) if cache is not None else 0
        x = self.run_blocks(input_ids, start, end, cache, attn_mask)
        if cache is not None:
            cache.advance()
        return x

    def run_blocks(self, input_ids: torch.Tensor, start: int | torch.Tensor, end: int, cache: KVCache | None,
                   attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Embedding, blocks and final norm of tokens (B, T) at `start` (an int, or each row's positions
        (B, T)) in sequences whose longest ends at `end`. Decides nothing from tensor values, so the
        compiled decode step (inference/compiled.py) traces it whole."""
        T = input_ids.shape[1]
        cos_table, sin_table = self.rope(end)
        if isinstance(start, int):  # every row at the same position: one slice of the tables
            if cache is not None and attn_mask is None and start > 0 and T > 1:
                # continuing a filled cache with several tokens: query i sees keys up to start + i
                key_pos = torch.arange(start + T, device=input_ids.device)
                query_pos = torch.arange(start, start + T, device=input_ids.device)
                attn_mask = key_pos[None, :] <= query_pos[:, None]  # (T, S)
            cos, sin = cos_table[start:start + T], sin_table[start:start + T]  # (T, D)
        else:  # rows at different positions (batched decoding): (B, T) positions from the cache
            cos, sin = cos_table[start][:, None], sin_table[start][:, None]  # (B, 1, T, D)
            if attn_mask is None:
                # each query sees its own row's keys up to its position; later keys are stale or padding
                key_pos = torch.arange(end, device=input_ids.device)
                attn_mask = key_pos[None, None, None, :] <= start[:, None, :, None]  # (B, 1, T, S)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:  # dropout masks are replayed: the same function, less memory
                x = checkpoint(block, x, cos, sin, cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, attn_mask)
        return self.norm(x)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache, chunk_size: int) -> torch.Tensor:
        """Fill `cache` with prompts (B, P), `chunk_size` tokens per forward, and return the logits of
        the token after each (B, V). Memory stays flat in the prompt's length: a chunk's attention
        scores are chunk x filled length rather than P x P, its activations chunk-sized, and only the
        last position goes through the output head (P x V fp32 logits would be 0.6 GB for a
        1,000-token prompt at Qwen's 151,936 vocabulary)."""
        if chunk_size < 1:
            raise ValueError(f"prefill chunk size must be at least 1, got {chunk_size}")
        for start in range(0, input_ids.shape[1], chunk_size):
            x = self.hidden_states(input_ids[:, start:start + chunk_size], cache)
        return fused_projections(self, x[:, -1], (self.lm_head,))[0]  # (B, V)

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (at least `length` rows) for a forward that ends at position `length`.
        Dynamic NTK scaling depends on that length once it passes the trained context, so its tables
        are computed for it (what a fresh transformers model computes in one forward); every other
        kind uses the tables built once."""
        if self.config.rope_scaling != "dynamic" or length <= self.config.original_max_seq_len:
            return self.rope_cos, self.rope_sin
        cos, sin = rope_tables(self.config, length, length)
        return cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def training_metrics(self, reduce) -> dict:
        """Extra metrics logged by the training loop (MoE expert load and balance loss)."""
        from xiaolm.model.moe import moe_metrics

        return moe_metrics(self, reduce)

    def after_optimizer_step(self, reduce) -> None:
        """Called by the training loop after each optimizer update (MoE routing-bias balancing)."""
        from xiaolm.model.moe import update_expert_biases

        update_expert_biases(self, reduce)

    def prepare_for_decoding(self) -> Transformer:
        """Eval mode, and every projection (q/k/v and gate/up stacked, the output projections, the
        head) keeps its weights transposed for one-row matmuls between forwards (`fused_projections`)
        until the model goes back to training: what the decode loop calls once before its steps."""
        self.eval()
        for module in self.modules():
            if isinstance(module, (Attention, FeedForward, Transformer)):
                module.keep_stacked_weights = True
        return self

    def train(self, mode: bool = True) -> Transformer:
        """nn.Module.train; back in training, the stacks kept for decoding are dropped: optimizers
        update weights in place, and a fused one does so without moving their version counter."""
        if mode:
            for module in self.modules():
                if isinstance(module, (Attention, FeedForward, Transformer)):
                    module.keep_stacked_weights = False
                    module.__dict__.pop("_stacked_weights", None)
        return super().train(mode)

    def allocate_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        param = self.embed_tokens.weight
        config = self.config
        return KVCache.allocate(config.num_layers, batch_size, config.num_kv_heads, max_len or config.max_seq_len,
                                config.head_dim, param.device, dtype or param.dtype)
