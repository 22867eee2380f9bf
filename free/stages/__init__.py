"""Stage entry points: compose config, call the core, write artifacts."""
