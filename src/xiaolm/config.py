"""Typed configuration for every xiaolm run, with named presets.

Each field carries its help text in `metadata["help"]`: the CLI builds its flags from these
dataclasses (one flag per field, `--hidden-size` for `hidden_size`), so a flag and a config
field can never drift apart. Every checkpoint stores the resolved configs as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def doc(help_text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose help text the CLI and docs can read."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help_text}, **kwargs)
    return field(default=default, metadata={"help": help_text}, **kwargs)


def from_preset(cls: type, presets: dict[str, dict[str, Any]], kind: str, name: str,
                overrides: dict[str, Any]) -> Any:
    """`cls` built from the named preset with `overrides` on top."""
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; choose from {sorted(presets)}")
    return cls(**{**presets[name], **overrides})


def _multiple_of(value: float, multiple: int) -> int:
    return multiple * ((int(value) + multiple - 1) // multiple)


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_field_types(config: Any, where: str) -> None:
    """Each field holds a value of its annotated type (an int is a fine float) and every float is
    finite: a config.json edited by hand or a Python caller gets a message, not a TypeError later."""
    for f in fields(config):
        value = getattr(config, f.name)
        kinds = _FIELD_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{where}: {f.name} must be {kinds[-1].__name__}, got {type(value).__name__} "
                             f"{value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {f.name} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    """Shape of the decoder. See model/transformer.py for what each choice means."""

    vocab_size: int = doc("Vocabulary size; must match the tokenizer.", 6400)
    hidden_size: int = doc("Width of the residual stream.", 256)
    num_layers: int = doc("Number of transformer blocks.", 4)
    num_heads: int = doc("Number of query heads; must divide hidden_size.", 4)
    num_kv_heads: int = doc("Number of key/value heads (GQA); must divide num_heads.", 2)
    intermediate_size: int = doc(
        "Hidden width of the SwiGLU feed-forward; 0 means 8/3 * hidden_size rounded up to 64.", 0
    )
    head_dim: int = doc("Width of each attention head; 0 means hidden_size / num_heads (Qwen3 sets it apart).", 0)
    max_seq_len: int = doc("Longest context the model is built for (RoPE table, KV cache).", 512)
    rope_theta: float = doc("RoPE base frequency.", 1e6)
    rope_scaling: str = doc(
        "RoPE scaling to run past the trained context: none | linear (positions / factor) | ntk (NTK-aware, "
        "fixed: a larger base) | dynamic (NTK-aware, base grown with the length past the trained context) | "
        "yarn | llama3 (Llama 3.1's per-frequency scaling).", "none"
    )
    rope_scaling_factor: float = doc("Context extension factor of --rope-scaling.", 1.0)
    rope_original_max_seq_len: int = doc(
        "Context the model was trained at before scaling (dynamic, yarn, llama3); 0 means max_seq_len.", 0
    )
    rope_yarn_beta_fast: float = doc("YaRN: rotations within the trained context above which a frequency "
                                     "keeps its value (extrapolates).", 32.0)
    rope_yarn_beta_slow: float = doc("YaRN: rotations below which a frequency is interpolated by the factor.", 1.0)
    rope_attention_factor: float = doc(
        "YaRN: scale of cos/sin (softmax temperature); 0 means 0.1 * ln(factor) + 1.", 0.0
    )
    rope_low_freq_factor: float = doc("llama3: wavelengths above original / this are interpolated.", 1.0)
    rope_high_freq_factor: float = doc("llama3: wavelengths below original / this keep their value.", 4.0)
    norm_eps: float = doc("Epsilon of RMSNorm.", 1e-5)
    tie_embeddings: bool = doc("Share the input embedding with the output projection.", True)
    qkv_bias: bool = doc("Bias on the query, key and value projections (Qwen2).", False)
    qk_norm: bool = doc("RMSNorm on each head's queries and keys before RoPE (Qwen3/OLMo2 style).", False)
    dropout: float = doc("Dropout on attention output and MLP output; 0 for pretraining.", 0.0)
    init_std: float = doc("Standard deviation of the normal initialisation.", 0.02)
    # Mixture of Experts (model/moe.py); num_experts=0 keeps every feed-forward dense
    num_experts: int = doc("Routed experts per MoE feed-forward; 0 means a dense model.", 0)
    num_experts_per_token: int = doc("Routed experts each token goes to (top-k).", 1)
    num_shared_experts: int = doc("Always-on shared experts per MoE layer (DeepSeekMoE).", 0)
    moe_intermediate_size: int = doc(
        "Hidden width of each expert's SwiGLU; 0 means intermediate_size (when num_experts > 0).", 0
    )
    first_k_dense: int = doc("The first k blocks keep a dense feed-forward (DeepSeek).", 0)
    moe_scoring: str = doc("Router scores: softmax | sigmoid (DeepSeek-V3).", "softmax")
    moe_norm_topk: bool = doc("Renormalise the top-k weights to sum to 1 (only when top-k > 1).", True)
    moe_balance_loss: str = doc(
        "Auxiliary load-balancing loss: batch (over the micro-batch) | sequence (per sequence) | none.", "batch"
    )
    moe_aux_loss_coef: float = doc("Weight of the load-balancing loss in the training loss.", 0.01)
    moe_bias_update_rate: float = doc(
        "Aux-loss-free balancing (DeepSeek-V3): per-step change of each expert's routing bias; 0 disables.", 0.0
    )

    def __post_init__(self) -> None:
        check_field_types(self, "model config")
        if self.intermediate_size == 0:
            self.intermediate_size = _multiple_of(self.hidden_size * 8 / 3, 64)
        if self.head_dim == 0 and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_experts > 0 and self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.head_dim <= 0:
            raise ValueError(f"model config: head_dim must be positive, got {self.head_dim}")
        if self.head_dim * self.num_heads != self.hidden_size and self.head_dim == self.hidden_size // self.num_heads:
            raise ValueError(
                f"model config: num_heads={self.num_heads} must divide hidden_size={self.hidden_size} "
                "(or set head_dim explicitly)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        self._validate_rope_scaling()
        self._validate_moe()

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model config: rope_scaling must be one of {list(ROPE_SCALINGS)}, "
                             f"got {self.rope_scaling!r}")
        if self.rope_scaling == "none":
            return
        if self.rope_scaling_factor < 1.0:
            raise ValueError(f"model config: rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_original_max_seq_len < 0:
            raise ValueError("model config: rope_original_max_seq_len must be >= 0")
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError("model config: rope_low_freq_factor must be below rope_high_freq_factor")

    @property
    def original_max_seq_len(self) -> int:
        """The trained context that RoPE scaling extends (max_seq_len when not set)."""
        return self.rope_original_max_seq_len or self.max_seq_len

    def _validate_moe(self) -> None:
        if self.num_experts < 0 or self.num_shared_experts < 0 or self.moe_intermediate_size < 0:
            raise ValueError("model config: num_experts, num_shared_experts and moe_intermediate_size must be >= 0")
        if self.num_experts == 0:
            if self.num_shared_experts:
                raise ValueError("model config: num_shared_experts needs routed experts too; set --num-experts")
            return
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError(
                f"model config: num_experts_per_token={self.num_experts_per_token} must be between 1 and "
                f"num_experts={self.num_experts}"
            )
        if not 0 <= self.first_k_dense < self.num_layers:
            raise ValueError(
                f"model config: first_k_dense={self.first_k_dense} must be in [0, num_layers={self.num_layers}) "
                "so that at least one block is MoE"
            )
        if self.moe_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"model config: moe_scoring must be softmax or sigmoid, got {self.moe_scoring!r}")
        if self.moe_balance_loss not in ("batch", "sequence", "none"):
            raise ValueError(
                f"model config: moe_balance_loss must be batch, sequence or none, got {self.moe_balance_loss!r}"
            )
        if self.moe_aux_loss_coef < 0 or self.moe_bias_update_rate < 0:
            raise ValueError("model config: moe_aux_loss_coef and moe_bias_update_rate must be >= 0")

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (a tied embedding counted once), from the
        shapes alone: to size a model before allocating it (tested equal to the built model's)."""
        hidden = self.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = 2 * hidden * q_width + 2 * hidden * kv_width
        attention += q_width + 2 * kv_width if self.qkv_bias else 0
        attention += 2 * self.head_dim if self.qk_norm else 0
        dense = 3 * hidden * self.intermediate_size
        moe = (hidden * self.num_experts + 3 * hidden * self.moe_intermediate_size
               * (self.num_experts + self.num_shared_experts))
        num_moe_layers = self.num_layers - self.first_k_dense if self.num_experts else 0
        blocks = (self.num_layers * (attention + 2 * hidden) + (self.num_layers - num_moe_layers) * dense
                  + num_moe_layers * moe)
        embeddings = self.vocab_size * hidden * (1 if self.tie_embeddings else 2)
        return embeddings + blocks + hidden

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        return from_preset(cls, MODEL_PRESETS, "model", name, overrides)


ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # a few million parameters: learns Chinese phrases in minutes on 2 CPU cores
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=256),
    # minimind2-small's shape: about 26M parameters
    "minimind2-small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, max_seq_len=512),
    # minimind-3's shape: hidden 768, 8 layers, 8 heads, 4 KV heads
    "minimind-3": dict(hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, max_seq_len=512,
                       intermediate_size=2432),  # minimind's width (ceil(pi * 768 / 64) * 64): 63.9M
    # tiny with 4 experts, top-1: the shape of minimind-3-moe at CPU scale
    "tiny-moe": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=256,
                     num_experts=4, num_experts_per_token=1),
    # minimind-3-moe as published: 4 experts of width 2432 (ceil(pi * 768 / 64) * 64), top-1;
    # about 198M parameters, 64M active per token
    "minimind-3-moe": dict(hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, max_seq_len=512,
                           num_experts=4, num_experts_per_token=1, moe_intermediate_size=2432),
    # DeepSeek-style at minimind2-small's shape: 16 fine-grained experts (a quarter of the dense
    # width), top-3 plus 1 shared, so a token's feed-forward is as wide as the dense 1408; the first
    # block dense; sigmoid router with aux-loss-free bias balancing and a small sequence-wise loss (V3)
    "deepseek-moe-small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, max_seq_len=512,
                               num_experts=16, num_experts_per_token=3, num_shared_experts=1,
                               moe_intermediate_size=352, first_k_dense=1, moe_scoring="sigmoid",
                               moe_balance_loss="sequence", moe_aux_loss_coef=1e-4, moe_bias_update_rate=1e-3),
}


@dataclass
class TrainConfig:
    """How one training stage runs. Saved with every checkpoint; resume refuses a mismatch."""

    out_dir: str = doc("Run folder: checkpoints, metrics.jsonl, config and report go here.", "runs/pretrain")
    seq_len: int = doc("Tokens per training sequence; one longer than the model's max_seq_len is capped "
                       "at it.", 256)
    batch_size: int = doc("Sequences per micro-batch on each process.", 16)
    grad_accum_steps: int = doc("Micro-batches accumulated per optimizer step.", 1)
    max_steps: int = doc("Optimizer steps to train for.", 1000)
    stop_after_steps: int = doc(
        "End the run after this step, as a kill after its checkpoint would (the schedule still runs to "
        "max_steps; --resume continues); 0: at max_steps.", 0)
    lr: float = doc("Peak learning rate.", 3e-3)
    min_lr_ratio: float = doc("Cosine schedule ends at lr * min_lr_ratio.", 0.1)
    warmup_steps: int = doc("Linear warmup steps.", 50)
    optimizer: str = doc(
        "adamw | muon. muon: torch.optim.Muon for the 2-D matrices inside the blocks, AdamW for embeddings, "
        "norms and the output head; both at --lr (Muon's update is scaled to AdamW's RMS).", "adamw")
    weight_decay: float = doc("Decoupled weight decay (matrices only; norms and biases get none).", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    muon_momentum: float = doc("Muon's (Nesterov) momentum.", 0.95)
    grad_clip: float = doc("Clip the global gradient norm to this; 0 disables.", 1.0)
    precision: str = doc(
        "auto | bf16 | fp16 | fp32. auto: bf16 on GPUs that have it (else fp16 with loss scaling); on a CPU, "
        "bf16 autocast where it has native bf16 and a timed probe shows it faster (cached per machine), else fp32.",
        "auto")
    device: str = doc("auto | cpu | cuda | cuda:N | mps.", "auto")
    compile: bool = doc("torch.compile each transformer block (the first steps are slow while it compiles).", False)
    fsdp: bool = doc(
        "Under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2) instead of "
        "replicating them (DDP); checkpoints are torch.distributed.checkpoint shards, resumable on any number "
        "of processes.", False)
    activation_checkpointing: bool = doc(
        "Recompute each block's activations in backward instead of keeping them: far less memory for "
        "about a third more compute; the same losses.", False)
    eval_every: int = doc("Validate every N steps (and at the end); 0 disables.", 100)
    num_eval_batches: int = doc("Micro-batches per validation (on each process).", 8)
    save_every: int = doc("Write a checkpoint every N steps (and at the end); 0: only at the end.", 200)
    keep_checkpoints: int = doc("How many recent checkpoints to keep.", 2)
    log_every: int = doc("Write train metrics every N steps.", 10)
    seed: int = doc("Seed for initialisation, data order and dropout.", 1337)
    max_bad_steps: int = doc("Stop after this many consecutive steps with a NaN/inf loss or gradient.", 3)
    resume: bool = doc("Continue from the latest checkpoint in out_dir.", False)
    tensorboard: bool = doc("Also log to TensorBoard (needs the tensorboard package).", False)
    wandb: bool = doc("Also log to Weights & Biases (needs wandb and a login).", False)
    progress: bool = doc("Show a progress bar.", True)

    def __post_init__(self) -> None:
        check_field_types(self, "train config")
        positive = ["seq_len", "batch_size", "grad_accum_steps", "max_steps", "num_eval_batches", "log_every",
                    "keep_checkpoints", "max_bad_steps", "lr"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train config: {name} must be positive, got {getattr(self, name)}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"train config: precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"train config: optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.fsdp and self.optimizer == "muon":
            raise ValueError("--fsdp with --optimizer muon is not supported: Muon orthogonalises whole matrices, "
                             "and FSDP leaves each process a shard of them; use --optimizer adamw or DDP")
        for name in ["warmup_steps", "eval_every", "save_every", "stop_after_steps", "weight_decay", "grad_clip",
                     "muon_momentum"]:
            if getattr(self, name) < 0:
                raise ValueError(f"train config: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train config: min_lr_ratio must be in [0, 1] (the schedule ends at lr * "
                             f"min_lr_ratio), got {self.min_lr_ratio}")
        for name in ["beta1", "beta2"]:
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named schedule: the pretraining schedule that goes with a model preset, or an alignment
        stage's (sft, dpo, distill)."""
        return from_preset(cls, TRAIN_PRESETS, "train", name, overrides)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # sized so the whole speedrun (pretrain + SFT + DPO) fits in 20 minutes on 2 CPU cores
    "tiny": dict(seq_len=256, batch_size=16, max_steps=400, lr=3e-3, warmup_steps=20,
                 eval_every=100, num_eval_batches=16, save_every=100),
    # GPU scale: ~1B tokens at 32 x 512 x 4 tokens per step
    "minimind2-small": dict(seq_len=512, batch_size=32, grad_accum_steps=4, max_steps=15000, lr=1e-3,
                            warmup_steps=500, eval_every=500, num_eval_batches=32, save_every=1000),
    "minimind-3": dict(seq_len=512, batch_size=32, grad_accum_steps=4, max_steps=15000, lr=8e-4,
                       warmup_steps=500, eval_every=500, num_eval_batches=32, save_every=1000),
}
# MoE presets train on the schedule of their dense peer
TRAIN_PRESETS.update({"tiny-moe": TRAIN_PRESETS["tiny"], "minimind-3-moe": TRAIN_PRESETS["minimind-3"],
                      "deepseek-moe-small": TRAIN_PRESETS["minimind2-small"]})
# Schedules of the alignment stages (train/stages.py), any model size, each with its own run folder.
# Learning rates from a sweep on a small model (hidden 128, 2 layers, vocab 6400) pretrained 300
# steps on data/sample, then trained on the default chat sets at seq_len 128, batch 16 (SFT) / 8
# pairs (DPO), on CPU:
# - SFT, val loss after 60 steps: lr 2e-4 6.49, 5e-4 6.34, 1e-3 6.21, 2e-3 6.09, 4e-3 6.03. 2e-3:
#   within 0.06 of the best and under the pretraining peak (3e-3).
# - DPO (beta 0.1), after 30 steps, val loss / chosen reward / margin (19 held-out pairs, so noisy):
#   5e-6 0.691 / +0.002 / 0.003, 2e-5 0.686 / +0.007 / 0.014, 1e-4 0.662 / -0.04 / 0.07,
#   3e-4 0.587 / -0.46 / 0.29, 1e-3 0.639 / -2.5 / 0.64. 1e-4: a clear gain while the chosen
#   replies' log-probability barely moves; from 3e-4 up, DPO buys its margin mostly by lowering
#   both replies' probability, the known failure mode.
TRAIN_PRESETS.update({
    "sft": dict(out_dir="runs/sft", seq_len=256, batch_size=16, max_steps=300, lr=2e-3, warmup_steps=20,
                weight_decay=0.0, eval_every=50, num_eval_batches=8, save_every=100),
    "dpo": dict(out_dir="runs/dpo", seq_len=256, batch_size=8, max_steps=100, lr=1e-4, warmup_steps=10,
                weight_decay=0.0, min_lr_ratio=1.0, eval_every=25, num_eval_batches=4, save_every=50),
    "distill": dict(out_dir="runs/distill", seq_len=256, batch_size=16, max_steps=300, lr=1e-3,
                    warmup_steps=20, eval_every=50, num_eval_batches=8, save_every=100),
})

SHARED_TRAIN_FIELDS = frozenset(
    {"device", "precision", "compile", "activation_checkpointing", "seed", "max_bad_steps", "log_every",
     "keep_checkpoints", "tensorboard", "wandb", "progress"}
)
"""Settings of where and how a run is made, not of its schedule: speedrun passes these on from its
flags to its SFT and DPO stages, which otherwise follow their own presets."""


def fit_seq_len(seq_len: int, *models: ModelConfig) -> int:
    """The one rule for a sequence length longer than a model's context (every command that
    trains or evaluates on fixed-length sequences): it is capped at the model's max_seq_len (the
    shortest of several), and the cap is printed."""
    limit = min(model.max_seq_len for model in models)
    if seq_len <= limit:
        return seq_len
    print(f"seq_len {seq_len} -> {limit}: the model's max_seq_len (raise --max-seq-len when building a model "
          "for longer sequences)")
    return limit


SAMPLING_PRESETS: dict[str, dict[str, Any]] = {  # of inference.sampling.SamplingConfig
    # `xiaolm generate` and speedrun's sample continuations: text that goes on from a prompt
    "generate": dict(max_new_tokens=128, temperature=0.8, top_k=0, top_p=0.95, repetition_penalty=1.1),
    # `xiaolm chat`, and speedrun's and bench/chat_stop.py's answers: a little cooler, longer
    "chat": dict(max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.1),
}


DEFAULT_LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""Every attention and MLP projection of model/transformer.py (module names end with these)."""


@dataclass
class LoraConfig:
    """LoRA adapters (model/lora.py, through peft); saved as the "lora" section of a checkpoint's
    config.json, which is how a LoRA checkpoint is recognised."""

    rank: int = doc("Rank r of each adapter (B @ A with A: r x in, B: out x r).", 8)
    alpha: float = doc("Scale: the update is (alpha / rank) * B @ A.", 16.0)
    dropout: float = doc("Dropout on the adapter's input.", 0.0)
    targets: str = doc("Regular expression over module names (full match) choosing the nn.Linear layers to "
                       "adapt; the default: every attention and MLP projection.", DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        if self.rank <= 0 or not self.alpha > 0:  # `not >`: NaN too
            raise ValueError(f"LoRA rank and alpha must be positive, got rank={self.rank}, "
                             f"alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as error:
            raise ValueError(f"LoRA targets {self.targets!r}: not a regular expression ({error})") from None


MCQ_METHODS = ("letter", "text")


@dataclass
class McqConfig:
    """How a multiple-choice exam is scored (eval/mcq.py)."""

    method: str = doc("letter: probability of the option letter after the prompt (C-Eval's); text: "
                      "log-likelihood per byte of each option's text.", "letter")
    num_shots: int = doc("Examples from the dev split before each question.", 0)
    explanations: bool = doc("Show the dev examples' explanations.", False)
    chat: bool = doc("Wrap the prompt in the chat template.", False)
    batch_size: int = doc("Questions scored per forward.", 16)
    progress: bool = doc("Show a progress bar.", True)

    def __post_init__(self) -> None:
        if self.method not in MCQ_METHODS:
            raise ValueError(f"method must be one of {MCQ_METHODS}, got {self.method!r}")
        if self.num_shots < 0 or self.batch_size <= 0:
            raise ValueError(f"num_shots must be >= 0 and batch_size > 0, got {self.num_shots}, "
                             f"{self.batch_size}")


def default_cache_dir() -> Path:
    """Where fetched packages, the default corpus and the chat sets are cached:
    `$XIAOLM_CACHE`, else ~/.cache/xiaolm (packages under CACHE/packages, the corpus under
    CACHE/corpus/default)."""
    base = os.environ.get("XIAOLM_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "xiaolm"


@dataclass
class ServeConfig:
    """`xiaolm serve`: where it listens, who may call it, and its limits (serve/app.py)."""

    host: str = doc("Interface to listen on; 127.0.0.1 keeps the server to this machine (0.0.0.0: every "
                    "interface, then set an API key).", "127.0.0.1")
    port: int = doc("TCP port; 0 picks a free one (printed at start).", 8000)
    api_key: str = doc("Require `Authorization: Bearer KEY` on /v1/ (default: the XIAOLM_API_KEY environment "
                       "variable; empty: no key).", "")
    model_name: str = doc("Model id in the API (default: the name of the folder --ckpt names: a run's, or a "
                          "checkpoint's).", "")
    device: str = doc("auto | cpu | cuda | cuda:N | mps.", "auto")
    num_slots: int = doc("Requests decoded together in one batch (rows of the KV cache).", 16)
    max_context: int = doc("KV-cache positions per request, prompt and reply together; 0: the model's "
                           "max_seq_len.", 0)
    max_waiting: int = doc("Requests that may wait for a free slot; more get 429 with Retry-After.", 64)
    max_tokens: int = doc("Largest max_tokens a request may ask for, and the default when it asks none "
                          "(the context may end a reply sooner: finish_reason length).", 512)
    max_messages: int = doc("Most messages in one chat request.", 256)
    max_body_bytes: int = doc("Largest request body; more gets 413.", 1_000_000)
    compile: bool = doc("Decode with a compiled step (torch.compile; inference/compiled.py), compiled before "
                        "the server listens (about a minute or two on a small CPU; 1.8x the memory). "
                        "Measured 1.4-3.5x eager's aggregate tok/s with 1-16 clients on 2 CPU cores "
                        "(docs/benchmarks.md, section 12).", False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve config: port must be in [0, 65535], got {self.port}")
        for name in ("num_slots", "max_tokens", "max_messages", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"serve config: {name} must be positive, got {getattr(self, name)}")
        if self.max_context < 0 or self.max_waiting < 0:
            raise ValueError("serve config: max_context and max_waiting must be >= 0")


# Fields that may differ between the run that wrote a checkpoint and the run resuming it:
# they change bookkeeping or how long to go on, not what an exact continuation computes.
RESUMABLE_TRAIN_FIELDS = frozenset(
    {"out_dir", "max_steps", "eval_every", "num_eval_batches", "save_every", "keep_checkpoints",
     "log_every", "resume", "tensorboard", "wandb", "progress", "device", "compile", "activation_checkpointing",
     "stop_after_steps"}
)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config from a dict, refusing unknown keys with a message naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object of fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


def save_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write under a temporary name, then rename: a kill never leaves half a JSON file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def diff_configs(saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences between two config dicts, for refusing a mismatched resume."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return lines
