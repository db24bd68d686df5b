import sys

from largelm.convert.cli import main

sys.exit(main())
