"""Small compatibility shims for third-party packages (see each README)."""
