"""Planning: what fits where, before anything is loaded.

Owns the memory plan of one device (``planner``: budget, rows, how many experts fit), the split across
several GPUs (``multigpu``), the ``plan`` command (``plan_cli``) and the allocation meter that checks
the plan's transient rows (``memtrack``).

May import: ``weights`` (the model description) and ``runtime``'s constants (attention path,
cache slot alignment), plus ``usage``. Never ``conversation`` or ``sim``.
"""
