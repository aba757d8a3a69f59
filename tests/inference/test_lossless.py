"""The release gate's check (inference.lossless) on the tiny package: a speculative engine whose tokens differ is
caught and located. (That the real engine passes is asserted on the trained models by tests/assets/test_inference.py,
through the speculative_greedy_is_identical check.)"""

import pytest

import inference.lossless as lossless

pytestmark = pytest.mark.slow  # two compiled engines


def test_a_speculative_difference_fails_the_check_and_is_located(tiny_package, monkeypatch):
    real = lossless.greedy_batch

    def lossy(engine, prompts, max_new_tokens):  # the speculative engine gets one token of request 1 wrong
        outs = real(engine, prompts, max_new_tokens)
        if engine.proposer != "none":
            outs[1][5] = (outs[1][5] + 1) % 512
        return outs

    monkeypatch.setattr(lossless, "greedy_batch", lossy)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    report = lossless.check_lossless(tiny_package / "target", tiny_package / "draft", prompts, max_new_tokens=8)
    assert not report.identical and report.first_difference == [None, 5, None]
    assert report.proposer == "draft" and report.compile_s > 0 and [len(t) for t in report.plain] == [8, 8, 8]
    assert report.matches_eager  # the compiled engine's plain tokens are the eager Generator's
