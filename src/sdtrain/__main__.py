"""``python -m sdtrain`` (also what ``accelerate launch -m sdtrain train ...`` runs)."""

import sys

from sdtrain.cli import main

sys.exit(main())
