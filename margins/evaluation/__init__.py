"""Evaluation: face verification (LFW protocol, IJB-B/C templates), open-set retrieval metrics
and plots.

Everything here runs on the host in NumPy, after the embeddings have been computed.
"""

from margins.evaluation.ijb import IJBResult
from margins.evaluation.ijb import evaluate_ijb
from margins.evaluation.ijb import format_ijb
from margins.evaluation.ijb import nearest_tar_at_far
from margins.evaluation.ijb import template_features
from margins.evaluation.plots import draw_angle_histograms
from margins.evaluation.plots import draw_features
from margins.evaluation.plots import draw_roc
from margins.evaluation.plots import pair_angles
from margins.evaluation.plots import plot_angle_histograms
from margins.evaluation.plots import plot_embeddings
from margins.evaluation.plots import plot_roc
from margins.evaluation.retrieval import format_retrieval
from margins.evaluation.retrieval import retrieval_metrics
from margins.evaluation.verification import VerificationResult
from margins.evaluation.verification import check_pairs
from margins.evaluation.verification import evaluate_verification
from margins.evaluation.verification import flip_embeddings
from margins.evaluation.verification import format_verification
from margins.evaluation.verification import make_pairs
