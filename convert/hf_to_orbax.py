"""Command-line script: `python convert/hf_to_orbax.py SRC DST [--dtype ...] [--overwrite]` (same as `phi-jax convert hf-to-orbax`)."""

import sys

from phi_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main("hf-to-orbax"))
