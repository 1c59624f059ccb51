"""segppo."""
