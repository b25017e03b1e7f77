"""The profiling dashboard's run, headless: profile, figures, screenshot, results.

Runs what the Run button of ``notebooks/profiling_dashboard`` runs (``megafold.profile.widgets
.run_profile``): per kernels variant a warmup step and a profiled step at the chosen crop
(time and memory per AF3 module; with ``--overhead`` or on the CPU also a plain step, the
profiler's own overhead), then each
variant's longest crop: a fit of the peak memory (seeded by the profile) predicts it, a real
step verifies it, a step one grid crop longer confirms the limit where time allows; all
within one time budget for the whole run. Writes, under ``benchmarks/results/<gpu-name>/``:

    <date>-dashboard.zarr   the xarray results (``megafold.profile.load``)
    <date>-dashboard.html   every figure on one offline page (plotly.js inline)
    <date>-dashboard.png    a screenshot of that page (Chromium via playwright; else kaleido PNGs)
    <date>-dashboard.json   per variant: step time, plain step time and the profiler's overhead,
                            peak memory, data-wait share, longest crop (what it rests on, the
                            predicted one, the steps the search took)

    PYTHONPATH=. python benchmarks/dashboard_screenshot.py                 # "paper", crop 384 on a GPU
    PYTHONPATH=. python benchmarks/dashboard_screenshot.py --kernels torch triton compile
    PYTHONPATH=. python benchmarks/dashboard_screenshot.py --quick          # CPU: "tiny", one block per stack

The dashboard's target: on an H100, "paper" at crop 384, torch vs triton with the longest
crops, within two minutes (the total is printed last).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    torch.set_num_threads(1)  # CPU runs are "tiny": more threads only add overhead

from benchmarks._harness import environment, print_table, write_json  # noqa: E402
from megafold.profile import plots, save  # noqa: E402
from megafold.profile.profiler import describe_device  # noqa: E402
from megafold.profile.widgets import DashboardSettings, run_profile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DashboardSettings.for_device()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--crop", type=int, default=defaults.crop)
    parser.add_argument("--kernels", nargs="+", default=list(defaults.kernels), choices=("torch", "triton", "compile"))
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the preset's")
    parser.add_argument("--no-checkpoint", action="store_true", help="activation checkpointing off")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--quick", action="store_true", default=defaults.quick, help="one block per stack")
    parser.add_argument("--no-longest", action="store_true", help="skip the longest-crop search")
    parser.add_argument("--max-crop", type=int, default=defaults.max_crop)
    parser.add_argument(
        "--time-budget", type=float, default=defaults.time_budget_s,
        help="seconds for the whole run (profiles, then the searches share what is left)",
    )  # fmt: skip
    parser.add_argument("--overhead", action="store_true", default=defaults.overhead,
                        help="one plain step per variant: the profiler's own cost (off on a GPU: time)")
    parser.add_argument("--data", choices=("synthetic", "store"), default="synthetic")
    parser.add_argument(
        "--out", type=Path, default=None, help="results root (default benchmarks/results), files in <root>/<gpu>/"
    )
    return parser.parse_args(argv)


def page_html(figures: dict, settings: DashboardSettings, device: str, seconds: float) -> str:
    """Every figure on one self-contained page (plotly.js inline once)."""
    import plotly.io as pio

    parts = [
        pio.to_html(figure, include_plotlyjs=index == 0, full_html=False, config={"displaylogo": False})
        for index, figure in enumerate(figures.values())
    ]
    config = settings.config()
    description = html.escape(
        f"{device} | preset {settings.preset}{' (one block per stack)' if settings.quick else ''}, "
        f"crop {settings.crop}, kernels {', '.join(settings.kernels)}, {'bf16' if config.bf16 else 'fp32'}, "
        f"checkpointing {'on' if config.checkpoint else 'off'} | run took {seconds:.0f} s"
    )
    cells = "".join(f'<div style="width:50%;min-width:620px">{part}</div>' for part in parts)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>megafold profiling dashboard</title></head>"
        f"<body style='font-family:sans-serif;margin:12px'><h2>megafold profiling dashboard</h2><p>{description}</p>"
        f"<div style='display:flex;flex-wrap:wrap'>{cells}</div></body></html>"
    )


def write_png(figures: dict, page: Path, png: Path) -> str:
    """A PNG of the dashboard page (Chromium through playwright), else one PNG per figure
    (plotly + kaleido); returns how, or why there is none."""
    problems = []
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            options = {"executable_path": chromium} if chromium else {}
            browser = playwright.chromium.launch(args=["--headless", "--no-sandbox", "--disable-gpu"], **options)
            browser_page = browser.new_page(viewport={"width": 1400, "height": 1000})
            browser_page.goto(page.resolve().as_uri())
            browser_page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(figures)}", timeout=60_000
            )
            browser_page.wait_for_timeout(1000)
            browser_page.screenshot(path=str(png), full_page=True)
            browser.close()
        return f"Chromium ({chromium or 'bundled with playwright'})"
    except Exception as error:  # playwright or a browser missing
        problems.append(f"playwright: {type(error).__name__}: {error}")
    try:
        for name, figure in figures.items():
            figure.write_image(png.with_name(f"{png.stem}-{name}.png"), width=1000, height=480)
        return f"kaleido, one PNG per figure: {png.stem}-*.png"
    except Exception as error:
        problems.append(f"kaleido: {type(error).__name__}: {error}")
    return "no PNG (" + "; ".join(problems) + "); open the HTML page"


def _rows(ds, settings: DashboardSettings) -> list[dict]:
    """Per variant: step time (profiled and plain), the profiler's overhead, peak memory,
    data-wait share, longest crop (results JSON rows)."""
    rows = []
    for config in ds.config.values:
        one = ds.sel(config=config)
        stage = one["stage_ms"].mean("step")
        row = {
            "kernels": str(config), "crop": settings.crop, "step_s": float(one["step_ms"].mean()) / 1e3,
            "plain_step_s": float(one["plain_step_ms"]) / 1e3,
            "overhead_frac": float(one["overhead_ms"] / one["plain_step_ms"]),
            "graph_hook_s": float(one["graph_hook_ms"]) / 1e3,
            "peak_gib": float(one["stage_peak_mib"].max()) / 1024,
            "data_wait_frac": float(stage.sel(stage="data") / stage.sum()),
        }  # fmt: skip
        if "longest_crop" in one:
            tried = one["crop_source"].values.astype(str) == "search"
            crops, outcomes = one["search_crop"].values[tried], one["crop_outcome"].values[tried]
            row.update(
                longest_N=int(one["longest_crop"]), longest_stopped_by=str(one["longest_stopped_by"].values),
                longest_predicted_N=int(one["longest_predicted"]),
                search_steps=", ".join(f"{int(c)}: {o}" for c, o in zip(crops, outcomes)),
            )  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(
        DashboardSettings.for_device(),
        preset=args.preset, crop=args.crop, kernels=tuple(args.kernels), dtype=args.dtype,
        checkpoint=False if args.no_checkpoint else None, backward=not args.forward_only, quick=args.quick,
        longest=not args.no_longest, max_crop=args.max_crop, time_budget_s=args.time_budget, data=args.data,
        overhead=args.overhead,
    )  # fmt: skip
    device = describe_device()
    env = environment()
    print(f"{device}: {settings}")
    began = time.perf_counter()
    ds = run_profile(settings, on_status=lambda text: print(f"[{time.perf_counter() - began:6.1f} s] {text}"))
    seconds = time.perf_counter() - began

    rows = _rows(ds, settings)
    config = {**dataclasses.asdict(settings), "seconds": seconds}
    summary = write_json("dashboard", env, rows, config, out_dir=args.out)
    out, stem = summary.parent, summary.stem
    zarr_path = save(ds, out / f"{stem}.zarr")
    figures = plots.figures(ds)
    page = out / f"{stem}.html"
    page.write_text(page_html(figures, settings, device, seconds))
    png_how = write_png(figures, page, out / f"{stem}.png")

    print_table(rows, list(rows[0]))
    print(f"results {zarr_path} and {summary.name}\npage    {page}\npng     {out / f'{stem}.png'} ({png_how})")
    print(f"dashboard run took {seconds:.1f} s on {device} (target on an H100: under 120 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
