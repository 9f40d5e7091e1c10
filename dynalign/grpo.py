"""The GRPO core in plain torch: advantages, log-probabilities, KL estimators and the clipped loss.

Nothing here knows about Ray, DeepSpeed or vLLM. Shapes used throughout:
  B sequences, T completion positions, V vocabulary; `mask` is [B, T] with 1 (True) on the
  completion tokens we train on and 0 on prompt and padding.

Loss normalisation is the one subtle part. With gradient accumulation and data parallelism a
batch is cut into micro-batches, and each micro-batch loss is back-propagated on its own. For the
summed gradients to equal the gradient of the whole batch, every micro-batch must divide by
constants of the *whole* batch (token and sequence counts), never by its own: see
`LossNormalizer`.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

STD_NORMS = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")

# exp() of a log-ratio beyond this overflows float32 long before it means anything.
_LOG_RATIO_CLAMP = 20.0


def _check_option(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got '{value}'")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over entries where mask is True; 0 when there are none."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _masked_mean_std(values: Tensor, mask: Tensor) -> tuple[float, float]:
    """Population mean and std over entries where mask is True; (0, 0) when there are none."""
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean).square(), mask)
    return mean.item(), variance.sqrt().item()


# ----------------------------------------------------------------------------------------------
# Advantages


def zero_variance_groups(group_rewards: Tensor) -> Tensor:
    """[num_groups] bool: True where all valid (non-NaN) rewards of a group tie.

    A group with fewer than two valid rewards counts as tied: it carries no learning signal.
    """
    valid = ~torch.isnan(group_rewards)
    valid_count = valid.sum(dim=1)
    group_max = torch.where(valid, group_rewards, -torch.inf).amax(dim=1)
    group_min = torch.where(valid, group_rewards, torch.inf).amin(dim=1)
    return (valid_count < 2) | (group_max == group_min)


def group_advantages(
    group_rewards: Tensor, std_norm: str = "group", eps: float = 1e-6
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Group-relative advantages from rewards [num_groups, group_size]; NaN marks invalid ones.

    advantage = reward - mean of the valid rewards of its group, then divided by
      "group": that group's std (+eps)  (GRPO),
      "batch": the std of all valid rewards-minus-group-mean in the batch (+eps)
               (REINFORCE++-baseline style; keeps the relative scale between groups),
      "none":  nothing  (Dr. GRPO).
    All stds are population stds (unbiased=False): a group is the whole population we
    normalise, and the unbiased estimate blows up for tiny groups.

    Invalid entries are left out of every statistic and get advantage 0 and valid=False.
    Returns (advantages, valid, stats); stats are over valid entries only.
    """
    _check_option("std_norm", std_norm, STD_NORMS)
    if group_rewards.dim() != 2:
        shape = tuple(group_rewards.shape)
        raise ValueError(f"group_rewards must be [num_groups, group_size]; got shape {shape}")
    group_rewards = group_rewards.to(torch.promote_types(group_rewards.dtype, torch.float32))

    valid = ~torch.isnan(group_rewards)
    valid_count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    group_mean = torch.where(valid, group_rewards, 0.0).sum(dim=1, keepdim=True) / valid_count
    centered = torch.where(valid, group_rewards - group_mean, 0.0)

    if std_norm == "group":
        scale = (centered.square().sum(dim=1, keepdim=True) / valid_count).sqrt() + eps
    elif std_norm == "batch":
        batch_std = _masked_mean_std(centered, valid)[1]
        scale = torch.tensor(batch_std + eps, dtype=centered.dtype, device=centered.device)
    else:
        scale = torch.ones((), dtype=centered.dtype, device=centered.device)
    # A zero scale only comes with all-zero centred rewards (tied groups, even with eps=0).
    advantages = torch.where(scale > 0, centered / scale, 0.0)

    reward_mean, reward_std = _masked_mean_std(group_rewards, valid)
    advantage_mean, advantage_std = _masked_mean_std(advantages, valid)
    stats = {
        "zero_variance_group_share": zero_variance_groups(group_rewards).double().mean().item(),
        "invalid_share": 1.0 - valid.double().mean().item(),
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "advantage_mean": advantage_mean,
        "advantage_std": advantage_std,
        "advantage_abs_max": advantages.abs().max().item() if advantages.numel() else 0.0,
    }
    return advantages, valid, stats


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logsumexp over a 100k+ vocabulary loses most of its precision; float64 stays.
    return torch.promote_types(dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature)[token], chunked over rows in forward *and* backward.

    Plain autograd would keep every float32 chunk alive for the backward of logsumexp, which adds
    up to a full float32 copy of the logits; here backward recomputes the softmax chunk by chunk
    from the original logits and the saved logsumexp.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor, temperature: float, chunk_size: int, with_entropy: bool):
        compute_dtype = _compute_dtype(logits.dtype)
        logprobs = torch.empty(token_ids.shape, dtype=compute_dtype, device=logits.device)
        logsumexp = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits[rows].to(compute_dtype) / temperature
            logsumexp[rows] = torch.logsumexp(scaled, dim=-1)
            taken = scaled.gather(-1, token_ids[rows].unsqueeze(-1)).squeeze(-1)
            logprobs[rows] = taken - logsumexp[rows]
            if with_entropy:  # from the chunk already in float32: no second pass over the logits
                entropy[rows] = _entropy_of_chunk(scaled, logsumexp[rows])
        ctx.save_for_backward(logits, token_ids, logsumexp)
        ctx.mark_non_differentiable(entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor):
        logits, token_ids, logsumexp = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        compute_dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            grad = grad_logprobs[rows].to(compute_dtype).unsqueeze(-1)
            # d log p(token) / d logits = (onehot(token) - softmax) / temperature; in place to
            # keep a single chunk-sized buffer.
            chunk_grad = logits[rows].to(compute_dtype) / temperature
            chunk_grad.sub_(logsumexp[rows].unsqueeze(-1)).exp_().mul_(-grad)
            chunk_grad.scatter_add_(-1, token_ids[rows].unsqueeze(-1), grad)
            grad_logits[rows] = chunk_grad.div_(temperature)
        return grad_logits, None, None, None, None


def _entropy_of_chunk(scaled: Tensor, logsumexp: Tensor) -> Tensor:
    """Entropy of softmax(scaled) per row, given its logsumexp: H = lse - sum(p * scaled)."""
    probs = (scaled - logsumexp.unsqueeze(-1)).exp_()
    # A banned token (-inf) has p = 0 and 0 * -inf = NaN: nansum counts it as the 0 it is.
    return logsumexp - torch.nansum(probs.mul_(scaled), dim=-1)


def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_size: int = 8, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(token) of the taken tokens, [B, T], from logits [B, T, V] (any leading shape works).
    With ``with_entropy``, also the entropy of each position's distribution (the temperature-scaled
    one the engine sampled from), detached, from the same float32 chunks: ``(logprobs, entropy)``.

    logits[..., t, :] must already be the distribution that produced token_ids[..., t] (the caller
    shifts by one). Logits are divided by `temperature` first, matching vLLM's processed
    logprobs. Math is float32 (float64 stays float64) even for bf16 logits; the result has that
    dtype. Work goes `chunk_size` rows of dim 0 at a time, so the extra float32 memory is
    chunk_size * T * V, never a full [B, T, V] log-softmax copy, in forward and in backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and token_ids {tuple(token_ids.shape)} disagree"
        )
    logprobs, entropy = _TokenLogprobs.apply(logits, token_ids.long(), float(temperature), chunk_size, with_entropy)
    return (logprobs, entropy) if with_entropy else logprobs


def token_entropy(logits: Tensor, chunk_size: int = 8) -> Tensor:
    """Entropy of softmax(logits) per position, [B, T], chunked over rows of dim 0.

    For metrics only: the result is detached (no graph is built), so it cannot serve as an
    entropy bonus. Float32 math as in `token_logprobs`; -inf logits (banned tokens) are fine.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    logits = logits.detach()
    compute_dtype = _compute_dtype(logits.dtype)
    entropy = torch.empty(logits.shape[:-1], dtype=compute_dtype, device=logits.device)
    for start in range(0, logits.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = logits[rows].to(compute_dtype)
        entropy[rows] = _entropy_of_chunk(chunk, torch.logsumexp(chunk, dim=-1))
    return entropy


# ----------------------------------------------------------------------------------------------
# KL and importance weights


def _kl_from_log_ratio(log_ratio: Tensor, estimator: str) -> Tensor:
    """KL(p || q) estimators from log_ratio = log p(x) - log q(x) with x ~ p."""
    _check_option("kl_estimator", estimator, KL_ESTIMATORS)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(-log_ratio) + log_ratio - 1.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    k1 = logp - ref (unbiased, can be negative); k2 = 0.5 * (logp - ref)^2 (biased, low variance);
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's: unbiased and non-negative).
    The log-ratio is clamped to [-20, 20] so a stray token cannot overflow exp().
    """
    return _kl_from_log_ratio(logprobs - ref_logprobs, estimator)


def truncated_is_weights(
    learner_logprobs: Tensor, engine_logprobs: Tensor, cap: float | None
) -> Tensor:
    """Truncated importance-sampling weights min(exp(learner_old - engine), cap), detached.

    Corrects for the inference engine (vLLM) sampling from a slightly different distribution
    than the learner's old policy. cap=None turns the correction off (all ones).
    """
    if cap is None:
        return torch.ones_like(learner_logprobs).detach()
    if cap <= 0:
        raise ValueError(f"cap must be > 0 or None; got {cap}")
    log_ratio = (learner_logprobs - engine_logprobs).detach()
    return log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp().clamp(max=cap)


# ----------------------------------------------------------------------------------------------
# Loss


@dataclass(frozen=True)
class LossNormalizer:
    """Constants of the WHOLE batch (all micro-batches, all ranks) so that summing micro-batch
    losses gives exactly the full-batch loss (gradient-accumulation invariance).

    With several ranks, all-reduce the counts and build it directly rather than via from_mask.
    """

    # "seq_mean_token_mean" (GRPO) | "token_mean" (DAPO) | "seq_mean_token_sum_norm" (Dr. GRPO)
    mode: str
    num_sequences: int  # sequences in the whole batch
    num_tokens: int  # unmasked completion tokens in the whole batch
    max_len: int  # Dr. GRPO's constant: the configured max completion length

    def __post_init__(self) -> None:
        _check_option("mode", self.mode, LOSS_AGG_MODES)
        if self.num_sequences < 0 or self.num_tokens < 0 or self.max_len < 1:
            raise ValueError(f"bad LossNormalizer counts: {self}")

    @classmethod
    def from_mask(cls, mode: str, mask: Tensor, max_len: int) -> "LossNormalizer":
        """Normalizer for the batch whose full [B, T] completion mask is `mask`."""
        return cls(
            mode=mode,
            num_sequences=mask.shape[0],
            num_tokens=int(mask.bool().sum().item()),
            max_len=max_len,
        )


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, normalizer: LossNormalizer) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar; a micro-batch's value is its share of the
    full-batch loss.

    seq_mean_token_mean:     sum_seq (sum_t l*m / len_seq) / num_sequences
    token_mean:              sum l*m / num_tokens
    seq_mean_token_sum_norm: sum l*m / (num_sequences * max_len)
    A sequence's own length is the same in any micro-batch, so only the batch counts need to come
    from the normalizer.
    """
    mask = mask.bool()
    # where, not multiply: padding may hold inf/NaN and 0 * inf is NaN.
    masked_loss = torch.where(mask, per_token_loss, 0.0)
    num_sequences = max(normalizer.num_sequences, 1)
    if normalizer.mode == "seq_mean_token_mean":
        seq_len = mask.sum(dim=-1).clamp(min=1)
        return (masked_loss.sum(dim=-1) / seq_len).sum() / num_sequences
    if normalizer.mode == "token_mean":
        return masked_loss.sum() / max(normalizer.num_tokens, 1)
    return masked_loss.sum() / (num_sequences * normalizer.max_len)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    normalizer: LossNormalizer,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate with asymmetric clipping (DAPO's clip-higher), plus optional KL to ref.

    ratio = exp(logp - old); per-token loss
      = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) [* is_weights]
        + beta * kl(logp, ref)            (when beta > 0 and ref_logprobs is given).
    logprobs/old_logprobs/mask are [B, T]; advantages are [B] (one per sequence) or [B, T].
    Returns (loss, metrics); metrics are detached scalars, masked means over this micro-batch.
    """
    _check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
    mask = mask.bool()
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach().to(logprobs.dtype)

    # Zeroing padding before exp() keeps garbage there (inf, NaN) out of values and gradients.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights.detach()
    use_kl = beta > 0 and ref_logprobs is not None
    if use_kl:
        ref_log_ratio = torch.where(mask, logprobs - ref_logprobs.detach(), 0.0)
        kl_ref = _kl_from_log_ratio(ref_log_ratio, kl_estimator)
        per_token_loss = per_token_loss + beta * kl_ref
    loss = aggregate_loss(per_token_loss, mask, normalizer)

    with torch.no_grad():
        ratio = ratio.detach()
        # Where clipping bites: the min picks the flat clipped term.
        clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
        clipped_high = (ratio > 1.0 + eps_high) & (advantages > 0)
        metrics = {
            "clip_frac_low": _masked_mean(clipped_low.to(ratio.dtype), mask),
            "clip_frac_high": _masked_mean(clipped_high.to(ratio.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            # ratio > 0, so 0 on padding never wins the max.
            "ratio_max": torch.where(mask, ratio, 0.0).max(),
            # KL(old || current), estimated on tokens sampled from old.
            "approx_kl": _masked_mean(_kl_from_log_ratio(-log_ratio.detach(), "k3"), mask),
        }
        if use_kl:
            metrics["kl_ref"] = _masked_mean(kl_ref.detach(), mask)
        if is_weights is not None:
            weights = is_weights.detach().to(ratio.dtype)
            metrics["is_weight_mean"] = _masked_mean(weights, mask)
            weight_min = torch.where(mask, weights, torch.inf).min()
            metrics["is_weight_min"] = torch.where(mask.any(), weight_min, 0.0)
    return loss, metrics


def logprob_gap_stats(
    learner_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor
) -> dict[str, float]:
    """Engine-vs-learner log-prob mismatch over masked tokens: max_abs, mean_abs and k3, a k3
    estimate of KL(engine || learner) on the engine's own samples."""
    mask = mask.bool()
    with torch.no_grad():
        gap = torch.where(mask, engine_logprobs.detach() - learner_logprobs.detach(), 0.0)
        return {
            "max_abs": gap.abs().max().item() if gap.numel() else 0.0,
            "mean_abs": _masked_mean(gap.abs(), mask).item(),
            "k3": _masked_mean(_kl_from_log_ratio(gap, "k3"), mask).item(),
        }


_SUMMED_METRICS = ("loss", "tokens")


def reduce_metric(key: str, values: list[float]) -> float:
    """Combine a metric over micro-steps or ranks: totals add, maxima take the max, the rest average."""
    if key in _SUMMED_METRICS:
        return sum(values)
    if key.endswith("max") or "_max_" in key:
        return max(values)
    return sum(values) / len(values)
