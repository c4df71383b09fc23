import sys

from fhirbridge.cli.main import main

sys.exit(main())
