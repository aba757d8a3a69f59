"""The dense scaling study's arithmetic: the fit, the match, the bracket, the widths, and its refusals. (The asset
test trains a real study: tests/assets/test_scaling.py.)"""

import json
import math

import pytest

from model.config import debug_tiny, small_cpu
from training.scaling import (
    ScalingConfig,
    bracket,
    d_ff_for,
    dense_config,
    fit_log_linear,
    non_embedding_params,
    params_at_loss,
)


def test_the_log_linear_fit_recovers_its_line_and_reports_residuals():
    params = [1e5, 2e5, 4e5, 8e5]
    losses = [5.0 - 0.1 * math.log(n) for n in params]
    fit = fit_log_linear(params, losses)
    assert fit["a"] == pytest.approx(5.0) and fit["b"] == pytest.approx(-0.1)
    assert fit["rms_residual"] == pytest.approx(0, abs=1e-12)
    assert params_at_loss(fit, 5.0 - 0.1 * math.log(3e5)) == pytest.approx(3e5)
    noisy = fit_log_linear(params, [y + d for y, d in zip(losses, (0.01, -0.01, 0.01, -0.01))])
    assert noisy["rms_residual"] > 0 and sum(noisy["residuals"]) == pytest.approx(0, abs=1e-12)


def test_the_width_for_a_parameter_count_round_trips_and_stays_a_multiple():
    moe = small_cpu()
    for d_ff in (512, 1024, 2944):
        params = non_embedding_params(dense_config(moe, d_ff))
        assert d_ff_for(moe, params, 64) == d_ff
    assert d_ff_for(moe, 1.0, 64) == 64  # never below one multiple
    assert dense_config(moe, 256).n_routed_experts == 0 and dense_config(moe, 256).n_dense_layers == moe.n_layers


def test_the_bracket_is_the_nearest_size_on_each_side():
    points = [{"name": n, "val_loss": loss, "params": p} for n, loss, p in
              (("s", 6.3, 1e5), ("m", 6.2, 2e5), ("l", 6.1, 4e5), ("xl", 6.0, 8e5))]  # fmt: skip
    b = bracket(points, 6.15)
    assert (b["worse"], b["better"]) == ("m", "l") and b["weight_better"] == pytest.approx(0.5)
    assert b["params"] == pytest.approx(math.sqrt(2e5 * 4e5))  # halfway in ln N
    assert bracket(points, 5.9) is None and bracket(points, 6.4) is None


def test_a_bad_config_is_refused_naming_the_field(tmp_path):
    moe = tmp_path / "moe"
    with pytest.raises(ValueError, match="no finished training run"):
        ScalingConfig(moe_run=str(moe)).check()
    moe.mkdir()
    (moe / "train_config.json").write_text(json.dumps({"model": {"preset": "debug_tiny"}}))
    (moe / "summary.json").write_text(json.dumps({"val_loss": 6.0}))
    with pytest.raises(ValueError, match="at least 2 positive sizes"):
        ScalingConfig(moe_run=str(moe), d_ff=[128]).check()
    with pytest.raises(ValueError, match="noise_size=4"):
        ScalingConfig(moe_run=str(moe), noise_size=4).check()
    with pytest.raises(ValueError, match="noise_seeds"):
        ScalingConfig(moe_run=str(moe), noise_seeds=[]).check()
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"moe_run": str(moe), "sizes": [1, 2]}))
    with pytest.raises(ValueError, match=r"scaling.json: unknown field\(s\) sizes"):
        ScalingConfig.from_file(path)
    assert non_embedding_params(debug_tiny()) < debug_tiny().active_params()


def synthetic_study(tmp_path, monkeypatch, loss_of, **config) -> dict:
    """run_scaling with each training replaced by `loss_of(d_ff, seed)` (the study's arithmetic, no training)."""
    import training.scaling as scaling

    moe = tmp_path / "moe"
    moe.mkdir()
    doc = {"name": "moe", "model": {"preset": "debug_tiny"}, "shard_dir": "s", "tokenizer_path": "t",
           "run_dir": str(moe)}
    (moe / "train_config.json").write_text(json.dumps(doc))
    (moe / "summary.json").write_text(json.dumps({"val_loss": 6.15, "tokens": 1000}))

    def train_point(cfg, env, progress):
        return {"name": cfg.name, "d_ff": cfg.model.d_ff, "seed": cfg.seed, "params": non_embedding_params(cfg.model),
                "val_loss": loss_of(cfg.model.d_ff, cfg.seed), "run_dir": cfg.run_dir, "tokens": 1000}  # fmt: skip

    monkeypatch.setattr(scaling, "train_point", train_point)
    return scaling.run_scaling(ScalingConfig(moe_run=str(moe), out_dir=str(tmp_path / "out"), **config), {}, print)


def test_every_size_at_every_seed_fits_the_means_and_pools_the_noise(tmp_path, monkeypatch):
    """noise_size None: each size is trained at every seed; the fit reads the per-size means, and the seed noise is
    the pooled standard deviation (here +-0.05 around a line at every size: 0.05 x sqrt(2))."""
    def line(d_ff):
        return 8.0 - 0.1 * math.log(non_embedding_params(dense_config(debug_tiny(), d_ff)))

    def loss_of(d_ff, seed):
        return line(d_ff) + (0.05 if seed == 0 else -0.05)

    widths = [32, 64, 128, 256]
    r = synthetic_study(tmp_path, monkeypatch, loss_of, d_ff=widths, noise_size=None, noise_seeds=[1],
                        target_loss=line(100))  # fmt: skip
    assert [p["seeds_averaged"] for p in r["points"]] == [2, 2, 2, 2] and len(r["seeds"]) == 8
    assert [p["val_loss"] for p in r["points"]] == pytest.approx([line(w) for w in widths])
    assert r["seed_noise"] == pytest.approx(0.05 * math.sqrt(2)) and r["fit"]["rms_residual"] < 1e-9
    assert r["bracketed"] and "mean of 2" in (tmp_path / "out" / "results.md").read_text()


def test_a_study_that_does_not_bracket_says_what_would(tmp_path, monkeypatch):
    """Loss rising with size (undertrained large sizes) is recorded with the reason and the advice, never raised."""
    r = synthetic_study(tmp_path, monkeypatch, lambda d_ff, seed: 6.0 + 0.001 * d_ff + 0.01 * seed,
                        d_ff=[32, 64, 128], noise_size=0, noise_seeds=[1])  # fmt: skip
    assert not r["bracketed"] and "loss does not fall with size" in r["reason"]
    assert "more steps than" in r["to_establish"] and "larger sizes than d_ff 128" not in r["to_establish"]
    assert "Equal quality not established" in (tmp_path / "out" / "results.md").read_text()
