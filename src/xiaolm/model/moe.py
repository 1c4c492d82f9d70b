"""Mixture-of-Experts feed-forward, DeepSeek style, plugged in by `make_feed_forward`.

Choices, top to bottom:
- fine-grained routed experts, each a SwiGLU `FeedForward` of width `moe_intermediate_size`
  (state-dict names `experts.N.{gate,up,down}_proj`, the layout of DeepSeek / Qwen-MoE in
  transformers), plus `num_shared_experts` always-on experts fused into one SwiGLU of
  `num_shared_experts * moe_intermediate_size` (`shared.*`); the first `first_k_dense` blocks keep
  the dense feed-forward;
- a linear router without bias, scored in fp32 with softmax (DeepSeekMoE, minimind) or sigmoid
  (DeepSeek-V3); each token takes the top `num_experts_per_token` experts, weighted by their scores,
  renormalised to sum to 1 when `moe_norm_topk` and k > 1 (with k = 1 a renormalised weight would be
  the constant 1 and the router would learn nothing from the language-model loss; minimind skips it too);
- no capacity limit and no token dropping: training, evaluation and KV-cache decoding route alike;
- dispatch by sorting: the (token, expert) assignments are sorted by expert once, every expert runs
  one matmul chain on its contiguous slice, and one `index_add_` scatters the weighted outputs back.
  Compiled decoding (a few tokens, a static graph) gathers each assignment's expert weights instead
  (`gathered_dispatch`). `loop_dispatch` is the naive version (a boolean mask over all assignments
  per expert, minimind's training path), kept as the reference the tests and bench/moe_dispatch.py
  compare against;
- every expert runs, even on zero tokens, so each one is in the autograd graph and gets a (zero)
  gradient: DDP then sees no unused parameters;
- load balancing by an auxiliary loss E * sum_i f_i * P_i (f_i: fraction of assignments routed to
  expert i, P_i: its mean router probability), over the micro-batch ("batch", Switch / minimind) or
  per sequence and averaged ("sequence", DeepSeek); it is 1 for balanced routing and the training loss
  adds `moe_aux_loss_coef` times its sum over MoE layers, which the model's forward returns with
  `return_aux_loss=True` (what every training stage's loss asks for, train/stages.py);
- optionally aux-loss-free balancing (DeepSeek-V3): a per-expert bias, a buffer saved with the
  weights, is added to the scores for choosing experts only (never to the weights), and after every
  optimizer step moves by `moe_bias_update_rate` against the sign of each expert's load error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from xiaolm.config import ModelConfig
from xiaolm.model.transformer import FeedForward

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel ranks, in place


def grouped_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: Sequence[nn.Module]
) -> torch.Tensor:
    """x (N, C), indices and weights (N, k) -> sum_j weights[:, j] * experts[indices[:, j]](x), (N, C).

    Sorts the N * k assignments by expert so each expert sees one contiguous slice."""
    k = indices.shape[1]
    flat_experts = indices.flatten()  # (N*k,)
    order = flat_experts.argsort(stable=True)  # assignments grouped by expert
    token_of = order // k  # (N*k,) token behind each sorted assignment
    counts = torch.bincount(flat_experts, minlength=len(experts)).tolist()  # the one host sync
    grouped = x.index_select(0, token_of)  # (N*k, C); its backward is an index_add_, faster than x[...]'s
    # zero-token experts still run (on an empty slice): they join the graph with zero gradients
    outputs = torch.cat([expert(chunk) for expert, chunk in zip(experts, grouped.split(counts))])  # (N*k, C)
    outputs = outputs * weights.flatten()[order, None].to(outputs.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, outputs.to(x.dtype))


def gathered_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: Sequence[nn.Module]
) -> torch.Tensor:
    """The same function as `grouped_dispatch` with no size that depends on the routing: each of
    the N * k assignments gathers its expert's three matrices from the experts' stacked weights and
    runs them as batched matrix products. What the compiled decode step runs (a static graph cannot
    hold per-expert token counts): it reads only the chosen experts' weights, but copies them, so it
    is for a few tokens, never a training batch."""
    N, k = indices.shape
    gate = torch.stack([expert.gate_proj.weight for expert in experts])  # (E, I, C); constants when frozen
    up = torch.stack([expert.up_proj.weight for expert in experts])
    down = torch.stack([expert.down_proj.weight for expert in experts])  # (E, C, I)
    flat_experts = indices.flatten()  # (N*k,)
    rows = x.repeat_interleave(k, dim=0)[:, None]  # (N*k, 1, C)
    hidden = torch.bmm(rows, gate[flat_experts].transpose(1, 2))  # (N*k, 1, I)
    hidden = nn.functional.silu(hidden) * torch.bmm(rows, up[flat_experts].transpose(1, 2))
    outputs = torch.bmm(hidden, down[flat_experts].transpose(1, 2)).view(N, k, -1)  # (N, k, C)
    return (outputs * weights.unsqueeze(-1).to(outputs.dtype)).sum(dim=1).to(x.dtype)


def loop_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: Sequence[nn.Module]
) -> torch.Tensor:
    """The same function as `grouped_dispatch`, computed as minimind trains: repeat every token k
    times, then per expert a boolean mask over all N * k assignments, a gather and a masked write."""
    k = indices.shape[1]
    repeated = x.repeat_interleave(k, dim=0)  # (N*k, C)
    flat_experts = indices.flatten()  # (N*k,)
    y = torch.empty_like(repeated)
    for i, expert in enumerate(experts):
        mask = flat_experts == i
        y[mask] = expert(repeated[mask]).to(y.dtype)
    y = y.view(*indices.shape, -1) * weights.unsqueeze(-1).to(y.dtype)  # (N, k, C)
    return y.sum(dim=1)


def balance_loss(
    probs: torch.Tensor, indices: torch.Tensor, num_experts: int, per_sequence: bool
) -> torch.Tensor:
    """E * sum_i f_i * P_i for probs (B, T, E) and chosen experts indices (B, T, k); 1 when balanced.

    f_i (the fraction of assignments to expert i) carries no gradient; P_i does, and the loss
    pushes probability away from the experts that are over-used. With `per_sequence` both are
    taken within each sequence and the loss is averaged over sequences (DeepSeek's sequence-wise
    variant); otherwise over the whole micro-batch."""
    B, T, k = indices.shape
    if per_sequence:
        counts = torch.zeros(B, num_experts, device=probs.device)
        counts.scatter_add_(1, indices.reshape(B, T * k), torch.ones(B, T * k, device=probs.device))  # (B, E)
        fractions = counts / (T * k)  # (B, E)
        return num_experts * (fractions * probs.mean(dim=1)).sum(dim=1).mean()
    fractions = torch.bincount(indices.flatten(), minlength=num_experts).float() / indices.numel()  # (E,)
    return num_experts * (fractions * probs.flatten(0, 1).mean(dim=0)).sum()


class MoEFeedForward(nn.Module):
    """Routed experts (top-k of `num_experts`) plus always-on shared experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.scoring = config.moe_scoring
        self.normalise = config.moe_norm_topk and self.top_k > 1
        self.balance = config.moe_balance_loss
        self.bias_update_rate = config.moe_bias_update_rate
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared = None
        if config.num_shared_experts:
            shared_size = config.num_shared_experts * config.moe_intermediate_size
            self.shared = FeedForward(config.hidden_size, shared_size)
        # persistent: the aux-loss-free bias is learned state, saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.dispatch = grouped_dispatch
        self.last_aux_loss: torch.Tensor | None = None
        # bookkeeping of this process, never saved: assignments per expert since the last log and
        # since the last optimizer step, and (sum, forwards) of the balance loss since the last log.
        # Plain attributes, not buffers: DDP would overwrite buffers with rank 0's at every forward.
        # Integer counts and fp32 sums: exact, and MPS has no float64.
        self.logged_counts = torch.zeros(config.num_experts, dtype=torch.long)
        self.step_counts = torch.zeros(config.num_experts, dtype=torch.long)
        self.logged_aux = torch.zeros(2)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> scores (N, E) in fp32, chosen experts (N, k), their weights (N, k)."""
        logits = self.router(x).float()  # (N, E)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        # the bias steers which experts are chosen, never how much they weigh
        _, indices = (scores + self.expert_bias).topk(self.top_k, dim=-1)  # (N, k)
        weights = scores.gather(-1, indices)  # (N, k)
        if self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, indices, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        scores, indices, weights = self.route(flat)
        # compiled decoding (one token per row, a static graph): the dispatch with no data-dependent
        # sizes; decided on T, a static size, since the rows may be a dynamic one
        gather = torch.compiler.is_compiling() and T == 1 and not self.training
        out = (gathered_dispatch if gather else self.dispatch)(flat, indices, weights, self.experts)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.last_aux_loss = None
        if self.training:
            self._record(scores.view(B, T, -1), indices.view(B, T, -1))
        return out.view(B, T, C)

    def _record(self, scores: torch.Tensor, indices: torch.Tensor) -> None:
        if self.balance != "none":
            # sigmoid scores do not sum to 1: normalise them into a distribution first (DeepSeek-V3)
            probs = scores if self.scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            self.last_aux_loss = balance_loss(probs, indices, self.num_experts, self.balance == "sequence")
        with torch.no_grad():
            counts = torch.bincount(indices.flatten(), minlength=self.num_experts)  # (E,) long
            self.logged_counts = self.logged_counts.to(counts.device) + counts
            if self.bias_update_rate:
                self.step_counts = self.step_counts.to(counts.device) + counts
            if self.last_aux_loss is not None:
                aux = torch.stack([self.last_aux_loss.detach().float(), torch.ones_like(self.last_aux_loss)])
                self.logged_aux = self.logged_aux.to(counts.device) + aux

    @torch.no_grad()
    def update_bias(self, reduce: Reduce) -> None:
        """DeepSeek-V3's aux-loss-free step: raise the bias of under-loaded experts, lower the others.
        Counts are summed over ranks first so every rank keeps the same bias."""
        if not self.bias_update_rate:
            return
        counts = reduce(self.step_counts.to(self.expert_bias.device)).float()
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.step_counts = torch.zeros_like(self.step_counts)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [module for module in model.modules() if isinstance(module, MoEFeedForward)]


@torch.no_grad()
def moe_metrics(model: nn.Module, reduce: Reduce) -> dict:
    """Since the last call (summed over ranks): per MoE layer, the fraction of routed assignments
    each expert took (`expert_load`), and the balance loss averaged over layers and forwards
    (`aux_loss`, 1.0 = balanced). Empty for a dense model. Call on every rank: it all-reduces."""
    layers = moe_layers(model)
    if not layers:
        return {}
    device = layers[0].expert_bias.device
    counts = reduce(torch.stack([layer.logged_counts.to(device) for layer in layers]))  # (L_moe, E)
    aux = reduce(torch.stack([layer.logged_aux.to(device) for layer in layers]))  # (L_moe, 2): sum, forwards
    for layer in layers:
        layer.logged_counts = torch.zeros_like(counts[0])
        layer.logged_aux = torch.zeros_like(aux[0])
    loads = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1).float()
    metrics = {"expert_load": [[round(v, 5) for v in row] for row in loads.tolist()]}
    if aux[:, 1].sum() > 0:
        metrics["aux_loss"] = float((aux[:, 0] / aux[:, 1].clamp(min=1)).mean())
    return metrics


def update_expert_biases(model: nn.Module, reduce: Reduce) -> None:
    for layer in moe_layers(model):
        layer.update_bias(reduce)


def num_active_parameters(model: nn.Module) -> int:
    """Parameters one token passes through: the total minus the routed experts it does not use."""
    total = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        total -= (layer.num_experts - layer.top_k) * per_expert
    return total
