"""``python -m learned_optim.packaging NAME ...``: package the general rule (see
:mod:`learned_optim.packaging.general_rule`)."""

import sys

from learned_optim.packaging.general_rule import main

sys.exit(main())
