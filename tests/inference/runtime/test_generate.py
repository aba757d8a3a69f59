"""Loading a trained run into a Generator: text in, text out, and clear errors for broken run folders."""

import dataclasses
import shutil

import pytest
import torch

from inference.runtime.generate import Generator, SamplingConfig
from inference.runtime.speculative import SpeculativeGenerator
from model.config import debug_tiny
from model.io import WEIGHTS_FILE, load_model, save_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer):
    """A run folder as training exports it: weights, config, tokenizer (untrained weights suffice)."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    from model.transformer import Transformer

    model = Transformer(debug_tiny())
    save_model(model.state_dict(), model.config, d / "run")
    shutil.copy(tiny_tokenizer, d / "run" / "tokenizer.json")
    return d / "run"


def test_a_run_folder_generates_text(run_dir):
    gen = Generator.from_run(run_dir)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=50, seed=7)
    first = gen.generate(["ka lo mi", "ren tas"], cfg)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert gen.generate(["ka lo mi", "ren tas"], cfg) == first  # seeded: repeatable
    spec = SpeculativeGenerator(gen, Generator.from_run(run_dir), gamma=3)
    greedy = SamplingConfig(max_new_tokens=12)
    assert spec.generate(["ka lo mi"], greedy) == gen.generate(["ka lo mi"], greedy)


def test_saved_weights_reload_to_the_same_logits(run_dir):
    model = load_model(run_dir)
    torch.manual_seed(0)
    from model.transformer import Transformer

    original = Transformer(debug_tiny()).eval()  # the same seed built the saved model
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), original(tokens))


def test_broken_run_folders_are_refused_naming_the_file(run_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / WEIGHTS_FILE).write_bytes((run_dir / WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        Generator.from_run(broken)
    shutil.copy(run_dir / WEIGHTS_FILE, broken / WEIGHTS_FILE)
    config = (broken / "config.json").read_text().replace('"d_model": 64', '"d_model": 32')
    (broken / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"wrong shapes|do not match"):
        Generator.from_run(broken)
    shutil.copy(run_dir / "config.json", broken / "config.json")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json: missing"):
        Generator.from_run(broken)
    (broken / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        load_model(broken)


def test_a_draft_with_another_tokenizer_is_refused(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    tok = (other / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|padding|>"')
    (other / "tokenizer.json").write_text(tok)
    with pytest.raises(ValueError, match="tokenizer differs"):
        SpeculativeGenerator(Generator.from_run(run_dir), Generator.from_run(other))


def test_the_context_limit_is_enforced():
    from model.transformer import Transformer

    model = Transformer(dataclasses.replace(debug_tiny(), max_seq_len=16))
    with pytest.raises(ValueError, match="exceed the context 16"):
        Generator(model).generate_ids(list(range(10)), SamplingConfig(max_new_tokens=8))


@pytest.mark.parametrize("moe", [True, False])
def test_a_batch_of_prompts_decodes_as_each_prompt_alone(moe):
    from model.config import dense_baseline
    from model.transformer import Transformer

    torch.manual_seed(0)
    gen = Generator(Transformer(debug_tiny() if moe else dense_baseline(debug_tiny())))
    prompts = [[5, 9, 200, 31, 7, 44, 3], [17], [88, 12, 6]]  # left-padded to 7 in the batch
    greedy = SamplingConfig(max_new_tokens=10)
    assert gen.generate_batch(prompts, greedy) == [gen.generate_ids(p, greedy) for p in prompts]
    with torch.no_grad():  # the padded rows' logits, position by position, equal the unpadded ones
        key_mask = torch.tensor([[True] * 7, [False] * 6 + [True], [False] * 4 + [True] * 3])
        batch = torch.tensor([prompts[0], [0] * 6 + prompts[1], [0] * 4 + prompts[2]])
        logits = gen.model(batch, 0, None, key_mask)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b, 7 - len(p) :], gen.model(torch.tensor([p]))[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate_batch([[1], []], greedy)


def test_a_stop_token_ends_only_its_own_row():
    from model.transformer import Transformer

    torch.manual_seed(0)
    gen = Generator(Transformer(debug_tiny()))
    prompts = [[5, 9, 200], [17, 4]]
    free = gen.generate_batch(prompts, SamplingConfig(max_new_tokens=8))
    stop = free[0][3]
    stopped = gen.generate_batch(prompts, SamplingConfig(max_new_tokens=8, stop_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stopped[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


def test_streams_yield_the_generated_tokens_one_by_one_and_leave_grad_mode_alone():
    from model.config import debug_tiny_draft
    from model.transformer import Transformer

    torch.manual_seed(0)
    target, draft = Generator(Transformer(debug_tiny())), Generator(Transformer(debug_tiny_draft()))
    spec = SpeculativeGenerator(target, draft, gamma=3)
    for cfg in (SamplingConfig(max_new_tokens=9), SamplingConfig(max_new_tokens=9, temperature=0.9, seed=3)):
        for gen in (target, spec):
            expected = gen.generate_ids([5, 9, 200], cfg)
            seen = []
            for token in gen.stream([5, 9, 200], cfg):
                assert torch.is_grad_enabled()  # no_grad holds only while the decoder runs
                seen.append(token)
            assert seen == expected and len(seen) == 9
    with pytest.raises(ValueError, match="exceed the context"):  # checked when called, before any token
        target.stream([1] * 60, SamplingConfig(max_new_tokens=8))
