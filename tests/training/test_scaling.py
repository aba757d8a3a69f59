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
