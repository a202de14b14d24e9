"""python -m lpot_ray.demo"""

from . import main

raise SystemExit(main())
