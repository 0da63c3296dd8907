"""vla_scale: distributed training of vision-language-action robot policies."""

__version__ = "0.1.0"
