"""`python -m phi_jax.cli ...` = `phi-jax ...`."""

import sys

from phi_jax.cli import main

sys.exit(main())
