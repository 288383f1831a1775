"""Command-line script: `python convert/orbax_to_hf.py SRC DST [--dtype ...] [--overwrite]` (same as `phi-jax convert orbax-to-hf`)."""

import sys

from phi_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main("orbax-to-hf"))
