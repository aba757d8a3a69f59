"""What `make demo` ends with (inference.demo): the benchmark table, seeded samples from the serving engine, then
the package decoding the same greedy text with and without its draft."""

import pytest

from inference import demo
from inference.runtime.package import load_package


def test_the_demo_prints_the_report_and_identical_plain_and_speculative_samples(tiny_package, tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text("| config | decoding |\n|---|---|\n| dense fp32 | plain |\n")
    demo.main(["--package", str(tiny_package), "--report", str(report), "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert out.startswith(f"Benchmark ({report}):") and "| dense fp32 | plain |" in out
    assert "verified against its manifest" in out and "int8 weights" in out
    assert out.count("identical: True") == len(demo.PROMPTS)
    assert "acceptance rate" in out and "proposals in" in out
    assert out.index("samples (temperature 0.8") < out.index("speculative decoding is lossless")
    for prompt in demo.SAMPLE_PROMPTS:
        assert f"  {prompt}" in out


def test_the_samples_are_seeded_and_not_one_token_repeated(tiny_package):
    package = load_package(tiny_package)
    first, again = demo.samples(package, 16), demo.samples(package, 16)
    assert first == again  # seeded: the demo prints the same text every time
    tok = package.target.tokenizer
    for text in first.values():
        ids = tok.encode(text).ids
        assert len(set(ids)) > 1  # the frequency penalty keeps even this untrained model off one token


def test_the_demo_names_the_missing_release(tmp_path):
    with pytest.raises(SystemExit, match="no release: materialize inference_package first"):
        demo.main(["--releases", str(tmp_path), "--report", str(tmp_path / "none.md")])


def test_a_lossy_speculation_fails_the_demo(tiny_package, tmp_path, monkeypatch, capsys):
    """The demo's check is what CI reads: a speculative text that differs from plain decoding exits 1."""
    real = demo.greedy

    def lossy(engine, ids, max_new_tokens):
        out, seconds = real(engine, ids, max_new_tokens)
        return ([*out[:-1], (out[-1] + 1) % 512] if engine.proposer != "none" else out), seconds

    monkeypatch.setattr(demo, "greedy", lossy)
    with pytest.raises(SystemExit) as e:
        demo.main(["--package", str(tiny_package), "--report", str(tmp_path / "none.md"), "--max-new-tokens", "8"])
    assert e.value.code == 1 and "LOSSLESS CHECK FAILED" in capsys.readouterr().err
