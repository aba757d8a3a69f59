"""Inference assets: quantized_model (INT8 and INT4 target and draft, per-channel KV scales, and what
quantization costs in validation perplexity), benchmark_report (the dense baseline against the MoE model's
formats: quality, speed, memory, $ per 1M tokens), exported_model (Hugging Face and GGUF exports for other
engines) and inference_package (the published release)."""

import dataclasses
import json
import math
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.metadata import md_table, png_md, sparkline_md
from assets.resources import CurationPaths, WandbResource
from assets.scaling import dense_scaling
from assets.training import TRAINING_CHECKS, TRAINING_TAGS, dense_baseline_model, draft_model, moe_model
from model.io import WEIGHTS_FILE, write_text_atomic

GROUP = "inference"


class QuantizedModelConfig(dg.Config):
    """How the target and draft are quantized (inference.quantized_model.QuantizeOptions)."""

    group_size: int = 64
    """INT4 group size: 32, 64 or 128 (must divide every matrix's input width)."""
    symmetric: bool = False
    awq: bool = True
    """Activation-aware scaling for INT4, calibrated on training rows."""
    calibration_rows: int = 32
    val_rows: int = 64
    """Held-out rows (of the run's seq_len + 1 tokens) the perplexities are measured on."""


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
    deps=[moe_model, draft_model],
    description="moe_model and draft_model quantized to INT8 (per channel) and INT4 (group-wise, AWQ), saved as "
    "safetensors under int8/ and int4/ {target,draft}, with per-channel KV-cache scales; reports the validation "
    "perplexity of every weight and KV-cache format against fp32.",
)
def quantized_model(
    context: dg.AssetExecutionContext, config: QuantizedModelConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    from inference.quantized_model import QuantizeOptions, build
    from training.data import run_training_rows, run_validation_rows

    options = QuantizeOptions(
        group_size=config.group_size,
        symmetric=config.symmetric,
        awq=config.awq,
        calibration_rows=config.calibration_rows,
        val_rows=config.val_rows,
    )
    try:
        options.config("int4").check()
    except ValueError as e:
        raise dg.Failure(description=f"quantized_model: {e}") from e
    target, draft = paths.stage_dir("moe_model"), paths.stage_dir("draft_model")
    for run in (target, draft):
        if not (run / WEIGHTS_FILE).exists():
            raise dg.Failure(description=f"{run / WEIGHTS_FILE}: missing: materialize {run.name} first")
    try:
        calibration = run_training_rows(target, options.calibration_rows)
        import torch

        heldout = torch.cat(list(run_validation_rows(target).values()))
        out = paths.stage_dir("quantized_model")
        report = build(target, draft, out, calibration, heldout, options, log=context.log.info)
    except ValueError as e:
        raise dg.Failure(description=f"quantized_model: {e}") from e
    columns = ("format", "weights", "KV cache", "val ppl", "vs fp32", "budget", "weight MiB")
    rows = [
        (
            r["label"],
            r["weights"],
            r["kv_cache"],
            f"{r['perplexity']:.3f}",
            f"{r['delta_pct']:+.2f}%",
            "" if r["budget_pct"] is None else f"+{r['budget_pct']}% " + ("met" if r["within_budget"] else "MISSED"),
            f"{r['weight_bytes'] / 2**20:.2f}",
        )
        for r in report["rows"]
    ]
    summary = {f"ppl/{r['label']}": r["perplexity"] for r in report["rows"]}
    summary |= {f"ppl_delta_pct/{r['label']}": r["delta_pct"] for r in report["rows"]}
    summary |= {f"awq/{k}/{m}": v for k, s in report["awq"].items() for m, v in s.items()}
    run_dir = wandb.log_run(
        context, "quantize", summary, tables={"perplexity": (columns, rows)}, config=report["options"]
    )
    metadata = {
        "perplexity": dg.MetadataValue.md(md_table(columns, rows)),
        "val_tokens": report["val_tokens"],
        "calibration_tokens": report["calibration_tokens"],
        "awq": dg.MetadataValue.json(report["awq"]),
        "folder": dg.MetadataValue.path(str(out)),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


def _report(paths: CurationPaths) -> dict:
    from inference.quantized_model import REPORT_FILE

    return json.loads((paths.stage_dir("quantized_model") / REPORT_FILE).read_text())


@dg.asset_check(
    asset=quantized_model,
    description="Validation perplexity within budget over fp32: INT8 +0.5%, INT4 +3%, INT8 KV cache +0.5%.",
)
def quantization_within_budget(paths: CurationPaths) -> dg.AssetCheckResult:
    rows = [r for r in _report(paths)["rows"] if r["budget_pct"] is not None]
    return dg.AssetCheckResult(
        passed=all(r["within_budget"] for r in rows),
        metadata={r["label"]: f"{r['delta_pct']:+.3f}% (budget +{r['budget_pct']}%)" for r in rows},
    )


@dg.asset_check(
    asset=quantized_model,
    description="The engine frugal-serve ships (batched, compiled, with its own proposer: the target's MTP modules, "
    "else the quantized draft) decodes the same greedy tokens with and without speculation, for INT8 and INT4. "
    "Blocking: a model whose speculation changes its output is not benchmarked or published (and the benchmark does "
    "not share the CPU with this check).",
    blocking=True,
)
def speculative_greedy_is_identical(paths: CurationPaths) -> dg.AssetCheckResult:
    import torch

    from inference.lossless import check_lossless
    from training.data import run_validation_rows

    folder: Path = paths.stage_dir("quantized_model")
    rows = torch.cat(list(run_validation_rows(paths.stage_dir("moe_model")).values()))
    prompts = [row[:12].tolist() for row in rows[:3]]
    metadata, identical = {}, True
    for scheme in ("int8", "int4"):
        draft = folder / scheme / "draft"
        report = check_lossless(folder / scheme / "target", draft if draft.is_dir() else None, prompts)
        identical &= report.identical
        metadata |= {f"{scheme}_identical": report.identical, f"{scheme}_proposer": report.proposer,
                     f"{scheme}_acceptance_rate": report.acceptance_rate,
                     f"{scheme}_compiled_matches_eager": report.matches_eager,
                     f"{scheme}_compile_s": round(report.compile_s, 1)}  # fmt: skip
        if not report.identical:
            metadata[f"{scheme}_first_difference"] = dg.MetadataValue.json(report.first_difference)
    return dg.AssetCheckResult(passed=identical, metadata=metadata)


def blocking_checks_passed(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Refuse to build on an input whose latest materialization has not passed each of its blocking checks.

    Dagster skips a downstream asset when a blocking check fails in the same run, but a later run that selects
    only the downstream assets never reruns the check: after `speculative_greedy_is_identical` crashed, such a run
    published the release. So each consuming asset reads, for every blocking check on its direct inputs, the latest
    execution of that check and the materialization it evaluated, and raises dg.Failure naming the check unless it
    passed on the input's latest materialization. Returns "asset/check" -> what was found, for the metadata."""
    instance = context.instance
    inputs = context.assets_def.asset_deps[context.asset_key]
    found, problems = {}, []
    for spec in (s for c in (*TRAINING_CHECKS, *INFERENCE_CHECKS) for s in c.check_specs if s.blocking):
        if spec.asset_key not in inputs:
            continue
        name = f"{spec.asset_key.to_user_string()}/{spec.name}"
        latest = instance.fetch_materializations(spec.asset_key, limit=1).records
        record = instance.get_latest_asset_check_evaluation_record(spec.key)
        if not latest:
            problems.append(f"{name}: {spec.asset_key.to_user_string()} has never been materialized")
            continue
        status = record.status.value if record else None  # PLANNED, SUCCEEDED or FAILED (not passed)
        if status is None:
            problems.append(f"{name} has never been evaluated")
        elif status == "PLANNED":
            problems.append(f"{name}: its latest execution (run {record.run_id}) never finished: it crashed or stopped")
        elif status == "FAILED":
            problems.append(f"{name} failed in run {record.run_id}")
        else:
            evaluation = record.event.dagster_event.event_specific_data if record.event else None
            target = evaluation.target_materialization_data if evaluation else None
            # In a partitioned run (make demo's `--partition`), Dagster looks the target of a check on an
            # unpartitioned asset up by the run's partition and records none; the evaluation then counts for the
            # materialization of its own run that it followed.
            same_run = (target is None and record.event is not None and record.run_id == latest[0].run_id
                        and record.event.timestamp >= latest[0].timestamp)  # fmt: skip
            if not same_run and (target is None or target.storage_id != latest[0].storage_id):
                problems.append(
                    f"{name} passed in run {record.run_id}, but not on the latest materialization of "
                    f"{spec.asset_key.to_user_string()} (run {latest[0].run_id})"
                )
            else:
                found[name] = f"passed in run {record.run_id}"
    if problems:
        raise dg.Failure(
            description=f"{context.asset_key.to_user_string()}: a blocking check has not passed on its input: "
            + "; ".join(problems)
            + ". Materialize the input with its checks (or run the check) first."
        )
    return found


class BenchmarkReportConfig(dg.Config):
    """The cost waterfall's workload (inference.cost) and what a device-hour costs."""

    cpu_price_per_hour: float = 0.05
    """$ per hour of the CPU machine the benchmark runs on (the training spend meter's default)."""
    gpu_price_per_hour: float = 2.50
    """$ per GPU-hour: used when the benchmark runs on a GPU, and for the projection at scale."""
    concurrency: int = 8
    """Requests served together by the batched rows and llama.cpp's parallel slots."""
    requests: int = 16
    """Requests per timed pass."""
    system_tokens: int = 48
    """The system prompt every request starts with (held-out text)."""
    prompt_tokens: int = 16
    new_tokens: int = 32
    repeats: int = 3
    """Timed repeats per row: the noise of every ratio."""
    gamma: int = 4
    threads: int = 2
    compile_autotune: bool = False
    """inductor's kernel autotuning in the compiled rows (frugal-serve's default): True decodes faster and compiles
    a few times slower (minutes per row on 2 cores: bench/cost.yaml, make bench-cost)."""
    peer_formats: list[str] = Field(default_factory=lambda: ["Q4_K_M"])
    """llama.cpp's formats for the peer rows (LLAMA_FTYPE names); empty: no peer column."""
    projection_gpu: str = "H100 SXM"
    """The GPU of the projection at scale (inference.roofline.GPUS)."""


LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def baseline(paths: CurationPaths) -> dict:
    """Row 1's dense model. dense_scaling's equal-quality dense model when its study (made on the current moe_model)
    established one; otherwise the MoE's equal-active dense twin, dense_baseline_model, with the reason in words.
    Evidence never blocks the report: the fallback is named in its headline, table note and metadata.

    Returns kind ("equal_quality" or "equal_active"), run (the folder), study (dense_scaling's results or None),
    reason (why the fallback, or None), tolerance (the seed noise a Frugal row's quality may exceed row 1's by; 0
    for the twin, whose noise was not measured), multiplier (row 1's non-embedding parameters over the MoE's active
    ones), val_loss and moe_val_loss."""
    from training.scaling import RESULTS_FILE, equal_quality_run

    moe_loss = json.loads((paths.stage_dir("moe_model") / "summary.json").read_text())["val_loss"]
    results_file = paths.stage_dir("dense_scaling") / RESULTS_FILE
    study = json.loads(results_file.read_text()) if results_file.exists() else None
    if study is None:
        reason = "dense_scaling has not been materialized; make bench-cost runs the study"
    elif not math.isclose(study["moe"]["own_val_loss"], moe_loss, rel_tol=0, abs_tol=1e-9):
        reason = (f"dense_scaling's study was made on an earlier moe_model (held-out loss "
                  f"{study['moe']['own_val_loss']:.4f}, now {moe_loss:.4f}): materialize dense_scaling again")
        study = None
    elif not study["bracketed"]:
        reason = f"dense_scaling: {study['reason']}"
    else:
        eq = study["equal_quality"]
        return {"kind": "equal_quality", "run": equal_quality_run(study), "study": study, "reason": None,
                "tolerance": study["tolerance"], "multiplier": eq["multiplier"], "val_loss": eq["val_loss"],
                "moe_val_loss": study["moe"]["val_loss"]}  # fmt: skip
    twin = paths.stage_dir("dense_baseline_model")
    return {"kind": "equal_active", "run": str(twin), "study": study, "reason": reason, "tolerance": 0.0,
            "multiplier": 1.0, "val_loss": json.loads((twin / "summary.json").read_text())["val_loss"],
            "moe_val_loss": moe_loss}  # fmt: skip


def peer_files(dense: str, moe: str, formats: list[str], out: Path, log) -> tuple[dict, str | None]:
    """GGUF files of the equal-quality dense model and the MoE model in each format ({(model, format): path}),
    or the reason llama.cpp cannot be measured here."""
    from inference.gguf_export import llama_cpp_quantize, write_gguf
    from inference.llama_cpp_peer import available
    from model.io import load_model

    reason = available()
    if reason or not formats:
        return {}, reason or "no peer_formats configured"
    unknown = sorted(set(formats) - set(LLAMA_FTYPES))
    if unknown:
        raise dg.Failure(description=f"peer_formats: unknown {unknown}; one of {sorted(LLAMA_FTYPES)}")
    files = {}
    for role, run in (("dense", dense), ("moe", moe)):
        f32 = write_gguf(load_model(run), Path(run) / "tokenizer.json", out / f"{role}-f32.gguf", name=role)
        for fmt in formats:
            files[(role, fmt)] = str(llama_cpp_quantize(f32, out / f"{role}-{fmt}.gguf", LLAMA_FTYPES[fmt]))
        f32.unlink()
        log(f"llama.cpp files for {role}: {', '.join(formats)}")
    return files, None


def waterfall_rows(dense: str, paths: CurationPaths, c: int) -> list:
    """Rows 1 to 6 of the waterfall (rows 7 and 8 build on the cheaper of row 6's formats: `speculative_rows`)."""
    from inference.cost import Row

    q, moe = paths.stage_dir("quantized_model"), str(paths.stage_dir("moe_model"))
    return [
        Row("dense fp32, transformers generate, batch 1", "(the starting point)", "transformers", dense, "dense"),
        Row("dense fp32, Frugal engine, eager, batch 1", "Frugal's engine", "frugal", dense, "dense"),
        Row("dense fp32, compiled, batch 1", "the compiled decode step", "frugal", dense, "dense", compiled=True),
        Row(f"dense fp32, compiled, batch {c}", "continuous batching", "frugal", dense, "dense", compiled=True,
            concurrency=c),
        Row(f"MoE fp32, compiled, batch {c}", "the MoE model", "frugal", moe, "moe", compiled=True, concurrency=c),
        Row(f"MoE INT8, compiled, batch {c}", "INT8 weights", "frugal", str(q / "int8" / "target"), "moe",
            compiled=True, concurrency=c),
        Row(f"MoE INT4, compiled, batch {c}", "INT4 weights (instead of INT8)", "frugal", str(q / "int4" / "target"),
            "moe", compiled=True, concurrency=c),
    ]  # fmt: skip


def speculative_rows(scheme: str, paths: CurationPaths, c: int) -> list:
    """Rows 7 and 8: the draft added to the cheaper of row 6's formats, then the prefix cache."""
    from inference.cost import Row

    folder = paths.stage_dir("quantized_model") / scheme
    target, draft = str(folder / "target"), str(folder / "draft")
    name = f"MoE {scheme.upper()} + draft, compiled, batch {c}"
    return [
        Row(
            name,
            f"speculative decoding (on {scheme.upper()}, the cheaper)",
            "frugal",
            target,
            "moe",
            draft,
            True,
            c,
            after=f"MoE {scheme.upper()}, compiled, batch {c}",
        ),
        Row(f"{name}, prefix cache", "prefix caching", "frugal", target, "moe", draft, True, c, prefix_caching=True),
    ]


def peer_rows(files: dict, c: int) -> list:
    from inference.cost import Row

    rows = []
    for (role, fmt), path in files.items():
        model = "dense" if role == "dense" else "MoE (glm4moe)"
        for slots in (1, c):
            label = f"{model} {fmt}, batch {slots}" if slots == 1 else f"{model} {fmt}, {slots} parallel slots"
            rows.append(Row(label, "llama.cpp", "llama.cpp", path, role, concurrency=slots, peer=True))
    return rows


def projection(multiplier: float, waterfall: list[dict], workload, config: BenchmarkReportConfig, log) -> dict:
    """The roofline (inference.roofline) checked against this machine's compiled plain-decoding rows, then
    applied to moe_1b and its dense equivalent on a GPU (`multiplier` x its active non-embedding parameters)."""
    from inference import roofline
    from model.config import moe_1b
    from model.io import load_config
    from training.scaling import d_ff_for, dense_config, non_embedding_params

    cpu = roofline.calibrate(config.threads, config.cpu_price_per_hour)
    log(f"this CPU: {cpu.bandwidth / 1e9:.1f} GB/s read, {cpu.flops / 1e9:.1f} GFLOP/s fp32 matmul")
    context = len(workload.system) + config.prompt_tokens + config.new_tokens // 2
    width = {"fp32": 4.0, "INT8": 1.0, "INT4": 0.5}
    plain = [r for r in waterfall if r["engine"] == "frugal" and r["compiled"] and not r["draft"]]

    def predicted(r: dict, device) -> dict:
        fmt = next((f for f in ("INT8", "INT4") if f in r["label"]), "fp32")
        return roofline.project(load_config(Path(r["model"])), device, r["concurrency"], context, width[fmt])

    # the costs outside the roofline, from the dense model's compiled rows at batch 1 and batch C: each row's
    # measured step time less its roofline is a + B x b (a per step, b per request in the batch)
    one, many = plain[0], plain[1]
    extra = [r["concurrency"] / r["output_tokens_per_s"] - predicted(r, cpu)["roofline_s"] for r in (one, many)]
    per_request = max(0.0, (extra[1] - extra[0]) / (many["concurrency"] - one["concurrency"]))
    per_step = max(0.0, extra[0] - one["concurrency"] * per_request)
    cpu = dataclasses.replace(cpu, step_overhead_s=per_step, request_overhead_s=per_request)
    checked = []
    for r in plain:
        p = predicted(r, cpu)
        checked.append({"label": r["label"], "predicted_tokens_per_s": p["tokens_per_s"], "bound": p["bound"],
                        "measured_tokens_per_s": r["output_tokens_per_s"], "calibration": r in (one, many),
                        "measured_over_predicted": r["output_tokens_per_s"] / p["tokens_per_s"]})  # fmt: skip
    tested = [c for c in checked if not c["calibration"]]
    big = moe_1b()
    dense = dense_config(big, d_ff_for(big, multiplier * non_embedding_params(big), 128))
    gpu = roofline.Device(config.projection_gpu, **roofline.GPUS[config.projection_gpu],
                          price_per_hour=config.gpu_price_per_hour)  # fmt: skip
    at_scale = []
    for name, model, fmt in (("dense equivalent", dense, "bf16"), ("moe_1b", big, "bf16"), ("moe_1b", big, "INT8"),
                             ("moe_1b", big, "INT4")):  # fmt: skip
        for batch in (1, 64):
            p = roofline.project(model, gpu, batch, 1024, {"bf16": 2.0, "INT8": 1.0, "INT4": 0.5}[fmt], 2.0)
            at_scale.append({"model": name, "format": fmt, "params_active": model.active_params(), **p})
    return {"cpu": {"bandwidth": cpu.bandwidth, "flops": cpu.flops, "step_overhead_s": per_step,
                    "request_overhead_s": per_request, "context": context,
                    "rows": checked, "within_2x": all(0.5 <= c["measured_over_predicted"] <= 2 for c in tested)},
            "gpu": {"name": gpu.name, "bandwidth": gpu.bandwidth, "flops": gpu.flops,
                    "price_per_hour": gpu.price_per_hour, "multiplier": multiplier, "dense_d_ff": dense.d_ff,
                    "rows": at_scale}}  # fmt: skip


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch"},
    deps=[dense_scaling, dense_baseline_model, quantized_model],
    op_tags=TRAINING_TAGS,  # timings need the cores to themselves: no training or export beside it
    description="The cost waterfall (inference.cost): from the equal-quality dense model (dense_scaling's; where the "
    "study has not established one, the MoE's equal-active twin, and the report says so) in fp32 on transformers' "
    "generate, one lever at a time (Frugal's engine, compilation, continuous batching, the MoE, INT8/INT4, "
    "speculative decoding, prefix caching), each row's tokens/s, latency and $ per 1M output and input tokens on "
    "one held-out workload; llama.cpp serving the same models beside it; the two headline ratios with their noise; "
    "and a roofline projection at scale, checked against this machine's rows.",
)
def benchmark_report(
    context: dg.AssetExecutionContext, config: BenchmarkReportConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    import torch

    from inference import cost
    from training.data import run_validation_rows

    checks = blocking_checks_passed(context)
    for run in (paths.stage_dir("moe_model"), paths.stage_dir("dense_baseline_model")):
        if not (run / "summary.json").exists():
            raise dg.Failure(description=f"{run / 'summary.json'}: missing: materialize {run.name} first")
    base = baseline(paths)
    dense, study = base["run"], base["study"]
    if base["reason"]:
        context.log.warning(f"row 1 is the MoE's equal-active dense twin: {base['reason']}")
    for folder in (dense, paths.stage_dir("moe_model"), *(paths.stage_dir("quantized_model") / s / r
                   for s in ("int8", "int4") for r in ("target", "draft"))):  # fmt: skip
        if not (Path(folder) / WEIGHTS_FILE).exists():
            raise dg.Failure(description=f"{Path(folder) / WEIGHTS_FILE}: missing: materialize it first")
    rows_NT = torch.cat(list(run_validation_rows(paths.stage_dir("moe_model")).values()))
    try:
        workload = cost.CostWorkload.build(rows_NT, config.system_tokens, config.prompt_tokens, config.requests,
                                           config.new_tokens, config.repeats, config.gamma, config.threads,
                                           config.compile_autotune)  # fmt: skip
    except ValueError as e:
        raise dg.Failure(description=f"benchmark_report: {e}") from e
    out = paths.stage_dir("benchmark_report")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    price = config.gpu_price_per_hour if device == "gpu" else config.cpu_price_per_hour
    c = config.concurrency
    results = cost.run_rows(waterfall_rows(dense, paths, c), workload, out, log=context.log.info)
    int8, int4 = (cost.costs(r, price)["output_usd_per_1m"] for r in results[-2:])
    scheme = "int8" if int8 <= int4 else "int4"
    results += cost.run_rows(speculative_rows(scheme, paths, c), workload, out, log=context.log.info)
    files, peer_reason = peer_files(dense, str(paths.stage_dir("moe_model")), config.peer_formats, out / "gguf",
                                    context.log.info)  # fmt: skip
    if files:
        results += cost.run_rows(peer_rows(files, c), workload, out, log=context.log.info)
    table = cost.table(results, price)
    head = cost.headline(table, base["tolerance"])
    head["row1_interpolated"] = (interpolated_row1(study, table, workload, out, price, context.log.info)
                                 if base["kind"] == "equal_quality" else None)  # fmt: skip
    proj = projection(base["multiplier"], table, workload, config, context.log.info)
    markdown = cost.markdown(table)
    text = headline_text(head, peer_reason, base, proj)
    note = (
        f"{config.requests} requests per pass, each a {len(workload.system)}-token system prompt shared by all plus "
        f"{config.prompt_tokens} held-out tokens of its own, {config.new_tokens} greedy tokens each; batched rows "
        f"and llama.cpp's slots serve {c} at a time; median of {config.repeats} repeats (± half the spread of $ per "
        f"1M output tokens); {device.upper()} at ${price}/hour, {config.threads} threads. Quality: held-out "
        f"perplexity on {rows_NT[:, 1:].numel():,} tokens; "
        + (f"'equal' = within dense_scaling's seed noise ({base['tolerance']:.4f} nats)."
           if base["kind"] == "equal_quality" else
           "row 1 is the MoE's equal-active dense twin (equal quality not established); 'equal' = at most row 1's "
           "perplexity.")
    )  # fmt: skip
    chart = cost.waterfall_chart(table, out / "waterfall.png", "Frugal: what each lever does to $ per 1M output tokens")
    report = {"device": device, "price_per_hour": price, "headline": head, "peer": peer_reason or "measured",
              "rows": table, "projection": proj, "note": note, "scheme": scheme,
              "baseline": {k: v for k, v in base.items() if k != "study"}}  # fmt: skip
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    report_md = f"{text}\n\n{markdown}\n\n{note}\n\n{projection_markdown(proj)}\n"
    write_text_atomic(out / "report.md", report_md)
    summary = {f"usd_per_1m/{r['label']}": r["output_usd_per_1m"] for r in table}
    if head.get("best"):
        summary |= {"vs_row1": head["vs_row1"]["median"]}
        if "vs_peer" in head:
            summary["vs_peer"] = head["vs_peer"]["median"]
    run_dir = wandb.log_run(context, "benchmark", summary, tables={"waterfall": (cost.COLUMNS, cost.cells(table))},
                            images={"waterfall": chart}, config=config.model_dump())  # fmt: skip
    frugal_rows = [r for r in table if not r["peer"]]
    metadata = {
        "cost": dg.MetadataValue.md(
            sparkline_md([r["output_usd_per_1m"] for r in frugal_rows], "cost waterfall", log=True)
            + f" $ per 1M output tokens, rows 1 to {len(frugal_rows)} (log scale)"
        ),
        "headline": dg.MetadataValue.md(text),
        "waterfall": dg.MetadataValue.md(markdown),
        "chart": dg.MetadataValue.md(png_md(chart, "cost waterfall")),
        "projection": dg.MetadataValue.md(projection_markdown(proj)),
        "note": note,
        "report": dg.MetadataValue.path(str(out / "report.md")),
        "blocking_checks": dg.MetadataValue.json(checks),
        "baseline": base["kind"],
        "baseline_run": dg.MetadataValue.path(dense),
    }
    if base["reason"]:
        metadata["baseline_reason"] = base["reason"]
    if head.get("best"):
        metadata["vs_row1"] = head["vs_row1"]["median"]
        if "vs_peer" in head:
            metadata["vs_llama_cpp"] = head["vs_peer"]["median"]
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


def interpolated_row1(study: dict, table: list[dict], workload, out: Path, price: float, log) -> dict | None:
    """When equal_quality_dense missed the MoE's loss by more than the seed noise: row 1's configuration measured
    on the two trained sizes either side of that loss, and its $ per 1M output tokens interpolated between them
    (in ln $, at the MoE's place between their losses); and how many times cheaper than that Frugal's cheapest row
    of the MoE's quality (within the seed noise) is. None otherwise."""
    from inference import cost

    eq = study["equal_quality"]
    if eq["matched"] or not eq["bracket"]:
        return None
    b = eq["bracket"]
    runs = {p["name"]: p["run_dir"] for p in [*study["points"], eq]}
    first = cost.Row(**{k: v for k, v in table[0].items() if k in cost.Row.__dataclass_fields__})
    rows = [
        dataclasses.replace(first, label=f"row 1 on {name}", model=runs[name]) for name in (b["worse"], b["better"])
    ]
    worse, better = (cost.costs(r, price)["output_usd_per_1m"] for r in cost.run_rows(rows, workload, out, log=log))
    w = b["weight_better"]
    usd = math.exp((1 - w) * math.log(worse) + w * math.log(better))
    # the interpolation sits at the MoE's quality: Frugal's best is then the cheapest row at least as good as the MoE
    moe = next(r for r in table if r["quality_of"] == "moe" and not r["peer"])
    good = [r for r in table if not r["peer"] and r["perplexity"] <= moe["perplexity"] * math.exp(study["tolerance"])]
    best = min(good, key=lambda r: r["output_usd_per_1m"])
    return {
        "worse": b["worse"],
        "better": b["better"],
        "worse_usd": worse,
        "better_usd": better,
        "usd": usd,
        "weight_better": w,
        "best": best["label"],
        "best_vs_interpolated": usd / best["output_usd_per_1m"],
    }


def headline_text(head: dict, peer_reason: str | None, base: dict, proj: dict) -> str:
    gap = base["moe_val_loss"] - base["val_loss"]
    if base["kind"] == "equal_quality":
        eq = base["study"]["equal_quality"]
        lines = [f"Baseline: the dense model of the MoE's quality (dense_scaling: {base['multiplier']:.2f}x the MoE's "
                 f"active non-embedding parameters, held-out loss {base['val_loss']:.4f} against the MoE's "
                 f"{base['moe_val_loss']:.4f}{'' if eq['matched'] else ', outside the seed noise'})."]  # fmt: skip
    else:
        lines = [f"Baseline: **the MoE's equal-active dense twin** (dense_baseline_model: the same active "
                 f"parameters per token), not a dense model of the MoE's quality, because equal quality is not "
                 f"established ({base['reason']}). Held-out loss: the MoE {base['moe_val_loss']:.4f} against its "
                 f"twin's {base['val_loss']:.4f} ({gap:+.4f} nats: the MoE is "
                 f"{'better' if gap < 0 else 'not better'} at equal active parameters). Every factor below is "
                 "against that twin: where the MoE is better, a dense model as good as it costs more."]  # fmt: skip
    interp = head.get("row1_interpolated")
    if interp:
        lines.append(f"Row 1's cost interpolated between {interp['worse']} (${interp['worse_usd']:.4f}) and "
                     f"{interp['better']} (${interp['better_usd']:.4f}) at the MoE's loss: ${interp['usd']:.4f} per 1M "
                     f"output tokens. At the MoE's quality, Frugal's best ({interp['best']}) is "
                     f"**{interp['best_vs_interpolated']:.2f}x** cheaper than that.")  # fmt: skip
    if not head.get("best"):
        return "\n\n".join([*lines, "No Frugal configuration reaches row 1's quality."])
    r = head["vs_row1"]
    lines.append(f"**Frugal's best** ({head['best']}, ${head['best_usd']:.4f} per 1M output tokens) is "
                 f"**{r['median']:.2f}x** cheaper than row 1 ({head['row1']}, ${head['row1_usd']:.4f}); range "
                 f"{r['min']:.2f}-{r['max']:.2f}x over {r['repeats']} repeats (target: at least 10x): "
                 + ("met." if r["min"] >= 10 else "missed."))  # fmt: skip
    if "vs_peer" in head:
        p = head["vs_peer"]
        lines.append(f"Against **llama.cpp's best** on row 1's dense model ({head['peer']}, "
                     f"${head['peer_usd']:.4f}): **{p['median']:.2f}x** (range {p['min']:.2f}-{p['max']:.2f}x; "
                     "target: at least 2x): " + ("met." if p["min"] >= 2 else "missed."))  # fmt: skip
    else:
        lines.append(f"llama.cpp: not measured ({peer_reason or 'no llama.cpp row reaches the quality of row 1'}).")
    cpu = proj["cpu"]
    ratios = ", ".join(f"{c['measured_over_predicted']:.2f}" for c in cpu["rows"] if not c["calibration"])
    lines.append("Roofline projection on this CPU (the dense rows calibrate the costs outside the roofline): "
                 f"measured/predicted tokens/s {ratios}"
                 + (" (all within 2x)." if cpu["within_2x"] else " (not all within 2x)."))  # fmt: skip
    return "\n\n".join(lines)


def projection_markdown(proj: dict) -> str:
    cpu, gpu = proj["cpu"], proj["gpu"]
    check = md_table(("row", "predicted tok/s", "bound", "measured tok/s", "measured / predicted"),
                     [(c["label"] + (" (calibrates the costs outside the roofline)" if c["calibration"] else ""),
                       f"{c['predicted_tokens_per_s']:.0f}", c["bound"], f"{c['measured_tokens_per_s']:.0f}",
                       f"{c['measured_over_predicted']:.2f}") for c in cpu["rows"]])  # fmt: skip
    scale = md_table(("model", "format", "active params", "batch", "bound", "tok/s", "$ / 1M output"),
                     [(r["model"], r["format"], f"{r['params_active'] / 1e6:.0f}M", r["batch"], r["bound"],
                       f"{r['tokens_per_s']:,.0f}", f"{r['usd_per_1m']:.4f}") for r in gpu["rows"]])  # fmt: skip
    return (
        f"### Roofline check on this CPU ({cpu['bandwidth'] / 1e9:.1f} GB/s, {cpu['flops'] / 1e9:.0f} GFLOP/s, "
        f"outside the roofline {1e3 * cpu['step_overhead_s']:.2f} ms per step + {1e3 * cpu['request_overhead_s']:.2f} "
        f"ms per request in the batch, context {cpu['context']})\n\n{check}\n\n"
        f"### Projection at scale (a projection, not a measurement)\n\n"
        f"{gpu['name']}: {gpu['bandwidth'] / 1e12:.2f} TB/s, {gpu['flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"${gpu['price_per_hour']}/GPU-hour, context 1024, bf16 KV cache, no cost outside the roofline (the ideal). "
        f"The dense equivalent of moe_1b applies row 1's multiplier ({gpu['multiplier']:.2f}x its active non-embedding "
        f"parameters: dense_scaling's, or 1 for the equal-active twin; d_ff {gpu['dense_d_ff']}); bench/gpu_cost.py "
        f"measures it on a GPU.\n\n{scale}"
    )


EXPORTED_RUNS = ("moe_model", "draft_model", "dense_baseline_model")


class ExportedModelConfig(dg.Config):
    gguf_outtype: str = "q8_0"
    """Tensor type of the GGUF files (glm4moe for the MoE model, llama for dense ones): f32, f16 or q8_0."""
    approximate: bool = False
    """Export top-p dynamic routing as top-k (the model card says so); otherwise such a model is refused."""


@dg.asset(
    group_name=GROUP,
    kinds={"huggingface", "safetensors"},
    deps=[moe_model, draft_model, dense_baseline_model],
    op_tags=TRAINING_TAGS,  # not beside benchmark_report's timings
    description="moe_model, draft_model and dense_baseline_model for other engines: Hugging Face folders "
    "(Glm4MoeForCausalLM, LlamaForCausalLM; transformers, vLLM, SGLang) and GGUF files (glm4moe, llama; "
    "llama.cpp, Ollama), under exported_model/<model>/.",
)
def exported_model(
    context: dg.AssetExecutionContext, config: ExportedModelConfig, paths: CurationPaths
) -> dg.MaterializeResult:
    from inference.export import export
    from model.io import load_config

    rows, benchmark = [], _benchmark_table(paths)
    for name in EXPORTED_RUNS:
        run, out = paths.stage_dir(name), paths.stage_dir("exported_model") / name
        if not (run / WEIGHTS_FILE).exists():
            raise dg.Failure(description=f"{run / WEIGHTS_FILE}: missing: materialize {name} first")
        try:
            hf = export(run, "hf", out / "hf", overwrite=True, approximate=config.approximate, benchmark=benchmark)
            architecture = json.loads((hf / "config.json").read_text())["architectures"][0]
            rows.append((name, "hf", architecture, str(hf), _bytes(hf)))
            gguf = export(run, "gguf", out / f"{name}-{config.gguf_outtype}.gguf", config.gguf_outtype, True)
            gguf_arch = "glm4moe" if load_config(run).n_routed_experts else "llama"
            rows.append((name, f"gguf {config.gguf_outtype}", gguf_arch, str(gguf), _bytes(gguf)))
        except ValueError as e:
            raise dg.Failure(description=f"exported_model: {name}: {e}") from e
        context.log.info(f"exported {name}: {', '.join(r[1] for r in rows if r[0] == name)}")
    return dg.MaterializeResult(
        metadata={
            "exports": dg.MetadataValue.md(md_table(("model", "format", "architecture", "path", "bytes"), rows)),
        }
    )


def _benchmark_table(paths: CurationPaths) -> str | None:
    """benchmark_report's table for the model cards, when it has been materialized."""
    report = paths.stage_dir("benchmark_report") / "report.json"
    if not report.exists():
        return None
    rows = [(r["label"], "llama.cpp" if r["peer"] else "Frugal", f"{r['perplexity']:.1f}",
             f"{r['output_tokens_per_s']:.0f}", f"{r['output_usd_per_1m']:.4f}")
            for r in json.loads(report.read_text())["rows"]]  # fmt: skip
    return "From benchmark_report's cost waterfall:\n\n" + md_table(
        ("configuration", "engine", "perplexity", "output tokens/s", "$ per 1M output tokens"), rows
    )


def _bytes(path: Path) -> str:
    return (
        f"{sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.is_dir() else path.stat().st_size:,}"
    )


@dg.asset_check(asset=exported_model, description="Each Hugging Face export computes its run's logits (held-out rows).")
def exports_match_frugal(paths: CurationPaths) -> dg.AssetCheckResult:
    """transformers loads each export from disk; its fp32 logits on 4 validation rows are compared with Frugal's
    own forward: the largest difference relative to the largest logit must stay under 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.io import load_model
    from training.data import run_validation_rows

    rows, worst = [], 0.0
    for name in EXPORTED_RUNS:
        run = paths.stage_dir(name)
        tokens = torch.cat(list(run_validation_rows(run).values()))[:4, :-1]
        frugal = load_model(run).eval()
        hf = AutoModelForCausalLM.from_pretrained(paths.stage_dir("exported_model") / name / "hf").eval()
        with torch.no_grad():
            want, got = frugal(tokens).float(), hf(tokens).logits.float()
        diff = ((got - want).abs().max() / want.abs().max()).item()
        worst = max(worst, diff)
        rows.append((name, type(hf).__name__, f"{diff:.2e}"))
    return dg.AssetCheckResult(
        passed=worst < 1e-4,
        metadata={"max_relative_difference": worst,
                  "models": dg.MetadataValue.md(md_table(("model", "architecture", "max |diff| / max |logit|"), rows))},
    )  # fmt: skip


class InferencePackageConfig(dg.Config):
    """The release: which quantized target and draft to ship, and how to serve them."""

    name: str = "frugal-small-cpu"
    version: str = "0.1.0"
    scheme: str = "best"
    """int8 or int4: the quantized_model folder shipped; best: whichever of the two benchmark_report's waterfall
    found cheaper per output token."""
    kv_cache: str = "fp32"
    """fp32, int8 (per token) or int8-channel: what frugal-serve uses by default."""
    gamma: int = 4
    include_draft: bool | None = None
    """Ship the draft model: None (auto) ships it only when the target has no MTP modules, which then propose
    speculative tokens themselves (frugal-serve --proposer draft still needs one)."""
    releases_dir: str = "releases"
    hf_repo: str | None = None
    """A Hugging Face Hub model repository to push the release folder to, when HF_TOKEN is set."""


def model_card(name: str, version: str, meta: dict, paths: CurationPaths) -> str:
    """MODEL_CARD.md: what the model is, its data lineage and training run, quantization, benchmark, use."""
    from inference.runtime.package import sha256

    shards = paths.stage_dir("curriculum_shards") / "manifest.json"
    train = json.loads((paths.stage_dir("moe_model") / "summary.json").read_text())
    config = json.loads((paths.stage_dir("moe_model") / "config.json").read_text())["model"]
    quant = json.loads((paths.stage_dir("quantized_model") / "report.json").read_text())
    report_md = paths.stage_dir("benchmark_report") / "report.md"
    quality = [(r["label"], f"{r['perplexity']:.3f}", f"{r['delta_pct']:+.3f}%") for r in quant["rows"]]
    from inference.release import wheel_name

    wheel = f"{wheel_name(name)}-{version}-py3-none-any.whl"
    depth = config.get("mtp_depth", 0)
    if meta["proposer"] == "mtp":
        speculation = f"its own {depth} multi-token-prediction module(s) (DeepSeek-V3's MTP)"
    else:
        speculation = f"a small dense draft model (gamma {meta['gamma']})"
    helpers = []
    if depth:
        helpers.append(f"- MTP: {depth} module(s) trained with the target (each one block, sharing its embedding and "
                       "head), shipped in its weights; they propose the speculative tokens.")  # fmt: skip
    if meta["draft"]:
        helpers.append("- Draft: a dense model trained on the same shards with the same tokenizer, distilled from the "
                       "target" + (" (frugal-serve --proposer draft)." if depth else "."))  # fmt: skip
    return f"""# {name} {version}

A DeepSeek-style Mixture-of-Experts language model built by Frugal, quantized to {meta["scheme"].upper()} and
served with speculative decoding by {speculation}, with an
{meta["kv_cache"]} KV cache. Context: {config["max_seq_len"]} tokens; vocabulary: {config["vocab_size"]}.

- Target: {config["n_layers"]} layers, d_model {config["d_model"]}, {config["n_routed_experts"]} routed experts
  (top-{config["top_k"]}) + {config["n_shared_experts"]} shared; {train["total_params"]:,} parameters,
  {train["active_params"]:,} active per token.
{chr(10).join(helpers)}

## Data lineage

- Curated shards: `curriculum_shards/manifest.json` sha256 `{sha256(shards)}`.
- Training run `moe_model`: {train["step"]} steps, {train["tokens"]:,} tokens, validation loss {train["val_loss"]:.3f},
  spend ${train["spend_usd"]:.4f}; W&B run `{Path(train.get("wandb_run") or "-").name}`.

## Quantization (validation perplexity, {quant["val_tokens"]:,} held-out tokens)

{md_table(("format", "val ppl", "vs fp32"), quality)}

## Benchmark

{report_md.read_text() if report_md.exists() else "(benchmark_report not materialized)"}

## Use

```bash
pip install {wheel}
frugal-serve --port 8000            # OpenAI-compatible API on 127.0.0.1:8000
lm_eval --model frugal --model_args package=PATH/package --tasks ...
```

```python
from inference.runtime.package import load_package
package = load_package(PATH)        # verifies every file against manifest.json
```

Limitations: a small research model trained for minutes on a CPU; it is not useful for real text.
"""


@dg.asset(
    group_name=GROUP,
    kinds={"python", "wandb"},
    deps=[quantized_model, benchmark_report, exported_model],
    description="The published release: a package folder (quantized target and draft, tokenizer, configs, "
    "MODEL_CARD.md, manifest.json with every file's sha256), a pip-installable wheel with the inference runtime "
    "and `frugal-serve`, and a .tar.gz, under releases/<name>-<version>/; logged as a W&B artifact. With hf_repo and "
    "HF_TOKEN set, the Hugging Face export of moe_model is pushed to the Hub, the release beside it.",
)
def inference_package(
    context: dg.AssetExecutionContext, config: InferencePackageConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    import os

    from inference.release import assemble, build_wheel, tarball
    from inference.runtime.kv_cache import KV_CACHES

    if config.scheme not in ("int8", "int4", "best") or config.kv_cache not in KV_CACHES:
        raise dg.Failure(description=f"scheme must be int8, int4 or best, and kv_cache one of {KV_CACHES}")
    checks = blocking_checks_passed(context)
    scheme = config.scheme
    if scheme == "best":
        scheme = json.loads((paths.stage_dir("benchmark_report") / "report.json").read_text())["scheme"]
        context.log.info(f"shipping {scheme}: the cheaper quantized format per token in benchmark_report")
    source = paths.stage_dir("quantized_model") / scheme
    if not (source / "target" / WEIGHTS_FILE).exists():
        raise dg.Failure(description=f"{source / 'target' / WEIGHTS_FILE}: missing: materialize quantized_model")
    depth = json.loads((source / "target" / "config.json").read_text())["model"].get("mtp_depth", 0)
    include_draft = config.include_draft if config.include_draft is not None else not depth
    draft_dir = source / "draft" if include_draft else None
    if include_draft and not (source / "draft" / WEIGHTS_FILE).exists():
        raise dg.Failure(description=f"{source / 'draft' / WEIGHTS_FILE}: missing: materialize quantized_model")
    meta = {
        "name": config.name,
        "version": config.version,
        "scheme": scheme,
        "kv_cache": config.kv_cache,
        "gamma": config.gamma,
        "proposer": "mtp" if depth else "draft" if include_draft else "none",
        "draft": include_draft,
        "source": {"quantized_model": str(source), "dagster_run": context.run_id},
    }
    release = Path(config.releases_dir) / f"{config.name}-{config.version}"
    package_dir = release / "package"
    manifest = assemble(
        package_dir, source / "target", draft_dir, meta, model_card(config.name, config.version, meta, paths)
    )
    context.log.info(f"package folder {package_dir}: {len(manifest['files'])} files; building the wheel ...")
    wheel = build_wheel(package_dir, release, paths.stage_dir("inference_package"))
    tar = tarball(package_dir, release)
    hub = "not configured (hf_repo)"
    if config.hf_repo and os.environ.get("HF_TOKEN"):
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ["HF_TOKEN"])
        api.create_repo(config.hf_repo, exist_ok=True)
        message = f"{config.name} {config.version}"
        # the repository's root is the Hugging Face export (what transformers, vLLM and SGLang load); the
        # Frugal release (package, wheel, tarball) goes beside it under frugal-release/
        hf_folder = paths.stage_dir("exported_model") / "moe_model" / "hf"
        if hf_folder.exists():
            api.upload_folder(repo_id=config.hf_repo, folder_path=str(hf_folder), commit_message=message)
        api.upload_folder(repo_id=config.hf_repo, folder_path=str(release), path_in_repo="frugal-release",
                          commit_message=message)  # fmt: skip
        hub = f"pushed to https://huggingface.co/{config.hf_repo}"
        if not hf_folder.exists():
            hub += " (the release only: exported_model is not materialized)"
    elif config.hf_repo:
        hub = "skipped: HF_TOKEN is not set"
    files = [(name, f"{entry['bytes']:,}", entry["sha256"][:16]) for name, entry in manifest["files"].items()]
    artifact = (config.name, "model", [package_dir, wheel, tar])
    run_dir = wandb.log_run(context, "release", {"files": len(files)}, config=meta, artifact=artifact)
    metadata = {
        "release": dg.MetadataValue.path(str(release.resolve())),
        "wheel": dg.MetadataValue.path(str(wheel.resolve())),
        "tarball": dg.MetadataValue.path(str(tar.resolve())),
        "wheel_bytes": wheel.stat().st_size,
        "manifest": dg.MetadataValue.md(md_table(("file", "bytes", "sha256 (first 16)"), files)),
        "model_card": dg.MetadataValue.md((package_dir / "MODEL_CARD.md").read_text()),
        "hugging_face_hub": hub,
        "blocking_checks": dg.MetadataValue.json(checks),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


INFERENCE_CHECKS = [quantization_within_budget, speculative_greedy_is_identical]
EXPORT_CHECKS = [exports_match_frugal]
