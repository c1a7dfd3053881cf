"""The notebooks' helpers under their old name: everything here lives in ``colab_helpers.walkthroughs``.

One module per walkthrough there (``setup``, ``fits``, ``quantization``, ``cache``, ``benchmark``); this
module only re-exports them, so ``from colab_helpers.notebook import ...`` in existing notebooks keeps working.
"""

from __future__ import annotations

from .walkthroughs.benchmark import (
    BenchRow,
    bench_table,
    benchmark,
    plot_benchmark,
    prefetch_effect,
)
from .walkthroughs.cache import (
    expert_counts,
    hit_rate_sweep,
    load_for_cache_walkthrough,
    plot_expert_heatmap,
    plot_hit_rates,
    plot_prefetch_effect,
    random_routing,
    record_routing,
    reuse_rate,
    stickiness_line,
    t4_projection,
)
from .walkthroughs.fits import (
    Component,
    components_table,
    mixtral_components,
    plan_by_category,
    plot_plan,
    plot_sweep,
    sweep_experts_on_gpu,
)
from .walkthroughs.quantization import (
    QuantResult,
    group_ids,
    plot_groups,
    plot_quant_errors,
    quant_table,
    quantization_errors,
)
from .walkthroughs.setup import (
    GB,
    MB,
    T4_RAM_GB,
    T4_VRAM_GB,
    EnvironmentReport,
    ModelChoice,
    choose_model,
    environment_report,
    in_colab,
    plan_for,
    plan_html,
    show_plan,
)

__all__ = [
    "load_for_cache_walkthrough",
    "plot_prefetch_effect",
    "prefetch_effect",
    "random_routing",
    "stickiness_line",
    "t4_projection",
    "BenchRow",
    "Component",
    "EnvironmentReport",
    "GB",
    "MB",
    "ModelChoice",
    "QuantResult",
    "T4_RAM_GB",
    "T4_VRAM_GB",
    "bench_table",
    "benchmark",
    "choose_model",
    "components_table",
    "environment_report",
    "expert_counts",
    "group_ids",
    "hit_rate_sweep",
    "in_colab",
    "mixtral_components",
    "plan_by_category",
    "plan_for",
    "plan_html",
    "plot_benchmark",
    "plot_expert_heatmap",
    "plot_groups",
    "plot_hit_rates",
    "plot_plan",
    "plot_quant_errors",
    "plot_sweep",
    "quant_table",
    "quantization_errors",
    "record_routing",
    "reuse_rate",
    "show_plan",
    "sweep_experts_on_gpu",
]
