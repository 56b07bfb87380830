"""Search over site order and per-hop hyperparameters (Optuna); no gRPC, SQL or torch."""

from ordering._baselines import (
    Evaluation,
    cyclic_random_plan,
    evaluate_plan,
    exhaustive_ranking,
    fixed_order_plan,
    random_search,
)
from ordering._compare import RANDOM_SEARCH, best_so_far, compare_encodings
from ordering._encodings import (
    ENCODINGS,
    AllOrders,
    LehmerCode,
    PermutationEncoding,
    RandomKeys,
    default_encoding,
    encoding_by_name,
)
from ordering._heuristics import (
    SHORT_CYCLES_FINAL_FRACTION,
    SHORT_CYCLES_LEARNING_RATE_POSITION,
    probe_order,
    short_cycles_seed,
    site_typicality,
)
from ordering._importance import OrderImportance, order_importance
from ordering._modes import MODES, ModeSearchSpace, balanced_groups
from ordering._objective import (
    Aggregation,
    Direction,
    PlanExecutor,
    PlanFailed,
    PlanPruned,
    Reporter,
    SiteScore,
    TrialOutcome,
    aggregate,
    site_forgetting,
)
from ordering._plan import STRATEGIES, CandidatePlan, Federation, Hop, HopHyperparameters
from ordering._pruning import PruningSettings, StagePruner, cycle_end_steps, stage_key
from ordering._space import FloatRange, IntRange, SearchSpace, SearchSpaceError
from ordering._study import (
    DEFAULT_PRUNING,
    SAMPLERS,
    OrderingStudy,
    SamplerName,
    StudyMismatch,
    TrialRecord,
)
from ordering._synthetic import SyntheticObjective

__all__ = [
    "DEFAULT_PRUNING",
    "ENCODINGS",
    "MODES",
    "RANDOM_SEARCH",
    "SAMPLERS",
    "SHORT_CYCLES_FINAL_FRACTION",
    "SHORT_CYCLES_LEARNING_RATE_POSITION",
    "STRATEGIES",
    "Aggregation",
    "AllOrders",
    "CandidatePlan",
    "Direction",
    "Evaluation",
    "Federation",
    "FloatRange",
    "Hop",
    "HopHyperparameters",
    "IntRange",
    "LehmerCode",
    "ModeSearchSpace",
    "OrderImportance",
    "OrderingStudy",
    "PermutationEncoding",
    "PlanExecutor",
    "PlanFailed",
    "PlanPruned",
    "PruningSettings",
    "RandomKeys",
    "Reporter",
    "SamplerName",
    "SearchSpace",
    "SearchSpaceError",
    "SiteScore",
    "StagePruner",
    "StudyMismatch",
    "SyntheticObjective",
    "TrialOutcome",
    "TrialRecord",
    "aggregate",
    "balanced_groups",
    "best_so_far",
    "compare_encodings",
    "cycle_end_steps",
    "cyclic_random_plan",
    "default_encoding",
    "encoding_by_name",
    "evaluate_plan",
    "exhaustive_ranking",
    "fixed_order_plan",
    "order_importance",
    "probe_order",
    "random_search",
    "short_cycles_seed",
    "site_forgetting",
    "site_typicality",
    "stage_key",
]
