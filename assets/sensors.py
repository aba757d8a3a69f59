"""Automation of the curation graph: a sensor turns each new drop into a partition and a run of raw_documents, and
Dagster's automation conditions carry the drop downstream (see `assets.curation.DOWNSTREAM`)."""

from __future__ import annotations

import json

import dagster as dg

from assets.curation import raw_documents
from assets.drops import DROPS, DropLocation


@dg.sensor(
    name="new_drops",
    target=dg.AssetSelection.assets(raw_documents),
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a `drops` partition and launches raw_documents for each new file or folder in the drop "
    "location, once its size held still between two ticks.",
)
def new_drops(context: dg.SensorEvaluationContext, drops: DropLocation) -> dg.SensorResult | dg.SkipReason:
    """The cursor holds the size and file count each waiting drop had at the last tick. A drop is launched when they
    have not changed since (a file still being written waits), and only once: its partition then exists."""
    seen: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
    try:
        found, skipped = drops.scan()
    except (OSError, ValueError) as e:
        return dg.SkipReason(f"cannot list the drop location {drops.resolved()}: {e}")
    known = set(context.instance.get_dynamic_partitions(DROPS.name))
    ready, waiting, cursor = [], [], {}
    for drop in found:
        if drop.name in known:
            continue
        size = [drop.bytes, drop.files]
        if seen.get(drop.name) == size and drop.files > 0:
            ready.append(drop.name)
        else:
            cursor[drop.name] = size
            waiting.append(f"{drop.name} ({drop.bytes} bytes in {drop.files} files)")
    for reason in skipped:
        context.log.info(f"skipped {reason}")
    cursor_json = json.dumps(cursor, sort_keys=True)
    if not ready:
        reasons = [f"waiting for {', '.join(waiting)} to stop growing"] if waiting else ["no new drops"]
        return dg.SensorResult(skip_reason="; ".join(reasons + skipped), cursor=cursor_json)
    context.log.info(f"new drops: {', '.join(ready)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=name) for name in ready],
        dynamic_partitions_requests=[DROPS.build_add_request(ready)],
        cursor=cursor_json,
    )


curation_automation = dg.AutomationConditionSensorDefinition(
    "curation_automation",
    target=dg.AssetSelection.groups("curation"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Runs the curation assets whose automation condition says so: each stage of a new drop once the "
    "stage before it has it, then the shards and the ledger.",
)

SENSORS = [new_drops, curation_automation]
