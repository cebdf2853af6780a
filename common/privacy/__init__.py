"""privacy: the accounting of DP mechanisms, the institution's signed ledger and its audits."""
