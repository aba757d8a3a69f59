"""Inference assets: quantized_model (INT8 and INT4 target and draft, per-channel KV scales, and what
quantization costs in validation perplexity), benchmark_report (the dense baseline against the MoE model's
formats: quality, speed, memory, $ per 1M tokens), exported_model (Hugging Face and GGUF exports for other
engines) and inference_package (the published release)."""

import json
from pathlib import Path

import dagster as dg

from assets.metadata import md_table, png_md
from assets.resources import CurationPaths, WandbResource
from assets.training import TRAINING_CHECKS, dense_baseline_model, draft_model, moe_model
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
    description="The quantized target decodes the same greedy tokens with and without the quantized draft. "
    "Blocking: a model whose speculation changes its output is not benchmarked or published (and the "
    "benchmark does not share the CPU with this check).",
    blocking=True,
)
def speculative_greedy_is_identical(paths: CurationPaths) -> dg.AssetCheckResult:
    import torch

    from inference.runtime.generate import Generator, SamplingConfig
    from inference.runtime.speculative import SpeculativeGenerator
    from training.data import run_validation_rows

    folder: Path = paths.stage_dir("quantized_model")
    rows = torch.cat(list(run_validation_rows(paths.stage_dir("moe_model")).values()))
    prompts = [row[:12].tolist() for row in rows[:3]]
    cfg = SamplingConfig(max_new_tokens=24)
    metadata, identical = {}, True
    for scheme in ("int8", "int4"):
        target = Generator.from_run(folder / scheme / "target")
        spec = SpeculativeGenerator(target, Generator.from_run(folder / scheme / "draft"))
        same = all(target.generate_ids(p, cfg) == spec.generate_ids(p, cfg) for p in prompts)
        identical &= same
        metadata[f"{scheme}_identical"] = same
        metadata[f"{scheme}_acceptance_rate"] = spec.stats.acceptance_rate
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
            if target is None or target.storage_id != latest[0].storage_id:
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
    """What the benchmark measures and what a device-hour costs."""

    cpu_price_per_hour: float = 0.05
    """$ per hour of the CPU machine the benchmark runs on (the training spend meter's default)."""
    gpu_price_per_hour: float = 2.50
    """$ per GPU-hour, used when the benchmark runs on a GPU."""
    prompts: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 48
    gamma: int = 4


def report_configs(paths: CurationPaths):
    from inference.benchmark import Config

    q = paths.stage_dir("quantized_model")
    draft = str(paths.stage_dir("draft_model"))
    return [
        Config("dense fp32", str(paths.stage_dir("dense_baseline_model"))),
        Config("moe fp32", str(paths.stage_dir("moe_model")), draft),
        Config("moe int8", str(q / "int8" / "target"), str(q / "int8" / "draft")),
        Config("moe int4", str(q / "int4" / "target"), str(q / "int4" / "draft")),
    ]


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch"},
    deps=[dense_baseline_model, quantized_model],
    description="The dense fp32 baseline against the MoE model in fp32, INT8 and INT4, each plain and "
    "speculative, on held-out curated data: perplexity, bits per byte, tokens/s, p50/p95 latency per token, "
    "time to first token, peak memory, acceptance rate and $ per 1M generated tokens; the cost ratio of the "
    "cheapest config of equal or better quality against the baseline.",
)
def benchmark_report(
    context: dg.AssetExecutionContext, config: BenchmarkReportConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    import torch

    from inference import benchmark
    from training.data import run_validation_rows

    checks = blocking_checks_passed(context)
    configs = report_configs(paths)
    for c in configs:
        for folder in filter(None, (c.target, c.draft)):
            if not (Path(folder) / WEIGHTS_FILE).exists():
                raise dg.Failure(description=f"{Path(folder) / WEIGHTS_FILE}: missing: materialize it first")
    rows = torch.cat(list(run_validation_rows(paths.stage_dir("moe_model")).values()))
    step = max(1, len(rows) // config.prompts)
    prompts = [row[: config.prompt_tokens].tolist() for row in rows[::step][: config.prompts]]
    workload = benchmark.Workload(rows, prompts, config.new_tokens, config.gamma)
    out = paths.stage_dir("benchmark_report")
    results = benchmark.run(configs, workload, out, log=context.log.info)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    price = config.gpu_price_per_hour if device == "gpu" else config.cpu_price_per_hour
    table = benchmark.rows(results, price)
    best = benchmark.best_against_baseline(table, "dense fp32")
    cells = [benchmark.report_cells(r) for r in table]
    markdown = md_table(benchmark.REPORT_COLUMNS, cells)
    headline = (
        f"**{best['best']}** costs ${best['best_usd_per_1m']:.4f} per 1M generated tokens against "
        f"${best['baseline_usd_per_1m']:.4f} for the {best['baseline']} baseline, at equal or better perplexity: "
        f"the baseline costs **{best['cost_ratio']:.2f}x** as much per token (target: at least 10x)."
    )
    note = (
        f"batch 1, greedy, {len(prompts)} held-out prompts x {config.new_tokens} new tokens, gamma {config.gamma}, "
        f"{rows[:, 1:].numel():,} held-out tokens for perplexity; {device.upper()} at ${price}/hour, "
        f"{results[configs[0].label]['threads']} threads. Latency per token is the gap between streamed tokens: "
        "a speculative round's accepted tokens arrive together, hence its p50 near 0."
    )
    chart = benchmark.chart(table, out / "benchmark.png", "Frugal: cost and quality per served configuration")
    report = {"device": device, "price_per_hour": price, "best": best, "rows": table, "note": note}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", f"{headline}\n\n{markdown}\n\n{note}\n")
    # The repository's benchmark record is a tracked file, which an asset never edits: this is for a person to paste.
    command = "make demo  # the benchmark_report asset (or: dagster asset materialize --select benchmark_report)"
    write_text_atomic(
        out / "BENCHMARKS_section.md",
        f"## Benchmark report: dense baseline vs MoE formats (`benchmark_report` asset)\n\n```bash\n{command}\n```"
        f"\n\n{note}\n\n{markdown}\n\n{headline}\n",
    )
    summary = {"cost_ratio": best["cost_ratio"], "best_usd_per_1m": best["best_usd_per_1m"]}
    summary |= {f"usd_per_1m/{r['config']}/{r['decoding']}": r["usd_per_1m_tokens"] for r in table}
    run_dir = wandb.log_run(
        context,
        "benchmark",
        summary,
        tables={"benchmark": (benchmark.REPORT_COLUMNS, cells)},
        images={"benchmark_chart": chart},
        config=config.model_dump(),
    )
    metadata = {
        "headline": dg.MetadataValue.md(headline),
        "table": dg.MetadataValue.md(markdown),
        "chart": dg.MetadataValue.md(png_md(chart, "cost and quality")),
        "cost_ratio": best["cost_ratio"],
        "note": note,
        "blocking_checks": dg.MetadataValue.json(checks),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


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
    rows = [(r["config"], r["decoding"], f"{r['perplexity']:.1f}", f"{r['tokens_per_s']:.0f}",
             f"{r['usd_per_1m_tokens']:.4f}") for r in json.loads(report.read_text())["rows"]]  # fmt: skip
    return "Frugal's own engine, from benchmark_report:\n\n" + md_table(
        ("config", "decoding", "perplexity", "tokens/s", "$ per 1M tokens"), rows
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
    """int8 or int4: the quantized_model folder shipped; best: whichever of the two benchmark_report found
    cheaper per token."""
    kv_cache: str = "fp32"
    """fp32, int8 (per token) or int8-channel: what frugal-serve uses by default."""
    gamma: int = 4
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
    return f"""# {name} {version}

A DeepSeek-style Mixture-of-Experts language model built by Frugal, quantized to {meta["scheme"].upper()} and
served with speculative decoding by a small dense draft model (gamma {meta["gamma"]}), with an
{meta["kv_cache"]} KV cache. Context: {config["max_seq_len"]} tokens; vocabulary: {config["vocab_size"]}.

- Target: {config["n_layers"]} layers, d_model {config["d_model"]}, {config["n_routed_experts"]} routed experts
  (top-{config["top_k"]}) + {config["n_shared_experts"]} shared; {train["total_params"]:,} parameters,
  {train["active_params"]:,} active per token.
- Draft: a dense model trained on the same shards with the same tokenizer, distilled from the target.

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
        rows = json.loads((paths.stage_dir("benchmark_report") / "report.json").read_text())["rows"]
        quantized = [r for r in rows if r["config"] in ("moe int8", "moe int4")]
        scheme = min(quantized, key=lambda r: r["usd_per_1m_tokens"])["config"].removeprefix("moe ")
        context.log.info(f"shipping {scheme}: the cheaper quantized format per token in benchmark_report")
    source = paths.stage_dir("quantized_model") / scheme
    if not (source / "target" / WEIGHTS_FILE).exists():
        raise dg.Failure(description=f"{source / 'target' / WEIGHTS_FILE}: missing: materialize quantized_model")
    meta = {
        "name": config.name,
        "version": config.version,
        "scheme": scheme,
        "kv_cache": config.kv_cache,
        "gamma": config.gamma,
        "source": {"quantized_model": str(source), "dagster_run": context.run_id},
    }
    release = Path(config.releases_dir) / f"{config.name}-{config.version}"
    package_dir = release / "package"
    manifest = assemble(
        package_dir, source / "target", source / "draft", meta, model_card(config.name, config.version, meta, paths)
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
