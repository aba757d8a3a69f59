"""The new_drops sensor and the curation automation: a drop lands, becomes a partition once it stops growing, and
Dagster's automation conditions carry it downstream."""

import json

import dagster as dg

from assets.definitions import defs
from assets.drops import DROPS, DropLocation
from assets.sensors import new_drops
from tests.assets.test_curation import FIRST_HALF, corpus, drop_dir, materialize
from tests.conftest import prose, write_jsonl


def tick(instance, location, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"drops": location})
    return new_drops(context), context


def test_a_drop_is_launched_once_after_its_size_holds_still(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    location = DropLocation(url=str(tmp_path / "drops"))
    (tmp_path / "drops").mkdir()
    write_jsonl(tmp_path / "drops" / "2026-12-01.jsonl", [{"id": "a", "text": prose(1)}])
    (tmp_path / "drops" / "2026-12-02").mkdir()
    growing = tmp_path / "drops" / "2026-12-02" / "part-0.jsonl"
    write_jsonl(growing, [{"id": "b", "text": prose(2)}])
    (tmp_path / "drops" / ".2026-12-03.jsonl.tmp").write_text("")  # a writer's temp file: never a drop
    (tmp_path / "drops" / "bad name.jsonl").write_text("")

    first, _ = tick(instance, location)
    assert not first.run_requests and "waiting for 2026-12-01.jsonl" in first.skip_reason.skip_message
    assert "'bad name.jsonl': not a drop name" in first.skip_reason.skip_message

    with open(growing, "a") as f:  # still being written between the two ticks
        f.write(json.dumps({"id": "c", "text": prose(3)}) + "\n")
    second, _ = tick(instance, location, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["2026-12-01.jsonl"]
    assert second.dynamic_partitions_requests[0].partition_keys == ["2026-12-01.jsonl"]
    instance.add_dynamic_partitions(DROPS.name, ["2026-12-01.jsonl"])  # what the daemon does with the request

    third, _ = tick(instance, location, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["2026-12-02"]
    instance.add_dynamic_partitions(DROPS.name, ["2026-12-02"])
    fourth, _ = tick(instance, location, third.cursor)
    assert not fourth.run_requests and "no new drops" in fourth.skip_reason.skip_message


def test_a_missing_location_is_a_skip_with_its_reason(tmp_path):
    result, _ = tick(dg.DagsterInstance.ephemeral(), DropLocation(url=str(tmp_path / "nowhere")))
    assert isinstance(result, dg.SkipReason)
    assert "cannot list the drop location" in result.skip_message and "nowhere" in result.skip_message


def test_a_drop_is_read_from_the_location_and_automation_carries_it_downstream(tmp_path):
    (tmp_path / "drops").mkdir()
    src = corpus(tmp_path)
    (tmp_path / "drops" / "crawl-1.jsonl").write_bytes(src.read_bytes())
    instance = dg.DagsterInstance.ephemeral()
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)  # the sensor's tick before the drop
    result = materialize(tmp_path, {}, assets=FIRST_HALF[:1], drop="crawl-1.jsonl", instance=instance)
    assert result.success and (drop_dir(tmp_path, "raw_documents", "crawl-1.jsonl") / "documents.parquet").exists()

    evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    keys = defs.resolve_all_asset_keys()
    requested = {key.to_user_string(): evaluation.get_requested_partitions(key) for key in keys}
    # the chain of the new drop in one request; scored_documents waits for the classifier, which (like the tokenizer
    # and training) is never automatic
    chain = {"clean_documents", "near_dedup_documents", "filtered_documents"}
    assert {name: parts for name, parts in requested.items() if parts} == {name: {"crawl-1.jsonl"} for name in chain}
