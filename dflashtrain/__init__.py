"""dflashtrain: a config-driven trainer for block-diffusion speculative-decoding drafters."""

__version__ = "0.1.0"
