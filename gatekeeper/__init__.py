"""gatekeeper: an admission-controlling socket proxy for build farms."""

__version__ = "0.1.0"
