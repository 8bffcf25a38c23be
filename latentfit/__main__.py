import sys

from latentfit.cli import main

sys.exit(main())
