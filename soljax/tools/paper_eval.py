"""The ``--protocol paper`` option of ``soljax eval ppl``: its flags, its run and its report
(the protocol itself is :mod:`soljax.eval.protocol`; docs/paper_protocol.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from soljax.errors import SoljaxError

#: Flags of the paper protocol only (attribute names).
PAPER_ONLY = ("prefix", "batches", "rows", "grid_points", "front_points", "dtype")
#: Flags of the default protocol that the paper protocol refuses.
DEFAULT_ONLY = ("targets", "methods", "static", "blocks", "split", "guard")


def add_arguments(parser) -> None:
    """Adds ``--protocol`` and the paper protocol's flags to the ``eval ppl`` parser."""
    parser.add_argument("--protocol", choices=["soljax", "paper"], default="soljax", help="paper: the paper's "
                        "protocol (docs/paper_protocol.md): WikiText-2 validation, 7 x 16 unshuffled blocks, the "
                        "run's M and T, the LM in bfloat16, the reference's target grid, the policy's Pareto front "
                        "against fixed and best-of-N random")
    parser.add_argument("--prefix", type=int, help="paper: dense prefix M (default: the run's training context_len)")
    parser.add_argument("--batches", type=int, help="paper: batches of --batch-size blocks (default 7)")
    parser.add_argument("--rows", type=int, help="paper: rows read from the data (default 2000)")
    parser.add_argument("--grid-points", type=int, help="paper: evaluate only this many grid targets, spread "
                        "evenly over the nominal net keep (default: all)")
    parser.add_argument("--front-points", type=int, help="paper: front targets rerun with --trials random "
                        "schedules (default 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="paper: the LM's dtype (default bfloat16)")


def check_default_protocol(args) -> None:
    """Refuses the paper protocol's flags without ``--protocol paper``."""
    for flag in PAPER_ONLY:
        if getattr(args, flag) is not None:
            raise SoljaxError(f"--{flag.replace('_', '-')} needs --protocol paper")


def run(args) -> None:
    """``soljax eval ppl --protocol paper``: evaluates, writes the report, prints it (or JSON)."""
    from soljax.eval.paper_report import write_paper_report
    from soljax.eval.protocol import PaperConfig, eval_paper

    for flag in DEFAULT_ONLY:
        if getattr(args, flag) not in (None, False):
            raise SoljaxError(f"--{flag} does not go with --protocol paper (it scans the reference's target grid "
                              f"over 7 x 16 unshuffled blocks; use --grid-points, --batches and --batch-size for "
                              f"smaller runs)")
    given = {k: getattr(args, k) for k in ("prefix", "batches", "batch_size", "rows", "dtype", "trials",
                                           "grid_points", "front_points") if getattr(args, k) is not None}
    pc = PaperConfig(data=args.data, seed=args.seed, **given)
    out = Path(args.out) if args.out else Path(args.run) / "eval_paper"
    result = eval_paper(args.run, pc, out, progress=not args.quiet)
    paths = write_paper_report(out)
    if args.json:
        print(json.dumps({"protocol": result["protocol"], "front": result["front"]["points"]}))
    else:
        print(paths["report"].read_text())
    print(f"soljax: paper-protocol evaluation written to {out} (report.md, pareto.png, protocol.json, scan/, "
          f"front/)", file=sys.stderr)


def report(out_dir: Path) -> bool:
    """Rewrites and prints the report when ``out_dir`` holds a paper-protocol evaluation; False if not."""
    if not (Path(out_dir) / "protocol.json").is_file():
        return False
    from soljax.eval.paper_report import write_paper_report

    paths = write_paper_report(Path(out_dir))
    print(paths["report"].read_text())
    print(f"soljax: report written to {paths['report']}", file=sys.stderr)
    return True
