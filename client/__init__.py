"""What runs inside an institution: the ClientApp and DP-SGD local training."""

import privatune.common  # noqa: F401  (before Opacus is imported: see common/__init__.py)
