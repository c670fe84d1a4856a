"""Deployment and the local development stack (not part of the installed library)."""
