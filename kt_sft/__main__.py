"""`python -m kt_sft ...` is the same as `kt-sft ...`."""

import sys

from kt_sft.cli import main

sys.exit(main())
