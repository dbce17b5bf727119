import sys

from dcvit_engine.cli import main

sys.exit(main())
