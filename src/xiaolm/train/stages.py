"""Every training stage as a small builder over the one loop (train/loop.py): pretraining, SFT, DPO
and distillation, each its data (`train_batch`), loss (`compute_loss`) and validation (`evaluate`).
Which parameters train (LoRA) and the loading around a stage are the runners' (train/runners.py).

Every loss forwards the model with `return_aux_loss=True` and hands the model's auxiliary loss
(MoE load balancing) back in its `StageLoss`; the loop adds it, so every stage trains with it.

Packed SFT keeps conversations apart with a block-diagonal causal attention mask built from
per-token document ids. Positions are not reset per conversation: with RoPE, attention depends
only on the distance between query and key, so a conversation packed at offset k gets exactly
the logits it gets alone (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.config import TrainConfig
from xiaolm.data.chat_formats import PreferencePair
from xiaolm.data.chat_tokens import IGNORE_INDEX, SftData, tokenize_preference
from xiaolm.data.shards import PackedTokens
from xiaolm.eval.ppl import evaluate_packed
from xiaolm.model.transformer import document_mask
from xiaolm.runtime import Runtime, evaluation_sums
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.loop import Batch, Stage, StageLoss


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def masked_forward(model: nn.Module, batch: Batch, targets: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, V), or with `targets` the model's mean loss on them (the head and the
    cross-entropy fused), and the model's auxiliary loss (None outside training or for a dense
    model). A batch that carries `doc_ids` (packed SFT rows) gets the block-diagonal causal mask,
    so packed conversations never attend to each other."""
    mask = document_mask(batch["doc_ids"]) if "doc_ids" in batch else None
    return model(batch["inputs"], attn_mask=mask, targets=targets, return_aux_loss=True)


def next_token_loss(model: nn.Module, batch: Batch) -> StageLoss:
    """Mean cross-entropy of each target token; targets of IGNORE_INDEX carry no loss (SFT:
    everything but the assistant tokens)."""
    loss, aux_loss = masked_forward(model, batch, targets=batch["targets"])
    return StageLoss(loss, batch["inputs"].numel(), aux_loss)


# --------------------------------------------------------------------------- pretraining


def pretrain_stage(
    train_data: PackedTokens,
    val_data: PackedTokens | None,
    token_num_bytes: torch.Tensor,
    cfg: TrainConfig,
    identity: dict | None = None,
) -> Stage:
    """Next-token prediction on packed windows: sample i is window i of the shuffled stream."""

    def train_batch(samples: range) -> Batch:
        inputs, targets = train_data.batch(samples.start, len(samples))
        return {"inputs": inputs, "targets": targets}

    evaluate = None
    if val_data is not None:
        evaluate = evaluate_packed(val_data, token_num_bytes, cfg.batch_size, cfg.num_eval_batches)
    return Stage(name="pretrain", train_batch=train_batch, compute_loss=next_token_loss, evaluate=evaluate,
                 identity=identity or {})


# --------------------------------------------------------------------------- SFT


def epoch_order(num_rows: int, seed: int) -> Callable[[int], int]:
    """Sample position -> row, a fresh seeded permutation of the rows every epoch."""
    orders: dict[int, torch.Tensor] = {}

    def row(position: int) -> int:
        epoch = position // num_rows
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(num_rows, generator=generator)
        return int(orders[epoch][position % num_rows])

    return row


def sft_batch(data: SftData, rows: torch.Tensor, packed: bool) -> Batch:
    """The rows of `data`, without the trailing columns that are padding in every row."""
    batch = {"inputs": data.inputs[rows], "targets": data.targets[rows]}
    if packed:
        batch["doc_ids"] = data.doc_ids[rows]
    used = int((data.doc_ids[rows] >= 0).any(dim=0).nonzero().max()) + 1
    return {k: v[:, :used] for k, v in batch.items()}


def data_key(*tensors: torch.Tensor) -> str:
    """A short hash of the training data, recorded in checkpoints so a resume sees the same data."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate_sft(data: SftData, batch_size: int, num_batches: int, packed: bool):
    """val_loss: mean nats per supervised token over the first rows of `data`, split across ranks."""

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        def batch_sums(rows: range) -> torch.Tensor:
            batch = to_device(sft_batch(data, torch.tensor(rows), packed), runtime.device)
            logits, _ = masked_forward(model, batch)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            return torch.stack([nats.double(), (batch["targets"] != IGNORE_INDEX).sum().double()])

        sums = evaluation_sums(runtime, data.num_rows, batch_size, num_batches, 2, batch_sums)
        nats, num_tokens = sums.tolist()
        return {"val_loss": nats / max(num_tokens, 1.0)}

    return evaluate


def sft_stage(train_data: SftData, val_data: SftData | None, cfg: TrainConfig, *, packed: bool = True,
              identity: dict | None = None) -> Stage:
    """Supervised fine-tuning: next-token loss on the assistant tokens only."""
    row_of = epoch_order(train_data.num_rows, cfg.seed)

    def train_batch(samples: range) -> Batch:
        return sft_batch(train_data, torch.tensor([row_of(i) for i in samples]), packed)

    evaluate = None
    if val_data is not None:
        evaluate = evaluate_sft(val_data, cfg.batch_size, cfg.num_eval_batches, packed)
    identity = {"train_rows": train_data.num_rows,
                "train_data_key": data_key(train_data.inputs, train_data.targets),
                "packed": packed, **(identity or {})}
    return Stage(name="sft", train_batch=train_batch, compute_loss=next_token_loss, evaluate=evaluate,
                 identity=identity)


# --------------------------------------------------------------------------- DPO


@dataclass
class PreferenceData:
    """Tokenized preference pairs: (prompt, chosen reply, rejected reply) ids per pair, and the
    frozen reference's summed log-probabilities of each reply when precomputed, (N, 2)."""

    examples: list[tuple[list[int], list[int], list[int]]]
    pad_id: int
    num_dropped: int = 0
    reference_logps: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.examples)


def build_preference_data(pairs: Sequence[PreferencePair], tokenizer: XiaoTokenizer, max_len: int,
                          truncate: str = "turns") -> PreferenceData:
    """Fit each pair into `max_len` tokens per sequence (`tokenize_preference`, under the `truncate`
    policy); pairs that do not fit are counted (`num_dropped`) and dropped."""
    examples, num_dropped = [], 0
    for pair in pairs:
        example = tokenize_preference(tokenizer, pair, max_len + 1, truncate)
        if example is None:
            num_dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise ValueError(f"no preference pair fits in seq_len={max_len} ({num_dropped} dropped); raise "
                         "--seq-len" + (" or pass --truncate tokens" if truncate == "turns" else ""))
    return PreferenceData(examples, tokenizer.pad_id, num_dropped)


def preference_batch(data: PreferenceData, indices: Sequence[int]) -> Batch:
    """Chosen sequences in rows [0, B), rejected in [B, 2B); targets only on reply tokens."""
    sequences, prompt_lengths = [], []
    for which in (1, 2):
        for i in indices:
            prompt, reply = data.examples[i][0], data.examples[i][which]
            sequences.append(prompt + reply)
            prompt_lengths.append(len(prompt))
    length = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), length), data.pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        # the target at position t is token t + 1: reply tokens start at prompt_length
        targets[row, prompt_length - 1: len(ids) - 1] = torch.tensor(ids[prompt_length:])
    batch = {"inputs": inputs, "targets": targets}
    if data.reference_logps is not None:
        rows = torch.as_tensor(list(indices))
        batch["reference_logps"] = torch.cat([data.reference_logps[rows, 0], data.reference_logps[rows, 1]])
    return batch


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (IGNORE_INDEX skipped): (B, T, V) -> (B,)."""
    mask = targets != IGNORE_INDEX
    logps = logits.float().log_softmax(dim=-1)  # (B, T, V)
    logps = logps.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return (logps * mask).sum(dim=-1)


def dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023). Inputs (2B,): chosen rows first, then rejected.
    Returns (mean loss, chosen rewards (B,), rejected rewards (B,)); reward = beta * log(pi / ref)."""
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, data: PreferenceData, batch_size: int,
                            runtime: Runtime | None = None) -> torch.Tensor:
    """The frozen reference's summed reply log-probabilities for every pair, (N, 2), computed once,
    on the runtime's device and in its precision (the training forward's autocast)."""
    runtime = runtime or Runtime(torch.device("cpu"), "fp32")
    reference = reference.to(runtime.device).eval()
    out = torch.zeros(data.num_pairs, 2)
    for start in range(0, data.num_pairs, batch_size):
        indices = list(range(start, min(start + batch_size, data.num_pairs)))
        batch = to_device(preference_batch(data, indices), runtime.device)
        with runtime.autocast():
            logits = reference(batch["inputs"])
        logps = sequence_logps(logits, batch["targets"]).cpu()
        chosen, rejected = logps.chunk(2)
        out[start: start + len(indices)] = torch.stack([chosen, rejected], dim=1)
    return out


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(4,) float64 on the rewards' device: chosen reward, rejected reward, correct pairs, pairs."""
    return torch.stack([chosen.sum().double(), rejected.sum().double(), (chosen > rejected).sum().double(),
                        torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device)])


def reward_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Mean rewards, margin and accuracy from `reward_sums` summed over batches (and ranks)."""
    chosen, rejected, correct, num_pairs = sums.tolist()
    num_pairs = max(num_pairs, 1.0)
    return {f"{prefix}reward_chosen": chosen / num_pairs, f"{prefix}reward_rejected": rejected / num_pairs,
            f"{prefix}reward_margin": (chosen - rejected) / num_pairs,
            f"{prefix}reward_accuracy": correct / num_pairs}


class RewardMeter:
    """`reward_sums` of the training batches between log steps, kept on the rewards' device (so the
    all-reduce works with nccl)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        sums = reward_sums(chosen, rejected)
        self.sums = sums if self.sums is None else self.sums + sums

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        sums = self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64)
        self.sums = None
        return reward_metrics(reduce(sums))


def dpo_stage(train_data: PreferenceData, val_data: PreferenceData | None, cfg: TrainConfig, *,
              beta: float = 0.1, reference: nn.Module | None = None, identity: dict | None = None) -> Stage:
    """DPO against a frozen reference: either `reference` (a model, run every step) or the
    reference log-probabilities precomputed into `train_data` / `val_data`."""
    if reference is None and train_data.reference_logps is None:
        raise ValueError("DPO needs a reference model or precomputed reference log-probabilities")
    if reference is not None:
        reference.eval().requires_grad_(False)
    row_of = epoch_order(train_data.num_pairs, cfg.seed)
    meter = RewardMeter()

    def reference_logps(batch: Batch) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        device = batch["inputs"].device
        if next(reference.parameters()).device != device:
            reference.to(device)
        with torch.no_grad():
            return sequence_logps(reference(batch["inputs"]), batch["targets"])

    def train_batch(samples: range) -> Batch:
        return preference_batch(train_data, [row_of(i) for i in samples])

    def compute_loss(model: nn.Module, batch: Batch) -> StageLoss:
        logits, aux_loss = model(batch["inputs"], return_aux_loss=True)
        policy = sequence_logps(logits, batch["targets"])
        loss, chosen, rejected = dpo_loss(policy, reference_logps(batch), beta)
        meter.add(chosen, rejected)
        return StageLoss(loss, batch["inputs"].numel(), aux_loss)

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        def batch_sums(indices: range) -> torch.Tensor:
            batch = to_device(preference_batch(val_data, indices), runtime.device)
            policy = sequence_logps(model(batch["inputs"]), batch["targets"])
            loss, chosen, rejected = dpo_loss(policy, reference_logps(batch), beta)
            num_pairs = torch.tensor(float(len(indices)), dtype=torch.float64, device=runtime.device)
            loss_sums = torch.stack([loss.double() * num_pairs, num_pairs])
            return torch.cat([loss_sums, reward_sums(chosen, rejected)])

        sums = evaluation_sums(runtime, val_data.num_pairs, cfg.batch_size, cfg.num_eval_batches, 6,
                               batch_sums)
        loss_sum, num_pairs = sums[:2].tolist()
        return {"val_loss": loss_sum / max(num_pairs, 1.0), **reward_metrics(sums[2:], "val_")}

    identity = {"train_pairs": train_data.num_pairs, "beta": beta,
                "reference": "precomputed" if reference is None else "model", **(identity or {})}
    return Stage(name="dpo", train_batch=train_batch, compute_loss=compute_loss,
                 evaluate=evaluate if val_data is not None else None, identity=identity,
                 metrics=meter.metrics)


# --------------------------------------------------------------------------- distillation


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T || student_T), over the supervised
    tokens; T^2 keeps the soft term's gradient scale independent of the temperature (Hinton 2015)."""
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(student_logits[mask].float(), targets[mask])
    student = (student_logits[mask].float() / temperature).log_softmax(dim=-1)
    teacher = (teacher_logits[mask].float() / temperature).log_softmax(dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return alpha * ce + (1 - alpha) * kl


def distill_stage(train_data: SftData, val_data: SftData | None, teacher: nn.Module, cfg: TrainConfig, *,
                  temperature: float = 2.0, alpha: float = 0.5, packed: bool = True,
                  identity: dict | None = None) -> Stage:
    """The SFT data and mask, with the loss pulled towards a frozen teacher's distribution."""
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"distillation needs temperature > 0 and alpha in [0, 1], got {temperature}, "
                         f"{alpha}")
    teacher.eval().requires_grad_(False)
    sft = sft_stage(train_data, val_data, cfg, packed=packed, identity=identity)

    def compute_loss(model: nn.Module, batch: Batch) -> StageLoss:
        if next(teacher.parameters()).device != batch["inputs"].device:
            teacher.to(batch["inputs"].device)
        with torch.no_grad():
            teacher_logits, _ = masked_forward(teacher, batch)
        logits, aux_loss = masked_forward(model, batch)
        loss = distillation_loss(logits, teacher_logits, batch["targets"], temperature, alpha)
        return StageLoss(loss, batch["inputs"].numel(), aux_loss)

    return dataclasses.replace(sft, name="distill", compute_loss=compute_loss,
                               identity={**sft.identity, "temperature": temperature, "alpha": alpha})
