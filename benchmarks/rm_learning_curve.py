"""The reward models' learning curve on a demo task (RM training only, no PPO); see
`segppo.demo.learning_curve`. Writes OUTPUT/curve.json after every point, then OUTPUT/curve.png and
the markdown table for benchmarks/RESULTS.md. Rerun with the same options to continue a run cut short.

    python benchmarks/rm_learning_curve.py --output runs/curve-pairs --task pairs \
        --multipliers 1,2,4,8 --epochs 2 --seeds 2 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from segppo.demo.learning_curve import CurveSettings, curve_markdown, run_learning_curve, save_curve_plot
from segppo.demo.sft import SFTSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="Run folder (curve.json, curve.png, data, RMs).")
    parser.add_argument("--task", default="pairs", help="Demo gold task: animals | pairs.")
    parser.add_argument("--budget", default="default", help="Demo budget: its RM settings and 1× pairs.")
    parser.add_argument(
        "--multipliers", default="1,2,4,8", help="Training pairs as multiples of the budget's."
    )
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per point (accuracy after each).")
    parser.add_argument("--granularities", default="bandit,token,segment")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="First seed (also the data's).")
    parser.add_argument("--eval-pairs", type=int, default=2048, help="Held-out preference pairs.")
    parser.add_argument(
        "--rm-backbone",
        default=None,
        metavar="HIDDENxLAYERS",
        help="Start the RMs from a model of this size trained like the SFT policy (e.g. 128x4) "
        "instead of the budget's backbone.",
    )
    parser.add_argument("--rm-backbone-pretrain-steps", type=int, default=None, help="Its clean-data steps.")
    parser.add_argument("--rm-backbone-sft-steps", type=int, default=None, help="Its SFT steps (0: none).")
    parser.add_argument("--rm-backbone-lr", type=float, default=None, help="Its peak learning rate.")
    parser.add_argument(
        "--rm-backbone-shuffle",
        type=float,
        default=None,
        help="Chance that its clean demonstrations list the prompt's items in a random order (default 0.3).",
    )
    parser.add_argument("--cache-dir", default=None, help="SFT policy cache (default ~/.cache/segppo/demo).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = CurveSettings(
        task=args.task,
        budget=args.budget,
        multipliers=tuple(float(m) for m in args.multipliers.split(",")),
        epochs=args.epochs,
        granularities=tuple(g.strip() for g in args.granularities.split(",")),
        seeds=args.seeds,
        first_seed=args.seed,
        eval_pairs=args.eval_pairs,
        rm_backbone=parse_backbone(args),
    )
    summary = run_learning_curve(args.output, settings, cache_dir=args.cache_dir, threads=args.threads)
    plot = save_curve_plot(summary, Path(args.output) / "curve.png")
    print(curve_markdown(summary))
    print(f"first budget where every RM clears {summary['target_accuracy']}: {summary['first_clearing']}")
    print(f"curve in {Path(args.output) / 'curve.json'}, plot in {plot}")


def parse_backbone(args: argparse.Namespace) -> SFTSettings | None:
    """`--rm-backbone HIDDENxLAYERS` (and its training options) → the SFT recipe's settings at that
    size (MLP 3× hidden, 4 heads)."""
    if args.rm_backbone is None:
        return None
    try:
        hidden, layers = (int(x) for x in args.rm_backbone.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--rm-backbone takes HIDDENxLAYERS, e.g. 128x4, got {args.rm_backbone!r}") from None
    training = {
        "pretrain_steps": args.rm_backbone_pretrain_steps,
        "sft_steps": args.rm_backbone_sft_steps,
        "pretrain_p_shuffle": args.rm_backbone_shuffle,
        "lr": args.rm_backbone_lr,
    }
    return SFTSettings(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        **{k: v for k, v in training.items() if v is not None},
    )


if __name__ == "__main__":
    main()
