"""python -m jaxsft.main --config configs/RUN.py [--config.KEY=VALUE ...]"""

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

    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
