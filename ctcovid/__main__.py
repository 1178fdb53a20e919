import sys

from ctcovid.cli.main import main

sys.exit(main())
