"""The inference assets on the session's tiny trained models: quantized_model and its checks, benchmark_report,
inference_package, and the blocking check that gates the last two; plus quantized_model's refusals."""

import json
import math
import shutil

import dagster as dg
import pytest

from assets.inference import (
    EXPORT_CHECKS,
    INFERENCE_CHECKS,
    benchmark_report,
    exported_model,
    inference_package,
    quantized_model,
    speculative_greedy_is_identical,
)
from assets.resources import CurationPaths, WandbResource
from tests.assets.conftest import materialize, metadata_of

pytestmark = pytest.mark.slow

QUANTIZE = {"group_size": 32, "calibration_rows": 8, "val_rows": 8}
BENCHMARK = {"concurrency": 4, "requests": 4, "system_tokens": 16, "prompt_tokens": 4, "new_tokens": 4, "repeats": 3,
             "compile_autotune": False, "peer_formats": ["Q8_0"]}  # fmt: skip


@pytest.fixture(scope="session")
def quantized(trained) -> dg.ExecuteInProcessResult:
    return materialize(
        trained.data_dir, [quantized_model], QUANTIZE, instance=trained.instance, checks=INFERENCE_CHECKS
    )


@pytest.fixture(scope="session")
def released(trained, quantized, scaled, tmp_path_factory):
    releases = tmp_path_factory.mktemp("releases")
    configs = {
        benchmark_report: BENCHMARK,
        inference_package: {"releases_dir": str(releases), "kv_cache": "int8-channel"},
    }
    result = materialize(
        trained.data_dir, [benchmark_report, inference_package], {}, instance=trained.instance, configs=configs
    )
    return result, releases


def test_quantized_model_reports_every_format_and_its_checks_hold(trained, quantized):
    evaluations = {e.check_name: e for e in quantized.get_asset_check_evaluations()}
    assert evaluations["speculative_greedy_is_identical"].passed
    report = json.loads((trained.data_dir / "quantized_model" / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[:4] == ["fp32", "bf16", "int8", "int4"] and "int8 kv (per channel)" in labels
    by_label = {r["label"]: r for r in report["rows"]}
    assert by_label["int4"]["weight_bytes"] < by_label["int8"]["weight_bytes"] < by_label["fp32"]["weight_bytes"]
    assert report["awq"]["int4/target"]["matrices_calibrated"] > 0
    assert "int4 g32 asym AWQ" in metadata_of(quantized, "quantized_model")["perplexity"].value
    # the budget check says what the report's numbers say, row by row (an untrained model may miss a budget)
    budgeted = [r for r in report["rows"] if r["budget_pct"] is not None]
    assert budgeted and all(r["within_budget"] == (r["delta_pct"] <= r["budget_pct"]) for r in budgeted)
    budget = evaluations["quantization_within_budget"]
    assert budget.passed == all(r["within_budget"] for r in budgeted)
    assert {k: v.value for k, v in budget.metadata.items()} == {
        r["label"]: f"{r['delta_pct']:+.3f}% (budget +{r['budget_pct']}%)" for r in budgeted
    }


def test_benchmark_report_is_a_waterfall_from_the_equal_quality_dense_model_with_a_peer_column(
    trained, scaled, released
):
    result, _ = released
    report = json.loads((trained.data_dir / "benchmark_report" / "report.json").read_text())
    rows = report["rows"]
    frugal, peers = [r for r in rows if not r["peer"]], [r for r in rows if r["peer"]]
    assert [r["lever"] for r in frugal] == [
        "(the starting point)", "Frugal's engine", "the compiled decode step", "continuous batching", "the MoE model",
        "INT8 weights", "INT4 weights (instead of INT8)", f"speculative decoding (on {report['scheme'].upper()}, the "
        "cheaper)", "prefix caching",
    ]  # fmt: skip
    # row 1 is the dense_scaling study's equal-quality model, on transformers
    eq = scaled.results["equal_quality"]["run_dir"]
    assert report["baseline"]["kind"] == "equal_quality" and report["baseline"]["run"] == eq
    assert frugal[0]["model"] == eq and frugal[0]["engine"] == "transformers"
    assert frugal[0]["perplexity"] == pytest.approx(frugal[1]["perplexity"], rel=1e-4)  # one model, two engines
    by_label = {r["label"]: r for r in frugal}
    for k, row in enumerate(frugal[1:], 1):  # speculation builds on the cheaper of INT8 and INT4, not on row 6b
        before = by_label[row["after"]] if row["after"] else frugal[k - 1]
        assert row["factor_vs_previous"] == pytest.approx(before["output_usd_per_1m"] / row["output_usd_per_1m"])
    assert frugal[7]["after"] == next(
        r["label"] for r in frugal if r["label"].startswith(f"MoE {report['scheme'].upper()},")
    )
    assert frugal[-1]["cached_share"] > 0 == frugal[-2]["cached_share"]  # the shared system prompt, from the cache
    # the peer: llama.cpp at batch 1 and with parallel slots, on the dense model and on the MoE's glm4moe export
    assert [(r["quality_of"], r["concurrency"]) for r in peers] == [("dense", 1), ("dense", 4), ("moe", 1), ("moe", 4)]
    assert report["peer"] == "measured"
    head = report["headline"]
    limit = frugal[0]["perplexity"] * math.exp(scaled.results["tolerance"])
    if head["best"] is not None:
        best = min((r for r in frugal[1:] if r["perplexity"] <= limit), key=lambda r: r["output_usd_per_1m"])
        assert head["best"] == best["label"] and head["vs_row1"]["repeats"] == 3
        assert head["vs_row1"]["min"] <= head["vs_row1"]["median"] <= head["vs_row1"]["max"]
    meta = metadata_of(result, "benchmark_report")
    assert "data:image/png;base64," in meta["chart"].value and "| peer | dense Q8_0, 4 parallel slots |" in (
        meta["waterfall"].value
    )
    # the projection: the CPU check covers the compiled plain rows, the GPU rows moe_1b and its dense equivalent
    proj = report["projection"]
    assert [c["label"] for c in proj["cpu"]["rows"]] == [r["label"] for r in frugal[2:7]]
    assert {(r["model"], r["batch"]) for r in proj["gpu"]["rows"]} >= {("moe_1b", 1), ("dense equivalent", 64)}
    assert meta["blocking_checks"].value == {
        "quantized_model/speculative_greedy_is_identical": f"passed in run {trained_check_run(trained)}"
    }
    assert (trained.data_dir / "benchmark_report" / "report.md").read_text().startswith("Baseline: the dense model")


def trained_check_run(trained) -> str:
    key = speculative_greedy_is_identical.check_key
    return trained.instance.get_latest_asset_check_evaluation_record(key).run_id


def test_inference_package_ships_the_cheaper_format_with_wheel_tarball_and_card(trained, released):
    result, releases = released
    release = releases / "frugal-small-cpu-0.1.0"
    assert (release / "frugal_small_cpu-0.1.0-py3-none-any.whl").exists()
    assert (release / "frugal_small_cpu-0.1.0.tar.gz").exists()
    card = (release / "package" / "MODEL_CARD.md").read_text()
    assert "curriculum_shards/manifest.json` sha256" in card and "| 1 | dense fp32, transformers generate" in card
    rows = json.loads((trained.data_dir / "benchmark_report" / "report.json").read_text())["rows"]
    int8, int4 = (next(r for r in rows if r["label"].startswith(f"MoE {f},")) for f in ("INT8", "INT4"))
    cheaper = "int8" if int8["output_usd_per_1m"] <= int4["output_usd_per_1m"] else "int4"
    shipped = json.loads((release / "package" / "package.json").read_text())
    assert shipped["scheme"] == cheaper and shipped["kv_cache"] == "int8-channel"
    checks = metadata_of(result, "inference_package")["blocking_checks"].value
    assert checks == {"quantized_model/speculative_greedy_is_identical": f"passed in run {trained_check_run(trained)}"}


def copy_for_gate(trained, tmp_path):
    """A data folder with what the check and the gate read (the run folders are copied, not shared)."""
    data = tmp_path / "data"
    for name in ("moe_model", "draft_model", "dense_baseline_model", "quantized_model"):
        shutil.copytree(trained.data_dir / name, data / name)
    return data


def materialize_only(data, instance, assets, selection, config=None):
    return dg.materialize(
        assets,
        selection=selection,
        instance=instance,
        resources={"paths": CurationPaths(data_dir=str(data)), "wandb": WandbResource(mode="disabled")},
        run_config={"ops": config or {}},
        raise_on_error=False,
    )


def failure_message(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.event_specific_data.error.message


def test_exported_model_writes_every_run_for_other_engines_and_its_parity_check_holds(trained):
    result = materialize(trained.data_dir, [exported_model], {}, instance=trained.instance, checks=EXPORT_CHECKS)
    [check] = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["max_relative_difference"].value < 1e-4
    exports = metadata_of(result, "exported_model")["exports"].value
    assert "| moe_model | hf | Glm4MoeForCausalLM |" in exports and exports.count("| gguf q8_0 | llama |") == 2
    assert "| moe_model | gguf q8_0 | glm4moe |" in exports
    out = trained.data_dir / "exported_model"
    assert (out / "moe_model" / "hf" / "model.safetensors").exists()
    assert (out / "dense_baseline_model" / "dense_baseline_model-q8_0.gguf").exists()


def test_a_blocking_check_that_has_not_passed_blocks_the_benchmark_and_the_release(trained, quantized, tmp_path):
    data = copy_for_gate(trained, tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    check = "quantized_model/speculative_greedy_is_identical"
    downstream = [benchmark_report, inference_package]
    everything = [quantized_model, speculative_greedy_is_identical, *downstream]

    def gate_message(asset) -> str:
        result = materialize_only(data, instance, everything, [asset.key])
        assert not result.success
        return failure_message(result)

    # quantized_model materialized (a run that selected it without its checks): the check never ran on it
    instance.report_runless_asset_event(dg.AssetMaterialization("quantized_model"))
    for asset in downstream:
        assert f"{check} has never been evaluated" in gate_message(asset)

    # the check crashes on this materialization (its draft weights are gone), as the AVX-512 segfault did
    weights = data / "quantized_model" / "int8" / "draft" / "model.safetensors"
    weights.rename(weights.with_suffix(".moved"))
    crashed = materialize_only(data, instance, everything, dg.AssetSelection.checks(speculative_greedy_is_identical))
    assert not crashed.success
    weights.with_suffix(".moved").rename(weights)
    for asset in downstream:
        assert f"{check}: its latest execution (run {crashed.run_id}) never finished" in gate_message(asset)

    # it passes, then quantized_model is materialized again: the pass was for the older materialization
    passed = materialize_only(data, instance, everything, dg.AssetSelection.checks(speculative_greedy_is_identical))
    assert passed.success and passed.get_asset_check_evaluations()[0].passed
    instance.report_runless_asset_event(dg.AssetMaterialization("quantized_model"))
    for asset in downstream:
        assert f"{check} passed in run {passed.run_id}, but not on the latest materialization" in gate_message(asset)


def run(tmp_path, config: dict):
    return dg.materialize(
        [quantized_model],
        resources={
            "paths": CurationPaths(data_dir=str(tmp_path / "data")),
            "wandb": WandbResource(mode="disabled"),
        },
        run_config={"ops": {"quantized_model": {"config": config}}},
        raise_on_error=False,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"group_size": 48}, "unsupported INT4 group size 48"),
        ({}, "moe_model/model.safetensors: missing: materialize moe_model first"),
    ],
)
def test_bad_config_or_missing_models_fail_before_any_work(tmp_path, config, message):
    result = run(tmp_path, config)
    assert not result.success
    assert message in failure_message(result)


def test_without_llama_cpp_the_peer_column_is_not_measured_and_says_why(monkeypatch, tmp_path):
    import inference.llama_cpp_peer
    from assets.inference import headline_text, peer_files

    monkeypatch.setattr(inference.llama_cpp_peer, "available", lambda: "llama-cpp-python is not installed")
    files, reason = peer_files("dense", "moe", ["Q8_0"], tmp_path, print)
    assert files == {} and reason == "llama-cpp-python is not installed"
    base = {"kind": "equal_quality", "study": {"equal_quality": {"matched": True}}, "multiplier": 2.0, "val_loss": 6.0,
            "moe_val_loss": 6.0}  # fmt: skip
    head = {"best": "b", "best_usd": 1.0, "row1": "r", "row1_usd": 10.0,
            "vs_row1": {"median": 10.0, "min": 9.0, "max": 11.0, "repeats": 3}}  # fmt: skip
    text = headline_text(head, reason, base, {"cpu": {"rows": [], "within_2x": True}})
    assert "llama.cpp: not measured (llama-cpp-python is not installed)." in text


def write_json(path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_row_1_falls_back_to_the_equal_active_twin_and_says_why(tmp_path):
    """Evidence never blocks the report: without an established equal-quality model (no study, a study of an
    earlier MoE, a study that did not bracket), row 1 is dense_baseline_model and the headline says so in words."""
    from assets.inference import baseline, headline_text

    paths = CurationPaths(data_dir=str(tmp_path))
    write_json(tmp_path / "moe_model" / "summary.json", {"val_loss": 6.1554})
    write_json(tmp_path / "dense_baseline_model" / "summary.json", {"val_loss": 6.1976})
    base = baseline(paths)
    assert base["kind"] == "equal_active" and base["run"] == str(tmp_path / "dense_baseline_model")
    assert "dense_scaling has not been materialized" in base["reason"] and base["multiplier"] == 1.0
    study = {"moe": {"own_val_loss": 6.1554, "val_loss": 6.1554}, "bracketed": False,
             "reason": "the dense sizes reached held-out losses 6.0847 to 6.1976, which do not bracket the MoE's"}
    write_json(tmp_path / "dense_scaling" / "results.json", study)
    base = baseline(paths)
    assert base["kind"] == "equal_active" and base["reason"] == f"dense_scaling: {study['reason']}"
    head = {"best": None, "row1": "r", "row1_usd": 1.0}
    text = headline_text(head, None, base, {"cpu": {"rows": [], "within_2x": True}})
    assert text.startswith("Baseline: **the MoE's equal-active dense twin**") and "do not bracket" in text
    assert "the MoE 6.1554 against its twin's 6.1976 (-0.0422 nats: the MoE is better" in text
    study |= {"bracketed": True, "tolerance": 0.05, "equal_quality": {"run_dir": "eq", "multiplier": 3.0,
                                                                       "val_loss": 6.15}}  # fmt: skip
    write_json(tmp_path / "dense_scaling" / "results.json", study)
    base = baseline(paths)
    assert (base["kind"], base["run"], base["multiplier"], base["reason"]) == ("equal_quality", "eq", 3.0, None)
    write_json(tmp_path / "moe_model" / "summary.json", {"val_loss": 6.2})  # the MoE was trained again since
    base = baseline(paths)
    assert base["kind"] == "equal_active" and "made on an earlier moe_model" in base["reason"]


def test_row_1_is_interpolated_between_the_sizes_around_the_moe_when_the_match_missed(monkeypatch, tmp_path):
    import inference.cost
    from assets.inference import interpolated_row1
    from tests.inference.test_cost import synthetic

    study = {"points": [{"name": "small", "run_dir": "s"}, {"name": "big", "run_dir": "b"}], "tolerance": 0.05,
             "equal_quality": {"name": "equal_quality_dense", "run_dir": "e", "matched": False,
                               "bracket": {"worse": "small", "better": "big", "weight_better": 0.5}}}  # fmt: skip
    table = inference.cost.table([synthetic("row 1", [3.6], 100), synthetic("moe", [0.36], 103, quality_of="moe"),
                                  synthetic("moe, worse", [0.036], 140, quality_of="moe")], 1.0)  # fmt: skip
    measured = []

    def run_rows(rows, *args, **kw):
        measured.extend(r.model for r in rows)
        return [synthetic("small", [3.6], 110), synthetic("big", [36.0], 95)]  # $1 and $10 per 1M

    monkeypatch.setattr(inference.cost, "run_rows", run_rows)
    got = interpolated_row1(study, table, None, tmp_path, 1.0, print)
    assert measured == ["s", "b"] and got["usd"] == pytest.approx(10**0.5)  # halfway in ln $
    # the cheapest row as good as the MoE (103 x e^0.05 = 108 at most): "moe" at $0.1, not "moe, worse"
    assert got["best"] == "moe" and got["best_vs_interpolated"] == pytest.approx(10**0.5 / 0.1)
    study["equal_quality"]["matched"] = True
    assert interpolated_row1(study, table, None, tmp_path, 1.0, print) is None
