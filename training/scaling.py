"""Dense scaling: the dense model as good as the MoE model, found by training dense models of several sizes
and fitting held-out loss against parameters (DeepSeekMoE's dense-equivalent measurement).

CLI: python -m training.scaling --config FILE (JSON or TOML, see ScalingConfig; unknown keys are errors)

1. **Sizes.** Dense models (a dense SwiGLU in every layer) whose feed-forward width is each of `d_ff`
   (default: the MoE's equal-active-parameter twin, model.config.dense_baseline, times `multipliers`). Every
   other field, and the data, token budget, seed and learning-rate schedule, are the MoE run's own
   (its train_config.json). Each is a real training process (training.launch.train_process).
2. **Seed noise.** The size `noise_size` (an index into the sizes) is trained again with each of
   `noise_seeds`; the noise is the sample standard deviation of the held-out losses at that size.
3. **Fit.** Held-out loss = a + b ln N over the sizes, N = non-embedding parameters (log-linear: over a
   range this narrow a power law's curvature is not measurable), by least squares, with residuals.
4. **Match.** The MoE's held-out loss must lie within the losses the sizes reached: otherwise the study
   says which loss range it covered and stops (`bracketed` false); it never extrapolates. Inside the range,
   the fit gives N*, rounded to a feed-forward width that is a multiple of `round_to`; that
   `equal_quality_dense` model is trained. It matches when its loss is within `noise_sigmas` standard
   deviations of the MoE's. When it does not, the study names the nearest trained sizes on both sides of the
   MoE's loss and the weight that interpolates between them (in ln N), for costs to be interpolated.
5. **Multiplier.** The dense-equivalent multiplier: N* over the MoE's active non-embedding parameters (what a
   token computes in each), and the same with embeddings counted.

Held-out loss is each run's `val_loss` (training's own validation: the mean over curriculum buckets of the
loss on rows hashed out of training), which is the same held-out set for every run of one data folder.

Writes into `out_dir`: runs/<name>/ (one training run per size and seed), results.json, results.md and
scaling.png (held-out loss against parameters: the sizes, the seeds, the fit, the MoE and the match).
A finished run whose saved config is the one wanted is reused, so a study that stopped continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ModelConfig, dense_baseline
from model.io import atomic_file, md_table, write_text_atomic
from training.config import CONFIG_FILE, TrainConfig, config_from_file
from training.launch import SUMMARY_FILE, train_process

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "scaling.png"
EQUAL_QUALITY = "equal_quality_dense"


@dataclass(kw_only=True, slots=True)
class ScalingConfig:
    moe_run: str = "data/moe_model"
    """The trained MoE run folder: its train_config.json is copied for every dense run, its summary.json gives
    the held-out loss to match."""
    out_dir: str = "runs/dense_scaling"
    d_ff: list[int] | None = None
    """Feed-forward widths of the dense sizes; None = the equal-active twin's width times `multipliers`."""
    multipliers: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    noise_size: int | None = 1
    """Index into the sizes of the one trained again with `noise_seeds`; None = every size is, and the fit reads
    each size's mean over its seeds (whose noise is the per-run seed noise over the square root of the seeds)."""
    noise_seeds: list[int] = field(default_factory=lambda: [1])
    noise_sigmas: float = 2.0
    """equal_quality_dense matches when |its loss - the MoE's| <= noise_sigmas x the seed noise."""
    round_to: int = 64
    """equal_quality_dense's width is a multiple of this (INT4 groups and GGUF blocks need one)."""
    max_steps: int | None = None
    """Override of the MoE run's steps (tests); None = the same token budget as the MoE."""
    target_loss: float | None = None
    """A held-out loss to match instead of the MoE's (a quality target); None = the MoE's own."""

    def check(self) -> None:
        sizes = self.d_ff if self.d_ff is not None else self.multipliers
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"d_ff/multipliers: at least 2 positive sizes are needed, got {sizes}")
        if self.noise_size is not None and not 0 <= self.noise_size < len(sizes):
            raise ValueError(f"noise_size={self.noise_size} is not an index into the {len(sizes)} sizes")
        if not self.noise_seeds:
            raise ValueError("noise_seeds: at least one more seed is needed to measure the seed noise")
        if self.round_to < 1 or self.noise_sigmas <= 0:
            raise ValueError(f"round_to ({self.round_to}) and noise_sigmas ({self.noise_sigmas}) must be positive")
        if not (Path(self.moe_run) / CONFIG_FILE).exists() or not (Path(self.moe_run) / SUMMARY_FILE).exists():
            raise ValueError(
                f"moe_run={self.moe_run}: no finished training run ({CONFIG_FILE} and {SUMMARY_FILE}): train it first"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> ScalingConfig:
        def build(doc: dict) -> ScalingConfig:
            unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}")
            return cls(**doc)

        return config_from_file(build, path)


def embedding_params(model: ModelConfig) -> int:
    return model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)


def non_embedding_params(model: ModelConfig) -> int:
    """Parameters a token computes with (active ones for an MoE), embeddings excluded."""
    return model.active_params() - embedding_params(model)


def dense_config(moe: ModelConfig, d_ff: int) -> ModelConfig:
    return dataclasses.replace(dense_baseline(moe), d_ff=int(d_ff))


def d_ff_for(moe: ModelConfig, params: float, round_to: int) -> int:
    """The feed-forward width (a multiple of round_to, at least round_to) whose dense model has about
    `params` non-embedding parameters."""
    base = non_embedding_params(dense_config(moe, 0))
    per_unit = 3 * moe.d_model * moe.n_layers
    return max(round_to, round((params - base) / per_unit / round_to) * round_to)


def fit_log_linear(params: list[float], losses: list[float]) -> dict:
    """Least squares of loss = a + b ln N; the coefficients and residuals."""
    xs = [math.log(n) for n in params]
    mx, my = statistics.fmean(xs), statistics.fmean(losses)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx
    a = my - b * mx
    residuals = [y - (a + b * x) for x, y in zip(xs, losses)]
    return {
        "a": a,
        "b": b,
        "residuals": residuals,
        "rms_residual": math.sqrt(statistics.fmean(r * r for r in residuals)),
    }


def params_at_loss(fit: dict, loss: float) -> float:
    return math.exp((loss - fit["a"]) / fit["b"])


def bracket(points: list[dict], loss: float) -> dict | None:
    """The nearest trained sizes on both sides of `loss` (one above it, one at or below it) and the weight in
    ln N that interpolates between them; None when no pair brackets it."""
    above = [p for p in points if p["val_loss"] > loss]
    below = [p for p in points if p["val_loss"] <= loss]
    if not above or not below:
        return None
    hi, lo = min(above, key=lambda p: p["val_loss"]), max(below, key=lambda p: p["val_loss"])
    weight = (hi["val_loss"] - loss) / (hi["val_loss"] - lo["val_loss"])  # 0 at hi, 1 at lo
    log_n = (1 - weight) * math.log(hi["params"]) + weight * math.log(lo["params"])
    return {"worse": hi["name"], "better": lo["name"], "weight_better": weight, "params": math.exp(log_n)}


def run_config(
    moe_run: Path, name: str, model: ModelConfig, seed: int, out: Path, max_steps: int | None
) -> TrainConfig:
    """The MoE run's config with a dense model, a seed and a run folder of its own."""
    doc = json.loads((moe_run / CONFIG_FILE).read_text())
    doc |= {"name": name, "run_dir": str(out / "runs" / name), "seed": seed, "ep_size": 1, "distill_from": None}
    if max_steps is not None:
        doc["max_steps"] = max_steps
    doc["model"] = dataclasses.asdict(model)
    return TrainConfig.from_dict(doc)


def finished(cfg: TrainConfig) -> bool:
    """The run folder holds a finished run of this config (its folder named relatively or absolutely)."""
    run = Path(cfg.run_dir)
    if not (run / SUMMARY_FILE).exists() or not (run / CONFIG_FILE).exists():
        return False
    saved, wanted = json.loads((run / CONFIG_FILE).read_text()), cfg.to_dict()
    return saved | {"run_dir": None} == wanted | {"run_dir": None} and Path(saved["run_dir"]).resolve() == run.resolve()


def train_point(cfg: TrainConfig, env: dict[str, str], progress: Callable[[str], None]) -> dict:
    """Train (or reuse a finished run of the same config); the point for the fit."""
    started = time.monotonic()
    reused = finished(cfg)
    if not reused:
        train_process(cfg, env)
    summary = json.loads((Path(cfg.run_dir) / SUMMARY_FILE).read_text())
    point = {
        "name": cfg.name,
        "d_ff": cfg.model.d_ff,
        "seed": cfg.seed,
        "params": non_embedding_params(cfg.model),
        "total_params": cfg.model.total_params(),
        "val_loss": summary["val_loss"],
        "tokens": summary["tokens"],
        "spend_usd": summary["spend_usd"],
        "run_dir": cfg.run_dir,
        "wandb_run": summary.get("wandb_run"),
    }
    how = "reused" if reused else f"trained in {time.monotonic() - started:.0f}s"
    progress(f"{cfg.name}: d_ff {cfg.model.d_ff}, {point['params']:,} non-embedding parameters, "
             f"held-out loss {point['val_loss']:.4f} ({how})")  # fmt: skip
    return point


def run_scaling(
    config: ScalingConfig, env: dict[str, str] | None = None, progress: Callable[[str], None] = print
) -> dict:
    """Train the sizes, the seeds and equal_quality_dense; fit; write results.json, results.md and the plot."""
    config.check()
    env = env or {}
    moe_run, out = Path(config.moe_run), Path(config.out_dir)
    moe_cfg = TrainConfig.from_dict(json.loads((moe_run / CONFIG_FILE).read_text()))
    moe_summary = json.loads((moe_run / SUMMARY_FILE).read_text())
    moe = moe_cfg.model
    moe_loss = moe_summary["val_loss"] if config.target_loss is None else config.target_loss
    twin = dense_baseline(moe).d_ff
    widths = config.d_ff or [max(1, round(twin * m)) for m in config.multipliers]
    seed = moe_cfg.seed

    def cfg(name: str, d_ff: int, s: int) -> TrainConfig:
        return run_config(moe_run, name, dense_config(moe, d_ff), s, out, config.max_steps)

    progress(f"MoE {moe_run}: held-out loss {moe_loss:.4f}, {non_embedding_params(moe):,} active non-embedding "
             f"parameters; dense sizes d_ff {widths} (twin {twin}), seed {seed}")  # fmt: skip
    points = [train_point(cfg(f"dense_dff{w}", w, seed), env, progress) for w in widths]
    repeated = range(len(widths)) if config.noise_size is None else [config.noise_size]
    replicas = {i: [points[i]] + [train_point(cfg(f"dense_dff{widths[i]}_seed{s}", widths[i], s), env, progress)
                                  for s in config.noise_seeds] for i in repeated}  # fmt: skip
    seeds = [run for runs in replicas.values() for run in runs]
    # the seed noise: the pooled sample standard deviation over the sizes trained at several seeds
    noise = math.sqrt(statistics.fmean(statistics.variance(p["val_loss"] for p in runs) for runs in replicas.values()))
    if config.noise_size is None:  # every size at every seed: the fit reads each size's mean over its seeds
        points = [{**runs[0], "val_loss": statistics.fmean(p["val_loss"] for p in runs), "seeds_averaged": len(runs)}
                  for runs in replicas.values()]  # fmt: skip
    tolerance = config.noise_sigmas * noise
    fit = fit_log_linear([p["params"] for p in points], [p["val_loss"] for p in points])
    losses = [p["val_loss"] for p in points]
    covered = [min(losses), max(losses)]
    results: dict = {
        "config": dataclasses.asdict(config),
        "moe": {"run_dir": str(moe_run), "val_loss": moe_loss, "own_val_loss": moe_summary["val_loss"],
                "params": non_embedding_params(moe),
                "active_params": moe.active_params(), "total_params": moe.total_params(),
                "tokens": moe_summary["tokens"]},
        "points": points,
        "seeds": seeds,
        "seed_noise": noise,
        "tolerance": tolerance,
        "fit": fit,
        "covered_loss": covered,
        "bracketed": covered[0] <= moe_loss <= covered[1] and fit["b"] < 0,
    }  # fmt: skip
    if not results["bracketed"]:
        results["reason"] = (
            f"the dense sizes reached held-out losses {covered[0]:.4f} to {covered[1]:.4f}, which do not bracket the "
            f"MoE's {moe_loss:.4f}"
            + ("" if fit["b"] < 0 else " (and loss does not fall with size)")
            + "; nothing is extrapolated"
        )
        steps = moe_cfg.max_steps if config.max_steps is None else config.max_steps
        results["to_establish"] = to_establish(results, widths, twin, steps)
        progress(f"equal quality not established: {results['reason']}. To establish it: {results['to_establish']}")
    else:
        target = params_at_loss(fit, moe_loss)
        width = d_ff_for(moe, target, config.round_to)
        equal = train_point(cfg(EQUAL_QUALITY, width, seed), env, progress)
        matched = abs(equal["val_loss"] - moe_loss) <= tolerance
        results["equal_quality"] = {
            **equal,
            "fit_params": target,
            "matched": matched,
            "loss_gap": equal["val_loss"] - moe_loss,
            "multiplier": target / non_embedding_params(moe),
            # the multiplier at the MoE's loss +- one seed-noise standard deviation: how well the fit pins it down
            "multiplier_range": sorted(
                params_at_loss(fit, moe_loss + d) / non_embedding_params(moe) for d in (-noise, noise)
            ),
            "multiplier_with_embeddings": (target + embedding_params(moe)) / moe.active_params(),
            "bracket": None if matched else bracket([*points, equal], moe_loss),
        }
        progress(
            f"{EQUAL_QUALITY}: d_ff {width}, held-out loss {equal['val_loss']:.4f} against the MoE's {moe_loss:.4f} "
            f"({'within' if matched else 'outside'} {config.noise_sigmas:g} sigma = {tolerance:.4f}); dense-equivalent "
            f"multiplier {results['equal_quality']['multiplier']:.2f}x"
        )
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / PLOT_FILE)
    write_text_atomic(out / TABLE_FILE, markdown(results))
    write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results


def to_establish(results: dict, widths: list[int], twin: int, steps: int) -> str:
    """What a study that did not bracket the MoE's loss would need (sizes, steps, seeds), in words, from what
    it saw: loss that does not fall with size means the larger sizes are undertrained at this token budget;
    a MoE beyond one end needs sizes on that side; seed noise as large as the spread needs more seeds."""
    fit, (low, high), moe = results["fit"], results["covered_loss"], results["moe"]["val_loss"]
    advice = []
    if fit["b"] >= 0:
        advice.append(f"more steps than {steps} (about 4x: held-out loss does not fall with size at this budget, so "
                      "the larger sizes are undertrained), or smaller sizes (multipliers below 1)")  # fmt: skip
    if moe < low:
        advice.append(f"larger sizes than d_ff {max(widths)} (e.g. multipliers up to {2 * max(widths) / twin:.3g} of "
                      f"the equal-active twin's d_ff {twin})")  # fmt: skip
    elif moe > high:
        advice.append(f"smaller sizes than d_ff {min(widths)} (e.g. multiplier {min(widths) / twin / 2:.3g} of the "
                      f"equal-active twin's d_ff {twin})")  # fmt: skip
    if results["seed_noise"] >= (high - low) / 2:
        advice.append(f"more seeds (noise_seeds): the seed noise {results['seed_noise']:.4f} is at least half the "
                      f"spread between sizes ({high - low:.4f})")  # fmt: skip
    return "; ".join(advice) or "sizes on the missing side of the MoE's loss"


def equal_quality_run(results: dict) -> str:
    """The run folder a benchmark should use as the equal-quality dense model (ValueError when the study did not
    find one)."""
    if not results.get("bracketed"):
        raise ValueError(results.get("reason", "the dense sizes do not bracket the MoE's loss"))
    return results["equal_quality"]["run_dir"]


TABLE_COLUMNS = ("run", "d_ff", "seed", "non-embedding params", "held-out loss", "fit residual")


def table_rows(results: dict) -> list[tuple]:
    fit, rows = results["fit"], []
    base_seed, averaged = results["points"][0]["seed"], results["points"][0].get("seeds_averaged")
    for p in [
        *results["points"],
        *(s for s in results["seeds"] if s["seed"] != base_seed or averaged),  # every run, where sizes are means
        *([results["equal_quality"]] if "equal_quality" in results else []),
    ]:
        predicted = fit["a"] + fit["b"] * math.log(p["params"])
        mean = p.get("seeds_averaged")
        name, seed = (f"{p['name']} (mean)", f"mean of {mean}") if mean else (p["name"], str(p["seed"]))
        rows.append((name, str(p["d_ff"]), seed, f"{p['params']:,}", f"{p['val_loss']:.4f}",
                     f"{p['val_loss'] - predicted:+.4f}"))  # fmt: skip
    moe = results["moe"]
    rows.append(("moe_model (active)", "-", "-", f"{moe['params']:,}", f"{moe['val_loss']:.4f}", "-"))
    return rows


def seed_list(results: dict) -> str:
    return ", ".join(str(s) for s in sorted({p["seed"] for p in results["seeds"]}))


def markdown(results: dict) -> str:
    fit = results["fit"]
    lines = [
        md_table(TABLE_COLUMNS, table_rows(results)),
        "",
        f"Fit: held-out loss = {fit['a']:.4f} {fit['b']:+.4f} ln N (N: non-embedding parameters), rms residual "
        f"{fit['rms_residual']:.4f}. Seed noise (pooled standard deviation over the seeds {seed_list(results)} at d_ff "
        f"{', '.join(sorted({str(p['d_ff']) for p in results['seeds']}, key=int))}): {results['seed_noise']:.4f}"
        + (" per run; the fit reads each size's mean over its seeds." if results["points"][0].get("seeds_averaged")
           else "."),
    ]
    if not results["bracketed"]:
        lines.append(f"**Equal quality not established:** {results['reason']}. To establish it: "
                     f"{results.get('to_establish', 'sizes on the missing side')}.")
        return "\n".join(lines) + "\n"
    eq = results["equal_quality"]
    lines.append(
        f"The MoE's held-out loss {results['moe']['val_loss']:.4f} is reached by a dense model of "
        f"{eq['fit_params']:,.0f} non-embedding parameters: **{eq['multiplier']:.2f}x** the MoE's active ones "
        f"({eq['multiplier_with_embeddings']:.2f}x with embeddings; {eq['multiplier_range'][0]:.2f}x to "
        f"{eq['multiplier_range'][1]:.2f}x within one standard deviation of seed noise). "
        f"{EQUAL_QUALITY} (d_ff {eq['d_ff']}) reached "
        f"{eq['val_loss']:.4f}, {eq['loss_gap']:+.4f} from the MoE: "
        + ("within" if eq["matched"] else "outside")
        + f" {results['config']['noise_sigmas']:g} sigma of seed noise ({results['tolerance']:.4f})."
    )
    if eq["bracket"]:
        b = eq["bracket"]
        lines.append(f"Nearest sizes on both sides: {b['worse']} (worse) and {b['better']} (better); the MoE's loss "
                     f"sits at weight {b['weight_better']:.2f} towards {b['better']} in ln N.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = results["points"]
    averaged = pts[0].get("seeds_averaged")
    ax.scatter([p["params"] for p in pts], [p["val_loss"] for p in pts], color="tab:blue", zorder=3,
               label=f"dense sizes (mean of {averaged} seeds)" if averaged else "dense sizes")  # fmt: skip
    extra = [s for s in results["seeds"] if s["seed"] != pts[0]["seed"] or averaged]
    ax.scatter([p["params"] for p in extra], [p["val_loss"] for p in extra], color="tab:blue", marker="x",
               label="each seed" if averaged else "other seeds", zorder=3)  # fmt: skip
    fit = results["fit"]
    lo, hi = min(p["params"] for p in pts), max(p["params"] for p in pts)
    xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    ax.plot(xs, [fit["a"] + fit["b"] * math.log(x) for x in xs], color="tab:blue", alpha=0.5,
            label=f"fit: {fit['a']:.3f} {fit['b']:+.3f} ln N")  # fmt: skip
    moe = results["moe"]
    ax.axhline(moe["val_loss"], color="tab:red", linestyle="--", alpha=0.6, label="MoE held-out loss")
    ax.axhspan(
        moe["val_loss"] - results["tolerance"], moe["val_loss"] + results["tolerance"], color="tab:red", alpha=0.08
    )
    ax.scatter([moe["params"]], [moe["val_loss"]], color="tab:red", marker="D", label="MoE (active params)", zorder=3)
    if "equal_quality" in results:
        eq = results["equal_quality"]
        ax.scatter([eq["params"]], [eq["val_loss"]], color="tab:green", marker="*", s=160, zorder=4,
                   label=f"{EQUAL_QUALITY} ({eq['multiplier']:.2f}x)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters (active per token)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Dense scaling: the dense model as good as the MoE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="scaling config (JSON or TOML, see ScalingConfig)")
    args = parser.parse_args(argv)
    try:
        config = ScalingConfig.from_file(args.config)
        config.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    sizes, seeds = len(config.d_ff or config.multipliers), len(config.noise_seeds)
    n = (sizes * (1 + seeds) if config.noise_size is None else sizes + seeds) + 1
    with tqdm(total=n, unit="run", desc="dense scaling") as bar:

        def progress(line: str) -> None:
            if line.startswith(("dense_", EQUAL_QUALITY)):
                bar.update(1)
            bar.write(line)

        results = run_scaling(config, progress=progress)
    print(markdown(results))
    return 0 if results["bracketed"] else 1


if __name__ == "__main__":
    sys.exit(main())
