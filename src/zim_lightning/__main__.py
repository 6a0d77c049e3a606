import sys

from zim_lightning.cli import main

sys.exit(main())
