"""Private helpers shared across the package: file reads and atomic writes (``io``), config field
checks (``validation``), the C allocator setting (``memory``). Nothing here is public API except
``retain_freed_memory``, exported as ``dsg_ext.retain_freed_memory``."""
