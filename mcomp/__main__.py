import sys

from mcomp.cli import main

sys.exit(main())
