import sys

from mlet_dist.cli import main

sys.exit(main())
