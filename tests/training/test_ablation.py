"""The data ablation: tokens-to-target on synthetic curves, the held-out split, and a tiny end-to-end run."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.tokenizer import TokenizerConfig, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.ablation import (
    ARMS,
    HELDOUT_BUCKET,
    ISSUE_ARMS,
    RESULTS_FILE,
    AblationConfig,
    analyse,
    read_curated,
    run_ablation,
    split_inputs,
    tokens_to_target,
    write_shards,
)
from training.config import TrainConfig
from training.data import ShardReader, is_validation, run_validation_rows
from training.metrics import read_metrics


def test_tokens_to_target_interpolates_between_evaluation_points():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tokens_to_target(curve, 3.5) == pytest.approx(250.0)
    assert tokens_to_target(curve, 4.0) == pytest.approx(200.0)
    assert tokens_to_target(curve, 3.0) == pytest.approx(300.0)
    # a curve that goes up again: the first crossing counts
    assert tokens_to_target([(100, 5.0), (200, 3.0), (300, 4.5)], 4.0) == pytest.approx(150.0)


def test_tokens_to_target_at_the_first_point_and_never_reached():
    assert tokens_to_target([(100, 2.0), (200, 1.5)], 3.0) == 100.0
    assert tokens_to_target([(100, 5.0), (200, 4.0), (300, 3.1)], 3.0) is None  # not extrapolated
    assert tokens_to_target([], 3.0) is None


def _records(losses: list[float], tokens_per_eval: int = 100, hours_per_token: float = 1e-6) -> list[dict]:
    out = []
    for n, loss in enumerate(losses, 1):
        t = n * tokens_per_eval
        out.append(
            {"step": n, "tokens": t, "device_hours": t * hours_per_token, f"val_loss/bucket{HELDOUT_BUCKET}": loss,
             "lr": 1.0}
        )  # fmt: skip
    return out


COUNTS = {"raw_corpus": 1000, "curated_corpus": 400, "train_tokens": {"raw": 1000, "curated": 100}}


def test_analyse_reports_tokens_hours_and_dollars_to_raws_final_loss():
    runs = {
        "raw": [_records([5.0, 4.0, 3.0, 2.0])],
        "curated_cosine": [_records([4.5, 3.5, 2.5, 2.1])],  # never reaches 2.0
        "curated_easy_to_hard": [_records([4.0, 3.0, 2.0, 1.5])],
    }
    res = analyse(runs, COUNTS, price=2.0)
    assert res["target_heldout_loss"] == 2.0
    never = res["to_target"]["curated_cosine"]
    assert never["reached"] is False and never["tokens"] is None and never["share_mean"] is None
    cur = res["to_target"]["curated_easy_to_hard"]  # reaches 2.0 at 300
    assert cur["tokens"] == pytest.approx(300) and cur["share_of_raw_tokens"] == pytest.approx(0.75)
    assert cur["device_hours"] == pytest.approx(3e-4) and cur["spend_usd"] == pytest.approx(6e-4)
    assert res["to_target"]["raw"]["tokens"] == pytest.approx(400)
    assert res["runs"]["curated_cosine"]["epochs"] == pytest.approx(4.0)  # 400 tokens over 100 curated ones
    assert res["best"] == "curated_easy_to_hard" and res["target_met"] is False  # 75% > 50%, and one seed only
    assert res["curation"]["removed_share"] == pytest.approx(0.6)
    # 600 tokens x 3.6e-3 device-seconds per token (the raw run's speed)
    assert res["curation"]["epoch_device_hours_saved"] == pytest.approx(600 * 1e-6)
    assert res["curation"]["epoch_usd_saved"] == pytest.approx(600 * 1e-6 * 2.0)


def test_comparisons_are_paired_by_seed_and_the_best_arm_must_beat_the_seed_spread():
    # raw ends at 2.0 (seed 0) and 3.0 (seed 1): each seed's curated curves are measured against its own raw
    raw = [_records([5.0, 4.0, 3.0, 2.0]), _records([5.0, 4.5, 4.0, 3.0])]
    runs = {
        "raw": raw,
        "curated_cosine": [_records([4.0, 3.0, 2.0, 1.5]), _records([4.0, 3.0, 2.5, 2.0])],  # 300, 200 tokens
        "curated_wsd": [_records([3.0, 2.0, 1.5, 1.0]), _records([3.5, 3.0, 2.0, 1.5])],  # 200, 200
        "curated_wsd_anneal": [_records([2.0, 1.5, 1.0, 1.0]), _records([3.0, 2.0, 1.5, 1.0])],  # 100, 100
    }
    res = analyse(runs, COUNTS, price=1.0)
    assert res["target_heldout_loss_per_seed"] == [2.0, 3.0]
    assert res["to_target"]["curated_cosine"]["tokens_per_seed"] == pytest.approx([300, 200])
    assert res["to_target"]["curated_wsd_anneal"]["share_per_seed"] == pytest.approx([0.25, 0.25])
    wsd = res["paired"]["curated_wsd"]["vs_curated_cosine"]
    assert wsd["per_seed"] == pytest.approx([-0.25, 0.0]) and wsd["mean"] == pytest.approx(-0.125)
    assert wsd["spread"] == pytest.approx(0.25 / 2**0.5)  # sample sd of -0.25 and 0
    anneal = res["paired"]["curated_wsd_anneal"]["vs_curated_cosine"]
    assert anneal["per_seed"] == pytest.approx([-0.5, -0.25]) and anneal["spread"] == pytest.approx(0.25 / 2**0.5)
    assert res["paired"]["curated_cosine"] == {"vs_raw": res["paired"]["curated_cosine"]["vs_raw"]}
    assert res["best"] == "curated_wsd_anneal"
    assert res["targets"] == {"half_the_raw_tokens": True, "beats_random_cosine": True} and res["target_met"]
    # the same mean gain with a spread larger than it is not a win
    runs["curated_wsd_anneal"][1] = _records([4.5, 4.2, 3.8, 3.5])  # never reaches seed 1's 3.0
    res = analyse(runs, COUNTS, price=1.0)
    assert res["to_target"]["curated_wsd_anneal"]["share_mean"] is None and res["best"] == "curated_wsd"
    assert res["targets"] == {"half_the_raw_tokens": True, "beats_random_cosine": False}  # -12.5% < 17.7% spread


def test_runs_planned_shorter_count_when_they_reach_the_target_with_fewer_tokens():
    raw = [_records([5.0, 4.0, 3.0, 2.0])]  # target 2.0 at 400 tokens
    wsd = [_records([4.0, 3.5, 3.0, 1.5])]  # the long run's curve reaches 2.0 only in its decay: at 367 tokens
    runs = {"raw": raw, "curated_wsd": wsd}
    # planned for 100 and 200 tokens (budgets 0.25 and 0.5), its own decays end at 2.6 and 1.8
    budget_runs = {
        "raw": {0.25: [_records([4.5])], 0.5: [_records([4.0, 3.0])]},
        "curated_wsd": {0.25: [_records([2.6])], 0.5: [_records([3.0, 1.8])]},
    }
    res = analyse(runs, COUNTS, price=1.0, budget_runs=budget_runs)
    b = res["budgets"]["curated_wsd"]
    assert b["fractions"] == [0.25, 0.5, 1.0] and b["final_per_seed"] == [[2.6, 1.8, 1.5]]
    t = res["to_target"]["curated_wsd"]
    assert t["curve_share_per_seed"] == pytest.approx([(300 + 100 * 1 / 1.5) / 400])
    assert b["share_per_seed"] == pytest.approx([(100 + 100 * 0.6 / 0.8) / 400])  # between the 100 and 200 budgets
    assert t["share_per_seed"] == b["share_per_seed"] and b["upper_bound_per_seed"] == [False]  # the fewer
    assert res["to_target"]["raw"]["share_per_seed"] == [1.0]  # raw's own shorter runs do not reach its final loss
    # a smallest budget that already reaches the target is only an upper bound: never extrapolated below it
    budget_runs["curated_wsd"][0.25] = [_records([1.9])]
    res = analyse(runs, COUNTS, price=1.0, budget_runs=budget_runs)
    assert res["budgets"]["curated_wsd"]["share_per_seed"] == [0.25]
    assert res["budgets"]["curated_wsd"]["upper_bound_per_seed"] == [True]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """clean_documents (300 raw documents), curriculum shards of 150 of them, a 512-token tokenizer."""
    d = tmp_path_factory.mktemp("ablation")
    raw = [{"id": f"r{i:03d}", "text": prose(i, 30 + i % 40), "source": "test", "metadata": "{}"} for i in range(300)]
    (d / "clean_documents").mkdir()
    pq.write_table(pa.Table.from_pylist(raw), d / "clean_documents" / "documents.parquet")
    scored = [{**r, "quality_score": (i % 10) / 10} for i, r in enumerate(raw) if i % 2 == 0]
    for r in scored:
        del r["metadata"]
    build_curriculum(
        [str(write_jsonl(d / "scored.jsonl", scored))],
        d / "curriculum_shards",
        CurriculumConfig(target_shard_bytes=4000),
    )
    train_tokenizer(d / "curriculum_shards", d / "tokenizer", TokenizerConfig(vocab_size=512))
    return d


def test_the_heldout_set_is_shared_and_disjoint_from_the_three_inputs(corpus, tmp_path):
    raw = pq.read_table(corpus / "clean_documents" / "documents.parquet").to_pylist()
    curated = read_curated(corpus / "curriculum_shards")
    fraction = 0.2
    held_id = next(r["id"] for r in curated if is_validation(r["id"], fraction))
    # a raw document (odd ids are never curated) that near-dedup clustered with a held-out document
    mate = next(r["id"] for r in raw if int(r["id"][1:]) % 2 and not is_validation(r["id"], fraction))
    clusters = {held_id: 7, mate: 7}
    inputs = split_inputs(raw, curated, fraction, data_seed=0, clusters=clusters)

    held = {r["id"] for r in inputs.heldout}
    curated_ids = {r["id"] for r in curated}
    assert held and held == {i for i in curated_ids if is_validation(i, fraction)}
    for name in ("raw", "curated"):
        ids = [r["id"] for r in inputs.runs[name]]
        assert not held & set(ids) and not any(is_validation(i, fraction) for i in ids)
        assert len(ids) == len(set(ids))
    assert mate not in {r["id"] for r in inputs.runs["raw"]}  # the near-copy of a held-out document is out
    # raw is raw minus what is excluded, in a seeded order; curated keeps the curriculum's order and buckets
    expected_raw = {r["id"] for r in raw} - held - {mate} - {r["id"] for r in raw if is_validation(r["id"], fraction)}
    assert {r["id"] for r in inputs.runs["raw"]} == expected_raw
    assert [r["id"] for r in inputs.runs["raw"]] != sorted(expected_raw)
    c = [r["id"] for r in inputs.runs["curated"]]
    assert c == [r["id"] for r in curated if r["id"] not in held]
    buckets = [r["bucket"] for r in inputs.runs["curated"]]
    assert buckets == sorted(buckets) and len(set(buckets)) > 1
    assert inputs.schedules == {"raw": [0], "curated": sorted(set(buckets))}
    assert split_inputs(raw, curated, fraction, 0, clusters).runs == inputs.runs  # deterministic
    assert split_inputs(raw, curated, fraction, 1, clusters).runs["raw"] != inputs.runs["raw"]

    # the written shards read back in the same order, the held-out set as its own bucket, the tiers carried over
    source = {b["bucket"]: b for b in ShardReader(corpus / "curriculum_shards").manifest["buckets"]}
    write_shards(inputs.runs["curated"], inputs.heldout, tmp_path / "c", target_shard_bytes=3000, bucket_info=source)
    reader = ShardReader(tmp_path / "c")
    assert reader.buckets() == [*sorted(set(buckets)), HELDOUT_BUCKET] and len(reader.manifest["shards"]) > 1
    assert [i for b in sorted(set(buckets)) for i, _ in reader.documents(b)] == c
    assert [i for i, _ in reader.documents(HELDOUT_BUCKET)] == [r["id"] for r in inputs.heldout]
    assert reader.quality_tiers() == {b: source[b]["quality_tier"] for b in set(buckets)}  # not the held-out bucket
    assert reader.training_counts(fraction)[HELDOUT_BUCKET] == 0  # no arm can read it for training


def test_every_arm_trains_the_same_model_and_budget_with_its_own_order_and_schedule(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path)
    configs = {arm: config.train_config(arm, 0, 512, [0, 1, 2]) for arm in ARMS}
    differs = {"name", "run_dir", "shard_dir", "lr_schedule", "data"}
    base = configs["raw"].to_dict()
    for arm, cfg in configs.items():
        doc = cfg.to_dict()
        assert {k: v for k, v in doc.items() if k not in differs} == {k: v for k, v in base.items() if k not in differs}
        assert doc["data"]["seq_len"] == 32 and doc["max_steps"] == 16 and doc["seed"] == 0
        assert doc["lr_schedule"] == ARMS[arm].lr_schedule and doc["shard_dir"].endswith(ARMS[arm].input)
    assert configs["raw"].data.bucket_schedule == [0, 1, 2] and configs["raw"].data.mix_schedule is None
    assert configs["curated_easy_to_hard"].data.bucket_schedule == [0, 1, 2]
    assert [p.until for p in configs["curated_cosine"].data.mix_schedule] == [1.0]
    assert configs["curated_wsd"].data == configs["curated_cosine"].data  # the same order; only the learning rate
    anneal = configs["curated_wsd_anneal"]
    stable, decay = anneal.data.mix_schedule
    assert stable.until * anneal.max_steps == anneal.decay_start and decay.quality_tiers == [-1]
    assert stable.weights is None and stable.quality_tiers is None  # the stable phase: (c)'s mixture
    short = config.train_config("curated_wsd_anneal", 0, 512, [0, 1, 2], budget=0.5)
    assert short.max_steps == 8 and short.name == "ablation-curated_wsd_anneal-0.5x-seed0"
    assert short.data.mix_schedule[0].until * 8 == short.decay_start  # the decay and the anneal fitted to the budget
    with pytest.raises(ValueError, match=r"budgets: 0\.3 must be in"):
        AblationConfig.from_dict({**_paths(corpus), "budgets": [0.3]}).check()  # not a whole number of evaluations
    with pytest.raises(ValueError, match="arms="):
        AblationConfig.from_dict({**_paths(corpus), "arms": ["curated_wsd"]}).check()  # no raw: no target
    with pytest.raises(ValueError, match=r"decay_fraction=1.5 must be in \(0, 1\)"):
        AblationConfig.from_dict({**_paths(corpus), "decay_fraction": 1.5}).check()


def _paths(corpus: Path) -> dict:
    return {
        "clean_documents": str(corpus / "clean_documents" / "documents.parquet"),
        "curriculum_shards": str(corpus / "curriculum_shards"),
        "tokenizer_path": str(corpus / "tokenizer" / "tokenizer.json"),
        "near_duplicate_clusters": None,
    }


def test_config_refuses_unknown_keys_and_bad_budgets(corpus, tmp_path):
    base = {
        "clean_documents": str(corpus / "clean_documents" / "documents.parquet"),
        "curriculum_shards": str(corpus / "curriculum_shards"),
        "tokenizer_path": str(corpus / "tokenizer" / "tokenizer.json"),
        "near_duplicate_clusters": None,
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps({**base, "tokenz": 5}))
    with pytest.raises(ValueError, match=r"unknown field.*tokenz"):
        AblationConfig.from_file(path)
    with pytest.raises(ValueError, match="multiple of batch_size x seq_len"):
        AblationConfig.from_dict({**base, "tokens": 1000}).check()
    with pytest.raises(ValueError, match="not found"):
        AblationConfig.from_dict({**base, "near_duplicate_clusters": str(tmp_path / "none.parquet")}).check()
    from training.ablation import main

    assert main(["--config", str(path)]) == 2


def tiny_config(corpus: Path, out_dir: Path) -> AblationConfig:
    return AblationConfig(
        clean_documents=str(corpus / "clean_documents" / "documents.parquet"),
        curriculum_shards=str(corpus / "curriculum_shards"),
        tokenizer_path=str(corpus / "tokenizer" / "tokenizer.json"),
        near_duplicate_clusters=None,
        out_dir=str(out_dir),
        tokens=4096, seq_len=32, batch_size=8, eval_every_tokens=1024, warmup_tokens=512,
        heldout_fraction=0.2, heldout_tokens=1024, threads=1,
    )  # fmt: skip


@pytest.mark.slow
def test_a_tiny_ablation_runs_end_to_end_and_repeats(corpus, tmp_path):
    lines: list[str] = []
    res = run_ablation(tiny_config(corpus, tmp_path / "one"), progress=lines.append)
    assert sum(line.startswith("run ") for line in lines) == len(ISSUE_ARMS)
    saved = json.loads((tmp_path / "one" / RESULTS_FILE).read_text())
    assert (tmp_path / "one" / "heldout_loss.png").stat().st_size > 0
    table = (tmp_path / "one" / "results.md").read_text()
    for run in ISSUE_ARMS:
        curve = saved["runs"][run]["curve"]
        assert [t for t, _ in curve] == [1024, 2048, 3072, 4096]
        assert curve[-1][1] < curve[0][1] < 7.0  # learning, below ln(512) = 6.24 + noise
        assert saved["most_reads"][run] == 1  # 4,096 tokens: no document read twice
    raw = saved["runs"]["raw"]
    assert saved["target_heldout_loss"] == raw["final_heldout_loss"] == raw["curve"][-1][1]
    assert saved["to_target"]["raw"]["reached"] and saved["to_target"]["raw"]["tokens"] <= 4096
    raw_tokens = saved["to_target"]["raw"]["tokens"]
    for run in ISSUE_ARMS:  # tokens to (a)'s final loss: what the curve says, interpolated, never extrapolated
        t, expected = (
            saved["to_target"][run],
            tokens_to_target(saved["runs"][run]["curve"], saved["target_heldout_loss"]),
        )
        assert t["reached"] == (expected is not None)
        if expected is None:
            assert t["tokens"] is None and f"| {saved['runs'][run]['label']} |" in table
            assert table.split(f"| {saved['runs'][run]['label']} |")[1].split("\n")[0].count("not reached") == 4
        else:
            assert t["tokens"] == pytest.approx(expected) and t["share_of_raw_tokens"] == pytest.approx(
                expected / raw_tokens
            )
            assert f"| {expected:,.0f} |" in table
    assert 0.4 < saved["curation"]["removed_share"] < 0.6  # half the documents were curated away
    assert saved["heldout"]["tokens_evaluated"] == 1024 // 33 * 32
    # every run evaluates on identical rows
    rows = [run_validation_rows(Path(d)) for d in saved["run_dirs"].values()]
    assert all(list(r) == [HELDOUT_BUCKET] and torch.equal(r[HELDOUT_BUCKET], rows[0][HELDOUT_BUCKET]) for r in rows)
    assert all(Path(w).exists() for w in saved["wandb_runs"].values())
    # the runs followed their schedules: WSD holds the peak, cosine does not; the anneal ends on the top tier only
    metrics = {run: read_metrics(Path(saved["run_dirs"][f"ablation-{run}-seed0"])) for run in ISSUE_ARMS}
    cfg = TrainConfig.from_file(Path(saved["run_dirs"]["ablation-curated_wsd-seed0"]) / "train_config.json")
    assert [r["lr"] for r in metrics["curated_wsd"]] == [cfg.lr_at(s) for s in range(cfg.max_steps)]
    assert metrics["curated_wsd"][10]["lr"] == cfg.lr > metrics["curated_cosine"][10]["lr"]
    tiers = ShardReader(tmp_path / "one" / "inputs" / "curated").quality_tiers()
    low = {b for b, t in tiers.items() if t < max(tiers.values())}
    last = metrics["curated_wsd_anneal"][-2:]  # the decay's last steps (a document begun before it may span)
    assert last[-1]["mix_phase"] == 1 and all(r[f"mix/bucket{b}"] == 0 for r in last for b in low)

    # the same config in another folder gives the same curves; in the same folder, the finished runs are reused
    subset = tiny_config(corpus, tmp_path / "two")
    subset.arms = ["raw", "curated_wsd_anneal"]
    again = run_ablation(subset, progress=lambda _: None)
    for run in subset.arms:
        first, second = res["runs"][run]["curve"], again["runs"][run]["curve"]
        assert [t for t, _ in first] == [t for t, _ in second]
        assert [v for _, v in second] == pytest.approx([v for _, v in first], abs=1e-4)
    lines.clear()
    reused = run_ablation(tiny_config(corpus, tmp_path / "one"), progress=lines.append)
    assert sum("reused" in line for line in lines) == len(ISSUE_ARMS) and reused["runs"] == res["runs"]
