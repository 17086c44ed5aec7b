"""The fraud-scoring example: simulated card payments, streaming features, prompts, baseline.

Importing this package loads numpy only: scikit-learn and matplotlib are imported inside the
functions that need them, and nothing here imports torch or the server.
"""

from slimserve.clients.fraud.baseline import (
    BaselineModel,
    predict,
    predict_features,
    train_baseline,
)
from slimserve.clients.fraud.features import (
    FEATURE_NAMES,
    LABEL_FRAUD,
    LABEL_LEGIT,
    LABELS,
    PROMPT_FORMAT,
    PROMPT_QUESTION,
    FeatureBuilder,
    FeatureConfig,
    Features,
    build_features,
    feature_vector,
    render_prompt,
)
from slimserve.clients.fraud.metrics import (
    LatencySummary,
    SystemMetrics,
    SystemResult,
    average_precision,
    evaluate,
    latency_summary,
    markdown_table,
    plot_curves,
    precision_at_k,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    write_report,
)
from slimserve.clients.fraud.schema import (
    COLUMNS,
    ReadResult,
    RowError,
    Transaction,
    read_transactions,
    write_transactions,
)
from slimserve.clients.fraud.simulate import (
    Scenario,
    Simulation,
    run_simulation,
    simulate,
    write_simulation,
)

__all__ = [
    "COLUMNS",
    "FEATURE_NAMES",
    "LABELS",
    "LABEL_FRAUD",
    "LABEL_LEGIT",
    "PROMPT_FORMAT",
    "PROMPT_QUESTION",
    "BaselineModel",
    "FeatureBuilder",
    "FeatureConfig",
    "Features",
    "LatencySummary",
    "ReadResult",
    "RowError",
    "Scenario",
    "Simulation",
    "SystemMetrics",
    "SystemResult",
    "Transaction",
    "average_precision",
    "build_features",
    "evaluate",
    "feature_vector",
    "latency_summary",
    "markdown_table",
    "plot_curves",
    "precision_at_k",
    "precision_recall_curve",
    "predict",
    "predict_features",
    "read_transactions",
    "render_prompt",
    "roc_auc",
    "roc_curve",
    "run_simulation",
    "simulate",
    "train_baseline",
    "write_report",
    "write_simulation",
    "write_transactions",
]
