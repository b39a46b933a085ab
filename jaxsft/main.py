"""python -m jaxsft.main --config configs/RUN.py [--config.KEY=VALUE ...]

Exit codes: 0 finished (or stopped by train.stop_after), 2 bad input (nothing written),
3 stopped by the numerical guard, 4 a run file or checkpoint could not be written, 5 finished
but a general-capability eval regressed with eval.fail_on_regression=True (everything written
and exported), 75 stopped by SIGTERM/SIGINT after saving (rerun to resume), 130 aborted by a
second Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from jaxsft.errors import run_cli


@run_cli
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m jaxsft.main", description=__doc__)
    parser.add_argument("--config", required=True, help="ml_collections config file")
    args, overrides = parser.parse_known_args(argv)
    from jaxsft import config as config_lib
    from jaxsft import distributed

    config = config_lib.load(args.config, overrides)
    distributed.maybe_initialize()
    from jaxsft.train.loop import run

    return exit_code(run(config), bool(config.eval.fail_on_regression))


def exit_code(summary: dict, fail_on_regression: bool = False) -> int:
    """The exit code of a run that returned `summary` (docs/reliability.md)."""
    from jaxsft.errors import EXIT_OK, EXIT_REGRESSION, EXIT_SIGNAL

    if summary.get("stopped") == "signal":
        return EXIT_SIGNAL
    if fail_on_regression and summary.get("regressions"):
        print(f"error: {summary['verdict']} (eval.fail_on_regression)", file=sys.stderr)
        return EXIT_REGRESSION
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
