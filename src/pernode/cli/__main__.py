import sys

from pernode.cli import main

sys.exit(main())
