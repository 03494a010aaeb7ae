import sys

from rocketkit.cli import main

sys.exit(main())
