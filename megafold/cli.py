"""The ``megafold`` command (also ``python -m megafold``).

    megafold quickstart                                   # precache, train, predict, profile, report
    megafold precache SRC... --out STORE [--msa-dir D]    # features of structure files -> zarr store
    megafold train --store STORE [--preset tiny] [--steps N] [--crop 384] [--out DIR] [--resume]
                   [--set FIELD=VALUE ...]                # model config fields, e.g. diffusion_chunk=2
                   [--pad-multiple N]                     # batches padded to N tokens (GPU default 32)
    megafold predict INPUT... --checkpoint DIR/checkpoint.pt [--out DIR]
    megafold profile [--preset tiny] [--crop 32] [--kernels torch triton]
    megafold bench [ARGS...]                              # benchmarks/kernels.py
    megafold tuning [--cache-dir DIR] [--op NAME] [--trials]  # what the kernel tuner chose, and from what
    megafold tune [--preset paper] [--crop 384] [--force] [--ops NAME,...]  # tune a step's kernels on this GPU

A mistake in the input (a missing store, an unknown preset, a bad crop size, a path that
does not exist) prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from megafold.arguments import OneLineParser, config_override, non_negative_int, one_line, positive_float, positive_int
from megafold.errors import ConfigError, MegafoldError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config(
    preset_name: str | None, kernels: str, device: str, *, bf16: bool | None = None,
    checkpointing: bool | None = None, settings: Sequence[tuple[str, object]] = (),
):
    """The model config of a command line: the preset ("tiny" on the CPU, "small" on a GPU by
    default) with the kernels, bf16 (default: the preset's on a GPU, off on the CPU) and
    activation checkpointing switches applied, then the ``--set FIELD=VALUE`` overrides
    (ConfigError names an unknown field or a bad value)."""
    from megafold.model import preset

    name = preset_name or ("small" if device.startswith("cuda") else "tiny")
    overrides = {"kernels": kernels}
    if bf16 is not None:
        overrides["bf16"] = bf16
    elif not device.startswith("cuda"):
        overrides["bf16"] = False  # bf16 autocast on the CPU is slow and not what a GPU run does
    if checkpointing is not None:
        overrides["checkpoint"] = checkpointing
    return preset(name, **{**overrides, **dict(settings)})  # --set wins


# ---------------------------------------------------------------------------- train


def _add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="settings", action="append", type=config_override, default=[], metavar="FIELD=VALUE",
        help="model config field, e.g. diffusion_chunk=2 or pair_offload=true (repeatable; "
        "megafold.model.AlphaFold3Config lists the fields)",
    )


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="precache store to train on (megafold precache)")
    parser.add_argument("--out", default="outputs/train", help="run directory (checkpoint.pt, metrics.csv/.zarr)")
    parser.add_argument("--preset", default=None, help='model preset: "tiny", "small" or "paper" (default: tiny on the CPU, small on a GPU)')
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"), help="kernels backend (default auto)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimiser steps in all (default 1000; on --resume the run's)")
    parser.add_argument("--minutes", type=positive_float, default=None, help="stop after this many minutes")
    parser.add_argument("--crop", type=positive_int, default=384, help="crop size in tokens (default 384)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=positive_float, default=1.8e-3, help="peak learning rate (AF3: 1.8e-3)")
    parser.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps (AF3: 1000)")
    parser.add_argument("--decay-every", type=positive_int, default=50_000, help="x0.95 every this many steps (AF3: 50k)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=500)
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate the EMA model every N steps (0: never)")
    parser.add_argument("--keys", nargs="+", default=None, help="train on these store entries only")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument(
        "--pad-multiple", type=non_negative_int, default=None, metavar="N",
        help="pad each batch's tokens and MSA rows to a multiple of N (atoms to a multiple of 8N); the model "
        "ignores padding, and the Triton kernels then compile for a few shapes instead of one per entry size "
        "(default: 32 on a GPU, 0 = none on the CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for GPU presets, off on the CPU)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None, help="per-block activation checkpointing (default: the preset's)")
    _add_set_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args: argparse.Namespace) -> int:
    from megafold.model import AlphaFold3Config
    from megafold.train import TrainConfig, Trainer, load_checkpoint
    from megafold.train.trainer import CHECKPOINT_NAME

    out = Path(args.out)
    checkpoint = out / CHECKPOINT_NAME
    if args.resume:  # the run's own configs; the command line may move, extend or time-limit it
        if args.settings:
            raise ConfigError("--set applies to new runs: a resumed run continues exactly, with its checkpoint's model config")
        state = load_checkpoint(checkpoint)
        saved = TrainConfig.from_dict(state["train_config"])
        config = saved.replace(
            store=args.store, out=str(out), steps=args.steps or saved.steps, max_minutes=args.minutes,
            workers=args.workers, device=args.device or saved.device, progress=not args.quiet,
        )  # fmt: skip
        model = AlphaFold3Config().replace(**state["model_config"])
    else:
        if checkpoint.exists():
            raise ConfigError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose another --out")
        device = args.device or _device_default()
        model = model_config(args.preset, args.kernels, device, bf16=args.bf16, checkpointing=args.checkpointing,
                             settings=args.settings)
        config = TrainConfig(
            store=args.store, out=str(out), keys=tuple(args.keys) if args.keys else None, crop_size=args.crop,
            batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps or 1000, max_minutes=args.minutes,
            lr=args.lr, warmup_steps=args.warmup, decay_every=args.decay_every, checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every, workers=args.workers, seed=args.seed, device=device, progress=not args.quiet,
            pad_multiple=args.pad_multiple if args.pad_multiple is not None else (32 if device.startswith("cuda") else 0),
        )  # fmt: skip
    trainer = Trainer(model, config)
    if args.resume:
        trainer.resume(checkpoint)
    trainer.fit()
    from megafold.train.distributed import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return 0
    last = trainer.history[-1] if trainer.history else {}
    print(
        f"trained to step {trainer.step} ({trainer.skipped_steps} skipped), loss {last.get('loss', float('nan')):.3f}; "
        f"checkpoint {trainer.checkpoint_path}, metrics {out / 'metrics.csv'}"
    )
    return 0


# ---------------------------------------------------------------------------- predict


def load_model(checkpoint: str | os.PathLike, *, ema: bool = True, device: str | None = None):
    """The model of a training checkpoint (its EMA weights unless ``ema=False``), in eval mode."""
    import torch

    from megafold.model import AlphaFold3, AlphaFold3Config
    from megafold.train import load_checkpoint

    device = device or _device_default()
    state = load_checkpoint(checkpoint)
    model = AlphaFold3(AlphaFold3Config().replace(**state["model_config"]))
    if ema:
        prefix = "module."
        model.load_state_dict({k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)})
    else:
        model.load_state_dict(state["model"])
    return model.to(torch.device(device)).eval()


def cmd_predict(args: argparse.Namespace) -> int:
    from megafold.train.predict import predict

    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        if not path.is_file():
            raise ConfigError(f"{path}: no such structure file")
    model = load_model(args.checkpoint, ema=not args.no_ema, device=args.device)
    for path in inputs:
        result = predict(model, path, args.out, steps=args.steps, samples=args.samples, msa_dir=args.msa_dir, seed=args.seed)
        scores = "".join(f", {name} {value:.3f}" for name, value in result.metrics.items())
        print(f"{result.cif_path}: mean pLDDT {max(result.ranking):.1f}{scores}")
    return 0


# ---------------------------------------------------------------------------- profile, bench


def cmd_profile(args: argparse.Namespace) -> int:
    try:
        from megafold.profile import compare, save, summary, variants
    except ImportError as exc:
        print(f"megafold profile: the profiler (megafold.profile) is not available in this install ({exc})", file=sys.stderr)
        return 2
    if "triton" in args.kernels and _device_default() == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        raise ConfigError("kernels triton on the CPU need TRITON_INTERPRET=1 set before the run (the Triton interpreter, very slow)")
    device = args.device or _device_default()
    config = model_config(args.preset, "torch", device, settings=args.settings)
    result = compare(variants(config, tuple(args.kernels)), crop=args.crop, backward=not args.forward_only, device=device, steps=args.steps)
    from megafold.quickstart import profile_rows

    for row in profile_rows(result):
        print("  ".join(f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}" for name, value in row.items()))
    print(summary(result).to_string(float_format=lambda v: f"{v:.2f}"))
    if args.out:
        print(f"saved {save(result, args.out)}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    script = REPO_ROOT / "benchmarks" / "kernels.py"
    if not script.is_file():
        raise ConfigError(f"{script}: no such benchmark (megafold bench runs from a source checkout)")
    return subprocess.call([sys.executable, str(script), *argv])


def cmd_tuning(args: argparse.Namespace) -> int:
    from megafold.kernels._common import tuning_records

    try:
        records = [r for r in tuning_records(args.cache_dir) if args.op in r["op"]]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not records:
        where = args.cache_dir or "the tuning cache's folder"
        print(f"no tuning records in {where}: the tuner writes them when it times a key that has no stored "
              "choice (MEGAFOLD_AUTOTUNE=1, the default on a GPU; =force tunes every key again)")
        return 0
    for record in records:
        trials = record["trials"]  # fastest first
        runner_up = f", next {trials[1]['ms']:.4f} ms" if len(trials) > 1 and "ms" in trials[1] else ""
        print(f"{record['op']} ({', '.join(map(str, record['key']))}) on {record['device']}: {_config_text(record['chosen'])} "
              f"{record['ms'] if record['ms'] is not None else '-'} ms{runner_up} "
              f"({len(record['trials'])} candidates)")
        if args.trials:
            for trial in trials:
                result = f"{trial['ms']:.4f} ms" if "ms" in trial else trial.get("error", "failed")
                print(f"    {result:>12}  {_config_text(trial['config'])}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from megafold.kernels._common import autotune_cache_path
    from megafold.profile import tune_kernels

    device = args.device or _device_default()
    config = model_config(args.preset, "triton", device, settings=args.settings)
    result = tune_kernels(config, crop=args.crop, device=device, msa_rows=args.msa_rows, workers=args.workers,
                          precompile=not args.no_precompile, force=args.force, ops=args.ops)
    phases, compiled = result["phases"], result["precompile"]
    if compiled is not None:
        print(f"compiled {compiled['compiled']} of {compiled['records']} kernel launches in {phases['precompile_s']} s")
    print(f"tuned {len(result['tuned'])} shape keys in a {phases['tuning_step_s']} s step; "
          f"the step with tuning off took {phases['tuned_step_s']} s")
    for row in result["tuned"]:
        print(f"  {row['op']} ({', '.join(map(str, row['key']))}): {_config_text(row['chosen'])} {row['ms']} ms "
              f"(of {row['candidates']} candidates)")
    if not result["tuned"] and args.ops:
        print(f"nothing tuned: no op of this step matches --ops {args.ops}"
              + ("" if args.force else ", or each of its keys had a stored choice (--force tunes them again)")
              + "; `megafold tuning` lists the op names")
    elif not result["tuned"] and not args.force:
        print("every key had a stored choice: --force tunes them again")
    if result["untuned"]:
        print(f"{len(result['untuned'])} keys still ran without a choice: {result['untuned']}")
    print(f"choices in {autotune_cache_path()} (megafold tuning --trials lists every candidate's time)")
    return 0


def _config_text(config: dict | None) -> str:
    return "-" if config is None else " ".join(f"{name}={value}" for name, value in sorted(config.items()))


# ---------------------------------------------------------------------------- quickstart, precache


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    if not args.no_profile and not torch.cuda.is_available():
        # Triton kernels run on the CPU only in the interpreter, which must be chosen before
        # triton is first imported (training still uses kernels "torch").
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from megafold.quickstart import QuickstartOptions, quickstart

    report = quickstart(
        QuickstartOptions(
            data=args.data, out=args.out, minutes=args.minutes, steps=args.steps, crop=args.crop,
            predict_steps=args.predict_steps, profile=not args.no_profile, workers=args.workers,
        )  # fmt: skip
    )
    print(f"report: {report}")
    return 0


def cmd_precache(argv: Sequence[str]) -> int:
    from megafold.precache import build_main

    return build_main(list(argv))


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="megafold", description="Fast, memory-lean AlphaFold3-style training.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    quick = commands.add_parser("quickstart", help="precache, train, predict, profile and write an HTML report")
    quick.add_argument("--data", default="cached_data", help="the shipped data (structures/, msas/)")
    quick.add_argument("--out", default="outputs/quickstart", help="output directory (report.html)")
    quick.add_argument("--minutes", type=positive_float, default=2.0, help="training time (default 2)")
    quick.add_argument("--steps", type=positive_int, default=None, help="stop training after this many steps")
    quick.add_argument("--crop", type=positive_int, default=None, help="crop size (default 48 on the CPU, 256 on a GPU)")
    quick.add_argument("--predict-steps", type=positive_int, default=None, help="sampler steps of the prediction")
    quick.add_argument("--no-profile", action="store_true", help="skip the torch vs triton step profile")
    quick.add_argument("--workers", type=positive_int, default=2, help="precache processes (default 2)")

    commands.add_parser("precache", help="precompute features into a zarr store (megafold precache -h)", add_help=False)

    train = commands.add_parser("train", help="train a model on a precache store")
    _add_train_arguments(train)

    pred = commands.add_parser("predict", help="predict structures (mmCIF with pLDDT, PAE .npy)")
    pred.add_argument("inputs", nargs="+", help="mmCIF / PDB files")
    pred.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    pred.add_argument("--out", default="outputs/predictions")
    pred.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the model's)")
    pred.add_argument("--samples", type=positive_int, default=None, help="samples per input (default: the model's)")
    pred.add_argument("--msa-dir", default=None, help="MSAs: MSA_DIR/KEY/CHAIN.a3m (default: the query alone)")
    pred.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    pred.add_argument("--seed", type=int, default=0)
    pred.add_argument("--device", default=None)

    prof = commands.add_parser("profile", help="time and memory per AF3 module, kernels compared")
    prof.add_argument("--preset", default=None, help="model preset (default: tiny on the CPU, small on a GPU)")
    prof.add_argument("--crop", type=positive_int, default=None, help="tokens (default 32 on the CPU, 384 on a GPU)")
    prof.add_argument("--kernels", nargs="+", default=["torch", "triton"], choices=("torch", "triton", "compile"))
    prof.add_argument("--steps", type=positive_int, default=1)
    prof.add_argument("--forward-only", action="store_true")
    prof.add_argument("--device", default=None)
    prof.add_argument("--out", default=None, help="save the results (zarr)")
    _add_set_argument(prof)

    commands.add_parser("bench", help="kernel benchmarks (benchmarks/kernels.py [--quick])", add_help=False)

    tune = commands.add_parser("tuning", help="what the kernel tuner chose per shape, and every candidate's time")
    tune.add_argument("--cache-dir", default=None, help="the tuning cache's folder (default: $MEGAFOLD_CACHE_DIR "
                                                         "or ~/.cache/megafold)")
    tune.add_argument("--op", default="", help="only ops whose name contains this")
    tune.add_argument("--trials", action="store_true", help="every candidate, fastest first")

    tune_step = commands.add_parser("tune", help="tune every kernel shape of a training step on this GPU "
                                                 "(candidates compiled in parallel first)")
    tune_step.add_argument("--preset", default="paper", help="model preset (default paper)")
    tune_step.add_argument("--crop", type=positive_int, default=384, help="tokens of the synthetic batch (default 384)")
    tune_step.add_argument("--msa-rows", type=positive_int, default=256, help="MSA rows of the batch (default 256)")
    tune_step.add_argument("--workers", type=positive_int, default=None, help="compiling processes (default: CPUs, "
                                                                              "at most 16)")
    tune_step.add_argument("--no-precompile", action="store_true", help="compile in the tuning step instead")
    tune_step.add_argument("--force", action="store_true", help="tune keys that have a stored choice again "
                                                              "(MEGAFOLD_AUTOTUNE=force)")
    tune_step.add_argument("--ops", default="", help="only ops whose name contains one of these comma-separated "
                                                     "parts, e.g. triangle_multiply_out_fwd; OP:KEY keeps only "
                                                     "the shape keys containing KEY, e.g. evo_attention:dkdv "
                                                     "(MEGAFOLD_AUTOTUNE_OPS)")
    tune_step.add_argument("--device", default=None)
    _add_set_argument(tune_step)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in PASS_THROUGH:  # these keep their own arguments
            return PASS_THROUGH[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except MegafoldError as exc:
        print(f"megafold: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megafold: interrupted", file=sys.stderr)
        return 130


COMMANDS = {"quickstart": cmd_quickstart, "train": cmd_train, "predict": cmd_predict, "profile": cmd_profile,
            "tuning": cmd_tuning, "tune": cmd_tune}
PASS_THROUGH = {"precache": cmd_precache, "bench": cmd_bench}
