"""The exact low-rank engine: factored operators, exact/randomized/dense SVD, rank rules, exact quality."""
from .decompose import SOLVERS, LowRank, finite_total, low_rank, svd_of, truncate
from .operators import Dense, Factored, Operator, frob2, inner, weighted_sum
from .quality import Quality, measure
from .rank_select import RankRule, choose_rank, choose_ranks
from .svd_result import SVD

__all__ = [
    "SOLVERS", "LowRank", "finite_total", "low_rank", "svd_of", "truncate", "Dense", "Factored", "Operator", "frob2",
    "inner", "weighted_sum", "Quality", "measure", "RankRule", "choose_rank", "choose_ranks", "SVD",
]
