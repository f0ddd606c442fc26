"""A Flower app that measures what each compressed reply occupies on the wire (see ../README.md)."""
