"""What fastserve measures about itself, exported for Prometheus."""
