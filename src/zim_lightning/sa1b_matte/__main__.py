"""``python -m zim_lightning.sa1b_matte`` (torchrun runs the builder this way)."""

import sys

from zim_lightning.sa1b_matte.cli import main

sys.exit(main())
