"""The run launcher of a single-machine Frugal instance: Dagster's DefaultRunLauncher, plus a run-worker health
check, so that Dagster's own run monitoring marks a run failed when the process running it is gone.

Why: a `dagster asset materialize` killed with SIGKILL (or by the OOM killer), or a UI-launched run whose worker
died, stays STARTED in the instance and in the UI for ever. Run monitoring (dagster.yaml: `run_monitoring`, done by
the daemon that `dagster dev` and `make ui` start) asks the launcher whether each STARTED run's worker is alive.
DefaultRunLauncher cannot say, so monitoring never acts; this launcher can.

How: every Dagster event records the pid of the process that wrote it. The run's RUN_START event comes from the
process that executes the run: the CLI process for `dagster asset materialize`, the `dagster api execute_run`
worker for a launched run. That process is alive when a process with its pid exists and started no later than the
run did (so a reused pid does not count). This holds for an instance whose runs execute on this machine, which is
what dagster.yaml configures (local SQLite storage). Kubernetes and Celery launchers have health checks of their own.

Pinned dagster: CheckRunHealthResult and WorkerStatus come from dagster._core.launcher, the interface that every
run launcher implements.
"""

from __future__ import annotations

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

START_SLACK_S = 2.0
"""Seconds of clock granularity allowed between a worker's creation time and its RUN_START event."""


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid that wrote the run's RUN_START event, and the event's time; None before the run has started."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    if not records:
        return None
    entry = records[0].event_log_entry
    return entry.dagster_event.pid, entry.timestamp


class LocalRunLauncher(dg.DefaultRunLauncher):
    """DefaultRunLauncher whose run workers Dagster's run monitoring can check (see the module docstring)."""

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        found = run_worker_pid(self._instance, run.run_id)
        if found is None:  # monitoring checks STARTED runs only, which have a RUN_START event: never fail on doubt
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no RUN_START event yet")
        pid, started = found
        try:
            process = psutil.Process(pid)
            alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            alive = alive and process.create_time() <= started + START_SLACK_S
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"run worker pid {pid} is gone: it was killed or crashed without ending the run"
        )
