"""nietest: a supervisor daemon running Dramatiq workers for Nieta image-generation campaigns."""

__version__ = "0.1.0"
