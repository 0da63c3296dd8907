"""data_tools: turn datasets into vla_scale shards (`python -m data_tools --help`).

Every converter writes through `ShardWriter`, so the format in
`vla_scale.data.format` is produced in exactly one place.
"""

from data_tools.writer import DatasetWriteError, ShardWriter

__all__ = ["DatasetWriteError", "ShardWriter"]
