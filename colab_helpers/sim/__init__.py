"""Sim: the measurement and simulation apparatus (a Colab user never runs it).

Owns the digital twin that replays routing traces against cache policies (``twin``, ``twin_cli``,
``twin_family``, ``twin_project``, ``twin_record``, ``trace``, ``timing``, ``copysim``), the
dispatch counter (``dispatch_count``) and random models for tests and walkthroughs
(``random_mixtral``, ``random_moe``, ``synthetic``).

May import everything below it (weights, runtime, planning, model, conversation); nothing below
imports it.
"""
