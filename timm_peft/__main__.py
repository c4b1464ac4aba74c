"""``python -m timm_peft`` runs the ``timm-peft`` command line."""
from .cli import main

raise SystemExit(main())
