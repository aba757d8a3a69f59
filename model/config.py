"""Model configuration: one dataclass, presets as functions (debug_tiny for tests, small_cpu for the demo,
moe_1b for GPUs), and the dense baseline with the same active parameters per token."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A decoder-only transformer whose feed-forward is DeepSeekMoE after the first dense layers."""

    vocab_size: int = 8192
    """Tokenizer vocabulary size (must equal the tokenizer's)."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = n_heads."""
    max_seq_len: int = 512
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    d_ff: int = 1024
    """Hidden width of the dense SwiGLU feed-forward (dense layers and the dense baseline)."""
    n_dense_layers: int = 1
    """The first layers keep a dense feed-forward (DeepSeek keeps its first layers dense)."""
    n_routed_experts: int = 8
    """Fine-grained routed experts per MoE layer; 0 makes every layer dense."""
    n_shared_experts: int = 1
    """Always-on experts per MoE layer."""
    top_k: int = 2
    """Routed experts per token (the cap k_max when routing is dynamic)."""
    d_expert: int = 256
    """Hidden width of one expert's SwiGLU."""
    score_func: str = "softmax"
    """Router scores: softmax over experts, or sigmoid per expert (DeepSeek-V3), then normalised over the chosen."""
    top_p: float | None = None
    """Dynamic routing: of the top_k selected experts, the fewest whose gating weights (normalised over the
    top_k) reach top_p; top_k is then the cap k_max. None = fixed top-k."""
    bias_update_rate: float = 1e-3
    """gamma of auxiliary-loss-free balancing: each step a bias moves by -/+gamma for over/under-loaded experts."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the optional sequence-level balance loss."""
    capacity_factor: float | None = None
    """Training-time expert capacity (DeepSpeed MoE layer): each expert takes at most
    ceil(capacity_factor * top_k * tokens / n_routed_experts) tokens per step and the routes beyond it are
    dropped (counted in the metrics). None = never drop, as DeepSeek-V3 does. Evaluation never drops."""
    tie_embeddings: bool = True
    mtp_depth: int = 0
    """Multi-token prediction modules (DeepSeek-V3 section 2.2): module k predicts the token k + 1 positions
    ahead from module k - 1's hidden state and the embedding of the token k positions ahead. They train with the
    model and serve as its own speculative draft; 0 = none."""
    mtp_moe: bool = True
    """Each MTP module's block has a MoE feed-forward (as the main model's MoE layers); False = dense SwiGLU of
    width d_ff. A model without routed experts always gets dense ones."""
    mtp_loss_weight: float = 0.3
    """lambda: the training loss is main + lambda * mean over depths of the MTP cross-entropy (DeepSeek-V3 starts at
    0.3). training.config.TrainConfig.mtp_weight_schedule may step it down later in the run."""

    def __post_init__(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {kv}")
        if self.n_routed_experts and not 1 <= self.top_k <= self.n_routed_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, n_routed_experts={self.n_routed_experts}]")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be softmax or sigmoid, not {self.score_func!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.mtp_depth < self.max_seq_len - 1:
            raise ValueError(
                f"mtp_depth must be in [0, max_seq_len - 1 = {self.max_seq_len - 1}), got {self.mtp_depth}: depth k "
                "predicts the token k + 1 positions ahead"
            )
        if self.mtp_loss_weight < 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Main layers 0 .. n_layers - 1; layer n_layers + k - 1 is MTP module k's block."""
        if layer >= self.n_layers:
            return self.n_routed_experts > 0 and self.mtp_moe
        return self.n_routed_experts > 0 and layer >= self.n_dense_layers

    def active_ffn_params(self, layer: int) -> int:
        """Feed-forward weights a token uses in `layer` (3 matrices per SwiGLU; the router is ignored)."""
        if not self.is_moe_layer(layer):
            return 3 * self.d_model * self.d_ff
        return 3 * self.d_model * self.d_expert * (self.n_shared_experts + self.top_k)

    def _attn_params(self) -> int:
        return self.d_model * self.head_dim * (2 * self.n_heads + 2 * (self.n_kv_heads or self.n_heads))

    def _ffn_params(self, layer: int) -> int:
        """Every feed-forward weight of `layer` (all experts and the router for a MoE layer)."""
        if not self.is_moe_layer(layer):
            return 3 * self.d_model * self.d_ff
        experts = self.n_shared_experts + self.n_routed_experts
        return 3 * self.d_model * self.d_expert * experts + self.d_model * self.n_routed_experts

    def active_params(self) -> int:
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        layers = sum(self._attn_params() + self.active_ffn_params(i) + 2 * self.d_model for i in range(self.n_layers))
        return embed + layers + self.d_model  # + the final norm

    def total_params(self) -> int:
        """Parameters of the main model: what serving without MTP speculation reads (see mtp_params)."""
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        layers = sum(self._attn_params() + self._ffn_params(i) + 2 * self.d_model for i in range(self.n_layers))
        return embed + layers + self.d_model  # + the final norm

    def mtp_params(self) -> int:
        """Weights of the MTP modules; the embedding and output head are shared, so not counted. Per module: two
        input norms, the 2D -> D projection, one block (two norms, attention, feed-forward) and the head's norm."""
        block = self._attn_params() + self._ffn_params(self.n_layers) + 2 * self.d_model
        return self.mtp_depth * (2 * self.d_model * self.d_model + block + 3 * self.d_model)


def debug_tiny() -> ModelConfig:
    """Seconds per step on a CPU: what the tests train."""
    return ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, d_ff=128, n_dense_layers=1,
        n_routed_experts=4, n_shared_experts=1, top_k=2, d_expert=32, score_func="sigmoid", bias_update_rate=0.01,
    )  # fmt: skip


def debug_tiny_draft() -> ModelConfig:
    """A draft for debug_tiny: dense, one layer, the same vocabulary and context; every matrix width
    divides into INT4 groups of 32."""
    return ModelConfig(
        vocab_size=512, d_model=64, n_layers=1, n_heads=4, max_seq_len=64, d_ff=128, n_dense_layers=1,
        n_routed_experts=0,
    )  # fmt: skip


def small_cpu() -> ModelConfig:
    """The demo model: trains in a few minutes on 2 cores. Short runs need a faster balancing step than
    DeepSeek-V3's gamma = 0.001 (measured: bench/train.py, BENCHMARKS.md)."""
    return ModelConfig(
        vocab_size=8192, d_model=192, n_layers=4, n_heads=6, max_seq_len=256, d_ff=768, n_dense_layers=1,
        n_routed_experts=8, n_shared_experts=1, top_k=2, d_expert=128, score_func="sigmoid", bias_update_rate=0.01,
    )  # fmt: skip


def small_cpu_draft() -> ModelConfig:
    """The speculative-decoding draft for small_cpu: dense, 2 layers, the same vocabulary and context."""
    return ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, n_heads=4, max_seq_len=256, d_ff=512, n_routed_experts=0,
        n_dense_layers=2,
    )  # fmt: skip


def moe_1b() -> ModelConfig:
    """About 1B total parameters (about 0.3B active) for GPU users."""
    return ModelConfig(
        vocab_size=32_768, d_model=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=2048, d_ff=4096,
        n_dense_layers=1, n_routed_experts=32, n_shared_experts=2, top_k=4, d_expert=512, score_func="sigmoid",
    )  # fmt: skip


def dense_baseline(config: ModelConfig) -> ModelConfig:
    """The same model with dense feed-forwards in every layer, one width chosen so that the active
    parameters per token equal the MoE model's (up to rounding)."""
    active_ffn = sum(config.active_ffn_params(i) for i in range(config.n_layers))
    d_ff = max(1, round(active_ffn / (3 * config.d_model * config.n_layers)))
    return dataclasses.replace(config, n_routed_experts=0, n_dense_layers=config.n_layers, d_ff=d_ff)
