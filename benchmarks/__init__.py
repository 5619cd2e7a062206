"""Scripts that print speed, memory and learning numbers; see the README."""
