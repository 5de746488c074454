"""The package version (a module of its own, so that any module can read it without importing the package).

Run identities, feature-cache keys, training checkpoints and zoo steps record it as the code that
computed their results (`fingerprint.code_versions`): bump it whenever what mcomp computes changes,
or earlier work would be reused as if it were the same."""

__version__ = "0.2.0"
