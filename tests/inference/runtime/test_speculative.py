"""Generation with the KV cache, and speculative decoding: greedy equality and a lossless distribution."""

import dataclasses
import time

import pytest
import torch

from inference.runtime.generate import Generator, SamplingConfig, probabilities
from inference.runtime.speculative import SpeculativeGenerator, verify
from model.config import debug_tiny, dense_baseline
from model.transformer import Transformer


def models(
    vocab: int = 512, seed: int = 0, sharpen: float = 20.0, share: bool = True
) -> tuple[Transformer, Transformer]:
    """An MoE target and a smaller dense draft with the same vocabulary (sharing the target's embeddings:
    then the draft agrees with the target often, but not always)."""
    torch.manual_seed(seed)
    target = Transformer(dataclasses.replace(debug_tiny(), vocab_size=vocab, max_seq_len=64))
    draft_cfg = dataclasses.replace(dense_baseline(debug_tiny()), vocab_size=vocab, n_layers=1, max_seq_len=64)
    draft = Transformer(draft_cfg)
    with torch.no_grad():
        target.lm_head.weight.mul_(sharpen)  # tied: the embeddings too
        if share:
            draft.embed.weight.copy_(target.embed.weight)
    return target.eval(), draft.eval()


def plain_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy by full recomputation (no cache): the reference."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_cached_greedy_equals_full_recomputation():
    target, _ = models()
    prompt = [5, 17, 3, 99, 250]
    assert Generator(target).generate_ids(prompt, SamplingConfig(max_new_tokens=30)) == plain_greedy(target, prompt, 30)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy(gamma):
    target, draft = models()
    spec = SpeculativeGenerator(Generator(target), Generator(draft), gamma=gamma)
    for prompt in ([5, 17, 3], [42], list(range(10, 30))):
        expected = Generator(target).generate_ids(prompt, SamplingConfig(max_new_tokens=30))
        assert spec.generate_ids(prompt, SamplingConfig(max_new_tokens=30)) == expected
    assert spec.stats.rounds > 0 and 0 <= spec.stats.acceptance_rate <= 1
    assert 1 <= spec.stats.mean_accepted_length <= gamma + 1


def test_a_draft_identical_to_the_target_is_always_accepted():
    target, _ = models()
    spec = SpeculativeGenerator(Generator(target), Generator(target), gamma=4)
    spec.generate_ids([1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=0))
    assert spec.stats.acceptance_rate == 1.0 and spec.stats.mean_accepted_length == 5.0


def test_verification_is_lossless():
    """Over many independent rounds, the first emitted token follows p_1 exactly, whatever q is."""
    torch.manual_seed(0)
    B, K, V = 200_000, 3, 6
    p = torch.softmax(torch.randn(1, K + 1, V) * 1.5, -1).expand(B, -1, -1)
    q = torch.softmax(torch.randn(1, K, V) * 1.5, -1).expand(B, -1, -1)
    g = torch.Generator().manual_seed(1)
    draft = torch.multinomial(q.reshape(-1, V)[: B * K], 1, generator=g).view(B, K)
    accepted, nxt = verify(p, q, draft, g)
    first = torch.where(accepted > 0, draft[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / B
    # chi-square against p_1 (5 degrees of freedom: 99.9% quantile 20.5)
    chi2 = (B * (freq - p[0, 0]) ** 2 / p[0, 0]).sum().item()
    assert chi2 < 20.5, (freq, p[0, 0])
    assert accepted.float().mean() > 0  # the test exercises both branches
    assert (accepted < K).float().mean() > 0


@pytest.mark.slow  # thousands of sampled rounds for the chi-square test
def test_speculative_sampling_matches_the_target_distribution():
    """End to end on a 6-token vocabulary: the first two sampled tokens follow the target's joint distribution."""
    V, N = 6, 2000
    target, draft = models(vocab=V, seed=3, sharpen=5.0, share=False)
    cfg = SamplingConfig(max_new_tokens=2, temperature=1.0)
    prompt = [1, 4, 2]
    with torch.no_grad():
        p1 = probabilities(target(torch.tensor([prompt]))[:, -1], cfg)[0]
        seqs = torch.tensor([[*prompt, a] for a in range(V)])
        p2 = probabilities(target(seqs)[:, -1], cfg)
    joint = (p1[:, None] * p2).reshape(-1)  # exact P(x1, x2)
    spec = SpeculativeGenerator(Generator(target), Generator(draft), gamma=2)
    counts = torch.zeros(V * V)
    for seed in range(N):
        x1, x2 = spec.generate_ids(prompt, dataclasses.replace(cfg, seed=seed))
        counts[x1 * V + x2] += 1
    keep = joint * N >= 5  # chi-square over the cells with enough expected counts
    expected = torch.cat([joint[keep] * N, (joint[~keep] * N).sum(0, keepdim=True)])
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    chi2 = ((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum().item()
    dof = int(keep.sum())  # cells - 1, plus the pooled cell
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)  # ~ mean + 4 standard deviations
    assert 0 < spec.stats.acceptance_rate < 1


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert probabilities(logits, SamplingConfig()).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    top2 = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))[0]
    assert top2[2:].sum() == 0 and top2[0] / top2[1] == pytest.approx(torch.e)
    nucleus = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.7))[0]
    assert nucleus[0] > 0 and nucleus[1] > 0 and nucleus[2:].sum() == 0  # 0.64 < 0.7 needs the second token
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1).check()


def test_stop_tokens_and_bad_drafts():
    target, draft = models()
    full = Generator(target).generate_ids([5, 6], SamplingConfig(max_new_tokens=10))
    stopped = Generator(target).generate_ids([5, 6], SamplingConfig(max_new_tokens=10, stop_ids=(full[3],)))
    assert stopped == full[: full.index(full[3])]
    spec = SpeculativeGenerator(Generator(target), Generator(draft), gamma=3)
    assert spec.generate_ids([5, 6], SamplingConfig(max_new_tokens=10, stop_ids=(full[3],))) == stopped
    other = Transformer(dataclasses.replace(debug_tiny(), vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeGenerator(Generator(target), Generator(other))
    with pytest.raises(ValueError, match="exceed"):
        Generator(target).generate_ids([1] * 60, SamplingConfig(max_new_tokens=10))


def test_adaptive_gamma_turns_speculation_off_for_a_useless_draft_and_keeps_the_output():
    class Stubborn(Transformer):
        """A draft that runs a whole model and then always proposes token 0."""

        def forward(self, *args, **kwargs):
            logits = super().forward(*args, **kwargs)
            return torch.zeros_like(logits).index_fill_(-1, torch.tensor([0]), 10.0)

    torch.manual_seed(0)
    target = Generator(Transformer(debug_tiny()).eval())
    useless = Generator(Stubborn(debug_tiny()).eval())
    prompt, cfg = [5, 9, 200, 31], SamplingConfig(max_new_tokens=40)
    expected = target.generate_ids(prompt, cfg)
    assert 0 not in expected
    adaptive = SpeculativeGenerator(target, useless, gamma=4, adaptive=True)
    assert adaptive.generate_ids(prompt, cfg) == expected
    fixed = SpeculativeGenerator(target, useless, gamma=4)
    fixed.generate_ids(prompt, cfg)
    assert fixed.stats.acceptance_rate < 0.2
    # plain steps and gamma-1 probes instead of four doomed proposals every round
    assert adaptive.stats.proposed < fixed.stats.proposed / 2

    class Slow(Transformer):
        """The same model, 20 ms slower per pass: a target far costlier than its draft."""

        def forward(self, *args, **kwargs):
            time.sleep(0.02)
            return super().forward(*args, **kwargs)

    slow = Generator(Slow(debug_tiny()).eval())
    slow.model.load_state_dict(target.model.state_dict())
    # a draft that is always right and much cheaper keeps gamma at its maximum (with the draft as costly
    # as the target, plain steps would be as fast, and the policy may rightly choose them)
    cheap = SpeculativeGenerator(slow, target, gamma=4, adaptive=True)
    assert cheap.generate_ids(prompt, cfg) == expected
    assert cheap.stats.acceptance_rate == 1.0 and cheap.stats.proposed >= 0.8 * cheap.stats.rounds * 4
