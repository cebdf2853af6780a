"""What runs on the aggregator: the ServerApp, the adapter strategy and the run report."""
