"""Analyses of bottlenecked vision transformers: capture, KL and activity, patch voting, mutual
information and NMI between heads, the repetition probe and the query-key SVD. Information in nats."""
from .mutual_information import (
    Estimate, NMIMatrix, joint_mutual_information, log_density_matrix, mutual_information, mutual_information_uu,
    mutual_information_uv, nmi_matrix, normalized_mutual_information)
