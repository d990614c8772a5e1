"""Offline batch inference (``fastserve batch``): files scored through the online path."""
