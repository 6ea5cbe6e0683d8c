import sys

from mamp.cli import main

sys.exit(main())
