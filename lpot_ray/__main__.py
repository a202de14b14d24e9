"""python -m lpot_ray: the same as the lpot-ray command."""

from .cli import main

raise SystemExit(main())
