"""Migration scripts, one per revision, oldest first; each is frozen once released."""
