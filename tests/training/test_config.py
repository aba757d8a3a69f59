import dataclasses
import itertools
import json
import math

import pytest

from model.config import debug_tiny
from training.config import DataConfig, TrainConfig


def config(**changes) -> TrainConfig:
    base = TrainConfig(model=debug_tiny(), data=DataConfig(seq_len=32, batch_size=2), max_steps=100, warmup_steps=10)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"zero_stage": 3}, "zero_stage=3 cannot train DeepSpeed MoE"),
        (
            {"world_size": 2, "ep_size": 2, "model": dataclasses.replace(debug_tiny(), n_routed_experts=3)},
            "not divisible by ep_size=2",
        ),
        ({"world_size": 3, "ep_size": 2, "data": DataConfig(seq_len=32, batch_size=6)}, "must divide world_size=3"),
        ({"world_size": 2, "data": DataConfig(seq_len=32, batch_size=3)}, "batch_size=3 must divide evenly"),
        ({"precision": "fp8"}, "precision"),
        ({"warmup_steps": 100}, "warmup_steps"),
        ({"data": DataConfig(seq_len=128)}, "exceeds model.max_seq_len"),
    ],
)
def test_bad_settings_are_refused_before_launch(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes).check()


def test_dense_models_may_use_zero3_and_good_settings_pass():
    config(zero_stage=3, model=dataclasses.replace(debug_tiny(), n_routed_experts=0)).check()
    config(world_size=2, ep_size=2).check()
    config(world_size=2, ep_size=1, data=DataConfig(seq_len=32, batch_size=4)).check()


def test_warmup_then_cosine():
    c = config(lr=1.0, min_lr=0.1)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0)
    assert c.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert c.lr_at(100) == pytest.approx(0.1) and c.lr_at(500) == pytest.approx(0.1)
    lrs = [c.lr_at(s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_deepspeed_config():
    ds = config(zero_stage=2, precision="bf16").deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 1.0
    two_ranks = config(world_size=2, data=DataConfig(seq_len=32, batch_size=8)).deepspeed_config()
    assert two_ranks["train_batch_size"] == 8 and two_ranks["train_micro_batch_size_per_gpu"] == 4


def test_config_files_round_trip_and_name_their_mistakes(tmp_path):
    c = config(world_size=2, data=DataConfig(seq_len=32, batch_size=4))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(c.to_dict()))
    assert TrainConfig.from_file(path) == c
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 7\n[model]\npreset = "debug_tiny"\ndense_baseline = true\n[data]\nseq_len = 16\n')
    t = TrainConfig.from_file(toml)
    assert t.max_steps == 7 and t.data.seq_len == 16 and t.model.n_routed_experts == 0
    assert t.model.active_params() == pytest.approx(debug_tiny().active_params(), rel=1e-2)
    for text, message in [
        ('{"max_stepz": 3}', "unknown field.*max_stepz"),
        ('{"model": {"preset": "huge"}}', "model.preset must be one of"),
        ('{"model": {"top_kk": 1}}', "model.top_kk"),
        ('{"max_steps": ', "not valid json"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            TrainConfig.from_file(path)
        assert str(path) in str(e.value)


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fraction():
    for shape, at_half in (("linear", 0.55), ("1-sqrt", 1.0 - 0.9 * math.sqrt(0.5))):
        c = config(lr=1.0, min_lr=0.1, lr_schedule="wsd", decay_fraction=0.2, decay_shape=shape)
        c.check()
        assert c.decay_start == 80 and c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
        assert all(c.lr_at(s) == 1.0 for s in range(10, 80))  # the stable phase
        assert c.lr_at(89) == pytest.approx(at_half)  # half of the 20 decay steps done
        assert c.lr_at(99) == pytest.approx(0.1) and c.lr_at(500) == pytest.approx(0.1)
        lrs = [c.lr_at(s) for s in range(10, 101)]
        assert all(a >= b for a, b in itertools.pairwise(lrs))
    # 1-sqrt falls faster at first and ends at the same place
    lin, sqrt = (config(lr=1.0, min_lr=0.1, lr_schedule="wsd", decay_shape=s) for s in ("linear", "1-sqrt"))
    assert sqrt.lr_at(84) < lin.lr_at(84) and sqrt.lr_at(99) == lin.lr_at(99)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"lr_schedule": "wsd", "decay_fraction": 0.0}, r"decay_fraction=0.0 must be in \(0, 1\)"),
        ({"lr_schedule": "wsd", "decay_fraction": 1.0}, r"decay_fraction=1.0 must be in \(0, 1\)"),
        ({"decay_fraction": -0.5}, r"decay_fraction=-0.5 must be in \(0, 1\)"),  # refused under cosine too
        ({"lr_schedule": "wsd", "decay_fraction": 0.95}, "inside the warmup"),
        ({"decay_shape": "cosine"}, "decay_shape must be one of"),
    ],
)
def test_bad_schedules_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes).check()


def mix(*phases, **changes) -> TrainConfig:
    return config(data=DataConfig(seq_len=32, batch_size=2, mix_schedule=list(phases), **changes))


@pytest.mark.parametrize(
    ("phases", "changes", "message"),
    [
        ([{"until": 0.5}], {}, r"mix_schedule\[0\].until=0.5: the last phase must end at 1"),
        ([{"until": 0.6}, {"until": 0.4}, {"until": 1.0}], {}, r"mix_schedule\[1\].until=0.4 must be in \(0.6, 1\]"),
        ([{"until": 1.5}], {}, r"mix_schedule\[0\].until=1.5"),
        ([{"until": 1.0, "weights": {"0": 0, "1": 0}}], {}, r"mix_schedule\[0\].weights=.*sum to a positive number"),
        ([{"until": 1.0, "weights": {"0": -1, "1": 2}}], {}, "non-negative"),
        ([{"until": 1.0, "weights": {"0": float("nan")}}], {}, "finite"),
        ([{"until": 1.0, "weights": {"0": 1}, "quality_tiers": [0]}], {}, "weights or quality_tiers, not both"),
        ([{"until": 1.0, "quality_tiers": []}], {}, r"mix_schedule\[0\].quality_tiers is empty"),
        ([{"until": 1.0}], {"bucket_schedule": [0]}, "exclude each other"),
        ([], {}, "mix_schedule is empty"),
    ],
)
def test_bad_mixtures_are_refused_naming_the_field(phases, changes, message):
    with pytest.raises(ValueError, match=message):
        mix(*phases, **changes).check()


def test_mixtures_round_trip_through_json_and_name_bad_fields():
    doc = {"data": {"mix_schedule": [{"until": 0.8}, {"until": 1.0, "weights": {"2": 1, "5": 3}}]}}
    c = TrainConfig.from_dict(doc)
    assert c.data.mix_schedule[1].weights == {2: 1, 5: 3}  # JSON keys are strings; buckets are ints
    assert [c.data.phase_at(f) for f in (0.0, 0.79, 0.8, 0.999, 1.0)] == [0, 0, 1, 1, 1]
    again = TrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.to_dict() == c.to_dict()
    with pytest.raises(ValueError, match=r"unknown field\(s\) data.mix_schedule\[0\].tiers"):
        TrainConfig.from_dict({"data": {"mix_schedule": [{"until": 1.0, "tiers": [0]}]}})
    with pytest.raises(ValueError, match="bucket keys must be integers"):
        TrainConfig.from_dict({"data": {"mix_schedule": [{"until": 1.0, "weights": {"top": 1}}]}})
