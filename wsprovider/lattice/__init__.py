"""Lattices: where the components on the other side of the WebSocket live."""
