"""``python -m rosetta``, the same as the ``rosetta`` command; ``torchrun -m rosetta
train CONFIG`` trains on several processes (README: "Training on several processes")."""

import sys

from rosetta.cli import main

sys.exit(main())
