"""What the aggregator and the institutions share: configuration, model and adapter handling,
data loading, privacy accounting and the privacy ledger format."""

import logging

# Opacus calls logging.basicConfig() on import, which doubles every Flower log line; a root
# handler that is already present makes that call a no-op.
logging.getLogger().addHandler(logging.NullHandler())
